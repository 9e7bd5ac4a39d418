"""Dedupe (SPEC §6, §9; issue 3 item 1): each callback stored once, never lost.

In process through WebTest for the rules; real processes for the races and the
crash between writing a line and recording its id.
"""

import os
import signal
import sqlite3
import stat
import time

import pytest
from proof_util import (
    HANDLER_CGI,
    Site,
    as_json,
    as_xml,
    cgi_environ,
    form,
    incoming_callback,
    python_child,
    status_callback,
    waitcall_callback,
)

import smsc_handler


def test_repeated_callback_answers_200_and_writes_nothing_new(tmp_path):
    site = Site(tmp_path)
    body = form(status_callback())
    for _ in range(3):
        answer = site.post(body)
        assert answer.status_int == 200
        assert answer.body == b"OK"
    assert len(site.events()) == 1


@pytest.mark.parametrize("make", [status_callback, incoming_callback, waitcall_callback],
                         ids=["status", "incoming", "waitcall"])
def test_repeat_is_deduped_for_every_kind(tmp_path, make):
    site = Site(tmp_path)
    params = make()
    kind = smsc_handler.classify(params)
    assert site.post(form(params)).status_int == 200
    assert site.post(form(params)).status_int == 200
    assert len(site.events(kind)) == 1


def test_new_status_for_the_same_message_is_a_new_event(tmp_path):
    site = Site(tmp_path)
    assert site.post(form(status_callback(status="0", ts="1700000000"))).status_int == 200
    assert site.post(form(status_callback(status="1", ts="1700000060"))).status_int == 200
    assert site.post(form(status_callback(status="1", ts="1700000060"))).status_int == 200
    events = site.events()
    assert [e["status"] for e in events] == [0, 1]
    assert events[0]["event_id"] != events[1]["event_id"]


def test_a_new_error_code_for_the_same_status_is_a_new_event(tmp_path):
    site = Site(tmp_path)
    site.post(form(status_callback(status="20", err="1")))
    site.post(form(status_callback(status="20", err="6")))
    assert [e["err"] for e in site.events()] == [1, 6]


def test_form_json_and_xml_of_one_callback_are_one_event(tmp_path):
    site = Site(tmp_path)
    params = status_callback(id="777")
    without_err = {k: v for k, v in params.items() if k != "err"}  # missing err == err=0
    assert site.post(form(params)).status_int == 200
    assert site.post(as_json(without_err, numbers=("id", "status", "ts")),
                     content_type="application/json").status_int == 200
    assert site.post(as_xml(params), content_type="application/xml").status_int == 200
    events = site.events()
    assert len(events) == 1
    assert events[0]["format"] == "form"


def test_dedupe_off_writes_every_delivery(tmp_path):
    site = Site(tmp_path, dedupe={"enabled": "no"})
    body = form(status_callback())
    answers = [site.post(body).status_int for _ in range(3)]
    assert answers == [200, 200, 200]
    events = site.events()
    assert len(events) == 3
    assert len({e["event_id"] for e in events}) == 1


def test_state_store_and_every_file_get_file_mode(tmp_path):
    site = Site(tmp_path, handler={"file_mode": "0640"})
    old = os.umask(0o077)  # file_mode, not the umask, decides
    try:
        assert site.post(form(status_callback())).status_int == 200
        # Hold the store open so its -wal and -shm files exist while we look.
        with site.state() as db:
            db.execute("SELECT count(*) FROM seen").fetchone()
            db.execute("BEGIN")
            db.execute("SELECT count(*) FROM seen").fetchone()
            assert site.post(form(incoming_callback())).status_int == 200
            names = sorted(os.listdir(site.data))
            modes = {name: stat.S_IMODE(os.stat(site.data / name).st_mode) for name in names}
            db.rollback()
    finally:
        os.umask(old)
    assert "state.sqlite3" in names
    assert {"state.sqlite3-wal", "state.sqlite3-shm"} <= set(names), names
    for name in names:
        assert modes[name] == 0o640, (name, oct(modes[name]))
    assert stat.S_IMODE(os.stat(site.data).st_mode) == 0o700


def test_prune_forgets_ids_older_than_keep_days(tmp_path):
    site = Site(tmp_path, dedupe={"keep_days": "7"})
    now = time.time()
    old = smsc_handler.normalize(smsc_handler.decode_request(form(status_callback(id="old"))))
    young = smsc_handler.normalize(smsc_handler.decode_request(form(status_callback(id="young"))))
    smsc_handler.store_event(site.config, old, now=now - 8 * 86400)
    smsc_handler.store_event(site.config, young, now=now - 6 * 86400)
    with smsc_handler.StateStore(site.config) as state:
        assert state.is_seen(old["event_id"]) and state.is_seen(young["event_id"])
        state.prune(site.config.dedupe_keep_days, now)
        assert not state.is_seen(old["event_id"])
        assert state.is_seen(young["event_id"])


def test_prune_forgets_old_hook_successes_and_keeps_failures(tmp_path):
    # README: hook successes are pruned with the dedupe ids; a failure waits for its retry.
    site = Site(tmp_path, dedupe={"keep_days": "7"}, hook={"command": "/bin/true"})
    now = time.time()
    with smsc_handler.StateStore(site.config) as state:
        state.begin()
        state.record_hook("old-ok", True, None, now - 8 * 86400)
        state.record_hook("old-failed", False, "exit 1", now - 8 * 86400, b"{}\n")
        state.record_hook("young-ok", True, None, now - 6 * 86400)
        state.prune(site.config.dedupe_keep_days, now)
        state.commit()
        assert [state.hook_state(key) for key in ("old-ok", "old-failed", "young-ok")] == [None, "failed", "ok"]


def test_after_pruning_a_late_repeat_is_stored_again(tmp_path):
    site = Site(tmp_path, dedupe={"keep_days": "1"})
    body = form(status_callback())
    event = smsc_handler.normalize(smsc_handler.decode_request(body))
    smsc_handler.store_event(site.config, event, now=time.time() - 2 * 86400)
    with smsc_handler.StateStore(site.config) as state:
        state.prune(1, time.time())
    assert site.post(body).status_int == 200
    assert len(site.events()) == 2
    assert site.post(body).status_int == 200  # remembered again
    assert len(site.events()) == 2


def test_store_event_prunes_as_it_goes(tmp_path, monkeypatch):
    # Pruning runs on ~1 request in 85 (os.urandom); force the dice to see it wired in.
    site = Site(tmp_path, dedupe={"keep_days": "1"})
    old = smsc_handler.normalize(smsc_handler.decode_request(form(status_callback(id="a"))))
    new = smsc_handler.normalize(smsc_handler.decode_request(form(status_callback(id="b"))))
    smsc_handler.store_event(site.config, old, now=time.time() - 3 * 86400)
    monkeypatch.setattr(smsc_handler, "_should_prune", lambda: True)
    smsc_handler.store_event(site.config, new)
    with smsc_handler.StateStore(site.config) as state:
        assert not state.is_seen(old["event_id"])
        assert state.is_seen(new["event_id"])


############################################################################
# Real processes
############################################################################

#: A CGI process that has already imported everything, waits for the start
#: file, then runs the real handler.cgi: two of them race inside the handler.
RACER = r'''
import json, os, runpy, sqlite3, fcntl, time, logging, wsgiref.handlers
start = sys.argv[1]
while not os.path.exists(start):
    time.sleep(0.0005)
runpy.run_path(sys.argv[2], run_name="__main__")
'''


def _race(site, body, n_processes, start):
    """Run n CGI processes on one body, released together; return [(status line, log)]."""
    import subprocess
    racers = [python_child(RACER, start, HANDLER_CGI, env=cgi_environ(site.config_path, body),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(n_processes)]
    for racer in racers:
        racer.stdin.write(body)
        racer.stdin.close()
    time.sleep(0.3)  # all have imported and are spinning on the start file
    start.touch()
    answers = []
    for racer in racers:
        out = racer.stdout.read()
        err = racer.stderr.read()
        assert racer.wait(timeout=60) == 0, err
        assert b"Traceback" not in err, err
        answers.append((out.split(b"\r\n", 1)[0], err))
    return answers


def test_identical_callbacks_at_the_same_instant_in_two_processes_give_one_line(tmp_path):
    site = Site(tmp_path)
    site.post(form(status_callback(id="warm-up")))  # the store exists: race on the id only
    answers = []
    for n in range(8):
        answers += _race(site, form(status_callback(id="race-%d" % n)), 2, tmp_path / ("go%d" % n))
    assert [status for status, _log in answers] == [b"Status: 200 OK"] * 16, answers
    ids = [e["id"] for e in site.events()]
    assert sorted(ids) == sorted(["warm-up"] + ["race-%d" % n for n in range(8)])


def test_racing_processes_on_a_new_data_folder_never_write_two_lines(tmp_path):
    # The first requests of a new install race to create the store as well.
    for n in range(8):
        site = Site(tmp_path / ("round%d" % n))
        answers = _race(site, form(status_callback(id="new-%d" % n)), 2, tmp_path / ("go%d" % n))
        assert len(site.events()) == 1, "round %d" % n
        for status, _log in answers:
            assert status == b"Status: 200 OK"


def test_many_processes_racing_on_one_store_keep_one_line_per_callback(tmp_path):
    site = Site(tmp_path)
    site.post(form(status_callback(id="warm-up")))
    answers = []
    for n in range(6):
        answers += _race(site, form(status_callback(id="herd-%d" % n)), 4, tmp_path / ("go%d" % n))
    assert [status for status, _log in answers] == [b"Status: 200 OK"] * 24, answers
    ids = [e["id"] for e in site.events()]
    assert sorted(ids) == sorted(["warm-up"] + ["herd-%d" % n for n in range(6)])


#: Opens the state store the moment the start file appears.
STORE_OPENER = r'''
import os, time
config = smsc_handler.load_config(sys.argv[1])
while not os.path.exists(sys.argv[2]):
    time.sleep(0.0002)
try:
    smsc_handler.StateStore(config).close()
    print("ok")
except smsc_handler.StorageError as exc:
    print(exc.reason)
'''


def test_processes_opening_a_new_state_store_together_all_succeed(tmp_path):
    import subprocess
    failures = []
    for n in range(40):
        site = Site(tmp_path / ("round%d" % n))
        site.data.mkdir(mode=0o700)
        start = tmp_path / ("go%d" % n)
        openers = [python_child(STORE_OPENER, site.config_path, start, stdout=subprocess.PIPE)
                   for _ in range(4)]
        time.sleep(0.1)
        start.touch()
        failures += [out for out in (o.communicate(timeout=60)[0].strip() for o in openers) if out != b"ok"]
    assert failures == []


#: Fault injection in a child: die by SIGKILL at the dedupe commit, i.e. after
#: the line is written and before its id is recorded.
DIE_AT_COMMIT = r'''
import os, signal
smsc_handler.StateStore.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)
import runpy
runpy.run_path(sys.argv[1], run_name="__main__")
'''


def test_dying_between_line_and_dedupe_record_gives_one_line_never_two(tmp_path):
    import subprocess
    site = Site(tmp_path)
    body = form(status_callback(id="crash-1"))
    env = cgi_environ(site.config_path, body)
    child = python_child(DIE_AT_COMMIT, HANDLER_CGI, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _err = child.communicate(body, timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert out == b""  # nothing was acknowledged
    first = site.lines()
    assert len(first) == 1  # the line is on disk…
    event_id = site.events()[0]["event_id"]
    with site.state() as db:  # …and its id is not remembered
        assert db.execute("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone() is None
    retry = site.cgi(body)  # SMSC retries: the line past the committed end is adopted
    assert retry.status == 200, retry
    assert site.lines() == first  # exactly once (the old code wrote it a second time)
    with site.state() as db:
        assert db.execute("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone() is not None
    assert site.cgi(body).status == 200
    assert site.lines() == first


def test_a_crash_at_commit_leaves_the_store_usable(tmp_path):
    import subprocess
    site = Site(tmp_path)
    body = form(status_callback(id="crash-2"))
    child = python_child(DIE_AT_COMMIT, HANDLER_CGI, env=cgi_environ(site.config_path, body),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.communicate(body, timeout=60)
    assert child.returncode == -signal.SIGKILL
    # The killed process held the write lock: it must be released, not block for 10 s.
    started = time.monotonic()
    with smsc_handler.StateStore(site.config) as state:
        state.begin()
        state.commit()
    assert time.monotonic() - started < 2


def test_a_state_store_restored_from_a_backup_under_a_running_server_stays_intact(tmp_path):
    site = Site(tmp_path)
    assert site.post(form(status_callback(id="first"))).status_int == 200
    store = site.data / "state.sqlite3"
    backup = tmp_path / "backup.sqlite3"
    with sqlite3.connect(str(store)) as live, sqlite3.connect(str(backup)) as copy:
        live.backup(copy)  # an online backup, as sqlite3's .backup makes
    for n in range(200):  # the server's cached connection keeps writing its WAL
        assert site.post(form(status_callback(id="before-%d" % n))).status_int == 200
    os.replace(str(backup), str(store))
    for n in range(20):
        assert site.post(form(status_callback(id="after-%d" % n))).status_int == 200
    with smsc_handler.StateStore(site.config) as state:
        state.record_tails()  # the last lines' ids, left in the tail by the quick write
    with sqlite3.connect(str(store)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in db.execute("SELECT event_id FROM seen")}
    # The backup's id, the 200 written after the backup (their lines lie past the backup's
    # committed end of status.jsonl: the next writer adopts them) and the 20 new ones.
    assert len(stored) == 221
    assert site.post(form(status_callback(id="before-7"))).status_int == 200
    assert len(site.events()) == 221  # a repeat of an adopted one writes nothing


def test_a_store_open_before_a_fork_is_not_shared_with_the_children(tmp_path):
    site = Site(tmp_path, jsonl={"fsync": "no"})
    assert site.post(form(status_callback(id="parent"))).status_int == 200
    children = []
    for worker in range(3):
        pid = os.fork()
        if pid == 0:  # a preforking server's worker
            code = 0
            try:
                for n in range(100):
                    if site.post(form(status_callback(id="w%d-%d" % (worker, n)))).status_int != 200:
                        code = 1
            except BaseException:
                code = 2
            os._exit(code)
        children.append(pid)
    smsc_handler._close_states()  # the parent lets go while its workers write
    assert [os.waitpid(pid, 0)[1] for pid in children] == [0, 0, 0]
    with smsc_handler.StateStore(site.config) as state:
        state.record_tails()  # the last lines' ids, left in the tail by the quick write
    with sqlite3.connect(str(site.data / "state.sqlite3")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM seen").fetchone()[0] == 301
    assert len(site.events()) == 301


def test_dedupe_writers_queue_on_a_flock_of_the_data_folder(config):
    # Between BEGIN and COMMIT (or ROLLBACK) a writer holds the data folder's flock, so the
    # next writer waits in the kernel's queue, not in SQLite's 1-100 ms sleeps.
    import fcntl

    smsc_handler.ensure_data_dir(config)
    store = smsc_handler.StateStore(config)
    probe = os.open(config.data_dir, os.O_RDONLY)
    try:
        for finish in (store.commit, store.rollback):
            store.begin()
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finish()
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
            fcntl.flock(probe, fcntl.LOCK_UN)
    finally:
        os.close(probe)
        store.close()


def test_a_store_whose_folder_cannot_be_locked_still_dedupes(tmp_path, monkeypatch):
    # Where a folder can't be flocked (NFS), SQLite's own write lock is all there is.
    monkeypatch.setattr(smsc_handler, "_open_queue", lambda folder: None)
    site = Site(tmp_path)
    body = form(status_callback())
    assert [site.post(body).status_int for _ in range(2)] == [200, 200]
    assert len(site.events()) == 1


def test_a_writer_stalled_in_its_transaction_makes_others_answer_503_not_hang(config, monkeypatch):
    # A writer stopped between BEGIN and COMMIT (a hung disk, a debugger) must not hang every
    # callback: after STATE_PATIENCE seconds they answer 503 and SMSC retries later.
    import webtest

    monkeypatch.setattr(smsc_handler, "STATE_PATIENCE", 0.3)
    smsc_handler.ensure_data_dir(config)
    stalled = smsc_handler.StateStore(config)
    stalled.begin()
    try:
        app = webtest.TestApp(smsc_handler.make_app(config), extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        answer = app.post("/", form(status_callback()), expect_errors=True)
        assert (answer.status_int, answer.headers["Retry-After"]) == (503, "240")
    finally:
        stalled.rollback()
        stalled.close()
    assert app.post("/", form(status_callback())).status_int == 200  # the retry, once it moved on
