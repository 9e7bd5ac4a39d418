"""The hook (SPEC §7, §9; issue 3 item 2): argv never a shell, clean environment, retries.

The hook is a real program (proof_util.HOOK_SCRIPT) that records its argv, the
environment exec gave it, its stdin and its process group, then succeeds, fails,
hangs or spawns a grandchild as its mode file says.
"""

import json
import os
import shlex
import signal
import sqlite3
import time

import pytest
from proof_util import (
    HookRecorder,
    Site,
    form,
    incoming_callback,
    pid_gone,
    status_callback,
    wait_until,
)

import smsc_handler

#: the hook's whole environment (SPEC §7)
HOOK_ENV = {"PATH", "LANG", "HOME", "SMSC_EVENT_KIND", "SMSC_EVENT_ID", "SMSC_EVENT_FILE"}
#: shell syntax that would create a file named pwned-N if anything ran a shell
SHELL_BAITS = ("$(touch pwned-1)", "; touch pwned-2", "`touch pwned-3`", "| touch pwned-4",
               "&& touch pwned-5", "\n touch pwned-6", "$(touch${IFS}pwned-7)")


@pytest.fixture
def hook(tmp_path):
    return HookRecorder(tmp_path / "hook")


def hooked_site(tmp_path, recorder, extra="", **sections):
    merged = {"hook": {"command": recorder.command(extra)}}
    for section, keys in sections.items():
        merged.setdefault(section, {}).update(keys)
    return Site(tmp_path, **merged)


def no_pwned_files(*folders):
    found = []
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            found.extend(os.path.join(root, n) for n in files if n.startswith("pwned"))
    return found


def hook_rows(site):
    with site.state() as db:
        return db.execute("SELECT event_id, ok, attempts, last_error FROM hooks").fetchall()


def test_argv_is_split_like_a_shell_line_and_quoted_args_arrive_intact(tmp_path, hook):
    extra = "\"two words\" 'it'\"'\"'s $HOME' 'a;b|c&d' \"$(touch pwned-argv)\" plain"
    site = hooked_site(tmp_path, hook, extra)
    assert site.post(form(status_callback())).status_int == 200
    (run,) = hook.runs()
    assert run["argv"] == [str(hook.out), "two words", "it's $HOME", "a;b|c&d",
                           "$(touch pwned-argv)", "plain"]
    assert run["argv"][1:] == shlex.split(extra)
    assert no_pwned_files(tmp_path) == []


def test_a_quoted_word_starting_with_hash_or_semicolon_arrives_intact(tmp_path, hook):
    site = hooked_site(tmp_path, hook, "'#alerts' \"; not a comment\"")
    assert site.post(form(status_callback())).status_int == 200
    (run,) = hook.runs()
    assert run["argv"][1:] == ["#alerts", "; not a comment"]


@pytest.mark.parametrize("bait", SHELL_BAITS)
def test_shell_syntax_in_fields_never_executes(tmp_path, hook, bait):
    site = hooked_site(tmp_path, hook)
    params = incoming_callback(mes="hi " + bait, to=bait, id="x" + bait)
    answer = site.post(form(params))
    assert answer.status_int == 200
    (run,) = hook.runs()
    assert json.loads(run["stdin"])["mes"] == "hi " + bait
    assert no_pwned_files(tmp_path, site.data) == []


def test_shell_syntax_in_the_command_line_is_only_arguments(tmp_path, hook):
    site = hooked_site(tmp_path, hook, "&& touch pwned-cmd | true > pwned-out $(touch pwned-sub) `id`")
    assert site.post(form(status_callback())).status_int == 200
    (run,) = hook.runs()
    assert run["argv"][1:] == ["&&", "touch", "pwned-cmd", "|", "true", ">", "pwned-out",
                               "$(touch", "pwned-sub)", "`id`"]
    assert no_pwned_files(tmp_path, site.data) == []


def test_stdin_is_exactly_the_stored_line(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    params = incoming_callback(mes="Привет\u2028line\nnext", sms_id="42")
    assert site.post(form(params)).status_int == 200
    (run,) = hook.runs()
    (line,) = site.lines("incoming")
    assert run["stdin"].encode("latin-1") == line


def test_environment_is_exactly_the_clean_set(tmp_path, hook, monkeypatch):
    # Under CGI the request's headers are the process's own environment: put some there too.
    monkeypatch.setenv("HTTP_PROXY", "http://evil.example:3128")
    monkeypatch.setenv("HTTP_X_SECRET_HEADER", "leak")
    monkeypatch.setenv("SMSC_HANDLER_CONFIG", "/nowhere")
    site = hooked_site(tmp_path, hook)
    answer = site.post(form(status_callback()),
                       headers={"Proxy": "http://evil.example:3128", "X-Custom": "yes"})
    assert answer.status_int == 200
    (run,) = hook.runs()
    (event,) = site.events()
    env = run["env"]
    assert set(env) == HOOK_ENV
    assert env["SMSC_EVENT_KIND"] == "status"
    assert env["SMSC_EVENT_ID"] == event["event_id"]
    assert env["SMSC_EVENT_FILE"] == str(site.path("status"))
    assert env["PATH"] and env["LANG"] and env["HOME"]
    assert "evil" not in json.dumps(env)


def test_proxy_header_never_reaches_the_hook_under_the_real_cgi_entry(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    answer = site.cgi(form(status_callback()), headers={
        "Proxy": "http://evil.example:3128", "X-Forwarded-For": "10.0.0.1", "Cookie": "a=b"})
    assert answer.status == 200, answer
    (run,) = hook.runs()
    assert set(run["env"]) == HOOK_ENV
    assert not any(name.startswith("HTTP_") for name in run["env"])
    assert "evil" not in json.dumps(run["env"])


def test_hook_runs_in_its_own_process_group(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    site.post(form(status_callback()))
    (run,) = hook.runs()
    assert run["pgid"] == run["pid"]  # killpg reaches it and its children, not the server
    assert run["cwd"] == str(site.config_path.parent)  # relative paths as in the config (SPEC §2)


def test_timeout_kills_the_whole_process_group(tmp_path, hook):
    hook.set_mode("spawn")  # the hook starts a grandchild `sleep 300`, then hangs
    site = hooked_site(tmp_path, hook, hook={"timeout": "1"})
    started = time.monotonic()
    answer = site.post(form(status_callback()))
    elapsed = time.monotonic() - started
    assert answer.status_int == 503
    assert answer.headers["Retry-After"] == "240"
    assert elapsed < 6, elapsed
    (run,) = hook.runs()
    grandchild = int((hook.out / "grandchild.pid").read_text())
    try:
        assert wait_until(lambda: pid_gone(run["pid"]), 3), "the hook survived"
        assert wait_until(lambda: pid_gone(grandchild), 3), "the grandchild survived"
    finally:
        for pid in (run["pid"], grandchild):
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(site.events()) == 1  # kept; the hook is retried on the next call
    assert hook_rows(site)[0][1:3] == (0, 1)
    assert "timed out" in hook_rows(site)[0][3]


def test_a_handler_killed_during_the_hook_runs_it_again_on_the_retry(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    body = form(status_callback())
    hook.set_mode("kill-parent")  # the CGI process dies while its hook runs
    crashed = site.cgi(body)
    assert crashed.returncode == -signal.SIGKILL
    assert crashed.raw == b""  # no answer: SMSC will retry
    assert len(site.events()) == 1
    (claim,) = hook_rows(site)
    assert claim[1] is None  # claimed, no outcome recorded
    hook.set_mode("ok")
    # A delivery while the claim is fresh can't tell a crash from a hook still running.
    assert site.cgi(body).status == 503
    assert len(hook.runs()) == 1
    # SMSC's next try comes 4 minutes later, past the claim's lease (timeout + 30 s).
    with sqlite3.connect(str(site.data / "state.sqlite3")) as db:
        db.execute("UPDATE hooks SET updated_at = updated_at - 240")
    retry = site.cgi(body)
    assert retry.status == 200, retry
    assert len(hook.runs()) == 2
    assert len(site.events()) == 1
    assert hook_rows(site)[0][1] == 1


def test_hook_failure_with_retry_answers_503_then_the_retry_runs_it_again(tmp_path, hook):
    site = hooked_site(tmp_path, hook, hook={"on_failure": "retry"})
    body = form(status_callback())
    hook.set_mode("fail")
    first = site.post(body)
    assert first.status_int == 503
    assert first.headers["Retry-After"] == "240"
    assert first.content_type == "text/plain"
    assert len(site.events()) == 1  # the event is kept
    assert len(hook.runs()) == 1
    second = site.post(body)  # SMSC retries 4 minutes later; the hook still fails
    assert second.status_int == 503
    assert len(site.events()) == 1
    assert len(hook.runs()) == 2
    hook.set_mode("ok")
    third = site.post(body)
    assert third.status_int == 200
    assert third.body == b"OK"
    assert len(site.events()) == 1  # still one line
    runs = hook.runs()
    assert len(runs) == 3
    assert {json.loads(r["stdin"])["event_id"] for r in runs} == {site.events()[0]["event_id"]}
    (row,) = hook_rows(site)
    assert row[1:3] == (1, 3)
    assert site.post(body).status_int == 200  # a repeat after success: no new run
    assert len(hook.runs()) == 3


def test_a_retried_hook_gets_the_stored_line_on_stdin(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    body = form(status_callback())
    hook.set_mode("fail")
    assert site.post(body).status_int == 503
    time.sleep(0.01)  # a later delivery has a later received_at
    hook.set_mode("ok")
    assert site.post(body).status_int == 200
    (line,) = site.lines()
    assert [run["stdin"].encode("latin-1") for run in hook.runs()] == [line, line]


def test_hook_failure_with_ignore_answers_200_and_logs_a_warning(tmp_path, hook, caplog):
    site = hooked_site(tmp_path, hook, hook={"on_failure": "ignore"})
    hook.set_mode("fail")
    with caplog.at_level("WARNING", logger="smsc_handler"):
        answer = site.post(form(status_callback()))
    assert answer.status_int == 200
    (event,) = site.events()
    warnings = [r for r in caplog.records if r.name == "smsc_handler" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert event["event_id"] in warnings[0].getMessage()
    assert "hook says no" in warnings[0].getMessage() or "exit status 3" in warnings[0].getMessage()
    assert hook_rows(site)[0][1] == 0


def test_hanging_hook_with_ignore_answers_200_after_the_timeout(tmp_path, hook, caplog):
    hook.set_mode("hang")
    site = hooked_site(tmp_path, hook, hook={"on_failure": "ignore", "timeout": "0.5"})
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="smsc_handler"):
        answer = site.post(form(status_callback()))
    assert answer.status_int == 200
    assert time.monotonic() - started < 5
    (run,) = hook.runs()
    assert wait_until(lambda: pid_gone(run["pid"]), 3)
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_after_success_a_repeat_does_not_run_the_hook_again(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    body = form(status_callback())
    for _ in range(3):
        assert site.post(body).status_int == 200
    assert len(hook.runs()) == 1
    assert hook_rows(site)[0][1:3] == (1, 1)


def test_each_new_event_runs_the_hook_once(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    for n in range(3):
        assert site.post(form(status_callback(id=str(n)))).status_int == 200
        assert site.post(form(status_callback(id=str(n)))).status_int == 200
    runs = hook.runs()
    assert [json.loads(r["stdin"])["id"] for r in runs] == ["0", "1", "2"]


def test_run_forward_leaves_the_hook_to_the_forward_verb(tmp_path, hook):
    site = hooked_site(tmp_path, hook, hook={"run": "forward"})
    hook.set_mode("fail")  # would answer 503 if the request ran it
    answer = site.post(form(status_callback()))
    assert answer.status_int == 200
    assert len(site.events()) == 1
    assert hook.runs() == []


def test_dedupe_off_still_records_the_hook_outcome(tmp_path, hook):
    site = hooked_site(tmp_path, hook, dedupe={"enabled": "no"})
    assert site.post(form(status_callback(id="a"))).status_int == 200
    hook.set_mode("fail")
    assert site.post(form(status_callback(id="b"))).status_int == 503
    ids = {e["id"]: e["event_id"] for e in site.events()}
    rows = {row[0]: row[1] for row in hook_rows(site)}
    assert rows == {ids["a"]: 1, ids["b"]: 0}
    with site.state() as db:
        assert db.execute("SELECT count(*) FROM seen").fetchone()[0] == 0  # no dedupe ids


def test_a_hook_that_cannot_start_is_a_failure_not_a_crash(tmp_path):
    site = Site(tmp_path, hook={"command": str(tmp_path / "no-such-program") + " arg"})
    answer = site.post(form(status_callback()))
    assert answer.status_int == 503
    assert answer.headers["Retry-After"] == "240"
    assert len(site.events()) == 1
    assert "cannot start" in hook_rows(site)[0][3]


def test_a_hook_with_jsonl_off_still_gets_the_event(tmp_path, hook):
    site = hooked_site(tmp_path, hook, jsonl={"enabled": "no"})
    assert site.post(form(status_callback())).status_int == 200
    (run,) = hook.runs()
    assert json.loads(run["stdin"])["id"] == "1001"
    assert run["env"]["SMSC_EVENT_FILE"] == ""
    assert not site.path("status").exists()


BACKGROUNDER = """#!/bin/sh
# A hook that hands its work to a background job and exits 0 at once.
{setsid}sleep {seconds} &
echo $! > {pidfile}
exit 0
"""


def _backgrounding_hook(tmp_path, seconds, setsid=False):
    script = tmp_path / "bg.sh"
    pidfile = tmp_path / "bg.pid"
    script.write_text(BACKGROUNDER.format(setsid="setsid " if setsid else "", seconds=seconds,
                                          pidfile=pidfile))
    script.chmod(0o755)
    return script, pidfile


def _kill_pidfile(pidfile):
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    if not pid_gone(pid):
        os.kill(pid, signal.SIGKILL)


def test_a_hook_that_exits_0_leaving_a_background_job_succeeds(tmp_path):
    script, pidfile = _backgrounding_hook(tmp_path, 30)
    site = Site(tmp_path, hook={"command": str(script), "timeout": "2"})
    started = time.monotonic()
    try:
        answer = site.post(form(status_callback()))
        elapsed = time.monotonic() - started
    finally:
        _kill_pidfile(pidfile)
    assert answer.status_int == 200
    assert elapsed < 1.5, elapsed


def test_the_request_is_bounded_by_the_timeout_even_if_a_child_leaves_the_group(tmp_path):
    script, pidfile = _backgrounding_hook(tmp_path, 6, setsid=True)
    site = Site(tmp_path, hook={"command": str(script), "timeout": "1"})
    started = time.monotonic()
    try:
        site.post(form(status_callback()))
        elapsed = time.monotonic() - started
    finally:
        _kill_pidfile(pidfile)
    assert elapsed < 3.5, elapsed  # timeout 1 s; the escaped child lives 6 s


def test_two_identical_callbacks_at_once_run_a_slow_hook_once(tmp_path):
    import threading
    runs = tmp_path / "runs.log"
    script = tmp_path / "slow-hook.sh"
    script.write_text("#!/bin/sh\necho run >> '%s'\ncat > /dev/null\nsleep 1\n" % runs)
    script.chmod(0o755)
    site = Site(tmp_path, hook={"command": str(script)})
    site.post(form(status_callback(id="warm-up")))  # the store exists: the race is on the claim only
    runs.unlink()
    body = form(status_callback(id="twice"))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(site.cgi(body))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 2
    for answer in answers:
        assert answer.status in (200, 503), answer  # 503: the hook still runs for the other
        assert b"Traceback" not in answer.stderr, answer
    assert 200 in [answer.status for answer in answers]
    assert runs.read_text().splitlines() == ["run"]
    assert [event["id"] for event in site.events()] == ["warm-up", "twice"]


def test_a_background_job_left_by_a_succeeded_hook_is_not_killed(tmp_path):
    done = tmp_path / "done"
    script = tmp_path / "bg-hook.sh"
    script.write_text("#!/bin/sh\n(sleep 1; touch '%s') >/dev/null 2>&1 &\nexit 0\n" % done)
    script.chmod(0o755)
    site = Site(tmp_path, hook={"command": str(script), "timeout": "5"})
    started = time.monotonic()
    answer = site.post(form(status_callback()))
    elapsed = time.monotonic() - started
    assert answer.status_int == 200
    assert elapsed < 2.5, elapsed  # well under the 5 s timeout: nothing waits for the job
    assert not done.exists()
    assert wait_until(done.exists, 5), "the background job was killed"


def test_a_hook_named_relative_to_the_config_folder_runs_there(tmp_path):
    from smsc_handler import main
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "notify.sh").write_text("pwd > where.txt\ncat > event.json\n")  # not executable
    site = Site(folder, hook={"command": "/bin/sh notify.sh"})
    answer = site.post(form(status_callback()))
    assert answer.status_int == 200, answer.text
    assert (folder / "where.txt").read_text().strip() == str(folder)
    assert json.loads((folder / "event.json").read_text())["id"] == "1001"
    assert main(["check", "--config", str(site.config_path)]) == 0


def test_a_retry_on_the_next_utc_day_gets_the_first_file_and_the_stored_line(tmp_path, hook):
    import smsc_handler
    site = hooked_site(tmp_path, hook, jsonl={"path": "{kind}-{date}.jsonl"})
    body = form(status_callback())
    evening, morning = 1700006399.9, 1700006400.2  # 2023-11-14 23:59:59.9 and 2023-11-15 00:00:00.2

    def event_at(now):
        request = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
        return smsc_handler.normalize(request, None, "127.0.0.1", received=now, body=body)

    first, retry = event_at(evening), event_at(morning)
    assert first["event_id"] == retry["event_id"] and first["received_at"] != retry["received_at"]
    hook.set_mode("fail")
    with pytest.raises(smsc_handler.HookError):
        smsc_handler.store_event(site.config, first, now=evening)
    hook.set_mode("ok")
    smsc_handler.store_event(site.config, retry, now=morning)
    stored = site.data / "status-2023-11-14.jsonl"
    (line,) = stored.read_bytes().splitlines(keepends=True)
    assert not (site.data / "status-2023-11-15.jsonl").exists()  # a repeat: no new line
    runs = hook.runs()
    assert len(runs) == 2
    for run in runs:
        assert run["env"]["SMSC_EVENT_FILE"] == str(stored)
        assert run["stdin"].encode("latin-1") == line


def test_a_retry_after_a_crash_during_the_hook_gets_the_line_stored_first(tmp_path, hook):
    site = hooked_site(tmp_path, hook)
    body = form(status_callback())
    hook.set_mode("kill-parent")  # the CGI process dies while its hook runs
    assert site.cgi(body, remote_addr="127.0.0.2").returncode == -signal.SIGKILL
    with sqlite3.connect(str(site.data / "state.sqlite3")) as db:
        db.execute("UPDATE hooks SET updated_at = updated_at - 240")  # SMSC's next try
    hook.set_mode("ok")
    assert site.cgi(body, remote_addr="127.0.0.3").status == 200
    (stored,) = site.path().read_bytes().splitlines(keepends=True)
    assert hook.runs()[-1]["stdin"].encode("latin-1") == stored  # not the retry's own copy


def test_a_busy_duplicate_with_on_failure_ignore_answers_200(tmp_path, hook):
    site = hooked_site(tmp_path, hook, hook={"on_failure": "ignore"})
    callback = status_callback()
    # Another request claimed the hook a moment ago and is still running it.
    event = smsc_handler.normalize(smsc_handler.decode_request(form(callback)))
    smsc_handler.store_event(site.config, dict(event), now=time.time())
    with sqlite3.connect(str(site.data / "state.sqlite3")) as db:
        db.execute("UPDATE hooks SET ok = NULL, updated_at = ?", (time.time(),))
    runs = len(hook.runs())
    assert site.post(form(callback)).status_int == 200  # stored is enough: no 503
    assert len(hook.runs()) == runs
