"""Tracking (SPEC §10): status, messages, calls, the index, stats by current state, the API.

The events are written by the real handler — ``handler.cgi`` run as a CGI subprocess, the
WSGI app through WebTest, a ``serve`` process for concurrent writers — and the verbs are run
as subprocesses, as a user or a PHP page (``exec``) would run them.
"""

import json
import os
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
import webtest
from cli_util import (
    REPO,
    SECRET,
    ServeProcess,
    assert_one_line_error,
    clean_env,
    data_dir_of,
    run_cli,
    start_cli,
    status_event,
    stop,
    write_config,
    write_events,
)

import smsc_handler

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the dev extra has it
    given = None

T0 = 1796400000  # a fixed ts base (2026-12-04)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, handler={"secret": SECRET})


@pytest.fixture
def app(config):
    return webtest.TestApp(smsc_handler.make_app(smsc_handler.load_config(str(config))),
                           extra_environ={"REMOTE_ADDR": "127.0.0.1"})


def signed(kind, **params):
    """Callback parameters with the md5 SMSC would add."""
    params = {k: str(v) for k, v in params.items()}
    if kind == "status":
        text = "%s:%s:%s:%s" % (params["id"], params["phone"], params["status"], SECRET)
    elif kind == "waitcall":
        params["waitcall"] = "1"
        text = "%s:%s:%s" % (params["phone"], params["ts"], SECRET)
    else:
        text = "%s:%s:%s:%s" % (params["phone"], params["mes"], params["to"], SECRET)
    params["md5"] = smsc_handler.control_hash("md5", text.encode("utf-8"))
    return params


def post_status(app, message_id, status, phone="79991234567", ts=None, **extra):
    params = signed("status", id=message_id, phone=phone, status=status, **extra)
    if ts is not None:
        params["ts"] = str(ts)
    assert app.post("/", params).text == "OK"


def post_call(app, phone, ts):
    assert app.post("/", signed("waitcall", phone=phone, ts=ts)).text == "OK"


def cgi_post(config, params):
    """One callback through the real handler.cgi, as Apache runs it."""
    body = urlencode(params).encode("ascii")
    environ = {"PATH": os.environ.get("PATH", os.defpath), "SMSC_HANDLER_CONFIG": str(config),
               "REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "QUERY_STRING": "",
               "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "GATEWAY_INTERFACE": "CGI/1.1",
               "SCRIPT_NAME": "/handler.cgi", "PATH_INFO": ""}
    done = subprocess.run([sys.executable, "handler.cgi"], cwd=str(REPO), env=environ, input=body,
                          capture_output=True, timeout=30)
    assert done.stdout.startswith(b"Status: 200 OK"), done.stdout + done.stderr


def cli(config, *args, **kwargs):
    return run_cli(*args, "--config", config, env=clean_env(), **kwargs)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


############################################################################
# The rule (SPEC §10): a function of the set of statuses
############################################################################

def st_(status, ts=None, err=0):
    info = smsc_handler.status_info(status)
    return {"status": status, "ts": ts, "err": err, "final": info[1]}


def test_a_final_status_is_never_replaced_by_a_later_non_final_one():
    assert smsc_handler.current_state([st_(1, T0), st_(0, T0 + 60)])["status"] == 1


def test_the_latest_final_status_wins():
    assert smsc_handler.current_state([st_(20, T0 + 5), st_(1, T0 + 9), st_(3, T0 + 7)])["status"] == 1


def test_a_tie_on_ts_goes_to_the_greater_code():
    assert smsc_handler.current_state([st_(2, T0), st_(1, T0)])["status"] == 2
    assert smsc_handler.current_state([st_(-1, T0), st_(0, T0)])["status"] == 0


def test_a_status_without_ts_ranks_below_every_one_with_it():
    assert smsc_handler.current_state([st_(0, T0), st_(-1, None)])["status"] == 0
    assert smsc_handler.current_state([st_(1, None), st_(0, T0)])["status"] == 1  # final still wins


def test_unknown_codes_count_as_pending():
    state = smsc_handler.message_state("1", "7999", [st_(77, T0)])
    assert (state["outcome"], state["final"], state["status_name"]) == ("pending", None, "unknown")


if given is not None:
    STATUSES = st.builds(st_, st.sampled_from([-3, -2, -1, 0, 1, 2, 3, 4, 20, 22, 25, 77]),
                         st.one_of(st.none(), st.integers(T0, T0 + 5)), st.sampled_from([0, 1, 6]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(STATUSES, min_size=1, max_size=8), st.randoms(), st.integers(0, 3))
    def test_the_state_is_the_same_in_every_order_and_with_repeats(statuses, rng, repeats):
        expected = smsc_handler.message_state("9", "7999", statuses)
        arrived = statuses + [rng.choice(statuses) for _ in range(repeats)]
        rng.shuffle(arrived)
        got = smsc_handler.message_state("9", "7999", arrived)
        assert {k: v for k, v in got.items() if k != "history"} == \
            {k: v for k, v in expected.items() if k != "history"}
        final = [s for s in statuses if s["final"]]
        if final:
            assert got["final"] is True  # a final status is never replaced by a non-final one

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from([-1, 0, 1, 2, 3, 20]), st.integers(0, 4)), min_size=1,
                    max_size=6), st.randoms())
    def test_the_index_gives_the_same_state_in_every_arrival_order(tmp_path_factory, codes, rng):
        # Each arrival order (with SMSC's retries as repeated lines) indexed in a fresh folder.
        events = [status_event("5", code, received=T0 + offset, ts=str(T0 + offset)) for code, offset in codes]
        answers = []
        for _round in range(2):
            folder = tmp_path_factory.mktemp("order")
            config = smsc_handler.load_config(str(write_config(folder)))
            arrived = events + [rng.choice(events)]
            rng.shuffle(arrived)
            write_events(data_dir_of(folder / "config.ini") / "status.jsonl", arrived)
            with smsc_handler.open_index(config) as index:
                (state,) = index.states("5")
            state.pop("history")
            answers.append(state)
        assert answers[0] == answers[1]
        expected = smsc_handler.message_state("5", "79991234567", events)
        expected.pop("history")
        assert answers[0] == expected


############################################################################
# status / messages / calls, as subprocesses, on files the real handler wrote
############################################################################

def test_status_of_a_delivered_message_written_by_cgi_exits_0(config):
    for status, ts in ((0, T0), (1, T0 + 5), (0, T0 + 9)):  # a late "transferred" after "delivered"
        cgi_post(config, signed("status", id=12345, phone="+79991234567", status=status, ts=ts, cost="1.50"))
    done = cli(config, "status", "12345")
    assert done.returncode == 0, done.stderr
    head, *history = done.stdout.splitlines()
    assert head.split()[:4] == ["12345", "+79991234567", "delivered", "1"]
    assert "cost 1.5" in head
    assert [line.split()[2] for line in history] == ["0", "1", "0"]  # every status, in ts order


@pytest.mark.parametrize("statuses, code, outcome", [
    ([0], 3, "pending"), ([0, 20], 4, "failed"), ([-1, 1], 0, "delivered"), ([0, 77], 3, "pending")])
def test_status_exit_code_tells_the_outcome(app, config, statuses, code, outcome):
    for offset, status in enumerate(statuses):
        post_status(app, "700", status, ts=T0 + offset)
    done = cli(config, "status", "700", "--json")
    assert done.returncode == code, done.stderr
    (state,) = json_lines(done.stdout)
    assert state["outcome"] == outcome
    assert [item["status"] for item in state["history"]] == statuses


def test_status_of_an_unknown_id_exits_5_with_one_line(app, config):
    post_status(app, "1", 1, ts=T0)
    done = cli(config, "status", "404404")
    assert done.returncode == 5
    assert done.stdout == ""
    assert_one_line_error(done.stderr)


def test_status_with_several_phones_shows_a_block_each(app, config):
    post_status(app, "800", 1, phone="79990000001", ts=T0)
    post_status(app, "800", 0, phone="79990000002", ts=T0)
    post_status(app, "800", 20, phone="79990000003", ts=T0, err=1)
    done = cli(config, "status", "800", "--json")
    assert done.returncode == 4  # one failed
    assert [(s["phone"], s["outcome"]) for s in json_lines(done.stdout)] == [
        ("79990000001", "delivered"), ("79990000002", "pending"), ("79990000003", "failed")]
    assert cli(config, "status", "800", "--phone", "+7 (999) 000-00-02").returncode == 3
    assert cli(config, "status", "800", "--phone", "7 999 000 00 01").returncode == 0


def test_status_exits_0_only_when_every_phone_is_delivered(app, config):
    post_status(app, "801", 1, phone="79990000001", ts=T0)
    post_status(app, "801", 2, phone="79990000002", ts=T0)
    assert cli(config, "status", "801").returncode == 0
    post_status(app, "801", 0, phone="79990000003", ts=T0)
    assert cli(config, "status", "801").returncode == 3


def test_messages_lists_current_states_newest_last_and_filters(app, config):
    post_status(app, "901", 0, ts=T0 + 1)
    post_status(app, "902", 20, ts=T0 + 3, err=1)
    post_status(app, "903", 1, ts=T0 + 2)
    post_status(app, "901", 1, ts=T0 + 4)  # 901 now delivered, at T0+4: newest
    done = cli(config, "messages")
    assert done.returncode == 0
    assert [line.split()[2] for line in done.stdout.splitlines()] == ["903", "902", "901"]
    assert [s["id"] for s in json_lines(cli(config, "messages", "--failed", "--json").stdout)] == ["902"]
    assert [s["id"] for s in json_lines(cli(config, "messages", "--delivered", "--json").stdout)] == ["903", "901"]
    assert cli(config, "messages", "--pending").stdout == ""


def test_calls_finds_a_call_by_digits(app, config):
    post_call(app, "79991234567", T0)
    done = cli(config, "calls", "--phone", "+7 (999) 123-45-67", "--json")
    assert done.returncode == 0, done.stderr
    (call,) = json_lines(done.stdout)
    assert (call["kind"], call["phone"], call["ts"]) == ("waitcall", "79991234567", T0)
    none = cli(config, "calls", "--phone", "79990000000")
    assert (none.returncode, none.stdout) == (5, "")
    assert_one_line_error(none.stderr)


def test_calls_since_leaves_out_earlier_calls(app, config):
    post_call(app, "79991234567", T0)
    time.sleep(1.1)
    shown = time.time()
    assert cli(config, "calls", "--phone", "79991234567", "--since", "1h").returncode == 0
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(shown))
    assert cli(config, "calls", "--phone", "79991234567", "--since", iso).returncode == 5


def test_calls_wait_returns_as_soon_as_the_call_is_stored(config, tmp_path):
    server = ServeProcess(config)
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
        waiting = start_cli("calls", "--phone", "+7 999 765 43 21", "--since", since, "--wait", "30",
                            "--json", "--config", config)
        time.sleep(1.0)
        assert waiting.poll() is None  # still waiting: no call yet
        started = time.monotonic()
        urlopen(server.url, urlencode(signed("waitcall", phone="79997654321", ts=int(time.time()))).encode(),
                timeout=10).read()
        out, err = waiting.communicate(timeout=20)
        assert waiting.returncode == 0, err
        assert time.monotonic() - started < 5
        (call,) = json_lines(out)
        assert call["phone"] == "79997654321"
    finally:
        server.close()


def test_calls_wait_gives_up_after_its_seconds(config):
    started = time.monotonic()
    done = cli(config, "calls", "--phone", "79991234567", "--wait", "1")
    assert done.returncode == 5
    assert 1.0 <= time.monotonic() - started < 10


def test_the_python_api_answers_like_the_verbs(app, config):
    post_status(app, "321", 0, ts=T0)
    post_status(app, "321", 1, ts=T0 + 3, cost="2.25")
    post_call(app, "79995550000", T0)
    (state,) = smsc_handler.message_status("321", config_path=str(config))
    assert (state["outcome"], state["status"], state["cost"], state["at"]) == \
        ("delivered", 1, 2.25, "2026-12-04T16:00:03Z")
    assert [item["status"] for item in state["history"]] == [0, 1]
    assert set(state) == {"id", "phone", "status", "status_name", "final", "outcome", "err", "err_name",
                          "cost", "at", "history"}
    assert smsc_handler.message_status("999", config_path=str(config)) == []
    (call,) = smsc_handler.find_calls("+7 999 555-00-00", config_path=str(config))
    assert call["ts"] == T0
    assert smsc_handler.find_calls("79995550000", since="1h", config_path=str(config)) == [call]
    assert smsc_handler.find_calls("79995550000", since=time.time() + 60, config_path=str(config)) == []
    for name in ("message_status", "find_calls", "open_index", "iter_stored"):
        assert name in smsc_handler.__all__


############################################################################
# stats by current state, --until, --by day, --csv
############################################################################

def test_stats_counts_messages_by_their_current_state(app, config):
    post_status(app, "1", 1, ts=T0 + 5, cost="1.00", sender="Shop")
    post_status(app, "1", 0, ts=T0 + 9, cost="1.00", sender="Shop")  # late: still delivered
    post_status(app, "2", 20, ts=T0, err=1, cost="0.50", sender="Shop")
    post_status(app, "3", 0, ts=T0, sender="Bank")
    stats = json.loads(cli(config, "stats", "--json").stdout)
    assert (stats["messages"], stats["delivered"], stats["failed"], stats["pending"], stats["delivery_rate"],
            stats["total_cost"]) == (3, 1, 1, 1, 0.5, 1.5)
    assert stats["by_sender"]["Shop"]["messages"] == 2 and stats["by_sender"]["Bank"]["pending"] == 1
    assert stats["failures_by_error"] == {"1 subscriber does not exist": 1}


def test_stats_until_and_by_day_and_csv(config):
    data = data_dir_of(config)
    day1, day2 = 1796342400 - 86400, 1796342400  # 2026-12-03 and 2026-12-04, 00:00 UTC
    write_events(data / "status.jsonl", [
        status_event("11", 1, received=day1 + 3600), status_event("12", 20, received=day1 + 7200, err="1"),
        status_event("13", 1, received=day2 + 60), status_event("13", 0, received=day2 + 30)])
    by_day = json.loads(cli(config, "stats", "--json", "--by", "day").stdout)["by_day"]
    assert [(d["day"], d["messages"], d["delivered"], d["failed"], d["delivery_rate"]) for d in by_day] == [
        ("2026-12-03", 2, 1, 1, 0.5), ("2026-12-04", 1, 1, 0, 1.0)]
    until = json.loads(cli(config, "stats", "--json", "--until", "2026-12-04T00:00:00Z").stdout)
    assert (until["events"], until["messages"]) == (2, 2)
    part = json.loads(cli(config, "stats", "--json", "--since", "2026-12-03T01:30:00Z",
                          "--until", "2026-12-04T00:00:45Z").stdout)
    # 12, and 13 (its first status, the "transferred" received at 00:00:30)
    assert (part["events"], part["messages"], part["failed"]) == (2, 2, 1)
    csv = cli(config, "stats", "--csv", "--by", "day").stdout.splitlines()
    assert csv[0].startswith("day,status_events,incoming,waitcall,messages,delivered")
    assert csv[1:] == ["2026-12-03,2,0,0,2,1,1,0,0.5,0.00", "2026-12-04,2,0,0,1,1,0,0,1.0,0.00"]


def test_stats_bad_until_is_a_usage_error(config):
    done = cli(config, "stats", "--until", "soon")
    assert done.returncode == 2
    assert_one_line_error(done.stderr)
    assert "--until" in done.stderr


############################################################################
# The index: resumable, rebuilt when damaged, correct across dated files
############################################################################

def test_the_index_reads_only_new_lines_and_gives_the_same_answer(config):
    data = data_dir_of(config)
    write_events(data / "status.jsonl", [status_event(str(n), 1, received=T0 + n) for n in range(50)])
    first = cli(config, "index")
    assert first.returncode == 0 and "caught up: 50 event(s)" in first.stdout
    assert "caught up: 0 event(s)" in cli(config, "index").stdout
    write_events(data / "status.jsonl", [status_event("50", 1, received=T0 + 50)])
    assert "caught up: 1 event(s)" in cli(config, "index").stdout
    assert "rebuilt: 51 event(s)" in cli(config, "index", "--rebuild").stdout
    assert json.loads(cli(config, "stats", "--json").stdout)["messages"] == 51


def test_a_line_stored_twice_is_indexed_once(config):
    event = status_event("77", 1, received=T0)
    write_events(data_dir_of(config) / "status.jsonl", [event, event])
    assert json.loads(cli(config, "stats", "--json").stdout)["events"] == 1


def test_a_damaged_index_is_rebuilt_from_the_files(config):
    data = data_dir_of(config)
    write_events(data / "status.jsonl", [status_event("61", 1, received=T0)])
    assert cli(config, "status", "61").returncode == 0
    for name in ("index.sqlite3-wal", "index.sqlite3-shm"):
        if (data / name).exists():
            (data / name).unlink()
    (data / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    done = cli(config, "status", "61")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_an_index_emptied_of_its_tables_is_rebuilt(config):
    import sqlite3
    data = data_dir_of(config)
    write_events(data / "status.jsonl", [status_event("62", 20, received=T0)])
    assert cli(config, "status", "62").returncode == 4
    with sqlite3.connect(str(data / "index.sqlite3")) as db:
        db.execute("DROP TABLE messages")
    assert cli(config, "status", "62").returncode == 4


def test_the_index_is_created_with_file_mode(config):
    write_events(data_dir_of(config) / "status.jsonl", [status_event("63", 1, received=T0)])
    cli(config, "stats")
    assert oct((data_dir_of(config) / "index.sqlite3").stat().st_mode & 0o777) == "0o600"


def test_a_crashed_catch_up_repeats_nothing(config, tmp_path):
    # Kill a catch-up part way (its batches are committed with their positions): the next one finishes.
    data = data_dir_of(config)
    write_events(data / "status.jsonl", [status_event(str(n), 1, received=T0 + n) for n in range(3000)])
    script = ("import os, smsc_handler as m\n"
              "m.INDEX_BATCH = 500\n"
              "commit = m.TrackingIndex._commit_batch\n"
              "calls = []\n"
              "def dying(self, *a):\n"
              "    done = commit(self, *a)\n"
              "    calls.append(1)\n"
              "    if len(calls) == 3: os._exit(9)\n"
              "    return done\n"
              "m.TrackingIndex._commit_batch = dying\n"
              "m.open_index(m.load_config(%r))\n" % str(config))
    done = subprocess.run([sys.executable, "-c", script], cwd=str(REPO), capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr
    with smsc_handler.TrackingIndex(smsc_handler.load_config(str(config))) as index:
        assert index.sizes()["events"] == 1500  # three batches kept
        assert index.catch_up() == 1500  # the rest, nothing twice
        assert index.stats()["events"] == 3000 and index.stats()["messages"] == 3000


def test_the_index_follows_dated_files(tmp_path):
    config = write_config(tmp_path, jsonl={"path": "{kind}-{date}.jsonl"})
    data = data_dir_of(config)
    write_events(data / "status-2026-12-03.jsonl", [status_event("71", 0, received=T0 - 86400, ts=str(T0 - 10))])
    write_events(data / "status-2026-12-04.jsonl", [status_event("71", 1, received=T0, ts=str(T0))])
    assert cli(config, "status", "71").returncode == 0
    write_events(data / "status-2026-12-05.jsonl", [status_event("72", 0, received=T0 + 86400)])
    assert cli(config, "status", "72").returncode == 3


############################################################################
# Many writers and readers at once
############################################################################

def test_readers_while_writers_store_see_every_event_once(config):
    server = ServeProcess(config)
    errors, posted = [], []

    def writer(number):
        try:
            for n in range(25):
                params = signed("status", id="%d%03d" % (number, n), phone="79991234567", status=1, ts=T0 + n)
                assert urlopen(server.url, urlencode(params).encode(), timeout=10).read() == b"OK"
                posted.append(params["id"])
        except Exception as exc:  # reported below
            errors.append(exc)

    def api_reader():
        try:
            for _ in range(15):
                for state in smsc_handler.message_status("1000", config_path=str(config)):
                    assert state["outcome"] == "delivered"
        except Exception as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(1, 5)]
        threads += [threading.Thread(target=api_reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        readers = [start_cli(verb, *args, "--config", config) for verb, args in
                   [("stats", ["--json"])] * 3 + [("status", ["1000"])] * 3]
        outs = [process.communicate(timeout=60) for process in readers]
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        for process, (_out, err) in zip(readers, outs):
            assert process.returncode in (0, 5), err
            assert "Traceback" not in err
        stats = json.loads(cli(config, "stats", "--json").stdout)
        assert (stats["events"], stats["messages"], stats["delivered"]) == (100, 100, 100)
    finally:
        server.close()


def test_stopping_a_reader_mid_poll_leaves_the_index_usable(config):
    process = start_cli("calls", "--phone", "7999", "--wait", "30", "--config", config)
    time.sleep(0.5)
    stop(process)
    assert cli(config, "index").returncode == 0


def test_cgi_writers_and_readers_at_once_agree_at_the_end(config):
    # handler.cgi processes storing while `stats` and `status` run: every answer is an answer,
    # and once the writers stop the index holds each event once.
    errors = []

    def writer(number):
        try:
            for n in range(6):
                cgi_post(config, signed("status", id="5%d%02d" % (number, n), phone="79991234567",
                                        status=1, ts=T0 + n))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for verb in (("stats", "--json"), ("status", "500")):
            done = cli(config, *verb)
            assert done.returncode in (0, 5), done.stderr
            assert "Traceback" not in done.stderr
    for thread in threads:
        thread.join()
    assert not errors, errors
    stats = json.loads(cli(config, "stats", "--json").stdout)
    assert (stats["events"], stats["messages"], stats["delivered"]) == (18, 18, 18)


def test_the_report_functions_agree_with_stats(app, config):
    post_status(app, "1", 0, ts=T0)
    post_status(app, "1", 20, ts=T0 + 5, err=1)
    post_status(app, "2", 0, ts=T0)
    post_call(app, "79991112233", T0)
    assert app.post("/", signed("incoming", phone="79994445566", mes="hello", to="79000000000",
                                id="77", sent=T0, time=T0)).text == "OK"
    with smsc_handler.open_index(smsc_handler.load_config(str(config))) as index:
        stats = index.stats(by_day=True)
        assert (stats["failed"], stats["pending"]) == (1, 1)
        assert [m["id"] for m in index.failures()] == ["1"]
        assert [m["id"] for m in index.stuck(older_than=0, until=time.time() + 1)] == ["2"]
        assert index.stuck() == []  # its last status came less than an hour ago
        assert [e["mes"] for e in index.latest("incoming")] == ["hello"]
        assert [e["phone"] for e in index.latest("waitcall")] == ["79991112233"]
        (day,) = stats["by_day"]
        assert (day["messages"], day["failed"], day["events"]) == (2, 1, {"status": 3, "incoming": 1, "waitcall": 1})
    assert json.loads(cli(config, "stats", "--json").stdout) == index_stats_without_days(stats)


def index_stats_without_days(stats):
    return {key: value for key, value in stats.items() if key != "by_day"}


def test_a_line_with_its_fields_in_another_order_is_indexed_whole(config):
    # The index reads the part before "remote_addr" first; a line written otherwise (another
    # version, another tool) must still give its fields, never a status without its code.
    event = status_event("64", 20, received=T0, err="1", cost="0.70")
    reordered = {"remote_addr": event["remote_addr"], "params": event["params"]}
    reordered.update((k, v) for k, v in event.items() if k not in reordered)
    data = data_dir_of(config)
    data.mkdir(parents=True, exist_ok=True)
    (data / "status.jsonl").write_text(json.dumps(reordered) + "\n")
    done = cli(config, "status", "64", "--json")
    assert done.returncode == 4, done.stderr
    (state,) = json_lines(done.stdout)
    assert (state["status"], state["err"], state["cost"]) == (20, 1, 0.7)
