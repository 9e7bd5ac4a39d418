"""Faults (issue 3 item 4): whatever breaks, 200 still means stored and nothing is torn.

Every fault is real: a data folder the process can't write (as an unprivileged
user, or on a read-only mount), a full file system (a 256 KB tmpfs, and the
kernel's /dev/full), a state store held locked by another process or full of
garbage, a writer killed by SIGKILL in the middle of its write(). Hook failures
and hangs are in test_hook.py.
"""

import contextlib
import errno
import json
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from proof_util import (
    HANDLER_CGI,
    PLAIN,
    CGIAnswer,
    Site,
    cgi_environ,
    fast_python,
    file_lines,
    form,
    incoming_callback,
    intact_events,
    python_child,
    run_cgi,
    status_callback,
    write_ini,
)

import smsc_handler


def assert_503(answer):
    """A 503 that tells SMSC to come back: Retry-After, plain text, no diagnostics."""
    status = getattr(answer, "status_int", None) or answer.status
    headers = answer.headers
    body = answer.body
    assert status == 503, (status, body)
    assert headers.get("Retry-After", headers.get("retry-after")) == "240"
    assert headers.get("Content-Type", headers.get("content-type")) == PLAIN
    assert b"Traceback" not in body and b"Error" not in body


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True)


@contextlib.contextmanager
def mounted(path: Path, *mount_args):
    """Mount something at path for the block, or skip the test if mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = run("mount", *mount_args, str(path))
    if done.returncode != 0:
        pytest.skip("mounting is not permitted here: %s" % (done.stderr.strip() or done.returncode))
    try:
        yield path
    finally:
        run("umount", "-l", str(path))


def fill_file_system(folder: Path) -> Path:
    """Write a filler file until the file system says ENOSPC; return it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


############################################################################
# Data folder unwritable
############################################################################

def test_data_dir_that_cannot_be_created_answers_503(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")  # fails for root too
    site = Site(tmp_path, handler={"data_dir": "blocker/data"})
    assert_503(site.post(form(status_callback())))
    assert (tmp_path / "blocker").read_text() == "a file, not a folder"


@pytest.mark.parametrize("dedupe", ["yes", "no"])
@pytest.mark.parametrize("layout", ["missing", "folder", "file"])
def test_data_dir_an_unprivileged_handler_cannot_write_answers_503(layout, dedupe):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the handler as nobody")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    # nobody must reach the config: pytest's tmp_path is 0700, so use a folder of our own.
    top = Path(tempfile.mkdtemp(prefix="smsc-nobody-", dir="/tmp"))
    try:
        top.chmod(0o755)
        config = write_ini(top / "smsc.ini", {"handler": {"data_dir": "data"},
                                               "dedupe": {"enabled": dedupe}})
        config.chmod(0o644)
        data = top / "data"
        if layout != "missing":
            data.mkdir(mode=0o755)  # root's, not writable by nobody
            (data / ".htaccess").write_text("Require all denied\n")
        if layout == "file":
            (data / "status.jsonl").write_bytes(b'{"old": 1}\n')
            (data / "status.jsonl").chmod(0o644)
        before = {p.name: p.read_bytes() for p in data.iterdir()} if data.exists() else None
        body = form(status_callback())
        completed = subprocess.run(
            [*fast_python(), str(HANDLER_CGI)], input=body, capture_output=True, timeout=60,
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], env=cgi_environ(config, body))
        answer = CGIAnswer(completed)
        assert_503(answer)
        assert b"Traceback" not in answer.stderr
        after = {p.name: p.read_bytes() for p in data.iterdir()} if data.exists() else None
        assert after == before  # nothing written, nothing acknowledged
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("dedupe", ["yes", "no"])
def test_read_only_data_folder_answers_503_and_recovers(tmp_path, dedupe):
    site = Site(tmp_path, dedupe={"enabled": dedupe})
    assert site.post(form(status_callback(id="before"))).status_int == 200
    before = site.path().read_bytes()
    with mounted(site.data, "--bind", str(site.data)):
        done = run("mount", "-o", "remount,bind,ro", str(site.data))
        if done.returncode != 0:
            pytest.skip("cannot remount read-only: %s" % done.stderr.strip())
        assert_503(site.post(form(status_callback(id="during"))))
        assert site.path().read_bytes() == before
    retry = site.post(form(status_callback(id="during")))  # SMSC retries once it is fixed
    assert retry.status_int == 200
    assert [e["id"] for e in site.events()] == ["before", "during"]


############################################################################
# Disk full
############################################################################

@pytest.mark.parametrize("dedupe", ["yes", "no"])
def test_writing_to_the_always_full_device_answers_503(tmp_path, dedupe):
    site = Site(tmp_path, dedupe={"enabled": dedupe})
    site.data.mkdir(mode=0o700)
    site.path().symlink_to("/dev/full")
    body = form(status_callback())
    assert_503(site.post(body))
    assert_503(site.post(body))  # not remembered as stored: still refused
    site.path().unlink()
    assert site.post(body).status_int == 200  # SMSC's retry once space is back
    assert len(site.events()) == 1


@pytest.mark.parametrize("dedupe", ["no", "yes"])
def test_full_file_system_leaves_no_partial_line(tmp_path, dedupe):
    small = tmp_path / "small"
    with mounted(small, "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"):
        site = Site(tmp_path, handler={"data_dir": str(small / "data")},
                    dedupe={"enabled": dedupe})
        assert site.post(form(status_callback(id="first"))).status_int == 200
        filler = fill_file_system(small)
        before = site.path().read_bytes()
        # The file's last page has room: a big write is cut short, not refused.
        probe = os.open(site.path(), os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(probe, b"p" * 65536)
            assert 0 < written < 65536, written
            os.ftruncate(probe, len(before))
        finally:
            os.close(probe)
        assert site.path().read_bytes() == before
        big = incoming_callback(id="big", mes="y" * 20000)
        body = form(status_callback(id="big", cmt="y" * 20000))
        for payload in (body, form(big)):
            answer = site.post(payload)
            assert_503(answer)
        assert site.path().read_bytes() == before  # no partial line, nothing new
        for kind in ("status", "incoming"):
            intact_events(site.path(kind))
        filler.unlink()
        assert site.post(body).status_int == 200
        assert site.post(form(big)).status_int == 200
        assert [e["id"] for e in site.events()] == ["first", "big"]
        assert [e["id"] for e in site.events("incoming")] == ["big"]


############################################################################
# State store locked or corrupt
############################################################################

LOCKER = r'''
import sqlite3, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")  # in WAL mode this takes the write lock at once
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
print("released", flush=True)
'''


def hold_lock(site, seconds):
    locker = python_child(LOCKER, site.data / "state.sqlite3", seconds, stdout=subprocess.PIPE)
    assert locker.stdout.readline() == b"locked\n"
    return locker


# A write that needs SQLite's write lock: the first to a file new to the store (it is
# announced in a transaction). The quick write to a known file needs none (below).

def posts_while_locked(site, seconds, *bodies):
    """POST each body while another process holds the store's write lock for `seconds`; return [(answer, its s)]."""
    site.post(form(status_callback(id="warm-up")))  # the status file is known to the store
    locker = hold_lock(site, seconds)
    timed = []
    try:
        for body in bodies:
            started = time.monotonic()
            answer = site.post(body, expect_errors=True)
            timed.append((answer, time.monotonic() - started))
    finally:
        locker.kill()
        locker.wait()
    return timed


def test_a_briefly_locked_state_store_is_waited_for(tmp_path):
    site = Site(tmp_path)
    [(answer, elapsed)] = posts_while_locked(site, 1.5, form(incoming_callback(id="waited")))
    assert answer.status_int == 200
    assert elapsed > 1.0, elapsed  # it did wait for the lock…
    assert [e["id"] for e in site.events("incoming")] == ["waited"]


def test_a_state_store_locked_past_the_busy_timeout_answers_503(tmp_path):
    site = Site(tmp_path)
    [(answer, elapsed)] = posts_while_locked(site, 60, form(incoming_callback(id="locked-out")))
    assert_503(answer)
    assert 9 < elapsed < 20, elapsed  # the 10 s busy timeout, not forever
    assert _bytes(site.path("incoming")) == b""
    assert site.post(form(incoming_callback(id="locked-out"))).status_int == 200
    assert [e["id"] for e in site.events("incoming")] == ["locked-out"]


def test_the_quick_write_to_a_known_file_does_not_wait_for_a_locked_store(tmp_path):
    """A backup or a sqlite3 shell holding the write lock: new callbacks to a known file are stored at once."""
    site = Site(tmp_path)
    bodies = [form(status_callback(id="during-%d" % n)) for n in range(3)]
    timed = posts_while_locked(site, 60, *bodies, bodies[1])
    assert [answer.status_int for answer, _s in timed[:3]] == [200, 200, 200]
    assert sum(seconds for _answer, seconds in timed[:3]) < 2  # none waited for the lock
    assert_503(timed[3][0])  # a repeat goes the full way, which needs the lock (10 s): SMSC retries it later
    assert site.post(bodies[1]).status_int == 200
    assert [e["id"] for e in site.events()] == ["warm-up", "during-0", "during-1", "during-2"]


def _bytes(path):
    return path.read_bytes() if path.exists() else b""


def _real_store(site):
    # Seeded by a real CGI process: the store is closed (WAL checkpointed) when it exits.
    assert site.cgi(form(status_callback(id="seed"))).status == 200
    path = site.data / "state.sqlite3"
    assert not Path(str(path) + "-wal").exists()  # checkpointed on close
    return path


def _garbage(site):
    _real_store(site).write_bytes(random.Random(1).randbytes(16384))


def _text(site):
    _real_store(site).write_bytes(b"this is not a database\n" * 300)


def _header_only(site):
    path = _real_store(site)
    path.write_bytes(path.read_bytes()[:100])


def _scribbled_schema(site):
    path = _real_store(site)
    data = bytearray(path.read_bytes())
    data[100:4096] = random.Random(2).randbytes(3996)
    path.write_bytes(bytes(data))


def _scribbled_pages(site):
    path = _real_store(site)
    data = bytearray(path.read_bytes())
    rng = random.Random(3)
    for start in range(4096, len(data), 4096):
        data[start:start + 4096] = rng.randbytes(4096)
    path.write_bytes(bytes(data))


def _a_folder(site):
    site.data.mkdir(mode=0o700)
    (site.data / "state.sqlite3").mkdir()


def _garbage_wal(site):
    path = _real_store(site)
    Path(str(path) + "-wal").write_bytes(random.Random(4).randbytes(32768))
    Path(str(path) + "-shm").write_bytes(random.Random(5).randbytes(32768))


@pytest.mark.parametrize("corrupt", [_garbage, _text, _header_only, _scribbled_schema,
                                     _scribbled_pages, _a_folder, _garbage_wal],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_corrupt_state_store_answers_503_never_500(tmp_path, corrupt):
    site = Site(tmp_path)
    corrupt(site)
    before = _bytes(site.path())
    answers = [site.post(form(status_callback(id="after"))) for _ in range(2)]
    for answer in answers:
        # site.post fails the test on any wsgi.errors output (a crash's traceback).
        assert answer.status_int in (200, 503), answer.status
        if answer.status_int == 503:
            assert_503(answer)
    events = intact_events(site.path())
    assert _bytes(site.path()).startswith(before)
    if any(a.status_int == 200 for a in answers):
        assert "after" in [e["id"] for e in events]  # a 200 is backed by a line


@pytest.mark.parametrize("corrupt", [_garbage, _text, _a_folder], ids=["garbage", "text", "folder"])
def test_a_state_store_that_is_not_a_database_answers_503(tmp_path, corrupt):
    site = Site(tmp_path)
    corrupt(site)
    before = _bytes(site.path())
    assert_503(site.post(form(status_callback(id="after"))))
    assert _bytes(site.path()) == before


############################################################################
# Config broken
############################################################################

def test_a_broken_config_answers_503_through_cgi_and_writes_nothing(tmp_path):
    config = write_ini(tmp_path / "smsc.ini", {"handler": {"data_dir": "data", "timezone": "Mars/Olympus"}})
    answer = run_cgi(config, form(status_callback()))
    assert_503(answer)
    assert b"Traceback" not in answer.stderr
    assert b"[handler] timezone" in answer.stderr  # the log says why
    assert not (tmp_path / "data").exists()


############################################################################
# A writer killed in the middle of its write()
############################################################################

#: Appends lines of 256 KB to 4 MB with append_line in a tight loop and says
#: "start ID" before and "ack ID" after each: an acknowledged line must survive.
WRITER = r'''
import json, random
path, tag = sys.argv[1], sys.argv[2]
rng = random.Random(tag)
print("ready", flush=True)
n = 0
while True:
    n += 1
    size = rng.randrange(256 * 1024, 4 * 1024 * 1024)
    ident = "%s-%d" % (tag, n)
    pad = chr(ord("a") + n % 26) * size
    line = json.dumps({"id": ident, "size": size, "pad": pad}) + "\n"
    print("start " + ident, flush=True)
    smsc_handler.append_line(path, line.encode("ascii"), fsync=False)
    print("ack " + ident, flush=True)
'''


def _torn_tail(path):
    """Return (offset, bytes) of the file's unterminated last line, or None."""
    if not path.exists():
        return None
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        start = max(0, size - 8 * 1024 * 1024)  # longer than any line
        file.seek(start)
        tail = file.read()
    if not tail or tail.endswith(b"\n"):
        return None
    cut = tail.rfind(b"\n") + 1
    return start + cut, tail[cut:]


def test_writers_killed_mid_write_tear_at_most_one_line_each_and_lose_no_ack(tmp_path):
    path = tmp_path / "status.jsonl"
    rng = random.Random(20)
    acked, kills, fragments = set(), 0, {}
    while kills < 20 or (len(fragments) < 3 and kills < 80):
        tag = "w%d" % kills
        child = python_child(WRITER, path, tag, stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        target = "start %s-%d\n" % (tag, rng.randrange(1, 4))
        for line in child.stdout:
            if line.startswith(b"ack "):
                acked.add(line[4:].strip().decode())
            if line.decode() == target:
                break
        time.sleep(rng.uniform(0, 0.004))  # somewhere inside that write(), or just before
        child.kill()
        rest, _ = child.communicate(timeout=30)
        assert child.returncode == -9  # killed, not crashed
        acked.update(x[4:].decode() for x in rest.splitlines() if x.startswith(b"ack "))
        kills += 1
        torn = _torn_tail(path)
        if torn is not None:
            fragments[torn[0]] = torn[1]  # a kill before the write leaves the same tail
    smsc_handler.append_line(str(path), b'{"id": "final"}\n')  # the next write mends the tail
    raw = path.read_bytes()
    assert raw.endswith(b'\n{"id": "final"}\n')
    valid, torn_at = [], []
    offset = 0
    for line in raw.split(b"\n")[:-1]:
        try:
            valid.append(json.loads(line))
        except ValueError:
            torn_at.append(offset)
        offset += len(line) + 1
    # Every torn tail seen after a kill is still there, whole, ended by the next write.
    assert sorted(torn_at) == sorted(fragments)
    for start, fragment in fragments.items():
        assert raw[start:start + len(fragment) + 1] == fragment + b"\n"
        assert fragment.startswith(b'{"id": "w')  # a prefix of one line, alone
    assert len(fragments) <= kills
    for record in valid[:-1]:
        assert len(record["pad"]) == record["size"], record["id"]
        assert len(set(record["pad"])) == 1, record["id"]
    ids = [record["id"] for record in valid]
    assert ids[-1] == "final"
    assert len(ids) == len(set(ids))
    assert acked <= set(ids), sorted(acked - set(ids))[:5]
    print("kills=%d torn=%d acknowledged=%d lines=%d bytes=%d"
          % (kills, len(fragments), len(acked), len(valid), len(raw)))
    path.unlink()  # ~50 MB


def test_a_torn_tail_is_skipped_by_readers_and_mended_by_the_next_write(tmp_path):
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="a"))).status_int == 200
    with open(site.path(), "ab") as file:
        file.write(b'{"kind": "status", "event_id": "torn", "id": "half')
    assert [e["id"] for _end, e in smsc_handler.read_events(str(site.path()))] == ["a"]
    assert site.post(form(status_callback(id="b"))).status_int == 200
    lines = file_lines(site.path())
    assert len(lines) == 3
    assert lines[1] == b'{"kind": "status", "event_id": "torn", "id": "half\n'
    assert json.loads(lines[2])["id"] == "b"
    assert [e["id"] for _end, e in smsc_handler.read_events(str(site.path()))] == ["a", "b"]
