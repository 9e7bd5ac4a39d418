#!/usr/bin/env python3
"""Set up the test tools in .venv and run the whole suite: `python3 tests/bootstrap.py [PYTEST ARGS]`.

Needs only python3 (3.8+) and the network to PyPI: no sudo, no pip outside the venv
(Debian's own Python refuses `pip install`, PEP 668). Standard library only.

1. `.venv/` beside the project, made with the venv module. Debian leaves ensurepip out
   unless python3-venv is installed: then the venv is made without pip and pip's wheel is
   fetched from PyPI (its sha256 checked against PyPI's) and installs itself.
2. setuptools>=70.1, then the project itself with its `dev` extra (pytest, webtest…),
   editable and without build isolation; skipped when pyproject.toml hasn't changed
   since the last run.
3. `.venv/bin/python -m pytest` with the arguments given. Its exit status is ours, but
   "no tests collected" (pytest's 5) is a failure here, never a silent pass.
"""

import hashlib
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
PYTHON = os.path.join(VENV, "bin", "python")
#: where the last installed pyproject.toml's digest is kept
STAMP = os.path.join(VENV, ".smsc-dev-installed")
#: pytest's exit status when it collected no test
NO_TESTS = 5


def say(text):
    sys.stderr.write("bootstrap: %s\n" % text)
    sys.stderr.flush()


def run(*argv):
    """Run a command; stop with its status when it fails."""
    done = subprocess.run(list(argv), cwd=ROOT)
    if done.returncode != 0:
        say("failed (exit %d): %s" % (done.returncode, " ".join(argv)))
        sys.exit(done.returncode or 1)


def has_ensurepip() -> bool:
    if os.environ.get("SMSC_BOOTSTRAP_NO_ENSUREPIP"):  # to try the other path on a full Python
        return False
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        return False
    return True


def fetch_pip_wheel(folder) -> str:
    """Download pip's newest wheel from PyPI into folder, checking its sha256; return its path."""
    index = "https://pypi.org/pypi/pip/json"
    with urllib.request.urlopen(index, timeout=60) as answer:
        release = json.load(answer)
    wheels = [u for u in release["urls"] if u["packagetype"] == "bdist_wheel" and u["filename"].endswith(".whl")]
    if not wheels:
        raise SystemExit("bootstrap: PyPI lists no wheel for pip")
    wheel = wheels[0]
    # A mirror may answer with URLs relative to the page.
    with urllib.request.urlopen(urllib.parse.urljoin(index, wheel["url"]), timeout=120) as answer:
        data = answer.read()
    if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
        raise SystemExit("bootstrap: pip's wheel does not match PyPI's sha256; try again")
    path = os.path.join(folder, wheel["filename"])
    with open(path, "wb") as file:
        file.write(data)
    return path


def make_venv():
    import venv
    if os.path.exists(PYTHON) and subprocess.run([PYTHON, "-m", "pip", "--version"],
                                                 capture_output=True).returncode == 0:
        return
    if has_ensurepip():
        say("creating .venv with pip (python3 -m venv)")
        venv.EnvBuilder(with_pip=True, clear=os.path.exists(VENV)).create(VENV)
        return
    say("this Python has no ensurepip (Debian without python3-venv): creating .venv without pip, "
        "then fetching pip from PyPI")
    venv.EnvBuilder(with_pip=False, clear=os.path.exists(VENV)).create(VENV)
    wheel = fetch_pip_wheel(VENV)
    # A wheel is a zip: pip runs from it to install itself.
    run(PYTHON, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from pip._internal.cli.main import main; "
        "sys.exit(main(['install', '-q', '--disable-pip-version-check', sys.argv[1]]))", wheel)
    os.unlink(wheel)


def install_tools():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    try:
        with open(STAMP) as file:
            if file.read().strip() == digest:
                return
    except OSError:
        pass
    pip = [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    say("installing the test tools into .venv (setuptools, then the project's dev extra)")
    run(*pip, "setuptools>=70.1")
    run(*pip, "--no-build-isolation", "-e", ".[dev]")
    with open(STAMP, "w") as file:
        file.write(digest + "\n")


def main(argv) -> int:
    if sys.version_info < (3, 8):  # noqa: UP036  (a user's old python3 gets a sentence, not a crash)
        say("needs Python 3.8 or newer")
        return 1
    make_venv()
    install_tools()
    status = subprocess.run([PYTHON, "-m", "pytest", *argv], cwd=ROOT).returncode
    if status == NO_TESTS:
        say("pytest collected no tests: that is a failure, not a pass (check the arguments)")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
