"""The example receivers in examples/ (a Flask view, a plain PHP script) against a real relay.

Each runs in its real server (gunicorn; PHP's built-in server from Debian's php-cli) on
127.0.0.1: `forward` delivers every event, `replay --relay --force` delivers them all
again and the example drops every repeat by webhook-id; a forged or stale request is refused.
"""

import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from cli_util import data_dir_of, free_port, run_cli, status_event, write_config, write_events
from relay_util import RELAY_SECRET

import smsc_handler

EXAMPLES = smsc_handler.MODULE_DIR + "/examples"


def wait_ready(process, port, log):
    deadline = time.monotonic() + 20
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/")
            connection.getresponse().read()
            connection.close()
            return
        except (OSError, http.client.HTTPException):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("receiver did not start: %s" % log.read_text()) from None
            time.sleep(0.05)


@pytest.fixture(params=["flask", "php"])
def example(request, tmp_path):
    """Start one example receiver; yield (url, function returning the event ids it handled)."""
    port = free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, SMSC_RELAY_SECRET=RELAY_SECRET)
    if request.param == "php":
        if not shutil.which("php"):
            pytest.skip("php-cli is not installed")
        env["SMSC_RELAY_DIR"] = str(tmp_path / "php-data")
        argv = ["php", "-S", "127.0.0.1:%d" % port, EXAMPLES + "/receiver.php"]
        url = "http://127.0.0.1:%d/receiver.php" % port

        def handled():
            path = tmp_path / "php-data" / "events.jsonl"
            return [json.loads(line)["event_id"] for line in path.read_text().splitlines()] if path.exists() else []
    else:
        pytest.importorskip("flask")
        pytest.importorskip("gunicorn")
        pytest.importorskip("standardwebhooks")
        env["SMSC_RECEIVER_DB"] = str(tmp_path / "flask.sqlite3")
        argv = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-b",
                "127.0.0.1:%d" % port, "--chdir", EXAMPLES, "flask_receiver:app"]
        url = "http://127.0.0.1:%d/smsc/events" % port

        def handled():
            if not (tmp_path / "flask.sqlite3").exists():
                return []
            db = sqlite3.connect(str(tmp_path / "flask.sqlite3"))
            try:
                rows = db.execute("SELECT event FROM seen ORDER BY rowid").fetchall()
            except sqlite3.OperationalError:  # no table yet: nothing handled
                return []
            finally:
                db.close()
            return [json.loads(row[0])["event_id"] for row in rows]
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=open(log, "ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(process, port, log)
        yield url, handled
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def post(url, body, headers):
    host, _, rest = url[len("http://"):].partition("/")
    connection = http.client.HTTPConnection(host, timeout=10)
    connection.request("POST", "/" + rest, body, headers)
    status = connection.getresponse().status
    connection.close()
    return status


def test_example_handles_every_event_once_and_drops_repeats(tmp_path, example):
    url, handled = example
    config = write_config(tmp_path, relay={"url": url, "secret": RELAY_SECRET})
    start = time.time()
    events = [status_event("50%d" % n, received=start + n) for n in range(5)]
    write_events(data_dir_of(config) / "status.jsonl", events)
    ids = [event["event_id"] for event in events]
    result = run_cli("forward", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert handled() == ids
    again = run_cli("replay", "--relay", "--force", "--config", config)  # every one delivered twice
    assert again.returncode == 0 and "5 delivered" in again.stdout, again.stdout + again.stderr
    assert handled() == ids  # the repeats were dropped by webhook-id


def test_example_refuses_forged_and_stale_deliveries(tmp_path, example):
    url, handled = example
    key = smsc_handler.relay_key(RELAY_SECRET)
    body = smsc_handler.event_line(status_event("501")).rstrip(b"\n")
    event_id = json.loads(body)["event_id"]
    good = smsc_handler.relay_headers(key, event_id, int(time.time()), body)
    forged = smsc_handler.relay_headers(b"x" * 32, event_id, int(time.time()), body)
    stale = smsc_handler.relay_headers(key, event_id, int(time.time()) - 3600, body)
    assert post(url, body, forged) == 400
    assert post(url, body, stale) == 400
    assert post(url, body.replace(b'"501"', b'"502"'), good) == 400  # body changed after signing
    assert handled() == []
    assert post(url, body, good) in (200, 204)
    assert handled() == [event_id]
