"""Turn the sections' results into the Markdown report (bench/RESULTS.md)."""

#: everything after this line in an existing report is kept when run.py rewrites it
KEEP_MARKER = "<!-- run.py keeps everything below this line when it rewrites the file -->"


def _f(value, digits=1, suffix=""):
    if value is None:
        return "—"
    if isinstance(value, float):
        return ("{:,.%df}" % digits).format(value) + suffix
    return f"{value:,}" + suffix


def _count(value):
    """A count, or the median of counts (x.5 when the runs are even in number)."""
    return _f(int(value) if isinstance(value, float) and value.is_integer() else value, 1)


def _x(value):
    return "—" if value is None else "%.2f×" % value


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


############################################################################
# Targets
############################################################################


def targets(results):
    """Return [(target, measured, verdict)] for the targets of issues 6 and 16."""
    out = []

    def verdict(ok):
        return "met" if ok else "**MISSED**"

    ip = results.get("inprocess")
    if ip:
        rows = {row["name"]: row for row in ip["rows"]}
        for who in ("handler", "candidate"):
            for case, floor in (("form, fsync off, dedupe off", 30000), ("form, fsync off, dedupe on", 10000)):
                row = rows.get(who + " " + case)
                if row:
                    out.append(("%sin-process %s ≥ %s events/s" % ("candidate: " if who == "candidate" else "", case,
                                                                     f"{floor:,}"),
                                "%s/s" % _f(row["rate"], 0), verdict(row["rate"] >= floor)))
    store = results.get("store")
    if store and len(store["rows"]) > 1:
        last = store["rows"][-1]
        out.append(("per-event cost flat as the store grows to %s ids (≤ 1.5× the empty store)"
                    % _f(last["size"]),
                    "app path %s, store alone %s" % (_x(last["app_ratio"]), _x(last["store_ratio"])),
                    verdict((last["app_ratio"] or 99) <= 1.5 and (last["store_ratio"] or 99) <= 1.5)))
    cgi = results.get("cgi")
    if cgi and cgi.get("variants"):
        rows = {row["name"]: row for row in cgi["variants"]}
        # issue 16's targets (issue 6 asked for 2.5x and 3x)
        for name, limit in (("handler.cgi: fsync on, dedupe off", 1.5),
                            ("handler.cgi: default config (dedupe on, fsync on)", 1.9),
                            ("candidate handler.cgi: fsync on, dedupe off", 1.5),
                            ("candidate handler.cgi: default config (dedupe on, fsync on)", 1.9)):
            row = rows.get(name)
            if row:
                label = name.split(": ", 1)[1] if not name.startswith("candidate") else \
                    "candidate: " + name.split(": ", 1)[1]
                out.append(("CGI %s ≤ %.1f× `python3 -c pass` wall" % (label, limit),
                            "%s (%s ms vs %s ms)" % (_x(row["ratio"]), _f(row["wall_ms"], 1),
                                                      _f(rows["python3 -c pass"]["wall_ms"], 1)),
                            verdict(row["ratio"] <= limit)))
        imports = cgi.get("importtime", {}).get("configs", {})
        for label, entry in imports.items():
            out.append(("CGI %s: no module the request did not need" % label,
                        ", ".join(entry["unneeded"]) or "none", verdict(not entry["unneeded"])))
        for conc, rows_c in sorted(cgi.get("php_concurrency", {}).items(), key=lambda item: int(item[0])):
            for mine in rows_c:
                if "handler.cgi" in mine["name"]:
                    out.append(("CGI %s latency below the PHP-CGI peer's at %s concurrent"
                                % ("candidate" if mine["name"].startswith("candidate") else "handler", conc),
                                "%s of PHP's" % _x(mine["ratio_vs_php"]),
                                verdict(mine["ratio_vs_php"] is not None and mine["ratio_vs_php"] < 1)))
    servers = results.get("servers")
    if servers:
        for row in servers["rows"]:
            if row.get("rps") is None or not row["app"].startswith(("handler, fsync", "candidate, fsync")):
                continue
            if row["server"].startswith("uWSGI"):
                if row.get("vs_minimal") is not None:
                    out.append(("uWSGI %s ≥ 0.8× minimal app (same fsync)" % row["app"],
                                "%s req/s (by server CPU per request: %s)"
                                % (_x(row["vs_minimal"]), _x(row.get("cpu_vs_minimal"))),
                                verdict(row["vs_minimal"] >= 0.8)))
                if row.get("vs_hello") is not None:
                    out.append(("uWSGI %s ≥ 0.5× hello world" % row["app"],
                                "%s req/s (by server CPU per request: %s)"
                                % (_x(row["vs_hello"]), _x(row.get("cpu_vs_hello"))),
                                verdict(row["vs_hello"] >= 0.5)))
        for row in servers["rows"]:
            for who in ("handler", "candidate"):
                if row["app"].startswith("Flask") and row.get(who + "_vs_this") is not None:
                    out.append(("gunicorn: %s ahead of the %s" % (who, row["app"]),
                                "%s at %s of Flask's req/s" % (who, _x(row[who + "_vs_this"])),
                                verdict(row[who + "_vs_this"] > 1.0)))
    return out


############################################################################
# Sections
############################################################################


def _python(section):
    """Return 'Python 3.11.2 (`/usr/bin/python3`)' for a section's results (older results: no path)."""
    text = "Python %s" % section.get("python", "?")
    return text + (" (`%s`)" % section["executable"] if section.get("executable") else "")


def render_inprocess(ip):
    lines = ["## In-process: events/s through the WSGI callable", "",
             "%s, data on %s. Each run drives every case in 10 chunks, round-robin chunk by chunk; "
             "the value is the "
             "median of the runs; ratios are paired run by run." % (_python(ip), ip["filesystem"]), ""]
    rows = []
    for row in ip["rows"]:
        rows.append([row["name"], row["role"], _f(row["events"]), _f(row["rate"], 0), _f(row["us_per_event"], 1),
                     "%s–%s" % (_f(row["min"], 0), _f(row["max"], 0)), _x(row["vs_minimal"]), _x(row["vs_hello"]),
                     _x(row.get("vs_handler")) if row.get("vs_handler") else "", row["errors"] or ""])
    lines.append(_table(["case", "role", "events/run", "events/s", "µs/event", "runs range", "vs minimal",
                         "vs hello", "candidate vs handler", "non-200"], rows))
    lines += ["", "### Where one form callback's time goes (µs per call, each step timed alone)", ""]
    lines.append(_table(["step", "µs"], [[k, _f(v, 1) if isinstance(v, float) else v]
                                         for k, v in ip["breakdown"].items()]))
    for key, title in (("profile_form", "fsync off, dedupe off"), ("profile_form_dedupe", "fsync off, dedupe on")):
        lines += ["", "### cProfile, form callback, %s (per event, top own time; cProfile inflates)" % title, ""]
        lines.append(_table(["function", "calls/event", "own µs", "cumulative µs"],
                            [[f, _f(c, 1), _f(t, 1), _f(cu, 1)] for f, c, t, cu in ip[key]]))
    return "\n".join(lines)


def render_store(store):
    lines = ["## State store growth (dedupe on, fsync off, form callbacks)", "",
             "One data folder per size, filled directly with `executemany`, measured round-robin. "
             "\"app path\" = the whole WSGI request (%d per run); \"store alone\" = "
             "BEGIN/SELECT/INSERT/COMMIT on one open connection "
             "(%d per run). %s on %s." % (store["per_request"], store["kept_open"],
                                           _python(store) + ", data" if store.get("python") else "Data",
                                           store["filesystem"]), ""]
    rows = [[_f(r["size"]), _f(r["db_mib"], 1), _f(r["fill_s"], 1), _f(r["app_us"], 0), _x(r["app_ratio"]),
             _f(r["store_us"], 1), _x(r["store_ratio"]), r["errors"] or ""] for r in store["rows"]]
    lines.append(_table(["ids in store", "db MiB", "fill s", "app path µs/event", "vs empty", "store alone µs/event",
                         "vs empty", "non-200"], rows))
    contention = store.get("contention")
    if contention:
        lines += ["", render_contention(contention)]
    return "\n".join(lines)


def render_contention(cont):
    """The store under write contention: processes calling store_event at once on one data folder."""
    lines = ["### Write contention: %d processes storing at once (dedupe on)" % cont.get("processes", 0), ""]
    if cont.get("error"):
        return "\n".join(lines + ["Not measured: %s." % cont["error"]])
    lines += ["How long one callback waits while others write: %d processes each call `store_event` %s times on "
              "one shared data folder (every event new), released together by a barrier with their events already "
              "built; latency is one call, each value the median over runs of that run's figure, and the stored "
              "lines must equal the events accepted." % (cont["processes"], _f(cont["events_per_process"])), ""]
    rows = []
    for row in cont["rows"]:
        stored = "%s / %s" % (_f(min(row["lines_runs"])), _f(row["expected"]))
        if row["lost"]:
            stored += " **%d %s**" % (abs(row["lost"]), "LOST" if row["lost"] > 0 else "EXTRA")
        errors = ""
        if row["errors"]:
            errors = ("%d %s" % (row["errors"], row["first_error"] or "")).strip()
        per_run = " ".join(("%.0f" if value >= 10 else "%.1f") % value for value in row["max_ms_runs"])
        rows.append([row["name"], _f(row["rate"], 0), _f(row["p50_ms"], 2), _f(row["p99_ms"], 2),
                     _f(row["max_ms"], 1), _count(row["over_100ms"]), per_run, stored, errors])
    lines.append(_table(["variant", "events/s", "p50 ms", "p99 ms", "max ms", "events > 100 ms", "per-run max ms",
                         "stored lines (fewest in a run) / expected", "store_event errors"], rows))
    return "\n".join(lines)


def render_cgi(cgi):
    lines = ["## CGI: one process per request", "",
             "Interpreter `%s` (%s); `handler.cgi`'s `#!/usr/bin/env python3` on Apache's PATH finds `%s`. "
             "Each request spawns the script with a CGI environment and the callback on stdin; wall = spawn to "
             "exit, CPU = user+sys of the child (`os.wait4`), RSS = its peak as GNU `time` reports it. "
             "Variants are interleaved request "
             "by request; the ratio is the median of per-run ratios to `python3 -c pass`. Data on %s."
             % (cgi["python"], cgi.get("python_version"), cgi.get("shebang_python"), cgi["filesystem"]), ""]
    if cgi.get("php_skipped"):
        lines += ["PHP peer skipped: %s." % cgi["php_skipped"], ""]
    rows = []
    for row in cgi["variants"]:
        rows.append([row["name"], row["role"], _f(row["wall_ms"], 2), _x(row["ratio"]), _f(row["cpu_ms"], 2),
                     _x(row["cpu_ratio"]), _f(row["peak_rss_mib"], 1),
                     " ".join("%.1f" % w for w in row["wall_runs_ms"]),
                     (str(row["errors"]) + " " + (row["first_error"] or "")).strip() if row["errors"] else ""])
    lines.append(_table(["variant", "role", "wall ms", "vs -c pass", "CPU ms", "CPU vs -c pass", "peak RSS MiB",
                         "per-run wall ms", "errors"], rows))
    if cgi.get("rss_note"):
        lines += ["", cgi["rss_note"] + "."]
    if cgi.get("current_python_pass_ms"):
        exe, ms = cgi["current_python_pass_ms"]
        lines += ["", "For comparison, `%s -c pass` (the `python3` first on this shell's PATH): %.1f ms." % (exe, ms)]
    imports = cgi.get("importtime")
    if imports:
        lines += ["", "### `-X importtime` of a form status callback (median of runs, µs)", "",
                  "Modules beyond what `python3 -c pass` already loads (%d modules there)."
                  % len(imports["baseline_modules"])]
        for label, entry in imports["configs"].items():
            lines += ["", "**%s**: %d modules, %s µs of imports beyond the bare interpreter. Not needed by this "
                      "request: %s." % (label, len(entry["modules_beyond_interpreter"]),
                                        _f(entry["import_us_beyond_interpreter"]),
                                        ", ".join("`%s`" % m for m in entry["unneeded"]) or "none"), ""]
            lines.append(_table(["module", "self µs", "cumulative µs", "imported by", "what for"],
                                [["`%s`" % n, _f(s), _f(c), "`%s`" % p if not p.startswith("(") else p, w]
                                 for n, s, c, p, w in entry["top_self"]]))
            lines += ["", "Top-level imports (cumulative µs): " +
                      ", ".join("`%s` %s" % (n, _f(c)) for n, c in entry["top_level"])]
    costs = cgi.get("import_costs")
    if costs:
        lines += ["", "### What imports add to a CGI process (ms over `python3 -c pass`, median of paired runs)", "",
                  "`python3 -c pass` = %.2f ms wall, %.2f ms CPU. Each row is `python3 -c \"import ...\"` (with the "
                  "handler's folder on sys.path) minus `-c pass`, measured in the same rounds. CPU (user+sys of the "
                  "child) is steadier than wall on a busy machine; values within ±0.5 ms of zero are noise."
                  % (costs["pass_ms"], costs["pass_cpu_ms"]), ""]
        lines.append(_table(["import", "wall ms", "CPU ms"],
                            [["`%s`" % r["module"], _f(r["wall_ms"], 2), _f(r["cpu_ms"], 2)] for r in costs["rows"]]))
        if costs.get("sets"):
            lines += ["", "The modules a form callback imports (the top of its `-X importtime` tree: %s)%s:"
                      % (costs["sets"][0]["imports"], ", and the same without the CGI gateway and/or configparser"
                         if len(costs["sets"]) > 1 else ""), ""]
            lines.append(_table(["import set", "wall ms", "CPU ms"],
                                [[r["module"], _f(r["wall_ms"], 2), _f(r["cpu_ms"], 2)] for r in costs["sets"]]))
    conc = cgi.get("php_concurrency")
    if conc:
        lines += ["", "### Handler vs the PHP-CGI peer at 1 and 8 concurrent requests", "",
                  "%s. Each thread spawns requests back to back; latency = median per request; "
                  "ratio = median of per-run latency ratios to `handler.php`." % (cgi.get("php_version") or "php-cgi"),
                  ""]
        rows = []
        for level, entries in sorted(conc.items(), key=lambda item: int(item[0])):
            for entry in entries:
                rows.append([level, entry["name"], _f(entry["latency_ms"], 2), _f(entry["rps"], 0),
                             _x(entry["ratio_vs_php"])])
        lines.append(_table(["concurrent", "variant", "latency ms", "requests/s", "latency vs handler.php"], rows))
    return "\n".join(lines)


def render_servers(servers):
    lines = ["## Servers: wrk, %d connections, %d threads, %d s per run" % (
        servers["connections"], servers["threads"], servers["duration_s"]), ""]
    versions = servers.get("versions") or {}
    if versions:
        lines += ["Versions: " + ", ".join("%s %s" % (k, v) for k, v in versions.items() if v) + ".", ""]
    lines += ["Each app runs in its own server with %d worker processes (gunicorn: sync workers; uWSGI: master + "
              "%d processes on a TCP socket behind one nginx worker). Every row is measured once per run, "
              "round-robin; ratios are paired run by run. Every request is a new callback. The targets table also "
              "gives each ratio by server CPU per request (baseline's CPU / this row's), which moves less when "
              "other work shares the machine. "
              "\"server CPU\" = user+system "
              "time of the server's processes (nginx included for uWSGI) during the run, per request." % (
                  servers["workers"], servers["workers"]), ""]
    for part, reason in servers.get("skipped", {}).items():
        lines.append("- skipped %s: %s" % (part, reason))
    rows = []
    for row in servers["rows"]:
        if row.get("rps") is None:
            rows.append([row["name"], row["role"], "skipped: %s" % (row.get("skip") or "no runs")] + [""] * 8)
            continue
        extra = " / ".join(_x(row[k]) for k in ("handler_vs_this", "candidate_vs_this", "vs_handler")
                           if row.get(k) is not None)
        errors = ""
        if row["non2xx"] or row["socket_errors"]:
            errors = "%d non-2xx, %d socket" % (row["non2xx"], row["socket_errors"])
        rows.append([row["name"], row["role"], _f(row["rps"], 0), _f(row["p50_ms"], 2), _f(row["p99_ms"], 2),
                     _f(row.get("server_cpu_us"), 0),
                     _x(row.get("vs_minimal")), _x(row.get("vs_hello")), extra,
                     " ".join(str(r) for r in row["rps_runs"]), errors])
    lines.append(_table(["server: app", "role", "req/s", "p50 ms", "p99 ms", "server CPU µs/req",
                         "vs minimal (same fsync)",
                         "vs hello", "handler (/ candidate) vs this; candidate vs handler", "per-run req/s", "errors"],
                        rows))
    return "\n".join(lines)


def render(results, header, analysis=None):
    """Return the whole report as Markdown."""
    parts = [header]
    checks = targets(results)
    if checks:
        parts.append("## Targets (issues 6 and 16)\n\n" + _table(["target", "measured", "verdict"], checks))
    if results.get("inprocess"):
        parts.append(render_inprocess(results["inprocess"]))
    if results.get("store"):
        parts.append(render_store(results["store"]))
    if results.get("cgi"):
        parts.append(render_cgi(results["cgi"]))
    if results.get("servers"):
        parts.append(render_servers(results["servers"]))
    if results.get("relay"):
        import relay  # bench/relay.py (issue 14)
        parts.append(relay.render(results["relay"], ""))
    if results.get("errors"):
        parts.append("## Sections that failed\n\n" + "\n".join("- %s: %s" % kv for kv in results["errors"].items()))
    parts.append(KEEP_MARKER)
    text = "\n\n".join(parts) + "\n"
    if analysis:
        text += analysis if analysis.startswith("\n") else "\n" + analysis
    return text
