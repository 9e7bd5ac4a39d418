"""Receive smsc_handler's relay in a Flask app: verify the signature, drop repeats, handle.

    pip install flask standardwebhooks
    SMSC_RELAY_SECRET=whsec_... flask --app flask_receiver run --port 5000

and in smsc_handler's config.ini: ``[relay] url = https://your-app/smsc/events``,
``secret =`` the same whsec_ value. Any Standard Webhooks or Svix library verifies
the same way (``svix.webhooks.Webhook(secret).verify(body, headers)``).

The relay delivers at least once: after a timeout or a crash the same event can
come again, always with the same ``webhook-id`` (smsc_handler's event_id). The id
is recorded in the same SQLite transaction as the work, so an event is handled
once, and a failure answers 500 (the relay tries again later) without recording it.
"""

import json
import os
import sqlite3

from flask import Flask, request
from standardwebhooks import Webhook, WebhookVerificationError

app = Flask(__name__)
webhook = Webhook(os.environ["SMSC_RELAY_SECRET"])
#: where the example keeps the ids it has handled (and, standing in for your work, the events)
DATABASE = os.environ.get("SMSC_RECEIVER_DB", "smsc_events.sqlite3")


def database():
    db = sqlite3.connect(DATABASE, timeout=30, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS seen (webhook_id TEXT PRIMARY KEY, event TEXT)")
    return db


def handle(db, event):
    """Your code here: mark the message delivered, answer the SMS, confirm the phone..."""
    if event["kind"] == "status" and event["final"]:
        app.logger.info("message %s to %s: %s", event["id"], event["phone"], event["status_name"])


@app.post("/smsc/events")
def smsc_events():
    body = request.get_data()  # the raw bytes: the signature covers them exactly
    try:
        event = webhook.verify(body, request.headers)  # checks webhook-timestamp too (±5 min)
    except WebhookVerificationError:
        return "bad signature", 400  # the relay records it as refused; nothing handled
    db = database()
    try:
        db.execute("BEGIN IMMEDIATE")  # one delivery of an id at a time
        fresh = db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)",
                           (request.headers["webhook-id"], json.dumps(event))).rowcount == 1
        if fresh:
            handle(db, event)
        db.execute("COMMIT")
    except Exception:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise  # Flask answers 500: the relay tries again later
    finally:
        db.close()
    return ("", 204) if fresh else ("repeat", 200)
