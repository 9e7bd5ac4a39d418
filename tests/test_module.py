"""The module itself: public names, standard library only, the per-request import budget, CLI help.

Under CGI every request starts a fresh interpreter, so imports are most of its cost: a
plain form callback must not load the XML parser, SQLite, subprocess, logging, ipaddress
or shlex (issue 2), and never the `cgi` module (removed in Python 3.13).
"""

import argparse
import ast
import json
import os
import subprocess
import sys
from urllib.parse import urlencode

import pytest
from conftest import REPO, parse_jsonl

import smsc_handler

SOURCES = ["smsc_handler.py", "handler.cgi", "wsgi.py"]
#: modules a plain form callback must not load
HEAVY = ["xml.parsers.expat", "pyexpat", "sqlite3", "_sqlite3", "subprocess", "logging",
         "ipaddress", "shlex", "cgi"]
SECRET = "test_Secret-42"
STATUS = {"id": "1001", "phone": "79991234567", "status": "1", "ts": "1700000000"}


def test_every_name_in_all_exists():
    missing = [name for name in smsc_handler.__all__ if not hasattr(smsc_handler, name)]
    assert missing == []


def test_all_has_no_duplicates():
    assert len(set(smsc_handler.__all__)) == len(smsc_handler.__all__)


def test_version_is_a_dotted_string():
    assert all(part.isdigit() for part in smsc_handler.__version__.split("."))


def imported_modules(filename):
    """Return the top-level names of every module `filename` imports, anywhere in it."""
    tree = ast.parse((REPO / filename).read_text(encoding="utf-8"), filename)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is Python 3.10+")
@pytest.mark.parametrize("filename", SOURCES)
def test_imports_only_the_standard_library(filename):
    names = imported_modules(filename) - {"smsc_handler"}
    assert names, "the parser found no imports at all"
    assert sorted(names - set(sys.stdlib_module_names)) == []


@pytest.mark.parametrize("filename", SOURCES)
def test_never_imports_the_cgi_module(filename):
    assert not imported_modules(filename) & {"cgi", "cgitb"}


#: runs the real handler.cgi in this interpreter, then reports which HEAVY modules got
#: loaded: when it returns, or when it ends the process with os._exit as it does
PROBE = r"""
import json, os, sys
before = set(sys.modules)
path = sys.argv[1]
heavy = json.loads(sys.argv[2])
def report():
    sys.stdout.flush()
    sys.stderr.write("\n" + json.dumps({"already": sorted(set(heavy) & before),
                                        "loaded": sorted(set(heavy) & set(sys.modules))}) + "\n")
    sys.stderr.flush()
end_process = os._exit
def report_then_end(status):
    report()
    end_process(status)
os._exit = report_then_end
with open(path) as file:
    code = compile(file.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path})
report()
"""


def probe_cgi(config_path, body, content_type="application/x-www-form-urlencoded", query=""):
    """Serve one request with handler.cgi in a fresh interpreter; return (stdout, loaded).

    ``-S`` keeps site-packages' .pth files (which may import anything) out of the picture.
    """
    environ = {
        "PATH": os.environ.get("PATH", os.defpath), "SMSC_HANDLER_CONFIG": str(config_path),
        "REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": content_type,
        "QUERY_STRING": query, "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "GATEWAY_INTERFACE": "CGI/1.1",
    }
    done = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, str(REPO / "handler.cgi"), json.dumps(HEAVY)],
                          env=environ, input=body, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stderr.decode().rstrip("\n").rsplit("\n", 1)[-1])
    assert report["already"] == [], "the interpreter preloads them: the probe proves nothing"
    return done.stdout, report["loaded"]


@pytest.fixture
def lean_config(make_config):
    """Dedupe off and no hook: the plain path, where nothing heavy is needed."""
    return make_config(dedupe={"enabled": "no"})


def test_plain_form_callback_loads_no_heavy_module(lean_config, tmp_path):
    out, loaded = probe_cgi(lean_config, urlencode(STATUS).encode())
    assert out.startswith(b"Status: 200 OK\r\n") and out.endswith(b"\r\n\r\nOK")
    assert loaded == []
    assert len(parse_jsonl(tmp_path / "data" / "status.jsonl")) == 1


def test_signed_form_callback_loads_no_heavy_module(make_config):
    import hashlib
    path = make_config(handler={"secret": SECRET}, dedupe={"enabled": "no"})
    params = dict(STATUS, md5=hashlib.md5(("1001:79991234567:1:" + SECRET).encode()).hexdigest())
    out, loaded = probe_cgi(path, urlencode(params).encode())
    assert out.startswith(b"Status: 200 OK\r\n")
    assert loaded == []


def test_xml_callback_loads_the_xml_parser(lean_config):
    body = b"<sms><id>1001</id><phone>79991234567</phone><status>1</status></sms>"
    out, loaded = probe_cgi(lean_config, body, content_type="application/xml")
    assert out.startswith(b"Status: 200 OK\r\n")
    assert "pyexpat" in loaded  # the probe can see an import when one happens


def test_dedupe_loads_sqlite(make_config):
    _out, loaded = probe_cgi(make_config(), urlencode(STATUS).encode())
    assert "_sqlite3" in loaded  # SQLite's C part; the sqlite3 package would add datetime (1.1 ms)


def run_cli(*args):
    return subprocess.run([sys.executable, "smsc_handler.py", *args], cwd=str(REPO),
                          capture_output=True, text=True, timeout=30)


def test_cli_help_works():
    done = run_cli("-h")
    assert done.returncode == 0
    assert done.stdout.startswith("usage:") and "serve" in done.stdout


def test_cli_version_prints_the_version():
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.split() == ["smsc_handler.py", smsc_handler.__version__]


def cli_verbs():
    parser = smsc_handler.build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(verbs.choices)


@pytest.mark.parametrize("verb", cli_verbs())
def test_cli_help_works_for_every_verb(verb):
    done = run_cli(verb, "-h")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_cli_bad_usage_exits_2_without_traceback():
    done = run_cli("no-such-verb")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_wsgi_py_exposes_the_module_application():
    script = ("import sys; sys.path.insert(0, %r); import wsgi, smsc_handler; "
              "print(wsgi.application is smsc_handler.application)" % str(REPO))
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "True", done.stderr


def test_handler_cgi_is_an_executable_python3_script():
    path = REPO / "handler.cgi"
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env python3\n")


def test_no_module_level_name_is_defined_twice():
    # A second `def` of one name silently replaces the first (two branches once both
    # defined _pause and _stored_lines, and ruff's F811 did not see it).
    import ast
    import collections
    with open(smsc_handler.__file__, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    names = collections.Counter(node.name for node in tree.body
                                if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
    assert [name for name, count in names.items() if count > 1] == []
