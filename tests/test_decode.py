"""Decoding a request (SPEC §4, §9): formats, charsets, merging, hostile bodies.

These tests call the pure functions directly: no app, no config, no fixtures.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote_plus, unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proof_util import billion_laughs

from smsc_handler import BadRequest, _decode_form_pairs, classify, decode_request, parse_form

#: Cyrillic text with ё/Ё (outside the basic block in every charset) and punctuation.
MES = "Привет, мир! ёЁ"
PHONE = "79991234567"
TO = "79990000000"

#: charset name as SMSC writes it -> (Python codec, canonical name in the Request).
CHARSETS = {
    "utf-8": ("utf-8", "utf-8"),
    "windows-1251": ("cp1251", "windows-1251"),
    "koi8-r": ("koi8_r", "koi8-r"),
}

#: format -> the Content-Type an SMSC-like sender would use for it.
MEDIA = {
    "form": "application/x-www-form-urlencoded",
    "json": "application/json",
    "xml": "application/xml",
}


def other_charset(name):
    """A charset different from `name`, to prove a source was really used."""
    return "utf-8" if name != "utf-8" else "windows-1251"


def form_body(fields, codec):
    """Encode fields as PHP's http_build_query would: bytes of `codec`, '+' for spaces."""
    return "&".join(
        "%s=%s" % (quote_plus(name), quote_plus(value.encode(codec))) for name, value in fields.items()
    ).encode("ascii")


def json_body(fields, codec):
    return json.dumps(fields, ensure_ascii=False).encode(codec)


def xml_body(fields, codec, declaration=None):
    head = '<?xml version="1.0" encoding="%s"?>' % declaration if declaration else ""
    inner = "".join("<%s>%s</%s>" % (name, value, name) for name, value in fields.items())
    return (head + "<response>" + inner + "</response>").encode(codec)


BUILDERS = {"form": form_body, "json": json_body, "xml": xml_body}


def build(fmt, fields, codec):
    return BUILDERS[fmt](fields, codec)


def callback_fields():
    return {"phone": PHONE, "mes": MES, "to": TO}


# ---------------------------------------------------------------------------
# charset x format x where the charset is named
# ---------------------------------------------------------------------------

MATRIX = [
    (charset, fmt, source)
    for charset in CHARSETS
    for fmt in ("form", "json", "xml")
    for source in ("query", "body", "content-type", "default")
]


@pytest.mark.parametrize(("charset", "fmt", "source"), MATRIX)
def test_cyrillic_mes_decodes_in_every_charset_and_format(charset, fmt, source):
    codec, canonical = CHARSETS[charset]
    fields = callback_fields()
    query = ""
    content_type = MEDIA[fmt]
    default = other_charset(charset)
    if source == "query":
        query = "charset=" + charset
    elif source == "body":
        fields["charset"] = charset
    elif source == "content-type":
        content_type += "; charset=" + charset
    else:
        default = charset
    request = decode_request(build(fmt, fields, codec), query, content_type, default)
    assert request.params["mes"] == MES
    assert request.params["phone"] == PHONE
    assert request.params["to"] == TO
    assert request.charset == canonical
    assert request.format == fmt
    assert request.lossy is False


@pytest.mark.parametrize("charset", list(CHARSETS))
def test_form_raw_holds_the_percent_decoded_bytes(charset):
    codec, _ = CHARSETS[charset]
    request = decode_request(form_body(callback_fields(), codec), "charset=" + charset, MEDIA["form"], "utf-8")
    assert request.raw["mes"] == MES.encode(codec)
    assert request.raw["phone"] == PHONE.encode("ascii")


@pytest.mark.parametrize("charset", list(CHARSETS))
def test_xml_with_a_matching_encoding_declaration_decodes(charset):
    codec, canonical = CHARSETS[charset]
    body = xml_body(callback_fields(), codec, declaration=charset)
    request = decode_request(body, "charset=" + charset, MEDIA["xml"], other_charset(charset))
    assert request.params["mes"] == MES
    assert request.charset == canonical


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("utf-8", "utf-8"),
        ("UTF-8", "utf-8"),
        ("Utf-8", "utf-8"),
        ("windows-1251", "windows-1251"),
        ("Windows-1251", "windows-1251"),
        ("cp1251", "windows-1251"),
        ("CP1251", "windows-1251"),
        ("koi8-r", "koi8-r"),
        ("KOI8-R", "koi8-r"),
    ],
)
def test_charset_names_are_case_insensitive_and_canonicalized(name, canonical):
    request = decode_request(b"phone=1", "charset=" + name, MEDIA["form"], "utf-8")
    assert request.charset == canonical


@pytest.mark.parametrize("fmt", ["form", "json", "xml"])
def test_charset_parameter_wins_over_content_type(fmt):
    body = build(fmt, callback_fields(), "cp1251")
    request = decode_request(body, "charset=windows-1251", MEDIA[fmt] + "; charset=koi8-r", "utf-8")
    assert request.params["mes"] == MES
    assert request.charset == "windows-1251"


@pytest.mark.parametrize("fmt", ["form", "json", "xml"])
def test_content_type_charset_wins_over_default(fmt):
    body = build(fmt, callback_fields(), "koi8_r")
    request = decode_request(body, "", MEDIA[fmt] + '; charset="KOI8-R"', "windows-1251")
    assert request.params["mes"] == MES
    assert request.charset == "koi8-r"


@pytest.mark.parametrize("fmt", ["form", "json", "xml"])
def test_charset_in_body_wins_over_charset_in_query(fmt):
    fields = dict(callback_fields(), charset="windows-1251")
    request = decode_request(build(fmt, fields, "cp1251"), "charset=koi8-r", MEDIA[fmt], "utf-8")
    assert request.params["mes"] == MES
    assert request.charset == "windows-1251"


# ---------------------------------------------------------------------------
# merging and sniffing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["form", "json", "xml"])
def test_body_wins_over_query_on_merge(fmt):
    body = build(fmt, {"id": "2", "status": "1"}, "utf-8")
    request = decode_request(body, "id=1&phone=" + PHONE, MEDIA[fmt], "utf-8")
    assert request.params["id"] == "2"
    assert request.params["phone"] == PHONE
    assert request.params["status"] == "1"


def test_query_alone_is_a_form_request():
    request = decode_request(b"", "phone=%2B7999&status=1", "", "windows-1251")
    assert request.format == "form"
    assert request.params == {"phone": "+7999", "status": "1"}


@pytest.mark.parametrize(
    ("body", "fmt"),
    [
        (b'{"phone": "7999", "status": 1}', "json"),
        (b'  \r\n\t{"phone": "7999", "status": 1}', "json"),
        (b'\xef\xbb\xbf{"phone": "7999", "status": 1}', "json"),
        (b"<r><phone>7999</phone><status>1</status></r>", "xml"),
        (b'<?xml version="1.0"?>\n<r><phone>7999</phone><status>1</status></r>', "xml"),
        (b"\n  <r><phone>7999</phone><status>1</status></r>", "xml"),
    ],
)
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", ""])
def test_sniffing_wins_over_content_type(body, fmt, content_type):
    request = decode_request(body, "", content_type, "windows-1251")
    assert request.format == fmt
    assert request.params == {"phone": "7999", "status": "1"}


# ---------------------------------------------------------------------------
# JSON values keep their text; wrapping; scalars only
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("literal", "text"),
    [
        ("1.50", "1.50"),
        ("0.10", "0.10"),
        ("-0.0", "-0.0"),
        ("1e5", "1e5"),
        ("2.5E-3", "2.5E-3"),
        ("777", "777"),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("9" * 5000, "9" * 5000),  # beyond int()'s default digit limit: still text
        ("true", "true"),
        ("false", "false"),
        ('"1.50"', "1.50"),
    ],
)
def test_json_values_keep_their_literal_text(literal, text):
    request = decode_request(('{"phone": "7", "cost": %s}' % literal).encode(), "", MEDIA["json"], "utf-8")
    assert request.params["cost"] == text
    assert isinstance(request.params["cost"], str)


def test_json_null_counts_as_absent():
    request = decode_request(b'{"phone": "7", "sender": null, "err": null}', "", MEDIA["json"], "utf-8")
    assert request.params == {"phone": "7"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"phone": "7", "id": 777}',
        b'{"data": {"phone": "7", "id": 777}}',
        b"<r><phone>7</phone><id>777</id></r>",
        b"<response><data><phone>7</phone><id>777</id></data></response>",
    ],
    ids=["json-flat", "json-wrapped", "xml-flat", "xml-wrapped"],
)
def test_one_wrapping_level_is_allowed(body):
    request = decode_request(body, "", "", "utf-8")
    assert request.params == {"phone": "7", "id": "777"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": {"b": {"phone": "7", "id": 777}}}',
        b"<r><a><b><phone>7</phone><id>777</id></b></a></r>",
    ],
    ids=["json", "xml"],
)
def test_two_wrapping_levels_are_refused(body):
    with pytest.raises(BadRequest):
        decode_request(body, "", "", "utf-8")


@pytest.mark.parametrize(
    "body",
    [
        b'{"phone": "7", "id": {"x": 1}}',
        b'{"phone": "7", "id": [1, 2]}',
        b'{"phone": "7", "id": []}',
        b'{"phone": "7", "id": {}}',
        b'{"data": {"phone": "7", "id": [1]}}',
        b'[{"phone": "7"}]',
        b"[]",
    ],
)
def test_object_and_array_values_are_refused(body):
    with pytest.raises(BadRequest):
        decode_request(body, "", MEDIA["json"], "utf-8")


@pytest.mark.parametrize(
    "body",
    [
        b"<r><phone>7</phone><id><x>1</x></id></r>",
        b"<r><phone>7</phone><id>1<x>2</x></id></r>",
        b"<r><w><phone>7</phone><id><x>1</x></id></w></r>",
    ],
)
def test_xml_parameter_with_children_is_refused(body):
    with pytest.raises(BadRequest):
        decode_request(body, "", MEDIA["xml"], "utf-8")


# ---------------------------------------------------------------------------
# hostile and malformed bodies
# ---------------------------------------------------------------------------

BILLION_LAUGHS = billion_laughs(b"<r><phone>7</phone><mes>&lol9;</mes></r>")

QUADRATIC_BLOWUP = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "' + b"x" * 50000 + b'">]><r><phone>7</phone><mes>'
    + b"&a;" * 50000 + b"</mes></r>"
)

HOSTILE_XML = {
    "billion-laughs": BILLION_LAUGHS,
    "quadratic-blowup": QUADRATIC_BLOWUP,
    "external-entity": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b"<r><phone>7</phone><mes>&xxe;</mes></r>",
    "external-dtd": b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd">'
    b"<r><phone>7</phone></r>",
    "parameter-entity": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
    b"<r><phone>7</phone></r>",
    "plain-doctype": b"<!DOCTYPE r><r><phone>7</phone></r>",
    "internal-entity": b'<!DOCTYPE r [<!ENTITY e "7">]><r><phone>&e;</phone></r>',
    "unparsed-entity": b'<!DOCTYPE r [<!NOTATION n SYSTEM "x"><!ENTITY u SYSTEM "y" NDATA n>]>'
    b"<r><phone>7</phone></r>",
}


@pytest.mark.parametrize("body", list(HOSTILE_XML.values()), ids=list(HOSTILE_XML))
@pytest.mark.parametrize("content_type", ["application/xml", "application/x-www-form-urlencoded"])
def test_xml_with_a_dtd_or_entities_is_refused_fast(body, content_type):
    start = time.monotonic()
    with pytest.raises(BadRequest):
        decode_request(body, "", content_type, "utf-8")
    assert time.monotonic() - start < 1.0


def test_billion_laughs_in_a_non_utf8_body_is_refused_fast():
    body = BILLION_LAUGHS.replace(b"<phone>7", "<phone>ё".encode("cp1251"))
    start = time.monotonic()
    with pytest.raises(BadRequest):
        decode_request(body, "charset=windows-1251", "application/xml", "windows-1251")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    "body",
    [
        b'{"phone": ',
        b'{"phone": "7",}',
        b"{phone: 7}",
        b"{'phone': '7'}",
        b'{"phone": "7"} trailing',
        b'{"phone": "7"}{"id": "1"}',
        b'["phone", "7"',
        b"{",
    ],
)
def test_malformed_json_is_refused(body):
    with pytest.raises(BadRequest):
        decode_request(body, "", MEDIA["json"], "utf-8")


@pytest.mark.parametrize(
    "body",
    [
        b"<r><phone>7</r>",
        b"<r>",
        b"<r><phone>7</phone></r><r2/>",
        b"<r><phone>&undefined;</phone></r>",
        b"<r><phone a=1>7</phone></r>",
        b"<",
        b"<r><phone>7</phone></r> trailing",
    ],
)
def test_malformed_xml_is_refused(body):
    with pytest.raises(BadRequest):
        decode_request(body, "", MEDIA["xml"], "utf-8")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 100_000,
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        b"<a>" * 100_000,
        b"<a>" * 100_000 + b"</a>" * 100_000,
    ],
    ids=["json-array-open", "json-array-closed", "json-object-open", "json-object-closed", "xml-open", "xml-closed"],
)
def test_deep_nesting_is_a_bad_request_not_a_recursion_error(body):
    start = time.monotonic()
    with pytest.raises(BadRequest):
        decode_request(body, "", "", "utf-8")
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("fmt", "query", "content_type", "body"),
    [
        ("form", "charset=latin-9", "", b"phone=7"),
        ("form", "", "application/x-www-form-urlencoded; charset=bogus", b"phone=7"),
        ("form", "", "", b"phone=7&charset=utf-16"),
        ("json", "charset=bogus", "", b'{"phone": "7"}'),
        ("json", "", "", b'{"phone": "7", "charset": "bogus"}'),
        ("json", "", "application/json; charset=ebcdic", b'{"phone": "7"}'),
        ("xml", "charset=bogus", "", b"<r><phone>7</phone></r>"),
        ("xml", "", "", b"<r><phone>7</phone><charset>bogus</charset></r>"),
    ],
)
def test_unknown_charset_name_is_refused(fmt, query, content_type, body):
    with pytest.raises(BadRequest):
        decode_request(body, query, content_type, "utf-8")


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_unknown_charset_name_is_refused_with_a_non_ascii_utf8_body(fmt):
    body = build(fmt, dict(callback_fields(), charset="bogus"), "utf-8")
    with pytest.raises(BadRequest):
        decode_request(body, "", MEDIA[fmt], "utf-8")


# ---------------------------------------------------------------------------
# form details
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("body", "mes"),
    [
        (b"mes=%FF%FEabc", "\ufffd\ufffdabc"),
        (b"mes=%D0%9F%D1", "П\ufffd"),
        (b"mes=abc%C0%AF", "abc\ufffd\ufffd"),
    ],
)
def test_invalid_utf8_in_a_form_is_lossy_with_replacement_chars(body, mes):
    request = decode_request(body, "charset=utf-8", MEDIA["form"], "windows-1251")
    assert request.params["mes"] == mes
    assert request.lossy is True
    assert request.charset == "utf-8"


@pytest.mark.parametrize(
    ("body", "name", "pattern"),
    [
        (b'{"phone": "7", "mes": "a\\ud800b"}', "mes", "a\ufffd+b"),
        (b'{"phone": "7", "mes": "\\udfff\\ud800"}', "mes", "\ufffd+"),
        (b'{"phone": "7", "mes": "hi", "x\\udc80": "1"}', "x\ufffd+", "1"),
    ],
    ids=["high-surrogate", "reversed-pair", "in-a-name"],
)
def test_a_lone_surrogate_escape_in_json_is_lossy_with_replacement_chars(body, name, pattern):
    import re
    request = decode_request(body, "charset=utf-8", MEDIA["json"], "windows-1251")
    assert request.lossy is True
    if name == "mes":
        assert re.fullmatch(pattern, request.params["mes"]), request.params
    else:
        assert [value for key, value in request.params.items() if re.fullmatch(name, key)] == [pattern]
    for key, value in request.params.items():
        (key + value).encode("utf-8")  # no surrogate left: every name and value is text


def test_invalid_utf8_in_a_json_body_is_lossy():
    body = b'{"phone": "7", "mes": "ok\xff"}'
    request = decode_request(body, "charset=utf-8", MEDIA["json"], "windows-1251")
    assert request.params["mes"] == "ok\ufffd"
    assert request.lossy is True


@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        (b"a+b", "a b"),
        (b"a%2Bb", "a+b"),
        (b"a%2bb", "a+b"),
        (b"%2B79991234567", "+79991234567"),
        (b"+79991234567", " 79991234567"),
        (b"100%zz", "100%zz"),
        (b"%zz%41", "%zzA"),
        (b"50%", "50%"),
        (b"5%4", "5%4"),
        (b"%%41", "%A"),
        (b"%e2%82%ac", "€"),
        (b"a%3Db%26c", "a=b&c"),
        (b"", ""),
    ],
)
def test_form_values_are_percent_decoded(encoded, value):
    request = decode_request(b"phone=7&mes=" + encoded, "", MEDIA["form"], "utf-8")
    assert request.params["mes"] == value
    assert request.lossy is False


def test_form_field_without_equals_sign_is_an_empty_value():
    request = decode_request(b"phone=7&waitcall&&", "", MEDIA["form"], "utf-8")
    assert request.params == {"phone": "7", "waitcall": ""}


# ---------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"phone": "7", "mes": "hi", "to": "8"}, "incoming"),
        ({"phone": "7", "mes": ""}, "incoming"),
        ({"phone": "7", "waitcall": "1", "ts": "1700000000"}, "waitcall"),
        ({"phone": "7", "mes": "hi", "waitcall": "1"}, "incoming"),
        ({"id": "1", "phone": "7", "status": "1"}, "status"),
        ({"phone": "7"}, "status"),
        ({}, "status"),
    ],
)
def test_classify(params, kind):
    assert classify(params) == kind


# ---------------------------------------------------------------------------
# the one-pass form decoder reads every form as decoding each pair would
# ---------------------------------------------------------------------------

def split_then_unquote(data):
    """Split a form the plain way, on '&' then '=', and percent-decode each name and value."""
    pairs = []
    for field in data.split(b"&"):
        if field:
            name, _, value = field.partition(b"=")
            pairs.append((unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))))
    return pairs


def decode_each_pair(body, query, content_type, default_charset):
    """Decode a form pair by pair, the query's pairs first (the body wins)."""
    return _decode_form_pairs(split_then_unquote(query) + split_then_unquote(body), content_type, default_charset)


#: what a hash is computed over (SIGNED_FIELDS), and the hashes themselves
SIGNED = ("id", "phone", "status", "mes", "to", "ts", "md5")


def outcome(decode, body, query, content_type, default_charset):
    """Everything a caller can see of a decoded form, or the refusal's reason."""
    try:
        request = decode(body, query, content_type, default_charset)
    except BadRequest as exc:
        return ("refused", exc.reason)
    signed = request.raw_values(SIGNED)
    return (list(request.params.items()), request.raw, {name: signed[name] for name in SIGNED if name in signed},
            request.format, request.charset, request.lossy)


FORM_TOKENS = [
    b"&", b"&", b"=", b"=", b"%", b"%", b"+", b"%2", b"%2B", b"%20", b"%41", b"%zz",
    *(bytes([c]) for c in b"0123456789abcdefABCDEF"),
    b"%26", b"%3D", b"%3d", b"%25", b"%D0%9F", b"%d0", b"%FF", b"%e2%82", b"%98",
    b"\xd0\x9f", b"\xff", b"\xe2\x82", b"\x98",
    b"phone=7", b"mes", b"id", b"x", b"%63harset", b"&mes=", b"&status=",
    b"charset", b"charset=", b"charset=utf-8", b"charset=koi8-r", b"charset=windows-1251", b"charset=bogus",
    b"charset=%75tf-8", b"charset=utf-8%26",
    b"&charset=utf-8&", b"&charset=koi8-r&", b"&charset=windows-1251&", b"&mes=\xd0\x9f\xff&",
]
forms = st.lists(st.sampled_from(FORM_TOKENS), max_size=24).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(
    body=forms,
    query=forms,
    content_type=st.sampled_from(["", MEDIA["form"], MEDIA["form"] + "; charset=koi8-r",
                                  MEDIA["form"] + "; charset=utf-8", MEDIA["form"] + "; charset=bogus"]),
    default_charset=st.sampled_from(list(CHARSETS)),
)
def test_form_decodes_as_if_each_name_and_value_were_decoded_alone(body, query, content_type, default_charset):
    expected = outcome(decode_each_pair, body, query, content_type, default_charset)
    assert outcome(decode_request, body, query, content_type, default_charset) == expected


@settings(max_examples=1000, deadline=None)
@given(data=forms)
def test_parse_form_splits_as_if_each_name_and_value_were_decoded_alone(data):
    assert parse_form(data) == split_then_unquote(data)


@pytest.mark.parametrize("query", [b"", b"id=1&x=%26"], ids=["no-query", "query-with-%26"])
def test_percent_encoded_ampersand_and_equals_stay_inside_the_value(query):
    request = decode_request(b"phone=7&mes=a%26b%3Dc%3dd&to=8", query, MEDIA["form"], "utf-8")
    assert request.params["mes"] == "a&b=c=d"
    assert request.params["to"] == "8"
    assert request.raw["mes"] == b"a&b=c=d"
    assert "b" not in request.params and "c" not in request.params


def test_ascii_form_raw_holds_each_values_bytes():
    body = b"id=12%2B3&phone=%2B7999&status=1&mes=a+b&waitcall"
    signed = decode_request(body, "", MEDIA["form"], "utf-8").raw_values(["id", "phone", "status"])
    assert (signed["id"], signed["phone"], signed["status"]) == (b"12+3", b"+7999", b"1")
    request = decode_request(body, "", MEDIA["form"], "utf-8")
    assert request.raw == {"id": b"12+3", "phone": b"+7999", "status": b"1", "mes": b"a b", "waitcall": b""}


def test_query_and_body_merge_with_the_body_winning_and_the_query_charset_honoured():
    body = b"id=2&mes=" + quote_plus(MES.encode("koi8_r")).encode("ascii")
    request = decode_request(body, b"id=1&phone=7&charset=koi8-r", MEDIA["form"], "windows-1251")
    assert request.params == {"id": "2", "phone": "7", "charset": "koi8-r", "mes": MES}
    assert request.charset == "koi8-r"
    assert request.raw["mes"] == MES.encode("koi8_r")
