"""The state store under CGI: one process per request, the WAL left short for the next one.

On Python 3.12+ a CGI process asks SQLite not to checkpoint when it closes the
store (SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE): that checkpoint and the next
request's fresh WAL header cost three fsyncs per request. The WAL is then
emptied by whichever request finds it over CGI_WAL_LIMIT. Dedupe must hold
across processes all the same, the WAL must stay bounded, and everything else
(older Pythons, servers, the command line) must close as before.
"""

import os
import sqlite3
import subprocess
import sys
from urllib.parse import urlencode

import pytest
from conftest import REPO, parse_jsonl, write_ini
from test_python_floor import find_interpreter

import smsc_handler


def python_312_or_later():
    """Return an interpreter 3.12+ (this one if it is), or None."""
    if sys.version_info >= (3, 12):
        return sys.executable
    for wanted in ("3.13", "3.12"):
        found = find_interpreter(wanted)
        if found:
            return found
    return None


def older_python():
    """Return an interpreter before 3.12 (this one if it is), or None."""
    if sys.version_info < (3, 12):
        return sys.executable
    return find_interpreter("3.11") or find_interpreter("system")


def callback(python, config, number, note=""):
    fields = {"id": str(number), "phone": "79991234567", "status": "1"}
    if note:
        fields["note"] = note  # kept in the line's params: a longer line
    body = urlencode(fields).encode()
    environ = {"PATH": os.environ.get("PATH", os.defpath), "GATEWAY_INTERFACE": "CGI/1.1",
               "REQUEST_METHOD": "POST", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": str(len(body)),
               "SMSC_HANDLER_CONFIG": str(config)}
    done = subprocess.run([python, str(REPO / "handler.cgi")], env=environ, input=body,
                          capture_output=True, timeout=60)
    assert done.stdout.startswith(b"Status: 200 OK\r\n") and done.stdout.endswith(b"\r\n\r\nOK"), done
    return done


@pytest.fixture
def cgi_config(tmp_path):
    return write_ini(tmp_path / "config.ini", {"handler": {"data_dir": "data"}, "jsonl": {"fsync": "no"}})


def test_cgi_on_312_leaves_a_short_wal_and_still_dedupes(tmp_path, cgi_config):
    python = python_312_or_later()
    if python is None:
        pytest.skip("no Python 3.12+ here")
    wal = tmp_path / "data" / (smsc_handler.STATE_FILE + "-wal")
    sizes = []
    # 70 new callbacks, then three repeats. Lines longer than INDEX_LAG: the quick write
    # commits each (as every write did before it), so the WAL passes the limit.
    numbers = list(range(1, 71)) + [1, 35, 70]
    for number in numbers:
        callback(python, cgi_config, number, note="n" * (smsc_handler.INDEX_LAG + 1000))
        sizes.append(wal.stat().st_size if wal.exists() else 0)
    assert sizes[0] > 0  # the first close did not checkpoint: the WAL is left for the next request
    assert max(sizes) < smsc_handler.CGI_WAL_LIMIT + 64 * 1024  # bounded: one request past the limit at most
    assert any(later < earlier for earlier, later in zip(sizes, sizes[1:]))  # and emptied when over it
    assert [line["id"] for line in parse_jsonl(tmp_path / "data" / "status.jsonl")] == [
        str(n) for n in range(1, 71)]  # the repeats were known, each stored once
    with smsc_handler.StateStore(smsc_handler.load_config(str(cgi_config))) as state:
        state.record_tails()  # the last lines' ids, left in the tail by the quick write
    with sqlite3.connect(str(tmp_path / "data" / smsc_handler.STATE_FILE)) as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone() == (70,)


def test_cgi_before_312_checkpoints_on_close_as_before(tmp_path, cgi_config):
    python = older_python()
    if python is None:
        pytest.skip("no Python before 3.12 here")
    callback(python, cgi_config, 1)
    callback(python, cgi_config, 1)
    assert not (tmp_path / "data" / (smsc_handler.STATE_FILE + "-wal")).exists()
    assert len(parse_jsonl(tmp_path / "data" / "status.jsonl")) == 1


def test_outside_cgi_the_store_checkpoints_on_close_under_every_python(tmp_path, cgi_config):
    code = ("import sys; sys.path.insert(0, %r); import smsc_handler as h\n"
            "c = h.load_config(%r); h.ensure_data_dir(c)\n"
            "s = h.StateStore(c); s.begin(); s.remember_new('x', 'status', None, 1.0); s.commit()\n"
            "print(s._lazy_checkpoint); s.close()\n" % (str(REPO), str(cgi_config)))
    for python in {p for p in (python_312_or_later(), older_python()) if p}:
        wal = tmp_path / "data" / (smsc_handler.STATE_FILE + "-wal")
        done = subprocess.run([python, "-c", code], capture_output=True, timeout=60)
        assert done.stdout == b"False\n", done.stderr.decode()
        assert not wal.exists()


def test_a_deleted_store_starts_empty_even_with_its_wal_left(tmp_path, cgi_config):
    """Deleting state.sqlite3 forgets every id: SQLite drops a WAL it finds beside an empty store."""
    python = python_312_or_later() or sys.executable
    data = tmp_path / "data"
    for number in range(1, 41):
        callback(python, cgi_config, number)
    (data / smsc_handler.STATE_FILE).unlink()
    callback(python, cgi_config, 1)  # forgotten with the store: stored again
    callback(python, cgi_config, 1)  # and now known
    ids = [line["id"] for line in parse_jsonl(data / "status.jsonl")]
    assert ids == [str(n) for n in range(1, 41)] + ["1"]
    with sqlite3.connect(str(data / smsc_handler.STATE_FILE)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM seen").fetchone() == (1,)
