#!/usr/bin/env python3
"""Benchmark "how big can it get": one host vs the three-host JetStream setup of README "Scaling out".

    python3 bench/cluster.py                 # 3 runs of 10 s per setup
    python3 bench/cluster.py --quick         # 1 run of 2 s: checks that it runs
    python3 bench/cluster.py --output bench/RESULTS.md

Both setups are real and on this machine: uWSGI (2 processes per host, as
deploy/uwsgi.ini) behind nginx, the default config (fsync on, dedupe on) plus
[relay] to the host's examples/nats_publish_hook.py --serve, `forward --follow`
per host, and a 3-node JetStream cluster (Debian's nats-server; stream R3, 4 h
duplicate window). wrk posts new callbacks at 8 connections for the run's
seconds: "intake" is the callbacks answered 200 per second; "in the stream" is
the events per second from the start of the run until the last one stored is
in the stream (publishing goes on after wrk stops). "one host" is the same with
one uWSGI instance (2 processes, and 6 for the same process count as three
hosts). On one 2-core machine the three hosts share the same two cores: see
README "How big can it get" for what a real deployment adds.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import servers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHER = os.path.join(REPO, "examples", "nats_publish_hook.py")
RELAY_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BEGIN, END = "<!-- cluster bench: begin -->", "<!-- cluster bench: end -->"


def start_cluster(work):
    names = ("n1", "n2", "n3")
    ports = {name: common.free_port() for name in names}
    routes = {name: common.free_port() for name in names}
    started = []
    for name in names:
        store = os.path.join(work, "nats", name)
        os.makedirs(store)
        conf = os.path.join(work, "nats", name + ".conf")
        with open(conf, "w") as file:
            file.write("server_name: %s\nlisten: 127.0.0.1:%d\njetstream { store_dir: \"%s\" }\n"
                       "cluster { name: bench\n listen: 127.0.0.1:%d\n routes: [%s] }\n"
                       % (name, ports[name], store, routes[name],
                          ", ".join("nats-route://127.0.0.1:%d" % routes[o] for o in names if o != name)))
        started.append(common.Server("nats " + name, ["nats-server", "-c", conf],
                                     os.path.join(work, "logs", "nats-%s.log" % name)))
    for name, server in zip(names, started):
        common.wait_port(ports[name], server.proc)
    urls = ",".join("nats://127.0.0.1:%d" % ports[name] for name in names)
    deadline = time.monotonic() + 60
    while True:  # JetStream elects its meta leader first
        done = subprocess.run([sys.executable, PUBLISHER, "--servers", urls, "--init", "--timeout", "2"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise SystemExit("JetStream did not come up: %s" % done.stderr)
        time.sleep(0.5)
    return started, urls


async def _stream_count(urls):
    import nats
    nc = await nats.connect(servers=urls.split(","))
    try:
        return (await nc.jetstream().stream_info("SMSC")).state.messages
    finally:
        await nc.close()


def stream_count(urls):
    return asyncio.run(_stream_count(urls))


def start_host(work, app, index, urls, processes=servers.WORKERS):
    """Start one host: its publisher, uWSGI with the handler, forward --follow. Return (servers, upstream, data)."""
    folder = os.path.join(work, "host%d" % index)
    os.makedirs(folder)
    bridge_port = common.free_port()
    config = common.write_config(os.path.join(folder, "config.ini"), os.path.join(folder, "data"))
    with open(config, "a") as file:
        file.write("[relay]\nurl = http://127.0.0.1:%d/\nsecret = %s\n" % (bridge_port, RELAY_SECRET))
    logs = os.path.join(work, "logs")
    bridge = common.Server("publisher %d" % index, [sys.executable, PUBLISHER, "--serve", "127.0.0.1:%d" % bridge_port,
                                                    "--servers", urls], os.path.join(logs, "publisher%d.log" % index),
                           env=dict(os.environ, SMSC_RELAY_SECRET=RELAY_SECRET))
    common.wait_port(bridge_port, bridge.proc)
    upstream = common.free_port()
    argv = servers.uwsgi_command() + [
        "--master", "--processes", str(processes), "--socket", "127.0.0.1:%d" % upstream, "--chdir", app,
        "--wsgi-file", os.path.join(app, "wsgi.py"), "--need-app", "--die-on-term", "--disable-logging",
        "--env", "SMSC_HANDLER_CONFIG=%s" % config]
    uwsgi = common.Server("uwsgi %d" % index, argv, os.path.join(logs, "uwsgi%d.log" % index),
                          env={"PATH": common.SYSTEM_PATH, "LANG": "C.UTF-8"}, cwd=app)
    common.wait_port(upstream, uwsgi.proc)
    forward = common.Server("forward %d" % index, ["/usr/bin/python3", os.path.join(app, "smsc_handler.py"), "forward",
                                                   "--follow", "--config", config, "--interval", "0.2"],
                            os.path.join(logs, "forward%d.log" % index))
    return [bridge, uwsgi, forward], upstream, os.path.join(folder, "data")


NGINX = """worker_processes 1;
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
    upstream handlers {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass handlers; }}
    }}
}}
"""


def start_nginx(work, upstreams):
    port = common.free_port()
    os.makedirs(os.path.join(work, "nginx-tmp"), exist_ok=True)
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as file:
        file.write(NGINX.format(work=work, port=port,
                                servers="\n".join("        server 127.0.0.1:%d;" % p for p in upstreams)))
    nginx = common.which("nginx", path=common.SYSTEM_PATH)
    server = common.Server("nginx", [nginx, "-c", conf, "-p", work + "/", "-e", os.path.join(work, "logs", "ngx.log"),
                                     "-g", "daemon off;"], os.path.join(work, "logs", "nginx.log"), cwd=work)
    common.wait_port(port, server.proc)
    return server, port


def stored_ids(folders):
    ids = set()
    for folder in folders:
        path = os.path.join(folder, "status.jsonl")
        if os.path.exists(path):
            with open(path, "rb") as file:
                for line in file:
                    ids.add(json.loads(line)["event_id"])
    return ids


def measure_setup(work, app, hosts, seconds, runs, script, prefix, suffix, processes=servers.WORKERS):
    """Run `runs` wrk runs against `hosts` hosts; return a list of {intake, stream} per run."""
    started, urls = start_cluster(work)
    results = []
    try:
        folders, upstreams = [], []
        for index in range(hosts):
            procs, upstream, data = start_host(work, app, index, urls, processes)
            started += procs
            upstreams.append(upstream)
            folders.append(data)
        nginx, port = start_nginx(work, upstreams)
        started.append(nginx)
        for run in range(runs):
            base = stream_count(urls)
            begin = time.monotonic()
            argv = ["wrk", "-t%d" % servers.THREADS, "-c%d" % servers.CONNECTIONS, "-d%ds" % seconds, "-s", script,
                    "http://127.0.0.1:%d/" % port, "--", str(1600000000 + run * 20000000), str(servers.THREADS),
                    prefix, suffix]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
            parsed = servers.parse_wrk(done.stdout)
            if parsed["non2xx"] or parsed["socket_errors"]:
                raise SystemExit("wrk saw errors: %s" % done.stdout)
            target = len(stored_ids(folders))
            deadline = time.monotonic() + 300
            while stream_count(urls) < target:
                if time.monotonic() > deadline:
                    raise SystemExit("the stream did not catch up")
                time.sleep(0.05)
            finished = time.monotonic()
            added = stream_count(urls) - base
            results.append({"intake": parsed["rps"], "stream": added / (finished - begin), "events": added})
            common.progress("%d host(s), run %d: intake %.0f/s, in the stream %.0f/s (%d events)"
                            % (hosts, run + 1, parsed["rps"], results[-1]["stream"], added))
    finally:
        for server in reversed(started):
            server.stop()
    return results


def render(results, head, seconds, runs):
    def med(rows, key):
        return common.median([row[key] for row in rows])

    def rng(rows, key):
        low, high = common.spread([row[key] for row in rows])
        return "%.0f–%.0f" % (low, high)
    lines = [
        BEGIN, "## How big can it get (issue 14)", "", head, "",
        "`python3 bench/cluster.py`: %d runs of %d s per setup (wrk, 8 connections, a new callback per request), "
        "medians and ranges. Default config (fsync on, dedupe on) + `[relay]` to the host's "
        "`examples/nats_publish_hook.py --serve`, `forward --follow`, 3-node JetStream (R3)." % (runs, seconds), "",
        "| setup | intake (200s per second) | into the stream (events/s, end to end) |",
        "|---|---|---|"]
    for label, rows in results:
        lines.append("| %s | **%.0f/s** (%s) | **%.0f/s** (%s) |" % (
            label, med(rows, "intake"), rng(rows, "intake"), med(rows, "stream"), rng(rows, "stream")))
    lines += [
        "",
        "All of it on this one shared 2-core machine (three NATS nodes, nginx and wrk included). With fsync "
        "and dedupe on, a host's requests take turns: each holds the data folder's dedupe lock from its id "
        "through the line's fsync to the commit, so a request mostly waits for the disk, and more processes "
        "on one data folder do not answer more. Three hosts are three data folders syncing in parallel. See "
        "README \"How big can it get\".",
        END, ""]
    return "\n".join(lines)


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
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--seconds", type=int)
    parser.add_argument("--output")
    parser.add_argument("--json")
    parser.add_argument("--workdir")
    args = parser.parse_args(argv)
    for tool in ("wrk", "nats-server", "uwsgi", "nginx"):
        if not common.which(tool, path=common.SYSTEM_PATH):
            raise SystemExit("%s is not installed" % tool)
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (2 if args.quick else 10)
    work = common.make_workdir(args.workdir)
    try:
        os.makedirs(os.path.join(work, "logs"))
        app = common.copy_app(REPO, os.path.join(work, "app"), python="/usr/bin/python3")
        script = os.path.join(work, "callbacks.lua")
        with open(script, "w") as file:
            file.write(servers.WRK_SCRIPT)
        mark = "7777777777"
        prefix, suffix = common.form_body(1, ts=int(mark)).decode("ascii").split(mark)
        setups = [("one host: uWSGI (2 processes) behind nginx", 1, 2),
                  ("one host: uWSGI with 6 processes", 1, 6),
                  ("three hosts (2 processes each) behind one nginx upstream, round-robin", 3, 2)]
        results = []
        for index, (label, hosts, processes) in enumerate(setups):
            folder = os.path.join(work, "setup%d" % index)
            os.makedirs(os.path.join(folder, "logs"))
            results.append((label, measure_setup(folder, app, hosts, seconds, runs, script, prefix, suffix,
                                                 processes)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = common.machine_info()
    head = "Measured %s on %s (load average before: %s); nats-server %s." % (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), info.get("cpu"), info.get("loadavg"),
        common.tool_version(["nats-server", "--version"], r"v[\d.]+"))
    text = render(results, head, seconds, runs)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    if args.output:
        write_output(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
