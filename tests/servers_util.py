"""Helpers for the real-server tests: processes, ports, templated deploy files, requests.

The deploy recipes under ``deploy/`` are the very files the tests run: their example
paths (``/opt/smsc_handler``, ``/etc/smsc_handler``, …) are replaced by temporary ones,
and a path that is no longer in the file fails the test, so README and tests can't drift.
"""

import configparser
import hashlib
import http.client
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

#: repository root (the files users copy)
REPO = Path(__file__).resolve().parents[1]
#: the deploy recipes
DEPLOY = REPO / "deploy"
#: the files a deployment needs; the tests copy them into a temporary app folder
APP_FILES = ("handler.cgi", "smsc_handler.py", "wsgi.py", "config.ini")
#: the secret written into every test deployment's config
SECRET = "test_Secret-42"
#: user that Apache, nginx and the uWSGI unit run as (Debian's default)
WEB_USER = "www-data"
#: what /etc/apache2/envvars gives Apache: no pyenv shims, so `env python3` is Debian's
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


############################################################################
# Files and users
############################################################################


def app_source() -> Path:
    """Return the folder holding the handler files (SMSC_TEST_APP_DIR overrides)."""
    return Path(os.environ.get("SMSC_TEST_APP_DIR") or REPO)


def web_user():
    """Return the pwd entry of www-data when we are root and it exists, else None.

    Only root can start servers that switch to another user; without root everything
    runs as the current user, which still tests the configs.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(WEB_USER)
    except KeyError:
        return None


def shared_tmpdir(prefix: str) -> Path:
    """Make a fresh folder under /tmp that the web user can traverse and read.

    pytest's own tmp_path lives under /tmp/pytest-of-root/ (mode 0700): www-data can't
    reach it, so server-side folders are made here and removed by the fixture.
    """
    path = Path(subprocess.check_output(["mktemp", "-d", "/tmp/%s.XXXXXX" % prefix], text=True).strip())
    path.chmod(0o755)
    return path


def give_to_web_user(path: Path) -> None:
    """Make path (recursively) owned by the web user, as if it had made it."""
    user = web_user()
    if user is None:
        return
    for root, _dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def copy_app(dest: Path) -> Path:
    """Copy the handler files into dest (created), keeping handler.cgi executable."""
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    src = app_source()
    for name in APP_FILES:
        shutil.copy2(src / name, dest / name)
        (dest / name).chmod(0o755 if name.endswith(".cgi") else 0o644)
    return dest


def write_config(path: Path, data_dir: str, secret: str = SECRET) -> Path:
    """Write a config derived from the sample config.ini: data_dir and a secret set.

    ``require_signature = no`` lets unsigned callbacks in while a wrong hash is still
    refused (SPEC §9), so one deployment covers signed, unsigned and refused requests.
    """
    parser = configparser.ConfigParser(interpolation=None)
    with open(app_source() / "config.ini", encoding="utf-8") as f:
        parser.read_file(f)
    if not parser.has_section("handler"):
        parser.add_section("handler")
    parser.set("handler", "data_dir", data_dir)
    parser.set("handler", "secret", secret)
    parser.set("handler", "require_signature", "no")
    with open(path, "w", encoding="utf-8") as f:
        parser.write(f)
    path.chmod(0o644)
    return path


def render(template: Path, replacements: dict, dest: Path) -> Path:
    """Write template with each example value replaced; fail if one is missing.

    Longer keys are replaced first so ``/opt/smsc_handler/venv`` wins over
    ``/opt/smsc_handler``.
    """
    text = template.read_text(encoding="utf-8")
    for old in sorted(replacements, key=len, reverse=True):
        if old not in text:
            raise AssertionError("%s no longer contains %r: update the test" % (template, old))
        text = text.replace(old, replacements[old])
    dest.write_text(text, encoding="utf-8")
    dest.chmod(0o644)
    return dest


def read_unit(path: Path) -> dict:
    """Read the [Service] keys of a systemd unit (Environment= may repeat)."""
    service = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section == "Service":
            if key == "Environment":
                service.setdefault(key, []).append(value)
            else:
                service[key] = value
    return service


def unit_environment(unit: dict) -> dict:
    """Return the unit's Environment= assignments as a dict."""
    env = {}
    for value in unit.get("Environment", []):
        for item in shlex.split(value):
            name, _, val = item.partition("=")
            env[name] = val
    return env


def read_jsonl(path: Path) -> list:
    """Return the events stored in one JSON-lines file ([] when it doesn't exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


############################################################################
# Processes and ports
############################################################################


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process, in its own process group so that stop() ends all of it."""

    def __init__(self, name, argv, log, env=None, cwd=None, user=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = Path(log)
        self.logs = [self.log]
        kwargs = {}
        if user is not None:

            def demote(uid=user.pw_uid, gid=user.pw_gid):
                os.setgid(gid)
                os.setgroups([gid])
                os.setuid(uid)

            kwargs["preexec_fn"] = demote
        self._logfile = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            **kwargs,
        )

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        """Wait until port accepts connections; fail with the log if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (self.name, self.proc.returncode, self.tail()))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("%s did not listen on %d in %.0f s:\n%s" % (self.name, port, timeout, self.tail()))

    def tail(self, lines: int = 40) -> str:
        """Return the end of every log this server wrote."""
        out = []
        for log in self.logs:
            try:
                text = log.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            out.append("==> %s <==\n%s" % (log, "\n".join(text.splitlines()[-lines:])))
        return "\n".join(out)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the whole process group, then kill it if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # children (CGI scripts, workers) may outlive the leader for a moment
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._logfile.close()


############################################################################
# Requests as SMSC sends them
############################################################################


class Answer:
    """An HTTP answer and how long it took."""

    def __init__(self, status, headers, body, seconds):
        self.status = status
        self.headers = headers
        self.body = body
        self.seconds = seconds

    def __repr__(self):
        return "<Answer %d %r in %.3f s>" % (self.status, self.body[:80], self.seconds)


def request(
    port: int, method: str, path: str, body: bytes = None, headers: dict = None, timeout: float = 30.0
) -> Answer:
    """Send one request to 127.0.0.1:port and time it (connect to last byte)."""
    headers = dict(headers or {})
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - start)


def post_form(port: int, path: str, params: dict, query: dict = None, charset: str = "windows-1251", **kw) -> Answer:
    """POST params as SMSC's default form body, encoded in charset; query goes in the URL."""
    body = urlencode(params, encoding=charset).encode("ascii")
    if query:
        path += ("&" if "?" in path else "?") + urlencode(query)
    return request(
        port, "POST", path, body, {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "SMSC test"}, **kw
    )


def md5_hex(*parts: str) -> str:
    """Return SMSC's md5 control hash of the ':'-joined parts (the last is the secret)."""
    return hashlib.md5(":".join(parts).encode("utf-8")).hexdigest()
