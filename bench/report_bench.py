"""The report at scale (issue 15): 1,000,000 stored events -> `report` in <= 3 s and <= 1 MB.

    python3 bench/report_bench.py                     # the full store; Markdown on stdout
    python3 bench/report_bench.py --events 20000 --runs 1   # quick: checks that it runs

The store is the tracking benchmark's shape (issue 13): status callbacks over 0.3 as
many messages, one to five statuses each (28 % of them sent twice, as SMSC's retries
do), their arrivals shuffled within two hours of the first, over --days days; plus 1 %
incoming SMS and 1 % calls. Every line is the real writer's bytes (`normalize` +
`event_line` of a decoded form callback), appended in arrival order to
`data/{kind}.jsonl`, so the index reads exactly what a handler stores.

Measured with --python (default Debian's /usr/bin/python3, what a cron job finds), each
a median of --runs, against baselines run in the same rounds: `--version` (the start of
the interpreter and the module) and `stats --json` over the same caught-up index. The
first `report` also catches the index up from nothing (the cold row, one run).
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
from urllib.parse import urlencode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import smsc_handler  # noqa: E402

#: the report's limits (issue 15)
MAX_SECONDS, MAX_BYTES = 3.0, 1_000_000
#: statuses a message goes through, by how its story ends
STORIES = ([-1, 0, 1], [0, 1], [0, 1, 2], [-1, 0, 1, 2, 4], [0, 20], [-1, 0, 22], [0, 3], [0], [-1, 0])
#: how often each story is told
WEIGHTS = (30, 25, 15, 5, 8, 3, 3, 7, 4)
#: the share of status callbacks that SMSC sends twice (a retry, or a lost answer)
REPEATED = 0.28
#: error codes of the failed stories
ERRORS = (1, 6, 11, 13, 240, 255)


def event_bytes(params, received):
    """The line the handler writes for these callback parameters, received at `received`."""
    body = urlencode(params, encoding="utf-8").encode("ascii")
    request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
    return smsc_handler.event_line(smsc_handler.normalize(request, None, "127.0.0.1", received=received, body=body))


def build_store(folder, events, days, seed=15, now=None):
    """Write the store into folder/data; return (config path, counts by kind)."""
    rnd = random.Random(seed)
    now = time.time() if now is None else now
    start = now - days * 86400
    extra = events // 100
    target = events - 2 * extra
    arrivals = []  # (received, kind, params)
    message = 0
    count = 0
    while count < target:
        message += 1
        story = rnd.choices(STORIES, WEIGHTS)[0]
        first = start + rnd.random() * (days * 86400 - 7200)
        phone = "79%09d" % rnd.randrange(10**9)
        err = rnd.choice(ERRORS)
        for step, status in enumerate(story):
            if count == target:
                break
            ts = int(first) + 30 * step
            params = {"id": message, "phone": phone, "status": status, "ts": ts, "cost": "1.50",
                      "sender": rnd.choice(("Shop", "Shop", "Alerts"))}
            if status >= 20:
                params["err"] = err
            arrivals.append((first + rnd.random() * 7200, "status", params))  # shuffled arrival
            count += 1
            if rnd.random() < REPEATED and count < target:  # SMSC called again: the same callback
                arrivals.append((first + rnd.random() * 7200, "status", params))
                count += 1
    for index in range(extra):
        moment = start + rnd.random() * days * 86400
        arrivals.append((moment, "incoming", {"id": index, "phone": "79%09d" % rnd.randrange(10**9),
                                              "mes": "Заказ %d: когда доставка?" % index, "to": "79990000000",
                                              "sent": int(moment), "time": int(moment)}))
        moment = start + rnd.random() * days * 86400
        arrivals.append((moment, "waitcall", {"waitcall": 1, "phone": "79%09d" % rnd.randrange(10**9),
                                              "ts": int(moment)}))
    arrivals.sort(key=lambda item: item[0])
    data = os.path.join(folder, "data")
    os.makedirs(data, 0o700)
    config = os.path.join(folder, "config.ini")
    with open(config, "w", encoding="utf-8") as file:
        file.write("[handler]\ndata_dir = data\n[jsonl]\nfsync = no\n[dedupe]\nenabled = no\n")
    files = {kind: open(os.path.join(data, "%s.jsonl" % kind), "wb") for kind in smsc_handler.KINDS}
    counts = dict.fromkeys(smsc_handler.KINDS, 0)
    try:
        for received, kind, params in arrivals:
            files[kind].write(event_bytes(params, received))
            counts[kind] += 1
    finally:
        for file in files.values():
            file.close()
    counts["messages"] = message
    return config, counts


def timed(argv):
    """Run argv; return its (wall, CPU) seconds, CPU = user + system of the child (it must succeed)."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, cwd="/")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit("%s failed: %s" % (" ".join(argv), done.stderr.decode(errors="replace")))
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="stored events (default 1,000,000)")
    parser.add_argument("--days", type=int, default=30, help="days they span (default 30)")
    parser.add_argument("--runs", type=int, default=5, help="warm runs of each command (default 5)")
    parser.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                        else sys.executable, help="interpreter that runs the module")
    parser.add_argument("--module", default=os.path.join(REPO, "smsc_handler.py"),
                        help="the module to measure (default: this repository's)")
    parser.add_argument("--keep", action="store_true", help="keep the store (its folder is printed)")
    parser.add_argument("--store", metavar="DIR", help="build the store in DIR and keep it; reuse it when there "
                        "(its index too: the cold row is then not cold)")
    args = parser.parse_args(argv)
    if args.store:
        folder = args.store
        args.keep = True
    else:
        folder = tempfile.mkdtemp(prefix="smsc-report-bench-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    try:
        began = time.perf_counter()
        if args.store and os.path.exists(os.path.join(folder, "counts.json")):
            config = os.path.join(folder, "config.ini")
            with open(os.path.join(folder, "counts.json"), encoding="utf-8") as file:
                counts = json.load(file)
        else:
            os.makedirs(folder, exist_ok=True)
            config, counts = build_store(folder, args.events, args.days)
            with open(os.path.join(folder, "counts.json"), "w", encoding="utf-8") as file:
                json.dump(counts, file)
        built = time.perf_counter() - began
        sys.stderr.write("store ready in %.1f s: %s\n" % (built, counts))
        module = args.module
        out = os.path.join(folder, "report.html")
        report = [args.python, module, "--config", config, "report", "-o", out]
        stats = [args.python, module, "--config", config, "stats", "--json", "--by", "day"]
        version = [args.python, module, "--version"]
        for name in os.listdir(os.path.join(folder, "data")):
            if name.startswith(smsc_handler.INDEX_FILE):  # the first report catches up from nothing
                os.unlink(os.path.join(folder, "data", name))
        cold = timed(report)
        rows = {"version": [], "stats": [], "report": []}
        cpu = {"version": [], "stats": [], "report": []}
        for _ in range(args.runs):  # interleaved: each round measures all three
            for name, command in (("version", version), ("stats", stats), ("report", report)):
                wall, used = timed(command)
                rows[name].append(wall)
                cpu[name].append(used)
        size = os.path.getsize(out)
        jsonl = sum(os.path.getsize(os.path.join(folder, "data", "%s.jsonl" % k)) for k in smsc_handler.KINDS)
        python = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                                capture_output=True, text=True).stdout.strip()
    finally:
        if args.keep:
            sys.stderr.write("store kept in %s\n" % folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in rows.items()}
    used = {name: statistics.median(values) for name, values in cpu.items()}
    ratio = statistics.median(r / s for r, s in zip(rows["report"], rows["stats"]))
    total = sum(counts[k] for k in smsc_handler.KINDS)
    print("## Report (issue 15): `report` over %s stored events\n" % format(total, ","))
    print("%s status callbacks over %s messages, %s incoming SMS, %s calls over %d days (%.0f MB of JSON lines); "
          "Python %s (`%s`), median of %d interleaved runs, %s. CPU = user + system time of the process "
          "(what the machine's load does not inflate).\n" % (
              format(counts["status"], ","), format(counts["messages"], ","), format(counts["incoming"], ","),
              format(counts["waitcall"], ","), args.days, jsonl / 1e6, python, args.python, args.runs,
              time.strftime("%Y-%m-%d", time.gmtime())))
    print("| command | wall s (median) | min–max | CPU s | × `--version` (wall) | target |")
    print("|---|---|---|---|---|---|")

    def row(label, name, target=""):
        print("| %s | %.3f | %.3f–%.3f | %.3f | %.1f× | %s |" % (
            label, med[name], min(rows[name]), max(rows[name]), used[name], med[name] / med["version"], target))

    row("`--version` (baseline)", "version")
    row("`stats --json --by day` (index caught up)", "stats")
    row("**`report`** (index caught up)", "report",
        "≤ %.0f s %s" % (MAX_SECONDS, "✔" if med["report"] <= MAX_SECONDS else "✘"))
    print("| `report`, first run (catches the index up from nothing) | %.1f | one run | %.1f | | |" % cold)
    print("\nPage size: **%s bytes** (target ≤ %s %s); `report` / `stats` paired ratio %.2f× (wall).\n" % (
        format(size, ","), format(MAX_BYTES, ","), "✔" if size <= MAX_BYTES else "✘", ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
