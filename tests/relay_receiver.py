"""A test receiver for the relay: a Flask app (run under gunicorn by tests/test_relay.py).

Every request is checked with the official ``standardwebhooks`` package AND with
``svix``'s ``Webhook.verify``, then logged as one JSON line in
``$RECEIVER_DIR/requests.jsonl``. Faults are chosen by the SMSC message id of the
event (the part before the first ``-``), per attempt of that webhook-id in this
process, so a restarted receiver begins its counts again:

==========  ==============================================================
b503        attempts 1-3 answer 503 (a burst)
r429s       attempt 1 answers 429 with ``Retry-After: 1`` (seconds)
r503d       attempt 1 answers 503 with ``Retry-After`` as an HTTP date 2 s ahead
slow        attempt 1 sleeps past the relay's timeout, then answers 200
gone        attempt 1 answers 410
r404        attempt 1 answers 404 (replay --relay delivers it later)
r302        every attempt answers 302 to /elsewhere (which logs a GET if followed)
==========  ==============================================================
"""

import email.utils
import hashlib
import json
import os
import threading
import time

import standardwebhooks
import svix.webhooks
from flask import Flask, Response, request

app = Flask(__name__)
SECRET = os.environ["RECEIVER_SECRET"]
LOG = os.path.join(os.environ["RECEIVER_DIR"], "requests.jsonl")
SLOW = float(os.environ.get("RECEIVER_SLOW", "2"))
_attempts, _lock = {}, threading.Lock()


def _log(**entry):
    entry["at"] = time.time()
    with _lock, open(LOG, "a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")


def _verified(body, headers):
    """Whether both libraries accept the delivery (each raises on a bad one)."""
    results = []
    for verify in (lambda: standardwebhooks.Webhook(SECRET).verify(body, headers),
                   lambda: svix.webhooks.Webhook(SECRET).verify(body, headers)):
        try:
            verify()
            results.append(True)
        except Exception:  # each library has its own error class
            results.append(False)
    return results


@app.route("/ready")
def ready():
    _verified(b"{}", {})  # warm both libraries up: the first delivery must not time out on imports
    return "ready"


@app.route("/elsewhere", methods=["GET", "POST"])
def elsewhere():
    _log(path="/elsewhere", method=request.method, status=200)
    return "followed"


@app.route("/events", methods=["POST"])
def events():
    body = request.get_data()
    headers = {name.lower(): value for name, value in request.headers.items()}
    webhook_id = headers.get("webhook-id", "")
    with _lock:
        attempt = _attempts[webhook_id] = _attempts.get(webhook_id, 0) + 1
    sw_ok, svix_ok = _verified(body, headers)
    entry = {"path": "/events", "id": webhook_id, "attempt": attempt, "sw": sw_ok, "svix": svix_ok,
             "sha256": hashlib.sha256(body).hexdigest(), "content_type": headers.get("content-type"),
             "timestamp": headers.get("webhook-timestamp"), "port": request.environ.get("REMOTE_PORT")}
    if not (sw_ok and svix_ok):
        _log(status=400, **entry)
        return Response("bad signature", status=400)
    event = json.loads(body)
    assert event["event_id"] == webhook_id
    fault = str(event.get("id", "")).split("-")[0]
    status, extra = 200, {}
    if fault == "b503" and attempt <= 3:
        status = 503
    elif fault == "r429s" and attempt == 1:
        status, extra = 429, {"Retry-After": "1"}
    elif fault == "r503d" and attempt == 1:
        status, extra = 503, {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)}
    elif fault == "slow" and attempt == 1:
        time.sleep(SLOW)
    elif fault == "gone" and attempt == 1:
        status = 410
    elif fault == "r404" and attempt == 1:
        status = 404
    elif fault == "r302":
        status, extra = 302, {"Location": "/elsewhere"}
    _log(status=status, **entry)
    return Response("ok" if status == 200 else "no", status=status, headers=extra)
