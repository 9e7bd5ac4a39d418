"""`forward`: the hook run outside the request, from the JSON-lines files (SPEC §8, issue 3 item 3).

The hook is a real script that appends its stdin (the event line) to a file, so order
and count are checked from what it actually received. Lines are appended to the
JSON-lines files as the handler writes them (one whole line each), or torn on purpose.
"""

import json
import time

import pytest
import webtest
from cli_util import (
    Hook,
    append_raw,
    assert_one_line_error,
    data_dir_of,
    line_of,
    make_event,
    run_cli,
    start_cli,
    status_event,
    stop,
    wait_until,
    write_config,
    write_events,
)

import smsc_handler
from smsc_handler import main


@pytest.fixture
def hook(tmp_path):
    return Hook(tmp_path)


@pytest.fixture
def config(tmp_path, hook):
    return write_config(tmp_path, hook={"command": hook.path, "run": "forward"})


@pytest.fixture
def status_file(config):
    return data_dir_of(config) / "status.jsonl"


def forward(config, *args) -> int:
    return main(["forward", "--config", str(config), "--backoff", "0.01", *args])


def events(*ids, start=None):
    start = time.time() if start is None else start
    return [status_event(message_id, received=start + index) for index, message_id in enumerate(ids)]


def event_ids(event_list) -> list:
    return [event["event_id"] for event in event_list]


def test_a_request_leaves_the_hook_to_forward(config, hook):
    app = webtest.TestApp(smsc_handler.make_app(smsc_handler.load_config(str(config))),
                          extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    for number in range(3):
        assert app.post("/", {"id": "80%d" % number, "phone": "79991234567", "status": "1"}).text == "OK"
    assert not hook.out.exists()  # the request did not run the hook
    assert forward(config) == 0
    assert [event["id"] for event in hook.events()] == ["800", "801", "802"]


def test_forward_runs_the_hook_once_per_line_in_order(config, hook, status_file):
    sent = write_events(status_file, events(*map(str, range(810, 820))))
    assert forward(config) == 0
    assert hook.ids() == event_ids(sent)
    assert hook.events() == sent


def test_forward_again_repeats_nothing(config, hook, status_file):
    sent = write_events(status_file, events("821", "822"))
    assert forward(config) == 0
    assert forward(config) == 0
    assert hook.ids() == event_ids(sent)


def test_a_restarted_forward_runs_only_the_new_lines(config, hook, status_file):
    first = write_events(status_file, events("831", "832"))
    done = run_cli("forward", "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    later = write_events(status_file, events("833", "834", "835"))
    done = run_cli("forward", "--config", config)  # a new process: the position comes from the state store
    assert done.returncode == 0, done.stdout + done.stderr
    assert hook.ids() == event_ids(first + later)


def test_a_failing_hook_keeps_its_event_for_the_next_run(config, hook, status_file):
    first = write_events(status_file, events("841", "842"))
    assert forward(config) == 0
    hook.fail()
    stuck = write_events(status_file, events("843", "844"))
    assert forward(config, "--tries", "2") == 1
    assert hook.attempt_count() == 2  # tried twice, on the first new event only
    assert hook.ids() == event_ids(first)  # nothing skipped past the failure
    hook.fail(False)
    assert forward(config) == 0
    assert hook.ids() == event_ids(first + stuck)  # each delivered exactly once


def test_a_failing_hook_is_reported_without_a_traceback(config, hook, status_file):
    write_events(status_file, events("845"))
    hook.fail()
    done = run_cli("forward", "--tries", "2", "--backoff", "0.01", "--config", config)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "hook says no" in done.stdout + done.stderr  # the hook's own last words


def test_a_torn_last_line_waits_until_it_is_complete(config, hook, status_file):
    whole, torn = events("851", "852")
    write_events(status_file, [whole])
    line = line_of(torn)
    append_raw(status_file, line[:25])  # the handler is still writing it
    assert forward(config) == 0
    assert hook.ids() == [whole["event_id"]]
    append_raw(status_file, line[25:])
    assert forward(config) == 0
    assert forward(config) == 0
    assert hook.ids() == [whole["event_id"], torn["event_id"]]


def test_a_line_torn_by_a_crash_is_skipped_once_mended(config, hook, status_file):
    before, after = events("853", "854")
    write_events(status_file, [before])
    append_raw(status_file, line_of(status_event("999"))[:40])  # the writer died here
    assert forward(config) == 0
    # The next writer terminates the torn line before appending its own.
    loaded = smsc_handler.load_config(str(config))
    smsc_handler.append_line(str(status_file), line_of(after), fsync=False, mode=loaded.file_mode)
    assert forward(config) == 0
    assert hook.ids() == [before["event_id"], after["event_id"]]


def test_a_replaced_file_is_forwarded_from_its_start(config, hook, status_file):
    old = write_events(status_file, events("856", "857"))
    assert forward(config) == 0
    status_file.rename(status_file.with_name("status.jsonl.1"))  # rotated away, as logrotate does
    new = write_events(status_file, events("858", "859", "860", "8600"))
    assert forward(config) == 0
    assert hook.ids() == event_ids(old + new)


def test_forward_follow_picks_up_new_lines(config, hook, status_file):
    first = write_events(status_file, events("861"))
    process = start_cli("forward", "--follow", "--interval", "0.1", "--config", config)
    try:
        wait_until(lambda: hook.ids() == event_ids(first), timeout=5)
        later = write_events(status_file, events("862", "863"))
        wait_until(lambda: len(hook.ids()) == 3, timeout=3)
        assert hook.ids() == event_ids(first + later)
    finally:
        rc, err = stop(process)
    assert "Traceback" not in err
    assert rc == 0


def test_a_second_forward_is_refused_while_one_runs(config, hook, status_file, capsys):
    write_events(status_file, events("871"))
    process = start_cli("forward", "--follow", "--interval", "0.1", "--config", config)
    try:
        wait_until(lambda: len(hook.ids()) == 1, timeout=5)
        assert forward(config) == 1
        err = capsys.readouterr().err
        assert_one_line_error(err)
        assert "another" in err and "forward" in err and "running" in err
    finally:
        stop(process)
    assert len(hook.ids()) == 1
    assert forward(config) == 0  # the lock went with the process


def test_dated_files_are_forwarded_oldest_first(tmp_path, hook):
    config = write_config(tmp_path, hook={"command": hook.path, "run": "forward"},
                          jsonl={"path": "{kind}-{date}.jsonl"})
    data = data_dir_of(config)
    # Written newest first, so neither creation order nor directory order gives the answer.
    day3 = write_events(data / "status-2026-01-03.jsonl", events("883"))
    day2 = write_events(data / "incoming-2026-01-02.jsonl",
                        [make_event(id="882", phone="7999", mes="hi", to="7900")])
    day1 = write_events(data / "status-2026-01-01.jsonl", events("881", "8811"))
    assert forward(config) == 0
    assert hook.ids() == event_ids(day1 + day2 + day3)
    day3_more = write_events(data / "status-2026-01-03.jsonl", events("884"))
    day4 = write_events(data / "waitcall-2026-01-04.jsonl",
                        [make_event(waitcall="1", phone="7999", ts="1700000000")])
    assert forward(config) == 0
    assert hook.ids() == event_ids(day1 + day2 + day3 + day3_more + day4)


def test_forward_tells_the_hook_which_file(tmp_path):
    script = tmp_path / "env-hook.sh"
    log = tmp_path / "env.log"
    script.write_text('#!/bin/sh\necho "$SMSC_EVENT_KIND $SMSC_EVENT_ID $SMSC_EVENT_FILE" >> %s\n' % log)
    script.chmod(0o755)
    config = write_config(tmp_path, hook={"command": script, "run": "forward"},
                          jsonl={"path": "{kind}-{date}.jsonl"})
    path = data_dir_of(config) / "status-2026-01-05.jsonl"
    (event,) = write_events(path, events("891"))
    assert forward(config) == 0
    assert log.read_text().split() == ["status", event["event_id"], str(path)]


def test_forward_without_a_hook_is_a_one_line_error(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["forward", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "hook" in err


def test_forward_with_an_inline_hook_runs_only_what_did_not_succeed(tmp_path, hook, capsys):
    config = write_config(tmp_path, hook={"command": hook.path, "on_failure": "ignore"})
    app = webtest.TestApp(smsc_handler.make_app(smsc_handler.load_config(str(config))),
                          extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    app.post("/", {"id": "895", "phone": "79991234567", "status": "1"})
    hook.fail()
    app.post("/", {"id": "896", "phone": "79991234567", "status": "1"})
    hook.fail(False)
    assert forward(config) == 0
    assert [event["id"] for event in hook.events()] == ["895", "896"]
    assert "inline" in capsys.readouterr().out


def test_forward_skips_a_line_that_is_not_an_event(config, hook, status_file):
    first, second = events("897", "898")
    write_events(status_file, [first])
    append_raw(status_file, b"not json at all\n[1, 2]\n")
    write_events(status_file, [second])
    assert forward(config) == 0
    assert hook.ids() == event_ids([first, second])
    assert all(isinstance(json.loads(line), dict) for line in hook.out.read_text().splitlines())


def test_forward_lock_gets_file_mode_whatever_the_umask(tmp_path, hook):
    import os
    import stat
    config = write_config(tmp_path, handler={"file_mode": "0660"}, hook={"command": hook.path, "run": "forward"})
    write_events(data_dir_of(config) / "status.jsonl", events("880"))
    saved = os.umask(0o077)
    try:
        assert forward(config) == 0
    finally:
        os.umask(saved)
    lock = data_dir_of(config) / "forward.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o660
    assert len(hook.ids()) == 1


def test_forward_on_an_inline_setup_never_reruns_a_hook_that_succeeded_long_ago(tmp_path, hook):
    import sqlite3
    config = write_config(tmp_path, dedupe={"keep_days": "1"}, hook={"command": hook.path})
    loaded = smsc_handler.load_config(str(config))
    then = time.time() - 3 * 86400
    event = status_event("890", received=then)
    smsc_handler.store_event(loaded, event, now=then)  # stored, hook succeeded, three days ago
    assert hook.ids() == [event["event_id"]]
    with sqlite3.connect(str(data_dir_of(config) / "state.sqlite3")) as db:
        db.execute("UPDATE hooks SET updated_at = ?", (then,))  # the success was recorded back then
    with smsc_handler.StateStore(loaded) as state:
        state.prune(loaded.dedupe_keep_days, time.time())
    assert forward(config) == 0
    assert hook.ids() == [event["event_id"]]  # not run a second time
