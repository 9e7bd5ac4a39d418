"""The hook runs exactly once on success, and is never skipped (issue 12): a property test.

Random interleavings of real processes: SMSC-like deliveries (real handler.cgi
processes; every answer but 200 is retried, some callbacks sent twice at once or
again after their 200), `forward --follow` (restarted when it dies), `replay` every
second or so, and a hook that succeeds, fails, hangs past its timeout or kills the
process running it (a crash mid-hook), at random. A dead runner's claim is aged by
four minutes (SMSC's next try comes that much later) — only claims taken before the
kill, so no live claim is touched. At the end the hook is fixed, the runners stop,
and the test checks, from what the hook itself logged:

- every event is stored as exactly one line;
- `replay --dry-run` lists exactly the events whose hook never succeeded;
- after `replay`, every event's hook succeeded exactly once, and no hook run started
  for an event after its success.

SMSC_PROPERTY_EVENTS scales the number of events per configuration (default 60).
"""

import json
import os
import random
import signal
import sqlite3
import threading
import time

import pytest
from cli_util import run_cli, start_cli, stop
from proof_util import Site, form, pid_gone, run_cgi, status_callback

#: The hook: logs "start ID PID"; then, unless MODE says ok, at random: fails (~23 %),
#: hangs past the timeout (~2 %), or kills the process that runs it (~2.5 %) before
#: doing its work; else logs "ok ID" as its very last act.
HOOK = r"""#!/bin/sh
cat > /dev/null
echo "start $SMSC_EVENT_ID $$" >> '{log}'
mode=$(cat '{mode}' 2>/dev/null)
if [ "$mode" != ok ]; then
    r=$(od -An -N1 -tu1 /dev/urandom | tr -d ' ')
    if [ "$r" -lt 60 ]; then echo "fail $SMSC_EVENT_ID" >> '{log}'; echo 'hook says no' >&2; exit 3; fi
    if [ "$r" -lt 66 ]; then sleep 8; echo "late $SMSC_EVENT_ID" >> '{log}'; exit 0; fi
    if [ "$r" -lt 72 ]; then
        echo "killed $SMSC_EVENT_ID $(date +%s.%N)" >> '{log}'; kill -9 $PPID; exit 1
    fi
fi
echo "ok $SMSC_EVENT_ID" >> '{log}'
"""

#: configuration name -> (ini sections, runs forward --follow)
SETUPS = {
    "inline-retry": ({"hook": {"on_failure": "retry"}}, True),
    "inline-ignore": ({"hook": {"on_failure": "ignore"}}, True),
    "spool": ({"hook": {"run": "forward"}}, True),
    "inline-retry-no-dedupe": ({"hook": {"on_failure": "retry"}, "dedupe": {"enabled": "no"}}, False),
}


class World:
    """The processes of one run and what the test knows about them."""

    def __init__(self, tmp_path, sections, events):
        self.log = tmp_path / "hook.log"
        self.mode = tmp_path / "hook.mode"
        script = tmp_path / "hook.sh"
        script.write_text(HOOK.format(log=self.log, mode=self.mode))
        script.chmod(0o755)
        merged = {"hook": {"command": str(script), "timeout": "3"}, "jsonl": {"fsync": "no"}}
        for section, keys in sections.items():
            merged.setdefault(section, {}).update(keys)
        self.site = Site(tmp_path, **merged)
        self.bodies = [form(status_callback(id="p%d" % n, ts=str(1700000000 + n))) for n in range(events)]
        self.lock = threading.Lock()
        self.queue = []  # (due, index): deliveries SMSC still owes
        self.answered = set()  # indexes answered 200 at least once
        self.stopping = threading.Event()
        self.aged = set()  # "killed" log lines already handled
        self.stats = {"answers": {}, "forward restarts": 0, "replays": 0}

    # -- SMSC -------------------------------------------------------------
    def schedule(self, index, delay=0.0):
        with self.lock:
            self.queue.append((time.monotonic() + delay, index))

    def next_delivery(self):
        with self.lock:
            now = time.monotonic()
            due = [item for item in self.queue if item[0] <= now]
            if not due:
                return None
            item = min(due)
            self.queue.remove(item)
            return item[1]

    def owed(self):
        with self.lock:
            return len(self.queue)

    def deliver_forever(self, rng):
        while not self.stopping.is_set():
            index = self.next_delivery()
            if index is None:
                time.sleep(0.05)
                continue
            answer = run_cgi(self.site.config_path, self.bodies[index])
            status = answer.status if answer.status is not None else "killed"
            with self.lock:
                self.stats["answers"][status] = self.stats["answers"].get(status, 0) + 1
            if status == 200:
                self.answered.add(index)
                if rng.random() < 0.05:
                    self.schedule(index, 0.2)  # its 200 got lost: SMSC sends it again
            else:
                assert status in (503, "killed"), answer  # never a 500
                self.schedule(index, rng.uniform(0.2, 0.6))  # SMSC retries (4 min, compressed)

    # -- forward --follow, replay ------------------------------------------
    def keep_forward_running(self):
        process = None
        while not self.stopping.is_set():
            if process is None or process.poll() is not None:
                if process is not None:
                    stop(process)
                    self.stats["forward restarts"] += 1
                process = start_cli("forward", "--follow", "--interval", "0.2", "--backoff", "0.05",
                                    "--config", self.site.config_path)
            time.sleep(0.1)
        self.forward = process

    def replay_now_and_then(self, rng):
        while not self.stopping.is_set():
            time.sleep(rng.uniform(0.5, 1.5))
            run_cli("replay", "--config", self.site.config_path, timeout=120)
            self.stats["replays"] += 1

    def age_dead_claims(self):
        """A dead runner's claim: let SMSC's four minutes pass for it (and only for it)."""
        while not self.stopping.is_set():
            time.sleep(0.3)
            self.age_claims_of_the_dead()

    def age_claims_of_the_dead(self):
        for line in self.lines("killed"):
            if line in self.aged:
                continue
            _word, event_id, killed_at = line.split()
            with sqlite3.connect(str(self.site.data / "state.sqlite3"), timeout=30) as db:
                db.execute("UPDATE hooks SET updated_at = updated_at - 240 WHERE event_id = ? AND "
                           "ok IS NULL AND updated_at <= ?", (event_id, float(killed_at)))
            self.aged.add(line)

    # -- what happened -------------------------------------------------------
    def lines(self, word=None):
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines()
                if line.strip() and (word is None or line.split()[0] == word)]

    def hook_pids(self):
        return [int(line.split()[2]) for line in self.lines("start")]


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_every_hook_succeeds_exactly_once_or_is_listed_by_replay(tmp_path, setup):
    sections, follow = SETUPS[setup]
    seed = int(os.environ.get("SMSC_PROPERTY_SEED") or random.randrange(2 ** 32))
    rng = random.Random(seed)
    world = World(tmp_path, sections, int(os.environ.get("SMSC_PROPERTY_EVENTS") or 60))
    order = list(range(len(world.bodies)))
    rng.shuffle(order)
    for position, index in enumerate(order):
        world.schedule(index, position * 0.03)
        if rng.random() < 0.1:
            world.schedule(index, position * 0.03)  # sent twice at once
    threads = [threading.Thread(target=world.deliver_forever, args=(random.Random(rng.random()),))
               for _ in range(3)]
    threads.append(threading.Thread(target=world.replay_now_and_then, args=(random.Random(rng.random()),)))
    threads.append(threading.Thread(target=world.age_dead_claims))
    if follow:
        threads.append(threading.Thread(target=world.keep_forward_running))
    world.forward = None
    for thread in threads:
        thread.daemon = True
        thread.start()
    context = "seed %d; %s" % (seed, world.stats)
    try:
        deadline = time.monotonic() + 600
        while world.owed() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not world.owed(), "SMSC still owed deliveries after 10 min; " + context
        world.mode.write_text("ok")  # the hook is fixed
        # Let forward finish what it can, then stop every runner.
        quiet_since, seen = time.monotonic(), len(world.lines())
        while time.monotonic() - quiet_since < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            if len(world.lines()) != seen or not all(pid_gone(pid) for pid in world.hook_pids()):
                quiet_since, seen = time.monotonic(), len(world.lines())
    finally:
        world.stopping.set()
        for thread in threads:
            thread.join(180)
        if world.forward is not None:
            stop(world.forward, timeout=30)
    for pid in world.hook_pids():
        assert _gone_within(pid, 15), "a hook process outlived its runner; " + context
    world.age_claims_of_the_dead()
    context = "seed %d; %s; log tail %r" % (seed, world.stats, world.lines()[-12:])

    events = [json.loads(line) for line in world.site.lines()]
    ids = [event["event_id"] for event in events]
    assert len(ids) == len(set(ids)) == len(world.bodies), "one line per event; " + context
    succeeded = {line.split()[1] for line in world.lines("ok")}
    listed = run_cli("replay", "--dry-run", "--config", world.site.config_path, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    would_run = {line.split()[3] for line in listed.stdout.splitlines() if line.startswith("would run")}
    assert would_run == set(ids) - succeeded, "replay lists what never succeeded; " + context
    done = run_cli("replay", "--config", world.site.config_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr + context

    successes = {}
    for line in world.lines():
        word, event_id = line.split()[:2]
        if word == "start":
            assert event_id not in successes, "a hook ran again after its success; " + context
        elif word == "ok":
            successes[event_id] = successes.get(event_id, 0) + 1
    assert successes == {event_id: 1 for event_id in ids}, context
    assert world.lines("fail"), "the random hook never failed: the run proved little; " + context
    print(context)


def _gone_within(pid, seconds):
    deadline = time.monotonic() + seconds
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            return False
        time.sleep(0.05)
    return True

