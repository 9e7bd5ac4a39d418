"""HTTP answers (SPEC §3): one test per row of the table, through WebTest and wsgiref.validate."""

import base64
import hashlib
import json
import os
import shutil
from io import BytesIO, StringIO
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest
import webtest

import smsc_handler

SECRET = "test_Secret-42"
PHONE = "79991234567"
#: a value that must never come back in an answer
MARKER = "zq-marker-91"
PLAIN = "text/plain; charset=utf-8"
SIGNED = {"handler": {"secret": SECRET}}


def status_params(**extra):
    params = {"id": "1001", "phone": PHONE, "status": "1", "ts": "1700000000"}
    params.update(extra)
    return params


def md5_of(params, secret=SECRET):
    text = "%s:%s:%s:%s" % (params["id"], params["phone"], params["status"], secret)
    return hashlib.md5(text.encode("ascii")).hexdigest()


def signed_params(**extra):
    params = status_params(**extra)
    params["md5"] = md5_of(params)
    return params


def files_in(folder):
    """Return the names of the files in `folder` ([] when it does not exist)."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def stored_files(folder):
    """Return the JSON-lines files in `folder` (events and rejected.jsonl)."""
    return [name for name in files_in(folder) if name.endswith(".jsonl")]


def headers_lower(record):
    return {name.lower(): value for name, value in record["headers"].items()}


############################################################################
# Accepted callbacks
############################################################################

def test_accepted_post_answers_ok_and_stores_one_line(testapp, read_lines):
    response = testapp.post("/", status_params())
    assert response.status == "200 OK"
    assert response.body == b"OK"
    lines = read_lines("status.jsonl")
    assert len(lines) == 1
    assert (lines[0]["kind"], lines[0]["id"], lines[0]["phone"]) == ("status", "1001", PHONE)


def test_get_carrying_phone_is_stored(testapp, read_lines):
    response = testapp.get("/", status_params())
    assert response.status_int == 200 and response.body == b"OK"
    assert [line["id"] for line in read_lines("status.jsonl")] == ["1001"]


def test_get_and_post_parameters_are_merged(testapp, read_lines):
    testapp.post("/?extra=from-query&id=1", status_params())
    (line,) = read_lines("status.jsonl")
    assert line["params"]["extra"] == "from-query"
    assert line["id"] == "1001"  # the body wins


def test_same_callback_again_answers_ok_and_writes_nothing_new(testapp, read_lines):
    assert testapp.post("/", status_params()).body == b"OK"
    assert testapp.post("/", status_params()).body == b"OK"
    assert len(read_lines("status.jsonl")) == 1


def test_next_status_of_the_same_message_is_a_new_line(testapp, read_lines):
    testapp.post("/", status_params(status="0"))
    testapp.post("/", status_params(status="1"))
    assert [line["status"] for line in read_lines("status.jsonl")] == [0, 1]


@pytest.mark.config(dedupe={"enabled": "no"})
def test_same_callback_with_dedupe_off_is_stored_twice(testapp, read_lines, data_dir):
    testapp.post("/", status_params())
    testapp.post("/", status_params())
    assert len(read_lines("status.jsonl")) == 2
    assert "state.sqlite3" not in files_in(data_dir)


############################################################################
# Health answers, HEAD, other methods
############################################################################

def test_bare_get_answers_health_line_and_writes_nothing(testapp, data_dir):
    response = testapp.get("/")
    assert response.status_int == 200
    assert response.content_type == "text/plain"
    assert response.text.startswith("smsc_handler %s" % smsc_handler.__version__)
    assert response.text.count("\n") == 1 and response.text.endswith("\n")
    assert files_in(data_dir) == []


def test_bare_head_answers_200_with_empty_body(testapp, data_dir):
    response = testapp.head("/")
    assert response.status_int == 200
    assert response.body == b""
    assert files_in(data_dir) == []


def test_head_with_callback_parameters_is_never_stored(testapp, data_dir):
    response = testapp.head("/?" + "&".join("%s=%s" % kv for kv in status_params().items()))
    assert response.status_int == 200
    assert response.body == b""
    assert files_in(data_dir) == []


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")
@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND"])
def test_other_method_answers_405_with_allow_and_writes_nothing(testapp, data_dir, method):
    body = "&".join("%s=%s" % kv for kv in status_params().items()).encode()
    response = testapp.request("/?x=1", method=method, body=body, expect_errors=True,
                               content_type="application/x-www-form-urlencoded")
    assert response.status == "405 Method Not Allowed"
    assert response.headers["Allow"] == "GET, HEAD, POST"
    assert files_in(data_dir) == []  # not even rejected.jsonl
    assert response.errors == ""


############################################################################
# Size, client address
############################################################################

@pytest.mark.config(handler={"max_body_bytes": "256"})
def test_declared_body_over_max_body_bytes_answers_413(testapp, data_dir):
    response = testapp.post("/", status_params(cmt="x" * 400), expect_errors=True)
    assert response.status_int == 413
    assert files_in(data_dir) == []
    assert response.errors == ""


@pytest.mark.config(handler={"max_body_bytes": "256"})
def test_body_of_exactly_max_body_bytes_is_accepted(testapp, read_lines):
    body = "&".join("%s=%s" % kv for kv in status_params().items())
    body += "&cmt=" + "x" * (256 - len(body) - 5)
    assert len(body) == 256
    testapp.post("/", body, content_type="application/x-www-form-urlencoded")
    assert len(read_lines("status.jsonl")) == 1


def call(app, environ, body=b"", stream=None):
    """Call a WSGI app with a hand-made environ; return (status, headers, body, errors)."""
    environ.setdefault("QUERY_STRING", "")
    setup_testing_defaults(environ)
    errors = StringIO()
    environ["wsgi.input"] = BytesIO(body) if stream is None else stream
    environ["wsgi.errors"] = errors
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, dict(headers)
        return lambda data: None

    result = app(environ, start_response)
    try:
        out = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return answer["status"], answer["headers"], out, errors.getvalue()


@pytest.mark.config(handler={"max_body_bytes": "256"})
def test_actual_chunked_body_over_max_body_bytes_answers_413(app, data_dir):
    body = ("phone=%s&id=1&status=1&cmt=%s" % (PHONE, "x" * 600)).encode()
    status, _headers, _out, errors = call(app, {
        "REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "wsgi.input_terminated": True}, body)
    assert status.startswith("413 ")
    assert files_in(data_dir) == [] and errors == ""


class Trickle(BytesIO):
    """A wsgi.input that gives at most `step` bytes a read (a server passing on packets as they come)."""

    def __init__(self, body, step):
        super().__init__(body)
        self.step = step

    def read(self, size=-1):
        return super().read(self.step if size is None or size < 0 else min(size, self.step))


class NothingYet:
    """A non-blocking wsgi.input with nothing to give: read() returns None."""

    def read(self, size=-1):
        return None


def test_body_given_a_few_bytes_a_read_is_stored_whole(app, read_lines):
    body = urlencode(status_params(cmt="x" * 300)).encode()
    status, _headers, _out, errors = call(app, {
        "REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body))}, stream=Trickle(body, 7))
    assert status.startswith("200 ") and errors == ""
    assert read_lines("status.jsonl")[0]["cmt"] == "x" * 300


def test_body_stream_that_gives_none_is_refused_not_a_500(config, data_dir):
    # Outside PEP 3333 (read() must give bytes), so without wsgiref.validate around the app.
    status, _headers, out, errors = call(smsc_handler.make_app(config), {
        "REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": "40"}, stream=NothingYet())
    assert status.startswith("400 "), (status, out, errors)
    assert b"Traceback" not in out and "Traceback" not in errors
    assert not (data_dir / "status.jsonl").exists()


@pytest.mark.config(handler={"allowed_ips": "10.0.0.0/8, 192.0.2.7"})
def test_client_not_in_allowed_ips_answers_403_and_writes_nothing(testapp, data_dir):
    response = testapp.post("/", status_params(), expect_errors=True,
                            extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert response.status == "403 Forbidden"
    assert files_in(data_dir) == []
    assert response.errors == ""


@pytest.mark.config(handler={"allowed_ips": "10.0.0.0/8, 192.0.2.7"})
@pytest.mark.parametrize("address", ["10.20.30.40", "192.0.2.7", "::ffff:10.1.1.1"])
def test_client_in_allowed_ips_is_served(testapp, read_lines, address):
    testapp.post("/", status_params(), extra_environ={"REMOTE_ADDR": address})
    assert [line["remote_addr"] for line in read_lines("status.jsonl")] == [address]


@pytest.mark.config(handler={"trusted_proxies": "127.0.0.1, 10.0.0.0/8"})
def test_trusted_proxy_forwarded_for_gives_right_most_untrusted_hop(testapp, read_lines):
    testapp.post("/", status_params(), extra_environ={
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_X_FORWARDED_FOR": "203.0.113.9, 198.51.100.7, 10.1.2.3"})
    assert read_lines("status.jsonl")[0]["remote_addr"] == "198.51.100.7"


@pytest.mark.config(handler={"trusted_proxies": "127.0.0.1, 10.0.0.0/8"})
def test_forwarded_for_from_untrusted_address_is_ignored(testapp, read_lines):
    testapp.post("/", status_params(), extra_environ={
        "REMOTE_ADDR": "192.0.2.55", "HTTP_X_FORWARDED_FOR": "198.51.100.7"})
    assert read_lines("status.jsonl")[0]["remote_addr"] == "192.0.2.55"


@pytest.mark.config(handler={"trusted_proxies": "127.0.0.1", "allowed_ips": "198.51.100.7"})
def test_allowed_ips_is_checked_against_the_forwarded_client(testapp, read_lines):
    testapp.post("/", status_params(), extra_environ={
        "REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 198.51.100.7"})
    assert len(read_lines("status.jsonl")) == 1


@pytest.mark.config(handler={"trusted_proxies": "127.0.0.1", "allowed_ips": "198.51.100.7"})
def test_spoofed_forwarded_for_from_untrusted_address_is_refused(testapp, data_dir):
    response = testapp.post("/", status_params(), expect_errors=True, extra_environ={
        "REMOTE_ADDR": "192.0.2.55", "HTTP_X_FORWARDED_FOR": "198.51.100.7"})
    assert response.status_int == 403
    assert files_in(data_dir) == []


MAPPED_NETWORK = "::ffff:10.0.0.0/120"  # 10.0.0.0/24 written as IPv4-mapped IPv6 (/96 + 24)


@pytest.mark.config(handler={"allowed_ips": MAPPED_NETWORK})
@pytest.mark.parametrize("address", ["::ffff:10.0.0.5", "10.0.0.5"])
def test_ipv4_mapped_allowed_ips_admit_the_address_in_either_form(testapp, read_lines, address):
    response = testapp.post("/", status_params(), extra_environ={"REMOTE_ADDR": address})
    assert response.status_int == 200
    assert [line["remote_addr"] for line in read_lines("status.jsonl")] == [address]


@pytest.mark.config(handler={"allowed_ips": MAPPED_NETWORK})
@pytest.mark.parametrize("address", ["10.0.1.5", "::ffff:10.0.1.5"])
def test_ipv4_mapped_allowed_ips_refuse_an_address_outside(testapp, data_dir, address):
    response = testapp.post("/", status_params(), expect_errors=True, extra_environ={"REMOTE_ADDR": address})
    assert response.status_int == 403
    assert files_in(data_dir) == []


@pytest.mark.config(handler={"trusted_proxies": MAPPED_NETWORK})
@pytest.mark.parametrize("proxy, client", [
    ("::ffff:10.0.0.5", "198.51.100.7"),
    ("10.0.0.5", "198.51.100.7"),
    ("10.0.1.5", "10.0.1.5"),  # not a trusted proxy: its X-Forwarded-For is ignored
])
def test_ipv4_mapped_trusted_proxies_are_believed_in_either_form(testapp, read_lines, proxy, client):
    testapp.post("/", status_params(), extra_environ={
        "REMOTE_ADDR": proxy, "HTTP_X_FORWARDED_FOR": "198.51.100.7"})
    assert read_lines("status.jsonl")[0]["remote_addr"] == client


############################################################################
# Bodies that can't be parsed: 400 and rejected.jsonl
############################################################################

BAD_BODIES = {
    "bad JSON": (b'{"phone": "%s", "mes": ' % MARKER.encode(), "application/json"),
    "bad XML": (b"<sms><phone>%s</phone><mes>" % MARKER.encode(), "application/xml"),
    "XML with DTD": (b'<?xml version="1.0"?><!DOCTYPE sms [<!ENTITY x "%s">]>'
                     b"<sms><phone>&x;</phone></sms>" % MARKER.encode(), "text/xml"),
    "unknown charset name": (b"phone=79991234567&id=1&status=1&charset=" + MARKER.encode(),
                             "application/x-www-form-urlencoded"),
    "no phone": (b"id=1&status=1&cmt=" + MARKER.encode(), "application/x-www-form-urlencoded"),
    "nested JSON": (b'{"a": {"b": {"phone": "%s"}}}' % MARKER.encode(), "application/json"),
}


@pytest.mark.parametrize("body, content_type", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_unparsable_body_answers_400_with_one_line_reason(testapp, body, content_type):
    response = testapp.post("/", body, content_type=content_type, expect_errors=True)
    assert response.status == "400 Bad Request"
    assert response.text.startswith("Bad Request: ")
    assert response.text.count("\n") == 1 and response.text.endswith("\n")
    assert MARKER not in response.text
    assert response.errors == ""


@pytest.mark.parametrize("body, content_type", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_unparsable_body_is_kept_in_rejected_jsonl(testapp, read_lines, data_dir, body, content_type):
    response = testapp.post("/", body, content_type=content_type, expect_errors=True, headers={
        "Cookie": "session=abc", "Authorization": "Basic dXNlcjpwYXNz", "X-Probe": "kept"})
    (record,) = read_lines("rejected.jsonl")
    assert record["reason"] and record["reason"] in response.text
    assert base64.b64decode(record["body_b64"]) == body
    headers = headers_lower(record)
    assert headers["x-probe"] == "kept"
    assert "cookie" not in headers and "authorization" not in headers
    assert stored_files(data_dir) == ["rejected.jsonl"]


def test_xml_callback_is_accepted(testapp, read_lines):
    body = "<sms><id>7</id><phone>%s</phone><status>1</status></sms>" % PHONE
    testapp.post("/", body, content_type="application/xml")
    assert read_lines("status.jsonl")[0]["format"] == "xml"


def test_json_callback_is_accepted(testapp, read_lines):
    testapp.post("/", json.dumps({"id": 7, "phone": PHONE, "status": 1}), content_type="application/json")
    assert read_lines("status.jsonl")[0]["format"] == "json"


############################################################################
# The control hash
############################################################################

@pytest.mark.config(**SIGNED)
def test_correct_md5_is_accepted(testapp, read_lines):
    testapp.post("/", signed_params())
    (line,) = read_lines("status.jsonl")
    assert line["signature"] == {"alg": "md5", "valid": True, "key": 0}


@pytest.mark.config(**SIGNED)
def test_wrong_md5_answers_403(testapp, data_dir):
    response = testapp.post("/", status_params(md5="0" * 32), expect_errors=True)
    assert response.status == "403 Forbidden"
    assert stored_files(data_dir) == ["rejected.jsonl"]
    assert response.errors == ""


@pytest.mark.config(**SIGNED)
def test_wrong_md5_is_kept_in_rejected_jsonl(testapp, read_lines):
    body = "&".join("%s=%s" % kv for kv in status_params(md5="0" * 32).items()).encode()
    testapp.post("/", body, content_type="application/x-www-form-urlencoded", expect_errors=True)
    (record,) = read_lines("rejected.jsonl")
    assert "md5" in record["reason"]
    assert base64.b64decode(record["body_b64"]) == body
    assert SECRET not in json.dumps(record)


@pytest.mark.config(handler={"secret": SECRET, "bad_signature_status": "404"})
def test_wrong_md5_answers_404_when_configured(testapp, read_lines):
    response = testapp.post("/", status_params(md5="0" * 32), expect_errors=True)
    assert response.status == "404 Not Found"
    assert len(read_lines("rejected.jsonl")) == 1
    assert read_lines("status.jsonl") == []


@pytest.mark.config(**SIGNED)
def test_missing_hash_with_secret_is_refused(testapp, read_lines):
    response = testapp.post("/", status_params(), expect_errors=True)
    assert response.status_int == 403
    assert read_lines("status.jsonl") == []
    assert "missing" in read_lines("rejected.jsonl")[0]["reason"]


@pytest.mark.config(handler={"secret": SECRET, "require_signature": "yes"})
def test_missing_hash_with_require_signature_yes_is_refused(testapp, read_lines):
    assert testapp.post("/", status_params(), expect_errors=True).status_int == 403
    assert read_lines("status.jsonl") == []


@pytest.mark.config(handler={"secret": SECRET, "require_signature": "no"})
def test_require_signature_no_lets_a_missing_hash_in(testapp, read_lines):
    testapp.post("/", status_params())
    (line,) = read_lines("status.jsonl")
    assert line["signature"] is None


@pytest.mark.config(handler={"secret": SECRET, "require_signature": "no"})
def test_require_signature_no_still_refuses_a_wrong_hash(testapp, read_lines):
    response = testapp.post("/", status_params(md5="0" * 32), expect_errors=True)
    assert response.status_int == 403
    assert read_lines("status.jsonl") == []
    assert len(read_lines("rejected.jsonl")) == 1


def test_hash_without_a_secret_is_accepted_unchecked(testapp, read_lines):
    testapp.post("/", status_params(md5="0" * 32))
    assert read_lines("status.jsonl")[0]["signature"] == {"alg": "md5", "valid": None, "key": None}


############################################################################
# Storage failures: 503 with Retry-After, nothing acknowledged
############################################################################

def test_data_dir_being_a_file_answers_503_with_retry_after(testapp, data_dir):
    data_dir.write_bytes(b"not a folder")
    response = testapp.post("/", status_params(), expect_errors=True)
    assert response.status == "503 Service Unavailable"
    assert response.headers["Retry-After"] == "240"
    assert data_dir.read_bytes() == b"not a folder"
    assert "Traceback" not in response.text


@pytest.mark.config(dedupe={"enabled": "no"})
def test_jsonl_write_failure_answers_503_with_retry_after(testapp, data_dir):
    (data_dir / "status.jsonl").mkdir(parents=True)  # opening it for append fails
    response = testapp.post("/", status_params(), expect_errors=True)
    assert response.status_int == 503
    assert response.headers["Retry-After"] == "240"


def test_jsonl_write_failure_is_not_remembered_by_dedupe(testapp, data_dir, read_lines):
    (data_dir / "status.jsonl").mkdir(parents=True)
    assert testapp.post("/", status_params(), expect_errors=True).status_int == 503
    (data_dir / "status.jsonl").rmdir()
    assert testapp.post("/", status_params()).body == b"OK"  # SMSC's retry is stored
    assert len(read_lines("status.jsonl")) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_data_dir_answers_503(testapp, data_dir):
    data_dir.mkdir(mode=0o500)
    try:
        response = testapp.post("/", status_params(), expect_errors=True)
    finally:
        data_dir.chmod(0o700)
    assert response.status_int == 503 and response.headers["Retry-After"] == "240"


def test_state_store_failure_answers_503_and_writes_no_line(testapp, data_dir, read_lines):
    (data_dir / "state.sqlite3").mkdir(parents=True)
    response = testapp.post("/", status_params(), expect_errors=True)
    assert response.status_int == 503
    assert response.headers["Retry-After"] == "240"
    assert read_lines("status.jsonl") == []


@pytest.mark.config(hook={"command": shutil.which("false") or "/bin/false"})
def test_failed_hook_answers_503_and_keeps_the_event_once(testapp, read_lines):
    for _ in range(2):
        response = testapp.post("/", status_params(), expect_errors=True)
        assert response.status_int == 503
        assert response.headers["Retry-After"] == "240"
    assert len(read_lines("status.jsonl")) == 1


############################################################################
# Every answer
############################################################################

#: one request per row of SPEC §3 that a single config can produce: (name, method, url, body)
ROWS = [
    ("accepted", "POST", "/", "&".join("%s=%s" % kv for kv in signed_params().items())),
    ("accepted GET", "GET", "/?" + "&".join("%s=%s" % kv for kv in signed_params(id="2").items()), ""),
    ("health", "GET", "/", ""),
    ("head", "HEAD", "/?phone=1", ""),
    ("405", "PUT", "/", "phone=1"),
    ("413", "POST", "/", "phone=1&cmt=" + "x" * 300),
    ("400", "POST", "/", "{" + MARKER),
    ("bad hash", "POST", "/", "&".join("%s=%s" % kv for kv in status_params(md5=MARKER).items())),
    ("missing hash", "POST", "/", "&".join("%s=%s" % kv for kv in status_params(cmt=MARKER).items())),
]


@pytest.fixture
def every_answer(make_config):
    """Answer every ROWS request with one signed config; return [(name, response)]."""
    path = make_config(handler={"secret": SECRET, "max_body_bytes": "256"})
    testapp = webtest.TestApp(validator(smsc_handler.make_app(smsc_handler.load_config(str(path)))),
                              extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    answers = []
    for name, method, url, body in ROWS:
        answers.append((name, testapp.request(
            url, method=method, body=body.encode(), expect_errors=True,
            content_type="application/x-www-form-urlencoded")))
    return answers


def test_every_answer_is_plain_utf8_text(every_answer):
    assert [(name, r.headers["Content-Type"]) for name, r in every_answer] == [
        (name, PLAIN) for name, _r in every_answer]


def test_every_answer_has_a_correct_content_length(every_answer):
    for name, response in every_answer:
        if name != "head":
            assert int(response.headers["Content-Length"]) == len(response.body), name


def test_no_answer_carries_secret_request_data_or_traceback(every_answer):
    for name, response in every_answer:
        assert SECRET.encode() not in response.body, name
        assert MARKER.encode() not in response.body, name
        assert b"Traceback" not in response.body and b'File "' not in response.body, name


def test_expected_answers_write_nothing_to_wsgi_errors(every_answer):
    assert [(name, r.errors) for name, r in every_answer] == [(name, "") for name, _r in every_answer]


def test_expected_statuses_per_row(every_answer):
    assert [(name, r.status_int) for name, r in every_answer] == [
        ("accepted", 200), ("accepted GET", 200), ("health", 200), ("head", 200), ("405", 405),
        ("413", 413), ("400", 400), ("bad hash", 403), ("missing hash", 403)]


def test_refusals_are_logged_at_warning_one_line_each(testapp, caplog):
    caplog.set_level("WARNING", logger="smsc_handler")
    testapp.post("/", "{bad", content_type="application/json", expect_errors=True)
    testapp.request("/", method="DELETE", expect_errors=True)
    records = [r for r in caplog.records if r.name == "smsc_handler"]
    assert [r.levelname for r in records] == ["WARNING", "WARNING"]
    assert all("\n" not in r.getMessage() for r in records)


def test_body_shorter_than_declared_is_no_crash(app, data_dir):
    status, _headers, _out, errors = call(app, {
        "REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": "100"}, ("phone=%s&id=1&status=1" % PHONE).encode())
    assert errors == ""
    assert status[:3] in ("200", "400")



def test_undecodable_query_parameters_make_the_event_lossy_with_the_raw_query(testapp, read_lines):
    query = "phone=%s&id=2&status=1&charset=utf-8&note=%%FF%%FE" % PHONE
    response = testapp.get("/?" + query)
    assert response.status_int == 200 and response.body == b"OK"
    (event,) = read_lines("status.jsonl")
    assert event["lossy"] is True
    assert event["params"]["note"] == "\ufffd\ufffd"
    assert base64.b64decode(event["query_b64"]) == query.encode("ascii")
    assert base64.b64decode(event["body_b64"]) == b""
