"""Servers: requests/s and latency with wrk at 8 connections, handler vs baselines.

Under uWSGI (behind nginx, as deploy/ sets it up) and gunicorn (sync workers, as
deploy/gunicorn.conf.py), each app runs in its own server instance with the same
settings: a hello-world WSGI app, a minimal "parse form + append a line" app, the
handler, and (the peer) an equivalent Flask view under the same gunicorn. Every
server is started first, then each run measures every row once, round-robin, so
ratios are paired in time. Each request is a new callback (wrk's Lua script gives
it its own ``ts``; the md5 covers id:phone:status, so it stays valid), hence with
dedupe on each one is stored.
"""

import os
import re
import subprocess
import sys
import time

import common

WRK_SCRIPT = r"""
-- POST SMSC status callbacks; each request is a new event (its own ts).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local counter, base, step, prefix, suffix = 0, 0, 1, "", ""
function init(args)
  base = tonumber(args[1])
  step = tonumber(args[2])
  prefix = args[3]
  suffix = args[4]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, prefix .. (base + counter * step + tid) .. suffix)
end
"""

#: worker processes, as deploy/uwsgi.ini and deploy/gunicorn.conf.py
WORKERS = 2
#: wrk connections and threads
CONNECTIONS, THREADS = 8, 2


class Row:
    """One server + app combination measured by wrk."""

    def __init__(self, server, app, role="", fsync=None, dedupe=None):
        self.server, self.app, self.role = server, app, role
        self.fsync, self.dedupe = fsync, dedupe
        self.name = "%s: %s" % (server, app)
        self.port = None
        self.processes = []
        self.runs = []  # dicts from parse_wrk
        self.skip = None
        self.data_file = None


def parse_wrk(text):
    """Read requests/s, p50/p99 latency (ms), request and error counts from wrk's output."""
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}

    def latency(label):
        match = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s|m)\s*$" % label, text, re.M)
        return float(match.group(1)) * units[match.group(2)] if match else None

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    done = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "rps": float(rps.group(1)) if rps else None,
        "p50_ms": latency("50"), "p99_ms": latency("99"),
        "requests": int(done.group(1)) if done else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


############################################################################
# Starting the servers
############################################################################


def gunicorn_command():
    """Return the argv prefix that runs gunicorn, or None."""
    try:
        import gunicorn  # noqa: F401
        return [sys.executable, "-m", "gunicorn"]
    except ImportError:
        found = common.which("gunicorn")
        return [found] if found else None


def flask_available():
    try:
        import flask  # noqa: F401
        return True
    except ImportError:
        return False


def uwsgi_command():
    """Return the argv prefix that runs uWSGI with Python, or None."""
    uwsgi = common.which("uwsgi")
    if not uwsgi:
        return None
    plugin_dirs = ("/usr/lib/uwsgi/plugins", "/usr/lib/uwsgi")
    if any(os.path.exists(os.path.join(d, "python3_plugin.so")) for d in plugin_dirs):
        return [uwsgi, "--plugins", "python3"]
    return [uwsgi]


def app_target(row, ctx, work):
    """Return (folder, module:callable, wsgi file, environment) of a row's app."""
    data = os.path.join(work, "data", re.sub(r"[^a-z0-9]+", "-", row.name.lower()).strip("-"))
    os.makedirs(data, exist_ok=True)
    env = {}
    if row.app.startswith("hello"):
        return common.APPS, "hello_wsgi:application", os.path.join(common.APPS, "hello_wsgi.py"), env
    if row.app.startswith("minimal"):
        env = {"MINIMAL_DATA_DIR": data, "MINIMAL_FSYNC": "yes" if row.fsync else "no"}
        row.data_file = os.path.join(data, "minimal.jsonl")
        return common.APPS, "minimal_append:application", os.path.join(common.APPS, "minimal_append.py"), env
    if row.app.startswith("Flask"):
        env = {"PEER_DATA_DIR": data, "PEER_FSYNC": "yes" if row.fsync else "no", "PEER_SECRET": common.SECRET}
        row.data_file = os.path.join(data, "status.jsonl")
        return common.APPS, "flask_peer:app", os.path.join(common.APPS, "flask_peer.py"), env
    config = common.write_config(os.path.join(data, "config.ini"), os.path.join(data, "data"),
                                 fsync=row.fsync, dedupe=row.dedupe)
    env = {"SMSC_HANDLER_CONFIG": config}
    row.data_file = os.path.join(data, "data", "status.jsonl")
    folder = ctx.server_candidate if row.app.startswith("candidate") else ctx.server_app
    return folder, "wsgi:application", os.path.join(folder, "wsgi.py"), env


def start_gunicorn(row, ctx, work, argv0):
    folder, target, _file, app_env = app_target(row, ctx, work)
    row.port = common.free_port()
    env = dict(os.environ, **app_env)
    env.pop("PYTHONPATH", None)
    argv = argv0 + ["--workers", str(WORKERS), "--worker-class", "sync", "--bind", "127.0.0.1:%d" % row.port,
                    "--chdir", folder, "--timeout", "60", "--log-level", "warning", target]
    log = os.path.join(work, "logs", "gunicorn-%d.log" % row.port)
    server = common.Server(row.name, argv, log, env=env, cwd=folder)
    row.processes.append(server)
    return server


def start_uwsgi(row, ctx, work, argv0):
    folder, _target, wsgi_file, app_env = app_target(row, ctx, work)
    row.upstream = common.free_port()
    argv = argv0 + ["--master", "--processes", str(WORKERS), "--socket", "127.0.0.1:%d" % row.upstream,
                    "--chdir", folder, "--wsgi-file", wsgi_file, "--need-app", "--die-on-term",
                    "--harakiri", "60", "--disable-logging", "--vacuum"]
    for name, value in app_env.items():
        argv += ["--env", "%s=%s" % (name, value)]
    log = os.path.join(work, "logs", "uwsgi-%d.log" % row.upstream)
    env = {"PATH": common.SYSTEM_PATH, "LANG": "C.UTF-8"}
    server = common.Server(row.name, argv, log, env=env, cwd=folder)
    row.processes.append(server)
    return server


NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/logs/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
{servers}
}}
"""

NGINX_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64k;
        location / {{
            include {params};
            uwsgi_pass 127.0.0.1:{upstream};
            uwsgi_read_timeout 30s;
        }}
    }}
"""


def start_nginx(rows, work):
    """Start one nginx with a server block per uWSGI row; return the Server."""
    nginx = common.which("nginx", path=common.SYSTEM_PATH)
    params = "/etc/nginx/uwsgi_params"
    blocks = []
    for row in rows:
        row.port = common.free_port()
        blocks.append(NGINX_SERVER.format(port=row.port, upstream=row.upstream, params=params))
    os.makedirs(os.path.join(work, "nginx-tmp"), exist_ok=True)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as file:
        file.write(NGINX_CONF.format(work=work, servers="".join(blocks)))
    argv = [nginx, "-c", conf, "-p", work + "/", "-g", "daemon off;"]
    if _nginx_has_e(nginx):
        argv[1:1] = ["-e", os.path.join(work, "logs", "nginx-error.log")]
    server = common.Server("nginx", argv, os.path.join(work, "logs", "nginx.log"), cwd=work)
    for row in rows:
        row.processes.append(server)
    return server


def _nginx_has_e(nginx):
    """Tell whether nginx takes -e (error log before the config is read; 1.19.5+)."""
    return common.tool_version([nginx, "-h"], r"-e filename") is not None


############################################################################
# The section
############################################################################


def handler_rows(server, ctx, default=True):
    """Return the handler's rows for one server (and the candidate's, with --candidate)."""
    rows = []
    for who in ("handler", "candidate") if ctx.candidate else ("handler",):
        role = "candidate" if who == "candidate" else ""
        rows.append(Row(server, "%s, fsync off, dedupe off" % who, role, fsync=False, dedupe=False))
        rows.append(Row(server, "%s, fsync on, dedupe off" % who, role, fsync=True, dedupe=False))
        if default:
            rows.append(Row(server, "%s, default config (fsync on, dedupe on)" % who, role, fsync=True, dedupe=True))
    return rows


def plan(parts, ctx):
    """Return (rows, skipped reasons) for the selected parts: uwsgi, gunicorn, flask."""
    rows, skipped = [], {}
    if not common.which("wrk"):
        return [], {"servers": "wrk not found (apt-get install wrk)"}
    gunicorn = gunicorn_command()
    if "gunicorn" in parts or "flask" in parts:
        if not gunicorn:
            skipped["gunicorn"] = "gunicorn not found (pip install gunicorn)"
        else:
            if "gunicorn" in parts:
                rows.append(Row("gunicorn", "hello WSGI", role="baseline"))
                rows.append(Row("gunicorn", "minimal parse+append, fsync off", "baseline", fsync=False))
                rows.append(Row("gunicorn", "minimal parse+append, fsync on", "baseline", fsync=True))
            rows += handler_rows("gunicorn", ctx, default="gunicorn" in parts)
            if "flask" in parts:
                if flask_available():
                    rows.append(Row("gunicorn", "Flask peer, fsync off", "peer", fsync=False))
                    rows.append(Row("gunicorn", "Flask peer, fsync on", "peer", fsync=True))
                else:
                    skipped["flask"] = "flask not importable by %s (pip install flask)" % sys.executable
    if "uwsgi" in parts:
        uwsgi = uwsgi_command()
        if not uwsgi:
            skipped["uwsgi"] = "uwsgi not found (apt-get install uwsgi uwsgi-plugin-python3)"
        elif not common.which("nginx", path=common.SYSTEM_PATH):
            skipped["uwsgi"] = "nginx not found (apt-get install nginx)"
        else:
            rows.append(Row("uWSGI+nginx", "hello WSGI", role="baseline"))
            rows.append(Row("uWSGI+nginx", "minimal parse+append, fsync off", "baseline", fsync=False))
            rows.append(Row("uWSGI+nginx", "minimal parse+append, fsync on", "baseline", fsync=True))
            rows += handler_rows("uWSGI+nginx", ctx)
    return rows, skipped


def run(ctx, parts):
    """Start the servers, measure every row round-robin, stop them; return the section's results."""
    rows, skipped = plan(parts, ctx)
    result = {"skipped": skipped, "rows": [], "connections": CONNECTIONS, "threads": THREADS,
              "duration_s": ctx.duration, "workers": WORKERS}
    if not rows:
        return result
    work = os.path.join(ctx.workdir, "servers")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    ctx.server_app = common.copy_app(ctx.app_dir, os.path.join(work, "app"), python=ctx.python)
    if ctx.candidate:
        ctx.server_candidate = common.copy_app(ctx.candidate, os.path.join(work, "candidate"), python=ctx.python)
    script = os.path.join(work, "callbacks.lua")
    with open(script, "w", encoding="utf-8") as file:
        file.write(WRK_SCRIPT)
    mark = "7777777777"
    body = common.form_body(1, ts=int(mark)).decode("ascii")
    prefix, suffix = body.split(mark)
    started = []
    try:
        uwsgi_rows = [row for row in rows if row.server.startswith("uWSGI")]
        for row in rows:
            if row.server == "gunicorn":
                started.append(start_gunicorn(row, ctx, work, gunicorn_command()))
            else:
                started.append(start_uwsgi(row, ctx, work, uwsgi_command()))
        # A port another program took between our check and the server's bind makes the
        # server exit: start it again on another port (a few times).
        for row in rows:
            port = row.port if row.server == "gunicorn" else row.upstream
            for _attempt in range(3):
                server = row.processes[-1]
                if common.wait_port(port, server.proc, timeout=60):
                    break
                server.stop()
                started.remove(server)
                row.processes.remove(server)
                start = start_gunicorn if row.server == "gunicorn" else start_uwsgi
                started.append(start(row, ctx, work, gunicorn_command() if row.server == "gunicorn"
                                     else uwsgi_command()))
                port = row.port if row.server == "gunicorn" else row.upstream
        if uwsgi_rows:
            for _attempt in range(3):
                nginx = start_nginx(uwsgi_rows, work)
                started.append(nginx)
                if all(common.wait_port(row.port, nginx.proc, timeout=30) for row in uwsgi_rows):
                    break
                nginx.stop()
                started.remove(nginx)
                for row in uwsgi_rows:
                    row.processes.remove(nginx)
        common.progress("servers: started %d processes for %d rows" % (len(started), len(rows)))
        for row in rows:
            server = row.processes[-1]
            if not common.wait_port(row.port, server.proc, timeout=5):
                row.skip = "did not start: %s" % " | ".join(p.tail(5) for p in row.processes)
                continue
            status, answer = 0, b""
            for _attempt in range(50):  # uWSGI may answer 502 until its workers are up
                try:
                    status, answer = common.http_post(row.port, common.form_body(common.COUNTER.take()[0]),
                                                      common.CONTENT_TYPES["form"])
                except OSError as exc:
                    status, answer = 0, str(exc).encode()
                if status == 200:
                    break
                time.sleep(0.2)
            if status != 200:
                row.skip = "answered %s %r: %s" % (status, answer[:100], " | ".join(p.tail(5) for p in row.processes))
        live = [row for row in rows if row.skip is None]

        def wrk(row, seconds, base):
            argv = ["wrk", "-t%d" % THREADS, "-c%d" % CONNECTIONS, "-d%ds" % seconds, "--latency",
                    "-s", script, "http://127.0.0.1:%d/" % row.port, "--", str(base), str(THREADS), prefix, suffix]
            sessions = {p.proc.pid for p in row.processes}
            before = sum(common.session_cpu(sid) for sid in sessions)
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=seconds + 60)
            used = sum(common.session_cpu(sid) for sid in sessions) - before
            parsed = parse_wrk(done.stdout.decode("utf-8", "replace"))
            parsed["server_cpu_us"] = used / parsed["requests"] * 1e6 if parsed["requests"] else None
            return parsed

        if not ctx.quick:
            common.progress("servers: warm-up, 1 s per row")
            for row in live:
                wrk(row, 1, 1500000000)
        for run_index in range(ctx.runs):
            common.progress("servers: run %d/%d, %d rows x %d s" % (run_index + 1, ctx.runs, len(live), ctx.duration))
            for row in live:
                row.runs.append(wrk(row, ctx.duration, 1600000000 + run_index * 20000000))
    finally:
        for server in reversed(started):
            server.stop()
    by_name = {row.name: row for row in rows}
    for row in rows:
        entry = {"name": row.name, "server": row.server, "app": row.app, "role": row.role, "skip": row.skip}
        if row.runs:
            rps = [r["rps"] for r in row.runs]
            entry.update({
                "rps": common.median(rps), "rps_runs": [round(r or 0) for r in rps],
                "p50_ms": common.median([r["p50_ms"] for r in row.runs]),
                "p99_ms": common.median([r["p99_ms"] for r in row.runs]),
                "server_cpu_us": common.median([r.get("server_cpu_us") for r in row.runs]),
                "non2xx": sum(r["non2xx"] for r in row.runs),
                "socket_errors": sum(r["socket_errors"] for r in row.runs),
                "requests": sum(r["requests"] for r in row.runs),
                "lines_written": common.count_lines(row.data_file) if row.data_file else None,
            })

            def ratio(other_name, row=row, rps=rps):
                other = by_name.get(other_name)
                if other is None or not other.runs or len(other.runs) != len(row.runs):
                    return None
                return common.paired_ratio(rps, [r["rps"] for r in other.runs])

            def cpu_ratio(other_name, mine=entry["server_cpu_us"]):
                other = by_name.get(other_name)
                theirs = common.median([r.get("server_cpu_us") for r in other.runs]) if other and other.runs else None
                return theirs / mine if theirs and mine else None

            fsync = "on" if row.fsync else "off"
            entry["vs_hello"] = ratio("%s: hello WSGI" % row.server)
            entry["vs_minimal"] = ratio("%s: minimal parse+append, fsync %s" % (row.server, fsync))
            # The same comparison by server CPU per request: steadier when other work shares the machine.
            entry["cpu_vs_hello"] = cpu_ratio("%s: hello WSGI" % row.server)
            entry["cpu_vs_minimal"] = cpu_ratio("%s: minimal parse+append, fsync %s" % (row.server, fsync))
            if row.app.startswith("candidate"):
                entry["vs_handler"] = ratio(row.name.replace(": candidate", ": handler", 1))
            if row.app.startswith("Flask"):
                for who in ("handler", "candidate"):
                    handler = by_name.get("%s: %s, fsync %s, dedupe off" % (row.server, who, fsync))
                    if handler is not None and handler.runs and len(handler.runs) == len(row.runs):
                        entry["%s_vs_this" % who] = common.paired_ratio([r["rps"] for r in handler.runs], rps)
        result["rows"].append(entry)
    result["versions"] = {
        "wrk": common.tool_version(["wrk", "-v"], r"wrk [^\s]+"),
        "nginx": common.tool_version(["nginx", "-v"], r"nginx/[\d.]+") if common.which("nginx") else None,
        "uwsgi": common.tool_version(["uwsgi", "--version"]) if common.which("uwsgi") else None,
        "gunicorn": _module_version("gunicorn"),
        "flask": _module_version("flask"),
        "server_python": sys.version.split()[0],
    }
    return result


def _module_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return None
