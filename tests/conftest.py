"""Shared fixtures: an ini file → Config → lint-checked WSGI app → WebTest app.

The chain follows the Pyramid starter's conftest::

    make_config(**sections) -> Path        # write an ini (data_dir = tmp_path/data)
    config_path  -> Path                   # the ini of this test (see the `config` marker)
    config       -> smsc_handler.Config    # load_config(config_path)
    app          -> WSGI callable          # wsgiref.validate.validator(make_app(config))
    testapp      -> webtest.TestApp(app)
    data_dir     -> Path                   # config.data_dir
    read_lines(name) -> list of dicts      # parsed JSON lines of data_dir/name

A test changes its config with a marker, one dict per section::

    @pytest.mark.config(handler={"secret": SECRET}, dedupe={"enabled": "no"})
    def test_something(testapp, read_lines): ...

or builds more configs itself with ``make_config(handler={...})``.
"""

import configparser
import json
from pathlib import Path
from wsgiref.validate import validator

import pytest
import webtest

import smsc_handler

#: the repository root (handler.cgi, wsgi.py, config.ini live here)
REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "config(**sections): ini overrides for the config_path fixture, "
        "e.g. config(handler={'secret': 'abc'})")


def write_ini(path, sections) -> Path:
    """Write `sections` ({section: {key: value}}) as an ini file at `path`; return it."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    for section, keys in sections.items():
        parser.add_section(section)
        for key, value in keys.items():
            parser.set(section, key, str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        parser.write(file)
    return path


@pytest.fixture(autouse=True)
def _no_outside_config(monkeypatch):
    """Every test names its config; nothing from the caller's environment leaks in."""
    monkeypatch.delenv(smsc_handler.CONFIG_ENV, raising=False)
    monkeypatch.delenv("DOCUMENT_ROOT", raising=False)


@pytest.fixture
def make_config(tmp_path):
    """Return make(name="config.ini", **sections) -> Path of a written ini file.

    ``[handler] data_dir = data`` (that is, tmp_path/data) unless a section says
    otherwise; every other key keeps its built-in default.
    """
    def make(name="config.ini", **sections):
        merged = {"handler": {"data_dir": "data"}}
        for section, keys in sections.items():
            merged.setdefault(section, {}).update(keys)
        return write_ini(tmp_path / name, merged)
    return make


@pytest.fixture
def config_path(request, make_config):
    """The ini of this test: the defaults plus the test's ``config`` marker."""
    marker = request.node.get_closest_marker("config")
    sections = dict(marker.kwargs) if marker else {}
    return make_config(**sections)


@pytest.fixture
def config(config_path):
    return smsc_handler.load_config(str(config_path))


@pytest.fixture
def app(config):
    """The handler for `config`, every response checked by wsgiref.validate."""
    return validator(smsc_handler.make_app(config))


@pytest.fixture
def testapp(app):
    return webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})


@pytest.fixture
def data_dir(config):
    return Path(config.data_dir)


def parse_jsonl(path) -> list:
    """Return the JSON objects of a JSON-lines file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def read_lines(data_dir):
    """Return read(name) -> the parsed JSON lines of data_dir/name ([] if missing)."""
    def read(name):
        return parse_jsonl(data_dir / name)
    return read

