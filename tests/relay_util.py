"""The relay tests' receiver: tests/relay_receiver.py (Flask) under a real gunicorn on 127.0.0.1."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_util import free_port

#: the folder of relay_receiver.py
TESTS = Path(__file__).resolve().parent
#: the Standard Webhooks test suite's own key (libraries/python/tests/test_webhooks.py)
RELAY_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """gunicorn (gthread: keeps connections alive) serving relay_receiver:app; stopped by its PID."""

    def __init__(self, folder, secret=RELAY_SECRET, slow=2.0, port=None, keepalive=30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.secret, self.slow, self.keepalive = secret, slow, keepalive
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d/events" % self.port
        self.process = None

    def start(self):
        env = dict(os.environ, RECEIVER_SECRET=self.secret, RECEIVER_DIR=str(self.folder),
                   RECEIVER_SLOW=str(self.slow))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
             "--keep-alive", str(self.keepalive), "--graceful-timeout", "1", "-b", "127.0.0.1:%d" % self.port,
             "--chdir", str(TESTS), "relay_receiver:app"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.folder / "gunicorn.log", "ab"),
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                connection.request("GET", "/ready")
                ready = connection.getresponse().status == 200
                connection.close()
                if ready:
                    return self
            except (OSError, http.client.HTTPException):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("gunicorn did not start: %s" % (self.folder / "gunicorn.log").read_text())
            time.sleep(0.05)

    def kill(self):
        """SIGKILL the master and its worker (their own process group, which we started)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def requests(self, path="/events") -> list:
        """Every request the receiver logged, in order."""
        log = self.folder / "requests.jsonl"
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [entry for entry in entries if entry["path"] == path]

    def delivered(self) -> list:
        """webhook-ids answered 200, in order (repeats included)."""
        return [entry["id"] for entry in self.requests() if entry["status"] == 200]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
