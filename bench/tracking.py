#!/usr/bin/env python3
"""Benchmark the tracking index (issue 13, "Speed and scale"): a big store, its first catch-up, lookups.

    python3 bench/tracking.py                       # 1,000,000 status events over 300,000 messages
    python3 bench/tracking.py --events 20000 --messages 6000 --runs 1    # a quick check
    python3 bench/tracking.py --output bench/RESULTS.md   # replace the "Tracking index" section

The store is written by the module's own code: each event is built by ``normalize`` (from a
``Request`` of form parameters, as ``decode_request`` returns it — the HTTP decoding is
skipped to make a million events in seconds, not hours) and ``event_line``, and the lines
are appended with ``append_line`` (fsync off) in chunks of 1,000 lines — the real writer,
one ``write()`` per chunk. Messages get 2–4 statuses each (waiting / transferred, then
delivered, read, or a failure with an error), SMSC's retries repeat about 2% of them, and
arrival is shuffled within a sliding window, so statuses of a message arrive out of order.
received_at spreads over 30 days (the per-day tables have 30 days to sum).

Every figure is beside a baseline measured in the same run on the same machine:

* first catch-up (``index``, in-process, one core) vs a plain ``json.loads`` pass over
  the same files: events/s and the ratio;
* ``status ID``, ``calls --phone P`` and ``stats`` as subprocesses vs
  ``python3 smsc_handler.py --version`` (median of --runs paired runs);
* catch-up after 1,000 new events: the work of ``TrackingIndex.catch_up()`` (in-process);
* the index on disk vs the JSON-lines files it covers.

All files live in a temporary folder under /var/tmp, removed unless --keep.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import smsc_handler  # noqa: E402

SCRIPT = os.path.join(REPO, "smsc_handler.py")
MARKER = "## Tracking index (issue 13)"
T_START = 1796400000 - 30 * 86400  # received_at spreads over the 30 days before 2026-12-04


def statuses_of(rng):
    """The statuses one message gets: (status, err), in the order SMSC sends them."""
    path = [(-1, 0), (0, 0)]
    roll = rng.random()
    if roll < 0.75:
        path.append((1, 0))
        if rng.random() < 0.2:
            path.append((2, 0))
    elif roll < 0.93:
        path.append((20, rng.choice((1, 6, 11, 13, 255))))
    # else: still pending
    return path


def generate(config, events, messages, seed=13):
    """Write `events` status lines over `messages` messages (and 1,000 calls).

    Returns (lines written, distinct events): SMSC's retries repeat about 2%.
    """
    rng = random.Random(seed)
    per_message = []
    for number in range(messages):
        message_id, phone = str(100000000 + number), "7999%07d" % number
        sent = T_START + int(number * (30 * 86400) / messages)
        per_message.append([(sent + step * 7 + rng.randrange(5), message_id, phone, status, err, number % 4)
                            for step, (status, err) in enumerate(statuses_of(rng))])
    total = sum(len(statuses) for statuses in per_message)
    while total < events * 0.98:  # more "transferred" reports, later each time
        statuses = per_message[rng.randrange(messages)]
        ts, message_id, phone, _status, _err, sender = statuses[0]
        statuses.append((ts + 3 + len(statuses), message_id, phone, 0, 0, sender))
        total += 1
    plan = []
    for statuses in per_message:
        for status in statuses:
            plan.append(status)
            if rng.random() < 0.02:
                plan.append(status)  # SMSC's retry: the same callback again
    # Shuffled arrival: each event moves up to 50 places.
    keyed = sorted(((index + rng.random() * 50, item) for index, item in enumerate(plan)), key=lambda k: k[0])
    path = smsc_handler.event_path(config, "status")
    senders = ("SMSC.RU", "Shop", "Bank", "Taxi")
    chunk = []
    for _key, (ts, message_id, phone, status, err, sender) in keyed:
        params = {"id": message_id, "phone": phone, "status": str(status), "ts": str(ts),
                  "cost": "1.20", "cnt": "1", "sender": senders[sender]}
        if err:
            params["err"] = str(err)
        request = smsc_handler.Request(params, None, "form", "windows-1251", False)
        event = smsc_handler.normalize(request, None, "127.0.0.1", received=ts + 0.25)
        chunk.append(smsc_handler.event_line(event))
        if len(chunk) == 1000:
            smsc_handler.append_line(path, b"".join(chunk), fsync=False, mode=0o600)
            chunk = []
    if chunk:
        smsc_handler.append_line(path, b"".join(chunk), fsync=False, mode=0o600)
    calls = smsc_handler.event_path(config, "waitcall")
    lines = []
    for n in range(1000):
        request = smsc_handler.Request({"waitcall": "1", "phone": "7999%07d" % n, "ts": str(T_START + n * 60)},
                                       None, "form", "windows-1251", False)
        lines.append(smsc_handler.event_line(smsc_handler.normalize(request, None, "127.0.0.1",
                                                                    received=T_START + n * 60)))
    smsc_handler.append_line(calls, b"".join(lines), fsync=False, mode=0o600)
    return len(plan) + 1000, len(set(plan)) + 1000


def json_pass(config):
    """Seconds of a plain json.loads pass over every event file (the baseline of the catch-up)."""
    started = time.process_time()
    count = 0
    for path in smsc_handler.event_files(config):
        with open(path, "rb") as file:
            for line in file:
                json.loads(line)
                count += 1
    return time.process_time() - started, count


def cli_seconds(config_path, *args):
    """Wall seconds of one CLI run (its output thrown away)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, SCRIPT, *args, "--config", config_path], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - started
    if done.returncode not in (0, 3, 4, 5):
        raise SystemExit("%s failed: %s" % (" ".join(args), done.stderr))
    return took


def paired(config_path, runs, args):
    """Median seconds of `args` and of --version, measured in turns, and the median ratio."""
    times, base, ratios = [], [], []
    for _ in range(runs):
        version = cli_seconds(config_path, "--version")
        took = cli_seconds(config_path, *args)
        times.append(took)
        base.append(version)
        ratios.append(took / version)
    return statistics.median(times), statistics.median(base), statistics.median(ratios)


def size_of(folder, names):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in names
               if os.path.exists(os.path.join(folder, name)))


def run(args):
    folder = tempfile.mkdtemp(prefix="smsc-tracking-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    results = {}
    try:
        config_path = os.path.join(folder, "config.ini")
        with open(config_path, "w") as file:
            file.write("[handler]\ndata_dir = data\n[jsonl]\nfsync = no\n")
        config = smsc_handler.load_config(config_path)
        smsc_handler.ensure_data_dir(config)
        started = time.perf_counter()
        written, distinct = generate(config, args.events, args.messages)
        results["generate_s"] = time.perf_counter() - started
        results["events"] = written
        results["distinct"] = distinct
        files_bytes = sum(os.path.getsize(p) for p in smsc_handler.event_files(config))
        results["files_mb"] = files_bytes / 1e6

        baseline, counted = json_pass(config)
        results["json_pass_s"] = baseline
        results["json_per_s"] = counted / baseline

        started, cpu = time.perf_counter(), time.process_time()
        with smsc_handler.TrackingIndex(config) as index:
            indexed = index.catch_up()
            index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes = index.sizes()
        results["catch_up_s"] = time.perf_counter() - started
        results["catch_up_cpu_s"] = time.process_time() - cpu
        results["indexed"] = indexed
        results["index_per_s"] = indexed / results["catch_up_cpu_s"]
        results["index_vs_json"] = results["index_per_s"] / results["json_per_s"]
        results["messages"] = sizes["messages"]
        index_bytes = size_of(config.data_dir, ["index.sqlite3", "index.sqlite3-wal"])
        results["index_mb"] = index_bytes / 1e6
        results["index_vs_files"] = index_bytes / files_bytes

        probe = str(100000000 + args.messages // 2)
        results["status"] = paired(config_path, args.runs, ["status", probe])
        results["calls"] = paired(config_path, args.runs, ["calls", "--phone", "+7 999 000-05-00"])
        results["stats"] = paired(config_path, args.runs, ["stats"])

        # Catch-up after 1,000 new events: the work, in-process, median of runs.
        works = []
        with smsc_handler.TrackingIndex(config) as index:
            for turn in range(args.runs):
                lines = []
                for n in range(1000):
                    request = smsc_handler.Request(
                        {"id": "9%08d" % (turn * 1000 + n), "phone": "79990000000", "status": "1",
                         "ts": str(T_START + 30 * 86400 + n)}, None, "form", "windows-1251", False)
                    lines.append(smsc_handler.event_line(smsc_handler.normalize(request, None, "127.0.0.1")))
                smsc_handler.append_line(smsc_handler.event_path(config, "status"), b"".join(lines), fsync=False)
                started, cpu = time.perf_counter(), time.process_time()
                assert index.catch_up() == 1000
                works.append((time.process_time() - cpu, time.perf_counter() - started))
        results["catch_up_1000_s"] = statistics.median(cpu for cpu, _wall in works)
        results["catch_up_1000_wall_s"] = statistics.median(wall for _cpu, wall in works)
    finally:
        if args.keep:
            print("kept %s" % folder, file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def report(results, args):
    """The Markdown section for bench/RESULTS.md."""
    r = results
    lines = [
        MARKER,
        "",
        "`python3 bench/tracking.py --events %d --messages %d --runs %d` under Python %s, SQLite %s, %s. "
        "The machine has 2 cores and was shared with other jobs: medians, noisy." % (
            args.events, args.messages, args.runs, sys.version.split()[0], smsc_handler_sqlite(),
            time.strftime("%Y-%m-%d", time.gmtime())),
        "",
        "| what | measured | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|",
        "| store written (status + 1,000 calls) | %d lines (%d distinct events, %d messages), %.0f MB, "
        "%.1f s to generate | | | |" % (r["events"], r["distinct"], r["messages"], r["files_mb"], r["generate_s"]),
        "| first catch-up (`index`, CPU of one core) | %.0f events/s (%.1f s CPU, %.1f s wall) | "
        "json.loads pass: %.0f lines/s (%.1f s) | %.2fx | >= 30,000/s and >= 0.35x |" % (
            r["index_per_s"], r["catch_up_cpu_s"], r["catch_up_s"], r["json_per_s"], r["json_pass_s"],
            r["index_vs_json"]),
        "| `status ID` | %.0f ms | `--version`: %.0f ms | %.2fx | <= 1.5x |" % (
            r["status"][0] * 1000, r["status"][1] * 1000, r["status"][2]),
        "| `calls --phone P` | %.0f ms | `--version`: %.0f ms | %.2fx | <= 1.5x |" % (
            r["calls"][0] * 1000, r["calls"][1] * 1000, r["calls"][2]),
        "| `stats` over the whole store | %.0f ms | `--version`: %.0f ms | %.2fx | <= 1 s |" % (
            r["stats"][0] * 1000, r["stats"][1] * 1000, r["stats"][2]),
        "| catch-up after 1,000 new events (work: CPU; wall beside it) | %.1f ms (wall %.1f ms) | | | <= 50 ms |" % (
            r["catch_up_1000_s"] * 1000, r["catch_up_1000_wall_s"] * 1000),
        "| index on disk | %.0f MB for %d messages | JSON lines: %.0f MB | %.2fx | <= 0.5x |" % (
            r["index_mb"], r["messages"], r["files_mb"], r["index_vs_files"]),
        "",
    ]
    return "\n".join(lines)


def smsc_handler_sqlite():
    import sqlite3
    return sqlite3.sqlite_version


def write_output(path, section):
    """Replace (or append) the Tracking index section of a Markdown file."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if MARKER in text:
        before, _, rest = text.partition(MARKER)
        following = rest.find("\n## ")
        text = before + section + (rest[following + 1:] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000000)
    parser.add_argument("--messages", type=int, default=300000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", help="Markdown file whose Tracking index section to replace")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    results = run(args)
    section = report(results, args)
    print(section)
    if args.output:
        write_output(args.output, section)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
