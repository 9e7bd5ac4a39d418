"""Security (issue 3 item 4): the secret stays in the config, requests never run a shell.

The secret must appear in no file under data_dir, no log record and no answer,
on every path: accepted, repeated, refused (400/403/404/405/413), 503 (storage
and hook) and a broken config. Shell syntax in fields never executes; a
``Proxy:`` header never reaches the hook (httpoxy); rejected.jsonl keeps no
cookies or credentials.
"""

import base64
import json
import logging
import os
import zlib

import pytest
from proof_util import (
    HookRecorder,
    Site,
    all_bytes_under,
    as_json,
    as_xml,
    form,
    incoming_callback,
    run_cgi,
    sign,
    status_callback,
    waitcall_callback,
    write_ini,
)

import smsc_handler

SECRET = "Sup3r-Secret_Value"
#: what would betray the secret in a file or a log, not just its plain text
SECRET_FORMS = [SECRET.encode(), SECRET.lower().encode(), SECRET.upper().encode(),
                base64.b64encode(SECRET.encode()), SECRET.encode("utf-16-le")]
COOKIE = "session=cookie-value-1234"
AUTH = "Basic dXNlcjpwYXNzd29yZC01Njc4"


def leaks(data: bytes) -> list:
    return [form for form in SECRET_FORMS if form in data]


def assert_no_secret_in_logs(records):
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        assert not leaks(text.encode("utf-8", "replace")), text


def assert_no_secret_in_answer(answer):
    raw = ("%s %s" % (answer.status, answer.headerlist)).encode() + answer.body
    assert not leaks(raw), raw


def signed(kind_params, alg="md5"):
    kind = smsc_handler.classify(kind_params)
    params = dict(kind_params)
    if alg == "crc32":
        fields = {"status": ("id", "phone", "status"), "incoming": ("phone", "mes", "to"),
                  "waitcall": ("phone", "ts")}[kind]
        text = ":".join([params[n] for n in fields] + [SECRET]).encode("utf-8")
        params["crc32"] = str(zlib.crc32(text))
    else:
        params[alg] = sign(kind, params, SECRET, alg)
    return params


def test_the_secret_appears_in_no_file_log_or_answer(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hook = HookRecorder(tmp_path / "hook")
    site = Site(tmp_path, handler={"secret": SECRET, "max_body_bytes": "4096"},
                hook={"command": hook.command(), "on_failure": "retry"})
    answers = []

    def post(body, expect, **kw):
        answer = site.post(body, **kw)
        assert answer.status_int == expect, (answer.status, answer.body)
        answers.append(answer)

    # accepted, every kind, format and algorithm; then repeated
    for params in (status_callback(), incoming_callback(mes="Привет"), waitcall_callback()):
        for alg in ("md5", "sha1", "crc32"):
            post(form(signed(params, alg)), 403 if alg == "crc32" else 200)  # hash_alg = auto
        post(as_json(signed(params)), 200, content_type="application/json")
        post(as_xml(signed(params)), 200, content_type="application/xml")
    # refused: wrong hash, missing hash, bad body, bad charset, too large
    post(form(dict(status_callback(id="w"), md5="0" * 32)), 403)
    post(form(status_callback(id="missing")), 403)
    post(b"{not json", 400, content_type="application/json")
    post(form(signed(status_callback(id="cs"))) + b"&charset=x-unknown", 400)
    post(b"phone=7&mes=" + b"x" * 5000, 413)
    answers.append(site.testapp.put("/", "x", status="*"))
    answers.append(site.testapp.get("/", status="*"))
    # 503: the hook fails, then storage fails
    hook.set_mode("fail")
    post(form(signed(status_callback(id="hook-fails"))), 503)
    hook.set_mode("ok")
    post(form(signed(status_callback(id="hook-fails"))), 200)
    site.path("waitcall").unlink()
    site.path("waitcall").symlink_to("/dev/full")
    post(form(signed(waitcall_callback(ts="1700009999"))), 503)

    for answer in answers:
        assert_no_secret_in_answer(answer)
    files = all_bytes_under(site.data)
    assert "state.sqlite3" in {os.path.basename(p) for p in files}
    assert (site.data / "rejected.jsonl").exists()
    for path, data in files.items():
        assert not leaks(data), path
    for run in hook.runs():
        assert not leaks(json.dumps(run).encode()), run
    assert_no_secret_in_logs(caplog.records)
    assert len(caplog.records) >= 8  # the refusals were logged, just not the secret


def test_the_secret_stays_out_of_the_real_cgi_output_and_log(tmp_path):
    config = write_ini(tmp_path / "smsc.ini", {"handler": {"data_dir": "data", "secret": SECRET}})
    for body in (form(signed(status_callback())), form(status_callback(id="unsigned")),
                 form(dict(status_callback(id="wrong"), md5="f" * 32)), b"garbage"):
        answer = run_cgi(config, body)
        assert answer.status in (200, 400, 403), answer
        assert not leaks(answer.raw + answer.stderr), answer
    for path, data in all_bytes_under(tmp_path / "data").items():
        assert not leaks(data), path


BROKEN_CONFIGS = {
    "bad character": "[handler]\nsecret = %s!\n" % SECRET,
    "inline comment": "[handler]\nsecret = %s ; from SMSC\n" % SECRET,
    "missing equals": "[handler]\nsecret %s\n" % SECRET,
    "bare line": "[handler]\nsecret = %s\n%s\n" % (SECRET, SECRET),
    "set twice": "[handler]\nsecret = %s\nsecret = %s\n" % (SECRET, SECRET),
    "before a section": "secret = %s\n[handler]\n" % SECRET,
    "other key bad": "[handler]\nsecret = %s\ntimezone = Mars/Olympus\n" % SECRET,
    "typo in key": "[handler]\nsecrte = %s\n" % SECRET,
    "bad mode after": "[handler]\nsecret = %s\nfile_mode = 0400\n" % SECRET,
}


@pytest.mark.parametrize("text", BROKEN_CONFIGS.values(), ids=BROKEN_CONFIGS.keys())
def test_a_config_error_never_shows_the_secret(tmp_path, text, caplog):
    path = tmp_path / "smsc.ini"
    path.write_text(text)
    with pytest.raises(smsc_handler.ConfigError) as error:
        smsc_handler.load_config(str(path))
    assert not leaks(str(error.value).encode()), str(error.value)
    assert not leaks(error.value.reason.encode())
    # The real CGI entry: 503 with Retry-After, and the log line says why without the secret.
    answer = run_cgi(path, form(status_callback()))
    assert answer.status == 503, answer
    assert answer.headers["retry-after"] == "240"
    assert not leaks(answer.raw), answer.raw
    assert not leaks(answer.stderr), answer.stderr
    assert b"Traceback" not in answer.stderr
    assert not (tmp_path / "data").exists()


def test_config_repr_hides_the_secret(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET})
    assert not leaks(repr(site.config).encode())
    assert not leaks(str(site.config).encode())


@pytest.mark.parametrize("bait", ["$(touch pwned-a)", "`touch pwned-b`", "; touch pwned-c",
                                  "| touch pwned-d", "&& touch pwned-e", "'; touch pwned-f; '"])
def test_shell_syntax_in_a_field_never_runs_through_the_real_cgi_entry(tmp_path, bait):
    hook = HookRecorder(tmp_path / "hook")
    site = Site(tmp_path, hook={"command": hook.command()})
    answer = site.cgi(form(incoming_callback(mes=bait, to=bait, phone="7999" + bait)),
                      headers={"X-Bait": bait, "User-Agent": bait})
    assert answer.status == 200, answer
    (run,) = hook.runs()
    assert json.loads(run["stdin"])["mes"] == bait
    for root in (tmp_path, site.data, hook.out):
        assert not [n for n in os.listdir(root) if n.startswith("pwned")], root


def test_a_proxy_header_never_reaches_the_hook_through_the_real_cgi_entry(tmp_path):
    hook = HookRecorder(tmp_path / "hook")
    site = Site(tmp_path, hook={"command": hook.command()})
    answer = site.cgi(form(status_callback()), headers={"Proxy": "http://127.0.0.1:9/"})
    assert answer.status == 200, answer
    (run,) = hook.runs()
    assert "HTTP_PROXY" not in run["env"]
    assert "http_proxy" not in {name.lower() for name in run["env"]}
    assert "127.0.0.1:9" not in json.dumps(run["env"])
    assert sorted(run["env"]) == ["HOME", "LANG", "PATH", "SMSC_EVENT_FILE", "SMSC_EVENT_ID",
                                  "SMSC_EVENT_KIND"]


PRIVATE = {"Cookie": COOKIE, "Authorization": AUTH, "Proxy-Authorization": AUTH + "-proxy"}


def _assert_rejected_keeps_no_credentials(data_dir):
    lines = (data_dir / "rejected.jsonl").read_bytes().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        names = {name.lower() for name in record["headers"]}
        assert not names & {"cookie", "authorization", "proxy-authorization"}, names
        assert "x-kept" in names  # other headers are kept
        for value in PRIVATE.values():
            assert value.encode() not in line
            assert base64.b64encode(value.encode()) not in line


def test_rejected_requests_keep_no_cookies_or_credentials(tmp_path):
    site = Site(tmp_path, handler={"secret": SECRET})
    headers = dict(PRIVATE, **{"X-Kept": "yes"})
    assert site.post(b"{broken", content_type="application/json", headers=headers).status_int == 400
    assert site.post(form(status_callback()), headers=headers).status_int == 403
    _assert_rejected_keeps_no_credentials(site.data)


def test_rejected_requests_keep_no_cookies_or_credentials_under_the_real_cgi_entry(tmp_path):
    site = Site(tmp_path)
    answer = site.cgi(b"<data><phone>7</phone><x><y><z/></y></x></data>", content_type="text/xml",
                      headers=dict(PRIVATE, **{"X-Kept": "yes"}))
    assert answer.status == 400, answer
    _assert_rejected_keeps_no_credentials(site.data)


def test_a_refusal_never_echoes_the_request(tmp_path):
    site = Site(tmp_path)
    marker = "zz-echo-marker-77"
    bodies = [
        (form(status_callback()) + b"&charset=" + marker.encode(), "application/x-www-form-urlencoded"),
        (b'{"phone": "7", "' + marker.encode() + b'": {"a": {"b": 1}}}', "application/json"),
        (b"<" + marker.encode() + b">", "application/xml"),
        (marker.encode() + b"=1", "application/x-www-form-urlencoded"),
    ]
    for body, content_type in bodies:
        answer = site.post(body, content_type=content_type, headers={"X-Echo": marker})
        assert answer.status_int == 400
        assert marker.encode() not in answer.body
        assert marker not in str(answer.headerlist)
