"""run_cgi, held byte for byte to wsgiref's CGIHandler, and what a CGI request imports.

run_cgi writes the answer itself (PEP 3333's CGI example) because
wsgiref.handlers imports ``re`` and ``enum``, which cost a CGI request more
than all of its own work. Every case here runs twice as a real CGI process —
once through handler.cgi, once through ``CGIHandler().run`` — with the same
environment and body, each with its own data folder, and both must give the
same stdout, the same exit status and the same stored lines.
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import pytest
from conftest import REPO, parse_jsonl, write_ini

import smsc_handler

SECRET = "test_Secret-42"
FORM = "application/x-www-form-urlencoded"
STATUS = {"id": "1001", "phone": "79991234567", "status": "1", "ts": "1700000000"}
STATUS_BODY = urlencode(STATUS).encode()

#: The reference: the gateway as it was, wsgiref's CGIHandler.
REFERENCE = ("import os, sys; sys.path.insert(0, %r); import smsc_handler; "
             "from wsgiref.handlers import CGIHandler; os.environ.setdefault('PATH_INFO', ''); "
             "CGIHandler().run(smsc_handler.application)" % str(REPO))


def environ_for(config_path, method="POST", body=b"", query="", content_type=FORM, **extra):
    """Return the environment Apache's mod_cgi gives a script (bytes values allowed)."""
    environ = {
        "PATH": os.environ.get("PATH", os.defpath),
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SCRIPT_NAME": "/handler.cgi",
        "REQUEST_METHOD": method, "QUERY_STRING": query, "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "CONTENT_TYPE": content_type if body else "",
        "HTTP_USER_AGENT": "SMSC",
    }
    if config_path is not None:
        environ["SMSC_HANDLER_CONFIG"] = str(config_path)
    environ.update(extra)
    return environ


def run(argv, environ, body):
    done = subprocess.run(argv, cwd=str(REPO), env=environ, input=body, capture_output=True, timeout=60)
    return done.stdout, done.returncode, done.stderr


def stored(folder):
    """Return every JSON-lines file of a data folder, parsed, minus the moment of receipt."""
    files = {}
    for path in sorted(Path(folder).glob("*.jsonl")) if Path(folder).is_dir() else ():
        lines = parse_jsonl(path)
        for line in lines:
            line.pop("received_at", None)
        files[path.name] = lines
    return files


def config_pair(tmp_path, sections):
    """Write the same config twice, each with its own data folder; return the two paths."""
    paths = []
    for side in ("reference", "ours"):
        merged = {"handler": {"data_dir": "data"}}
        for section, keys in sections.items():
            merged.setdefault(section, {}).update(keys)
        paths.append(write_ini(tmp_path / side / "config.ini", merged))
    return paths


def signed(fields, secret=SECRET):
    """Return a form body with SMSC's md5 of a status callback."""
    md5 = smsc_handler.control_hash("md5", ("%s:%s:%s:%s" % (fields["id"], fields["phone"],
                                                               fields["status"], secret)).encode())
    return urlencode(dict(fields, md5=md5)).encode()


SIGNED_BODY = signed(STATUS)
WRONG_HASH = STATUS_BODY + b"&md5=" + b"0" * 32
BIG_BODY = STATUS_BODY + b"&cmt=" + b"x" * 5000
FAILING_HOOK = {"hook": {"command": "%s -c 'import sys; sys.exit(3)'" % sys.executable}}

#: every answer the handler gives: name -> (config sections, request keywords, body, status line)
ANSWERS = {
    "200 stored": ({}, {}, STATUS_BODY, b"200 OK"),
    "200 stored, dedupe off, fsync off": ({"dedupe": {"enabled": "no"}, "jsonl": {"fsync": "no"}}, {},
                                          STATUS_BODY, b"200 OK"),
    "200 signed": ({"handler": {"secret": SECRET}}, {}, SIGNED_BODY, b"200 OK"),
    "200 in the query string": ({}, {"method": "GET", "query": STATUS_BODY.decode()}, b"", b"200 OK"),
    "200 non-ASCII query bytes": ({}, {"method": "GET", "query": os.fsdecode(
        b"id=7&phone=79990000001&mes=%CF%F0%E8&to=1&raw=\xcf\xf0")}, b"", b"200 OK"),
    "200 json": ({}, {"content_type": "application/json"},
                 json.dumps(dict(STATUS, cost="1.50")).encode(), b"200 OK"),
    "200 health GET": ({}, {"method": "GET"}, b"", b"200 OK"),
    "200 health HEAD": ({}, {"method": "HEAD"}, b"", b"200 OK"),
    "200 HEAD with a query": ({}, {"method": "HEAD", "query": STATUS_BODY.decode()}, b"", b"200 OK"),
    "200 health GET with a body": ({}, {"method": "GET"}, BIG_BODY, b"200 OK"),
    "200 hook ignored failing": ({"hook": dict(FAILING_HOOK["hook"], on_failure="ignore")}, {},
                                 STATUS_BODY, b"200 OK"),
    "400 malformed JSON": ({}, {"content_type": "application/json"}, b'{"phone": ', b"400 Bad Request"),
    "400 no phone": ({}, {}, b"id=1&status=1", b"400 Bad Request"),
    "400 bad XML": ({}, {"content_type": "application/xml"}, b"<a><b>", b"400 Bad Request"),
    "403 wrong hash": ({"handler": {"secret": SECRET}}, {}, WRONG_HASH, b"403 Forbidden"),
    "403 missing hash": ({"handler": {"secret": SECRET}}, {}, STATUS_BODY, b"403 Forbidden"),
    "200 HEAD with a wrong hash in the query": ({"handler": {"secret": SECRET}},
                                                {"method": "HEAD", "query": WRONG_HASH.decode()}, b"", b"200 OK"),
    "403 allowed_ips": ({"handler": {"allowed_ips": "10.0.0.0/8"}}, {}, STATUS_BODY, b"403 Forbidden"),
    "403 allowed_ips, HEAD": ({"handler": {"allowed_ips": "10.0.0.0/8"}}, {"method": "HEAD"}, b"",
                              b"403 Forbidden"),
    "404 wrong hash": ({"handler": {"secret": SECRET, "bad_signature_status": "404"}}, {}, WRONG_HASH,
                       b"404 Not Found"),
    "405 PUT": ({}, {"method": "PUT"}, STATUS_BODY, b"405 Method Not Allowed"),
    "405 OPTIONS, no body": ({}, {"method": "OPTIONS"}, b"", b"405 Method Not Allowed"),
    "413": ({"handler": {"max_body_bytes": "256"}}, {}, BIG_BODY, b"413 Payload Too Large"),
    "503 broken config": ({"handler": {"timezone": "nowhere"}}, {}, STATUS_BODY, b"503 Service Unavailable"),
    "503 broken config, HEAD": ({"handler": {"file_mode": "0400"}}, {"method": "HEAD"}, b"",
                                b"503 Service Unavailable"),
    "503 hook failing (retry)": (FAILING_HOOK, {}, STATUS_BODY, b"503 Service Unavailable"),
}


@pytest.mark.parametrize("sections, kwargs, body, status", list(ANSWERS.values()), ids=list(ANSWERS))
def test_every_answer_is_cgihandlers_byte_for_byte(tmp_path, sections, kwargs, body, status):
    reference_config, our_config = config_pair(tmp_path, sections)
    reference = run([sys.executable, "-c", REFERENCE], environ_for(reference_config, body=body, **kwargs), body)
    ours = run([sys.executable, "handler.cgi"], environ_for(our_config, body=body, **kwargs), body)
    assert reference[0].startswith(b"Status: " + status + b"\r\n"), reference
    assert ours[:2] == reference[:2]
    assert b"Traceback" not in ours[2]
    assert stored(our_config.parent / "data") == stored(reference_config.parent / "data")


def test_a_storage_failure_is_cgihandlers_byte_for_byte(tmp_path):
    outputs = []
    for argv, config in zip(([sys.executable, "-c", REFERENCE], [sys.executable, "handler.cgi"]),
                            config_pair(tmp_path, {})):
        (config.parent / "data").write_bytes(b"")  # a file where the folder should be
        outputs.append(run(argv, environ_for(config, body=STATUS_BODY), STATUS_BODY)[:2])
    assert outputs[0][0].startswith(b"Status: 503 Service Unavailable\r\n")
    assert outputs[1] == outputs[0]


def test_a_repeated_callback_is_cgihandlers_byte_for_byte(tmp_path):
    reference_config, our_config = config_pair(tmp_path, {})
    for _ in range(2):
        reference = run([sys.executable, "-c", REFERENCE], environ_for(reference_config, body=STATUS_BODY),
                        STATUS_BODY)
        ours = run([sys.executable, "handler.cgi"], environ_for(our_config, body=STATUS_BODY), STATUS_BODY)
        assert ours[:2] == reference[:2]
    assert len(stored(our_config.parent / "data")["status.jsonl"]) == 1


############################################################################
# Any WSGI application, not just ours: the writer's own rules
############################################################################

#: name -> body of `def app(environ, start_response)`
APPS = {
    "one block, no Content-Length": "start_response('200 OK', [('X-A', 'b')]); return [b'hello']",
    "two blocks, no Content-Length": "start_response('201 Created', []); return [b'a', b'bc']",
    "empty list, no Content-Length": "start_response('204 No Content', [('X-A', 'b')]); return []",
    "one empty block": "start_response('200 OK', []); return [b'']",
    "an empty block first": "start_response('200 OK', []); return [b'', b'x']",
    "a generator": "start_response('200 OK', [('content-length', '3')]); return (b for b in [b'a', b'bc'])",
    "lower-case content-length kept": "start_response('200 OK', [('content-length', '9')]); return [b'x']",
    "the write callable": "w = start_response('200 OK', []); w(b'early '); return [b'late']",
    "latin-1 header value": "start_response('200 OK', [('X-Name', 'caf\\xe9')]); return [b'']",
    "exc_info before any output": (
        "start_response('200 OK', [('X-A', 'b')])\n"
        "    try:\n        1 / 0\n"
        "    except ZeroDivisionError:\n"
        "        start_response('500 Oops', [('X-B', 'c')], sys.exc_info())\n"
        "    return [b'replaced']"),
    "KeyboardInterrupt before the answer": "raise KeyboardInterrupt",
    "SystemExit after start_response": "start_response('200 OK', []); raise SystemExit(3)",
    "an error in the body iterable": (
        "start_response('200 OK', [])\n"
        "    def body():\n        yield b'first'\n        raise ValueError('late')\n"
        "    return body()"),
    "an error before the first block": (
        "start_response('200 OK', [])\n"
        "    def body():\n        raise ValueError('early')\n        yield b''\n"
        "    return body()"),
    "a status that is not a str": "start_response(b'200 OK', []); return [b'']",
    "a body block that is not bytes": "start_response('200 OK', []); return ['text']",
    "start_response twice": "start_response('200 OK', []); start_response('200 OK', []); return [b'']",
    "no start_response": "return [b'x']",
    "a close() method": (
        "class Body(list):\n        def close(self):\n            sys.stderr.write('closed')\n"
        "    start_response('200 OK', []); return Body([b'x'])"),
}


def app_script(app_body, gateway):
    head = "import os, sys\nsys.path.insert(0, %r)\nimport smsc_handler\n" % str(REPO)
    app = "def app(environ, start_response):\n    %s\n" % app_body
    if gateway == "reference":
        tail = ("from wsgiref.handlers import CGIHandler\nos.environ.setdefault('PATH_INFO', '')\n"
                "CGIHandler().run(app)\n")
    else:
        tail = "smsc_handler.run_cgi(app)\n"
    return head + app + tail


@pytest.mark.parametrize("app_body", list(APPS.values()), ids=list(APPS))
def test_any_application_is_answered_as_cgihandler_answers_it(app_body):
    environ = environ_for(None, method="GET")
    reference = run([sys.executable, "-c", app_script(app_body, "reference")], environ, b"")
    ours = run([sys.executable, "-c", app_script(app_body, "ours")], environ, b"")
    assert ours[:2] == reference[:2]
    assert (b"Traceback" in ours[2]) == (b"Traceback" in reference[2])
    assert (b"closed" in ours[2]) == (b"closed" in reference[2])


ENVIRON_APP = (
    "shown = {k: (v if isinstance(v, (str, bool, tuple)) else type(v).__name__) for k, v in environ.items()"
    " if k != 'wsgi.file_wrapper'}\n"
    "    start_response('200 OK', []); return [repr(sorted(shown.items())).encode('ascii', 'backslashreplace')]")


@pytest.mark.parametrize("extra", [
    {},
    {"HTTPS": "on"}, {"HTTPS": "1"}, {"HTTPS": "yes"}, {"HTTPS": "off"},
    {"QUERY_STRING": b"a=\xcf\xf0&b=%41", "HTTP_X_FORWARDED_FOR": b"10.0.0.1, \xff",
     "REDIRECT_HTTP_X_NAME": b"\xe9", "REDIRECT_OTHER": b"\xe9", "SSL_CLIENT_S_DN": b"CN=\xd0\x96",
     "PATH_INFO": b"/\xe2\x82\xac", "LANG_NOT_REQUEST": b"\xe9", "REMOTE_USER": "user"},
])
def test_the_application_sees_cgihandlers_environ(extra):
    environ = environ_for(None, method="GET", **extra)
    reference = run([sys.executable, "-c", app_script(ENVIRON_APP, "reference")], environ, b"")
    ours = run([sys.executable, "-c", app_script(ENVIRON_APP, "ours")], environ, b"")
    assert reference[0].startswith(b"Status: 200 OK\r\n")
    assert ours == reference


@pytest.mark.parametrize("end_process", [False, True], ids=["returns", "ends the process"])
def test_a_client_gone_away_ends_quietly(tmp_path, config_path, end_process):
    """stdout closed before the answer (the server dropped the client): no traceback, no 500."""
    environ = environ_for(config_path, body=STATUS_BODY)
    code = ("import os, sys; sys.path.insert(0, %r); import smsc_handler\n"
            "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
            "smsc_handler.run_cgi(end_process=%r)\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n"
            % (str(REPO), end_process))
    _out, returncode, errors = run([sys.executable, "-c", code], environ, STATUS_BODY)
    assert returncode == 0
    assert b"Traceback" not in errors
    assert len(stored(tmp_path / "data")["status.jsonl"]) == 1


############################################################################
# Ending the process at once (handler.cgi: run_cgi(end_process=True))
############################################################################

def ending_script(app_body):
    """A CGI script: the app, run_cgi(app, end_process=True), then a line that must never run."""
    return ("import os, sys\nsys.path.insert(0, %r)\nimport smsc_handler\n"
            "def app(environ, start_response):\n    %s\n"
            "smsc_handler.run_cgi(app, end_process=True)\n"
            "sys.stderr.write('returned')\n" % (str(REPO), app_body))


def test_ending_the_process_keeps_the_answer_and_skips_only_the_teardown(tmp_path):
    marker = tmp_path / "atexit-ran"
    app = ("import atexit; atexit.register(lambda: open(%r, 'w').close())\n"
           "    start_response('200 OK', [('Content-Type', 'text/plain')]); return [b'whole answer']" % str(marker))
    out, returncode, errors = run([sys.executable, "-c", ending_script(app)], environ_for(None, method="GET"), b"")
    assert (out, returncode) == (b"Status: 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n"
                                 b"whole answer", 0)
    assert b"returned" not in errors  # the process ended inside run_cgi
    assert not marker.exists()  # and skipped the teardown, atexit included: our own exit work is done by hand


def test_ending_the_process_flushes_a_buffered_log_first(tmp_path):
    """logging.shutdown runs: a handler that buffers (MemoryHandler) still writes its record."""
    log = tmp_path / "app.log"
    app = ("import logging, logging.handlers\n"
           "    target = logging.FileHandler(%r)\n"
           "    logging.getLogger('x').addHandler(logging.handlers.MemoryHandler(100, target=target))\n"
           "    logging.getLogger('x').warning('kept')\n"
           "    start_response('200 OK', []); return [b'ok']" % str(log))
    _out, returncode, _errors = run([sys.executable, "-c", ending_script(app)], environ_for(None, method="GET"), b"")
    assert returncode == 0
    assert log.read_text() == "kept\n"


def test_a_process_with_a_thread_alive_ends_the_ordinary_way(tmp_path):
    """os._exit would kill the thread mid-work: with one alive, run_cgi returns and Python waits for it."""
    done = tmp_path / "thread-done"
    app = ("import threading, time\n"
           "    threading.Thread(target=lambda: (time.sleep(0.3), open(%r, 'w').close())).start()\n"
           "    start_response('200 OK', []); return [b'ok']" % str(done))
    out, returncode, errors = run([sys.executable, "-c", ending_script(app)], environ_for(None, method="GET"), b"")
    assert out.endswith(b"\r\n\r\nok") and returncode == 0
    assert b"returned" in errors
    assert done.exists()


def test_ending_the_process_closes_the_state_store_first(tmp_path, config_path):
    """The store is closed as at an ordinary exit: its WAL checkpointed before 3.12, left short after."""
    environ = environ_for(config_path, body=STATUS_BODY)
    for _ in range(2):
        out, returncode, _errors = run([sys.executable, str(REPO / "handler.cgi")], environ, STATUS_BODY)
        assert out.startswith(b"Status: 200 OK\r\n") and returncode == 0
    assert len(stored(tmp_path / "data")["status.jsonl"]) == 1  # the repeat was known
    wal = tmp_path / "data" / (smsc_handler.STATE_FILE + "-wal")
    if sys.version_info < (3, 12):
        assert not wal.exists()
    import sqlite3
    with sqlite3.connect(str(tmp_path / "data" / smsc_handler.STATE_FILE)) as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone() == (1,)


############################################################################
# What a CGI request imports
############################################################################

#: modules a stored form callback never needs: `re` and `enum` above all (imported by
#: wsgiref.handlers and configparser, they were most of a request's own cost)
NOT_NEEDED = {"re", "enum", "configparser", "wsgiref", "wsgiref.handlers", "wsgiref.headers", "wsgiref.util",
              "logging", "subprocess", "traceback", "http", "xml.parsers.expat", "pyexpat", "ipaddress", "shlex",
              "json", "hashlib", "encodings.utf_8_sig",
              # the sqlite3 package around _sqlite3: datetime adapters the store never uses (1.1 ms)
              "sqlite3", "sqlite3.dbapi2", "datetime"}
#: what only the state store (dedupe on) needs: SQLite's C part
STATE_ONLY = {"_sqlite3"}
STATE_MAYBE = {"warnings"}


def imported_modules(argv, environ, body=b""):
    """Return the modules `argv` imports, as -X importtime lists them."""
    done = subprocess.run(argv[:1] + ["-X", "importtime"] + argv[1:], cwd=str(REPO), env=environ,
                          input=body, capture_output=True, timeout=60)
    names = {line.split("|")[2].strip() for line in done.stderr.decode().splitlines()
             if line.startswith("import time:") and "imported package" not in line}
    return done.stdout, names


def interpreters():
    """Return (argv prefix, label): this Python without site (its site may import re), and Debian's as is."""
    found = [([sys.executable, "-S"], "this python -S")]
    from test_python_floor import find_interpreter
    newest = find_interpreter("3.13") or find_interpreter("3.12")
    if newest and sys.version_info < (3, 12):
        found.append(([newest, "-S"], "3.12+ -S"))
    if os.access("/usr/bin/python3", os.X_OK):
        found.append((["/usr/bin/python3"], "/usr/bin/python3"))
    return found


@pytest.mark.parametrize("prefix", [p for p, _label in interpreters()], ids=[n for _p, n in interpreters()])
@pytest.mark.parametrize("dedupe", ["no", "yes"], ids=["fsync on, dedupe off", "default config (dedupe on)"])
def test_a_form_callback_imports_nothing_it_does_not_use(tmp_path, prefix, dedupe):
    config = write_ini(tmp_path / "config.ini", {"handler": {"data_dir": "data", "secret": SECRET},
                                                 "dedupe": {"enabled": dedupe}})
    _out, baseline = imported_modules(prefix + ["-c", "pass"], environ_for(None))
    if "re" in baseline:
        pytest.skip("this interpreter imports re at startup")
    out, names = imported_modules(prefix + ["handler.cgi"], environ_for(config, body=SIGNED_BODY), SIGNED_BODY)
    assert out.startswith(b"Status: 200 OK\r\n"), out
    extra = names - baseline
    assert "smsc_handler" in extra
    assert sorted(extra & NOT_NEEDED) == []
    assert sorted(extra & STATE_ONLY) == (sorted(STATE_ONLY) if dedupe == "yes" else [])
    if dedupe == "no":
        assert sorted(extra & STATE_MAYBE) == []
    assert len(stored(tmp_path / "data")["status.jsonl"]) == 1


@pytest.mark.parametrize("prefix", [p for p, _label in interpreters()], ids=[n for _p, n in interpreters()])
def test_a_lossy_callback_keeps_its_body_without_importing_re(tmp_path, prefix):
    # 0x98 is the one byte windows-1251 can't decode: the event is lossy and keeps body_b64
    config = write_ini(tmp_path / "config.ini", {"handler": {"data_dir": "data", "secret": SECRET},
                                                 "dedupe": {"enabled": "no"}})
    body = SIGNED_BODY + b"&cmt=%98"
    _out, baseline = imported_modules(prefix + ["-c", "pass"], environ_for(None))
    if "re" in baseline:
        pytest.skip("this interpreter imports re at startup")
    out, names = imported_modules(prefix + ["handler.cgi"], environ_for(config, body=body), body)
    assert out.startswith(b"Status: 200 OK\r\n"), out
    assert sorted((names - baseline) & NOT_NEEDED) == []
    [event] = stored(tmp_path / "data")["status.jsonl"]
    assert event["lossy"] is True and base64.b64decode(event["body_b64"]) == body
