#!/usr/bin/env python3
"""Publish smsc_handler's events into NATS JetStream, de-duplicated by event_id (README "Scaling out").

Every host behind the load balancer publishes each event it stored with the
JetStream message id ``Nats-Msg-Id: <event_id>``. A callback stored by two hosts
(one stored it but its answer was lost, so SMSC's retry landed on the other) is
then stored once in the stream: JetStream drops a repeat of an id within the
stream's duplicate window (make it at least SMSC's 3 h 20 min of retries; --init
makes it 4 h). Needs ``pip install nats-py`` (an example dependency, never the
handler's).

Two ways to run it; both exit/answer with success only after JetStream's ack:

* As the ``[hook]`` command, one process per event (simple; tens of events/s)::

      [hook]
      command = /usr/bin/python3 /opt/smsc/examples/nats_publish_hook.py --servers nats://10.0.0.1:4222,nats://10.0.0.2:4222
      run = forward

  The event JSON comes on stdin. The hook's environment is clean, so the servers
  are given as arguments.

* As the ``[relay]`` endpoint, one long-running process per host (thousands of
  events/s: one NATS connection, the relay's kept-alive HTTP connection)::

      SMSC_RELAY_SECRET=whsec_... nats_publish_hook.py --serve 127.0.0.1:8787 --servers ...

      [relay]
      url = http://127.0.0.1:8787/
      secret = whsec_...        (the same)

  It verifies each Standard Webhooks signature and publishes with
  ``Nats-Msg-Id: <webhook-id>`` (the event_id); 200 after the ack, 503 when NATS
  did not ack (the relay tries again later), 400 for a bad signature.

``--init`` creates (or updates) the stream first: ``--stream SMSC`` on subjects
``SUBJECT.>`` with ``--replicas`` (default 3) and a 4 h duplicate window; alone
(``nats_publish_hook.py --init --servers ... < /dev/null``) it does only that.
"""

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import sys
import time

import nats
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError

#: seconds: SMSC retries for 3 h 20 min; a repeat after the window would be stored again
DUPLICATE_WINDOW = 4 * 3600
#: seconds a Standard Webhooks timestamp may be off (the libraries' default)
TOLERANCE = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="nats://127.0.0.1:4222", help="comma-separated NATS URLs")
    parser.add_argument("--subject", default="smsc", help="subject prefix: events go to PREFIX.KIND")
    parser.add_argument("--stream", default="SMSC", help="stream name (for --init)")
    parser.add_argument("--replicas", type=int, default=3, help="stream replicas (for --init)")
    parser.add_argument("--init", action="store_true", help="create or update the stream, then go on")
    parser.add_argument("--serve", metavar="HOST:PORT", help="run as the [relay] endpoint")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for JetStream's ack")
    return parser.parse_args(argv)


async def connect(args):
    servers = [url.strip() for url in args.servers.split(",") if url.strip()]
    return await nats.connect(servers=servers, connect_timeout=args.timeout, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.2, allow_reconnect=True)


async def init_stream(js, args):
    config = StreamConfig(name=args.stream, subjects=[args.subject + ".>"], num_replicas=args.replicas,
                          duplicate_window=DUPLICATE_WINDOW)
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)  # it exists with other settings


async def publish(js, args, event_id, kind, body):
    """Publish one event; return None when JetStream stored it (now or before), else the reason."""
    try:
        ack = await js.publish("%s.%s" % (args.subject, kind), body, timeout=args.timeout,
                               headers={"Nats-Msg-Id": event_id})
    except Exception as exc:  # timeouts, no responders while a leader is elected, a lost connection
        return "not acknowledged: %s" % (type(exc).__name__,)
    if ack.duplicate and not ack.seq:
        # nats-server before the 2025 dedupe fixes could answer "duplicate" for an id whose first
        # publish was dropped in a leader election (nats-server PR 6415): not stored, so fail.
        return "duplicate ack without a sequence: not stored"
    return None


async def run_hook(args):
    body = b"" if args.init and sys.stdin.isatty() else sys.stdin.buffer.read()
    if not body.strip() and args.init:
        event = None  # `--init < /dev/null`: set the stream up, publish nothing
    else:
        event = json.loads(body)
    nc = await connect(args)
    try:
        js = nc.jetstream()
        if args.init:
            await init_stream(js, args)
            print("nats_publish_hook: stream %s ready (%d replicas, %d s duplicate window)"
                  % (args.stream, args.replicas, DUPLICATE_WINDOW))
        if event is None:
            return 0
        error = await publish(js, args, event["event_id"], event["kind"], body.rstrip(b"\n"))
    finally:
        await nc.close()
    if error:
        sys.stderr.write("nats_publish_hook: %s %s\n" % (event["event_id"], error))
        return 1
    return 0


def verified(key, headers, body):
    """Whether a Standard Webhooks v1 signature over id.timestamp.body matches, with a fresh timestamp."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE:
        return False
    expected = base64.b64encode(hmac.new(key, b"%s.%s.%s" % (msg_id.encode(), stamp.encode(), body),
                                         hashlib.sha256).digest()).decode()
    return any(sig.startswith("v1,") and hmac.compare_digest(sig[3:], expected)
               for sig in headers.get("webhook-signature", "").split(" "))


async def handle_connection(reader, writer, js, args, key):
    """Serve HTTP/1.1 requests on one kept-alive connection."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method = lines[0].split(" ", 1)[0]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length") or 0))
            if method != "POST":
                status, text = 405, "POST only"
            elif not verified(key, headers, body):
                status, text = 400, "bad signature"
            else:
                event = json.loads(body)
                error = await publish(js, args, headers["webhook-id"], event.get("kind", "unknown"), body)
                status, text = (200, "stored") if error is None else (503, error)
            reason = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 503: "Service Unavailable"}
            data = text.encode()
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, reason[status].encode(), len(data), data))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(args):
    secret = os.environ.get("SMSC_RELAY_SECRET", "")
    if not secret.startswith("whsec_"):
        sys.stderr.write("nats_publish_hook: set SMSC_RELAY_SECRET to the [relay] secret (whsec_...)\n")
        return 2
    try:
        key = base64.b64decode(secret[6:] + "==")
    except binascii.Error:
        sys.stderr.write("nats_publish_hook: SMSC_RELAY_SECRET is not whsec_ + base64\n")
        return 2
    nc = await connect(args)
    js = nc.jetstream()
    if args.init:
        await init_stream(js, args)
    host, _, port = args.serve.rpartition(":")
    server = await asyncio.start_server(lambda r, w: handle_connection(r, w, js, args, key), host or "127.0.0.1",
                                        int(port))
    print("nats_publish_hook: relay endpoint on http://%s:%s/" % (host or "127.0.0.1", port), flush=True)
    async with server:
        await server.serve_forever()
    return 0


def main(argv=None):
    args = parse_args(argv)
    return asyncio.run(serve(args) if args.serve else run_hook(args))


if __name__ == "__main__":
    sys.exit(main())
