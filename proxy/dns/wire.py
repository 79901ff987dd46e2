"""The DNS filter's fast path, pure: the shape nearly every stub sends and nearly
every resolver answers, read and written as bytes.

dnspython builds an object for every name, rdata and enum of a message, and an
allowed query used to go through it four times (parse the query, render the
forwarded one, parse the answer, render ours): about half of the filter's time.
Here the common case costs a few slices instead:

- `scan_query`: one A or AAAA question of class IN, opcode QUERY, a name of plain
  labels (letters, digits, `-`, `_`), at most an EDNS 0 OPT record; else None.
- `forward_query`: the query the upstream gets (our id space, the canonical name,
  our EDNS payload, no options), as `dns.message.make_query` would write it.
- `scan_answer`: the upstream's answer, every record's header walked (so a
  malformed answer is never taken for a good one); else None.
- `render_simple`: a response echoing the client's question and EDNS.

None is never an error: it says "ask dnspython" (`query.check_query`,
`answer.filter_answer`), which answers everything, the odd and the malformed, as
before. Which answers the fast path may send is `answer.filter_simple_answer`'s
business; this module only reads and writes.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

# What we advertise and send upstream: the DNS Flag Day 2020 size, which avoids IP
# fragmentation (and the spoofing that fragments allow).
OUR_PAYLOAD = 1232

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_PLAIN_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")
A, CNAME, OPT, AAAA = 1, 5, 41, 28
CLASS_IN = 1
QTYPE_TEXT = {A: "A", AAAA: "AAAA"}
RCODE_TEXT = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
# EDNS options whose content dnspython reads, and may refuse as malformed
# (dns.edns._type_to_class: ECS, EDE, NSID, COOKIE, REPORT-CHANNEL, and EDE's and
# filtering's texts; tests/unit/test_dns.py keeps the two in step). The fast path
# would forward a query with a malformed one, whose answer the full filter then could
# not read back (DnsFilter._filtered): such a query goes to check_query, which
# answers it FORMERR. A cookie, which dig sends with every query, is checked here.
_PARSED_OPTIONS = frozenset({3, 8, 15, 18, 22, 23, 24, 25})
_COOKIE = 10
_COOKIE_SIZES = frozenset({8, *range(16, 41)})  # a client cookie, a server's 8-32 more
_QR, _RD, _RA, _TC = 0x8000, 0x0100, 0x0080, 0x0200
_OUR_OPT = b"\0" + _RR.pack(OPT, OUR_PAYLOAD, 0, 0)  # EDNS 0, no flags, no options
MAX_POINTERS = 32  # compression pointers followed per name; real ones use 1-3


class SimpleQuery(NamedTuple):
    """One query of the common shape. `question` is the question section as the
    client sent it (its spelling, for 0x20 clients); `name` is that name as text
    without the final dot; `payload` the client's EDNS payload, None without EDNS."""

    id: int
    flags: int
    question: bytes
    name: str
    qtype: int
    payload: int | None


class ScannedAnswer(NamedTuple):
    """An answer of the common shape: only CNAME and `qtype` records of class IN in
    the answer section (names lower case, without the final dot).
    `cnames[owner] = (target, ttl)`; `records[owner] = ({rdata: None}, ttl)`, the
    rdata deduplicated in order and the TTL the smallest seen, as dnspython merges
    an RRset."""

    rcode: int
    truncated: bool
    cnames: dict[str, tuple[str, int]]
    records: dict[str, tuple[dict[bytes, None], int]]


class _NotSimple(Exception):
    """Internal: the message is not of the common shape; the caller returns None."""


def scan_query(wire: bytes) -> SimpleQuery | None:
    """The query in `wire` when it has the common shape, else None."""
    try:
        return _scan_query(wire)
    except (_NotSimple, IndexError, struct.error):
        return None


def _scan_query(wire: bytes) -> SimpleQuery:
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    # QR clear, opcode QUERY, no rcode bits; one question, nothing else but an OPT.
    if flags & 0xF80F or qdcount != 1 or ancount or nscount or arcount > 1:
        raise _NotSimple
    labels, offset = [], 12
    while length := wire[offset]:
        label = wire[offset + 1 : offset + 1 + length]
        if length > 63 or not _PLAIN_LABEL.fullmatch(label):
            raise _NotSimple  # a pointer, an escape dnspython would print, or short data
        labels.append(label)
        offset += 1 + length
    qtype, qclass = struct.unpack_from("!HH", wire, offset + 1)
    end = question_end = offset + 5
    if not labels or offset + 1 - 12 > 255 or qclass != CLASS_IN or qtype not in QTYPE_TEXT:
        raise _NotSimple
    payload = None
    if arcount:
        # OPT: root owner, type 41, class = payload size, TTL = extended rcode,
        # version, flags; the options are walked but never forwarded.
        if wire[end : end + 3] != b"\0\0\x29":
            raise _NotSimple
        payload, ttl, rdlength = struct.unpack_from("!HIH", wire, end + 3)
        if ttl & 0xFFFF0000:  # an extended rcode, or EDNS version > 0: BADVERS
            raise _NotSimple
        end += 11
        options_end = end + rdlength
        while end < options_end:
            code, size = struct.unpack_from("!HH", wire, end)
            if code in _PARSED_OPTIONS or (code == _COOKIE and size not in _COOKIE_SIZES):
                raise _NotSimple
            end += 4 + size
        if end != options_end:
            raise _NotSimple
    if end != len(wire):
        raise _NotSimple  # trailing bytes: dnspython calls that malformed
    name = b".".join(labels).decode("ascii")
    return SimpleQuery(qid, flags, bytes(wire[12:question_end]), name, qtype, payload)


def end_of_question(wire: bytes) -> int:
    """Where the first question of `wire` (uncompressed, as a query has it) ends."""
    offset = 12
    while length := wire[offset]:
        offset += 1 + length
    return offset + 5


def forward_query(name: str, qtype: int) -> bytes:
    """The query for canonical `name` and `qtype` to send upstream: id 0 (the
    upstream socket sets its own), RD, our EDNS payload, no options."""
    question = encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    return _HEADER.pack(0, _RD, 1, 0, 0, 1) + question + _OUR_OPT


def render_simple(query: SimpleQuery, rcode: int, records: bytes = b"", count: int = 0) -> bytes:
    """The response to `query` with `rcode` and `count` answer records (`records`,
    already wire bytes): flags as `query.make_response` sets them (QR, RD copied,
    RA), the client's question, our OPT when the client sent one."""
    flags = _QR | (query.flags & _RD) | _RA | rcode
    edns = query.payload is not None
    header = _HEADER.pack(query.id, flags, 1, count, 0, 1 if edns else 0)
    return header + query.question + records + (_OUR_OPT if edns else b"")


def size_limit(query: SimpleQuery, *, udp: bool) -> int:
    """The largest response the client takes (as `answer.render` computes it)."""
    if not udp:
        return 65535
    if query.payload is None:
        return 512
    return max(512, min(query.payload, OUR_PAYLOAD))


def scan_answer(wire: bytes, qtype: int, qname: str) -> ScannedAnswer | None:
    """The upstream answer in `wire` when it has the common shape, else None. The
    caller has checked its id and question (`upstream.UdpUpstream`): `qname`, the
    name asked (canonical), is what the question holds, up to case, so an owner that
    points at the question (nearly every record's) is `qname` without a read."""
    try:
        return _scan_answer(wire, qtype, qname)
    except (_NotSimple, IndexError, struct.error, UnicodeDecodeError):
        return None


def _scan_answer(wire: bytes, qtype: int, qname: str) -> ScannedAnswer:
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    # A response to a QUERY; nothing in the authority section (a negative answer's
    # SOA is the full filter's); at most an OPT without options in the additional
    # one (dnspython validates what options say; the full filter has it do so).
    if not flags & _QR or flags & 0x7800 or qdcount != 1 or nscount or arcount > 1:
        raise _NotSimple
    offset = end_of_question(wire)
    cnames: dict[str, tuple[str, int]] = {}
    records: dict[str, tuple[dict[bytes, None], int]] = {}
    for _ in range(ancount):
        if wire[offset] == 0xC0 and wire[offset + 1] == 12:  # a pointer to the question
            owner, offset = qname, offset + 2
        else:
            owner, offset = read_name(wire, offset)
        rdtype, rdclass, ttl, rdlength = _RR.unpack_from(wire, offset)
        offset += 10
        rdata = wire[offset : offset + rdlength]
        if rdclass != CLASS_IN or len(rdata) != rdlength:
            raise _NotSimple
        if ttl > 0x7FFFFFFF:  # RFC 2181 §8: a TTL with the top bit set means 0
            ttl = 0
        if rdtype == CNAME:
            target, end = read_name(wire, offset)
            if end != offset + rdlength or owner in cnames:
                raise _NotSimple  # junk after the name; or two CNAMEs for one name
            cnames[owner] = (target, ttl)
        elif rdtype == qtype and rdlength == (4 if qtype == A else 16):
            rdatas, smallest = records.get(owner, ({}, ttl))
            rdatas[bytes(rdata)] = None
            records[owner] = (rdatas, min(smallest, ttl))
        else:
            raise _NotSimple  # DNAME, RRSIG, another type: the full filter
        offset += rdlength
    if arcount:
        if wire[offset : offset + 3] != b"\0\0\x29":
            raise _NotSimple
        _, ttl, rdlength = struct.unpack_from("!HIH", wire, offset + 3)
        if ttl >> 24 or rdlength:  # an extended rcode, or options
            raise _NotSimple
        offset += 11
    if offset != len(wire):
        raise _NotSimple
    return ScannedAnswer(flags & 0xF, bool(flags & _TC), cnames, records)


def read_name(wire: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` (compression pointers followed, backwards only), lower
    case, without the final dot ("" for the root), and where it ends in `wire`."""
    labels, end, hops = [], None, 0
    while length := wire[offset]:
        if length >= 0xC0:  # a pointer
            target = (length & 0x3F) << 8 | wire[offset + 1]
            if target >= offset or hops == MAX_POINTERS:
                raise _NotSimple
            hops += 1
            end = end or offset + 2
            offset = target
            continue
        label = wire[offset + 1 : offset + 1 + length]
        if length > 63 or not _PLAIN_LABEL.fullmatch(label):
            raise _NotSimple
        labels.append(label)
        offset += 1 + length
    name = b".".join(labels).lower().decode("ascii")
    if len(name) > 253:
        raise _NotSimple
    return name, end or offset + 1


def encode_name(name: str) -> bytes:
    """Wire form of a lower-case plain `name` without the final dot ("" is the root)."""
    if not name:
        return b"\0"
    labels = name.encode("ascii").split(b".")
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def encode_record(owner: bytes, rdtype: int, ttl: int, rdata: bytes) -> bytes:
    """One class-IN record; `owner` already in wire form (or a pointer)."""
    return owner + _RR.pack(rdtype, CLASS_IN, ttl, len(rdata)) + rdata
