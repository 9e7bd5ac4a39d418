"""The hook's state machine (issue 12): who may run a hook, when, and what is recorded.

Every runner — a request (run = inline), `forward`, `replay` — claims an event's hook
in the state store before running it, and respects a live claim of another. The hook
is a real shell script that logs "start ID", "ok ID" or "fail ID" to a file, so the
tests count what really ran. Requests run as real CGI processes where a test needs
two processes at once; nothing of the module is mocked.
"""

import json
import os
import signal
import sqlite3
import threading
import time

import pytest
from proof_util import PROLOGUE, Site, fast_python, form, pid_gone, python_child, status_callback, wait_until

import smsc_handler
from smsc_handler import main

#: A hook that logs its runs: "start ID PID", then after SLOW seconds (and while the
#: file HOLD exists) "ok ID" or (while the file FAIL exists) "fail ID" and exit 3.
HOOK = """#!/bin/sh
cat > /dev/null
echo "start $SMSC_EVENT_ID $$" >> '{log}'
if [ -e '{slow}' ]; then sleep "$(cat '{slow}')"; fi
while [ -e '{hold}' ]; do sleep 0.05; done
if [ -e '{fail}' ]; then echo "fail $SMSC_EVENT_ID" >> '{log}'; echo 'hook says no' >&2; exit 3; fi
echo "ok $SMSC_EVENT_ID" >> '{log}'
"""


class LoggingHook:
    """The logging hook: its script, its log, and switches to slow it down or make it fail."""

    def __init__(self, folder):
        self.folder = folder
        self.log = folder / "hook.log"
        self.slow_file = folder / "hook.slow"
        self.fail_file = folder / "hook.fail"
        self.hold_file = folder / "hook.hold"
        self.path = folder / "hook.sh"
        self.path.write_text(HOOK.format(log=self.log, slow=self.slow_file, fail=self.fail_file,
                                         hold=self.hold_file))
        self.path.chmod(0o755)

    def slow(self, seconds=None):
        if seconds is None:
            if self.slow_file.exists():
                self.slow_file.unlink()
        else:
            self.slow_file.write_text(str(seconds))

    def hold(self, holding=True):
        """Keep every hook run going (after its start) until released."""
        if holding:
            self.hold_file.write_text("")
        elif self.hold_file.exists():
            self.hold_file.unlink()

    def fail(self, failing=True):
        if failing:
            self.fail_file.write_text("")
        elif self.fail_file.exists():
            self.fail_file.unlink()

    def entries(self, word):
        if not self.log.exists():
            return []
        return [line.split()[1] for line in self.log.read_text().splitlines() if line.split()[0] == word]

    def started(self, event_id=None):
        return [e for e in self.entries("start") if event_id is None or e == event_id]

    def succeeded(self, event_id=None):
        return [e for e in self.entries("ok") if event_id is None or e == event_id]


@pytest.fixture
def hook(tmp_path):
    return LoggingHook(tmp_path)


def site_with(tmp_path, logging_hook, **sections):
    merged = {"hook": {"command": str(logging_hook.path)}, "jsonl": {"fsync": "no"}}
    for section, keys in sections.items():
        merged.setdefault(section, {}).update(keys)
    return Site(tmp_path, **merged)


def event_of(body):
    request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
    return smsc_handler.normalize(request)


def hook_row(site, event_id):
    with site.state() as db:
        return db.execute("SELECT ok, attempts, last_error FROM hooks WHERE event_id = ?",
                          (event_id,)).fetchone()


def rewind_claims(site, seconds=240):
    """Let `seconds` pass for every open claim: SMSC's next try comes 4 minutes later."""
    with site.state() as db:
        db.execute("UPDATE hooks SET updated_at = updated_at - ? WHERE ok IS NULL", (seconds,))


def cli(site, *args, capsys=None):
    rc = main([args[0], "--config", str(site.config_path), *args[1:]])
    out = capsys.readouterr().out if capsys is not None else ""
    return rc, out


def in_background(function, *args):
    """Run function(*args) in a thread; return (thread, results list)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(function(*args)), daemon=True)
    thread.start()
    return thread, results


############################################################################
# Defect 1: replay respects a live claim, as forward does
############################################################################

def test_replay_leaves_a_hook_running_in_a_request_alone(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook)
    body = form(status_callback(id="live"))
    event_id = event_of(body)["event_id"]
    hook.hold()
    thread, answers = in_background(site.cgi, body)
    assert wait_until(lambda: hook.started(event_id), 20), "the request's hook never started"
    for force in ((), ("--force",)):
        rc, out = cli(site, "replay", *force, capsys=capsys)
        assert hook.started() == [event_id]  # replay ran nothing while the request ran it
        assert rc == 0, out
        assert "skipped" in out and event_id in out and "another process" in out
    hook.hold(False)
    thread.join(60)
    assert answers[0].status == 200, answers[0]
    assert hook.started() == [event_id]  # replay ran nothing while the request ran it
    assert hook.succeeded() == [event_id]


def test_replay_leaves_a_hook_running_in_forward_alone(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook, hook={"run": "forward"})
    body = form(status_callback(id="spooled"))
    assert site.post(body).status_int == 200
    event_id = event_of(body)["event_id"]
    hook.hold()
    thread, codes = in_background(main, ["forward", "--config", str(site.config_path)])
    assert wait_until(lambda: hook.started(event_id), 20)
    rc, out = cli(site, "replay", capsys=capsys)
    assert hook.started() == [event_id]
    assert "skipped" in out and event_id in out
    hook.hold(False)
    thread.join(60)
    assert codes == [0]
    assert hook.started() == [event_id]
    assert hook.succeeded() == [event_id]


def test_a_request_leaves_a_hook_running_in_replay_alone(tmp_path, hook):
    site = site_with(tmp_path, hook, hook={"on_failure": "ignore"})
    body = form(status_callback(id="replayed"))
    event_id = event_of(body)["event_id"]
    hook.fail()
    assert site.post(body).status_int == 200  # failed, recorded: replay's job
    hook.fail(False)
    hook.hold()
    thread, codes = in_background(main, ["replay", "--config", str(site.config_path)])
    assert wait_until(lambda: len(hook.started(event_id)) == 2, 20)
    assert site.cgi(body).status == 200  # SMSC's repeat while replay runs it: stored is enough
    assert len(hook.started(event_id)) == 2
    hook.hold(False)
    thread.join(60)
    assert codes == [0]
    assert len(hook.started(event_id)) == 2 and hook.succeeded() == [event_id]


############################################################################
# Defect 2: forward never passes an event whose hook has not ended
############################################################################

def test_forward_does_not_pass_a_hook_still_running_in_a_request(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook, hook={"on_failure": "ignore"})
    body = form(status_callback(id="running"))
    event_id = event_of(body)["event_id"]
    hook.hold()
    hook.fail()  # the request's hook will fail, after forward has looked at it
    thread, answers = in_background(site.cgi, body)
    assert wait_until(lambda: hook.started(event_id), 20)
    rc, out = cli(site, "forward", capsys=capsys)
    assert hook.started() == [event_id]
    assert rc == 0 and "left for the next run" in out
    hook.hold(False)
    thread.join(60)
    assert answers[0].status == 200  # on_failure = ignore
    assert hook_row(site, event_id)[0] == 0  # recorded failed
    hook.slow()
    hook.fail(False)
    assert cli(site, "forward")[0] == 0  # the next forward returns to it
    assert hook.succeeded() == [event_id]
    assert cli(site, "forward")[0] == 0
    assert hook.succeeded() == [event_id]  # and only once


def test_forward_stops_before_an_event_whose_request_has_not_claimed_it_yet(tmp_path, hook):
    site = site_with(tmp_path, hook, hook={"on_failure": "ignore"})
    # A line whose request is between its append and its commit: no hook record yet.
    event = event_of(form(status_callback(id="in-flight")))
    path = site.path("status")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(smsc_handler.event_line(event))
    assert cli(site, "forward")[0] == 0
    assert cli(site, "replay", "--force")[0] == 0
    assert hook.started() == []  # its request may be about to run it
    with site.state() as db:
        assert db.execute("SELECT offset FROM positions").fetchall() in ([], [(0,)])
    # That request died: past the lease, forward runs it.
    old = dict(event, received_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 300)))
    path.write_bytes(smsc_handler.event_line(old))
    assert cli(site, "forward")[0] == 0
    assert hook.succeeded() == [event["event_id"]]


############################################################################
# Defect 3: a success whose outcome could not be written is not run again
############################################################################

#: Holds the data folder's writer queue (its flock) and SQLite's write lock for argv[2] s.
LOCK_HOLDER = """
import fcntl, os, sqlite3, time
folder, seconds, ready = sys.argv[1], float(sys.argv[2]), sys.argv[3]
fd = os.open(folder, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
db = sqlite3.connect(os.path.join(folder, "state.sqlite3"), isolation_level=None)
db.execute("BEGIN IMMEDIATE")
open(ready, "w").close()
time.sleep(seconds)
db.execute("ROLLBACK")
"""


def test_a_success_the_store_cannot_take_is_answered_200_and_never_run_again(tmp_path, hook, monkeypatch):
    monkeypatch.setattr(smsc_handler, "STATE_PATIENCE", 1)  # wait 1 s, not 10, for a locked store
    site = site_with(tmp_path, hook)
    assert site.post(form(status_callback(id="warm-up"))).status_int == 200
    ready = tmp_path / "locked"
    # The hook's last act: another writer takes the store and holds it past the patience.
    holder = tmp_path / "holder.py"
    holder.write_text(PROLOGUE + LOCK_HOLDER)
    with open(hook.path, "a") as script:
        script.write("'%s' '%s' '%s' 4 '%s' </dev/null >/dev/null 2>&1 &\n"
                     "while [ ! -e '%s' ]; do sleep 0.05; done\n"
                     % ("' '".join(fast_python()), holder, site.data, ready, ready))
    smsc_handler._close_states()  # a new connection: the patched patience applies
    body = form(status_callback(id="lost-outcome"))
    event_id = event_of(body)["event_id"]
    answer = site.post(body)
    assert answer.status_int == 200  # the hook succeeded: 200, even though the store was locked
    assert hook.succeeded(event_id) == [event_id]
    pending = site.data / smsc_handler.PENDING_FILE
    assert event_id in pending.read_text()
    assert wait_until(lambda: _unlocked(site), 10)
    # SMSC sends it again (a lost answer); the journal says it succeeded.
    assert site.post(body).status_int == 200
    assert hook.started(event_id) == [event_id]  # run once
    assert not pending.exists()
    assert hook_row(site, event_id)[0] == 1
    assert main(["replay", "--config", str(site.config_path)]) == 0
    assert hook.started(event_id) == [event_id]


def _unlocked(site):
    try:
        with sqlite3.connect(str(site.data / "state.sqlite3"), timeout=0.1, isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False


def test_forward_and_replay_record_what_the_journal_holds_before_they_decide(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook, hook={"on_failure": "ignore"})
    body = form(status_callback(id="journaled"))
    event_id = event_of(body)["event_id"]
    hook.fail()
    assert site.post(body).status_int == 200
    hook.fail(False)
    # A success some process could only put in the journal (a torn record after it).
    (site.data / smsc_handler.PENDING_FILE).write_text(
        json.dumps({"event_id": event_id, "ok": True, "at": time.time()}) + "\n{\"event_id\": \"tor")
    rc, out = cli(site, "replay", "--dry-run", capsys=capsys)
    assert "would replay 0" in out
    assert cli(site, "replay")[0] == 0 and cli(site, "forward")[0] == 0
    assert hook.started(event_id) == [event_id]  # only the first, failed run
    assert hook_row(site, event_id)[0] == 1


############################################################################
# Defect 4: the lease is shorter than SMSC's retry interval, whatever the timeout
############################################################################

def test_with_a_long_timeout_smsc_s_next_try_runs_a_hook_whose_process_died(tmp_path):
    from proof_util import HookRecorder
    recorder = HookRecorder(tmp_path / "recorder")
    site = Site(tmp_path, hook={"command": recorder.command(), "timeout": "3600", "on_failure": "ignore"})
    body = form(status_callback(id="died"))
    recorder.set_mode("kill-parent")  # the CGI process dies while its hook runs
    assert site.cgi(body).returncode == -signal.SIGKILL
    recorder.set_mode("ok")
    rewind_claims(site, 240)  # SMSC's next try, 4 minutes later
    assert site.cgi(body).status == 200
    assert len(recorder.runs()) == 2  # run again: the dead process's claim had lapsed
    assert hook_row(site, event_of(body)["event_id"])[0] == 1


#: A child that stores one event whose hook takes argv[2] s, with a 1 s lease renewed every 0.2 s.
LONG_HOOK_CHILD = """
smsc_handler.HOOK_LEASE_MAX = 1
smsc_handler.HOOK_RENEW_SECONDS = 0.2
config = smsc_handler.load_config(sys.argv[1])
body = sys.argv[3].encode()
request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
smsc_handler.store_event(config, smsc_handler.normalize(request))
"""


def test_a_hook_longer_than_the_lease_renews_its_claim(tmp_path, hook, monkeypatch):
    site = site_with(tmp_path, hook, hook={"timeout": "20"})
    body = form(status_callback(id="long"))
    event = event_of(body)
    hook.slow(2.5)
    child = python_child(LONG_HOOK_CHILD, site.config_path, 2.5, body.decode())
    try:
        assert wait_until(lambda: hook.started(event["event_id"]), 20)
        time.sleep(1.6)  # past the 1 s lease of the claim first taken
        monkeypatch.setattr(smsc_handler, "HOOK_LEASE_MAX", 1)
        with smsc_handler.StateStore(site.config) as state:
            row = state.hook_row(event["event_id"])
            assert row[0] is None  # still running
            assert smsc_handler._hook_verdict(site.config, row, event, time.time()) == "busy"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert hook.started() == [event["event_id"]] and hook.succeeded() == [event["event_id"]]


def test_check_warns_about_an_inline_hook_timeout_longer_than_a_request_can_wait(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook, hook={"timeout": "300"})
    rc, out = cli(site, "check", capsys=capsys)
    assert rc == 0
    (line,) = [line for line in out.splitlines() if "[hook] timeout" in line]
    assert line.startswith("warning") and "run = forward" in line
    site = site_with(tmp_path / "forward", hook, hook={"timeout": "300", "run": "forward"})
    rc, out = cli(site, "check", capsys=capsys)
    assert "[hook] timeout" not in out


############################################################################
# Defect 5 (and issue 11 item 8): failing to start or feed the hook is a hook failure
############################################################################

@pytest.fixture
def no_temp_folder(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temp-folder"))


@pytest.mark.parametrize("on_failure, status", [("retry", 503), ("ignore", 200)])
def test_a_temp_folder_the_hook_cannot_be_fed_from_is_a_hook_failure(tmp_path, hook, no_temp_folder,
                                                                      on_failure, status):
    site = site_with(tmp_path, hook, hook={"on_failure": on_failure})
    answer = site.post(form(status_callback(id="no-temp")))
    assert answer.status_int == status, answer  # never a 500
    (event,) = site.events()
    ok, _attempts, error = hook_row(site, event["event_id"])
    assert ok == 0 and "cannot feed" in error
    assert hook.started() == []


@pytest.mark.parametrize("on_failure, status", [("retry", 503), ("ignore", 200)])
def test_an_argv_the_system_refuses_is_a_hook_failure(tmp_path, hook, on_failure, status):
    site = site_with(tmp_path, hook, hook={"on_failure": on_failure})
    values = dict(vars(site.config), hook_command=(str(hook.path), "nul\x00inside"))
    config = smsc_handler.Config(**values)
    import webtest
    app = webtest.TestApp(smsc_handler.make_app(config), extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    answer = app.post("/", form(status_callback(id="nul")), status="*",
                      content_type="application/x-www-form-urlencoded")
    assert answer.status_int == status
    (event,) = site.events()
    ok, _attempts, error = hook_row(site, event["event_id"])
    assert ok == 0 and "cannot start" in error


############################################################################
# Defect 6: check tells a permission problem from damage
############################################################################

def _as_nobody():
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run check as another user (nobody)")
def test_check_as_a_read_only_user_does_not_call_a_healthy_store_damaged(tmp_path_factory):
    import subprocess
    import tempfile
    folder = tempfile.mkdtemp(prefix="smsc-ro-")
    try:
        os.chmod(folder, 0o755)
        hook = LoggingHook(__import__("pathlib").Path(folder))
        site = Site(folder, handler={"file_mode": "0644"}, hook={"command": str(hook.path)})
        assert site.post(form(status_callback())).status_int == 200
        smsc_handler._close_states()
        os.chmod(site.data, 0o755)
        os.chmod(site.config_path, 0o644)
        done = subprocess.run([*fast_python(), str(smsc_handler.__file__), "check", "--config",
                               str(site.config_path)], capture_output=True, text=True, timeout=60,
                              preexec_fn=_as_nobody)
        out = done.stdout
        assert "Traceback" not in out + done.stderr
        assert done.returncode == 1, out + done.stderr
        assert "damaged" not in out and "move it aside" not in out
        (line,) = [line for line in out.splitlines() if "state store" in line]
        assert "permission" in line and "web server's user" in line
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def test_check_says_a_locked_store_is_not_damaged(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook)
    assert site.post(form(status_callback())).status_int == 200
    smsc_handler._close_states()
    db = sqlite3.connect(str(site.data / "state.sqlite3"), isolation_level=None)
    try:
        db.execute("PRAGMA locking_mode = EXCLUSIVE")  # another process keeps the store to itself
        db.execute("BEGIN EXCLUSIVE")
        db.execute("DELETE FROM positions")
        db.execute("COMMIT")
        rc, out = cli(site, "check", capsys=capsys)
    finally:
        db.close()
    assert "could not be checked" in out
    assert "damaged" not in out and "move it aside" not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_check_warns_about_state_files_left_owned_by_another_user(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook)
    assert site.post(form(status_callback())).status_int == 200
    os.chown(site.data / "state.sqlite3-wal", 65534, 65534)  # as if `forward` ran as that user
    try:
        rc, out = cli(site, "check", capsys=capsys)
    finally:
        os.chown(site.data / "state.sqlite3-wal", 0, 0)
    (line,) = [line for line in out.splitlines() if "state.sqlite3-wal" in line]
    assert line.startswith("warning") and "chown" in line


def test_check_still_reports_real_damage_with_its_fix(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook)
    smsc_handler.ensure_data_dir(site.config)
    (site.data / "state.sqlite3").write_bytes(b"not a database\x00" * 600)
    rc, out = cli(site, "check", capsys=capsys)
    assert rc == 1
    (line,) = [line for line in out.splitlines() if "state store" in line]
    assert "damaged" in line and "move it aside" in line


############################################################################
# Defect 7: dedupe off + an inline hook: SMSC's retries never double the line
############################################################################

def test_with_dedupe_off_a_retried_hook_keeps_one_line(tmp_path, hook):
    site = site_with(tmp_path, hook, dedupe={"enabled": "no"})
    body = form(status_callback(id="undeduped"))
    hook.fail()
    assert site.post(body).status_int == 503
    assert site.post(body).status_int == 503
    hook.fail(False)
    assert site.post(body).status_int == 200
    (line,) = site.lines()
    event_id = json.loads(line)["event_id"]
    assert hook.started() == [event_id] * 3 and hook.succeeded() == [event_id]
    assert site.post(body).status_int == 200  # a repeat after the success: nothing new
    assert len(site.lines()) == 1 and len(hook.started()) == 3


def test_with_dedupe_off_a_retry_on_the_next_day_gets_the_first_file(tmp_path, hook):
    site = site_with(tmp_path, hook, dedupe={"enabled": "no"}, jsonl={"path": "{kind}-{date}.jsonl"})
    body = form(status_callback())
    evening, morning = 1700006399.9, 1700006400.2
    request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
    hook.fail()
    with pytest.raises(smsc_handler.HookError):
        smsc_handler.store_event(site.config, smsc_handler.normalize(request, received=evening), evening)
    hook.fail(False)
    smsc_handler.store_event(site.config, smsc_handler.normalize(request, received=morning), morning)
    assert [p.name for p in site.data.glob("status-*.jsonl")] == ["status-2023-11-14.jsonl"]
    assert len((site.data / "status-2023-11-14.jsonl").read_bytes().splitlines()) == 1


############################################################################
# replay --dry-run lists what has not succeeded; forward after a kill
############################################################################

def test_replay_dry_run_lists_failed_and_abandoned_hooks_only(tmp_path, hook, capsys):
    site = site_with(tmp_path, hook, hook={"on_failure": "ignore"})
    ok_body, failed_body, died_body = (form(status_callback(id=n)) for n in ("fine", "failed", "died"))
    assert site.post(ok_body).status_int == 200
    hook.fail()
    assert site.post(failed_body).status_int == 200
    hook.fail(False)
    died = event_of(died_body)
    with smsc_handler.StateStore(site.config) as state:  # a claim whose process died long ago
        state.begin()
        state.take_hook_claim(died["event_id"], time.time() - 600, None)
        state.commit()
    with open(site.path(), "ab") as file:
        file.write(smsc_handler.event_line(dict(died, received_at="2000-01-01T00:00:00.000Z")))
    rc, out = cli(site, "replay", "--dry-run", capsys=capsys)
    assert rc == 0
    listed = {line.split()[3] for line in out.splitlines() if line.startswith("would run")}
    assert listed == {event_of(failed_body)["event_id"], died["event_id"]}
    assert "failed: exit status 3" in out and "the process died" in out
    assert len(hook.started()) == 2  # dry run: nothing ran


def test_a_killed_forward_leaves_its_event_to_the_next_one(tmp_path, hook):
    site = site_with(tmp_path, hook, hook={"run": "forward", "timeout": "30"})
    body = form(status_callback(id="killed"))
    assert site.post(body).status_int == 200
    event_id = event_of(body)["event_id"]
    hook.slow(30)
    child = python_child("sys.exit(smsc_handler.main(['forward', '--config', sys.argv[1]]))",
                         site.config_path)
    try:
        assert wait_until(lambda: hook.started(event_id), 20)
    finally:
        child.kill()
        child.wait(10)
    pid = int(hook.log.read_text().split()[2])
    os.killpg(pid, signal.SIGKILL)  # the hook too (it lives in its own session)
    assert wait_until(lambda: pid_gone(pid), 5)
    hook.slow()
    assert main(["forward", "--config", str(site.config_path)]) == 0
    assert hook.succeeded() == []  # the dead forward's claim is still fresh: left for later
    rewind_claims(site, 120)
    assert main(["forward", "--config", str(site.config_path)]) == 0
    assert hook.succeeded() == [event_id]
    assert main(["forward", "--config", str(site.config_path)]) == 0
    assert hook.succeeded() == [event_id]


############################################################################
# The table's smaller promises
############################################################################

def test_a_failure_is_recorded_only_over_the_runner_s_own_claim(tmp_path, hook):
    site = site_with(tmp_path, hook)
    smsc_handler.ensure_data_dir(site.config)
    with smsc_handler.StateStore(site.config) as state:
        first = time.time() - 200
        state.begin()
        state.take_hook_claim("e1", first, b"{}\n")  # a runner that stalled past its lease ...
        state.commit()
        state.begin()
        state.take_hook_claim("e1", first + 100, b"{}\n")  # ... and the one that took it over
        state.commit()
        state.finish_hook("e1", False, "late failure", time.time(), first)
        assert state.hook_row("e1")[:2] == (None, first + 100)  # still the second one's claim
        state.finish_hook("e1", True, None, time.time(), first)
        assert state.hook_row("e1")[0] == 1  # a success counts whoever holds the claim
        state.finish_hook("e1", False, "after the success", time.time(), first + 100)
        assert state.hook_row("e1")[0] == 1


def test_an_interrupted_forward_kills_its_hook_and_gives_the_claim_back(tmp_path, hook):
    site = site_with(tmp_path, hook, hook={"run": "forward", "timeout": "30"})
    body = form(status_callback(id="interrupted"))
    assert site.post(body).status_int == 200
    event_id = event_of(body)["event_id"]
    hook.slow(30)
    from cli_util import start_cli, stop
    process = start_cli("forward", "--config", site.config_path)
    try:
        assert wait_until(lambda: hook.started(event_id), 20)
        time.sleep(0.5)  # forward is waiting for its hook now (not still inside Popen)
    finally:
        rc, err = stop(process)  # SIGINT, as Ctrl-C
    assert "Traceback" not in err
    assert rc == 0, err
    pid = int(hook.log.read_text().split()[2])
    assert wait_until(lambda: pid_gone(pid), 5), "the hook outlived the interrupted forward"
    ok, _attempts, error = hook_row(site, event_id)
    assert (ok, error) == (0, "interrupted")
    hook.slow()
    assert main(["forward", "--config", str(site.config_path)]) == 0  # no lease to wait out
    assert hook.succeeded() == [event_id]


def test_sigterm_stops_forward_follow_with_its_hook_killed_and_recorded(tmp_path, hook):
    site = site_with(tmp_path, hook, hook={"run": "forward", "timeout": "30"})
    body = form(status_callback(id="terminated"))
    assert site.post(body).status_int == 200
    event_id = event_of(body)["event_id"]
    hook.hold()
    from cli_util import start_cli, stop
    process = start_cli("forward", "--follow", "--interval", "0.1", "--config", site.config_path)
    try:
        assert wait_until(lambda: hook.started(event_id), 20)
        process.send_signal(signal.SIGTERM)  # systemd's stop
        assert process.wait(10) == 0
    finally:
        rc, err = stop(process)
        hook.hold(False)
    assert "Traceback" not in err
    pid = int(hook.log.read_text().split()[2])
    assert wait_until(lambda: pid_gone(pid), 5)
    assert hook_row(site, event_id)[0::2] == (0, "interrupted")  # the claim given back, at once


def test_ctrl_c_at_any_moment_leaves_no_claim_running_and_no_hook_behind(tmp_path, hook):
    import random

    from cli_util import start_cli, stop
    site = site_with(tmp_path, hook, hook={"run": "forward"})
    for n in range(40):
        assert site.post(form(status_callback(id="c%d" % n, ts=str(1700000000 + n)))).status_int == 200
    rng = random.Random()
    for _ in range(8):
        before = len(hook.started())
        process = start_cli("forward", "--config", site.config_path)
        wait_until(lambda before=before, process=process: len(hook.started()) > before
                   or process.poll() is not None, 20)
        time.sleep(rng.uniform(0, 0.2))  # somewhere among the claims, hooks and outcomes
        rc, err = stop(process)  # SIGINT
        assert "Traceback" not in err, err
        with site.state() as db:
            running = db.execute("SELECT count(*) FROM hooks WHERE ok IS NULL").fetchone()[0]
        assert running == 0  # every claim was finished or given back
        for pid in [int(line.split()[2]) for line in hook.log.read_text().splitlines()
                    if line.startswith("start")] if hook.log.exists() else []:
            assert wait_until(lambda pid=pid: pid_gone(pid), 5), "a hook outlived its forward"
    assert main(["forward", "--config", str(site.config_path)]) == 0
    assert len(set(hook.succeeded())) == 40
