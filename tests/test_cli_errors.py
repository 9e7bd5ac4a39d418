"""Every command-line path ends in one line on stderr, never a traceback (issue 11, item 13).

Each case runs the real ``python3 smsc_handler.py`` as a subprocess: what a user at a
terminal sees. Text-to-number conversions (`--since`, `-n`, `--port`, seconds options) get
a usage error (exit 2); a handler URL that is not one is a usage error that never echoes
the URL (it holds the secret); a server answering junk is a failed send (exit 1).
"""

import socket
import threading

import pytest
from cli_util import SECRET, assert_one_line_error, clean_env, run_cli, write_config


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


def usage_error(done):
    """Assert a usage error: exit 2, argparse's usage line at most, then one error line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith((" ", "usage:"))]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.mark.parametrize("since", [
    "²h",                 # str.isdigit() says yes, int() says no
    "٣d",                 # Arabic-Indic digit: int() would read it as 3
    "9" * 400 + "h",      # overflows the float
    "1e400h",
    "99999999-01-01",
])
def test_stats_since_that_is_no_time_is_a_usage_error(config, since):
    line = usage_error(run_cli("stats", "--since", since, "--config", config))
    assert "--since" in line
    assert len(line) < 300  # a 400-digit text is not echoed whole


@pytest.mark.parametrize("since", ["0001-01-01", "9999-12-31", "0001-01-01T00:00+14:00",
                                   "9999-12-31T23:59:59-12:00"])
@pytest.mark.parametrize("zone", ["UTC", "Asia/Tokyo", "America/Los_Angeles"])
def test_stats_since_at_the_ends_of_the_calendar_works(config, since, zone):
    done = run_cli("stats", "--json", "--since", since, "--config", config, env=clean_env(TZ=zone))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("argv", [
    ["tail", "-n", "9" * 30],
    ["tail", "-n", "-5"],
    ["tail", "-n", "0"],
    ["tail", "-n", "٣"],
    ["send", "http://127.0.0.1:1/", "--tries", "9" * 400],
    ["send", "http://127.0.0.1:1/", "--timeout", "nan"],
    ["send", "http://127.0.0.1:1/", "--timeout", "inf"],
    ["send", "http://127.0.0.1:1/", "--timeout", "0"],
    ["send", "http://127.0.0.1:1/", "--retry", "--interval", "-1"],
    ["send", "http://127.0.0.1:1/", "--interval", "1e400"],
    ["forward", "--backoff", "-1"],
    ["forward", "--interval", "nan"],
    ["serve", "--port", "99999"],
    ["serve", "--port", "-1"],
    ["serve", "--port", "٨٠"],
])
def test_numbers_out_of_range_are_usage_errors(config, argv):
    line = usage_error(run_cli(*argv, "--config", config))
    assert "expected" in line


def test_a_huge_n_within_range_shows_the_events(config):
    done = run_cli("tail", "-n", "999999999", "--config", config)
    assert done.returncode == 0
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("url", [
    "http://[bad-%s]/?md5=%s" % (SECRET, SECRET),   # 3.12+ quotes the host in its ValueError
    "http://[::1/?md5=" + SECRET,
    "http://example.com:80x/?md5=" + SECRET,
    "http://example.com:99999/?md5=" + SECRET,
    "http://exa mple.com/?md5=" + SECRET,
    "http://example.com/a b?md5=" + SECRET,          # http.client quotes the path in its error
    "http://example.com/\x1b[31m?md5=" + SECRET,
    "http:///?md5=" + SECRET,
    "ftp://example.com/?md5=" + SECRET,
])
def test_send_to_an_invalid_url_is_one_line_without_the_secret(url):
    done = run_cli("send", url)
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr)
    assert SECRET not in done.stdout + done.stderr
    assert "handler URL" in done.stderr


class JunkServer:
    """A TCP server on 127.0.0.1 that reads a request and answers `reply` bytes, then closes."""

    def __init__(self, reply: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = "http://127.0.0.1:%d/?md5=%s" % (self.sock.getsockname()[1], SECRET)
        self.reply = reply
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("reply", [
    b"JUNK\x1b[31m\r\n\r\n",
    b"",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 abc Nope\r\n\r\n",
    b"\x00\x01\x02 binary",
])
def test_send_to_a_server_answering_junk_fails_in_one_line(reply):
    server = JunkServer(reply)
    try:
        done = run_cli("send", server.url, "--timeout", "5")
    finally:
        server.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == ""
    assert SECRET not in done.stdout
    assert "\x1b" not in done.stdout   # the server's bytes never reach the terminal raw
    answer = [line for line in done.stdout.splitlines() if line.startswith("POST ")]
    assert len(answer) == 1, done.stdout


def test_main_turns_an_unexpected_exception_into_one_line(monkeypatch, capsys):
    import smsc_handler

    def broken(args):
        raise KeyError("secret-" + SECRET)

    parser = smsc_handler.build_parser()
    monkeypatch.setattr(smsc_handler, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["stats"].set_defaults(func=broken)
    assert smsc_handler.main(["stats"]) == 1
    out, err = capsys.readouterr()
    assert_one_line_error(err)
    assert "internal error (KeyError at smsc_handler.py line" in err
    assert "bug" in err and SECRET not in err and out == ""


def test_verify_of_a_request_declaring_a_5000_digit_length_explains_it(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"POST /?md5=x HTTP/1.1\r\nContent-Length: " + b"9" * 5000
                    + b"\r\n\r\nid=1&phone=79991234567&status=1")
    done = run_cli("verify", raw, "--secret", "abc")
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert "1:79991234567:1:<secret>" in done.stdout


@pytest.mark.parametrize("received_at", [5, None, ["x"], {"a": 1}, "2026-13-45T99:99:99.xyzZ", ""])
def test_tail_and_stats_read_a_hand_edited_line_without_a_traceback(config, received_at):
    import json

    from cli_util import data_dir_of, status_event
    event = status_event("971")
    event["received_at"] = received_at
    data = data_dir_of(config)
    data.mkdir(parents=True, exist_ok=True)
    (data / "status.jsonl").write_text(json.dumps(event) + "\n", encoding="utf-8")
    for verb in (["tail"], ["stats"], ["stats", "--since", "2h"]):
        done = run_cli(*verb, "--config", config)
        assert done.returncode == 0, (verb, done.stderr)
        assert "Traceback" not in done.stderr
