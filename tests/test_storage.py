"""Storage (SPEC §6): JSON lines appended whole, the data folder, file modes, rejected.jsonl."""

import base64
import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
import webtest
from conftest import REPO, parse_jsonl

import smsc_handler
from smsc_handler import append_line, event_path, read_events

PHONE = "79991234567"


def status_params(**extra):
    params = {"id": "1001", "phone": PHONE, "status": "1", "ts": "1700000000"}
    params.update(extra)
    return params


def line_of(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Return set(mask): change the process umask for this test only."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask):
        os.umask(mask)
    yield set_mask
    os.umask(saved)


############################################################################
# append_line
############################################################################

def test_append_line_creates_the_file_with_one_line(tmp_path):
    path = tmp_path / "events.jsonl"
    append_line(str(path), line_of({"n": 1}))
    assert path.read_bytes() == b'{"n": 1}\n'


def test_append_line_writes_exactly_one_line_per_call(tmp_path):
    path = tmp_path / "events.jsonl"
    for n in range(3):
        append_line(str(path), line_of({"n": n}))
    assert path.read_bytes() == b'{"n": 0}\n{"n": 1}\n{"n": 2}\n'


def test_append_line_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "events.jsonl"
    append_line(str(path), line_of({"n": 1}), fsync=False)
    assert parse_jsonl(path) == [{"n": 1}]


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_append_line_writes_with_and_without_fsync(tmp_path, fsync):
    path = tmp_path / "events.jsonl"
    append_line(str(path), line_of({"fsync": fsync}), fsync=fsync)
    assert path.read_bytes() == line_of({"fsync": fsync})


@pytest.mark.parametrize("mask, mode", [(0o022, 0o640), (0o077, 0o640), (0o022, 0o600),
                                         (0o077, 0o600), (0o022, 0o666), (0o000, 0o600)])
def test_append_line_creates_the_file_with_exactly_file_mode(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "events.jsonl"
    append_line(str(path), line_of({}), fsync=False, mode=mode)
    assert mode_of(path) == mode


def test_append_line_keeps_the_mode_of_an_existing_file(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"")
    path.chmod(0o644)
    append_line(str(path), line_of({}), fsync=False, mode=0o600)
    assert mode_of(path) == 0o644


def test_torn_last_line_is_terminated_before_the_next_append(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": 1, "torn')
    append_line(str(path), line_of({"n": 2}), fsync=False)
    assert path.read_bytes() == b'{"n": 0}\n{"n": 1, "torn\n{"n": 2}\n'


def test_torn_last_line_is_skipped_by_the_reader_once_mended(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": 1, "torn')
    append_line(str(path), line_of({"n": 2}), fsync=False)
    assert [event for _end, event in read_events(str(path))] == [{"n": 0}, {"n": 2}]


def test_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"n": 0}\n{"n": 1}')
    assert [event for _end, event in read_events(str(path))] == [{"n": 0}]


def failing_sync(_fd):
    raise OSError(errno.EIO, "Input/output error")  # what a dying disk gives; no test can make a real one


def lock_is_free(path) -> bool:
    """Whether another writer could take the append lock of `path` right now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_fsync_syncs_the_whole_line_after_letting_other_writers_in(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    syncs = []
    monkeypatch.setattr(smsc_handler, "_fdatasync", lambda fd: syncs.append((os.pread(fd, 100, 0), lock_is_free(path))))
    append_line(str(path), line_of({"n": 1}))
    assert syncs == [(line_of({"n": 1}), True)]


def test_no_fsync_never_syncs(tmp_path, monkeypatch):
    monkeypatch.setattr(smsc_handler, "_fdatasync", failing_sync)
    append_line(str(tmp_path / "events.jsonl"), line_of({"n": 1}), fsync=False)
    assert (tmp_path / "events.jsonl").read_bytes() == line_of({"n": 1})


@pytest.mark.parametrize("before", [b"", b'{"n": 0}\n', b'{"n": 0}\n{"n": 1, "torn'], ids=["empty", "whole", "torn"])
def test_failed_sync_cuts_the_line_back_off(tmp_path, monkeypatch, before):
    path = tmp_path / "events.jsonl"
    path.write_bytes(before)
    monkeypatch.setattr(smsc_handler, "_fdatasync", failing_sync)
    with pytest.raises(smsc_handler.StorageError):
        append_line(str(path), line_of({"n": 2}))
    assert path.read_bytes() == before


def test_failed_sync_keeps_the_line_once_another_writer_appended_after_it(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line_of({"n": 0}))

    def sync_while_another_writer_appends(_fd):
        assert lock_is_free(path)  # if it were held, the append below would wait forever
        append_line(str(path), line_of({"n": "other"}), fsync=False)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(smsc_handler, "_fdatasync", sync_while_another_writer_appends)
    with pytest.raises(smsc_handler.StorageError):
        append_line(str(path), line_of({"n": 1}))
    assert path.read_bytes() == line_of({"n": 0}) + line_of({"n": 1}) + line_of({"n": "other"})


class LockTrouble:
    """fcntl as seen by the module, but flock fails with ENOLCK for the named operations."""

    def __init__(self, failing):
        self.failing = failing

    def __getattr__(self, name):
        return getattr(fcntl, name)

    def flock(self, fd, operation):
        if operation in self.failing:
            raise OSError(errno.ENOLCK, "No locks available")  # an NFS lock manager gone; can't be made here
        return fcntl.flock(fd, operation)


def test_a_lock_that_cannot_be_taken_answers_503(testapp, data_dir, monkeypatch):
    testapp.post("/", status_params(id="1"))
    monkeypatch.setattr(smsc_handler, "_fcntl", LockTrouble({fcntl.LOCK_EX}))
    answer = testapp.post("/", status_params(id="2"), expect_errors=True)
    assert (answer.status_int, answer.headers["Retry-After"]) == (503, "240")
    assert [json.loads(line)["id"] for line in (data_dir / "status.jsonl").read_bytes().splitlines()] == ["1"]


@pytest.mark.config(jsonl={"fsync": "yes"}, dedupe={"enabled": "no"})
def test_a_lock_that_cannot_be_let_go_early_still_stores_the_event(testapp, data_dir, monkeypatch):
    # Closing the file lets go of the lock anyway: the event is stored and acknowledged.
    monkeypatch.setattr(smsc_handler, "_fcntl", LockTrouble({fcntl.LOCK_UN}))
    assert testapp.post("/", status_params(id="1")).status_int == 200
    assert [json.loads(line)["id"] for line in (data_dir / "status.jsonl").read_bytes().splitlines()] == ["1"]


@pytest.mark.config(jsonl={"fsync": "yes"}, dedupe={"enabled": "yes"})
def test_failed_sync_answers_503_and_the_retry_stores_the_event_once(testapp, data_dir, read_lines, monkeypatch):
    working = smsc_handler._fdatasync
    monkeypatch.setattr(smsc_handler, "_fdatasync", failing_sync)
    response = testapp.post("/", status_params(), expect_errors=True)
    assert (response.status_int, response.headers["Retry-After"]) == (503, "240")
    assert (data_dir / "status.jsonl").read_bytes() == b""
    monkeypatch.setattr(smsc_handler, "_fdatasync", working)
    assert testapp.post("/", status_params()).status_int == 200  # SMSC's retry
    assert [event["id"] for event in read_lines("status.jsonl")] == ["1001"]


#: writes `count` lines of varying lengths (up to ~8 KB) once the go-file appears
WRITER = r"""
import json, os, random, sys, time
sys.path.insert(0, sys.argv[1])
from smsc_handler import append_line
path, go, writer, count = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(writer)
while not os.path.exists(go):
    time.sleep(0.001)
for n in range(count):
    size = rng.choice((1, 10, 100, 1000, 4000, 4095, 4097, 8000)) + rng.randrange(200)
    pad = chr(ord("a") + writer % 26) * size
    append_line(path, (json.dumps({"w": writer, "n": n, "size": size, "pad": pad}) + "\n").encode(),
                fsync=False)
"""


def test_concurrent_processes_append_whole_lines(tmp_path):
    writers, count = 4, 300
    path, go = tmp_path / "events.jsonl", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(path), str(go),
                               str(w), str(count)], stderr=subprocess.PIPE)
             for w in range(writers)]
    time.sleep(0.3)  # let every interpreter start and wait at the line
    go.touch()
    for proc in procs:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    seen = {w: [] for w in range(writers)}
    for line in raw.split(b"\n")[:-1]:
        event = json.loads(line)  # every line is whole JSON
        assert len(event["pad"]) == event["size"]
        assert set(event["pad"]) == {chr(ord("a") + event["w"])}
        seen[event["w"]].append(event["n"])
    assert seen == {w: list(range(count)) for w in range(writers)}


############################################################################
# Through the app: files, folder, modes
############################################################################

def test_event_goes_to_its_kind_file(testapp, read_lines):
    testapp.post("/", status_params())
    testapp.post("/", {"phone": PHONE, "mes": "hi", "to": "79990000000", "id": "5"})
    testapp.post("/", {"phone": PHONE, "waitcall": "1", "ts": "1700000000"})
    assert [len(read_lines(k + ".jsonl")) for k in ("status", "incoming", "waitcall")] == [1, 1, 1]


@pytest.mark.config(jsonl={"path": "{kind}-{date}.jsonl"})
def test_date_in_path_writes_dated_files(testapp, data_dir):
    before = time.strftime("%Y-%m-%d", time.gmtime())
    testapp.post("/", status_params())
    after = time.strftime("%Y-%m-%d", time.gmtime())
    names = [n for n in os.listdir(data_dir) if n.endswith(".jsonl")]
    assert names in (["status-%s.jsonl" % before], ["status-%s.jsonl" % after])
    assert parse_jsonl(data_dir / names[0])[0]["id"] == "1001"


class TickingClock:
    """The time module for the handler, but time() moves on a millisecond at every look."""

    def __init__(self, start):
        self.next = start

    def time(self):
        now, self.next = self.next, self.next + 0.001
        return now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.config(jsonl={"path": "{kind}-{date}.jsonl"})
def test_a_callback_at_midnight_goes_to_the_file_of_its_received_at(testapp, data_dir, monkeypatch):
    monkeypatch.setattr(smsc_handler, "time", TickingClock(1700006399.9995))  # 23:59:59.9995 UTC
    testapp.post("/", status_params())
    (name,) = [n for n in os.listdir(data_dir) if n.endswith(".jsonl")]
    (event,) = parse_jsonl(data_dir / name)
    assert name == "status-%s.jsonl" % event["received_at"][:10]


@pytest.mark.config(jsonl={"path": "events/{date}/{kind}.jsonl"})
def test_event_path_expands_kind_and_utc_date(config):
    assert event_path(config, "incoming", now=86400 * 365) == os.path.join(
        config.data_dir, "events", "1971-01-01", "incoming.jsonl")


@pytest.mark.config(jsonl={"path": "events/{date}/{kind}.jsonl"})
def test_dated_subfolder_is_created(testapp, data_dir):
    testapp.post("/", status_params())
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert len(parse_jsonl(data_dir / "events" / day / "status.jsonl")) == 1


@pytest.mark.parametrize("fsync", ["yes", "no"])
def test_event_is_on_disk_with_fsync_on_and_off(make_config, fsync):
    config = smsc_handler.load_config(str(make_config(jsonl={"fsync": fsync})))
    webtest.TestApp(smsc_handler.make_app(config)).post("/", status_params())
    (line,) = parse_jsonl(os.path.join(config.data_dir, "status.jsonl"))
    assert line["id"] == "1001"


def test_configs_sharing_a_data_dir_keep_their_own_jsonl_path(make_config):
    first = smsc_handler.load_config(str(make_config("first.ini", jsonl={"path": "first-{kind}.jsonl"})))
    second = smsc_handler.load_config(str(make_config("second.ini", jsonl={"path": "second-{kind}.jsonl"})))
    assert first.data_dir == second.data_dir
    assert [event_path(config, kind) for config in (first, second, first) for kind in ("status", "incoming")] == [
        os.path.join(first.data_dir, name) for name in ("first-status.jsonl", "first-incoming.jsonl",
                                                        "second-status.jsonl", "second-incoming.jsonl",
                                                        "first-status.jsonl", "first-incoming.jsonl")]


@pytest.mark.config(jsonl={"path": "{date}-{kind}.jsonl"})
def test_dated_path_changes_with_the_date_of_each_event(config):
    days = [os.path.basename(event_path(config, "status", now=86400 * day)) for day in (365, 366, 365)]
    assert days == ["1971-01-01-status.jsonl", "1971-01-02-status.jsonl", "1971-01-01-status.jsonl"]


def test_data_folder_is_created_0700(testapp, data_dir, umask):
    umask(0o022)
    testapp.post("/", status_params())
    assert mode_of(data_dir) == 0o700


def test_data_folder_gets_a_deny_all_htaccess(testapp, data_dir):
    testapp.post("/", status_params())
    text = (data_dir / ".htaccess").read_text()
    assert "Require all denied" in text and "Deny from all" in text


def test_deleted_htaccess_is_recreated(testapp, data_dir):
    testapp.post("/", status_params(id="1"))
    (data_dir / ".htaccess").unlink()
    testapp.post("/", status_params(id="1"))  # a duplicate: still recreates the guard
    assert "Require all denied" in (data_dir / ".htaccess").read_text()


def test_data_folder_removed_between_callbacks_is_recreated_with_its_guard(testapp, data_dir, read_lines, umask):
    umask(0o022)
    testapp.post("/", status_params(id="1"))
    shutil.rmtree(data_dir)
    assert testapp.post("/", status_params(id="2")).status_int == 200
    assert mode_of(data_dir) == 0o700
    assert (data_dir / ".htaccess").read_text() == smsc_handler.DENY_ALL_HTACCESS
    assert [event["id"] for event in read_lines("status.jsonl")] == ["2"]


def test_deleted_htaccess_is_recreated_by_a_refusal(testapp, data_dir):
    testapp.post("/", status_params())
    (data_dir / ".htaccess").unlink()
    testapp.post("/", "{bad", content_type="application/json", expect_errors=True)
    assert (data_dir / ".htaccess").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077])
@pytest.mark.parametrize("file_mode", ["0640", "0600"])
def test_every_file_created_has_file_mode(make_config, umask, mask, file_mode):
    umask(mask)
    config = smsc_handler.load_config(str(make_config(handler={"file_mode": file_mode})))
    testapp = webtest.TestApp(smsc_handler.make_app(config))
    testapp.post("/", status_params())
    testapp.post("/", "{bad", content_type="application/json", expect_errors=True)
    names = sorted(os.listdir(config.data_dir))
    assert {".htaccess", "status.jsonl", "rejected.jsonl", "state.sqlite3"} <= set(names)
    assert {n: mode_of(os.path.join(config.data_dir, n)) for n in names} == {
        n: int(file_mode, 8) for n in names}


############################################################################
# rejected.jsonl
############################################################################

@pytest.mark.config(rejected={"max_bytes": "2000"})
def test_rejected_jsonl_is_rotated_past_max_bytes(testapp, data_dir):
    # SPEC §11: rotated to rejected.jsonl.1 (one piece kept), never frozen: the newest is always there.
    for n in range(12):
        response = testapp.post("/", "{bad %d" % n, content_type="application/json", expect_errors=True)
        assert response.status_int == 400
        assert (data_dir / "rejected.jsonl").stat().st_size <= 2000
    current = [json.loads(line) for line in (data_dir / "rejected.jsonl").read_bytes().splitlines()]
    older = [json.loads(line) for line in (data_dir / "rejected.jsonl.1").read_bytes().splitlines()]
    bodies = [base64.b64decode(record["body_b64"]) for record in older + current]
    assert bodies[-1] == b"{bad 11"  # the latest refusal is kept
    assert bodies == [b"{bad %d" % n for n in range(12 - len(bodies), 12)]  # in order, none missing
    assert (data_dir / "rejected.jsonl.1").stat().st_size <= 2000
    assert sorted(p.name for p in data_dir.glob("rejected.jsonl*")) == ["rejected.jsonl", "rejected.jsonl.1"]


@pytest.mark.config(rejected={"max_bytes": "0"})
def test_rejected_jsonl_with_max_bytes_0_is_never_written(testapp, data_dir):
    assert testapp.post("/", "{bad", content_type="application/json", expect_errors=True).status_int == 400
    assert not (data_dir / "rejected.jsonl").exists()


@pytest.mark.config(rejected={"enabled": "no"})
def test_rejected_disabled_writes_no_rejected_jsonl(testapp, data_dir):
    testapp.post("/", "{bad", content_type="application/json", expect_errors=True)
    assert not (data_dir / "rejected.jsonl").exists()


def test_rejected_line_records_the_request(testapp, read_lines):
    body = urlencode({"id": "1", "status": "1"})
    testapp.post("/?from=query", body, content_type="application/x-www-form-urlencoded", expect_errors=True,
                 extra_environ={"REMOTE_ADDR": "192.0.2.9"})
    (record,) = read_lines("rejected.jsonl")
    assert (record["status"], record["method"], record["query"], record["remote_addr"]) == (
        400, "POST", "from=query", "192.0.2.9")
    assert record["received_at"].endswith("Z")


def test_torn_event_file_is_mended_by_the_next_callback(testapp, data_dir):
    data_dir.mkdir()
    (data_dir / "status.jsonl").write_bytes(b'{"kind": "status", "id": "0"}\n{"kind": "sta')
    testapp.post("/", status_params())
    lines = (data_dir / "status.jsonl").read_bytes().split(b"\n")
    assert lines[1] == b'{"kind": "sta' and lines[-1] == b""
    assert json.loads(lines[2])["id"] == "1001"


############################################################################
# The data folder's .htaccess written whole; glob-safe file names
############################################################################

#: Run the real handler.cgi with files limited to 0 bytes (SIGXFSZ ignored, so
#: every write to a regular file fails with EFBIG, as on a full quota).
NO_FILE_BYTES = r'''
import resource, runpy, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
runpy.run_path(sys.argv[1], run_name="__main__")
'''


def test_htaccess_that_cannot_be_written_answers_503_and_is_written_whole_next_time(tmp_path):
    from proof_util import HANDLER_CGI, Site, cgi_environ, form, python_child, status_callback
    site = Site(tmp_path)
    body = form(status_callback())
    child = python_child(NO_FILE_BYTES, HANDLER_CGI, env=cgi_environ(site.config_path, body),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(body, timeout=60)
    assert child.returncode == 0, err
    assert out.startswith(b"Status: 503 "), out
    assert b"Retry-After: 240" in out
    assert b"Traceback" not in out + err
    guard = site.data / ".htaccess"
    assert not guard.exists() or guard.read_bytes() == b""  # never a cut-short guard passed off as whole
    assert [name for name in os.listdir(site.data) if name.endswith(".tmp")] == []
    assert site.post(body).status_int == 200  # the limit is gone
    assert guard.read_text() == smsc_handler.DENY_ALL_HTACCESS


@pytest.mark.parametrize("left", ["", smsc_handler.DENY_ALL_HTACCESS[:40]], ids=["empty", "cut-short"])
def test_empty_or_cut_short_htaccess_is_rewritten(testapp, data_dir, left):
    data_dir.mkdir(mode=0o700)
    (data_dir / ".htaccess").write_text(left)
    testapp.post("/", status_params())
    assert (data_dir / ".htaccess").read_text() == smsc_handler.DENY_ALL_HTACCESS


def test_htaccess_cut_short_while_callbacks_come_is_rewritten_within_a_second(testapp, data_dir):
    testapp.post("/", status_params(id="1"))  # the guard written
    testapp.post("/", status_params(id="2"))  # and found whole
    guard = data_dir / ".htaccess"
    guard.write_text(smsc_handler.DENY_ALL_HTACCESS[:40])  # another program cut it
    time.sleep(1.05)  # its size is looked at once a second (that it is there, on every call)
    testapp.post("/", status_params(id="3"))
    assert guard.read_text() == smsc_handler.DENY_ALL_HTACCESS


@pytest.mark.parametrize("own", ["Require all denied\n", "# mine\n" + smsc_handler.DENY_ALL_HTACCESS],
                         ids=["shorter", "longer"])
def test_a_users_own_htaccess_is_left_alone(testapp, data_dir, own):
    data_dir.mkdir(mode=0o700)
    (data_dir / ".htaccess").write_text(own)
    testapp.post("/", status_params())
    assert (data_dir / ".htaccess").read_text() == own


@pytest.mark.config(jsonl={"path": "ev[{kind}].jsonl"})
def test_event_files_finds_a_path_with_glob_characters(testapp, config, data_dir):
    testapp.post("/", status_params())
    (data_dir / "evs.jsonl").write_bytes(b"")  # what the unescaped pattern ev[status] would match
    assert smsc_handler.event_files(config) == [str(data_dir / "ev[status].jsonl")]
    assert [event["id"] for _path, _end, event in smsc_handler.iter_stored(config)] == ["1001"]


def test_threads_writing_a_missing_htaccess_at_once_all_succeed(config):
    import threading
    failures = []
    for _round in range(100):
        guard = os.path.join(config.data_dir, ".htaccess")
        if os.path.exists(guard):
            os.unlink(guard)
        barrier = threading.Barrier(8)

        def write_guard(barrier=barrier):
            barrier.wait()
            try:
                smsc_handler.ensure_data_dir(config)
            except smsc_handler.StorageError as exc:
                failures.append(exc.reason)

        threads = [threading.Thread(target=write_guard) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        with open(guard) as file:
            assert file.read() == smsc_handler.DENY_ALL_HTACCESS
        if failures:
            break
    assert failures == []
