"""CGI: one process per request, as Apache runs handler.cgi on a shared host.

Every variant is a real process started with a CGI environment and the callback
on stdin; wall time is measured from spawn to exit, CPU time and peak RSS come
from the kernel (``os.wait4``). Variants are interleaved request by request, so a
noisy moment on the machine hits all of them alike, and ratios are taken run by
run against ``python3 -c pass`` measured in the same round.

Also here: the ``-X importtime`` profile of a form status callback (which modules
the request loads, and whether it needed them), and the PHP-CGI peer at 1 and 8
concurrent requests.
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time

import common

#: modules a stored form status callback (200, no hook) must not load
NEVER_NEEDED = {
    "xml", "xml.parsers", "xml.parsers.expat", "pyexpat", "subprocess", "signal", "logging",
    "traceback", "linecache", "tokenize", "ast", "argparse", "shlex", "glob", "threading",
    "selectors", "socket", "ipaddress", "email", "http.client", "urllib", "urllib.parse",
    "zoneinfo", "textwrap", "gettext", "inspect", "dis", "base64", "tempfile", "random",
    # issue 16: the CGI gateway and the config reader are the module's own
    "re", "enum", "configparser", "wsgiref", "wsgiref.handlers", "wsgiref.headers", "wsgiref.util",
    "http", "json", "hashlib", "_hashlib", "encodings.utf_8_sig",
}
#: modules only dedupe (or a hook's outcome) needs: sqlite3 and what it imports
STATE_ONLY = {"sqlite3", "sqlite3.dbapi2", "_sqlite3", "datetime", "_datetime", "math", "collections.abc",
              "atexit", "functools", "_functools", "collections", "_collections", "itertools", "keyword",
              "operator", "reprlib", "types", "warnings"}  # warnings: sqlite3 on 3.12+

#: what each module is for (the importtime table also shows which module imported it)
WHY = {
    "smsc_handler": "the module itself (compiled bytecode)",
    "json": "JSON (stdlib package; its decoder compiles regexes at import)",
    "_json": "JSON's C speedups",
    "re": "regular expressions", "enum": "enum (used by re and http)",
    "functools": "used by re/enum", "collections": "used by functools",
    "hashlib": "hashes through OpenSSL", "_hashlib": "OpenSSL (loads libcrypto)",
    "_md5": "built-in md5 (no OpenSSL)", "_sha1": "built-in sha1", "_blake2": "built-in blake2",
    "hmac": "constant-time compare (imports hashlib)",
    "configparser": "reading config.ini (the module now reads plain files itself)",
    "encodings.utf_8_sig": "decoding config.ini with a BOM (before issue 16)",
    "atexit": "closing the state store when the process ends",
    "datetime": "dates and time zones", "_strptime": "datetime.strptime", "calendar": "used by _strptime",
    "locale": "used by _strptime",
    "http": "http.HTTPStatus (reason phrases)",
    "wsgiref.handlers": "CGIHandler (the CGI gateway before issue 16)",
    "wsgiref.headers": "part of wsgiref (compiles a regex at import)",
    "fcntl": "flock on the JSON-lines file",
    "encodings.cp1251": "the windows-1251 codec (SMSC's default charset)",
    "sqlite3": "dedupe state store", "_sqlite3": "SQLite's C part (loads libsqlite3)",
    "logging": "logging (refusals and warnings only)", "subprocess": "the hook",
    "pyexpat": "the XML parser", "__future__": "`from __future__ import annotations`",
}


############################################################################
# One CGI request
############################################################################


def cgi_environ(script, config=None, body=b"", content_type="application/x-www-form-urlencoded", extra=None):
    """Return the environment Apache's mod_cgi gives a script (no PYTHON* variables)."""
    env = {
        "PATH": common.SYSTEM_PATH,
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "smsc-bench",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": "POST",
        "REQUEST_URI": "/" + os.path.basename(script),
        "SCRIPT_NAME": "/" + os.path.basename(script),
        "SCRIPT_FILENAME": script,
        "QUERY_STRING": "",
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_USER_AGENT": "SMSC",
        "REDIRECT_STATUS": "200",  # php-cgi refuses to run without it (cgi.force_redirect)
    }
    if config:
        env["SMSC_HANDLER_CONFIG"] = config
    if extra:
        env.update(extra)
    return env


def spawn(argv, env, body, stderr=None, cwd=None):
    """Run one CGI process; return (wall s, cpu s, peak RSS KiB, exit code, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr if stderr is not None else subprocess.DEVNULL,
                            env=env, cwd=cwd)
    try:
        proc.stdin.write(body)  # callbacks are far below the pipe buffer
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out = proc.stdout.read()
    proc.stdout.close()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if hasattr(os, "waitstatus_to_exitcode"):
        proc.returncode = os.waitstatus_to_exitcode(status)  # novermin (3.9+, guarded)
    else:
        proc.returncode = status >> 8
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, proc.returncode, out


def answered_ok(out):
    """Tell whether CGI output is a 200 answering OK (a missing Status line means 200)."""
    head, _, body = out.partition(b"\r\n\r\n")
    if not _:
        head, _, body = out.partition(b"\n\n")
    status = [line for line in head.splitlines() if line.lower().startswith(b"status:")]
    return (not status or status[0].split()[1:2] == [b"200"]) and body.strip() == b"OK"


class Variant:
    """One thing to run as CGI: argv, environment and how to make each request's body."""

    def __init__(self, name, argv, config=None, role="", body=None, check=True, extra_env=None,
                 script=None, cwd=None):
        self.name = name
        self.argv = argv
        self.config = config
        self.role = role
        self.body = body or (lambda: b"")
        self.check = check
        self.extra_env = extra_env
        self.script = script or argv[-1]
        self.cwd = cwd
        self.samples = []  # per run: list of (wall, cpu, rss)
        self.errors = 0
        self.first_error = None
        self.rss_kib = None

    def run_once(self, stderr=None, prefix=()):
        body = self.body()
        env = cgi_environ(self.script, self.config, body, extra=self.extra_env)
        wall, cpu, rss, code, out = spawn(list(prefix) + self.argv, env, body, stderr, self.cwd)
        if self.check and (code != 0 or not answered_ok(out)):
            self.errors += 1
            if self.first_error is None:
                self.first_error = "exit %s, output %r" % (code, out[:300])
        return wall, cpu, rss


############################################################################
# Setting up the variants
############################################################################


def _body_maker(secret=common.SECRET):
    def make():
        (n,) = common.COUNTER.take()
        return common.form_body(n, secret)
    return make


def build_variants(ctx, with_cgi=True, with_php=True):
    """Return the CGI variants for this run (skipping what this machine lacks)."""
    py = ctx.python
    work = os.path.join(ctx.workdir, "cgi")
    app = common.copy_app(ctx.app_dir, os.path.join(work, "app"), python=py)
    cold = common.copy_app(ctx.app_dir, os.path.join(work, "app-no-pycache"))
    apps = os.path.join(work, "apps")
    shutil.copytree(common.APPS, apps)
    subprocess.run([py, "-m", "compileall", "-q", apps], check=True, stdout=subprocess.DEVNULL)
    data = os.path.join(work, "data")
    configs = {}
    # The candidate gets folders of its own: a module that changes the state store's
    # schema must not run on a store the other version set up.
    for name, fsync, dedupe in (("fsync", True, False), ("default", True, True), ("nofsync", False, False),
                                ("candidate-fsync", True, False), ("candidate-default", True, True)):
        folder = os.path.join(data, name)
        configs[name] = common.write_config(os.path.join(work, name + ".ini"), folder, fsync=fsync, dedupe=dedupe)
    handler = os.path.join(app, "handler.cgi")
    form = _body_maker()
    variants = [
        Variant("python3 -c pass", [py, "-c", "pass"], role="baseline", body=form, check=False,
                script=os.path.join(app, "handler.cgi")),
    ]
    target_a = Variant("handler.cgi: fsync on, dedupe off", [py, handler], configs["fsync"],
                       role="target A (<= 1.5x)", body=form)
    if with_cgi:
        variants += [
            Variant("python3 -I -S -c pass", [py, "-I", "-S", "-c", "pass"], role="info", body=form,
                    check=False, script=handler),
            Variant("hello.cgi (one write)", [py, os.path.join(apps, "hello.cgi")], role="baseline", body=form),
            Variant("hello WSGI under wsgiref CGIHandler", [py, os.path.join(apps, "hello_wsgiref.cgi")],
                    role="baseline", body=form),
            Variant("minimal parse+append (wsgiref CGI, fsync on)", [py, os.path.join(apps, "minimal_append.cgi")],
                    role="baseline", body=form,
                    extra_env={"MINIMAL_DATA_DIR": os.path.join(data, "minimal"), "MINIMAL_FSYNC": "yes"}),
            target_a,
            Variant("handler.cgi: default config (dedupe on, fsync on)", [py, handler], configs["default"],
                    role="target B (<= 1.9x)", body=form),
            Variant("handler.cgi: fsync off, dedupe off", [py, handler], configs["nofsync"], role="info", body=form),
            Variant("handler.cgi: fsync on, dedupe off, no bytecode cache",
                    [py, os.path.join(cold, "handler.cgi")], configs["fsync"], role="info", body=form,
                    extra_env={"PYTHONDONTWRITEBYTECODE": "1"}),
        ]
        if os.access(handler, os.X_OK):
            variants.append(Variant("handler.cgi run by its #! line (env python3 on Apache's PATH)", [handler],
                                    configs["fsync"], role="info", body=form))
    else:
        variants.append(target_a)
    candidate = None
    if ctx.candidate:
        candidate_app = common.copy_app(ctx.candidate, os.path.join(work, "candidate-app"), python=py)
        candidate = os.path.join(candidate_app, "handler.cgi")
        variants.append(Variant("candidate handler.cgi: fsync on, dedupe off", [py, candidate],
                                configs["candidate-fsync"], role="candidate A", body=form))
        if with_cgi:
            variants.append(Variant("candidate handler.cgi: default config (dedupe on, fsync on)", [py, candidate],
                                    configs["candidate-default"], role="candidate B", body=form))
    php = common.which("php-cgi")
    if with_php and php:
        peer_env = {"PEER_DATA_DIR": os.path.join(data, "php"), "PEER_SECRET": common.SECRET, "PEER_FSYNC": "yes"}
        os.makedirs(peer_env["PEER_DATA_DIR"], exist_ok=True)
        hello_php = os.path.join(apps, "hello.php")
        handler_php = os.path.join(apps, "handler.php")
        variants += [
            Variant("php-cgi hello.php", [php, hello_php], role="php baseline", body=form, script=hello_php),
            Variant("php-cgi handler.php (md5, append, fsync on)", [php, handler_php], role="php peer",
                    body=form, extra_env=peer_env, script=handler_php),
        ]
    return variants, {"app": app, "apps": apps, "configs": configs, "php": php, "handler": handler,
                      "candidate": candidate}


############################################################################
# Measuring
############################################################################


def measure_sequential(variants, runs, per_run, warmup=2):
    """Interleave the variants request by request; keep each run's samples apart."""
    for variant in variants:
        for _ in range(warmup):
            variant.run_once()
    for _run in range(runs):
        batch = {variant.name: [] for variant in variants}
        for _ in range(per_run):
            for variant in variants:
                batch[variant.name].append(variant.run_once())
        for variant in variants:
            variant.samples.append(batch[variant.name])


def summarize(variants, baseline_name="python3 -c pass"):
    """Return per-variant medians and ratios paired run by run with the baseline."""
    base = next(v for v in variants if v.name == baseline_name)
    base_walls = [common.median([s[0] for s in run]) for run in base.samples]
    rows = []
    for variant in variants:
        walls = [common.median([s[0] for s in run]) for run in variant.samples]
        cpus = [common.median([s[1] for s in run]) for run in variant.samples]
        rows.append({
            "name": variant.name,
            "role": variant.role,
            "wall_ms": common.median(walls) * 1000,
            "cpu_ms": common.median(cpus) * 1000,
            "wall_runs_ms": [round(w * 1000, 2) for w in walls],
            "peak_rss_mib": variant.rss_kib / 1024 if variant.rss_kib else None,
            "ratio": common.paired_ratio(walls, base_walls),
            "cpu_ratio": common.paired_ratio(cpus, [common.median([s[1] for s in run]) for run in base.samples]),
            "errors": variant.errors,
            "first_error": variant.first_error,
            "requests": sum(len(run) for run in variant.samples),
        })
    return rows


def measure_rss(variants, runs):
    """Set each variant's peak RSS (KiB, median of runs) as GNU time reports it; False without it.

    The kernel's ru_maxrss of a child started by this (large) Python process
    includes the parent's RSS, inherited across fork and exec; /usr/bin/time is a
    small parent, so its figure is the CGI process's own.
    """
    gnu_time = "/usr/bin/time"
    if not os.access(gnu_time, os.X_OK):
        return False
    for variant in variants:
        values = []
        for _ in range(runs):
            with tempfile.NamedTemporaryFile("r") as out:
                variant.run_once(prefix=(gnu_time, "-f", "%M", "-o", out.name))
                text = out.read().strip().splitlines()
            if text and text[-1].isdigit():
                values.append(int(text[-1]))
        variant.rss_kib = common.median(values)
    return True


def import_costs(ctx, app, runs, per_run, request_modules=()):
    """Measure the wall and CPU time imports add to a process, against `python3 -c pass`.

    Single modules one by one, then the set of modules a form callback imports
    (the top level of its -X importtime tree), whole and without the CGI gateway
    (wsgiref.handlers) and/or configparser: what replacing those would save.
    """
    prefix = "import sys; sys.path.insert(0, %r); " % app
    singles = ["re", "json", "wsgiref.handlers", "configparser", "datetime", "_strptime", "http", "hashlib",
               "hmac", "_md5, _blake2", "sqlite3", "_sqlite3", "logging", "subprocess", "smsc_handler"]
    codes = {"pass": "pass"}
    for module in singles:
        codes[module] = prefix + "import " + module
    sets = {}
    modules = [m for m in request_modules if not m.startswith("encodings.")]
    if modules:
        sets = {"all modules a form callback imports": modules}
        for left_out in ("wsgiref.handlers", "configparser"):  # what the module used before issue 16
            if left_out in modules:
                sets["  without " + left_out] = [m for m in modules if m != left_out]
        if "wsgiref.handlers" in modules and "configparser" in modules:
            sets["  without wsgiref.handlers and configparser"] = [
                m for m in modules if m not in ("wsgiref.handlers", "configparser")]
        for label, names in sets.items():
            codes[label] = prefix + "import " + ", ".join(names)
    variants = {key: Variant(key, [ctx.python, "-c", code], role="import", check=False, script=app)
                for key, code in codes.items()}
    measure_sequential(list(variants.values()), runs, per_run, warmup=1)

    def per_run(key, index):
        return [common.median([s[index] for s in run]) for run in variants[key].samples]

    def delta(key, index):
        return common.median([(a - b) * 1000 for a, b in zip(per_run(key, index), per_run("pass", index))])

    def row(key, names=None):
        return {"module": key, "imports": ", ".join(names) if names else key,
                "wall_ms": delta(key, 0), "cpu_ms": delta(key, 1)}

    return {"pass_ms": common.median(per_run("pass", 0)) * 1000,
            "pass_cpu_ms": common.median(per_run("pass", 1)) * 1000,
            "rows": [row(m) for m in singles], "sets": [row(k, v) for k, v in sets.items()]}


def measure_concurrent(variant, concurrency, total):
    """Run `total` requests of a variant with `concurrency` in flight; return (median latency s, req/s)."""
    latencies = []
    lock = threading.Lock()
    left = [total]

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            wall, _cpu, _rss = variant.run_once()
            with lock:
                latencies.append(wall)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return common.median(latencies), total / elapsed


############################################################################
# -X importtime
############################################################################


def parse_importtime(text):
    """Parse `-X importtime` output into [(name, self us, cumulative us, depth, parent)].

    The output lists a module after everything it imported, one nesting level
    deeper: a module's parent is the next line one level up (None at the top).
    """
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cumulative, name = line.split(":", 1)[1].split("|", 2)
        name = name[1:]  # one space after the bar, then two per nesting level
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append([name.strip(), int(self_us), int(cumulative), depth, None])
    for index, row in enumerate(rows):
        for later in rows[index + 1:]:
            if later[3] < row[3]:
                row[4] = later[0]
                break
    return [tuple(row) for row in rows]


def importtime_profile(py, argv, make_env_body, runs):
    """Run argv `runs` times under -X importtime; return {name: (median self us, median cum us, depth)}.

    make_env_body() gives each run its (environment, body): with dedupe on, a
    repeated callback would take the duplicate path, so each run gets a new one.
    """
    collected = {}
    for _ in range(runs):
        env, body = make_env_body()
        with tempfile.TemporaryFile() as err:
            spawn([py, "-X", "importtime"] + argv, env, body, stderr=err)
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        for name, self_us, cumulative, depth, parent in parse_importtime(text):
            entry = collected.setdefault(name, ([], [], depth, parent))
            entry[0].append(self_us)
            entry[1].append(cumulative)
    return {name: (common.median(selfs), common.median(cums), depth, parent)
            for name, (selfs, cums, depth, parent) in collected.items()}


def importtime_section(ctx, setup, runs):
    """Profile the imports of a form status callback for the two target configs."""
    py = ctx.python
    handler = setup["handler"]
    baseline = importtime_profile(py, ["-c", "pass"], lambda: (cgi_environ(handler), b""), runs)
    result = {"baseline_modules": sorted(baseline), "configs": {}}
    cases = [("fsync on, dedupe off", handler, setup["configs"]["fsync"], False),
             ("default config (dedupe on)", handler, setup["configs"]["default"], True)]
    if setup.get("candidate"):
        cases += [("candidate, fsync on, dedupe off", setup["candidate"], setup["configs"]["candidate-fsync"], False),
                  ("candidate, default config (dedupe on)", setup["candidate"], setup["configs"]["candidate-default"],
                   True)]
    for label, script, config, dedupe in cases:

        def make_env_body(config=config, script=script):
            (n,) = common.COUNTER.take()
            body = common.form_body(n)
            return cgi_environ(script, config, body), body

        profile = importtime_profile(py, [script], make_env_body, runs)
        extra = [name for name in profile if name not in baseline]
        unneeded = [name for name in extra if name in NEVER_NEEDED or (not dedupe and name in STATE_ONLY)
                    or name.startswith(("xml.", "logging.", "email."))]
        top = sorted(extra, key=lambda name: -profile[name][0])[:20]
        result["configs"][label] = {
            "modules_beyond_interpreter": extra,
            "import_us_beyond_interpreter": sum(profile[name][0] for name in extra),
            "top_self": [(name, profile[name][0], profile[name][1],
                          profile[name][3] or "(the script, or a function at run time)", WHY.get(name, ""))
                         for name in top],
            "top_level": [(name, profile[name][1]) for name in extra if profile[name][2] == 0],
            "unneeded": unneeded,
        }
    return result


############################################################################
# The section
############################################################################


def run(ctx, with_cgi=True, with_php=True):
    """Measure the CGI variants (and the PHP peer); return the section's results."""
    result = {"python": ctx.python, "python_version": common.tool_version([ctx.python, "--version"]),
              "filesystem": common.filesystem_of(ctx.workdir)}
    variants, setup = build_variants(ctx, with_cgi, with_php)
    if with_php and not setup["php"]:
        result["php_skipped"] = "php-cgi not found (apt-get install php-cgi)"
    env_python = common.which("python3", path=common.SYSTEM_PATH)
    result["shebang_python"] = os.path.realpath(env_python) if env_python else None
    runs, per_run = ctx.runs, ctx.scale(20, 2)
    common.progress("cgi: %d variants x %d runs x %d requests" % (len(variants), runs, per_run))
    measure_sequential(variants, runs, per_run, warmup=0 if ctx.quick else 2)
    if not measure_rss(variants, 3 if not ctx.quick else 1):
        result["rss_note"] = "peak RSS not measured: needs GNU time at /usr/bin/time (apt-get install time)"
    result["variants"] = summarize(variants)
    if with_cgi:
        # The interpreter the user typed `python3` as (pyenv here) for comparison.
        import sys
        if os.path.realpath(sys.executable) != os.path.realpath(ctx.python):
            times = []
            for _ in range(ctx.runs):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
                times.append(time.perf_counter() - start)
            result["current_python_pass_ms"] = (sys.executable, common.median(times) * 1000)
        common.progress("cgi: -X importtime")
        result["importtime"] = importtime_section(ctx, setup, ctx.runs)
        common.progress("cgi: wall time of single imports")
        top_level = [name for name, _cum in
                     next(iter(result["importtime"]["configs"].values()))["top_level"]]
        result["import_costs"] = import_costs(ctx, setup["app"], ctx.runs, ctx.scale(8, 1), top_level)
    if with_php and setup["php"]:
        by_name = {v.name: v for v in variants}
        picks = [by_name["python3 -c pass"], by_name["handler.cgi: fsync on, dedupe off"],
                 by_name["php-cgi hello.php"], by_name["php-cgi handler.php (md5, append, fsync on)"]]
        conc = {}
        for concurrency in (1, 8):
            total = ctx.scale(20, 2) if concurrency == 1 else ctx.scale(48, 8)
            common.progress("php: %d concurrent, %d runs" % (concurrency, runs))
            per = {v.name: {"latency": [], "rps": []} for v in picks}
            for _run in range(runs):
                for variant in picks:
                    latency, rps = measure_concurrent(variant, concurrency, total)
                    per[variant.name]["latency"].append(latency)
                    per[variant.name]["rps"].append(rps)
            php_lat = per["php-cgi handler.php (md5, append, fsync on)"]["latency"]
            conc[concurrency] = [
                {"name": name, "latency_ms": common.median(v["latency"]) * 1000,
                 "rps": common.median(v["rps"]),
                 "ratio_vs_php": common.paired_ratio(v["latency"], php_lat)}
                for name, v in per.items()
            ]
        result["php_concurrency"] = conc
        result["php_version"] = common.tool_version([setup["php"], "-v"])
    return result
