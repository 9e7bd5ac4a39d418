#!/usr/bin/env python3
"""Benchmark the relay: `forward` POSTing stored events to a local app that answers 200 at once.

    python3 bench/relay.py                  # 5 runs of 2,000 events
    python3 bench/relay.py --quick          # tiny counts: checks that it runs
    python3 bench/relay.py --output bench/RESULTS.md   # replace the relay section there

Each run first stores N new form callbacks through the handler's WSGI callable with
the default config (fsync on, dedupe on) and measures its CPU per request; then relays
those N events (relay_once, in this process, like `forward` does) to a receiver in
another process (bench/apps/relay_receiver.py, http.server with keep-alive) and
measures events/s and the relay's CPU per event. The ratio of the two CPU figures is
taken run by run (the same round on the same machine). Targets (issue 14): >= 500
events/s over one kept-alive connection; relay CPU per event <= 2x the handler's.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import inprocess  # noqa: E402

#: marks the relay section in RESULTS.md (replaced on --output)
BEGIN, END = "<!-- relay bench: begin -->", "<!-- relay bench: end -->"
RELAY_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def start_receiver(workdir, run):
    port = common.free_port()
    counts = os.path.join(workdir, "counts-%d.json" % run)
    process = subprocess.Popen([sys.executable, os.path.join(common.APPS, "relay_receiver.py"), str(port)],
                               env=dict(os.environ, RECEIVER_COUNTS=counts), stdin=subprocess.DEVNULL)
    common.wait_port(port, process)
    return process, port, counts


def stop_receiver(process, counts):
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    with open(counts) as file:
        received = json.load(file)
    received["connections"] -= 1  # wait_port's probe
    return received


def one_run(handler, workdir, run, count):
    folder = os.path.join(workdir, "run-%d" % run)
    os.makedirs(folder)
    receiver, port, counts_file = start_receiver(workdir, run)
    try:
        path = common.write_config(os.path.join(folder, "config.ini"), os.path.join(folder, "data"))
        with open(path, "a") as file:
            file.write("[relay]\nurl = http://127.0.0.1:%d/events\nsecret = %s\n" % (port, RELAY_SECRET))
        config = handler.load_config(path)
        app = handler.make_app(config)
        start_response = inprocess.StartResponse()
        environs = inprocess.make_environs(count)
        cpu = time.process_time()
        wall = inprocess.drive(app, environs, start_response)
        handler_cpu = (time.process_time() - cpu) / count
        if start_response.bad:
            raise SystemExit("the handler answered %s" % start_response.last_bad)
        relay = handler.Relay.from_config(config)
        state = handler.StateStore(config)
        try:
            cpu, start = time.process_time(), time.perf_counter()
            result = handler.relay_once(config, state, relay, say=lambda text: None)
            relay_wall = time.perf_counter() - start
            relay_cpu = (time.process_time() - cpu) / count
            counts = handler.relay_counts(config, state)
        finally:
            state.close()
            relay.close()
        if result != "done" or counts["delivered"] != count:
            raise SystemExit("relay: %s, %r" % (result, counts))
    finally:
        received = stop_receiver(receiver, counts_file)
    return {"handler_cpu_us": handler_cpu * 1e6, "handler_wall_us": wall / count * 1e6,
            "relay_per_s": count / relay_wall, "relay_cpu_us": relay_cpu * 1e6,
            "connections": received["connections"], "received": received["requests"]}


def measure(app_dir, runs, count, workdir):
    """Return the medians of `runs` runs of `count` events (and the CPU ratio taken run by run)."""
    os.makedirs(workdir, exist_ok=True)
    handler = inprocess.load_handler(app_dir)
    rows = []
    one_run(handler, workdir, 0, min(count, 100))  # warm-up: imports, first SQLite file
    for run in range(1, runs + 1):
        rows.append(one_run(handler, workdir, run, count))
        common.progress("relay run %d: %.0f events/s, %.1f us CPU per event (handler %.1f us)"
                        % (run, rows[-1]["relay_per_s"], rows[-1]["relay_cpu_us"], rows[-1]["handler_cpu_us"]))
    pick = {key: common.median([row[key] for row in rows]) for key in rows[0]}
    pick["cpu_ratio"] = common.paired_ratio([r["relay_cpu_us"] for r in rows], [r["handler_cpu_us"] for r in rows])
    pick["per_s_range"] = common.spread([r["relay_per_s"] for r in rows])
    pick["ratio_range"] = common.spread([r["relay_cpu_us"] / r["handler_cpu_us"] for r in rows])
    pick["runs"], pick["count"] = runs, count
    return pick


def render(result, head):
    low, high = result["per_s_range"]
    rlow, rhigh = result["ratio_range"]
    return "\n".join([
        BEGIN,
        "## Relay (issue 14)",
        "",
    ] + ([head, ""] if head else []) + [
        "`python3 bench/relay.py`: %d runs of %d events; medians, the ratio taken run by run." % (
            result["runs"], result["count"]),
        "",
        "| what | result | target |",
        "|---|---|---|",
        "| relay to a local app answering 200 at once, one kept-alive connection | **%.0f events/s** "
        "(runs %.0f–%.0f); %d connection(s) for %d requests | ≥ 500/s %s |" % (
            result["relay_per_s"], low, high, result["connections"], result["received"],
            "✔" if result["relay_per_s"] >= 500 else "✘"),
        "| relay CPU per event | %.1f µs | |" % result["relay_cpu_us"],
        "| handler's own in-process CPU per request, default config (fsync on, dedupe on) | %.1f µs "
        "(%.1f µs wall) | |" % (result["handler_cpu_us"], result["handler_wall_us"]),
        "| relay CPU per event ÷ handler CPU per request | **%.2f×** (runs %.2f–%.2f) | ≤ 2× %s |" % (
            result["cpu_ratio"], rlow, rhigh, "✔" if result["cpu_ratio"] <= 2 else "✘"),
        "",
        "The relay's CPU covers reading the line, its HMAC-SHA256, the request and the parsed answer "
        "(http.client), and its outcome and position in the state store (written 64 at a time). The "
        "receiver runs in another process and is not counted. The machine is shared: wall-clock "
        "figures move run to run, CPU figures less.",
        END,
        "",
    ])


def write_output(path, text):
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        before, rest = old.split(BEGIN, 1)
        new = before + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w", encoding="utf-8") as file:
        file.write(new)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (a smoke test)")
    parser.add_argument("--runs", type=int, help="runs (default 5; 1 with --quick)")
    parser.add_argument("--count", type=int, help="events per run (default 2000; 50 with --quick)")
    parser.add_argument("--app-dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--output", help="write the section into this Markdown file (replacing an old one)")
    parser.add_argument("--json", help="write the raw result here")
    parser.add_argument("--workdir", help="where the temporary folder goes (default /var/tmp)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 5)
    count = args.count or (50 if args.quick else 2000)
    workdir = common.make_workdir(args.workdir)
    try:
        result = measure(os.path.abspath(args.app_dir), runs, count, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = common.machine_info()
    head = "Measured %s on %s; Python %s." % (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), info.get("cpu", "?"), sys.version.split()[0])
    text = render(result, head)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    if args.output:
        write_output(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
