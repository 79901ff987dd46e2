"""form_body.FormOverrides: the method overrides in a POST's form body, as servers
read them, whatever the chunks the body comes in."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.proxy.policy.form_body import FormOverrides
from sandgate.proxy.policy.request_head import FormBody

FORM = "application/x-www-form-urlencoded"
MULTIPART = 'multipart/form-data; boundary="----b0und"'


def named(
    content_type: str, body: bytes, chunk: int = 0, encoding: str = ""
) -> tuple[list[str], str | None]:
    """The methods the body's overrides name, and its problem: fed whole, or `chunk`
    bytes at a time."""
    form = FormOverrides(FormBody(content_type, encoding), "POST")
    pieces = [body] if not chunk else [body[i : i + chunk] for i in range(0, len(body), chunk)]
    for piece in pieces:
        form.feed(piece)
    form.end()
    return [value for _, _, value in form.found], form.problem


def part(name: bytes, value: bytes, boundary: bytes = b"----b0und", extra: bytes = b"") -> bytes:
    return (
        b"--" + boundary + b"\r\nContent-Disposition: form-data; name=" + name + extra
        + b"\r\n\r\n" + value + b"\r\n"
    )  # fmt: skip


URLENCODED = [
    (b"a=1&_method=DELETE", ["DELETE"]),
    (b"_method=delete&a=1", ["DELETE"]),
    (b"_method=POST", []),
    (b"%5Fmethod=DELETE", ["DELETE"]),
    (b"_%6D%65thod=PUT", ["PUT"]),
    (b"+++_method=DELETE", ["DELETE"]),  # PHP drops leading spaces
    (b".method=DELETE", ["DELETE"]),  # PHP reads '.' as '_'
    (b"_method[]=DELETE", ["DELETE"]),
    (b"[_method]=DELETE", ["DELETE"]),  # Node's qs, Rack
    (b"_method%00x=DELETE", ["DELETE"]),
    (b"x-tunneled-method=PATCH", ["PATCH"]),
    (b"_HttpMethod=DELETE", ["DELETE"]),
    (b"method=artist.getInfo&api_key=1", []),  # `method` only where it is a method
    (b"method=DELETE", ["DELETE"]),
    (b"_method", []),  # no value
    (b"_method=+DELETE+", ["DELETE"]),
    (b"a=1;_method=DELETE", ["DELETE"]),
    (b"my_method=DELETE&methods=DELETE", []),
    (b"x=" + b"a" * 100_000 + b"&_method=DELETE", ["DELETE"]),
    (b"+" * 10_000 + b"_method=DELETE", ["DELETE"]),
    (b"%20" * 5_000 + b"[[_method]=DELETE", ["DELETE"]),
    (b"_method" + b"x" * 10_000 + b"=DELETE", []),  # another name
    (b"_method[" + b"x" * 10_000 + b"]=DELETE", ["DELETE"]),
    (b"_method=DELETE" + b"+" * 10_000, ["DELETE"]),
    (b"_method=" + b"X" * 10_000, ["X" * 40]),  # not a method: the gate refuses it
]


@pytest.mark.parametrize(("body", "expected"), URLENCODED)
@pytest.mark.parametrize("chunk", [0, 1, 7, 4096])
def test_an_urlencoded_body_names_its_overrides_in_any_chunks(body, expected, chunk):
    assert named(FORM, body, chunk) == (expected, None)


def test_a_body_without_a_content_type_is_read_as_urlencoded():
    assert named("", b"_method=DELETE") == (["DELETE"], None)


MULTIPARTS = [
    (part(b'"_method"', b"DELETE") + b"------b0und--\r\n", ["DELETE"]),
    (part(b"_method", b"PUT"), ["PUT"]),
    (part(b'"a"', b"1") + part(b'"_method"', b"delete"), ["DELETE"]),
    (part(b'"x"; filename="_method"', b"DELETE"), []),  # a file's name, not the field's
    (part(b'"_method"', b"POST"), []),
    (part(b'"\\_method"', b"DELETE"), ["DELETE"]),  # a quoted-string's escape
    (part(b'"a"', b"x" * 100_000) + part(b'"_method"', b"DELETE"), ["DELETE"]),
    (part(b'"_method"', b"DELETE"), ["DELETE"]),  # no closing delimiter
]


@pytest.mark.parametrize(("body", "expected"), MULTIPARTS)
@pytest.mark.parametrize("chunk", [0, 1, 5, 4096])
def test_a_multipart_body_names_its_overrides_in_any_chunks(body, expected, chunk):
    assert named(MULTIPART, body, chunk) == (expected, None)


def test_a_multipart_name_in_rfc_5987_form_is_read():
    body = b"--b\r\nContent-Disposition: form-data; name*=UTF-8''_method\r\n\r\nDELETE\r\n--b--"
    assert named("multipart/form-data; boundary=b", body) == (["DELETE"], None)


def test_a_part_header_section_past_its_bound_is_a_problem():
    body = b"--b\r\nX: " + b"y" * 10_000 + b"\r\n\r\nDELETE\r\n--b--"
    _, problem = named("multipart/form-data; boundary=b", body, 1000)
    assert problem is not None and "header section" in problem


def test_a_long_epilogue_is_no_problem():
    body = part(b'"a"', b"1") + b"------b0und--\r\n" + b"e" * 20_000
    assert named(MULTIPART, body, 1000) == ([], None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a=1", b"_method=DELETE", b"+_me%74hod=PUT", b"x=" + b"y" * 300, b""]),
        max_size=6,
    ),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20),
)
def test_chunks_do_not_change_what_is_read(fields, cuts):
    body = b"&".join(fields)
    whole = named(FORM, body)
    form = FormOverrides(FormBody(FORM, ""), "POST")
    at = 0
    for cut in cuts:
        form.feed(body[at : at + cut])
        at += cut
    form.feed(body[at:])
    form.end()
    assert ([v for _, _, v in form.found], form.problem) == whole


NAME_PIECES = st.sampled_from(
    ["_", ".", "+", "%20", "%5F", "%5f", "m", "M", "%6D", "e", "thod", "ETHOD", "%74", "[", "]",
     "%5B", "%00", "x-tunneled-", "x-http-", "-override", "http", "Http", "me", "a"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(NAME_PIECES, min_size=1, max_size=6).map("".join))
def test_a_field_is_read_as_an_override_exactly_where_the_query_would_be(name):
    """The body's fast path (a regex over the fields that ended in a chunk) and its
    slow path (the field a chunk ends in) read a name as request_head reads a query's."""
    from sandgate.proxy.policy.request_head import method_override

    expected = ["DELETE"] if method_override(name, "DELETE", "POST") else []
    middle = b"a=1&" + name.encode() + b"=DELETE&b=2"
    last = b"a=1&" + name.encode() + b"=DELETE"
    assert named(FORM, middle) == (expected, None), middle
    assert named(FORM, last) == (expected, None), last
    assert named(FORM, middle, 3) == (expected, None), middle


def test_thousands_of_override_named_fields_are_refused_not_parsed():
    body = b"&".join([b"method=artist.getInfo"] * 20_000)
    found, problem = named(FORM, body)
    assert found == [] and problem is not None and "hold" in problem


def test_tens_of_thousands_of_parts_are_refused():
    _, problem = named("multipart/form-data; boundary=b", b"--b\r\n\r\n\r\n" * 20_000)
    assert problem is not None and "parts" in problem


@pytest.mark.parametrize("charset", ["utf-16", "UTF-16BE", "utf-32", "cp037", "utf-7"])
def test_a_form_in_a_charset_that_is_no_ascii_superset_is_read_decoded(charset):
    body = "a=1&_method=DELETE&b=2".encode(charset)
    if charset == "utf-7":
        body = b"a=1&+AF8-method=DELETE&b=2"  # `_` spelled in UTF-7's base64
    found, problem = named(f"{FORM}; charset={charset}", body, 3)
    assert set(found) == {"DELETE"} and problem is None


def test_a_form_split_at_ascii_bytes_and_decoded_by_token_is_read():
    """Jetty splits a form in another charset at the ASCII `&` and `=` bytes, then
    decodes each name and value (`_method` in EBCDIC, then an ASCII `=`)."""
    body = "_method".encode("cp037") + b"=" + "DELETE".encode("cp037")
    found, problem = named(f"{FORM}; charset=IBM037", body)
    assert set(found) == {"DELETE"} and problem is None


@pytest.mark.parametrize(
    "decoy", ["xcharset=utf-8; charset=UTF-16", 'a="charset=utf-8"; charset=UTF-16']
)
def test_a_charset_named_after_a_decoy_is_read(decoy):
    body = "_method=DELETE".encode("utf-16-be")
    found, problem = named(f"{FORM}; {decoy}", body)
    assert set(found) == {"DELETE"} and problem is None


def test_utf_16_without_a_byte_order_mark_is_read_big_endian_as_java_reads_it():
    body = "_method=DELETE".encode("utf-16-be")
    assert named(f"{FORM}; charset=UTF-16", body, 5) == (["DELETE"], None)


def test_a_form_in_a_charset_the_gateway_cannot_read_is_refused():
    _, problem = named(f"{FORM}; charset=x-no-such", b"a=1")
    assert problem is not None and "charset" in problem


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP, identity"])
def test_a_compressed_form_is_refused(encoding):
    _, problem = named(FORM, b"\x1f\x8b...", encoding=encoding)
    assert problem is not None and "Content-Encoding" in problem


def test_an_identity_encoded_form_is_read():
    assert named(FORM, b"_method=DELETE", encoding="identity") == (["DELETE"], None)


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/form-data; boundary="a;b"',  # Rack cuts it at `;`
        'multipart/form-data; boundary="a,b"',
        'multipart/form-data; boundary="a\\"b"',  # WHATWG unescapes it
        'multipart/form-data; boundary="a\\b"',
        'multipart/form-data; boundary="a b"',
        "multipart/form-data; boundary=a; boundary=b",  # Rack refuses, WHATWG takes the first
    ],
)
def test_a_boundary_servers_read_otherwise_than_each_other_is_refused(content_type):
    _, problem = named(content_type, b"--a\r\n\r\nx\r\n--a--")
    assert problem is not None and "boundar" in problem


def test_a_part_named_by_its_content_id_is_read():
    body = b"--XyZ\r\nContent-ID: _method\r\n\r\nDELETE\r\n--XyZ--\r\n"
    assert named("multipart/form-data; boundary=XyZ", body) == (["DELETE"], None)


@pytest.mark.parametrize(
    "body",
    [
        b'--XyZ\r\nX-A: b\n\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XyZ--',
        b"--XyZ\nContent-Disposition: form-data; name=_method\n\nDELETE\n--XyZ--",
    ],
    ids=["bare-lf-before-crlf", "lf-only"],
)
@pytest.mark.parametrize("chunk", [0, 7])
def test_a_header_section_not_ended_by_crlf_crlf_is_refused(body, chunk):
    """Rack and undici end a part's header section at the first CRLF CRLF only, PHP
    at a bare LF's blank line too: the names they read differ."""
    _, problem = named("multipart/form-data; boundary=XyZ", body, chunk)
    assert problem is not None and "CRLF CRLF" in problem


def test_a_browser_boundary_holding_the_word_is_read():
    body = b'------WebKitFormBoundaryAbC\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n------WebKitFormBoundaryAbC--'
    content_type = "multipart/form-data; boundary=----WebKitFormBoundaryAbC"
    assert named(content_type, body) == (["DELETE"], None)


def test_parts_after_a_closing_delimiter_and_padding_are_read():
    body = (
        b"--XyZ\r\n\r\nx\r\n--XyZ--" + b"p" * 9000
        + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XyZ--'
    )  # fmt: skip
    assert named("multipart/form-data; boundary=XyZ", body) == (["DELETE"], None)


@pytest.mark.parametrize(
    "head", [b"X-Content-ID: _method", b'Content-Disposition: form-data; name="_m\\ethod"']
)
def test_a_part_named_as_rack_reads_it_is_read(head):
    body = b"--XyZ\r\n" + head + b"\r\n\r\nDELETE\r\n--XyZ--"
    assert named("multipart/form-data; boundary=XyZ", body) == (["DELETE"], None)


@pytest.mark.parametrize("charset", ["windows-1251", "shift_jis", "gbk", "euc-kr"])
def test_a_long_form_in_an_ascii_superset_charset_is_read_as_it_comes(charset):
    body = b"x=" + b"a" * 100_000 + b"&_method=DELETE"
    assert named(f"{FORM}; charset={charset}", body, 4096) == (["DELETE"], None)


# A JSON body: Laravel and Lumen read its top-level members as the form's (`_method`),
# Koa's koa-methodoverride `request.body._method` (an array's first too).
JSON = "application/json"
ANY = "any"  # the body may name any method: an override of each is found
PAD = b'"pad": "' + b"x" * 70_000 + b'", '  # past _MOST_JSON (64 KiB): not parsed
JSON_BODIES = [
    (b'{"_method": "DELETE"}', ["DELETE"]),
    (b'{"a": 1, "_method": "delete"}', ["DELETE"]),
    (b'{"\\u005fmethod": "DELETE"}', ["DELETE"]),
    (b'{"_\\u006Dethod": "\\u0044ELETE"}', ["DELETE"]),
    (b'{"_METHOD": "PUT"}', ["PUT"]),  # Slim's name
    (b'{"_\\u004d\\u0045THOD": "PUT"}', ["PUT"]),  # and escaped in upper case
    (b"{" + PAD + b'"_\\u004D\\u0045THOD": "PUT"}', ANY),
    (b'{"_method": ["DELETE", "GET"]}', ["DELETE"]),  # Koa takes the first
    (b'{"_method": "GET", "_method": "DELETE"}', ["GET", "DELETE"]),  # the last wins in PHP
    (b'{"x-http-method-override": "PATCH"}', ["PATCH"]),
    (b'{"_method": "POST"}', []),
    (b'{"_method": 1}', []),
    (b'{"data": {"_method": "DELETE"}}', []),  # read at the top only, as servers do
    (b'[{"_method": "DELETE"}]', []),
    (b'{"method": "eth_call", "params": []}', []),  # `method` only where it is a method
    (b'{"method": "DELETE"}', ["DELETE"]),
    (b'{"paymentMethod": "card"}', []),
    (b'{"name": "x"}', []),
    (b"{" + PAD + b'"_method": "DELETE"}', ANY),
    (b"{" + PAD + b'"_method"' + b" " * 5_000 + b': "DELETE"}', ANY),
    (b"{" + PAD + b'"\\u005Fmethod": "DELETE"}', ANY),
    (b"{" + PAD + b'"note": "a method of ours"}', []),  # no member named as an override
    # the longest name, each character escaped: searched around its `method`
    (
        b"{"
        + PAD
        + "".join(f"\\u{ord(c):04x}" for c in '"x-http-method-override"')
        .encode()
        .replace(b"\\u0022", b'"')
        + b': "DELETE"}',
        ANY,
    ),  # fmt: skip
    (b"{" + PAD + b'"items": "' + b"method " * 2_000 + b'"}', ANY),  # past 1,000 `method`s
    (b'{"items": "' + b"method " * 5_000 + b'"}', []),  # parsed whole: no such member
    (b'{"_method": "DELETE",}', ANY),  # lenient parsers take a trailing comma
    (b"{_method: 'DELETE'}", ANY),  # JSON5
    (b'{"note": "method", ', []),  # unparsed, but no member named as an override
]


@pytest.mark.parametrize(("body", "expected"), JSON_BODIES)
@pytest.mark.parametrize("chunk", [0, 1, 4096])
def test_a_json_body_names_its_top_level_overrides_in_any_chunks(body, expected, chunk):
    if chunk == 1 and len(body) > 10_000:
        chunk = 997  # bytewise, a long body takes seconds
    methods, problem = named(JSON, body, chunk)
    assert problem is None
    if expected == ANY:
        assert "DELETE" in methods and "POST" not in methods and len(methods) > 10, methods
    else:
        assert methods == expected


@pytest.mark.parametrize(
    "content_type", ["application/vnd.api+json", "text/plain; x=/json", "Application/JSON"]
)
def test_any_content_type_that_names_json_is_read_as_json(content_type):
    """Laravel's isJson: `/json` or `+json` anywhere in the Content-Type."""
    assert named(content_type, b'{"_method": "DELETE"}') == (["DELETE"], None)


DELETE_JSON = b'{"a": 1, "_method": "DELETE"}'
COMPRESSED_JSON = [
    ("gzip", gzip.compress(DELETE_JSON), ["DELETE"]),
    ("x-gzip", gzip.compress(DELETE_JSON), ["DELETE"]),
    ("deflate", zlib.compress(DELETE_JSON), ["DELETE"]),
    ("gzip", gzip.compress(b'{"resourceLogs": []}'), []),  # an honest OTLP export
    ("gzip", gzip.compress(b'{"method": "eth_call"}'), []),
    ("gzip", gzip.compress(b"{" + PAD + b'"_method": "DELETE"}'), ANY),
    ("gzip", gzip.compress(b'{"a": "' + b"x" * (5 << 20) + b'"}'), ANY),  # past 4 MiB
    ("gzip", gzip.compress(DELETE_JSON)[:-8], ANY),  # cut short
    ("gzip", gzip.compress(b'{"a": 1}') + gzip.compress(DELETE_JSON), ANY),  # two members
    ("gzip", b"\x1f\x8b not gzip", ANY),
    ("br", b"not read", ANY),
    ("gzip, gzip", gzip.compress(gzip.compress(DELETE_JSON)), ANY),
]


@pytest.mark.parametrize(("encoding", "body", "expected"), COMPRESSED_JSON)
@pytest.mark.parametrize("chunk", [0, 3, 4096])
def test_a_compressed_json_body_is_inflated_and_read(encoding, body, expected, chunk):
    """body-parser and Koa's parsers inflate a body before they parse it: gzip and
    deflate are inflated (at most 4 MiB) and read; past that, cut short or in another
    coding, the body may name any method (refused only where the rules refuse one)."""
    methods, problem = named(JSON, body, chunk, encoding=encoding)
    assert problem is None
    if expected == ANY:
        assert "DELETE" in methods and "POST" not in methods and len(methods) > 10, methods
    else:
        assert methods == expected


def test_a_json_body_in_utf_16_is_read():
    body = '{"_method": "DELETE"}'.encode("utf-16")
    assert named(JSON + "; charset=utf-16", body) == (["DELETE"], None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"_method": "DELETE"}', ["DELETE"]),
        (b'\xef\xbb\xbf \n{"_method": "DELETE"}', ["DELETE"]),  # Node strips the mark
        (b"_method: DELETE\nname: x\n", []),  # YAML: no parser takes it as an object
        (b"def f(_method: str): ...\n" + b"#" * 70_000 + b"\n_method: DELETE\n", []),
        (b"{" + PAD + b'"_method": "DELETE"}', ANY),
    ],
)
def test_a_text_plain_body_names_an_override_only_where_it_opens_as_an_object(body, expected):
    """Express apps behind AWS SNS parse text/plain as JSON: a body that does not open
    with `{` is no object to any parser (a red team, session 54: YAML and Python
    uploads holding `_method:` were refused)."""
    methods, problem = named("text/plain; charset=UTF-8", body, 4096)
    assert problem is None
    assert methods == expected if expected != ANY else len(methods) > 10


@pytest.mark.parametrize("charset", ["utf-16", "utf-32"])
def test_a_byte_order_mark_less_body_invalid_in_either_order_is_refused(charset):
    """iconv-lite decodes a bad unit leniently where Python's codec refuses it: a
    lone surrogate in UTF-16-LE (valid big-endian garbage), U+110000 in UTF-32."""
    bad = (
        "\ud800".encode(f"{charset}-le", "surrogatepass")
        if charset == "utf-16"
        else ((0x110000).to_bytes(4, "little"))
    )
    body = (
        '{"_method": "DELETE", "x": "'.encode(f"{charset}-le") + bad + '"}'.encode(f"{charset}-le")
    )
    _, problem = named(f"{JSON}; charset={charset}", body)
    assert problem is not None and "not valid in its charset" in problem


def _suspect_after(content_type: str, chunks: list[bytes], encoding: str = "") -> list[bool]:
    form = FormOverrides(FormBody(content_type, encoding), "POST")
    seen = []
    for chunk in chunks:
        form.feed(chunk)
        seen.append(form.suspect)
    return seen


def test_a_body_is_suspect_from_the_chunk_where_method_occurs_in_any_spelling():
    """Until `method` occurs, the adapters send a body that is not kept on as it
    comes (a full-duplex stream is answered); from then on its last byte waits."""
    assert _suspect_after(JSON, [b'{"a": 1}\n'] * 3) == [False, False, False]
    assert _suspect_after(FORM, [b"x=1&_met", b"hod=DELETE", b"&y=2"]) == [False, True, True]
    assert _suspect_after(JSON, [b'{"_\\u006', b'Dethod": 1}']) == [False, True]
    assert _suspect_after(JSON + "; charset=utf-16", [b"\x00{"]) == [True]  # read decoded
    assert _suspect_after(JSON, [b"\x1f\x8b"], encoding="gzip") == [True]  # inflated
    assert _suspect_after(MULTIPART, [b"------b0und\r\n"]) == [True]  # `"_m\ethod"`
