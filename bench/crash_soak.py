#!/usr/bin/env python3
"""Kill loop: SIGKILL gunicorn workers while 8 clients send callbacks and retry like SMSC.

    python3 bench/crash_soak.py                       # 10,000 callbacks + 2,000 repeats, ~1-3 minutes
    python3 bench/crash_soak.py --callbacks 1500 --repeats 300      # what tests/test_crash.py runs
    python3 bench/crash_soak.py --module /tmp/old/smsc_handler.py   # another version of the module

The handler runs with its default config (dedupe on, fsync on) under gunicorn (4 sync
workers). Workers die two ways: a killer SIGKILLs a random worker at random moments
(on average every --kill-every seconds), and every worker stops itself (SIGSTOP) at each
named step of a write with the chance --pause-chance (SMSC_HANDLER_TEST_PAUSE, a test-only
switch the module reads once at import), where the killer finds it and SIGKILLs it: so
deaths fall between the append and the COMMIT, between the COMMIT and the fdatasync, and
at every other step. Each client sends its callbacks in turn and sends a callback again
(the same bytes) until it gets a 200, a short pause after each failure, as SMSC does
every 4 minutes; 2,000 callbacks are sent a second time later, as SMSC does when it never
saw an answer. At the end every callback must be in status.jsonl exactly once: the script
prints the counts and exits 1 when any line is doubled or any callback lost.
"""

import argparse
import collections
import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

#: the steps of a write where a worker may stop itself (smsc_handler's _pause points)
STEPS = ("begun", "announced", "appended", "committing", "committed", "synced")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=10000, help="distinct callbacks (default 10000)")
    parser.add_argument("--repeats", type=int, default=2000, help="callbacks sent again later (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument("--kill-every", type=float, default=0.5,
                        help="mean seconds between random SIGKILLs of a worker (default 0.5; 0: none)")
    parser.add_argument("--pause-chance", type=float, default=0.002,
                        help="chance that a write stops at each named step to be SIGKILLed there (default 0.002)")
    parser.add_argument("--module", help="the smsc_handler.py to run (default: the repository's)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--json", help="also write the counts to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def workers_of(master):
    """Return (pid, state) of a process's children (gunicorn's workers)."""
    return [(pid, fields[0]) for pid, fields in common.proc_stats() if int(fields[1]) == master]


class Killer(threading.Thread):
    """SIGKILLs workers that stopped themselves, and random workers at random moments."""

    def __init__(self, master, kill_every, rng):
        super().__init__(daemon=True)
        self.master, self.kill_every, self.rng = master, kill_every, rng
        self.stopped_kills = self.random_kills = 0
        self.done = threading.Event()

    def run(self):
        next_random = self._next()
        while not self.done.is_set():
            for pid, state in workers_of(self.master):
                if state in (b"T", b"t"):
                    self._kill(pid)
                    self.stopped_kills += 1
            if time.monotonic() >= next_random:
                running = [pid for pid, state in workers_of(self.master) if state not in (b"Z", b"X")]
                if running:
                    self._kill(self.rng.choice(running))
                    self.random_kills += 1
                next_random = self._next()
            time.sleep(0.003)

    def _next(self):
        if not self.kill_every:
            return float("inf")
        return time.monotonic() + self.rng.expovariate(1.0 / self.kill_every)

    @staticmethod
    def _kill(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def plan(args, rng):
    """Return the callback numbers in sending order: each distinct one, and repeats later on."""
    numbers = list(range(args.callbacks))
    order = list(numbers)
    for _ in range(args.repeats):
        n = rng.randrange(args.callbacks)
        order.insert(rng.randint(min(n + 50, len(order)), len(order)), n)  # sent again later
    return order


def send_until_200(port, body, stats, lock):
    """POST one callback, again and again, until it is answered 200; return the tries it took."""
    tries = 0
    while True:
        tries += 1
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/", body=body, headers={"Content-Type": common.CONTENT_TYPES["form"]})
                answer = conn.getresponse()
                status = answer.status
                answer.read()
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            status = None
        if status == 200:
            return tries
        with lock:
            stats[status] += 1
        if tries >= 2000:
            return None
        time.sleep(0.01 + random.random() * 0.04)


#: Records the tails of the state store's files (the quick write leaves the last ids there), if the module can.
RECORD_TAILS = ("import sys; sys.path.insert(0, sys.argv[1]); import smsc_handler as h\n"
                "if hasattr(h.StateStore, 'record_tails'):\n"
                "    with h.StateStore(h.load_config(sys.argv[2])) as state: state.record_tails()\n")


def check(data_dir, expected, app=None, config=None):
    """Count lines per message id in status.jsonl, torn pieces, and ids the state store holds."""
    if app and config:
        subprocess.run([sys.executable, "-c", RECORD_TAILS, app, config], check=True)
    counts, torn = collections.Counter(), 0
    path = os.path.join(data_dir, "status.jsonl")
    with open(path, "rb") as file:
        for line in file:
            try:
                event = json.loads(line)
            except ValueError:
                torn += 1  # a write killed midway, terminated by the next writer: never acknowledged
                continue
            counts[event["id"]] += 1
    with sqlite3.connect(os.path.join(data_dir, "state.sqlite3")) as db:
        recorded = db.execute("SELECT count(*) FROM seen").fetchone()[0]
    doubled = sum(c - 1 for c in counts.values() if c > 1)
    lost = sum(1 for n in expected if counts[str(n)] == 0)
    return {"lines": sum(counts.values()), "doubled": doubled, "doubled_ids": sum(1 for c in counts.values() if c > 1),
            "lost": lost, "torn": torn, "recorded_ids": recorded}


def paused_at(log):
    """Count the 'paused at' lines the workers wrote before stopping themselves."""
    counts = collections.Counter()
    try:
        with open(log, "rb") as file:
            for line in file:
                if b"paused at " in line:
                    counts[line.rsplit(b"paused at ", 1)[1].strip().decode("ascii", "replace")] += 1
    except OSError:
        pass
    return dict(counts)


def main(argv=None):
    args = parse_args(argv)
    rng = random.Random(args.seed)
    gunicorn = common.which("gunicorn")
    try:
        import gunicorn as _g  # noqa: F401
        argv0 = [sys.executable, "-m", "gunicorn"]
    except ImportError:
        if not gunicorn:
            print("crash_soak: gunicorn is not installed (pip install gunicorn)", file=sys.stderr)
            return 2
        argv0 = [gunicorn]
    work = common.make_workdir()
    app = common.copy_app(common.REPO, os.path.join(work, "app"))
    if args.module:
        import shutil
        shutil.copy2(args.module, os.path.join(app, "smsc_handler.py"))
    data_dir = os.path.join(work, "data")
    config = common.write_config(os.path.join(work, "config.ini"), data_dir)  # dedupe on, fsync on
    port = common.free_port()
    env = dict(os.environ, SMSC_HANDLER_CONFIG=config)
    env.pop("PYTHONPATH", None)
    if args.pause_chance:
        env["SMSC_HANDLER_TEST_PAUSE"] = ",".join("%s=%g" % (step, args.pause_chance) for step in STEPS)
    log = os.path.join(work, "gunicorn.log")
    server = common.Server("gunicorn", argv0 + [
        "--workers", str(args.workers), "--worker-class", "sync", "--bind", "127.0.0.1:%d" % port,
        "--chdir", app, "--timeout", "30", "--log-level", "warning", "wsgi:application"], log, env=env, cwd=app)
    killer = None
    try:
        if not common.wait_port(port, server.proc):
            print("crash_soak: gunicorn did not start:\n" + server.tail(), file=sys.stderr)
            return 2
        order = plan(args, rng)
        bodies = {n: common.form_body(n) for n in range(args.callbacks)}
        failures, lock = collections.Counter(), threading.Lock()
        position, tries, gave_up = [0], [], []
        killer = Killer(server.proc.pid, args.kill_every, rng)
        started = time.monotonic()
        killer.start()

        def client():
            while True:
                with lock:
                    if position[0] >= len(order):
                        return
                    n = order[position[0]]
                    position[0] += 1
                took = send_until_200(port, bodies[n], failures, lock)
                with lock:
                    (tries if took is not None else gave_up).append(took or n)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        killer.done.set()
        killer.join()
    finally:
        if killer is not None:
            killer.done.set()
        server.stop()
    result = check(data_dir, range(args.callbacks), app, config)
    result.update({
        "module": args.module or os.path.join(common.REPO, "smsc_handler.py"),
        "callbacks": args.callbacks, "repeats": args.repeats, "requests_answered_200": len(tries),
        "gave_up": len(gave_up), "retries": sum(tries) - len(tries), "seconds": round(elapsed, 1),
        "kills_at_a_step": killer.stopped_kills, "kills_at_random": killer.random_kills,
        "paused_at": paused_at(log), "failed_answers": {str(k): v for k, v in failures.items()},
    })
    print("%(callbacks)d callbacks + %(repeats)d repeats, %(requests_answered_200)d answered 200 "
          "after %(retries)d retries, in %(seconds)s s" % result)
    print("workers killed: %(kills_at_a_step)d stopped at a step %(paused_at)s, %(kills_at_random)d at random"
          % result)
    print("status.jsonl: %(lines)d lines, %(doubled)d doubled, %(lost)d lost, %(torn)d torn pieces; "
          "%(recorded_ids)d ids recorded" % result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)
    if args.keep:
        print("work folder kept: %s" % work)
    else:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["doubled"] == result["lost"] == result["gave_up"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
