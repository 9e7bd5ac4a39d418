"""Retention and rotation (SPEC §11): rename rotation while everything runs, prune, rejected pieces.

Rotation is done as logrotate does it by default: ``status.jsonl`` renamed to
``status.jsonl.1`` (the older piece to ``.2``) while a ``serve`` process stores callbacks,
``tail -f`` and ``forward --follow`` run. Whatever was stored must reach the hook and
``tail`` exactly once, and the index must count it once.
"""

import fcntl
import json
import os
import threading
import time
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
from cli_util import (
    SECRET,
    Hook,
    ServeProcess,
    assert_one_line_error,
    clean_env,
    data_dir_of,
    line_of,
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

T0 = 1796400000


class Collected:
    """Every stdout line of a process, collected by a thread as it comes."""

    def __init__(self, stream):
        self.lines = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    def ids(self, prefix="{"):
        # A line without its newline is the end of a pipe buffer cut by the process's stop.
        return [json.loads(line)["id"] for line in list(self.lines)
                if line.startswith(prefix) and line.endswith("\n")]


def cli(config, *args, **kwargs):
    return run_cli(*args, "--config", config, env=clean_env(), **kwargs)


def signed_status(message_id, status=1, phone="79991234567"):
    params = {"id": str(message_id), "phone": phone, "status": str(status), "ts": str(T0)}
    text = "%s:%s:%s:%s" % (message_id, phone, status, SECRET)
    params["md5"] = smsc_handler.control_hash("md5", text.encode())
    return params


############################################################################
# Rotation by rename: the file is finished before its successor
############################################################################

@pytest.fixture
def forward_config(tmp_path):
    hook = Hook(tmp_path)
    return write_config(tmp_path, hook={"command": hook.path, "run": "forward"}), hook


def test_forward_finishes_a_renamed_file_before_its_successor(forward_config):
    # Issue 11 item 4: the line appended before the rename but not yet forwarded got no hook.
    config, hook = forward_config
    status = data_dir_of(config) / "status.jsonl"
    first = write_events(status, [status_event("1", received=T0), status_event("2", received=T0 + 1)])
    assert main(["forward", "--config", str(config)]) == 0
    late = write_events(status, [status_event("3", received=T0 + 2)])  # stored, not yet forwarded
    os.rename(status, str(status) + ".1")
    after = write_events(status, [status_event("4", received=T0 + 3)])
    assert main(["forward", "--config", str(config)]) == 0
    assert hook.ids() == [e["event_id"] for e in first + late + after]


def test_forward_finishes_a_renamed_file_before_a_successor_exists(forward_config):
    config, hook = forward_config
    status = data_dir_of(config) / "status.jsonl"
    write_events(status, [status_event("1", received=T0)])
    assert main(["forward", "--config", str(config)]) == 0
    late = write_events(status, [status_event("2", received=T0 + 1)])
    os.rename(status, str(status) + ".1")  # no callback since: no new status.jsonl yet
    assert main(["forward", "--config", str(config)]) == 0
    assert hook.ids()[-1] == late[0]["event_id"]
    after = write_events(status, [status_event("3", received=T0 + 2)])
    assert main(["forward", "--config", str(config)]) == 0
    assert hook.ids()[1:] == [late[0]["event_id"], after[0]["event_id"]]


def test_forward_after_two_rotations_reads_the_middle_piece_whole(forward_config):
    config, hook = forward_config
    status = data_dir_of(config) / "status.jsonl"
    events = [status_event(str(n), received=T0 + n) for n in range(5)]
    write_events(status, events[:1])
    assert main(["forward", "--config", str(config)]) == 0
    write_events(status, events[1:2])
    os.rename(status, str(status) + ".1")
    write_events(status, events[2:4])
    os.rename(str(status) + ".1", str(status) + ".2")
    os.rename(status, str(status) + ".1")
    write_events(status, events[4:])
    assert main(["forward", "--config", str(config)]) == 0
    assert hook.ids() == [e["event_id"] for e in events]


def test_forward_finds_a_dateext_piece(forward_config):
    config, hook = forward_config
    status = data_dir_of(config) / "status.jsonl"
    write_events(status, [status_event("1", received=T0)])
    assert main(["forward", "--config", str(config)]) == 0
    late = write_events(status, [status_event("2", received=T0 + 1)])
    os.rename(status, str(status) + "-20261204")
    after = write_events(status, [status_event("3", received=T0 + 2)])
    assert main(["forward", "--config", str(config)]) == 0
    assert hook.ids()[1:] == [late[0]["event_id"], after[0]["event_id"]]


def test_tail_follow_finishes_a_renamed_file_before_its_successor(tmp_path):
    config = write_config(tmp_path)
    status = data_dir_of(config) / "status.jsonl"
    write_events(status, [status_event("1", received=T0)])
    process = start_cli("tail", "-f", "--interval", "0.5", "--config", config)
    try:
        reader = Collected(process.stdout)
        wait_until(lambda: any("id=1" in line.split() for line in reader.lines), timeout=10)
        # Appended and renamed within one poll: the old code never showed id=2.
        write_events(status, [status_event("2", received=T0 + 1)])
        os.rename(status, str(status) + ".1")
        write_events(status, [status_event("3", received=T0 + 2)])
        wait_until(lambda: any("id=3" in line.split() for line in reader.lines), timeout=10)
    finally:
        _rc, err = stop(process)
    shown = [line for line in reader.lines if "status" in line]
    assert [line.split("id=")[1].split()[0] for line in shown] == ["1", "2", "3"], err


def test_a_writer_that_opened_the_file_before_the_rename_writes_into_its_successor(tmp_path):
    # The writer opens, the rotation renames, the writer locks: its line must reach the new file,
    # which readers go on to, not the piece they have finished.
    path = tmp_path / "status.jsonl"
    path.write_bytes(b"")
    holder = os.open(str(path), os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the writer will wait on this lock after its open
    writer = threading.Thread(target=smsc_handler.append_line, args=(str(path), b'{"n": 1}\n', False))
    writer.start()
    time.sleep(0.3)  # the writer has opened the file and waits for the lock
    os.rename(str(path), str(path) + ".1")
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    writer.join(timeout=5)
    assert path.read_bytes() == b'{"n": 1}\n'
    assert (tmp_path / "status.jsonl.1").read_bytes() == b""


def test_rotation_while_callbacks_tail_and_forward_run_loses_and_doubles_nothing(tmp_path):
    hook = Hook(tmp_path)
    config = write_config(tmp_path, handler={"secret": SECRET}, hook={"command": hook.path, "run": "forward"})
    data = data_dir_of(config)
    server = ServeProcess(config)
    tail = start_cli("tail", "-f", "--json", "--interval", "0.05", "--kind", "status", "--config", config)
    forward = start_cli("forward", "--follow", "--interval", "0.05", "--config", config)
    sent, errors = [], []
    stop_writing = threading.Event()

    def writer(number):
        n = 0
        while not stop_writing.is_set() or n < 5:
            message_id = "%d%04d" % (number, n)
            try:
                body = urlencode(signed_status(message_id)).encode()
                assert urlopen(server.url, body, timeout=10).read() == b"OK"
                sent.append(message_id)
            except Exception as exc:  # reported below
                errors.append(exc)
                return
            n += 1

    try:
        tail_reader = Collected(tail.stdout)
        # Both readers running before the writers start: one first callback each has seen.
        assert urlopen(server.url, urlencode(signed_status("1")).encode(), timeout=10).read() == b"OK"
        sent.append("1")
        wait_until(lambda: tail_reader.ids() == ["1"] and hook.events(), timeout=30)
        threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2, 3)]
        for thread in threads:
            thread.start()
        status = data / "status.jsonl"
        for rotation in range(3):  # logrotate's default: rename, the older pieces shift
            wait_until(lambda: status.exists() and status.stat().st_size > 8000, timeout=30)
            for piece in range(rotation, 0, -1):
                piece_path = data / ("status.jsonl.%d" % piece)
                if piece_path.exists():
                    os.rename(str(piece_path), str(data / ("status.jsonl.%d" % (piece + 1))))
            os.rename(str(status), str(data / "status.jsonl.1"))
            time.sleep(0.2)
        stop_writing.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(sent) > 25
        wanted = set(sent)
        try:
            wait_until(lambda: {e["id"] for e in hook.events()} >= wanted, timeout=60)
        except AssertionError:
            got = [e["id"] for e in hook.events()]
            raise AssertionError("sent %d, hooked %d (%d distinct), missing %s" % (
                len(sent), len(got), len(set(got)), sorted(wanted - set(got))[:10])) from None
        try:
            wait_until(lambda: len(tail_reader.ids()) >= len(sent), timeout=60)
        except AssertionError:
            got = tail_reader.ids()
            raise AssertionError("sent %d, tailed %d (%d distinct), missing %s" % (
                len(sent), len(got), len(set(got)), sorted(set(sent) - set(got))[:10])) from None
        time.sleep(0.5)  # anything doubled would show by now
    finally:
        stop(forward)
        stop(tail)
        server.close()
    hooked = [e["id"] for e in hook.events()]
    tailed = tail_reader.ids()
    assert sorted(hooked) == sorted(sent)  # each exactly once
    assert sorted(tailed) == sorted(sent)
    stats = json.loads(cli(config, "stats", "--json").stdout)
    assert stats["messages"] == len(sent) and stats["events"] == len(sent)
    assert len(list(data.glob("status.jsonl*"))) == 4


def test_the_index_counts_a_rotated_file_once_and_keeps_its_history(tmp_path):
    config = write_config(tmp_path)
    status = data_dir_of(config) / "status.jsonl"
    write_events(status, [status_event("1", 0, received=T0)])
    assert cli(config, "status", "1").returncode == 3
    write_events(status, [status_event("1", 1, received=T0 + 5)])
    os.rename(status, str(status) + ".1")
    write_events(status, [status_event("2", 1, received=T0 + 6)])
    assert cli(config, "status", "1").returncode == 0
    assert json.loads(cli(config, "stats", "--json").stdout)["events"] == 3
    # A rebuild reads the plain rotated pieces too.
    assert "rebuilt: 3 event(s)" in cli(config, "index", "--rebuild").stdout


############################################################################
# prune
############################################################################

@pytest.fixture
def dated(tmp_path):
    config = write_config(tmp_path, jsonl={"path": "{kind}-{date}.jsonl"})
    data = data_dir_of(config)
    now = time.time()
    old_day = time.strftime("%Y-%m-%d", time.gmtime(now - 40 * 86400))
    new_day = time.strftime("%Y-%m-%d", time.gmtime(now))
    old = data / ("status-%s.jsonl" % old_day)
    new = data / ("status-%s.jsonl" % new_day)
    write_events(old, [status_event("1", 1, received=now - 40 * 86400),
                       status_event("2", 0, received=now - 40 * 86400)])
    write_events(new, [status_event("3", 1, received=now)])
    return config, old, new


def test_prune_removes_old_dated_files_and_their_index_entries(dated):
    config, old, new = dated
    assert json.loads(cli(config, "stats", "--json").stdout)["messages"] == 3
    done = cli(config, "prune", "--older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["removed %s (2 event(s))" % old.name]
    assert not old.exists() and new.exists()
    assert json.loads(cli(config, "stats", "--json").stdout)["messages"] == 1
    assert cli(config, "status", "1").returncode == 5
    assert "caught up: 0 event(s)" in cli(config, "index").stdout


def test_prune_dry_run_removes_nothing(dated):
    config, old, _new = dated
    done = cli(config, "prune", "--older-than", "30d", "--dry-run")
    assert done.stdout.splitlines() == ["would remove %s (2 event(s))" % old.name]
    assert old.exists()
    assert json.loads(cli(config, "stats", "--json").stdout)["messages"] == 3


def test_prune_keeps_what_forward_has_not_finished_unless_forced(tmp_path):
    hook = Hook(tmp_path)
    config = write_config(tmp_path, jsonl={"path": "{kind}-{date}.jsonl"},
                          hook={"command": hook.path, "run": "forward"})
    data = data_dir_of(config)
    old = data / ("status-%s.jsonl" % time.strftime("%Y-%m-%d", time.gmtime(time.time() - 40 * 86400)))
    write_events(old, [status_event("1", 1, received=time.time() - 40 * 86400)])
    done = cli(config, "prune", "--older-than", "30d")
    assert done.returncode == 0
    assert "kept %s: `forward` has not finished it" % old.name in done.stdout
    assert old.exists()
    assert cli(config, "forward").returncode == 0
    assert "removed" in cli(config, "prune", "--older-than", "30d").stdout
    assert not old.exists()


def test_prune_keeps_a_file_whose_hook_failed_unless_forced(tmp_path):
    hook = Hook(tmp_path)
    config = write_config(tmp_path, jsonl={"path": "{kind}-{date}.jsonl"}, hook={"command": hook.path})
    data = data_dir_of(config)
    old = data / ("status-%s.jsonl" % time.strftime("%Y-%m-%d", time.gmtime(time.time() - 40 * 86400)))
    events = write_events(old, [status_event("1", 1, received=time.time() - 40 * 86400)])
    with smsc_handler.StateStore(smsc_handler.load_config(str(config))) as state:
        state.record_hook(events[0]["event_id"], False, "exit 3", time.time())
    assert "the hook has not succeeded" in cli(config, "prune", "--older-than", "30d").stdout
    assert old.exists()
    forced = cli(config, "prune", "--older-than", "30d", "--force")
    assert "removed" in forced.stdout and not old.exists()
    with smsc_handler.StateStore(smsc_handler.load_config(str(config))) as state:
        assert state.hook_state(events[0]["event_id"]) is None  # its state went with it


def test_prune_never_goes_below_keep_days(dated):
    config, old, _new = dated
    done = cli(config, "prune", "--older-than", "3d")
    assert done.returncode == 2
    assert_one_line_error(done.stderr)
    assert "keep_days" in done.stderr and old.exists()


@pytest.mark.parametrize("age", ["soon", "30", "-5d", "5y", "9" * 400 + "d"])
def test_prune_bad_age_is_a_usage_error(dated, age):
    config, _old, _new = dated
    done = cli(config, "prune", "--older-than=" + age)
    assert done.returncode == 2
    assert_one_line_error(done.stderr)


def test_prune_removes_an_old_rotated_rejected_piece(tmp_path):
    config = write_config(tmp_path)
    data = data_dir_of(config)
    data.mkdir(parents=True)
    piece = data / "rejected.jsonl.1"
    piece.write_bytes(line_of({"reason": "old"}))
    os.utime(piece, (time.time() - 40 * 86400,) * 2)
    (data / "rejected.jsonl").write_bytes(line_of({"reason": "new"}))
    done = cli(config, "prune", "--older-than", "30d")
    assert "removed rejected.jsonl.1" in done.stdout
    assert not piece.exists() and (data / "rejected.jsonl").exists()


def test_prune_checks_can_be_extended(dated):
    config, old, _new = dated
    seen = []

    def relay_check(config_, path, events, state):
        seen.append(os.path.basename(path))
        return "the relay has not delivered it"

    smsc_handler.PRUNE_CHECKS.append(relay_check)
    try:
        removed, kept = smsc_handler.prune_files(smsc_handler.load_config(str(config)), 30 * 86400,
                                                 say=lambda text: None)
    finally:
        smsc_handler.PRUNE_CHECKS.remove(relay_check)
    assert (removed, kept, seen) == ([], [str(old)], [old.name])
