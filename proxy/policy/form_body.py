"""The method overrides in a request's form body, read as the body streams (sans-io).

Rack::MethodOverride (Rails, Sinatra), Laravel and Symfony (`_method` with
enableHttpMethodParameterOverride), Spring's HiddenHttpMethodFilter and Express's
method-override with a body getter run a POST as the method a field of its form
names, and Hono's methodOverride any request but a GET: `POST /items/1` with the body
`_method=DELETE` runs DELETE. Laravel and Lumen read a JSON body's members as the
form's (`{"_method": "DELETE"}`: `_Json`). A rule that allows POST and not DELETE would let it
through. So the body of an allowed request that a server may read as a form
(`check_head`'s `form_body`: urlencoded, multipart or JSON on any method but GET, and
a POST's without a Content-Type, which Rack reads as a form) is read here for the
fields the query is read for (request_head.method_override: `_method`,
`x-tunneled-method`, ... in any spelling), and the gate decides each method named
(`gate.on_form_body`), as it decides an override in the query or a header.

What goes upstream meanwhile (the adapters: frontdoor/http1.py, addon.py): a body that
declares at most WHOLE_FORM bytes is kept, and its request sent only once all of it
is read and no override was refused, so no server sees a request that is refused; a
longer one, or one of unknown length, goes on as it comes until it may name an
override (`FormOverrides.suspect`: `method` in any spelling occurs in it), then but
for its last byte (and the end of a chunked one), which go on once all of it is read.
A server that reads a
form reads all of it before it runs the request, so none runs the method refused; cut
short (the upstream connection closed, with a reset where the adapter can), a lenient
one may still run the request by its own method with what it got.

Bounded: a field is kept while it is read only as far as it can matter (an override's
name is a few characters, a method at most a few dozen), so memory stays a few KiB
whatever the body; a body's bytes are searched by regular expressions at C speed,
and only fields that may name an override are parsed.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import string
import zlib
from collections.abc import Callable

from .model import HTTP_METHODS
from .request_head import (
    JSON_TYPES,
    QUERY_METHOD_NAMES,
    FormBody,
    method_override,
    override_name,
)

# What a field's name may start with and still be an override's name (`override_name`
# drops leading spaces, then reads the first run without brackets): `+`, `%20` or ' ',
# then brackets. Kept as one of each however long it runs.
_LEAD = re.compile(rb"(?P<spaces>(?:\+|%20| )*)(?P<brackets>(?:\[|\]|%5[BbDd])*)")


def _spelled(name: str) -> bytes:
    """A regex of the spellings `override_name` reads as `name`: each character as
    itself (in either case) or escaped, and `_` also as PHP's ` ` (`+`) and `.`."""
    pattern = b""
    for char in name.encode():
        forms = {bytes([char]), b"%%%02x" % char, b"%%%02x" % bytes([char]).upper()[0]}
        if char == ord("_"):
            forms |= {b".", b" ", b"+", b"%2e", b"%20"}
        pattern += b"(?:" + b"|".join(re.escape(form) for form in sorted(forms)) + b")"
    return pattern


# `method` in any spelling (escaped letters too): every override's name holds it, so
# only fields and part header sections that hold it are looked at further.
_CANDIDATE = re.compile(rb"(?i)(?:m|%6d)(?:e|%65)(?:t|%74)(?:h|%68)(?:o|%6f)(?:d|%64)")
# A field whose name `override_name` reads as an override's: after a lead (`_LEAD`), an
# override's name in any spelling, then the end of the name's first run (`=`, a
# bracket, a NUL).
_OVERRIDE_FIELD = re.compile(
    rb"(?i)(?:\+|%20| )*(?:\[|\]|%5[bd])*(?:"
    + b"|".join(_spelled(name) for name in sorted(QUERY_METHOD_NAMES | {"method"}))
    + rb")(?:[=\[\]\x00]|%00|%5[bd]|$)"
)
_SEPARATOR = re.compile(rb"[&;]")  # Rack and PHP split at '&', some parsers at ';' too


def _json_spelled(name: str) -> bytes:
    """A regex of `name` in a JSON body lowered, in any case: each character as itself,
    or escaped (JSON's `\\u006d` or `\\u004d`, and `%6d` or `%4d`, which `override_name`
    reads), the escapes' hex digits in lower case."""
    pattern = b""
    for char in name.encode():
        codes = {bytes([char]).lower()[0], bytes([char]).upper()[0]}
        forms = [re.escape(bytes([char]).lower())]
        forms += [b"%%%02x" % code for code in sorted(codes)]
        forms += [rb"\\u00%02x" % code for code in sorted(codes)]
        pattern += b"(?:" + b"|".join(forms) + b")"
    return pattern


# `method` in a JSON body, in any spelling: a body without it names no override.
# Searched in the body lowered, without IGNORECASE (sre then skips to the branches'
# first bytes: ~3x faster), and only where an escape or `method` itself occurs
# (`_json_candidates`).
_JSON_CANDIDATE = re.compile(_json_spelled("method"))
_JSON_ESCAPES = (b"%4", b"%5", b"%6", b"%7", b"\\u00")  # how an escaped letter starts
# A member's name that is an override's, in any spelling, quoted or bare (JSON5 takes
# `{_method: ..}`), then blanks and its `:` (`_AFTER_NAME`), in the body lowered. Not
# `method` alone: it overrides only where its value is a method, and JSON-RPC, MCP and
# HAR bodies hold it (a red team, session 54, found long ones refused).
# Searched only around each `method` found (from _NAME_BEFORE bytes before it to
# _NAME_AFTER after: `x-tunneled-` and `-override` escaped): over a whole body it cost
# ~40 ms a MiB on a fast host.
_JSON_NAME = re.compile(
    b"(?:" + b"|".join(_json_spelled(name) for name in sorted(QUERY_METHOD_NAMES)) + rb")[\"']?"
)
_AFTER_NAME = re.compile(rb"\s*(?::|\Z)")
_NAME_BEFORE, _NAME_AFTER = 11 * 6, 9 * 6 + 1
# Kept across chunks to search on: a member's name (22 characters, each escaped) and
# its quote, with one blank for a run of them.
_MEMBER_CARRY = 22 * 6 + 1
_CANDIDATE_CARRY = 6 * 6 - 1  # `method`, each letter escaped, less one
# Occurrences of `method` a JSON body is searched around: past these it may name any
# method (each costs ~5 us in Python on a fast host, and a body of at most _MOST_JSON
# is parsed whatever it holds).
_MOST_JSON_CANDIDATES = 1_000
_BLANKS = b" \t\n\r\f\v"
# A compressed JSON body is inflated (`_Inflated`) to at most this much, this much at a
# time; zlib's window bits for each coding (gzip's header, zlib's for `deflate`, as
# Node's createGunzip and createInflate take them).
_MOST_INFLATED = 4 << 20
_INFLATE_STEP = 64 << 10
_INFLATE_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
# A JSON body is kept to be parsed whole where it holds `method`: at most this much.
_MOST_JSON = 64 << 10
# Fields that hold `method`, or parts, a body may have: past either it is refused (no
# honest form has thousands, and each costs a look in Python).
_MOST_CANDIDATES = 10_000
_MOST_PARTS = 10_000
# A form in a charset that is no ASCII superset is read whole: at most this much of it
# (none honest is larger; past it, it is refused).
_MOST_DECODED = 64 << 10
# Kept of a name after its lead: an override's name escaped is at most 3 x 22 bytes; a
# longer first run is none. Kept of a value: a method and blanks around it.
_MOST_NAME = 128
_MOST_VALUE = 256
_MOST_PART_HEAD = 8192  # a multipart part's header section
_MARKS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)
_CHARSET = re.compile(r'(?i)charset\s*=\s*"?([^";,\s]+)')  # anywhere in the Content-Type
_PROBE = "_method=DELETE&x;%20+[]" + string.ascii_letters + string.digits + "-."


@functools.lru_cache(maxsize=64)
def _ascii_transparent(charset: str) -> bool:
    """Whether a form in `charset` holds the ASCII of its names, `=` and `&` as ASCII
    bytes (UTF-8, Latin-1, windows-1251, Shift_JIS, GBK: read as they come): not
    UTF-16, EBCDIC or UTF-7 (whose `+` is no `+`), read decoded."""
    try:
        return _PROBE.encode(charset) == _PROBE.encode("ascii")
    except (LookupError, UnicodeError, TypeError, ValueError):
        return False


_BOUNDARY = re.compile(r'(?i)boundary\s*=\s*("(?:[^"\\]|\\.)*"?|[^;,\s"]*)')
# What servers split or unescape a quoted boundary at, otherwise than each other: Rack
# cuts it at `;` and `,`, WHATWG's parser (undici: Hono) reads `\x` as `x` (a red team,
# session 53). Honest clients' boundaries are letters, digits and `-`.
_AMBIGUOUS_BOUNDARY = re.compile(r'[\\;,"\s]')
# A part's name, as Content-Disposition gives it (`name="x"`, `name=x`, RFC 5987's
# `name*=UTF-8''x`); `filename` is not matched (`\b`).
_PART_NAME = re.compile(
    rb"""(?i)\bname(\*?)\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|'([^'\r\n]*)'|([^;\r\n]*))"""
)  # quoted in either quotes (PHP takes '...'), or bare
_PART_HEAD_END = re.compile(rb"\r?\n\r?\n")
# Rack names a part without a Content-Disposition name by its Content-ID.
_CONTENT_ID = re.compile(rb"(?i)content-id\s*:\s*([^\r\n]*)")  # anywhere, as Rack's
_ESCAPED_CHARACTER = re.compile(rb"\\(.)")

Found = Callable[[bytes, bytes], None]  # (a field's name, its value), both as sent

# A form body that declares at most this many bytes is read whole before any of its
# request goes upstream (the module docstring).
WHOLE_FORM = 256 << 10


class FormOverrides:
    """One request body's reader. `feed` the body's bytes as they come, then `end`;
    `found` gathers (where, "method", the method named) for each override that names
    another method than the request's (each taken by the gate, which empties it), and
    `problem` says why the body cannot be read as servers would (the request is
    refused)."""

    def __init__(self, form: FormBody, method: str):
        self.method = method
        self.found: list[tuple[str, str, str]] = []
        self.problem: str | None = None
        self.ended = False  # all of the body has been read
        self._unread = False  # a JSON body may name any method (`_any_method`)
        self._tail = b""  # the end of what was searched for `method`: it may go on
        self._suspect = False  # (see `suspect`)
        content_type = self._content_type = form.content_type
        self._readers = self._readers_for(content_type)
        # A form in a charset that does not hold ASCII as ASCII (UTF-16, EBCDIC's
        # cp037, UTF-7's `+AF8-`): Jetty decodes the body in it before it splits the
        # fields (a red team, session 53). It is read whole and decoded too, in each
        # charset the Content-Type may be read to name (a `charset=` inside another
        # parameter's name or quoted value too: servers' parsers differ).
        self._decoded: list[_Decoded] = []
        charsets = {name.lower(): name for name in _CHARSET.findall(content_type)}
        unusual = [name for name in charsets.values() if not _ascii_transparent(name)]
        if len(unusual) > 2:
            self._refuse(f"a Content-Type naming {len(unusual)} charsets")
        for name in unusual[:2]:
            try:
                text = codecs.lookup(name)._is_text_encoding
            except LookupError:
                text = False
            if not text:
                self._refuse(f"a form body in charset {name[:40]!r}, which the gateway cannot read")
            else:
                self._decoded.append(_Decoded(name))
        # A compressed form: servers that inflate a body before they read it (Express's
        # body-parser does by default) read fields the gateway would not see (a red
        # team, session 53). A compressed JSON body is inflated and read (JSON APIs'
        # clients compress: OTLP exporters, a red team found them refused, session
        # 54); in another coding, or in a charset read decoded, it may name any method.
        coding = form.encoding.strip().lower()
        if coding not in ("", "identity"):
            if all(isinstance(reader, _Json) for reader in self._readers):
                wbits = _INFLATE_WBITS.get(coding)
                if wbits is None or self._decoded:
                    self._any_method(f"with Content-Encoding {form.encoding[:40]!r}, not inflated")
                    self._readers, self._decoded = [], []
                else:
                    self._readers = [_Inflated(wbits, self._readers, self._any_method)]
            else:
                self._refuse(
                    f"a form body with Content-Encoding {form.encoding[:40]!r}, which a "
                    "server may inflate and read as a form the gateway cannot"
                )

    def _readers_for(self, content_type: str) -> list[_Urlencoded | _Multipart | _Json]:
        """A multipart reader for its boundary, else an urlencoded one. One boundary
        parameter, and the first `boundary` of the Content-Type: servers take the first
        of several or refuse a second, and PHP takes whatever follows the first
        `boundary` anywhere and the `=` after it (`boundaryx=a; boundary=b` is `a` to
        PHP, `b` to others; a browser's value `----WebKitFormBoundary...` comes after)."""
        readers: list[_Urlencoded | _Multipart | _Json] = []
        boundaries = list(_BOUNDARY.finditer(content_type))
        first = content_type.lower().find("boundary")
        if len(boundaries) > 1 or (
            first >= 0 and (not boundaries or boundaries[0].start() != first)
        ):
            self._refuse("a Content-Type naming a multipart boundary more than once or obliquely")
        elif boundaries:
            boundary = boundaries[0][1]
            if boundary.startswith('"'):
                boundary = boundary[1:].removesuffix('"')
            if _AMBIGUOUS_BOUNDARY.search(boundary):
                self._refuse(
                    f"a multipart boundary {boundary[:80]!r} that servers read otherwise "
                    "than each other (quoted with a backslash, ';', ',' or a blank)"
                )
            elif boundary:
                readers.append(_Multipart(boundary.encode("latin-1"), self._named, self._refuse))
        lowered = content_type.lower()
        if any(kind in lowered for kind in JSON_TYPES):
            readers.append(_Json(self._named, self._any_method, "json" not in lowered))
        if not readers or "urlencoded" in lowered:
            readers.append(_Urlencoded(self._named, self._refuse))
        return readers

    @property
    def suspect(self) -> bool:
        """Whether what was fed may name an override: `method` in any spelling occurs
        in it (every override's name holds it), or it is read decoded or inflated, or
        it is multipart (Rack unescapes a part's name: `"_m\\ethod"`).
        Until then the adapters send all of a body that is not kept on as it comes:
        no server can run an override it has not got. From then on its last byte
        waits for its end, so no server has all of it before it is read (a red team,
        session 54, found full-duplex NDJSON streams stalled by a byte held always)."""
        if not self._suspect:
            self._suspect = (
                bool(self._decoded)
                or self._unread
                or any(isinstance(reader, (_Inflated, _Multipart)) for reader in self._readers)
            )
        return self._suspect

    def feed(self, data: bytes) -> None:
        if not self._suspect:
            window = self._tail + data
            self._suspect = next(iter(_json_candidates(window.lower())), None) is not None
            self._tail = window[-_CANDIDATE_CARRY:]
        for reader in self._readers:
            reader.feed(data)
        for decoded in self._decoded:
            decoded.body += data
            if len(decoded.body) > _MOST_DECODED:
                self._refuse(
                    f"a form body in charset {decoded.charset!r} over {_MOST_DECODED} bytes"
                )
                decoded.body.clear()

    def end(self) -> None:
        self.ended = True
        for decoded in self._decoded:
            self._read_decoded(decoded)
        for reader in self._readers:
            reader.end()

    def _read_decoded(self, decoded: _Decoded) -> None:
        """A body in a charset that is no ASCII superset, read whole as servers read
        it: decoded, then split (Jetty's UTF-16; body-parser's JSON), and split at the
        ASCII `&`, `;` and `=` bytes, then each name and value decoded (Jetty's other
        charsets). UTF-16 or UTF-32 without a byte order mark is read in both orders
        (Java reads it big-endian, iconv-lite little-endian: a red team, session 54);
        a body that is not valid in its charset is refused, since decoders differ on
        what they make of it (iconv-lite's UTF-7 reads `+AF9-` as `_`, Python's
        refuses it)."""
        body, charset = bytes(decoded.body), codecs.lookup(decoded.charset).name
        charsets = [charset]
        if charset in ("utf-16", "utf-32") and not body.startswith(_MARKS):
            charsets = [charset + "-be", charset + "-le"]
        for charset in charsets:
            try:
                text = body.decode(charset)
            except UnicodeError:  # (in either byte order: iconv-lite reads it leniently)
                self._refuse(f"a body not valid in its charset {decoded.charset[:40]!r}")
                return
            for reader in self._readers_for(self._content_type):
                reader.feed(text.lstrip("\ufeff").encode("utf-8", "surrogatepass"))
                reader.end()
            for field in _SEPARATOR.split(body):
                key, equals, value = field.partition(b"=")
                if equals and (named := method_override(
                    key.decode(charset, "replace"), value.decode(charset, "replace"), self.method
                )) is not None:  # fmt: skip
                    self.found.append((f"the form body's {named[0]}", "method", named[1]))

    def _named(self, key: bytes, value: bytes) -> None:
        named = method_override(key.decode("latin-1"), value.decode("latin-1"), self.method)
        if named is not None:
            self.found.append((f"the form body's {named[0]}", "method", named[1]))

    def _refuse(self, why: str) -> None:
        if self.problem is None:
            self.problem = why

    def _any_method(self, why: str) -> None:
        """A JSON body the gateway cannot read as servers do may name any method: the
        gate refuses it where the rules refuse one (an override of each is found)."""
        if self._unread:
            return
        self._unread = True
        where = f"the JSON body ({why}; a member may be named as a method override)"
        self.found += [(where, "method", other) for other in sorted(HTTP_METHODS - {self.method})]


class _Json:
    """`{"_method": "DELETE"}`: Laravel and Lumen read a JSON body's members as a
    form's (Illuminate's Request::getInputSource), whose `_method` Symfony's override
    then takes; Koa's koa-methodoverride reads `request.body._method` whatever parsed
    the body (the first of an array too). The body is kept, at most _MOST_JSON bytes,
    and parsed whole at its end if `method` occurs in it in any spelling
    (`_JSON_CANDIDATE`, searched at C speed as it comes): its top-level members are
    read as a form's fields. A longer one, or one Python's json cannot parse (a
    trailing comma, JSON5's bare names: parsers differ), where a member may be named
    as an override (`_JSON_NAME`), may name any method (`any_method`), and so does one
    with more than _MOST_JSON_CANDIDATES occurrences of `method`. `objects_only`: a
    body of a type that only some servers parse as JSON (text/plain) names nothing
    unless it opens as an object does (`{`, after blanks and a byte order mark): a
    YAML or Python file holding `_method:` is none (a red team, session 54)."""

    def __init__(self, found: Found, any_method: Callable[[str], None], objects_only: bool):
        self._found, self._any_method = found, any_method
        self._objects_only = objects_only
        self._opening: bytes | None = None  # its first byte but blanks, once not kept
        self._body: bytearray | None = bytearray()  # None: past _MOST_JSON
        self._candidate = self._member = False  # found `method`, a member's name
        self._candidates = 0
        self._carried = b""  # the end of what was searched: a name may go on from it

    def feed(self, data: bytes) -> None:
        if not self._member:
            window, seen = self._carried + data, len(self._carried)
            lowered = window.lower()
            for candidate in _json_candidates(lowered):
                self._candidate = True
                if candidate.end() > seen:  # (one in the carried bytes was counted)
                    self._candidates += 1
                if self._candidates > _MOST_JSON_CANDIDATES:
                    self._member = True
                    break
                if self._member_at(lowered, candidate):
                    self._member = True
                    break
            # a run of blanks at the end, as one: a member's `:` may come after any
            stripped = window.rstrip(_BLANKS)
            self._carried = stripped[-_MEMBER_CARRY:] + window[len(stripped) :][:1]
        if self._body is not None:
            self._body += data
            if len(self._body) > _MOST_JSON:
                self._opening, self._body = _opening(self._body), None

    @staticmethod
    def _member_at(window: bytes, candidate: re.Match) -> bool:
        """Whether the `method` at `candidate` is in a member's name that is an
        override's, followed by its `:` (or by blanks to the window's end: undecided
        until the next chunk, where it is carried)."""
        around = max(0, candidate.start() - _NAME_BEFORE), candidate.end() + _NAME_AFTER
        for name in _JSON_NAME.finditer(window, *around):
            after = _AFTER_NAME.match(window, name.end())
            if after is not None and after.group().endswith(b":"):
                return True
        return False

    def end(self) -> None:
        if not self._candidate:
            return
        opening = self._opening if self._body is None else _opening(self._body)
        if self._objects_only and opening not in (b"{", None):
            return  # no parser takes it as an object
        if self._body is None:
            if self._member:
                self._any_method(f"over {_MOST_JSON} bytes, not parsed")
            return
        try:
            members = json.loads(bytes(self._body), object_pairs_hook=_Members)
        except (ValueError, RecursionError):
            if self._member:
                self._any_method("that the gateway cannot parse")
            return
        if not isinstance(members, _Members):
            return  # an array or a scalar: it has no member
        for name, value in members:
            if isinstance(value, list) and value:  # Koa takes an array's first
                value = value[0]
            if isinstance(value, str):
                self._found(
                    name.encode("utf-8", "surrogatepass"), value.encode("utf-8", "surrogatepass")
                )


def _opening(body: bytearray) -> bytes | None:
    """The first byte of a body but a UTF-8 byte order mark and blanks (None: only
    those): `{` where it is an object."""
    return body.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")[:1] or None


def _json_candidates(lowered: bytes):
    """The occurrences of `method` in `lowered` (a body's bytes in lower case), in any
    spelling (`_JSON_CANDIDATE`)."""
    if b"method" not in lowered and not any(escape in lowered for escape in _JSON_ESCAPES):
        return ()  # (found at memchr speed: a body without `method` is the common one)
    return _JSON_CANDIDATE.finditer(lowered)


class _Inflated:
    """A JSON body with Content-Encoding gzip or deflate, inflated as it comes for its
    readers, as Express's body-parser and Koa's parsers inflate it before they parse,
    at most _MOST_INFLATED bytes (a small body may inflate to gigabytes). Past that,
    or one that does not inflate whole (cut short, corrupt, a second gzip member,
    which Node's gunzip reads on), it may name any method."""

    def __init__(self, wbits: int, readers: list, any_method: Callable[[str], None]):
        self._inflater: zlib._Decompress | None = zlib.decompressobj(wbits)
        self._readers, self._any_method = readers, any_method
        self._size = 0

    def feed(self, data: bytes) -> None:
        more = bool(data)
        try:
            while more and self._inflater is not None:
                out = self._inflater.decompress(data, _INFLATE_STEP)
                self._size += len(out)
                if self._size > _MOST_INFLATED:
                    self._stop(f"inflated past {_MOST_INFLATED} bytes")
                    return
                for reader in self._readers:
                    reader.feed(out)
                data = self._inflater.unconsumed_tail
                if self._inflater.eof and (data or self._inflater.unused_data):
                    self._stop("of more than one gzip member")
                    return
                more = bool(data) or len(out) == _INFLATE_STEP  # (output may be pending)
        except zlib.error:
            self._stop("that does not inflate")

    def end(self) -> None:
        if self._inflater is None:
            return
        if not self._inflater.eof:
            self._stop("cut short")
            return
        for reader in self._readers:
            reader.end()

    def _stop(self, why: str) -> None:
        self._any_method(f"compressed, {why}")
        self._inflater = None


class _Members(list):
    """A JSON object's members in order, each one (a name, a value): several of one
    name are all read, whichever a server takes."""


class _Decoded:
    """A body in a charset that is no ASCII superset (FormOverrides): the body, kept
    (at most _MOST_DECODED bytes) to be read decoded at its end."""

    def __init__(self, charset: str):
        self.charset = charset
        self.body = bytearray()


def _compact(name: bytes) -> bytes:
    """A name as `override_name` reads it, bounded: its lead (`_LEAD`) as one space and
    one bracket at most, then at most _MOST_NAME bytes of the rest."""
    lead = _LEAD.match(name)
    return _lead(lead) + name[lead.end() : lead.end() + _MOST_NAME]


def _lead(lead: re.Match) -> bytes:
    return (b" " if lead["spaces"] else b"") + (b"[" if lead["brackets"] else b"")


class _Urlencoded:
    """`a=1&_method=DELETE`: of the fields that end in a chunk, only those named as an
    override are parsed (`_fields_in`); the field a chunk ends in is kept only as far
    as it matters (`_NAME`, then skipped or, for an override, `_VALUE`)."""

    _NAME, _AWAIT_VALUE, _VALUE, _SKIP = range(4)

    def __init__(self, found: Found, refuse: Callable[[str], None]):
        self._found, self._refuse = found, refuse
        self._candidates = 0  # whole fields that hold `method`
        self._state = self._NAME
        self._buffer = bytearray()  # the field so far: its name, or an override's value
        self._key = b""  # an override's name (compacted), in _AWAIT_VALUE and _VALUE

    def feed(self, data: bytes) -> None:
        at, size = 0, len(data)
        while at < size:
            if self._state == self._NAME and not self._buffer:  # at a field's start
                last = max(data.rfind(b"&", at), data.rfind(b";", at))
                if last >= at:  # the fields that end in this chunk, whole
                    self._fields_in(data[at:last])
                    at = last + 1
                    continue
            separator = _SEPARATOR.search(data, at)
            stop = separator.start() if separator else size
            self._go_on(data[at:stop])
            if separator is None:
                return
            self._field_end()
            at = stop + 1

    def end(self) -> None:
        self._field_end()

    def _fields_in(self, region: bytes) -> None:
        """The whole fields of `region`: only those that hold `method` (at C speed),
        then only those named as an override, are parsed."""
        at = 0
        while (candidate := _CANDIDATE.search(region, at)) is not None:
            self._candidates += 1
            if self._candidates > _MOST_CANDIDATES:
                self._refuse(f"more than {_MOST_CANDIDATES} form fields hold 'method'")
                return
            start = max(
                region.rfind(b"&", 0, candidate.start()), region.rfind(b";", 0, candidate.start())
            )
            end = _SEPARATOR.search(region, candidate.end())
            at = end.end() if end else len(region)
            field = region[start + 1 : end.start() if end else len(region)]
            if _OVERRIDE_FIELD.match(field):
                key, equals, value = field.partition(b"=")
                if equals:
                    self._found(_compact(key), value[:_MOST_VALUE])

    def _go_on(self, piece: bytes) -> None:
        """The field being read goes on with `piece` (no separator in it)."""
        if self._state == self._NAME:
            self._buffer += piece
            key, equals, value = self._buffer.partition(b"=")
            if equals:
                self._named(bytes(key), value)
            elif len(self._buffer) > 2 * _MOST_NAME:
                lead = _LEAD.match(self._buffer)
                if len(self._buffer) - lead.end() > _MOST_NAME:  # as far as it matters
                    self._named(bytes(self._buffer), b"", complete=False)
                else:  # a long lead: kept as one of each
                    self._buffer[:] = _lead(lead) + self._buffer[lead.end() :]
        elif self._state == self._AWAIT_VALUE:
            _, equals, value = piece.partition(b"=")
            if equals:
                self._state, self._buffer = self._VALUE, bytearray(value[:_MOST_VALUE])
        elif self._state == self._VALUE and len(self._buffer) < _MOST_VALUE:
            self._buffer += piece[: _MOST_VALUE - len(self._buffer)]

    def _named(self, key: bytes, value: bytes, complete: bool = True) -> None:
        """The field's name is `key` (as far as it matters): an override's, whose value
        is read on, or none, whose field is skipped."""
        self._key = _compact(key)
        if override_name(self._key.decode("latin-1")) is None:
            self._state, self._buffer = self._SKIP, bytearray()
        elif complete:
            self._state, self._buffer = self._VALUE, bytearray(value[:_MOST_VALUE])
        else:
            self._state, self._buffer = self._AWAIT_VALUE, bytearray()

    def _field_end(self) -> None:
        if self._state == self._VALUE:
            self._found(self._key, bytes(self._buffer))
        self._state, self._buffer, self._key = self._NAME, bytearray(), b""


class _Multipart:
    """`--boundary\\r\\nContent-Disposition: form-data; name="_method"\\r\\n\\r\\nDELETE`:
    every occurrence of the delimiter starts a part (where the delimiter is not at a
    line's start too: more parts than a server reads, never fewer); a part's header
    section is read for its name, and an override's value is kept."""

    _CONTENT, _HEAD, _VALUE = range(3)

    def __init__(self, boundary: bytes, found: Found, refuse: Callable[[str], None]):
        self._found, self._refuse = found, refuse
        self._delimiter = b"--" + boundary
        self._parts = 0
        self._state = self._CONTENT
        self._carried = b""  # the end of what was searched: a delimiter may go on from it
        self._buffer = bytearray()  # a part's header section, or an override's value
        self._key = b""

    def feed(self, data: bytes) -> None:
        data = self._carried + data
        at = 0
        while True:
            if self._parts > _MOST_PARTS:
                return  # refused: read no further
            if self._state == self._HEAD:
                if self._buffer:  # a header section begun in an earlier chunk
                    data, at = bytes(self._buffer) + data[at:], 0
                    self._buffer.clear()
                end = _PART_HEAD_END.search(data, at, at + _MOST_PART_HEAD)
                if end is None:
                    if len(data) - at <= _MOST_PART_HEAD:  # it may end in a later chunk
                        self._buffer += data[at:]
                        self._carried = b""
                        return
                    if data.startswith(b"--", at):  # after a closing delimiter: no part
                        self._state = self._CONTENT
                        continue
                    self._refuse(
                        f"a multipart part's header section is over {_MOST_PART_HEAD} bytes"
                    )
                    return
                if end[0] != b"\r\n\r\n":
                    # Rack and undici end a header section at the first CRLF CRLF only,
                    # PHP at a bare LF's blank line too: a part whose names differ.
                    self._refuse("a multipart part's header section not ended by CRLF CRLF")
                    return
                head, at = data[at : end.end()], end.end()
                self._part(head)
                continue
            found = data.find(self._delimiter, at)
            if found < 0:
                keep = max(at, len(data) - len(self._delimiter) + 1)
                self._keep_value(data[at:keep])
                self._carried = data[keep:]
                return
            self._keep_value(data[at:found])
            if self._state == self._VALUE:
                self._found(
                    self._key, bytes(self._buffer).removesuffix(b"\r\n").removesuffix(b"\n")
                )
            self._state, self._buffer = self._HEAD, bytearray()
            at = found + len(self._delimiter)

    def end(self) -> None:
        if self._state == self._VALUE:  # a value without a closing delimiter
            self._keep_value(self._carried)
            self._found(self._key, bytes(self._buffer))

    def _keep_value(self, piece: bytes) -> None:
        if self._state == self._VALUE and len(self._buffer) < _MOST_VALUE:
            self._buffer += piece[: _MOST_VALUE - len(self._buffer)]

    def _part(self, head: bytes) -> None:
        """A part's header section: its value is kept if its name is an override's."""
        self._parts += 1
        if self._parts > _MOST_PARTS:
            self._refuse(f"more than {_MOST_PARTS} multipart parts")
        self._state = self._CONTENT
        if not _CANDIDATE.search(head.replace(b"\\", b"")):  # (`"_m\ethod"` is `_method`)
            return
        names = []
        for star, quoted, single, bare in _PART_NAME.findall(head):
            if star:  # RFC 5987: charset'language'escaped
                names.append((quoted or single or bare).rpartition(b"'")[2].strip())
            elif quoted or single:
                names.append(_ESCAPED_CHARACTER.sub(rb"\1", quoted) if quoted else single)
            else:  # as written, and to its first blank (PHP ends it there)
                names += [bare.strip(), *bare.split()[:1]]
        names += [found.strip().strip(b"<>") for found in _CONTENT_ID.findall(head)]
        for name in names:
            if override_name(_compact(name).decode("latin-1")) is not None:
                self._state, self._key = self._VALUE, _compact(name)
                return
