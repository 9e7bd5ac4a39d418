"""Shared helpers for the benchmarks: statistics, callback bodies, configs, processes.

Everything here is standard library, so ``python3 bench/run.py`` works before any
tool is installed; each section skips what it can't run and says why.
"""

import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

#: the repository root (the files users copy onto a host)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the small apps the handler is compared with
APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
#: the files a deployment needs
APP_FILES = ("handler.cgi", "smsc_handler.py", "wsgi.py", "config.ini")
#: the secret every benchmark config and body uses
SECRET = "bench_Secret-42"
#: a phone number that looks like SMSC's
PHONE = "79991234567"
#: what /etc/apache2/envvars gives Apache: `env python3` finds Debian's interpreter
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


############################################################################
# Statistics
############################################################################


def median(values):
    """Return the median of a non-empty sequence (None when empty)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(numerators, denominators):
    """Return the median of run-by-run ratios a[i] / b[i].

    Both lists hold one value per run, measured in the same round, so a noisy
    moment on the machine hits both sides of each ratio alike.
    """
    ratios = [a / b for a, b in zip(numerators, denominators) if a and b]
    return median(ratios)


def spread(values):
    """Return (min, max) of a sequence, for the 'runs ranged from' note."""
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (None, None)


############################################################################
# Callback bodies (what SMSC sends)
############################################################################


def md5_hex(text):
    """Return the md5 hex digest of a str (ASCII callbacks only)."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def status_params(n, secret=SECRET, ts=1700000000):
    """Return the parameters of status callback number n, signed with md5."""
    msg_id = str(n)
    return [
        ("id", msg_id), ("phone", PHONE), ("status", "1"), ("err", "0"), ("ts", str(ts)),
        ("time", "14.11.23 12:00:00"), ("cnt", "1"), ("type", "0"), ("cost", "1.50"),
        ("flag", "0"), ("sender", "SMSC.RU"),
        ("md5", md5_hex("%s:%s:1:%s" % (msg_id, PHONE, secret))),
    ]


def form_body(n, secret=SECRET, ts=1700000000):
    """Return a form-urlencoded status callback (SMSC's default format)."""
    from urllib.parse import urlencode
    return urlencode(status_params(n, secret, ts)).encode("ascii")


def json_body(n, secret=SECRET, ts=1700000000):
    """Return the same callback as fmt=3 JSON (numbers as numbers)."""
    obj = {}
    for name, value in status_params(n, secret, ts):
        obj[name] = int(value) if value.isdigit() and name not in ("id", "phone") else value
    return json.dumps(obj).encode("ascii")


def xml_body(n, secret=SECRET, ts=1700000000):
    """Return the same callback as fmt=2 XML."""
    children = "".join("<%s>%s</%s>" % (k, v, k) for k, v in status_params(n, secret, ts))
    return ("<?xml version=\"1.0\" encoding=\"utf-8\"?><data>%s</data>" % children).encode("ascii")


BODIES = {"form": form_body, "json": json_body, "xml": xml_body}
CONTENT_TYPES = {
    "form": "application/x-www-form-urlencoded",
    "json": "application/json",
    "xml": "application/xml",
}


class Counter:
    """Hands out callback numbers never used before in this process (unique event ids)."""

    def __init__(self, start=None):
        self.value = start if start is not None else int(time.time() * 1000) % 10 ** 9 * 1000

    def take(self, count=1):
        first = self.value
        self.value += count
        return range(first, first + count)


COUNTER = Counter()


############################################################################
# Configs and app folders
############################################################################


def write_config(path, data_dir, fsync=True, dedupe=True, secret=SECRET):
    """Write a handler config: the built-in defaults plus data_dir, secret, fsync, dedupe."""
    text = (
        "# written by bench/common.py\n"
        "[handler]\ndata_dir = %s\nsecret = %s\n"
        "[jsonl]\nfsync = %s\n"
        "[dedupe]\nenabled = %s\n"
        % (data_dir, secret, "yes" if fsync else "no", "yes" if dedupe else "no")
    )
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return path


def copy_app(app_dir, dest, python=None):
    """Copy the handler files into dest; byte-compile them with `python` when given.

    The benchmarks never run the repository's own copy, so no __pycache__ or data
    folder is left in the work tree.
    """
    os.makedirs(dest, exist_ok=True)
    for name in APP_FILES:
        shutil.copy2(os.path.join(app_dir, name), os.path.join(dest, name))
    os.chmod(os.path.join(dest, "handler.cgi"), 0o755)
    if python:
        subprocess.run([python, "-m", "compileall", "-q", dest], check=True,
                       stdout=subprocess.DEVNULL)
    return dest


def make_workdir(base=None):
    """Create the folder that holds configs, data and logs (removed at exit unless kept)."""
    base = base or os.environ.get("BENCH_TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    return tempfile.mkdtemp(prefix="smsc-bench.", dir=base)


def filesystem_of(path):
    """Return 'type (device)' of the filesystem holding path, from /proc/mounts."""
    best, found = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                device, point, kind = line.split()[:3]
                point = point.replace("\\040", " ")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, found = point, "%s (%s on %s)" % (kind, device, point)
    except OSError:
        pass
    return found


def count_lines(path):
    """Return the number of lines in a file (0 when missing)."""
    try:
        with open(path, "rb") as file:
            return sum(1 for _ in file)
    except FileNotFoundError:
        return 0


############################################################################
# Machine description
############################################################################


def machine_info():
    """Return facts about this machine for the report header."""
    info = {"python": sys.version.split()[0], "executable": sys.executable}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpu:
            names = [line.split(":", 1)[1].strip() for line in cpu if line.startswith("model name")]
        info["cpu"] = "%s x %d" % (names[0], len(names)) if names else "unknown"
    except OSError:
        info["cpu"] = "unknown"
    info["cores"] = os.cpu_count()
    try:
        with open("/proc/meminfo", encoding="utf-8") as mem:
            info["memory_gb"] = round(int(mem.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    uname = os.uname()
    info["kernel"] = "%s %s" % (uname.sysname, uname.release)
    try:
        with open("/etc/os-release", encoding="utf-8") as osr:
            for line in osr:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        info["loadavg"] = " ".join(open("/proc/loadavg", encoding="utf-8").read().split()[:3])
    except OSError:
        pass
    return info


def tool_version(argv, pattern=None):
    """Return the first line (or pattern match) of a tool's version output, or None."""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.decode("utf-8", "replace")
    if pattern:
        match = re.search(pattern, text)
        return match.group(0) if match else None
    return text.strip().splitlines()[0] if text.strip() else None


############################################################################
# Processes and ports
############################################################################

#: every process group we started, so an interrupted run still stops them
_STARTED = []


#: ports handed out by free_port(), never handed out twice
_GIVEN_PORTS = set()


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on now and that no other call returned."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise OSError("no free port found")


def wait_port(port, proc=None, timeout=30.0):
    """Wait until 127.0.0.1:port accepts connections; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Server:
    """A server process in its own process group: stop() ends it and all its children."""

    def __init__(self, name, argv, log, env=None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        self._logfile = open(log, "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._logfile,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        _STARTED.append(self)

    def stop(self, timeout=10.0):
        """Send SIGTERM (then SIGKILL) to the server's process group; wait for it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children a master left behind
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._logfile.close()
        if self in _STARTED:
            _STARTED.remove(self)

    def tail(self, lines=20):
        """Return the last lines of the server's log, for error messages."""
        try:
            with open(self.log, "rb") as file:
                return b"\n".join(file.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""


def stop_all():
    """Stop every server still running (atexit and signal handlers call this)."""
    for server in list(_STARTED):
        try:
            server.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(stop_all)


def proc_stats():
    """Yield (pid, fields) of every live process: /proc/PID/stat after "pid (comm) " (state, ppid, ...)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as file:
                stat = file.read()
        except OSError:
            continue  # ended meanwhile
        yield int(entry), stat[stat.rfind(b")") + 2:].split()


def session_cpu(sid):
    """Return the CPU seconds (user + system) used so far by the live processes of session `sid`."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for _pid, fields in proc_stats():
        if int(fields[3]) == sid:  # session id
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def which(name, path=None):
    """Return the full path of a program, or None."""
    return shutil.which(name, path=path)


def http_post(port, body, content_type, path="/", timeout=10):
    """POST once to 127.0.0.1:port; return (status, body)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def progress(message):
    """Print a progress line on stderr (the report itself goes to stdout or a file)."""
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()
