"""In-process: events per second through the WSGI callable, no server in the way.

The handler's ``make_app(load_config(path))`` is called like a server would call it
(an environ with ``wsgi.input``, a ``start_response``), next to two baselines called
the same way in the same rounds: a hello-world app (the harness itself) and a
minimal "parse the form, append a JSON line" app. Each callback is new (its own id),
so with dedupe on every request takes the store-it path.

The ``store`` section grows the dedupe table from 0 to 1,000,000 ids and measures
the per-event cost at each size, then measures the store under write contention:
several processes calling ``store_event`` at once on one data folder.
"""

import cProfile
import importlib.util
import io
import math
import multiprocessing
import os
import pstats
import queue
import sqlite3
import sys
import time
import traceback

import common


def load_handler(app_dir, name="smsc_handler"):
    """Import smsc_handler.py from app_dir under `name` (not wherever sys.path would find one)."""
    existing = sys.modules.get(name)
    path = os.path.join(app_dir, "smsc_handler.py")
    if existing is not None and os.path.realpath(getattr(existing, "__file__", "")) == os.path.realpath(path):
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_app_module(name):
    """Import one of bench/apps/*.py by name."""
    spec = importlib.util.spec_from_file_location("bench_app_" + name, os.path.join(common.APPS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StartResponse:
    """A start_response that counts non-200 answers."""

    def __init__(self):
        self.bad = 0
        self.last_bad = None

    def __call__(self, status, headers, exc_info=None):
        if not status.startswith("200"):
            self.bad += 1
            self.last_bad = status


def environ_for(body, fmt="form"):
    """Return a WSGI environ for one POSTed callback."""
    return {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "",
        "CONTENT_TYPE": common.CONTENT_TYPES[fmt], "CONTENT_LENGTH": str(len(body)),
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def make_environs(count, fmt="form"):
    """Build `count` environs for new callbacks (outside the timed loop)."""
    make = common.BODIES[fmt]
    return [environ_for(make(n), fmt) for n in common.COUNTER.take(count)]


def drive(app, environs, start_response):
    """Call the app once per environ, consuming each answer; return seconds taken."""
    start = time.perf_counter()
    for environ in environs:
        answer = app(environ, start_response)
        b"".join(answer)
        close = getattr(answer, "close", None)
        if close is not None:
            close()
    return time.perf_counter() - start


class Case:
    """One in-process variant: an app, the body format, events per run."""

    def __init__(self, name, app, fmt, count, role="", fsync=None, dedupe=None):
        self.name, self.app, self.fmt, self.count, self.role = name, app, fmt, count, role
        self.fsync, self.dedupe = fsync, dedupe
        self.rates = []
        self.start_response = StartResponse()

    def run_chunk(self, count):
        """Drive `count` new callbacks; return the seconds taken."""
        environs = make_environs(count, self.fmt)
        return drive(self.app, environs, self.start_response)


def handler_app(handler, workdir, slug, fsync, dedupe):
    """Build the handler's WSGI app for one config, with its own data folder."""
    folder = os.path.join(workdir, "inprocess", slug)
    os.makedirs(folder, exist_ok=True)
    path = common.write_config(os.path.join(folder, "config.ini"), os.path.join(folder, "data"),
                               fsync=fsync, dedupe=dedupe)
    return handler.make_app(handler.load_config(path))


def build_cases(ctx, handler):
    """Return the baselines and the handler variants (form/JSON/XML x fsync x dedupe)."""
    fast, slow = ctx.scale(2000, 20), ctx.scale(200, 5)
    hello = load_app_module("hello_wsgi").application
    minimal = load_app_module("minimal_append")
    folder = os.path.join(ctx.workdir, "inprocess", "minimal")
    os.makedirs(folder, exist_ok=True)
    cases = [
        Case("hello WSGI", hello, "form", fast, role="baseline"),
        Case("minimal parse+append, fsync off", minimal.make_app(os.path.join(folder, "off.jsonl"), False),
             "form", fast, role="baseline", fsync=False, dedupe=False),
        Case("minimal parse+append, fsync on", minimal.make_app(os.path.join(folder, "on.jsonl"), True),
             "form", slow, role="baseline", fsync=True, dedupe=False),
    ]
    for fmt in ("form", "json", "xml"):
        for fsync, dedupe in ((False, False), (False, True), (True, False), (True, True)):
            slug = "%s-fsync%s-dedupe%s" % (fmt, "on" if fsync else "off", "on" if dedupe else "off")
            name = "handler %s, fsync %s, dedupe %s" % (fmt, "on" if fsync else "off", "on" if dedupe else "off")
            role = ""
            if fmt == "form" and not fsync:
                role = "target >= 10,000/s" if dedupe else "target >= 30,000/s"
            count = fast if not (fsync or dedupe) else slow
            cases.append(Case(name, handler_app(handler, ctx.workdir, slug, fsync, dedupe), fmt, count,
                              role=role, fsync=fsync, dedupe=dedupe))
    if ctx.candidate:
        candidate = load_handler(ctx.candidate, "smsc_handler_candidate")
        for fsync, dedupe in ((False, False), (False, True), (True, False), (True, True)):
            slug = "candidate-fsync%s-dedupe%s" % ("on" if fsync else "off", "on" if dedupe else "off")
            name = "candidate form, fsync %s, dedupe %s" % ("on" if fsync else "off", "on" if dedupe else "off")
            count = fast if not (fsync or dedupe) else slow
            cases.append(Case(name, handler_app(candidate, ctx.workdir, slug, fsync, dedupe), "form", count,
                              role="candidate", fsync=fsync, dedupe=dedupe))
    return cases


def profile_case(app, fmt, count, top=18):
    """Run `count` callbacks under cProfile; return the top functions by own time."""
    environs = make_environs(count, fmt)
    profiler = cProfile.Profile()
    profiler.enable()
    drive(app, environs, StartResponse())
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        where = "%s:%d(%s)" % (os.path.basename(filename), line, func) if line else func
        rows.append((where, calls / count, tottime / count * 1e6, cumtime / count * 1e6))
    rows.sort(key=lambda row: -row[2])
    return rows[:top]


def breakdown(handler, ctx):
    """Time the handler's steps one by one for a form status callback (µs per call).

    Private helpers are looked up by name; a step whose function is gone or has
    changed shape is reported as not measured instead of failing the run.
    """
    folder = os.path.join(ctx.workdir, "inprocess", "breakdown")
    os.makedirs(folder, exist_ok=True)
    result = {}
    count = ctx.scale(2000, 20)
    slow_count = ctx.scale(200, 5)
    bodies = [common.form_body(n) for n in common.COUNTER.take(count)]
    cfg_off = handler.load_config(common.write_config(os.path.join(folder, "off.ini"),
                                                      os.path.join(folder, "data"), fsync=False, dedupe=False))
    cfg_dd = handler.load_config(common.write_config(os.path.join(folder, "dd.ini"),
                                                     os.path.join(folder, "data-dd"), fsync=False, dedupe=True))
    content_type = common.CONTENT_TYPES["form"]
    app = handler.make_app(cfg_off)
    line_path = os.path.join(folder, "append.jsonl")

    def timed(label, func, items, warm=None):
        try:
            func(items[0] if warm is None else warm)  # warm-up, and the check that the step still exists
            start = time.perf_counter()
            for item in items:
                func(item)
            result[label] = (time.perf_counter() - start) / len(items) * 1e6
        except Exception as exc:  # noqa: BLE001 - a renamed helper must not fail the run
            result[label] = "not measured (%s: %s)" % (type(exc).__name__, str(exc)[:60])

    environs = [environ_for(b) for b in bodies]
    timed("whole request: WSGI call, fsync off, dedupe off", lambda e: b"".join(app(e, StartResponse())), environs,
          warm=environ_for(bodies[0]))
    requests = [handler.decode_request(b, b"", content_type, cfg_off.default_charset) for b in bodies]
    timed("decode_request (form)", lambda b: handler.decode_request(b, b"", content_type, "windows-1251"), bodies)
    timed("  of which parse_form(body)", lambda b: handler.parse_form(b), bodies)
    timed("verify_signature (md5)", lambda r: handler.verify_signature("status", r, common.SECRET), requests)
    events = [handler.normalize(r, None, "127.0.0.1", zone=cfg_off.timezone) for r in requests]
    timed("normalize", lambda r: handler.normalize(r, None, "127.0.0.1", zone=cfg_off.timezone), requests)
    timed("  of which _status_fields", lambda r: handler._status_fields(r.params, cfg_off.timezone), requests)
    timed("  of which _local_time (the `time` field)",
          lambda _: handler._local_time("14.11.23 12:00:00", cfg_off.timezone), requests)
    timed("  of which event_id (identity JSON + digest)",
          lambda e: handler.event_id("status", e, e["params"]), events)
    timed("event_line (JSON encoding)", handler.event_line, events)
    timed("store_event, fsync off, dedupe off (includes event_line)", lambda e: handler.store_event(cfg_off, e),
          events)
    timed("  of which ensure_data_dir (the .htaccess guard: access, its size once a second)",
          lambda _: handler.ensure_data_dir(cfg_off), events)
    line = handler.event_line(events[0])
    timed("  of which append_line (open, flock, lseek, pread, write, close)",
          lambda _: handler.append_line(line_path, line, False, 0o600), events)
    timed("WSGI plumbing: read_body + client_address + _answer",
          lambda e: (handler.read_body(dict(e, **{"wsgi.input": io.BytesIO(bodies[0])}), 65536),
                     handler.client_address(e, ()), handler._answer(StartResponse(), 200, b"OK")), environs)
    slow = events[:slow_count]
    fresh = [dict(e, event_id="%032x" % n) for e, n in zip(slow, common.COUNTER.take(len(slow)))]
    timed("store_event, fsync off, dedupe on", lambda e: handler.store_event(cfg_dd, e), fresh)
    # What the StateStore class costs when opened and closed around one event, as in a CGI process.
    parts = {"StateStore() open": 0.0, "BEGIN IMMEDIATE + SELECT + INSERT": 0.0, "COMMIT": 0.0, "close()": 0.0}
    ids = ["%032x" % n for n in common.COUNTER.take(slow_count)]
    try:
        for event_id in ids:
            t0 = time.perf_counter()
            store = handler.StateStore(cfg_dd)
            t1 = time.perf_counter()
            store.begin()
            store.is_seen(event_id)
            store.remember(event_id, "status", None, time.time())
            t2 = time.perf_counter()
            store.commit()
            t3 = time.perf_counter()
            store.close()
            t4 = time.perf_counter()
            parts["StateStore() open"] += t1 - t0
            parts["BEGIN IMMEDIATE + SELECT + INSERT"] += t2 - t1
            parts["COMMIT"] += t3 - t2
            parts["close()"] += t4 - t3
        for label, total in parts.items():
            result["  StateStore opened and closed around one event (what a CGI request pays): " + label] = \
                total / len(ids) * 1e6
        store = handler.StateStore(cfg_dd)
        try:
            def one(event_id):
                store.begin()
                store.is_seen(event_id)
                store.remember(event_id, "status", None, time.time())
                store.commit()

            timed("  state store kept open (one connection per process)", one,
                  ["%032x" % n for n in common.COUNTER.take(count)])
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - StateStore's API may change
        result["state store"] = "not measured (%s: %s)" % (type(exc).__name__, str(exc)[:60])
    return result


def run(ctx):
    """Measure events/s in-process; return the section's results."""
    handler = load_handler(ctx.app_dir)
    cases = build_cases(ctx, handler)
    common.progress("inprocess: %d cases x %d runs" % (len(cases), ctx.runs))
    for case in cases:  # warm-up: first files, first SQLite schema, imports
        case.app(make_environs(1, case.fmt)[0], case.start_response)
        case.start_response.bad = 0
    # Each run is cut into chunks, and every case runs one chunk in turn: a burst of
    # load on the machine (or of fsync latency on a shared disk) then hits every case.
    chunks = ctx.scale(10, 1)
    for _run in range(ctx.runs):
        spent = {case.name: 0.0 for case in cases}
        for _chunk in range(chunks):
            for case in cases:
                spent[case.name] += case.run_chunk(max(1, case.count // chunks))
        for case in cases:
            case.rates.append(max(1, case.count // chunks) * chunks / spent[case.name])
    by_name = {case.name: case for case in cases}
    rows = []
    for case in cases:
        minimal = mine = None
        if case.name.startswith(("handler", "candidate")):
            minimal = by_name["minimal parse+append, fsync %s" % ("on" if case.fsync else "off")]
        if case.name.startswith("candidate"):
            mine = by_name[case.name.replace("candidate", "handler", 1)]
        lo, hi = common.spread(case.rates)
        rows.append({
            "name": case.name, "role": case.role, "events": case.count,
            "rate": common.median(case.rates), "us_per_event": 1e6 / common.median(case.rates),
            "min": lo, "max": hi,
            "vs_minimal": common.paired_ratio(case.rates, minimal.rates) if minimal else None,
            "vs_hello": common.paired_ratio(case.rates, by_name["hello WSGI"].rates),
            "vs_handler": common.paired_ratio(case.rates, mine.rates) if mine else None,
            "errors": case.start_response.bad, "last_error": case.start_response.last_bad,
        })
    common.progress("inprocess: profile and step breakdown")
    form_fast = by_name["handler form, fsync off, dedupe off"].app
    form_dedupe = by_name["handler form, fsync off, dedupe on"].app
    return {
        "python": sys.version.split()[0], "executable": sys.executable,
        "filesystem": common.filesystem_of(ctx.workdir),
        "rows": rows,
        "profile_form": profile_case(form_fast, "form", ctx.scale(3000, 20)),
        "profile_form_dedupe": profile_case(form_dedupe, "form", ctx.scale(300, 5)),
        "breakdown": breakdown(handler, ctx),
    }


############################################################################
# The state store as it grows
############################################################################


def prefill(db_path, count, now):
    """Add `count` random ids to the seen table directly (sorted, one transaction)."""
    ids = sorted(os.urandom(16).hex() for _ in range(count))
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -200000")
        conn.execute("BEGIN")
        batch = 50000
        for start in range(0, len(ids), batch):
            conn.executemany("INSERT OR IGNORE INTO seen (event_id, kind, file, stored_at) "
                             "VALUES (?, 'status', NULL, ?)", ((i, now) for i in ids[start:start + batch]))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return conn.execute("SELECT count(*) FROM seen").fetchone()[0]
    finally:
        conn.close()


def run_store(ctx):
    """Measure the per-event cost with dedupe on as the state store grows to 1,000,000 ids.

    One data folder per size, filled once, then measured round-robin (size by size
    within each run), so the ratios against the empty store are paired in time.
    """
    handler = load_handler(ctx.app_dir)
    sizes = [0, 10_000, 100_000, 1_000_000] if not ctx.quick else [0, 2_000]
    per_request, kept_open = ctx.scale(200, 5), ctx.scale(2000, 20)
    now = time.time()
    stores = []
    for size in sizes:
        folder = os.path.join(ctx.workdir, "store", str(size))
        os.makedirs(folder, exist_ok=True)
        config = handler.load_config(common.write_config(os.path.join(folder, "config.ini"),
                                                         os.path.join(folder, "data"), fsync=False, dedupe=True))
        app = handler.make_app(config)
        start_response = StartResponse()
        app(make_environs(1)[0], start_response)  # creates the data folder and the schema
        db_path = os.path.join(config.data_dir, handler.STATE_FILE)
        common.progress("store: filling a seen table with %d ids" % size)
        fill_start = time.perf_counter()
        count = prefill(db_path, size, now)
        stores.append({"size": count, "config": config, "app": app, "start_response": start_response,
                       "db": db_path, "fill_s": time.perf_counter() - fill_start, "app_runs": [], "store_runs": []})
    common.progress("store: %d sizes x %d runs" % (len(sizes), ctx.runs))
    for _run in range(ctx.runs):
        for entry in stores:
            environs = make_environs(per_request)
            entry["app_runs"].append(drive(entry["app"], environs, entry["start_response"]) / per_request)
            store = handler.StateStore(entry["config"])
            try:
                ids = ["%032x" % n for n in common.COUNTER.take(kept_open)]
                start = time.perf_counter()
                for event_id in ids:
                    store.begin()
                    store.is_seen(event_id)
                    store.remember(event_id, "status", None, now)
                    store.commit()
                entry["store_runs"].append((time.perf_counter() - start) / kept_open)
            finally:
                store.close()
    base = stores[0]
    rows = []
    for entry in stores:
        rows.append({
            "size": entry["size"], "fill_s": entry["fill_s"],
            "db_mib": os.path.getsize(entry["db"]) / 1024 / 1024,
            "app_us": common.median(entry["app_runs"]) * 1e6,
            "app_ratio": common.paired_ratio(entry["app_runs"], base["app_runs"]),
            "store_us": common.median(entry["store_runs"]) * 1e6,
            "store_ratio": common.paired_ratio(entry["store_runs"], base["store_runs"]),
            "errors": entry["start_response"].bad,
        })
    try:
        contention = run_contention(ctx)
    except Exception as exc:  # noqa: BLE001 - keep the growth numbers; run.py reports the error
        sys.stderr.write(traceback.format_exc())
        contention = {"error": "%s: %s" % (type(exc).__name__, exc)}
    return {"rows": rows, "per_request": per_request, "kept_open": kept_open,
            "python": sys.version.split()[0], "executable": sys.executable,
            "filesystem": common.filesystem_of(ctx.workdir), "contention": contention}


############################################################################
# The state store under write contention
############################################################################

#: how long a contention round may take before its processes are stopped (seconds)
CONTENTION_TIMEOUT = 600


def _contention_worker(app_dir, config_path, index, first, count, barrier, results):
    """One writer: build `count` new events, wait for the others, time store_event on each.

    Runs in a fresh interpreter (multiprocessing's spawn), so the module is imported
    here, from app_dir. Puts (index, latencies, start, end, errors, first error), or
    (index, None, ..., the traceback) when it could not run at all, on `results`.
    """
    try:
        handler = load_handler(app_dir)
        config = handler.load_config(config_path)
        content_type = common.CONTENT_TYPES["form"]
        events = []
        for n in range(first, first + count):
            request = handler.decode_request(common.form_body(n), b"", content_type, config.default_charset)
            events.append(handler.normalize(request, None, "127.0.0.1", zone=config.timezone))
        # Warm up outside the timed part, as a server worker is after its first request: one event
        # into a folder of our own (first-call imports and caches), and this process's connection to
        # the shared state store, where the module keeps one per process.
        folder = os.path.dirname(config_path)
        warm = handler.load_config(common.write_config(
            os.path.join(folder, "warm-%d.ini" % index), os.path.join(folder, "warm-%d" % index),
            fsync=config.jsonl_fsync, dedupe=True))
        warm_request = handler.decode_request(common.form_body(first - 1), b"", content_type, "windows-1251")
        handler.store_event(warm, handler.normalize(warm_request, None, "127.0.0.1", zone=warm.timezone))
        open_state = getattr(handler, "_open_state", None)
        if open_state is not None:
            open_state(config)
        latencies = []
        errors, first_error = 0, None
        clock = time.perf_counter
        barrier.wait(CONTENTION_TIMEOUT)
        start = time.monotonic()
        for event in events:
            began = clock()
            try:
                handler.store_event(config, event)
            except Exception as exc:  # noqa: BLE001 - a 503 to SMSC: counted, not fatal
                errors += 1
                first_error = first_error or "%s: %s" % (type(exc).__name__, exc)
            latencies.append(clock() - began)
        end = time.monotonic()
        results.put((index, latencies, start, end, errors, first_error))
    except BaseException:  # noqa: BLE001 - tell the parent, then let the others go
        try:
            barrier.abort()
        finally:
            results.put((index, None, 0.0, 0.0, 0, traceback.format_exc()))


def _percentile(ordered, fraction):
    """Return the nearest-rank percentile of an ascending list."""
    return ordered[max(0, min(len(ordered) - 1, int(math.ceil(fraction * len(ordered))) - 1))]


def _stored_lines(data_dir):
    """Return the lines in the JSON-lines files under a data folder."""
    total = 0
    for root, _dirs, files in os.walk(data_dir):
        total += sum(common.count_lines(os.path.join(root, name)) for name in files if name.endswith(".jsonl"))
    return total


def _stored_ids(module, config):
    """Return the ids in a data folder's dedupe table, its files' tails recorded first (None when there is none)."""
    path = os.path.join(config.data_dir, module.STATE_FILE)
    if os.path.exists(path) and hasattr(module.StateStore, "record_tails"):
        with module.StateStore(config) as state:
            state.record_tails()  # the quick write leaves the last ids in the tail
    if not os.path.exists(path):
        return None
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM seen").fetchone()[0]
    finally:
        conn.close()


def contend_once(mp, module, app_dir, folder, fsync, processes, count):
    """Run one contention round in a new data folder; return its raw results.

    `module` is the handler as imported here: it creates the data folder and the
    state store first, so the processes don't measure that.
    """
    os.makedirs(folder)
    config_path = common.write_config(os.path.join(folder, "config.ini"), os.path.join(folder, "data"),
                                      fsync=fsync, dedupe=True)
    config = module.load_config(config_path)
    module.ensure_data_dir(config)
    module.StateStore(config).close()
    barrier = mp.Barrier(processes)
    results = mp.Queue()
    first = common.COUNTER.take(processes * (count + 1))[0]
    procs = [mp.Process(target=_contention_worker, daemon=True,
                        args=(app_dir, config_path, i, first + i * (count + 1) + 1, count, barrier, results))
             for i in range(processes)]
    got = []
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + CONTENTION_TIMEOUT
        while len(got) < processes:
            try:
                got.append(results.get(timeout=1))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError("store contention: a writer process %s" % (
                        "exited with status %s" % dead[0] if dead else "did not finish in time")) from None
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
        results.close()
    broken = [entry[5] for entry in got if entry[1] is None]
    if broken:
        raise RuntimeError("store contention: a writer failed:\n%s" % broken[0])
    latencies = sorted(value for entry in got for value in entry[1])
    errors = sum(entry[4] for entry in got)
    return {
        "wall": max(entry[3] for entry in got) - min(entry[2] for entry in got),
        "latencies": latencies, "errors": errors,
        "first_error": next((entry[5] for entry in got if entry[5]), None),
        "lines": _stored_lines(config.data_dir), "ids": _stored_ids(module, config),
    }


def run_contention(ctx):
    """Measure store_event under write contention: P processes at once on one data folder, dedupe on.

    Each run, every variant (handler, candidate) x (fsync off, on) gets a new data
    folder and P new processes that build their events, meet at a barrier, then
    each store `count` new events, timing every call. The values are the median
    over runs of each run's events/s and latency percentiles.
    """
    processes = ctx.scale(4, 2)
    count = ctx.scale(1500, 20)
    mp = multiprocessing.get_context("spawn")  # a fresh interpreter: each writer imports the module itself
    who = [("handler", ctx.app_dir, load_handler(ctx.app_dir))]
    if ctx.candidate:
        who.append(("candidate", ctx.candidate, load_handler(ctx.candidate, "smsc_handler_candidate")))
    variants = []
    for fsync in (False, True):
        for name, app_dir, module in who:
            variants.append({"name": "%s, fsync %s" % (name, "on" if fsync else "off"), "who": name,
                             "fsync": fsync, "app_dir": app_dir, "module": module, "runs": []})
    common.progress("store: write contention, %d processes x %d events, %d variants x %d runs"
                    % (processes, count, len(variants), ctx.runs))
    base = os.path.join(ctx.workdir, "store", "contention")
    for run in range(ctx.runs):
        for variant in variants:
            folder = os.path.join(base, "%s-fsync%s-run%d" % (variant["who"], "on" if variant["fsync"] else "off",
                                                              run))
            raw = contend_once(mp, variant["module"], variant["app_dir"], folder, variant["fsync"], processes, count)
            lat = raw["latencies"]
            accepted = len(lat) - raw["errors"]
            variant["runs"].append({
                "rate": len(lat) / raw["wall"] if raw["wall"] > 0 else None,
                "p50_ms": _percentile(lat, 0.50) * 1e3, "p99_ms": _percentile(lat, 0.99) * 1e3,
                "max_ms": lat[-1] * 1e3, "over_100ms": sum(1 for value in lat if value > 0.1),
                "errors": raw["errors"], "first_error": raw["first_error"],
                "lines": raw["lines"], "ids": raw["ids"], "lost": accepted - raw["lines"],
            })
    rows = []
    for variant in variants:
        runs = variant["runs"]

        def med(key, runs=runs):
            return common.median([entry[key] for entry in runs])

        rows.append({
            "name": variant["name"], "who": variant["who"], "fsync": variant["fsync"],
            "processes": processes, "events_per_process": count, "expected": processes * count,
            "rate": med("rate"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "max_ms": med("max_ms"),
            "over_100ms": med("over_100ms"),
            "rate_runs": [entry["rate"] for entry in runs], "max_ms_runs": [entry["max_ms"] for entry in runs],
            "p99_ms_runs": [entry["p99_ms"] for entry in runs],
            "over_100ms_runs": [entry["over_100ms"] for entry in runs],
            "lines_runs": [entry["lines"] for entry in runs], "ids_runs": [entry["ids"] for entry in runs],
            "errors": sum(entry["errors"] for entry in runs),
            "first_error": next((entry["first_error"] for entry in runs if entry["first_error"]), None),
            "lost": sum(entry["lost"] for entry in runs),
        })
    return {"processes": processes, "events_per_process": count, "start_method": "spawn", "rows": rows}
