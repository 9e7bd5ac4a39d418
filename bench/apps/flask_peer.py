"""The Flask peer: the same status callback handled the framework way.

What a user who picks Flask would write: ``request.values`` for the form (query and
body merged), the md5 control hash checked with ``hmac.compare_digest``, one JSON
line appended under ``flock`` (fsync optional), ``OK``. No charset handling, no
normalizing, no dedupe: it does less than the handler, so it is a fair floor for
"the framework route". ``flask_peer:app`` reads PEER_DATA_DIR, PEER_FSYNC (yes/no)
and PEER_SECRET from the environment; ``create_app(path, fsync, secret)`` builds one.
"""

import fcntl
import hashlib
import hmac
import json
import os
import tempfile
import time

from flask import Flask, request


def create_app(path, fsync=True, secret=""):
    """Return a Flask app that stores signed status callbacks in `path`."""
    app = Flask(__name__)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

    @app.route("/", methods=["POST"])
    def callback():
        params = request.values.to_dict()
        if not params.get("phone"):
            return "no phone\n", 400, {"Content-Type": "text/plain; charset=utf-8"}
        signed = "%s:%s:%s:%s" % (params.get("id", ""), params["phone"], params.get("status", ""), secret)
        expected = hashlib.md5(signed.encode("utf-8")).hexdigest()
        if not hmac.compare_digest(params.get("md5", "").lower().encode(), expected.encode()):
            return "Forbidden\n", 403, {"Content-Type": "text/plain; charset=utf-8"}
        event = {
            "kind": "status",
            "id": params.get("id"),
            "phone": params["phone"],
            "status": int(params["status"]) if params.get("status", "").isdigit() else None,
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": params,
        }
        line = (json.dumps(event, ensure_ascii=True) + "\n").encode("ascii")
        fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return "OK", 200, {"Content-Type": "text/plain; charset=utf-8"}

    return app


def _from_environment():
    folder = os.environ.get("PEER_DATA_DIR") or os.path.join(tempfile.gettempdir(), "flask_peer")
    os.makedirs(folder, exist_ok=True)
    fsync = os.environ.get("PEER_FSYNC", "yes").lower() in ("yes", "1", "true", "on")
    return create_app(os.path.join(folder, "status.jsonl"), fsync, os.environ.get("PEER_SECRET", ""))


app = _from_environment()
application = app
