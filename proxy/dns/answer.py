"""Filtering an upstream answer, pure: only the chain that answers the question,
no addresses in private ranges (DNS rebinding), no ECH in HTTPS records. Edited as
dnspython objects (`make_response`, `set_rcode`, rdata `replace`), never as bytes;
`filter_simple_answer` is the one exception: it passes the common answer, where
nothing is to be edited, on the bytes (`wire`), and leaves the rest to `filter_answer`.

Why an emptied answer is NOERROR without data: see the package docstring.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from typing import NamedTuple

import dns.ipv4
import dns.ipv6
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from sandgate.proxy.dns.bindings import Binding, canonical_address
from sandgate.proxy.dns.query import OUR_PAYLOAD, make_response
from sandgate.proxy.dns.wire import (
    AAAA,
    CNAME,
    RCODE_TEXT,
    SimpleQuery,
    encode_name,
    encode_record,
    render_simple,
    scan_answer,
    size_limit,
)
from sandgate.proxy.policy.builtin import deny
from sandgate.proxy.policy.model import Decision
from sandgate.proxy.policy.names import (
    InvalidName,
    IPAddress,
    canonical_ip,
    parse_domain,
    special_range,
    special_range_of,
)

KeepSpecial = Callable[[IPAddress], bool]
"""Whether a private/loopback/... address may stay in an answer: True only where a
CIDR rule names the range explicitly (DESIGN.md, "Policy semantics")."""

# Longer CNAME chains are broken or hostile; real ones are 1-3 links.
MAX_CHAIN = 16


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
    return FilteredAnswer(response, deny("dns-upstream", detail), [])


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
    import dns.message  # the slow path's (package docstring, "Imports")
    import dns.rrset

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
        decision = deny(
            "dns-rebinding",
            f"removed {', '.join(removed)}; {len(addresses)} address(es) left",
        )
    if kept:
        response.answer = [*chain, dns.rrset.from_rdata_list(target, records.ttl, kept)]
    # else: NOERROR, no data, no SOA: "nothing usable", not cached (see the package doc).

    names = []
    for owner in [rrset.name for rrset in chain] or [question.name]:
        with contextlib.suppress(InvalidName):
            names.append(parse_domain(owner.to_text(omit_final_dot=True)))
    bindings = [
        (name, str(canonical_address(address)), records.ttl)
        for name in names
        for address in addresses
    ]
    return FilteredAnswer(response, decision, bindings)


class SimpleAnswer(NamedTuple):
    """What `filter_simple_answer` sends: the `response` bytes, the `bindings` to
    record, and `summary`, the rcode and addresses (as the event's detail has them)."""

    response: bytes
    bindings: list[Binding]
    summary: str


def filter_simple_answer(
    query: SimpleQuery, qname: str, reply: bytes, *, udp: bool
) -> SimpleAnswer | None:
    """`filter_answer` on the bytes, for the answer where the filter removes nothing:
    the same response (the chain from the question, the records of its type at the
    chain's end, nothing else), bindings and summary. `qname` is the canonical name
    that was forwarded; the caller has checked the reply's id and question.

    None, so that `filter_answer` decides, for everything else: an answer not of
    the common shape (`wire.scan_answer`: e.g. anything in the authority section,
    such as a negative answer's SOA), truncated, an rcode other than NOERROR or
    NXDOMAIN, any address in a special range (even one a CIDR rule keeps: `filter_answer`
    asks), and a response too big for the client's transport (`render` truncates).
    """
    scanned = scan_answer(reply, query.qtype, qname)
    if scanned is None or scanned.truncated or scanned.rcode not in (0, 3):
        return None
    chain, name, seen = [], qname, {qname}
    for _ in range(MAX_CHAIN):  # as _follow_cnames
        link = scanned.cnames.get(name)
        if link is None:
            break
        chain.append((name, *link))
        name = link[0]
        if name in seen:
            break
        seen.add(name)
    rdatas, ttl = scanned.records.get(name, ({}, 0))
    version, to_text = (6, dns.ipv6.inet_ntoa) if query.qtype == AAAA else (4, dns.ipv4.inet_ntoa)
    addresses = []
    for rdata in rdatas:
        number = int.from_bytes(rdata, "big")
        if special_range_of(number, version) is not None:
            return None
        addresses.append(canonical_ip(ipaddress.ip_address(number if version == 4 else rdata)))

    # Owners are compressed to names already written: the question (offset 12, the
    # client's spelling, as dnspython compresses), and each CNAME's target.
    written, records, base = {qname: 12}, bytearray(), 12 + len(query.question)

    def owner(name: str) -> bytes:
        at = written.get(name)
        return encode_name(name) if at is None else (0xC000 | at).to_bytes(2, "big")

    for link_owner, target, link_ttl in chain:
        record = encode_record(owner(link_owner), CNAME, link_ttl, encode_name(target))
        if base + len(records) + len(record) < 0x3FFF:
            written.setdefault(target, base + len(records) + len(record) - len(encode_name(target)))
        records += record
    for rdata in rdatas:
        records += encode_record(owner(name), query.qtype, ttl, rdata)
    response = render_simple(query, scanned.rcode, bytes(records), len(chain) + len(rdatas))
    if len(response) > size_limit(query, udp=udp):
        return None

    names = [qname]  # canonical (`parse_domain`'s) already; the chain starts there
    for link_owner, _, _ in chain[1:]:
        with contextlib.suppress(InvalidName):
            names.append(parse_domain(link_owner))
    # The address as an object: `DnsBindings.record` would parse its text again.
    bindings = [(n, address, ttl) for n in names for address in addresses]
    texts = [to_text(rdata) for rdata in rdatas]  # as dnspython's rdata.address
    summary = f"{RCODE_TEXT[scanned.rcode]} {', '.join(texts)}".strip()
    return SimpleAnswer(response, bindings, summary)


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


def _special(address: str, keep_special: KeepSpecial) -> str | None:
    """The special range `address` is in, unless `keep_special` lets it through;
    None for a usable address."""
    ip = canonical_address(address)
    kind = special_range(ip)
    return None if kind is None or keep_special(ip) else kind


def _filter_https(
    records: dns.rrset.RRset, keep_special: KeepSpecial
) -> tuple[list[dns.rdata.Rdata], list[str], list[str]]:
    """HTTPS records without ech and without special-range hints: (kept records,
    hint addresses kept, descriptions of addresses removed)."""
    from dns.rdtypes.svcbbase import IPv4HintParam, IPv6HintParam, ParamKey

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
