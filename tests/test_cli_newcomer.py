"""What a new user meets at the command line (issue 11, items 17, 20–23).

Real subprocesses, a real `serve`, real hook scripts, real files; the zone of the
"local" clock is set with TZ so the expected text is exact.
"""

import json
import os
import re
import socket
import time

import pytest
from cli_util import (
    SECRET,
    Hook,
    ServeProcess,
    clean_env,
    data_dir_of,
    make_event,
    run_cli,
    status_event,
    utc,
    write_config,
    write_events,
)

import smsc_handler


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


############################################################################
# Item 17: every send is its own callback
############################################################################


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    serve = ServeProcess(write_config(tmp_path_factory.mktemp("fresh"), handler={"secret": SECRET}))
    yield serve
    serve.close()


@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_two_sends_in_one_second_are_two_events(server, kind):
    url = server.url + "?md5=" + SECRET
    before = len(server.events(kind + ".jsonl"))
    for _ in range(2):
        done = run_cli("send", url, "--kind", kind)
        assert done.returncode == 0, done.stdout + done.stderr
    stored = server.events(kind + ".jsonl")[before:]
    assert len(stored) == 2
    assert stored[0]["event_id"] != stored[1]["event_id"]


def test_many_sample_callbacks_in_one_second_never_repeat():
    now = time.time()
    for kind, key in (("status", ("id",)), ("incoming", ("id", "sms_id")), ("waitcall", ("phone", "ts"))):
        seen = {tuple(smsc_handler.sample_callback(kind, now)[k] for k in key) for _ in range(200)}
        assert len(seen) == 200, kind


def test_sample_defaults_keep_their_shapes():
    status = smsc_handler.sample_callback("status")
    assert re.fullmatch(r"[1-9]\d{8}", status["id"])
    waitcall = smsc_handler.sample_callback("waitcall")
    assert re.fullmatch(r"79\d{9}", waitcall["phone"])
    incoming = smsc_handler.sample_callback("incoming")
    assert incoming["id"] != incoming["sms_id"]


############################################################################
# Item 20: tail shows local time with its offset; --since naive is local
############################################################################


@pytest.mark.parametrize("zone, shown", [
    ("UTC", "2026-03-01 11:00:00+00:00"),
    ("Asia/Tokyo", "2026-03-01 20:00:00+09:00"),
    ("America/Los_Angeles", "2026-03-01 03:00:00-08:00"),
])
def test_tail_shows_local_time_with_its_offset(config, zone, shown):
    write_events(data_dir_of(config) / "status.jsonl", [status_event("901", received=utc("2026-03-01T11:00:00"))])
    done = run_cli("tail", "--config", config, env=clean_env(TZ=zone))
    assert done.stdout.startswith(shown + "  status"), done.stdout


@pytest.mark.parametrize("zone", ["UTC", "Asia/Tokyo", "America/Los_Angeles"])
@pytest.mark.parametrize("with_offset", [True, False])
def test_a_time_copied_from_tail_selects_from_that_event_on(config, zone, with_offset):
    data = data_dir_of(config)
    write_events(data / "status.jsonl", [status_event("911", received=utc("2026-03-01T11:00:00")),
                                         status_event("912", received=utc("2026-03-01T11:00:01") + 0.25),
                                         status_event("913", received=utc("2026-03-01T11:00:02"))])
    env = clean_env(TZ=zone)
    lines = run_cli("tail", "--config", config, env=env).stdout.splitlines()
    second = lines[1]
    copied = second[:25] if with_offset else second[:19]  # "YYYY-MM-DD HH:MM:SS+HH:MM"
    done = run_cli("stats", "--json", "--since", copied, "--config", config, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events"] == 2, copied


############################################################################
# Item 21: verify the newest line, --all; tail finding nothing says so
############################################################################


def rejected_line(data_dir, status):
    """Store a refused callback (wrong md5) through the real app; return the rejected.jsonl path."""
    import webtest
    app = webtest.TestApp(smsc_handler.make_app(smsc_handler.load_config(str(data_dir))),
                          extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    app.post("/?md5=0123456789abcdef0123456789abcdef",
             {"id": "77", "phone": "79991234567", "status": str(status)}, expect_errors=True)


def test_verify_explains_the_newest_line_by_default_and_every_line_with_all(tmp_path):
    config = write_config(tmp_path, handler={"secret": SECRET})
    for status in (1, 2, 3):
        rejected_line(config, status)
    rejected = data_dir_of(config) / "rejected.jsonl"
    assert len(rejected.read_bytes().splitlines()) == 3
    done = run_cli("verify", rejected, "--config", config)
    assert done.returncode == 1
    assert "77:79991234567:3:<secret>" in done.stdout
    assert ":1:<secret>" not in done.stdout and ":2:<secret>" not in done.stdout
    assert "newest of 3" in done.stdout
    done = run_cli("verify", "--all", rejected, "--config", config)
    assert done.returncode == 1
    for status in (1, 2, 3):
        assert "77:79991234567:%d:<secret>" % status in done.stdout
    assert "0 of 3 pass" in done.stdout


def test_verify_skips_a_torn_last_line(tmp_path):
    config = write_config(tmp_path, handler={"secret": SECRET})
    rejected_line(config, 4)
    rejected = data_dir_of(config) / "rejected.jsonl"
    with open(rejected, "ab") as file:
        file.write(b'{"reason": "a write in pro')
    done = run_cli("verify", rejected, "--config", config)
    assert "77:79991234567:4:<secret>" in done.stdout, done.stdout + done.stderr


def test_tail_with_no_events_says_where_it_looked(config):
    done = run_cli("tail", "--config", config)
    assert done.returncode == 0 and done.stdout == ""
    assert str(data_dir_of(config)) in done.stderr and "no events" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_tail_with_no_matching_events_says_so(config):
    write_events(data_dir_of(config) / "status.jsonl", [status_event("921")])
    done = run_cli("tail", "--phone", "70000000000", "--config", config)
    assert done.returncode == 0 and done.stdout == ""
    assert "no matching events" in done.stderr and "status.jsonl" in done.stderr


############################################################################
# Item 22: forward as root, --from-now, the first run's count
############################################################################


def test_forward_from_now_marks_the_history_done_without_the_hook(tmp_path):
    hook = Hook(tmp_path)
    config = write_config(tmp_path, hook={"command": hook.path, "run": "forward"})
    data = data_dir_of(config)
    write_events(data / "status.jsonl", [status_event(str(930 + n), received=time.time() - 100 + n)
                                         for n in range(3)])
    done = run_cli("forward", "--from-now", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "3" in done.stdout
    assert not hook.out.exists()
    write_events(data / "status.jsonl", [status_event("939")])
    done = run_cli("forward", "--config", config)
    assert done.returncode == 0
    assert [event["id"] for event in hook.events()] == ["939"]
    assert "1 event(s) done" in done.stdout


def test_a_first_forward_says_how_many_old_events_it_runs(tmp_path):
    hook = Hook(tmp_path)
    config = write_config(tmp_path, hook={"command": hook.path, "run": "forward"})
    write_events(data_dir_of(config) / "status.jsonl", [status_event(str(940 + n)) for n in range(4)])
    done = run_cli("forward", "--config", config)
    assert done.returncode == 0
    first = done.stdout.splitlines()[0]
    assert "first run" in first and "4 stored event(s)" in first and "--from-now" in first
    assert "4 event(s) done, 0 left" in done.stdout
    again = run_cli("forward", "--config", config)
    assert "first run" not in again.stdout and "0 event(s) done, 0 left" in again.stdout


def test_forward_says_how_many_are_left_when_the_hook_fails(tmp_path):
    hook = Hook(tmp_path)
    hook.fail()
    config = write_config(tmp_path, hook={"command": hook.path, "run": "forward"})
    write_events(data_dir_of(config) / "status.jsonl", [status_event(str(950 + n)) for n in range(2)])
    done = run_cli("forward", "--tries", "1", "--config", config)
    assert done.returncode == 1
    assert "0 event(s) done, 2 left" in done.stdout


web_user = None
if os.geteuid() == 0:
    import pwd
    try:
        web_user = pwd.getpwnam("www-data")
    except KeyError:
        pass
needs_web_user = pytest.mark.skipif(web_user is None or not os.path.exists("/usr/bin/python3"),
                                    reason="needs root, a www-data user and /usr/bin/python3 "
                                    "(run the suite as root, as .ci/run does)")


@needs_web_user
def test_root_running_forward_leaves_the_lock_to_the_web_user(tmp_path):
    import shutil
    import subprocess
    folder = subprocess.check_output(["mktemp", "-d", "/tmp/smsc-fwd.XXXXXX"], text=True).strip()
    try:
        os.chmod(folder, 0o755)
        shutil.copy2(smsc_handler.__file__, folder)
        hook = Hook(folder)
        config = write_config(folder, hook={"command": hook.path, "run": "forward"})
        data = data_dir_of(config)
        data.mkdir(mode=0o700)
        for path in (data, hook.path.parent):
            os.chown(path, web_user.pw_uid, web_user.pw_gid)
        os.chown(config, web_user.pw_uid, web_user.pw_gid)
        script = os.path.join(folder, "smsc_handler.py")
        done = subprocess.run(["/usr/bin/python3", script, "forward", "--config", str(config)],
                              capture_output=True, text=True, env=clean_env())  # as root
        assert done.returncode == 0, done.stderr
        assert os.stat(data / "forward.lock").st_uid == web_user.pw_uid
        as_web = subprocess.run(["runuser", "-u", "www-data", "--", "/usr/bin/python3", script, "forward",
                                 "--config", str(config)], capture_output=True, text=True, env=clean_env())
        assert as_web.returncode == 0, as_web.stderr
        # a lock left by an older root run: the web user is told what to do
        os.chown(data / "forward.lock", 0, 0)
        as_web = subprocess.run(["runuser", "-u", "www-data", "--", "/usr/bin/python3", script, "forward",
                                 "--config", str(config)], capture_output=True, text=True, env=clean_env())
        assert as_web.returncode == 1
        assert "root" in as_web.stderr and "sudo -u www-data" in as_web.stderr and "chown" in as_web.stderr
        assert len(as_web.stderr.splitlines()) == 1
    finally:
        subprocess.run(["rm", "-rf", folder], check=True)


############################################################################
# Item 23: send's notes and hints; serve on a busy port
############################################################################


def test_send_without_a_hash_in_the_url_says_the_callback_is_unsigned(server):
    done = run_cli("send", server.url)
    assert "unsigned" in done.stdout
    done = run_cli("send", server.url + "?md5=" + SECRET)
    assert "unsigned" not in done.stdout


def test_send_refused_with_403_hints_at_verify(server):
    done = run_cli("send", server.url + "?md5=wrong_secret")
    assert done.returncode == 1
    assert "403" in done.stdout and "verify" in done.stdout and "rejected.jsonl" in done.stdout


def test_serve_on_a_busy_port_names_the_address_and_suggests_another(config):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = run_cli("serve", "--port", port, "--config", config)
    assert done.returncode == 1
    assert "127.0.0.1:%d" % port in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_make_event_helper_still_builds_incoming(config):
    # tail's readable line keeps the message id with the new time column
    write_events(data_dir_of(config) / "incoming.jsonl", [make_event(id="961", phone="79991234567", mes="hi",
                                                                     to="79000000000")])
    done = run_cli("tail", "--config", config, env=clean_env(TZ="UTC"))
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00  incoming .* id=961", done.stdout), done.stdout
