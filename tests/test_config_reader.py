"""The plain config reader, held to configparser (the reference) on thousands of generated files.

load_config reads the plain shape of an ini file itself (configparser imports
``re`` and ``enum``, most of a CGI request's own cost) and hands anything else
to configparser. Wherever the plain reader gives an answer, it must be
configparser's, under every Python on the machine; and whole loads (values or
error messages) must not change.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from ini_differential import compare, generate
from test_python_floor import WANTED, find_interpreter

import smsc_handler

#: the schema plus a section and keys that do not exist (yet): the reader takes names from the schema
EXTENDED_SCHEMA = dict(smsc_handler.CONFIG_SCHEMA, mirror={"url": ("", str), "secret": ("", str),
                                                           "timeout": ("10", str)})
EXTENDED_SCHEMA["handler"] = dict(EXTENDED_SCHEMA["handler"], hash_salt=("md5", str))


def test_plain_reader_gives_configparsers_answer_on_4000_files(tmp_path):
    report = compare(4000, 16, str(tmp_path))
    assert report["differences"] == []
    assert report["configparser_read"] > 1500
    assert report["plain_read"] > 0.6 * report["configparser_read"]  # the fast path is the usual one


def test_plain_reader_follows_the_schema_it_is_given(tmp_path):
    report = compare(2000, 17, str(tmp_path), schema=EXTENDED_SCHEMA)
    assert report["differences"] == []
    assert report["plain_read"] > 600
    text = b"[mirror]\nurl = https://example.org/\n[handler]\nhash_salt = sha1\n"
    assert smsc_handler._parse_plain_ini(text, EXTENDED_SCHEMA) == {
        "mirror": {"url": "https://example.org/"}, "handler": {"hash_salt": "sha1"}}
    assert smsc_handler._parse_plain_ini(text) is None  # not in today's schema: configparser words it


@pytest.mark.parametrize("wanted", [w for w in WANTED if find_interpreter(w)
                                    and Path(find_interpreter(w)).resolve() != Path(sys.executable).resolve()])
def test_plain_reader_gives_configparsers_answer_under_every_python(tmp_path, wanted):
    done = subprocess.run([find_interpreter(wanted), str(REPO / "tests" / "ini_differential.py"),
                           "1500", "18", str(tmp_path)], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["differences"] == []
    assert report["plain_read"] > 400


def _load(path):
    try:
        return sorted((k, repr(v)) for k, v in vars(smsc_handler.load_config(str(path))).items())
    except smsc_handler.ConfigError as exc:
        return "ConfigError: " + exc.reason


def test_whole_loads_are_unchanged_on_800_files(tmp_path, monkeypatch):
    import random
    rng = random.Random(19)
    files = []
    for index in range(800):
        path = tmp_path / ("c%d.ini" % index)
        path.write_bytes(generate(smsc_handler.CONFIG_SCHEMA, rng))
        files.append(path)
    ours = [_load(path) for path in files]
    monkeypatch.setattr(smsc_handler, "_parse_plain_ini", lambda data, schema=None: None)
    reference = [_load(path) for path in files]
    assert ours == reference
    assert sum(not isinstance(result, str) for result in ours) > 80  # loads, not only errors


PLAIN_SHAPES = {
    "the shipped config.ini": (REPO / "config.ini").read_bytes(),
    "CRLF and a BOM (Notepad)": b"\xef\xbb\xbf" + (REPO / "config.ini").read_bytes().replace(b"\n", b"\r\n"),
    "old Mac line ends": b"[handler]\rdata_dir = x\r\r[jsonl]\rfsync = no",
    "key: value and upper-case keys": b"[handler]\nDATA_DIR: /var/lib/smsc\nSecret:abc\n",
    "indented comments and blank lines": b"  # note\n[dedupe]\n\t; more\nenabled=no\n   \n\nkeep_days =  3  \n",
    "empty values": b"[handler]\nsecret =\nallowed_ips=\n[hook]\ncommand =   \n",
    "an empty file": b"",
}


@pytest.mark.parametrize("data", list(PLAIN_SHAPES.values()), ids=list(PLAIN_SHAPES))
def test_usual_files_take_the_plain_path_with_configparsers_answer(tmp_path, data):
    path = tmp_path / "config.ini"
    path.write_bytes(data)
    plain = smsc_handler._parse_plain_ini(data)
    assert plain is not None
    assert plain == smsc_handler._parse_with_configparser(str(path))


NOT_PLAIN = {
    "a continuation line": b"[hook]\ncommand = /usr/bin/php\n  notify.php\n",
    "text after a header": b"[handler] ; main\nsecret = a\n",
    "a key twice": b"[handler]\nsecret = a\nSECRET = b\n",
    "a section twice": b"[handler]\n[jsonl]\n[handler]\n",
    "a key before any section": b"secret = a\n",
    "an unknown section": b"[DEFAULT]\nsecret = a\n",
    "an unknown key": b"[handler]\nsecrets = a\n",
    "a line with no delimiter": b"[handler]\nsecret\n",
    "bad UTF-8": b"[handler]\nsecret = \xff\n",
}


@pytest.mark.parametrize("data", list(NOT_PLAIN.values()), ids=list(NOT_PLAIN))
def test_anything_else_is_left_to_configparser(tmp_path, data):
    assert smsc_handler._parse_plain_ini(data) is None


def test_a_same_size_edit_is_seen_by_the_very_next_cgi_request(tmp_path):
    """No cache, no timestamps: each request reads the file (an edit within one tick included)."""
    from test_cgi import STATUS_BODY, UNAVAILABLE, cgi_environ
    path = tmp_path / "config.ini"
    good = b"[handler]\ndata_dir = data\ntimezone = +03:00\n"
    bad = b"[handler]\ndata_dir = data\ntimezone = +33:00\n"
    answers = []
    for text in (good, bad, good):
        path.write_bytes(text)
        environ = {"PATH": "/usr/bin:/bin", "SMSC_HANDLER_CONFIG": str(path)}
        environ.update(cgi_environ(body=STATUS_BODY))
        done = subprocess.run([sys.executable, str(REPO / "handler.cgi")], env=environ, input=STATUS_BODY,
                              capture_output=True, timeout=60)
        answers.append(done.stdout.split(b"\r\n", 1)[0])
    assert answers == [b"Status: 200 OK", UNAVAILABLE.split(b"\r\n", 1)[0], b"Status: 200 OK"]
