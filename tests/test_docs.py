"""Keep the docs honest (sqlite-utils' test_docs): every verb, option and config key is in
README.md, and ``-h`` works everywhere (SPEC §8, STYLE 15, issue 4 item 6).

Names come from the code itself (``build_parser()``, ``CONFIG_SCHEMA``), so a new verb,
option or key fails here until the README describes it.
"""

import argparse
import re

import pytest
from cli_util import REPO, run_cli

import smsc_handler
from smsc_handler import main


def _verbs() -> dict:
    """verb -> its argparse parser."""
    parser = smsc_handler.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options():
    """(verb, option strings) for every documented option of every verb."""
    for verb, parser in _verbs().items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if "-h" in action.option_strings:
                continue
            yield verb, tuple(action.option_strings)


VERBS = sorted(_verbs())
OPTIONS = list(_options())
CONFIG_KEYS = [(section, key) for section, keys in smsc_handler.CONFIG_SCHEMA.items() for key in keys]


@pytest.fixture(scope="module")
def readme() -> str:
    path = REPO / "README.md"
    assert path.exists(), "README.md is missing"
    return path.read_text(encoding="utf-8")


def _mentions(text, name) -> bool:
    """`name` appears as a whole word (options and keys contain '-' and '_')."""
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(name), text) is not None


def test_the_parser_has_the_verbs_of_the_spec():
    assert set(VERBS) == {"serve", "send", "sign", "verify", "tail", "replay", "forward", "stats", "check",
                          "status", "messages", "calls", "index", "prune", "report", "relay-secret"}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_is_in_the_readme(readme, verb):
    command = r"(smsc_handler\.py|smsc-handler)(\s+--config\s+\S+)?\s+%s\b" % verb
    assert re.search(command, readme) or "`%s`" % verb in readme, \
        "README.md never shows the verb %r" % verb


@pytest.mark.parametrize("verb, options", OPTIONS, ids=["%s %s" % (v, o[-1]) for v, o in OPTIONS])
def test_every_option_is_in_the_readme(readme, verb, options):
    assert any(_mentions(readme, option) for option in options), \
        "README.md never mentions %s of %s" % ("/".join(options), verb)


@pytest.mark.parametrize("section, key", CONFIG_KEYS, ids=["%s.%s" % item for item in CONFIG_KEYS])
def test_every_config_key_is_in_the_readme(readme, section, key):
    assert "[%s]" % section in readme, "README.md never names the section [%s]" % section
    assert _mentions(readme, key), "README.md never mentions [%s] %s" % (section, key)


@pytest.mark.parametrize("verb", VERBS)
def test_help_works_for_every_verb(capsys, verb):
    assert main([verb, "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and verb in out.splitlines()[0]


def test_help_lists_every_verb(capsys):
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


def test_help_as_a_real_subprocess():
    done = run_cli("tail", "-h")
    assert done.returncode == 0
    assert "--follow" in done.stdout and done.stderr == ""
