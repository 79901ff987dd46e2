"""Plain HTTP/1's fast path, pure: the request and response heads nearly every client
and server send, read and written as bytes; h11 reads everything else.

Measured (sans-io, one short exchange through `Http1Session` and the gate, no
sockets): h11 was about half of a plain-HTTP connection's Python, ~75 us of ~145,
spread over its reader, its state machine and its writer (re-validating every field
it writes, rebuilding a `Connection: close` response head); no one part of it
dominated, so a faster h11 call was not on offer. A strict reader of the common
shape (one `bytes.split` and one compiled regex a line, the regexes h11's own ABNF)
and a writer of h11's exact bytes cost a few microseconds. httptools (llhttp, in C)
would parse a little faster still, but accepts other shapes than h11 (it is
lenient where h11 is strict) and calls back into Python per field, so every head
would need h11's checks again: not worth a second parser's semantics.

What is fast, else None ("ask h11", as dns/wire.py says "ask dnspython"):
- `scan_request`: `METHOD SP target SP HTTP/1.1`, the target h11's (visible ASCII),
  fields exactly as h11 reads them (a token name, a colon, the value without
  surrounding blanks; no obs-fold, no bare CR or LF), exactly one Host, no body
  (no Transfer-Encoding; at most one Content-Length, all digits, of 0), no Upgrade
  (h11 pauses for a protocol switch), no Expect, not CONNECT;
- `scan_response`: `HTTP/1.1 SP [2-9]xx SP reason` (visible ASCII and spaces), h11's
  fields, and either one `Transfer-Encoding: chunked` without Content-Length, or at
  most one Content-Length (digits), which must be there unless the status or the
  method (204, 304, HEAD) says there is no body: close-delimited bodies, 1xx and
  HTTP/1.0 go to h11;
- `ChunkedBody`: a chunked body, read as h11 reads it and written again as h11
  writes what it read (one chunk per piece read); trailers, a chunk-size line h11
  would refuse or that has not ended within MAX_CHUNK_LINE bytes, and a chunk's data
  not followed by CRLF are h11's, from the start of that chunk on;
- `head_end`: where the head ends, if it ends in CRLF CRLF where h11 would end it.
`write_request` / `write_response` give h11's bytes for the same event (Host first,
a response to a client that said close with h11's `Connection: close` rewrite).

tests/unit/test_http1_fast.py holds the property: on a corpus and on generated heads
(every smuggling shape of the e2e tests among them), whatever is fast is read,
framed and written exactly as h11 does it, and nothing h11 refuses is fast.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# h11's ABNF (h11/_abnf.py), as it compiles it: the fast path reads a field or a
# request line exactly when h11 would, and reads it the same.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_CHAR = rb"[^\x00\s]"  # h11's vchar_or_obs_text
_VALUE = rb"(?:" + _FIELD_CHAR + rb"+(?:[ \t]+" + _FIELD_CHAR + rb"+)*)?"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*")
# A field line exactly as h11 writes one (`name: value`), read as _FIELD reads it:
# a head of such lines (and no Host, which h11 writes first) is written as it came.
_WRITTEN_FIELD = re.compile(rb"(" + _TOKEN + rb"): (" + _VALUE + rb")")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
# A subset of h11's status line: a final status, a reason of visible ASCII and spaces.
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-9][0-9][0-9]) ([\x20-\x7e]*)")
_DIGITS = re.compile(rb"[0-9]+")
# h11's chunk header (h11/_abnf.py chunk_header): size, an extension it ignores,
# blanks, CRLF; the line is what comes before the first CRLF.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
MAX_CHUNK_LINE = 1024  # an unfinished chunk-size line longer than this is h11's
_H11_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head (h11/_receivebuffer.py)
# Fields that make a request something other than one bodiless exchange.
_NOT_FAST_REQUEST = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_NO_BODY_STATUS = (204, 304)

Fields = tuple[tuple[bytes, bytes], ...]


class SimpleRequest(NamedTuple):
    """A bodiless HTTP/1.1 request; `fields` as h11's `headers.raw_items()`;
    `connection`: the tokens of its Connection fields, lower case (None without one)."""

    method: bytes
    target: bytes
    fields: Fields
    connection: list[bytes] | None


class SimpleResponse(NamedTuple):
    """An HTTP/1.1 response with a known body length (`length`, 0 where its status or
    the request's method says it has none), or a chunked body (`chunked`, `length`
    0); `close`: its Connection says close."""

    status: int
    reason: bytes
    fields: Fields
    length: int
    close: bool
    chunked: bool = False
    written: bytes | None = None  # the head as h11 writes it (a client keeping alive)


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Where the head at the start of `buffer` ends (the index past its blank line),
    when h11 ends it at a CRLF CRLF; 0 when no head has ended yet (`start`: where to
    look from, the length looked at before, so a head in tiny pieces is scanned
    once); -1 when h11 would end it at a bare LF (not fast)."""
    found = _H11_HEAD_END.search(buffer, max(0, start - 2))
    if found is None:
        return 0
    at = found.start()
    if found.end() - at != 3 or at == 0 or buffer[at - 1] != 13:  # b"\r\n\r\n"
        return -1
    return found.end()


def _fields(lines: list[bytes]) -> tuple[list[tuple[bytes, bytes]] | None, bool]:
    """The (name, value) pairs of the field `lines` (None if one is not a field as
    h11 reads it), and whether each line is as h11 would write it."""
    fields = []
    as_written = True
    for line in lines:
        match = _WRITTEN_FIELD.fullmatch(line)
        if match is None:
            as_written = False
            match = _FIELD.fullmatch(line)
            if match is None:  # obs-fold, a bare CR or LF, no colon, a blank before it
                return None, False
        fields.append(match.groups())
    return fields, as_written


def _connection_tokens(value_lists: list[bytes]) -> list[bytes]:
    """As h11's get_comma_header: lower case, split at commas, blanks stripped."""
    return [t for v in value_lists for t in (x.strip() for x in v.lower().split(b",")) if t]


def scan_request(head: bytes) -> SimpleRequest | None:
    """The request in `head` (without its blank line) when it has the fast shape."""
    lines = head.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    method, target = line.groups()
    if method == b"CONNECT":
        return None
    fields, _ = _fields(lines[1:])
    if fields is None:
        return None
    hosts = lengths = 0
    connection = None
    for name, value in fields:
        lower = name.lower()
        if lower == b"host":
            hosts += 1
        elif lower == b"content-length":
            lengths += 1
            if not _DIGITS.fullmatch(value) or int(value):
                return None
        elif lower == b"connection":
            connection = (connection or []) + [value]
        elif lower in _NOT_FAST_REQUEST:
            return None
    if hosts != 1 or lengths > 1:
        return None
    tokens = None if connection is None else _connection_tokens(connection)
    return SimpleRequest(method, target, tuple(fields), tokens)


def scan_response(head: bytes, method: bytes) -> SimpleResponse | None:
    """The response in `head` (without its blank line), answering a request of
    `method`, when it has the fast shape."""
    lines = head.split(b"\r\n")
    line = _STATUS_LINE.fullmatch(lines[0])
    if line is None:
        return None
    status = int(line.group(1))
    fields, as_written = _fields(lines[1:])
    if fields is None:
        return None
    length = None
    chunked = host = False
    connection = []
    for name, value in fields:
        lower = name.lower()
        if lower == b"host":
            host = True  # (h11 writes it first)
        elif lower == b"content-length":
            if length is not None or not _DIGITS.fullmatch(value):
                return None
            length = int(value)
        elif lower == b"transfer-encoding":
            # (h11 keeps the value lower-cased: only the form it keeps is fast)
            if chunked or value != b"chunked":
                return None
            chunked = True
        elif lower == b"connection":
            connection.append(value)
    if status in _NO_BODY_STATUS or method == b"HEAD":
        if chunked or (length is None and status not in _NO_BODY_STATUS):
            return None  # h11 would add (or keep) Transfer-Encoding: chunked for the client
        length = 0
    elif chunked:
        if length is not None:
            return None  # both: h11 reads it chunked and drops the Content-Length
        length = 0
    elif length is None:
        return None  # delimited by the server's close
    close = b"close" in _connection_tokens(connection)
    # A head h11 would write again byte for byte (to a client that did not say close)
    # goes on as it came: ~2 us a response less than writing it.
    written = head + b"\r\n\r\n" if as_written and not (chunked or host) else None
    return SimpleResponse(status, line.group(2), tuple(fields), length, close, chunked, written)


def _write_fields(out: list[bytes], fields) -> bytes:
    """h11's write_headers: Host first, then the others in order, then the blank line."""
    rest = []
    for name, value in fields:
        line = b"%s: %s\r\n" % (name, value)
        (out if name.lower() == b"host" else rest).append(line)
    out += rest
    out.append(b"\r\n")
    return b"".join(out)


def write_request(method: bytes, target: bytes, fields) -> bytes:
    """The request head h11 writes for these (already validated) fields."""
    return _write_fields([b"%s %s HTTP/1.1\r\n" % (method, target)], fields)


def write_response(response: SimpleResponse, client_closes: bool) -> bytes:
    """The response head h11 (server side) writes for `response`; a chunked one with
    h11's `Transfer-Encoding: chunked` moved last; to a client that said close, h11's
    rewrite: the Connection fields go, their tokens less keep-alive, plus close,
    sorted, follow the other fields one a line."""
    if response.written is not None and not client_closes:
        return response.written
    fields = response.fields
    if response.chunked:
        fields = [(n, v) for n, v in fields if n.lower() != b"transfer-encoding"]
        fields.append((b"Transfer-Encoding", b"chunked"))
    if client_closes:
        tokens = {b"close"}
        tokens.update(_connection_tokens([v for n, v in fields if n.lower() == b"connection"]))
        tokens.discard(b"keep-alive")
        fields = [(n, v) for n, v in fields if n.lower() != b"connection"]
        fields += [(b"Connection", t) for t in sorted(tokens)]
    return _write_fields([b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)], fields)


# What `ChunkedBody.read` says: wait for more bytes; the body ended; h11 reads on
# from here (the start of a chunk: its size line, or the last chunk and trailers).
WAIT, DONE, ASK_H11 = "wait", "done", "h11"


class ChunkedBody:
    """One chunked body as h11 (0.14) reads it, written again as h11 writes what it
    read: each piece of a chunk's data that arrives becomes a chunk of its own
    (`%x CRLF data CRLF`), the last chunk `0 CRLF CRLF` (trailers are not passed on).
    It takes only well-formed bodies without trailers; at anything else it stops at
    the start of a chunk and h11 reads on from there, as it would have read it."""

    __slots__ = ("remaining", "crlf")

    def __init__(self) -> None:
        self.remaining = 0  # bytes of the current chunk's data still to come
        self.crlf = False  # the CRLF after a chunk's data comes next

    @property
    def at_chunk_start(self) -> bool:
        return not self.remaining and not self.crlf

    def read(self, buffer: bytearray, out: bytearray) -> tuple[str, int]:
        """Read the body's bytes at the start of `buffer`, writing them again to `out`:
        (WAIT, DONE or ASK_H11, how many bytes of `buffer` were read). After DONE the
        rest of `buffer` is not the body's; after ASK_H11 it starts with a chunk."""
        pos, size = 0, len(buffer)
        while True:
            if self.remaining:
                if pos == size:
                    return WAIT, pos
                take = min(self.remaining, size - pos)
                out += b"%x\r\n" % take
                out += memoryview(buffer)[pos : pos + take]
                out += b"\r\n"
                pos += take
                self.remaining -= take
                if self.remaining:
                    return WAIT, pos
                self.crlf = True
            if self.crlf:
                if size - pos < 2:
                    return WAIT, pos
                self.crlf = False
                pos += 2
                if buffer[pos - 2 : pos] != b"\r\n":
                    return ASK_H11, pos  # (h11 0.14 drops any two bytes there)
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return (ASK_H11 if size - pos > MAX_CHUNK_LINE else WAIT), pos
            line = _CHUNK_LINE.fullmatch(buffer, pos, end + 2)
            if line is None:
                return ASK_H11, pos  # h11 refuses it, and says why
            chunk = int(line.group(1), 16)
            if chunk:
                self.remaining = chunk
                pos = end + 2
                continue
            after = buffer[end + 2 : end + 4]  # an empty trailer section, else h11's
            if after[:2] == b"\r\n" or after[:1] == b"\n":
                out += b"0\r\n\r\n"
                return DONE, end + 3 + (after[:1] == b"\r")
            return (WAIT if after in (b"", b"\r") else ASK_H11), pos
