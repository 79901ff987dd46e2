"""Checking a DNS query, pure: which questions are asked, of which types, for which
names. No sockets, no clock.

The response code for each failed check, and why: see the package docstring.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable
from typing import Literal, NamedTuple

import dns.flags
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from sandgate.proxy.dns.wire import (
    OUR_PAYLOAD,
    QTYPE_TEXT,
    SimpleQuery,
    forward_query,
    render_simple,
    scan_query,
)
from sandgate.proxy.policy.builtin import deny
from sandgate.proxy.policy.model import Decision
from sandgate.proxy.policy.names import InvalidName, parse_domain
from sandgate.proxy.policy.reasons import Verdict

log = logging.getLogger("sandgate.dns")

DecideName = Callable[[str, str], Decision]
"""`decide_name(profile, canonical_name) -> Decision`; the gateway passes
`lambda p, n: decide(policy, NameFacts(p, n))`."""

ALLOWED_QTYPES = frozenset(
    {dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME, dns.rdatatype.HTTPS}
)
# A stub resolver's query is one question and at most one OPT record, a few hundred
# bytes. A bigger one, or one with records in its other sections, is refused before
# dnspython parses it: 64 KiB (TCP, or a fragmented datagram) of thousands of records
# whose names chain compression pointers costs ~200 ms of the event loop to parse.
MAX_QUERY_BYTES = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class QueryCheck:
    """What to do with one query, and the decision its event reports.

    Exactly one of three actions (see `action`):
    - forward: `forward` is the canonical query to send upstream (fresh id, the
      canonical name, no client EDNS options); afterwards `filter_answer(query, ...)`.
    - respond: `response` is the complete answer to send back now. It is always
      small (header, question, OPT), so it fits any transport unchanged.
    - drop: neither; send nothing.

    `name` is the canonical name, or the question as dnspython prints it when it is
    not a valid host name, or None when there is no question; `qtype` likewise.
    """

    decision: Decision
    query: dns.message.Message | None = None
    forward: dns.message.Message | None = None
    response: bytes | None = None
    name: str | None = None
    qtype: str | None = None

    @property
    def action(self) -> Literal["forward", "respond", "drop"]:
        if self.forward is not None:
            return "forward"
        return "respond" if self.response is not None else "drop"


def check_query(wire: bytes, profile: str, decide_name: DecideName) -> QueryCheck:
    """Check one query from a sandbox of `profile`. Never raises.

    Checks in order, the first failing one answers (table in the package docstring):
    0. the shape, from the header, before parsing (`_shape_problem`); 1. parse; 2. it is a query (QR clear); 3. opcode QUERY; 4. one question;
    5. EDNS version 0 or none; 6. class IN; 7. an allowed type; 8. a valid host
    name; 9. the policy allows the name for the profile.
    """
    import dns.message  # the slow path's (package docstring, "Imports")

    problem = _shape_problem(wire)
    if problem is not None:
        return _unparsable(wire, problem)
    try:
        query = dns.message.from_wire(wire)
    except Exception as e:  # noqa: BLE001 - dnspython raises many types here (FormError, BadPointer, ValueError ...): all mean "malformed"
        return _unparsable(wire, f"unparsable query: {type(e).__name__}: {e}")

    # 2. Never answer a response: two servers could bounce FORMERRs forever.
    if query.flags & dns.flags.QR:
        return QueryCheck(deny("dns-malformed", "a response, not a query"))
    # 3. UpdateMessage and friends have other section semantics: decide before reading them.
    opcode = query.opcode()
    if opcode != dns.opcode.QUERY:
        return _answer(
            query,
            dns.rcode.NOTIMP,
            deny("dns-qtype", f"opcode {dns.opcode.to_text(opcode)}{_names_in(query)}"),
            copy_question=False,
        )
    # 4. Several questions would need several decisions; no real client sends them.
    if len(query.question) != 1:
        return _answer(
            query,
            dns.rcode.FORMERR,
            deny("dns-malformed", f"{len(query.question)} questions{_names_in(query)}"),
            copy_question=False,
        )
    question = query.question[0]
    qtype = dns.rdatatype.to_text(question.rdtype)
    raw_name = question.name.to_text(omit_final_dot=True)
    # 5. RFC 6891 §6.1.3: an unknown EDNS version gets BADVERS.
    if query.edns > 0:
        return _answer(
            query,
            dns.rcode.BADVERS,
            deny("dns-malformed", f"EDNS version {query.edns}"),
            name=raw_name,
            qtype=qtype,
        )
    # 6./7. Only what a connection needs: addresses, aliases, and HTTPS (ALPN).
    if question.rdclass != dns.rdataclass.IN or question.rdtype not in ALLOWED_QTYPES:
        rdclass = dns.rdataclass.to_text(question.rdclass)
        return _answer(
            query,
            dns.rcode.REFUSED,
            deny("dns-qtype", f"{rdclass} {qtype} is not answered"),
            name=raw_name,
            qtype=qtype,
        )
    # 8. The policy only ever sees canonical names (names.parse_domain).
    try:
        name = parse_domain(raw_name)
    except InvalidName as e:
        return _answer(
            query,
            dns.rcode.NXDOMAIN,
            deny("dns-invalid-name", str(e)),
            name=raw_name,
            qtype=qtype,
        )
    # 9. The policy. A bug there fails closed, and the event still names the query.
    try:
        decision = decide_name(profile, name)
    except Exception:  # noqa: BLE001 - fail closed, report, keep serving
        log.exception("decide_name(%r, %r) failed", profile, name)
        return _answer(
            query,
            dns.rcode.SERVFAIL,
            deny("internal-error", "policy decision failed"),
            name=name,
            qtype=qtype,
        )
    if not decision.allowed:
        return _answer(query, dns.rcode.NXDOMAIN, decision, name=name, qtype=qtype)
    # A fresh query, so nothing the client chose (id, case, EDNS options such as
    # client-subnet or padding) reaches the upstream except the allowed question.
    forward = dns.message.make_query(name, question.rdtype, use_edns=0, payload=OUR_PAYLOAD)
    return QueryCheck(decision, query=query, forward=forward, name=name, qtype=qtype)


class QuickCheck(NamedTuple):
    """`check_query`'s answer for a query of the common shape (`wire.SimpleQuery`):
    `forward` (bytes, the id left to the upstream socket) or `response` (bytes);
    `name` is canonical. A tuple: made for every query, where a frozen dataclass's
    field stores cost a tenth of `quick_check`."""

    decision: Decision
    query: SimpleQuery
    name: str
    qtype: str
    forward: bytes | None = None
    response: bytes | None = None


def quick_check(wire: bytes, profile: str, decide_name: DecideName) -> QuickCheck | None:
    """`check_query` on the bytes, for one A or AAAA question of a plain host name
    (`wire.scan_query`): checks 1-7 hold by that shape, 8 and 9 are made as there.
    None, so that `check_query` answers, for any other query, a name `parse_domain`
    rejects, or a policy that raised (check_query asks again, logs and fails closed).
    """
    query = scan_query(wire)
    if query is None:
        return None
    try:
        name = parse_domain(query.name)
        decision = decide_name(profile, name)
    except Exception:  # noqa: BLE001 - check_query says why
        return None
    if decision.verdict is Verdict.ASK:  # a human decides: the placeholder path answers
        return None
    qtype = QTYPE_TEXT[query.qtype]
    if not decision.allowed:
        response = render_simple(query, dns.rcode.NXDOMAIN)
        return QuickCheck(decision, query, name, qtype, response=response)
    return QuickCheck(decision, query, name, qtype, forward=forward_query(name, query.qtype))


def _answer(
    query: dns.message.Message,
    rcode: dns.rcode.Rcode,
    decision: Decision,
    *,
    name: str | None = None,
    qtype: str | None = None,
    copy_question: bool = True,
) -> QueryCheck:
    """A QueryCheck that answers now with an empty response of `rcode`."""
    response = make_response(query, copy_question=copy_question)
    response.set_rcode(rcode)
    wire = response.to_wire(max_size=512, prefer_truncation=True)
    return QueryCheck(decision, query=query, response=wire, name=name, qtype=qtype)


def refused(check: QueryCheck, wire: bytes) -> bytes | None:
    """REFUSED for a query that `check` looked at but the gateway will not serve
    after all (its sandbox is over its rate): with the question when there is one,
    so that the stub takes it as the answer; None where nothing may be answered."""
    query = check.query
    if query is None:
        return header_response(wire, dns.rcode.REFUSED)
    one_question = len(query.question) == 1
    return _answer(query, dns.rcode.REFUSED, check.decision, copy_question=one_question).response


def _shape_problem(wire: bytes) -> str | None:
    """Why `wire` is no query worth parsing (see MAX_QUERY_BYTES), or None."""
    if len(wire) > MAX_QUERY_BYTES:
        return f"{len(wire)} bytes; a query has at most {MAX_QUERY_BYTES}"
    if len(wire) < 12 or wire[2] & 0x80:
        return None  # the parser says what is wrong; a response is never answered
    _, answers, authority, additional = struct.unpack_from("!HHHH", wire, 4)
    if answers or authority or additional > 1:
        return (
            f"{answers} answer, {authority} authority, {additional} additional records "
            "in a query; at most one (OPT) additional"
        )
    return None


def _names_in(query: dns.message.Message, most: int = 4) -> str:
    """The names of a query refused whole, for its event: which destinations (and
    what data in their labels) the task tried, as dnspython prints them (escaped)."""
    names = [q.name.to_text(omit_final_dot=True)[:100] for q in query.question[:most]]
    more = len(query.question) - most
    return f": {', '.join(names)}" + (f" and {more} more" if more > 0 else "") if names else ""


def _unparsable(wire: bytes, detail: str) -> QueryCheck:
    decision = deny("dns-malformed", detail)
    return QueryCheck(decision, response=header_response(wire, dns.rcode.FORMERR))


def header_response(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare 12-byte header answering `wire` with `rcode`, for when `wire` cannot
    be parsed: id, opcode and RD copied when readable. None when there is no id to
    answer, or when `wire` claims to be a response itself (QR set)."""
    if len(wire) < 2:
        return None
    flags = dns.flags.QR
    if len(wire) >= 3:
        if wire[2] & 0x80:  # QR
            return None
        flags |= (wire[2] & 0x79) << 8  # opcode and RD
    return struct.pack("!HHHHHH", int.from_bytes(wire[:2], "big"), flags | rcode, 0, 0, 0, 0)


def make_response(query: dns.message.Message, *, copy_question: bool = True) -> dns.message.Message:
    """`dns.message.make_response` with the gateway's flags: RA set (we resolve),
    our EDNS payload size."""
    import dns.message

    return dns.message.make_response(
        query,
        recursion_available=True,
        our_payload=OUR_PAYLOAD,
        copy_mode=None if copy_question else dns.message.CopyMode.NOTHING,
    )
