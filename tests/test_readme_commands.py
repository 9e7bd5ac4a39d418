"""The README's two opening commands are what a fresh Debian can run, and what CI runs (issue 11, item 19)."""

import re

from cli_util import REPO


def opening_commands():
    """The shell blocks of the README before its first rule (---)."""
    head = (REPO / "README.md").read_text(encoding="utf-8").split("\n---\n")[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", head, re.S)]


def ci_commands():
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_opens_with_serve_and_the_test_bootstrap():
    assert opening_commands() == ["python3 smsc_handler.py serve", "python3 tests/bootstrap.py"]


def test_ci_runs_the_readme_test_command_word_for_word():
    assert opening_commands()[1] in ci_commands()


def test_ci_installs_nothing_with_pip_outside_the_venv():
    # Debian's python3 refuses it (PEP 668): only .venv/bin/… tools after the bootstrap.
    for line in ci_commands():
        assert "pip install" not in line, line
        assert not re.match(r"^(vermin|ruff)\b", line), line


def test_the_bootstrap_uses_only_the_standard_library():
    import ast
    import sys
    tree = ast.parse((REPO / "tests" / "bootstrap.py").read_text(encoding="utf-8"))
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is not None:
        assert names <= set(stdlib), names - set(stdlib)
