"""After `pip install .`, the `smsc-handler` command finds its config where a user expects
(SPEC §2; issue 11, item 18) and never writes into site-packages.

A real venv in a temporary folder, a real `pip install --no-build-isolation` of a copy of
the project (the venv sees this interpreter's setuptools, so nothing is fetched), then the
installed command run from folders of the test's choosing: `serve` takes a real `send`.
"""

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import REPO, clean_env, write_config

#: Asked of an interpreter: can pip build the project without fetching anything
#: (--no-build-isolation)? bdist_wheel is in setuptools from 70.1 on, else in `wheel`.
_PROBE = ("import setuptools, pip, sys\n"  # setuptools first: Debian's distutils hack insists
          "if tuple(int(p) for p in pip.__version__.split('.')[:2]) < (22, 3):\n"
          "    sys.exit('pip --python is 22.3+')\n"
          "v = tuple(int(p) for p in setuptools.__version__.split('.')[:2] if p.isdigit())\n"
          "if v < (70, 1):\n"
          "    import wheel\n")


def _builder():
    """Return an interpreter that can build the project offline: this one, else Debian's."""
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and subprocess.run([python, "-c", _PROBE], capture_output=True).returncode == 0:
            return python
    return None


BUILDER = _builder()
needs_builder = pytest.mark.skipif(
    BUILDER is None, reason="no Python here has pip>=22.3 and setuptools>=70.1 (or wheel) "
    "(run the suite through `python3 tests/bootstrap.py`, whose .venv has them)")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Return (the venv's smsc-handler command, its site-packages folder)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "src"
    source.mkdir()
    for name in ("smsc_handler.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    env_dir = root / "venv"
    # The builder's pip and setuptools build a wheel without build isolation (nothing is
    # fetched); a bare venv of the builder's Python, with no pip and no site of another,
    # gets it from the builder's pip (--python), as `pip install .` would put it there.
    pip = [BUILDER, "-m", "pip", "--disable-pip-version-check"]
    env = clean_env(PIP_NO_INDEX="1")
    done = subprocess.run([*pip, "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(root / "wheels"),
                           str(source)], capture_output=True, text=True, env=env, cwd=str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    subprocess.run([BUILDER, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    (wheel,) = (root / "wheels").glob("smsc_handler-*.whl")
    done = subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                          capture_output=True, text=True, env=env, cwd=str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    site = Path(subprocess.check_output([str(python), "-c", "import smsc_handler, os; "
                                         "print(os.path.dirname(smsc_handler.__file__))"],
                                        text=True, cwd=str(root)).strip())
    assert site.name in ("site-packages", "dist-packages"), site
    return env_dir / "bin" / "smsc-handler", site


def run(command, *args, cwd, env=None):
    return subprocess.run([str(command), *map(str, args)], capture_output=True, text=True, cwd=str(cwd),
                          env=clean_env() if env is None else env, timeout=60)


def serve_and_send(command, cwd, *extra, env=None):
    """Start the installed `serve`, play one callback with the installed `send`; return serve's lines."""
    process = subprocess.Popen([str(command), "serve", "--port", "0", *map(str, extra)], cwd=str(cwd),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=clean_env() if env is None else env)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        first = process.stdout.readline() if ready else ""
        assert "listening on" in first, first
        second = process.stdout.readline()
        url = first.split()[-1]
        done = run(command, "send", url, cwd=cwd, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return first, second
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def no_data_in(site):
    assert not (site / "data").exists()
    assert not list(site.glob("*.jsonl")) and not (site / "state.sqlite3").exists()


@needs_builder
def test_installed_serve_uses_the_config_of_the_current_folder(installed, tmp_path):
    command, site = installed
    write_config(tmp_path / "project", handler={"data_dir": "events"})
    _, second = serve_and_send(command, tmp_path / "project")
    assert str(tmp_path / "project" / "events") in second
    assert (tmp_path / "project" / "events" / "status.jsonl").exists()
    no_data_in(site)


@needs_builder
def test_installed_serve_without_any_config_writes_into_the_current_folder(installed, tmp_path):
    command, site = installed
    (tmp_path / "empty").mkdir()
    _, second = serve_and_send(command, tmp_path / "empty")
    assert (tmp_path / "empty" / "data" / "status.jsonl").exists(), second
    no_data_in(site)
    done = run(command, "check", cwd=tmp_path / "empty")
    assert "built-in defaults" in done.stdout and str(tmp_path / "empty") in done.stdout


@needs_builder
def test_installed_command_takes_the_environment_variable_and_paths_relative_to_the_file(installed, tmp_path):
    command, site = installed
    config = write_config(tmp_path / "etc", handler={"data_dir": "var"})
    (tmp_path / "elsewhere").mkdir()
    write_config(tmp_path / "elsewhere", handler={"data_dir": "wrong"})  # the variable wins over it
    serve_and_send(command, tmp_path / "elsewhere", env=clean_env(SMSC_HANDLER_CONFIG=config))
    assert (tmp_path / "etc" / "var" / "status.jsonl").exists()
    assert not (tmp_path / "elsewhere" / "wrong").exists()
    done = run(command, "check", cwd=tmp_path / "elsewhere", env=clean_env(SMSC_HANDLER_CONFIG=config))
    assert str(config) in done.stdout and "SMSC_HANDLER_CONFIG" in done.stdout
    no_data_in(site)


@needs_builder
def test_installed_command_takes_config_option(installed, tmp_path):
    command, site = installed
    config = write_config(tmp_path / "conf", handler={"data_dir": "d"})
    (tmp_path / "cwd").mkdir()
    serve_and_send(command, tmp_path / "cwd", "--config", os.path.relpath(config, tmp_path / "cwd"))
    assert (tmp_path / "conf" / "d" / "status.jsonl").exists()
    no_data_in(site)


def test_the_module_run_as_a_file_still_reads_the_config_beside_it(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    shutil.copy2(REPO / "smsc_handler.py", folder / "smsc_handler.py")
    write_config(folder, handler={"data_dir": "beside"})
    (tmp_path / "cwd").mkdir()
    write_config(tmp_path / "cwd", handler={"data_dir": "not-this"})
    done = subprocess.run([sys.executable, str(folder / "smsc_handler.py"), "check"], capture_output=True,
                          text=True, cwd=str(tmp_path / "cwd"), env=clean_env())
    assert str(folder / "config.ini") in done.stdout and "beside smsc_handler.py" in done.stdout
