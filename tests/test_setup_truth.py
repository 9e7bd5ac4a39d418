"""`check` and the health line tell the truth about a setup (issue 11, items 9, 14–16, 21, 23).

Real config files, real data folders, the real WSGI application and the real
``python3 smsc_handler.py check`` subprocess. Where a permission matters, the command
runs as www-data (root can write anywhere, so root alone can't show the problem).
"""

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
import webtest
from cli_util import SCRIPT, clean_env, run_cli, write_config

import smsc_handler

WEB_USER = "www-data"
#: an interpreter the web user can run (pyenv's lives under /root)
PYTHON = "/usr/bin/python3"


def web_user():
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(WEB_USER)
    except KeyError:
        return None


needs_web_user = pytest.mark.skipif(
    web_user() is None or not os.path.exists(PYTHON),
    reason="needs root, a www-data user and /usr/bin/python3 (run the suite as root, as .ci/run does)")


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def health(config_path):
    app = smsc_handler.make_app(smsc_handler.load_config(str(config_path)))
    return webtest.TestApp(app, extra_environ={"REMOTE_ADDR": "127.0.0.1"}).get("/", expect_errors=True)


############################################################################
# Item 14: a data_dir under a file; the health line
############################################################################


def test_check_refuses_a_data_dir_under_a_file(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    config = write_config(tmp_path, handler={"secret": "s3cret", "data_dir": str(tmp_path / "passwd" / "data")})
    done = run_cli("check", "--config", config)
    assert done.returncode == 1, done.stdout
    (error,) = [line for line in lines(done.stdout) if line.startswith("error")]
    assert "passwd" in error and "not a folder" in error
    assert not any(line.startswith("ok") for line in lines(done.stdout))


def test_check_refuses_etc_passwd_data(tmp_path):
    config = write_config(tmp_path, handler={"secret": "s3cret", "data_dir": "/etc/passwd/data"})
    done = run_cli("check", "--config", config)
    assert done.returncode == 1
    assert any(line.startswith("error") and "/etc/passwd is a file" in line for line in lines(done.stdout))


def test_health_line_answers_503_when_data_dir_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    config = write_config(tmp_path, handler={"data_dir": str(tmp_path / "afile" / "data")})
    answer = health(config)
    assert answer.status_int == 503
    assert answer.headers["Retry-After"] == "240"
    assert "ready" not in answer.text


def test_health_line_answers_503_when_the_inline_hook_is_missing(tmp_path):
    config = write_config(tmp_path, hook={"command": str(tmp_path / "no-such-hook.sh")})
    assert health(config).status_int == 503


def test_health_line_is_ready_when_the_hook_failure_is_ignored(tmp_path):
    config = write_config(tmp_path, hook={"command": str(tmp_path / "no-such-hook.sh"), "on_failure": "ignore"})
    assert health(config).status_int == 200


def test_health_line_is_ready_before_the_first_callback_and_writes_nothing(tmp_path):
    config = write_config(tmp_path)
    answer = health(config)
    assert answer.status_int == 200 and "ready" in answer.text
    assert not (tmp_path / "data").exists()  # GET creates nothing: the first callback does


@needs_web_user
def test_health_line_answers_503_to_a_web_user_locked_out_of_the_state_store(tmp_path):
    # root ran a verb first: the state store is root's, 0600; the web server can't write it.
    folder = Path(subprocess.check_output(["mktemp", "-d", "/tmp/smsc-health.XXXXXX"], text=True).strip())
    try:
        folder.chmod(0o755)
        shutil.copy2(SCRIPT, folder / "smsc_handler.py")  # www-data can't read the checkout or pyenv
        config = write_config(folder, handler={"data_dir": "data"})
        loaded = smsc_handler.load_config(str(config))
        smsc_handler.ensure_data_dir(loaded)
        smsc_handler.StateStore(loaded).close()  # made by root
        user = web_user()
        os.chown(loaded.data_dir, user.pw_uid, user.pw_gid)  # the folder is the web user's, the store root's
        script = ("import sys, smsc_handler as m, wsgiref.util as u\n"
                  "env = {'REQUEST_METHOD': 'GET', 'QUERY_STRING': '', 'REMOTE_ADDR': '127.0.0.1'}\n"
                  "u.setup_testing_defaults(env)\n"
                  "got = []\n"
                  "m.make_app(m.load_config(sys.argv[1]))(env, lambda s, h: got.append(s))\n"
                  "print(got[0])\n")
        done = subprocess.run(["runuser", "-u", WEB_USER, "--", PYTHON, "-c", script, str(config)],
                              capture_output=True, text=True, cwd=str(folder), env=clean_env())
        assert done.stdout.strip() == "503 Service Unavailable", done.stdout + done.stderr
        checked = subprocess.run(["runuser", "-u", WEB_USER, "--", PYTHON, str(folder / "smsc_handler.py"), "check",
                                  "--config", str(config)], capture_output=True, text=True, env=clean_env())
        assert checked.returncode == 1
        assert any(line.startswith("error") and "state.sqlite3" in line for line in lines(checked.stdout))
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)


############################################################################
# Item 9: the state store's path with URI characters
############################################################################


@pytest.mark.parametrize("name", ["a#b", "a?b", "a%20b", "a b", "a?mode=rwc&b"])
def test_check_inspects_the_state_store_whatever_the_folder_name(tmp_path, name):
    folder = tmp_path / name
    config = write_config(folder, handler={"secret": "s3cret"})
    loaded = smsc_handler.load_config(str(config))
    smsc_handler.ensure_data_dir(loaded)
    smsc_handler.StateStore(loaded).close()
    def files():  # SQLite's -wal/-shm beside the store come and go
        return sorted(str(p) for p in tmp_path.rglob("*") if not str(p).endswith(("-wal", "-shm")))
    before = files()
    done = run_cli("check", "--config", config)
    assert done.returncode == 0, done.stdout
    assert files() == before  # nothing created elsewhere
    # and it is that file it reads: damage it, check says so
    state = Path(loaded.data_dir) / "state.sqlite3"
    for extra in ("-wal", "-shm"):
        Path(str(state) + extra).unlink(missing_ok=True)
    state.write_bytes(b"this is not a database\x00" * 500)
    done = run_cli("check", "--config", config)
    assert done.returncode == 1
    assert any("damaged" in line for line in lines(done.stdout)), done.stdout


############################################################################
# Item 15: advice outside the web root; config.ini and the README agree
############################################################################


def test_check_advice_for_a_data_dir_in_public_html_points_outside_it(tmp_path):
    site = tmp_path / "home" / "u" / "public_html" / "smsc"
    config = write_config(site, handler={"secret": "s3cret"})
    done = run_cli("check", "--config", config)
    (warning,) = [line for line in lines(done.stdout) if "web root" in line]
    advice = warning.split("data_dir = ")[1].split()[0]
    target = os.path.normpath(os.path.join(str(site), advice))
    web_root = str(tmp_path / "home" / "u" / "public_html")
    assert not (target + os.sep).startswith(web_root + os.sep), warning
    assert advice == "../../smsc-data"
    # following the advice silences the warning
    config = write_config(site, handler={"secret": "s3cret", "data_dir": advice})
    done = run_cli("check", "--config", config)
    assert not any("web root" in line for line in lines(done.stdout)), done.stdout


def test_config_ini_and_readme_give_the_same_shared_hosting_data_dir():
    sample = (SCRIPT.parent / "config.ini").read_text(encoding="utf-8")
    readme = (SCRIPT.parent / "README.md").read_text(encoding="utf-8")
    assert "../../smsc-data" in sample
    assert "../smsc-data" not in sample.replace("../../smsc-data", "")
    assert "../smsc-data" not in readme.replace("../../smsc-data", "")


############################################################################
# Item 16: an inline comment is reported once
############################################################################


def test_an_inline_comment_is_reported_once(tmp_path):
    config = tmp_path / "config.ini"
    config.write_text("[dedupe]\nkeep_days = 7  # a week\n", encoding="utf-8")
    done = run_cli("check", "--config", config)
    assert done.returncode == 1
    assert done.stdout.count("comments must stand on their own lines") == 1, done.stdout


############################################################################
# Items 21 and 23: check says which config; .htaccess and folder modes
############################################################################


def test_check_says_which_config_it_read(tmp_path):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    done = run_cli("check", "--config", config)
    assert str(config) in done.stdout and "--config" in done.stdout
    done = run_cli("check", env=clean_env(SMSC_HANDLER_CONFIG=config))
    assert str(config) in done.stdout and "SMSC_HANDLER_CONFIG" in done.stdout


def test_check_names_the_config_beside_problems_too(tmp_path):
    config = write_config(tmp_path)  # no secret: a warning
    done = run_cli("check", "--config", config)
    assert any(line.startswith("read: config %s" % config) for line in lines(done.stdout)), done.stdout


def test_check_is_quiet_about_htaccess_outside_the_web_root(tmp_path):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    (tmp_path / "data").mkdir(mode=0o700)
    done = run_cli("check", "--config", config)
    assert done.returncode == 0
    assert ".htaccess" not in done.stdout, done.stdout


def test_check_still_wants_htaccess_inside_the_web_root(tmp_path):
    site = tmp_path / "public_html" / "smsc"
    config = write_config(site, handler={"secret": "s3cret"})
    (site / "data").mkdir(mode=0o700)
    done = run_cli("check", "--config", config)
    assert ".htaccess" in done.stdout


def test_check_warns_about_a_data_folder_open_to_others(tmp_path):
    config = write_config(tmp_path, handler={"secret": "s3cret"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data").chmod(0o755)
    done = run_cli("check", "--config", config)
    assert done.returncode == 0
    (warning,) = [line for line in lines(done.stdout) if line.startswith("warning")]
    assert "0755" in warning and "chmod 700" in warning


def test_cgi_log_line_for_a_data_folder_error_names_the_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    data_dir = tmp_path / "afile" / "data"
    config = write_config(tmp_path, handler={"data_dir": str(data_dir)})
    env = clean_env(SMSC_HANDLER_CONFIG=config, GATEWAY_INTERFACE="CGI/1.1", REQUEST_METHOD="POST",
                    QUERY_STRING="", CONTENT_TYPE="application/x-www-form-urlencoded",
                    CONTENT_LENGTH="33", REMOTE_ADDR="127.0.0.1", SERVER_NAME="x", SERVER_PORT="80",
                    SERVER_PROTOCOL="HTTP/1.1")
    done = subprocess.run([str(SCRIPT.parent / "handler.cgi")], input=b"id=1&phone=79991234567&status=1&x",
                          capture_output=True, env=env)
    assert done.stdout.startswith(b"Status: 503")
    assert str(data_dir).encode() in done.stderr, done.stderr
