"""The DNS filter: decision point 1 (DESIGN.md, "Decision points").

Sandboxes resolve through this filter only (nftables redirects their port-53 UDP and
TCP here). For each query it asks the policy whether the sandbox's profile may
reach the name at all; only allowed questions of an allowed type are forwarded to
the upstream resolver, and the upstream answer is edited before it reaches the
sandbox: addresses in private ranges are removed (DNS rebinding), HTTPS records lose
their ECH config (the gateway must see the real SNI), and whatever the gateway
answered is remembered as a binding (sandbox, name -> IP) for the connection checks.

Three layers, as dnspython itself splits them (`dns.message` vs `dns.asyncquery`):

- `check_query` and `filter_answer` are pure: wire bytes or `dns.message.Message`
  in, messages and a `Decision` out. No sockets, no clock.
- `DnsBindings` is the state the connection checks read (O(1) lookups, bounded).
- `DnsFilter` is the asyncio server: UDP and TCP listeners, the upstream queries,
  one `Event` per query.

Response codes, and why. Each comes with the Decision its event reports; all but
the policy's own are DENY with a `builtin:dns-*` rule (an upstream failure too: the
sandbox got no address):

==============================================  =========  ========================
query                                           rcode      reason
==============================================  =========  ========================
unparsable, id readable                         FORMERR    DNS_MALFORMED
unparsable, < 2 bytes; or a response (QR set)   (dropped)  DNS_MALFORMED
opcode other than QUERY (NOTIFY, UPDATE, ...)   NOTIMP     DNS_QTYPE_NOT_ALLOWED
not exactly one question                        FORMERR    DNS_MALFORMED
EDNS version > 0                                BADVERS    DNS_MALFORMED
class other than IN (CH, HS, ANY)               REFUSED    DNS_QTYPE_NOT_ALLOWED
type other than A, AAAA, CNAME, HTTPS           REFUSED    DNS_QTYPE_NOT_ALLOWED
name not a host name (IP literal, NUL, ...)     NXDOMAIN   INVALID_NAME
name the profile may not reach                  NXDOMAIN   the policy's (RULE_DENY ..)
source address of no sandbox                    REFUSED    UNKNOWN_SANDBOX
upstream timeout, SERVFAIL, REFUSED, garbage    SERVFAIL   DNS_UPSTREAM_FAILURE
too many of the sandbox's queries in flight     SERVFAIL   CONNECTION_LIMIT
some addresses in the answer were private       NOERROR,   DNS_REBINDING
                                                the rest
every address in the answer was private         NOERROR,   DNS_REBINDING
                                                no data
a bug in the filter                             SERVFAIL   INTERNAL_ERROR
==============================================  =========  ========================

- NOTIMP vs REFUSED: NOTIMP says "this server does not implement that kind of
  request" (RFC 1035), true for every opcode but QUERY. REFUSED says "will not, for
  policy reasons", which is what a TXT/MX/ANY/AXFR or CHAOS-class query meets: the
  type is understood but not served. Neither claims anything about the name.
- A disallowed *type* is not NXDOMAIN: NXDOMAIN means the name has no records of
  any type (RFC 8020), so a caching stub could then fail the A lookup of an allowed
  name because its TXT lookup was refused.
- A disallowed *name* is NXDOMAIN, so that clients fail fast with "unknown host"
  rather than retrying (as they do on SERVFAIL and, with several servers, REFUSED).
- Rebinding: when every address was removed the answer is NOERROR with no data and
  no SOA, i.e. "no usable record of this type", not cached (RFC 2308 §5). NXDOMAIN
  would be a lie about the name and could hide the other address family (a name
  with a public A and a loopback AAAA must still resolve over IPv4).
- `Verdict.ASK` from the policy is answered like DENY: a DNS client gives up after
  ~5 s, far too soon to hold the query for a human, and forwarding the name would
  already leak it upstream (DNS exfiltration).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, NamedTuple

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.svcbbase import IPv4HintParam, IPv6HintParam, ParamKey
from sandgate.proxy.policy.model import Decision, builtin_rule
from sandgate.proxy.policy.names import (
    InvalidName,
    IPAddress,
    canonical_ip,
    parse_domain,
    special_range,
)
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventKind, EventSink

log = logging.getLogger("sandgate.dns")

DecideName = Callable[[str, str], Decision]
"""`decide_name(profile, canonical_name) -> Decision`; the gateway passes
`lambda p, n: decide(policy, NameFacts(p, n))`."""

SandboxFor = Callable[[str], "tuple[str, str] | None"]
"""`sandbox_for(source_ip) -> (sandbox_id, profile)`, or None for a stranger."""

KeepSpecial = Callable[[IPAddress], bool]
"""Whether a private/loopback/... address may stay in an answer: True only where a
CIDR rule names the range explicitly (DESIGN.md, "Policy semantics")."""

Binding = tuple[str, str, int]
"""(canonical name, canonical IP text, TTL seconds): the gateway answered name with IP."""

ALLOWED_QTYPES = frozenset(
    {dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME, dns.rdatatype.HTTPS}
)
# What we advertise and send upstream: the DNS Flag Day 2020 size, which avoids IP
# fragmentation (and the spoofing that fragments allow).
OUR_PAYLOAD = 1232
# Longer CNAME chains are broken or hostile; real ones are 1-3 links.
MAX_CHAIN = 16


def _deny(reason: Reason, rule_id: str, detail: str) -> Decision:
    return Decision(Verdict.DENY, reason, builtin_rule(rule_id), detail=detail)


# --- checking a query ------------------------------------------------------------


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

    Checks in order, the first failing one answers (table in the module docstring):
    1. parse; 2. it is a query (QR clear); 3. opcode QUERY; 4. one question;
    5. EDNS version 0 or none; 6. class IN; 7. an allowed type; 8. a valid host
    name; 9. the policy allows the name for the profile.
    """
    try:
        query = dns.message.from_wire(wire)
    except Exception as e:  # noqa: BLE001 - dnspython raises many types here (FormError, BadPointer, ValueError ...): all mean "malformed"
        return _unparsable(wire, f"unparsable query: {type(e).__name__}: {e}")

    # 2. Never answer a response: two servers could bounce FORMERRs forever.
    if query.flags & dns.flags.QR:
        return QueryCheck(_deny(Reason.DNS_MALFORMED, "dns-malformed", "a response, not a query"))
    # 3. UpdateMessage and friends have other section semantics: decide before reading them.
    opcode = query.opcode()
    if opcode != dns.opcode.QUERY:
        return _answer(
            query,
            dns.rcode.NOTIMP,
            _deny(
                Reason.DNS_QTYPE_NOT_ALLOWED, "dns-qtype", f"opcode {dns.opcode.to_text(opcode)}"
            ),
            copy_question=False,
        )
    # 4. Several questions would need several decisions; no real client sends them.
    if len(query.question) != 1:
        return _answer(
            query,
            dns.rcode.FORMERR,
            _deny(Reason.DNS_MALFORMED, "dns-malformed", f"{len(query.question)} questions"),
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
            _deny(Reason.DNS_MALFORMED, "dns-malformed", f"EDNS version {query.edns}"),
            name=raw_name,
            qtype=qtype,
        )
    # 6./7. Only what a connection needs: addresses, aliases, and HTTPS (ALPN).
    if question.rdclass != dns.rdataclass.IN or question.rdtype not in ALLOWED_QTYPES:
        rdclass = dns.rdataclass.to_text(question.rdclass)
        return _answer(
            query,
            dns.rcode.REFUSED,
            _deny(Reason.DNS_QTYPE_NOT_ALLOWED, "dns-qtype", f"{rdclass} {qtype} is not answered"),
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
            _deny(Reason.INVALID_NAME, "dns-invalid-name", str(e)),
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
            _deny(Reason.INTERNAL_ERROR, "internal-error", "policy decision failed"),
            name=name,
            qtype=qtype,
        )
    if not decision.allowed:
        return _answer(query, dns.rcode.NXDOMAIN, decision, name=name, qtype=qtype)
    # A fresh query, so nothing the client chose (id, case, EDNS options such as
    # client-subnet or padding) reaches the upstream except the allowed question.
    forward = dns.message.make_query(name, question.rdtype, use_edns=0, payload=OUR_PAYLOAD)
    return QueryCheck(decision, query=query, forward=forward, name=name, qtype=qtype)


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


def _unparsable(wire: bytes, detail: str) -> QueryCheck:
    decision = _deny(Reason.DNS_MALFORMED, "dns-malformed", detail)
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
    return dns.message.make_response(
        query,
        recursion_available=True,
        our_payload=OUR_PAYLOAD,
        copy_mode=None if copy_question else dns.message.CopyMode.NOTHING,
    )


# --- filtering an answer ---------------------------------------------------------


class FilteredAnswer(NamedTuple):
    """`response` to send (render it with `render`); `decision` when the filter
    removed something for policy reasons or the upstream failed, None when the
    query's decision stands; `bindings` to record for the sandbox."""

    response: dns.message.Message
    decision: Decision | None
    bindings: list[Binding]


def upstream_failure(query: dns.message.Message, detail: str) -> FilteredAnswer:
    """SERVFAIL: the upstream gave no usable answer. Clients retry on SERVFAIL."""
    response = make_response(query)
    response.set_rcode(dns.rcode.SERVFAIL)
    return FilteredAnswer(response, _deny(Reason.DNS_UPSTREAM_FAILURE, "dns-upstream", detail), [])


def filter_answer(
    query: dns.message.Message,
    upstream: bytes | dns.message.Message | None,
    *,
    keep_special: KeepSpecial | None = None,
) -> FilteredAnswer:
    """The response to `query` (a forwarded client query) built from the upstream's
    answer (wire bytes, a parsed message, or None for no answer). Never raises,
    whatever the upstream sent.

    Only the chain that answers the question is copied: CNAMEs from the question
    name, then the records of the question's type at the chain's end, and the SOA of
    a negative answer. Everything else (extra records, additional section, DNSSEC)
    is left out. On the way:
    - A/AAAA in private, loopback, link-local, CGNAT, multicast, unspecified or
      reserved ranges are removed (unless `keep_special(ip)`): DNS_REBINDING;
    - HTTPS records lose `ech` (else the client would encrypt the real SNI and the
      gateway could not decide on it); a record that lists ech as mandatory is
      dropped, as a client could not use it without. Special-range `ipv4hint`/
      `ipv6hint` addresses are removed like A/AAAA records.
    Bindings name the question and every CNAME owner in the chain (the names the
    client asked for, or was told are aliases of it) with each address it may use,
    but not the chain's final target, which the client never asked for.
    """
    question = query.question[0]
    if upstream is None:
        return upstream_failure(query, "no answer from the upstream resolvers")
    if not isinstance(upstream, dns.message.Message):
        try:
            upstream = dns.message.from_wire(upstream)
        except Exception as e:  # noqa: BLE001 - any parse error is the upstream's fault
            return upstream_failure(query, f"unparsable upstream answer: {type(e).__name__}")
    asked = upstream.question
    if len(asked) != 1 or (asked[0].name, asked[0].rdclass, asked[0].rdtype) != (
        question.name,
        question.rdclass,
        question.rdtype,
    ):
        return upstream_failure(query, "upstream answered another question")
    rcode = upstream.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return upstream_failure(query, f"upstream answered {dns.rcode.to_text(rcode)}")

    response = make_response(query)
    response.set_rcode(rcode)
    negative = [rrset for rrset in upstream.authority if rrset.rdtype == dns.rdatatype.SOA]
    chain, target = _follow_cnames(upstream, question.name, question.rdtype)
    records = None
    if question.rdtype != dns.rdatatype.CNAME:
        records = upstream.get_rrset(upstream.answer, target, dns.rdataclass.IN, question.rdtype)
    if records is None:  # NXDOMAIN, NODATA, or a chain ending in either
        response.answer = chain
        response.authority = negative
        return FilteredAnswer(response, None, [])

    keep_special = keep_special or (lambda ip: False)
    if question.rdtype == dns.rdatatype.HTTPS:
        kept, addresses, removed = _filter_https(records, keep_special)
    else:
        kept, removed = [], []
        for rd in records:
            kind = _special(rd.address, keep_special)
            if kind is None:
                kept.append(rd)
            else:
                removed.append(f"{rd.address} ({kind})")
        addresses = [rd.address for rd in kept]

    decision = None
    if removed:
        decision = _deny(
            Reason.DNS_REBINDING,
            "dns-rebinding",
            f"removed {', '.join(removed)}; {len(addresses)} address(es) left",
        )
    if kept:
        response.answer = [*chain, dns.rrset.from_rdata_list(target, records.ttl, kept)]
    # else: NOERROR, no data, no SOA: "nothing usable", not cached (see module doc).

    names = []
    for owner in [rrset.name for rrset in chain] or [question.name]:
        with contextlib.suppress(InvalidName):
            names.append(parse_domain(owner.to_text(omit_final_dot=True)))
    bindings = [(name, str(_ip(address)), records.ttl) for name in names for address in addresses]
    return FilteredAnswer(response, decision, bindings)


def _follow_cnames(
    upstream: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
) -> tuple[list[dns.rrset.RRset], dns.name.Name]:
    """The CNAME RRsets leading from `qname` through the answer, and the name at the
    end of the chain (which owns the records asked for)."""
    chain, name, seen = [], qname, {qname}
    for _ in range(MAX_CHAIN):
        cname = upstream.get_rrset(upstream.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            break
        chain.append(cname)
        name = cname[0].target
        # A CNAME question wants only the first link; a loop ends where it closes.
        if qtype == dns.rdatatype.CNAME or name in seen:
            break
        seen.add(name)
    return chain, name


def _ip(text: str | IPAddress) -> IPAddress:
    if isinstance(text, str):
        text = ipaddress.ip_address(text)
    return canonical_ip(text)


def _special(address: str, keep_special: KeepSpecial) -> str | None:
    """The special range `address` is in, unless `keep_special` lets it through;
    None for a usable address."""
    ip = _ip(address)
    kind = special_range(ip)
    return None if kind is None or keep_special(ip) else kind


def _filter_https(
    records: dns.rrset.RRset, keep_special: KeepSpecial
) -> tuple[list[dns.rdata.Rdata], list[str], list[str]]:
    """HTTPS records without ech and without special-range hints: (kept records,
    hint addresses kept, descriptions of addresses removed)."""
    kept, addresses, removed = [], [], []
    for rd in records:
        params = dict(rd.params)
        params.pop(ParamKey.ECH, None)
        for key, param_type in (
            (ParamKey.IPV4HINT, IPv4HintParam),
            (ParamKey.IPV6HINT, IPv6HintParam),
        ):
            hint = params.get(key)
            if hint is None:
                continue
            good = []
            for address in hint.addresses:
                kind = _special(address, keep_special)
                if kind is None:
                    good.append(address)
                else:
                    removed.append(f"{address} ({kind}, {key.name.lower()})")
            if len(good) != len(hint.addresses):
                if good:
                    params[key] = param_type(good)
                else:
                    del params[key]
        try:
            # replace() re-validates: removing a key the record lists as mandatory
            # (ech, or a hint left empty) raises ValueError, and such a record is
            # unusable to the client.
            rd = rd.replace(params=params) if params != dict(rd.params) else rd
        except ValueError:
            continue
        kept.append(rd)
        for key in (ParamKey.IPV4HINT, ParamKey.IPV6HINT):
            if key in rd.params:
                addresses += list(rd.params[key].addresses)
    return kept, addresses, removed


def render(response: dns.message.Message, query: dns.message.Message, *, udp: bool) -> bytes:
    """Wire bytes for `response`, truncated (TC set, whole RRsets left out) when too
    big for the transport: 512 bytes over UDP without EDNS, else the smaller of the
    client's EDNS payload and ours; 65535 over TCP."""
    if not udp:
        size = 65535
    elif query.edns >= 0:
        size = max(512, min(query.payload, OUR_PAYLOAD))
    else:
        size = 512
    return response.to_wire(max_size=size, prefer_truncation=True)


# --- bindings --------------------------------------------------------------------


class _SandboxBindings:
    __slots__ = ("expiry", "by_ip")

    def __init__(self) -> None:
        # (name, ip) -> expiry, oldest recorded first: the eviction order.
        self.expiry: OrderedDict[tuple[str, IPAddress], float] = OrderedDict()
        # ip -> names answered with it, oldest first (a dict as an ordered set).
        self.by_ip: dict[IPAddress, dict[str, None]] = {}


class DnsBindings:
    """Which names the gateway answered with which IPs, per sandbox.

    The connection checks ask `resolved(sandbox, sni, dst_ip)` (was this
    destination really what the name resolved to, or is the SNI spoofed?) and, for
    protocols without a name (ssh), `names_for(sandbox, dst_ip)`.

    A binding lives at least `grace` seconds, longer if its TTL is longer
    (`expiry = now + max(ttl, grace)`), because clients do not honour short TTLs:
    JVMs, nscd, happy-eyeballs retries and connection pools reuse addresses for
    minutes, and a CDN's 20 s TTL would otherwise turn a legitimate reconnect into a
    "spoofed destination" block. The grace costs little: the IP was a real answer
    for that name moments ago.

    Memory is bounded: at most `max_per_sandbox` (name, IP) pairs per sandbox, the
    oldest recorded evicted first; `forget(sandbox)` when the task ends. All
    lookups are dict operations. Not thread-safe: the gateway's one event loop owns it.
    """

    def __init__(
        self,
        *,
        grace: float = 300.0,
        max_per_sandbox: int = 10_000,
        max_ttl: float = 7 * 86400,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.grace = grace
        self.max_per_sandbox = max_per_sandbox
        self.max_ttl = max_ttl  # upstream TTLs go up to 68 years
        self.clock = clock
        self._sandboxes: dict[str, _SandboxBindings] = {}

    def record(self, sandbox: str, name: str, ip: str | IPAddress, ttl: float) -> None:
        """Remember that `name` (canonical) was answered with `ip` for `sandbox`."""
        table = self._sandboxes.setdefault(sandbox, _SandboxBindings())
        ip = _ip(ip)
        key = (name, ip)
        expiry = self.clock() + max(min(ttl, self.max_ttl), self.grace)
        # An earlier answer with a longer TTL may still be cached by the client.
        expiry = max(expiry, table.expiry.pop(key, 0.0))
        table.expiry[key] = expiry
        names = table.by_ip.setdefault(ip, {})
        names.pop(name, None)
        names[name] = None  # newest last
        while len(table.expiry) > self.max_per_sandbox:
            (old_name, old_ip), _ = table.expiry.popitem(last=False)
            old_names = table.by_ip[old_ip]
            del old_names[old_name]
            if not old_names:
                del table.by_ip[old_ip]

    def resolved(self, sandbox: str, name: str, ip: str | IPAddress) -> bool:
        """Whether `name` was answered with `ip` for `sandbox` and the binding (TTL
        plus grace) has not expired."""
        table = self._sandboxes.get(sandbox)
        if table is None:
            return False
        try:
            expiry = table.expiry.get((name, _ip(ip)))
        except ValueError:
            return False
        return expiry is not None and expiry >= self.clock()

    def names_for(self, sandbox: str, ip: str | IPAddress) -> list[str]:
        """The unexpired names `sandbox` resolved to `ip`, most recently answered first."""
        table = self._sandboxes.get(sandbox)
        if table is None:
            return []
        try:
            ip = _ip(ip)
        except ValueError:
            return []
        now = self.clock()
        names = table.by_ip.get(ip, {})
        return [name for name in reversed(names) if table.expiry[(name, ip)] >= now]

    def forget(self, sandbox: str) -> None:
        self._sandboxes.pop(sandbox, None)

    def count(self, sandbox: str) -> int:
        table = self._sandboxes.get(sandbox)
        return len(table.expiry) if table else 0


# --- the server ------------------------------------------------------------------


class DnsFilter:
    """The asyncio DNS server the sandboxes' port-53 traffic is redirected to.

    Listens on UDP and TCP (RFC 7766 framing, several queries per connection, an
    idle timeout). Each query is answered by `handle`, which never raises and emits
    exactly one event. With nftables `redirect`, a UDP reply sent from the same
    socket is un-NATed by conntrack, so the sandbox sees it come from the address it
    queried.
    """

    def __init__(
        self,
        *,
        decide_name: DecideName,
        sandbox_for: SandboxFor,
        sink: EventSink,
        upstreams: list[str],
        upstream_port: int = 53,
        bindings: DnsBindings | None = None,
        keep_special: Callable[[str, IPAddress], bool] | None = None,
        timeout: float = 2.0,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 256,
        max_tcp_queries: int = 100,
        max_pending_per_sandbox: int = 128,
    ):
        self.decide_name = decide_name
        self.sandbox_for = sandbox_for
        self.sink = sink
        self.upstreams = list(upstreams)
        self.upstream_port = upstream_port
        self.bindings = bindings if bindings is not None else DnsBindings()
        self.keep_special = keep_special  # (profile, ip) -> an explicit CIDR rule allows it
        self.timeout = timeout
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_queries = max_tcp_queries
        self.max_pending_per_sandbox = max_pending_per_sandbox
        self.port: int | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._tcp_connections = 0
        self._pending: dict[str, int] = {}

    async def start(self, listen_host: str, port: int) -> None:
        """Bind UDP and TCP on `listen_host:port` (port 0: any free port, the same
        for both; see `self.port`)."""
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(listen_host, port)
        )
        self.port = self._udp.get_extra_info("sockname")[1]
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, listen_host, self.port)
        except OSError:
            self._udp.close()
            raise
        log.info("DNS filter listening on %s:%d (udp, tcp)", listen_host, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self._udp = self._tcp = None

    # UDP: one task per datagram, so a slow upstream never blocks other sandboxes.

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_udp(self, transport: asyncio.DatagramTransport, wire: bytes, addr) -> None:
        response = await self.handle(wire, addr, udp=True)
        if response is not None and not transport.is_closing():
            transport.sendto(response, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._tcp_connections += 1
        peer = writer.get_extra_info("peername")
        try:
            if self._tcp_connections > self.max_tcp_connections:
                return
            for _ in range(self.max_tcp_queries):
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        length = int.from_bytes(await reader.readexactly(2), "big")
                        wire = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                response = await self.handle(wire, peer, udp=False)
                if response is None:  # dropped: a TCP client must not wait for it
                    return
                writer.write(len(response).to_bytes(2, "big") + response)
                async with asyncio.timeout(self.tcp_idle_timeout):
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_connections -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # One query.

    async def handle(self, wire: bytes, source: tuple, *, udp: bool) -> bytes | None:
        """Answer one query from `source` ((ip, port, ...)): the bytes to send back,
        or None to send nothing. Emits exactly one event. Never raises."""
        started = time.perf_counter()
        fields = {"protocol": "dns", "source": _format_source(source)}
        try:
            response, decision, more = await self._handle(wire, source[0], udp, fields)
            fields.update(more)
        except Exception:  # noqa: BLE001 - one query must never take the server down
            log.exception("DNS query from %s failed", fields["source"])
            decision = _deny(Reason.INTERNAL_ERROR, "internal-error", "DNS filter error")
            response = header_response(wire, dns.rcode.SERVFAIL)
        fields["duration"] = time.perf_counter() - started
        # The event's detail says more than the decision's: the type and the answer.
        decision = dataclasses.replace(decision, detail=fields.pop("detail", decision.detail))
        self._emit(Event.from_decision(EventKind.DNS, decision, **fields))
        return response

    async def _handle(
        self, wire: bytes, source_ip: str, udp: bool, fields: dict
    ) -> tuple[bytes | None, Decision, dict]:
        """`handle` without the safety net: (response, decision, event fields)."""
        who = self.sandbox_for(canonical_ip(ipaddress.ip_address(source_ip)).compressed)
        if who is None:
            decision = _deny(Reason.UNKNOWN_SANDBOX, "unknown-sandbox", "source is no sandbox")
            return header_response(wire, dns.rcode.REFUSED), decision, {}
        sandbox, profile = who
        fields.update(sandbox=sandbox, profile=profile)
        check = check_query(wire, profile, self.decide_name)
        fields.update(name=check.name)
        if check.action != "forward":
            detail = _join(check.decision.detail, check.qtype or "")
            return check.response, check.decision, {"detail": detail}

        answer = await self._resolve(check, sandbox, profile)
        for name, ip, ttl in answer.bindings:
            self.bindings.record(sandbox, name, ip, ttl)
        extra = answer.decision.detail if answer.decision else ""
        summary = f"{check.qtype} {_describe(answer.response)}"
        detail = _join(check.decision.detail, extra, summary)
        response = render(answer.response, check.query, udp=udp)
        return response, answer.decision or check.decision, {"detail": detail}

    async def _resolve(self, check: QueryCheck, sandbox: str, profile: str) -> FilteredAnswer:
        """Forward an allowed query and filter the answer; at most
        `max_pending_per_sandbox` at a time per sandbox, so one sandbox cannot tie
        up the upstream (or our memory) for the others."""
        pending = self._pending.get(sandbox, 0)
        if pending >= self.max_pending_per_sandbox:
            answer = upstream_failure(check.query, "too many queries in flight")
            limit = f"more than {self.max_pending_per_sandbox} DNS queries in flight"
            return answer._replace(
                decision=_deny(Reason.CONNECTION_LIMIT, "dns-pending-limit", limit)
            )
        self._pending[sandbox] = pending + 1
        try:
            upstream, failure = await self._ask_upstream(check.forward)
        finally:
            self._pending[sandbox] -= 1
            if not self._pending[sandbox]:
                del self._pending[sandbox]
        if upstream is None:
            return upstream_failure(check.query, failure)
        keep = functools.partial(self.keep_special, profile) if self.keep_special else None
        return filter_answer(check.query, upstream, keep_special=keep)

    async def _ask_upstream(
        self, query: dns.message.Message
    ) -> tuple[dns.message.Message | None, str]:
        """The first upstream's answer (UDP, TCP when truncated), or None and why not."""
        errors = []
        for server in self.upstreams:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query,
                    server,
                    timeout=self.timeout,
                    port=self.upstream_port,
                    # Keep waiting past stray or spoofed datagrams (wrong source, id or
                    # question) instead of failing on the first one.
                    ignore_unexpected=True,
                    ignore_errors=True,
                )
                return response, ""
            except (dns.exception.DNSException, OSError, EOFError) as e:
                errors.append(f"{server}: {type(e).__name__}")
        return None, "upstream: " + ("; ".join(errors) or "none configured")

    def _emit(self, event: Event) -> None:
        try:
            self.sink.emit(event)
        except Exception:  # noqa: BLE001 - a broken sink must not break DNS
            log.exception("event sink failed")


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsFilter):
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.owner._spawn(self.owner._serve_udp(self.transport, data, addr))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a client that went away): nothing to do.
        log.debug("DNS UDP socket error: %s", exc)


def _format_source(source: tuple) -> str:
    ip, port = source[0], source[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _describe(response: dns.message.Message) -> str:
    """`NOERROR 93.184.216.34, 2606:2800::1`: the rcode and the addresses answered."""
    values = []
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            values += [rd.address for rd in rrset]
        elif rrset.rdtype == dns.rdatatype.HTTPS:
            values.append(f"{len(rrset)} HTTPS")
    text = dns.rcode.to_text(response.rcode())
    if response.flags & dns.flags.TC:
        text += " (truncated)"
    return f"{text} {', '.join(values)}".strip()


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)
