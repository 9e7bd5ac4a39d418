#!/usr/bin/env python3
"""smsc_handler: receive SMS Center (SMSC) callbacks into JSON lines.

SMSC posts a request to the customer's handler URL for every delivery status of
a sent message, every incoming SMS and every number-confirmation call. This
module decodes such a request (form, JSON or XML; windows-1251, koi8-r or
utf-8), checks its control hash, turns it into one normalized JSON event,
appends it to ``data_dir/{kind}.jsonl`` and/or hands it to a user command, and
answers so that SMSC's retry rule never loses an event: 200 means stored.

Three ways to run it:

* WSGI: ``application`` (``wsgi.py`` exposes it to uWSGI, gunicorn, mod_wsgi);
  ``make_app(load_config(path))`` builds one for a given config.
* CGI: ``handler.cgi`` runs ``application`` through ``run_cgi`` (PEP 3333's CGI
  gateway, byte for byte as ``wsgiref.handlers.CGIHandler``, without its imports).
* Command line: ``python3 smsc_handler.py serve`` and the other verbs of
  ``python3 smsc_handler.py -h``.

Config is found in this order: ``--config PATH``, the environment variable
``SMSC_HANDLER_CONFIG``, ``config.ini`` beside this file (for the installed
``smsc-handler`` command: in the current folder); none at all means the
built-in defaults. Only the standard library is used, and only what a request
needs is imported (a plain form callback loads no XML parser, no subprocess and
no logging, and no SQLite with dedupe off and no hook): under CGI, imports are
most of a request's cost.

Sections, in the order a request meets them (pure protocol code above I/O):
constants and code tables · exceptions · configuration · decoding a request
(decode_request) · the control hash (verify_signature) · events (normalize) ·
storage (append_line) · state (StateStore, store_event: exactly once on disk) ·
the hook (run_hook) · readiness (the health line) · WSGI application (Handler:
the one place errors become answers) · gateways (run_cgi, serve). Then what
reads the stored events, all through one reader: stored events across dated and
rotated files (iter_stored, resume_lines) · tracking (current_state) and its
index (TrackingIndex, message_status, find_calls) · the report (report_data,
render_report) · the relay (Relay, relay_once: Standard Webhooks to the user's
app) · command line (main and one cmd_* per verb).
"""

from __future__ import annotations

import os
import sys
import time

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # exceptions
    "HandlerError", "ConfigError", "BadRequest", "Forbidden", "SignatureError",
    "PayloadTooLarge", "MethodNotAllowed", "StorageError", "HookError",
    # configuration
    "Config", "find_config", "load_config",
    # protocol (pure functions)
    "Request", "decode_request", "classify", "control_hash", "hash_matches",
    "signature_candidates", "verify_signature", "normalize", "event_id",
    "status_info", "error_name", "type_name", "decode_flags",
    # storage and the hook
    "event_line", "to_json", "append_line", "event_path", "event_files", "read_events", "StateStore",
    "store_event", "run_hook",
    # reading and tracking
    "iter_stored", "stored_names", "read_plan", "resume_lines", "rotated_pieces", "file_identity",
    "current_state", "message_state", "phone_digits", "TrackingIndex", "open_index", "summarize",
    "message_status", "find_calls", "prune_files", "PRUNE_CHECKS",
    # reading side: the report
    "report_data", "render_report", "report_csp", "write_report", "Markup",
    # the relay (Standard Webhooks)
    "Relay", "relay_key", "new_relay_secret", "relay_signature", "relay_headers", "retry_after_seconds",
    "relay_delay", "relay_verdict", "relay_once", "relay_counts", "relay_undelivered_files",
    # gateways
    "Handler", "make_app", "load_app", "application", "run_cgi", "serve", "main",
]


########################################################################
# Constants and code tables (PROTOCOL.md)
########################################################################

#: status code -> (name, final). The same table serves HLR queries.
#: -3..4 are stated by SMSC; 20..25 come from third-party copies of its table;
#: 6 (e-mail messages) from one third-party copy.
STATUS_CODES = {
    -3: ("not found", True),
    -2: ("stopped", False),
    -1: ("waiting to be sent", False),
    0: ("transferred to the operator", False),
    1: ("delivered", True),
    2: ("read", True),
    3: ("expired", True),
    4: ("link clicked", True),
    6: ("blocked by spam filter (e-mail)", True),
    20: ("impossible to deliver", True),
    22: ("invalid number", True),
    23: ("prohibited", True),
    24: ("insufficient funds", True),
    25: ("unavailable number", True),
}

#: err code -> name. Up to 220 stated by SMSC; 237..255 from third-party copies.
#: 2..4 are e-mail messages' errors.
ERROR_CODES = {
    0: "no error",
    1: "subscriber does not exist",
    2: "mailbox full",
    3: "recipient's mail server not found",
    4: "mailbox blocked",
    6: "subscriber offline",
    11: "no SMS service",
    12: "phone error",
    13: "subscriber blocked",
    21: "service not supported",
    200: "virtual (test) sending",
    219: "SIM card replaced",
    220: "operator queue overflow",
    237: "no answer",
    238: "no template",
    239: "forbidden IP address",
    240: "busy",
    241: "conversion error",
    242: "answering machine",
    243: "no contract",
    244: "mailing prohibited",
    245: "status not received",
    246: "time restriction",
    247: "message limit exceeded",
    248: "no route",
    249: "wrong number format",
    250: "number forbidden by settings",
    251: "per-number limit exceeded",
    252: "number forbidden",
    253: "spam filter",
    254: "unregistered sender id",
    255: "rejected by operator",
}

#: message type (the `type` field, and bits 0-3 of `flag`) -> name.
MESSAGE_TYPES = {
    0: "SMS", 1: "Flash-SMS", 2: "Binary SMS", 3: "Wap-push", 4: "HLR",
    5: "Ping-SMS", 6: "MMS", 7: "Call", 8: "E-mail", 10: "Viber",
    12: "Social networks",
}

#: bits 10,9 of `flag` when bit 8 (template message) is set.
TEMPLATE_TYPES = ("service", "transactional", "authorization", "advertising")

#: Name for any code missing from the tables: SMSC's lists grow; never an error.
UNKNOWN = "unknown"

#: The Content-Type of SMSC's form callbacks (and of `send`'s).
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"

#: Accepted charset names (lower case) -> canonical name.
CHARSETS = {
    "utf-8": "utf-8", "utf8": "utf-8",
    "windows-1251": "windows-1251", "cp1251": "windows-1251",
    "win-1251": "windows-1251", "windows1251": "windows-1251",
    "koi8-r": "koi8-r", "koi8r": "koi8-r", "koi8_r": "koi8-r",
}

#: Canonical charset -> Python codec.
CODECS = {"utf-8": "utf-8", "windows-1251": "cp1251", "koi8-r": "koi8_r"}

#: Hash parameters SMSC may send, in the order they are looked for.
HASH_ALGORITHMS = ("md5", "sha1", "crc32")

#: kind -> the fields whose values, joined by ':' with the secret, are hashed.
SIGNED_FIELDS = {
    "status": ("id", "phone", "status"),
    "incoming": ("phone", "mes", "to"),
    "waitcall": ("phone", "ts"),
}

#: Encodings tried for `mes` after its bytes as received: SMSC hashes in its
#: transmission charset, which is undocumented for fmt=2/3 (PROTOCOL.md).
MES_HASH_ENCODINGS = ("utf-8", "cp1251", "koi8_r")

#: Event kinds, in the order files are listed.
KINDS = ("status", "incoming", "waitcall")

#: SMSC retries anything but 200/404 every 4 minutes (PROTOCOL.md).
RETRY_AFTER_SECONDS = 240

#: Request headers never copied into rejected.jsonl.
PRIVATE_HEADERS = ("HTTP_COOKIE", "HTTP_AUTHORIZATION", "HTTP_PROXY_AUTHORIZATION")

#: Written into data_dir so Apache refuses to serve it (2.4 and 2.2 syntax).
DENY_ALL_HTACCESS = (
    "# Written by smsc_handler: nothing in this folder is for the web.\n"
    "<IfModule mod_authz_core.c>\n"
    "    Require all denied\n"
    "</IfModule>\n"
    "<IfModule !mod_authz_core.c>\n"
    "    Order allow,deny\n"
    "    Deny from all\n"
    "</IfModule>\n"
)

#: Logger for expected refusals and operational warnings (never wsgi.errors).
LOGGER_NAME = "smsc_handler"


########################################################################
# Exceptions: each carries the HTTP status it becomes
########################################################################

class HandlerError(Exception):
    """A refusal or failure that becomes an HTTP answer."""

    #: HTTP status of the answer.
    status = 500
    #: Whether the refused request is kept in rejected.jsonl.
    keep_rejected = False

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class ConfigError(HandlerError):
    """The configuration is missing, unreadable or invalid (answers 503)."""
    status = 503


class BadRequest(HandlerError):
    """The request can't be parsed as a callback (answers 400)."""
    status = 400
    keep_rejected = True


class Forbidden(HandlerError):
    """The client address is not allowed (answers 403)."""
    status = 403


class SignatureError(HandlerError):
    """The control hash is wrong or missing (answers bad_signature_status)."""
    status = 403
    keep_rejected = True


class PayloadTooLarge(HandlerError):
    """The body is over max_body_bytes (answers 413)."""
    status = 413


class MethodNotAllowed(HandlerError):
    """Only GET, HEAD and POST are served (answers 405)."""
    status = 405


class StorageError(HandlerError):
    """The event could not be stored or recorded (answers 503: SMSC retries)."""
    status = 503


class HookError(HandlerError):
    """The hook command failed or timed out (answers 503 with on_failure=retry)."""
    status = 503


def _log():
    """Return the module's logger, importing logging only when needed."""
    import logging
    return logging.getLogger(LOGGER_NAME)


def _log_text(value) -> str:
    """Escape client-controlled text for a log line: no ESC, CR, LF, NUL or other control reaches it."""
    text = "" if value is None else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii")  # a backslash too: an escape can't be faked


########################################################################
# Configuration
########################################################################

#: Environment variable naming the config file.
CONFIG_ENV = "SMSC_HANDLER_CONFIG"

#: Folder of this module: the default config and data folder live here.
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _ascii_digits(text):
    """Whether text is 0-9 only: str.isdigit() also accepts '²' and '٣', which int() refuses or reads."""
    return text.isascii() and text.isdigit()


def _parse_bool(value):
    """Parse yes/no (also true/false, on/off, 1/0)."""
    lowered = value.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no")


def _choice(*allowed):
    """Return a parser that accepts one of `allowed` (case-insensitive)."""
    def parse(value):
        if value.lower() not in allowed:
            raise ValueError("expected " + " or ".join(allowed))
        return value.lower()
    return parse


def _int_range(low, high):
    """Return a parser for a whole number (ASCII digits) from low to high."""
    def parse(value):
        digits = value[1:] if value[:1] == "-" else value
        if not _ascii_digits(digits):
            raise ValueError("expected a whole number")
        if len(digits.lstrip("0")) > 18:  # int() of 4,301+ digits raises; of fewer, takes long
            raise ValueError("expected a number from %d to %d" % (low, high))
        number = int(value)
        if not low <= number <= high:
            raise ValueError("expected a number from %d to %d" % (low, high))
        return number
    return parse


def _parse_charset(value):
    """Parse a charset name to its canonical form."""
    try:
        return CHARSETS[value.lower()]
    except KeyError:
        raise ValueError("expected utf-8, windows-1251 or koi8-r") from None


#: Characters SMSC allows in a secret (PROTOCOL.md): a comma can separate two.
SECRET_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _parse_secret(value):
    """Parse one secret, or two while a rotation runs ("NEW, OLD"), into a tuple; never echoed in errors."""
    if not value:
        return ()
    secrets = tuple(part.strip() for part in value.split(","))
    if len(secrets) > 2:
        raise ValueError("at most two secrets (NEW, OLD) while a rotation runs")
    if not all(secrets):
        raise ValueError("expected a secret, or two separated by a comma (NEW, OLD)")
    if not all(set(secret) <= SECRET_CHARACTERS for secret in secrets):
        raise ValueError("SMSC allows only Latin letters, digits, '-' and '_' in the secret")
    return secrets


def _parse_timezone(value):
    """Return a fixed offset as its text ("+03:00"), or an IANA zone as a tzinfo."""
    sign = value[:1]
    if sign in ("+", "-") and len(value) == 6 and value[3] == ":":
        hours, minutes = value[1:3], value[4:6]
        if _ascii_digits(hours) and _ascii_digits(minutes) and int(hours) < 24 and int(minutes) < 60:
            return "+00:00" if value[1:] == "00:00" else value
        raise ValueError("expected an offset like +03:00")
    if value.upper() in ("UTC", "Z"):
        return "+00:00"
    try:
        import zoneinfo  # novermin (guarded: 3.8 gets a config error)
    except ImportError:
        raise ValueError(
            "IANA zone names need Python 3.9+; write an offset like +03:00") from None
    try:
        return zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise ValueError("expected an offset like +03:00 or an IANA zone like Europe/Moscow") from None


def _parse_networks(value):
    """Parse comma-separated addresses/CIDRs (ipaddress imported only when set)."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        return ()
    import ipaddress
    networks = []
    for item in items:
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError("expected comma-separated addresses or CIDRs like 192.0.2.0/24") from None
        mapped = getattr(network.network_address, "ipv4_mapped", None)
        if mapped is not None and network.prefixlen >= 96:
            # ::ffff:a.b.c.d/n: clients are compared in IPv4 form, so the network must be too.
            network = ipaddress.ip_network("%s/%d" % (mapped, network.prefixlen - 96), strict=False)
        networks.append(network)
    return tuple(networks)


def _parse_mode(value):
    """Parse an octal file mode (permission bits only, owner read+write)."""
    if not value or any(c not in "01234567" for c in value) or len(value) > 4:
        raise ValueError("expected an octal file mode like 0600")
    mode = int(value, 8)
    if mode > 0o777:
        raise ValueError("expected permission bits only (0600 to 0777): no setuid, setgid or sticky bit")
    if not mode & 0o600 == 0o600:
        raise ValueError("the handler must be able to read and write its files: use 0600 or more")
    return mode


def _parse_jsonl_path(value):
    """Check the JSON-lines path template: relative, under data_dir, with {kind}."""
    if "\x00" in value:
        raise ValueError("a path can't hold a NUL byte")
    probe = value.replace("{kind}", "").replace("{date}", "")
    if "{" in probe or "}" in probe:
        raise ValueError("only {kind} and {date} may be expanded")
    if not value or os.path.isabs(value) or ".." in value.replace("\\", "/").split("/"):
        raise ValueError("expected a relative path under data_dir, like {kind}.jsonl")
    if "{kind}" not in value:
        raise ValueError("the path must contain {kind}: each kind has its own file")
    return value


def _parse_command(value):
    """Split the hook command into argv like a shell line (never run by a shell)."""
    if not value:
        return ()
    if "\x00" in value:
        # exec() can't take a NUL: Popen would raise ValueError on every callback.
        raise ValueError("a command can't hold a NUL character")
    import shlex
    try:
        argv = tuple(shlex.split(value))
    except ValueError:
        raise ValueError("expected a command line with balanced quotes") from None
    # Never a shell: an unquoted ';' or '#' word is a comment or a command
    # separator that would reach the program as an argument. posix=False keeps quotes.
    if any(word[:1] in ("#", ";") for word in shlex.split(value, posix=False)[1:]):
        raise ValueError("a word starts with ';' or '#': quote it if you mean it")
    if argv and not argv[0]:
        raise ValueError("the program name is empty")
    return argv


def _parse_folder(value):
    """Check data_dir: a non-empty path."""
    if not value or "\x00" in value:
        raise ValueError("expected a folder, like data or /var/lib/smsc_handler")
    return value


def _parse_seconds(value):
    """Parse the hook timeout in seconds (ASCII digits and one optional dot)."""
    whole, _, fraction = value.partition(".")
    if not (whole or fraction) or not all(_ascii_digits(part) for part in (whole, fraction) if part):
        raise ValueError("expected a number of seconds")
    if len(whole.lstrip("0")) > 6 or len(fraction) > 20:  # no float() of a 10,000-digit text
        raise ValueError("expected seconds from 0.1 to 3600")
    seconds = float(value)
    if not 0.1 <= seconds <= 3600:
        raise ValueError("expected seconds from 0.1 to 3600")
    return seconds


def _parse_relay_url(value):
    """Check the relay URL: empty (off), or http(s)://host[:port]/path with no credentials."""
    if not value:
        return ""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError("expected an http:// or https:// URL, like https://app.example/smsc-events")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value) or "#" in value:
        raise ValueError("a URL holds no spaces, control characters or #fragment")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in authority:
        raise ValueError("put no credentials in the URL: the signature tells your app the event is ours")
    host, port = authority, ""
    if ":" in authority.rsplit("]", 1)[-1]:  # a port, not an IPv6 literal's colons
        host, _, port = authority.rpartition(":")
        if not (_ascii_digits(port) and 0 < int(port) < 65536):
            raise ValueError("expected a port from 1 to 65535 after the host")
    if not host or host == "[]":
        raise ValueError("expected a host after %s://" % scheme.lower())
    return scheme.lower() + "://" + rest


#: Bytes of key a relay secret must hold (Standard Webhooks: 24 to 64).
RELAY_KEY_BYTES = (24, 64)


def relay_key(secret: str) -> bytes:
    """Decode a ``whsec_`` secret to its key bytes; ValueError (never echoing it) when malformed."""
    import binascii
    if not secret.startswith("whsec_"):
        raise ValueError("expected whsec_ followed by base64 (`smsc_handler.py relay-secret` prints one)")
    text = secret[len("whsec_"):].rstrip("=")
    if not set(text) <= _BASE64_ALPHABET or len(text) % 4 == 1:
        raise ValueError("the part after whsec_ is not base64")
    key = binascii.a2b_base64(text + "=" * (-len(text) % 4))
    low, high = RELAY_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError("the key holds %d bytes; Standard Webhooks needs %d to %d (`smsc_handler.py "
                         "relay-secret` prints a new one)" % (len(key), low, high))
    return key


#: The characters of base64 (RFC 4648 section 4), padding aside.
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _parse_relay_secret(value):
    """Check a relay secret (whsec_ + base64 of 24 to 64 bytes); empty = none."""
    if value:
        relay_key(value)
    return value


#: [section] -> key -> (default text, parser). config.ini and the README say more.
CONFIG_SCHEMA = {
    "handler": {
        #: folder for events and state, relative to the config file
        "data_dir": ("data", _parse_folder),
        #: the string after md5=/sha1=/crc32= in SMSC's handler URL ("NEW, OLD" while a
        #: rotation runs); empty = no check. Config.secret is the first, Config.secrets all.
        "secret": ("", _parse_secret),
        #: md5 | sha1 | crc32 | auto (md5 or sha1: crc32 only when named)
        "hash_alg": ("auto", _choice("auto", "md5", "sha1", "crc32")),
        #: auto (needed when a secret is set) | yes | no (a missing hash is let in)
        "require_signature": ("auto", _choice("auto", "yes", "no")),
        #: charset when the request names none: SMSC's default
        "default_charset": ("windows-1251", _parse_charset),
        #: zone of the status `time` field: ±HH:MM or an IANA name
        "timezone": ("+03:00", _parse_timezone),
        #: bytes; larger bodies get 413
        "max_body_bytes": ("65536", _int_range(256, 16 * 1024 * 1024)),
        #: addresses/CIDRs allowed to call; empty = anyone
        "allowed_ips": ("", _parse_networks),
        #: CIDRs whose X-Forwarded-For is believed
        "trusted_proxies": ("", _parse_networks),
        #: 403 (SMSC retries ~3 h) or 404 (SMSC gives up)
        "bad_signature_status": ("403", lambda v: int(_choice("403", "404")(v))),
        #: octal mode of every file created
        "file_mode": ("0600", _parse_mode),
    },
    "jsonl": {
        #: write events as JSON lines
        "enabled": ("yes", _parse_bool),
        #: under data_dir; {kind} and {date} (UTC) expand
        "path": ("{kind}.jsonl", _parse_jsonl_path),
        #: fdatasync each line before answering 200
        "fsync": ("yes", _parse_bool),
    },
    "dedupe": {
        #: remember event ids in data_dir/state.sqlite3
        "enabled": ("yes", _parse_bool),
        #: days before ids (and hook successes) are forgotten
        "keep_days": ("7", _int_range(1, 36500)),
    },
    "hook": {
        #: argv run for each new event, the event JSON on stdin; empty = none
        "command": ("", _parse_command),
        #: seconds; then the hook's process group is killed
        "timeout": ("10", _parse_seconds),
        #: retry (answer 503) | ignore (log, answer 200)
        "on_failure": ("retry", _choice("retry", "ignore")),
        #: inline (in the request) | forward (the `forward` verb runs it)
        "run": ("inline", _choice("inline", "forward")),
    },
    "rejected": {
        #: keep refused requests in data_dir/rejected.jsonl
        "enabled": ("yes", _parse_bool),
        #: bytes; rejected.jsonl stops growing past this
        "max_bytes": ("10485760", _int_range(0, 2 ** 40)),
    },
    "relay": {
        #: POST each event as a Standard Webhook here (the `forward` verb does); empty = off
        "url": ("", _parse_relay_url),
        #: whsec_ + base64 of 24 to 64 bytes: the HMAC-SHA256 key (`relay-secret` prints one)
        "secret": ("", _parse_relay_secret),
        #: seconds to wait for the app's answer (then retried later)
        "timeout": ("10", _parse_seconds),
    },
}


class Config:
    """Validated settings, frozen after load.

    Attributes are the keys of [handler] as they are (``data_dir``, ``secret``…)
    and the keys of the other sections prefixed by the section
    (``jsonl_path``, ``dedupe_enabled``, ``hook_command``…), plus ``source``
    (the file read, or None), ``base_dir`` (its folder: relative paths and the
    hook's working folder) and ``timezone_name`` (the text as written).
    """

    def __init__(self, **values):
        secret = values.get("secret")
        if isinstance(secret, tuple):  # as _parse_secret gives it: all in `secrets`, the first in `secret`
            values["secrets"], values["secret"] = secret, secret[0] if secret else ""
        elif "secrets" not in values and secret is not None:
            values["secrets"] = (secret,) if secret else ()
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("Config is frozen; load another one")

    def __repr__(self):
        shown = {k: v for k, v in vars(self).items() if k not in ("secret", "secrets")}
        shown["secret"] = "***" if self.secret else ""
        shown["secrets"] = ("***",) * len(getattr(self, "secrets", ()))
        if getattr(self, "relay_secret", ""):
            shown["relay_secret"] = "***"
        return "Config(%r)" % shown

    @property
    def hook_inline(self) -> bool:
        """Whether the web request itself runs the hook."""
        return bool(self.hook_command) and self.hook_run == "inline"


def _has_inline_comment(text):
    """Whether a config value goes on into a ';' or '#' comment after a blank."""
    return any(mark in text for mark in (" ;", " #", "\t;", "\t#"))


def _attribute(section, key):
    """Return the Config attribute name of [section] key."""
    return key if section == "handler" else section + "_" + key


def find_config(cli_path: str | None = None, environ=None) -> str | None:
    """Return the config file to read: --config, $SMSC_HANDLER_CONFIG, or beside the module.

    For the installed command (the module in site-packages) the last place is
    config.ini in the current folder: nothing of the user's lives in site-packages.
    """
    return config_origin(cli_path, environ)[0]


def _installed() -> bool:
    """Whether this module was installed by pip (lives in site-packages), not dropped beside its files."""
    return os.path.basename(MODULE_DIR) in ("site-packages", "dist-packages")


def _default_base() -> str:
    """Return the folder relative paths start from when no config file is read."""
    return os.getcwd() if _installed() else MODULE_DIR


def config_origin(cli_path: str | None = None, environ=None):
    """Return (config file or None, how it was found), as find_config looks."""
    environ = os.environ if environ is None else environ
    for named, origin in ((cli_path, "--config"), (environ.get(CONFIG_ENV), CONFIG_ENV)):
        if named:
            if not os.path.isfile(named):
                raise ConfigError("%s names %s, which is not a file. Fix: create it or "
                                  "point %s at the right path" % (origin, named, origin))
            return named, "named by " + origin
    if _installed():
        here = os.path.join(os.getcwd(), "config.ini")
        if os.path.isfile(here):
            return here, "config.ini in the current folder"
        return None, "no config.ini in the current folder %s: built-in defaults" % os.getcwd()
    beside = os.path.join(MODULE_DIR, "config.ini")
    if os.path.isfile(beside):
        return beside, "config.ini beside smsc_handler.py"
    return None, "no config.ini beside %s: built-in defaults" % os.path.join(MODULE_DIR, "smsc_handler.py")


def _describe_parse_error(exc) -> str:
    """Say where configparser failed without quoting the line: it may hold the secret."""
    import configparser
    if isinstance(exc, configparser.DuplicateOptionError):
        return "[%s] %s is set twice (line %s)" % (exc.section, exc.option, exc.lineno)
    if isinstance(exc, configparser.DuplicateSectionError):
        return "section [%s] appears twice (line %s)" % (exc.section, exc.lineno)
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return "line %s comes before any [section] header" % exc.lineno
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _line in exc.errors)
        return "line %s is not 'key = value'" % lines
    return type(exc).__name__


def _parse_with_configparser(path) -> dict:
    """Return {section: {key: value}} of a config file as configparser reads it (the reference)."""
    import configparser
    # A [DEFAULT] section would silently apply to every section: treat it as unknown.
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\x00no default section",
        comment_prefixes=("#", ";"), inline_comment_prefixes=None, strict=True)
    try:
        with open(path, encoding="utf-8-sig") as file:  # Notepad writes a BOM
            parser.read_file(file)
    except OSError as exc:
        raise ConfigError("%s: cannot read (%s). Fix: check the path and its permissions"
                          % (path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text. Fix: save it as UTF-8" % path) from None
    except configparser.Error as exc:
        raise ConfigError("%s: %s. Fix: one key = value per line, each key once, under a "
                          "[section] header" % (path, _describe_parse_error(exc))) from None
    return {section: dict(parser.items(section)) for section in parser.sections()}


def _parse_plain_ini(data: bytes, schema=None):
    """Return {section: {key: value}} as _parse_with_configparser would, or None: ask it.

    configparser imports ``re`` and ``enum``: most of a CGI request's own cost.
    This reads the plain shape (``[section]`` headers and ``key = value`` or
    ``key: value`` lines of the schema, each once, starting in the first
    column; blank lines; whole-line ``#``/``;`` comments; a BOM; CRLF) exactly
    as configparser does, and gives up (None) on everything else — indented
    or continuation lines, unknown or repeated names, stray text, bad UTF-8 —
    so configparser reads those, and words any error, as before.
    """
    schema = CONFIG_SCHEMA if schema is None else schema
    if data[:3] == b"\xef\xbb\xbf":  # Notepad writes a BOM (utf-8-sig's codec: one more import)
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    sections = {}
    keys = known = None
    # Universal newlines, as open() reads the file for configparser; str.splitlines()
    # would also split at \v, \f, \x1c..\x1e, \x85, \u2028, \u2029, which it does not.
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue  # blank, or a comment (indented or not)
        if line[0].isspace():
            return None  # a continuation line, or an indented header or key
        if stripped[0] == "[":
            name = stripped[1:-1]
            if stripped[-1] != "]" or name not in schema or name in sections:
                return None
            keys = sections[name] = {}
            known = schema[name]
            continue
        equals, colon = stripped.find("="), stripped.find(":")
        at = colon if equals < 0 or 0 <= colon < equals else equals
        key = stripped[:at].rstrip().lower()  # configparser's optionxform
        if keys is None or at < 0 or key not in known or key in keys:
            return None
        keys[key] = stripped[at + 1:].strip()
    return sections


def _read_config_file(path) -> dict:
    """Return {section: {key: value}} of a config file (ConfigError if unreadable or malformed)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        data = None  # configparser's path words the error
    sections = None if data is None else _parse_plain_ini(data)
    return _parse_with_configparser(path) if sections is None else sections


def load_config(path: str | None = None) -> Config:
    """Read and validate a config file (None: built-in defaults)."""
    where = "built-in defaults"
    base = _default_base()
    sections = {}
    if path is not None:
        where = path
        base = os.path.dirname(os.path.abspath(path))
        sections = _read_config_file(path)
    for section in sections:
        if section not in CONFIG_SCHEMA:
            raise ConfigError("%s: unknown section [%s]. Fix: use one of %s"
                              % (where, section, ", ".join("[%s]" % s for s in CONFIG_SCHEMA)))
        for key in sections[section]:
            if key not in CONFIG_SCHEMA[section]:
                raise ConfigError("%s: unknown key [%s] %s. Fix: the keys of [%s] are %s"
                                  % (where, section, key, section, ", ".join(CONFIG_SCHEMA[section])))
    values = {"source": path, "base_dir": base}
    for section, keys in CONFIG_SCHEMA.items():
        for key, (default, parse) in keys.items():
            text = sections.get(section, {}).get(key, default).strip()
            try:
                if _has_inline_comment(text):
                    # configparser keeps "data  # mine" whole: it would name a folder "data  # mine"
                    raise ValueError("comments must stand on their own lines")
                values[_attribute(section, key)] = parse(text)
            except ValueError as exc:
                shown = "(hidden)" if key == "secret" else repr(text)
                raise ConfigError("%s: [%s] %s = %s: %s" % (where, section, key, shown, exc)) from None
            if key == "timezone":
                values["timezone_name"] = text
    values["data_dir"] = os.path.normpath(os.path.join(base, os.path.expanduser(values["data_dir"])))
    command = values["hook_command"]
    if command and os.sep in command[0] and not os.path.isabs(os.path.expanduser(command[0])):
        # Relative paths are relative to the config file, like data_dir (SPEC §2).
        values["hook_command"] = (os.path.normpath(os.path.join(base, command[0])),) + command[1:]
    config = Config(**values)
    if config.require_signature == "yes" and not config.secret:
        raise ConfigError("%s: [handler] require_signature = yes needs a secret. Fix: set "
                          "[handler] secret to the string written after md5=/sha1=/crc32= in "
                          "SMSC's handler URL, or set require_signature = auto" % where)
    if not config.jsonl_enabled and not config.hook_command:
        raise ConfigError("%s: [jsonl] enabled = no with no [hook] command: nothing would store "
                          "the event. Fix: enable [jsonl] or set [hook] command" % where)
    if config.dedupe_enabled or config.hook_command:
        try:
            _sqlite_module()  # the state store: needed by the first request anyway
        except ImportError:
            raise ConfigError("%s: this Python has no sqlite3 module, which [dedupe] and [hook] need "
                              "for the state store. Fix: set [dedupe] enabled = no and leave [hook] "
                              "command empty, or use a Python built with sqlite3" % where) from None
    if not config.jsonl_enabled and config.hook_command and config.hook_on_failure == "ignore":
        raise ConfigError("%s: [jsonl] enabled = no with [hook] on_failure = ignore: a failed hook "
                          "would answer 200 with the event in no file. Fix: enable [jsonl] or set "
                          "on_failure = retry" % where)
    if not config.jsonl_enabled and config.hook_run == "forward":
        raise ConfigError("%s: [hook] run = forward reads the JSON-lines files, but [jsonl] "
                          "enabled = no. Fix: enable [jsonl] or set run = inline" % where)
    _check_relay_config(config, where)
    return config


def _check_relay_config(config, where):
    """Refuse a [relay] that could not work: no secret, no JSON lines to read, no SQLite."""
    if not config.relay_url:
        return
    if not config.relay_secret:
        raise ConfigError("%s: [relay] url is set but [relay] secret is empty: the app could not tell "
                          "our events from forged ones. Fix: set secret to the output of "
                          "`smsc_handler.py relay-secret` (and give the same to the app)" % where)
    if not config.jsonl_enabled:
        raise ConfigError("%s: [relay] reads the JSON-lines files, but [jsonl] enabled = no. Fix: "
                          "enable [jsonl] or leave [relay] url empty" % where)
    if _one_request_per_process:
        return  # a CGI request never relays: no sqlite3 to pay for (forward and check ask)
    try:
        import sqlite3  # noqa: F401  (relay positions and outcomes live in the state store)
    except ImportError:
        raise ConfigError("%s: this Python has no sqlite3 module, which [relay] needs for its "
                          "positions. Fix: use a Python built with sqlite3" % where) from None


########################################################################
# Decoding a request (pure: bytes in, values out)
########################################################################

class Request:
    """A decoded callback: parameters as text and as received bytes."""

    __slots__ = ("params", "_raw", "format", "charset", "lossy")

    def __init__(self, params, raw, format, charset, lossy):
        #: name -> decoded text, query and body merged (the body wins).
        self.params = params
        self._raw = raw  # None: every value is ASCII, its bytes are its text's
        #: "form", "json" or "xml".
        self.format = format
        #: canonical charset the values were decoded with.
        self.charset = charset
        #: True when some bytes did not decode and were replaced.
        self.lossy = lossy

    @property
    def raw(self):
        """name -> the value's bytes as received (percent-decoded for forms)."""
        if self._raw is None:
            self._raw = {name: value.encode("ascii") for name, value in self.params.items()}
        return self._raw

    def raw_values(self, names):
        """Return {name: bytes as received} holding at least these names (those present).

        Cheaper than `raw` for an ASCII request: only the named values are encoded.
        """
        if self._raw is not None:
            return self._raw
        params, raw = self.params, {}
        for name in names:
            if name in params:
                raw[name] = params[name].encode("ascii")
        return raw

    def __repr__(self):
        return "Request(%s, %s, %r%s)" % (self.format, self.charset, self.params,
                                          ", lossy" if self.lossy else "")


def unquote_form_bytes(data: bytes) -> bytes:
    """Percent-decode one form-urlencoded name or value to bytes ('+' is a space)."""
    data = data.replace(b"+", b" ")
    if b"%" not in data:
        return data
    pieces = data.split(b"%")
    out = [pieces[0]]
    append = out.append
    for piece in pieces[1:]:
        byte = _HEX_BYTES.get(piece[:2]) or _hex_byte(piece[:2])
        if byte:
            append(byte)
            append(piece[2:])
        else:  # not an escape: the '%' stays
            append(b"%")
            append(piece)
    return b"".join(out)


def _hex_byte(pair: bytes) -> bytes:
    """Return the byte two hex digits stand for (and remember it), or b"" if they aren't."""
    if len(pair) != 2 or pair[0] not in _HEX_DIGITS or pair[1] not in _HEX_DIGITS:
        return b""
    byte = _HEX_BYTES[pair] = bytes((int(pair, 16),))
    return byte


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")

#: Two hex digits -> their byte, filled as met (at most 22 * 22 entries).
_HEX_BYTES = {}


def parse_form(data: bytes) -> list:
    """Split a form-urlencoded body or query into (name, value) byte pairs."""
    if not data:
        return []
    if _encodes_separators(data):
        return [(unquote_form_bytes(name), unquote_form_bytes(value))
                for name, _, value in (field.partition(b"=") for field in data.split(b"&") if field)]
    if b"%" in data or b"+" in data:
        data = unquote_form_bytes(data)
    return [field.partition(b"=")[::2] for field in data.split(b"&") if field]


def _encodes_separators(data: bytes) -> bool:
    """Whether a form percent-encodes '&' or '=' (%26, %3D, %3d): only they decode to a separator.

    Without them, splitting the decoded form gives the same pairs as decoding
    each name and value: one pass over the body instead of one per field.
    """
    return b"%26" in data or b"%3D" in data or b"%3d" in data


def canonical_charset(name: str) -> str:
    """Map a charset name to utf-8, windows-1251 or koi8-r; BadRequest otherwise."""
    try:
        return CHARSETS.get(name) or CHARSETS[name.strip().strip('"').lower()]
    except KeyError:
        raise BadRequest("unknown charset name") from None


def content_type_charset(content_type: str) -> str | None:
    """Return the charset= parameter of a Content-Type header, if any."""
    if ";" not in content_type:
        return None  # the usual: no parameters
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip()
    return None


def _sniff(body: bytes, content_type: str) -> str:
    """Tell the body format by its first non-blank byte, then by Content-Type."""
    head = body.lstrip(b" \t\r\n\xef\xbb\xbf")[:1]
    if head in (b"{", b"["):
        return "json"
    if head == b"<":
        return "xml"
    if content_type == FORM_MEDIA_TYPE:
        return "form"  # the usual: nothing more to look at
    media = content_type.split(";")[0].strip().lower()
    if head and (media.endswith("/json") or media.endswith("+json")):
        return "json"
    if head and (media.endswith("/xml") or media.endswith("+xml")):
        return "xml"
    return "form"


def _decode_text(data: bytes, charset: str):
    """Decode bytes with a canonical charset; return (text, lossy)."""
    if data.isascii():  # the common case, the same in every charset, and faster
        return data.decode("ascii"), False
    codec = CODECS[charset]
    try:
        return data.decode(codec), False
    except UnicodeDecodeError:
        return data.decode(codec, "replace"), True


def _decode_form(body, query, content_type, default_charset):
    """Decode a form-urlencoded body merged over the query string (the body wins)."""
    data = query + b"&" + body if query else body
    if _encodes_separators(data):
        return _decode_form_pairs(parse_form(data), content_type, default_charset)
    plain = unquote_form_bytes(data)
    if plain.isascii():
        # The usual callback: ASCII reads the same in every charset, so the
        # text is split first and the charset parameter looked up after.
        fields = plain.decode("ascii").split("&")
        params = {name: value for name, eq, value in map(str.partition, fields, ["="] * len(fields))
                  if name or eq}
        charset = canonical_charset(params.get("charset") or content_type_charset(content_type)
                                    or default_charset)
        return Request(params, None, "form", charset, False)
    byte_fields = [field.partition(b"=") for field in plain.split(b"&") if field]
    named = _named_charset((name, value) for name, _, value in byte_fields) if b"charset" in plain else None
    charset = canonical_charset(named or content_type_charset(content_type) or default_charset)
    # Every charset here decodes '&' and '=' as themselves and never inside a
    # multibyte character, so the text splits exactly as the bytes did.
    text, lossy = _decode_text(plain, charset)
    text_fields = [field.partition("=") for field in text.split("&") if field]
    params = {name: value for name, _, value in text_fields}
    raw = {text_field[0]: byte_field[2] for text_field, byte_field in zip(text_fields, byte_fields)}
    return Request(params, raw, "form", charset, lossy)


def _named_charset(pairs):
    """Return the value of the last `charset` among (name, value) byte pairs, as text; None if none."""
    named = None
    for name, value in pairs:  # the last one (the body's, after the query's) wins
        if name == b"charset":
            named = value.decode("latin-1")
    return named


def _decode_form_pairs(pairs, content_type, default_charset):
    """Decode (name, value) byte pairs one by one: a form that percent-encodes '&' or '='."""
    charset = canonical_charset(_named_charset(pairs) or content_type_charset(content_type) or default_charset)
    params, raw, lossy = {}, {}, False
    for name, value in pairs:
        key, bad_key = _decode_text(name, charset)
        text, bad_value = _decode_text(value, charset)
        lossy = lossy or bad_key or bad_value
        params[key] = text
        raw[key] = value
    return Request(params, raw, "form", charset, lossy)


def _flatten(tree):
    """Turn a parsed JSON/XML object into {name: text}, allowing one wrapping level."""
    if not isinstance(tree, dict):
        raise BadRequest("the body must be an object of parameters")
    if len(tree) == 1:
        (only,) = tree.values()
        if isinstance(only, dict):
            tree = only
    params = {}
    for name, value in tree.items():
        if isinstance(value, (dict, list)):
            raise BadRequest("parameter values must be scalars (nested too deep)")
        if value is None:
            continue
        if value is True or value is False:
            value = "true" if value else "false"
        params[name] = value
    return params


def _parse_json(text):
    """Parse a JSON body into flat text parameters (numbers keep their literal text)."""
    try:
        import json
        tree = json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
    except RecursionError:
        raise BadRequest("JSON nested too deep") from None
    except ValueError:
        raise BadRequest("malformed JSON") from None
    return _flatten(tree)


class _XMLRefused(Exception):
    """Raised inside expat handlers to stop a hostile or too-deep document."""
    pass


def _parse_xml(text):
    """Parse <root><name>value</name>…</root> (one wrapping level) with expat, no DTD."""
    from xml.parsers import expat

    def refuse(*_args):
        raise _XMLRefused("DTD or entity declaration")

    # Depth 1 = root, 2 = a parameter or the wrapper, 3 = a parameter inside the wrapper.
    root = {}
    stack = []  # (name, children dict or None, text pieces)

    def start(name, _attrs):
        if len(stack) >= 3:
            raise _XMLRefused("nested too deep")
        stack.append((name, {}, []))

    def end(_name):
        name, children, pieces = stack.pop()
        value = children if children else "".join(pieces)
        if not stack:
            root.update(children)
        else:
            stack[-1][1][name] = value

    def data(chunk):
        if stack:
            stack[-1][2].append(chunk)

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = data
    try:
        parser.Parse(text, True)
    except _XMLRefused as exc:
        raise BadRequest("XML refused: %s" % exc) from None
    except expat.ExpatError:
        raise BadRequest("malformed XML") from None
    # An element with children became a dict: allowed only as the single wrapper.
    return _flatten(root)


def _xml_declared_charset(body):
    """Return the known charset an XML declaration names (encoding="..."), else None."""
    head = body[:256].decode("latin-1").lstrip("\ufeff \t\r\n")
    if not head.startswith("<?xml"):
        return None
    declaration = head[:head.find("?>") + 1 or None]
    _, found, rest = declaration.partition("encoding=")
    if not found or rest[:1] not in ("'", '"'):
        return None
    return CHARSETS.get(rest[1:].partition(rest[0])[0].strip().lower())


def _decode_structured(fmt, body, query, content_type, default_charset):
    """Decode a JSON or XML body: strict UTF-8 first, else the resolved charset."""
    parse = _parse_json if fmt == "json" else _parse_xml
    named = _named_charset(query)
    declared = content_type_charset(content_type) or (_xml_declared_charset(body) if fmt == "xml" else None)
    lossy = False
    try:
        text = body.decode("utf-8")
        params = parse(text[1:] if text.startswith("\ufeff") else text)
        strict_utf8 = True
    except UnicodeDecodeError:
        # Latin-1 never fails and keeps ASCII: enough to find the charset parameter.
        params = parse(body.decode("latin-1"))
        strict_utf8 = False
    # Resolved (and validated) even when UTF-8 decoding worked: an unknown name is a 400.
    resolved = canonical_charset(params.get("charset") or named or declared or default_charset)
    if strict_utf8:
        # Pure ASCII decodes the same in every charset: report the one the request named.
        charset = resolved if body.isascii() else "utf-8"
    else:
        charset = resolved
        text, lossy = _decode_text(body, charset)
        params = parse(text)
    if not query and all(map(str.isascii, params)) and all(map(str.isascii, params.values())):
        return Request(params, None, fmt, charset, lossy)  # raw: the ASCII of each value
    codec = CODECS[charset]
    merged, raw = {}, {}
    for name, value in query:
        key, bad_key = _decode_text(name, charset)
        merged[key], bad_value = _decode_text(value, charset)
        raw[key] = value
        lossy = lossy or bad_key or bad_value
    for name, value in params.items():
        if not (name + value).isascii():
            try:
                (name + value).encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate (JSON "\ud800") is no text: replace it, like undecodable bytes.
                name, value = _unsurrogate(name), _unsurrogate(value)
                lossy = True
        merged[name] = value
        raw[name] = value.encode(codec, "replace")
    return Request(merged, raw, fmt, charset, lossy)


def _unsurrogate(text):
    """Replace lone surrogates with U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def decode_request(body: bytes, query: bytes | str = b"", content_type: str = "",
                   default_charset: str = "windows-1251") -> Request:
    """Decode a callback's query string and body into parameters.

    The body format is sniffed (form, JSON or XML); the charset is the
    ``charset`` parameter, else Content-Type's, else ``default_charset``.
    Raises BadRequest for anything that can't be read as parameters.
    """
    if isinstance(query, str):
        query = query.encode("latin-1", "replace")
    fmt = _sniff(body, content_type)
    if fmt == "form":
        return _decode_form(body, query, content_type, default_charset)
    return _decode_structured(fmt, body, parse_form(query), content_type, default_charset)


def classify(params: dict) -> str:
    """Tell the kind of callback: incoming (has mes), waitcall, or status."""
    if "mes" in params:
        return "incoming"
    if "waitcall" in params:
        return "waitcall"
    return "status"


########################################################################
# The control hash (pure)
########################################################################

def _hexdigest(alg: str, data: bytes, size: int = 0) -> str:
    """Hash with CPython's built-in md5/sha1/blake2 when present.

    hashlib loads OpenSSL, about 3 ms of every CGI request; the built-in
    modules don't. Builds without them (FIPS) fall back to hashlib.
    """
    new = _HASHERS.get(alg) or _hasher(alg)
    return (new(data, digest_size=size) if size else new(data)).hexdigest()


#: algorithm -> its constructor, found on first use.
_HASHERS = {}


def _hasher(alg):
    """Find the constructor for md5, sha1 or blake2b and remember it."""
    try:
        if alg == "md5":
            from _md5 import md5 as new
        elif alg == "sha1":
            from _sha1 import sha1 as new
        else:
            from _blake2 import blake2b as new
    except ImportError:
        import hashlib
        new = getattr(hashlib, alg)
    _HASHERS[alg] = new
    return new


def _compare_digest(given: bytes, expected: bytes) -> bool:
    """Compare in constant time (hmac.compare_digest without importing hashlib)."""
    global _constant_time
    if _constant_time is None:
        try:
            import _operator
            _constant_time = (_operator, "_compare_digest")
        except ImportError:
            import hmac
            _constant_time = (hmac, "compare_digest")
    module, name = _constant_time
    return getattr(module, name)(given, expected)


#: (module, name) of the constant-time comparison, found on first use.
_constant_time = None


def control_hash(alg: str, data: bytes) -> str:
    """Return SMSC's control hash of `data`: md5/sha1 lowercase hex, crc32 unsigned decimal."""
    if alg == "crc32":
        import binascii
        return str(binascii.crc32(data) & 0xFFFFFFFF)
    return _hexdigest(alg, data)


def _crc32_forms(data: bytes):
    """Return the printed forms of a crc32 SMSC may send: unsigned, signed, hex."""
    import binascii
    crc = binascii.crc32(data) & 0xFFFFFFFF
    signed = crc - 0x100000000 if crc >= 0x80000000 else crc
    return (str(crc), str(signed), "%08x" % crc)


def hash_matches(alg: str, received: str, data: bytes) -> bool:
    """Compare a received hash with the hash of `data`, in constant time.

    md5/sha1 compare case-insensitively; crc32 accepts unsigned decimal,
    signed 32-bit decimal and 8-digit hex, since SMSC doesn't document its form.
    """
    given = received.strip().lower().encode("ascii", "replace")
    forms = _crc32_forms(data) if alg == "crc32" else (_hexdigest(alg, data),)
    matched = False
    for form in forms:
        matched |= _compare_digest(given, form.encode("ascii"))
    return matched


def signature_candidates(kind: str, params: dict, raw: dict, secret: str) -> list:
    """Return the strings SMSC may have hashed, as (label, bytes), most likely first.

    Values are hashed as received; `mes` is also tried re-encoded in utf-8,
    windows-1251 and koi8-r, since the transmission charset of the hash is
    not documented.
    """
    fields = SIGNED_FIELDS[kind]
    tail = secret.encode("ascii")
    received = [raw.get(name, b"") for name in fields]
    if kind != "incoming" or "mes" not in params:
        received.append(tail)
        return [("as received", b":".join(received))]
    variants = [("as received", received)]
    position = fields.index("mes")
    seen = {received[position]}
    for codec in MES_HASH_ENCODINGS:
        try:
            encoded = params["mes"].encode(codec)
        except UnicodeEncodeError:
            continue
        if encoded not in seen:
            seen.add(encoded)
            values = list(received)
            values[position] = encoded
            variants.append(("mes in " + codec, values))
    return [(label, b":".join(values + [tail])) for label, values in variants]


def sent_hash_alg(params: dict) -> str | None:
    """Return the hash parameter a callback carries (md5, sha1, crc32: the first found), or None."""
    for alg in HASH_ALGORITHMS:
        if alg in params:
            return alg
    return None


#: [handler] hash_alg -> the hash parameters accepted: crc32 only when named,
#: since one seen value lets anyone forge others offline (CRC is affine).
ACCEPTED_HASH_ALGS = {"auto": ("md5", "sha1"), "md5": ("md5",), "sha1": ("sha1",), "crc32": ("crc32",)}

#: [handler] hash_alg -> the hash parameters refused (the others).
_REFUSED_HASH_ALGS = {name: tuple(alg for alg in HASH_ALGORITHMS if alg not in accepted)
                      for name, accepted in ACCEPTED_HASH_ALGS.items()}


def _is_phone(text):
    """Whether text is a phone number as SMSC sends it: an optional '+' and 3+ ASCII digits."""
    digits = text[1:] if text[:1] == "+" else text
    return len(digits) >= 3 and digits.isdigit() and digits.isascii()


def _is_email(text):
    """Whether text looks like an e-mail address (SMSC's e-mail messages): one '@', no ':' or blank."""
    local, at, domain = text.partition("@")
    return (bool(at and local and domain) and "@" not in domain and ":" not in text
            and text.isprintable() and not any(c.isspace() for c in text))


def _is_status_code(text):
    """Whether text is a status code: an integer of at most four digits, a minus allowed."""
    digits = text[1:] if text[:1] == "-" else text
    return 1 <= len(digits) <= 4 and _ascii_digits(digits)


def signed_shape_error(kind: str, params: dict) -> str | None:
    """Say which signed field lacks its kind's shape (SPEC 5a), or None when all have it.

    SMSC's hashed strings can be split differently (id:phone:status reads as
    phone:mes:to with phone=id, mes=phone, to=status): a hash counts only for
    fields that have their kind's shape, so it can't be reused for another kind.
    """
    phone = params.get("phone", "")
    if not (_is_phone(phone) or _is_email(phone)):
        return "phone is neither a phone number nor an e-mail address"
    if kind == "status":
        if not _is_status_code(params.get("status", "")):
            return "status is not an integer of at most four digits"
    elif kind == "incoming":
        if not _is_phone(params.get("to", "")):
            return "to is not a phone number"
    elif params.get("waitcall") != "1" or not _ascii_digits(params.get("ts", "")):
        return "waitcall is not 1 or ts is not an integer"
    return None


def verify_signature(kind: str, request: Request, secret, require: str = "auto", hash_alg: str = "auto"):
    """Check the control hash; return the event's `signature` value.

    `secret` is one secret or a sequence of them (two while a rotation runs).
    Returns None when no hash was sent (and that is allowed), or
    {"alg": ..., "valid": True, "key": index of the secret that matched} (with
    no secret: "valid" and "key" None). Raises SignatureError when the hash is
    wrong, of another algorithm than `hash_alg` accepts, over fields without
    their kind's shape, or missing while required.
    """
    params = request.params
    alg = sent_hash_alg(params)
    secrets = (secret,) if isinstance(secret, str) else secret or ()
    if not any(secrets):
        secrets = ()
    if alg is None:
        if secrets and require != "no":
            raise SignatureError("control hash missing (md5/sha1/crc32)")
        return None
    if not secrets:
        return {"alg": alg, "valid": None, "key": None}
    for refused in _REFUSED_HASH_ALGS[hash_alg]:
        if refused in params:
            raise SignatureError("a %s hash is refused: [handler] hash_alg = %s accepts %s"
                                 % (refused, hash_alg, " or ".join(ACCEPTED_HASH_ALGS[hash_alg])))
    shape = signed_shape_error(kind, params)
    if shape is not None:
        raise SignatureError("signed fields lack the %s shape: %s" % (kind, shape))
    raw = request.raw_values(SIGNED_FIELDS[kind])
    for key, one in enumerate(secrets):
        if not one:
            continue  # an empty secret verifies nothing
        for _label, data in signature_candidates(kind, params, raw, one):
            if hash_matches(alg, params[alg], data):
                return {"alg": alg, "valid": True, "key": key}
    raise SignatureError("control hash does not match (%s)" % alg)


########################################################################
# Events (pure: parameters in, normalized event out)
########################################################################

def _int(text):
    """Parse an integer field (ASCII digits, optional sign); None when absent or malformed."""
    if text is None:
        return None
    if text.isdigit() and text.isascii() and len(text) <= 24:
        return int(text)  # the usual value, checked as below in one step
    text = text.strip()
    digits = text[1:] if text[:1] in ("-", "+") else text
    # Long digit strings are not SMSC's, and int() of them is slow on old Pythons.
    if not _ascii_digits(digits) or len(digits) > 24:
        return None
    return int(text)


def _number(text):
    """Parse a cost like 1.50 or 2,5: an int or float; None when absent or malformed."""
    if text is None:
        return None
    whole, dot, fraction = text.partition(".")
    if dot and whole.isdigit() and fraction.isdigit() and text.isascii() and len(text) <= 32:
        return float(text)  # the usual cost, checked as below in one step
    number = _int(text)
    if number is not None:
        return number
    text = text.strip().replace(",", ".")
    whole, dot, fraction = (text[1:] if text[:1] in ("-", "+") else text).partition(".")
    if not dot or len(text) > 32 or not (whole or fraction):
        return None
    if (whole and not _ascii_digits(whole)) or (fraction and not _ascii_digits(fraction)):
        return None
    return float(text)


def status_info(code):
    """Return (name, final) for a status code; ("unknown", None) if not in the table."""
    if code is None:
        return None, None
    return STATUS_CODES.get(code, (UNKNOWN, None))


def error_name(code):
    """Return the name of an err code ("unknown" when not in the table)."""
    return None if code is None else ERROR_CODES.get(code, UNKNOWN)


def type_name(code):
    """Return the name of a message type code ("unknown" when not in the table)."""
    return None if code is None else MESSAGE_TYPES.get(code, UNKNOWN)


def decode_flags(flag):
    """Decode the `flag` bit field: type, second balance, template and its kind."""
    if flag is None:
        return None
    template = bool(flag >> 8 & 1)
    return {
        "type": flag & 0xF,
        "type_name": type_name(flag & 0xF),
        "second_balance": bool(flag >> 5 & 1),
        "template": template,
        "template_type": TEMPLATE_TYPES[flag >> 9 & 3] if template else None,
    }


def _overtime_seconds(cmt):
    """Read the 'overtime: mm:ss' line SMSC adds to cmt after an overlong call."""
    if not cmt:
        return None
    for line in cmt.splitlines():
        name, _, value = line.strip().partition(":")
        if name.strip().lower() == "overtime":
            minutes, _, seconds = value.strip().partition(":")
            # Bounded: int() of 4,301+ digits raises (a 500 that loses the event), of fewer is slow.
            if (_ascii_digits(minutes) and _ascii_digits(seconds)
                    and len(minutes) <= 9 and len(seconds) <= 9):
                return int(minutes) * 60 + int(seconds)
    return None


_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

#: "MM" -> the month's last day as "DD" (a February 29 is checked against the year).
_LAST_DAY = {"%02d" % month: "%02d" % days for month, days in enumerate(_DAYS_IN_MONTH, 1)}


def _local_time(text, zone):
    """Convert SMSC's 'DD.MM.YY hh:mm:ss' or 'DD.MM.YYYY hh:mm:ss' (account zone) to ISO 8601.

    `zone` is a fixed offset text like "+03:00", or a tzinfo (an IANA zone).
    Parsed by hand: strptime imports _strptime, locale and calendar, ~3 ms of
    a CGI request.
    """
    if not text:
        return None
    if (len(text) == 17 and text[2] == "." == text[5] and text[8] == " " and text[11] == ":" == text[14]
            and isinstance(zone, str)):
        # SMSC's own shape: checked and rearranged as text, which is faster than ints.
        day, month, year, clock = text[:2], text[3:5], text[6:8], text[9:]
        digits = day + month + year + text[9:11] + text[12:14] + text[15:]
        if digits.isdigit() and digits.isascii():
            if ("01" <= day <= _LAST_DAY.get(month, "") and clock < "24" and text[12:14] < "60"
                    and text[15:] < "60" and (day != "29" or month != "02" or int(year) % 4 == 0)):
                # (1969-2068: every fourth year is a leap year, 2000 too)
                return "%s%s-%s-%sT%s%s" % ("19" if year >= "69" else "20", year, month, day, clock, zone)
            return None
    date, _, clock = text.strip().partition(" ")
    fields = date.split(".") + clock.strip().split(":")
    if (len(fields) != 6 or not _ascii_digits("".join(fields)) or min(map(len, fields)) < 1
            or max(map(len, fields[:2] + fields[3:])) > 2 or len(fields[2]) not in (1, 2, 4)):
        return None
    day, month, year, hour, minute, second = map(int, fields)
    if len(fields[2]) < 4:
        year += 1900 if year >= 69 else 2000  # as strptime's %y
    elif year < 1:
        return None  # DD.MM.YYYY, the form of SMSC's status API (PROTOCOL.md): as strptime's %Y
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not (1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month - 1] - (month == 2 and not leap)
            and hour < 24 and minute < 60 and second < 60):
        return None
    if isinstance(zone, str):
        return "%04d-%02d-%02dT%02d:%02d:%02d%s" % (year, month, day, hour, minute, second, zone)
    from datetime import datetime
    return datetime(year, month, day, hour, minute, second, tzinfo=zone).isoformat()


def _utc_iso(seconds):
    """Format Unix seconds as YYYY-MM-DDTHH:MM:SSZ; None when absent or out of range."""
    global _utc_day
    if seconds is None:
        return None
    day, second = divmod(seconds, 86400)
    cached = _utc_day  # one read: another thread may replace it
    if cached[0] != day:  # callbacks come in bursts of one day: its date is formatted once
        cached = _utc_day = (day, _utc_date(day * 86400))
    if cached[1] is None:
        return None
    return "%sT%02d:%02d:%02dZ" % (cached[1], second // 3600, second // 60 % 60, second % 60)


def _utc_date(seconds):
    """Format Unix seconds as YYYY-MM-DD; None when out of range."""
    try:
        moment = time.gmtime(seconds)
    except (OverflowError, OSError, ValueError):
        return None
    if not 1 <= moment.tm_year <= 9999:
        return None  # keep the YYYY-MM-DDTHH:MM:SSZ shape
    return "%04d-%02d-%02d" % moment[:3]  # strftime's %Y doesn't pad years < 1000


#: (Unix day, its YYYY-MM-DD or None): the last day _utc_iso formatted.
_utc_day = (None, None)


def _received_at(now):
    """Format Unix time as YYYY-MM-DDTHH:MM:SS.mmmZ."""
    global _received_second
    second, millis = divmod(int(now * 1000), 1000)
    cached = _received_second  # one read: another thread may replace it
    if cached[0] != second:  # a busy server formats each second once
        cached = _received_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return "%s.%03dZ" % (cached[1], millis)


#: (Unix second, its formatted text): the last second _received_at formatted.
_received_second = (None, "")


#: kind -> identity fields (typed values) that make event_id. An incoming's
#: holds its signed fields beside SMSC's unsigned id (SPEC 6): a forged
#: incoming carrying a future message's id must not make that one a duplicate.
IDENTITY_FIELDS = {
    "status": ("id", "phone", "status", "err", "ts"),
    "incoming": ("id", "phone", "mes", "to"),
    "incoming-without-id": ("sent", "phone", "mes", "to"),
    "waitcall": ("phone", "ts"),
}


def event_id(kind: str, fields: dict, params: dict) -> str:
    """Return the hex digest of an event's identity: the same for every retry."""
    key = kind
    if kind == "incoming" and not fields.get("id"):
        key = "incoming-without-id"  # `sent` stands in for a missing (or empty) id
    # A typed value that did not parse falls back to its text, so two different
    # malformed values never collide as null.
    identity = [key]
    for name in IDENTITY_FIELDS[key]:
        value = fields.get(name)
        identity.append(params.get(name) if value is None else value)
    text = to_json(identity)
    return _hexdigest("blake2b", text.encode("ascii"), 16)


def _status_fields(p, zone):
    """Return the typed fields of a status event."""
    get = p.get
    status = _int(get("status"))
    name, final = status_info(status)
    err = _int(get("err")) if "err" in p else 0
    kind_code = _int(get("type"))
    flag = _int(get("flag"))
    cmt = get("cmt")
    return {
        "id": get("id"), "phone": get("phone"),
        "status": status, "status_name": name, "final": final,
        "time": _local_time(get("time"), zone), "ts": _int(get("ts")),
        "err": err, "err_name": error_name(err), "syserr": get("syserr"),
        "cnt": _int(get("cnt")), "type": kind_code, "type_name": type_name(kind_code),
        "cost": _number(get("cost")), "flag": flag, "flags": decode_flags(flag),
        "sender": get("sender"), "dtmf": get("dtmf"), "cmt": cmt,
        "overtime_s": _overtime_seconds(cmt) if cmt else None,
        "calltime": get("calltime"), "callmenu": get("callmenu"),
        "ringtime": get("ringtime"),
        "imsi": get("imsi"), "msc": get("msc"), "mcc": get("mcc"),
        "mnc": get("mnc"), "cn": get("cn"), "net": get("net"),
        "rcn": get("rcn"), "rnet": get("rnet"),
    }


def _incoming_fields(p, _zone):
    """Return the typed fields of an incoming SMS event."""
    return {
        "id": p.get("id"), "sms_id": p.get("sms_id"), "phone": p.get("phone"),
        "mes": p.get("mes"), "to": p.get("to"), "smsc": p.get("smsc"),
        "sent": _int(p.get("sent")), "time": _int(p.get("time")),
    }


def _waitcall_fields(p, _zone):
    """Return the typed fields of a number-confirmation call event."""
    return {
        "phone": p.get("phone"), "ts": _int(p.get("ts")),
        "calltime": p.get("calltime"), "callmenu": p.get("callmenu"),
        "ringtime": p.get("ringtime"),
    }


_KIND_FIELDS = {"status": _status_fields, "incoming": _incoming_fields,
                "waitcall": _waitcall_fields}

#: kind -> the typed field that gives the event's own time (`at`).
_AT_FIELD = {"status": "ts", "incoming": "time", "waitcall": "ts"}


def normalize(request: Request, signature=None, remote_addr=None, received=None,
              zone=None, body=b"", query=b"") -> dict:
    """Build the event for a decoded callback (every field of its kind present).

    `zone` is the account's time zone for the status `time` field: an offset
    text like "+03:00" (the default) or a tzinfo.
    """
    if zone is None:
        zone = "+03:00"  # SMSC's own default (Moscow)
    received = time.time() if received is None else received
    params = request.params
    kind = classify(params)
    fields = _KIND_FIELDS[kind](params, zone)
    event = {
        "kind": kind,
        "event_id": event_id(kind, fields, params),
        "received_at": _received_at(received),
        "at": _utc_iso(fields[_AT_FIELD[kind]]),
    }
    event.update(fields)
    event["remote_addr"] = remote_addr
    event["format"] = request.format
    event["charset"] = request.charset
    event["signature"] = signature
    event["lossy"] = request.lossy
    event["params"] = params
    if request.lossy:
        # binascii, not base64: base64 imports re, about 8 ms of a CGI request.
        from binascii import b2a_base64
        event["body_b64"] = b2a_base64(body, newline=False).decode("ascii")
        if query:  # parameters written between '!' and '?' came in the query string
            event["query_b64"] = b2a_base64(query, newline=False).decode("ascii")
    return event


def to_json(value) -> str:
    """Serialize like json.dumps(value, ensure_ascii=True), without importing json.

    `json` compiles its decoder's regexes at import, about 1 ms of a CGI
    request; its C string escaper is all an event needs. Every non-ASCII
    character is escaped, so no raw newline or U+2028 can split a line.
    """
    return "".join((_json_encode or _make_json_encoder())(value, 0))


#: The JSON encoder to_json uses: encode(value, 0) -> the text in chunks; made on first use.
_json_encode = None


def _make_json_encoder():
    """Make, keep in `_json_encode` and return json's C encoder, set up as json.dumps(ensure_ascii=True).

    Called as encode(value, 0), it returns the text in chunks. Where `_json`
    lacks it (another Python), json.dumps itself in one chunk: the same bytes, slower.
    """
    global _json_encode

    def refuse(value):
        raise TypeError("not JSON serializable: %s" % type(value).__name__)
    try:
        from _json import encode_basestring_ascii, make_encoder
        encode = make_encoder(None, refuse, encode_basestring_ascii, None, ": ", ", ", False, False, True)
        if "".join(encode({"a": [1, 1.5, None, True]}, 0)) == '{"a": [1, 1.5, null, true]}':
            _json_encode = encode
            return encode
    except (ImportError, TypeError):
        pass
    import json

    def encode(value, _indent_level):
        return (json.dumps(value, ensure_ascii=True, separators=(", ", ": ")),)
    _json_encode = encode
    return encode


def event_line(event: dict) -> bytes:
    """Serialize an event as one JSON line of ASCII."""
    return (to_json(event) + "\n").encode("ascii")


########################################################################
# Storage: JSON lines, the data folder, rejected requests
########################################################################

def ensure_data_dir(config: Config) -> None:
    """Create data_dir (0700) and its deny-all .htaccess whenever missing; rewrite one cut short.

    Whether the guard is there is asked on every call. Its size (only another
    program could cut it: ours is written whole) is looked at by each process
    at most once a second, since access() costs a third less than stat() in
    Python; a process's first call (every CGI request) takes stat() alone.
    """
    path = config.data_dir
    guard = _GUARDS.get(path) or _GUARDS.setdefault(path, os.path.join(path, ".htaccess"))
    if time.monotonic() < _GUARD_SIZE_CHECKED.get(path, 0.0) and os.access(guard, os.F_OK):
        return
    _check_guard(config, path, guard)
    _GUARD_SIZE_CHECKED[path] = time.monotonic() + 1.0


def _check_guard(config, path, guard):
    """Make sure data_dir is there and its guard is whole, ours or the user's own (StorageError if not)."""
    wanted = _DENY_ALL_BYTES
    try:
        if os.stat(guard).st_size >= len(wanted):
            return  # ours, or the user's own: left alone (and so the folder is there)
    except OSError:
        pass
    if not os.path.isdir(path):
        try:
            os.makedirs(path, 0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError("cannot create data_dir %s: %s" % (path, exc.strerror or exc)) from None
    try:
        if os.path.getsize(guard) >= len(wanted):
            return  # another process just wrote it
        with open(guard, "rb") as file:
            if not wanted.startswith(file.read()):
                return  # the user's own, shorter than ours: left alone
    except OSError:
        pass  # missing
    _write_whole_file(guard, wanted, config.file_mode)


#: data_dir -> its .htaccess path; and what goes in it.
_GUARDS = {}
#: data_dir -> time.monotonic() until which this process need not look at its guard's size.
_GUARD_SIZE_CHECKED = {}
_DENY_ALL_BYTES = DENY_ALL_HTACCESS.encode("ascii")


def _write_whole_file(path, data, mode):
    """Write a small file whole or not at all: a temporary name, then rename."""
    import _thread
    temporary = "%s.%d.%d.tmp" % (path, os.getpid(), _thread.get_ident())  # threads race here too
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), mode)
        try:
            os.fchmod(fd, mode)
            _give_to_folder_owner(fd, os.path.dirname(path))
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write (disk full?)")
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise _write_error(path, exc) from None


#: Read-write, not write-only: the torn-line check preads the last byte.
_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


def _open_append(path, mode):
    """Open a file for appending, creating it (and its folder) with `mode` if needed."""
    flags = _APPEND_FLAGS
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        os.makedirs(folder, 0o700, exist_ok=True)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, mode)  # the umask must not widen or narrow file_mode
    _give_to_folder_owner(fd, folder)
    _fsync_folder(folder)
    return fd


def _give_to_folder_owner(fd, folder):
    """As root in another user's folder (a CLI verb run by root), give a new file to that user.

    Otherwise the web server's user, who owns data_dir, is locked out of the
    state store or forward.lock that root made.
    """
    if os.geteuid() == 0:
        owner = os.stat(folder or ".")
        if owner.st_uid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)


def _fsync_folder(folder):
    """Make a new file's directory entry durable (not every system allows it)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(path: str, line: bytes, fsync: bool = True, mode: int = 0o600) -> None:
    """Append one line to a JSON-lines file, whole or not at all.

    One write() on an O_APPEND descriptor under an exclusive flock, so any
    number of processes can append to one file. A torn last line (a writer
    killed mid-write) is terminated first, so the new line stands alone. A
    short write (disk full) is cut back off, leaving the file as it was.
    The sync comes after the lock is let go: other writers append meanwhile
    and their syncs share one journal commit with ours.
    """
    global _fcntl
    if _fcntl is None:
        import fcntl as _fcntl
    try:
        fd = _open_append(path, mode)
    except OSError as exc:
        raise StorageError("cannot open %s: %s" % (path, exc.strerror or exc)) from None
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
        fd = _still_named(fd, path, mode)
        size = os.lseek(fd, 0, os.SEEK_END)
        line, _at = _terminated(fd, line, size)
        _write_or_cut_back(fd, line, size)
        if fsync:
            _unlock(fd)
            try:
                _fdatasync(fd)
            except OSError:
                _cut_back_if_last(fd, size, size + len(line))
                raise
    except OSError as exc:  # the lock, the write or the sync: not stored, SMSC retries
        raise _write_error(path, exc) from None
    finally:
        os.close(fd)  # closing releases the lock


def _lock_current(fd, path, mode):
    """Take an event file's flock; return a locked descriptor of the file now named `path`.

    Writers with dedupe off take only this lock. A rename (logrotate)
    between our open and our lock: write into the file now named so, never
    into a rotated piece a reader may have finished.
    """
    _fcntl.flock(fd, _fcntl.LOCK_EX)
    return _still_named(fd, path, mode)


def _still_named(fd, path, mode):
    """Return a locked descriptor of the file now named `path` (reopened if it was renamed).

    A rotation (logrotate's rename) between our open and our lock would send
    the line into the rotated piece after a reader finished it; under the
    lock the name is checked, so a reader that saw the piece unchanged under
    the same lock (resume_lines) has seen its last line.
    """
    for _attempt in range(5):
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        held = os.fstat(fd)
        if named is not None and (named.st_ino, named.st_dev) == (held.st_ino, held.st_dev):
            return fd
        renamed = _open_append(path, mode)  # raises with `fd` still ours, closed by the caller
        try:
            _fcntl.flock(renamed, _fcntl.LOCK_EX)
        except OSError:
            os.close(renamed)
            raise
        os.close(fd)
        fd = renamed
    return fd


def _write_or_cut_back(fd, data, size):
    """Write data with one os.write at the end of a file `size` long; on failure cut it back and raise."""
    try:
        if os.write(fd, data) != len(data):
            raise OSError(28, "short write (disk full?)")
    except OSError:
        _cut_back(fd, size)
        raise


def _cut_back(fd, size):
    """Truncate a file back to `size` (under the lock): a failed append leaves nothing."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


def _cut_back_if_last(fd, size, end):
    """After a failed sync: cut our line (size..end) back if nothing was appended behind it."""
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
        if os.lseek(fd, 0, os.SEEK_END) == end:
            _cut_back(fd, size)  # else others' lines follow it: it stays
    except OSError:
        pass  # can't tell: leave it (at worst a duplicate on the retry, never a loss)


def _unlock(fd):
    """Let go of a flock early; closing the descriptor lets go of it anyway."""
    try:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
    except OSError:
        pass


def _write_error(path, exc):
    """Return the StorageError for a failed write or sync of `path`."""
    return StorageError("cannot write %s: %s" % (path, exc.strerror or exc))


#: Data without metadata like mtime where the system has it (the size is synced either way).
_fdatasync = getattr(os, "fdatasync", os.fsync)

#: The fcntl module, imported by the first append (not every request appends).
_fcntl = None


def event_path(config: Config, kind: str, now: float | None = None) -> str:
    """Return the JSON-lines file for an event of `kind` received at `now`."""
    key = (config.data_dir, config.jsonl_path, kind)
    path = _EVENT_PATHS.get(key)
    if path is not None:
        return path
    relative = config.jsonl_path.replace("{kind}", kind)
    if "{date}" in relative:
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))
        return os.path.join(config.data_dir, relative.replace("{date}", day))
    path = _EVENT_PATHS[key] = os.path.join(config.data_dir, relative)
    return path


#: (data_dir, [jsonl] path, kind) -> the file, for paths without {date}.
_EVENT_PATHS = {}


_DATE_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"


def event_files(config: Config, kinds=KINDS) -> list:
    """Return the existing JSON-lines files of the given kinds, oldest date first."""
    import glob
    files = []
    for kind in kinds:
        pattern = glob.escape(config.jsonl_path.replace("{kind}", kind)).replace("{date}", _DATE_GLOB)
        files.extend(glob.glob(os.path.join(glob.escape(config.data_dir), pattern)))
    return sorted(set(files), key=lambda p: (_path_date(config, p), p))


def _path_date(config, path):
    """Return the YYYY-MM-DD of a dated JSON-lines file, for ordering."""
    relative = os.path.relpath(path, config.data_dir)
    template = config.jsonl_path
    if "{date}" not in template:
        return ""
    # The first YYYY-MM-DD below data_dir: the {date} part (kinds hold no digits).
    import re
    match = re.search(r"\d{4}-\d{2}-\d{2}", relative)
    return match.group(0) if match else ""


def read_lines(path: str, offset: int = 0):
    """Yield (start, end, bytes) of each complete line from `offset`; a torn tail is skipped."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return
    with file:
        file.seek(offset)
        position = offset
        for line in file:
            if not line.endswith(b"\n"):
                return  # a write in progress, or a crash: not an event (yet)
            yield position, position + len(line), line
            position += len(line)


def read_events(path: str, offset: int = 0):
    """Yield (end offset, event) for each complete, valid JSON line of a file."""
    import json
    for _start, end, line in read_lines(path, offset):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a mended torn line
        if isinstance(event, dict):
            yield end, event


def request_headers(environ) -> dict:
    """Return the request's headers for rejected.jsonl, minus cookies and credentials."""
    headers = {}
    for name, value in environ.items():
        if name.startswith("HTTP_") and name not in PRIVATE_HEADERS:
            headers[name[5:].replace("_", "-").title()] = value
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(name):
            headers[name.replace("_", "-").title()] = environ[name]
    return headers


def _rotate_rejected(path, room):
    """Rename rejected.jsonl to rejected.jsonl.1 (one piece kept) when it holds over `room` bytes.

    Under the file's flock, so two processes at once rotate once; writers
    that opened it before find it renamed under the same lock (_still_named).
    """
    global _fcntl
    if _fcntl is None:
        import fcntl as _fcntl
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
        held, named = os.fstat(fd), os.stat(path)
        if (held.st_ino, held.st_dev) == (named.st_ino, named.st_dev) and held.st_size > room:
            os.replace(path, path + ".1")
    except OSError as exc:
        _log().warning("rejected.jsonl not rotated: %s", exc.strerror or exc)
    finally:
        os.close(fd)


def keep_rejected(config: Config, environ, body: bytes, error: HandlerError, remote_addr) -> None:
    """Append a refused request to rejected.jsonl, rotated past [rejected] max_bytes (SPEC §11)."""
    if not config.rejected_enabled:
        return
    import base64
    record = {
        "received_at": _received_at(time.time()),
        "status": error.status,
        "reason": error.reason,
        "remote_addr": remote_addr,
        "method": environ.get("REQUEST_METHOD"),
        "query": environ.get("QUERY_STRING", ""),
        "headers": request_headers(environ),
        "body_b64": base64.b64encode(body).decode("ascii"),
    }
    line = event_line(record)
    path = os.path.join(config.data_dir, "rejected.jsonl")
    try:
        ensure_data_dir(config)
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        if size + len(line) > config.rejected_max_bytes:
            if len(line) > config.rejected_max_bytes:
                _log().warning("refused request larger than [rejected] max_bytes: not kept")
                return
            _rotate_rejected(path, config.rejected_max_bytes - len(line))
        append_line(path, line, fsync=False, mode=config.file_mode)
    except StorageError as exc:
        _log().warning("refused request not kept: %s", exc.reason)


########################################################################
# State: dedupe ids, hook outcomes, forward positions (SQLite)
########################################################################

STATE_FILE = "state.sqlite3"

_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    event_id TEXT PRIMARY KEY, kind TEXT, file TEXT, stored_at REAL,
    identity TEXT, line_at INTEGER, line_size INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_stored_at ON seen (stored_at);
CREATE TABLE IF NOT EXISTS hooks (
    event_id TEXT PRIMARY KEY, ok INTEGER, attempts INTEGER, last_error TEXT,
    updated_at REAL, line BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hooks_updated_at ON hooks (updated_at);
CREATE TABLE IF NOT EXISTS positions (
    file TEXT PRIMARY KEY, offset INTEGER, identity TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    identity TEXT PRIMARY KEY, path TEXT, committed_end INTEGER, written_at REAL
) WITHOUT ROWID
"""

#: Columns of `seen` that stores made before the committed-end protocol lack:
#: where each line is (file identity "dev:ino", offset, length), for the repeat's check.
_SEEN_LINE_COLUMNS = (("identity", "TEXT"), ("line_at", "INTEGER"), ("line_size", "INTEGER"))


#: In 256, the chance that a commit checkpoints the WAL afterwards: about every
#: 256 commits (some 800 pages of WAL, where SQLite's own default is 1,000).
CHECKPOINT_CHANCE = 1

#: Seconds a writer waits for the state store (the folder's queue, then SQLite's lock)
#: before the request answers 503 and SMSC retries.
STATE_PATIENCE = 10


def _sqlite_module():
    """Return SQLite's module for the state store (imported on first use: a CGI request pays every import).

    Its C part, ``_sqlite3``: the ``sqlite3`` package adds only datetime
    adapters (the store keeps none) and costs a CGI request 1.1 ms more,
    mostly ``datetime``. Same classes, same connect(): errors are
    ``sqlite3.Error`` either way.
    """
    import _sqlite3
    return _sqlite3


#: Bytes of WAL a CGI process leaves for the next one (Python 3.12+, see
#: StateStore._checkpoint_if_long): about 55 callbacks (~9 KB each), read back by
#: each new process in ~0.1 ms; emptying it costs about four fsyncs.
CGI_WAL_LIMIT = 512 * 1024

#: Set by run_cgi: this process serves one request and ends.
_one_request_per_process = False


def _skip_close_checkpoint(db) -> bool:
    """Ask SQLite not to checkpoint when `db`, the last connection, closes; say whether it will.

    Needs Connection.setconfig (Python 3.12+) and SQLite 3.18+. The WAL then
    stays beside the store, as while any server has it open: each commit is
    in it, and the next connection reads it back.
    """
    option = getattr(_sqlite_module(), "SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE", None)
    if option is None or not hasattr(db, "setconfig"):
        return False
    try:
        db.setconfig(option, True)
        return bool(db.getconfig(option))
    except Exception:  # an SQLite without the option: the close checkpoints, as before
        return False


class StateStore:
    """The state store: data_dir/state.sqlite3, shared by every process.

    WAL with synchronous=NORMAL: a power cut may forget the last commits.
    Lost ids whose lines are on disk are adopted again (they lie past their
    file's surviving committed end); README "Guarantees" says what can still
    double, never a lost acknowledged event.
    """

    _lazy_checkpoint = False  # whether close() leaves a short WAL for the next process

    def __init__(self, config: Config):
        sqlite3 = self._sqlite3 = _sqlite_module()  # load_config already refused a Python without it
        self.config = config
        self.path = os.path.join(config.data_dir, STATE_FILE)
        self._queue = _open_queue(config.data_dir)
        try:
            self._join_queue()  # processes starting at once set up in turn
            if not os.path.exists(self.path):
                # Create it ourselves so file_mode applies (SQLite gives -wal/-shm the same mode).
                os.close(_open_append(self.path, config.file_mode))
            # timeout= is SQLite's busy_timeout (sqlite3_busy_timeout): no PRAGMA needed.
            self.db = sqlite3.connect(self.path, timeout=STATE_PATIENCE, isolation_level=None,
                                      check_same_thread=False)
            self._set_up()
            self.db.execute("PRAGMA synchronous = NORMAL")
            # SQLite's own checkpoint runs inside COMMIT, with the folder's queue still held: commit() does it.
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
            self.inode = os.stat(self.path).st_ino
            self._lazy_checkpoint = _one_request_per_process and _skip_close_checkpoint(self.db)
        except BaseException as exc:
            if self._queue is not None:
                os.close(self._queue)  # and with it the lock: the next process may try
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StorageError("state store %s unusable: %s" % (self.path, exc)) from None
            raise
        self._leave_queue()

    def _set_up(self, patience=STATE_PATIENCE):
        """Switch a new store to WAL and create its tables.

        SQLite doesn't apply busy_timeout to the journal-mode switch: when
        several processes open a new store at once, retry until `patience` runs out.
        """
        deadline = time.monotonic() + patience
        delay = 0.005
        while True:
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode = WAL")
                if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'files'").fetchone():
                    self._create_tables()
                return
            except self._sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _create_tables(self):
        """Create the tables, and add the line columns to a `seen` made by an older version."""
        self.db.execute("BEGIN IMMEDIATE")  # two processes upgrading at once: one ALTERs
        try:
            for statement in _STATE_SCHEMA.split(";"):
                self.db.execute(statement)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(seen)")}
            for name, kind in _SEEN_LINE_COLUMNS:
                if name not in columns:
                    self.db.execute("ALTER TABLE seen ADD COLUMN %s %s" % (name, kind))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self):
        """Close the connection (under CGI on 3.12+, checkpointing only a long WAL)."""
        try:
            if self._lazy_checkpoint:
                self._checkpoint_if_long()
            self.db.close()
        finally:
            if self._queue is not None:
                os.close(self._queue)
                self._queue = None

    def _checkpoint_if_long(self):
        """Copy the WAL into the store and empty it, once it is over CGI_WAL_LIMIT bytes.

        Each CGI process opens the store anew and, the WAL-index being
        rebuilt by the first connection, reads the whole WAL: kept short, that
        costs less than the three fsyncs a checkpoint on every close brings
        (WAL, store, and the next request's fresh WAL header).
        """
        try:
            if os.stat(self.path + "-wal").st_size > CGI_WAL_LIMIT:
                # The answer is out: wait briefly for a reader, or leave it to the next request.
                self.db.execute("PRAGMA busy_timeout = 200")
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except (OSError, self._sqlite3.Error):
            pass  # no WAL, or busy: the next request's close tries again

    def is_current(self) -> bool:
        """Whether the file is still the one opened (not deleted or replaced since)."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self, sql, args=()):
        """Execute one statement; a SQLite error becomes StorageError (503)."""
        try:
            return self.db.execute(sql, args)
        except self._sqlite3.Error as exc:
            raise StorageError("state store: %s" % exc) from None

    def begin(self):
        """Take the write lock now, so two processes can't both miss one id.

        Writers first take a flock of the data folder, tried again every 0.2
        to 1 ms, where SQLite's own busy wait sleeps 1 to 100 ms between tries
        and lets a waiter starve for seconds.
        """
        self._join_queue()
        try:
            self._run("BEGIN IMMEDIATE")
        except BaseException:
            self._leave_queue()
            raise

    def commit(self):
        """Commit the transaction; now and then checkpoint the WAL, once the next writer is let in."""
        try:
            self._run("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._leave_queue()
        if os.urandom(1)[0] < CHECKPOINT_CHANCE:
            self.checkpoint()

    def checkpoint(self):
        """Copy the WAL into the database without waiting for anyone (its two syncs out of the queue)."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except self._sqlite3.Error:
            pass  # busy or broken: the next one will do

    def rollback(self):
        """Roll back, ignoring a connection already broken."""
        try:
            self.db.execute("ROLLBACK")
        except self._sqlite3.Error:
            pass
        finally:
            self._leave_queue()

    def _join_queue(self):
        """Take the data folder's flock, waiting up to STATE_PATIENCE seconds (then StorageError: 503).

        Not a blocking flock: that can't time out, and a writer stopped in its
        transaction (a hung disk, a debugger) must not hang every request.
        """
        queue = self._queue
        if queue is None:
            return
        patience = STATE_PATIENCE
        delay, deadline = 0.00005, None
        while True:
            try:
                _fcntl.flock(queue, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError:  # not expected after _open_queue's probe: SQLite's own wait remains
                self._queue = None
                os.close(queue)
                return
            now = time.monotonic()
            if deadline is None:
                deadline = now + patience
            elif now > deadline:
                raise StorageError("state store busy: another writer held it over %g s" % patience)
            time.sleep(delay)
            delay = min(delay * 2, 0.001)

    def _leave_queue(self):
        """Let the next writer in (closing the descriptor would too)."""
        queue = self._queue
        if queue is not None:
            _unlock(queue)

    def record_tails(self, now=None):
        """Record the ids of every watched file's tail now; return how many (writers do it every INDEX_LAG bytes).

        Afterwards every stored id is a row of `seen`: for a count, a backup
        or a look with the sqlite3 shell.
        """
        now = time.time() if now is None else now
        self.begin()
        try:
            recorded = sum(len(_look_at_file(self.config, self, row, now)) for row in self.event_files())
        except BaseException:
            self.rollback()
            raise
        self.commit()
        return recorded

    def is_seen(self, event_id):
        """Whether an event id is remembered: recorded, or in a watched file's tail (see _append_if_new)."""
        if self._run("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone() is not None:
            return True
        for identity, path, end, _written_at in self.event_files():
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                stat = os.fstat(fd)
                if _identity(stat) == identity and stat.st_size > end and _tail_has(fd, end, stat.st_size, event_id):
                    return True
            finally:
                os.close(fd)
        return False

    def remember_new(self, event_id, kind, file, now):
        """Remember an event id unless it is already; return whether it was new."""
        cursor = self._run("INSERT OR IGNORE INTO seen (event_id, kind, file, stored_at) VALUES (?, ?, ?, ?)",
                           (event_id, kind, file, now))
        return cursor.rowcount == 1

    def remember(self, event_id, kind, file, now):
        """Remember an event id, its kind and file."""
        self._run("INSERT OR REPLACE INTO seen (event_id, kind, file, stored_at) VALUES (?, ?, ?, ?)",
                  (event_id, kind, file, now))

    # The committed-end protocol (store_event): each event file's end as of the
    # last commit, keyed by the file's identity, and where each id's line is.

    def keep_going(self):
        """Commit the transaction so far and begin the next one, keeping our place in the folder's queue."""
        self._run("COMMIT")
        self._run("BEGIN IMMEDIATE")

    def files_and_seen(self, event_id):
        """Return (event_files(), whether event_id is recorded): one statement, so one read of the store."""
        rows = self._run("SELECT 0, identity, path, committed_end, written_at FROM files UNION ALL "
                         "SELECT 1, NULL, NULL, NULL, NULL FROM seen WHERE event_id = ?", (event_id,)).fetchall()
        return [row[1:] for row in rows if row[0] == 0], any(row[0] == 1 for row in rows)

    def event_files(self):
        """Return (identity, path, committed end, written_at) of each event file writers append to."""
        return self._run("SELECT identity, path, committed_end, written_at FROM files").fetchall()

    def set_file(self, identity, path, end, now):
        """Record an event file's committed end (the bytes before it are all recorded)."""
        self._run("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (identity, path, end, now))

    def forget_file(self, identity):
        """Stop watching an event file (every byte of it recorded, or gone)."""
        self._run("DELETE FROM files WHERE identity = ?", (identity,))

    def remember_line(self, event_id, kind, file, now, identity, at, size, replace=False):
        """Remember an event id with its line's place; return whether it was new (or replaced)."""
        cursor = self._run("INSERT OR %s INTO seen VALUES (?, ?, ?, ?, ?, ?, ?)" % ("REPLACE" if replace else "IGNORE"),
                           (event_id, kind, file, now, identity, at, size))
        return cursor.rowcount == 1

    def remember_lines(self, rows):
        """Remember ids unless remembered: rows of (event_id, kind, file, now, identity, at, size)."""
        try:
            self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except self._sqlite3.Error as exc:
            raise StorageError("state store: %s" % exc) from None

    def stored_line(self, event_id):
        """Return (file, identity, offset, length) of a remembered id's line (None for unknowns), or None."""
        return self._run("SELECT file, identity, line_at, line_size FROM seen WHERE event_id = ?",
                         (event_id,)).fetchone()

    def forget(self, event_id):
        """Forget an event id (its line could not be made durable)."""
        self._run("DELETE FROM seen WHERE event_id = ?", (event_id,))

    def prune(self, keep_days, now):
        """Forget dedupe ids and hook successes older than keep_days.

        Failed hook outcomes are kept for `replay`, which takes an event older
        than keep_days with no outcome at all as done.
        """
        cutoff = now - keep_days * 86400
        self._run("DELETE FROM seen WHERE stored_at < ?", (cutoff,))
        self._run("DELETE FROM hooks WHERE ok = 1 AND updated_at < ?", (cutoff,))

    def hook_state(self, event_id):
        """Return "ok", "failed", "running" (claimed, not finished) or None (never claimed)."""
        row = self._run("SELECT ok FROM hooks WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else {None: "running", 0: "failed", 1: "ok"}[row[0]]

    def claim_hook(self, event_id, now, lease, line):
        """Claim an event's hook run inside the dedupe transaction.

        Returns ("run", the line to hand the hook: the one kept with the
        first claim), ("done", None) when it already succeeded, or ("busy",
        None) while another request runs it (claimed less than `lease`
        seconds ago): two identical callbacks at once run the hook once.
        """
        row = self._run("SELECT ok, updated_at, line FROM hooks WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            # The line is kept with the claim: a crash mid-hook leaves it for the retry.
            self._run("INSERT INTO hooks VALUES (?, NULL, 0, NULL, ?, ?)", (event_id, now, line))
            return "run", line
        ok, claimed_at, kept = row
        if ok == 1:
            return "done", None
        if ok is None and now - (claimed_at or 0) < lease:
            return "busy", None
        self._run("UPDATE hooks SET ok = NULL, updated_at = ?, line = COALESCE(line, ?) WHERE event_id = ?",
                  (now, line, event_id))
        return "run", line if kept is None else bytes(kept)

    def seen_file(self, event_id):
        """Return the JSON-lines file an event was stored in, if remembered."""
        row = self._run("SELECT file FROM seen WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else row[0]

    def record_hook(self, event_id, ok, error, now, line=None):
        """Record a hook outcome; a failed one keeps the event line for its retry."""
        kept = None if ok else line
        # Two statements, not an upsert: hosts still run SQLite older than 3.24.
        self._run("INSERT OR IGNORE INTO hooks VALUES (?, ?, 0, ?, ?, ?)",
                  (event_id, int(ok), error, now, kept))
        # A success drops the kept line; a failure keeps the first one it has.
        self._run("UPDATE hooks SET ok = ?, attempts = attempts + 1, last_error = ?, updated_at = ?, "
                  "line = CASE WHEN ? THEN NULL ELSE COALESCE(line, ?) END WHERE event_id = ?",
                  (int(ok), error, now, int(ok), kept, event_id))

    def hook_row(self, event_id):
        """Return (ok, updated_at, kept line, last error) of an event's hook record, or None."""
        return self._run("SELECT ok, updated_at, line, last_error FROM hooks WHERE event_id = ?",
                         (event_id,)).fetchone()

    def take_hook_claim(self, event_id, now, line):
        """Claim an event's hook run for `forward` or `replay` (inside begin/commit)."""
        self._run("INSERT OR IGNORE INTO hooks VALUES (?, NULL, 0, NULL, ?, ?)", (event_id, now, line))
        self._run("UPDATE hooks SET ok = NULL, updated_at = ?, line = COALESCE(line, ?) WHERE event_id = ?",
                  (now, line, event_id))

    def renew_hook_claim(self, event_id, claimed_at, now) -> bool:
        """Move a claim's time to `now` while its hook runs; False when it is no longer ours.

        The claim time is the claim's token: a claim taken over after its lease
        has another one.
        """
        self.begin()
        try:
            cursor = self._run("UPDATE hooks SET updated_at = ? WHERE event_id = ? AND ok IS NULL "
                               "AND updated_at = ?", (now, event_id, claimed_at))
            self.commit()
        except BaseException:
            self.rollback()
            raise
        return cursor.rowcount == 1

    def finish_hook(self, event_id, ok, error, now, claimed_at, line=None):
        """Record the outcome of a claimed hook run in its own transaction.

        A success is recorded whoever holds the claim now (the hook did its
        work). A failure is recorded only over our own claim: a claim taken
        over after its lease belongs to a run still going on.
        """
        self.begin()
        try:
            if ok:
                self._record_success(event_id, now)
            else:
                self._run("UPDATE hooks SET ok = 0, attempts = attempts + 1, last_error = ?, updated_at = ?, "
                          "line = COALESCE(line, ?) WHERE event_id = ? AND ok IS NULL AND updated_at = ?",
                          (error, now, line, event_id, claimed_at))
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _record_success(self, event_id, now):
        """Mark an event's hook as succeeded (inside begin/commit); a success already there stays."""
        self._run("INSERT OR IGNORE INTO hooks VALUES (?, 1, 1, NULL, ?, NULL)", (event_id, now))
        self._run("UPDATE hooks SET ok = 1, attempts = attempts + 1, last_error = NULL, updated_at = ?, "
                  "line = NULL WHERE event_id = ? AND ok IS NOT 1", (now, event_id))

    def apply_pending_hooks(self) -> int:
        """Record the hook successes that waited in data_dir/hooks.pending; return how many.

        The journal is read and removed under its flock, after the commit, so
        a success appended meanwhile waits for the next call, never is lost.
        """
        path = os.path.join(self.config.data_dir, PENDING_FILE)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageError("cannot open %s: %s" % (PENDING_FILE, exc.strerror or exc)) from None
        try:
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:
                    return 0  # another process recorded and removed it meanwhile
                data = b""
                while True:
                    chunk = os.pread(fd, 65536, len(data))
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                raise StorageError("cannot read %s: %s" % (PENDING_FILE, exc.strerror or exc)) from None
            records = _pending_records(data)
            self.begin()
            try:
                for event_id, at in records:
                    self._record_success(event_id, at)
                self.commit()
            except BaseException:
                self.rollback()
                raise
            try:
                os.unlink(path)
            except OSError as exc:
                raise StorageError("cannot remove %s: %s" % (PENDING_FILE, exc.strerror or exc)) from None
            return len(records)
        finally:
            os.close(fd)  # and with it the flock

    def position(self, file):
        """Return (offset, file identity) where `forward` stopped in a file."""
        row = self._run("SELECT offset, identity FROM positions WHERE file = ?", (file,)).fetchone()
        return (0, None) if row is None else (row[0], row[1])

    def set_position(self, file, offset, identity):
        """Remember where `forward` stopped in a file, and which file it was."""
        self._run("INSERT OR REPLACE INTO positions VALUES (?, ?, ?)", (file, offset, identity))

    def forget_events(self, event_ids, file):
        """Forget the ids, hook outcomes and forward position of a removed file's events (prune)."""
        self.begin()
        try:
            for event_id in event_ids:
                self._run("DELETE FROM seen WHERE event_id = ?", (event_id,))
                self._run("DELETE FROM hooks WHERE event_id = ?", (event_id,))
            self._run("DELETE FROM positions WHERE file = ?", (file,))
        except BaseException:
            self.rollback()
            raise
        self.commit()


def _open_queue(folder):
    """Open the data folder for StateStore.begin's flock; None where that can't work."""
    global _fcntl
    if _fcntl is None:
        import fcntl as _fcntl
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)  # can folders be locked here (not NFS)?
        _fcntl.flock(fd, _fcntl.LOCK_UN)
    except BlockingIOError:
        pass  # another writer holds it: locking works
    except OSError:
        os.close(fd)
        return None
    return fd


#: (pid, thread, data_dir) -> an open StateStore: long-running servers reuse
#: their connection instead of paying connect + PRAGMAs per request.
_STATE_STORES = {}


def _open_state(config: Config) -> StateStore:
    """Return this thread's state store for config, reopened if its file was replaced."""
    import _thread
    global _state_hooks_registered
    key = (os.getpid(), _thread.get_ident(), config.data_dir)
    state = _STATE_STORES.get(key)
    if state is not None:
        if state.is_current():
            return state
        # Replaced (a restored backup) or deleted: empty our WAL first, or the next
        # connection would replay its old pages onto the new file.
        try:
            state.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception:  # the old file is gone: nothing to keep
            pass
        _log().error("state store %s was replaced or deleted under a running server; reopening. "
                     "Stop the server before restoring or removing it.", STATE_FILE)
        _drop_state(config)
    if not _state_hooks_registered:
        import atexit
        atexit.register(_close_states)  # checkpoint the WAL when a CGI process ends
        if hasattr(os, "register_at_fork"):
            # SQLite connections must not cross a fork (gunicorn --preload, uWSGI).
            os.register_at_fork(before=_close_states)
        _state_hooks_registered = True
    state = _STATE_STORES[key] = StateStore(config)
    return state


_state_hooks_registered = False


def _close_states(thread=None):
    """Close this process's cached state stores (only `thread`'s when given)."""
    for key, state in list(_STATE_STORES.items()):
        if thread is not None and key[1] != thread:
            continue
        try:
            state.close()
        except Exception:  # a broken connection: nothing more to do with it
            pass
        del _STATE_STORES[key]


def _drop_state(config: Config) -> None:
    """Forget (and close) this thread's state store, after a failure or a replaced file."""
    import _thread
    state = _STATE_STORES.pop((os.getpid(), _thread.get_ident(), config.data_dir), None)
    if state is not None:
        try:
            state.close()
        except Exception:  # a broken connection: nothing more to do with it
            pass


#: Seconds a hook claim holds at most without being renewed; past it the claimant is
#: taken for dead. Well under SMSC's 240 s between tries, so the try after a crash
#: runs the hook whatever [hook] timeout says.
HOOK_LEASE_MAX = 90

#: Seconds between renewals of the claim while a hook longer than the lease runs.
HOOK_RENEW_SECONDS = 30

#: The journal (in data_dir) of hook successes the state store could not take at once.
PENDING_FILE = "hooks.pending"


def _hook_lease(config: Config) -> float:
    """Seconds a hook claim holds: past it, the claimant is taken for dead.

    The hook's timeout plus 30 s for the outcome's write (which waits up to
    STATE_PATIENCE), capped at HOOK_LEASE_MAX: a longer hook renews its claim.
    """
    return min(config.hook_timeout + 30, HOOK_LEASE_MAX)


def _should_prune():
    # About one request in a hundred: cheap, and SMSC's retries stop after ~3 h.
    """Say whether this request also prunes old ids (about one in a hundred)."""
    return os.urandom(1)[0] < 3


# The committed-end protocol (dedupe on, jsonl on): exactly one line per event
# id, whatever process dies at whatever instant. The order, under the data
# folder's flock and SQLite's write lock (StateStore.begin):
#   1. open the event file; if the store has no row for its identity (device,
#      inode), commit one with its current size as its end ("announced");
#   2. for every watched file, bytes past its committed end are lines of a
#      writer that died or failed before its COMMIT: record their ids
#      ("adopted") and fdatasync them before anything answers 200 for them;
#   3. look up the id; a repeat whose line is still in place writes nothing;
#   4. append the line under the file's flock (a torn last line terminated
#      first) and record the id, the line's place and the file's new end;
#   5. claim the hook, prune, COMMIT, and leave the queue;
#   6. fdatasync outside the lock (one journal commit covers every writer's
#      line before it), then answer 200.
# A death before 5 leaves bytes past the end for step 2 of the next writer;
# a death after 5 leaves a recorded id whose line the repeat finds (step 3)
# and syncs again.
#
# The quick write (_append_if_new), the usual case, needs no transaction: the
# bytes past a committed end are not only a dead writer's but every recent
# writer's, up to INDEX_LAG of them. Under the same two flocks, a writer looks
# its id up in the store and in every watched file's tail (one pread and a
# find each), appends, and only the writer whose line takes the tail past
# INDEX_LAG records the tail's ids and the new end, in one transaction. A
# death anywhere leaves a tail the next writer searches and, in time, records:
# a repeat finds its line there and goes the full way above (which adopts it).

#: Seconds after its last line that a fully recorded event file stops being
#: looked at by every writer (its next line announces it again).
_IDLE_FILE_SECONDS = 3600

#: Bytes of a file's tail (past its committed end) the quick write leaves
#: unrecorded, about 19 callbacks: each writer searches them for its id, and
#: the one that takes the tail past this records it in one transaction. A
#: write transaction per callback was most of what dedupe cost a server.
INDEX_LAG = 16 * 1024

#: A tail longer than this, or another file's tail untouched this many
#: seconds, is recorded by the full protocol instead.
_TAIL_MAX = 4 * INDEX_LAG
_TAIL_IDLE_SECONDS = 60


def _test_pauses(text):
    """Parse SMSC_HANDLER_TEST_PAUSE ("appended=0.05,committed"): point -> chance (1 when not given)."""
    pauses = {}
    for item in text.split(","):
        name, _, chance = item.partition("=")
        try:
            pauses[name.strip()] = float(chance) if chance else 1.0
        except ValueError:
            pass
    return pauses


#: Test only: SMSC_HANDLER_TEST_PAUSE, read once at import, names the steps of a
#: write (begun, announced, appended, committing, committed, synced) where the
#: process stops itself with SIGSTOP, at the chance given, for a test to SIGKILL it
#: exactly there (tests/test_crash.py). Unset, it is {} and each step costs one test of it.
_PAUSES = _test_pauses(os.environ["SMSC_HANDLER_TEST_PAUSE"]) if "SMSC_HANDLER_TEST_PAUSE" in os.environ else {}


def _pause(point):
    """Stop this process (SIGSTOP) at a named step when SMSC_HANDLER_TEST_PAUSE asks (tests only)."""
    chance = _PAUSES.get(point)
    if chance and (chance >= 1 or int.from_bytes(os.urandom(4), "big") < chance * 2 ** 32):
        import signal
        os.write(2, b"smsc_handler: paused at %s\n" % point.encode())  # for the test's count
        os.kill(os.getpid(), signal.SIGSTOP)


def _identity(stat):
    """Return a file's identity as the store keeps it: "device:inode"."""
    return "%d:%d" % (stat.st_dev, stat.st_ino)


class _Pending:
    """A line to make durable after COMMIT: its file's descriptor, and what to undo if the sync fails."""

    __slots__ = ("fd", "path", "identity", "event_id", "start", "end", "others", "recorded")

    def __init__(self, fd, path, identity, event_id=None, start=0, end=0):
        self.fd, self.path, self.identity = fd, path, identity
        self.event_id, self.start, self.end = event_id, start, end  # event_id None: a repeat's sync
        self.others = []  # descriptors of other files to sync (a repeat's line elsewhere)
        self.recorded = True  # whether the line's id and end are committed (the quick write's often aren't)

    def close(self):
        """Close every descriptor held."""
        for fd in self.descriptors():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd, self.others = None, []

    def descriptors(self):
        """Return the open descriptors: the file appended to (if opened), then any other."""
        return ([] if self.fd is None else [self.fd]) + self.others


def _append_once(config, state, event, path, line, now):
    """Append an event's line unless its id is stored: steps 1-4 above, inside the caller's transaction.

    Returns (the file holding the event's line, that line when it was adopted
    just now or None, the _Pending to finish after COMMIT with _make_durable).
    A repeat creates no file (a retry on the next day with `{date}` paths).
    """
    key = event["event_id"]
    try:
        fd = os.open(path, _APPEND_FLAGS)
    except FileNotFoundError:
        fd = None  # a new file holds no one's line: created below if ours is new
    except OSError as exc:
        raise StorageError("cannot open %s: %s" % (os.path.basename(path), exc.strerror or exc)) from None
    pending = _Pending(fd, path, None)
    try:
        adopted, rows, size = {}, None, 0
        if fd is not None:
            adopted, size, rows = _own_file(config, state, pending, now)
            fd = pending.fd  # reopened when a rename came between the open and the lock
        for row in rows if rows is not None else state.event_files():
            if row[0] != pending.identity:
                adopted.update(_look_at_file(config, state, row, now))
        recorded = False
        if fd is not None:
            data, at = _terminated(fd, line, size)
            # The usual case in one statement: a new id, recorded with where its line goes.
            recorded = state.remember_line(key, event["kind"], path, now, pending.identity, at, len(line))
        if not recorded:
            stored = state.stored_line(key)
            if stored is not None and _line_in_place(config, stored, key, pending):
                if fd is not None:
                    _unlock(fd)
                return stored[0] or path, adopted.get(key), pending
            # New, in a file yet to be made; or its line is gone (a power cut took it before
            # its sync, or the file was cut): stored again.
            if fd is None:  # made and announced (a commit) before the id is recorded
                pending.fd = fd = _open_append(path, config.file_mode)
                size = _own_file(config, state, pending, now)[1]
                fd = pending.fd
                data, at = _terminated(fd, line, size)
            state.remember_line(key, event["kind"], path, now, pending.identity, at, len(line), replace=True)
        _write_or_cut_back(fd, data, size)
        if _PAUSES:
            _pause("appended")
        end = size + len(data)
        state.set_file(pending.identity, path, end, now)
        _unlock(fd)  # others may append while we commit and sync
        pending.event_id, pending.start, pending.end = key, size, end
        return path, None, pending
    except BaseException as exc:
        pending.close()
        if isinstance(exc, OSError):  # the lock, a read, the write: nothing acknowledged, SMSC retries
            raise _write_error(path, exc) from None
        raise


def _terminated(fd, line, size):
    """Return (bytes to write, offset of the line): a torn last line is terminated first, so ours stands alone."""
    if size and os.pread(fd, 1, size - 1) != b"\n":
        return b"\n" + line, size + 1
    return line, size


def _own_file(config, state, pending, now):
    """Lock the file we append to, announce it if new to the store, adopt its tail: (adopted, size, rows)."""
    global _fcntl
    if _fcntl is None:
        import fcntl as _fcntl
    fd = pending.fd = _lock_current(pending.fd, pending.path, config.file_mode)
    while True:
        stat = os.fstat(fd)
        identity, size = _identity(stat), stat.st_size
        pending.identity = identity
        rows = state.event_files()
        committed = next((row[2] for row in rows if row[0] == identity), None)
        if committed is not None:
            break
        committed, size, rows = _announce(state, pending, size, now)
        renamed = _still_named(fd, pending.path, config.file_mode)  # _announce let go of the lock
        if renamed == fd:
            break
        pending.fd = fd = renamed  # renamed while we committed: announce its successor too
    adopted = {}
    if size != committed:
        if size > committed:
            adopted = _adopt_tail(config, state, fd, pending.path, identity, committed, size, now)
        state.set_file(identity, pending.path, size, now)  # below it: a file cut back (copytruncate, power cut)
    return adopted, size, rows


def _announce(state, pending, size, now):
    """Commit a row for a file new to the store (its size as its end): return (committed end, size, rows).

    From then on, a line a crash leaves past that end is where the next
    writer looks.
    """
    state.set_file(pending.identity, pending.path, size, now)
    _unlock(pending.fd)  # no writer may wait on our file's lock while we commit
    state.keep_going()
    if _PAUSES:
        _pause("announced")
    _fcntl.flock(pending.fd, _fcntl.LOCK_EX)
    size = os.fstat(pending.fd).st_size
    rows = state.event_files()  # without the folder's flock (NFS) another writer may have gone between
    committed = next((row[2] for row in rows if row[0] == pending.identity), size)
    return committed, size, rows


def _look_at_file(config, state, row, now):
    """Adopt a dead writer's lines past another watched file's end (returned: id -> line); forget it idle."""
    identity, path, end, written_at = row
    try:
        stat = os.stat(path)
    except OSError:
        stat = None
    moved = stat is None or _identity(stat) != identity
    if moved:  # renamed (rotated) or removed: look for it in its folder, by inode
        found = _find_by_identity(os.path.dirname(path), identity)
        if found is None:
            state.forget_file(identity)
            return {}
        path, stat = found
    if stat.st_size > end:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if _identity(os.fstat(fd)) == identity:
                size = os.fstat(fd).st_size
                adopted = _adopt_tail(config, state, fd, path, identity, end, size, now)
                state.set_file(identity, path, size, now)
                return adopted
        finally:
            os.close(fd)
    elif stat.st_size < end:
        state.set_file(identity, path, stat.st_size, written_at)
    elif moved or now - (written_at or 0) > _IDLE_FILE_SECONDS:
        state.forget_file(identity)
    return {}


def _find_by_identity(folder, identity):
    """Return (path, stat) of the file in `folder` with this identity (a rotated event file), or None."""
    try:
        entries = list(os.scandir(folder or "."))
    except OSError:
        return None
    inode = int(identity.split(":")[1])
    for entry in entries:
        try:
            if entry.inode() == inode and entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                if _identity(stat) == identity:
                    return entry.path, stat
        except OSError:
            continue
    return None


def _adopt_tail(config, state, fd, path, identity, start, end, now):
    """Record the ids of the whole lines between start and end (a tail); sync them; return id -> line."""
    adopted = _record_lines(state, fd, path, identity, start, end, now)
    if adopted and config.jsonl_fsync:
        _fdatasync(fd)  # before any 200 relies on them
    return adopted


def _record_lines(state, fd, path, identity, start, end, now):
    """Record the ids of the whole lines between start and end of a file; return id -> line.

    A last piece without its newline is a torn write, never acknowledged: it
    stays, and the next line to the file terminates it. A mended torn line
    (not JSON) has no id to record.
    """
    chunks, offset = [], start
    while offset < end:
        chunk = os.pread(fd, min(end - offset, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    data = b"".join(chunks)
    adopted, rows, position = {}, [], 0
    while True:
        newline = data.find(b"\n", position)
        if newline < 0:
            break
        raw = data[position:newline + 1]
        event = _json_object(raw)
        if event is not None and isinstance(event.get("event_id"), str):
            key = event["event_id"]
            rows.append((key, event.get("kind"), path, now, identity, start + position, len(raw)))
            adopted[key] = raw
        position = newline + 1
    state.remember_lines(rows)
    return adopted


def _tail_has(fd, start, end, key):
    """Whether a whole line of event `key` lies between start and end of a file (its unrecorded tail)."""
    data = os.pread(fd, end - start, start)
    needle = ('"event_id": "%s"' % key).encode()  # as event_line writes it; found as is only in that field
    at = data.find(needle)
    while at >= 0:
        stop = data.find(b"\n", at)
        if stop < 0:
            return False  # a torn last piece: never acknowledged
        event = _json_object(data[data.rfind(b"\n", 0, at) + 1:stop + 1])
        if event is not None and event.get("event_id") == key:
            return True
        at = data.find(needle, stop)
    return False


def _json_object(raw):
    """Parse one stored line (bytes) into a dict; None when it isn't one (a torn or mended line).

    With json's C scanner, as to_json uses its encoder: importing json costs
    a CGI request several ms (its regexes), and a writer parses lines only
    when it records a tail.
    """
    global _json_scan
    if _json_scan is None:
        _json_scan = _make_json_scanner()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        value, end = _json_scan(text, 0)
        if text[end:].strip():
            value = None
    except Exception:  # not JSON (or no C scanner): json itself decides, the rare case
        import json
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
    return value if isinstance(value, dict) else None


#: The JSON scanner _json_object uses, scan(text, index) -> (value, end); made on first use.
_json_scan = None


def _make_json_scanner():
    """Return json's C scanner set up as json.loads does it (None where `_json` lacks it).

    Its error path needs json.decoder loaded, so _json_object hands every
    error to json.loads, which also gives the verdict.
    """
    constants = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}

    class Settings:  # the attributes c_make_scanner reads off a JSONDecoder
        strict, object_hook, object_pairs_hook = True, None, None
        parse_float, parse_int, parse_constant = float, int, constants.__getitem__
    try:
        from _json import make_scanner
        return make_scanner(Settings())
    except (ImportError, TypeError, AttributeError):
        return None


def _line_in_place(config, stored, key, pending):
    """Say whether a remembered id's line is still where it was written; if so, queue its file's sync.

    A line a power cut took before its sync (its id's record survived) is
    not in place: the repeat stores it again. A file replaced or moved away
    since can't be looked at: its record is trusted.
    """
    file, identity, at, size = stored
    if identity is None or at is None:  # remembered by an older version: trusted
        return True
    if identity == pending.identity:
        fd = pending.fd
    else:
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return True
        if _identity(os.fstat(fd)) != identity:
            os.close(fd)
            return True
        pending.others.append(fd)
    data = os.pread(fd, size, at)
    if len(data) == size and data.endswith(b"\n") and ('"event_id": "%s"' % key).encode() in data:
        if fd is not pending.fd and not config.jsonl_fsync:
            os.close(pending.others.pop())
        return True
    if fd is not pending.fd:
        os.close(pending.others.pop())
    return False


def _make_durable(config, state, pending):
    """Step 6: fdatasync the line (or a repeat's line) after COMMIT; if that fails, undo what can be undone.

    On a failed sync the line is cut back if nothing follows it and its id is
    forgotten, so SMSC's retry stores it again (503, never a 200 for a line
    that may not be on disk).
    """
    try:
        if _PAUSES:
            _pause("committed")
        if config.jsonl_fsync:
            for fd in pending.descriptors():
                try:
                    _fdatasync(fd)
                except OSError as exc:
                    if pending.event_id is not None and fd == pending.fd:
                        _unstore(state, pending)
                    raise _write_error(pending.path, exc) from None
        if _PAUSES:
            _pause("synced")
    finally:
        pending.close()


def _unstore(state, pending):
    """After a failed sync: cut our line back if it is still last, and forget its id (best effort).

    A line the quick write left unrecorded has no id to forget: cut back, or
    (others' lines behind it) left in the tail, where the retry finds it.
    """
    try:
        state.begin()
        try:
            _fcntl.flock(pending.fd, _fcntl.LOCK_EX)
            if os.fstat(pending.fd).st_size == pending.end:
                os.ftruncate(pending.fd, pending.start)
                if pending.recorded:
                    state.set_file(pending.identity, pending.path, pending.start, time.time())
            # else others' lines follow it: it stays, and the retry writes a second one
            if pending.recorded:
                state.forget(pending.event_id)
            state.commit()
        except BaseException:
            state.rollback()
            raise
    except (OSError, HandlerError):
        pass  # the retry finds the id: it checks the line is in place and syncs again


def _append_if_new(config, state, event, path, line, now):
    """The quick write (see the protocol above): append a new id's line with no transaction.

    For a new id, to a file the store knows, while every other known file is
    in place with a short, recent tail. Anything else — a repeat, a new,
    moved, cut or idle file, a long tail, no flock on the folder (NFS) —
    returns None having written nothing, and the full protocol takes over.
    Returns the _Pending to finish with _make_durable, or None.
    """
    if state._queue is None:
        return None
    key = event["event_id"]
    state._join_queue()
    fd, handed_over = None, False
    try:
        try:
            fd = os.open(path, _APPEND_FLAGS)
        except OSError:
            return None  # a new file (or an unusable one): the full protocol makes it, or says why not
        fd = _lock_current(fd, path, config.file_mode)
        stat = os.fstat(fd)
        identity, size = _identity(stat), stat.st_size
        rows, recorded = state.files_and_seen(key)
        if recorded:
            return None  # a repeat: the full protocol finds its line and syncs it
        committed = None
        for row_identity, row_path, end, written_at in rows:
            if row_identity == identity:
                committed = end
            elif not _other_file_clear(row_path, row_identity, end, written_at, key, now):
                return None
        if committed is None or not committed <= size <= committed + _TAIL_MAX:
            return None  # new to the store, cut back, or a tail to record the full way
        if size > committed and _tail_has(fd, committed, size, key):
            return None  # a repeat of a line in the tail: the full protocol adopts it
        data, _at = _terminated(fd, line, size)
        _write_or_cut_back(fd, data, size)
        if _PAUSES:
            _pause("appended")
        pending = _Pending(fd, path, identity, key, size, size + len(data))
        prune = _should_prune()  # in the same transaction: about one write in a hundred records its tail early
        pending.recorded = prune or pending.end - committed >= INDEX_LAG
        if pending.recorded:
            _record_tail(state, pending, committed, now, prune)
        _unlock(fd)
        handed_over = True  # the descriptor is the pending's now: _make_durable closes it
    except OSError as exc:  # the lock, a read, the write: nothing acknowledged, SMSC retries
        raise _write_error(path, exc) from None
    finally:
        state._leave_queue()
        if fd is not None and not handed_over:
            os.close(fd)
    if pending.recorded and os.urandom(1)[0] < CHECKPOINT_CHANCE * 16:
        state.checkpoint()  # a commit every ~19 callbacks: checkpoint about as often per page as before
    return pending


def _other_file_clear(path, identity, end, written_at, key, now):
    """Whether another known file lets the quick write go on: in place, not cut, tail short, recent, without `key`."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    if _identity(stat) != identity or stat.st_size < end:
        return False
    if stat.st_size == end:
        return now - (written_at or 0) <= _IDLE_FILE_SECONDS  # an idle one is forgotten the full way
    if stat.st_size - end > _TAIL_MAX or time.time() - stat.st_mtime > _TAIL_IDLE_SECONDS:
        return False  # no one writes it now: the full way records its tail
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _identity(os.fstat(fd)) == identity and not _tail_has(fd, end, stat.st_size, key)
    finally:
        os.close(fd)


def _record_tail(state, pending, committed, now, prune):
    """Record every line of the tail, ours last, and the file's new end, in one transaction (queue held)."""
    state._run("BEGIN IMMEDIATE")
    try:
        _record_lines(state, pending.fd, pending.path, pending.identity, committed, pending.end, now)
        state.set_file(pending.identity, pending.path, pending.end, now)
        if prune:
            state.prune(state.config.dedupe_keep_days, now)
        if _PAUSES:
            _pause("committing")
        state._run("COMMIT")
    except BaseException:
        state.rollback()  # the tail, our line in it, stays for the next writer
        raise


def store_event(config: Config, event: dict, now: float | None = None) -> str | None:
    """Store an event once and run its inline hook: the one place "200 means stored" is made.

    Returns the JSON-lines file written (None when jsonl is off). Raises
    StorageError when the line or its dedupe record could not be written, and
    HookError when the hook failed with on_failure = retry. With dedupe on (or
    an inline hook), a repeat writes nothing new but runs a hook that has not
    yet succeeded; with dedupe on, a process killed at any instant leaves one
    line or none (the committed-end protocol above): SMSC's retry stores it once.
    """
    now = time.time() if now is None else now
    path = event_path(config, event["kind"], now) if config.jsonl_enabled else None
    line = event_line(event)
    hook_inline = config.hook_inline
    if path or config.dedupe_enabled or hook_inline:
        ensure_data_dir(config)
    state = None
    if config.dedupe_enabled or hook_inline:
        state = _open_state(config)
    event_key = event["event_id"]
    claim, kept_line, hook_path = "run", None, path
    try:
        if hook_inline:
            state.apply_pending_hooks()  # successes the store could not take at once: never run twice
        if config.dedupe_enabled and path and not hook_inline:
            pending = _append_if_new(config, state, event, path, line, now)
            if pending is not None:
                _make_durable(config, state, pending)
                return path
        if config.dedupe_enabled:
            pending, hook_line = None, line
            state.begin()
            try:
                if _PAUSES:
                    _pause("begun")
                if path:
                    hook_path, adopted, pending = _append_once(config, state, event, path, line, now)
                    hook_line = adopted or line
                elif not state.remember_new(event_key, event["kind"], path, now):
                    hook_path = state.seen_file(event_key) or path
                if hook_inline:
                    claim, kept_line = state.claim_hook(event_key, now, _hook_lease(config), hook_line)
                if _should_prune():
                    state.prune(config.dedupe_keep_days, now)
                if _PAUSES:
                    _pause("committing")
                state.commit()
            except BaseException:
                state.rollback()
                if pending is not None:
                    pending.close()  # the line stays past the committed end: the next writer adopts it
                raise
            if pending is not None:
                _make_durable(config, state, pending)
        else:
            if hook_inline:
                # The hook's record knows the event: SMSC's retry of a failed hook adds no line.
                claim, kept_line, hook_path = _store_hooked(config, state, event, path, line, now)
            elif path:
                append_line(path, line, config.jsonl_fsync, config.file_mode)
            if state is not None and _should_prune():
                try:
                    state.prune(config.dedupe_keep_days, now)  # hook outcomes, with dedupe off
                except StorageError as exc:  # the line is stored: a 503 would make the retry write it again
                    _log().warning("pruning old hook outcomes failed: %s", exc.reason)
        if not hook_inline or claim == "done":
            return path
        if claim == "busy":
            if config.hook_on_failure == "ignore":
                return path  # the answer doesn't wait on the hook: stored is enough
            raise HookError("the hook is still running for this event (an earlier delivery)")
        # A retry's hook gets the line stored the first time, and that line's file.
        line = kept_line or line
        ok, error, recorded = _run_claimed(config, state, event, line, hook_path, now)
        if not recorded:
            _drop_state(config)  # its connection may be what failed: reopen next time
        if not ok:
            if config.hook_on_failure == "retry":
                raise HookError("hook failed: %s" % error)
            # The hook's last stderr line may echo the event (an SMS text): escaped.
            _log().warning("hook failed for event %s (on_failure = ignore): %s", event_key, _log_text(error))
        return path
    except HookError:
        raise
    except BaseException:
        if state is not None:
            _drop_state(config)  # its connection may be what failed: reopen next time
        raise


########################################################################
# The hook
########################################################################

def hook_environment(event: dict, path: str | None) -> dict:
    """Return the hook's clean environment: never the request's HTTP_* (httpoxy)."""
    env = {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "HOME": os.environ.get("HOME") or "/",
        "SMSC_EVENT_KIND": event["kind"],
        "SMSC_EVENT_ID": event["event_id"],
        "SMSC_EVENT_FILE": path or "",
    }
    return env


def run_hook(config: Config, event: dict, line: bytes | None = None, path: str | None = None,
             renew=None):
    """Run the hook command for one event; return (ok, error text or None).

    argv from the configured line, never a shell; the event JSON on stdin; the
    config file's folder as working folder. The wait is bounded by [hook]
    timeout, then the whole process group is killed. stdin and stderr are
    temporary files, not pipes, so a background job the hook leaves running
    can't keep the request waiting. `renew()`, when given, is called every
    HOOK_RENEW_SECONDS while the hook runs. Never raises for the hook's sake:
    a hook that can't be started or fed (a full temporary folder, an argv the
    system refuses) is a failed hook.
    """
    import subprocess
    import tempfile
    line = event_line(event) if line is None else line
    program = config.hook_command[0]
    files = []
    try:
        try:
            stdin = tempfile.TemporaryFile()
            files.append(stdin)
            stderr = tempfile.TemporaryFile()
            files.append(stderr)
            stdin.write(line)
            stdin.flush()
            stdin.seek(0)
        except OSError as exc:
            return False, "cannot feed %s: temporary file: %s" % (program, exc.strerror or exc)
        try:
            child = _start_hook(
                config.hook_command, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr,
                env=hook_environment(event, path),
                cwd=config.base_dir if os.path.isdir(config.base_dir) else None,
                start_new_session=True, close_fds=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return False, "cannot start %s: %s" % (program, getattr(exc, "strerror", None) or exc)
        returncode = _wait_hook(child, config.hook_timeout, renew)
        if _STOP is not None:
            _STOP["child"] = None
            if _STOP["requested"] and returncode != 0:
                return False, "interrupted"  # killed by forward's/replay's stop
        if returncode is None:
            return False, "timed out after %g s" % config.hook_timeout
        if returncode == 0:
            return True, None
        try:
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
            last = stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        text = "exit status %s" % returncode
        return False, text + (": " + last[0][:200] if last else "")
    finally:
        for file in files:
            try:
                file.close()
            except OSError:
                pass


def _start_hook(argv, **options):
    """Start the hook with Popen; a Ctrl-C meanwhile kills it once it exists, then interrupts.

    Python raises KeyboardInterrupt between any two steps: one inside Popen,
    after the fork, would leave a hook running that no one waits for or records.
    """
    import signal
    import subprocess
    import threading
    if threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(argv, **options)  # only the main thread gets KeyboardInterrupt
    if _STOP is not None:  # forward/replay: their SIGINT/SIGTERM handler kills it, if asked to
        _STOP["child"] = child = subprocess.Popen(argv, **options)
        if _STOP["requested"]:
            _kill_group(child)  # asked before it was known: it was not killed yet
        return child
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return subprocess.Popen(argv, **options)  # no KeyboardInterrupt can come here
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_args: interrupted.append(True))
    try:
        child = subprocess.Popen(argv, **options)
    except BaseException:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        _kill_group(child)
        raise KeyboardInterrupt
    return child


def _wait_hook(child, timeout, renew=None):
    """Wait for the hook up to `timeout` seconds; return its exit status, or None when killed.

    On timeout the whole process group is killed. A hook that exited 0 just
    as the timeout struck did its work: its 0 is returned, so it is not run again.
    """
    import subprocess
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return child.wait(timeout=max(0.0, left if renew is None else min(left, HOOK_RENEW_SECONDS)))
        except subprocess.TimeoutExpired:
            if renew is not None and time.monotonic() < deadline:
                renew()
                continue
        except KeyboardInterrupt:
            # `forward` stopped by Ctrl-C: no hook left running unrecorded (it runs again next time).
            _kill_group(child)
            raise
        return _kill_group(child)


def _kill_group(child):
    """Kill a hook's whole process group; return 0 if it had exited 0 by itself, else None."""
    import signal
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        pass
    returncode = child.wait()
    return 0 if returncode == 0 else None


def _run_claimed(config, state, event, line, path, claimed_at):
    """Run a hook claimed at `claimed_at` and record its outcome; return (ok, error, recorded).

    A long hook renews its claim while it runs, so no other runner takes it
    for dead. A success the state store can't take is kept in the journal
    data_dir/hooks.pending (fsynced), recorded by the next claim: it is
    never run again. recorded is False when the store failed (journal or not).
    """
    event_key = event["event_id"]
    token = [claimed_at]

    def renew():
        now = time.time()
        try:
            if state.renew_hook_claim(event_key, token[0], now):
                token[0] = now
        except StorageError as exc:
            _log().warning("could not renew the hook claim of event %s: %s", event_key, exc.reason)

    long_hook = config.hook_timeout + 30 > _hook_lease(config)
    try:
        ok, error = run_hook(config, event, line, path, renew if long_hook else None)
    except KeyboardInterrupt:
        # Stopped mid-hook (the hook was killed): give the claim back, so the next runner needn't wait.
        try:
            state.finish_hook(event_key, False, "interrupted", time.time(), token[0], line)
        except StorageError:
            pass
        raise
    try:
        state.finish_hook(event_key, ok, error, time.time(), token[0], line)
        return ok, error, True
    except StorageError as exc:
        if not ok:
            # The claim lapses after its lease and the hook is run again: a failure is retried anyway.
            _log().error("could not record the hook failure of event %s: %s", event_key, exc.reason)
            return ok, error, False
        reason = exc.reason
    try:
        _journal_success(config, event_key, time.time())
        _log().warning("hook succeeded for event %s, but the state store failed (%s): the success "
                       "waits in %s for the next request", event_key, reason, PENDING_FILE)
    except OSError as exc:
        _log().error("hook succeeded for event %s, but neither the state store (%s) nor %s took "
                     "its outcome (%s): it may run again", event_key, reason, PENDING_FILE,
                     exc.strerror or exc)
    return ok, error, False


def _journal_success(config, event_key, now):
    """Append a hook success to data_dir/hooks.pending, fsynced (raises OSError)."""
    record = (to_json({"event_id": event_key, "ok": True, "at": now}) + "\n").encode("ascii")
    path = os.path.join(config.data_dir, PENDING_FILE)
    for _ in range(100):
        fd = _open_append(path, config.file_mode)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:
                continue  # recorded and removed while we waited for the lock: a new journal
            size = os.lseek(fd, 0, os.SEEK_END)
            if size and os.pread(fd, 1, size - 1) != b"\n":
                record = b"\n" + record  # after a torn record (a crash mid-append)
            if os.write(fd, record) != len(record):
                raise OSError(28, "short write (disk full?)")
            os.fsync(fd)
            return
        finally:
            os.close(fd)
    raise OSError(11, "%s keeps being replaced" % PENDING_FILE)


def _pending_records(data: bytes) -> list:
    """Return (event_id, at) of each whole success record in the journal's bytes."""
    import json
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
            records.append((str(record["event_id"]), float(record["at"])))
        except (ValueError, TypeError, KeyError):
            continue  # a record torn by a crash: its hook ran but its success was not kept
    return records


def _store_hooked(config, state, event, path, line, now):
    """Store and claim an event with dedupe off and an inline hook: return (claim, kept line, file).

    The hook's record stands in for the dedupe id: an event it knows (SMSC's
    retry after a failed hook, a repeat) writes no second line, and its hook
    gets the line stored first and that line's file.
    """
    event_key = event["event_id"]
    state.begin()
    try:
        known = state.hook_row(event_key) is not None
        if not known and path:
            append_line(path, line, config.jsonl_fsync, config.file_mode)
        claim, kept_line = state.claim_hook(event_key, now, _hook_lease(config), line)
        state.commit()
    except BaseException:
        state.rollback()
        raise
    hook_path = path
    if known and path and kept_line and "{date}" in config.jsonl_path:
        import json
        try:
            first = _event_time(json.loads(kept_line))
        except ValueError:
            first = 0
        if first:
            hook_path = event_path(config, event["kind"], first)
    return claim, kept_line, hook_path


########################################################################
# Readiness: would a callback be stored? (the health line and `check`)
########################################################################

def _first_existing(path):
    """Return `path` or its nearest ancestor that exists."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _hook_program(config: Config) -> str | None:
    """Return the hook's executable as the hook will find it (None: not found)."""
    import shutil
    program = config.hook_command[0]
    if os.sep not in program:
        return shutil.which(program, path=os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin")
    return program if os.path.isfile(program) and os.access(program, os.X_OK) else None


def storage_problem(config: Config) -> str | None:
    """Say why a callback could not be stored now (None: it could), creating and writing nothing.

    Looks with stat()/access() only, so the health line (GET /) can ask on
    every call: data_dir (or the folder it would be created in), the state
    store and today's JSON-lines files.
    """
    folder = config.data_dir
    if not os.path.isdir(folder):
        ancestor = _first_existing(folder)
        if not os.path.isdir(ancestor):
            return "data_dir %s cannot be created: %s is a file, not a folder" % (folder, ancestor)
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return ("data_dir %s does not exist and this user (uid %d) cannot create it in %s"
                    % (folder, os.getuid(), ancestor))
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return "data_dir %s is not writable by this user (uid %d)" % (folder, os.getuid())
    files = [os.path.join(folder, STATE_FILE)] if config.dedupe_enabled or config.hook_command else []
    if config.jsonl_enabled:
        files += [event_path(config, kind) for kind in KINDS]
    for path in files:
        if os.path.lexists(path) and not os.access(path, os.R_OK | os.W_OK):
            return "%s is not writable by this user (uid %d)" % (path, os.getuid())
    return None


def readiness_problem(config: Config) -> str | None:
    """Say why a callback would not be stored now (None: it would): storage, or an inline hook that must run."""
    problem = storage_problem(config)
    if problem is None and config.hook_inline and config.hook_on_failure == "retry" \
            and _hook_program(config) is None:
        problem = "[hook] command %s is not an executable file" % config.hook_command[0]
    return problem


########################################################################
# WSGI application: the one place errors become answers
########################################################################

#: Reason phrases of the statuses the handler answers (http.HTTPStatus builds
#: an enum at import: 0.7 ms of a CGI request).
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


def _reason(status):
    """Return the WSGI status line for a code."""
    return _STATUS_LINES[status]


_STATUS_LINES = {status: "%d %s" % (status, reason) for status, reason in REASONS.items()}


#: Longest body drained (read and dropped) from a refused request. Under
#: Apache's mod_cgid a CGI that exits without reading its POST body leaves the
#: request hanging; past this, the client is abusive and gets cut off.
MAX_DRAIN_BYTES = 64 * 1024 * 1024


def _drain(stream, length):
    """Read and drop up to `length` bytes (capped at MAX_DRAIN_BYTES)."""
    left = min(length, MAX_DRAIN_BYTES)
    try:
        while left > 0:
            chunk = stream.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass  # the client went away or stalled (a read timeout): nothing more to drop


def _declared_length(environ) -> int | None:
    """Return CONTENT_LENGTH as an int: None when absent, -1 when not a number of ASCII digits.

    int() would read ' 12', '+12', '1_2' and Arabic-Indic digits, and raise
    on 4,301+ digits; no gateway passes such a length, and none is guessed.
    """
    text = environ.get("CONTENT_LENGTH")
    if not text:
        return None
    if text.isdigit() and text.isascii() and len(text.lstrip("0")) <= 18:
        return int(text)
    return -1


def read_body(environ, limit: int) -> bytes:
    """Read the whole declared body.

    Raises PayloadTooLarge (after draining) past `limit`; BadRequest when the
    body comes shorter than its Content-Length (the client closed early or
    stalled past a read timeout: SMSC's full retry must not become a second
    event) or the length is not a number; BadRequest with 411 for a POST with
    no length the gateway can end (never read to EOF: a CGI's stdin may not end).
    """
    stream = environ.get("wsgi.input")
    length = _declared_length(environ)
    if stream is None:
        return b""
    if length == -1:
        raise BadRequest("Content-Length is not a number")
    try:
        if not length:
            if not environ.get("wsgi.input_terminated"):
                if length is None and environ.get("REQUEST_METHOD", "").upper() == "POST":
                    raise BadRequest("POST without Content-Length", status=411)
                return b""
            chunks, size = [], 0
            while size <= limit:  # chunked: the server ends the stream
                chunk = stream.read(limit + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                _drain(stream, MAX_DRAIN_BYTES)
                raise PayloadTooLarge("body over max_body_bytes")
            return b"".join(chunks)
        if length > limit:
            _drain(stream, length)
            raise PayloadTooLarge("body over max_body_bytes (%d bytes declared)" % length)
        body = stream.read(length) or b""  # None: a non-blocking stream with nothing yet
        if len(body) == length:
            return body  # the usual case: one read
        chunks, left = [body], length - len(body)
        while left > 0 and chunks[-1]:  # a short read: more may follow, b"" is the end
            chunks.append(stream.read(left) or b"")
            left -= len(chunks[-1])
    except OSError:
        # A reset, or a read timeout (serve, uWSGI): the body never came whole.
        raise BadRequest("body not received whole (the connection failed or timed out)") from None
    if left > 0:
        raise BadRequest("body shorter than its Content-Length (%d of %d bytes)" % (length - left, length))
    return b"".join(chunks)


def _in_networks(address, networks):
    """Whether an address is in one of the networks (IPv4-mapped IPv6 as IPv4)."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip.version == net.version and ip in net for net in networks)


def client_address(environ, trusted_proxies=()) -> str:
    """Return the client address: the right-most X-Forwarded-For hop not a trusted proxy."""
    address = environ.get("REMOTE_ADDR") or ""
    if not trusted_proxies or not _in_networks(address, trusted_proxies):
        return address
    hops = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, trusted_proxies):
            return hop
    return hops[0] if hops else address


def _answer(start_response, status, body=b"", headers=(), head=False):
    """Start a text/plain answer and return its body iterable."""
    header_list = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body)))]
    header_list.extend(headers)
    start_response(_reason(status), header_list)
    return [] if head else [body]


class Handler:
    """The WSGI application: one request read top to bottom, one place errors become answers.

    Built from a loaded config (make_app), or from a config path loaded on
    first use (load_app): a broken config answers 503 with Retry-After (SMSC
    keeps retrying) and logs why, until a request finds it fixed.
    """

    def __init__(self, config: Config | None = None, config_path: str | None = None):
        self.config = config
        self.config_path = config_path

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET").upper()
        seen = {"body": b"", "remote_addr": environ.get("REMOTE_ADDR")}
        try:
            try:
                return self.handle(environ, start_response, method, seen)
            except HandlerError as error:
                return self.refuse(environ, start_response, error, method, seen)
        except Exception:
            # A bug: the traceback goes to the server's log, never to the client.
            import traceback
            errors = environ.get("wsgi.errors") or sys.stderr
            errors.write("smsc_handler: internal error\n" + traceback.format_exc())
            errors.flush()
            return _answer(start_response, 500, b"Internal Server Error\n", head=method == "HEAD")

    def handle(self, environ, start_response, method, seen):
        """Answer one request; refusals and failures are raised as HandlerError."""
        if method not in ("GET", "HEAD", "POST"):
            _drain_all(environ)
            raise MethodNotAllowed("method %s not allowed" % method[:16])
        config = self.loaded_config(environ)
        try:
            seen["body"] = read_body(environ, config.max_body_bytes)
        finally:
            seen["remote_addr"] = client_address(environ, config.trusted_proxies)
        if config.allowed_ips and not _in_networks(seen["remote_addr"], config.allowed_ips):
            raise Forbidden("client address not in allowed_ips")
        if method == "HEAD" or (method == "GET" and not environ.get("QUERY_STRING")):
            problem = readiness_problem(config)  # SPEC §3: "ready" only when a callback would be stored
            if problem:
                raise StorageError("health check: " + problem)
            return _answer(start_response, 200, b"smsc_handler " + __version__.encode()
                           + b": ready for SMSC callbacks\n", head=method == "HEAD")
        self.accept(config, environ, seen["body"], seen["remote_addr"])
        return _answer(start_response, 200, b"OK")

    def loaded_config(self, environ) -> Config:
        """Return the config, loading it on first use; ConfigError (after draining) if broken."""
        if self.config is None:
            try:
                self.config = load_config(find_config(self.config_path))
            except ConfigError:
                _drain_all(environ)
                raise
        return self.config

    def accept(self, config, environ, body, remote_addr):
        """Decode, verify, normalize and store one callback (raises HandlerError)."""
        # WSGI gives the query as latin-1 text of the bytes sent (PEP 3333).
        query = environ.get("QUERY_STRING")
        query = query.encode("latin-1", "replace") if query else b""
        request = decode_request(body, query, environ.get("CONTENT_TYPE", ""), config.default_charset)
        if not request.params.get("phone"):
            raise BadRequest("no phone parameter: not an SMSC callback")
        kind = classify(request.params)
        try:
            signature = verify_signature(kind, request, config.secrets, config.require_signature,
                                         config.hash_alg)
        except SignatureError as error:
            error.status = config.bad_signature_status
            raise
        if signature is not None and signature["valid"] is None:
            _log().warning("a %s hash was sent but no [handler] secret is set: accepted "
                           "unchecked", signature["alg"])
        now = time.time()  # one moment: received_at and a {date} file name agree
        event = normalize(request, signature, remote_addr, now, config.timezone, body, query)
        store_event(config, event, now)

    def refuse(self, environ, start_response, error, method, seen):
        """Turn a HandlerError into its answer, one log line, and rejected.jsonl if kept."""
        if error.keep_rejected and self.config is not None:
            keep_rejected(self.config, environ, seen["body"], error, seen["remote_addr"])
        log = _log()
        # The reason may quote the client (the method) and the address may come from X-Forwarded-For.
        (log.error if error.status >= 500 else log.warning)(
            "%d %s (from %s)", error.status, _log_text(error.reason), _log_text(seen["remote_addr"]))
        return _error_answer(start_response, error, method == "HEAD")


def _drain_all(environ):
    """Read and drop the declared body (mod_cgid waits for a CGI to read it)."""
    length = _declared_length(environ)
    if length is not None and length > 0 and environ.get("wsgi.input") is not None:
        _drain(environ["wsgi.input"], length)


def _error_answer(start_response, error, head=False):
    """Answer a HandlerError: its status, a short text, Allow or Retry-After."""
    headers = []
    text = {400: "Bad Request: %s\n" % error.reason,
            503: "Service Unavailable: try again later\n"}.get(error.status)
    if text is None:
        text = _reason(error.status)[4:] + "\n"
    if error.status == 405:
        headers.append(("Allow", "GET, HEAD, POST"))
    if error.status == 503:
        headers.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
    return _answer(start_response, error.status, text.encode("utf-8"), headers, head)


def make_app(config: Config):
    """Return the WSGI application for a loaded config."""
    return Handler(config)


def load_app(config_path: str | None = None):
    """Return the WSGI application that loads its config (found as find_config says) on first use."""
    return Handler(None, config_path)


#: The WSGI application with the config found as the module docstring says.
application = load_app()


########################################################################
# Gateways: CGI and the local server
########################################################################

def run_cgi(app=None, end_process=False) -> None:
    """Serve one CGI request (handler.cgi calls this, with end_process=True).

    end_process: once the answer is out, end the process at once
    (``os._exit(0)``, see _end_cgi_process) instead of returning.
    """
    global _one_request_per_process
    _one_request_per_process = True
    os.environ.setdefault("PATH_INFO", "")  # as bottle's CGI adapter does
    app = application if app is None else app
    if sys.platform == "win32":  # IIS and friends need wsgiref's per-server decoding
        from wsgiref.handlers import CGIHandler
        CGIHandler().run(app)
        return
    _CGIWriter(_cgi_environ()).run(app)
    if end_process:
        _end_cgi_process()


def _end_cgi_process() -> None:
    """End a CGI process whose answer is written, skipping the interpreter's teardown.

    The teardown (every module's objects freed one by one) costs a request
    about 2 ms, a fifth of a bare interpreter's start, and does nothing it
    needs: here the state store is closed as atexit would (checkpoint and
    all), logging's files flushed, the answer and stderr flushed. A process
    with another thread alive ends the ordinary way, which waits for it.
    """
    _close_states()
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the web server closed the pipe: nothing left to tell it
            pass
    os._exit(0)


#: CGI variables that carry request bytes: wsgiref.handlers' read_environ gives them as
#: latin-1 text of those bytes (PEP 3333's "bytes as str"), and so does _cgi_environ.
_CGI_REQUEST_VARIABLES = frozenset((
    "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "AUTH_TYPE",
    "CONTENT_TYPE", "CONTENT_LENGTH", "HTTPS", "REMOTE_USER", "REMOTE_IDENT"))


def _cgi_request_variable(name):
    """Whether a CGI variable came from the request (as wsgiref.handlers decides)."""
    while name.startswith("REDIRECT_"):
        name = name[9:]
    return name in _CGI_REQUEST_VARIABLES or name.startswith(("HTTP_", "SSL_"))


def _cgi_environ(environ=None) -> dict:
    """Return the WSGI environ of this CGI process, as wsgiref's CGIHandler builds it (POSIX)."""
    encoding = sys.getfilesystemencoding()
    environ = dict(os.environ if environ is None else environ)
    for name, value in environ.items():
        if _cgi_request_variable(name):
            environ[name] = value.encode(encoding, "surrogateescape").decode("latin-1")
    environ.update({
        "wsgi.input": sys.stdin.buffer, "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
        "wsgi.run_once": True,
        "wsgi.url_scheme": "https" if environ.get("HTTPS") in ("yes", "on", "1") else "http",
        "wsgi.multithread": False, "wsgi.multiprocess": True})
    return environ


#: CGIHandler's answer when the application itself raises (the Handler never lets an
#: Exception out; this is for BaseException: KeyboardInterrupt, SystemExit).
_CGI_ERROR = ("500 Internal Server Error", [("Content-Type", "text/plain")],
              b"A server error occurred.  Please contact the administrator.")


class _CGIWriter:
    """Run a WSGI application as one CGI request, byte for byte as wsgiref's CGIHandler.

    PEP 3333's own CGI example, plus CGIHandler's two touches: a one-block
    answer without Content-Length gets one, an answer with no body at all
    gets ``Content-Length: 0``. wsgiref.handlers imports ``re`` (through
    wsgiref.headers), which costs a CGI request more than all its own work.
    """

    def __init__(self, environ, stdout=None):
        self.environ = environ
        self.stdout = sys.stdout.buffer if stdout is None else stdout
        self.status = self.headers = None
        self.sent = False
        self.blocks = None

    def start_response(self, status, headers, exc_info=None):
        """Take the status and headers (PEP 3333), sent with the first block."""
        if exc_info:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle through the traceback
        elif self.headers is not None:
            raise AssertionError("Headers already set!")
        if type(status) is not str or len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
            raise AssertionError("Status must be a str like '200 OK'")
        for name, value in headers:
            if type(name) is not str or type(value) is not str:
                raise AssertionError("Header names and values must be str")
        self.status, self.headers = status, list(headers)
        return self.write

    def _has(self, name):
        """Whether the answer has a header (names compare case-insensitively)."""
        name = name.lower()
        return any(key.lower() == name for key, _value in self.headers)

    def write(self, data):
        """Write one block of the body, the status and headers first (PEP 3333's write())."""
        if type(data) is not bytes:
            raise AssertionError("write() argument must be a bytes instance")
        if not self.status:
            raise AssertionError("write() before start_response()")
        if not self.sent:
            if self.blocks == 1 and not self._has("Content-Length"):
                self.headers.append(("Content-Length", str(len(data))))
            self._send_headers()
        self.stdout.write(data)
        self.stdout.flush()

    def _send_headers(self):
        """Write the Status line and the headers (CGI's form of the status line, RFC 3875)."""
        self.sent = True
        lines = ["Status: %s" % self.status] + ["%s: %s" % header for header in self.headers]
        self.stdout.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def finish(self, result):
        """Write every block of `result`, then close it (PEP 3333)."""
        try:
            try:
                self.blocks = len(result)
            except (TypeError, AttributeError, NotImplementedError):
                pass
            for data in result:
                self.write(data)
            if not self.sent:
                if not self._has("Content-Length"):
                    self.headers.append(("Content-Length", "0"))
                self._send_headers()
                self.stdout.flush()
        finally:
            if hasattr(result, "close"):
                result.close()

    def run(self, app):
        """Answer the request with `app`; a failure before the headers went out answers 500."""
        try:
            self.finish(app(self.environ, self.start_response))
        except (ConnectionAbortedError, BrokenPipeError, ConnectionResetError):
            return  # the client went away
        except BaseException:
            import traceback
            traceback.print_exc(file=self.environ["wsgi.errors"])
            self.environ["wsgi.errors"].flush()
            if not self.sent:
                self.status = self.headers = None
                self.blocks = None
                status, headers, body = _CGI_ERROR
                self.start_response(status, headers[:], sys.exc_info())
                self.finish([body])


#: Seconds `serve` waits on a client's socket (request line, headers, each read of
#: the body, the answer): a client sending less than its Content-Length must
#: not hold a thread forever. SMSC sends a whole callback at once.
SERVE_TIMEOUT = 30


class _ChunkedInput:
    """A Transfer-Encoding: chunked request body, de-chunked (wsgiref serves none itself)."""

    def __init__(self, raw):
        self.raw = raw
        self.left = 0  # bytes left in the current chunk
        self.first = True
        self.done = False

    def _next_chunk(self):
        """Read the CRLF that ends the last chunk and the next chunk-size line (1-16 hex digits)."""
        if not self.first and self.raw.readline(3) not in (b"\r\n", b"\n"):
            raise BadRequest("chunked body malformed")
        self.first = False
        line = self.raw.readline(1026)
        if not line.endswith(b"\n"):
            raise BadRequest("chunked body malformed" if line else "chunked body cut short")
        size = line.split(b";")[0].strip()
        if not (0 < len(size) <= 16 and all(byte in _HEX_DIGITS for byte in size)):
            raise BadRequest("chunked body malformed")
        self.left = int(size, 16)
        self.done = not self.left  # trailers, if any, stay unread: the connection closes

    def read(self, size=-1):
        """Return up to `size` bytes of the body (all of it for -1); b"" at its end."""
        out = []
        wanted = size if size is not None and size >= 0 else 1 << 62
        while wanted > 0 and not self.done:
            if not self.left:
                self._next_chunk()
                continue
            data = self.raw.read(min(wanted, self.left))
            if not data:
                raise BadRequest("chunked body cut short")
            out.append(data)
            self.left -= len(data)
            wanted -= len(data)
        return b"".join(out)

    def readline(self, size=-1):
        """Return the body up to a newline (byte by byte: nobody reads a callback by lines)."""
        out = b""
        while (size is None or size < 0 or len(out) < size) and not out.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            out += byte
        return out


def serve(app, host="127.0.0.1", port=8080, ready=None, timeout=SERVE_TIMEOUT):
    """Run `app` on a threaded wsgiref server until interrupted."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        """wsgiref server, one thread per request."""
        daemon_threads = True

        def handle_error(self, request, client_address):
            """Log a client that stalled or went away in one line; anything else with its traceback."""
            error = sys.exc_info()[1]
            if isinstance(error, OSError):
                sys.stderr.write("%s connection dropped: %s\n" % (
                    _log_text(client_address[0]), _log_text(error.strerror or error)))
            else:
                super().handle_error(request, client_address)

        def process_request_thread(self, request, client_address):
            import _thread
            try:
                super().process_request_thread(request, client_address)
            finally:
                _close_states(_thread.get_ident())  # the thread ends: so does its connection
        if ":" in host:
            import socket
            address_family = socket.AF_INET6

    class QuietHandler(WSGIRequestHandler):
        """Request handler logging one line per request to stderr."""

        def log_message(self, format, *args):  # one line per request, on stderr
            # The request line is the client's text: escaped, so ESC/CR/LF can't forge log lines.
            sys.stderr.write("%s %s\n" % (self.address_string(), _log_text(format % args)))

        def parse_request(self):
            """Parse the request, and de-chunk a chunked body (wsgiref would leave it unread)."""
            if not super().parse_request():
                return False
            self.chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            if self.chunked:
                self.rfile = _ChunkedInput(self.rfile)  # handle() gives self.rfile to the app
            return True

        def get_environ(self):
            environ = super().get_environ()
            if self.chunked:
                environ["wsgi.input_terminated"] = True  # read_body reads it to its end
                environ.pop("CONTENT_LENGTH", None)  # a chunked request's length is no length
            return environ

    QuietHandler.timeout = timeout  # StreamRequestHandler.setup sets it on the socket

    server = make_server(host, port, app, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()


########################################################################
# Reading stored events: one iterator over dated and rotated files
########################################################################

#: Endings of rotated pieces that a reader can't read line by line (logrotate's compress).
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z")


def file_identity(path: str) -> str | None:
    """Return a file's identity, "device:inode" (None when it is missing)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return "%d:%d" % (stat.st_dev, stat.st_ino)


def rotated_pieces(path: str) -> list:
    """Return the uncompressed rotated pieces of `path`, oldest first.

    logrotate renames ``status.jsonl`` to ``status.jsonl.1`` (then .2 …) or,
    with dateext, to ``status.jsonl-YYYYMMDD``; with delaycompress the newest
    piece stays plain, which is the one a reader may still have to finish.
    """
    import glob
    pieces = []
    for pattern in (glob.escape(path) + ".[0-9]*", glob.escape(path) + "-[0-9]*"):
        for piece in glob.glob(pattern):
            if piece.endswith(_COMPRESSED):
                continue
            try:
                pieces.append((os.stat(piece).st_mtime_ns, piece))
            except OSError:
                continue
    return [piece for _mtime, piece in sorted(pieces)]


def stored_names(config: Config, kinds=KINDS) -> list:
    """Return the JSON-lines file names to read, oldest date first.

    Beside event_files, an undated name that was just renamed away (rotated,
    its successor not created yet) is listed while a rotated piece of it
    exists: a reader still has that piece to finish.
    """
    names = event_files(config, kinds)
    if "{date}" not in config.jsonl_path:
        for kind in kinds:
            name = event_path(config, kind)
            if name not in names and rotated_pieces(name):
                names.append(name)
    return names


def read_plan(path: str, offset: int = 0, identity: str | None = None, history=False) -> list:
    """Return [(piece, offset, identity)] to read, in order, to go on from a stored position.

    The position (`offset` in the file known as `identity`) was taken in the
    file named `path`. When `path` is another file now (rotated), the old one
    is found among its rotated pieces and finished first, then any newer
    piece, then `path` from its start (SPEC §11). Without a position, only
    `path` is read — or, with `history`, its rotated pieces first (all of
    them with True; with Unix seconds, those written to since then: a
    reader that started watching then, before the file was first rotated).
    """
    current = file_identity(path)
    plan = []
    if identity is not None and identity == current:
        try:
            if os.path.getsize(path) < offset:
                offset = 0  # truncated (copytruncate): read again from the start
        except OSError:
            return []
        return [(path, offset, current)]
    if identity is not None or history:
        found = identity is None
        for piece in rotated_pieces(path):
            piece_identity = file_identity(piece)
            if found:
                if identity is None and history is not True and _mtime(piece) < history:
                    continue  # rotated before this reader started: not its business
                plan.append((piece, 0, piece_identity))
            elif piece_identity == identity:
                found = True
                plan.append((piece, offset, piece_identity))
    if current is not None:
        plan.append((path, 0, current))
    return plan


def _mtime(path) -> float:
    """Return a file's mtime (0 when it is gone)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _finished(file, end: int) -> bool:
    """Whether an open rotated piece holds nothing past `end`, checked under its flock.

    A writer that opened the file before it was renamed may still append to
    it; append_line checks under the same lock that its file still has its
    name, so once this returns True nobody writes there any more.
    """
    global _fcntl
    if _fcntl is None:
        import fcntl as _fcntl
    try:
        _fcntl.flock(file.fileno(), _fcntl.LOCK_SH)
    except OSError:
        pass
    try:
        return os.fstat(file.fileno()).st_size <= end
    finally:
        try:
            _fcntl.flock(file.fileno(), _fcntl.LOCK_UN)
        except OSError:
            pass


def resume_lines(path: str, offset: int = 0, identity: str | None = None, history=False):
    """Yield (piece, identity, end, line) for each complete line after a stored position.

    Follows read_plan: a rotated predecessor is read to its end (checked
    under its lock) before its successor. Each piece is read from one open
    descriptor, checked to be the file planned, so a rotation during the
    read (names shifting: .1 to .2) skips nothing. Store (end, identity) as
    the new position of `path` after handling each line.
    """
    plan = read_plan(path, offset, identity, history)
    for _turn in range(100):  # each turn finishes one piece; a hundred rotations mid-read is absurd
        if not plan:
            return
        piece, done, piece_identity = plan[0]
        try:
            file = open(piece, "rb")
        except FileNotFoundError:
            file = None
        if file is None or "%d:%d" % (os.fstat(file.fileno()).st_dev, os.fstat(file.fileno()).st_ino) \
                != piece_identity:
            if file is not None:
                file.close()
            # Renamed since planned: plan again from this piece (found by its identity).
            again = read_plan(path, done, piece_identity, history)
            plan = again if again and again[0][2] == piece_identity else plan[1:]
            continue
        with file:
            last = len(plan) == 1
            while True:
                file.seek(done)
                for line in file:  # _open_lines, inline: this loop carries every line
                    if not line.endswith(b"\n"):
                        break  # a write in progress, or a crash: not an event (yet)
                    done += len(line)
                    yield piece, piece_identity, done, line
                if last or _finished(file, done):
                    break
        if last:
            return
        again = read_plan(path, done, piece_identity, history)
        plan = again[1:] if again and again[0][2] == piece_identity else plan[1:]


def _stored_lines(config, kinds=KINDS, positions=None, history=False, since=None):
    """Yield (name, piece, end, line) of every line not yet read; advance `positions` in place."""
    if positions is None:
        positions = {}
    since_day = None if since is None else time.strftime("%Y-%m-%d", time.gmtime(since))
    dated = "{date}" in config.jsonl_path
    for name in stored_names(config, kinds):
        if since_day is not None and dated and _path_date(config, name) < since_day:
            continue  # a whole day received before --since
        offset, known = positions.get(name, (0, None))
        for piece, identity, end, line in resume_lines(name, offset, known, history):
            positions[name] = (end, identity)
            yield name, piece, end, line


def iter_stored(config: Config, kinds=KINDS, since: float | None = None, positions: dict | None = None,
                history=False):
    """Yield (path, end offset, event) for every stored event, oldest date first.

    `path` is the file the line is in now. `since`: only events received at
    or after these Unix seconds. `positions` ({file name: (offset,
    identity)}) is where reading starts, and is advanced as events are
    yielded, so a later call goes on from there across rotation. `history`
    also reads the rotated pieces of a file never read before.
    """
    import json
    for _name, piece, end, line in _stored_lines(config, kinds, positions, history, since):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a mended torn line
        if isinstance(event, dict) and (since is None or _event_time(event) >= since):
            yield piece, end, event


########################################################################
# Tracking: the current state of each message (SPEC §10)
########################################################################

def _time_rank(status: dict):
    """Rank statuses by time: a later ts first (none below any), then the greater code, then err."""
    ts = status.get("ts")
    code = status.get("status")
    return (ts is not None, ts if ts is not None else 0, code if code is not None else -(1 << 62),
            status.get("err") or 0)


def _state_rank(status: dict):
    """Rank statuses of one message (SPEC §10): any final one first, then by time."""
    return (status.get("final") is True,) + _time_rank(status)


def current_state(statuses) -> dict | None:
    """Return the status that decides a message's state; a function of the set (SPEC §10).

    Any final status beats every non-final one; among them the latest `ts`
    wins, ties go to the greater status code; a status without a `ts` ranks
    below every one with it. None when there are no statuses.
    """
    return max(statuses, key=_state_rank, default=None)


def _carried(statuses, field):
    """Return `field` of the latest status that carries one (by ts, then code), or None."""
    carrying = [status for status in statuses if status.get(field) is not None]
    return max(carrying, key=_time_rank)[field] if carrying else None


def _row_rank(row):
    """_time_rank of an index row (msg, key, kind, file, received, status, err, ts, final, cost, sender)."""
    ts, code = row[7], row[5]
    return (ts is not None, ts if ts is not None else 0, code if code is not None else -(1 << 62), row[6] or 0)


def _decide(rows):
    """Return (current status row, its cost, its sender) of a message from its index rows.

    current_state's rule over rows instead of dicts (the catch-up decides
    hundreds of thousands of messages): ranked once by time, the current
    status is the first final one in that order (else the first), and a
    carried field comes from the first row that has it. The property test
    holds the index's answers to message_state's.
    """
    if len(rows) == 1:
        only = rows[0]
        return only, only[9], only[10]
    ordered = sorted(rows, key=_row_rank, reverse=True)
    best = next((row for row in ordered if row[8] == 1), ordered[0])
    cost = next((row[9] for row in ordered if row[9] is not None), None)
    sender = next((row[10] for row in ordered if row[10] is not None), None)
    return best, cost, sender


def outcome_of(status: dict | None) -> str:
    """Return "delivered", "failed" or "pending" for a message's current status."""
    if status is None or status.get("final") is not True:
        return "pending"
    return "delivered" if status.get("status") in DELIVERED_CODES else "failed"


#: Status codes that mean the message reached the subscriber (delivered, read, link clicked).
DELIVERED_CODES = (1, 2, 4)


def phone_digits(phone) -> str:
    """Return the digits of a phone number: "+7 (999) 123-45-67" -> "79991234567"."""
    text = str(phone or "")
    if text.isascii() and text.isdigit():
        return text
    return "".join(c for c in text if "0" <= c <= "9")


def message_state(message_id, phone, statuses) -> dict:
    """Build a message's state (SPEC §10) from its statuses: dicts with status, ts, final, err, cost, received_at."""
    best = current_state(statuses) or {}
    code = best.get("status")
    history = sorted(statuses, key=lambda s: _time_rank(s) + (s.get("received_at") or "",))
    return {
        "id": message_id, "phone": phone, "status": code,
        "status_name": status_info(code)[0] if code is not None else None,
        "final": status_info(code)[1] if code is not None else None, "outcome": outcome_of(best),
        "err": best.get("err"), "err_name": error_name(best.get("err") or 0),
        "cost": _carried(statuses, "cost"), "at": _utc_iso(best.get("ts")),
        "history": [{"status": s.get("status"),
                     "status_name": status_info(s["status"])[0] if s.get("status") is not None else None,
                     "err": s.get("err"), "at": _utc_iso(s.get("ts")), "received_at": s.get("received_at")}
                    for s in history],
    }


########################################################################
# The tracking index: data_dir/index.sqlite3, caught up by the reading verbs
########################################################################

INDEX_FILE = "index.sqlite3"

#: Bumped when the index's tables change: an index of another version is rebuilt.
INDEX_VERSION = 4

#: Seconds a reader waits for another process catching the index up.
INDEX_PATIENCE = 120

#: Lines read between two commits of a catch-up (each commit keeps its positions).
INDEX_BATCH = 50000

#: event kind -> the fields the index reads from its line.
_INDEXED_FIELDS = {
    "status": frozenset(("kind", "event_id", "received_at", "id", "phone", "status", "final", "ts", "err", "cost",
                         "sender")),
    "incoming": frozenset(("kind", "event_id", "received_at", "phone")),
    "waitcall": frozenset(("kind", "event_id", "received_at", "phone", "ts")),
    None: frozenset(("kind",)),
}

#: event kind -> the small number the index stores.
_KIND_NUMBERS = {"status": 0, "incoming": 1, "waitcall": 2}

#: A status row is kept under its message (msg, then the event_id's first 63 bits): one
#: message's statuses share a page, and a repeat of an event is the same key. Messages
#: are numbered as they first appear, so new rows go at the end of each tree (a catch-up
#: writes pages in proportion to what it adds, not to the index's size). Other kinds
#: go under msg 0. messages_outcome finds the report's newest failed and stuck messages
#: (and counts the stuck ones) without reading every message.
_INDEX_SCHEMA = """
CREATE TABLE files (file INTEGER PRIMARY KEY, name TEXT UNIQUE, offset INTEGER, identity TEXT);
CREATE TABLE events (
    msg INTEGER NOT NULL, key INTEGER NOT NULL, kind INTEGER, file INTEGER, received INTEGER,
    status INTEGER, err INTEGER, ts INTEGER, final INTEGER, cost REAL, sender TEXT,
    digits TEXT, line TEXT, PRIMARY KEY (msg, key)) WITHOUT ROWID;
CREATE INDEX events_received ON events (received);
CREATE INDEX events_calls ON events (digits, received) WHERE kind = 2;
CREATE TABLE messages (
    msg INTEGER PRIMARY KEY, id TEXT, phone TEXT, digits TEXT, status INTEGER, err INTEGER,
    ts INTEGER, final INTEGER, outcome TEXT, cost REAL, sender TEXT, first INTEGER, last INTEGER);
CREATE UNIQUE INDEX messages_pair ON messages (id, phone);
CREATE INDEX messages_outcome ON messages (outcome, last);
CREATE TABLE day_events (
    day TEXT, kind TEXT, status TEXT, err TEXT, sender TEXT, n INTEGER,
    PRIMARY KEY (day, kind, status, err, sender)) WITHOUT ROWID;
CREATE TABLE day_messages (
    day TEXT, outcome TEXT, status TEXT, err TEXT, sender TEXT, n INTEGER, cost REAL,
    PRIMARY KEY (day, outcome, status, err, sender)) WITHOUT ROWID;
"""


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _received_ms(text) -> int:
    """Unix milliseconds of a received_at (YYYY-MM-DDTHH:MM:SS.mmmZ); 0 when unreadable."""
    try:
        minute = _MINUTES.get(text[:16])
        if minute is None:
            if len(_MINUTES) > 100000:
                _MINUTES.clear()
            minute = _MINUTES[text[:16]] = ((_days_from_civil(int(text[0:4]), int(text[5:7]), int(text[8:10]))
                                             * 24 + int(text[11:13])) * 60 + int(text[14:16])) * 60000
        return minute + int(text[17:19]) * 1000 + (int(text[20:23]) if text[19:20] == "." else 0)
    except (TypeError, ValueError):
        return 0


#: "YYYY-MM-DDTHH:MM" -> its Unix milliseconds (callbacks come in bursts: each minute parsed once).
_MINUTES = {}


def _ms_text(ms) -> str:
    """Format Unix milliseconds as received_at is written."""
    return "%s.%03dZ" % (_utc_iso(ms // 1000)[:-1], ms % 1000)


def _day_of(ms) -> str:
    """Return the UTC YYYY-MM-DD of Unix milliseconds."""
    number = ms // 86400000
    day = _DAYS.get(number)
    if day is None:
        day = _DAYS[number] = time.strftime("%Y-%m-%d", time.gmtime(number * 86400))
    return day


#: days since 1970 -> their YYYY-MM-DD (a catch-up asks for the same few days again and again).
_DAYS = {}


def _day_start_ms(day) -> int:
    """Return the Unix milliseconds at which a UTC YYYY-MM-DD begins."""
    return _days_from_civil(int(day[0:4]), int(day[5:7]), int(day[8:10])) * 86400000


def _text(value) -> str:
    """A bucket value as the aggregate tables keep it ("" when absent)."""
    return "" if value is None else str(value)


class TrackingIndex:
    """The tracking index (SPEC §10): data_dir/index.sqlite3, a cache of the JSON-lines files.

    Every reader catches it up first (catch_up) from where the files were
    last read, under a lock so one process at a time writes; the positions
    are committed with the rows they cover, so a crash repeats nothing and
    skips nothing. A missing, damaged or outdated index is rebuilt from the
    files. Safe from many threads (one TrackingIndex each) and processes.
    """

    def __init__(self, config: Config):
        import sqlite3
        self._sqlite3 = sqlite3
        self.config = config
        self.path = None
        self._lock = None
        self.db = None
        if not os.path.isdir(config.data_dir):
            self.db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self.db.executescript(_INDEX_SCHEMA)
            self.path = None  # nothing stored yet: an empty index, nothing created
            return
        self.path = os.path.join(config.data_dir, INDEX_FILE)
        self._open()

    # -- opening, locking, rebuilding --------------------------------------------------

    def _connect(self):
        """Connect to the index file (created with file_mode when missing)."""
        if not os.path.exists(self.path):
            os.close(_open_append(self.path, self.config.file_mode))
        self.db = self._sqlite3.connect(self.path, timeout=INDEX_PATIENCE, isolation_level=None,
                                        check_same_thread=False)
        self.inode = os.stat(self.path).st_ino
        self.db.execute("PRAGMA busy_timeout = %d" % (INDEX_PATIENCE * 1000))
        # Up to 128 MB of page cache and 256 MB mapped: a first catch-up of millions of events
        # inserts all over its trees (SQLite takes what it needs, not all of it).
        self.db.execute("PRAGMA cache_size = -131072")
        self.db.execute("PRAGMA mmap_size = 268435456")
        self.db.execute("PRAGMA synchronous = NORMAL")

    def _open(self):
        """Connect to the index, creating (or rebuilding) its tables when needed."""
        sqlite3 = self._sqlite3
        try:
            self._connect()
            if self.db.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:
                self._with_lock(self._reset)
        except sqlite3.DatabaseError as exc:
            why = str(exc)
            self._with_lock(lambda: self._replace_file(why))
        except OSError as exc:
            raise StorageError("tracking index %s unusable: %s (run the command as the user that "
                               "owns the data folder)" % (INDEX_FILE, exc.strerror or exc)) from None

    def _reset(self, asked=False):
        """Empty the index (new, outdated or asked for): every table made again, in one transaction."""
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == INDEX_VERSION and not asked:
            return  # another process made it meanwhile
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                db.execute('DROP TABLE IF EXISTS "%s"' % name.replace('"', '""'))
            for statement in _INDEX_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("PRAGMA user_version = %d" % INDEX_VERSION)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if version and not asked:
            _log().warning("tracking index %s was of version %s: rebuilt from the JSON-lines files",
                           INDEX_FILE, version)

    def _replace_file(self, why):
        """Replace a damaged index file by a new one (caught up afterwards)."""
        _log().warning("tracking index %s damaged (%s): rebuilt from the JSON-lines files", INDEX_FILE, why)
        if self.db is not None:
            try:
                self.db.close()
            except self._sqlite3.Error:
                pass
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(self.path + suffix)
            except FileNotFoundError:
                pass
        self._connect()
        self._reset()

    def _with_lock(self, work):
        """Run `work` holding data_dir/index.lock (one writer of the index at a time)."""
        global _fcntl
        if _fcntl is None:
            import fcntl as _fcntl
        if self.path is None or self._lock is not None:
            return work()
        self._lock = _open_append(os.path.join(self.config.data_dir, "index.lock"), self.config.file_mode)
        try:
            deadline = time.monotonic() + INDEX_PATIENCE
            while True:
                try:
                    _fcntl.flock(self._lock, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError("tracking index busy: another process held it over %d s"
                                           % INDEX_PATIENCE) from None
                    time.sleep(0.01)
            if self.db is not None and file_identity(self.path) is not None \
                    and os.stat(self.path).st_ino != self.inode:
                self.db.close()  # another process replaced a damaged file meanwhile
                self._connect()
            return work()
        finally:
            os.close(self._lock)
            self._lock = None

    def close(self):
        """Close the connection."""
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rebuild(self) -> int:
        """Forget everything and index every file again; return the number of events indexed."""
        if self.path is None:
            return 0

        def work():
            self._reset(asked=True)
            return self._catch_up()
        return self._run(lambda: self._with_lock(work))

    def _run(self, work):
        """Run `work`; a damaged index is rebuilt once, other SQLite errors become StorageError."""
        try:
            return work()
        except self._sqlite3.DatabaseError as error:
            exc = error
            if self.path is None or isinstance(exc, self._sqlite3.OperationalError) and (
                    "locked" in str(exc) or "readonly" in str(exc) or "disk" in str(exc)):
                raise StorageError("tracking index: %s" % exc) from None
        why = str(exc)

        def rebuild():
            self._replace_file(why)
            self._catch_up()
        try:
            self._with_lock(rebuild)
            return work()
        except self._sqlite3.DatabaseError as exc:
            raise StorageError("tracking index: %s" % exc) from None

    # -- catching up -------------------------------------------------------------------

    def catch_up(self) -> int:
        """Index the lines added to the JSON-lines files since the last call; return how many events."""
        if self.path is None:
            if not os.path.isdir(self.config.data_dir):
                return 0
            self.db.close()  # the data folder appeared: from now on, the real index
            self.path = os.path.join(self.config.data_dir, INDEX_FILE)
            self._open()
        return self._run(lambda: self._with_lock(self._catch_up))

    def _catch_up(self):
        """Read new lines, index their events, refresh the messages they touch; commit per batch."""
        import json
        db = self.db
        numbers, positions = {}, {}
        for number, name, offset, identity in db.execute("SELECT file, name, offset, identity FROM files"):
            numbers[name] = number
            positions[name] = (offset, identity)
        start = dict(positions)
        # The scanner itself: each line is one object (ensure_ascii: decoding as UTF-8 is enough).
        decode, kinds, needed = json.JSONDecoder().raw_decode, _KIND_NUMBERS, _INDEXED_FIELDS
        rows = {}  # (message (id, phone) or None, key) -> (row, day): a repeat within the batch is one row

        def add(name, line):
            """Parse one line into a row of the batch (nothing when it holds no event)."""
            try:
                # The fields indexed come before "dtmf" (a status) or "remote_addr" in every line the
                # handler writes: decode that part only ("params" repeats the rest). Any doubt, all of it.
                cut = line.find(b', "dtmf": ')  # a status: sender is the last field read
                if cut < 0:
                    cut = line.find(b', "remote_addr": ')
                event = decode(line[:cut].decode("utf-8", "surrogateescape") + "}")[0] if cut > 0 else None
                if event is None or not needed[event.get("kind")] <= event.keys():
                    event = decode(line.decode("utf-8", "surrogateescape"))[0]
                kind = kinds[event["kind"]]
                key = int(event["event_id"][:16], 16) >> 1
            except (ValueError, KeyError, TypeError, AttributeError):
                return  # a mended torn line, or not an event
            number = numbers.get(name)
            if number is None:
                number = numbers[name] = db.execute(
                    "INSERT INTO files (name, offset, identity) VALUES (?, 0, NULL)", (name,)).lastrowid
            received_at = event.get("received_at")
            received = _received_ms(received_at)
            day = received_at[:10] if received else "1970-01-01"
            if kind == 0:
                message_id, phone = event.get("id"), event.get("phone")
                pair = ("" if message_id is None else str(message_id), "" if phone is None else str(phone))
                cost = event.get("cost")
                rows[pair, key] = ((None, key, 0, number, received, event.get("status"), event.get("err"),
                                   event.get("ts"), 1 if event.get("final") is True else 0,
                                   cost if isinstance(cost, (int, float)) else None, event.get("sender"), None, None),
                                  day)
            else:
                rows[None, key] = ((0, key, kind, number, received, None, None, event.get("ts"), None, None, None,
                                 phone_digits(event.get("phone")), line.decode("utf-8", "replace").rstrip("\n")),
                                day)

        total, pending = 0, 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for name, _piece, _end, line in _stored_lines(self.config, KINDS, positions, history=True):
                # `positions` already counts this line: commit only after it is added.
                add(name, line)
                pending += 1
                if pending >= INDEX_BATCH:
                    total += self._commit_batch(numbers, positions, start, rows)
                    start, pending = dict(positions), 0
                    rows.clear()
                    db.execute("BEGIN IMMEDIATE")
            total += self._commit_batch(numbers, positions, start, rows)
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except self._sqlite3.Error:
                pass
            raise
        return total

    def _message_numbers(self, pairs):
        """Return ({(id, phone): msg}, the new numbers) for a batch's messages, new ones after the last."""
        db = self.db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS pairs (id TEXT, phone TEXT)")
        db.execute("DELETE FROM temp.pairs")
        db.executemany("INSERT INTO temp.pairs VALUES (?, ?)", pairs)
        numbers = dict(((message_id, phone), msg) for message_id, phone, msg in db.execute(
            "SELECT t.id, t.phone, m.msg FROM temp.pairs t CROSS JOIN main.messages m "
            "ON m.id = t.id AND m.phone = t.phone"))
        db.execute("DELETE FROM temp.pairs")
        last = db.execute("SELECT coalesce(max(msg), 0) FROM messages").fetchone()[0]
        new = set()
        for pair in pairs:
            if pair not in numbers:
                last += 1
                numbers[pair] = last
                new.add(last)
        return numbers, new

    def _commit_batch(self, numbers, positions, start, batch):
        """Add a batch's new events, the day counts and the messages they touch, and the positions; commit.

        `batch`: {(message or None, key): (row, day)}. Usually none is
        indexed yet and they go in at once; when some are (the total of
        changes says so), those are found and left out first.
        """
        db = self.db
        added = 0
        if batch:
            pairs = list(dict.fromkeys(pair for pair, _key in batch if pair is not None))
            msgs, new = self._message_numbers(pairs)
            messages = {msg: pair for pair, msg in msgs.items()}
            rows = {}
            for (pair, key), (row, day) in batch.items():
                msg = 0 if pair is None else msgs[pair]
                rows[msg, key] = ((msg,) + row[1:], day)
            insert = "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            before = db.total_changes
            db.execute("SAVEPOINT batch")
            db.executemany(insert, [row for row, _day in rows.values()])
            if db.total_changes - before != len(rows):
                db.execute("ROLLBACK TO batch")
                db.execute("CREATE TEMP TABLE IF NOT EXISTS keys (msg INTEGER, key INTEGER)")
                db.execute("DELETE FROM temp.keys")
                db.executemany("INSERT INTO temp.keys VALUES (?, ?)", list(rows))
                for known in db.execute("SELECT t.msg, t.key FROM temp.keys t CROSS JOIN main.events e "
                                        "ON e.msg = t.msg AND e.key = t.key").fetchall():
                    del rows[known]
                db.execute("DELETE FROM temp.keys")
                db.executemany(insert, [row for row, _day in rows.values()])
            db.execute("RELEASE batch")
            day_events, fresh = {}, {}
            for (msg, _key), (row, day) in rows.items():
                bucket = (day, row[2], row[5], row[6], row[10])
                day_events[bucket] = day_events.get(bucket, 0) + 1
                if row[2] == 0:
                    fresh.setdefault(msg, []).append(row)
            added = len(rows)
            self._refresh_messages({msg: messages[msg] for msg in fresh}, fresh, new)
            self._add_day_events([((day, KINDS[kind], _text(status), _text(err), _text(sender)), n)
                                  for (day, kind, status, err, sender), n in day_events.items()], 1)
        for name, (offset, identity) in positions.items():
            if start.get(name) == (offset, identity):
                continue
            if name not in numbers:
                numbers[name] = db.execute("INSERT INTO files (name, offset, identity) VALUES (?, ?, ?)",
                                           (name, offset, identity)).lastrowid
            else:
                db.execute("UPDATE files SET offset = ?, identity = ? WHERE file = ?",
                           (offset, identity, numbers[name]))
        db.execute("COMMIT")
        return added

    def _add_day_events(self, day_events, sign):
        """Add (or, sign -1, take away) [(bucket, n)] to the per-day event counts."""
        db = self.db
        # Two statements, not an upsert: hosts still run SQLite older than 3.24.
        db.executemany("INSERT OR IGNORE INTO day_events VALUES (?, ?, ?, ?, ?, 0)",
                       [bucket for bucket, _n in day_events])
        db.executemany("UPDATE day_events SET n = n + ? WHERE day = ? AND kind = ? AND status = ? AND err = ? "
                       "AND sender = ?", [(sign * n,) + bucket for bucket, n in day_events])
        if sign < 0:
            db.execute("DELETE FROM day_events WHERE n <= 0")

    def _refresh_messages(self, touched, fresh=None, new=None):
        """Recompute each touched message's state from all its statuses (current_state), and the day counts.

        `touched`: {message number: (id, phone)}; `fresh`: {message number:
        [its rows just added]}, all there is of a message in `new` (numbered
        by this batch). A message left with no status (prune) is removed.
        """
        if not touched:
            return
        db = self.db
        known = [msg for msg in touched if new is None or msg not in new]
        old, statuses = {}, {}
        if known:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS touched (msg INTEGER PRIMARY KEY)")
            db.execute("DELETE FROM temp.touched")
            db.executemany("INSERT OR IGNORE INTO temp.touched VALUES (?)", [(msg,) for msg in known])
            old = {row[0]: row[1:] for row in db.execute(
                "SELECT msg, first, outcome, status, err, sender, cost FROM main.messages "
                "WHERE msg IN (SELECT msg FROM temp.touched)")}
            for row in db.execute(
                    # CROSS JOIN: from the few touched messages into the index, never a scan of every event.
                    "SELECT e.msg, e.key, e.kind, e.file, e.received, e.status, e.err, e.ts, e.final, e.cost, "
                    "e.sender FROM temp.touched t CROSS JOIN main.events e ON e.msg = t.msg"):
                statuses.setdefault(row[0], []).append(row)
            db.execute("DELETE FROM temp.touched")
        if fresh is not None:
            for msg, rows in fresh.items():
                if msg not in old:  # new: all its statuses are in this batch
                    statuses[msg] = rows
        deltas = {}

        def count(day, outcome, status, err, sender, cost, sign):
            bucket = (day, outcome, status, err, sender)
            n, total = deltas.get(bucket, (0, 0.0))
            deltas[bucket] = (n + sign, total + sign * (cost or 0.0))

        inserts, updates, gone = [], [], []
        for msg, (message_id, phone) in touched.items():
            before = old.get(msg)
            if before is not None:
                count(_day_of(before[0]), *before[1:], -1)
            mine = statuses.get(msg)
            if not mine:
                gone.append((msg,))
                continue
            best, cost, sender = _decide(mine)
            final = best[8] == 1
            outcome = ("delivered" if best[5] in DELIVERED_CODES else "failed") if final else "pending"
            first = min(row[4] for row in mine)
            last = max(row[4] for row in mine)
            values = (best[5], best[6], best[7], 1 if final else 0, outcome, cost, sender, first, last)
            if before is None:
                inserts.append((msg, message_id, phone, phone_digits(phone)) + values)
            else:
                updates.append(values + (msg,))
            count(_day_of(first), outcome, best[5], best[6], sender, cost, 1)
        db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", inserts)
        db.executemany("UPDATE messages SET status = ?, err = ?, ts = ?, final = ?, outcome = ?, cost = ?, "
                       "sender = ?, first = ?, last = ? WHERE msg = ?", updates)
        db.executemany("DELETE FROM messages WHERE msg = ?", gone)
        rows = [(day, outcome, _text(status), _text(err), _text(sender), n, total)
                for (day, outcome, status, err, sender), (n, total) in deltas.items() if n or total]
        db.executemany("INSERT OR IGNORE INTO day_messages VALUES (?, ?, ?, ?, ?, 0, 0.0)",
                       [row[:5] for row in rows])
        db.executemany("UPDATE day_messages SET n = n + ?, cost = cost + ? WHERE day = ? AND outcome = ? "
                       "AND status = ? AND err = ? AND sender = ?", [row[5:] + row[:5] for row in rows])
        if any(n < 0 for _b, (n, _t) in deltas.items()):
            db.execute("DELETE FROM day_messages WHERE n <= 0")

    def forget_file(self, name: str) -> int:
        """Drop a file's events (prune); the messages they touched are recomputed. Return how many."""
        if self.path is None:
            return 0

        def work():
            db = self.db
            row = db.execute("SELECT file FROM files WHERE name = ?", (name,)).fetchone()
            if row is None:
                return 0
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = db.execute("SELECT key, kind, received, status, err, sender, msg FROM events "
                                  "WHERE file = ?", (row[0],)).fetchall()
                deltas, touched = {}, {}
                for _key, kind, received, status, err, sender, msg in gone:
                    kind_name = KINDS[kind]
                    bucket = (_day_of(received), kind_name, _text(status), _text(err), _text(sender))
                    deltas[bucket] = deltas.get(bucket, 0) + 1
                    if kind == 0:
                        touched[msg] = None
                db.execute("DELETE FROM events WHERE file = ?", (row[0],))
                for msg in touched:
                    found = db.execute("SELECT id, phone FROM messages WHERE msg = ?", (msg,)).fetchone()
                    touched[msg] = found or (None, None)
                self._refresh_messages(touched)
                self._add_day_events(list(deltas.items()), -1)
                db.execute("DELETE FROM files WHERE file = ?", (row[0],))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return len(gone)
        return self._run(lambda: self._with_lock(work))

    # -- questions ---------------------------------------------------------------------

    def _history(self, msg):
        """Return the statuses of one message as message_state takes them."""
        return [{"status": s, "err": e, "ts": t, "final": f == 1, "cost": c,
                 "received_at": _ms_text(r)}
                for s, e, t, f, c, r in self.db.execute(
                    "SELECT status, err, ts, final, cost, received FROM events WHERE msg = ?", (msg,))]

    def states(self, message_id, phone=None) -> list:
        """Return the state of message `message_id` (one per phone; [] when unknown)."""
        digits = None if phone is None else phone_digits(phone)

        def work():
            rows = self.db.execute("SELECT msg, id, phone, digits FROM messages WHERE id = ? ORDER BY phone",
                                   (str(message_id),)).fetchall()
            return [message_state(mid, ph, self._history(msg)) for msg, mid, ph, dg in rows
                    if digits is None or dg == digits]
        return self._run(work)

    def messages(self, since=None, outcome=None, limit=None) -> list:
        """Return message states (without history) whose last status came since `since`, by current ts."""
        clauses, params = [], []
        if since is not None:
            clauses.append("last >= ?")
            params.append(int(since * 1000))
        if outcome is not None:
            clauses.append("outcome = ?")
            params.append(outcome)
        sql = ("SELECT id, phone, status, final, outcome, err, cost, ts, first, last, sender FROM messages"
               + (" WHERE " + " AND ".join(clauses) if clauses else "")
               + " ORDER BY ts IS NOT NULL, ts, last")
        if limit is not None:
            sql = "SELECT * FROM (%s DESC LIMIT %d) ORDER BY ts IS NOT NULL, ts, last" % (
                sql.replace("ORDER BY ts IS NOT NULL, ts, last", "ORDER BY ts IS NOT NULL DESC, ts DESC, last"),
                int(limit))

        def work():
            return [_message_dict(row) for row in self.db.execute(sql, params)]
        return self._run(work)

    def calls(self, phone, since=None) -> list:
        """Return the waitcall events from `phone` (compared by digits) received since `since`."""
        import json
        sql = "SELECT line FROM events WHERE kind = 2 AND digits = ? AND received >= ? ORDER BY received"
        params = (phone_digits(phone), 0 if since is None else int(since * 1000))
        return self._run(lambda: [json.loads(line) for (line,) in self.db.execute(sql, params)])

    def latest(self, kind, n=10, since=None, until=None) -> list:
        """Return the newest `n` incoming or waitcall events in a range, newest last."""
        import json
        low, high = _ms_range(since, until)
        sql = ("SELECT line FROM (SELECT line, received, key FROM events WHERE kind = ? AND received >= ? "
               "AND received < ? ORDER BY received DESC, key DESC LIMIT ?) ORDER BY received, key")
        params = (_KIND_NUMBERS[kind], low, high, int(n))
        return self._run(lambda: [json.loads(line) for (line,) in self.db.execute(sql, params)])

    def failures(self, n=10, since=None, until=None) -> list:
        """Return the newest `n` failed messages (first status received in the range), newest last."""
        return self._select_messages("outcome = 'failed'", n, since, until)

    def stuck(self, n=10, since=None, until=None, older_than=3600) -> list:
        """Return pending messages whose last status came over `older_than` seconds before the range's end."""
        end = time.time() if until is None else until
        return self._select_messages("outcome = 'pending' AND last < %d" % int((end - older_than) * 1000),
                                     n, since, until)

    def _select_messages(self, where, n, since, until):
        """Return message states (no history) matching `where`, newest last."""
        low, high = _ms_range(since, until)
        sql = ("SELECT id, phone, status, final, outcome, err, cost, ts, first, last, sender FROM "
               "(SELECT * FROM messages WHERE %s AND first >= ? AND first < ? ORDER BY last DESC LIMIT ?) "
               "ORDER BY last" % where)

        def work():
            return [_message_dict(row) for row in self.db.execute(sql, (low, high, int(n)))]
        return self._run(work)

    def buckets(self, since=None, until=None):
        """Return (event buckets, message buckets) of a range: {(day, …): n} and {(day, …): (n, cost)}.

        Whole days come from the day tables; the part-days at either end of
        the range are counted from the rows, so any range is exact.
        """
        low, high = _ms_range(since, until)
        # Whole days [whole_from, whole_to) come from the day tables, the rest from the rows.
        whole_from = "0000-00-00" if low == 0 else _day_of(low)
        if low and low != _day_start_ms(whole_from):
            whole_from = _next_day(whole_from)
        whole_to = "9999-99-99" if high == _MS_FOREVER else _day_of(high)
        events, messages = {}, {}

        def work():
            db = self.db
            if whole_from < whole_to:
                for day, kind, status, err, sender, n in db.execute(
                        "SELECT * FROM day_events WHERE day >= ? AND day < ?", (whole_from, whole_to)):
                    events[(day, kind, status, err, sender)] = n
                for day, outcome, status, err, sender, n, cost in db.execute(
                        "SELECT * FROM day_messages WHERE day >= ? AND day < ?", (whole_from, whole_to)):
                    messages[(day, outcome, status, err, sender)] = (n, cost)
                edges = [(low, _day_start_ms(whole_from) if low else 0),
                         (_day_start_ms(whole_to) if high != _MS_FOREVER else high, high)]
            else:
                edges = [(low, high)]
            for start, end in edges:
                if start >= end:
                    continue
                for kind, received, status, err, sender in db.execute(
                        "SELECT kind, received, status, err, sender FROM events WHERE received >= ? "
                        "AND received < ?", (start, end)):
                    bucket = (_day_of(received), KINDS[kind], _text(status), _text(err), _text(sender))
                    events[bucket] = events.get(bucket, 0) + 1
                for first, outcome, status, err, sender, cost in db.execute(
                        "SELECT first, outcome, status, err, sender, cost FROM messages WHERE first >= ? "
                        "AND first < ?", (start, end)):
                    bucket = (_day_of(first), outcome, _text(status), _text(err), _text(sender))
                    n, total = messages.get(bucket, (0, 0.0))
                    messages[bucket] = (n + 1, total + (cost or 0.0))
            return events, messages
        return self._run(work)

    def stats(self, since=None, until=None, by_day=False) -> dict:
        """Return the numbers `stats --json` prints for a range (SPEC §10: messages by current state)."""
        return summarize(*self.buckets(since, until), by_day=by_day)

    def sizes(self) -> dict:
        """Return counts of what the index holds: events, messages, files."""
        db = self.db
        return {"events": db.execute("SELECT count(*) FROM events").fetchone()[0],
                "messages": db.execute("SELECT count(*) FROM messages").fetchone()[0],
                "files": db.execute("SELECT count(*) FROM files").fetchone()[0]}


#: Unix milliseconds past any stored event (the open end of a range).
_MS_FOREVER = 1 << 62


def _message_dict(row) -> dict:
    """Turn a messages row (id, phone, status, final, outcome, err, cost, ts, first, last, sender) into a state."""
    message_id, phone, code, _final, outcome, err, cost, ts, first, last, sender = row
    return {"id": message_id, "phone": phone, "status": code,
            "status_name": status_info(code)[0], "final": status_info(code)[1], "outcome": outcome,
            "err": err, "err_name": error_name(err or 0), "cost": cost, "at": _utc_iso(ts), "sender": sender,
            "first_received_at": _ms_text(first), "last_received_at": _ms_text(last)}


def _ms_range(since, until):
    """Return [low, high) Unix milliseconds of a --since/--until range (None: open)."""
    return (0 if since is None else max(0, int(since * 1000)),
            _MS_FOREVER if until is None else max(0, int(until * 1000)))


def _next_day(day):
    """Return the YYYY-MM-DD after `day`."""
    return _day_of(_day_start_ms(day) + 86400000)


def _code_label(code, name_of):
    """Label a status or error bucket as stats prints it: "1 delivered"."""
    try:
        number = int(code)
    except ValueError:
        return code or "none"
    return "%d %s" % (number, name_of(number))


def summarize(events, messages, by_day=False) -> dict:
    """Turn index buckets (TrackingIndex.buckets) into the numbers of `stats --json` and the report."""
    kinds, statuses, errors, days = {}, {}, {}, {}

    def day_row(day):
        row = days.get(day)
        if row is None:
            row = days[day] = {"day": day, "events": {kind: 0 for kind in KINDS}, "messages": 0,
                               "delivered": 0, "failed": 0, "pending": 0, "cost": 0.0}
        return row

    for (day, kind, status, err, _sender), n in events.items():
        kinds[kind] = kinds.get(kind, 0) + n
        day_row(day)["events"][kind] = day_row(day)["events"].get(kind, 0) + n
        if kind != "status":
            continue
        label = _code_label(status, lambda code: status_info(code)[0])
        statuses[label] = statuses.get(label, 0) + n
        if err not in ("", "0"):
            label = _code_label(err, error_name)
            errors[label] = errors.get(label, 0) + n
    outcomes = {"delivered": 0, "failed": 0, "pending": 0}
    senders, failures, cost = {}, {}, 0.0
    for (day, outcome, _status, err, sender), (n, total) in messages.items():
        outcomes[outcome] = outcomes.get(outcome, 0) + n
        cost += total
        row = day_row(day)
        row[outcome] += n
        row["messages"] += n
        row["cost"] += total
        entry = senders.setdefault(sender or "-", {"messages": 0, "delivered": 0, "failed": 0, "pending": 0,
                                                   "cost": 0.0})
        entry["messages"] += n
        entry[outcome] += n
        entry["cost"] += total
        if outcome == "failed":
            label = _code_label(err, error_name)
            failures[label] = failures.get(label, 0) + n
    final = outcomes["delivered"] + outcomes["failed"]
    for entry in list(senders.values()) + list(days.values()):
        decided = entry["delivered"] + entry["failed"]
        entry["delivery_rate"] = round(entry["delivered"] / decided, 4) if decided else None
        entry["cost"] = round(entry["cost"], 2)
    result = {
        "events": sum(kinds.values()),
        "by_kind": kinds,
        "by_status": statuses,
        "by_error": errors,
        "by_sender": senders,
        "failures_by_error": failures,
        "messages": sum(outcomes.values()),
        "final": final,
        "delivered": outcomes["delivered"],
        "failed": outcomes["failed"],
        "pending": outcomes["pending"],
        "delivery_rate": round(outcomes["delivered"] / final, 4) if final else None,
        "total_cost": round(cost, 2),
    }
    if by_day:
        result["by_day"] = [days[day] for day in sorted(days)]
    return result


def open_index(config: Config, catch_up: bool = True) -> TrackingIndex:
    """Open the tracking index of a config, caught up with the files (close it, or use `with`)."""
    index = TrackingIndex(config)
    try:
        if catch_up:
            index.catch_up()
    except BaseException:
        index.close()
        raise
    return index


def _since_seconds(since) -> float | None:
    """Accept --since as Unix seconds or as the text --since takes."""
    if since is None or isinstance(since, (int, float)):
        return since
    return parse_since(str(since))


def message_status(message_id, phone=None, config_path=None) -> list:
    """Return the current state of a sent message, one dict per phone ([] when unknown; SPEC §10).

    Safe to call from many threads and processes while callbacks are stored:
    each call catches the index up under its lock and reads a snapshot.
    """
    with open_index(load_config(find_config(config_path))) as index:
        return index.states(message_id, phone)


def find_calls(phone, since=None, config_path=None) -> list:
    """Return the number-confirmation calls (waitcall events) from `phone` received since `since`.

    `phone` is compared by its digits; `since` is Unix seconds or the text
    `--since` takes ("10m", an ISO time).
    """
    since = _since_seconds(since)
    with open_index(load_config(find_config(config_path))) as index:
        return index.calls(phone, since)


########################################################################
# Reading side: the report (one HTML page, SPEC §14)
########################################################################

# The page is built as data: small functions take values and return Markup,
# and _html is the one place where text becomes markup (escaped), as Jinja's
# autoescape does. Much of what the page shows was written by strangers (an
# incoming SMS, a sender name), so nothing reaches the page any other way.

#: Rows shown per table of the report; the rest are counted ("N more").
REPORT_ROWS = 50
#: A range of more days than this is drawn and tabled per month (the page stays small).
REPORT_MAX_DAYS = 400
#: The per-day table is shown unfolded up to this many days.
REPORT_OPEN_DAYS = 31
#: Bars shown in the "top errors" chart.
REPORT_TOP_ERRORS = 10
#: Characters of an id, phone or menu choice shown in the report (the rest is counted).
REPORT_WORD_CHARS = 64
#: Characters of an incoming SMS shown in the report (the rest is counted).
REPORT_TEXT_CHARS = 300
#: A pending message whose last status is older than this (seconds) before
#: the end of the range is "stuck" (SPEC §14).
STUCK_AFTER_SECONDS = 3600
#: Colours of the event kinds in the charts.
KIND_COLOURS = {"status": "#3569a8", "incoming": "#2a9d6f", "waitcall": "#d98a1c"}
#: The page's style: system fonts, no external anything; every long word wraps.
REPORT_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1c2330;background:#f4f6f9}
main{max-width:76rem;margin:0 auto;padding:1rem}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.1rem;margin:0 0 .6rem}
p,h1,h2,td,dd,dt,li,summary{overflow-wrap:anywhere}
.meta{color:#5a6475;margin:0 0 1rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(8rem,1fr));gap:.6rem;margin:0 0 1rem;padding:0}
.card{background:#fff;border-radius:8px;padding:.6rem .8rem;box-shadow:0 1px 2px #0002;margin:0}
.card dt{color:#5a6475;font-size:.85rem}.card dd{margin:0;font-size:1.45rem;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,30rem),1fr));gap:1rem;margin:0 0 1rem}
.grid.wide{grid-template-columns:repeat(auto-fit,minmax(min(100%,48rem),1fr))}
section{background:#fff;border-radius:8px;padding:.8rem;box-shadow:0 1px 2px #0002;min-width:0}
svg{display:block;width:100%;height:auto;font:13px system-ui,sans-serif}
svg text{fill:#1c2330}svg .axis{stroke:#c9d0db;stroke-width:1}
.legend{list-style:none;padding:0;margin:.4rem 0 0;display:flex;flex-wrap:wrap;gap:.3rem 1rem;font-size:.9rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;vertical-align:-.1rem}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e3e7ee;vertical-align:top}
th{color:#5a6475;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.w{min-width:13ch}td.n{white-space:nowrap}
@media (max-width:40rem){thead{display:none}tr{display:block;border-bottom:1px solid #e3e7ee;padding:.3rem 0}
td,td.n{display:grid;grid-template-columns:6.5rem minmax(0,1fr);gap:.5rem;border:0;padding:.1rem 0;text-align:left}
td::before{content:attr(data-label);color:#5a6475}}
.more,.none{color:#5a6475;font-size:.9rem;margin:.4rem 0 0}
.bad{color:#b3261e}.good{color:#1d7a46}
""" + "".join(".k-%s{background:%s}" % item for item in KIND_COLOURS.items()) + "\n"
#: Everything external is refused: no scripts, fonts, images, frames or requests.
#: Only the page's own style sheet applies (named by its hash): no inline style attribute either.
REPORT_CSP = "default-src 'none'; style-src '%s'; img-src data:; base-uri 'none'; form-action 'none'"


def report_csp(css: str = "") -> str:
    """Return the page's Content-Security-Policy, allowing exactly this style sheet."""
    import base64
    import hashlib
    digest = base64.b64encode(hashlib.sha256((css or REPORT_CSS).encode("utf-8")).digest()).decode("ascii")
    return REPORT_CSP % ("sha256-" + digest)


class Markup(str):
    """Text that is already HTML: what the report's builders return."""

    __slots__ = ()


def _html(value) -> Markup:
    """Return value as HTML: Markup as it is, anything else escaped (the one place text enters markup).

    Control and bidi-override characters (U+202E…) are shown as escapes, so
    a stranger's text can't reorder what the page shows around it.
    """
    if isinstance(value, Markup):
        return value
    import html
    return Markup(html.escape(_printable(value), quote=True))


#: Elements that have no end tag.
_VOID_ELEMENTS = frozenset(("meta", "br", "circle", "rect", "line", "polyline", "path"))


def _tag(element: str, *children, **attributes) -> Markup:
    """Return one element; its attribute values and children are escaped unless Markup.

    Attribute names come from the code (``class_`` → class, ``aria_label`` →
    aria-label); None leaves an attribute out.
    """
    attrs = "".join(' %s="%s"' % (key.rstrip("_").replace("_", "-"), _html(value))
                    for key, value in attributes.items() if value is not None)
    if element in _VOID_ELEMENTS and not children:
        return Markup("<%s%s>" % (element, attrs) if element in ("meta", "br") else "<%s%s/>" % (element, attrs))
    return Markup("<%s%s>%s</%s>" % (element, attrs, _join(children), element))


def _join(parts) -> Markup:
    """Concatenate parts as HTML (each escaped unless Markup)."""
    return Markup("".join(_html(part) for part in parts))


def _count(value) -> str:
    """Show a count with thousands separators."""
    return f"{value or 0:,}"


def _money(value) -> str:
    """Show a cost with two decimals."""
    return "%.2f" % (value or 0)


def _percent(rate) -> str:
    """Show a delivery rate (0..1, or None when nothing is final yet)."""
    return "–" if rate is None else "%.1f%%" % (rate * 100)


def _moment(value) -> str:
    """Show a time (Unix seconds or ISO 8601 UTC text) as YYYY-MM-DD HH:MM:SS."""
    if isinstance(value, (int, float)):
        value = _utc_iso(int(value))
    return (value or "–")[:19].replace("T", " ")


def _duration(seconds) -> str:
    """Show a wait: 45 min, 5 h 21 min, 3 d 4 h."""
    minutes = max(0, int(seconds)) // 60
    if minutes < 60:
        return "%d min" % minutes
    if minutes < 24 * 60:
        return "%d h %02d min" % divmod(minutes, 60)
    return "%d d %d h" % (minutes // 1440, minutes % 1440 // 60)


def _clip(text, limit=REPORT_TEXT_CHARS) -> str:
    """Shorten a stranger's long text for a table cell, saying how much was left out."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    return "%s… (%s characters)" % (text[:limit], _count(len(text)))


def _nice_ceiling(value) -> float:
    """Round a chart's largest value up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1
    step = 1
    while step * 10 <= value:
        step *= 10
    while step > value * 10:  # below 1 (costs)
        step /= 10
    for factor in (1, 2, 5, 10):
        if step * factor >= value:
            return step * factor
    return step * 10


def _axis_number(value) -> str:
    """Show a chart's axis value without needless decimals."""
    return ("%.2f" % value).rstrip("0").rstrip(".") if value != int(value) else "%d" % value


#: Width and height of the per-day charts' drawing, and its margins (SVG units).
_CHART_W, _CHART_H = 440, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 10, 26


def _day_axes(days, top, label=_axis_number) -> list:
    """Return the axes of a per-day chart: value gridlines at 0, top/2, top; a few dates."""
    plot_h = _CHART_H - _TOP - _BOTTOM
    parts = []
    for fraction in (0, 0.5, 1):
        y = _TOP + plot_h * (1 - fraction)
        parts.append(_tag("line", class_="axis", x1=_LEFT, x2=_CHART_W - _RIGHT, y1="%.1f" % y, y2="%.1f" % y))
        parts.append(_tag("text", label(top * fraction), x=_LEFT - 4, y="%.1f" % (y + 4), text_anchor="end"))
    if days:
        width = (_CHART_W - _LEFT - _RIGHT) / len(days)
        shown = max(1, -(-len(days) // 5))  # at most ~5 dates fit under the chart
        for index in range(0, len(days), shown):
            x = _LEFT + width * (index + 0.5)
            name = days[index]["day"]  # a day's MM-DD, or a month's YYYY-MM
            parts.append(_tag("text", name[5:] if len(name) == 10 else name, x="%.1f" % x, y=_CHART_H - 8,
                              text_anchor="middle"))
    return parts


def _svg(label: str, height: int, parts, width: int = _CHART_W) -> Markup:
    """Wrap chart parts into an inline SVG (a described image)."""
    return _tag("svg", _tag("title", label), *parts, viewBox="0 0 %d %d" % (width, height),
                role="img", aria_label=label, preserveAspectRatio="xMidYMid meet")


def svg_stacked_days(days, series, label: str) -> Markup:
    """Draw a stacked bar per day: series is [(key, name, colour)], values day["events"][key]."""
    totals = [sum(day["events"].get(key, 0) for key, _n, _c in series) for day in days]
    top = _nice_ceiling(max(totals, default=0))
    plot_h = _CHART_H - _TOP - _BOTTOM
    width = (_CHART_W - _LEFT - _RIGHT) / max(1, len(days))
    parts = _day_axes(days, top)
    for index, day in enumerate(days):
        base = _TOP + plot_h
        for key, name, colour in series:
            value = day["events"].get(key, 0)
            if not value:
                continue
            height = plot_h * value / top
            base -= height
            parts.append(_tag("rect", _tag("title", "%s: %s %s" % (day["day"], _count(value), name)),
                              x="%.2f" % (_LEFT + width * index + width * 0.1), y="%.2f" % base,
                              width="%.2f" % (width * 0.8), height="%.2f" % height, fill=colour,
                              data_value=value))
    return _svg(label, _CHART_H, parts)


def svg_bars_days(days, key: str, label: str, colour: str, show=_axis_number) -> Markup:
    """Draw one bar per day of day[key] (cost per day)."""
    values = [day.get(key) or 0 for day in days]
    top = _nice_ceiling(max(values, default=0))
    plot_h = _CHART_H - _TOP - _BOTTOM
    width = (_CHART_W - _LEFT - _RIGHT) / max(1, len(days))
    parts = _day_axes(days, top)
    for index, (day, value) in enumerate(zip(days, values)):
        if not value:
            continue
        height = plot_h * value / top
        parts.append(_tag("rect", _tag("title", "%s: %s" % (day["day"], show(value))),
                          x="%.2f" % (_LEFT + width * index + width * 0.1), y="%.2f" % (_TOP + plot_h - height),
                          width="%.2f" % (width * 0.8), height="%.2f" % height, fill=colour, data_value=value))
    return _svg(label, _CHART_H, parts)


def svg_rate_days(days, label: str) -> Markup:
    """Draw the delivery rate per day as a line (0–100 %); days with nothing final leave a gap."""
    plot_h = _CHART_H - _TOP - _BOTTOM
    width = (_CHART_W - _LEFT - _RIGHT) / max(1, len(days))
    runs, run, dots = [], [], []
    for index, day in enumerate(days):
        rate = day.get("delivery_rate")
        if rate is None:
            runs.append(run)
            run = []
            continue
        point = (_LEFT + width * (index + 0.5), _TOP + plot_h * (1 - rate))
        run.append(point)
        dots.append(_tag("circle", _tag("title", "%s: %s" % (day["day"], _percent(rate))),
                         cx="%.2f" % point[0], cy="%.2f" % point[1], r=3, fill="#1d7a46", data_value=rate))
    runs.append(run)
    lines = [_tag("polyline", points=" ".join("%.2f,%.2f" % p for p in points), fill="none",
                  stroke="#1d7a46", stroke_width=2) for points in runs if len(points) > 1]
    return _svg(label, _CHART_H, _day_axes(days, 1, label=lambda v: "%d%%" % (v * 100)) + lines + dots)


def svg_hbars(items, label: str, colour: str, colours=None) -> Markup:
    """Draw horizontal bars, one per (name, count), the name written above its bar (colours: one per bar)."""
    row, width = 36, _CHART_W
    top = max((count for _name, count in items), default=0) or 1
    parts = []
    colours = colours or [colour] * len(items)
    for index, ((name, count), colour) in enumerate(zip(items, colours)):
        y = index * row
        length = (width - 70) * count / top
        parts.append(_tag("g",
                          _tag("title", "%s: %s" % (name, _count(count))),
                          _tag("text", name, x=0, y=y + 13),
                          _tag("rect", x=0, y=y + 17, width="%.2f" % max(length, 1), height=13, fill=colour,
                               data_value=count),
                          _tag("text", _count(count), x="%.2f" % (max(length, 1) + 6), y=y + 28)))
    return _svg(label, max(row * len(items), row), parts, width=width)


def _table(columns, rows, total: int, empty: str) -> Markup:
    """Build a table: columns [(heading, cell class)], rows of cell values; "N more" below when capped.

    Cell classes: "n" a number (right-aligned), "w" a word kept whole when it
    fits (id, phone, time), None text that wraps anywhere.
    """
    if not rows:
        return _tag("p", empty, class_="none")
    head = _tag("tr", *(_tag("th", name, class_="n" if kind == "n" else None) for name, kind in columns))
    body = [_tag("tr", *(_tag("td", cell, class_=kind, data_label=name) for cell, (name, kind) in zip(row, columns)))
            for row in rows]
    parts = [_tag("div", _tag("table", _tag("thead", head), _tag("tbody", *body)), class_="scroll")]
    if total > len(rows):
        parts.append(_tag("p", "… and %s more, not shown." % _count(total - len(rows)), class_="more"))
    return _join(parts)


def _code_name(code, name) -> str:
    """Show an SMSC code with its name: '20 impossible to deliver'."""
    return "–" if code is None else "%s %s" % (code, name or "unknown")


def _word(value) -> str:
    """Show an id, phone or menu choice: a stranger's, so a very long one is clipped."""
    return "–" if value is None else _clip(value, REPORT_WORD_CHARS)


def _failure_rows(states) -> list:
    """Rows of the failures table: time, id, phone, status, error."""
    return [[_moment(s.get("at") or s.get("last_received_at")), _word(s.get("id")), _word(s.get("phone")),
             _code_name(s.get("status"), s.get("status_name")),
             _code_name(s.get("err"), s.get("err_name")) if s.get("err") else "–"] for s in states]


def _stuck_rows(states) -> list:
    """Rows of the stuck table: last status received, id, phone, status, how long since."""
    return [[_moment(s.get("last_received_at")), _word(s.get("id")), _word(s.get("phone")),
             _code_name(s.get("status"), s.get("status_name")), _duration(s.get("waiting_s") or 0)] for s in states]


def _incoming_rows(events) -> list:
    """Rows of the incoming table: received, from, to, the text (clipped)."""
    return [[_moment(e.get("received_at")), _word(e.get("phone")), _word(e.get("to")), _clip(e.get("mes"))]
            for e in events]


def _call_rows(events) -> list:
    """Rows of the calls table: received, phone, the call's own time, menu choice."""
    return [[_moment(e.get("received_at")), _word(e.get("phone")), _moment(e.get("at")), _word(e.get("callmenu"))]
            for e in events]


def _headline(stats) -> Markup:
    """The headline numbers, one card each."""
    kinds = stats.get("by_kind") or {}
    cards = [
        ("messages", "Messages", _count(stats.get("messages")), None),
        ("delivered", "Delivered", _count(stats.get("delivered")), "good"),
        ("failed", "Failed", _count(stats.get("failed")), "bad"),
        ("pending", "Pending", _count(stats.get("pending")), None),
        ("delivery_rate", "Delivery rate", _percent(stats.get("delivery_rate")), None),
        ("total_cost", "Cost", _money(stats.get("total_cost")), None),
        ("incoming", "Incoming SMS", _count(kinds.get("incoming")), None),
        ("waitcall", "Calls", _count(kinds.get("waitcall")), None),
    ]
    return _tag("dl", *(_tag("div", _tag("dt", name), _tag("dd", value, class_=tone, data_key=key), class_="card")
                        for key, name, value, tone in cards), class_="cards")


def _legend(series) -> Markup:
    """The colour key of a chart's series, as an HTML list (it wraps on a phone)."""
    return _tag("ul", *(_tag("li", _tag("i", class_="k-" + kind), name) for kind, name, _c in series),
                class_="legend")


def _every_day(days) -> list:
    """Return the per-day rows with a zero row for each quiet day between them (a chart's days are even)."""
    rows = []
    for day in days:
        while rows and _next_day(rows[-1]["day"]) < day["day"]:
            rows.append({"day": _next_day(rows[-1]["day"]), "events": {}, "messages": 0, "delivered": 0,
                         "failed": 0, "pending": 0, "delivery_rate": None, "cost": 0.0})
        rows.append(day)
    return rows


def _by_month(days) -> list:
    """Add per-day rows up into per-month ones, so that a long range's charts stay small."""
    months = {}
    for day in days:
        month = months.get(day["day"][:7])
        if month is None:
            month = months[day["day"][:7]] = {"day": day["day"][:7], "events": {}, "messages": 0, "delivered": 0,
                                               "failed": 0, "pending": 0, "cost": 0.0}
        for kind, count in day["events"].items():
            month["events"][kind] = month["events"].get(kind, 0) + count
        for key in ("messages", "delivered", "failed", "pending", "cost"):
            month[key] += day.get(key) or 0
    for month in months.values():
        final = month["delivered"] + month["failed"]
        month["delivery_rate"] = round(month["delivered"] / final, 4) if final else None
        month["cost"] = round(month["cost"], 2)
    return [months[name] for name in sorted(months)]


def _day_table(days, unit="day") -> Markup:
    """The numbers behind the per-day (or per-month) charts, folded away when long."""
    columns = [(unit.capitalize(), "w"), ("Statuses", "n"), ("Incoming", "n"), ("Calls", "n"), ("Delivered", "n"),
               ("Failed", "n"), ("Rate", "n"), ("Cost", "n")]
    rows = [[d["day"], _count(d["events"].get("status")), _count(d["events"].get("incoming")),
             _count(d["events"].get("waitcall")), _count(d.get("delivered")), _count(d.get("failed")),
             _percent(d.get("delivery_rate")), _money(d.get("cost"))] for d in days]
    return _tag("details", _tag("summary", "The numbers per %s (a message counts on the %s of its first status)"
                                % (unit, unit)),
                _table(columns, rows, len(rows), "No events."),
                open="" if len(days) <= REPORT_OPEN_DAYS else None)


def _section(heading, *content) -> Markup:
    """One card of the page: a heading and what it shows."""
    return _tag("section", _tag("h2", heading), *content)


def render_report(data: dict, title: str = "SMSC delivery report") -> str:
    """Render the report page from its data (what report_data returns); pure.

    ``data`` holds ``since``/``until``/``generated_at`` (ISO 8601 UTC; since
    may be None), ``stats`` (the dict ``stats --json`` prints), ``days`` (its
    ``by_day`` rows: ``day``, ``events`` by kind, ``delivered``, ``failed``,
    ``delivery_rate``, ``cost``) and the tables ``failures``, ``stuck`` (each
    state with ``waiting_s``), ``incoming``, ``calls``, each ``{"rows": [...],
    "total": N}``, rows newest first (message states, or stored events).
    """
    stats, unit = data["stats"], "day"
    days = _every_day(data["days"])
    if len(days) > REPORT_MAX_DAYS:
        days, unit = _by_month(days), "month"
    series = [(kind, name, KIND_COLOURS[kind]) for kind, name in
              (("status", "statuses"), ("incoming", "incoming SMS"), ("waitcall", "calls"))]
    statuses = sorted((stats.get("by_status") or {}).items(), key=lambda item: (-item[1], item[0]))
    errors = sorted((stats.get("by_error") or {}).items(), key=lambda item: (-item[1], item[0]))
    more_errors = len(errors) - REPORT_TOP_ERRORS
    since = "the first stored event" if data.get("since") is None else _moment(data["since"])
    charts = [
        _section("Events per " + unit, svg_stacked_days(days, series, "Events per %s by kind" % unit),
                 _legend(series)),
        _section("Delivery rate per " + unit, svg_rate_days(days, "Delivery rate per " + unit)
                 if any(d.get("delivery_rate") is not None for d in days)
                 else _tag("p", "No message has a final status yet.", class_="none")),
        _section("Statuses", svg_hbars(statuses, "Status callbacks by status", "#3569a8") if statuses
                 else _tag("p", "No status callbacks.", class_="none")),
        _section("Top errors", svg_hbars(errors[:REPORT_TOP_ERRORS], "Status callbacks by error", "#b3261e")
                 if errors else _tag("p", "No errors.", class_="none"),
                 _tag("p", "… and %d more errors, not shown." % more_errors, class_="more")
                 if more_errors > 0 else ""),
        _section("Cost per " + unit, svg_bars_days(days, "cost", "Cost per " + unit, "#6b4fa8", show=_money)),
        _section("Messages by outcome", svg_hbars(
            [("delivered", stats.get("delivered") or 0), ("failed", stats.get("failed") or 0),
             ("pending", stats.get("pending") or 0)], "Messages by outcome", "",
            colours=["#1d7a46", "#b3261e", "#8a93a3"]) if stats.get("messages")
            else _tag("p", "No messages.", class_="none")),
    ]
    failures, stuck = data["failures"], data["stuck"]
    incoming, calls = data["incoming"], data["calls"]
    tables = [
        _section("Latest failures", _table(
            [("Time", "w"), ("Id", "w"), ("Phone", "w"), ("Status", None), ("Error", None)],
            _failure_rows(failures["rows"]), failures["total"], "No failed messages.")),
        _section("Stuck: no final status for over an hour", _table(
            [("Last status", "w"), ("Id", "w"), ("Phone", "w"), ("Status", None), ("Waiting", "n")],
            _stuck_rows(stuck["rows"]), stuck["total"], "No message is stuck.")),
        _section("Latest incoming SMS", _table(
            [("Received", "w"), ("From", "w"), ("To", "w"), ("Text", None)],
            _incoming_rows(incoming["rows"]), incoming["total"], "No incoming SMS.")),
        _section("Latest calls", _table(
            [("Received", "w"), ("Phone", "w"), ("Call time", "w"), ("Menu", None)],
            _call_rows(calls["rows"]), calls["total"], "No calls.")),
        _section("Per " + unit, _day_table(days, unit)),
    ]
    head = _tag("head",
                _tag("meta", charset="utf-8"),
                _tag("meta", http_equiv="Content-Security-Policy", content=report_csp()),
                _tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
                _tag("meta", name="referrer", content="no-referrer"),
                _tag("title", title),
                _tag("style", Markup(REPORT_CSS)))
    body = _tag("body", _tag(
        "main",
        _tag("h1", title),
        _tag("p", "From %s to %s (UTC) · generated %s UTC" % (since, _moment(data["until"]),
                                                             _moment(data["generated_at"])), class_="meta"),
        _headline(stats),
        _tag("div", *charts, class_="grid"),
        _tag("div", *tables, class_="grid wide")))
    return "<!DOCTYPE html>\n" + _tag("html", head, body, lang="en") + "\n"


def report_data(config: Config, since: float | None = None, until: float | None = None,
                now: float | None = None) -> dict:
    """Gather what the report shows about the range [since, until) (Unix seconds; None: open).

    Every number comes from the tracking index's one computation
    (TrackingIndex.stats, what `stats --json --by day` prints for the same
    range); the tables are its newest failures, stuck messages, incoming SMS
    and calls, newest first, each capped at REPORT_ROWS with its total.
    """
    now = time.time() if now is None else now
    end = now if until is None else until
    with open_index(config) as index:
        stats = index.stats(since, until, by_day=True)
        failures = index.failures(REPORT_ROWS, since, until)
        stuck = index.stuck(REPORT_ROWS, since, end, older_than=STUCK_AFTER_SECONDS)
        # Counted without listing them all: the pending messages of the range but those
        # whose last status came in the last hour before its end (few, and indexed).
        low, high = _ms_range(since, until)
        recent = sum(1 for state in index.messages(end - STUCK_AFTER_SECONDS, "pending")
                     if low <= _received_ms(state["first_received_at"]) < high)
        incoming = index.latest("incoming", REPORT_ROWS, since, until)
        calls = index.latest("waitcall", REPORT_ROWS, since, until)
    days = stats.pop("by_day")
    stuck_rows = stuck[::-1]
    for state in stuck_rows:
        state["waiting_s"] = end - _received_seconds(state.get("last_received_at"))
    kinds = stats["by_kind"]
    return {
        "since": None if since is None else _utc_iso(int(since)),
        "until": _utc_iso(int(end)), "generated_at": _utc_iso(int(now)),
        "stats": stats, "days": days,
        "failures": {"rows": failures[::-1], "total": stats["failed"]},
        "stuck": {"rows": stuck_rows, "total": stats["pending"] - recent},
        "incoming": {"rows": incoming[::-1], "total": kinds.get("incoming", 0)},
        "calls": {"rows": calls[::-1], "total": kinds.get("waitcall", 0)},
    }


def _received_seconds(text) -> float:
    """Unix seconds of a received_at text (YYYY-MM-DDTHH:MM:SS.mmmZ)."""
    return _received_ms(text or "") / 1000


def write_report(path: str, page: str, mode: int = 0o600) -> None:
    """Write the page whole or not at all (a temporary file, then rename): a web server never serves half."""
    _write_whole_file(path, page.encode("utf-8"), mode)


########################################################################
# The relay: every event to the user's app as a Standard Webhook (SPEC §12)
########################################################################

#: Seconds: the longest wait between two tries of one event (Retry-After included).
RELAY_MAX_DELAY = 3600.0

#: Bytes of an answer's body read (and dropped); a longer one closes the connection.
RELAY_MAX_ANSWER = 65536

#: Statuses tried again later, like a timeout: the app is busy, not refusing the event.
RELAY_RETRY_STATUSES = frozenset((408, 429))

#: Outcomes kept in the state store before they are written in one transaction:
#: a crash repeats at most this many deliveries (the app drops them by webhook-id).
RELAY_BATCH = 64

_RELAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS relays (
    event_id TEXT PRIMARY KEY, ok INTEGER, attempts INTEGER, last_status INTEGER,
    last_error TEXT, updated_at REAL, file TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS relays_updated_at ON relays (updated_at);
CREATE TABLE IF NOT EXISTS relay_positions (
    file TEXT PRIMARY KEY, offset INTEGER, identity TEXT
) WITHOUT ROWID;
"""


def new_relay_secret() -> str:
    """Return a new relay secret: ``whsec_`` + base64 of 32 random bytes."""
    import binascii
    return "whsec_" + binascii.b2a_base64(os.urandom(32), newline=False).decode("ascii")


def relay_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the Standard Webhooks v1 signature: base64 HMAC-SHA256 of ``id.timestamp.body``."""
    import binascii
    import hashlib
    import hmac
    signed = b"%s.%d.%s" % (msg_id.encode("ascii"), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + binascii.b2a_base64(digest, newline=False).decode("ascii")


def relay_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict:
    """Return the headers of one delivery attempt (the signature covers id, timestamp, body)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "smsc_handler/" + __version__,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": relay_signature(key, msg_id, timestamp, body),
    }


def retry_after_seconds(value, now: float | None = None) -> float | None:
    """Read a Retry-After header (seconds, or an HTTP date) as seconds from now; None if unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    if _ascii_digits(value):
        return float(int(value))
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        import datetime
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def relay_delay(attempt: int, base: float, retry_after: float | None = None, rand=None) -> float:
    """Return the wait before try `attempt` + 1: full jitter under base * 2^(attempt-1), capped at an hour.

    A Retry-After is a floor (still capped: an app asking for a day gets tried hourly).
    """
    if rand is None:
        import random
        rand = random.random
    ceiling = min(RELAY_MAX_DELAY, base * 2.0 ** min(attempt - 1, 64))
    delay = ceiling * rand()
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, RELAY_MAX_DELAY)


def relay_verdict(status: int | None) -> str:
    """Classify an attempt: "ok" (2xx), "gone" (410), "retry" (429, 408, 5xx, no answer) or "failed"."""
    if status is None or status in RELAY_RETRY_STATUSES or 500 <= status <= 599:
        return "retry"
    if 200 <= status <= 299:
        return "ok"
    return "gone" if status == 410 else "failed"


class Relay:
    """One kept-alive connection to the relay endpoint; POSTs signed events, follows no redirect."""

    def __init__(self, url: str, key: bytes, timeout: float = 10.0):
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        self.url, self.key, self.timeout = url, key, timeout
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        #: what messages name: never the path or query, which may hold a token
        self.where = "%s://%s" % (parts.scheme, parts.netloc)
        self._connection = None

    @classmethod
    def from_config(cls, config: Config) -> Relay:
        """Build the relay of a config whose [relay] url is set."""
        return cls(config.relay_url, relay_key(config.relay_secret), config.relay_timeout)

    def _connect(self):
        """Return the open connection, making one (HTTPS: verified by the system's CAs) if needed."""
        if self._connection is None:
            import http.client
            if self.https:
                import ssl
                self._connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=ssl.create_default_context())
            else:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._connection

    def close(self):
        """Close the connection (the next post opens a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def post(self, msg_id: str, body: bytes, now: float | None = None):
        """Deliver once; return (status or None, Retry-After header or None, error text or None).

        A kept-alive connection the app closed while idle is found out only by
        the next request: that one is sent again at once on a new connection.
        """
        import http.client
        headers = relay_headers(self.key, msg_id, int(time.time() if now is None else now), body)
        for last_try in (False, True):
            connection = self._connect()
            reused = connection.sock is not None
            try:
                connection.request("POST", self.target, body, headers)
                answer = connection.getresponse()
                answer.read(RELAY_MAX_ANSWER)
                if not answer.isclosed():
                    self.close()  # a body too long to drain: don't read the rest
                return answer.status, answer.getheader("Retry-After"), None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if reused and stale and not last_try:
                    continue
                return None, None, self._describe(exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _describe(self, exc) -> str:
        """Say what went wrong with a request, naming the endpoint but not its path."""
        import socket
        if isinstance(exc, socket.timeout):
            return "no answer from %s within %g s" % (self.where, self.timeout)
        if isinstance(exc, ConnectionRefusedError):
            return "%s refused the connection" % self.where
        if isinstance(exc, OSError):
            return "%s: %s" % (self.where, exc.strerror or type(exc).__name__)
        return "%s: %s" % (self.where, type(exc).__name__)


def _relay_tables(state: StateStore) -> None:
    """Create the relay's tables in the state store if they are not there yet (additive schema)."""
    if not state.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'relay_positions'").fetchone():
        try:
            state.db.executescript(_RELAY_SCHEMA)
        except state._sqlite3.Error as exc:
            raise StorageError("state store: %s" % exc) from None


def relay_state(state: StateStore, event_id: str) -> str | None:
    """Return "ok", "failed" (refused: kept for replay), "retrying" or None (never tried)."""
    row = state._run("SELECT ok FROM relays WHERE event_id = ?", (event_id,)).fetchone()
    return None if row is None else {None: "retrying", 0: "failed", 1: "ok"}[row[0]]


class _RelayLog:
    """Outcomes and positions of the relay, written RELAY_BATCH at a time in one transaction."""

    def __init__(self, state: StateStore):
        self.state = state
        self.outcomes, self.positions = [], {}
        self.settled = set()  # ids delivered or refused, not yet written

    def outcome(self, event_id, ok, status, error, file):
        """Keep one attempt's outcome (ok: 1 delivered, 0 refused, None tried again later)."""
        self.outcomes.append((event_id, ok, status, error, time.time(), file))
        if ok is not None:
            self.settled.add(event_id)

    def position(self, file, offset, identity):
        """Keep where the relay stopped in a file; write both when the batch is full."""
        self.positions[file] = (offset, identity)
        if len(self.outcomes) >= RELAY_BATCH:
            self.flush()

    def flush(self):
        """Write what is kept in one transaction (outcomes before the positions that pass them)."""
        if not self.outcomes and not self.positions:
            return
        state = self.state
        state.begin()
        try:
            for event_id, ok, status, error, now, file in self.outcomes:
                # Two statements, not an upsert: hosts still run SQLite older than 3.24.
                state._run("INSERT OR IGNORE INTO relays VALUES (?, NULL, 0, NULL, NULL, ?, ?)",
                           (event_id, now, file))
                state._run("UPDATE relays SET ok = ?, attempts = attempts + 1, last_status = ?, "
                           "last_error = ?, updated_at = ?, file = ? WHERE event_id = ?",
                           (ok, status, error, now, file, event_id))
            for file, (offset, identity) in self.positions.items():
                state._run("INSERT OR REPLACE INTO relay_positions VALUES (?, ?, ?)", (file, offset, identity))
            state.commit()
        except BaseException:
            state.rollback()
            raise
        self.outcomes, self.positions = [], {}
        self.settled.clear()


def relay_event(relay: Relay, log: _RelayLog, event_id: str, body: bytes, file: str, follow=False,
                tries=3, backoff=1.0, sleep=time.sleep, say=print) -> str:
    """Deliver one event until the app takes it, refuses it, or the tries run out.

    Returns "ok", "failed" (refused: 3xx or 4xx but 408/429/410; kept for
    replay), "gone" (410) or "later" (still failing after `tries`, without
    `follow`). Each try is signed anew with its own webhook-timestamp.
    """
    attempt = 0
    while True:
        attempt += 1
        status, retry_after, error = relay.post(event_id, body)
        verdict = relay_verdict(status)
        if verdict == "ok":
            log.outcome(event_id, 1, status, None, file)
            return "ok"
        if error is None:
            error = "HTTP %d" % status
            if 300 <= status <= 399:
                error += " (a redirect: not followed; point [relay] url at the final address)"
        if verdict == "gone":
            log.outcome(event_id, None, status, error + " (410 Gone: the relay stopped)", file)
            return "gone"
        if verdict == "failed":
            log.outcome(event_id, 0, status, error, file)
            say("relay: %s refused (kept for `replay --relay`): %s" % (event_id, error))
            return "failed"
        log.outcome(event_id, None, status, error, file)
        say("relay: %s not delivered (attempt %d): %s" % (event_id, attempt, error))
        if not follow and attempt >= tries:
            return "later"
        log.flush()  # nothing kept in memory while waiting
        sleep(relay_delay(attempt, backoff, retry_after_seconds(retry_after)))


def _relay_body(line: bytes):
    """Return (event_id, body) of a stored line, or None for a line that holds no event."""
    import json
    try:
        event = json.loads(line)
    except ValueError:
        return None  # a mended torn line
    if not isinstance(event, dict) or not isinstance(event.get("event_id"), str) or "." in event["event_id"]:
        return None
    return event["event_id"], line.rstrip(b"\r\n")


def relay_once(config: Config, state: StateStore, relay: Relay, follow=False, tries=3, backoff=1.0,
               sleep=time.sleep, say=print) -> str:
    """Relay each new line of the JSON-lines files, in order, from the relay's own positions.

    Returns "done" (caught up), "refused" (caught up, but the app refused
    some: kept for replay), "later" (an event still failing after `tries`:
    the next run starts with it) or "gone" (the app answered 410: that event
    stays undelivered). An event already delivered or refused
    (the same event_id stored twice) is not sent again.
    """
    _relay_tables(state)
    log = _RelayLog(state)
    refused = False
    try:
        for path in stored_names(config):
            row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
            # A renamed (rotated) file is finished before its successor: SPEC §11.
            for _piece, identity, end, line in resume_lines(path, *(row or (0, None)), history=True):
                found = _relay_body(line)
                if found is not None:
                    event_id, body = found
                    # Once delivered or refused, an id stored twice is not sent again (replay re-sends).
                    if event_id not in log.settled and relay_state(state, event_id) not in ("ok", "failed"):
                        result = relay_event(relay, log, event_id, body, path, follow, tries, backoff,
                                             sleep, say)
                        if result in ("gone", "later"):
                            return result
                        refused = refused or result == "failed"
                log.position(path, end, identity)
        return "refused" if refused else "done"
    finally:
        log.flush()


def relay_from_now(config: Config, state: StateStore) -> int:
    """Move the relay's positions to the end of every stored file (--from-now); return the events skipped."""
    _relay_tables(state)
    log, skipped = _RelayLog(state), 0
    for path in stored_names(config):
        row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
        for _piece, identity, end, line in resume_lines(path, *(row or (0, None)), history=True):
            skipped += _relay_body(line) is not None
            log.position(path, end, identity)
    log.flush()
    return skipped


def relay_prune(state: StateStore, keep_days: int, now: float | None = None) -> None:
    """Forget relay successes older than keep_days (refusals are kept for replay)."""
    _relay_tables(state)
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    state._run("DELETE FROM relays WHERE ok = 1 AND updated_at < ?", (cutoff,))


def relay_counts(config: Config, state: StateStore | None = None) -> dict | None:
    """Count relay outcomes: delivered (within keep_days), failed, retrying, and events not yet tried.

    None when no [relay] url is set.
    """
    if not config.relay_url:
        return None
    if state is None:
        with StateStore(config) as own:
            return relay_counts(config, own)
    _relay_tables(state)
    counts = {"delivered": 0, "failed": 0, "retrying": 0, "waiting": 0}
    names = {1: "delivered", 0: "failed", None: "retrying"}
    for ok, count in state._run("SELECT ok, COUNT(*) FROM relays GROUP BY ok"):
        counts[names.get(ok, "retrying")] += count
    waiting = set()
    for path in stored_names(config):
        row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
        for _piece, _identity, _end, line in resume_lines(path, *(row or (0, None)), history=True):
            found = _relay_body(line)
            if found and found[0] not in waiting and relay_state(state, found[0]) is None:
                waiting.add(found[0])
    counts["waiting"] = len(waiting)
    return counts


def relay_undelivered_files(config: Config, state: StateStore) -> set:
    """Return the JSON-lines files the relay still owes: not read to their end, or holding a refused event.

    For `prune`: such a file is kept unless --force (SPEC §11).
    """
    _relay_tables(state)
    owed = {row[0] for row in state._run("SELECT DISTINCT file FROM relays WHERE ok IS NOT 1") if row[0]}
    for path in stored_names(config):
        row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
        offset, identity = row or (0, None)
        try:
            if identity != file_identity(path) or offset < os.stat(path).st_size:
                owed.add(path)
        except OSError:
            continue
    return owed


########################################################################
# Command line: shared helpers
########################################################################

class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def _config_for(args) -> Config:
    """Load the config named by --config, $SMSC_HANDLER_CONFIG or beside the module."""
    return load_config(find_config(getattr(args, "config", None)))


def _assignments(items) -> dict:
    """Parse NAME=VALUE arguments (later ones win)."""
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError("expected NAME=VALUE, got %r" % item)
        values[name] = value
    return values


def _cli_charset(name: str) -> str:
    """Canonical charset for a command-line value; a usage error when unknown."""
    try:
        return canonical_charset(name)
    except BadRequest:
        raise UsageError("unknown charset %r: use utf-8, windows-1251 or koi8-r" % name) from None


def _cli_encode(value: str, codec: str, name: str) -> bytes:
    """Encode a command-line value; a usage error when the charset lacks a character."""
    try:
        return value.encode(codec)
    except UnicodeEncodeError:
        raise UsageError("%s has characters %s can't encode: use --charset utf-8" % (name, codec)) from None


#: Most digits a whole-number option takes: int() of a 400-digit text is slow and
#: overflows every use (deque sizes, floats, C longs) long before that.
_MAX_OPTION_DIGITS = 9


def _option_error(text):
    """Return argparse's error for a bad option value (argparse is imported by then)."""
    import argparse
    return argparse.ArgumentTypeError(text)


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (ASCII digits, at most 9 of them)."""
    digits = text.strip()
    if not _ascii_digits(digits) or len(digits.lstrip("0")) > _MAX_OPTION_DIGITS or int(digits) < 1:
        raise _option_error("expected a whole number from 1 to 999999999, not %r" % text)
    return int(digits)


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0 picks a free one)."""
    digits = text.strip()
    if not _ascii_digits(digits) or len(digits) > 5 or int(digits) > 65535:
        raise _option_error("expected a port from 0 to 65535, not %r" % text)
    return int(digits)


def _seconds(low: float, high: float):
    """Return an argparse type for seconds from low to high: digits and one optional dot."""
    def parse(text):
        whole, _, fraction = text.strip().partition(".")
        if (not (whole or fraction) or not all(_ascii_digits(part) for part in (whole, fraction) if part)
                or len(whole.lstrip("0")) > _MAX_OPTION_DIGITS):
            raise _option_error("expected seconds like 240 or 0.5, not %r" % text)
        seconds = float(text)
        if not low <= seconds <= high:
            raise _option_error("expected seconds from %g to %g, not %r" % (low, high, text))
        return seconds
    parse.__name__ = "seconds"  # argparse names the type in some messages
    return parse


def _printable(value) -> str:
    """Show any text on one terminal line: control characters and line breaks escaped."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def parse_since(text: str, now: float | None = None, option: str = "--since") -> float:
    """Parse --since: 30m / 2h / 7d / 45s ago, or an ISO 8601 date or time (naive = local)."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    shown = _printable(text if len(text) <= 40 else text[:39] + "…")
    if text[-1:].lower() in units and text[:-1].strip():
        count = text[:-1].strip()
        # str.isdigit() takes '²'; a 400-digit count overflows the float below.
        if not _ascii_digits(count) or len(count.lstrip("0")) > _MAX_OPTION_DIGITS:
            raise UsageError("%s takes a count of up to 9 digits and a unit (s, m, h, d, w), "
                             "like 30m or 7d, not %r" % (option, shown))
        return now - int(count) * units[text[-1:].lower()]
    from datetime import datetime, timedelta, timezone
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise UsageError("%s takes 30m, 2h, 7d or an ISO date/time like 2026-11-25, "
                         "2026-11-25 13:00 (local time) or 2026-11-25T10:00Z, not %r" % (option, shown)) from None
    if moment.tzinfo is None:
        try:
            return moment.timestamp()  # local time, as the OS knows it
        except (ValueError, OverflowError, OSError):
            # Year 1 or 9999 in a zone the OS can't place: the current offset is near enough.
            moment = moment.replace(tzinfo=timezone(timedelta(seconds=_local_offset(now))))
    return (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds()


def _local_offset(seconds: float) -> int:
    """Return the local zone's offset from UTC, in seconds, at a moment."""
    try:
        return time.localtime(seconds).tm_gmtoff
    except (OverflowError, OSError, ValueError):
        return time.localtime().tm_gmtoff


def local_time(seconds: float) -> str:
    """Format a moment as local time with its offset: 2026-11-25 16:00:28+03:00."""
    offset = _local_offset(seconds)
    sign = "-" if offset < 0 else "+"
    return "%s%s%02d:%02d" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)),
                              sign, abs(offset) // 3600, abs(offset) % 3600 // 60)


def _event_time(event) -> float:
    """Unix time of an event's received_at (0 when unreadable)."""
    import calendar
    text = event.get("received_at") or ""
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + text[19:23])
    except (ValueError, TypeError):  # a hand-edited line: a number or null where the text was
        return 0.0


def _matches(event, args) -> bool:
    """Whether an event passes the --phone/--id/--event-id/--since filters."""
    if getattr(args, "phone", None) and event.get("phone") != args.phone:
        return False
    if getattr(args, "id", None) and str(event.get("id")) != args.id:
        return False
    if getattr(args, "event_id", None) and event.get("event_id") != args.event_id:
        return False
    since = getattr(args, "since_ts", None)
    return since is None or _event_time(event) >= since


def _kinds(args):
    """Return the kinds selected by --kind (all by default)."""
    return (args.kind,) if getattr(args, "kind", None) else KINDS


########################################################################
# Command line: serve, send, sign, verify
########################################################################

def cmd_serve(args) -> int:
    """Run the handler on a local threaded server."""
    config = _config_for(args)
    app = make_app(config)

    def ready(server):
        host, port = server.server_address[:2]
        shown = "[%s]" % host if ":" in host else host
        print("smsc_handler %s listening on http://%s:%d/" % (__version__, shown, port))
        print("events go to %s" % config.data_dir)
        hint = "?md5=YOUR_SECRET&charset=utf-8" if config.secret else "?charset=utf-8"
        print("handler URL for SMSC's settings, at your public address: https://YOUR-SITE/PATH/" + hint)
        sys.stdout.flush()

    try:
        serve(app, args.host, args.port, ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        import errno
        where = "%s:%d" % ("[%s]" % args.host if ":" in args.host else args.host, args.port)
        if exc.errno == errno.EADDRINUSE:
            why = ("the address is already in use (another serve?). Fix: stop that one, or pick "
                   "another port: --port %d (--port 0 picks a free one)"
                   % (args.port + 1 if 0 < args.port < 65535 else 8081))
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need root). Fix: --port 8080, behind your web server"
        else:
            why = "%s. Fix: check --host (an address of this machine, e.g. 127.0.0.1)" % (exc.strerror or exc)
        sys.stderr.write("smsc_handler serve: cannot listen on %s: %s\n" % (where, why))
        return 1
    return 0


def split_handler_url(url: str):
    """Split a handler URL as written in SMSC's settings.

    Returns (target URL, GET pairs, POST pairs): parameters between '!' and
    '?' go by GET, those after '?' by POST (PROTOCOL.md, Transport).
    """
    import urllib.parse
    # Never quote the URL in an error: it holds the secret.
    if any(c <= " " or c == "\x7f" for c in url):
        raise UsageError("the handler URL has a space or a control character: percent-encode it")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not 0-65535)
    except ValueError as exc:
        reason = "a bad port" if "port" in str(exc).lower() else "a bad host"
        raise UsageError("the handler URL is not valid (%s): write it like "
                         "https://example.com/smsc/?md5=SECRET" % reason) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("the handler URL must start with http:// or https:// and a host name")
    path, bang, get_part = parts.path.partition("!")
    get_pairs = urllib.parse.parse_qsl(get_part, keep_blank_values=True) if bang else []
    post_pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path or "/", "", ""))
    return target, get_pairs, post_pairs


def sample_callback(kind: str, now: float | None = None, overrides: dict | None = None) -> dict:
    """Return realistic parameters SMSC would send for `kind` (overrides win)."""
    now = int(time.time() if now is None else now)
    local = time.strftime("%d.%m.%y %H:%M:%S", time.gmtime(now + 3 * 3600))  # SMSC's default zone
    # Fresh on every call, not from the clock: two sends in one second are two callbacks.
    message_id = _fresh_digits(9)
    overrides = dict(overrides or {})
    if kind == "status":
        params = {"id": message_id, "phone": "79991234567", "status": "1", "time": local,
                  "ts": str(now), "cnt": "1", "type": "0", "cost": "1.80", "flag": "0",
                  "sender": "SMSC.RU"}
        kind_code = overrides.get("type", "0")
        if kind_code == "4":  # HLR query
            params.update({"cost": "0.30", "imsi": "250010000000000", "msc": "79168999999",
                           "mcc": "250", "mnc": "01", "cn": "Russia", "net": "MTS",
                           "rcn": "", "rnet": ""})
        elif kind_code == "7":  # voice call with a menu
            params.update({"cnt": "25", "calltime": "12", "callmenu": "1", "ringtime": "5",
                           "cost": "2.50"})
    elif kind == "incoming":
        params = {"id": message_id, "sms_id": _fresh_digits(9), "phone": "79991234567",
                  "mes": "Тестовое сообщение", "to": "79000000000", "smsc": "MTS",
                  "sent": str(now - 2), "time": str(now)}
    elif kind == "waitcall":
        # A waitcall is (phone, ts): one phone can't call twice in a second, so the phone varies.
        params = {"waitcall": "1", "phone": "79" + _fresh_digits(9), "ts": str(now)}
    else:
        raise UsageError("--kind is status, incoming or waitcall")
    params.update(overrides)
    return params


def _fresh_digits(count: int) -> str:
    """Return `count` random digits, the first not 0 (a new message id or phone tail)."""
    number = int.from_bytes(os.urandom(8), "big") % (9 * 10 ** (count - 1))
    return str(number + 10 ** (count - 1))


def build_callback(url: str, kind: str = "status", fmt: str | None = None,
                   charset: str | None = None, overrides: dict | None = None, now=None):
    """Build the request SMSC would send to a handler URL written in its settings.

    Returns (method, url with GET part, headers, body bytes, notes). The secret
    in md5=/sha1=/crc32= is replaced by the control hash of the callback.
    """
    import json
    import urllib.parse
    target, get_pairs, post_pairs = split_handler_url(url)
    notes = []
    url_params = dict(get_pairs + post_pairs)
    charset = _cli_charset(charset or url_params.get("charset") or "windows-1251")
    fmt_code = {"form": None, "xml": "2", "json": "3"}.get(fmt, fmt) if fmt else url_params.get("fmt")
    if fmt_code not in (None, "", "2", "3"):
        raise UsageError("fmt is 2 (xml) or 3 (json)")
    if fmt_code and charset == "koi8-r":
        charset = "windows-1251"
        notes.append("fmt=%s: SMSC never uses koi8-r with fmt; sending windows-1251" % fmt_code)
    params = sample_callback(kind, now, overrides)
    post = dict(post_pairs)
    if fmt == "form":
        post.pop("fmt", None)
    elif fmt:
        post["fmt"] = fmt_code
    if "charset" in post or charset != "windows-1251":
        post["charset"] = charset
    # Handler-URL parameters after '?' come by POST beside the callback's own.
    merged = dict(params)
    for name, value in post.items():
        merged.setdefault(name, value)
    codec = CODECS[charset]
    get = dict(get_pairs)
    for alg in HASH_ALGORITHMS:
        secret = get.get(alg, post.get(alg))
        if secret is None:
            continue
        data = b":".join([_cli_encode(merged.get(name, ""), codec, name) for name in SIGNED_FIELDS[kind]]
                         + [secret.encode("utf-8")])
        digest = control_hash(alg, data)
        # The secret itself never goes on the wire: SMSC sends the hash in its place.
        if alg in get:
            get[alg] = digest
        merged[alg] = digest
        notes.append("%s of %s fields with your secret" % (alg, ":".join(SIGNED_FIELDS[kind])))
    for name in get:
        merged.pop(name, None)
    query = urllib.parse.urlencode([(k, _cli_encode(v, codec, k)) for k, v in get.items()])
    for name, value in merged.items():
        _cli_encode(value, codec, name)  # one clear usage error for a character the charset lacks
    if fmt_code == "3":
        body = json.dumps(merged, ensure_ascii=False).encode(codec)
        content_type = "application/json; charset=%s" % charset
    elif fmt_code == "2":
        from xml.sax.saxutils import escape
        items = "".join("<%s>%s</%s>" % (k, escape(v), k) for k, v in merged.items())
        text = '<?xml version="1.0" encoding="%s"?>\n<data>%s</data>' % (charset, items)
        body = text.encode(codec)
        content_type = "application/xml; charset=%s" % charset
    else:
        body = urllib.parse.urlencode([(k, v.encode(codec)) for k, v in merged.items()]).encode("ascii")
        content_type = FORM_MEDIA_TYPE
    full_url = target + ("?" + query if query else "")
    return "POST", full_url, {"Content-Type": content_type}, body, notes


def _http(method, url, headers, body, timeout):
    """Send one request; return (status, reason, body text). No proxies: the target is named.

    OSError when no answer came, ValueError when the answer was not HTTP.
    """
    import http.client
    import urllib.error
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        try:
            with opener.open(request, timeout=timeout) as answer:
                return answer.status, answer.reason, answer.read(2048).decode("utf-8", "replace")
        except urllib.error.HTTPError as answer:
            return answer.code, answer.reason, answer.read(2048).decode("utf-8", "replace")
    except http.client.HTTPException as exc:  # BadStatusLine, IncompleteRead, LineTooLong…
        raise ValueError("not an HTTP answer (%s)" % type(exc).__name__) from None


def cmd_send(args) -> int:
    """Act as SMSC: send a callback to a handler URL, with SMSC's retry rule on --retry."""
    overrides = _assignments(args.fields)
    method, url, headers, body, notes = build_callback(
        args.url, args.kind, args.fmt, args.charset, overrides)
    notes.extend(_send_alg_notes(args))
    if not any(note.startswith(HASH_ALGORITHMS) for note in notes):
        # send can't see the handler's config; only the URL says whether SMSC would sign.
        notes.append("the URL has no md5=/sha1=/crc32=: the callback is unsigned, so a handler "
                     "with a secret refuses it and one without a secret can't tell who sent it")
    for note in notes:
        print("note: " + note)
    if args.dry_run:
        print("%s %s" % (method, url))
        for name, value in headers.items():
            print("%s: %s" % (name, value))
        print()
        print(body.decode("latin-1"))
        return 0
    tries = args.tries if args.retry else 1
    for attempt in range(1, tries + 1):
        try:
            status, reason, text = _http(method, url, headers, body, args.timeout)
            print(_printable("%s %s -> %d %s: %s" % (method, url, status, reason, " ".join(text.split())[:200])))
        except OSError as exc:
            status = None
            print("%s %s -> no answer: %s" % (method, url, getattr(exc, "reason", None) or exc))
        except ValueError as exc:
            status = None
            print("%s %s -> %s" % (method, url, exc))
        sys.stdout.flush()
        if status == 200:
            return 0
        if status in (403, 404) and attempt == 1:
            print("hint: a refused hash? on the handler's host, `smsc_handler.py verify "
                  "DATA_DIR/rejected.jsonl` explains the newest refusal step by step")
        # SMSC's rule: anything but 200 or 404 is retried; 404 means stop.
        if status == 404 or attempt == tries:
            return 1
        print("retry %d of %d in %g s (SMSC's rule: every 4 minutes, 50 tries)"
              % (attempt + 1, tries, args.interval))
        sys.stdout.flush()
        time.sleep(args.interval)
    return 1


def _send_alg_notes(args) -> list:
    """Warn when the local config's hash_alg would refuse the hash the URL asks for."""
    _target, get_pairs, post_pairs = split_handler_url(args.url)
    try:
        note = _refused_alg_note(_config_for(args), sent_hash_alg(dict(get_pairs + post_pairs)))
    except ConfigError:
        return []
    return [note + " (this config; the handler's own may differ)"] if note else []


def cmd_sign(args) -> int:
    """Print the control hash SMSC would send for the given fields."""
    values = _assignments(args.fields)
    codec = CODECS[_cli_charset(args.charset)]
    missing = [name for name in SIGNED_FIELDS[args.kind] if name not in values]
    if missing:
        raise UsageError("--kind %s hashes %s: give %s" % (
            args.kind, ":".join(SIGNED_FIELDS[args.kind]), " ".join(n + "=…" for n in missing)))
    data = b":".join([_cli_encode(values[name], codec, name) for name in SIGNED_FIELDS[args.kind]]
                     + [args.secret.encode("utf-8")])
    print(control_hash(args.alg or _configured_alg(args), data))
    return 0


def _configured_alg(args) -> str:
    """Return the algorithm [handler] hash_alg names (md5 for auto, or with no usable config)."""
    try:
        alg = _config_for(args).hash_alg
    except ConfigError:
        return "md5"
    return "md5" if alg == "auto" else alg


def _refused_alg_note(config, alg) -> str | None:
    """Say why a config refuses a hash parameter of `alg` (None when it accepts it)."""
    if alg is None or not config.secret or alg in ACCEPTED_HASH_ALGS[config.hash_alg]:
        return None
    return ("[handler] hash_alg = %s accepts %s: a %s hash is refused like a wrong one"
            % (config.hash_alg, " or ".join(ACCEPTED_HASH_ALGS[config.hash_alg]), alg))


def parse_captured(data: bytes):
    """Read a captured request: a rejected.jsonl line or a raw HTTP request.

    Returns (query, content_type, body, remote_addr).
    """
    import json
    text = data.lstrip()
    if text.startswith(b"{"):
        import base64
        try:
            record = json.loads(text.splitlines()[0] if b"\n" in text else text)
            body = base64.b64decode(record.get("body_b64") or "")
            headers = {str(k).lower(): str(v) for k, v in (record.get("headers") or {}).items()}
            query = str(record.get("query") or "")
        except (ValueError, TypeError, AttributeError):
            raise UsageError("not a rejected.jsonl line (bad JSON, body_b64 or headers)") from None
        return query, headers.get("content-type", ""), body, record.get("remote_addr")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    lines = head.decode("latin-1").splitlines()
    if not lines or len(lines[0].split()) < 2:
        raise UsageError("not a raw HTTP request (no request line) nor a rejected.jsonl line")
    target = lines[0].split()[1]
    query = target.partition("?")[2]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif _ascii_digits(headers.get("content-length", "")):
        length = headers["content-length"].lstrip("0") or "0"
        if len(length) < 19:  # int() refuses 4,301 digits; a body is shorter than 19 anyway
            body = body[:int(length)]
    return query, headers.get("content-type", ""), body, None


def _dechunk(data: bytes) -> bytes:
    """Join the chunks of a Transfer-Encoding: chunked body."""
    chunks = []
    while data:
        size_line, sep, data = data.partition(b"\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise UsageError("bad chunked body in the captured request") from None
        if size == 0 or not sep:
            break
        chunks.append(data[:size])
        data = data[size:].lstrip(b"\r\n")
    return b"".join(chunks)


def captured_records(data: bytes) -> list:
    """Split a captured file into requests: each line of a rejected.jsonl, or one raw request.

    A last JSON line with no newline is a write in progress (skipped) unless it
    is the only one (a line pasted into a file).
    """
    if not data.lstrip().startswith(b"{"):
        return [data]
    lines = data.lstrip().split(b"\n")
    torn = lines.pop() if lines[-1].strip() else None
    records = [line for line in lines if line.strip()]
    return records or ([torn] if torn else [])


def cmd_verify(args) -> int:
    """Explain why the newest captured request (every one with --all) passes or fails the hash check."""
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    records = captured_records(data)
    if not records:
        raise UsageError("%s is empty: nothing to explain" % args.file)
    if not args.all:
        if len(records) > 1:
            print("the newest of %d requests in %s (--all explains each):" % (len(records), args.file))
        return _verify_one(args, records[-1])
    failed = 0
    for number, record in enumerate(records, 1):
        print("%sline %d of %d:" % ("\n" if number > 1 else "", number, len(records)))
        try:
            failed += _verify_one(args, record) != 0
        except UsageError as exc:
            print("   %s" % exc)
            failed += 1
    print("\n%d of %d pass" % (len(records) - failed, len(records)))
    return 1 if failed else 0


def _verify_one(args, data) -> int:
    """Explain step by step why one captured request passes or fails the hash check."""
    query, content_type, body, _addr = parse_captured(data)
    if args.secret is not None:
        secrets, charset_default = (args.secret,), args.default_charset or "windows-1251"
        try:
            hash_alg = _config_for(args).hash_alg
        except ConfigError:
            hash_alg = "auto"
    else:
        config = _config_for(args)
        secrets, charset_default = config.secrets, args.default_charset or config.default_charset
        hash_alg = config.hash_alg
    secret = secrets[0] if secrets else ""
    charset_default = _cli_charset(charset_default)
    say = print
    say("1. body: %d bytes, query: %r, Content-Type: %r" % (len(body), query, content_type))
    try:
        request = decode_request(body, query, content_type, charset_default)
    except BadRequest as exc:
        say("2. decoding FAILED: %s -> the handler answers 400" % exc.reason)
        return 1
    say("2. decoded as %s in %s%s; parameters: %s" % (
        request.format, request.charset, " (lossy: some bytes did not decode)" if request.lossy else "",
        ", ".join(sorted(request.params))))
    if not request.params.get("phone"):
        say("3. no phone parameter: not an SMSC callback -> 400")
        return 1
    kind = classify(request.params)
    say("3. kind: %s (hashed string %s:<secret>)" % (kind, ":".join(SIGNED_FIELDS[kind])))
    alg = sent_hash_alg(request.params)
    if alg is None:
        say("4. no md5/sha1/crc32 parameter was sent")
        if secret:
            say("   a secret is configured: refused unless require_signature = no")
            return 1
        say("   no secret configured: accepted unchecked")
        return 0
    received = request.params[alg]
    say("4. %s sent: %s" % (alg, received))
    if not secret:
        say("   no secret configured (give --secret or set [handler] secret): cannot check")
        return 1
    refused = [name for name in HASH_ALGORITHMS
               if name in request.params and name not in ACCEPTED_HASH_ALGS[hash_alg]]
    if refused:
        say("5. FAIL: [handler] hash_alg = %s accepts %s: a %s hash is refused like a wrong one"
            % (hash_alg, " or ".join(ACCEPTED_HASH_ALGS[hash_alg]), refused[0]))
        return 1
    shape = signed_shape_error(kind, request.params)
    if shape is not None:
        say("5. FAIL: %s, so the hash can't count for a %s: it could be another kind's (see the "
            "README's security notes)" % (shape, kind))
        return 1
    candidates = [(key, one, label, candidate) for key, one in enumerate(secrets)
                  for label, candidate in signature_candidates(kind, request.params, request.raw, one)]
    for number, (key, secret, label, candidate) in enumerate(candidates, 1):
        # Show the string in the charset it was encoded in, the secret masked.
        codec = label[len("mes in "):] if label.startswith("mes in ") else CODECS[request.charset]
        shown = candidate[:-len(secret)].decode(codec, "replace") + "<secret>"
        ok = hash_matches(alg, received, candidate)
        if len(secrets) > 1:
            label = "secret %d, %s" % (key, label)
        say("   try %d (%s): %s(%r) = %s -> %s" % (number, label, alg, shown,
                                                   control_hash(alg, candidate), "MATCH" if ok else "no match"))
        if ok:
            say("5. PASS: the control hash matches")
            return 0
    say("5. FAIL: no candidate matches. Check that the secret equals the one after %s= in "
        "SMSC's handler URL, and the charset." % alg)
    return 1


########################################################################
# Command line: tail, stats, check
########################################################################

def _short(value, width=40):
    """Shorten a field for a readable line."""
    text = _printable(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def format_event(event: dict) -> str:
    """One readable line for an event: local time with its offset, kind, phone, what happened, the id.

    Local, like a zoneless --since: a time copied from here selects from that event on.
    """
    when = local_time(_event_time(event)) if event.get("received_at") else "?"
    kind = event.get("kind", "?")
    phone = event.get("phone") or "-"
    if kind == "status":
        what = "%s%s" % (event.get("status_name") or "status=%s" % event.get("status"),
                         " (final)" if event.get("final") else "")
        if event.get("err"):
            what += ", err %s %s" % (event.get("err"), event.get("err_name"))
        extra = "id=%s" % event.get("id")
        if event.get("cost") is not None:
            extra += " cost=%s" % event.get("cost")
        if event.get("type") not in (None, 0):
            extra += " type=%s" % event.get("type_name")
    elif kind == "incoming":
        what = '"%s" to %s' % (_short(event.get("mes")), event.get("to"))
        extra = "id=%s" % event.get("id")
    else:
        what = "call" + (" menu=%s" % event.get("callmenu") if event.get("callmenu") else "")
        extra = "ts=%s" % event.get("ts")
    # Every field comes from a stranger's phone: one line, no terminal escapes.
    return _printable("%s  %-8s %-14s %s  %s" % (when, kind, phone, what, extra))


def cmd_tail(args) -> int:
    """Show stored events, newest last; follow new lines with -f."""
    import json
    from collections import deque
    config = _config_for(args)
    args.since_ts = None
    kinds = _kinds(args)
    # The newest N overall are among the last N of each file (each is in time order).
    positions, newest, started = {}, {}, time.time()
    for path, _end, event in iter_stored(config, kinds, positions=positions):
        if _matches(event, args):
            newest.setdefault(path, deque(maxlen=args.n)).append(event)
    events = sorted((event for last in newest.values() for event in last),
                    key=_event_time)[-args.n:]  # stable: one file's order is kept

    def show(event):
        if not args.json:
            print(format_event(event))
            return
        text = json.dumps(event, ensure_ascii=False)
        try:
            text.encode(sys.stdout.encoding or "utf-8")
        except (UnicodeEncodeError, LookupError):
            text = json.dumps(event)  # the terminal can't show it (or a lone surrogate): escape
        print(text)

    for event in events:
        show(event)
    sys.stdout.flush()
    if not events:
        sys.stderr.write(_nothing_found(config, kinds, positions, args) + "\n")
    if not args.follow:
        return 0
    try:
        while True:
            # Known by identity: a rotated file is finished before its successor (SPEC §11).
            for _path, _end, event in iter_stored(config, kinds, positions=positions, history=started):
                if _matches(event, args):
                    show(event)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _nothing_found(config, kinds, positions, args) -> str:
    """Say on which folder and files `tail` found no event to show."""
    filtered = any(getattr(args, name, None) for name in ("phone", "id", "kind"))
    if not positions:
        return ("tail: no events yet: no %s file in %s (the data folder of config %s)"
                % (config.jsonl_path, config.data_dir, config.source or "built-in defaults"))
    files = ", ".join(sorted(os.path.basename(path) for path in positions))
    return "tail: no %sevents in %s (%s)" % ("matching " if filtered else "", config.data_dir, files)


#: The Unix seconds of 0001-01-01 and 9999-12-31T23:59:59Z: the index and the report
#: name days by their UTC date, which has four digits only in between.
_FIRST_SECOND, _LAST_SECOND = -62135596800, 253402300799


def _range_of(args):
    """Return the (since, until) Unix seconds of --since/--until (None when not given).

    A time near the ends of the calendar in a zone far from UTC (9999-12-31T23:59-12:00)
    lies beyond them in UTC: it is kept to them, which selects the same events.
    """
    since = parse_since(args.since) if getattr(args, "since", None) else None
    until = parse_since(args.until, option="--until") if getattr(args, "until", None) else None
    return tuple(None if moment is None else min(max(moment, _FIRST_SECOND), _LAST_SECOND)
                 for moment in (since, until))


def _print_json_lines(items) -> None:
    """Print one JSON object per line."""
    import json
    for item in items:
        print(json.dumps(item, ensure_ascii=False, sort_keys=True))


def cmd_stats(args) -> int:
    """Print counts, delivery rate and cost of the stored events (from the tracking index)."""
    import json
    config = _config_for(args)
    since, until = _range_of(args)
    with open_index(config) as index:
        stats = index.stats(since, until, by_day=args.by == "day")
    if config.relay_url:
        stats["relay"] = relay_counts(config)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2, sort_keys=True))
        return 0
    if args.csv:
        _print_stats_csv(stats)
        return 0
    rows = [("events", stats["events"])]
    rows += [("  " + kind, count) for kind, count in sorted(stats["by_kind"].items())]
    rows.append(("statuses", ""))
    rows += [("  " + name, count) for name, count in sorted(stats["by_status"].items(),
                                                              key=lambda item: -item[1])]
    if stats["by_error"]:
        rows.append(("errors", ""))
        rows += [("  " + name, count) for name, count in sorted(stats["by_error"].items(),
                                                                  key=lambda item: -item[1])]
    rate = stats["delivery_rate"]
    rows += [("messages", stats["messages"]),
             ("  delivered", stats["delivered"]),
             ("  failed", stats["failed"]),
             ("  with a final status", stats["final"]),
             ("  still without one", stats["pending"]),
             ("delivery rate", "-" if rate is None else "%.1f%% (%d of %d final)"
              % (rate * 100, stats["delivered"], stats["final"])),
             ("total cost", "%.2f" % stats["total_cost"])]
    if stats["failures_by_error"]:
        rows.append(("failed messages by error", ""))
        rows += [("  failed: " + name, count) for name, count in sorted(stats["failures_by_error"].items(),
                                                                          key=lambda item: -item[1])]
    if stats["by_sender"] and set(stats["by_sender"]) != {"-"}:  # some status named its sender
        rows.append(("by sender", "messages  delivered  failed  pending  rate  cost"))
        for sender, entry in sorted(stats["by_sender"].items(), key=lambda item: -item[1]["messages"]):
            rows.append(("  " + _short(sender, 30), _sender_cells(entry)))
    rows += _relay_rows(stats.get("relay"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(_printable("%-*s  %s" % (width, name, value)).rstrip())
    if args.by == "day":
        print()
        print("%-10s  %8s %8s %8s  %8s %9s %6s %7s %6s %9s" % (
            "day", "status", "incoming", "calls", "messages", "delivered", "failed", "pending", "rate", "cost"))
        for day in stats["by_day"]:
            rate = day["delivery_rate"]
            print("%-10s  %8d %8d %8d  %8d %9d %6d %7d %6s %9.2f" % (
                day["day"], day["events"]["status"], day["events"]["incoming"], day["events"]["waitcall"],
                day["messages"], day["delivered"], day["failed"], day["pending"],
                "-" if rate is None else "%.1f%%" % (rate * 100), day["cost"]))
    return 0


def _sender_cells(entry) -> str:
    """One sender's row of the stats table."""
    rate = entry["delivery_rate"]
    return "%8d  %9d  %6d  %7d  %4s  %.2f" % (
        entry["messages"], entry["delivered"], entry["failed"], entry["pending"],
        "-" if rate is None else "%.0f%%" % (rate * 100), entry["cost"])


def _print_stats_csv(stats) -> None:
    """Print stats as CSV: per day with --by day, else one section,name,value row per number."""
    import csv
    out = csv.writer(sys.stdout, lineterminator="\n")
    if "by_day" in stats:
        out.writerow(["day", "status_events", "incoming", "waitcall", "messages", "delivered", "failed",
                      "pending", "delivery_rate", "cost"])
        for day in stats["by_day"]:
            out.writerow([day["day"], day["events"]["status"], day["events"]["incoming"],
                          day["events"]["waitcall"], day["messages"], day["delivered"], day["failed"],
                          day["pending"], "" if day["delivery_rate"] is None else day["delivery_rate"],
                          "%.2f" % day["cost"]])
        return
    out.writerow(["section", "name", "value"])
    for name in ("events", "messages", "delivered", "failed", "pending", "final", "delivery_rate", "total_cost"):
        out.writerow(["total", name, "" if stats[name] is None else stats[name]])
    for section in ("by_kind", "by_status", "by_error", "failures_by_error"):
        for name, count in sorted(stats[section].items()):
            out.writerow([section[3:] if section.startswith("by_") else section, name, count])
    for sender, entry in sorted(stats["by_sender"].items()):
        for name in ("messages", "delivered", "failed", "pending", "cost"):
            out.writerow(["sender", "%s %s" % (sender, name), entry[name]])


########################################################################
# Command line: tracking (status, messages, calls, index) and prune
########################################################################

#: `status` exit codes (SPEC §10): delivered, pending, failed, unknown id.
EXIT_DELIVERED, EXIT_PENDING, EXIT_FAILED, EXIT_UNKNOWN = 0, 3, 4, 5


def _when(iso) -> str:
    """Show an ISO 8601 UTC time readably, keeping its zone: 2026-11-25 10:00:03Z."""
    return "-" if not iso else iso.replace("T", " ")[:19] + "Z"


def format_state(state: dict) -> str:
    """Readable lines for a message's state: a headline, then its history."""
    head = "%s  %s  %s  %s%s" % (state["id"], state["phone"], state["outcome"],
                                 "-" if state["status"] is None else "%s %s" % (state["status"], state["status_name"]),
                                 ", err %s %s" % (state["err"], state["err_name"]) if state.get("err") else "")
    head += "  at %s" % _when(state["at"])
    if state.get("cost") is not None:
        head += "  cost %s" % state["cost"]
    lines = [head]
    for item in state.get("history", ()):
        lines.append("  %s  %s %s%s  (received %s)" % (
            _when(item["at"]), item["status"], item["status_name"],
            ", err %s %s" % (item["err"], error_name(item["err"])) if item.get("err") else "",
            _when(item["received_at"])))
    return "\n".join(_printable(line) for line in lines)  # each escaped alone: a stranger's \n stays text


def status_exit(states) -> int:
    """Exit status of `status` for the states of one id (SPEC §10)."""
    if not states:
        return EXIT_UNKNOWN
    outcomes = {state["outcome"] for state in states}
    if outcomes == {"delivered"}:
        return EXIT_DELIVERED
    return EXIT_FAILED if "failed" in outcomes else EXIT_PENDING


def cmd_status(args) -> int:
    """Show the current state of a sent message and its history."""
    config = _config_for(args)
    with open_index(config) as index:
        states = index.states(args.id, args.phone)
    if not states:
        sys.stderr.write("smsc_handler status: no status stored for message id %s%s\n" % (
            _printable(args.id), " and phone %s" % _printable(args.phone) if args.phone else ""))
        return EXIT_UNKNOWN
    if args.json:
        _print_json_lines(states)
    else:
        print("\n".join(format_state(state) for state in states))
    return status_exit(states)


def format_message(state: dict) -> str:
    """One readable line for a message's current state."""
    what = "-" if state["status"] is None else "%s %s" % (state["status"], state["status_name"])
    if state.get("err"):
        what += ", err %s %s" % (state["err"], state["err_name"])
    line = "%s  %-10s %-16s %-9s %s" % (_when(state["at"]), state["id"], state["phone"], state["outcome"], what)
    if state.get("cost") is not None:
        line += "  cost=%s" % state["cost"]
    return _printable(line)


def cmd_messages(args) -> int:
    """List messages with their current state, newest last."""
    config = _config_for(args)
    since, _until = _range_of(args)
    outcome = "pending" if args.pending else "failed" if args.failed else "delivered" if args.delivered else None
    with open_index(config) as index:
        states = index.messages(since, outcome)
    if args.json:
        _print_json_lines(states)
    else:
        for state in states:
            print(format_message(state))
    return 0


def _files_signature(config):
    """Sizes and identities of the event files: unchanged means nothing new to index."""
    signature = []
    for name in stored_names(config, ("waitcall",)):
        try:
            stat = os.stat(name)
            signature.append((name, stat.st_ino, stat.st_size))
        except OSError:
            signature.append((name, None, None))
    return signature


def wait_for_calls(config, phone, since=None, wait=0.0, interval=0.25) -> list:
    """Return the calls from `phone` since `since`, polling up to `wait` seconds until one is stored."""
    deadline = time.monotonic() + wait
    with TrackingIndex(config) as index:
        seen = None
        while True:
            signature = _files_signature(config)
            if signature != seen:
                index.catch_up()
                seen = signature
                calls = index.calls(phone, since)
                if calls:
                    return calls
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            time.sleep(min(interval, left))


def cmd_calls(args) -> int:
    """Show number-confirmation calls from a phone; --wait polls until one arrives."""
    config = _config_for(args)
    since, _until = _range_of(args)
    if args.wait is not None and args.wait < 0:
        raise UsageError("--wait takes seconds (0 or more), not %s" % args.wait)
    if not phone_digits(args.phone):
        raise UsageError("--phone needs digits, not %r" % args.phone)
    calls = wait_for_calls(config, args.phone, since, args.wait or 0.0)
    if args.json:
        _print_json_lines(calls)
    else:
        for event in calls:
            print(format_event(event))
    if not calls:
        sys.stderr.write("smsc_handler calls: no call from %s%s\n" % (
            _printable(args.phone), " since %s" % _printable(args.since) if args.since else ""))
        return EXIT_UNKNOWN
    return 0


def cmd_index(args) -> int:
    """Catch the tracking index up with the files (or rebuild it) and say what it holds."""
    config = _config_for(args)
    started = time.monotonic()
    with TrackingIndex(config) as index:
        added = index.rebuild() if args.rebuild else index.catch_up()
        sizes = index.sizes()
    print("%s %d event(s) in %.2f s; the index holds %d event(s), %d message(s), from %d file(s)" % (
        "rebuilt:" if args.rebuild else "caught up:", added, time.monotonic() - started,
        sizes["events"], sizes["messages"], sizes["files"]))
    return 0


def parse_age(text: str) -> float:
    """Parse prune's AGE (90d, 12w, 36h) into seconds."""
    units = {"h": 3600, "d": 86400, "w": 604800}
    text = text.strip()
    if not (text[:-1].isdigit() and text[:-1].isascii() and len(text) < 12 and text[-1:].lower() in units):
        raise UsageError("--older-than takes an age like 90d, 12w or 36h, not %r" % text)
    return int(text[:-1]) * units[text[-1:].lower()]


def _forward_unfinished(config, path, events, state):
    """Prune check: `forward` has not run the hook to the end of this file."""
    if not config.hook_command or config.hook_run != "forward":
        return None
    offset, identity = state.position(path) if state is not None else (0, None)
    if identity != file_identity(path) or offset < os.path.getsize(path):
        return "`forward` has not finished it"
    return None


def _hooks_unsucceeded(config, path, events, state):
    """Prune check: an event of this file has a failed (or unfinished) hook run."""
    if not config.hook_command or state is None:
        return None
    for event in events:
        if state.hook_state(event.get("event_id")) in ("failed", "running"):
            return "the hook has not succeeded for event %s" % event.get("event_id")
    return None


def _relay_unfinished(config, path, events, state):
    """Prune check: the relay has not read this file to its end, or the app refused one of its events."""
    if not config.relay_url or state is None:
        return None
    if path in relay_undelivered_files(config, state):
        return "the relay has not delivered all of it"
    return None


#: Checks prune runs before removing an event file: each takes (config, path, events,
#: state store or None) and returns why the file is still needed, or None. Others
#: (the relay) append theirs.
PRUNE_CHECKS = [_forward_unfinished, _hooks_unsucceeded, _relay_unfinished]


def prune_candidates(config: Config, older_than: float, now: float | None = None) -> list:
    """Return the dated event files and rotated rejected.jsonl pieces older than `older_than` seconds."""
    now = time.time() if now is None else now
    cutoff_day = time.strftime("%Y-%m-%d", time.gmtime(now - older_than))
    found = []
    if "{date}" in config.jsonl_path:
        # A file's day is over when the next one starts: older than AGE when that is before now - AGE.
        found = [path for path in event_files(config) if _next_day(_path_date(config, path)) <= cutoff_day]
    for piece in rotated_pieces(os.path.join(config.data_dir, "rejected.jsonl")):
        try:
            if os.path.getmtime(piece) < now - older_than:
                found.append(piece)
        except OSError:
            continue
    return found


def prune_files(config: Config, older_than: float, dry_run=False, force=False, say=print) -> tuple:
    """Remove old dated event files (their index entries and state first); return (removed, kept)."""
    removed, kept = [], []
    candidates = prune_candidates(config, older_than)
    event_names = set(event_files(config))
    state = None
    if candidates and os.path.exists(os.path.join(config.data_dir, STATE_FILE)):
        state = StateStore(config)
    index = TrackingIndex(config) if candidates else None
    try:
        if index is not None:
            index.catch_up()  # what is forgotten below must have been indexed first
        for path in candidates:
            is_events = path in event_names
            events = [event for _end, event in read_events(path)] if is_events else []
            reasons = []
            if is_events and not force:
                reasons = [why for why in (check(config, path, events, state) for check in PRUNE_CHECKS) if why]
            name = os.path.relpath(path, config.data_dir)
            if reasons:
                kept.append(path)
                say("kept %s: %s (--force removes it anyway)" % (name, reasons[0]))
                continue
            if dry_run:
                say("would remove %s (%d event(s))" % (name, len(events)))
                removed.append(path)
                continue
            if is_events:
                index.forget_file(path)
            if state is not None and is_events:
                state.forget_events([event.get("event_id") for event in events], path)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            removed.append(path)
            say("removed %s (%d event(s))" % (name, len(events)))
    finally:
        if index is not None:
            index.close()
        if state is not None:
            state.close()
    return removed, kept


def cmd_prune(args) -> int:
    """Remove dated event files older than AGE, with their index entries and state."""
    config = _config_for(args)
    age = parse_age(args.older_than)
    if age < config.dedupe_keep_days * 86400:
        raise UsageError("--older-than %s is below [dedupe] keep_days = %g: SMSC may still retry those "
                         "events" % (args.older_than, config.dedupe_keep_days))
    removed, kept = prune_files(config, age, args.dry_run, args.force)
    if not removed and not kept:
        print("nothing older than %s to remove" % args.older_than)
    return 0


def _web_root_of(path, environ):
    """Return the web root that `path` lies under, if it looks reachable from the web."""
    real = os.path.realpath(path)
    document_root = environ.get("DOCUMENT_ROOT")
    if document_root:
        root = os.path.realpath(document_root)
        if real == root or real.startswith(root + os.sep):
            return root
    parts = real.split(os.sep)
    for index, part in enumerate(parts):
        if part in ("public_html", "www", "htdocs", "html", "httpdocs", "wwwroot"):
            return os.sep.join(parts[:index + 1])
    return None


def _outside_web_root(config, web_root):
    """Return data_dir advice outside the web root: (path relative to the config, absolute path)."""
    target = os.path.join(os.path.dirname(web_root), "smsc-data")
    return os.path.relpath(target, config.base_dir), target


def check_setup(config_path=None, environ=None) -> list:
    """Check config, data folder, state store and hook; return (level, message) problems."""
    environ = os.environ if environ is None else environ
    problems = []
    try:
        config = load_config(find_config(config_path, environ))
    except ConfigError as exc:
        return [("error", exc.reason)]
    data_dir = config.data_dir
    web_root = _web_root_of(data_dir, environ)
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        problems.append(("error", "data_dir %s exists but is not a folder. Fix: move that file away "
                         "or point data_dir elsewhere" % data_dir))
    elif os.path.isdir(data_dir):
        probe = os.path.join(data_dir, ".check-%d" % os.getpid())
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            problems.append(("error", "data_dir %s is not writable (%s). Fix: give the web server's "
                             "user write access to it" % (data_dir, exc.strerror)))
        else:
            problem = storage_problem(config)  # a state store or event file of another user
            if problem:
                problems.append(("error", problem + ". Fix: chown it to the web server's user "
                                 "(e.g. chown www-data), who must own everything in data_dir"))
        mode = os.stat(data_dir).st_mode & 0o777
        if mode & 0o077:
            problems.append(("warning", "data_dir %s is open to other users (mode %04o): events and "
                             "state are private. Fix: chmod 700 %s" % (data_dir, mode, data_dir)))
        if web_root and not os.path.exists(os.path.join(data_dir, ".htaccess")):
            problems.append(("warning", "data_dir has no .htaccess yet (the handler writes it on the "
                             "next request)"))
    else:
        ancestor = _first_existing(data_dir)
        if not os.path.isdir(ancestor):
            problems.append(("error", "data_dir %s cannot be created: %s is a file, not a folder. "
                             "Fix: point data_dir at a folder" % (data_dir, ancestor)))
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            problems.append(("error", "data_dir %s does not exist and cannot be created in %s. Fix: "
                             "create it, writable by the web server's user" % (data_dir, ancestor)))
    if web_root:
        relative, target = _outside_web_root(config, web_root)
        problems.append(("warning", "data_dir %s is inside the web root %s: only its .htaccess keeps "
                         "events private (Apache only). Fix: set data_dir = %s (that is %s, outside "
                         "the web root)" % (data_dir, web_root, relative, target)))
    if config.dedupe_enabled or config.hook_command:
        state_path = os.path.join(data_dir, STATE_FILE)
        try:
            import sqlite3
        except ImportError:
            problems.append(("error", "this Python has no sqlite3: set [dedupe] enabled = no and no "
                             "[hook] command, or use a Python with sqlite3"))
        else:
            problems.extend(_state_store_problems(config, state_path, sqlite3))
    if config.hook_command:
        if _hook_program(config) is None:
            problems.append(("error", "[hook] command: %s is not an executable file. Fix: give its "
                             "full path, and make it executable" % config.hook_command[0]))
        problems.extend(_hook_timeout_problems(config))
    if config.secret == "":
        problems.append(("warning", "[handler] secret is empty: anyone who finds the URL can post "
                         "events. Fix: add ?md5=SECRET to the handler URL in SMSC and set secret"))
    problems.extend(_secret_warnings(config))
    owner = os.lstat(_first_existing(data_dir)).st_uid
    if os.geteuid() == 0 and owner != 0:
        name = _user_name(owner)
        problems.append(("warning", "check runs as root, who can write anywhere, but data_dir belongs "
                         "to %s: run the command line as that user, e.g. sudo -u %s python3 "
                         "smsc_handler.py check (files root creates there lock that user out)"
                         % (name, name)))
    problems += relay_problems(config)
    return problems


def _user_name(uid: int) -> str:
    """Return the login name of a user id (the number when it has none)."""
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _secret_warnings(config) -> list:
    """Warn while two secrets are set (a rotation left half done) and when crc32 is accepted."""
    problems = []
    if len(config.secrets) > 1:
        problems.append(("warning", "[handler] secret holds two secrets (a rotation is running): either "
                         "one verifies. Fix: once SMSC's handler URL has had the new one for 4 hours, "
                         "remove the old one (the second)"))
    if config.secret and config.hash_alg == "crc32":
        problems.append(("warning", "[handler] hash_alg = crc32: anyone who sees one crc32 can forge "
                         "others. Fix: use md5= (or sha1=) in SMSC's handler URL and hash_alg = auto"))
    return problems


def _state_store_problems(config, state_path, sqlite3) -> list:
    """Check the state store: readable and writable by this user, intact, nothing left pending.

    A permission problem (check run as another user than the web server's, or
    files left owned by root) is said as such: moving the store aside would
    throw away dedupe ids and the failed hook outcomes `replay` needs.
    """
    from urllib.parse import quote
    problems = []
    if not os.path.exists(state_path):
        return problems
    data_dir = config.data_dir
    names = [STATE_FILE, STATE_FILE + "-wal", STATE_FILE + "-shm", PENDING_FILE]
    blocked = [name for name in names if os.path.exists(os.path.join(data_dir, name))
               and not os.access(os.path.join(data_dir, name), os.R_OK | os.W_OK)]
    if not os.access(data_dir, os.W_OK | os.X_OK):
        blocked.insert(0, "the folder")
    if blocked:
        problems.append(("error", "state store in %s: %s not readable and writable by this user "
                         "(uid %d): a permission problem, not damage; keep the store (it holds the "
                         "dedupe ids and the failed hook outcomes replay needs). Fix: run check, "
                         "replay and forward as the web server's user (e.g. sudo -u www-data "
                         "python3 smsc_handler.py check), or give that user the files (chown)"
                         % (data_dir, ", ".join(blocked), os.getuid())))
    folder_owner = os.stat(data_dir).st_uid
    for name in names + ["forward.lock"]:
        path = os.path.join(data_dir, name)
        try:
            owner = os.stat(path).st_uid
        except OSError:
            continue
        if owner != folder_owner:
            problems.append(("warning", "%s is owned by uid %d, the data folder by uid %d: if that "
                             "is the web server's user, it can't write %s and callbacks get 503. "
                             "Fix: chown it to the data folder's owner, and run the command line as "
                             "that user" % (path, owner, folder_owner, name)))
    try:
        # A URI, for mode=ro: the path quoted, or '#', '?', '%' in it would end or change it.
        db = sqlite3.connect("file:%s?mode=ro" % quote(os.path.abspath(state_path)), uri=True, timeout=2)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError as exc:
        if not blocked:  # locked, or no room: not damage either
            problems.append(("error", "state store %s could not be checked (%s). Fix: run check "
                             "again as the web server's user; if it says the same, look at the "
                             "disk (free space, permissions)" % (state_path, exc)))
        return problems
    except sqlite3.DatabaseError as exc:
        result = str(exc)
    if result != "ok":
        problems.append(("error", "state store %s is damaged (%s). Fix: stop the server, move it "
                         "aside with its -wal and -shm; the handler creates a new one (dedupe "
                         "forgets past ids, replay the failed hook outcomes)" % (state_path, result)))
    pending = os.path.join(data_dir, PENDING_FILE)
    if os.path.exists(pending):
        problems.append(("warning", "%s holds hook successes the state store could not take at "
                         "once; the next request, forward or replay records them" % pending))
    return problems


def _hook_timeout_problems(config) -> list:
    """Check that an inline hook's timeout is one a request can wait out."""
    problems = []
    if config.hook_run == "inline" and config.hook_timeout > INLINE_HOOK_TIMEOUT:
        problems.append(("warning", "[hook] timeout = %g with run = inline: the request waits for "
                         "the hook, and web servers end a request after 30-60 s (proxy read "
                         "timeout, uWSGI harakiri, gunicorn timeout, CGI timeout); a request ended "
                         "mid-hook leaves no outcome, so the hook runs again on SMSC's next try. "
                         "Fix: run = forward for slow hooks, or a timeout of at most %d s"
                         % (config.hook_timeout, INLINE_HOOK_TIMEOUT)))
    return problems


#: Seconds of [hook] timeout beyond which `check` warns for an inline hook (the
#: proxy read timeout the deploy recipes set is 30 s).
INLINE_HOOK_TIMEOUT = 30


def cmd_check(args) -> int:
    """Print one line per problem with its fix; exit 1 on errors."""
    problems = check_setup(getattr(args, "config", None))
    for level, message in problems:
        print("%s: %s" % (level, message))
    errors = [p for p in problems if p[0] == "error"]
    try:
        path, origin = config_origin(getattr(args, "config", None))
    except ConfigError:
        return 1  # already said
    read = "config %s (%s)" % (path, origin) if path else origin
    if not problems:
        print("ok: %s; data folder, state store and hook look right" % read)
    elif not (len(problems) == 1 and path and path in problems[0][1]):  # a config error names it
        print("read: " + read)
    return 1 if errors else 0


########################################################################
# Command line: replay and forward (the hook outside the request)
########################################################################

def _require_hook(config):
    """Refuse replay/forward without a [hook] command."""
    if not config.hook_command:
        raise ConfigError("no [hook] command is configured: nothing to run")


def _hook_verdict(config, row, event, now, force=False, forget_old=True) -> str:
    """Say whether `forward` or `replay` may run an event's hook now: "run", "busy" or "done".

    `row` is the event's hook record (StateStore.hook_row). "busy": another
    process runs it (a claim younger than its lease), or, with run = inline,
    its request may be about to claim it (no record, event younger than the
    lease); `force` never overrides that. "done": it succeeded, or (with
    `forget_old`) it has no record and is older than keep_days, whose
    successes are pruned; `force` overrides both.
    """
    lease = _hook_lease(config)
    if row is None:
        age = now - _event_time(event)
        if config.hook_run == "inline" and age < lease:
            return "busy"
        if forget_old and not force and age > config.dedupe_keep_days * 86400:
            return "done"
        return "run"
    ok, claimed_at = row[0], row[1] or 0
    if ok is None and now - claimed_at < lease:
        return "busy"
    if ok == 1 and not force:
        return "done"
    return "run"


def _claim_for(config, state, event, line, force=False, forget_old=True):
    """Claim an event's hook for `forward`/`replay`; return (verdict, claim time or None)."""
    event_key = event["event_id"]
    state.apply_pending_hooks()
    now = time.time()
    verdict = _hook_verdict(config, state.hook_row(event_key), event, now, force, forget_old)
    if verdict != "run":
        return verdict, None
    state.begin()  # decided again under the write lock: two runners can't both claim it
    try:
        verdict = _hook_verdict(config, state.hook_row(event_key), event, now, force, forget_old)
        if verdict == "run":
            state.take_hook_claim(event_key, now, line)
        state.commit()
    except BaseException:
        state.rollback()
        raise
    return verdict, now if verdict == "run" else None


def _replay_lines(config, kinds):
    """Yield (piece, line, event) for every stored event, rotated pieces included, oldest first."""
    import json
    for _name, piece, _end, line in _stored_lines(config, kinds, history=True):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a mended torn line
        if isinstance(event, dict) and event.get("event_id"):
            yield piece, line, event


def cmd_replay(args) -> int:
    """Run the hook again for stored events whose hook has not succeeded."""
    if getattr(args, "relay", False):
        return replay_relay(args)
    config = _config_for(args)
    _require_hook(config)
    args.since_ts = parse_since(args.since) if args.since else None
    dry_run = getattr(args, "dry_run", False)
    counts = [0, 0, 0]
    saved = _catch_stop_signals()
    try:
        _replay_all(config, args, dry_run, counts)
    finally:
        _release_stop_signals(saved)
    ok_count, failed, busy = counts
    if dry_run:
        print("would replay %d event(s)%s" % (ok_count, ", %d running elsewhere" % busy if busy else ""))
        return 0
    print("replayed %d event(s): %d ok, %d failed%s" % (
        ok_count + failed, ok_count, failed, ", %d skipped (running elsewhere)" % busy if busy else ""))
    return 1 if failed else 0


def _replay_all(config, args, dry_run, counts):
    """Replay each matching event once; counts = [ok or listed, failed, skipped as busy]."""
    done = set()
    with StateStore(config) as state:
        for path, line, event in _replay_lines(config, _kinds(args)):
            _stop_point()
            event_key = event["event_id"]
            if event_key in done or not _matches(event, args):
                continue
            done.add(event_key)
            if dry_run:
                state.apply_pending_hooks()
                verdict = _hook_verdict(config, state.hook_row(event_key), event, time.time(), args.force)
                claimed_at = None
            else:
                verdict, claimed_at = _claim_for(config, state, event, line, args.force)
            if verdict == "busy":
                counts[2] += 1
                print("skipped: %s %s: its hook is running in another process (--force does not "
                      "override that); replay it later" % (event.get("kind"), event_key))
                continue
            if verdict != "run":
                continue
            if dry_run:
                counts[0] += 1
                print("would run: %s %s%s" % (event.get("kind"), event_key, _hook_note(state, event_key)))
                continue
            ok, error, _recorded = _run_claimed(config, state, event, line, path, claimed_at)
            if ok:
                counts[0] += 1
            else:
                counts[1] += 1
                print("failed: %s %s: %s" % (event.get("kind"), event_key, error))


def _hook_note(state, event_key) -> str:
    """Say why replay would run an event's hook: its last error, or a claim that lapsed."""
    row = state.hook_row(event_key)
    if row is None:
        return " (never run)"
    if row[0] is None:
        return " (its last run ended without an outcome: the process died)"
    if row[0] == 0:
        return " (failed: %s)" % _printable(row[3] or "")
    return " (succeeded before: --force)"


def _forward_lock(config):
    """Take the data folder's forward lock (one forward at a time)."""
    import fcntl
    ensure_data_dir(config)
    path = os.path.join(config.data_dir, "forward.lock")
    try:
        fd = _open_append(path, config.file_mode)
    except PermissionError:
        owner = _user_name(os.stat(path).st_uid) if os.path.exists(path) else "another user"
        raise StorageError("cannot open %s: permission denied: it belongs to %s (a forward run as "
                           "that user, e.g. root, made it). Fix: run the command line as the web "
                           "server's user (sudo -u www-data python3 smsc_handler.py forward), after "
                           "chown -R www-data %s" % (path, owner, config.data_dir)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError("another `forward` is running on this data folder") from None
    return fd


def forward_backlog(config, state, mark=False) -> int:
    """Count the stored events `forward` still owes its hook; with `mark`, mark them done (--from-now)."""
    import json
    count = 0
    for path in stored_names(config):
        position = state.position(path)
        for _piece, identity, end, line in resume_lines(path, *position, history=True):
            position = (end, identity)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event_id") and _forward_due(config, state, event):
                count += 1
        if mark:
            state.set_position(path, *position)
    return count


def _forward_due(config, state, event) -> bool:
    """Whether `forward` would run an event's hook now (read only: no claim taken)."""
    now = time.time()
    row = state.hook_row(event["event_id"])
    return _hook_verdict(config, row, event, now, False, config.hook_run == "inline") == "run"


def forward_once(config, state, follow=False, tries=3, backoff=1.0, sleep=time.sleep, say=print):
    """Run the hook for each new line of the JSON-lines files, in order.

    The position in each file is kept in the state store after every event,
    and never passes an event whose hook has not ended (run elsewhere right
    now, or failed here): a restart neither skips nor repeats a succeeded
    event. A failing hook is retried with doubling backoff (capped at 60 s);
    without `follow`, after `tries` attempts the run stops there and returns False.
    """
    import json
    waiting = 0
    for path in stored_names(config):
        unfinished = False  # a line before this one is still running elsewhere: the position stays there
        # A renamed (rotated) file is finished before its successor: SPEC §11.
        for _piece, identity, end, line in resume_lines(path, *state.position(path), history=True):
            try:
                event = json.loads(line)
            except ValueError:
                event = None  # a mended torn line: no event there
            _stop_point()
            if isinstance(event, dict) and event.get("event_id"):
                outcome = _forward_event(config, state, event, line, path, follow, tries, backoff,
                                         sleep, say)
                if outcome == "failed":
                    return False  # the position stays before this event: the next run starts here
                if outcome == "busy":
                    waiting += 1
                    unfinished = True
            if not unfinished:
                state.set_position(path, end, identity)
    if waiting and not follow:
        say("%d event(s) left for the next run: their hook is running in another process" % waiting)
    return True


def _forward_event(config, state, event, line, path, follow, tries, backoff, sleep, say) -> str:
    """Run one event's hook for `forward` until it succeeds; return "ok", "done", "busy" or "failed"."""
    attempt, delay = 0, backoff
    while True:
        _stop_point()
        verdict, claimed_at = _claim_for(config, state, event, line,
                                         forget_old=config.hook_run == "inline")
        if verdict != "run":
            return verdict if attempt == 0 or verdict == "busy" else "ok"
        attempt += 1
        ok, error, _recorded = _run_claimed(config, state, event, line, path, claimed_at)
        if ok:
            return "ok"
        say("hook failed for %s (attempt %d): %s" % (event["event_id"], attempt, error))
        if not follow and attempt >= tries:
            return "failed"
        sleep(delay)
        delay = min(delay * 2, 60.0)


def cmd_forward(args) -> int:
    """Run the hook for new lines of the JSON-lines files, in order."""
    config = _config_for(args)
    if not config.relay_url:
        _require_hook(config)
    if config.hook_command and config.hook_run != "forward":
        print("note: [hook] run = inline: requests already run the hook; forward runs it only for "
              "events whose hook has not succeeded")
    lock = _forward_lock(config)
    saved = _catch_stop_signals()
    relay = None
    try:
        with StateStore(config) as state:
            if args.from_now:
                if config.hook_command:
                    skipped = forward_backlog(config, state, mark=True)
                    print("forward: marked %d stored event(s) as done without running the hook; "
                          "the next forward starts from here" % skipped)
                if config.relay_url:
                    skipped = relay_from_now(config, state)
                    print("forward: marked %d stored event(s) as relayed without sending them; "
                          "the next forward relays only what arrives from now on" % skipped)
                return 0
            relay = RelayPass.start(config, args)  # beside the hook pass, with its own positions
            if not config.hook_command:
                return RelayPass.exit_status(relay, True)
            first = not any(state.position(path) != (0, None) for path in event_files(config))
            owed = forward_backlog(config, state)
            if first and owed:
                print("forward: first run on %s: running the hook for %d stored event(s) (stop now "
                      "and run `forward --from-now` to skip them)" % (config.data_dir, owed))
                sys.stdout.flush()
            while True:
                finished = forward_once(config, state, args.follow, args.tries, args.backoff,
                                        _sleep_unless_stopped)
                left = forward_backlog(config, state) if owed or not args.follow else 0
                if owed or not args.follow:
                    print("forward: %d event(s) done, %d left%s" % (
                        max(owed - left, 0), left, " (the hook failed: the next run retries)" if left else ""))
                    sys.stdout.flush()
                if not args.follow:
                    return RelayPass.exit_status(relay, finished)
                _sleep_unless_stopped(args.interval)
                owed = forward_backlog(config, state)
    except KeyboardInterrupt:
        return 0 if relay is None or relay.result != "gone" else 1
    finally:
        _release_stop_signals(saved)
        os.close(lock)


#: Set by SIGINT/SIGTERM while `forward` or `replay` runs: {"requested": bool, "child": Popen}.
_STOP = None


def _catch_stop_signals():
    """Make SIGINT and SIGTERM stop `forward`/`replay` between events, killing a running hook.

    Never a KeyboardInterrupt in the middle of a claim or an outcome's write:
    the hook killed is recorded as failed (its claim given back), and the
    run stops at the next event. Returns the previous handlers.
    """
    import signal
    import threading
    global _STOP
    if threading.current_thread() is not threading.main_thread():
        return {}  # called as a library from a thread: signals are the main thread's business
    _STOP = {"requested": False, "child": None}

    def stop(_signum, _frame):
        _STOP["requested"] = True
        if _STOP["child"] is not None:
            try:
                os.killpg(_STOP["child"].pid, signal.SIGKILL)
            except OSError:
                pass

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def _release_stop_signals(saved):
    """Put back the handlers _catch_stop_signals replaced."""
    import signal
    global _STOP
    if not saved:
        return
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    _STOP = None


def _stop_point():
    """Raise KeyboardInterrupt if a stop was asked for (a safe point: between events)."""
    if _STOP is not None and _STOP["requested"]:
        raise KeyboardInterrupt


def _sleep_unless_stopped(seconds):
    """Sleep, but stop at once when asked to."""
    deadline = time.monotonic() + seconds
    while True:
        _stop_point()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


########################################################################
# Command line: report
########################################################################

def cmd_report(args) -> int:
    """Write the delivery report: one self-contained HTML page (to a file, or - for stdout)."""
    config = _config_for(args)
    since, until = _range_of(args)
    if since is not None and until is not None and until <= since:
        raise UsageError("--until must be later than --since")
    page = render_report(report_data(config, since, until))
    if args.output == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(page.encode("utf-8"))
        sys.stdout.flush()
    else:
        write_report(args.output, page, config.file_mode)
    return 0


########################################################################
# Command line: the relay (relay-secret, forward's relay pass, replay --relay)
########################################################################

def cmd_relay_secret(args) -> int:
    """Print a new [relay] secret for config.ini and the receiving app."""
    print(new_relay_secret())
    return 0


class RelayPass:
    """The relay side of `forward`: a thread with its own state store connection and positions.

    A thread, so that a hook failing for an hour does not hold the relay
    back, nor an app that is down the hook.
    """

    def __init__(self, config, args):
        import threading
        self.config, self.args = config, args
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)

    @classmethod
    def start(cls, config, args):
        """Start the relay pass when [relay] url is set; return it (None when not)."""
        if not config.relay_url:
            return None
        relay = cls(config, args)
        relay.thread.start()
        return relay

    def _run(self):
        config, args = self.config, self.args
        relay = Relay.from_config(config)
        try:
            with StateStore(config) as state:
                relay_prune(state, config.dedupe_keep_days)
                while True:
                    try:
                        self.result = relay_once(config, state, relay, args.follow, args.tries, args.backoff)
                    except StorageError as exc:
                        if not args.follow:
                            raise
                        print("relay: %s (trying again)" % exc.reason)  # a busy store must not end --follow
                    if not args.follow or self.result == "gone":
                        break
                    time.sleep(args.interval)
        except HandlerError as exc:
            self.result, self.error = "error", exc.reason
        except OSError as exc:  # a file the relay reads: a folder where a file should be, no permission
            self.result, self.error = "error", "%s: %s" % (exc.filename or "reading", exc.strerror or exc)
        except Exception as exc:  # a thread's traceback would reach the terminal: one line, as main() says it
            self.result, self.error = "error", _internal_error_line("forward", exc).split(": ", 1)[1]
        finally:
            relay.close()
        if self.result == "gone":
            sys.stderr.write("smsc_handler forward: %s answered 410 Gone: the relay stopped (the hook "
                             "goes on); the event stays undelivered. Fix: set [relay] url to the app's "
                             "address, then run forward again\n" % relay.where)
        elif self.error:
            sys.stderr.write("smsc_handler forward: relay: %s\n" % self.error)

    @staticmethod
    def exit_status(relay, hook_finished) -> int:
        """Wait for the relay pass; return forward's exit status (0 when both sides caught up)."""
        if relay is not None:
            while relay.thread.is_alive():
                relay.thread.join(0.2)  # a timed join, so Ctrl-C still interrupts
                _stop_point()  # and SIGINT/SIGTERM, which only set a flag while forward runs
            if relay.result != "done":
                return 1
        return 0 if hook_finished else 1


def replay_relay(args) -> int:
    """Relay again stored events the app refused (every matching one with --force)."""
    import json
    config = _config_for(args)
    if not config.relay_url:
        raise ConfigError("no [relay] url is configured: nothing to relay")
    args.since_ts = parse_since(args.since) if args.since else None
    relay = Relay.from_config(config)
    counts = {"ok": 0, "failed": 0, "later": 0}
    done, result = set(), None
    try:
        with StateStore(config) as state:
            _relay_tables(state)
            log = _RelayLog(state)
            try:
                for _name, path, _end, line in _stored_lines(config, _kinds(args), history=True):
                    found = _relay_body(line)
                    if found is None or found[0] in done:
                        continue
                    event_id, body = found
                    done.add(event_id)
                    if not _matches(json.loads(line), args):
                        continue
                    if not args.force and relay_state(state, event_id) != "failed":
                        continue
                    result = relay_event(relay, log, event_id, body, path, tries=1)
                    if result == "gone":
                        break
                    counts[result] += 1
            finally:
                log.flush()
    finally:
        relay.close()
    if result == "gone":
        sys.stderr.write("smsc_handler replay: %s answered 410 Gone: the relay stopped. Fix: set "
                         "[relay] url to the app's address\n" % relay.where)
    print("relayed %d event(s): %d delivered, %d refused, %d not answered"
          % (sum(counts.values()), counts["ok"], counts["failed"], counts["later"]))
    return 0 if result != "gone" and not counts["failed"] and not counts["later"] else 1


def relay_problems(config) -> list:
    """Check [relay] beyond what load_config refuses: return (level, message) problems."""
    if not config.relay_url:
        return []
    relay = Relay(config.relay_url, b"", config.relay_timeout)
    problems = []
    if not relay.https and not _is_loopback(relay.host):
        problems.append(("warning", "[relay] url is plain http:// to %s: events (phones, texts) cross the "
                         "network unencrypted. Fix: use https://" % relay.host))
    return problems


def _is_loopback(host) -> bool:
    """Whether a host name or address is this machine."""
    if host in ("localhost", "localhost.localdomain") or (host or "").endswith(".localhost"):
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _relay_rows(counts) -> list:
    """Return the lines `stats` prints about the relay (none when it is off)."""
    if counts is None:
        return []
    return [("relay", ""), ("  delivered", counts["delivered"]), ("  refused (replay --relay)", counts["failed"]),
            ("  being retried", counts["retrying"]), ("  not tried yet", counts["waiting"])]


########################################################################
# Command line: the parser and main
########################################################################

def build_parser():
    """Build the argparse parser: one subcommand per verb."""
    import argparse
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $%s, then config.ini beside the module)" % CONFIG_ENV)
    parser = argparse.ArgumentParser(
        prog="smsc_handler.py", parents=[common],
        description="Receive SMS Center (SMSC) callbacks into JSON lines.")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    def verb(name, func, text):
        sub = verbs.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(func=func)
        return sub

    def kind_option(sub, required=False):
        sub.add_argument("--kind", choices=KINDS, required=required, help="only this kind of event")

    sub = verb("serve", cmd_serve, "run the handler on a local threaded server")
    sub.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sub.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")

    sub = verb("send", cmd_send, "act as SMSC: send a callback to a handler URL as written in SMSC's settings")
    sub.add_argument("url", help="the handler URL, e.g. 'http://127.0.0.1:8080/?md5=SECRET&charset=utf-8'")
    sub.add_argument("fields", nargs="*", metavar="NAME=VALUE", help="override or add a parameter")
    sub.add_argument("--kind", choices=KINDS, default="status", help="callback kind (default status)")
    sub.add_argument("--fmt", choices=("form", "json", "xml"), help="body format (default: fmt= in the URL, "
                     "else form)")
    sub.add_argument("--charset", help="utf-8, windows-1251 or koi8-r (default: charset= in the URL, "
                     "else windows-1251)")
    sub.add_argument("--retry", action="store_true", help="retry as SMSC does: on anything but 200/404")
    sub.add_argument("--interval", type=_seconds(0, 86400), default=240.0, help="seconds between tries (default 240)")
    sub.add_argument("--tries", type=_positive, default=50, help="tries with --retry (default 50)")
    sub.add_argument("--timeout", type=_seconds(0.001, 3600), default=30.0, help="seconds to wait for an answer")
    sub.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")

    sub = verb("sign", cmd_sign, "print the control hash SMSC would send for these fields")
    sub.add_argument("fields", nargs="*", metavar="NAME=VALUE", help="the kind's fields, e.g. id=1 phone=7999 status=1")
    sub.add_argument("--kind", choices=KINDS, default="status", help="callback kind (default status)")
    sub.add_argument("--alg", choices=HASH_ALGORITHMS,
                     help="hash (default: the config's [handler] hash_alg; md5 for auto)")
    sub.add_argument("--secret", required=True, help="the secret written in SMSC's handler URL")
    sub.add_argument("--charset", default="windows-1251", help="charset of mes (default windows-1251)")

    sub = verb("verify", cmd_verify, "explain why a captured request passes or fails the hash check")
    sub.add_argument("file", help="a rejected.jsonl line or a raw HTTP request, or - for stdin")
    sub.add_argument("--secret", help="the secret (default: [handler] secret of the config)")
    sub.add_argument("--default-charset", help="charset when the request names none")
    sub.add_argument("--all", action="store_true", help="explain every line of a rejected.jsonl "
                     "(default: the newest)")

    sub = verb("tail", cmd_tail, "show stored events, newest last, one readable line each")
    sub.add_argument("-f", "--follow", action="store_true", help="keep showing new events")
    kind_option(sub)
    sub.add_argument("--phone", help="only this phone")
    sub.add_argument("--id", help="only this message id")
    sub.add_argument("-n", type=_positive, default=10, help="how many (default 10)")
    sub.add_argument("--json", action="store_true", help="raw JSON lines")
    sub.add_argument("--interval", type=_seconds(0.01, 3600), default=0.5, help=argparse.SUPPRESS)

    sub = verb("stats", cmd_stats, "count events by kind, status and error; messages by state; cost")
    sub.add_argument("--since", help="only events received since: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--until", help="only events received before: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--by", choices=("day",), help="also one row per day (UTC)")
    output = sub.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON output")
    output.add_argument("--csv", action="store_true", help="CSV output")

    sub = verb("status", cmd_status, "current state of a sent message and its history "
               "(exit 0 delivered, 3 pending, 4 failed, 5 unknown id)")
    sub.add_argument("id", help="the message id (SMSC's id of the send)")
    sub.add_argument("--phone", help="only this phone (compared by digits)")
    sub.add_argument("--json", action="store_true", help="one JSON object per phone")

    sub = verb("messages", cmd_messages, "one line per sent message with its current state, newest last")
    sub.add_argument("--since", help="only messages with a status received since: 30m, 2h, 7d or an ISO date/time")
    which = sub.add_mutually_exclusive_group()
    which.add_argument("--pending", action="store_true", help="only messages without a final status")
    which.add_argument("--failed", action="store_true", help="only failed messages")
    which.add_argument("--delivered", action="store_true", help="only delivered messages")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")

    sub = verb("calls", cmd_calls, "number-confirmation calls from a phone (exit 0 found, 5 none)")
    sub.add_argument("--phone", required=True, help="the calling phone (compared by digits)")
    sub.add_argument("--since", help="only calls received since: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds for a call to arrive")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")

    sub = verb("index", cmd_index, "catch the tracking index up with the event files")
    sub.add_argument("--rebuild", action="store_true", help="forget it and index every file again")

    sub = verb("prune", cmd_prune, "remove dated event files older than AGE, with their index entries and state")
    sub.add_argument("--older-than", required=True, metavar="AGE", help="like 90d (never below [dedupe] keep_days)")
    sub.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    sub.add_argument("--force", action="store_true", help="also files forward, the hook or the relay still need")

    verb("check", cmd_check, "check config, data folder, state store and hook")

    sub = verb("replay", cmd_replay, "run the hook again for stored events whose hook has not succeeded")
    kind_option(sub)
    sub.add_argument("--since", help="only events received since: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--event-id", help="only this event")
    sub.add_argument("--force", action="store_true", help="also events whose hook succeeded (or was "
                     "forgotten after keep_days); never one running in another process")
    sub.add_argument("--dry-run", action="store_true", help="list what would run, with why; run nothing")
    sub.add_argument("--relay", action="store_true", help="relay again the events the app refused (not the hook)")

    sub = verb("forward", cmd_forward, "run the hook and/or the relay for new lines of the JSON-lines files "
               "(spool mode)")
    sub.add_argument("--follow", action="store_true", help="keep running, waiting for new lines")
    sub.add_argument("--from-now", action="store_true", help="mark every event stored so far as done, "
                     "without running the hook (before a first forward on an old data folder)")
    sub.add_argument("--tries", type=_positive, default=3, help="tries per event without --follow (default 3)")
    sub.add_argument("--backoff", type=_seconds(0, 3600), default=1.0, help="first retry delay in seconds, doubling")
    sub.add_argument("--interval", type=_seconds(0.01, 3600), default=1.0, help="seconds between polls with --follow")

    sub = verb("report", cmd_report, "write the delivery report: one self-contained HTML page")
    sub.add_argument("-o", "--output", default="report.html", metavar="FILE",
                     help="where to write it (default report.html; - for stdout)")
    sub.add_argument("--since", help="only events received since: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--until", help="only events received before: the same forms (default: now)")

    verb("relay-secret", cmd_relay_secret, "print a new [relay] secret (whsec_...) for config.ini and the app")
    return parser


def main(argv=None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 usage)."""
    if argv is None:
        argv = sys.argv[1:]
        if not argv and os.environ.get("GATEWAY_INTERFACE", "").startswith("CGI"):
            run_cgi(end_process=True)  # the module itself was called as a CGI script
            return 0
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        sys.stdout = open(os.devnull, "w")
    for stream in (sys.stdout, sys.stderr):
        try:  # an ASCII-only terminal gets escapes, never a UnicodeEncodeError
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    try:
        # NAME=VALUE fields may follow options (`send URL --kind incoming mes=hi`).
        args, extra = parser.parse_known_args(argv)
        if extra:
            if not hasattr(args, "fields") or any(item.startswith("-") for item in extra):
                parser.error("unrecognized arguments: %s" % " ".join(extra))
            args.fields = list(args.fields) + extra
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    try:
        return args.func(args)
    except UsageError as exc:
        sys.stderr.write("smsc_handler %s: %s\n" % (args.verb, exc))
        return 2
    except HandlerError as exc:
        sys.stderr.write("smsc_handler %s: %s\n" % (args.verb, exc.reason))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("smsc_handler %s: interrupted\n" % args.verb)
        return 130
    except BrokenPipeError:
        # `tail | head` closed the pipe: not an error. Keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        name = getattr(exc, "filename", None)
        sys.stderr.write("smsc_handler %s: %s%s\n" % (args.verb, exc.strerror or exc,
                                                      ": %s" % name if name else ""))
        return 1
    except Exception as exc:  # a bug: one line, never a traceback (nor the text, which may hold a secret)
        if os.environ.get("SMSC_HANDLER_DEBUG"):
            raise
        sys.stderr.write(_internal_error_line(args.verb, exc) + "\n")
        return 1


def _internal_error_line(verb, exc) -> str:
    """Describe an unexpected exception in one line: its type and where, no message, no secret."""
    frames = exc.__traceback__
    where = ""
    while frames is not None:
        if frames.tb_frame.f_code.co_filename == __file__:
            where = " at smsc_handler.py line %d" % frames.tb_lineno
        frames = frames.tb_next
    return ("smsc_handler %s: internal error (%s%s). This is a bug: please report it with the command "
            "you ran (and SMSC_HANDLER_DEBUG=1 for the traceback)" % (verb, type(exc).__name__, where))


if __name__ == "__main__":
    sys.exit(main())
