"""Minimal "parse the form, append a JSON line" WSGI app: what a one-screen handler does.

No hash check, no normalizing, no dedupe: the smallest app that still stores a
callback. ``minimal_append:application`` reads MINIMAL_DATA_DIR (default: a folder
under the temporary directory) and MINIMAL_FSYNC (yes/no, default yes) from the environment;
``make_app(path, fsync)`` builds one directly.
"""

import json
import os
import tempfile
import time
from urllib.parse import parse_qsl


def make_app(path, fsync=True):
    """Return a WSGI app that appends each POSTed form as one JSON line to `path`."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

    def application(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        params = dict(parse_qsl(environ.get("QUERY_STRING", ""), encoding="latin-1"))
        params.update(parse_qsl(body.decode("latin-1"), encoding="cp1251"))
        event = {"received_at": time.time(), "params": params}
        line = (json.dumps(event, ensure_ascii=True) + "\n").encode("ascii")
        fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, line)
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "2")])
        return [b"OK"]

    return application


def _from_environment():
    folder = os.environ.get("MINIMAL_DATA_DIR") or os.path.join(tempfile.gettempdir(), "minimal_append")
    os.makedirs(folder, exist_ok=True)
    fsync = os.environ.get("MINIMAL_FSYNC", "yes").lower() in ("yes", "1", "true", "on")
    return make_app(os.path.join(folder, "minimal.jsonl"), fsync)


_app = None


def application(environ, start_response):
    """Build the app from the environment on first use, then serve with it."""
    global _app
    if _app is None:
        _app = _from_environment()
    return _app(environ, start_response)
