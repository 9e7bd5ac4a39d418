"""The relay (SPEC §12): every stored event POSTed to the user's app as a Standard Webhook.

Proved against the real libraries, not against the module itself: the receiver is a
Flask app under gunicorn that verifies each delivery with the official
``standardwebhooks`` package and with ``svix``; faults are injected there (see
tests/relay_receiver.py). `forward` runs as a real subprocess.
"""

import email.utils
import json
import signal
import time

import pytest
from cli_util import (
    Hook,
    append_raw,
    data_dir_of,
    run_cli,
    start_cli,
    status_event,
    stop,
    wait_until,
    write_config,
    write_events,
)
from relay_util import RELAY_SECRET, Receiver

import smsc_handler

standardwebhooks = pytest.importorskip("standardwebhooks")
svix_webhooks = pytest.importorskip("svix.webhooks")
pytest.importorskip("flask")
pytest.importorskip("gunicorn")


############################################################################
# Signing: known answers
############################################################################

#: libraries/python/tests/test_webhooks.py::test_sign_function of standard-webhooks
KAT_ID, KAT_TS, KAT_BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
KAT_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_standard_webhooks_known_answer():
    key = smsc_handler.relay_key(RELAY_SECRET)
    assert smsc_handler.relay_signature(key, KAT_ID, KAT_TS, KAT_BODY) == KAT_SIGNATURE


def test_signature_of_an_event_body_matches_openssl():
    # printf '%s' '3f2a.1700000000.{body}' | openssl dgst -sha256 -mac HMAC -macopt hexkey:KEY -binary | base64
    key = smsc_handler.relay_key(RELAY_SECRET)
    assert key.hex() == "31f290f6bf06298aab4f08d43c3f082cf648a362da2da4b0"
    body = b'{"mes": "\\u041f\\u0440\\u0438\\u0432\\u0435\\u0442"}'
    assert smsc_handler.relay_signature(key, "3f2a", 1700000000, body) == \
        "v1,5tD/RGZM0OBfWqZmwsnZZ8At6628zz4VRF+JZLQ8sEQ="


def test_headers_verify_with_both_libraries():
    key = smsc_handler.relay_key(RELAY_SECRET)
    event = status_event("501")
    body = smsc_handler.event_line(event).rstrip(b"\n")
    headers = smsc_handler.relay_headers(key, event["event_id"], int(time.time()), body)
    assert headers["webhook-id"] == event["event_id"]
    assert headers["Content-Type"] == "application/json"
    assert standardwebhooks.Webhook(RELAY_SECRET).verify(body, headers)["event_id"] == event["event_id"]
    svix_webhooks.Webhook(RELAY_SECRET).verify(body, headers)  # raises when it refuses
    tampered = body.replace(b'"501"', b'"502"')
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(RELAY_SECRET).verify(tampered, headers)
    with pytest.raises(svix_webhooks.WebhookVerificationError):
        svix_webhooks.Webhook(RELAY_SECRET).verify(tampered, headers)


def test_relay_secret_prints_a_new_key_both_libraries_take():
    first, second = (run_cli("relay-secret") for _ in range(2))
    assert first.returncode == 0 and first.stderr == ""
    secret = first.stdout.strip()
    assert secret.startswith("whsec_") and secret != second.stdout.strip()
    key = smsc_handler.relay_key(secret)
    assert len(key) == 32
    body = b'{"a": 1}'
    headers = smsc_handler.relay_headers(key, "id1", int(time.time()), body)
    assert standardwebhooks.Webhook(secret).verify(body, headers) == {"a": 1}
    svix_webhooks.Webhook(secret).verify(body, headers)  # raises when it refuses


@pytest.mark.parametrize("secret", ["whsec_c2hvcnQ=", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_Mf!Q9r8GKYqr",
                                    "whsec_" + "QUFB" * 22])
def test_bad_relay_secret_is_refused_without_being_shown(tmp_path, secret):
    config = write_config(tmp_path, relay={"url": "https://app.example/e", "secret": secret})
    result = run_cli("check", "--config", config)
    assert result.returncode == 1
    assert "[relay] secret" in result.stdout and secret not in result.stdout + result.stderr


def test_url_without_secret_is_a_config_error(tmp_path):
    config = write_config(tmp_path, relay={"url": "https://app.example/e"})
    result = run_cli("check", "--config", config)
    assert result.returncode == 1 and "[relay] url is set but [relay] secret is empty" in result.stdout


@pytest.mark.parametrize("url, warned", [("http://app.example/e", True), ("http://10.0.0.5:8000/e", True),
                                         ("https://app.example/e", False), ("http://127.0.0.1:9/e", False),
                                         ("http://localhost/e", False), ("http://[::1]:8000/e", False)])
def test_check_warns_on_plain_http_to_another_host(tmp_path, url, warned):
    config = write_config(tmp_path, handler={"data_dir": "data", "secret": "abc"},
                          relay={"url": url, "secret": RELAY_SECRET})
    result = run_cli("check", "--config", config)
    assert result.returncode == 0, result.stdout
    assert ("plain http://" in result.stdout) == warned


def test_config_repr_hides_the_relay_secret(tmp_path):
    config = smsc_handler.load_config(str(write_config(tmp_path, relay={"url": "https://a.example/",
                                                                        "secret": RELAY_SECRET})))
    assert RELAY_SECRET not in repr(config) and RELAY_SECRET[6:] not in repr(config)


############################################################################
# Backoff and Retry-After
############################################################################

def test_retry_after_reads_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert smsc_handler.retry_after_seconds("120", now) == 120
    assert smsc_handler.retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == 30
    assert smsc_handler.retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0
    for junk in (None, "", "soon", "-5", "1.5", "\u0663"):
        assert smsc_handler.retry_after_seconds(junk, now) is None


def test_backoff_is_full_jitter_doubling_and_capped_at_an_hour():
    delay = smsc_handler.relay_delay
    assert delay(1, 1.0, rand=lambda: 1.0) == 1.0
    assert delay(4, 1.0, rand=lambda: 1.0) == 8.0
    assert delay(4, 1.0, rand=lambda: 0.25) == 2.0
    assert delay(40, 1.0, rand=lambda: 1.0) == 3600
    assert delay(1, 1.0, retry_after=30, rand=lambda: 0.0) == 30  # Retry-After is a floor
    assert delay(1, 1.0, retry_after=86400, rand=lambda: 0.0) == 3600  # ... under the cap
    draws = {round(delay(6, 1.0), 3) for _ in range(200)}
    assert len(draws) > 100 and all(0 <= d <= 32 for d in draws)


@pytest.mark.parametrize("status, verdict", [(200, "ok"), (204, "ok"), (299, "ok"), (None, "retry"),
                                             (429, "retry"), (408, "retry"), (500, "retry"), (503, "retry"),
                                             (410, "gone"), (404, "failed"), (400, "failed"), (301, "failed"),
                                             (302, "failed"), (100, "failed")])
def test_each_status_has_its_verdict(status, verdict):
    assert smsc_handler.relay_verdict(status) == verdict


############################################################################
# Against the real receiver
############################################################################

@pytest.fixture
def receiver(tmp_path):
    with Receiver(tmp_path / "receiver", slow=2.5) as running:
        yield running


def relay_config(tmp_path, receiver_url, **sections):
    sections.setdefault("relay", {}).update({"url": receiver_url, "secret": RELAY_SECRET, "timeout": "1"})
    return write_config(tmp_path, **sections)


def store(config, *message_ids):
    """Append one status event per message id to status.jsonl; return their event ids."""
    start = time.time()
    events = [status_event(mid, received=start + index) for index, mid in enumerate(message_ids)]
    write_events(data_dir_of(config) / "status.jsonl", events)
    return [event["event_id"] for event in events]


def forward(config, *args, timeout=60):
    return run_cli("forward", "--config", config, "--backoff", "0.05", *args, timeout=timeout)


def assert_all_verified(receiver):
    entries = receiver.requests()
    assert entries and all(entry["sw"] and entry["svix"] for entry in entries), entries


def test_forward_delivers_every_event_once_over_one_kept_alive_connection(tmp_path, receiver):
    config = relay_config(tmp_path, receiver.url)
    ids = store(config, *["ok-%d" % n for n in range(40)])
    result = forward(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert receiver.delivered() == ids  # in stored order, each once
    assert_all_verified(receiver)
    assert len({entry["port"] for entry in receiver.requests()}) == 1  # one TCP connection
    # The next run has nothing to do: its position is past them.
    assert forward(config).returncode == 0 and receiver.delivered() == ids


def test_the_body_is_the_stored_line_byte_for_byte(tmp_path, receiver):
    import hashlib
    config = relay_config(tmp_path, receiver.url)
    event = status_event("ok-1", cmt="\u041f\u0440\u0438\u0432\u0435\u0442")
    # Written in another spelling than this version's (compact, raw UTF-8): sent as it is, never re-encoded.
    append_raw(data_dir_of(config) / "status.jsonl",
               json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")
    assert forward(config).returncode == 0
    line = (data_dir_of(config) / "status.jsonl").read_bytes()
    (entry,) = receiver.requests()
    assert entry["sha256"] == hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    assert entry["content_type"] == "application/json"


def test_an_event_stored_twice_is_delivered_once(tmp_path, receiver):
    config = relay_config(tmp_path, receiver.url)
    event = status_event("ok-1")
    write_events(data_dir_of(config) / "status.jsonl", [event, event])
    assert forward(config).returncode == 0
    assert receiver.delivered() == [event["event_id"]]


def test_faults_are_retried_until_every_event_is_delivered(tmp_path, receiver):
    config = relay_config(tmp_path, receiver.url)
    ids = store(config, "ok-1", "b503-1", "r429s-1", "r503d-1", "slow-1", "ok-2")
    result = forward(config, "--tries", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    delivered = receiver.delivered()
    assert set(delivered) == set(ids)
    slow_id = ids[4]
    # Repeats only where a timeout made one possible: the slow answer came after we gave up.
    assert [i for i in ids if delivered.count(i) > 1] in ([], [slow_id])
    assert delivered.count(slow_id) <= 2
    assert_all_verified(receiver)
    attempts = {}
    for entry in receiver.requests():
        attempts.setdefault(entry["id"], []).append(entry)
    assert [e["status"] for e in attempts[ids[1]]] == [503, 503, 503, 200]
    # Retry-After honoured: 1 s, and an HTTP date 2 s ahead (whole seconds: allow 1 s rounding).
    assert attempts[ids[2]][1]["at"] - attempts[ids[2]][0]["at"] >= 0.95
    assert attempts[ids[3]][1]["at"] - attempts[ids[3]][0]["at"] >= 0.95
    # Each attempt is signed anew: the timestamps never go back.
    stamps = [int(e["timestamp"]) for e in attempts[ids[1]]]
    assert stamps == sorted(stamps)
    assert "not delivered (attempt 1)" in result.stdout


def test_a_refused_event_is_kept_for_replay_and_the_relay_goes_on(tmp_path, receiver):
    config = relay_config(tmp_path, receiver.url)
    ids = store(config, "ok-1", "r404-1", "r302-1", "ok-2")
    result = forward(config)
    assert result.returncode == 1  # something was refused: say so
    assert receiver.delivered() == [ids[0], ids[3]]
    assert "refused (kept for `replay --relay`): HTTP 404" in result.stdout
    assert "redirect: not followed" in result.stdout
    assert receiver.requests("/elsewhere") == []  # the redirect was not followed
    stats = json.loads(run_cli("stats", "--json", "--config", config).stdout)
    assert stats["relay"] == {"delivered": 2, "failed": 2, "retrying": 0, "waiting": 0}
    # forward does not send them again; replay --relay does (the 404 answers 200 now).
    assert forward(config).returncode == 0 and receiver.delivered() == [ids[0], ids[3]]
    replay = run_cli("replay", "--relay", "--config", config)
    assert replay.returncode == 1  # the 302 still refuses
    assert "relayed 2 event(s): 1 delivered, 1 refused" in replay.stdout
    assert receiver.delivered() == [ids[0], ids[3], ids[1]]
    stats = json.loads(run_cli("stats", "--json", "--config", config).stdout)
    assert stats["relay"]["delivered"] == 3 and stats["relay"]["failed"] == 1
    text = run_cli("stats", "--config", config).stdout
    assert "refused (replay --relay)  1" in text.replace("   ", "  ") or "refused (replay --relay)" in text
    assert_all_verified(receiver)


def test_410_stops_the_relay_but_not_the_hook_and_the_next_run_delivers(tmp_path, receiver):
    hook = Hook(tmp_path)
    config = relay_config(tmp_path, receiver.url, hook={"command": hook.path, "run": "forward"})
    ids = store(config, "ok-1", "gone-1", "ok-2")
    result = forward(config)
    assert result.returncode == 1
    assert "answered 410 Gone: the relay stopped" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert receiver.delivered() == [ids[0]]
    assert hook.ids() == ids  # the hook side went on
    result = forward(config)  # the URL "fixed" (this receiver answers 410 once)
    assert result.returncode == 0, result.stderr
    assert receiver.delivered() == ids and hook.ids() == ids


def test_hook_and_relay_keep_their_own_positions(tmp_path, receiver):
    hook = Hook(tmp_path)
    hook.fail()
    config = relay_config(tmp_path, receiver.url, hook={"command": hook.path, "run": "forward"})
    ids = store(config, "ok-1", "ok-2", "ok-3")
    assert forward(config, "--tries", "1").returncode == 1  # the hook fails ...
    assert receiver.delivered() == ids  # ... the relay delivered all
    hook.fail(False)
    assert forward(config).returncode == 0
    assert hook.ids() == ids and receiver.delivered() == ids


def test_connection_refused_leaves_everything_for_the_next_run(tmp_path):
    receiver = Receiver(tmp_path / "receiver")
    config = relay_config(tmp_path, receiver.url)
    ids = store(config, "ok-1", "ok-2")
    result = forward(config, "--tries", "2")
    assert result.returncode == 1
    assert "refused the connection" in result.stdout and "(attempt 2)" in result.stdout
    assert json.loads(run_cli("stats", "--json", "--config", config).stdout)["relay"]["waiting"] == 1
    with receiver:
        assert forward(config).returncode == 0
        assert receiver.delivered() == ids


def test_receiver_killed_and_restarted_mid_run_loses_nothing(tmp_path):
    receiver = Receiver(tmp_path / "receiver").start()
    config = relay_config(tmp_path, receiver.url)
    ids = store(config, *["ok-%d" % n for n in range(300)])
    process = start_cli("forward", "--follow", "--config", config, "--backoff", "0.05", "--interval", "0.1")
    try:
        wait_until(lambda: len(receiver.delivered()) >= 50, timeout=30)
        receiver.kill()
        killed_at = len(receiver.delivered())
        time.sleep(1.0)  # forward meets a refused connection, backs off, tries again
        receiver.start()
        more = store(config, *["late-%d" % n for n in range(20)])  # stored while it runs
        wait_until(lambda: set(receiver.delivered()) >= set(ids + more), timeout=60)
    finally:
        rc, err = stop(process)
        receiver.kill()
    delivered = receiver.delivered()
    assert killed_at < len(ids)  # the kill really was mid-run
    repeats = [i for i in set(delivered) if delivered.count(i) > 1]
    # At most the request in flight when the receiver died can come twice.
    assert len(repeats) <= 1, repeats
    assert sorted(set(delivered)) == sorted(ids + more)
    assert "Traceback" not in err
    assert_all_verified(receiver)


def test_stats_reports_the_relay_only_when_configured(tmp_path):
    config = write_config(tmp_path)
    store(config, "ok-1")
    result = run_cli("stats", "--json", "--config", config)
    assert "relay" not in json.loads(result.stdout)


def test_forward_without_hook_or_relay_still_refuses(tmp_path):
    config = write_config(tmp_path)
    result = run_cli("forward", "--config", config)
    assert result.returncode == 1 and "no [hook] command" in result.stderr


def test_forward_killed_mid_run_repeats_at_most_one_batch_and_skips_nothing(tmp_path, receiver):
    config = relay_config(tmp_path, receiver.url)
    ids = store(config, *["ok-%d" % n for n in range(400)])
    process = start_cli("forward", "--follow", "--config", config, "--backoff", "0.05", "--interval", "0.1")
    try:
        wait_until(lambda: len(receiver.delivered()) >= 100, timeout=30)
    finally:
        process.send_signal(signal.SIGKILL)  # a crash: no flush of what it kept in memory
        stop(process)
    assert len(set(receiver.delivered())) < len(ids)  # killed mid-run
    assert forward(config).returncode == 0
    delivered = receiver.delivered()
    assert sorted(set(delivered)) == sorted(ids)  # nothing skipped
    repeats = len(delivered) - len(set(delivered))
    assert repeats <= smsc_handler.RELAY_BATCH + 1  # at most the outcomes not yet written, and the one in flight
    # The request in flight at the kill may reach the app cut short: it fails verification
    # and is refused (never a 200); every delivery answered 200 verified with both libraries.
    entries = receiver.requests()
    torn = [entry for entry in entries if not (entry["sw"] and entry["svix"])]
    assert len(torn) <= 1 and all(entry["status"] != 200 for entry in torn), torn
    assert all(entry["sw"] and entry["svix"] for entry in entries if entry["status"] == 200)


def test_a_connection_the_app_closed_while_idle_is_reopened_without_a_failed_attempt(tmp_path):
    with Receiver(tmp_path / "receiver", keepalive=1) as receiver:
        config = relay_config(tmp_path, receiver.url)
        process = start_cli("forward", "--follow", "--config", config, "--backoff", "0.05", "--interval", "0.1")
        try:
            first = store(config, "ok-1")
            wait_until(lambda: receiver.delivered() == first, timeout=20)
            time.sleep(2.5)  # gunicorn closes the idle kept-alive connection after 1 s
            second = store(config, "ok-2")
            wait_until(lambda: receiver.delivered() == first + second, timeout=20)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=10)
            out = process.stdout.read()
            _rc, err = stop(process)
        assert "not delivered" not in out + err, out + err
        ports = [entry["port"] for entry in receiver.requests()]
        assert ports[0] != ports[1]  # a new connection, opened at once


def test_a_file_the_relay_cannot_read_is_one_line_on_stderr_never_a_traceback(tmp_path):
    config = relay_config(tmp_path, "http://127.0.0.1:9/")  # never reached: the read fails first
    store(config, "m1")
    (data_dir_of(config) / "incoming.jsonl").mkdir()  # a folder where the relay reads a file
    done = forward(config)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("smsc_handler forward: relay:")]


def test_forward_from_now_skips_the_stored_events_for_the_relay_too(tmp_path, receiver):
    config = relay_config(tmp_path, receiver.url)
    store(config, "old1", "old2")
    done = forward(config, "--from-now")
    assert done.returncode == 0, done.stderr
    assert "marked 2 stored event(s) as relayed" in done.stdout
    new = store(config, "new1")
    assert forward(config).returncode == 0
    assert receiver.delivered() == new
