"""`send` (acting as SMSC), `sign` and `verify` (SPEC §8, §9; issue 4 items 1–2).

`send` runs against a real ``serve`` subprocess, or against a scripted local HTTP
server when the test needs to see the wire (retries, the GET/POST split, dry runs).
"""

import base64
import itertools
import json
import re

import pytest
from cli_util import (
    SECRET,
    ScriptedServer,
    ServeProcess,
    assert_one_line_error,
    clean_env,
    free_port,
    run_cli,
    write_config,
)

from smsc_handler import main

CYRILLIC = "Привет, мир"
_ids = itertools.count(1000)


def new_id() -> str:
    """A message id (and waitcall ts) not used before in this module: no dedupe hits."""
    return str(next(_ids))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `serve` process for the module, configured with SECRET."""
    folder = tmp_path_factory.mktemp("send")
    serve = ServeProcess(write_config(folder, handler={"secret": SECRET}))
    yield serve
    serve.close()


@pytest.fixture(scope="module")
def crc32_server(tmp_path_factory):
    """A `serve` process that accepts crc32: only when [handler] hash_alg names it (SPEC §5a)."""
    folder = tmp_path_factory.mktemp("send-crc32")
    serve = ServeProcess(write_config(folder, handler={"secret": SECRET, "hash_alg": "crc32"}))
    yield serve
    serve.close()


def send(*args) -> int:
    return main(["send", *args])


def stored(server, kind, **params) -> dict:
    """The one stored event of `kind` whose params include `params`."""
    found = [event for event in server.events(kind + ".jsonl")
             if all(event["params"].get(name) == value for name, value in params.items())]
    assert len(found) == 1, found
    return found[0]


def identity(kind) -> dict:
    """Overrides that make a fresh callback of `kind` (a new id, or a new ts for waitcall)."""
    return {"ts": new_id()} if kind == "waitcall" else {"id": new_id()}


def assignments(values) -> list:
    return ["%s=%s" % item for item in values.items()]


############################################################################
# send against a real `serve`
############################################################################


@pytest.mark.parametrize("fmt", ["form", "json", "xml"])
@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_send_delivers_every_kind_in_every_format(server, capsys, kind, fmt):
    fields = identity(kind)
    url = server.url + "?md5=%s&charset=utf-8" % SECRET
    assert send(url, "--kind", kind, "--fmt", fmt, *assignments(fields)) == 0
    assert "200" in capsys.readouterr().out
    event = stored(server, kind, **fields)
    assert event["kind"] == kind
    assert event["format"] == fmt
    assert event["signature"] == {"alg": "md5", "valid": True, "key": 0}


@pytest.mark.parametrize("alg", ["md5", "sha1", "crc32"])
@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_secret_in_the_url_becomes_a_hash_the_handler_accepts(request, kind, alg):
    server = request.getfixturevalue("crc32_server" if alg == "crc32" else "server")
    fields = identity(kind)
    assert send(server.url + "?%s=%s" % (alg, SECRET), "--kind", kind, *assignments(fields)) == 0
    event = stored(server, kind, **fields)
    assert event["signature"] == {"alg": alg, "valid": True, "key": 0}
    assert SECRET not in json.dumps(event)


@pytest.mark.parametrize("charset", ["utf-8", "koi8-r", "windows-1251"])
def test_cyrillic_mes_arrives_decoded_in_the_urls_charset(server, charset):
    message_id = new_id()
    url = server.url + "?charset=%s&md5=%s" % (charset, SECRET)
    assert send(url, "--kind", "incoming", "id=" + message_id, "mes=" + CYRILLIC) == 0
    event = stored(server, "incoming", id=message_id)
    assert event["mes"] == CYRILLIC
    assert event["charset"] == charset
    assert event["lossy"] is False
    assert event["signature"]["valid"] is True


def test_charset_option_overrides_the_default(server):
    message_id = new_id()
    assert send(server.url + "?md5=" + SECRET, "--kind", "incoming", "--charset", "koi8-r",
                "id=" + message_id, "mes=" + CYRILLIC) == 0
    event = stored(server, "incoming", id=message_id)
    assert (event["charset"], event["mes"]) == ("koi8-r", CYRILLIC)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_koi8r_with_fmt_falls_back_to_windows_1251(server, capsys, fmt):
    message_id = new_id()
    url = server.url + "?charset=koi8-r&md5=" + SECRET
    assert send(url, "--kind", "incoming", "--fmt", fmt, "id=" + message_id, "mes=" + CYRILLIC) == 0
    assert "windows-1251" in capsys.readouterr().out  # the note says why
    event = stored(server, "incoming", id=message_id)
    assert (event["format"], event["charset"], event["mes"]) == (fmt, "windows-1251", CYRILLIC)
    assert event["signature"]["valid"] is True


def test_fmt_written_in_the_url_picks_the_body_format(server):
    message_id = new_id()
    assert send(server.url + "?fmt=3&md5=" + SECRET, "id=" + message_id) == 0
    assert stored(server, "status", id=message_id)["format"] == "json"


def test_parameters_between_bang_and_question_mark_reach_the_handler(server):
    message_id = new_id()
    url = server.url + "!client=shop1&env=test?md5=%s&charset=utf-8" % SECRET
    assert send(url, "id=" + message_id) == 0
    event = stored(server, "status", id=message_id)
    assert event["params"]["client"] == "shop1"
    assert event["params"]["env"] == "test"
    assert event["signature"]["valid"] is True


def test_parameters_after_question_mark_reach_the_handler_too(server):
    message_id = new_id()
    assert send(server.url + "?md5=%s&shop=7" % SECRET, "id=" + message_id) == 0
    assert stored(server, "status", id=message_id)["params"]["shop"] == "7"


def test_hash_written_between_bang_and_question_mark_is_sent_as_a_hash(server):
    message_id = new_id()
    assert send(server.url + "!md5=%s?charset=utf-8" % SECRET, "id=" + message_id) == 0
    assert stored(server, "status", id=message_id)["signature"] == {"alg": "md5", "valid": True, "key": 0}


def test_overrides_replace_the_defaults(server):
    message_id = new_id()
    assert send(server.url + "?md5=" + SECRET, "id=" + message_id, "status=3", "err=1") == 0
    event = stored(server, "status", id=message_id)
    assert (event["status"], event["status_name"], event["final"]) == (3, "expired", True)
    assert (event["err"], event["err_name"]) == (1, "subscriber does not exist")


def test_hlr_variant_carries_the_network_fields(server):
    message_id = new_id()
    assert send(server.url + "?md5=" + SECRET, "type=4", "id=" + message_id) == 0
    event = stored(server, "status", id=message_id)
    assert (event["type"], event["type_name"]) == (4, "HLR")
    for name in ("imsi", "msc", "mcc", "mnc", "cn", "net"):
        assert event[name], name
    assert event["mcc"] == "250"


def test_voice_variant_carries_the_call_fields(server):
    message_id = new_id()
    assert send(server.url + "?md5=" + SECRET, "type=7", "id=" + message_id) == 0
    event = stored(server, "status", id=message_id)
    assert (event["type"], event["type_name"]) == (7, "Call")
    for name in ("calltime", "callmenu", "ringtime"):
        assert event[name] is not None, name


def test_wrong_secret_is_refused_and_send_exits_1(server, capsys):
    assert send(server.url + "?md5=not-the-secret", "id=" + new_id()) == 1
    assert "403" in capsys.readouterr().out


def test_send_exits_1_when_nothing_listens(capsys):
    assert send("http://127.0.0.1:%d/" % free_port()) == 1
    captured = capsys.readouterr()
    assert "no answer" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_send_as_a_real_subprocess(server):
    message_id = new_id()
    done = run_cli("send", server.url + "?md5=%s&charset=utf-8" % SECRET, "--kind", "incoming",
                   "id=" + message_id, "mes=" + CYRILLIC)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stored(server, "incoming", id=message_id)["mes"] == CYRILLIC


############################################################################
# send against a scripted server: the wire, retries
############################################################################


def test_get_part_goes_in_the_query_string_and_the_rest_in_the_body(capsys):
    with ScriptedServer([200]) as fake:
        assert send(fake.url + "!a=1&b=2?c=3&charset=utf-8", "id=77") == 0
    ((method, path, headers, body),) = fake.requests
    assert method == "POST"
    assert path == "/?a=1&b=2"
    fields = dict(pair.split("=", 1) for pair in body.decode("ascii").split("&"))
    assert fields["c"] == "3" and fields["id"] == "77" and fields["charset"] == "utf-8"
    assert "a" not in fields and "b" not in fields
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_secret_never_goes_on_the_wire():
    with ScriptedServer([200]) as fake:
        assert send(fake.url + "!md5=%s?charset=utf-8" % SECRET, "id=78") == 0
    ((_method, path, _headers, body),) = fake.requests
    assert SECRET.encode() not in path.encode() + body
    assert re.fullmatch(r"/\?md5=[0-9a-f]{32}", path)


def test_retry_follows_smscs_rule_until_200(capsys):
    with ScriptedServer([503, 503, 200]) as fake:
        rc = send(fake.url, "--retry", "--tries", "3", "--interval", "0.05")
    assert rc == 0
    assert len(fake.requests) == 3
    assert len({request[3] for request in fake.requests}) == 1  # the same request each time


def test_retry_stops_at_404(capsys):
    with ScriptedServer([404]) as fake:
        rc = send(fake.url, "--retry", "--tries", "3", "--interval", "0.05")
    assert rc == 1
    assert len(fake.requests) == 1


def test_retry_gives_up_after_tries(capsys):
    with ScriptedServer([500]) as fake:
        rc = send(fake.url, "--retry", "--tries", "3", "--interval", "0.01")
    assert rc == 1
    assert len(fake.requests) == 3


def test_without_retry_one_failure_is_final(capsys):
    with ScriptedServer([503, 200]) as fake:
        assert send(fake.url, "--tries", "3", "--interval", "0.01") == 1
    assert len(fake.requests) == 1


def test_dry_run_prints_the_request_and_sends_nothing(capsys):
    with ScriptedServer([200]) as fake:
        assert send(fake.url + "!g=1?md5=" + SECRET, "--dry-run", "id=55", "phone=79990000001",
                    "status=1") == 0
    assert fake.requests == []
    out = capsys.readouterr().out
    assert "POST %s?g=1" % fake.url in out
    assert "Content-Type: application/x-www-form-urlencoded" in out
    assert "id=55&phone=79990000001&status=1" in out
    assert re.search(r"md5=[0-9a-f]{32}", out)
    assert SECRET not in out


@pytest.mark.parametrize("charset, encoded", [
    ("utf-8", "%D0%9F%D1%80%D0%B8"),
    ("koi8-r", "%F0%D2%C9"),
    ("windows-1251", "%CF%F0%E8"),
])
def test_form_values_are_encoded_in_the_urls_charset(capsys, charset, encoded):
    assert send("http://127.0.0.1:9/?charset=" + charset, "--kind", "incoming", "--dry-run",
                "mes=При") == 0
    out = capsys.readouterr().out
    assert "mes=%s&" % encoded in out


@pytest.mark.parametrize("fmt, media", [("json", "application/json"), ("xml", "application/xml")])
def test_dry_run_of_koi8r_with_fmt_sends_windows_1251(capsys, fmt, media):
    assert send("http://127.0.0.1:9/?charset=koi8-r", "--fmt", fmt, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "note:" in out and "koi8-r" in out
    assert "Content-Type: %s; charset=windows-1251" % media in out


@pytest.mark.parametrize("url", ["127.0.0.1:8080/", "ftp://127.0.0.1/", "http://"])
def test_send_refuses_a_url_that_is_not_http(capsys, url):
    assert send(url) == 2
    assert_one_line_error(capsys.readouterr().err)


def test_send_with_a_character_the_charset_lacks_is_not_a_traceback(capsys):
    rc = send("http://127.0.0.1:9/", "--kind", "incoming", "--dry-run", "mes=smile \U0001F600")
    err = capsys.readouterr().err
    assert rc in (0, 2)
    assert "Traceback" not in err and len(err.splitlines()) <= 1


@pytest.mark.parametrize("verb", ["send", "sign"])
def test_an_unknown_charset_is_a_usage_error(capsys, verb):
    argv = {"send": ["send", "http://127.0.0.1:9/", "--dry-run"],
            "sign": ["sign", "--secret", SECRET, *STATUS_FIELDS]}[verb]
    assert main([*argv, "--charset", "cp866"]) == 2
    assert_one_line_error(capsys.readouterr().err)


def test_send_refuses_a_field_without_equals(capsys):
    assert send("http://127.0.0.1:9/", "--dry-run", "status") == 2
    assert_one_line_error(capsys.readouterr().err)


############################################################################
# sign: known-answer vectors (computed with md5sum, sha1sum, iconv and zlib/gzip)
############################################################################

STATUS_FIELDS = ["id=1234", "phone=79991234567", "status=1"]
WAITCALL_FIELDS = ["phone=79991234567", "ts=1700000000"]
INCOMING_FIELDS = ["phone=79991234567", "mes=Привет", "to=79000000000"]


@pytest.mark.parametrize("kind, fields, alg, expected", [
    # "1234:79991234567:1:Zq9-secret_X"
    ("status", STATUS_FIELDS, "md5", "b8c2a6b9e92d06519e38a3fa1be8788c"),
    ("status", STATUS_FIELDS, "sha1", "2d278a26324e68980bdf1ab4460ec4eb172ab4d7"),
    ("status", STATUS_FIELDS, "crc32", "1329466064"),
    # "79991234567:1700000000:Zq9-secret_X"
    ("waitcall", WAITCALL_FIELDS, "md5", "8460805ba470380852a0b64a2f9daec7"),
    ("waitcall", WAITCALL_FIELDS, "sha1", "e7a6d99737e3c98012a344c74e4b711a3dd435f1"),
    # above 2**31: a signed print would be negative
    ("waitcall", WAITCALL_FIELDS, "crc32", "3948134336"),
])
def test_sign_prints_the_known_hash(capsys, kind, fields, alg, expected):
    assert main(["sign", "--kind", kind, "--alg", alg, "--secret", SECRET, *fields]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("charset, alg, expected", [
    # "79991234567:Привет:79000000000:Zq9-secret_X" with mes in each charset
    ("utf-8", "md5", "373f0fd2dd885396c1d29987951c0e82"),
    ("koi8-r", "md5", "9101c22127601466fad6a56ec744e475"),
    ("windows-1251", "md5", "b91a6918c10dc3f09ceaf2d1109e2906"),
    ("utf-8", "sha1", "534df4de9bf9a6b607ee3892df52a0619b624a4a"),
    ("utf-8", "crc32", "2366867807"),
])
def test_sign_hashes_mes_in_the_given_charset(capsys, charset, alg, expected):
    assert main(["sign", "--kind", "incoming", "--alg", alg, "--secret", SECRET,
                 "--charset", charset, *INCOMING_FIELDS]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_sign_defaults_to_windows_1251_like_smsc(capsys):
    assert main(["sign", "--kind", "incoming", "--secret", SECRET, *INCOMING_FIELDS]) == 0
    assert capsys.readouterr().out == "b91a6918c10dc3f09ceaf2d1109e2906\n"


def test_sign_ignores_fields_the_kind_does_not_hash(capsys):
    assert main(["sign", "--secret", SECRET, "cost=9.99", *STATUS_FIELDS, "err=1"]) == 0
    assert capsys.readouterr().out == "b8c2a6b9e92d06519e38a3fa1be8788c\n"


def test_sign_with_a_missing_field_is_a_usage_error(capsys):
    assert main(["sign", "--kind", "status", "--secret", SECRET, "id=1234", "phone=7999"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "status" in err


def test_sign_with_a_character_the_charset_lacks_is_a_usage_error(capsys):
    rc = main(["sign", "--kind", "incoming", "--secret", SECRET, "--charset", "koi8-r",
               "phone=7999", "mes=\U0001F600", "to=7900"])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err)


def test_sign_without_secret_is_a_usage_error(capsys):
    assert main(["sign", *STATUS_FIELDS]) == 2
    assert "--secret" in capsys.readouterr().err


def test_sign_as_a_real_subprocess():
    done = run_cli("sign", "--kind", "waitcall", "--alg", "crc32", "--secret", SECRET, *WAITCALL_FIELDS)
    assert (done.returncode, done.stdout, done.stderr) == (0, "3948134336\n", "")


############################################################################
# verify: a real refused request, a raw HTTP request
############################################################################


@pytest.fixture(scope="module")
def refused(server):
    """Lines of rejected.jsonl from real requests refused for a wrong secret (403)."""
    status_id = new_id()
    incoming_id = new_id()
    assert main(["send", server.url + "?md5=wrong-secret&charset=utf-8", "id=" + status_id,
                 "phone=79991234567", "status=1"]) == 1
    assert main(["send", server.url + "?md5=wrong-secret&charset=koi8-r", "--kind", "incoming",
                 "id=" + incoming_id, "phone=79991234567", "mes=Привет", "to=79000000000"]) == 1
    lines = (server.data_dir / "rejected.jsonl").read_text().splitlines()
    status_line = next(line for line in lines if "id=%s&" % status_id in _body(line))
    incoming_line = next(line for line in lines if "id=%s&" % incoming_id in _body(line))
    for line in (status_line, incoming_line):
        assert json.loads(line)["status"] == 403
    return {"status": status_line + "\n", "incoming": incoming_line + "\n"}


def _body(line) -> str:
    return base64.b64decode(json.loads(line)["body_b64"]).decode("ascii")


def test_verify_explains_a_refused_status_callback(server, refused, tmp_path, capsys):
    captured = tmp_path / "line.json"
    captured.write_text(refused["status"])
    assert main(["verify", str(captured), "--config", str(server.config_path)]) == 1
    out, err = capsys.readouterr()
    assert "md5" in out
    assert "utf-8" in out
    assert re.search(r"\d+:79991234567:1:<secret>", out)
    assert "FAIL" in out and "PASS" not in out
    assert SECRET not in out + err


def test_verify_shows_the_charset_and_mes_of_an_incoming_callback(server, refused, tmp_path, capsys):
    captured = tmp_path / "line.json"
    captured.write_text(refused["incoming"])
    assert main(["verify", str(captured), "--config", str(server.config_path)]) == 1
    out = capsys.readouterr().out
    assert "koi8-r" in out
    assert "79991234567:Привет:79000000000:<secret>" in out
    assert "FAIL" in out
    assert SECRET not in out


def test_verify_reads_stdin_as_a_real_subprocess(server, refused):
    done = run_cli("verify", "-", "--config", server.config_path, input=refused["status"])
    assert done.returncode == 1, done.stderr
    assert "FAIL" in done.stdout and "<secret>" in done.stdout and "md5" in done.stdout
    assert SECRET not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_verify_passes_the_refused_request_with_the_secret_it_was_made_with(refused, tmp_path, capsys):
    captured = tmp_path / "line.json"
    captured.write_text(refused["status"])
    assert main(["verify", str(captured), "--secret", "wrong-secret"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    assert "wrong-secret" not in out


RAW_BODY = b"id=1234&phone=79991234567&status=1&ts=1700000000&md5=b8c2a6b9e92d06519e38a3fa1be8788c"


def raw_request(body=RAW_BODY, query="charset=utf-8") -> bytes:
    return (b"POST /smsc/handler.cgi?%s HTTP/1.1\r\nHost: example.org\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n"
            % (query.encode(), len(body))) + body


def test_verify_passes_a_raw_http_request_with_the_right_hash(tmp_path, capsys):
    captured = tmp_path / "request.http"
    captured.write_bytes(raw_request())
    assert main(["verify", str(captured), "--secret", SECRET]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    assert "1234:79991234567:1:<secret>" in out
    assert SECRET not in out


def test_verify_uses_the_secret_of_the_config(tmp_path, capsys):
    config = write_config(tmp_path, handler={"secret": SECRET})
    captured = tmp_path / "request.http"
    captured.write_bytes(raw_request())
    assert main(["verify", str(captured), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and SECRET not in out


def test_verify_fails_a_raw_request_with_a_tampered_field(tmp_path, capsys):
    captured = tmp_path / "request.http"
    captured.write_bytes(raw_request(RAW_BODY.replace(b"status=1", b"status=3")))
    assert main(["verify", str(captured), "--secret", SECRET]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1234:79991234567:3:<secret>" in out
    assert SECRET not in out


def test_verify_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing.http"), "--secret", SECRET]) == 1
    assert_one_line_error(capsys.readouterr().err)


def test_verify_of_garbage_is_one_line(tmp_path, capsys):
    captured = tmp_path / "garbage"
    captured.write_bytes(b"\x00\x01garbage")
    assert main(["verify", str(captured), "--secret", SECRET]) in (1, 2)
    assert_one_line_error(capsys.readouterr().err)


def chunked_request(body=RAW_BODY, query="charset=utf-8") -> bytes:
    """RAW_BODY sent with Transfer-Encoding: chunked, in three chunks (one with an extension)."""
    pieces = [body[:10], body[10:41], body[41:]]
    chunks = b"%x\r\n%s\r\n" % (len(pieces[0]), pieces[0])
    chunks += b"%x;note=x\r\n%s\r\n" % (len(pieces[1]), pieces[1])
    chunks += b"%x\r\n%s\r\n0\r\n\r\n" % (len(pieces[2]), pieces[2])
    return (b"POST /smsc/handler.cgi?%s HTTP/1.1\r\nHost: example.org\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
            % query.encode()) + chunks


def test_verify_dechunks_a_raw_chunked_request_and_passes_it(tmp_path, capsys):
    captured = tmp_path / "request.http"
    captured.write_bytes(chunked_request())
    assert main(["verify", str(captured), "--secret", SECRET]) == 0
    out = capsys.readouterr().out
    assert "body: %d bytes" % len(RAW_BODY) in out
    assert "1234:79991234567:1:<secret>" in out
    assert "PASS" in out and "FAIL" not in out


@pytest.mark.parametrize("headers", [[1], "text", 5], ids=["list", "string", "number"])
def test_verify_of_a_rejected_line_with_odd_headers_is_a_one_line_usage_error(tmp_path, headers):
    record = {"status": 403, "query": "charset=utf-8", "headers": headers,
              "body_b64": base64.b64encode(RAW_BODY).decode("ascii")}
    captured = tmp_path / "line.json"
    captured.write_text(json.dumps(record) + "\n")
    done = run_cli("verify", captured, "--secret", SECRET)
    assert done.returncode == 2, done.stdout + done.stderr
    assert_one_line_error(done.stderr)


@pytest.mark.parametrize("source", [["--secret", SECRET], []], ids=["with-secret", "with-config"])
def test_verify_with_an_unknown_default_charset_is_a_usage_error(tmp_path, capsys, source):
    config = write_config(tmp_path, handler={"secret": SECRET})
    captured = tmp_path / "request.http"
    captured.write_bytes(raw_request())
    assert main(["verify", str(captured), "--config", str(config), "--default-charset", "bogus",
                 *source]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "bogus" in err


def test_verify_to_an_ascii_stdout_is_never_a_traceback(tmp_path):
    body = "phone=79991234567&mes=%D0%9F%D1%80%D0%B8&to=1&md5=0".encode("ascii")
    captured = tmp_path / "request.http"
    captured.write_bytes(raw_request(body))
    done = run_cli("verify", captured, "--secret", SECRET, env=clean_env(PYTHONIOENCODING="ascii"))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1 and "FAIL" in done.stdout
