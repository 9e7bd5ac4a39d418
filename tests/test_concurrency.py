"""Concurrency (issue 3 item 4): 8 CGI processes at a time, 4,000 requests, exact files.

Each request is a real ``handler.cgi`` process with a CGI environment, as Apache
runs it. The eight drivers send new callbacks of all three kinds and repeats of
earlier ones — some from the same moment in another driver, some long after —
in form, JSON and XML, each signed with md5. With fsync on, every line must be
whole JSON, every callback stored exactly once, and every answer a 200.
"""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from proof_util import (
    PLAIN,
    Site,
    as_json,
    as_xml,
    form,
    incoming_callback,
    intact_events,
    run_cgi,
    sign,
    status_callback,
    waitcall_callback,
)

import smsc_handler

WORKERS = 8
REQUESTS_PER_WORKER = 500
SECRET = "Concurrency-Secret_1"
FORMATS = {
    # charset named: an incoming's identity holds its mes (SPEC §6), which must read the same in every format
    "form": (lambda params: form(params) + b"&charset=utf-8", "application/x-www-form-urlencoded"),
    "json": (as_json, "application/json"),
    "xml": (as_xml, "application/xml"),
}


def callback(n):
    """The n-th distinct callback: (kind, tag, params), signed with md5."""
    kind = ("status", "incoming", "waitcall")[n % 3]
    if kind == "status":
        tag = "s%d" % n
        params = status_callback(id=tag, phone="7%010d" % n, status=str(n % 5 - 1), ts=str(1700000000 + n))
    elif kind == "incoming":
        tag = "i%d" % n
        params = incoming_callback(id=tag, phone="7%010d" % n, mes="Message %d: Привет" % n)
    else:
        tag = "7%010d" % n
        params = waitcall_callback(phone=tag, ts=str(1700000000 + n))
    params["md5"] = sign(kind, params, SECRET)
    return kind, tag, params


def plan(seed=2024):
    """Return each worker's list of callback numbers: new ones and repeats."""
    rng = random.Random(seed)
    rounds = [[] for _ in range(REQUESTS_PER_WORKER)]
    sent = []  # callback numbers in the order they were first planned
    per_worker = [[] for _ in range(WORKERS)]
    for i in range(REQUESTS_PER_WORKER):
        for w in range(WORKERS):
            recent = [n for r in rounds[max(0, i - 2):i + 1] for n in r]
            roll = rng.random()
            if roll < 0.55 or not sent:
                n = i * WORKERS + w
                sent.append(n)
                rounds[i].append(n)
            elif roll < 0.90 and recent:
                n = rng.choice(recent)  # another driver's callback of this very moment
            else:
                n = rng.choice(sent)  # SMSC's late duplicate
            per_worker[w].append(n)
    return per_worker, set(sent)


def test_eight_cgi_processes_store_every_callback_exactly_once(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET}, jsonl={"fsync": "yes"})
    # No warm-up request: the eight processes also race to create the state store.
    per_worker, distinct = plan()
    assert sum(map(len, per_worker)) == WORKERS * REQUESTS_PER_WORKER >= 4000
    failures, lock = [], threading.Lock()
    rng = random.Random(7)
    formats = [[rng.choice(list(FORMATS)) for _ in numbers] for numbers in per_worker]

    def drive(w):
        for n, fmt in zip(per_worker[w], formats[w]):
            _kind, _tag, params = callback(n)
            encode, content_type = FORMATS[fmt]
            body = encode(params)
            answer = run_cgi(site.config_path, body, content_type=content_type)
            ok = (answer.status == 200 and answer.body == b"OK" and answer.returncode == 0
                  and answer.headers.get("content-type") == PLAIN and answer.stderr == b"")
            if not ok:
                with lock:
                    failures.append((w, n, fmt, answer))

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(drive, range(WORKERS)))
    elapsed = time.monotonic() - started
    total = WORKERS * REQUESTS_PER_WORKER
    print("\n%d requests by %d concurrent CGI processes in %.1f s: %.0f requests/s, %d distinct"
          % (total, WORKERS, elapsed, total / elapsed, len(distinct)))
    assert failures == [], failures[:3]

    expected = {"status": set(), "incoming": set(), "waitcall": set()}
    for n in distinct:
        kind, tag, _params = callback(n)
        expected[kind].add(tag)
    stored_ids = []
    for kind, tags in expected.items():
        events = intact_events(site.path(kind))  # every line whole JSON
        key = "phone" if kind == "waitcall" else "id"
        found = [event[key] for event in events]
        assert len(found) == len(set(found)), "a callback stored twice in %s.jsonl" % kind
        assert set(found) == tags, "%s.jsonl: %d missing, %d extra" % (
            kind, len(tags - set(found)), len(set(found) - tags))
        assert all(event["signature"] == {"alg": "md5", "valid": True, "key": 0} for event in events)
        stored_ids.extend(event["event_id"] for event in events)
    assert len(stored_ids) == len(set(stored_ids)) == len(distinct)
    with smsc_handler.StateStore(site.config) as state:
        state.record_tails()  # the last lines' ids, left in the tail by the quick write
    with site.state() as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone()[0] == len(distinct)
