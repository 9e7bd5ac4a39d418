"""Helpers for the command-line tests: configs, subprocesses, crafted events, tiny servers.

Everything here is real: config files written to a temporary folder, the module run as
``python3 smsc_handler.py VERB …``, a ``serve`` process on 127.0.0.1, hook scripts that
append their stdin to a file. Nothing is mocked; every wait is bounded.
"""

import configparser
import http.server
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import smsc_handler

#: the repository root
REPO = Path(__file__).resolve().parents[1]
#: the module, run as a script
SCRIPT = REPO / "smsc_handler.py"
#: the secret of the test configs (Latin letters, digits, '-' and '_', as SMSC allows)
SECRET = "Zq9-secret_X"
#: the environment variable naming the config
CONFIG_ENV = "SMSC_HANDLER_CONFIG"


############################################################################
# Config files
############################################################################


def write_config(folder, name="config.ini", **sections) -> Path:
    """Write an ini into `folder` and return its path.

    Defaults: ``[handler] data_dir = data`` (folder/data) and ``[jsonl] fsync = no``
    (the tests need no durability, and fsync is slow on some CI disks).
    """
    merged = {"handler": {"data_dir": "data"}, "jsonl": {"fsync": "no"}}
    for section, keys in sections.items():
        merged.setdefault(section, {}).update(keys)
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    for section, keys in merged.items():
        parser.add_section(section)
        for key, value in keys.items():
            parser.set(section, key, str(value))
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        parser.write(file)
    return path


def data_dir_of(config_path) -> Path:
    """Return the data folder a config file names."""
    return Path(smsc_handler.load_config(str(config_path)).data_dir)


############################################################################
# Running the module
############################################################################


def clean_env(**extra) -> dict:
    """Return os.environ without the config variable and web-root hints, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, "DOCUMENT_ROOT")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, input=None, env=None, timeout=30, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python3 smsc_handler.py ARGS`` and return the finished process (text output)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], input=input, capture_output=True,
        text=True, env=clean_env() if env is None else env, timeout=timeout,
        cwd=str(cwd) if cwd else None)


def assert_one_line_error(text: str) -> None:
    """An error report: exactly one non-empty line, no traceback."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text


class LineReader:
    """Read a process's stdout lines in a thread, so a test can wait with a timeout."""

    def __init__(self, stream):
        self.lines = queue.Queue()
        self.seen = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        for line in iter(stream.readline, ""):
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, predicate, timeout=5.0) -> str:
        """Return the first new line for which predicate(line) is true; fail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching line within %.1f s; got %r" % (timeout, self.seen))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the process ended; output was %r" % self.seen)
            self.seen.append(line)
            if predicate(line):
                return line


def _default_sigint():
    # A shell without job control starts background jobs with SIGINT ignored, and an
    # ignored signal stays ignored across exec: give the child Python its Ctrl-C back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args, env=None) -> subprocess.Popen:
    """Start ``python3 smsc_handler.py ARGS`` with piped text stdout/stderr; SIGINT works."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=clean_env() if env is None else env, preexec_fn=_default_sigint)


def stop(process: subprocess.Popen, sig=signal.SIGINT, timeout=5.0):
    """Stop a process we started (SIGINT first, then SIGKILL); return (rc, stderr)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    err = process.stderr.read() if process.stderr else ""
    for stream in (process.stdout, process.stderr):
        if stream:
            stream.close()
    return process.returncode, err


class ServeProcess:
    """``smsc_handler.py serve --port 0`` as a subprocess; `url` is what it printed."""

    def __init__(self, config_path, startup_timeout=10.0):
        self.config_path = Path(config_path)
        self.data_dir = data_dir_of(config_path)
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "serve", "--port", "0", "--config", str(config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True, env=clean_env())
        ready, _, _ = select.select([self.process.stdout], [], [], startup_timeout)
        first = self.process.stdout.readline() if ready else ""
        if "listening on http://127.0.0.1:" not in first:
            self.close()
            raise AssertionError("serve did not start: %r" % first)
        self.url = first.split()[-1]
        assert self.url.endswith("/"), first

    def events(self, name) -> list:
        """The parsed lines of data_dir/name."""
        return read_jsonl(self.data_dir / name)

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process.stdout.close()


############################################################################
# Events and JSON-lines files
############################################################################


def make_event(received=None, **params) -> dict:
    """Return the event the handler would store for these callback parameters.

    Built by the module's own decode_request + normalize, so the tests of the
    readers (tail, stats, replay, forward) see exactly what a request stores,
    with a chosen ``received`` time (Unix seconds).
    """
    body = urlencode({k: str(v) for k, v in params.items()}, encoding="utf-8").encode("ascii")
    request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
    return smsc_handler.normalize(request, None, "127.0.0.1", received=received, body=body)


def status_event(message_id, status=1, phone="79991234567", received=None, **params) -> dict:
    """A status event for message `message_id` (ts follows `received`, so each is unique)."""
    received = time.time() if received is None else received
    params.setdefault("ts", str(int(received)))
    return make_event(received=received, id=message_id, phone=phone, status=status, **params)


def line_of(event) -> bytes:
    return smsc_handler.event_line(event)


def append_raw(path, data: bytes) -> None:
    """Append bytes to a file as a plain writer would (no lock needed in one test)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as file:
        file.write(data)


def write_events(path, events) -> list:
    """Append events as JSON lines; return them."""
    append_raw(path, b"".join(line_of(event) for event in events))
    return list(events)


def read_jsonl(path) -> list:
    """Parsed lines of a JSON-lines file ([] when missing)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def iso(seconds) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def utc(text) -> float:
    """Unix time of 'YYYY-MM-DDTHH:MM:SS' in UTC."""
    import calendar
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


############################################################################
# Hooks
############################################################################


class Hook:
    """A hook script that appends each event (its stdin) to `out`.

    While the file `fail_flag` exists it records an attempt in `attempts` and
    exits 3 instead, so a test can break and fix the hook.
    """

    def __init__(self, folder, name="hook.sh"):
        folder = Path(folder)
        self.path = folder / name
        self.out = folder / (name + ".out")
        self.attempts = folder / (name + ".attempts")
        self.fail_flag = folder / (name + ".fail")
        self.path.write_text(
            "#!/bin/sh\n"
            "if [ -e '%s' ]; then echo attempt >> '%s'; echo 'hook says no' >&2; exit 3; fi\n"
            "cat >> '%s'\n" % (self.fail_flag, self.attempts, self.out))
        self.path.chmod(0o755)

    def fail(self, failing=True):
        if failing:
            self.fail_flag.write_text("")
        elif self.fail_flag.exists():
            self.fail_flag.unlink()

    def events(self) -> list:
        """The events the hook received, in order."""
        return read_jsonl(self.out)

    def ids(self) -> list:
        return [event["event_id"] for event in self.events()]

    def attempt_count(self) -> int:
        return len(self.attempts.read_text().splitlines()) if self.attempts.exists() else 0


def wait_until(predicate, timeout=5.0, interval=0.02):
    """Poll predicate until true; return its value or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        time.sleep(interval)


############################################################################
# A scripted HTTP server (stands in for any handler: answers what the test says)
############################################################################


class ScriptedServer:
    """A local HTTP server answering the given statuses in turn (the last one repeats).

    Records every request as (method, path, headers dict, body bytes).
    """

    def __init__(self, statuses=(200,)):
        self.statuses = list(statuses)
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                index = min(len(outer.requests), len(outer.statuses)) - 1
                status = outer.statuses[index]
                text = b"OK" if status == 200 else b"nope"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
