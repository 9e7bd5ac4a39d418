"""The event (SPEC §6, §9): fields, types, code tables, flags, times, identity, the line.

These tests call the pure functions directly: no app, no config, no fixtures.
"""

from __future__ import annotations

import base64
import json
import random
import re
import sys
from datetime import datetime, timedelta, timezone
from urllib.parse import quote_plus

import pytest

import smsc_handler
from smsc_handler import (
    decode_flags,
    decode_request,
    error_name,
    event_id,
    event_line,
    normalize,
    status_info,
    type_name,
)

MSK = timezone(timedelta(hours=3))

#: SPEC §6, written out: fields every event has (`lossy` from §9).
COMMON_FIELDS = [
    "kind", "event_id", "received_at", "at", "remote_addr", "format", "charset",
    "signature", "params", "lossy",
]

#: SPEC §6, written out: the fields of each kind.
KIND_FIELDS = {
    "status": [
        "id", "phone", "status", "status_name", "final", "time", "ts", "err", "err_name",
        "syserr", "cnt", "type", "type_name", "cost", "flag", "flags", "sender", "dtmf",
        "cmt", "overtime_s", "calltime", "callmenu", "ringtime", "imsi", "msc", "mcc",
        "mnc", "cn", "net", "rcn", "rnet",
    ],
    "incoming": ["id", "sms_id", "phone", "mes", "to", "smsc", "sent", "time"],
    "waitcall": ["phone", "ts", "calltime", "callmenu", "ringtime"],
}

FLAGS_FIELDS = {"type", "type_name", "second_balance", "template", "template_type"}

RECEIVED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
EVENT_ID = re.compile(r"[0-9a-f]{16,}\Z")

CODECS = {"utf-8": "utf-8", "windows-1251": "cp1251", "koi8-r": "koi8_r"}


def form(fields, charset="windows-1251"):
    """Decode a form callback as SMSC sends it (default charset windows-1251)."""
    codec = CODECS[charset]
    body = "&".join("%s=%s" % (k, quote_plus(v.encode(codec))) for k, v in fields.items()).encode("ascii")
    return decode_request(body, "", "application/x-www-form-urlencoded", charset)


def event_of(fields, charset="windows-1251", **kwargs):
    kwargs.setdefault("zone", MSK)
    kwargs.setdefault("received", 1705303805.5)
    return normalize(form(fields, charset), **kwargs)


# ---------------------------------------------------------------------------
# realistic callbacks, every field
# ---------------------------------------------------------------------------

FULL_STATUS = {
    "id": "12345",
    "phone": "79991234567",
    "status": "1",
    "time": "15.01.24 10:30:05",
    "ts": "1705303805",
    "err": "242",
    "syserr": "0",
    "cnt": "65",
    "type": "7",
    "cost": "2.50",
    "flag": "807",  # 7 (call) | 32 (second balance) | 256 (template) | 512 (transactional)
    "sender": "SMSC.RU",
    "dtmf": "1",
    "cmt": "Звонок завершён\novertime: 01:05",
    "calltime": "65",
    "callmenu": "1",
    "ringtime": "12",
    "imsi": "250011234567890",
    "msc": "79168999000",
    "mcc": "250",
    "mnc": "01",
    "cn": "Россия",
    "net": "МТС",
    "rcn": "Россия",
    "rnet": "Мегафон",
    "md5": "71fb1b21e4e5d68eff2ed361579d0863",
}

FULL_INCOMING = {
    "id": "987654",
    "sms_id": "555",
    "phone": "79991234567",
    "mes": "Привет, мир! ёЁ",
    "to": "79990000000",
    "smsc": "SMSC",
    "sent": "1705303800",
    "time": "1705303805",
}

FULL_WAITCALL = {
    "waitcall": "1",
    "phone": "79991234567",
    "ts": "1705303805",
    "calltime": "5",
    "callmenu": "2",
    "ringtime": "3",
}

FULL = {"status": FULL_STATUS, "incoming": FULL_INCOMING, "waitcall": FULL_WAITCALL}

#: The typed fields each realistic callback must give (SPEC §6).
EXPECTED_TYPED = {
    "status": {
        "id": "12345", "phone": "79991234567", "status": 1, "status_name": "delivered",
        "final": True, "time": "2024-01-15T10:30:05+03:00", "ts": 1705303805, "err": 242,
        "err_name": "answering machine", "syserr": "0", "cnt": 65, "type": 7, "type_name": "Call",
        "cost": 2.5, "flag": 807,
        "flags": {"type": 7, "type_name": "Call", "second_balance": True, "template": True,
                  "template_type": "transactional"},
        "sender": "SMSC.RU", "dtmf": "1", "cmt": "Звонок завершён\novertime: 01:05",
        "overtime_s": 65, "calltime": "65", "callmenu": "1", "ringtime": "12",
        "imsi": "250011234567890", "msc": "79168999000", "mcc": "250", "mnc": "01",
        "cn": "Россия", "net": "МТС", "rcn": "Россия", "rnet": "Мегафон",
    },
    "incoming": {
        "id": "987654", "sms_id": "555", "phone": "79991234567", "mes": "Привет, мир! ёЁ",
        "to": "79990000000", "smsc": "SMSC", "sent": 1705303800, "time": 1705303805,
    },
    "waitcall": {
        "phone": "79991234567", "ts": 1705303805, "calltime": "5", "callmenu": "2", "ringtime": "3",
    },
}

#: The Python type of every typed field that isn't plain text (SPEC §6).
FIELD_TYPES = {
    "status": {"status": int, "final": bool, "ts": int, "err": int, "cnt": int, "type": int,
               "cost": (int, float), "flag": int, "flags": dict, "overtime_s": int},
    "incoming": {"sent": int, "time": int},
    "waitcall": {"ts": int},
}


@pytest.mark.parametrize("kind", list(FULL))
def test_every_field_of_the_kind_is_present_and_nothing_else(kind):
    event = event_of(FULL[kind])
    assert set(event) == set(COMMON_FIELDS) | set(KIND_FIELDS[kind])
    assert len(KIND_FIELDS[kind]) == len(set(KIND_FIELDS[kind]))


@pytest.mark.parametrize("kind", list(FULL))
def test_realistic_callback_gives_exactly_typed_fields(kind):
    event = event_of(FULL[kind], remote_addr="212.24.33.1", signature={"alg": "md5", "valid": True})
    assert {name: event[name] for name in KIND_FIELDS[kind]} == EXPECTED_TYPED[kind]
    assert event["kind"] == kind
    assert event["remote_addr"] == "212.24.33.1"
    assert event["signature"] == {"alg": "md5", "valid": True}
    assert event["format"] == "form"
    assert event["charset"] == "windows-1251"
    assert event["lossy"] is False
    assert "body_b64" not in event
    assert event["params"] == FULL[kind]
    assert event["received_at"] == "2024-01-15T07:30:05.500Z"
    assert event["at"] == "2024-01-15T07:30:05Z"
    assert EVENT_ID.match(event["event_id"])


@pytest.mark.parametrize("kind", list(FULL))
def test_typed_fields_have_their_types(kind):
    event = event_of(FULL[kind])
    types = FIELD_TYPES[kind]
    for name in KIND_FIELDS[kind]:
        value = event[name]
        expected = types.get(name, str)
        assert isinstance(value, expected), (name, value)
        if expected is int:
            assert not isinstance(value, bool), name
    if kind == "status":
        assert set(event["flags"]) == FLAGS_FIELDS
        assert isinstance(event["flags"]["second_balance"], bool)
        assert isinstance(event["flags"]["template"], bool)


MINIMAL = {
    "status": {"id": "1", "phone": "79991234567", "status": "0"},
    "incoming": {"phone": "79991234567", "mes": "hi"},
    "waitcall": {"waitcall": "1", "phone": "79991234567"},
}

#: Fields that have a value even when not sent.
NOT_NULL_WHEN_ABSENT = {
    "status": {"id", "phone", "status", "status_name", "final", "err", "err_name"},
    "incoming": {"phone", "mes"},
    "waitcall": {"phone"},
}


@pytest.mark.parametrize("kind", list(MINIMAL))
def test_fields_not_sent_are_present_as_null(kind):
    event = event_of(MINIMAL[kind])
    assert set(event) == set(COMMON_FIELDS) | set(KIND_FIELDS[kind])
    for name in KIND_FIELDS[kind]:
        if name not in NOT_NULL_WHEN_ABSENT[kind]:
            assert event[name] is None, name
    assert event["at"] is None
    assert event["signature"] is None
    assert event["remote_addr"] is None


def test_absent_err_is_zero_no_error():
    event = event_of(MINIMAL["status"])
    assert event["err"] == 0
    assert event["err_name"] == "no error"
    assert "err" not in event["params"]


def test_absent_flag_gives_null_flags():
    event = event_of(MINIMAL["status"])
    assert event["flag"] is None
    assert event["flags"] is None


def test_params_keep_the_hash_parameter():
    event = event_of(dict(MINIMAL["status"], sha1="abc"))
    assert event["params"]["sha1"] == "abc"


# ---------------------------------------------------------------------------
# code tables (PROTOCOL.md)
# ---------------------------------------------------------------------------

STATUS_TABLE = [
    (-3, "not found", True),
    (-2, "stopped", False),
    (-1, "waiting to be sent", False),
    (0, "transferred to the operator", False),
    (1, "delivered", True),
    (2, "read", True),
    (3, "expired", True),
    (4, "link clicked", True),
    (6, "blocked by spam filter (e-mail)", True),
    (20, "impossible to deliver", True),
    (22, "invalid number", True),
    (23, "prohibited", True),
    (24, "insufficient funds", True),
    (25, "unavailable number", True),
]


@pytest.mark.parametrize(("code", "name", "final"), STATUS_TABLE + [(5, "unknown", None), (21, "unknown", None),
                                                                    (-4, "unknown", None), (999, "unknown", None)])
def test_status_name_and_finality(code, name, final):
    assert status_info(code) == (name, final)
    event = event_of({"id": "1", "phone": "7", "status": str(code)})
    assert (event["status"], event["status_name"], event["final"]) == (code, name, final)


ERROR_TABLE = [
    (0, "no error"),
    (1, "subscriber does not exist"),
    (2, "mailbox full"),
    (3, "recipient's mail server not found"),
    (4, "mailbox blocked"),
    (6, "subscriber offline"),
    (11, "no SMS service"),
    (12, "phone error"),
    (13, "subscriber blocked"),
    (21, "service not supported"),
    (200, "virtual (test) sending"),
    (219, "SIM card replaced"),
    (220, "operator queue overflow"),
    (237, "no answer"),
    (238, "no template"),
    (239, "forbidden IP address"),
    (240, "busy"),
    (241, "conversion error"),
    (242, "answering machine"),
    (243, "no contract"),
    (244, "mailing prohibited"),
    (245, "status not received"),
    (246, "time restriction"),
    (247, "message limit exceeded"),
    (248, "no route"),
    (249, "wrong number format"),
    (250, "number forbidden by settings"),
    (251, "per-number limit exceeded"),
    (252, "number forbidden"),
    (253, "spam filter"),
    (254, "unregistered sender id"),
    (255, "rejected by operator"),
]


@pytest.mark.parametrize(("code", "name"), ERROR_TABLE + [(5, "unknown"), (256, "unknown"), (-1, "unknown")])
def test_err_name(code, name):
    assert error_name(code) == name
    event = event_of({"id": "1", "phone": "7", "status": "20", "err": str(code)})
    assert (event["err"], event["err_name"]) == (code, name)


TYPE_TABLE = [
    (0, "SMS"), (1, "Flash-SMS"), (2, "Binary SMS"), (3, "Wap-push"), (4, "HLR"), (5, "Ping-SMS"),
    (6, "MMS"), (7, "Call"), (8, "E-mail"), (10, "Viber"), (12, "Social networks"),
]


@pytest.mark.parametrize(("code", "name"), TYPE_TABLE + [(9, "unknown"), (11, "unknown"), (13, "unknown"),
                                                         (99, "unknown")])
def test_type_name(code, name):
    assert type_name(code) == name
    event = event_of({"id": "1", "phone": "7", "status": "1", "type": str(code)})
    assert (event["type"], event["type_name"]) == (code, name)


# ---------------------------------------------------------------------------
# flag bits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (0, (0, "SMS", False, False, None)),
        (4, (4, "HLR", False, False, None)),
        (7 | 32, (7, "Call", True, False, None)),
        (8, (8, "E-mail", False, False, None)),
        (10, (10, "Viber", False, False, None)),
        (12, (12, "Social networks", False, False, None)),
        (9, (9, "unknown", False, False, None)),
        (15, (15, "unknown", False, False, None)),
        (32, (0, "SMS", True, False, None)),
        (256, (0, "SMS", False, True, "service")),  # bits 10,9 = 00
        (256 | 512, (0, "SMS", False, True, "transactional")),  # 01
        (256 | 1024, (0, "SMS", False, True, "authorization")),  # 10
        (256 | 1024 | 512, (0, "SMS", False, True, "advertising")),  # 11
        (1024 | 512, (0, "SMS", False, False, None)),  # kind bits without the template bit
        (1024 | 512 | 256 | 32 | 10, (10, "Viber", True, True, "advertising")),
        (16 | 64 | 128 | 2048 | 1, (1, "Flash-SMS", False, False, None)),  # undocumented bits ignored
    ],
)
def test_flag_bits_decode(flag, expected):
    keys = ("type", "type_name", "second_balance", "template", "template_type")
    assert decode_flags(flag) == dict(zip(keys, expected))
    event = event_of({"id": "1", "phone": "7", "status": "1", "flag": str(flag)})
    assert event["flag"] == flag
    assert event["flags"] == dict(zip(keys, expected))


def test_decode_flags_of_none_is_none():
    assert decode_flags(None) is None


# ---------------------------------------------------------------------------
# times
# ---------------------------------------------------------------------------

#: (offset text as configured, the same offset as a tzinfo): normalize takes either.
OFFSETS = {
    "+03:00": timezone(timedelta(hours=3)),
    "-05:00": timezone(timedelta(hours=-5)),
    "-03:30": timezone(-timedelta(hours=3, minutes=30)),
    "+05:45": timezone(timedelta(hours=5, minutes=45)),
    "+00:00": timezone.utc,
}

TIME_CASES = [
    ("+03:00", "15.01.24 10:30:05", "2024-01-15T10:30:05+03:00"),
    ("-05:00", "15.01.24 10:30:05", "2024-01-15T10:30:05-05:00"),
    ("-03:30", "01.07.24 00:00:00", "2024-07-01T00:00:00-03:30"),
    ("+05:45", "31.12.99 23:59:59", "1999-12-31T23:59:59+05:45"),
    ("+00:00", "29.02.24 12:00:00", "2024-02-29T12:00:00+00:00"),
    ("+03:00", "01.01.00 00:00:00", "2000-01-01T00:00:00+03:00"),
]


@pytest.mark.parametrize(
    ("zone", "text", "iso"),
    [(OFFSETS[offset], text, iso) for offset, text, iso in TIME_CASES]
    + [(offset, text, iso) for offset, text, iso in TIME_CASES],
)
def test_status_time_gets_the_configured_offset(zone, text, iso):
    event = event_of({"id": "1", "phone": "7", "status": "1", "time": text}, zone=zone)
    assert event["time"] == iso
    assert event["params"]["time"] == text


@pytest.mark.parametrize(
    ("name", "text", "iso"),
    [
        ("Europe/Moscow", "15.01.24 10:30:05", "2024-01-15T10:30:05+03:00"),
        ("Europe/Moscow", "15.07.10 12:00:00", "2010-07-15T12:00:00+04:00"),  # summer time until 2011
        ("America/New_York", "01.07.24 12:00:00", "2024-07-01T12:00:00-04:00"),
        ("America/New_York", "15.01.24 12:00:00", "2024-01-15T12:00:00-05:00"),
    ],
)
def test_status_time_in_an_iana_zone(name, text, iso):
    zoneinfo = pytest.importorskip("zoneinfo")  # Python 3.9+
    try:
        zone = zoneinfo.ZoneInfo(name)
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database for %s" % name)
    event = event_of({"id": "1", "phone": "7", "status": "1", "time": text}, zone=zone)
    assert event["time"] == iso


@pytest.mark.parametrize(
    "text",
    ["2024-01-15 10:30:05", "32.01.24 10:30:05", "15.13.24 10:30:05", "15.01.24 25:00:00", "15.01.24",
     "29.02.23 12:00:00", "00.01.24 10:30:05", "15.01.224 10:30:05", "15.01.0000 10:30:05",
     "15.01.20245 10:30:05", "15.01.24 10:30", "15.01.24 10:30:05:01",
     "-1.01.24 10:30:05", "yesterday", "", " "],
)
def test_unparseable_time_is_null_but_kept_in_params(text):
    event = event_of({"id": "1", "phone": "7", "status": "1", "time": text})
    assert event["time"] is None
    assert event["params"]["time"] == text


def smsc_shaped_times(count=20000):
    """Texts of SMSC's 'DD.MM.YY hh:mm:ss' shape, most near a boundary (leap days, 24:00, 60 s)."""
    rng = random.Random(20261125)
    near = {"day": [0, 1, 28, 29, 30, 31, 32], "month": [0, 1, 2, 4, 12, 13], "year": [0, 4, 68, 69, 96, 99],
            "hour": [0, 23, 24], "minute": [0, 59, 60], "second": [0, 59, 60]}
    times = []
    for _ in range(count):
        day, month, year, hour, minute, second = (
            rng.choice(near[name]) if rng.random() < 0.5 else rng.randrange(100) for name in near)
        times.append("%02d.%02d.%02d %02d:%02d:%02d" % (day, month, year, hour, minute, second))
    return times + ["29.02.00 12:00:00", "29.02.68 12:00:00", "29.02.69 12:00:00", "29.02.72 12:00:00"]


def time_by_datetime(text, offset):
    """The status `time` worked out with datetime: None where it is not a date."""
    try:
        moment = datetime.strptime(text, "%d.%m.%y %H:%M:%S")
    except ValueError:
        return None
    return moment.isoformat() + offset


def test_status_time_of_smsc_shape_matches_datetime_and_the_tzinfo_path():
    # An offset text takes the fast path for this shape; a tzinfo takes the general one.
    wrong = [(text, got, want) for text in smsc_shaped_times()
             if (got := smsc_handler._local_time(text, "+03:00")) != (want := time_by_datetime(text, "+03:00"))
             or smsc_handler._local_time(text, MSK) != want]
    assert wrong == []


@pytest.mark.parametrize("text", ["15.01.²4 10:30:05", "15.01.24 10:30:0⁵"])
def test_time_with_non_decimal_digits_is_null(text):
    event = event_of({"id": "1", "phone": "7", "status": "1", "time": text}, "utf-8")
    assert event["time"] is None
    assert event["params"]["time"] == text


@pytest.mark.parametrize(
    ("received", "text"),
    [
        (1705303805.5, "2024-01-15T07:30:05.500Z"),
        (1705303805.0, "2024-01-15T07:30:05.000Z"),
        (1705303805.123, "2024-01-15T07:30:05.123Z"),
        (1705303805.9999, "2024-01-15T07:30:05.999Z"),
        (1700000000, "2023-11-14T22:13:20.000Z"),
    ],
)
def test_received_at_is_utc_with_milliseconds(received, text):
    assert event_of(MINIMAL["status"], received=received)["received_at"] == text


def received_at_by_datetime(now):
    """received_at computed with datetime: UTC, the time cut to whole milliseconds."""
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=int(now * 1000))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def received_at_times():
    """Times a busy server sees: runs of calls within a second, boundaries, jumps back."""
    rng = random.Random(20240115)
    seconds = [0, 1, 59, 86399, 951868799, 1700000000, 1705303805, 2147483647, 4102444799]
    seconds += [rng.randrange(4102444800) for _ in range(40)]
    times = []
    for second in seconds:
        times += [second + step * 0.3 for step in range(8)]  # forward across a few seconds
        times += [second + 2 - step * 0.35 for step in range(8)]  # and back
        times += [second + 0.9995, second + 0.99999, second + 0.9999999, second + 1 - 1e-6, second]
    times += [rng.uniform(0, 4102444800) for _ in range(2000)]  # jumping back and forth
    return times


def test_received_at_matches_datetime_forward_and_back_in_time():
    wrong = [(now, got, want) for now in received_at_times()
             if (got := smsc_handler._received_at(now)) != (want := received_at_by_datetime(now))]
    assert wrong == []


def test_received_at_just_below_a_second_never_pairs_its_milliseconds_with_another_second():
    smsc_handler._received_at(1700000000.5)  # 2023-11-14T22:13:20 formatted and kept
    assert smsc_handler._received_at(1700000000.9999999) in ("2023-11-14T22:13:20.999Z", "2023-11-14T22:13:21.000Z")
    assert smsc_handler._received_at(1700000000.99999) == "2023-11-14T22:13:20.999Z"
    assert smsc_handler._received_at(1700000001.0001) == "2023-11-14T22:13:21.000Z"
    assert smsc_handler._received_at(1700000000.9995) == "2023-11-14T22:13:20.999Z"


def test_received_at_defaults_to_now():
    event = normalize(form(MINIMAL["status"]))
    assert RECEIVED_AT.match(event["received_at"])


@pytest.mark.parametrize(
    ("fields", "at"),
    [
        ({"id": "1", "phone": "7", "status": "1", "ts": "1700000000"}, "2023-11-14T22:13:20Z"),
        ({"phone": "7", "mes": "hi", "time": "1700000000", "sent": "1"}, "2023-11-14T22:13:20Z"),
        ({"waitcall": "1", "phone": "7", "ts": "1700000000"}, "2023-11-14T22:13:20Z"),
        ({"id": "1", "phone": "7", "status": "1", "ts": "0"}, "1970-01-01T00:00:00Z"),
        ({"id": "1", "phone": "7", "status": "1"}, None),
        ({"id": "1", "phone": "7", "status": "1", "time": "15.01.24 10:30:05"}, None),  # at is from ts
        ({"phone": "7", "mes": "hi", "sent": "1700000000"}, None),  # at is from time
        ({"waitcall": "1", "phone": "7"}, None),
        ({"id": "1", "phone": "7", "status": "1", "ts": "soon"}, None),
        ({"id": "1", "phone": "7", "status": "1", "ts": "99999999999999999999"}, None),
    ],
)
def test_at_is_the_events_own_time_in_utc(fields, at):
    event = event_of(fields)
    assert event["at"] == at
    if at is not None:
        assert AT.match(at)


@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
@pytest.mark.parametrize("seconds", [10 ** 14, -10 ** 11, 253402300800],
                         ids=["year-3170843", "year-minus-1199", "year-10000"])
def test_at_is_null_for_a_time_outside_years_1_to_9999(kind, seconds):
    fields = dict(MINIMAL[kind], **{"time" if kind == "incoming" else "ts": str(seconds)})
    assert event_of(fields)["at"] is None


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "1970-01-01T00:00:00Z"),
    (-1, "1969-12-31T23:59:59Z"),
    (1700000000, "2023-11-14T22:13:20Z"),
    (253402300799, "9999-12-31T23:59:59Z"),
])
def test_utc_iso_keeps_its_shape_for_times_it_can_show(seconds, text):
    from smsc_handler import _utc_iso
    assert _utc_iso(seconds) == text
    assert AT.match(_utc_iso(seconds))


def at_by_datetime(seconds):
    """`at` worked out with datetime: None outside years 1 to 9999."""
    try:
        moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    except OverflowError:
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment.year >= 1000 else moment.isoformat()[:19] + "Z"


def test_utc_iso_matches_datetime_across_days_and_range_ends():
    # Each day's date is kept between calls: runs within a day, day ends, jumps, out of range and back.
    rng = random.Random(20261125)
    starts = [0, -86400, 1700000000 - 1700000000 % 86400, 253402300799 - 86399, -62135596800]
    seconds = []
    for start in starts:
        seconds += [start + offset for offset in (0, 1, 3599, 86399, 86400, 86401, -1, -86400, -86401)]
        seconds += [253402300800, start, 10 ** 14, start + 5, -62135596801, start + 86399]
    seconds += [rng.randrange(-62135596800, 253402300800) for _ in range(5000)]
    wrong = [(second, got, want) for second in seconds
             if (got := smsc_handler._utc_iso(second)) != (want := at_by_datetime(second))]
    assert wrong == []


@pytest.mark.parametrize("seconds", [-50000000000, -62135596800], ids=["year-385", "year-1"])
def test_at_keeps_its_shape_or_is_null_for_a_year_before_1000(seconds):
    at = event_of(dict(MINIMAL["status"], ts=str(seconds)))["at"]
    assert at is None or AT.match(at), at


# ---------------------------------------------------------------------------
# values that don't parse
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fields", "name", "value"),
    [
        (MINIMAL["status"], "status", "delivered"),
        (MINIMAL["status"], "ts", "1.7e9"),
        (MINIMAL["status"], "err", "none"),
        (MINIMAL["status"], "cnt", "two"),
        (MINIMAL["status"], "type", "sms"),
        (MINIMAL["status"], "cost", "free"),
        (MINIMAL["status"], "cost", "nan"),
        (MINIMAL["status"], "cost", "inf"),
        (MINIMAL["status"], "cost", "1e999"),
        (MINIMAL["status"], "flag", "0x20"),
        (MINIMAL["status"], "status", "²"),
        (MINIMAL["status"], "ts", ""),
        (MINIMAL["status"], "status", "9" * 5000),
        (MINIMAL["incoming"], "sent", "yesterday"),
        (MINIMAL["incoming"], "time", "12:00"),
        (MINIMAL["waitcall"], "ts", "now"),
    ],
)
def test_unparseable_value_is_null_but_kept_in_params(fields, name, value):
    event = event_of(dict(fields, **{name: value}), "utf-8")
    assert event[name] is None
    assert event["params"][name] == value
    json.loads(event_line(event), parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity


@pytest.mark.parametrize(("text", "number"), [("2.50", 2.5), ("1.50", 1.5), ("2", 2), ("0", 0), ("0.35", 0.35)])
def test_cost_is_a_number(text, number):
    event = event_of(dict(MINIMAL["status"], cost=text))
    assert event["cost"] == number
    assert isinstance(event["cost"], (int, float)) and not isinstance(event["cost"], bool)


def number_by_regex(text):
    """A cost as the contract reads: optional sign, ASCII digits, '.' or ',' decimals."""
    text = text.strip()
    if re.fullmatch(r"[+-]?[0-9]{1,24}", text):
        return int(text)
    text = text.replace(",", ".")
    if len(text) <= 32 and re.fullmatch(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+)", text):
        return float(text)
    return None


def test_cost_matches_its_reading_by_regex():
    rng = random.Random(20261125)
    texts = ["".join(rng.choice("0123456789.,+- ²٣e_") for _ in range(rng.randrange(9))) for _ in range(20000)]
    texts += ["1" * 30 + ".5", "1" * 31 + ".5", "1" * 25, "1.50", "0.35", "12.", ".5", "-0.5", " 2,5 "]
    wrong = [(text, got, want) for text in texts
             if (got := smsc_handler._number(text)) != (want := number_by_regex(text)) or type(got) is not type(want)]
    assert wrong == []


@pytest.mark.parametrize(
    ("cmt", "seconds"),
    [
        ("overtime: 01:05", 65),
        ("Звонок завершён\novertime: 01:05", 65),
        ("Звонок\r\nOvertime: 10:00\r\n", 600),
        ("overtime: 00:00", 0),
        ("overtime 01:05", None),
        ("overtime: 1", None),
        ("overtime: xx:05", None),
        ("no overtime here", None),
        ("", None),
    ],
)
def test_overtime_seconds_come_from_the_cmt_line(cmt, seconds):
    event = event_of(dict(MINIMAL["status"], cmt=cmt))
    assert event["overtime_s"] == seconds
    assert event["cmt"] == cmt


@pytest.mark.parametrize("cmt", ["overtime: ²:05", "overtime: 01:⁵"])
def test_overtime_with_non_decimal_digits_is_null(cmt):
    event = event_of(dict(MINIMAL["status"], cmt=cmt), "utf-8")
    assert event["overtime_s"] is None
    assert event["cmt"] == cmt


# ---------------------------------------------------------------------------
# event_id: one identity per callback, whatever its encoding
# ---------------------------------------------------------------------------

def test_event_id_is_the_same_for_form_json_and_xml_of_one_callback():
    common = {"remote_addr": None, "received": 1, "zone": MSK}
    from_form = normalize(decode_request(b"id=777&phone=79991234567&status=1&ts=1700000000", "", "", "utf-8"),
                          **common)
    from_json = normalize(decode_request(b'{"id": 777, "phone": "79991234567", "status": 1, "ts": 1700000000}',
                                         "", "", "utf-8"), **common)
    from_xml = normalize(decode_request(b"<r><id>777</id><phone>79991234567</phone><status>1</status>"
                                        b"<ts>1700000000</ts></r>", "", "", "utf-8"), **common)
    assert from_form["event_id"] == from_json["event_id"] == from_xml["event_id"]


#: printf '%s' '["status", "12345", "79991234567", 1, 0, 1700000000]' | b2sum -l 128
#: (the identity of STATUS_KAT: kind, id, phone, status, err, ts): stored ids must not change.
STATUS_KAT = ({"id": "12345", "phone": "79991234567", "status": "1", "ts": "1700000000"},
              "71965e697657750c99ee868baaa0891f")


@pytest.mark.parametrize("hashers", ["built-in", "hashlib"])
def test_event_id_known_answer(monkeypatch, hashers):
    if hashers == "hashlib":  # a build without CPython's _blake2 (FIPS)
        import hashlib  # noqa: F401 (loaded while _blake2 can still be imported)
        monkeypatch.setattr(smsc_handler, "_HASHERS", {})
        monkeypatch.setitem(sys.modules, "_blake2", None)
    fields, expected = STATUS_KAT
    assert event_of(fields)["event_id"] == expected


def _eid(fields, **kwargs):
    return event_of(fields, **kwargs)["event_id"]


STATUS_BASE = {"id": "777", "phone": "79991234567", "status": "1", "ts": "1700000000"}


@pytest.mark.parametrize(
    ("changed", "same"),
    [
        ({"err": "0"}, True),  # missing err equals err=0
        ({"err": "00"}, True),  # typed value
        ({"cost": "3.00", "sender": "X", "cmt": "c"}, True),  # not identity
        ({"time": "14.11.23 01:13:20"}, True),
        ({"md5": "whatever"}, True),
        ({"status": "2"}, False),  # a new status of the same message
        ({"err": "1"}, False),
        ({"ts": "1700000060"}, False),
        ({"phone": "79990000000"}, False),  # one id can serve several phones
        ({"id": "778"}, False),
    ],
)
def test_status_event_id_follows_its_identity(changed, same):
    assert (_eid(STATUS_BASE) == _eid(dict(STATUS_BASE, **changed))) is same


def test_event_id_ignores_receipt_details():
    first = _eid(STATUS_BASE, received=1, remote_addr="1.2.3.4", signature=None)
    retry = _eid(STATUS_BASE, received=241, remote_addr="5.6.7.8", signature={"alg": "md5", "valid": True})
    assert first == retry


INCOMING_BASE = {"id": "987654", "phone": "79991234567", "mes": "hi", "to": "79990000000", "sent": "1700000000"}
INCOMING_NO_ID = {k: v for k, v in INCOMING_BASE.items() if k != "id"}


@pytest.mark.parametrize(
    ("base", "changed", "same"),
    [
        # SPEC §6 (issue 11): (id, phone, mes, to) -- the signed fields beside the unsigned id
        (INCOMING_BASE, {"sent": "3", "time": "1700000099", "smsc": "X", "sms_id": "1"}, True),
        (INCOMING_BASE, {"id": "987655"}, False),
        (INCOMING_BASE, {"mes": "other"}, False),
        (INCOMING_BASE, {"phone": "79991234568"}, False),
        (INCOMING_BASE, {"to": "79990000001"}, False),
        (INCOMING_NO_ID, {"time": "1700000099", "smsc": "X", "sms_id": "1"}, True),
        (INCOMING_NO_ID, {"mes": "other"}, False),
        (INCOMING_NO_ID, {"phone": "79991234568"}, False),
        (INCOMING_NO_ID, {"to": "79990000001"}, False),
        (INCOMING_NO_ID, {"sent": "1700000001"}, False),
    ],
)
def test_incoming_event_id_is_id_or_sent_with_phone_mes_to(base, changed, same):
    assert (_eid(base) == _eid(dict(base, **changed))) is same


WAITCALL_BASE = {"waitcall": "1", "phone": "79991234567", "ts": "1700000000"}


@pytest.mark.parametrize(
    ("changed", "same"),
    [
        ({"calltime": "5", "callmenu": "1", "ringtime": "2"}, True),
        ({"ts": "1700000001"}, False),
        ({"phone": "79991234568"}, False),
    ],
)
def test_waitcall_event_id_is_phone_and_ts(changed, same):
    assert (_eid(WAITCALL_BASE) == _eid(dict(WAITCALL_BASE, **changed))) is same


def test_event_ids_differ_between_kinds():
    ids = {_eid(STATUS_BASE), _eid(INCOMING_BASE), _eid(WAITCALL_BASE)}
    assert len(ids) == 3


def test_event_id_is_a_hex_digest():
    fields = {"id": "777", "phone": "7", "status": 1, "err": 0, "ts": 1700000000}
    digest = event_id("status", fields, {})
    assert EVENT_ID.match(digest)
    assert digest == event_id("status", dict(fields), {"id": "777"})


# ---------------------------------------------------------------------------
# the line, lossy events
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "mes",
    ["line\u2028separator", "para\u2029graph", "new\nline", "cr\rlf\r\n", "nul\x00byte", "tab\there",
     "😀 emoji", "Привет", "\x1b[31mred", "\x85next line"],
)
def test_event_line_is_one_ascii_line(mes):
    event = event_of({"phone": "79991234567", "mes": mes, "to": "1"}, "utf-8")
    line = event_line(event)
    assert isinstance(line, bytes)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert b"\r" not in line
    assert all(byte < 0x80 for byte in line)
    line.decode("ascii")
    assert len(line.decode("ascii").splitlines()) == 1
    assert json.loads(line) == event
    assert json.loads(line)["mes"] == mes


def test_event_line_is_the_same_without_the_c_encoder(monkeypatch):
    # Another Python's _json may lack make_encoder: json.dumps then writes the line.
    events = [event_of({"phone": "79991234567", "mes": "Привет \u2028 \x00 😀", "to": "1"}, "utf-8"),
              event_of(dict(STATUS_BASE, cost="1.50", flag="288", err="0"))]
    with_c = [event_line(event) for event in events]
    monkeypatch.setattr(smsc_handler, "_json_encode", None)
    monkeypatch.setitem(sys.modules, "_json", None)
    assert [event_line(event) for event in events] == with_c
    assert smsc_handler._json_encode is not None  # the fallback was made, and is kept
    assert smsc_handler.to_json(["a", 1]) == '["a", 1]'


def test_lossy_event_carries_the_original_body():
    body = b"phone=79991234567&mes=%FF%FEhi&to=1"
    request = decode_request(body, "charset=utf-8", "", "windows-1251")
    event = normalize(request, received=1, zone=MSK, body=body)
    assert event["lossy"] is True
    assert event["mes"] == "\ufffd\ufffdhi"
    assert event["body_b64"] == "cGhvbmU9Nzk5OTEyMzQ1NjcmbWVzPSVGRiVGRWhpJnRvPTE="
    assert base64.b64decode(event["body_b64"]) == body
    assert json.loads(event_line(event)) == event


def test_lossy_json_event_carries_the_original_bytes():
    body = b'{"phone": "79991234567", "mes": "ok\xff"}'
    request = decode_request(body, "charset=utf-8", "application/json", "windows-1251")
    event = normalize(request, received=1, zone=MSK, body=body)
    assert event["lossy"] is True
    assert base64.b64decode(event["body_b64"]) == body


@pytest.mark.parametrize("charset", list(CODECS))
def test_clean_event_is_not_lossy_and_has_no_body(charset):
    event = normalize(form(FULL_INCOMING, charset), received=1, zone=MSK, body=b"irrelevant")
    assert event["lossy"] is False
    assert "body_b64" not in event
    assert event["charset"] == charset
    assert event["mes"] == FULL_INCOMING["mes"]
