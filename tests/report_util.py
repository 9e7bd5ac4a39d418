"""Helpers for the report tests: a store written by the real handler, and the page read back.

The store has two parts, both written by the module's own code: two weeks of history
built by ``normalize`` and appended by ``append_line`` with chosen received times (the
handler stamps "now", and a chart of one day shows little), and today's callbacks sent
to a real ``serve`` process over HTTP — among them the hostile texts a stranger can put
into an incoming SMS, a phone or an id.
"""

import html.parser
import json
import random
import time
from pathlib import Path
from urllib.parse import urlencode

from cli_util import ServeProcess, run_cli, write_config
from servers_util import request

import smsc_handler

#: texts a stranger controls, each to be shown as text and never as markup
HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "javascript:alert(3)",
    "<a href=\"javascript:alert(4)\">click</a>",
    "\u202egpj.exe",
    "'; background:url(http://127.0.0.1:9/x); '",
    "</style><style>body{display:none}</style>",
    "&lt;b&gt;already escaped&lt;/b&gt;",
    "W" * 400,
]
#: one incoming SMS of 10,000 characters
LONG_SMS = ("Очень длинное сообщение. " * 400)[:10000]


def _store(config, received, **params):
    """Store one callback as the handler would, received at `received` (Unix seconds)."""
    body = urlencode({k: str(v) for k, v in params.items()}, encoding="utf-8").encode("ascii")
    request_ = smsc_handler.decode_request(body, b"", "application/x-www-form-urlencoded", "utf-8")
    event = smsc_handler.normalize(request_, None, "127.0.0.1", received=received, body=body)
    smsc_handler.append_line(smsc_handler.event_path(config, event["kind"], received),
                             smsc_handler.event_line(event), fsync=False)


def write_history(config_path, now, days=14, seed=7):
    """Write `days` days of statuses, incoming SMS and calls before `now`; return what was written."""
    config = smsc_handler.load_config(str(config_path))
    smsc_handler.ensure_data_dir(config)
    rnd = random.Random(seed)
    written = {"status": 0, "incoming": 0, "waitcall": 0}
    message = 1000
    midnight = now - now % 86400  # each day's callbacks within its own UTC day (the report's days),
    for day in range(days, 0, -1):  # whatever the hour: `days` days of history, then today
        start = midnight - day * 86400
        for _ in range(rnd.randint(15, 40)):
            message += 1
            sent = start + rnd.randint(0, 80000)
            phone = "7999%07d" % rnd.randint(0, 9999999)
            _store(config, sent, id=message, phone=phone, status=0, ts=int(sent), cost="1.50")
            written["status"] += 1
            draw = rnd.random()
            if draw < 0.8:
                _store(config, sent + 30, id=message, phone=phone, status=1, ts=int(sent + 30), cost="1.50")
                written["status"] += 1
            elif draw < 0.93:
                _store(config, sent + 60, id=message, phone=phone, status=20, ts=int(sent + 60), cost="1.50",
                       err=rnd.choice([1, 6, 13, 240, 255]))
                written["status"] += 1
        for index in range(rnd.randint(0, 4)):
            sent = start + rnd.randint(0, 80000)
            _store(config, sent, id=rnd.randint(1, 10**6), phone="7912%07d" % rnd.randint(0, 10**7),
                   mes="Здравствуйте! Заказ %d готов?" % index, to="79990000000", sent=int(sent), time=int(sent))
            written["incoming"] += 1
        for _ in range(rnd.randint(0, 3)):
            sent = start + rnd.randint(0, 80000)
            _store(config, sent, waitcall=1, phone="7913%07d" % rnd.randint(0, 10**7), ts=int(sent))
            written["waitcall"] += 1
    return written


def post_hostile(serve: ServeProcess):
    """Send today's callbacks, hostile texts in every field a stranger controls, to a real server."""
    port = int(serve.url.rsplit(":", 1)[1].strip("/"))
    now = int(time.time())
    posts = []
    for index, text in enumerate(HOSTILE):
        posts.append({"id": "in%d" % index, "phone": text, "mes": text, "to": text, "sent": now, "time": now})
        posts.append({"id": text, "phone": "7900000%04d" % index, "status": "20", "err": "255", "ts": now - 7200})
        posts.append({"waitcall": "1", "phone": text, "ts": now - index, "callmenu": text})
    posts.append({"id": "long", "phone": "79001112233", "mes": LONG_SMS, "to": "79990000000", "sent": now})
    for params in posts:
        body = urlencode(params, encoding="utf-8").encode("ascii")
        answer = request(port, "POST", "/?charset=utf-8", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.status == 200, (params, answer)
    return posts


def post_today(serve: ServeProcess):
    """Send an ordinary day's callbacks to a real server: sent, delivered, failed, pending, SMS, calls."""
    port = int(serve.url.rsplit(":", 1)[1].strip("/"))
    now = int(time.time())
    posts = []
    for index in range(12):
        phone = "7916%07d" % (index * 7919)
        posts.append({"id": 5000 + index, "phone": phone, "status": "0", "ts": now - 9000 + index, "cost": "1.50"})
        if index % 4:
            posts.append({"id": 5000 + index, "phone": phone, "status": "1", "ts": now - 8000 + index, "cost": "1.50"})
        elif index % 8 == 0:
            posts.append({"id": 5000 + index, "phone": phone, "status": "20", "err": "6", "ts": now - 8500,
                          "cost": "1.50"})
    posts.append({"id": "9001", "phone": "79161234567", "mes": "Спасибо, заказ получил!", "to": "79990000000",
                  "sent": now - 600, "time": now - 600})
    posts.append({"waitcall": "1", "phone": "79167654321", "ts": now - 300})
    for params in posts:
        body = urlencode(params, encoding="utf-8").encode("ascii")
        answer = request(port, "POST", "/?charset=utf-8", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.status == 200, (params, answer)
    return posts


def demo_store(folder, now=None, hostile=True) -> Path:
    """Write the whole demo store (history, then today's callbacks through `serve`); return its config.

    `hostile`: today's callbacks carry the texts of HOSTILE and LONG_SMS; else an ordinary day's.
    """
    config_path = write_config(folder, dedupe={"enabled": "no"})
    write_history(config_path, time.time() if now is None else now)
    serve = ServeProcess(config_path)
    try:
        (post_hostile if hostile else post_today)(serve)
    finally:
        serve.close()
    return config_path


def stats_json(config_path, *args) -> dict:
    """What ``stats --json`` prints for this store."""
    done = run_cli("stats", "--json", "--config", config_path, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def report_page(config_path, *args, cwd=None) -> str:
    """What ``report -o -`` writes for this store."""
    done = run_cli("report", "-o", "-", "--config", config_path, *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


class Node:
    """One element of a parsed page: tag, attributes, children and text."""

    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent = tag, dict(attrs), parent
        self.children, self.parts = [], []

    @property
    def text(self) -> str:
        """All the text inside this element, as a browser would show it (entities decoded)."""
        return "".join(part if isinstance(part, str) else part.text for part in self.parts)

    def iter(self, tag=None):
        """Yield this element and every element below it (of `tag` when given)."""
        if tag is None or self.tag == tag:
            yield self
        for child in self.children:
            yield from child.iter(tag)

    def find(self, tag, **attrs):
        """Return the elements below of `tag` whose attributes hold `attrs` (``class_`` for class)."""
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [n for n in self.iter(tag) if all(n.attrs.get(k) == v for k, v in wanted.items())]


#: elements with no end tag in HTML
VOID = {"meta", "br", "link", "img", "input", "hr"}


class _TreeBuilder(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {})
        self.start_tags = []

    def handle_starttag(self, tag, attrs):
        self.start_tags.append((tag, attrs))
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        self.node.parts.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.start_tags.append((tag, attrs))
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        self.node.parts.append(node)

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, "end tag </%s> with no start" % tag
        self.node = node.parent

    def handle_data(self, data):
        self.node.parts.append(data)


def parse_page(text: str):
    """Parse a page; return (root Node, every start tag as (tag, attrs) in order)."""
    builder = _TreeBuilder()
    builder.feed(text)
    builder.close()
    return builder.root, builder.start_tags
