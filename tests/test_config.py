"""Configuration (SPEC §2): every key validated at load, errors name `[section] key`."""

import configparser
import ipaddress
import os
import shutil
import subprocess
import sys

import pytest
import webtest
from conftest import REPO, parse_jsonl, write_ini

import smsc_handler
from smsc_handler import ConfigError, find_config, load_config

SECRET = "s3cr3t-Value_42"
STATUS = {"id": "501", "phone": "79991234567", "status": "1"}


#: (section, key, value, attribute value it loads as) — one good value per key of SPEC §2
GOOD = [
    ("handler", "data_dir", "events", None),  # checked below: relative to the ini's folder
    ("handler", "secret", "abc-DEF_123", "abc-DEF_123"),
    ("handler", "hash_alg", "CRC32", "crc32"),
    ("handler", "require_signature", "no", "no"),
    ("handler", "default_charset", "KOI8-R", "koi8-r"),
    ("handler", "timezone", "-05:30", None),  # checked below through an event's time
    ("handler", "max_body_bytes", "1024", 1024),
    ("handler", "allowed_ips", "127.0.0.1, 10.0.0.0/8, ::1",
     (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
      ipaddress.ip_network("::1/128"))),
    ("handler", "trusted_proxies", "192.0.2.0/24", (ipaddress.ip_network("192.0.2.0/24"),)),
    ("handler", "bad_signature_status", "404", 404),
    ("handler", "file_mode", "0640", 0o640),
    ("jsonl", "enabled", "true", True),
    ("jsonl", "path", "{kind}-{date}.jsonl", "{kind}-{date}.jsonl"),
    ("jsonl", "fsync", "no", False),
    ("dedupe", "enabled", "no", False),
    ("dedupe", "keep_days", "30", 30),
    ("hook", "command", "/bin/echo --flag 'a b'", ("/bin/echo", "--flag", "a b")),
    ("hook", "timeout", "2.5", 2.5),
    ("hook", "on_failure", "ignore", "ignore"),
    ("hook", "run", "forward", "forward"),
    ("rejected", "enabled", "no", False),
    ("rejected", "max_bytes", "0", 0),
    ("relay", "url", "https://app.example:8443/smsc?token=1", "https://app.example:8443/smsc?token=1"),
    ("relay", "secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("relay", "timeout", "2.5", 2.5),
]

#: (section, key, bad value) — one refused value per key of SPEC §2
BAD = [
    ("handler", "data_dir", ""),
    ("handler", "secret", "has space!"),
    ("handler", "secret", "new1, old1, older1"),  # two at most, while a rotation runs
    ("handler", "secret", "new1,"),
    ("handler", "hash_alg", "sha256"),
    ("handler", "require_signature", "maybe"),
    ("handler", "default_charset", "latin-1"),
    ("handler", "timezone", "+25:00"),
    ("handler", "timezone", "Mars/Olympus_Mons"),
    ("handler", "max_body_bytes", "lots"),
    ("handler", "max_body_bytes", "-1"),
    ("handler", "allowed_ips", "300.1.2.3"),
    ("handler", "trusted_proxies", "proxy.example.com"),
    ("handler", "bad_signature_status", "500"),
    ("handler", "file_mode", "0999"),
    ("handler", "file_mode", "0400"),
    ("jsonl", "enabled", "maybe"),
    ("jsonl", "path", "events.jsonl"),
    ("jsonl", "path", "../{kind}.jsonl"),
    ("jsonl", "path", "{kind}-{month}.jsonl"),
    ("jsonl", "fsync", "sometimes"),
    ("dedupe", "enabled", "2"),
    ("dedupe", "keep_days", "0"),
    ("hook", "command", "/bin/echo 'unbalanced"),
    ("hook", "timeout", "0"),
    ("hook", "timeout", "soon"),
    ("hook", "on_failure", "panic"),
    ("hook", "run", "later"),
    ("rejected", "enabled", "perhaps"),
    ("rejected", "max_bytes", "-5"),
    ("relay", "url", "ftp://app.example/"),
    ("relay", "url", "https://user:pw@app.example/"),
    ("relay", "secret", "whsec_c2hvcnQ="),  # 5 bytes: Standard Webhooks needs 24 to 64
    ("relay", "secret", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),  # no whsec_
    ("relay", "secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa!w"),  # not base64
    ("relay", "timeout", "never"),
    # values a looser parser lets through
    ("handler", "file_mode", "4600"),  # setuid: permission bits only
    ("hook", "timeout", "1e-9"),  # positive, but under 0.1 s
    ("handler", "max_body_bytes", "1_000"),  # int() reads the underscore
    ("handler", "max_body_bytes", "\u0663\u0660\u0660"),  # Arabic-Indic 300: int() reads it
    ("jsonl", "path", "ev\x00{kind}.jsonl"),
    ("handler", "data_dir", "da\x00ta"),
    ("hook", "command", "/bin/echo a\x00b"),  # exec() refuses a NUL: every callback a 500
    ("hook", "command", "'' --flag"),  # an empty program name
]


def attribute(section, key):
    return key if section == "handler" else "%s_%s" % (section, key)


def test_good_and_bad_tables_cover_every_key_of_the_schema():
    schema = {(s, k) for s, keys in smsc_handler.CONFIG_SCHEMA.items() for k in keys}
    assert {(s, k) for s, k, _v, _a in GOOD} == schema
    bad = {tuple(p.values[:2]) if hasattr(p, "values") else p[:2] for p in BAD}
    assert bad == schema


@pytest.mark.parametrize("section, key, value, expected", GOOD,
                         ids=["%s.%s" % (s, k) for s, k, _v, _e in GOOD])
def test_valid_value_is_accepted(make_config, section, key, value, expected):
    keys = {key: value}
    if (section, key) == ("relay", "url"):
        keys["secret"] = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a url needs one
    config = load_config(str(make_config(**{section: keys})))
    if expected is not None:
        assert getattr(config, attribute(section, key)) == expected


@pytest.mark.parametrize("section, key, value", BAD)
def test_bad_value_is_refused_naming_section_key_and_value(make_config, section, key, value):
    path = make_config(**{section: {key: value}})
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    text = caught.value.reason
    assert "[%s] %s" % (section, key) in text
    if key == "secret":
        assert value not in text  # named, never shown
    else:
        assert repr(value) in text or value in text
    assert str(path) in text
    assert caught.value.status == 503


def test_unknown_key_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"unknown key \[handler\] secrte"):
        load_config(str(make_config(handler={"secrte": "abc"})))


def test_unknown_section_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"unknown section \[hanlder\]"):
        load_config(str(make_config(hanlder={"secret": "abc"})))


def test_default_section_is_refused_as_unknown(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[DEFAULT]\nenabled = no\n[handler]\ndata_dir = data\n")
    with pytest.raises(ConfigError, match=r"unknown section \[DEFAULT\]"):
        load_config(str(path))


def test_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[handler]\nmax_body_bytes = 1024\nmax_body_bytes = 2048\n")
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_config(str(path))


INLINE_COMMENTS = [
    ("timezone", "+03:00 ; Moscow"),
    ("require_signature", "auto # default"),
    ("max_body_bytes", "65536 ; 64 KB"),
    ("data_dir", "data ; keep it out of the web root"),
]


@pytest.mark.parametrize("section, key, text", [
    ("jsonl", "path", "{kind}.jsonl  # daily files later"),
    ("handler", "data_dir", "data\t; outside the web root"),
    ("handler", "allowed_ips", "127.0.0.1 # SMSC's ranges to come"),
])
def test_inline_comment_after_a_value_any_parser_takes_is_refused(tmp_path, section, key, text):
    # configparser keeps the comment in the value: it would name a file or folder after it.
    path = tmp_path / "config.ini"
    path.write_text("[%s]\n%s = %s\n" % (section, key, text))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "[%s] %s" % (section, key) in caught.value.reason
    assert "comments must stand on their own lines" in caught.value.reason


@pytest.mark.parametrize("key, text", INLINE_COMMENTS)
def test_inline_comment_is_refused_with_the_hint(tmp_path, key, text):
    path = tmp_path / "config.ini"
    path.write_text("[handler]\n%s = %s\n" % (key, text))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "[handler] %s" % key in caught.value.reason
    assert "comments must stand on their own lines" in caught.value.reason


def test_inline_comment_after_hook_command_is_refused(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[hook]\ncommand = /bin/true ; notify ops\n")
    with pytest.raises(ConfigError, match="comments must stand on their own lines"):
        load_config(str(path))


@pytest.mark.parametrize("text, value", [
    ("yes", True), ("true", True), ("on", True), ("1", True), ("YES", True),
    ("no", False), ("false", False), ("off", False), ("0", False), ("No", False),
])
def test_yes_no_keys_take_every_spelling_the_readme_lists(make_config, text, value):
    assert load_config(str(make_config(jsonl={"fsync": text}))).jsonl_fsync is value


@pytest.mark.parametrize("text", ["UTC", "utc", "Z", "+00:00", "-00:00"])
def test_utc_spellings_are_the_zero_offset(make_config, text):
    assert load_config(str(make_config(handler={"timezone": text}))).timezone == "+00:00"


@pytest.mark.parametrize("text", ["+0\u00b2:00", "+03:\u0663\u0660"], ids=["superscript", "arabic-indic"])
def test_offset_with_non_ascii_digits_gets_the_offset_message(make_config, text):
    with pytest.raises(ConfigError, match="expected an offset like"):
        load_config(str(make_config(handler={"timezone": text})))


def test_forward_with_jsonl_off_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"\[hook\] run = forward reads the JSON-lines files"):
        load_config(str(make_config(jsonl={"enabled": "no"}, hook={"command": "/bin/true", "run": "forward"})))


def test_require_signature_yes_without_secret_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"\[handler\] require_signature = yes needs a secret"):
        load_config(str(make_config(handler={"require_signature": "yes"})))


def test_require_signature_yes_with_secret_is_accepted(make_config):
    config = load_config(str(make_config(handler={"require_signature": "yes", "secret": SECRET})))
    assert config.require_signature == "yes"


def test_jsonl_disabled_without_hook_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"\[jsonl\] enabled = no"):
        load_config(str(make_config(jsonl={"enabled": "no"})))


def test_jsonl_disabled_with_inline_hook_is_accepted(make_config):
    config = load_config(str(make_config(jsonl={"enabled": "no"}, hook={"command": "/bin/true"})))
    assert config.jsonl_enabled is False


def event_time(config_path, smsc_time):
    """Store a status callback with `time` under this config; return the event's time."""
    config = load_config(str(config_path))
    webtest.TestApp(smsc_handler.make_app(config)).post("/", dict(STATUS, time=smsc_time))
    (line,) = parse_jsonl(os.path.join(config.data_dir, "status.jsonl"))
    return line["time"]


@pytest.mark.parametrize("zone, expected", [
    ("-05:30", "2024-01-15T12:34:56-05:30"),
    ("+00:00", "2024-01-15T12:34:56+00:00"),
    ("+03:00", "2024-01-15T12:34:56+03:00"),
])
def test_offset_zone_is_applied_to_the_event_time(make_config, zone, expected):
    assert event_time(make_config(handler={"timezone": zone}), "15.01.24 12:34:56") == expected


@pytest.mark.skipif(sys.version_info < (3, 9), reason="zoneinfo is Python 3.9+")
@pytest.mark.parametrize("smsc_time, expected", [
    ("15.01.24 12:34:56", "2024-01-15T12:34:56+03:00"),
    ("15.01.10 12:34:56", "2010-01-15T12:34:56+03:00"),  # MSK was +03:00 in winter 2010
    ("15.07.10 12:34:56", "2010-07-15T12:34:56+04:00"),  # … and +04:00 (MSD) in summer 2010
])
def test_iana_zone_is_applied_to_the_event_time(make_config, smsc_time, expected):
    path = make_config(handler={"timezone": "Europe/Moscow"})
    assert load_config(str(path)).timezone_name == "Europe/Moscow"
    assert event_time(path, smsc_time) == expected


@pytest.mark.skipif(sys.version_info >= (3, 9), reason="only Python 3.8 lacks zoneinfo")
def test_iana_zone_is_refused_on_python_38(make_config):
    with pytest.raises(ConfigError, match=r"\[handler\] timezone.*3\.9"):
        load_config(str(make_config(handler={"timezone": "Europe/Moscow"})))


def test_relative_data_dir_is_relative_to_the_ini_folder(tmp_path, monkeypatch):
    path = write_ini(tmp_path / "etc" / "config.ini", {"handler": {"data_dir": "events"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(str(path))
    assert config.data_dir == str(tmp_path / "etc" / "events")


def test_relative_config_path_still_anchors_data_dir_at_the_ini(tmp_path, monkeypatch):
    write_ini(tmp_path / "etc" / "config.ini", {"handler": {"data_dir": "../var"}})
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.join("etc", "config.ini"))
    assert config.data_dir == str(tmp_path / "var")


def test_absolute_data_dir_is_kept(make_config, tmp_path):
    config = load_config(str(make_config(handler={"data_dir": str(tmp_path / "abs")})))
    assert config.data_dir == str(tmp_path / "abs")


def test_missing_config_named_by_cli_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as caught:
        find_config(missing, {})
    assert "--config" in caught.value.reason and missing in caught.value.reason


def test_missing_config_named_by_env_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as caught:
        find_config(None, {"SMSC_HANDLER_CONFIG": missing})
    assert "SMSC_HANDLER_CONFIG" in caught.value.reason and missing in caught.value.reason


def test_cli_config_wins_over_env(make_config, tmp_path):
    cli = str(make_config())
    env = str(make_config("other.ini"))
    assert find_config(cli, {"SMSC_HANDLER_CONFIG": env}) == cli


def test_env_config_is_used_without_cli(make_config):
    env = str(make_config())
    assert find_config(None, {"SMSC_HANDLER_CONFIG": env}) == env


def test_config_beside_the_module_is_used_without_cli_or_env():
    assert find_config(None, {}) == os.path.join(smsc_handler.MODULE_DIR, "config.ini")


def test_no_config_file_at_all_means_defaults(tmp_path):
    shutil.copy(REPO / "smsc_handler.py", tmp_path / "smsc_handler.py")
    script = ("import smsc_handler as m; p = m.find_config(None, {}); c = m.load_config(p); "
              "print(p, c.data_dir, c.secret == '', c.jsonl_path, c.max_body_bytes)")
    out = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env={"PATH": os.defpath},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", str(tmp_path / "data"), "True", "{kind}.jsonl", "65536"]


def test_built_in_defaults_are_those_of_the_spec():
    config = load_config(None)
    assert config.source is None
    assert config.data_dir == os.path.join(smsc_handler.MODULE_DIR, "data")
    assert (config.secret, config.require_signature, config.default_charset) == ("", "auto", "windows-1251")
    assert config.timezone_name == "+03:00"
    assert (config.max_body_bytes, config.allowed_ips, config.trusted_proxies) == (65536, (), ())
    assert (config.bad_signature_status, config.file_mode) == (403, 0o600)
    assert (config.jsonl_enabled, config.jsonl_path, config.jsonl_fsync) == (True, "{kind}.jsonl", True)
    assert (config.dedupe_enabled, config.dedupe_keep_days) == (True, 7)
    assert (config.hook_command, config.hook_timeout, config.hook_on_failure, config.hook_run) == (
        (), 10, "retry", "inline")
    assert (config.rejected_enabled, config.rejected_max_bytes) == (True, 10485760)


def test_config_is_frozen(config):
    with pytest.raises(AttributeError):
        config.secret = "changed"


def test_config_repr_hides_the_secret(make_config):
    config = load_config(str(make_config(handler={"secret": SECRET})))
    assert SECRET not in repr(config)


SECRET_LEAKS = {
    "bad secret value": "[handler]\nsecret = %s!\n" % SECRET,
    "bad other key": "[handler]\nsecret = %s\ntimezone = nowhere\n" % SECRET,
    "secret continued on the next line": "[handler]\nsecret = %s\n  more\n" % SECRET,
    "duplicate secret": "[handler]\nsecret = %s\nsecret = %s\n" % (SECRET, SECRET),
    "unknown key after the secret": "[handler]\nsecret = %s\nsecrte = %s\n" % (SECRET, SECRET),
    "require_signature = yes with a bad secret": "[handler]\nrequire_signature = yes\nsecret = %s.\n" % SECRET,
    "no section header": "secret = %s\n" % SECRET,
    "a line without '='": "[handler]\n%s\n" % SECRET,
}


@pytest.mark.parametrize("text", list(SECRET_LEAKS.values()), ids=list(SECRET_LEAKS))
def test_config_error_never_shows_the_secret(tmp_path, text):
    path = tmp_path / "config.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert SECRET not in caught.value.reason
    assert SECRET not in str(caught.value)


def shipped_parser():
    parser = configparser.ConfigParser(interpolation=None)
    with open(REPO / "config.ini", encoding="utf-8") as file:
        parser.read_file(file)
    return parser


def test_shipped_config_loads_as_is():
    config = load_config(str(REPO / "config.ini"))
    assert config.data_dir == str(REPO / "data")
    assert config.source == str(REPO / "config.ini")


def test_shipped_config_has_every_key_of_the_schema():
    parser = shipped_parser()
    shipped = {section: set(parser[section]) for section in parser.sections()}
    assert shipped == {section: set(keys) for section, keys in smsc_handler.CONFIG_SCHEMA.items()}


def test_shipped_config_shows_every_default():
    parser = shipped_parser()
    for section, keys in smsc_handler.CONFIG_SCHEMA.items():
        for key, (default, _parse) in keys.items():
            assert parser.get(section, key) == default, "[%s] %s" % (section, key)


@pytest.fixture
def broken_config(make_config):
    return make_config(handler={"secret": SECRET, "timezone": "nowhere"})


def test_broken_config_answers_503_with_retry_after(broken_config):
    from wsgiref.validate import validator
    testapp = webtest.TestApp(validator(smsc_handler.load_app(str(broken_config))))
    response = testapp.post("/", STATUS, expect_errors=True)
    assert response.status_int == 503
    assert response.headers["Retry-After"] == "240"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert SECRET not in response.text and "nowhere" not in response.text
    assert "Traceback" not in response.text and response.errors == ""


def test_broken_config_writes_nothing(broken_config, tmp_path):
    from wsgiref.validate import validator
    testapp = webtest.TestApp(validator(smsc_handler.load_app(str(broken_config))))
    testapp.post("/", STATUS, expect_errors=True)
    testapp.get("/", {"phone": "79991234567", "id": "502", "status": "1"}, expect_errors=True)
    assert not (tmp_path / "data").exists()


def test_broken_config_is_logged(broken_config, caplog):
    from wsgiref.validate import validator
    testapp = webtest.TestApp(validator(smsc_handler.load_app(str(broken_config))))
    testapp.post("/", STATUS, expect_errors=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "smsc_handler"]
    assert any("[handler] timezone" in message for message in messages)
    assert not any(SECRET in message for message in messages)


def test_missing_named_config_answers_503(tmp_path):
    from wsgiref.validate import validator
    app = smsc_handler.load_app(str(tmp_path / "missing.ini"))
    response = webtest.TestApp(validator(app)).post("/", STATUS, expect_errors=True)
    assert response.status_int == 503
    assert response.headers["Retry-After"] == "240"


def test_fixed_config_is_picked_up_by_the_next_request(broken_config, tmp_path):
    from wsgiref.validate import validator
    testapp = webtest.TestApp(validator(smsc_handler.load_app(str(broken_config))))
    assert testapp.post("/", STATUS, expect_errors=True).status_int == 503
    write_ini(broken_config, {"handler": {"data_dir": "data"}})
    response = testapp.post("/", STATUS)
    assert response.status_int == 200 and response.body == b"OK"
    assert len((tmp_path / "data" / "status.jsonl").read_bytes().splitlines()) == 1


def test_a_config_saved_with_a_utf8_bom_loads(tmp_path):
    path = tmp_path / "config.ini"
    path.write_bytes(b"\xef\xbb\xbf[handler]\ndata_dir = data\nsecret = abc\n")
    config = load_config(str(path))
    assert config.secret == "abc"
    assert config.data_dir == str(tmp_path / "data")


def test_a_quoted_hash_argument_in_the_hook_command_is_accepted_and_reaches_the_hook(make_config, tmp_path):
    path = make_config(hook={"command": "/bin/sh -c 'printf %s \"$1\" > arg.txt' hook '#alerts'"})
    config = load_config(str(path))
    assert config.hook_command == ("/bin/sh", "-c", 'printf %s "$1" > arg.txt', "hook", "#alerts")
    testapp = webtest.TestApp(smsc_handler.make_app(config), extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert testapp.post("/", STATUS).text == "OK"
    assert (tmp_path / "arg.txt").read_text() == "#alerts"


@pytest.mark.parametrize("command", ["/bin/echo hi ; notify", "/bin/echo hi #alerts"])
def test_an_unquoted_semicolon_or_hash_word_in_the_hook_command_is_refused(tmp_path, command):
    path = tmp_path / "config.ini"
    path.write_text("[hook]\ncommand = %s\n" % command)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert "[hook] command" in caught.value.reason


@pytest.mark.parametrize("value", ["1_0", "\u0663"], ids=["underscore", "arabic-indic"])
def test_hook_timeout_with_an_underscore_or_non_ascii_digits_is_refused(make_config, value):
    with pytest.raises(ConfigError) as caught:
        load_config(str(make_config(hook={"timeout": value})))
    assert "[hook] timeout" in caught.value.reason
