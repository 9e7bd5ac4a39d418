"""Issue 11, the request path: promises a security review broke, each kept as a class.

Numbers that can't raise (1), no cross-kind reuse of a hash and an incoming identity that a
forgery can't take (2), the hash algorithm pinned (3), configs that can't keep their promise
refused at load (5, 8), bodies read whole or refused under every gateway (6, 10, 12), log
lines that a client can't forge (11), SMSC's other time shape and e-mail codes (25, 26), and
two secrets while one is rotated (27). Real files, real sockets, real subprocesses.
"""

import calendar
import hashlib
import json
import logging
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
import zlib
from datetime import datetime
from io import BytesIO, StringIO
from wsgiref.util import setup_testing_defaults

import pytest
from cli_util import SCRIPT, clean_env, run_cli
from cli_util import write_config as write_cli_config
from proof_util import (
    FORM,
    HANDLER_CGI,
    PHONE,
    Site,
    as_json,
    as_xml,
    cgi_environ,
    fast_python,
    form,
    incoming_callback,
    run_cgi,
    sign,
    status_callback,
    waitcall_callback,
)

import smsc_handler
from smsc_handler import ConfigError, SignatureError, load_config

SECRET = "Hard-Secret_11"
OLD_SECRET = "Old-Secret_10"


def signed(params, alg="md5", secret=SECRET):
    """The params with the control hash SMSC would add (computed outside the module)."""
    kind = smsc_handler.classify(params)
    if alg == "crc32":
        fields = smsc_handler.SIGNED_FIELDS[kind]
        text = ":".join([params[name] for name in fields] + [secret]).encode("utf-8")
        return dict(params, crc32=str(zlib.crc32(text)))
    return dict(params, **{alg: sign(kind, params, secret, alg)})


def call(app, body=b"", query="", method="POST", content_type=FORM, extra=None, stream=None):
    """Run one request through a WSGI app; return (status, body, wsgi.errors text)."""
    environ = {}
    setup_testing_defaults(environ)
    errors = StringIO()
    environ.update({"REQUEST_METHOD": method, "QUERY_STRING": query, "CONTENT_TYPE": content_type,
                    "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
                    "wsgi.input": BytesIO(body) if stream is None else stream, "wsgi.errors": errors})
    environ.update(extra or {})
    environ = {k: v for k, v in environ.items() if v is not None}
    started = []
    out = b"".join(app(environ, lambda status, headers, exc_info=None: started.append(status)))
    return int(started[0][:3]), out, errors.getvalue()


def uform(params):
    """A form body in utf-8 that says so (the default charset is windows-1251)."""
    return form(params) + b"&charset=utf-8"


def rejected(site):
    path = site.data / "rejected.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


############################################################################
# 1. No text -> number conversion raises, whatever its length or digits
############################################################################

HUGE = ["9" * 4301, "1" * 20000, "-" + "9" * 5000, "0." + "5" * 5000, "1e" + "9" * 5000,
        "\u0661" * 5000, "\u00b2" * 4400, "9" * 5000 + ":00", "overtime: " + "9" * 4301 + ":00",
        "overtime: 00:" + "9" * 4301, "overtime: " + "\u0663" * 5000 + ":05"]


@pytest.mark.parametrize("cmt", ["overtime: " + "9" * 4301 + ":00", "overtime: " + "7" * 100000 + ":00",
                                 "overtime: 01:" + "5" * 4301, "overtime: \u0661\u0662:\u0663\u0664"])
def test_overtime_with_a_huge_digit_run_is_stored_not_a_500(tmp_path, cmt):
    # The 500: cmt is unsigned, so this came with a valid hash and SMSC's 50 retries failed.
    site = Site(tmp_path, handler={"secret": SECRET, "max_body_bytes": "1048576"})
    status, out, errors = call(site.app, uform(signed(status_callback(cmt=cmt))))
    assert (status, out, errors) == (200, b"OK", "")
    (event,) = site.events()
    assert event["cmt"] == cmt and event["overtime_s"] is None


def test_overtime_with_a_huge_digit_run_is_stored_under_cgi(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET})
    answer = site.cgi(form(signed(status_callback(cmt="overtime: " + "9" * 4301 + ":00"))))
    assert (answer.status, answer.body, answer.stderr) == (200, b"OK", b"")
    assert site.events()[0]["overtime_s"] is None


UNSIGNED = {
    "status": ["err", "ts", "time", "cnt", "type", "cost", "flag", "syserr", "sender", "cmt", "dtmf",
               "calltime", "callmenu", "ringtime", "imsi", "mcc", "mnc", "net"],
    "incoming": ["id", "sms_id", "smsc", "sent", "time"],
    "waitcall": ["calltime", "callmenu", "ringtime"],
}
CALLBACKS = {"status": status_callback, "incoming": incoming_callback, "waitcall": waitcall_callback}


def every_unsigned_field():
    for kind, names in UNSIGNED.items():
        for name in names:
            yield kind, name


@pytest.mark.parametrize(("kind", "name"), list(every_unsigned_field()))
def test_every_unsigned_field_takes_huge_digit_runs_in_every_format_and_charset(tmp_path, kind, name):
    site = Site(tmp_path, handler={"secret": SECRET, "max_body_bytes": "1048576"},
                jsonl={"fsync": "no"}, dedupe={"enabled": "no"})
    sent = 0
    for value in HUGE:
        params = signed(CALLBACKS[kind](**{name: value}))
        bodies = [(form(params, charset) + b"&charset=" + charset.encode(), FORM)
                  for charset in ("utf-8", "windows-1251", "koi8-r") if _encodes(value, charset)]
        bodies += [(as_json(params), "application/json"), (as_xml(params), "application/xml")]
        if value.lstrip("-").replace(".", "").replace("e", "").isdigit() and value.isascii():
            text = json.dumps(params).replace('"%s": "%s"' % (name, value), '"%s": %s' % (name, value))
            bodies.append((text.encode(), "application/json"))  # a bare JSON number
        for body, content_type in bodies:
            status, out, errors = call(site.app, body, content_type=content_type)
            assert (status, out, errors) == (200, b"OK", ""), (name, value[:20], content_type)
            sent += 1
    events = site.events(kind)
    assert len(events) == sent
    assert all(event["params"][name] in HUGE for event in events)


def _encodes(text, charset):
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.parametrize("length", ["9" * 5000, "\u0661\u0662", "1_0", " 12", "+12", "-5", "1e3", "0x10"])
def test_a_content_length_that_is_not_ascii_digits_is_a_400_never_a_500(tmp_path, length):
    site = Site(tmp_path)
    body = form(status_callback())
    status, out, errors = call(site.app, body, extra={"CONTENT_LENGTH": length})
    assert (status, errors) == (400, "")
    assert b"Content-Length" in out
    assert site.events() == []


@pytest.mark.parametrize(("section", "key", "value"), [
    ("handler", "max_body_bytes", "9" * 5000), ("handler", "max_body_bytes", "0" * 30 + "9" * 4301),
    ("dedupe", "keep_days", "7" * 4301), ("rejected", "max_bytes", "1" + "0" * 4400),
    ("hook", "timeout", "9" * 5000), ("hook", "timeout", "1." + "0" * 5000),
])
def test_a_config_number_with_thousands_of_digits_is_out_of_range(make_config, section, key, value):
    # int() of 4,301+ digits raises "Exceeds the limit (4300 digits)": the message must name the range.
    with pytest.raises(ConfigError) as caught:
        load_config(str(make_config(**{section: {key: value}})))
    assert "[%s] %s" % (section, key) in caught.value.reason
    assert "expected" in caught.value.reason and "from" in caught.value.reason
    assert "4300" not in caught.value.reason and "int_max_str_digits" not in caught.value.reason


def test_status_time_with_huge_fields_is_null_quickly():
    started = time.monotonic()
    for text in ("1" * 5000 + ".01.24 10:00:00", "01.01." + "2" * 5000 + " 10:00:00", "01.01.24 " + "1" * 5000):
        assert smsc_handler._local_time(text, "+03:00") is None
    assert time.monotonic() - started < 1


############################################################################
# 2. Cross-kind forgery: a hash counts only for fields of its kind's shape
############################################################################

def test_a_captured_status_hash_does_not_validate_an_incoming(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET})
    captured = signed(status_callback(id="31337", phone=PHONE, status="1"))
    # id:phone:status = phone:mes:to with phone=id, mes=phone, to=status: the same hashed string
    forged = {"id": "1", "phone": "31337", "mes": PHONE, "to": "1", "md5": captured["md5"]}
    assert smsc_handler.control_hash("md5", b"31337:%s:1:%s" % (PHONE.encode(), SECRET.encode())) == forged["md5"]
    status, _out, errors = call(site.app, uform(forged))
    assert (status, errors) == (403, "")
    assert site.events("incoming") == []
    (kept,) = rejected(site)
    assert kept["status"] == 403 and "to is not a phone number" in kept["reason"]


def test_a_captured_status_hash_does_not_validate_a_waitcall(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET, "bad_signature_status": "404"})
    captured = signed(status_callback(id="31337", phone=PHONE, status="1"))
    forged = {"waitcall": "1", "phone": "31337", "ts": PHONE + ":1", "md5": captured["md5"]}
    status, _out, errors = call(site.app, uform(forged))
    assert (status, errors) == (404, "")
    assert site.events("waitcall") == []
    assert "ts is not an integer" in rejected(site)[0]["reason"]


@pytest.mark.parametrize(("kind", "params", "problem"), [
    ("status", status_callback(phone="7999:1"), "phone"),
    ("status", status_callback(phone="12"), "phone"),
    ("status", status_callback(phone="+7 999 123"), "phone"),
    ("status", status_callback(phone="\u0667\u0669\u0669\u0669"), "phone"),
    ("status", status_callback(status="12345"), "status"),
    ("status", status_callback(status="1.0"), "status"),
    ("status", status_callback(status="+1"), "status"),
    ("incoming", incoming_callback(to="12"), "to"),
    ("incoming", incoming_callback(to="shop@example.com"), "to"),
    ("waitcall", waitcall_callback(ts="17e8"), "ts"),
    ("waitcall", dict(waitcall_callback(), waitcall="2"), "waitcall"),
])
def test_a_correct_hash_over_fields_without_their_kind_shape_is_refused(tmp_path, kind, params, problem):
    site = Site(tmp_path, handler={"secret": SECRET})
    status, _out, errors = call(site.app, uform(signed(params)))
    assert (status, errors) == (403, "")
    assert site.events(kind) == []
    assert problem in rejected(site)[0]["reason"]


@pytest.mark.parametrize("params", [
    status_callback(phone="client@example.com"),  # an e-mail message's status
    status_callback(phone="+79991234567", status="-3"), status_callback(status="9999"),
    incoming_callback(to="+79000000000", mes="a:b:c"), incoming_callback(phone="7377", to="123"),
    waitcall_callback(ts="0"),
])
def test_callbacks_of_their_kind_shape_still_verify(tmp_path, params):
    site = Site(tmp_path, handler={"secret": SECRET})
    status, out, errors = call(site.app, uform(signed(params)))
    assert (status, out, errors) == (200, b"OK", "")


def test_a_forged_incoming_with_a_future_id_cannot_make_the_genuine_sms_a_duplicate(tmp_path):
    # The id is unsigned: a forger replays a captured incoming's signed fields with the id the
    # next genuine SMS will carry. With identity = id alone, that SMS was answered 200, never stored.
    site = Site(tmp_path, handler={"secret": SECRET})
    captured = signed(incoming_callback(id="5001", mes="captured text"))
    assert call(site.app, uform(captured))[0] == 200
    forged = dict(captured, id="5002")
    assert call(site.app, uform(forged))[0] == 200  # the protocol can't tell: its hash is right
    genuine = signed(incoming_callback(id="5002", mes="the real message"))
    assert call(site.app, uform(genuine))[0] == 200
    assert [e["mes"] for e in site.events("incoming")] == ["captured text", "captured text", "the real message"]
    assert call(site.app, uform(genuine))[0] == 200  # SMSC's retry is still one event
    assert len(site.events("incoming")) == 3


def test_an_incoming_without_id_is_known_by_sent_with_its_signed_fields(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET})
    params = {k: v for k, v in incoming_callback().items() if k != "id"}
    for body in (form(signed(params)), form(signed(params)), form(signed(dict(params, sent="1700000001")))):
        assert call(site.app, body)[0] == 200
    assert [e["sent"] for e in site.events("incoming")] == [1700000000, 1700000001]


############################################################################
# 3. [handler] hash_alg: crc32 only when named
############################################################################

@pytest.mark.parametrize(("hash_alg", "alg", "accepted"), [
    ("auto", "md5", True), ("auto", "sha1", True), ("auto", "crc32", False),
    ("md5", "md5", True), ("md5", "sha1", False), ("md5", "crc32", False),
    ("sha1", "sha1", True), ("sha1", "md5", False),
    ("crc32", "crc32", True), ("crc32", "md5", False),
])
def test_hash_alg_decides_which_correct_hash_counts(tmp_path, hash_alg, alg, accepted):
    site = Site(tmp_path, handler={"secret": SECRET, "hash_alg": hash_alg})
    status, _out, errors = call(site.app, uform(signed(status_callback(), alg)))
    assert errors == ""
    if accepted:
        assert status == 200 and site.events()[0]["signature"] == {"alg": alg, "valid": True, "key": 0}
    else:
        assert status == 403 and site.events() == []
        assert "hash_alg = %s" % hash_alg in rejected(site)[0]["reason"]


def test_a_correct_md5_beside_a_crc32_is_refused_under_auto(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET})
    params = signed(signed(status_callback()), "crc32")
    assert call(site.app, uform(params))[0] == 403


def test_sign_takes_its_default_algorithm_from_hash_alg(tmp_path):
    fields = ["id=1", "phone=79991234567", "status=1"]
    for hash_alg, expected in (("auto", "md5"), ("sha1", "sha1"), ("crc32", "crc32")):
        path = write_cli_config(tmp_path / hash_alg, handler={"secret": SECRET, "hash_alg": hash_alg})
        done = run_cli("sign", "--config", path, "--kind", "status", "--secret", SECRET, *fields)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == smsc_handler.control_hash(expected, b"1:79991234567:1:" + SECRET.encode())


def test_verify_explains_a_crc32_refused_by_hash_alg(tmp_path):
    path = write_cli_config(tmp_path, handler={"secret": SECRET})
    capture = tmp_path / "request.txt"
    body = form(signed(status_callback(), "crc32"))
    capture.write_bytes(b"POST / HTTP/1.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                        % (FORM.encode(), len(body), body))
    done = run_cli("verify", "--config", path, capture)
    assert done.returncode == 1
    assert "hash_alg = auto accepts md5 or sha1: a crc32 hash is refused" in done.stdout


def test_check_warns_about_crc32_and_about_two_secrets(tmp_path):
    path = write_cli_config(tmp_path, handler={"secret": SECRET + ", " + OLD_SECRET, "hash_alg": "crc32"})
    done = run_cli("check", "--config", path)
    assert "two secrets" in done.stdout and "hash_alg = crc32" in done.stdout
    assert SECRET not in done.stdout + done.stderr and OLD_SECRET not in done.stdout + done.stderr


############################################################################
# 5, 8. Configs that can't keep their promise are refused at load
############################################################################

def test_jsonl_off_with_a_hook_whose_failures_are_ignored_is_refused(make_config):
    path = make_config(jsonl={"enabled": "no"}, hook={"command": "/bin/true", "on_failure": "ignore"})
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "[jsonl] enabled = no" in caught.value.reason and "on_failure = ignore" in caught.value.reason


def test_a_nul_in_the_hook_command_answers_503_not_500(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[handler]\ndata_dir = data\n[hook]\ncommand = /bin/echo a\x00b\n", encoding="utf-8")
    app = smsc_handler.load_app(str(path))
    status, _out, errors = call(app, uform(status_callback()))
    assert (status, errors) == (503, "")
    assert not (tmp_path / "data" / "status.jsonl").exists()


############################################################################
# 6, 12. A body comes whole or is refused, under every gateway
############################################################################

class Trickle(BytesIO):
    """A wsgi.input that gives a few bytes a read, then ends early (a client that closed)."""

    def read(self, size=-1):
        return super().read(min(7, size) if size is not None and size >= 0 else 7)


def test_a_body_shorter_than_content_length_is_a_400_under_wsgi(tmp_path):
    site = Site(tmp_path)
    body = form(status_callback())
    for stream in (BytesIO(body[:-5]), Trickle(body[:-5])):
        status, out, errors = call(site.app, body, stream=stream)
        assert (status, errors) == (400, "")
        assert b"shorter than its Content-Length" in out
    assert site.events() == []


def test_a_body_shorter_than_content_length_is_a_400_under_cgi(tmp_path):
    site = Site(tmp_path)
    body = form(status_callback())
    env = cgi_environ(site.config_path, body)
    env["CONTENT_LENGTH"] = str(len(body) + 40)
    done = subprocess.run([*fast_python(), str(HANDLER_CGI)], input=body, capture_output=True,
                          env=env, timeout=60)
    assert done.stdout.startswith(b"Status: 400 Bad Request\r\n"), done
    assert b"Traceback" not in done.stderr
    assert site.events() == []


def test_a_cgi_post_without_content_length_is_411_and_stdin_is_not_read_to_eof(tmp_path):
    site = Site(tmp_path)
    env = cgi_environ(site.config_path, b"")
    del env["CONTENT_LENGTH"]
    env["HTTP_TRANSFER_ENCODING"] = "chunked"
    child = subprocess.Popen([*fast_python(), str(HANDLER_CGI)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        child.stdin.write(form(status_callback()))
        child.stdin.flush()  # and stdin stays open: reading it to EOF would hang
        child.wait(timeout=60)
        out = child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdin.close()
    assert out.startswith(b"Status: 411 Length Required\r\n"), out
    assert site.events() == []


def test_a_get_without_content_length_still_reads_its_query(tmp_path):
    site = Site(tmp_path)
    query = "&".join("%s=%s" % item for item in status_callback().items())
    status, out, _errors = call(site.app, b"", query=query, method="GET", extra={"CONTENT_LENGTH": None})
    assert (status, out) == (200, b"OK")


class ServeThread:
    """`serve` in a thread of this process, on a free port, with a short read timeout."""

    def __init__(self, site, timeout=1.0):
        ready = threading.Event()
        self.server = None

        def started(server):
            self.server = server
            ready.set()
        self.thread = threading.Thread(target=smsc_handler.serve, daemon=True,
                                       args=(site.app, "127.0.0.1", 0, started, timeout))
        self.thread.start()
        assert ready.wait(10)
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.thread.join(10)


def raw_exchange(port, data, close_write=True, wait=15.0):
    """Send raw bytes on one connection; return everything the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def post_head(body_length, extra=b""):
    return (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
            % (FORM.encode(), body_length, extra))


@pytest.fixture
def serve_process(tmp_path):
    """A real `smsc_handler.py serve` subprocess; its stderr goes to a file."""
    config = write_cli_config(tmp_path, handler={"trusted_proxies": "127.0.0.1/32"})
    stderr = open(tmp_path / "serve.stderr", "wb")
    child = subprocess.Popen([sys.executable, str(SCRIPT), "serve", "--port", "0", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=clean_env())
    ready, _, _ = select.select([child.stdout], [], [], 20)
    first = child.stdout.readline().decode() if ready else ""
    assert "listening on http://127.0.0.1:" in first, first
    child.port = int(first.split()[-1].rstrip("/").rsplit(":", 1)[1])
    child.data = tmp_path / "data"
    child.stderr_path = tmp_path / "serve.stderr"
    yield child
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    child.stdout.close()
    stderr.close()


def test_serve_refuses_a_body_the_client_cut_short(serve_process):
    body = form(status_callback())
    answer = raw_exchange(serve_process.port, post_head(len(body) + 30) + body)
    assert answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), answer
    assert not (serve_process.data / "status.jsonl").exists()
    # and a whole one still goes in
    answer = raw_exchange(serve_process.port, post_head(len(body)) + body)
    assert b" 200 OK\r\n" in answer.split(b"\r\n\r\n")[0] + b"\r\n"
    assert len((serve_process.data / "status.jsonl").read_bytes().splitlines()) == 1


def test_serve_de_chunks_a_chunked_post(serve_process):
    body = form(status_callback(id="chunked-1", mes_free="x" * 100))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 50]), body[i:i + 50]) for i in range(0, len(body), 50))
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
            % FORM.encode())
    answer = raw_exchange(serve_process.port, head + chunked + b"0\r\n\r\n")
    assert b" 200 OK\r\n" in answer, answer
    (event,) = [json.loads(line) for line in (serve_process.data / "status.jsonl").read_bytes().splitlines()]
    assert event["id"] == "chunked-1" and event["params"]["mes_free"] == "x" * 100


@pytest.mark.parametrize("chunked", [b"zz\r\nabc\r\n0\r\n\r\n", b"%s\r\n" % (b"f" * 40), b"10\r\nphone=7"])
def test_serve_refuses_a_malformed_or_cut_chunked_body(serve_process, chunked):
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % FORM.encode()
    answer = raw_exchange(serve_process.port, head + chunked)
    assert b" 400 " in answer.split(b"\r\n")[0], answer
    assert not (serve_process.data / "status.jsonl").exists()


############################################################################
# 10. serve's read timeout: a slow client can't hold a thread forever
############################################################################

def test_serve_answers_400_to_a_client_that_stalls_mid_body(tmp_path):
    site = Site(tmp_path)
    server = ServeThread(site, timeout=1.0)
    try:
        body = form(status_callback())
        started = time.monotonic()
        # The client sends half its body and waits, its socket open.
        answer = raw_exchange(server.port, post_head(len(body)) + body[:20], close_write=False, wait=20)
        elapsed = time.monotonic() - started
        assert b" 400 " in answer.split(b"\r\n")[0], answer
        assert elapsed < 10
        assert site.events() == []
    finally:
        server.close()


def test_serve_drops_a_client_that_never_finishes_its_headers(tmp_path):
    site = Site(tmp_path)
    server = ServeThread(site, timeout=1.0)
    try:
        started = time.monotonic()
        raw_exchange(server.port, b"POST / HTTP/1.1\r\nHost: x\r\n", close_write=False, wait=20)
        assert time.monotonic() - started < 10  # the server closed the connection
        # and the server still serves
        body = form(status_callback())
        assert b" 200 OK" in raw_exchange(server.port, post_head(len(body)) + body)
    finally:
        server.close()


############################################################################
# 11. Log injection: client text is escaped in every log line
############################################################################

NASTY = "\x1b[2J\r\nFAKE 200 OK\x00"


def assert_clean(text):
    for char in ("\x1b", "\r", "\x00"):
        assert char not in text, repr(text)


def test_the_refusal_line_escapes_a_forwarded_address(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="smsc_handler")
    site = Site(tmp_path, handler={"trusted_proxies": "127.0.0.1/32"})
    status, _out, _errors = call(site.app, b"id=1", extra={"HTTP_X_FORWARDED_FOR": "10.0.0.1, " + NASTY})
    assert status == 400
    (record,) = [r for r in caplog.records if r.name == "smsc_handler"]
    line = record.getMessage()
    assert_clean(line)
    assert "\n" not in line and "\\x1b[2J\\r\\nFAKE 200 OK\\x00" in line


def test_the_405_line_escapes_the_method(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="smsc_handler")
    site = Site(tmp_path)
    status, _out, _errors = call(site.app, b"", method="P\x1b[31m\r\nX")
    assert status == 405
    (record,) = [r for r in caplog.records if r.name == "smsc_handler"]
    assert_clean(record.getMessage())
    assert "\n" not in record.getMessage()


def test_serve_logs_escape_the_request_line_and_the_forwarded_address(serve_process):
    raw_exchange(serve_process.port, b"GET /?a=\x1b[31m\x00 HTTP/1.0\r\n\r\n")
    raw_exchange(serve_process.port, b"PO\x1bST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    body = b"id=1"
    raw_exchange(serve_process.port, post_head(len(body), b"X-Forwarded-For: 1.2.3.4, \x1b[2Jevil\x00\r\n") + body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = serve_process.stderr_path.read_bytes().decode("utf-8", "replace")
        if text.count("\n") >= 5:
            break
        time.sleep(0.1)
    assert "\\x1b" in text  # the escapes are there, as text
    assert_clean(text)
    assert "evil" in text and "405" in text


############################################################################
# 25. DD.MM.YYYY times, against datetime.strptime
############################################################################

def four_digit_year_times(count=20000):
    rng = random.Random(25)
    near = {"day": [0, 1, 28, 29, 30, 31, 32], "month": [0, 1, 2, 4, 12, 13],
            "year": [0, 1, 1899, 1900, 1969, 1999, 2000, 2024, 2068, 2100, 2400, 9999],
            "hour": [0, 23, 24], "minute": [0, 59, 60], "second": [0, 59, 60]}
    times = []
    for _ in range(count):
        values = [rng.choice(near[name]) if rng.random() < 0.6
                  else rng.randrange(10000 if name == "year" else 100) for name in near]
        times.append("%02d.%02d.%04d %02d:%02d:%02d" % tuple(values))
    return times


def test_status_time_with_a_four_digit_year_matches_datetime():
    from datetime import timedelta, timezone
    msk = timezone(timedelta(hours=3))
    wrong = []
    for text in four_digit_year_times():
        try:
            want = datetime.strptime(text, "%d.%m.%Y %H:%M:%S").isoformat() + "+03:00"
        except ValueError:
            want = None
        if smsc_handler._local_time(text, "+03:00") != want or smsc_handler._local_time(text, msk) != want:
            wrong.append(text)
    assert wrong == []


def test_a_status_with_a_four_digit_year_gets_its_time(tmp_path):
    site = Site(tmp_path)
    assert call(site.app, uform(status_callback(time="15.01.2024 10:30:05")))[0] == 200
    assert site.events()[0]["time"] == "2024-01-15T10:30:05+03:00"


############################################################################
# 26. E-mail codes
############################################################################

@pytest.mark.parametrize(("params", "field", "name"), [
    ({"status": "6"}, "status_name", "blocked by spam filter (e-mail)"),
    ({"err": "2"}, "err_name", "mailbox full"),
    ({"err": "3"}, "err_name", "recipient's mail server not found"),
    ({"err": "4"}, "err_name", "mailbox blocked"),
])
def test_e_mail_codes_have_their_names(tmp_path, params, field, name):
    site = Site(tmp_path)
    assert call(site.app, uform(status_callback(phone="client@example.com", **params)))[0] == 200
    event = site.events()[0]
    assert event[field] == name
    if "status" in params:
        assert event["final"] is True


############################################################################
# 27. Two secrets while one is rotated
############################################################################

def test_either_secret_verifies_and_the_event_says_which(tmp_path):
    site = Site(tmp_path, handler={"secret": "%s, %s" % (SECRET, OLD_SECRET)})
    assert call(site.app, uform(signed(status_callback(id="1"), secret=SECRET)))[0] == 200
    assert call(site.app, uform(signed(status_callback(id="2"), secret=OLD_SECRET)))[0] == 200
    assert call(site.app, uform(signed(status_callback(id="3"), secret="Third_one")))[0] == 403
    events = site.events()
    assert [(e["id"], e["signature"]) for e in events] == [
        ("1", {"alg": "md5", "valid": True, "key": 0}), ("2", {"alg": "md5", "valid": True, "key": 1})]
    stored = b"".join(path.read_bytes() for path in site.data.iterdir() if path.is_file())
    assert SECRET.encode() not in stored and OLD_SECRET.encode() not in stored


def test_one_secret_gives_key_0():
    request = smsc_handler.decode_request(form(signed(waitcall_callback())))
    assert smsc_handler.verify_signature("waitcall", request, SECRET) == {"alg": "md5", "valid": True, "key": 0}
    with pytest.raises(SignatureError):
        smsc_handler.verify_signature("waitcall", request, [OLD_SECRET])


@pytest.mark.parametrize("value", ["a1, b2, c3", "a1,,b2", ", a1", "a1 b2"])
def test_three_secrets_or_an_empty_one_are_a_config_error_that_hides_them(make_config, value):
    with pytest.raises(ConfigError) as caught:
        load_config(str(make_config(handler={"secret": value})))
    assert "[handler] secret = (hidden)" in caught.value.reason
    assert "a1" not in caught.value.reason


def test_two_secrets_load_as_secret_and_secrets(make_config):
    config = load_config(str(make_config(handler={"secret": "New-1 ,Old-2"})))
    assert (config.secret, config.secrets) == ("New-1", ("New-1", "Old-2"))
    assert "New-1" not in repr(config) and "Old-2" not in repr(config)


def test_verify_tries_both_secrets(tmp_path):
    path = write_cli_config(tmp_path, handler={"secret": "%s, %s" % (SECRET, OLD_SECRET)})
    capture = tmp_path / "request.txt"
    body = form(signed(status_callback(), secret=OLD_SECRET))
    capture.write_bytes(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    done = run_cli("verify", "--config", path, capture)
    assert done.returncode == 0, done.stdout
    assert "secret 1" in done.stdout and "PASS" in done.stdout
    assert OLD_SECRET not in done.stdout and SECRET not in done.stdout


# quiet "imported but unused" for helpers some Pythons' runs skip
_ = (hashlib, os, calendar, run_cgi)


def test_send_notes_that_this_config_refuses_the_urls_crc32(tmp_path):
    path = write_cli_config(tmp_path, handler={"secret": SECRET})
    done = run_cli("send", "http://127.0.0.1:9/?crc32=" + SECRET, "--dry-run", "--config", path)
    assert done.returncode == 0, done.stderr
    assert "note: [handler] hash_alg = auto accepts md5 or sha1: a crc32 hash is refused" in done.stdout
    done = run_cli("send", "http://127.0.0.1:9/?md5=" + SECRET, "--dry-run", "--config", path)
    assert "hash_alg" not in done.stdout
