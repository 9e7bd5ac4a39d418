"""The control hash (SPEC §5, §9): known-answer vectors, crc32 forms, mes charsets, policy.

Every expected hash below was computed once outside this project (PHP's md5(),
sha1(), crc32() printed with %u and %08x; GNU md5sum/sha1sum; iconv for the
Cyrillic encodings) and is written out so that a refactor can't change it.
"""

from __future__ import annotations

import hmac
import json
import sys
from urllib.parse import quote_plus

import pytest

import smsc_handler
from smsc_handler import (
    SignatureError,
    control_hash,
    decode_request,
    hash_matches,
    signature_candidates,
    verify_signature,
)

SECRET = "s3cr3t-key"
MES = "Привет, мир! ёЁ"

#: The strings SMSC hashes for each kind (SPEC §5), with SECRET.
STATUS_STRING = b"12345:79991234567:1:s3cr3t-key"  # id:phone:status:S
INCOMING_STRING = b"79991234567:Hello:79990000000:s3cr3t-key"  # phone:mes:to:S
WAITCALL_STRING = b"79991234567:1700000000:s3cr3t-key"  # phone:ts:S

#: printf '%s' 'Привет, мир! ёЁ' | iconv -t cp1251 | xxd -p  (and koi8-r); utf-8 likewise.
MES_BYTES = {
    "utf-8": bytes.fromhex("d09fd180d0b8d0b2d0b5d1822c20d0bcd0b8d1802120d191d081"),
    "windows-1251": bytes.fromhex("cff0e8e2e5f22c20ece8f02120b8a8"),
    "koi8-r": bytes.fromhex("f0d2c9d7c5d42c20cdc9d22120a3b3"),
}

#: hashed string -> {alg: hash}. crc32 is PHP's crc32() printed with %u.
VECTORS = {
    STATUS_STRING: {
        "md5": "71fb1b21e4e5d68eff2ed361579d0863",
        "sha1": "5a19df0569ef2c8a2b7783cdf83f0f1c68558345",
        "crc32": "2995429727",
    },
    INCOMING_STRING: {
        "md5": "3941c57ccc50fceee9616275605db67e",
        "sha1": "941e24f9bf0a9dcc9e5b45645e134325061561b4",
        "crc32": "4082899071",
    },
    WAITCALL_STRING: {
        "md5": "19daf192af7baa031d5e70115e860327",
        "sha1": "0b7f36b415b17832cf647546a1263a2dfb09f695",
        "crc32": "2449864467",
    },
    b"25:79991234567:1:s3cr3t-key": {
        "md5": "11412b4f89ed80de5831d66eee2122dc",
        "crc32": "14705089",
    },
    b"79991234567:" + MES_BYTES["utf-8"] + b":79990000000:s3cr3t-key": {
        "md5": "6770b7b29f7bdbacdceb25cbbc38175a",
        "sha1": "49f93f3546ee382226ce0eb4128bfae6f15e9e34",
        "crc32": "3467640257",
    },
    b"79991234567:" + MES_BYTES["windows-1251"] + b":79990000000:s3cr3t-key": {
        "md5": "fab11fb452cc7b1b4c5616220bbaf786",
        "sha1": "865a07f9ef58883ac16f90dcb30d3ba955870693",
        "crc32": "3691270892",
    },
    b"79991234567:" + MES_BYTES["koi8-r"] + b":79990000000:s3cr3t-key": {
        "md5": "8ca624e9ee286ba51eabce669d4381f7",
        "sha1": "1481cef52d119602b29ac8cae138b008e9563479",
        "crc32": "22935279",
    },
}

#: md5 of phone:mes:to:S with mes in each charset (from VECTORS, by charset).
MES_MD5 = {
    "utf-8": "6770b7b29f7bdbacdceb25cbbc38175a",
    "windows-1251": "fab11fb452cc7b1b4c5616220bbaf786",
    "koi8-r": "8ca624e9ee286ba51eabce669d4381f7",
}

CODECS = {"utf-8": "utf-8", "windows-1251": "cp1251", "koi8-r": "koi8_r"}


def form(fields, charset="utf-8"):
    """Decode a form callback built like PHP's http_build_query in `charset`."""
    codec = CODECS[charset]
    body = "&".join("%s=%s" % (k, quote_plus(v.encode(codec))) for k, v in fields.items()).encode("ascii")
    return decode_request(body, "charset=" + charset, "application/x-www-form-urlencoded", "windows-1251")


def status_request(**extra):
    return form(dict({"id": "12345", "phone": "79991234567", "status": "1"}, **extra))


def incoming_request(**extra):
    return form(dict({"phone": "79991234567", "mes": "Hello", "to": "79990000000"}, **extra))


def waitcall_request(**extra):
    return form(dict({"waitcall": "1", "phone": "79991234567", "ts": "1700000000"}, **extra))


REQUESTS = {"status": status_request, "incoming": incoming_request, "waitcall": waitcall_request}
STRINGS = {"status": STATUS_STRING, "incoming": INCOMING_STRING, "waitcall": WAITCALL_STRING}


# ---------------------------------------------------------------------------
# known-answer vectors
# ---------------------------------------------------------------------------

KAT = [(data, alg, digest) for data, hashes in VECTORS.items() for alg, digest in hashes.items()]


@pytest.mark.parametrize(("data", "alg", "expected"), KAT)
def test_control_hash_known_answers(data, alg, expected):
    assert control_hash(alg, data) == expected


@pytest.mark.parametrize(("data", "alg", "expected"), KAT)
def test_hash_matches_known_answers(data, alg, expected):
    assert hash_matches(alg, expected, data) is True


# ---------------------------------------------------------------------------
# crc32 forms, hex case, wrong hashes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "received"),
    [
        (STATUS_STRING, "2995429727"),  # unsigned decimal (PHP %u)
        (STATUS_STRING, "-1299537569"),  # signed 32-bit decimal (PHP on 32-bit, Java int)
        (STATUS_STRING, "b28aa15f"),  # 8-digit hex
        (STATUS_STRING, "B28AA15F"),
        (WAITCALL_STRING, "2449864467"),
        (WAITCALL_STRING, "-1845102829"),
        (WAITCALL_STRING, "9205f713"),
        (INCOMING_STRING, "4082899071"),
        (INCOMING_STRING, "-212068225"),
        (INCOMING_STRING, "f35c187f"),
        (b"25:79991234567:1:s3cr3t-key", "14705089"),  # < 2**31: signed == unsigned
        (b"25:79991234567:1:s3cr3t-key", "00e061c1"),  # hex keeps its leading zeros
    ],
)
def test_crc32_is_accepted_in_every_printed_form(data, received):
    assert hash_matches("crc32", received, data) is True


@pytest.mark.parametrize(
    "received",
    [
        "2995429728",  # off by one
        "1299537569",  # the signed form without its sign
        "-2995429727",
        "b28aa15e",
        "0xb28aa15f",
        "",
        "71fb1b21e4e5d68eff2ed361579d0863",  # the md5
    ],
)
def test_wrong_crc32_is_refused(received):
    assert hash_matches("crc32", received, STATUS_STRING) is False


@pytest.mark.parametrize(
    ("alg", "received"),
    [
        ("md5", "71fb1b21e4e5d68eff2ed361579d0863"),
        ("md5", "71FB1B21E4E5D68EFF2ED361579D0863"),
        ("md5", "71Fb1b21e4E5d68eff2eD361579d0863"),
        ("sha1", "5a19df0569ef2c8a2b7783cdf83f0f1c68558345"),
        ("sha1", "5A19DF0569EF2C8A2B7783CDF83F0F1C68558345"),
    ],
)
def test_md5_and_sha1_compare_case_insensitively(alg, received):
    assert hash_matches(alg, received, STATUS_STRING) is True


@pytest.mark.parametrize(
    ("alg", "received"),
    [
        ("md5", "71fb1b21e4e5d68eff2ed361579d0864"),
        ("md5", "71fb1b21e4e5d68eff2ed361579d086"),  # truncated
        ("md5", "71fb1b21e4e5d68eff2ed361579d08630"),  # one digit too many
        ("md5", ""),
        ("md5", "5a19df0569ef2c8a2b7783cdf83f0f1c68558345"),  # the sha1
        ("md5", "19daf192af7baa031d5e70115e860327"),  # the waitcall string's md5
        ("sha1", "5a19df0569ef2c8a2b7783cdf83f0f1c68558346"),
        ("sha1", "71fb1b21e4e5d68eff2ed361579d0863"),  # the md5
        ("sha1", "не хеш"),
    ],
)
def test_wrong_md5_or_sha1_is_refused(alg, received):
    assert hash_matches(alg, received, STATUS_STRING) is False


def test_hashes_are_compared_with_compare_digest_on_bytes(monkeypatch):
    # hmac.compare_digest is _operator._compare_digest; the module may import either.
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    hash_matches("md5", "0" * 32, STATUS_STRING)  # the comparison is found before the spy goes in
    monkeypatch.setattr(hmac, "compare_digest", spy)
    monkeypatch.setattr("_operator._compare_digest", spy)
    assert hash_matches("md5", "71fb1b21e4e5d68eff2ed361579d0863", STATUS_STRING)
    assert hash_matches("crc32", "b28aa15f", STATUS_STRING)
    assert not hash_matches("sha1", "0" * 40, STATUS_STRING)
    assert calls
    assert all(pair == (bytes, bytes) for pair in calls)


def test_hashes_fall_back_to_hashlib_without_the_builtin_modules(monkeypatch):
    import hashlib  # noqa: F401 (loaded while _md5 and _sha1 can still be imported)
    monkeypatch.setattr(smsc_handler, "_HASHERS", {})  # nothing found yet, as in a fresh process
    monkeypatch.setitem(sys.modules, "_md5", None)  # a build without them (FIPS): the import fails
    monkeypatch.setitem(sys.modules, "_sha1", None)
    for alg in ("md5", "sha1", "md5"):
        assert control_hash(alg, STATUS_STRING) == VECTORS[STATUS_STRING][alg]


# ---------------------------------------------------------------------------
# the hashed string of each kind
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_each_kind_hashes_its_fields_first_as_received(kind):
    request = REQUESTS[kind]()
    candidates = signature_candidates(kind, request.params, request.raw, SECRET)
    assert candidates[0][1] == STRINGS[kind]


def test_missing_signed_field_hashes_as_empty():
    request = form({"id": "12345", "status": "1"})
    candidates = signature_candidates("status", request.params, request.raw, SECRET)
    assert candidates[0][1] == b"12345::1:s3cr3t-key"


VERIFY = [(kind, alg, VECTORS[STRINGS[kind]][alg]) for kind in STRINGS for alg in ("md5", "sha1", "crc32")]


@pytest.mark.parametrize(("kind", "alg", "digest"), VERIFY)
def test_correct_hash_verifies_for_each_kind_and_algorithm(kind, alg, digest):
    request = REQUESTS[kind](**{alg: digest})
    for require in ("auto", "yes", "no"):
        # crc32 counts only when [handler] hash_alg names it (SPEC §5a)
        hash_alg = "crc32" if alg == "crc32" else "auto"
        assert verify_signature(kind, request, SECRET, require, hash_alg) == {"alg": alg, "valid": True, "key": 0}


@pytest.mark.parametrize(("kind", "alg", "digest"), VERIFY)
def test_hash_with_another_secret_is_refused(kind, alg, digest):
    request = REQUESTS[kind](**{alg: digest})
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(kind, request, "other-secret", "auto", alg if alg == "crc32" else "auto")


@pytest.mark.parametrize(
    "extra",
    [{"err": "1"}, {"ts": "1700000000"}, {"cost": "1.50", "sender": "SMSC"}],
)
def test_status_hash_covers_only_id_phone_status(extra):
    request = status_request(md5="71fb1b21e4e5d68eff2ed361579d0863", **extra)
    assert verify_signature("status", request, SECRET, "auto") == {"alg": "md5", "valid": True, "key": 0}


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 12345, "phone": "79991234567", "status": 1, "md5": "71fb1b21e4e5d68eff2ed361579d0863"}',
        b"<r><id>12345</id><phone>79991234567</phone><status>1</status>"
        b"<md5>71fb1b21e4e5d68eff2ed361579d0863</md5></r>",
    ],
    ids=["json", "xml"],
)
def test_json_and_xml_values_are_hashed_as_their_text(body):
    request = decode_request(body, "", "", "utf-8")
    assert verify_signature("status", request, SECRET, "auto") == {"alg": "md5", "valid": True, "key": 0}


@pytest.mark.parametrize(
    ("literal", "digest"),
    [
        ("1.50", "911fcbe1716cd39dadb5c6a8eb6abcf0"),  # md5 of 1.50:79991234567:1:s3cr3t-key
        ("1.5", "34e81e1ffcdf961ff0795a41acb1c66b"),  # md5 of 1.5:79991234567:1:s3cr3t-key
    ],
)
def test_json_number_is_hashed_as_its_literal_text(literal, digest):
    body = ('{"id": %s, "phone": "79991234567", "status": 1, "md5": "%s"}' % (literal, digest)).encode()
    request = decode_request(body, "", "", "utf-8")
    assert verify_signature("status", request, SECRET, "auto") == {"alg": "md5", "valid": True, "key": 0}


# ---------------------------------------------------------------------------
# mes in any charset
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sent_in", list(CODECS))
@pytest.mark.parametrize("hashed_in", list(CODECS))
def test_mes_verifies_whatever_charset_it_was_hashed_in(sent_in, hashed_in):
    request = form({"phone": "79991234567", "mes": MES, "to": "79990000000", "md5": MES_MD5[hashed_in]}, sent_in)
    assert request.params["mes"] == MES
    assert verify_signature("incoming", request, SECRET, "auto") == {"alg": "md5", "valid": True, "key": 0}


@pytest.mark.parametrize("sent_in", list(CODECS))
def test_mes_is_tried_as_received_bytes_first_then_reencoded(sent_in):
    request = form({"phone": "79991234567", "mes": MES, "to": "79990000000"}, sent_in)
    candidates = [data for _label, data in signature_candidates("incoming", request.params, request.raw, SECRET)]
    expected_first = b"79991234567:" + MES_BYTES[sent_in] + b":79990000000:s3cr3t-key"
    assert candidates[0] == expected_first
    every = {b"79991234567:" + raw + b":79990000000:s3cr3t-key" for raw in MES_BYTES.values()}
    assert set(candidates) == every
    assert len(candidates) == len(set(candidates))


def test_mes_raw_bytes_that_are_not_valid_text_still_verify():
    # A lossy decode must not stop the hash from matching the bytes SMSC hashed.
    raw = b"\xff\xfe ok"
    data = b"79991234567:" + raw + b":79990000000:s3cr3t-key"
    digest = control_hash("md5", data)
    body = b"phone=79991234567&mes=%FF%FE+ok&to=79990000000&md5=" + digest.encode()
    request = decode_request(body, "charset=utf-8", "", "windows-1251")
    assert request.lossy is True
    assert verify_signature("incoming", request, SECRET, "auto") == {"alg": "md5", "valid": True, "key": 0}


@pytest.mark.parametrize("hashed_in", list(CODECS))
def test_json_mes_verifies_whatever_charset_it_was_hashed_in(hashed_in):
    body = json.dumps(
        {"phone": "79991234567", "mes": MES, "to": "79990000000", "md5": MES_MD5[hashed_in]}, ensure_ascii=False
    ).encode("utf-8")
    request = decode_request(body, "", "application/json", "windows-1251")
    assert verify_signature("incoming", request, SECRET, "auto") == {"alg": "md5", "valid": True, "key": 0}


def test_mes_hashed_in_another_text_is_refused():
    request = form({"phone": "79991234567", "mes": MES + "!", "to": "79990000000", "md5": MES_MD5["utf-8"]})
    with pytest.raises(SignatureError):
        verify_signature("incoming", request, SECRET, "auto")


# ---------------------------------------------------------------------------
# policy: require_signature, no secret
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("require", ["auto", "yes"])
@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_missing_hash_with_a_secret_is_refused_under_auto_and_yes(kind, require):
    with pytest.raises(SignatureError):
        verify_signature(kind, REQUESTS[kind](), SECRET, require)


@pytest.mark.parametrize("kind", ["status", "incoming", "waitcall"])
def test_missing_hash_with_a_secret_is_let_in_under_no(kind):
    assert verify_signature(kind, REQUESTS[kind](), SECRET, "no") is None


@pytest.mark.parametrize("require", ["auto", "no"])
def test_no_hash_and_no_secret_gives_no_signature(require):
    assert verify_signature("status", status_request(), "", require) is None


@pytest.mark.parametrize(
    ("alg", "value"),
    [("md5", "71fb1b21e4e5d68eff2ed361579d0863"), ("sha1", "garbage"), ("crc32", "1")],
)
@pytest.mark.parametrize("require", ["auto", "no"])
def test_hash_sent_without_a_secret_is_accepted_as_unchecked(alg, value, require):
    request = status_request(**{alg: value})
    assert verify_signature("status", request, "", require) == {"alg": alg, "valid": None, "key": None}


@pytest.mark.parametrize("require", ["auto", "yes", "no"])
@pytest.mark.parametrize(
    ("alg", "value"),
    [("md5", "71fb1b21e4e5d68eff2ed361579d0864"), ("sha1", "0" * 40), ("crc32", "2995429728"), ("md5", "")],
)
def test_wrong_hash_is_always_refused(alg, value, require):
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature("status", status_request(**{alg: value}), SECRET, require, alg)
