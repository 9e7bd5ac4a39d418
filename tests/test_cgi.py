"""The CGI path, byte-exact: wsgiref's BaseCGIHandler in-process, and the real handler.cgi.

Under Apache's mod_cgid a script that exits without reading its POST body leaves the
request hanging, so every answer, refusals included, must consume the declared body.
"""

import json
import os
import subprocess
import sys
from io import BytesIO, StringIO
from urllib.parse import urlencode
from wsgiref.handlers import BaseCGIHandler

import pytest
from conftest import REPO, parse_jsonl

import smsc_handler

SECRET = "test_Secret-42"
FORM = "application/x-www-form-urlencoded"
STATUS_BODY = urlencode({"id": "1001", "phone": "79991234567", "status": "1", "ts": "1700000000"}).encode()
PLAIN = b"Content-Type: text/plain; charset=utf-8\r\n"

ACCEPTED = (b"Status: 200 OK\r\n" + PLAIN +
            b"Content-Length: 2\r\n"
            b"\r\n"
            b"OK")
NOT_ALLOWED = (b"Status: 405 Method Not Allowed\r\n" + PLAIN +
               b"Content-Length: 19\r\n"
               b"Allow: GET, HEAD, POST\r\n"
               b"\r\n"
               b"Method Not Allowed\n")
MALFORMED_JSON = (b"Status: 400 Bad Request\r\n" + PLAIN +
                  b"Content-Length: 28\r\n"
                  b"\r\n"
                  b"Bad Request: malformed JSON\n")
UNAVAILABLE = (b"Status: 503 Service Unavailable\r\n" + PLAIN +
               b"Content-Length: 37\r\n"
               b"Retry-After: 240\r\n"
               b"\r\n"
               b"Service Unavailable: try again later\n")
HEALTH_BODY = ("smsc_handler %s: ready for SMSC callbacks\n" % smsc_handler.__version__).encode()
HEALTH_HEAD = (b"Status: 200 OK\r\n" + PLAIN +
               b"Content-Length: %d\r\n" % len(HEALTH_BODY) +
               b"\r\n")


def cgi_environ(method="POST", body=b"", query="", content_type=FORM, **extra):
    """Return the CGI variables Apache would set for one request."""
    environ = {
        "REQUEST_METHOD": method,
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "CONTENT_TYPE": content_type if body else "",
        "QUERY_STRING": query,
        "REMOTE_ADDR": "127.0.0.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SCRIPT_NAME": "/handler.cgi",
        "PATH_INFO": "",
    }
    environ.update(extra)
    return environ


def run_cgi(app, body=b"", **kwargs):
    """Serve one request through BaseCGIHandler; return (stdout bytes, stdin stream, stderr text)."""
    stdin, stdout, stderr = BytesIO(body), BytesIO(), StringIO()
    handler = BaseCGIHandler(stdin, stdout, stderr, cgi_environ(body=body, **kwargs),
                             multithread=False, multiprocess=True)
    handler.run(app)
    return stdout.getvalue(), stdin, stderr.getvalue()


@pytest.fixture
def cgi_app(config):
    return smsc_handler.make_app(config)


############################################################################
# Exact bytes
############################################################################

def test_accepted_callback_is_exact_cgi_bytes(cgi_app, read_lines):
    out, _stdin, errors = run_cgi(cgi_app, STATUS_BODY)
    assert out == ACCEPTED
    assert errors == ""
    assert [line["id"] for line in read_lines("status.jsonl")] == ["1001"]


def test_other_method_is_exact_cgi_bytes(cgi_app):
    out, _stdin, errors = run_cgi(cgi_app, STATUS_BODY, method="PUT")
    assert out == NOT_ALLOWED
    assert errors == ""


def test_unparsable_body_is_exact_cgi_bytes(cgi_app):
    out, _stdin, _errors = run_cgi(cgi_app, b'{"phone": ', content_type="application/json")
    assert out == MALFORMED_JSON


def test_storage_failure_is_exact_cgi_bytes(cgi_app, data_dir):
    data_dir.write_bytes(b"")  # a file where the folder should be
    out, _stdin, _errors = run_cgi(cgi_app, STATUS_BODY)
    assert out == UNAVAILABLE


def test_bare_get_is_exact_cgi_bytes(cgi_app):
    out, _stdin, _errors = run_cgi(cgi_app, method="GET")
    assert out == HEALTH_HEAD + HEALTH_BODY


def test_head_is_exact_cgi_bytes_without_body(cgi_app, data_dir):
    out, _stdin, _errors = run_cgi(cgi_app, method="HEAD", query=STATUS_BODY.decode())
    assert out == HEALTH_HEAD
    assert not data_dir.exists()


############################################################################
# The whole declared body is read on every path
############################################################################

BIG_BODY = STATUS_BODY + b"&cmt=" + b"x" * 5000

#: name -> (config sections, request keyword arguments, body, expected status line)
REFUSALS = {
    "405 PUT": ({}, {"method": "PUT"}, STATUS_BODY, b"Status: 405 "),
    "405 DELETE": ({}, {"method": "DELETE"}, STATUS_BODY, b"Status: 405 "),
    "413": ({"handler": {"max_body_bytes": "256"}}, {}, BIG_BODY, b"Status: 413 "),
    "403 allowed_ips": ({"handler": {"allowed_ips": "10.0.0.0/8"}}, {}, STATUS_BODY, b"Status: 403 "),
    "403 bad signature": ({"handler": {"secret": SECRET}}, {}, STATUS_BODY + b"&md5=" + b"0" * 32,
                          b"Status: 403 "),
    "404 bad signature": ({"handler": {"secret": SECRET, "bad_signature_status": "404"}}, {},
                          STATUS_BODY + b"&md5=" + b"0" * 32, b"Status: 404 "),
    "403 missing signature": ({"handler": {"secret": SECRET}}, {}, STATUS_BODY, b"Status: 403 "),
    "400 bad JSON": ({}, {"content_type": "application/json"}, b"{" + b"x" * 3000, b"Status: 400 "),
    "400 no phone": ({}, {}, b"id=1&status=1", b"Status: 400 "),
    "health GET with a body": ({}, {"method": "GET"}, BIG_BODY, b"Status: 200 "),
    "HEAD with a body": ({}, {"method": "HEAD"}, BIG_BODY, b"Status: 200 "),
}


@pytest.mark.parametrize("sections, kwargs, body, status", list(REFUSALS.values()), ids=list(REFUSALS))
def test_declared_body_is_fully_read(make_config, sections, kwargs, body, status):
    app = smsc_handler.make_app(smsc_handler.load_config(str(make_config(**sections))))
    out, stdin, errors = run_cgi(app, body, **kwargs)
    assert out.startswith(status)
    assert stdin.tell() == len(body)
    assert errors == ""


def test_declared_body_is_fully_read_with_a_broken_config(make_config):
    path = make_config(handler={"timezone": "nowhere"})
    out, stdin, _errors = run_cgi(smsc_handler.load_app(str(path)), BIG_BODY)
    assert out == UNAVAILABLE
    assert stdin.tell() == len(BIG_BODY)


def test_declared_body_is_fully_read_on_storage_failure(cgi_app, data_dir):
    data_dir.write_bytes(b"")
    _out, stdin, _errors = run_cgi(cgi_app, BIG_BODY)
    assert stdin.tell() == len(BIG_BODY)


############################################################################
# The real handler.cgi, as Apache runs it
############################################################################

def run_script(script, config_path, body=b"", **kwargs):
    """Execute a CGI script as a subprocess; return the CompletedProcess."""
    environ = {"PATH": os.environ.get("PATH", os.defpath), "SMSC_HANDLER_CONFIG": str(config_path)}
    environ.update(cgi_environ(body=body, **kwargs))
    return subprocess.run([sys.executable, script], cwd=str(REPO), env=environ, input=body,
                          capture_output=True, timeout=30)


def test_handler_cgi_stores_a_callback(config_path, data_dir):
    done = run_script("handler.cgi", config_path, STATUS_BODY)
    assert done.stdout == ACCEPTED, done.stderr.decode()
    assert done.returncode == 0
    (line,) = parse_jsonl(data_dir / "status.jsonl")
    assert (line["kind"], line["id"], line["status"], line["remote_addr"]) == ("status", "1001", 1, "127.0.0.1")


def test_handler_cgi_answers_a_refusal(config_path, data_dir):
    done = run_script("handler.cgi", config_path, STATUS_BODY, method="PUT")
    assert done.stdout == NOT_ALLOWED
    assert b"Traceback" not in done.stderr
    assert not data_dir.exists()


def test_handler_cgi_with_a_broken_config_answers_503(make_config, tmp_path):
    path = make_config(handler={"file_mode": "0400"})
    done = run_script("handler.cgi", path, STATUS_BODY)
    assert done.stdout == UNAVAILABLE
    assert b"[handler] file_mode" in done.stderr and b"Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_handler_cgi_with_a_missing_named_config_answers_503(tmp_path):
    done = run_script("handler.cgi", tmp_path / "missing.ini", STATUS_BODY)
    assert done.stdout == UNAVAILABLE


def test_module_run_as_cgi_script_stores_a_callback(config_path, data_dir):
    done = run_script("smsc_handler.py", config_path, STATUS_BODY)
    assert done.stdout == ACCEPTED, done.stderr.decode()
    assert len(parse_jsonl(data_dir / "status.jsonl")) == 1


def test_handler_cgi_event_line_is_one_json_object(config_path, data_dir):
    body = urlencode({"id": "7", "phone": "79990000001", "mes": "Привет\u2028мир", "to": "79990000002"},
                     encoding="utf-8").encode() + b"&charset=utf-8"
    done = run_script("handler.cgi", config_path, body)
    assert done.stdout == ACCEPTED, done.stderr.decode()
    raw = (data_dir / "incoming.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n") and raw.isascii()
    assert json.loads(raw)["mes"] == "Привет\u2028мир"
