"""The scaling-out test's pieces (README "Scaling out", SPEC §13), all real, all on 127.0.0.1.

* NatsCluster: Debian's nats-server as a 3-node JetStream cluster.
* FaultProxy: sits between nginx and one handler instance; after the instance has
  answered (the callback is stored), it drops some answers, as a host killed right
  after storing or a proxy timeout would: SMSC sees an error and retries.
* Host: one handler "host": `serve` + `forward --follow` on its own data folder, and
  its examples/nats_publish_hook.py (as the [relay] endpoint, or as the [hook]).
* Nginx: one upstream over the three proxies, round-robin.
* Smsc: SMSC's retry rule (anything but 200/404 is tried again), sped up.

Every process is started here in its own session and stopped by its PID.
"""

import asyncio
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cli_util import SCRIPT, clean_env, free_port, write_config

import smsc_handler

#: the example under test
PUBLISHER = Path(smsc_handler.MODULE_DIR) / "examples" / "nats_publish_hook.py"
#: the relay secret of the test hosts
RELAY_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def spawn(argv, log, env=None):
    return subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, env=env or clean_env(), start_new_session=True)


def kill(process):
    """SIGKILL a process we started, with its session (nothing else)."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_port(port, process, log, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("no listener on %d: %s" % (port, Path(log).read_text()[-2000:])) from None
            time.sleep(0.05)


def run_async(coroutine):
    return asyncio.run(coroutine)


async def _patiently(call, tries=40):
    """Await call(), again while JetStream answers "temporarily unavailable" or times out.

    With a node down on a busy machine, the cluster's API answers 503 now and then: for
    the test's own reading of the stream, that is a reason to ask again, not a result.
    """
    import nats.errors
    import nats.js.errors
    for attempt in range(tries):
        try:
            return await call()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.25)


class NatsCluster:
    """Three nats-server nodes with JetStream, clustered over routes on 127.0.0.1."""

    def __init__(self, folder, size=3):
        self.folder = Path(folder)
        self.names = ["n%d" % (i + 1) for i in range(size)]
        self.ports = {name: free_port() for name in self.names}
        self.routes = {name: free_port() for name in self.names}
        self.processes = {}

    @property
    def urls(self):
        return ",".join("nats://127.0.0.1:%d" % self.ports[name] for name in self.names)

    def start(self):
        for name in self.names:
            store = self.folder / name
            store.mkdir(parents=True, exist_ok=True)
            routes = ", ".join("nats-route://127.0.0.1:%d" % self.routes[other]
                               for other in self.names if other != name)
            conf = self.folder / ("%s.conf" % name)
            conf.write_text(
                "server_name: %s\nlisten: 127.0.0.1:%d\njetstream { store_dir: \"%s\" }\n"
                "cluster { name: smsc\n  listen: 127.0.0.1:%d\n  routes: [%s] }\n"
                % (name, self.ports[name], store, self.routes[name], routes))
            self.processes[name] = spawn(["nats-server", "-c", conf], self.folder / ("%s.log" % name))
        for name in self.names:
            wait_port(self.ports[name], self.processes[name], self.folder / ("%s.log" % name))
        return self

    def kill(self, name):
        kill(self.processes[name])

    def stop(self):
        for process in self.processes.values():
            kill(process)

    async def _client(self):
        import nats
        return await nats.connect(servers=self.urls.split(","), connect_timeout=5)

    def stream_info(self, stream):
        async def info():
            nc = await self._client()
            try:
                js = nc.jetstream()
                return await _patiently(lambda: js.stream_info(stream))
            finally:
                await nc.close()
        return run_async(info())

    def message_ids(self, stream):
        """Return the Nats-Msg-Id of every message in the stream, in stream order."""
        async def read():
            nc = await self._client()
            try:
                js = nc.jetstream()
                info = await _patiently(lambda: js.stream_info(stream))
                ids = []
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    message = await _patiently(lambda seq=seq: js.get_msg(stream, seq))
                    ids.append((message.headers or {}).get("Nats-Msg-Id"))
                return ids
            finally:
                await nc.close()
        return run_async(read())


class FaultProxy:
    """A TCP proxy for one HTTP request per connection (nginx's upstream default) that loses answers.

    With probability `drop`, an answer the instance gave is not passed on: the
    connection is closed instead. `lost` counts them.
    """

    def __init__(self, target_port, drop=0.05, seed=1):
        self.target_port, self.drop = target_port, drop
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.lost = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        try:
            client.settimeout(15)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(65536)
                if not chunk:
                    return
                request += chunk
            head, _, body = request.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return
                body += chunk
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=15)
            with upstream:
                upstream.sendall(head + b"\r\n\r\n" + body)
                answer = b""
                while True:
                    chunk = upstream.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            with self.lock:
                lose = answer.startswith(b"HTTP/1.") and b" 200 " in answer[:16] and self.random.random() < self.drop
                if lose:
                    self.lost += 1
            if not lose:
                client.sendall(answer)
        except OSError:
            pass  # the instance is down: nginx answers 502, SMSC retries
        finally:
            client.close()

    def close(self):
        self.listener.close()


class Host:
    """One handler host: serve + forward --follow on its data folder, and its NATS publisher."""

    def __init__(self, folder, cluster, mode="relay", stream="SMSC", subject="smsc"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cluster, self.mode, self.stream, self.subject = cluster, mode, stream, subject
        self.port, self.bridge_port = free_port(), free_port()
        publisher = [sys.executable, PUBLISHER, "--servers", cluster.urls, "--subject", subject,
                     "--stream", stream, "--timeout", "3"]
        sections = {"dedupe": {"enabled": "yes"}}
        if mode == "relay":
            sections["relay"] = {"url": "http://127.0.0.1:%d/" % self.bridge_port, "secret": RELAY_SECRET,
                                 "timeout": "5"}
        else:
            sections["hook"] = {"command": " ".join('"%s"' % a for a in publisher), "run": "forward",
                                "timeout": "10"}
        self.config = write_config(self.folder, **sections)
        self.publisher = publisher
        self.serve = self.forward = self.bridge = None

    def start(self):
        log = self.folder / "host.log"
        if self.mode == "relay":
            env = clean_env(SMSC_RELAY_SECRET=RELAY_SECRET)
            self.bridge = spawn(self.publisher + ["--serve", "127.0.0.1:%d" % self.bridge_port], log, env)
            wait_port(self.bridge_port, self.bridge, log)
        self.serve = spawn([sys.executable, SCRIPT, "serve", "--port", self.port, "--config", self.config], log)
        wait_port(self.port, self.serve, log)
        self.forward = spawn([sys.executable, SCRIPT, "forward", "--follow", "--config", self.config,
                              "--backoff", "0.05", "--interval", "0.2"], log)
        return self

    def kill(self):
        """The host goes down at once (a reboot): every process of it, SIGKILL."""
        for process in (self.forward, self.serve, self.bridge):
            kill(process)

    def stored(self) -> int:
        """Lines in this host's status.jsonl."""
        path = self.folder / "data" / "status.jsonl"
        return len(path.read_bytes().splitlines()) if path.exists() else 0

    def caught_up(self) -> bool:
        """Whether this host's forward has published everything it stored."""
        config = smsc_handler.load_config(str(self.config))
        if self.mode == "relay":
            counts = smsc_handler.relay_counts(config)
            return counts["waiting"] == 0 and counts["retrying"] == 0
        with smsc_handler.StateStore(config) as state:
            for _path, _end, event in smsc_handler.iter_stored(config):
                if state.hook_state(event["event_id"]) != "ok":
                    return False
        return True


class Nginx:
    """nginx with one round-robin upstream over the given ports."""

    def __init__(self, folder, upstream_ports):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        servers = "\n".join("    server 127.0.0.1:%d max_fails=0;" % port for port in upstream_ports)
        temp = "".join("%s_temp_path %s/%s;\n" % (kind, self.folder, kind)
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.folder / "nginx.conf").write_text(
            "worker_processes 1;\ndaemon off;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\n"
            "events { worker_connections 512; }\n"
            "http {\n  access_log off;\n  %s  upstream handlers {\n%s\n  }\n"
            "  server {\n    listen 127.0.0.1:%d;\n    client_body_buffer_size 64k;\n"
            "    location / { proxy_pass http://handlers; proxy_connect_timeout 1s; proxy_read_timeout 15s; }\n"
            "  }\n}\n" % (self.folder, self.folder, temp, servers, self.port))
        nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
        self.process = spawn([nginx, "-p", self.folder, "-c", self.folder / "nginx.conf", "-e",
                              self.folder / "error.log"], self.folder / "stderr.log")
        wait_port(self.port, self.process, self.folder / "error.log")

    def stop(self):
        kill(self.process)


class Smsc:
    """SMSC's retry rule, sped up: each callback is sent until it gets 200 (or 404), `tries` times."""

    def __init__(self, port, interval=0.1, tries=50):
        self.port, self.interval, self.tries = port, interval, tries
        self.acknowledged, self.gave_up = {}, []
        self.sent = 0
        self.lock = threading.Lock()

    def callback(self, number, now):
        url = "http://127.0.0.1:%d/" % self.port
        _method, _url, headers, body, _notes = smsc_handler.build_callback(
            url, "status", overrides={"id": str(100000 + number)}, now=now)
        request = smsc_handler.decode_request(body, b"", headers["Content-Type"], "windows-1251")
        event_id = smsc_handler.normalize(request, None, "127.0.0.1", body=body)["event_id"]
        statuses = []
        for _ in range(self.tries):
            status = None
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                connection.request("POST", "/", body, headers)
                answer = connection.getresponse()
                answer.read()
                status = answer.status
                connection.close()
            except (OSError, http.client.HTTPException):
                pass
            with self.lock:
                self.sent += 1
            statuses.append(status)
            if status == 200:
                with self.lock:
                    self.acknowledged[number] = event_id
                return
            if status == 404:
                break
            time.sleep(self.interval)
        with self.lock:
            self.gave_up.append((number, statuses))

    def run(self, count, workers=8, progress=None):
        now = int(time.time())
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda n: self.callback(n, now), range(count)):
                pass
