"""The command line as a whole, and `tail`, `stats`, `check`, `replay` (SPEC §8–9, issues 3–4).

Verbs run through ``main([...])`` with capsys, and each at least once as a real
``python3 smsc_handler.py VERB`` subprocess. Events are crafted with the module's own
decode + normalize (cli_util.make_event), or stored by real requests where the state
store matters (replay).
"""

import json
import re
import subprocess
import sys
import time

import pytest
import webtest
from cli_util import (
    CONFIG_ENV,
    SCRIPT,
    Hook,
    LineReader,
    ScriptedServer,
    ServeProcess,
    append_raw,
    assert_one_line_error,
    clean_env,
    data_dir_of,
    line_of,
    make_event,
    run_cli,
    start_cli,
    status_event,
    stop,
    utc,
    write_config,
    write_events,
)

import smsc_handler
from smsc_handler import main


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


@pytest.fixture
def data(config):
    return data_dir_of(config)


def lines_of(text) -> list:
    return [line for line in text.splitlines() if line.strip()]


############################################################################
# The command line as a whole
############################################################################


def test_version_is_printed(capsys):
    assert main(["--version"]) == 0
    assert smsc_handler.__version__ in capsys.readouterr().out


def test_version_as_a_real_subprocess():
    done = run_cli("--version")
    assert done.returncode == 0
    assert smsc_handler.__version__ in done.stdout


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["tail", "--bogus"], ["tail", "-n", "many"], ["stats", "extra"],
    ["send"], ["sign", "--alg", "sha256", "--secret", "x", "id=1"], ["tail", "--kind", "sms"],
])
def test_bad_usage_exits_2_without_a_traceback(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error" in err.splitlines()[-1]


def test_config_is_accepted_before_the_verb(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("5151")])
    assert main(["--config", str(config), "tail"]) == 0
    assert "id=5151" in capsys.readouterr().out


def test_config_is_accepted_after_the_verb(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("5152")])
    assert main(["tail", "--config", str(config)]) == 0
    assert "id=5152" in capsys.readouterr().out


def test_config_comes_from_the_environment(config, data, capsys, monkeypatch):
    write_events(data / "status.jsonl", [status_event("5153")])
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert main(["tail"]) == 0
    assert "id=5153" in capsys.readouterr().out


def test_environment_config_as_a_real_subprocess(config, data):
    write_events(data / "status.jsonl", [status_event("5154")])
    done = run_cli("tail", env=clean_env(**{CONFIG_ENV: config}))
    assert done.returncode == 0, done.stderr
    assert "id=5154" in done.stdout


@pytest.mark.parametrize("verb", ["tail", "stats", "check", "replay", "forward"])
def test_a_missing_config_file_is_one_line_error(tmp_path, capsys, verb):
    missing = tmp_path / "nope.ini"
    rc = main([verb, "--config", str(missing)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert str(missing) in out + err
    assert "Traceback" not in out + err
    if verb != "check":  # check lists problems on stdout
        assert_one_line_error(err)


@pytest.mark.parametrize("verb", ["tail", "stats", "replay", "forward"])
def test_a_bad_config_is_one_line_error_naming_the_key(tmp_path, capsys, verb):
    config = write_config(tmp_path, handler={"secrett": "x"})
    assert main([verb, "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "[handler] secrett" in err


def test_bad_config_as_a_real_subprocess_is_one_line(tmp_path):
    config = write_config(tmp_path, hook={"timeout": "forever"})
    done = run_cli("stats", "--config", config)
    assert done.returncode == 1
    assert_one_line_error(done.stderr)
    assert "[hook] timeout" in done.stderr


def test_ctrl_c_during_send_retry_is_not_a_traceback():
    with ScriptedServer([503]) as fake:
        process = start_cli("send", fake.url, "--retry", "--interval", "30")
        try:
            LineReader(process.stdout).wait_for(lambda line: line.startswith("retry"), timeout=10)
        finally:
            rc, err = stop(process)
    assert "Traceback" not in err
    assert rc != 0 and len(lines_of(err)) <= 1


############################################################################
# tail
############################################################################

NOW = time.time()


@pytest.fixture
def stored(data):
    """Five events in three files, received in an order that interleaves the files."""
    status = [status_event("301", 0, received=NOW - 50, cost="1.80"),
              status_event("301", 1, received=NOW - 30, cost="1.80"),
              status_event("302", 20, phone="79990000002", received=NOW - 10, err="1")]
    incoming = [make_event(received=NOW - 40, id="401", phone="79990000004", mes="Привет",
                           to="79000000000", sent=str(int(NOW - 41)), time=str(int(NOW - 40)))]
    waitcall = [make_event(received=NOW - 20, waitcall="1", phone="79990000005", ts=str(int(NOW - 20)))]
    write_events(data / "status.jsonl", status)
    write_events(data / "incoming.jsonl", incoming)
    write_events(data / "waitcall.jsonl", waitcall)
    return sorted(status + incoming + waitcall, key=lambda event: event["received_at"])


def tail(config, *args) -> int:
    return main(["tail", "--config", str(config), *args])


def test_tail_shows_every_event_newest_last_one_line_each(config, stored, capsys):
    assert tail(config) == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 5
    expected = ["id=301", "id=401", "id=301", "ts=%d" % int(NOW - 20), "id=302"]
    for line, marker, event in zip(lines, expected, stored):
        assert marker in line
        assert event["kind"] in line
    assert "delivered" in lines[2]
    assert "impossible to deliver" in lines[4] and "subscriber does not exist" in lines[4]
    assert "Привет" in lines[1]


def test_tail_n_shows_the_newest(config, stored, capsys):
    assert tail(config, "-n", "2") == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 2
    assert "waitcall" in lines[0] and "id=302" in lines[1]


def test_tail_n_takes_the_newest_across_files(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("331", received=NOW - 50),
                                         status_event("332", received=NOW - 5)])
    write_events(data / "waitcall.jsonl", [make_event(received=NOW - 20, waitcall="1", phone="7999",
                                                      ts="1700000330")])
    assert tail(config, "-n", "1") == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 1 and "id=332" in lines[0]


def test_tail_line_stays_one_line_whatever_the_sender_wrote(config, data, capsys):
    write_events(data / "incoming.jsonl", [make_event(
        id="341", phone="7999\x1b[2J", mes="a\x0bb\x1b[31mc\u2028d\x85e", to="79\n00")])
    assert tail(config) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "id=341" in out
    assert "\x1b" not in out


def test_tail_filters_by_kind(config, stored, capsys):
    assert tail(config, "--kind", "incoming") == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 1 and "id=401" in lines[0]


def test_tail_filters_by_phone(config, stored, capsys):
    assert tail(config, "--phone", "79990000002") == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 1 and "id=302" in lines[0]


def test_tail_filters_by_message_id(config, stored, capsys):
    assert tail(config, "--id", "301") == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 2 and all("id=301" in line for line in lines)


def test_tail_json_prints_the_stored_events(config, stored, capsys):
    assert tail(config, "--json") == 0
    printed = [json.loads(line) for line in lines_of(capsys.readouterr().out)]
    assert printed == stored


def test_tail_skips_a_torn_last_line(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("311"), status_event("312")])
    append_raw(data / "status.jsonl", line_of(status_event("313"))[:-40])  # a write in progress
    assert tail(config, "--json") == 0
    printed = [json.loads(line) for line in lines_of(capsys.readouterr().out)]
    assert [event["id"] for event in printed] == ["311", "312"]


def test_tail_of_an_empty_data_folder_prints_nothing(config, capsys):
    assert tail(config) == 0
    assert capsys.readouterr().out == ""


def test_tail_follow_shows_new_lines_and_new_dated_files(tmp_path):
    config = write_config(tmp_path, jsonl={"path": "{kind}-{date}.jsonl"})
    data = data_dir_of(config)
    write_events(data / "status-2026-01-01.jsonl", [status_event("321")])
    process = start_cli("tail", "-f", "--interval", "0.05", "--config", config)
    try:
        reader = LineReader(process.stdout)
        reader.wait_for(lambda line: "id=321" in line)
        write_events(data / "status-2026-01-01.jsonl", [status_event("322")])
        reader.wait_for(lambda line: "id=322" in line)
        write_events(data / "status-2026-01-02.jsonl", [status_event("323")])
        reader.wait_for(lambda line: "id=323" in line)
        write_events(data / "incoming-2026-01-02.jsonl",
                     [make_event(id="424", phone="79990000004", mes="hi", to="7900")])
        reader.wait_for(lambda line: "id=424" in line)
        append_raw(data / "status-2026-01-02.jsonl", line_of(status_event("325"))[:30])
        write_events(data / "waitcall-2026-01-02.jsonl",
                     [make_event(waitcall="1", phone="79990000005", ts="1700000326")])
        reader.wait_for(lambda line: "ts=1700000326" in line)
        assert not any("id=325" in line for line in reader.seen)  # torn: not an event yet
        append_raw(data / "status-2026-01-02.jsonl", line_of(status_event("325"))[30:])
        reader.wait_for(lambda line: "id=325" in line)
        write_events(data / "status-2026-01-02.jsonl", [status_event("326")])
        reader.wait_for(lambda line: "id=326" in line)
    finally:
        rc, err = stop(process)
    assert "Traceback" not in err
    assert rc == 0
    assert sum("id=325" in line for line in reader.seen) == 1


def test_tail_piped_into_head_exits_cleanly(config, data):
    template = status_event("900")
    data.mkdir()
    with open(data / "status.jsonl", "wb") as file:
        for number in range(5000):
            file.write(line_of(dict(template, id=str(10000 + number))))
    command = '"$0" "$1" tail -n 5000 --config "$2" | head -1; exit "${PIPESTATUS[0]}"'
    done = subprocess.run(["bash", "-c", command, sys.executable, str(SCRIPT), str(config)],
                          capture_output=True, text=True, env=clean_env(), timeout=30)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.stderr == ""
    assert len(lines_of(done.stdout)) == 1 and "id=10000" in done.stdout
    assert done.returncode == 0


############################################################################
# stats
############################################################################


@pytest.fixture
def messages(data):
    """Three messages: 701 delivered, 702 failed with err 1, 703 still at status 0."""
    at = NOW - 600
    events = [
        status_event("701", 0, received=at, cost="1.80"),
        status_event("702", 0, received=at + 1, cost="2.50"),
        status_event("703", 0, received=at + 2, cost="0.60"),
        status_event("701", 1, received=at + 3, cost="1.80"),
        status_event("702", 20, received=at + 4, cost="2.50", err="1"),
    ]
    write_events(data / "status.jsonl", events)
    write_events(data / "incoming.jsonl", [make_event(received=at, id="88", phone="7999",
                                                      mes="x", to="7900")])
    write_events(data / "waitcall.jsonl", [make_event(received=at, waitcall="1", phone="7999",
                                                      ts="1700000000")])
    return events


EXPECTED_STATS = {
    "events": 7,
    "by_kind": {"status": 5, "incoming": 1, "waitcall": 1},
    "by_status": {"0 transferred to the operator": 3, "1 delivered": 1, "20 impossible to deliver": 1},
    "by_error": {"1 subscriber does not exist": 1},
    "messages": 3,
    "final": 2,
    "delivered": 1,
    "pending": 1,
    "delivery_rate": 0.5,
    "total_cost": 4.9,
    # by the current state of each message (SPEC §10)
    "failed": 1,
    "failures_by_error": {"1 subscriber does not exist": 1},
    "by_sender": {"-": {"messages": 3, "delivered": 1, "failed": 1, "pending": 1, "cost": 4.9,
                        "delivery_rate": 0.5}},
}


def stats_json(capsys, *argv) -> dict:
    assert main(["stats", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_stats_json_counts_exactly(config, messages, capsys):
    assert stats_json(capsys, "--config", str(config)) == EXPECTED_STATS


def test_stats_table_shows_the_same_numbers_aligned(config, messages, capsys):
    assert main(["stats", "--config", str(config)]) == 0
    lines = lines_of(capsys.readouterr().out)

    def row(name):
        (found,) = [line for line in lines if line.strip().startswith(name)]
        return found

    assert row("events").split()[-1] == "7"
    assert row("0 transferred to the operator").split()[-1] == "3"
    assert row("1 subscriber does not exist").split()[-1] == "1"
    assert row("messages").split()[-1] == "3"
    assert row("still without").split()[-1] == "1"
    assert "50.0%" in row("delivery rate") and "1 of 2" in row("delivery rate")
    assert row("total cost").split()[-1] == "4.90"
    values = {"events": "7", "messages": "3", "total cost": "4.90", "delivery rate": "50.0%"}
    columns = {row(name).index(value, len(name)) for name, value in values.items()}
    assert len(columns) == 1, lines


def test_stats_tells_messages_apart_by_id_and_phone(config, data, capsys):
    write_events(data / "status.jsonl", [
        status_event("750", 1, phone="79990000001", cost="1.00"),
        status_event("750", 20, phone="79990000002", cost="1.00", err="6"),
    ])
    stats = stats_json(capsys, "--config", str(config))
    assert (stats["messages"], stats["final"], stats["delivered"], stats["delivery_rate"],
            stats["total_cost"]) == (2, 2, 1, 0.5, 2.0)


def test_stats_of_nothing_is_zero(config, capsys):
    stats = stats_json(capsys, "--config", str(config))
    assert (stats["events"], stats["messages"], stats["delivery_rate"], stats["total_cost"]) == (0, 0, None, 0)


def test_stats_since_relative(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("711", 1, received=NOW - 3 * 3600),
                                         status_event("712", 1, received=NOW - 3600)])
    stats = stats_json(capsys, "--config", str(config), "--since", "2h")
    assert (stats["events"], stats["messages"], stats["delivered"]) == (1, 1, 1)


def test_stats_since_a_date(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("721", 1, received=utc("2025-06-01T12:00:00")),
                                         status_event("722", 1, received=utc("2026-03-01T12:00:00"))])
    assert stats_json(capsys, "--config", str(config), "--since", "2026-01-01")["events"] == 1


@pytest.mark.parametrize("since", ["2026-03-01T12:00Z", "2026-03-01T12:00:00Z", "2026-03-01T21:00:00+09:00"])
def test_stats_since_an_utc_time_ignores_the_local_zone(config, data, since):
    write_events(data / "status.jsonl", [status_event("731", 1, received=utc("2026-03-01T11:00:00")),
                                         status_event("732", 1, received=utc("2026-03-01T13:00:00"))])
    done = run_cli("stats", "--json", "--since", since, "--config", config,
                   env=clean_env(TZ="Asia/Tokyo"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events"] == 1


@pytest.mark.parametrize("since", ["yesterday", "2026-13-01", "5x", "-2h"])
def test_stats_bad_since_is_a_one_line_usage_error(config, capsys, since):
    assert main(["stats", "--config", str(config), "--since=" + since]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--since" in err


############################################################################
# check
############################################################################


def check(config, capsys):
    rc = main(["check", "--config", str(config)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, lines_of(out)


@pytest.fixture
def hook(tmp_path):
    return Hook(tmp_path)


def test_check_passes_a_good_setup(tmp_path, hook, capsys):
    config = write_config(tmp_path, handler={"secret": "s3cret"}, hook={"command": hook.path})
    loaded = smsc_handler.load_config(str(config))
    smsc_handler.ensure_data_dir(loaded)
    smsc_handler.StateStore(loaded).close()
    rc, lines = check(config, capsys)
    assert rc == 0
    assert len(lines) == 1 and lines[0].startswith("ok")


def test_check_passes_before_the_first_request(tmp_path, capsys):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    rc, lines = check(config, capsys)
    assert (rc, len(lines)) == (0, 1) and lines[0].startswith("ok")


def test_check_as_a_real_subprocess(tmp_path):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    done = run_cli("check", "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


def test_check_reports_a_config_error_with_its_fix(tmp_path, capsys):
    config = write_config(tmp_path, handler={"require_signature": "yes"})
    rc, lines = check(config, capsys)
    assert rc == 1
    assert len(lines) == 1
    assert lines[0].startswith("error") and "require_signature" in lines[0] and "Fix" in lines[0]


def test_check_reports_a_hook_that_is_not_executable(tmp_path, hook, capsys):
    hook.path.chmod(0o644)
    config = write_config(tmp_path, handler={"secret": "s3cret"}, hook={"command": hook.path})
    rc, lines = check(config, capsys)
    assert rc == 1
    (error,) = [line for line in lines if line.startswith("error")]
    assert str(hook.path) in error and "Fix" in error


def test_check_reports_a_damaged_state_store(tmp_path, data, capsys):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    smsc_handler.ensure_data_dir(smsc_handler.load_config(str(config)))
    (data / "state.sqlite3").write_bytes(b"this is not a database\x00" * 500)
    rc, lines = check(config, capsys)
    assert rc == 1
    (error,) = [line for line in lines if line.startswith("error")]
    assert "state.sqlite3" in error and "Fix" in error


def test_check_reports_each_error_on_its_own_line(tmp_path, data, hook, capsys):
    hook.path.chmod(0o600)
    config = write_config(tmp_path, handler={"secret": "s3cret"}, hook={"command": hook.path})
    smsc_handler.ensure_data_dir(smsc_handler.load_config(str(config)))
    (data / "state.sqlite3").write_bytes(b"\xff" * 8192)
    rc, lines = check(config, capsys)
    errors = [line for line in lines if line.startswith("error")]
    assert rc == 1
    assert len(errors) == 2 and all("Fix" in line for line in errors)


def test_check_reports_a_data_dir_that_is_a_file(tmp_path, capsys):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    (tmp_path / "data").write_text("not a folder\n")
    rc, lines = check(config, capsys)
    assert rc == 1
    (error,) = [line for line in lines if line.startswith("error")]
    assert "data" in error and "Fix" in error


def test_check_reports_a_hook_program_not_on_path(tmp_path, capsys):
    config = write_config(tmp_path, handler={"secret": "s3cret"},
                          hook={"command": "no-such-program-smsc --flag"})
    rc, lines = check(config, capsys)
    assert rc == 1
    assert any(line.startswith("error") and "no-such-program-smsc" in line for line in lines)


def test_check_accepts_a_hook_path_relative_to_the_config_from_anywhere(tmp_path, hook):
    config = write_config(tmp_path, handler={"secret": "s3cret"}, hook={"command": "./" + hook.path.name})
    (tmp_path / "elsewhere").mkdir()
    done = run_cli("check", "--config", config, cwd=tmp_path / "elsewhere")
    assert done.returncode == 0, done.stdout


def test_check_warns_when_data_is_inside_the_document_root(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    monkeypatch.setenv("DOCUMENT_ROOT", str(tmp_path))
    rc, lines = check(config, capsys)
    assert rc == 0
    assert not any(line.startswith("error") for line in lines)
    assert any(line.startswith("warning") and "web root" in line and "Fix" in line for line in lines)


def test_check_warns_when_data_is_under_public_html(tmp_path, capsys):
    config = write_config(tmp_path / "home" / "public_html" / "smsc", handler={"secret": "s3cret"})
    rc, lines = check(config, capsys)
    assert rc == 0
    assert any(line.startswith("warning") and "public_html" in line for line in lines)
    assert not any(line.startswith("error") for line in lines)


def test_check_is_quiet_about_a_data_folder_outside_the_document_root(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "app", handler={"secret": "s3cret", "data_dir": "../private"})
    (tmp_path / "site").mkdir()
    monkeypatch.setenv("DOCUMENT_ROOT", str(tmp_path / "site"))
    rc, lines = check(config, capsys)
    assert (rc, len(lines)) == (0, 1) and lines[0].startswith("ok")


############################################################################
# replay
############################################################################


def replay_config(tmp_path, hook, **hook_keys):
    keys = {"command": hook.path, "on_failure": "ignore"}
    keys.update(hook_keys)
    return write_config(tmp_path, hook=keys)


def post(config, **params) -> None:
    """One real request through the WSGI app: answered 200 (the hook's failure is ignored)."""
    app = webtest.TestApp(smsc_handler.make_app(smsc_handler.load_config(str(config))),
                          extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert app.post("/", {k: str(v) for k, v in params.items()}).text == "OK"


def failed_requests(tmp_path, hook):
    """Three callbacks stored while the hook fails; return the config and their events."""
    config = replay_config(tmp_path, hook)
    hook.fail()
    post(config, id="601", phone="79991234567", status="1", ts="1700000601")
    post(config, id="602", phone="79991234567", status="0", ts="1700000602")
    post(config, id="603", phone="79991234567", mes="Привет", to="79000000000")
    assert hook.attempt_count() == 3 and hook.events() == []
    data = data_dir_of(config)
    events = [json.loads(line) for name in ("status.jsonl", "incoming.jsonl")
              for line in (data / name).read_text().splitlines()]
    assert len(events) == 3
    with smsc_handler.StateStore(smsc_handler.load_config(str(config))) as state:
        assert [state.hook_state(event["event_id"]) for event in events] == ["failed"] * 3
    return config, events


def replay(config, *args) -> int:
    return main(["replay", "--config", str(config), *args])


def test_replay_runs_the_hook_for_failed_events_only(tmp_path, hook, capsys):
    config, events = failed_requests(tmp_path, hook)
    hook.fail(False)
    assert replay(config) == 0
    assert sorted(hook.ids()) == sorted(event["event_id"] for event in events)
    assert "3 ok" in capsys.readouterr().out


def test_a_second_replay_runs_nothing(tmp_path, hook, capsys):
    config, events = failed_requests(tmp_path, hook)
    hook.fail(False)
    assert replay(config) == 0
    assert replay(config) == 0
    assert len(hook.events()) == 3
    assert "replayed 0" in capsys.readouterr().out


def test_replay_leaves_succeeded_events_alone(tmp_path, hook):
    config = replay_config(tmp_path, hook)
    post(config, id="611", phone="79991234567", status="1", ts="1700000611")  # hook ok
    hook.fail()
    post(config, id="612", phone="79991234567", status="1", ts="1700000612")  # hook failed
    hook.fail(False)
    assert replay(config) == 0
    assert [event["id"] for event in hook.events()] == ["611", "612"]


def test_replay_force_runs_every_matching_event(tmp_path, hook):
    config, events = failed_requests(tmp_path, hook)
    hook.fail(False)
    assert replay(config) == 0
    assert replay(config, "--force") == 0
    assert len(hook.events()) == 6
    assert replay(config, "--force", "--kind", "incoming") == 0
    assert [event["kind"] for event in hook.events()[6:]] == ["incoming"]


def test_replay_with_the_hook_still_failing_exits_1(tmp_path, hook, capsys):
    config, events = failed_requests(tmp_path, hook)
    assert replay(config) == 1
    assert "failed" in capsys.readouterr().out
    hook.fail(False)
    assert replay(config) == 0
    assert len(hook.events()) == 3


def test_replay_filters_by_kind(tmp_path, hook):
    config, events = failed_requests(tmp_path, hook)
    hook.fail(False)
    assert replay(config, "--kind", "incoming") == 0
    assert [event["id"] for event in hook.events()] == ["603"]
    assert replay(config, "--kind", "status") == 0
    assert sorted(event["id"] for event in hook.events()) == ["601", "602", "603"]


def test_replay_filters_by_event_id(tmp_path, hook):
    config, events = failed_requests(tmp_path, hook)
    hook.fail(False)
    chosen = events[1]["event_id"]
    assert replay(config, "--event-id", chosen) == 0
    assert hook.ids() == [chosen]


def test_replay_filters_by_since(tmp_path, hook):
    config, events = failed_requests(tmp_path, hook)
    old = status_event("620", 1, received=NOW - 3 * 86400)  # stored before the hook existed
    write_events(data_dir_of(config) / "status.jsonl", [old])
    hook.fail(False)
    assert replay(config, "--since", "1d") == 0
    assert old["event_id"] not in hook.ids() and len(hook.ids()) == 3
    assert replay(config) == 0
    assert hook.ids()[3:] == [old["event_id"]]


def test_replay_as_a_real_subprocess(tmp_path, hook):
    config, events = failed_requests(tmp_path, hook)
    hook.fail(False)
    done = run_cli("replay", "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(hook.events()) == 3


def test_replayed_hook_gets_the_event_on_stdin_and_its_file(tmp_path, capsys):
    script = tmp_path / "env-hook.sh"
    log = tmp_path / "env.log"
    script.write_text('#!/bin/sh\necho "$SMSC_EVENT_KIND $SMSC_EVENT_ID $SMSC_EVENT_FILE" >> %s\n'
                      'cat >> %s.stdin\n' % (log, log))
    script.chmod(0o755)
    config = write_config(tmp_path, hook={"command": script, "run": "forward"})
    event = status_event("630")
    write_events(data_dir_of(config) / "status.jsonl", [event])
    assert replay(config) == 0
    kind, event_id, path = log.read_text().split()
    assert (kind, event_id) == ("status", event["event_id"])
    assert path == str(data_dir_of(config) / "status.jsonl")
    assert json.loads((tmp_path / "env.log.stdin").read_text()) == event


def test_replay_runs_a_hook_given_relative_to_the_config(tmp_path, hook):
    config = write_config(tmp_path, hook={"command": "./" + hook.path.name, "run": "forward"})
    event = status_event("635")
    write_events(data_dir_of(config) / "status.jsonl", [event])
    done = run_cli("replay", "--config", config, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert hook.ids() == [event["event_id"]]


def test_replay_without_a_hook_is_a_one_line_error(config, data, capsys):
    write_events(data / "status.jsonl", [status_event("640")])
    assert replay(config) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "hook" in err


def test_replay_bad_since_is_a_usage_error(tmp_path, hook, capsys):
    config = replay_config(tmp_path, hook)
    assert replay(config, "--since", "soon") == 2
    assert_one_line_error(capsys.readouterr().err)


def test_serve_prints_the_url_to_put_into_smsc(tmp_path):
    server = ServeProcess(write_config(tmp_path))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
        done = run_cli("send", server.url, "id=650")
        assert done.returncode == 0, done.stdout
    finally:
        server.close()
    assert [event["id"] for event in server.events("status.jsonl")] == ["650"]


############################################################################
# tail: text a terminal can't show, paths with glob characters
############################################################################


def test_tail_json_of_a_stored_lone_surrogate_callback_exits_0(config, data):
    import base64
    body = b'{"id": "700", "phone": "79991234567", "mes": "a\\ud800b", "to": "79000000000"}'
    app = webtest.TestApp(smsc_handler.make_app(smsc_handler.load_config(str(config))),
                          extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert app.post("/", body, content_type="application/json").text == "OK"
    (event,) = [json.loads(line) for line in (data / "incoming.jsonl").read_text().splitlines()]
    assert event["lossy"] is True
    assert base64.b64decode(event["body_b64"]) == body
    assert re.fullmatch("a\ufffd+b", event["mes"]), event["mes"]
    done = run_cli("tail", "--json", "--config", config)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert [json.loads(line) for line in lines_of(done.stdout)] == [event]


def test_tail_json_of_a_line_holding_a_lone_surrogate_escape_exits_0(config, data):
    event = status_event("701", cmt="x")
    event["cmt"] = event["params"]["cmt"] = "a\ud800b"  # as stored before lone surrogates became lossy
    append_raw(data / "status.jsonl", (json.dumps(event) + "\n").encode("ascii"))
    done = run_cli("tail", "--json", "--config", config)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert [json.loads(line) for line in lines_of(done.stdout)] == [event]


def test_tail_json_escapes_what_an_ascii_stdout_cannot_show(config, data):
    event = make_event(id="702", phone="79991234567", mes="Привет", to="79000000000")
    write_events(data / "incoming.jsonl", [event])
    done = run_cli("tail", "--json", "--config", config, env=clean_env(PYTHONIOENCODING="ascii"))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert [json.loads(line) for line in lines_of(done.stdout)] == [event]


def test_tail_shows_events_of_a_path_with_glob_characters(tmp_path, capsys):
    config = write_config(tmp_path, jsonl={"path": "ev[{kind}].jsonl"})
    write_events(data_dir_of(config) / "ev[status].jsonl", [status_event("703")])
    append_raw(data_dir_of(config) / "evs.jsonl", line_of(status_event("704")))  # not an event file
    assert tail(config) == 0
    lines = lines_of(capsys.readouterr().out)
    assert len(lines) == 1 and "id=703" in lines[0]


############################################################################
# replay: events older than keep_days
############################################################################


def test_replay_skips_an_event_older_than_keep_days_with_no_outcome_unless_forced(tmp_path, hook, capsys):
    config = write_config(tmp_path, dedupe={"keep_days": "1"}, hook={"command": hook.path})
    old = status_event("710", received=time.time() - 3 * 86400)  # its success was pruned long ago
    recent = status_event("711", received=time.time() - 600)  # stored, hook never finished
    write_events(data_dir_of(config) / "status.jsonl", [old, recent])
    assert replay(config) == 0
    assert hook.ids() == [recent["event_id"]]
    assert "replayed 1" in capsys.readouterr().out
    assert replay(config, "--force") == 0
    assert hook.ids()[1:] == [old["event_id"], recent["event_id"]]


############################################################################
# serve on IPv6 loopback
############################################################################


def _ipv6_loopback_usable() -> bool:
    import socket
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_serve_on_ipv6_loopback_answers_the_health_get(tmp_path):
    import http.client
    import select
    if not _ipv6_loopback_usable():
        pytest.skip("no IPv6 loopback here: socket.has_ipv6 is false or ::1 can't be bound")
    config = write_config(tmp_path)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "serve", "--host", "::1", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=clean_env())
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        first = process.stdout.readline() if ready else ""
        match = re.search(r"listening on http://\[::1\]:(\d+)/", first)
        assert match, (first, process.poll())
        connection = http.client.HTTPConnection("::1", int(match.group(1)), timeout=10)
        try:
            connection.request("GET", "/")
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        assert answer.status == 200
        assert body.startswith(b"smsc_handler ") and b"ready" in body
        assert answer.getheader("Content-Type") == "text/plain; charset=utf-8"
    finally:
        rc, err = stop(process, timeout=5)
    assert "Traceback" not in err


def test_tail_to_an_ascii_stdout_shows_the_event_without_a_traceback(config, data):
    write_events(data / "incoming.jsonl", [make_event(id="705", phone="79991234567", mes="Привет",
                                                      to="79000000000")])
    done = run_cli("tail", "--config", config, env=clean_env(PYTHONIOENCODING="ascii"))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0
    assert len(lines_of(done.stdout)) == 1 and "id=705" in done.stdout
