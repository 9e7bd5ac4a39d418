"""handler.cgi under every Python the machine has, 3.8 up, also isolated (-I -S).

Shared hosts run whatever python3 they carry. Each interpreter runs the real CGI entry
as a subprocess with a CGI environment and the body on stdin, as Apache would; the
answer must be the exact CGI bytes and the event line must be right. An interpreter
that is not installed here is skipped.
"""

import glob
import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest
from servers_util import SECRET, copy_app, md5_hex, read_jsonl, write_config

#: pyenv's versions folder (the machine image carries 3.8 … 3.13 there)
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")) / "versions"
#: the interpreters to try: pyenv minor versions, then Debian's own
WANTED = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "system"]
#: the whole answer to an accepted callback, as CGIHandler writes it
ACCEPTED = b"Status: 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK"
CYRILLIC = "Привет, мир! Код 1234"


def find_interpreter(wanted):
    """Return the interpreter path for a WANTED entry, or None."""
    if wanted == "system":
        return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else None
    pattern = re.compile(r"^%s\.\d+$" % re.escape(wanted))  # 3.13.0, not 3.13.0t or 3.130
    found = sorted(
        (p for p in glob.glob(str(PYENV_VERSIONS / (wanted + ".*"))) if pattern.match(os.path.basename(p))),
        key=lambda p: int(os.path.basename(p).rsplit(".", 1)[1]),
    )
    for version in reversed(found):
        python = os.path.join(version, "bin", "python3")
        if os.access(python, os.X_OK):
            return python
    return None


INTERPRETERS = [
    pytest.param(find_interpreter(w), flags, id=w + ("-I-S" if flags else ""))
    for w in WANTED
    for flags in ([], ["-I", "-S"])
]


def callback(kind):
    """Return (query, body, match) of one callback as SMSC sends it, and how to find it."""
    if kind == "status":
        params = {"id": "1001", "phone": "79991234567", "status": "1", "ts": "1700000000"}
        return "", urlencode(params).encode(), {"id": "1001"}
    if kind == "incoming":
        params = {"id": "1002", "phone": "79991234568", "mes": CYRILLIC, "to": "79990000000"}
        return "", urlencode(params, encoding="windows-1251").encode(), {"id": "1002"}
    if kind == "incoming-utf8":
        params = {"id": "1003", "phone": "79991234569", "mes": CYRILLIC, "to": "79990000000"}
        return "charset=utf-8", urlencode(params, encoding="utf-8").encode(), {"id": "1003"}
    if kind == "waitcall":
        params = {"waitcall": "1", "phone": "79991234570", "ts": "1700000005"}
        return "", urlencode(params).encode(), {"phone": "79991234570"}
    params = {"id": "1004", "phone": "79991234571", "status": "1", "ts": "1700000006"}
    params["md5"] = md5_hex("1004", "79991234571", "1", SECRET)
    return "", urlencode(params).encode(), {"id": "1004"}


#: the callback kinds and the file each lands in
CASES = {
    "status": "status",
    "incoming": "incoming",
    "incoming-utf8": "incoming",
    "waitcall": "waitcall",
    "signed": "status",
}


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """The handler files in a folder of their own, as dropped onto a host."""
    return copy_app(tmp_path_factory.mktemp("floor") / "app")


def run_cgi(python, flags, app_dir, config, query, body):
    """Run handler.cgi under python as a web server would; return (stdout, stderr)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C",
        "SMSC_HANDLER_CONFIG": str(config),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "QUERY_STRING": query,
        "REMOTE_ADDR": "127.0.0.1",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SCRIPT_NAME": "/handler.cgi",
        "PATH_INFO": "",
    }
    proc = subprocess.run(
        [python, *flags, str(app_dir / "handler.cgi")], input=body, env=env, cwd="/", capture_output=True, timeout=60
    )
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("python, flags", INTERPRETERS)
def test_cgi_callback_is_stored(python, flags, case, app_dir, tmp_path):
    if python is None:
        pytest.skip("interpreter not installed (pyenv install 3.8 … 3.13 provides them)")
    config = write_config(tmp_path / "config.ini", "data")
    query, body, match = callback(case)
    out, err = run_cgi(python, flags, app_dir, config, query, body)
    assert out == ACCEPTED, err.decode("utf-8", "replace")
    assert b"Traceback" not in err, err.decode("utf-8", "replace")
    kind = CASES[case]
    events = read_jsonl(tmp_path / "data" / ("%s.jsonl" % kind))
    assert len(events) == 1, events
    event = events[0]
    for key, value in match.items():
        assert event[key] == value
    assert event["kind"] == kind
    assert event["lossy"] is False
    if kind == "incoming":
        assert event["mes"] == CYRILLIC
        assert event["charset"] == ("utf-8" if query else "windows-1251")
    if case == "signed":
        assert event["signature"] == {"alg": "md5", "valid": True, "key": 0}
    else:
        assert event["signature"] is None
    json.dumps(event)  # a plain JSON object
