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
* CGI: ``handler.cgi`` runs ``application`` under ``wsgiref.handlers.CGIHandler``.
* Command line: ``python3 smsc_handler.py serve`` and the other verbs of
  ``python3 smsc_handler.py -h``.

Config is found in this order: ``--config PATH``, the environment variable
``SMSC_HANDLER_CONFIG``, ``config.ini`` beside this file; none at all means the
built-in defaults. Only the standard library is used, and only what a request
needs is imported (a plain form callback loads no XML parser, no subprocess and
no logging, and no SQLite with dedupe off and no hook): under CGI, imports are
most of a request's cost.

Sections, in the order a request meets them (pure protocol code above I/O):
constants and code tables · exceptions · configuration · decoding a request
(decode_request) · the control hash (verify_signature) · events (normalize) ·
storage (append_line) · state (StateStore, store_event) · the hook (run_hook)
· the relay (Relay, relay_once) · WSGI application (Handler: the one place errors become answers) · gateways
(run_cgi, serve) · command line (main and one cmd_* per verb).
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
#: -3..4 are stated by SMSC; 20..25 come from third-party copies of its table.
STATUS_CODES = {
    -3: ("not found", True),
    -2: ("stopped", False),
    -1: ("waiting to be sent", False),
    0: ("transferred to the operator", False),
    1: ("delivered", True),
    2: ("read", True),
    3: ("expired", True),
    4: ("link clicked", True),
    20: ("impossible to deliver", True),
    22: ("invalid number", True),
    23: ("prohibited", True),
    24: ("insufficient funds", True),
    25: ("unavailable number", True),
}

#: err code -> name. Up to 220 stated by SMSC; 237..255 from third-party copies.
ERROR_CODES = {
    0: "no error",
    1: "subscriber does not exist",
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
        if not _ascii_digits(value[1:] if value[:1] == "-" else value):
            raise ValueError("expected a whole number")
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


def _parse_secret(value):
    """Check the secret's characters (SMSC's rule); never echoed in errors."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    if not set(value) <= allowed:
        raise ValueError("SMSC allows only Latin letters, digits, '-' and '_' in the secret")
    return value


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
    import shlex
    try:
        argv = tuple(shlex.split(value))
    except ValueError:
        raise ValueError("expected a command line with balanced quotes") from None
    # Never a shell: an unquoted ';' or '#' word is a comment or a command
    # separator that would reach the program as an argument. posix=False keeps quotes.
    if any(word[:1] in ("#", ";") for word in shlex.split(value, posix=False)[1:]):
        raise ValueError("a word starts with ';' or '#': quote it if you mean it")
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
        #: the string after md5=/sha1=/crc32= in SMSC's handler URL; empty = no check
        "secret": ("", _parse_secret),
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
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("Config is frozen; load another one")

    def __repr__(self):
        shown = {k: v for k, v in vars(self).items() if k != "secret"}
        shown["secret"] = "***" if self.secret else ""
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
    """Return the config file to read: --config, $SMSC_HANDLER_CONFIG, or beside the module."""
    environ = os.environ if environ is None else environ
    for named, origin in ((cli_path, "--config"), (environ.get(CONFIG_ENV), CONFIG_ENV)):
        if named:
            if not os.path.isfile(named):
                raise ConfigError("%s names %s, which is not a file. Fix: create it or "
                                  "point %s at the right path" % (origin, named, origin))
            return named
    beside = os.path.join(MODULE_DIR, "config.ini")
    return beside if os.path.isfile(beside) else None


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


def load_config(path: str | None = None) -> Config:
    """Read and validate a config file (None: built-in defaults)."""
    import configparser
    # A [DEFAULT] section would silently apply to every section: treat it as unknown.
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\x00no default section",
        comment_prefixes=("#", ";"), inline_comment_prefixes=None, strict=True)
    where = "built-in defaults"
    base = MODULE_DIR
    if path is not None:
        where = path
        base = os.path.dirname(os.path.abspath(path))
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
    for section in parser.sections():
        if section not in CONFIG_SCHEMA:
            raise ConfigError("%s: unknown section [%s]. Fix: use one of %s"
                              % (where, section, ", ".join("[%s]" % s for s in CONFIG_SCHEMA)))
        for key in parser[section]:
            if key not in CONFIG_SCHEMA[section]:
                raise ConfigError("%s: unknown key [%s] %s. Fix: the keys of [%s] are %s"
                                  % (where, section, key, section, ", ".join(CONFIG_SCHEMA[section])))
    values = {"source": path, "base_dir": base}
    for section, keys in CONFIG_SCHEMA.items():
        for key, (default, parse) in keys.items():
            text = parser.get(section, key, fallback=default).strip()
            try:
                if _has_inline_comment(text):
                    # configparser keeps "data  # mine" whole: it would name a folder "data  # mine"
                    raise ValueError("comments must stand on their own lines")
                values[_attribute(section, key)] = parse(text)
            except ValueError as exc:
                shown = "(hidden)" if key == "secret" else repr(text)
                hint = "; comments must stand on their own lines" if _has_inline_comment(text) else ""
                raise ConfigError("%s: [%s] %s = %s: %s%s" % (where, section, key, shown, exc, hint)) from None
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
            import sqlite3  # noqa: F401  (the state store: needed by the first request anyway)
        except ImportError:
            raise ConfigError("%s: this Python has no sqlite3 module, which [dedupe] and [hook] need "
                              "for the state store. Fix: set [dedupe] enabled = no and leave [hook] "
                              "command empty, or use a Python built with sqlite3" % where) from None
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


def verify_signature(kind: str, request: Request, secret: str, require: str = "auto"):
    """Check the control hash; return the event's `signature` value.

    Returns None when no hash was sent (and that is allowed), or
    {"alg": ..., "valid": True|None}. Raises SignatureError when the hash is
    wrong, or missing while required.
    """
    params = request.params
    alg = sent_hash_alg(params)
    if alg is None:
        if secret and require != "no":
            raise SignatureError("control hash missing (md5/sha1/crc32)")
        return None
    if not secret:
        return {"alg": alg, "valid": None}
    for _label, data in signature_candidates(kind, params, request.raw_values(SIGNED_FIELDS[kind]), secret):
        if hash_matches(alg, params[alg], data):
            return {"alg": alg, "valid": True}
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
            if _ascii_digits(minutes) and _ascii_digits(seconds):
                return int(minutes) * 60 + int(seconds)
    return None


_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

#: "MM" -> the month's last day as "DD" (a February 29 is checked against the year).
_LAST_DAY = {"%02d" % month: "%02d" % days for month, days in enumerate(_DAYS_IN_MONTH, 1)}


def _local_time(text, zone):
    """Convert SMSC's 'DD.MM.YY hh:mm:ss' (account time zone) to ISO 8601 with offset.

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
    if (len(fields) != 6 or not _ascii_digits("".join(fields))
            or min(map(len, fields)) < 1 or max(map(len, fields)) > 2):
        return None
    day, month, year, hour, minute, second = map(int, fields)
    year += 1900 if year >= 69 else 2000  # as strptime's %y
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


#: kind -> identity fields (typed values) that make event_id.
IDENTITY_FIELDS = {
    "status": ("id", "phone", "status", "err", "ts"),
    "incoming": ("id",),
    "incoming-without-id": ("phone", "mes", "to", "sent"),
    "waitcall": ("phone", "ts"),
}


def event_id(kind: str, fields: dict, params: dict) -> str:
    """Return the hex digest of an event's identity: the same for every retry."""
    key = kind
    if kind == "incoming" and not fields.get("id"):
        key = "incoming-without-id"  # an empty id must not make every message one
    # A typed value that did not parse falls back to its text, so two different
    # malformed values never collide as null.
    identity = [kind]
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
        import base64
        event["body_b64"] = base64.b64encode(body).decode("ascii")
        if query:  # parameters written between '!' and '?' came in the query string
            event["query_b64"] = base64.b64encode(query).decode("ascii")
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
            raise StorageError("cannot create data_dir: %s" % (exc.strerror or exc)) from None
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
    _fsync_folder(folder)
    return fd


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
        raise StorageError("cannot open %s: %s" % (os.path.basename(path), exc.strerror or exc)) from None
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            if os.write(fd, line) != len(line):
                raise OSError(28, "short write (disk full?)")
        except OSError:
            _cut_back(fd, size)
            raise
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
    return StorageError("cannot write %s: %s" % (os.path.basename(path), exc.strerror or exc))


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


def resume_offset(path: str, offset: int, identity: str | None = None):
    """Return (offset, identity) to resume reading a file from.

    0 when the file was replaced (rotated: another inode) or truncated since
    `identity` and `offset` were taken. Raises OSError when it is gone.
    """
    stat = os.stat(path)
    current = "%d:%d" % (stat.st_dev, stat.st_ino)
    if (identity is not None and identity != current) or stat.st_size < offset:
        return 0, current
    return offset, current


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


def keep_rejected(config: Config, environ, body: bytes, error: HandlerError, remote_addr) -> None:
    """Append a refused request to rejected.jsonl, up to [rejected] max_bytes."""
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
            _log().warning("rejected.jsonl is at its max_bytes; refused request not kept")
            return
        append_line(path, line, fsync=False, mode=config.file_mode)
    except StorageError as exc:
        _log().warning("refused request not kept: %s", exc.reason)


########################################################################
# State: dedupe ids, hook outcomes, forward positions (SQLite)
########################################################################

STATE_FILE = "state.sqlite3"

_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    event_id TEXT PRIMARY KEY, kind TEXT, file TEXT, stored_at REAL
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
"""


#: Seconds a writer waits for the state store (the folder's queue, then SQLite's lock)
#: before the request answers 503 and SMSC retries.
STATE_PATIENCE = 10


class StateStore:
    """The state store: data_dir/state.sqlite3, shared by every process.

    WAL with synchronous=NORMAL: a power cut may forget the last ids, which
    can only cause a duplicate line (at-least-once), never a lost event.
    """

    def __init__(self, config: Config):
        import sqlite3  # load_config already refused a Python without it
        self._sqlite3 = sqlite3
        self.config = config
        self.path = os.path.join(config.data_dir, STATE_FILE)
        self._queue = _open_queue(config.data_dir)
        try:
            self._join_queue()  # processes starting at once set up in turn
            if not os.path.exists(self.path):
                # Create it ourselves so file_mode applies (SQLite gives -wal/-shm the same mode).
                os.close(_open_append(self.path, config.file_mode))
            self.db = sqlite3.connect(self.path, timeout=STATE_PATIENCE, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = %d" % (STATE_PATIENCE * 1000))
            self._set_up()
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.inode = os.stat(self.path).st_ino
        except BaseException as exc:
            if self._queue is not None:
                os.close(self._queue)  # and with it the lock: the next process may try
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StorageError("state store %s unusable: %s" % (STATE_FILE, exc)) from None
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
                if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'positions'").fetchone():
                    self.db.executescript(_STATE_SCHEMA)
                return
            except self._sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def close(self):
        """Close the connection."""
        try:
            self.db.close()
        finally:
            if self._queue is not None:
                os.close(self._queue)
                self._queue = None

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
        """Commit the transaction."""
        try:
            self._run("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._leave_queue()

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
        delay, deadline = 0.0002, None
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

    def is_seen(self, event_id):
        """Whether an event id is remembered."""
        return self._run("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone() is not None

    def remember_new(self, event_id, kind, file, now):
        """Remember an event id unless it is already; return whether it was new."""
        cursor = self._run("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", (event_id, kind, file, now))
        return cursor.rowcount == 1

    def remember(self, event_id, kind, file, now):
        """Remember an event id, its kind and file."""
        self._run("INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?)", (event_id, kind, file, now))

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

    def position(self, file):
        """Return (offset, file identity) where `forward` stopped in a file."""
        row = self._run("SELECT offset, identity FROM positions WHERE file = ?", (file,)).fetchone()
        return (0, None) if row is None else (row[0], row[1])

    def set_position(self, file, offset, identity):
        """Remember where `forward` stopped in a file, and which file it was."""
        self._run("INSERT OR REPLACE INTO positions VALUES (?, ?, ?)", (file, offset, identity))


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


def _hook_lease(config: Config) -> float:
    """Seconds a hook claim holds: past it, the claimant is taken for dead."""
    return config.hook_timeout + 30


def _should_prune():
    # About one request in a hundred: cheap, and SMSC's retries stop after ~3 h.
    """Say whether this request also prunes old ids (about one in a hundred)."""
    return os.urandom(1)[0] < 3


def store_event(config: Config, event: dict, now: float | None = None) -> str | None:
    """Store an event once and run its inline hook: the one place "200 means stored" is made.

    Returns the JSON-lines file written (None when jsonl is off). Raises
    StorageError when the line or its dedupe record could not be written, and
    HookError when the hook failed with on_failure = retry. With dedupe on, a
    repeat writes nothing new but runs a hook that has not yet succeeded.
    Crash between the line and its dedupe record: the retry writes a second
    line (at-least-once), never none.
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
        if config.dedupe_enabled:
            state.begin()
            try:
                # New id: recorded now, and rolled back below if the line can't be written.
                if state.remember_new(event_key, event["kind"], path, now):
                    if path:
                        append_line(path, line, config.jsonl_fsync, config.file_mode)
                else:
                    hook_path = state.seen_file(event_key) or path
                if hook_inline:
                    claim, kept_line = state.claim_hook(event_key, now, _hook_lease(config), line)
                if _should_prune():
                    state.prune(config.dedupe_keep_days, now)
                state.commit()
            except BaseException:
                state.rollback()
                raise
        else:
            if path:
                append_line(path, line, config.jsonl_fsync, config.file_mode)
            if state is not None and _should_prune():
                state.prune(config.dedupe_keep_days, now)  # hook outcomes, with dedupe off
        if not hook_inline or claim == "done":
            return path
        if claim == "busy":
            if config.hook_on_failure == "ignore":
                return path  # the answer doesn't wait on the hook: stored is enough
            raise HookError("the hook is still running for this event (an earlier delivery)")
        # A retry's hook gets the line stored the first time, and that line's file.
        line = kept_line or line
        ok, error = run_hook(config, event, line, hook_path)
        state.record_hook(event_key, ok, error, time.time(), line)
        if not ok:
            if config.hook_on_failure == "retry":
                raise HookError("hook failed: %s" % error)
            _log().warning("hook failed for event %s (on_failure = ignore): %s", event_key, error)
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


def run_hook(config: Config, event: dict, line: bytes | None = None, path: str | None = None):
    """Run the hook command for one event; return (ok, error text or None).

    argv from the configured line, never a shell; the event JSON on stdin; the
    config file's folder as working folder. The wait is bounded by [hook]
    timeout, then the whole process group is killed. stdin and stderr are
    temporary files, not pipes, so a background job the hook leaves running
    can't keep the request waiting.
    """
    import signal
    import subprocess
    import tempfile
    line = event_line(event) if line is None else line
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
        stdin.write(line)
        stdin.seek(0)
        try:
            child = subprocess.Popen(
                config.hook_command, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr,
                env=hook_environment(event, path),
                cwd=config.base_dir if os.path.isdir(config.base_dir) else None,
                start_new_session=True, close_fds=True)
        except OSError as exc:
            return False, "cannot start %s: %s" % (config.hook_command[0], exc.strerror or exc)
        try:
            returncode = child.wait(timeout=config.hook_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            child.wait()
            return False, "timed out after %g s" % config.hook_timeout
        if returncode == 0:
            return True, None
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
        last = stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]
        text = "exit status %s" % returncode
        return False, text + (": " + last[0][:200] if last else "")


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
        for path in event_files(config):
            row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
            try:
                offset, identity = resume_offset(path, *(row or (0, None)))
            except OSError:
                continue
            for _start, end, line in read_lines(path, offset):
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
    for path in event_files(config):
        row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
        try:
            offset, _identity = resume_offset(path, *(row or (0, None)))
        except OSError:
            continue
        for _start, _end, line in read_lines(path, offset):
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
    for path in event_files(config):
        row = state._run("SELECT offset, identity FROM relay_positions WHERE file = ?", (path,)).fetchone()
        try:
            offset, _identity = resume_offset(path, *(row or (0, None)))
            if offset < os.stat(path).st_size:
                owed.add(path)
        except OSError:
            continue
    return owed


########################################################################
# WSGI application: the one place errors become answers
########################################################################

#: Reason phrases of the statuses the handler answers (http.HTTPStatus builds
#: an enum at import: 0.7 ms of a CGI request).
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


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
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            break
        left -= len(chunk)


def _declared_length(environ) -> int:
    """Return CONTENT_LENGTH as an int (0 when absent or not a number)."""
    try:
        return int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


def read_body(environ, limit: int) -> bytes:
    """Read the whole declared body; PayloadTooLarge (after draining) past `limit`."""
    stream = environ.get("wsgi.input")
    length = _declared_length(environ)
    if stream is None:
        return b""
    if length <= 0:
        if not environ.get("wsgi.input_terminated"):
            return b""
        body = stream.read(limit + 1)  # chunked: the server ends the stream
        if len(body) > limit:
            _drain(stream, MAX_DRAIN_BYTES)
            raise PayloadTooLarge("body over max_body_bytes")
        return body
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
            signature = verify_signature(kind, request, config.secret, config.require_signature)
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
        (log.error if error.status >= 500 else log.warning)(
            "%d %s (from %s)", error.status, error.reason, seen["remote_addr"])
        return _error_answer(start_response, error, method == "HEAD")


def _drain_all(environ):
    """Read and drop the declared body (mod_cgid waits for a CGI to read it)."""
    length = _declared_length(environ)
    if length > 0 and environ.get("wsgi.input") is not None:
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

def run_cgi(app=None) -> None:
    """Serve one CGI request (handler.cgi calls this)."""
    from wsgiref.handlers import CGIHandler
    os.environ.setdefault("PATH_INFO", "")  # as bottle's CGI adapter does
    CGIHandler().run(application if app is None else app)


def serve(app, host="127.0.0.1", port=8080, ready=None):
    """Run `app` on a threaded wsgiref server until interrupted."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        """wsgiref server, one thread per request."""
        daemon_threads = True

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
            sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    server = make_server(host, port, app, server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()


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


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        import argparse
        raise argparse.ArgumentTypeError("expected a whole number of at least 1, not %r" % text)
    return number


def _printable(value) -> str:
    """Show any text on one terminal line: control characters and line breaks escaped."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def parse_since(text: str, now: float | None = None) -> float:
    """Parse --since: 30m / 2h / 7d / 45s ago, or an ISO 8601 date or time (naive = local)."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[:-1].isdigit() and text[-1:].lower() in units:
        return now - int(text[:-1]) * units[text[-1:].lower()]
    from datetime import datetime
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise UsageError("--since takes 30m, 2h, 7d or an ISO date/time like 2026-11-25 or "
                         "2026-11-25T10:00Z, not %r" % text) from None
    return moment.timestamp()


def _event_time(event) -> float:
    """Unix time of an event's received_at (0 when unreadable)."""
    import calendar
    text = event.get("received_at") or ""
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + text[19:23])
    except ValueError:
        return 0.0


def iter_stored(config: Config, kinds=KINDS):
    """Yield (path, end offset, event) for every stored event, file by file, oldest date first."""
    for path in event_files(config, kinds):
        for end, event in read_events(path):
            yield path, end, event


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
    return 0


def split_handler_url(url: str):
    """Split a handler URL as written in SMSC's settings.

    Returns (target URL, GET pairs, POST pairs): parameters between '!' and
    '?' go by GET, those after '?' by POST (PROTOCOL.md, Transport).
    """
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError("the handler URL must start with http:// or https://")
    path, bang, get_part = parts.path.partition("!")
    get_pairs = urllib.parse.parse_qsl(get_part, keep_blank_values=True) if bang else []
    post_pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path or "/", "", ""))
    return target, get_pairs, post_pairs


def sample_callback(kind: str, now: float | None = None, overrides: dict | None = None) -> dict:
    """Return realistic parameters SMSC would send for `kind` (overrides win)."""
    now = int(time.time() if now is None else now)
    local = time.strftime("%d.%m.%y %H:%M:%S", time.gmtime(now + 3 * 3600))  # SMSC's default zone
    message_id = str(now % 100000 + 1000)
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
        params = {"id": message_id, "sms_id": str(now % 100000 + 500), "phone": "79991234567",
                  "mes": "Тестовое сообщение", "to": "79000000000", "smsc": "MTS",
                  "sent": str(now - 2), "time": str(now)}
    elif kind == "waitcall":
        params = {"waitcall": "1", "phone": "79991234567", "ts": str(now)}
    else:
        raise UsageError("--kind is status, incoming or waitcall")
    params.update(overrides)
    return params


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
    """Send one request; return (status, reason, body text). No proxies: the target is named."""
    import urllib.error
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with opener.open(request, timeout=timeout) as answer:
            return answer.status, answer.reason, answer.read(2048).decode("utf-8", "replace")
    except urllib.error.HTTPError as answer:
        return answer.code, answer.reason, answer.read(2048).decode("utf-8", "replace")


def cmd_send(args) -> int:
    """Act as SMSC: send a callback to a handler URL, with SMSC's retry rule on --retry."""
    overrides = _assignments(args.fields)
    method, url, headers, body, notes = build_callback(
        args.url, args.kind, args.fmt, args.charset, overrides)
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
            print("%s %s -> %d %s: %s" % (method, url, status, reason, " ".join(text.split())[:200]))
        except OSError as exc:
            status = None
            print("%s %s -> no answer: %s" % (method, url, getattr(exc, "reason", None) or exc))
        sys.stdout.flush()
        if status == 200:
            return 0
        # SMSC's rule: anything but 200 or 404 is retried; 404 means stop.
        if status == 404 or attempt == tries:
            return 1
        print("retry %d of %d in %g s (SMSC's rule: every 4 minutes, 50 tries)"
              % (attempt + 1, tries, args.interval))
        sys.stdout.flush()
        time.sleep(args.interval)
    return 1


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
    print(control_hash(args.alg, data))
    return 0


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
        body = body[:int(headers["content-length"])]
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


def cmd_verify(args) -> int:
    """Explain step by step why a captured request passes or fails the hash check."""
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    query, content_type, body, _addr = parse_captured(data)
    if args.secret is not None:
        secret, charset_default = args.secret, args.default_charset or "windows-1251"
    else:
        config = _config_for(args)
        secret, charset_default = config.secret, args.default_charset or config.default_charset
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
    for number, (label, candidate) in enumerate(
            signature_candidates(kind, request.params, request.raw, secret), 1):
        # Show the string in the charset it was encoded in, the secret masked.
        codec = label[len("mes in "):] if label.startswith("mes in ") else CODECS[request.charset]
        shown = candidate[:-len(secret)].decode(codec, "replace") + "<secret>"
        ok = hash_matches(alg, received, candidate)
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
    """One readable line for an event: time, kind, phone, what happened, the id."""
    when = (event.get("received_at") or "?")[:19].replace("T", " ")
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
    newest, positions = [], {}
    for path in event_files(config, kinds):
        try:
            offset, identity = resume_offset(path, 0)
        except OSError:
            continue
        last = deque(maxlen=args.n)
        for end, event in read_events(path):
            offset = end
            if _matches(event, args):
                last.append(event)
        newest.extend(last)
        positions[path] = (offset, identity)
    events = sorted(newest, key=_event_time)[-args.n:]  # stable: one file's order is kept

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
    if not args.follow:
        return 0
    try:
        while True:
            for path in event_files(config, kinds):
                try:
                    offset, identity = resume_offset(path, *positions.get(path, (0, None)))
                except OSError:
                    continue
                for end, event in read_events(path, offset):
                    offset = end
                    if _matches(event, args):
                        show(event)
                positions[path] = (offset, identity)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


#: Status codes that mean the message reached the subscriber.
DELIVERED_CODES = (1, 2, 4)


def compute_stats(events) -> dict:
    """Count events by kind, status and error; delivery rate and cost per message.

    A message is (id, phone). Its cost is the last one reported; it is
    delivered when a delivered/read/clicked status arrived, final when any final
    status arrived.
    """
    kinds, statuses, errors = {}, {}, {}
    messages = {}
    for event in events:
        kind = event.get("kind")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind != "status":
            continue
        name = "%s %s" % (event.get("status"), event.get("status_name"))
        statuses[name] = statuses.get(name, 0) + 1
        if event.get("err"):
            label = "%s %s" % (event.get("err"), event.get("err_name"))
            errors[label] = errors.get(label, 0) + 1
        message = messages.setdefault((event.get("id"), event.get("phone")),
                                      {"final": False, "delivered": False, "cost": None})
        if event.get("final"):
            message["final"] = True
        if event.get("status") in DELIVERED_CODES:
            message["delivered"] = True
        if isinstance(event.get("cost"), (int, float)):
            message["cost"] = event["cost"]
    final = sum(1 for m in messages.values() if m["final"])
    delivered = sum(1 for m in messages.values() if m["final"] and m["delivered"])
    cost = sum(m["cost"] for m in messages.values() if m["cost"] is not None)
    return {
        "events": sum(kinds.values()),
        "by_kind": kinds,
        "by_status": statuses,
        "by_error": errors,
        "messages": len(messages),
        "final": final,
        "delivered": delivered,
        "pending": len(messages) - final,
        "delivery_rate": round(delivered / final, 4) if final else None,
        "total_cost": round(cost, 2),
    }


def cmd_stats(args) -> int:
    """Print counts, delivery rate and cost of the stored events."""
    import json
    config = _config_for(args)
    args.since_ts = parse_since(args.since) if args.since else None
    stats = compute_stats(event for _p, _e, event in iter_stored(config) if _matches(event, args))
    if config.relay_url:
        stats["relay"] = relay_counts(config)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2, sort_keys=True))
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
             ("  with a final status", stats["final"]),
             ("  still without one", stats["pending"]),
             ("delivery rate", "-" if rate is None else "%.1f%% (%d of %d final)"
              % (rate * 100, stats["delivered"], stats["final"])),
             ("total cost", "%.2f" % stats["total_cost"])]
    rows += _relay_rows(stats.get("relay"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print("%-*s  %s" % (width, name, value))
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


def check_setup(config_path=None, environ=None) -> list:
    """Check config, data folder, state store and hook; return (level, message) problems."""
    environ = os.environ if environ is None else environ
    problems = []
    try:
        config = load_config(find_config(config_path, environ))
    except ConfigError as exc:
        return [("error", exc.reason)]
    data_dir = config.data_dir
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
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
        if not os.path.exists(os.path.join(data_dir, ".htaccess")):
            problems.append(("warning", "data_dir has no .htaccess yet (the handler writes it on the "
                             "next request)"))
    else:
        parent = os.path.dirname(data_dir)
        while parent and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if not parent or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(("error", "data_dir %s does not exist and cannot be created in %s. Fix: "
                             "create it, writable by the web server's user" % (data_dir, parent)))
    web_root = _web_root_of(data_dir, environ)
    if web_root:
        problems.append(("warning", "data_dir %s is inside the web root %s: only its .htaccess keeps "
                         "events private (Apache only). Fix: set data_dir outside it, e.g. "
                         "../smsc-data" % (data_dir, web_root)))
    if config.dedupe_enabled or config.hook_command:
        state_path = os.path.join(data_dir, STATE_FILE)
        try:
            import sqlite3
        except ImportError:
            problems.append(("error", "this Python has no sqlite3: set [dedupe] enabled = no and no "
                             "[hook] command, or use a Python with sqlite3"))
        else:
            if os.path.exists(state_path):
                try:
                    db = sqlite3.connect("file:%s?mode=ro" % state_path, uri=True, timeout=2)
                    try:
                        result = db.execute("PRAGMA quick_check").fetchone()[0]
                    finally:
                        db.close()
                    if result != "ok":
                        raise sqlite3.DatabaseError(result)
                except sqlite3.Error as exc:
                    problems.append(("error", "state store %s is damaged (%s). Fix: move it aside; "
                                     "the handler creates a new one (dedupe forgets past ids)"
                                     % (state_path, exc)))
    if config.hook_command:
        import shutil
        program = config.hook_command[0]
        found = shutil.which(program, path=os.environ.get("PATH")) if os.sep not in program else (
            program if os.path.isfile(program) and os.access(program, os.X_OK) else None)
        if not found:
            problems.append(("error", "[hook] command: %s is not an executable file. Fix: give its "
                             "full path, and make it executable" % program))
    if config.secret == "":
        problems.append(("warning", "[handler] secret is empty: anyone who finds the URL can post "
                         "events. Fix: add ?md5=SECRET to the handler URL in SMSC and set secret"))
    problems += relay_problems(config)
    return problems


def cmd_check(args) -> int:
    """Print one line per problem with its fix; exit 1 on errors."""
    problems = check_setup(getattr(args, "config", None))
    for level, message in problems:
        print("%s: %s" % (level, message))
    errors = [p for p in problems if p[0] == "error"]
    if not problems:
        print("ok: config, data folder, state store and hook look right")
    return 1 if errors else 0


########################################################################
# Command line: replay and forward (the hook outside the request)
########################################################################

def _require_hook(config):
    """Refuse replay/forward without a [hook] command."""
    if not config.hook_command:
        raise ConfigError("no [hook] command is configured: nothing to run")


def cmd_replay(args) -> int:
    """Run the hook again for stored events whose hook has not succeeded."""
    if getattr(args, "relay", False):
        return replay_relay(args)
    config = _config_for(args)
    _require_hook(config)
    args.since_ts = parse_since(args.since) if args.since else None
    done, ok_count, failed = set(), 0, 0
    with StateStore(config) as state:
        for path, _end, event in iter_stored(config, _kinds(args)):
            event_key = event.get("event_id")
            if not event_key or event_key in done or not _matches(event, args):
                continue
            done.add(event_key)
            if not args.force:
                outcome = state.hook_state(event_key)
                if outcome == "ok":
                    continue
                # Successes are forgotten after keep_days: an old event with no outcome is done.
                if outcome is None and _event_time(event) < time.time() - config.dedupe_keep_days * 86400:
                    continue
            ok, error = run_hook(config, event, None, path)
            state.record_hook(event_key, ok, error, time.time())
            if ok:
                ok_count += 1
            else:
                failed += 1
                print("failed: %s %s: %s" % (event.get("kind"), event_key, error))
    print("replayed %d event(s): %d ok, %d failed" % (ok_count + failed, ok_count, failed))
    return 1 if failed else 0


def _forward_lock(config):
    """Take the data folder's forward lock (one forward at a time)."""
    import fcntl
    ensure_data_dir(config)
    fd = _open_append(os.path.join(config.data_dir, "forward.lock"), config.file_mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError("another `forward` is running on this data folder") from None
    return fd


def _forward_due(config, state, event) -> bool:
    """Whether `forward` still owes an event its hook run."""
    outcome = state.hook_state(event["event_id"])
    if outcome == "ok":
        return False
    if config.hook_run != "inline":
        return True  # forward is the only runner
    age = time.time() - _event_time(event)
    if outcome == "running" or outcome is None:
        # A request may be running it right now (or about to claim it) ...
        if age < _hook_lease(config):
            return False
        # ... and successes are forgotten after keep_days: an old event with no outcome was done.
        if outcome is None and age > config.dedupe_keep_days * 86400:
            return False
    return True


def forward_once(config, state, follow=False, tries=3, backoff=1.0, sleep=time.sleep, say=print):
    """Run the hook for each new line of the JSON-lines files, in order.

    The position in each file is kept in the state store after every event,
    so a restart neither skips nor repeats a succeeded event. A failing hook is
    retried with doubling backoff (capped at 60 s); without `follow`, after
    `tries` attempts the run stops there and returns False.
    """
    import json
    for path in event_files(config):
        try:
            offset, identity = resume_offset(path, *state.position(path))
        except OSError:
            continue
        for _start, end, line in read_lines(path, offset):
            try:
                event = json.loads(line)
            except ValueError:
                event = None  # a mended torn line: no event there
            if isinstance(event, dict) and event.get("event_id") and _forward_due(config, state, event):
                attempt, delay = 0, backoff
                while True:
                    attempt += 1
                    ok, error = run_hook(config, event, line, path)
                    state.record_hook(event["event_id"], ok, error, time.time())
                    if ok:
                        break
                    say("hook failed for %s (attempt %d): %s" % (event["event_id"], attempt, error))
                    if not follow and attempt >= tries:
                        return False
                    sleep(delay)
                    delay = min(delay * 2, 60.0)
            state.set_position(path, end, identity)
    return True


def cmd_forward(args) -> int:
    """Run the hook for new lines of the JSON-lines files, in order."""
    config = _config_for(args)
    if not config.relay_url:
        _require_hook(config)
    if config.hook_command and config.hook_run != "forward":
        print("note: [hook] run = inline: requests already run the hook; forward runs it only for "
              "events whose hook has not succeeded")
    lock = _forward_lock(config)
    relay = RelayPass.start(config, args)  # beside the hook pass, with its own positions
    try:
        with StateStore(config) as state:
            while config.hook_command:
                finished = forward_once(config, state, args.follow, args.tries, args.backoff)
                if not args.follow:
                    return RelayPass.exit_status(relay, finished)
                time.sleep(args.interval)
            return RelayPass.exit_status(relay, True)
    except KeyboardInterrupt:
        return 0 if relay is None or relay.result != "gone" else 1
    finally:
        os.close(lock)


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
                for path in event_files(config, _kinds(args)):
                    for _start, _end, line in read_lines(path):
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
                    if result == "gone":
                        break
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
    sub.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")

    sub = verb("send", cmd_send, "act as SMSC: send a callback to a handler URL as written in SMSC's settings")
    sub.add_argument("url", help="the handler URL, e.g. 'http://127.0.0.1:8080/?md5=SECRET&charset=utf-8'")
    sub.add_argument("fields", nargs="*", metavar="NAME=VALUE", help="override or add a parameter")
    sub.add_argument("--kind", choices=KINDS, default="status", help="callback kind (default status)")
    sub.add_argument("--fmt", choices=("form", "json", "xml"), help="body format (default: fmt= in the URL, "
                     "else form)")
    sub.add_argument("--charset", help="utf-8, windows-1251 or koi8-r (default: charset= in the URL, "
                     "else windows-1251)")
    sub.add_argument("--retry", action="store_true", help="retry as SMSC does: on anything but 200/404")
    sub.add_argument("--interval", type=float, default=240.0, help="seconds between tries (default 240)")
    sub.add_argument("--tries", type=_positive, default=50, help="tries with --retry (default 50)")
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    sub.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")

    sub = verb("sign", cmd_sign, "print the control hash SMSC would send for these fields")
    sub.add_argument("fields", nargs="*", metavar="NAME=VALUE", help="the kind's fields, e.g. id=1 phone=7999 status=1")
    sub.add_argument("--kind", choices=KINDS, default="status", help="callback kind (default status)")
    sub.add_argument("--alg", choices=HASH_ALGORITHMS, default="md5", help="hash (default md5)")
    sub.add_argument("--secret", required=True, help="the secret written in SMSC's handler URL")
    sub.add_argument("--charset", default="windows-1251", help="charset of mes (default windows-1251)")

    sub = verb("verify", cmd_verify, "explain why a captured request passes or fails the hash check")
    sub.add_argument("file", help="a rejected.jsonl line or a raw HTTP request, or - for stdin")
    sub.add_argument("--secret", help="the secret (default: [handler] secret of the config)")
    sub.add_argument("--default-charset", help="charset when the request names none")

    sub = verb("tail", cmd_tail, "show stored events, newest last, one readable line each")
    sub.add_argument("-f", "--follow", action="store_true", help="keep showing new events")
    kind_option(sub)
    sub.add_argument("--phone", help="only this phone")
    sub.add_argument("--id", help="only this message id")
    sub.add_argument("-n", type=_positive, default=10, help="how many (default 10)")
    sub.add_argument("--json", action="store_true", help="raw JSON lines")
    sub.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)

    sub = verb("stats", cmd_stats, "count events by kind, status and error; delivery rate; cost")
    sub.add_argument("--since", help="only events received since: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--json", action="store_true", help="JSON output")

    verb("check", cmd_check, "check config, data folder, state store and hook")

    sub = verb("replay", cmd_replay, "run the hook again for stored events whose hook has not succeeded")
    kind_option(sub)
    sub.add_argument("--since", help="only events received since: 30m, 2h, 7d or an ISO date/time")
    sub.add_argument("--event-id", help="only this event")
    sub.add_argument("--force", action="store_true", help="all matching events, even those whose hook succeeded")
    sub.add_argument("--relay", action="store_true", help="relay again the events the app refused (not the hook)")

    sub = verb("forward", cmd_forward, "run the hook and/or the relay for new lines of the JSON-lines files "
               "(spool mode)")
    sub.add_argument("--follow", action="store_true", help="keep running, waiting for new lines")
    sub.add_argument("--tries", type=_positive, default=3, help="tries per event without --follow (default 3)")
    sub.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling")
    sub.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")

    verb("relay-secret", cmd_relay_secret, "print a new [relay] secret (whsec_...) for config.ini and the app")
    return parser


def main(argv=None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 usage)."""
    if argv is None:
        argv = sys.argv[1:]
        if not argv and os.environ.get("GATEWAY_INTERFACE", "").startswith("CGI"):
            run_cgi()  # the module itself was called as a CGI script
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


if __name__ == "__main__":
    sys.exit(main())
