"""The plain-HTTP fast path (proxy/frontdoor/http1_fast.py) against h11, which it
stands in for: the security property is that whatever the fast path takes, h11 takes
and reads, frames and writes the same; everything else is h11's, as before.

Four layers, each differential: the head readers against h11's reader (a corpus
with the smuggling shapes of the e2e tests, then generated heads); the writers
against h11's writer; chunked bodies (size-line edge cases, trailers, bare LF, a
missing CRLF, generated bodies) read in pieces against h11's reading and writing;
whole sessions (`Http1Session` with and without the fast
path, the real gate) fed the same bytes in the same pieces, compared after every
step: bytes out, flags, and the gate's events."""

from __future__ import annotations

import random

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.proxy.frontdoor import http1_fast
from sandgate.proxy.frontdoor.http1 import Http1Session
from support.fakes import make_gate
from test_frontdoor import LOOPBACK

H = b"Host: allowed.test\r\n"

# Request heads (without the blank line): the e2e tests' smuggling and spoofing
# shapes (test_http_hardening.py, test_plain_http_path.py) and their neighbours.
REQUEST_HEADS = [
    b"GET / HTTP/1.1\r\n" + H[:-2],
    b"GET /a?b=1 HTTP/1.1\r\nHost: allowed.test\r\nUser-Agent: x\r\nAccept: */*",
    b"GET http://allowed.test/x HTTP/1.1\r\n" + H[:-2],
    b"GET http://evil.test/ HTTP/1.1\r\n" + H[:-2],  # absolute-form naming another host
    b"GET / HTTP/1.1\r\n" + H + b"Host: evil.test",  # two Hosts
    b"GET / HTTP/1.1",  # no Host
    b"GET / HTTP/1.1\r\nHost: allowed.test:8080",
    b"GET / HTTP/1.1\r\nHost: 0xcb.0.113.10",
    b"GET / HTTP/1.1\r\nHost : allowed.test",  # a blank before the colon
    b"GET / HTTP/1.1\r\nHost:\tallowed.test\t",
    b"GET / HTTP/1.1\r\nHost:allowed.test",
    b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b",  # NUL
    b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b",
    b"GET / HTTP/1.1\r\n" + H + b"X: a\rb",  # bare CR
    b"GET / HTTP/1.1\r\n" + H + b"X: a\nGET /smuggled HTTP/1.1",  # bare LF
    b"GET / HTTP/1.1\n" + H[:-2],
    b"GET /b HTTP/1.1\r\n" + H + b"X: a\r\n GET /smuggled HTTP/1.1",  # obs-fold
    b"GET /b HTTP/1.1\r\n" + H + b"X: a\r\n\tPOST /private",
    b"G\x00ET /c HTTP/1.1\r\n" + H[:-2],
    b"GET(x) /d HTTP/1.1\r\n" + H[:-2],
    b"get / HTTP/1.1\r\nHost: evil.test",
    b"GET\t\t/ HTTP/1.1\r\nHost: evil.test",
    b"GET  / HTTP/1.1\r\n" + H[:-2],
    b"GET / HTTP/1.1 \r\n" + H[:-2],
    b"GET / HTTP/1.0\r\n" + H[:-2],
    b"GET / HTTP/2.0\r\n" + H[:-2],
    b"GET / http/1.1\r\n" + H[:-2],
    b" GET / HTTP/1.1\r\n" + H[:-2],
    b"\r\nGET / HTTP/1.1\r\n" + H[:-2],
    b"CONNECT allowed.test:80 HTTP/1.1\r\n" + H[:-2],
    b"GET / HTTP/1.1\r\n" + H + b"no colon here",
    b"GET / HTTP/1.1\r\n" + H + b": empty name",
    b"POST /len HTTP/1.1\r\n" + H + b"Content-Length: abc",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 000",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 0",  # two CL
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 5",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0, 0",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +0",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nTransfer-Encoding: chunked",  # CL+TE
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"GET / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings",
    b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: Upgrade",
    b"GET / HTTP/1.1\r\n" + H + b"Expect: 100-continue",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: close",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, close , X-Trace\r\nX-Trace: 1",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: ,,",
    b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\nX-Blank:   ",
    b"GET / HTTP/1.1\r\n" + H + b"X-Obs: caf\xc3\xa9 \xff",
    b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 70_000,
    b"GET /%2e%2e/x HTTP/1.1\r\n" + H[:-2],
    b"GET * HTTP/1.1\r\n" + H[:-2],
    b"GET /\x7f HTTP/1.1\r\n" + H[:-2],
    b"GET /\xff HTTP/1.1\r\n" + H[:-2],
    b"HEAD / HTTP/1.1\r\nhOsT: allowed.test",
]

RESPONSE_HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 30\r\n"
    b"Connection: keep-alive",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive, X-A\r\nConnection: Close",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\nX-A: 1",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked",  # CL+TE
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3",
    b"HTTP/1.1 200 OK",  # close-delimited
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified\r\nETag: x",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2",
    b"HTTP/1.1 200\r\nContent-Length: 2",
    b"HTTP/1.1 200 \r\nContent-Length: 2",
    b"HTTP/1.1 200  odd\treason\r\nContent-Length: 2",
    b"HTTP/1.1 099 Low\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nHost: evil.test\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nX : y\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-F: 1\r\n" * 120,
    # fast, but not written as they came: h11 writes `name: value`, Host first
    b"HTTP/1.1 200 OK\r\nContent-Length:2",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX:  two blanks",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: trailing \t",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX:\tTab",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \r\nY:",
    b"HTTP/1.1 200 OK\r\nX: y\r\nHost: a\r\nContent-Length: 2",
]


# --- h11, the reference --------------------------------------------------------------


def h11_read_request(buffer: bytes):
    """What h11 reads from `buffer` (a server's first bytes): (Request, the event after
    it, what is left), or "refused", or None (it waits for more)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(buffer)
    try:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return None
        after = conn.next_event()
    except h11.RemoteProtocolError:
        return "refused"
    return event, after, conn.trailing_data[0], conn.their_state


def h11_read_response(method: bytes, head: bytes, body: bytes):
    """What h11 (client side, a `method` request sent) reads from the response: the
    event, its body as h11 frames it, and whether the server then must close."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + b"\r\n\r\n" + body)
    try:
        event = conn.next_event()
        read = b""
        while True:
            part = conn.next_event()
            if isinstance(part, h11.Data):
                read += part.data
            else:
                break
    except h11.RemoteProtocolError:
        return "refused"
    return event, read, part, conn.their_state


def h11_response_head(method: bytes, event, client_closes: bool) -> bytes:
    """The head h11 (server side) writes for the parsed `event` after a `method`
    request that said close or not."""
    conn = h11.Connection(h11.SERVER)
    close = b"Connection: close\r\n" if client_closes else b""
    conn.receive_data(method + b" / HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")
    conn.next_event()
    conn.next_event()
    return conn.send(event)


# --- the readers and writers ---------------------------------------------------------------


def check_request(head: bytes, rest: bytes = b"") -> http1_fast.SimpleRequest | None:
    """The property for one request head: fast is None, or exactly h11's reading of a
    bodiless request, ending where h11 ends it."""
    buffer = head + b"\r\n\r\n" + rest
    end = http1_fast.head_end(buffer)
    fast = http1_fast.scan_request(buffer[: end - 4]) if end > 0 else None
    if fast is None:
        return None
    reference = h11_read_request(buffer)
    assert reference not in (None, "refused"), f"fast took what h11 refuses: {head!r}"
    event, after, left, state = reference
    assert isinstance(event, h11.Request) and isinstance(after, h11.EndOfMessage)
    assert state in (h11.DONE, h11.MUST_CLOSE)  # no protocol switch pending
    assert (fast.method, fast.target, b"1.1") == (event.method, event.target, event.http_version)
    assert fast.fields == tuple(event.headers.raw_items())
    assert left == rest and buffer[end:] == rest
    tokens = h11._headers.get_comma_header(event.headers, b"connection")
    assert (b"close" in (fast.connection or ())) == (b"close" in tokens)
    assert fast.connection is None or fast.connection == tokens
    written = h11.Connection(h11.CLIENT).send(
        h11.Request(method=fast.method, target=b"/x", headers=list(fast.fields), _parsed=True)
    )
    assert http1_fast.write_request(fast.method, b"/x", fast.fields) == written
    return fast


def check_response(head: bytes, method: bytes = b"GET") -> http1_fast.SimpleResponse | None:
    """The property for one response head: fast is None, or h11 reads the same
    response and frames the same body, and writes the same head to the client."""
    fast = http1_fast.scan_response(head, method)
    if fast is None:
        return None
    body = b"b" * fast.length
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (2, b"bb") if fast.chunked else body
    if fast.chunked:
        body = b"bb"
    reference = h11_read_response(method, head, framed + b"EXTRA")
    assert reference != "refused", f"fast took what h11 refuses: {head!r}"
    event, read, end, state = reference
    assert isinstance(event, h11.Response) and event.http_version == b"1.1"
    assert (fast.status, fast.reason) == (event.status_code, event.reason)
    assert fast.fields == tuple(event.headers.raw_items())
    assert read == body and isinstance(end, h11.EndOfMessage)
    assert fast.close == (state is h11.MUST_CLOSE)
    for closes in (False, True):
        assert http1_fast.write_response(fast, closes) == h11_response_head(method, event, closes)
    return fast


@pytest.mark.parametrize("head", REQUEST_HEADS)
def test_request_heads_are_fast_only_as_h11_reads_them(head):
    check_request(head)
    check_request(head, rest=b"GET /next HTTP/1.1\r\n")


def test_the_common_request_shapes_are_fast():
    fast = [head for head in REQUEST_HEADS if check_request(head) is not None]
    assert b"GET / HTTP/1.1\r\n" + H[:-2] in fast
    assert b"GET http://evil.test/ HTTP/1.1\r\n" + H[:-2] in fast  # the gate refuses it
    assert not [h for h in fast if b"Transfer-Encoding" in h or b"Content-Length: 5" in h]
    assert not [h for h in fast if b"Upgrade" in h or b"\r\n " in h or b"\r\n\t" in h]


@pytest.mark.parametrize("head", RESPONSE_HEADS)
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST"])
def test_response_heads_are_fast_only_as_h11_reads_and_writes_them(head, method):
    check_response(head, method)


def test_the_common_response_shapes_are_fast_and_the_rest_not():
    assert check_response(RESPONSE_HEADS[1]) is not None
    assert check_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").chunked
    assert check_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked") is None
    assert check_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", b"HEAD") is None
    assert check_response(b"HTTP/1.1 200 OK") is None  # close-delimited: h11's
    assert check_response(b"HTTP/1.1 200 OK", b"HEAD") is None  # h11 adds chunked
    assert check_response(b"HTTP/1.1 204 No Content").length == 0


@pytest.mark.parametrize("head", RESPONSE_HEADS)
def test_a_response_head_goes_on_as_it_came_only_where_h11_writes_the_same(head):
    """The fast path skips writing a head that h11 would write byte for byte (to a
    client keeping its connection); check_response holds the bytes to h11's."""
    fast = check_response(head)
    if fast is None:
        return
    if fast.written is not None:
        assert fast.written == head + b"\r\n\r\n"
    elif not (fast.chunked or b"\nHost:" in head):  # (moved, so written again)
        assert http1_fast.write_response(fast, False) != head + b"\r\n\r\n"


def test_the_common_response_head_goes_on_as_it_came():
    assert check_response(RESPONSE_HEADS[1]).written == RESPONSE_HEADS[1] + b"\r\n\r\n"
    assert check_response(b"HTTP/1.1 200 OK\r\nContent-Length:2").written is None


@pytest.mark.parametrize(
    ("buffer", "end"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n" + H, 0, id="unfinished"),
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"\r\nrest", 38, id="crlf"),
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"\n", -1, id="bare-lf-end"),
        pytest.param(b"GET / HTTP/1.1\n\r\n" + H + b"\r\n", -1, id="lf-crlf"),
    ],
)
def test_a_head_ends_where_h11_ends_it_or_is_not_fast(buffer, end):
    assert http1_fast.head_end(buffer) == end
    for start in range(len(buffer)):  # looked at in pieces: the same answer
        if http1_fast.head_end(buffer[:start]) == 0:
            assert http1_fast.head_end(buffer, start) == end


# Pieces the generated heads are made of: valid ones and each way of breaking them.
METHODS = [
    b"GET",
    b"HEAD",
    b"POST",
    b"DELETE",
    b"OPTIONS",
    b"CONNECT",
    b"get",
    b"G T",
    b"GET\t",
    b"",
]
TARGETS = [
    b"/",
    b"/a?b=1",
    b"http://allowed.test/x",
    b"http://evil.test/",
    b"*",
    b"/a b",
    b"/\x7f",
    b"",
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.10"]
NAMES = [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
         b"Expect", b"X-A", b"X A", b"", b"X:A", b"Host ", b"\tHost", b"X\x00"]  # fmt: skip
VALUES = [b"allowed.test", b"evil.test", b"0", b"5", b"00", b"0, 0", b"+0", b"-0", b"chunked",
          b"Chunked", b"chunked, identity", b"close", b"keep-alive, close", b"Upgrade", b"h2c",
          b"100-continue", b"", b"  padded  ", b"a\tb", b"a\x00b", b"a\x01b", b"a\rb", b"a\nb",
          b"\xff\xfe", b"a\r\n b"]  # fmt: skip
EOLS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]


@st.composite
def request_heads(draw) -> bytes:
    line = b"%s %s %s" % (
        draw(st.sampled_from(METHODS)),
        draw(st.sampled_from(TARGETS)),
        draw(st.sampled_from(VERSIONS)),
    )
    fields = draw(
        st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from([b":", b": ", b" : ", b":\t"]),
                      st.sampled_from(VALUES), st.sampled_from(EOLS)),
            max_size=6,
        )
    )  # fmt: skip
    head = line
    for name, colon, value, eol in fields:
        head += eol + name + colon + value
    return head


@settings(max_examples=600, deadline=None)
@given(request_heads(), st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"\r\n"]))
def test_generated_request_heads_are_fast_only_as_h11_reads_them(head, rest):
    check_request(head, rest)


STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 NM", b"HTTP/1.1 101 S",
                b"HTTP/1.1 100 C", b"HTTP/1.0 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 404 ", b"HTTP/1.1 2000 X",
                b"HTTP/1.1 500 a\tb", b"HTTP/1.1 200 \xff", b" HTTP/1.1 200 OK"]  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(STATUS_LINES),
    st.lists(
        st.tuples(st.sampled_from(NAMES), st.sampled_from([b":", b": ", b" : "]),
                  st.sampled_from(VALUES + [b"2", b"17"]), st.sampled_from(EOLS)),
        max_size=5,
    ),
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
)  # fmt: skip
def test_generated_response_heads_are_fast_only_as_h11_reads_and_writes_them(line, fields, method):
    head = line
    for name, colon, value, eol in fields:
        head += eol + name + colon + value
    check_response(head, method)


# --- chunked bodies ------------------------------------------------------------------------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_BODIES = [
    b"2\r\nok\r\n0\r\n\r\n",
    b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",  # hex case
    b"0002\r\nok\r\n0000\r\n\r\n",  # leading zeros
    b"00000000000000000002\r\nok\r\n0\r\n\r\n",  # 20 digits: h11's most
    b"000000000000000000002\r\nok\r\n0\r\n\r\n",  # 21: overlong, refused
    b"FFFFFFFFFFFFFFFFFFFF\r\nabc",  # a huge size, then cut
    b"2;name=value\r\nok\r\n0;last\r\n\r\n",  # extensions (dropped, as h11 drops them)
    b'2;a="b;c"\r\nok\r\n0\r\n\r\n',
    b"2 \t\r\nok\r\n0 \r\n\r\n",  # blanks before the CRLF
    b"2 ;x\r\nok\r\n0\r\n\r\n",  # a blank before the extension
    b"2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n",  # trailers
    b"2\r\nok\r\n0\r\nX-Trailer: 1\r\n folded\r\n\r\n",
    b"2\r\nok\r\n0\r\nbad trailer\r\n\r\n",
    b"2\r\nok\r\n0\r\n\n",  # bare LF ends the trailers
    b"2\nok\r\n0\r\n\r\n",  # bare LF after the size
    b"2\r\nok\n0\r\n\r\n",  # bare LF after the data
    b"2\r\nokXX0\r\n\r\n",  # no CRLF after the data: h11 0.14 drops any two bytes
    b"2\r\nok0\r\n\r\n",
    b"2\r\nokabc\r\n0\r\n\r\n",  # more data than the size said
    b"-1\r\nx\r\n0\r\n\r\n",
    b"+2\r\nok\r\n0\r\n\r\n",
    b"0x2\r\nok\r\n0\r\n\r\n",
    b"\r\n2\r\nok\r\n0\r\n\r\n",  # an empty size line
    b" 2\r\nok\r\n0\r\n\r\n",
    b"2\r\r\nok\r\n0\r\n\r\n",
    b"2;" + b"x" * 2000 + b"\r\nok\r\n0\r\n\r\n",  # a size line past MAX_CHUNK_LINE
    b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n",  # the next response's bytes after it
    b"2\r\nok\r\n",  # cut at a chunk's start
    b"2\r\no",  # cut in a chunk's data
    b"2\r\nok\r",  # cut in its CRLF
]


def h11_chunked(pieces: list[bytes]) -> list:
    """What h11 reads and writes of a chunked body arriving in `pieces`: per piece,
    the bytes it writes to the client, then "end" with what follows the body,
    "refused", or nothing (it waits). An empty piece: nothing new arrived."""
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]))
    reader.send(h11.EndOfMessage())
    writer = h11.Connection(h11.SERVER)
    writer.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.next_event()
    writer.next_event()
    reader.receive_data(CHUNKED_HEAD)
    writer.send(reader.next_event())
    out = []
    for piece in pieces:
        if piece:  # (b"" would be an EOF)
            reader.receive_data(piece)
        written = b""
        try:
            while (event := reader.next_event()) is not h11.NEED_DATA:
                written += writer.send(
                    h11.EndOfMessage() if type(event) is h11.EndOfMessage else event
                )
                if type(event) is h11.EndOfMessage:
                    out.append((written, "end", reader.trailing_data[0]))
                    return out
        except h11.RemoteProtocolError:
            out.append((written, "refused"))
            return out
        out.append((written,))
    return out


def check_chunked(body: bytes, pieces: list[bytes]) -> str:
    """The property: piece by piece, what the fast reader writes is what h11 writes;
    where it asks h11, h11 has not refused nor ended before that piece, and reads on
    from where it stopped as it would have read it all."""
    reference = h11_chunked(pieces)
    chunks, buffer = http1_fast.ChunkedBody(), bytearray()
    for i, piece in enumerate(pieces):
        buffer += piece
        out = bytearray()
        status, read = chunks.read(buffer, out)
        del buffer[:read]
        if status == http1_fast.ASK_H11:
            assert chunks.at_chunk_start
            # h11 from the chunk's start: the rest of its writing for this piece
            rest = h11_chunked([bytes(buffer), *pieces[i + 1 :]])
            assert [(bytes(out) + rest[0][0], *rest[0][1:]), *rest[1:]] == reference[i:], body
            return "h11"
        assert reference[i][0] == bytes(out), (body, pieces, i)
        if status == http1_fast.DONE:
            assert reference[i][1:] == ("end", bytes(buffer)), (body, pieces)
            return "done"
        assert len(reference[i]) == 1, (body, pieces, i, reference[i])  # h11 waits too
    return "wait"


@pytest.mark.parametrize("body", CHUNKED_BODIES)
def test_chunked_bodies_are_read_and_written_as_h11_does(body):
    outcomes = {check_chunked(body, [body])}
    rng = random.Random(body)
    for _ in range(30):
        outcomes.add(check_chunked(body, pieces(body, rng)))
    outcomes.add(check_chunked(body, [body[i : i + 1] for i in range(len(body))]))
    assert outcomes  # (which ones: see the next test)


def test_the_common_chunked_bodies_are_fast_and_the_rest_h11s():
    taken = {body: check_chunked(body, [body]) for body in CHUNKED_BODIES}
    assert taken[b"2\r\nok\r\n0\r\n\r\n"] == "done"
    assert taken[b"0002\r\nok\r\n0000\r\n\r\n"] == "done"
    assert taken[b"2;name=value\r\nok\r\n0;last\r\n\r\n"] == "done"
    assert taken[b"2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n"] == "h11"
    assert taken[b"2\r\nokXX0\r\n\r\n"] == "h11"
    assert taken[b"000000000000000000002\r\nok\r\n0\r\n\r\n"] == "h11"
    assert taken[b"2\r\nok\r\n"] == taken[b"2\r\no"] == taken[b"2\r\nok\r"] == "wait"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=40), max_size=5),
    st.sampled_from([b"%x", b"%X", b"%04x", b"%x;e=1", b"%x ", b"%x\t;", b" %x", b"%x\n"]),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b"XY", b""]),
    st.sampled_from([b"0\r\n\r\n", b"0\r\n\n", b"000\r\n\r\n", b"0\r\nT: 1\r\n\r\n", b"0\r\n"]),
    st.randoms(use_true_random=False),
)
def test_generated_chunked_bodies_are_read_and_written_as_h11_does(datas, size, end, last, rng):
    body = b"".join((size % len(d)) + b"\r\n" + d + end for d in datas if d) + last
    check_chunked(body, [body])
    check_chunked(body, pieces(body, rng))


# --- whole sessions: with the fast path and without, the same bytes in the same pieces ------


def session(gate, fast: bool) -> Http1Session:
    gate.events.clear()
    state = gate.on_connect("c1", LOOPBACK, 40000, "203.0.113.10", 80)
    assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n").value == "http"
    return Http1Session(gate, state, fast=fast)


def snapshot(s: Http1Session, step: str) -> tuple:
    out = (step, bytes(s.to_client), bytes(s.to_upstream), s.need_upstream, s.connected,
           s.drop_upstream, s.closing, s.reset, s.problem, s.upstream_idle,
           s.client_said_all and not (s.closing and s.reset),  # (a reset: not read)
           s.wants_client_data, s.wants_upstream_data)  # fmt: skip
    s.to_client.clear()
    if s.connected:
        s.to_upstream.clear()
    s.drop_upstream = False
    return out


def events(s: Http1Session) -> list[tuple]:
    s.gate.on_close(s.state, s.problem)
    return [
        (e.kind, e.verdict, e.reason, e.rule_id, e.name, e.method, e.path, e.detail, e.bytes_up)
        for e in s.gate.events
    ]


LOST = None  # in an upstream's pieces: the upstream socket was reset


def drive(
    s: Http1Session,
    client: list[bytes],
    upstream: list[bytes | None],
    reused: bool,
    rng: random.Random | None = None,
) -> list:
    """As http1_relay does: connect when asked (a pooled connection first, if `reused`),
    read a side while the session wants it, until nothing moves. With `rng`, the side
    read next is drawn among those ready (a server may answer before the client's
    pipelined bytes are read), else the client's first."""
    client, upstream, seen = list(client), list(upstream), []
    while not s.closing:
        ready = [side for side, pending, wanted in (("client", client, s.wants_client_data),
                 ("upstream", upstream, s.wants_upstream_data)) if pending and wanted]  # fmt: skip
        if s.need_upstream:
            s.upstream_connected(reused=reused)
            reused = False
            seen.append(snapshot(s, "connected"))
        elif not ready:
            break
        elif (rng.choice(ready) if rng else ready[0]) == "client":
            s.client_data(client.pop(0))
            seen.append(snapshot(s, "client"))
        elif (piece := upstream.pop(0)) is LOST:
            s.upstream_lost("the upstream reset the connection")
            seen.append(snapshot(s, "lost"))
        else:
            s.upstream_data(piece)
            seen.append(snapshot(s, "upstream"))
    return seen


def first_difference(runs: dict) -> tuple:
    """The first step (or event) where the two runs part, for the failure message."""
    for part in (0, 1):
        for fast, slow in zip(runs[True][part], runs[False][part], strict=False):
            if fast != slow:
                return ("fast", fast, "h11", slow)
    return ("fast", len(runs[True][0]), "h11", len(runs[False][0]))


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    if len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x\r\n!!!\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nZ\r\n",  # refused mid-body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nshort",  # cut, then EOF
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",  # cut at a chunk
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",  # bytes no request asked for
    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",  # cut, then the upstream's EOF
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70_000 + b"\r\n\r\n",
    b"",  # the upstream closes unanswered
    b" HTTP/1.1 200 OK\r\n",
]
CLIENTS = [
    b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /a HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    b"GET http://allowed.test/abs HTTP/1.1\r\n"
    + H
    + b"Connection: X-T, keep-alive\r\nX-T: 1\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"GET http://evil.test/ HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n GET /smuggled HTTP/1.1\r\n\r\n",
    b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc",
    b"POST /p HTTP/1.1\r\n"
    + H
    + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"GET / HTTP/1.0\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\n" + H + b"\n",
    b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X: " + b"a" * 70_000,  # never ends
    b"GET / HTTP/1.1\r\n" + H,  # then the client closes
    b"\x16\x03\x01\x02\x00",
]


def test_whole_sessions_go_as_h11_alone_would_take_them(tmp_path):
    """Seeded: keep-alive sequences of requests and responses, each cut in random
    pieces, some pipelined, EOFs where a list ends in b"": the fast session's every
    output, flag and event equals the h11 session's."""
    rng = random.Random(11)
    gates = {}
    for fast in (False, True):
        (tmp_path / str(fast)).mkdir()
        gates[fast] = make_gate(tmp_path / str(fast), sandbox=LOOPBACK)
    fast_taken = 0
    for case in range(400):
        requests = [rng.choice(CLIENTS) for _ in range(rng.randint(1, 3))]
        responses = [rng.choice(RESPONSES[:6] * 4 + RESPONSES) for _ in requests]
        pipelined = rng.random() < 0.3
        client = pieces(b"".join(requests), rng) if pipelined else []
        if not pipelined:
            for request in requests:
                client += pieces(request, rng)
        upstream = [p for response in responses for p in pieces(response, rng) if p]
        if rng.random() < 0.3:
            upstream.append(b"")
        if rng.random() < 0.2:
            client.append(b"")
        reused = rng.random() < 0.3
        runs = {}
        for fast in (False, True):
            s = session(gates[fast], fast)
            runs[fast] = (drive(s, client, upstream, reused), events(s))
            fast_taken += fast and s.fast
        assert runs[True] == runs[False], (case, client, upstream, first_difference(runs))
    assert fast_taken > 50  # the fast path did carry whole connections


def run_both(tmp_path, client: list[bytes], upstream: list[bytes], reused: bool = False) -> dict:
    """One connection through a session with the fast path and one without."""
    runs = {}
    for fast in (False, True):
        (tmp_path / str(fast)).mkdir(exist_ok=True)
        s = session(make_gate(tmp_path / str(fast), sandbox=LOOPBACK), fast)
        runs[fast] = (drive(s, client, upstream, reused), events(s))
    return runs


def test_a_pipelined_request_does_not_cut_a_closing_chunked_response_at_the_hand_over(tmp_path):
    """The client pipelines a second request; the response says close and is chunked,
    with a trailer (h11's to read). h11 alone keeps the pipelined bytes unread and
    ends the response whole, then closes; the hand-over to h11 mid-body must not
    read them early (that was "Got data when expecting EOF": a reset, the body cut)."""
    client = [b"GET / HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n"]
    upstream = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nok\r\n",
        b"0\r\nX-Trailer: 1\r\n\r\n",
    ]
    runs = run_both(tmp_path, client, upstream)
    assert runs[True] == runs[False], first_difference(runs)
    last = runs[True][0][-1]
    assert last[1].endswith(b"0\r\n\r\n") and last[6:9] == (True, False, None)  # whole, a FIN


def test_a_response_no_request_asked_for_is_not_passed_on(tmp_path):
    """The upstream sends a second response after the first, before the client's next
    request: h11 would frame it as the answer to a request not yet made (and h11's
    state machine then failed on that request with an AttributeError). Neither way
    passes it on: the connection closes after the first response."""
    client = [b"GET / HTTP/1.1\r\n" + H + b"\r\n", b"GET /2 HTTP/1.1\r\n" + H + b"\r\n"]
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    upstream = [first + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"]
    runs = run_both(tmp_path, client, upstream)
    assert runs[True] == runs[False], first_difference(runs)
    steps, seen = runs[True]
    assert b"".join(step[1] for step in steps) == first  # the client got the first only
    assert not [step for step in steps if b"GET /2" in step[2]]  # never went upstream
    assert steps[-1][6:10] == (
        True,
        False,
        "the upstream sent a response no request asked for",
        False,
    )  # not pooled
    assert [e[0] for e in seen].count("request") == 1


# Generated exchanges, from the pieces the generated heads are made of: mostly of the
# fast shape, each way of breaking it (framing, versions, 1xx, trailers, bad chunks).
def generated_request(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        head = b"%s %s HTTP/1.1" % (rng.choice([b"GET", b"HEAD", b"POST"]), rng.choice(TARGETS[:3]))
    else:
        head = b" ".join((rng.choice(METHODS), rng.choice(TARGETS), rng.choice(VERSIONS)))
    fields = [(b"Host", b": ", b"allowed.test", b"\r\n")] if rng.random() < 0.8 else []
    for _ in range(rng.randint(0, 3)):
        fields.append((rng.choice(NAMES), rng.choice([b":", b": ", b" : "]), rng.choice(VALUES),
                       rng.choice(EOLS)))  # fmt: skip
    rng.shuffle(fields)
    for name, colon, value, eol in fields:
        head += (b"\r\n" if rng.random() < 0.8 else eol) + name + colon + value
    end = rng.choice([b"\r\n\r\n"] * 6 + [b"\n\n", b"\r\n\n"])
    return head + end + rng.choice([b"", b"", b"abcde", b"3\r\nabc\r\n0\r\n\r\n"])


def generated_chunks(rng: random.Random) -> bytes:
    body = b""
    for _ in range(rng.randint(0, 3)):
        data = bytes(rng.choice(b"ab\r\n0;") for _ in range(rng.randint(1, 6)))
        size = rng.choice([b"%x", b"%X", b"%04x", b"%x;e=1", b"%x ", b"%x\n"]) % len(data)
        body += size + b"\r\n" + data + rng.choice([b"\r\n"] * 5 + [b"\n", b"XY", b""])
    return body + rng.choice([b"0\r\n\r\n", b"0\r\n\n", b"0\r\nT: 1\r\n\r\n", b"0\r\n", b""])


def generated_response(rng: random.Random) -> bytes:
    line = rng.choice(STATUS_LINES[:3] * 4 + STATUS_LINES + [b"HTTP/1.1 103 Early"])
    framing = rng.choice(["length", "length", "chunked", "chunked", "none", "both", "lengths"])
    size = rng.choice([0, 2, 5])
    fields = []
    if framing in ("length", "both", "lengths"):
        fields.append(b"Content-Length: %d" % size)
    if framing == "lengths":
        fields.append(rng.choice([b"Content-Length: %d" % size, b"Content-Length: 7"]))
    if framing in ("chunked", "both"):
        fields.append(
            rng.choice([b"Transfer-Encoding: chunked"] * 3 + [b"Transfer-Encoding: Chunked"])
        )
    for _ in range(rng.randint(0, 2)):
        fields.append(rng.choice([b"Connection: close", b"Connection: keep-alive", b"X-A: 1",
                                  b"Connection: Close, X-A"]))  # fmt: skip
    rng.shuffle(fields)
    head = line + b"".join(b"\r\n" + field for field in fields) + b"\r\n\r\n"
    if line.startswith(b"HTTP/1.1 1") and rng.random() < 0.8:
        return head + generated_response(rng)  # a 1xx, then the final response
    if framing == "chunked" or (framing == "both" and rng.random() < 0.5):
        return head + generated_chunks(rng)
    return head + b"x" * rng.choice([size, size, size, 0, size + 3, max(0, size - 1)])


INTERLEAVED_CASES = 300  # CI's share; thousands were run by hand (see the commit)


def test_interleaved_generated_sessions_go_as_h11_alone_would_take_them(tmp_path):
    """Seeded: generated and listed exchanges, pipelined or not, cut anywhere (byte by
    byte at times), EOFs and resets anywhere, and the side read next drawn at random
    (an answer may come before the client's next bytes are read): the fast session's
    every output, flag and event equals the h11 session's."""
    rng = random.Random(12)
    gates = {}
    for fast in (False, True):
        (tmp_path / str(fast)).mkdir()
        gates[fast] = make_gate(tmp_path / str(fast), sandbox=LOOPBACK)
    for case in range(INTERLEAVED_CASES):
        count = rng.randint(1, 4)
        requests = [generated_request(rng) if rng.random() < 0.5 else rng.choice(CLIENTS)
                    for _ in range(count)]  # fmt: skip
        responses = [generated_response(rng) if rng.random() < 0.5 else rng.choice(RESPONSES)
                     for _ in range(count)]  # fmt: skip

        def cut(data: bytes) -> list[bytes]:
            if rng.random() < 0.1:
                return [data[i : i + 1] for i in range(len(data))]
            return pieces(data, rng)

        client = (
            cut(b"".join(requests)) if rng.random() < 0.3 else [p for r in requests for p in cut(r)]
        )
        upstream: list[bytes | None] = [p for r in responses for p in cut(r) if p]
        for pieces_of, end in ((client, b""), (upstream, b""), (upstream, LOST)):
            if rng.random() < 0.15:  # (nothing comes after it)
                del pieces_of[rng.randint(0, len(pieces_of)) :]
                pieces_of.append(end)
        reused, order = rng.random() < 0.3, rng.random()
        runs = {}
        for fast in (False, True):
            s = session(gates[fast], fast)
            runs[fast] = (drive(s, client, upstream, reused, random.Random(order)), events(s))
        assert runs[True] == runs[False], (case, client, upstream, first_difference(runs))
