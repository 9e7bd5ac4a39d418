"""Helpers for the proof tests (dedupe, hook, faults, fuzz, concurrency, security).

Everything here is real: ini files on disk, the real ``handler.cgi`` run as a
subprocess with a CGI environment, real hook processes, real SQLite files. Nothing
of the module is mocked; a test that injects a fault does it in a child process.

    site = Site(tmp_path, dedupe={"enabled": "no"})   # ini -> Config -> WebTest app
    site.post(form(status_callback()))                # in process, wsgiref.validate
    site.cgi(form(status_callback()))                 # handler.cgi as a subprocess
    site.events("status")                             # parsed lines, each checked intact
"""

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import wsgiref.validate
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlencode

import webtest

import smsc_handler

#: repository root: handler.cgi and smsc_handler.py live here
REPO = Path(__file__).resolve().parents[1]
#: the real CGI entry
HANDLER_CGI = REPO / "handler.cgi"
#: the only Content-Type an answer may carry (SPEC §3)
PLAIN = "text/plain; charset=utf-8"
FORM = "application/x-www-form-urlencoded"
PHONE = "79991234567"
#: the status codes a configured-and-working handler may answer to anything
KINDS = ("status", "incoming", "waitcall")


############################################################################
# Interpreters and processes
############################################################################

@lru_cache(maxsize=None)
def fast_python() -> tuple:
    """Return the argv prefix of a quick-starting Python for child processes.

    The pyenv Python here loads a slow site .pth; Debian's /usr/bin/python3 with
    -I -S starts in a few ms. Falls back to sys.executable.
    """
    candidate = "/usr/bin/python3"
    if os.access(candidate, os.X_OK):
        probe = subprocess.run(
            [candidate, "-I", "-S", "-c",
             "import sys, sqlite3, fcntl; sys.exit(0 if sys.version_info >= (3, 8) else 1)"],
            capture_output=True, timeout=30)
        if probe.returncode == 0:
            return (candidate, "-I", "-S")
    return (sys.executable,)


#: first lines of every child script: import the module from the repository
PROLOGUE = "import sys\nsys.path.insert(0, %r)\nimport smsc_handler\n" % str(REPO)


def billion_laughs(root: bytes) -> bytes:
    """An XML body whose DTD would expand &lol9; to 10^9 "lol"s (the entity-expansion attack)."""
    entities = [b' <!ENTITY lol "lol">']
    for n in range(1, 10):
        previous = b"&lol%s;" % (str(n - 1).encode() if n > 1 else b"")
        entities.append(b' <!ENTITY lol%d "%s">' % (n, previous * 10))
    return b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n' + b"\n".join(entities) + b"\n]>\n" + root


def python_child(code: str, *args, **popen) -> subprocess.Popen:
    """Start a child Python running PROLOGUE + code with args in sys.argv[1:]."""
    return subprocess.Popen([*fast_python(), "-c", PROLOGUE + code, *map(str, args)], **popen)


def pid_gone(pid: int) -> bool:
    """True when the process no longer runs (absent, or a zombie nobody reaped)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as file:
            stat = file.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")


def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    """Poll predicate until true or timeout seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


############################################################################
# Callbacks
############################################################################

def status_callback(id="1001", phone=PHONE, status="1", ts="1700000000", **extra) -> dict:
    """A delivery status callback's parameters (SMSC names, as text)."""
    params = {"id": id, "phone": phone, "status": status, "ts": ts, "err": "0",
              "cnt": "1", "type": "0", "cost": "1.50", "sender": "SMSC.RU",
              "time": "14.11.23 01:13:20"}
    params.update(extra)
    return params


def incoming_callback(id="5001", phone=PHONE, mes="Hello", to="79000000000", **extra) -> dict:
    """An incoming SMS callback's parameters."""
    params = {"id": id, "sms_id": "9" + str(id), "phone": phone, "mes": mes, "to": to,
              "smsc": "79000000001", "sent": "1700000000", "time": "1700000005"}
    params.update(extra)
    return params


def waitcall_callback(phone=PHONE, ts="1700000000", **extra) -> dict:
    """A number-confirmation-by-call callback's parameters."""
    params = {"waitcall": "1", "phone": phone, "ts": ts, "calltime": "3"}
    params.update(extra)
    return params


def form(params: dict, charset: str = "utf-8") -> bytes:
    """Encode parameters as SMSC's default form body."""
    return urlencode({k: v.encode(charset) for k, v in params.items()}).encode("ascii")


def as_json(params: dict, numbers=()) -> bytes:
    """Encode parameters as a fmt=3 JSON body; names in `numbers` become JSON numbers."""
    tree = {k: (json.loads(v) if k in numbers else v) for k, v in params.items()}
    return json.dumps(tree).encode("utf-8")


def as_xml(params: dict) -> bytes:
    """Encode parameters as a fmt=2 XML body."""
    from xml.sax.saxutils import escape
    inner = "".join("<%s>%s</%s>" % (k, escape(v), k) for k, v in params.items())
    return ('<?xml version="1.0" encoding="utf-8"?><data>%s</data>' % inner).encode("utf-8")


def sign(kind: str, params: dict, secret: str, alg: str = "md5") -> str:
    """The control hash SMSC sends (SPEC §5), computed independently of the module."""
    fields = {"status": ("id", "phone", "status"), "incoming": ("phone", "mes", "to"),
              "waitcall": ("phone", "ts")}[kind]
    text = ":".join([params[name] for name in fields] + [secret]).encode("utf-8")
    return hashlib.new(alg, text).hexdigest()


############################################################################
# Files
############################################################################

def file_lines(path) -> list:
    """Return the raw lines (bytes, newline kept) of a file; [] when missing."""
    path = Path(path)
    if not path.exists():
        return []
    return path.read_bytes().splitlines(keepends=True)


def intact_events(path) -> list:
    """Return the events of a JSON-lines file, asserting each line is whole JSON."""
    events = []
    for number, line in enumerate(file_lines(path), 1):
        assert line.endswith(b"\n"), "%s: line %d has no newline: %r" % (path, number, line[:80])
        event = json.loads(line)
        assert isinstance(event, dict), "%s: line %d is not an object" % (path, number)
        events.append(event)
    return events


def all_bytes_under(folder) -> dict:
    """Return {path: bytes} of every regular file under folder."""
    found = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, "rb") as file:
                    found[path] = file.read()
    return found


############################################################################
# A configured handler: in process (WebTest) and as real CGI processes
############################################################################

def write_ini(path, sections: dict) -> Path:
    """Write {section: {key: value}} as an ini file; return its path."""
    text = "".join("[%s]\n%s" % (section, "".join("%s = %s\n" % item for item in keys.items()))
                   for section, keys in sections.items())
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


class CGIAnswer:
    """What a CGI process printed: status, headers (lower-case names), body, stderr."""

    def __init__(self, completed: subprocess.CompletedProcess):
        self.returncode = completed.returncode
        self.stderr = completed.stderr
        self.raw = completed.stdout
        head, _, self.body = completed.stdout.partition(b"\r\n\r\n")
        self.headers = {}
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name:
                self.headers[name.strip().lower()] = value.strip()
        status = self.headers.get("status", "")
        self.status = int(status.split()[0]) if status[:3].isdigit() else None

    def __repr__(self):
        return "CGIAnswer(%s, %r, rc=%s, stderr=%r)" % (self.status, self.body[:80], self.returncode,
                                                         self.stderr[-300:])


def cgi_environ(config_path, body=b"", method="POST", query="", content_type=FORM,
                headers=None, remote_addr="127.0.0.1") -> dict:
    """Return the environment a web server gives a CGI script for one request."""
    env = {
        "PATH": os.environ.get("PATH") or "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME") or "/",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": method,
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "QUERY_STRING": query,
        "REMOTE_ADDR": remote_addr,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SCRIPT_NAME": "/handler.cgi",
        "SMSC_HANDLER_CONFIG": str(config_path),
    }
    for name, value in (headers or {}).items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    return env


def run_cgi(config_path, body=b"", timeout=60, **request) -> CGIAnswer:
    """Run the real handler.cgi for one request; return what it printed."""
    completed = subprocess.run(
        [*fast_python(), str(HANDLER_CGI)], input=body, capture_output=True, timeout=timeout,
        env=cgi_environ(config_path, body, **request))
    return CGIAnswer(completed)


class Site:
    """A handler configured from an ini file in `folder`.

    ``sections`` are ini overrides, one dict per section; ``[handler] data_dir``
    defaults to ``data`` (folder/data).
    """

    def __init__(self, folder, name="smsc.ini", **sections):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        merged = {"handler": {"data_dir": "data"}}
        for section, keys in sections.items():
            merged.setdefault(section, {}).update(keys)
        self.config_path = write_ini(self.folder / name, merged)
        self.config = smsc_handler.load_config(str(self.config_path))
        self.data = Path(self.config.data_dir)
        self.app = smsc_handler.make_app(self.config)
        self.testapp = webtest.TestApp(wsgiref.validate.validator(self.app),
                                       extra_environ={"REMOTE_ADDR": "127.0.0.1"})

    def post(self, body: bytes, content_type=FORM, query="", headers=None, expect_errors=False):
        """POST in process; any status, but output on wsgi.errors fails unless expected."""
        url = "/?" + query if query else "/"
        return self.testapp.post(url, params=body, content_type=content_type,
                                 headers=headers or {}, status="*", expect_errors=expect_errors)

    def cgi(self, body: bytes, **request) -> CGIAnswer:
        """POST through the real handler.cgi in a child process."""
        return run_cgi(self.config_path, body, **request)

    def path(self, kind="status") -> Path:
        return self.data / ("%s.jsonl" % kind)

    def lines(self, kind="status") -> list:
        return file_lines(self.path(kind))

    def events(self, kind="status") -> list:
        return intact_events(self.path(kind))

    def state(self):
        """Open the state store read-only-ish (a plain sqlite3 connection)."""
        import sqlite3
        return sqlite3.connect(str(self.data / "state.sqlite3"), timeout=10)


############################################################################
# A hook that records how it was run
############################################################################

#: The recorder reads its environment from /proc (exactly what exec gave it,
#: before Python's locale coercion adds anything), its stdin and argv, writes
#: one JSON file per run, then behaves as its mode file says: ok, fail, hang,
#: spawn (a grandchild `sleep 300` in its process group, then hang), or
#: kill-parent (SIGKILL the handler that runs it: a crash during the hook).
HOOK_SCRIPT = r'''
import json, os, subprocess, sys, time
out = sys.argv[1]
data = sys.stdin.buffer.read()
with open("/proc/self/environ", "rb") as f:
    raw = f.read()
env = {}
for item in raw.split(b"\0"):
    if item:
        name, _, value = item.partition(b"=")
        env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
record = {"argv": sys.argv[1:], "env": env, "stdin": data.decode("latin-1"),
          "cwd": os.getcwd(), "pid": os.getpid(), "pgid": os.getpgid(0)}
name = os.path.join(out, "run-%020d-%d.json" % (time.time_ns(), os.getpid()))
with open(name + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(name + ".tmp", name)
try:
    with open(os.path.join(out, "mode")) as f:
        mode = f.read().strip()
except FileNotFoundError:
    mode = "ok"
if mode == "fail":
    sys.stderr.write("hook says no\n")
    sys.exit(3)
if mode == "hang":
    time.sleep(300)
if mode == "kill-parent":
    os.kill(os.getppid(), 9)
    sys.exit(0)
if mode == "spawn":
    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "grandchild.pid"), "w") as f:
        f.write(str(child.pid))
    time.sleep(300)
sys.exit(0)
'''


class HookRecorder:
    """The recording hook: a script, its output folder, its mode switch."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.script = self.folder / "hook.py"
        self.script.write_text(HOOK_SCRIPT, encoding="utf-8")
        self.out = self.folder / "runs"
        self.out.mkdir(exist_ok=True)

    def command(self, extra: str = "") -> str:
        """The [hook] command line; `extra` is appended as written (shell-like quoting)."""
        argv = [*fast_python(), str(self.script), str(self.out)]
        line = " ".join(shlex.quote(arg) for arg in argv)
        return line + (" " + extra if extra else "")

    def set_mode(self, mode: str) -> None:
        (self.out / "mode").write_text(mode)

    def runs(self) -> list:
        """Return the recorded runs, oldest first."""
        records = []
        for path in sorted(self.out.glob("run-*.json")):
            records.append(json.loads(path.read_text()))
        return records
