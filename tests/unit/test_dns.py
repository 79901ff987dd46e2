"""The DNS filter: check_query and filter_answer as tables over real dnspython
messages, the bindings with a fake clock, and DnsFilter end to end on loopback
against a fake upstream resolver."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import pathlib
import socket

import dns.asyncquery
import dns.edns
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
import pytest
from dns.rdtypes.svcbbase import ParamKey
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.proxy.dns import wire as dns_wire
from sandgate.proxy.dns.answer import filter_answer, filter_simple_answer, render
from sandgate.proxy.dns.bindings import DnsBindings
from sandgate.proxy.dns.query import OUR_PAYLOAD, check_query, header_response, quick_check
from sandgate.proxy.dns.server import DnsFilter, _describe
from sandgate.proxy.dns.upstream import UdpUpstream
from sandgate.proxy.dns.wire import forward_query, scan_query
from sandgate.proxy.policy.model import Decision, Rule
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventKind

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "dns"
ALLOW_RULE = Rule(id="allow-example", action=Verdict.ALLOW, file="test.yaml", line=1)
FALLBACK = Rule(id="fallback", action=Verdict.DENY, file="test.yaml", line=9)
ECH = base64.b64encode(b"\x00\x05hello").decode()  # a syntactically valid ECHConfigList


class FakePolicy:
    """decide_name for tests: `names` maps a canonical name to a verdict; anything
    else is denied by the fallback. Remembers what it was asked."""

    def __init__(self, names: dict[str, Verdict] | None = None):
        self.names = names if names is not None else {"example.com": Verdict.ALLOW}
        self.asked: list[tuple[str, str]] = []

    def __call__(self, profile: str, name: str) -> Decision:
        self.asked.append((profile, name))
        verdict = self.names.get(name)
        if verdict is None:
            return Decision(Verdict.DENY, Reason.NO_RULE, FALLBACK)
        reason = Reason.RULE_ALLOW if verdict == Verdict.ALLOW else Reason.NO_RULE
        return Decision(verdict, reason, ALLOW_RULE)


def wire_query(name="example.com", rdtype="A", **kw) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def with_opcode(opcode: dns.opcode.Opcode) -> bytes:
    query = dns.message.make_query("example.com", "A")
    query.set_opcode(opcode)
    return query.to_wire()


def wire_response() -> bytes:
    return dns.message.make_response(dns.message.make_query("example.com", "A")).to_wire()


def parse(wire: bytes) -> dns.message.Message:
    return dns.message.from_wire(wire)


# --- check_query -----------------------------------------------------------------


# `expect` is "forward", "drop", or the rcode of the immediate answer.
# fmt: off
CHECK_CASES = [
    pytest.param(wire_query(),                   "forward",  Reason.RULE_ALLOW,            "example.com",   id="allowed-A"),
    pytest.param(wire_query(rdtype="AAAA"),      "forward",  Reason.RULE_ALLOW,            "example.com",   id="allowed-AAAA"),
    pytest.param(wire_query(rdtype="CNAME"),     "forward",  Reason.RULE_ALLOW,            "example.com",   id="allowed-CNAME"),
    pytest.param(wire_query(rdtype="HTTPS"),     "forward",  Reason.RULE_ALLOW,            "example.com",   id="allowed-HTTPS"),
    pytest.param(wire_query("ExAmPlE.CoM."),     "forward",  Reason.RULE_ALLOW,            "example.com",   id="case-and-dot-canonicalised"),
    pytest.param(wire_query("audit.example"),    "forward",  Reason.NO_RULE,               "audit.example", id="audit-forwarded"),
    pytest.param(wire_query("evil.example"),     "NXDOMAIN", Reason.NO_RULE,               "evil.example",  id="forbidden-nxdomain"),
    pytest.param(wire_query("ask.example"),      "NXDOMAIN", Reason.NO_RULE,               "ask.example",   id="ask-is-nxdomain"),
    pytest.param(wire_query(rdtype="TXT"),       "REFUSED",  Reason.DNS_QTYPE_NOT_ALLOWED, "example.com",   id="TXT-refused"),
    pytest.param(wire_query(rdtype="MX"),        "REFUSED",  Reason.DNS_QTYPE_NOT_ALLOWED, "example.com",   id="MX-refused"),
    pytest.param(wire_query(rdtype="ANY"),       "REFUSED",  Reason.DNS_QTYPE_NOT_ALLOWED, "example.com",   id="ANY-refused"),
    pytest.param(wire_query(rdtype="AXFR"),      "REFUSED",  Reason.DNS_QTYPE_NOT_ALLOWED, "example.com",   id="AXFR-refused"),
    pytest.param(wire_query(rdtype="SVCB"),      "REFUSED",  Reason.DNS_QTYPE_NOT_ALLOWED, "example.com",   id="SVCB-refused"),
    pytest.param(wire_query(rdclass="CH"),       "REFUSED",  Reason.DNS_QTYPE_NOT_ALLOWED, "example.com",   id="chaos-class-refused"),
    pytest.param(wire_query("version.bind", "TXT", rdclass="CH"), "REFUSED", Reason.DNS_QTYPE_NOT_ALLOWED, "version.bind", id="version-bind-refused"),
    pytest.param(with_opcode(dns.opcode.NOTIFY), "NOTIMP",   Reason.DNS_QTYPE_NOT_ALLOWED, None,            id="NOTIFY-notimp"),
    pytest.param(with_opcode(dns.opcode.STATUS), "NOTIMP",   Reason.DNS_QTYPE_NOT_ALLOWED, None,            id="STATUS-notimp"),
    pytest.param(wire_query(use_edns=1),         "BADVERS",  Reason.DNS_MALFORMED,         "example.com",   id="EDNS1-badvers"),
    pytest.param(wire_query("127.0.0.1"),        "NXDOMAIN", Reason.INVALID_NAME,          "127.0.0.1",     id="ip-literal-invalid"),
    pytest.param(wire_query("0x7f.1"),           "NXDOMAIN", Reason.INVALID_NAME,          "0x7f.1",        id="ip-short-form-invalid"),
    pytest.param(wire_query("."),                "NXDOMAIN", Reason.INVALID_NAME,          ".",             id="root-invalid"),
    pytest.param(wire_query("a\\032b.example"),  "NXDOMAIN", Reason.INVALID_NAME,          "a\\032b.example", id="space-in-label-invalid"),
    pytest.param(b"\xbe\xef\x01",                "FORMERR",  Reason.DNS_MALFORMED,         None,            id="truncated-header"),
    pytest.param(b"\xbe",                        "drop",     Reason.DNS_MALFORMED,         None,            id="half-an-id-dropped"),
    pytest.param(b"\xbe\xef\x81\x80" + bytes(8), "drop",     Reason.DNS_MALFORMED,         None,            id="response-dropped"),
    pytest.param(wire_response(),                "drop",     Reason.DNS_MALFORMED,         None,            id="parsed-response-dropped"),
]
# fmt: on


@pytest.mark.parametrize("wire, expect, reason, name", CHECK_CASES)
def test_check_query(wire, expect, reason, name):
    policy = FakePolicy(
        {"example.com": Verdict.ALLOW, "audit.example": Verdict.AUDIT, "ask.example": Verdict.ASK}
    )
    check = check_query(wire, "dev", policy)
    assert check.decision.reason == reason
    assert check.name == name
    if expect == "forward":
        assert check.action == "forward"
        assert check.forward.question[0].name == dns.name.from_text(name)
        assert check.decision.allowed
    elif expect == "drop":
        assert check.action == "drop"
    else:
        assert check.action == "respond" and check.forward is None
        response = parse(check.response)
        assert dns.rcode.to_text(response.rcode()) == expect
        assert response.id == int.from_bytes(wire[:2], "big")
        assert response.flags & dns.flags.QR
    # The policy is asked only about valid names of allowed types, by canonical name.
    if reason in (Reason.RULE_ALLOW, Reason.NO_RULE):
        assert policy.asked == [("dev", name)]
    else:
        assert policy.asked == []


def test_forwarded_query_is_fresh():
    """Only the allowed question goes upstream: not the client's id, case or options."""
    client = dns.message.make_query(
        "WwW.ExAmPlE.cOm",
        "A",
        use_edns=0,
        options=[dns.edns.ECSOption("192.0.2.0", 24), dns.edns.GenericOption(65001, b"exfil")],
    )
    check = check_query(client.to_wire(), "dev", FakePolicy({"www.example.com": Verdict.ALLOW}))
    forward = check.forward
    assert forward.question[0].name.to_text() == "www.example.com."
    assert forward.question[0].rdtype == dns.rdatatype.A
    assert forward.options == ()
    assert forward.payload == OUR_PAYLOAD
    assert forward.flags & dns.flags.RD


def test_refusal_keeps_client_question_and_edns():
    """The answer echoes the question as the client spelled it (0x20 clients check)."""
    client = dns.message.make_query("EvIl.ExAmple", "A", use_edns=0, payload=4096)
    response = parse(check_query(client.to_wire(), "dev", FakePolicy()).response)
    assert response.question[0].name.to_text() == "EvIl.ExAmple."
    assert response.edns == 0
    assert response.flags & dns.flags.RA


def test_policy_failure_is_servfail_internal_error():
    def broken(profile, name):
        raise RuntimeError("bug")

    check = check_query(wire_query(), "dev", broken)
    assert check.action == "respond"
    assert parse(check.response).rcode() == dns.rcode.SERVFAIL
    assert check.decision.reason == Reason.INTERNAL_ERROR
    assert check.name == "example.com"


def _fixture_cases():
    for path in sorted(FIXTURES.glob("*.hex")):
        lines = path.read_text().splitlines()
        expect = lines[0].removeprefix("# expect:").strip()
        data = "".join(line.split("#")[0] for line in lines[1:])
        yield pytest.param(bytes.fromhex(data), expect, id=path.stem)


@pytest.mark.parametrize("wire, expect", list(_fixture_cases()))
def test_malformed_fixtures(wire, expect):
    check = check_query(wire, "dev", FakePolicy())
    if expect == "drop":
        assert check.action == "drop"
        return
    assert check.action == "respond"
    response = parse(check.response)
    assert dns.rcode.to_text(response.rcode()) == expect
    expected_reason = Reason.INVALID_NAME if expect == "NXDOMAIN" else Reason.DNS_MALFORMED
    assert check.decision.reason == expected_reason
    assert check.decision.verdict == Verdict.DENY


def _mutated_queries():
    base = wire_query("www.example.com", "AAAA", use_edns=0)
    return st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=6).map(
        lambda edits: _apply(base, edits)
    )


def _apply(base: bytes, edits) -> bytes:
    data = bytearray(base)
    for index, value in edits:
        data[index] = value
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=600), _mutated_queries()))
def test_check_query_never_raises(wire):
    check = check_query(wire, "dev", FakePolicy({"www.example.com": Verdict.ALLOW}))
    assert check.action in ("forward", "respond", "drop")
    if check.response is not None:
        assert len(check.response) <= 512
        parse(check.response)
    if check.action == "forward":
        assert check.decision.allowed


# --- filter_answer ---------------------------------------------------------------


def upstream_answer(
    query: dns.message.Message, *records: str, rcode=dns.rcode.NOERROR, authority=(), additional=()
) -> bytes:
    """The upstream's reply to `query`: records as zone-file lines `name ttl type data`."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for section, lines in (
        (response.answer, records),
        (response.authority, authority),
        (response.additional, additional),
    ):
        for line in lines:
            name, ttl, rdtype, *data = line.split(maxsplit=3)
            rrset = dns.rrset.from_text(name, int(ttl), "IN", rdtype, " ".join(data))
            existing = next(
                (
                    r
                    for r in section
                    if r.match(rrset.name, rrset.rdclass, rrset.rdtype, rrset.covers)
                ),
                None,
            )
            if existing is not None:
                existing.union_update(rrset)
            else:
                section.append(rrset)
    return response.to_wire()


def answer_values(response: dns.message.Message) -> list[str]:
    return [
        f"{rrset.name.to_text(True)} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}"
        for rrset in response.answer
        for rd in rrset
    ]


SOA = "example.com. 60 SOA ns.example.com. admin.example.com. 1 3600 600 86400 60"
REBINDING = Reason.DNS_REBINDING

CHAIN = [
    "www.example.com. 60 CNAME cdn.example.net.",
    "cdn.example.net. 60 CNAME edge.cdn.test.",
    "edge.cdn.test. 20 A 198.51.100.7",
]
PUBLIC = "93.184.216.34"

# Each case: the question, the upstream's answer records, then what the sandbox gets
# (answer records), the reason if something was removed, and the bindings recorded.
# fmt: off
FILTER_CASES = [
    pytest.param("A",    [f"@ 300 A {PUBLIC}"],                        [f"@ A {PUBLIC}"], None, [("example.com", PUBLIC, 300)], id="public-A"),
    pytest.param("AAAA", ["@ 300 AAAA 2606:2800:220:1::1"],            ["@ AAAA 2606:2800:220:1::1"], None, [("example.com", "2606:2800:220:1::1", 300)], id="public-AAAA"),
    pytest.param("A",    ["@ 300 A 10.1.2.3"],                          [], REBINDING, [], id="private-A-removed"),
    pytest.param("A",    ["@ 300 A 169.254.169.254", f"@ 300 A {PUBLIC}"], [f"@ A {PUBLIC}"], REBINDING, [("example.com", PUBLIC, 300)], id="metadata-removed-public-kept"),
    pytest.param("A",    ["@ 300 A 0.0.0.0"],                           [], REBINDING, [], id="unspecified-removed"),
    pytest.param("A",    ["@ 300 A 127.0.0.1"],                         [], REBINDING, [], id="loopback-removed"),
    pytest.param("A",    ["@ 300 A 100.64.0.1"],                        [], REBINDING, [], id="cgnat-removed"),
    pytest.param("AAAA", ["@ 300 AAAA ::ffff:127.0.0.1"],               [], REBINDING, [], id="mapped-loopback-removed"),
    pytest.param("AAAA", ["@ 300 AAAA ::1", "@ 300 AAAA fe80::1", "@ 300 AAAA fd00::1"], [], REBINDING, [], id="v6-special-removed"),
    pytest.param("AAAA", ["@ 300 AAAA 64:ff9b::a9fe:a9fe"],             [], REBINDING, [], id="nat64-metadata-removed"),
    pytest.param("AAAA", [f"@ 300 AAAA ::ffff:{PUBLIC}"],               [f"@ AAAA ::ffff:{PUBLIC}"], None, [("example.com", PUBLIC, 300)], id="mapped-public-bound-as-v4"),
    pytest.param("A",    [f"@ 300 A {PUBLIC}", "other.test. 300 A 198.51.100.9", "@ 300 TXT hello"], [f"@ A {PUBLIC}"], None, [("example.com", PUBLIC, 300)], id="unrelated-records-dropped"),
    pytest.param("A",    [],                                            [], None, [], id="nodata"),
]
CHAIN_CASES = [
    pytest.param("A",     CHAIN, ["www.example.com CNAME cdn.example.net.", "cdn.example.net CNAME edge.cdn.test.", "edge.cdn.test A 198.51.100.7"], None,
                 [("www.example.com", "198.51.100.7", 20), ("cdn.example.net", "198.51.100.7", 20)], id="chain-binds-question-and-cname-owners"),
    pytest.param("A",     ["www.example.com. 60 CNAME rebind.attacker.test.", "rebind.attacker.test. 1 A 192.168.1.1"], [], REBINDING, [], id="chain-to-private-nodata"),
    pytest.param("A",     ["www.example.com. 60 CNAME b.example.com.", "b.example.com. 60 CNAME www.example.com."],
                 ["www.example.com CNAME b.example.com.", "b.example.com CNAME www.example.com."], None, [], id="cname-loop"),
    pytest.param("CNAME", CHAIN, ["www.example.com CNAME cdn.example.net."], None, [], id="cname-question-one-link"),
]
# fmt: on


@pytest.mark.parametrize(
    "qname, qtype, records, answer, reason, bindings",
    [pytest.param("example.com", *case.values, id=case.id) for case in FILTER_CASES]
    + [pytest.param("www.example.com", *case.values, id=case.id) for case in CHAIN_CASES],
)
def test_filter_answer(qname, qtype, records, answer, reason, bindings):
    query = dns.message.make_query(qname, qtype)
    records = [r.replace("@", qname + ".", 1) for r in records]
    glue = ["ns.other.test. 60 A 198.51.100.53"]
    result = filter_answer(query, upstream_answer(query, *records, additional=glue))
    assert result.response.rcode() == dns.rcode.NOERROR
    assert answer_values(result.response) == [a.replace("@", qname, 1) for a in answer]
    assert result.response.additional == []
    assert (result.decision.reason if result.decision else None) == reason
    if reason is not None:
        assert result.decision.verdict == Verdict.DENY
    assert result.bindings == bindings
    assert result.response.id == query.id


def _mutated_https_answers():
    query = dns.message.make_query("www.example.com", "HTTPS")
    hints = "ipv4hint=10.0.0.1,198.51.100.4 ipv6hint=::1,2001:db8::4"
    base = upstream_answer(
        query,
        "www.example.com. 60 CNAME cdn.example.net.",
        f'cdn.example.net. 60 HTTPS 1 . alpn=h2 {hints} ech="{ECH}"',
        f'cdn.example.net. 60 HTTPS 2 . mandatory=ech ech="{ECH}"',
    )
    edits = st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=4)
    return st.tuples(st.just(query), edits.map(lambda e: _apply(base, e)))


@settings(max_examples=500, deadline=None)
@given(_mutated_https_answers())
def test_filter_answer_never_raises(case):
    query, upstream = case
    result = filter_answer(query, upstream)
    wire = render(result.response, query, udp=True)
    assert parse(wire).id == query.id
    for rrset in result.response.answer:
        for rd in rrset:
            assert rrset.rdtype != dns.rdatatype.HTTPS or ParamKey.ECH not in rd.params


@pytest.mark.parametrize(
    "upstream, detail",
    [
        pytest.param(
            lambda q: upstream_answer(q, rcode=dns.rcode.SERVFAIL), "SERVFAIL", id="servfail"
        ),
        pytest.param(
            lambda q: upstream_answer(q, rcode=dns.rcode.REFUSED), "REFUSED", id="refused"
        ),
        pytest.param(lambda q: None, "no answer", id="timeout"),
        pytest.param(lambda q: b"\x00\x01garbage", "unparsable", id="garbage"),
        pytest.param(
            lambda q: upstream_answer(
                dns.message.make_query("other.test", "A"), "other.test. 60 A 198.51.100.1"
            ),
            "another question",
            id="other-question",
        ),
        pytest.param(
            lambda q: upstream_answer(dns.message.make_query("example.com", "AAAA")),
            "another question",
            id="other-type",
        ),
    ],
)
def test_upstream_failure_is_servfail(upstream, detail):
    query = dns.message.make_query("example.com", "A")
    result = filter_answer(query, upstream(query))
    assert result.response.rcode() == dns.rcode.SERVFAIL
    assert result.decision.reason == Reason.DNS_UPSTREAM_FAILURE
    assert detail in result.decision.detail
    assert result.bindings == []


def test_nxdomain_keeps_soa():
    query = dns.message.make_query("nope.example.com", "A")
    result = filter_answer(
        query,
        upstream_answer(
            query, rcode=dns.rcode.NXDOMAIN, authority=[SOA, "example.com. 60 NS ns.example.com."]
        ),
    )
    assert result.response.rcode() == dns.rcode.NXDOMAIN
    assert [r.rdtype for r in result.response.authority] == [dns.rdatatype.SOA]
    assert result.decision is None


def test_keep_special_lets_a_cidr_rule_through():
    query = dns.message.make_query("internal.example.com", "A")
    upstream = upstream_answer(
        query, "internal.example.com. 60 A 10.1.2.3", "internal.example.com. 60 A 127.0.0.1"
    )
    result = filter_answer(
        query, upstream, keep_special=lambda ip: ip in ipaddress.ip_network("10.0.0.0/8")
    )
    assert answer_values(result.response) == ["internal.example.com A 10.1.2.3"]
    assert result.decision.reason == Reason.DNS_REBINDING
    assert "127.0.0.1 (loopback)" in result.decision.detail
    assert result.bindings == [("internal.example.com", "10.1.2.3", 60)]


@pytest.mark.parametrize(
    "records, expected, reason, bindings",
    [
        pytest.param([f'1 . alpn=h2 ech="{ECH}"'], ['1 . alpn="h2"'], None, [], id="ech-removed"),
        pytest.param(
            [f'1 . mandatory=ech alpn=h2 ech="{ECH}"', "2 . alpn=h2"],
            ['2 . alpn="h2"'],
            None,
            [],
            id="mandatory-ech-dropped",
        ),
        pytest.param(
            [f'1 . mandatory=ech alpn=h2 ech="{ECH}"'], [], None, [], id="only-mandatory-ech-nodata"
        ),
        pytest.param(
            ["0 cdn.example.net."], ["0 cdn.example.net."], None, [], id="alias-mode-kept"
        ),
        pytest.param(
            [f'1 . alpn=h2 ipv4hint=10.0.0.1,198.51.100.4 ech="{ECH}" ipv6hint=::1,2001:db8::4'],
            ['1 . alpn="h2" ipv4hint="198.51.100.4" ipv6hint="2001:db8::4"'],
            Reason.DNS_REBINDING,
            [("example.com", "198.51.100.4", 300), ("example.com", "2001:db8::4", 300)],
            id="special-hints-removed",
        ),
        pytest.param(
            ["1 . alpn=h2 ipv4hint=169.254.169.254"],
            ['1 . alpn="h2"'],
            Reason.DNS_REBINDING,
            [],
            id="all-hints-removed",
        ),
        pytest.param(
            ["1 . mandatory=ipv4hint alpn=h2 ipv4hint=127.0.0.1"],
            [],
            Reason.DNS_REBINDING,
            [],
            id="mandatory-hint-emptied-dropped",
        ),
    ],
)
def test_filter_https(records, expected, reason, bindings):
    query = dns.message.make_query("example.com", "HTTPS")
    result = filter_answer(
        query, upstream_answer(query, *(f"example.com. 300 HTTPS {r}" for r in records))
    )
    assert result.response.rcode() == dns.rcode.NOERROR
    assert sorted(v.split(" HTTPS ")[1] for v in answer_values(result.response)) == expected
    for rrset in result.response.answer:
        assert all(ParamKey.ECH not in rd.params for rd in rrset)
    assert (result.decision.reason if result.decision else None) == reason
    assert result.bindings == bindings


@pytest.mark.parametrize(
    "edns, udp, limit, truncated",
    [
        pytest.param(-1, True, 512, True, id="udp-no-edns-512"),
        pytest.param(0, True, OUR_PAYLOAD, True, id="udp-edns-capped-at-ours"),
        pytest.param(-1, False, 65535, False, id="tcp-whole"),
    ],
)
def test_render_truncates_for_udp(edns, udp, limit, truncated):
    query = dns.message.make_query("example.com", "A", use_edns=edns, payload=4096)
    records = [f"example.com. 60 A 198.51.{i // 250}.{i % 250}" for i in range(100)]
    result = filter_answer(query, upstream_answer(query, *records))
    wire = render(result.response, query, udp=udp)
    assert len(wire) <= limit
    response = parse(wire)
    assert bool(response.flags & dns.flags.TC) == truncated
    assert response.id == query.id
    assert sum(len(r) for r in response.answer) == (0 if truncated else 100)


def test_header_response():
    assert header_response(b"", dns.rcode.FORMERR) is None
    assert header_response(b"\x12\x34\x80", dns.rcode.FORMERR) is None  # QR set
    response = parse(header_response(b"\x12\x34\x29", dns.rcode.FORMERR))  # opcode 5 + RD
    assert response.id == 0x1234
    assert response.opcode() == dns.opcode.UPDATE
    assert response.flags & dns.flags.RD and response.flags & dns.flags.QR
    assert response.rcode() == dns.rcode.FORMERR


# --- bindings --------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_bindings_grace_outlives_short_ttl():
    clock = Clock()
    b = DnsBindings(clock=clock, grace=300)
    b.record("s1", "example.com", "93.184.216.34", 20)
    b.record("s1", "long.example", "198.51.100.1", 3600)
    clock.now += 299
    assert b.resolved("s1", "example.com", "93.184.216.34")
    clock.now += 2
    assert not b.resolved("s1", "example.com", "93.184.216.34")
    assert b.resolved("s1", "long.example", "198.51.100.1")
    clock.now += 3600
    assert not b.resolved("s1", "long.example", "198.51.100.1")
    assert b.names_for("s1", "198.51.100.1") == []


def test_bindings_are_per_sandbox_and_canonical():
    b = DnsBindings(clock=Clock())
    b.record("s1", "example.com", "::ffff:93.184.216.34", 60)
    assert b.resolved("s1", "example.com", "93.184.216.34")
    assert b.resolved("s1", "example.com", ipaddress.ip_address("::ffff:93.184.216.34"))
    assert not b.resolved("s2", "example.com", "93.184.216.34")
    assert not b.resolved("s1", "other.example", "93.184.216.34")
    assert not b.resolved("s1", "example.com", "not an ip")
    assert b.names_for("s1", "nonsense") == []


def test_bindings_rerecord_keeps_longer_expiry():
    clock = Clock()
    b = DnsBindings(clock=clock, grace=0)
    b.record("s1", "example.com", "198.51.100.1", 600)
    b.record("s1", "example.com", "198.51.100.1", 10)
    clock.now += 500
    assert b.resolved("s1", "example.com", "198.51.100.1")


def test_names_for_newest_first():
    clock = Clock()
    b = DnsBindings(clock=clock)
    b.record("s1", "a.example", "198.51.100.1", 60)
    clock.now += 1
    b.record("s1", "b.example", "198.51.100.1", 60)
    assert b.names_for("s1", "198.51.100.1") == ["b.example", "a.example"]
    b.record("s1", "a.example", "198.51.100.1", 60)
    assert b.names_for("s1", "198.51.100.1") == ["a.example", "b.example"]


def test_bindings_cap_evicts_oldest_and_forget():
    b = DnsBindings(clock=Clock(), max_per_sandbox=3)
    for i in range(5):
        b.record("s1", f"n{i}.example", "198.51.100.1", 60)
    b.record("s2", "n0.example", "198.51.100.1", 60)
    assert b.count("s1") == 3
    assert not b.resolved("s1", "n1.example", "198.51.100.1")
    assert b.names_for("s1", "198.51.100.1") == ["n4.example", "n3.example", "n2.example"]
    b.forget("s1")
    assert b.count("s1") == 0 and b.names_for("s1", "198.51.100.1") == []
    assert b.resolved("s2", "n0.example", "198.51.100.1")


# --- the server, end to end on loopback --------------------------------------------


class FakeUpstream:
    """A tiny resolver on 127.0.0.1 (UDP and TCP): answers from `zone`, never
    answers names in `silent`, records every question it receives."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], silent=()):
        self.zone = zone
        self.silent = set(silent)
        self.questions: list[tuple[str, str]] = []

    def answer(self, wire: bytes, udp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        key = (question.name.to_text(True), dns.rdatatype.to_text(question.rdtype))
        self.questions.append(key)
        if key[0] in self.silent:
            return None
        response = dns.message.make_response(query)
        for line in self.zone.get(key, []):
            name, ttl, rdtype, data = line.split(maxsplit=3)
            rrset = response.find_rrset(
                response.answer,
                dns.name.from_text(name),
                dns.rdataclass.IN,
                dns.rdatatype.from_text(rdtype),
                create=True,
            )
            rrset.add(dns.rdata.from_text("IN", rdtype, data), int(ttl))
        if not self.zone.get(key):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire(max_size=query.payload if udp else 65535, prefer_truncation=True)

    async def start(self):
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                reply = upstream.answer(data, udp=True)
                if reply:
                    self.transport.sendto(reply, addr)

        async def tcp(reader, writer):
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = self.answer(await reader.readexactly(length), udp=False)
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
            writer.close()

        self.udp, self.tcp = await udp_and_tcp_twins(Udp, tcp)
        self.port = self.udp.get_extra_info("sockname")[1]

    def stop(self):
        self.udp.close()
        self.tcp.close()


async def udp_and_tcp_twins(udp_protocol, tcp_handler=None):
    """A UDP endpoint on a free loopback port and, given `tcp_handler`, a TCP server on
    the same port number: (transport, server or None). The kernel picks the UDP port
    alone; its TCP twin may be another process's (CI found one taken), so a taken
    twin draws again."""
    loop = asyncio.get_running_loop()
    for _ in range(20):
        transport, _ = await loop.create_datagram_endpoint(
            udp_protocol, local_addr=("127.0.0.1", 0)
        )
        if tcp_handler is None:
            return transport, None
        try:
            port = transport.get_extra_info("sockname")[1]
            return transport, await asyncio.start_server(tcp_handler, "127.0.0.1", port)
        except OSError:
            transport.close()
    raise OSError("no loopback port free for both UDP and TCP in 20 draws")


class ListSink:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


BIG = [f"big.example.com 60 A 198.51.{i // 250}.{i % 250 + 1}" for i in range(100)]
ZONE = {
    ("example.com", "A"): ["example.com 300 A 93.184.216.34"],
    ("rebind.example.com", "A"): ["rebind.example.com 5 A 127.0.0.1"],
    ("big.example.com", "A"): BIG,
}
ALLOWED = {
    n: Verdict.ALLOW
    for n in ("example.com", "rebind.example.com", "big.example.com", "slow.example.com")
}


async def _end_to_end():
    upstream = FakeUpstream(ZONE, silent={"slow.example.com"})
    await upstream.start()
    sink = ListSink()
    bindings = DnsBindings()
    server = DnsFilter(
        decide_name=FakePolicy(ALLOWED),
        sandbox_for=lambda ip: ("sbx-1", "dev", "t1") if ip == "127.0.0.1" else None,
        sink=sink,
        upstreams=["127.0.0.1"],
        upstream_port=upstream.port,
        bindings=bindings,
        timeout=0.3,
    )
    await server.start("127.0.0.1", 0)
    port = server.port

    async def ask(name, rdtype="A", source="127.0.0.1", tcp=False):
        query = dns.message.make_query(name, rdtype)
        if tcp:
            return await dns.asyncquery.tcp(query, "127.0.0.1", timeout=2, port=port, source=source)
        return await dns.asyncquery.udp(query, "127.0.0.1", timeout=2, port=port, source=source)

    try:
        sent = 0
        # 1. An allowed name is forwarded, answered and bound.
        response = await ask("Example.COM")
        sent += 1
        # dnspython compresses names case-insensitively: the owner takes the question's case.
        assert answer_values(response) == ["Example.COM A 93.184.216.34"]
        assert response.flags & dns.flags.RA
        assert bindings.resolved("sbx-1", "example.com", "93.184.216.34")
        # 2. A forbidden name and a forbidden type never reach the upstream.
        response = await ask("evil.example")
        sent += 1
        assert response.rcode() == dns.rcode.NXDOMAIN
        response = await ask("example.com", "TXT")
        sent += 1
        assert response.rcode() == dns.rcode.REFUSED
        # 3. Rebinding: forwarded, the loopback answer removed.
        response = await ask("rebind.example.com")
        sent += 1
        assert response.rcode() == dns.rcode.NOERROR and response.answer == []
        assert not bindings.resolved("sbx-1", "rebind.example.com", "127.0.0.1")
        # 4. Too big for 512 bytes: TC over UDP (we fetched it upstream over TCP),
        #    whole over TCP; two queries on one TCP connection.
        response = await ask("big.example.com")
        sent += 1
        assert response.flags & dns.flags.TC and response.answer == []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for name in ("big.example.com", "example.com"):
            writer.write(dns.message.make_query(name, "A").to_wire(prepend_length=True))
        replies = []
        for _ in range(2):
            length = int.from_bytes(await reader.readexactly(2), "big")
            replies.append(dns.message.from_wire(await reader.readexactly(length)))
        writer.close()
        sent += 2
        assert len(replies[0].answer[0]) == 100 and not replies[0].flags & dns.flags.TC
        assert answer_values(replies[1]) == ["example.com A 93.184.216.34"]
        # 5. The upstream does not answer: SERVFAIL.
        response = await ask("slow.example.com", tcp=True)
        sent += 1
        assert response.rcode() == dns.rcode.SERVFAIL
        # 6. A stranger is refused.
        response = await ask("example.com", source="127.0.0.2")
        sent += 1
        assert response.rcode() == dns.rcode.REFUSED
        # 7. Garbage gets FORMERR; a fragment of a header gets nothing.
        formerr, dropped = await asyncio.to_thread(
            _send_raw, port, b"\xbe\xef\x01\x00\x00\x01\xff", b"\xbe"
        )
        sent += 2
        assert parse(formerr).rcode() == dns.rcode.FORMERR
        assert dropped is None

        assert ("evil.example", "A") not in upstream.questions
        assert ("example.com", "TXT") not in upstream.questions
        assert ("rebind.example.com", "A") in upstream.questions
        for _ in range(50):  # the last event may still be on its way
            if len(sink.events) == sent:
                break
            await asyncio.sleep(0.01)
        return sink.events, sent
    finally:
        await server.stop()
        upstream.stop()


def _send_raw(port: int, *datagrams: bytes) -> list[bytes | None]:
    """Send each datagram, return each reply or None (blocking: run in a thread)."""
    replies = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.settimeout(0.5)
        for datagram in datagrams:
            raw.sendto(datagram, ("127.0.0.1", port))
            try:
                replies.append(raw.recv(512))
            except TimeoutError:
                replies.append(None)
    return replies


def test_server_end_to_end():
    events, sent = asyncio.run(_end_to_end())
    assert len(events) == sent
    assert all(
        e.kind == EventKind.DNS and e.protocol == "dns" and e.duration is not None for e in events
    )
    by_reason = [(e.name, e.reason, e.verdict) for e in events]
    # The two queries pipelined on one TCP connection are served at once: their
    # answers leave in order, their events as each is answered (example.com first).
    by_reason[5:7] = sorted(by_reason[5:7])
    assert by_reason == [
        ("example.com", Reason.RULE_ALLOW, Verdict.ALLOW),
        ("evil.example", Reason.NO_RULE, Verdict.DENY),
        ("example.com", Reason.DNS_QTYPE_NOT_ALLOWED, Verdict.DENY),
        ("rebind.example.com", Reason.DNS_REBINDING, Verdict.DENY),
        ("big.example.com", Reason.RULE_ALLOW, Verdict.ALLOW),
        ("big.example.com", Reason.RULE_ALLOW, Verdict.ALLOW),
        ("example.com", Reason.RULE_ALLOW, Verdict.ALLOW),
        ("slow.example.com", Reason.DNS_UPSTREAM_FAILURE, Verdict.DENY),
        (None, Reason.UNKNOWN_SANDBOX, Verdict.DENY),
        (None, Reason.DNS_MALFORMED, Verdict.DENY),
        (None, Reason.DNS_MALFORMED, Verdict.DENY),
    ]
    first = events[0]
    assert (first.sandbox, first.profile, first.rule_id) == ("sbx-1", "dev", "allow-example")
    assert first.source.startswith("127.0.0.1:")
    assert "A NOERROR 93.184.216.34" in first.detail
    assert "127.0.0.1 (loopback)" in events[3].detail
    assert events[8].sandbox is None and events[8].source.startswith("127.0.0.2:")


async def _one_query_each_way(**server_args) -> tuple[list, list[Event]]:
    """One query over UDP, one over TCP, to a started filter: the replies (None:
    none), and the events."""
    sink = ListSink()
    server = DnsFilter(decide_name=FakePolicy(), sink=sink, upstreams=[], **server_args)
    await server.start("127.0.0.1", 0)
    try:
        query = dns.message.make_query("example.com", "A")
        replies = []
        for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
            try:
                replies.append(await ask(query, "127.0.0.1", timeout=2, port=server.port))
            except (dns.exception.Timeout, EOFError, ConnectionError):
                replies.append(None)
        return replies, sink.events
    finally:
        await server.stop()


def test_a_bug_in_the_lookup_is_a_servfail_over_udp_and_tcp():
    """Anything unexpected is a SERVFAIL, an INTERNAL_ERROR event and a traceback,
    also where the intakes look the asker up (a datagram's read lost them all)."""

    def broken_registry(ip):
        raise RuntimeError("registry bug")

    replies, events = asyncio.run(_one_query_each_way(sandbox_for=broken_registry))
    assert [r.rcode() if r else None for r in replies] == [dns.rcode.SERVFAIL] * 2
    assert [(e.reason, e.verdict) for e in events] == [(Reason.INTERNAL_ERROR, Verdict.DENY)] * 2


def test_pending_limit_over_udp_and_tcp():
    """One sandbox cannot queue unbounded upstream work."""
    replies, events = asyncio.run(
        _one_query_each_way(
            sandbox_for=lambda ip: ("sbx-1", "dev", "t1"), max_pending_per_sandbox=0
        )
    )
    assert [r.rcode() if r else None for r in replies] == [dns.rcode.SERVFAIL] * 2
    assert [(e.reason, e.rule_id) for e in events] == [
        (Reason.SANDBOX_LIMIT, "builtin:sandbox-dns-pending")
    ] * 2


# --- the fast path on the bytes (wire.py, quick_check, filter_simple_answer) ------


def _same_message(fast: bytes, slow: bytes) -> None:
    """Two responses say the same: header, question spelling, records and TTLs, EDNS.
    (Names in records are compared without case: dnspython compresses them to any
    earlier spelling, e.g. `b.EXAMPLE.COM` after a question `WWW.EXAMPLE.COM`; and
    records in an RRset in any order: dnspython shuffles them as it renders.)"""
    a, b = parse(fast), parse(slow)
    assert (a.id, a.flags, a.rcode(), a.edns, a.payload) == (
        b.id,
        b.flags,
        b.rcode(),
        b.edns,
        b.payload,
    )
    assert [q.to_text() for q in a.question] == [q.to_text() for q in b.question]
    for section in ("answer", "authority", "additional"):
        mine, theirs = getattr(a, section), getattr(b, section)
        assert [(sorted(r.to_text().lower().split("\n")), r.ttl) for r in mine] == [
            (sorted(r.to_text().lower().split("\n")), r.ttl) for r in theirs
        ]


def _fast_or_none(query_wire: bytes, qname: str, reply: bytes, udp: bool = True):
    """filter_simple_answer's result, checked against filter_answer's when not None."""
    simple = scan_query(query_wire)
    assert simple is not None
    fast = filter_simple_answer(simple, qname, reply, udp=udp)
    if fast is None:
        return None
    query = parse(query_wire)
    slow = filter_answer(query, reply)
    assert slow.decision is None  # the fast path never passes what the filter edits
    _same_message(fast.response, render(slow.response, query, udp=udp))
    assert [(n, str(a), t) for n, a, t in fast.bindings] == slow.bindings
    assert fast.summary == _describe(slow.response)
    return fast


@pytest.mark.parametrize(
    "qname, qtype, records, answer, reason, bindings",
    [
        pytest.param("example.com", *case.values, id=case.id)
        for case in FILTER_CASES
        if case.values[0] in ("A", "AAAA")
    ]
    + [
        pytest.param("www.example.com", *case.values, id=case.id)
        for case in CHAIN_CASES
        if case.values[0] in ("A", "AAAA")
    ],
)
def test_fast_path_agrees_with_filter_answer(qname, qtype, records, answer, reason, bindings):
    """Where the fast path answers, it answers as filter_answer does; it leaves every
    answer with something to remove to filter_answer."""
    query = dns.message.make_query(qname.upper(), qtype, use_edns=0, payload=4096)
    records = [r.replace("@", qname + ".", 1) for r in records]
    fast = _fast_or_none(query.to_wire(), qname, upstream_answer(query, *records))
    if reason is not None:
        assert fast is None
    elif "TXT" not in str(records):  # the common shape: only CNAMEs and the type asked
        assert fast is not None and [(n, str(a), t) for n, a, t in fast.bindings] == bindings


@pytest.mark.parametrize(
    "records, authority, additional",
    [
        pytest.param([], [SOA], [], id="negative-with-soa"),
        pytest.param(["example.com. 60 DNAME example.net."], [], [], id="dname"),
        pytest.param(
            [f"example.com. 60 A {PUBLIC}"],
            ["example.com. 60 NS ns.example.com."],
            [],
            id="authority",
        ),
        pytest.param(
            [f"example.com. 60 A {PUBLIC}"], [], ["ns.example.com. 60 A 198.51.100.53"], id="glue"
        ),
    ],
)
def test_fast_path_leaves_the_rest_to_the_full_filter(records, authority, additional):
    query = dns.message.make_query("example.com", "A")
    reply = upstream_answer(query, *records, authority=authority, additional=additional)
    assert filter_simple_answer(scan_query(query.to_wire()), "example.com", reply, udp=True) is None


def test_fast_path_truncates_through_the_full_filter():
    """Too big for the client: None, so that render() sets TC as before."""
    query = dns.message.make_query("big.example.com", "A")  # no EDNS: 512 bytes
    reply = upstream_answer(query, *(line.replace(" ", ". ", 1) for line in BIG))
    assert (
        filter_simple_answer(scan_query(query.to_wire()), "big.example.com", reply, udp=True)
        is None
    )
    assert _fast_or_none(query.to_wire(), "big.example.com", reply, udp=False) is not None


def _mutated_a_answers():
    query = dns.message.make_query("www.example.com", "A", use_edns=0)
    base = upstream_answer(query, *CHAIN, f"edge.cdn.test. 30 A {PUBLIC}")
    question_end = 12 + len(query.question[0].name.to_wire()) + 4
    edits = st.lists(
        st.tuples(st.integers(question_end, len(base) - 1), st.integers(0, 255)), max_size=4
    )
    return st.tuples(st.just(query), edits.map(lambda e: _apply(base, e)))


@settings(max_examples=500, deadline=None)
@given(_mutated_a_answers())
def test_fast_path_on_mangled_answers_agrees_or_declines(case):
    """Whatever the upstream sends after the (checked) question, the fast path answers
    exactly as filter_answer does, or leaves it to filter_answer."""
    query, reply = case
    _fast_or_none(query.to_wire(), "www.example.com", reply)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=600), _mutated_queries()))
def test_quick_check_agrees_with_check_query(wire):
    policy = FakePolicy({"www.example.com": Verdict.ALLOW})
    quick = quick_check(wire, "dev", policy)
    if quick is None:
        return
    check = check_query(wire, "dev", policy)
    assert (quick.decision, quick.name, quick.qtype) == (check.decision, check.name, check.qtype)
    if quick.forward is not None:
        forward = parse(quick.forward)
        forward.id = check.forward.id
        assert forward == check.forward and forward.payload == check.forward.payload
        assert forward.to_wire() == check.forward.to_wire()
    else:
        _same_message(quick.response, check.response)


def with_option(code: int, data: bytes) -> bytes:
    """A query for www.example.com with one EDNS option of `code`, as sent (dnspython
    would refuse to write a malformed one)."""
    query = wire_query("www.example.com", "A", use_edns=0)  # the OPT ends it, RDLEN 0
    option = code.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
    return query[:-2] + len(option).to_bytes(2, "big") + option


OPTIONS = [
    pytest.param(8, bytes.fromhex("00014000"), id="ecs-prefix-64"),
    pytest.param(8, bytes.fromhex("00031800"), id="ecs-family-3"),
    pytest.param(8, bytes.fromhex("000118000a0000"), id="ecs-good"),
    pytest.param(10, b"\0", id="cookie-1-byte"),
    pytest.param(10, bytes(12), id="cookie-12-bytes"),
    pytest.param(10, bytes(8), id="cookie-client"),
    pytest.param(10, bytes(24), id="cookie-client-and-server"),
    pytest.param(15, b"\0", id="ede-short"),
    pytest.param(3, b"", id="nsid"),
    pytest.param(12, bytes(40), id="padding"),
    pytest.param(65001, b"\xff", id="unknown"),
]


@pytest.mark.parametrize("code, data", OPTIONS)
def test_quick_check_takes_only_options_dnspython_reads_back(code, data):
    """The fast path forwards a query; if the answer then needs the full filter, the
    query is read again by dnspython (DnsFilter._filtered), which must not refuse it
    then: a malformed client-subnet made that a traceback per query and an
    internal_error event instead of dns_rebinding. What the fast path takes,
    dnspython reads; what dnspython refuses, check_query answers FORMERR."""
    wire = with_option(code, data)
    policy = FakePolicy({"www.example.com": Verdict.ALLOW})
    quick = quick_check(wire, "dev", policy)
    try:
        dns.message.from_wire(wire)
    except dns.exception.FormError:
        assert quick is None
        check = check_query(wire, "dev", policy)
        assert check.action == "respond" and parse(check.response).rcode() == dns.rcode.FORMERR
        assert check.decision.reason == Reason.DNS_MALFORMED
        return
    check = check_query(wire, "dev", policy)
    assert check.action == "forward"
    if quick is not None:
        assert (quick.decision, quick.name, quick.qtype) == (
            check.decision,
            check.name,
            check.qtype,
        )


def test_a_query_refused_whole_names_what_it_asked():
    """Two questions (an allowed name and one carrying data), or another opcode: no
    answer is decided for them, and the event says which names were asked, escaped."""
    query = dns.message.make_query("www.example.com", "A")
    query.question.append(dns.rrset.RRset(dns.name.from_text("s3cr3t.evil.test"), 1, 1))
    check = check_query(query.to_wire(), "dev", FakePolicy({"www.example.com": Verdict.ALLOW}))
    assert check.decision.reason == Reason.DNS_MALFORMED
    assert check.decision.detail == "2 questions: www.example.com, s3cr3t.evil.test"
    notify = dns.message.make_query("data\\.x\\000.evil.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    check = check_query(notify.to_wire(), "dev", FakePolicy())
    assert check.decision.detail == "opcode NOTIFY: data\\.x\\000.evil.test"


def test_the_options_the_fast_path_leaves_are_dnspythons():
    assert {int(code) for code in dns.edns._type_to_class} - {10} == dns_wire._PARSED_OPTIONS


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(wire_query("example.com", "TXT"), id="type"),
        pytest.param(wire_query("exa\\.mple.com"), id="escaped-label"),
        pytest.param(wire_query("example.com", use_edns=1), id="edns1"),
        pytest.param(wire_query("example.com", "A") + b"\0", id="trailing-byte"),
        pytest.param(with_opcode(dns.opcode.NOTIFY), id="opcode"),
        pytest.param(wire_response(), id="response"),
    ],
)
def test_quick_check_declines_the_unusual(wire):
    assert quick_check(wire, "dev", FakePolicy()) is None


class _Upstream(asyncio.DatagramProtocol):
    """Answers each query with `reply(query)` (bytes, a list of datagrams, or None)."""

    def __init__(self, reply):
        self.reply, self.sources, self.ids = reply, [], []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.sources.append(addr[1])
        self.ids.append(data[:2])
        replies = self.reply(data)
        for reply in replies if isinstance(replies, list) else [replies] if replies else []:
            self.transport.sendto(reply, addr)


async def _with_upstream(reply, body):
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(
        lambda: _Upstream(reply), local_addr=("127.0.0.1", 0)
    )
    pool = UdpUpstream("127.0.0.1", transport.get_extra_info("sockname")[1], max_uses=5)
    try:
        return await body(pool, upstream)
    finally:
        pool.close()
        transport.close()


def _answer_to(data: bytes, name="example.com", address=PUBLIC) -> bytes:
    query = parse(data)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", address))
    return response.to_wire()


def test_upstream_socket_ignores_spoofed_replies():
    """A reply with another id, or another question, is not taken: the query waits
    for the real one; a query nobody answers times out."""

    def spoofing(data):
        wrong_id = bytes([data[0] ^ 1, data[1]]) + _answer_to(data, address="198.51.100.66")[2:]
        other = parse(data)
        other.question[0] = dns.rrset.RRset(dns.name.from_text("evil.test"), 1, 1)
        wrong_question = _answer_to(other.to_wire(), "evil.test", "198.51.100.67")
        return [wrong_id, wrong_question, _answer_to(data)]

    async def body(pool, upstream):
        reply = await pool.ask(forward_query("example.com", 1), timeout=2)
        return parse(reply)

    reply = asyncio.run(_with_upstream(spoofing, body))
    assert answer_values(reply) == [f"example.com A {PUBLIC}"]

    async def silent(pool, upstream):
        with pytest.raises(TimeoutError):
            await pool.ask(forward_query("example.com", 1), timeout=0.1)

    asyncio.run(_with_upstream(lambda data: None, silent))


def test_upstream_socket_ids_random_and_ports_rotated():
    """Queries get fresh random ids, and no source port serves more than max_uses."""

    async def body(pool, upstream):
        for _ in range(40):
            await pool.ask(forward_query("example.com", 1), timeout=2)
        return upstream

    upstream = asyncio.run(_with_upstream(_answer_to, body))
    assert len(set(upstream.ids)) >= 35  # 40 random 16-bit ids: collisions are rare
    # forward_query's placeholder never leaves. A random id may be 0 too (1 in 65,536
    # a query; CI drew one): two of 40 are ~1 in 5 million, a leak would be all 40.
    assert upstream.ids.count(b"\0\0") <= 1
    uses = {port: upstream.sources.count(port) for port in upstream.sources}
    assert len(uses) >= 40 // 5 and max(uses.values()) <= 5


def test_upstream_deadlines_of_any_order_fire_each_at_its_own_time():
    """One timer serves every query's deadline: a short one sent after a long one
    still times out first, and an answered query is never timed out later."""

    def answer_only_fast(data):
        return (
            _answer_to(data) if parse(data).question[0].name.to_text().startswith("fast") else None
        )

    async def body(pool, upstream):
        loop = asyncio.get_running_loop()
        started, ended = loop.time(), {}

        async def ask(name, timeout):
            try:
                await pool.ask(forward_query(name, 1), timeout=timeout)
                ended[name] = ("answered", loop.time() - started)
            except TimeoutError:
                ended[name] = ("timed out", loop.time() - started)

        await asyncio.gather(
            ask("slow-long.example.com", 0.6),
            ask("slow-short.example.com", 0.15),
            ask("fast.example.com", 0.2),
        )
        return ended

    ended = asyncio.run(_with_upstream(answer_only_fast, body))
    assert ended["fast.example.com"][0] == "answered" and ended["fast.example.com"][1] < 0.15
    assert ended["slow-short.example.com"][0] == "timed out"
    assert 0.14 <= ended["slow-short.example.com"][1] < 0.5
    assert ended["slow-long.example.com"][0] == "timed out"
    assert ended["slow-long.example.com"][1] >= 0.59


def test_upstream_query_given_up_is_forgotten_and_its_retired_socket_closed():
    """A query whose waiter is cancelled leaves its socket's table at once: a retired
    socket does not stay open until that query's deadline."""

    async def body(pool, upstream):
        waiting = asyncio.ensure_future(pool.ask(forward_query("example.com", 1), timeout=30))
        await asyncio.sleep(0.05)
        (entry,) = [e for e in pool._sockets if e is not None]
        entry.retired = True  # as `_pick` does after max_uses
        pool._draining.add(entry)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return entry.pending == {}, entry.sock.fileno()  # before the pool closes

    forgotten, fileno = asyncio.run(_with_upstream(lambda data: None, body))
    assert forgotten and fileno == -1


async def _two_upstreams(first_silent: bool, **server_args):
    """A filter with two upstreams on 127.0.0.1 (the first silent for `example.com`,
    or a closed port), asked for example.com over UDP: (reply, events, seconds, what
    each upstream was asked)."""
    first = FakeUpstream(ZONE, silent={"example.com"})
    second = FakeUpstream(ZONE)
    await first.start()
    await second.start()
    first_port = first.port
    if not first_silent:  # a port nothing listens on: ICMP port unreachable
        first.stop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            first_port = probe.getsockname()[1]
    sink = ListSink()
    server = DnsFilter(
        decide_name=FakePolicy(ALLOWED),
        sandbox_for=lambda ip: ("sbx-1", "dev", "t1"),
        sink=sink,
        upstreams=["127.0.0.1", "127.0.0.2"],
        upstream_port=first_port,
        timeout=0.3,
        **server_args,
    )
    # The second upstream listens on another port: each address gets its own.
    server._udp_upstreams["127.0.0.2"] = UdpUpstream("127.0.0.1", second.port)
    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        query = dns.message.make_query("example.com", "A")
        reply = await dns.asyncquery.udp(query, "127.0.0.1", timeout=3, port=server.port)
        return reply, sink.events, loop.time() - started, (first.questions, second.questions)
    finally:
        await server.stop()
        first.stop()
        second.stop()


@pytest.mark.parametrize("first_silent", [True, False], ids=["first-times-out", "first-refuses"])
def test_udp_query_goes_on_to_the_next_upstream_with_one_event(first_silent):
    """The common UDP query is forwarded without a task of its own; when the first
    upstream does not answer (a timeout, or ICMP unreachable at once), the query goes
    on to the next one from there: one answer, one event, one timeout at most."""
    reply, events, seconds, (asked_first, asked_second) = asyncio.run(_two_upstreams(first_silent))
    assert answer_values(reply) == ["example.com A 93.184.216.34"]
    (event,) = events
    assert event.verdict is Verdict.ALLOW and "A NOERROR 93.184.216.34" in event.detail
    assert asked_second == [("example.com", "A")]
    assert asked_first == ([("example.com", "A")] if first_silent else [])
    assert seconds < (0.6 if first_silent else 0.25)  # the first's timeout once, not twice


# --- upstream answers are size-checked before parsing ------------------------------


def _many_addresses(data: bytes, count: int, *, truncated: bool = False) -> bytes:
    """A well-formed answer to `data` with `count` public A records (~16 bytes each):
    what the filter would pass on, were it not for its size."""
    response = dns.message.make_response(parse(data))
    rrset = dns.rrset.from_text(
        "example.com.", 60, "IN", "A", *(f"198.51.{i // 250}.{i % 250 + 1}" for i in range(count))
    )
    if truncated:
        response.flags |= dns.flags.TC
    else:
        response.answer.append(rrset)
    return response.to_wire(max_size=65535)


class _HostileTcp:
    """A TCP resolver on loopback that answers with `reply(query)` written after a
    length prefix of `announce(reply)`, then the answer unless the gateway hung up on
    the prefix (`hung_up`, one entry per query)."""

    def __init__(self, reply, announce=len):
        self.reply, self.announce, self.hung_up = reply, announce, []

    async def serve(self, reader, writer):
        size = int.from_bytes(await reader.readexactly(2), "big")
        reply = self.reply(await reader.readexactly(size))
        writer.write(self.announce(reply).to_bytes(2, "big"))
        await writer.drain()
        try:  # the gateway decides on the prefix alone and hangs up
            self.hung_up.append(await asyncio.wait_for(reader.read(), 1) == b"")
        except (TimeoutError, ConnectionError):
            self.hung_up.append(False)
        if not self.hung_up[-1]:
            writer.write(reply)
            await writer.drain()
        writer.close()


async def _ask_hostile(udp_reply, tcp: _HostileTcp | None = None, *, client_tcp=False):
    """One allowed A query for example.com (over TCP if `client_tcp`) through a
    DnsFilter whose upstream answers UDP with `udp_reply` (and TCP with `tcp`):
    (response, events, bindings)."""
    transport, tcp_server = await udp_and_tcp_twins(
        lambda: _Upstream(udp_reply), tcp.serve if tcp is not None else None
    )
    upstream_port = transport.get_extra_info("sockname")[1]
    sink, bindings = ListSink(), DnsBindings()
    server = DnsFilter(
        decide_name=FakePolicy({"example.com": Verdict.ALLOW}),
        sandbox_for=lambda ip: ("sbx-1", "dev", "t1"),
        sink=sink,
        upstreams=["127.0.0.1"],
        upstream_port=upstream_port,
        bindings=bindings,
        timeout=2,
    )
    await server.start("127.0.0.1", 0)
    try:
        query = dns.message.make_query("example.com", "A", use_edns=0, payload=4096)
        ask = dns.asyncquery.tcp if client_tcp else dns.asyncquery.udp
        response = await ask(query, "127.0.0.1", timeout=3, port=server.port)
        return response, sink.events, bindings
    finally:
        await server.stop()
        transport.close()
        if tcp_server is not None:
            tcp_server.close()


def test_oversized_udp_answer_is_servfail_and_never_parsed(monkeypatch):
    """A UDP answer over MAX_ANSWER_BYTES (300 public A records, well formed) is not
    parsed: SERVFAIL, a dns_upstream_failure event naming the size, no binding."""
    parsed = []
    real_from_wire = dns.message.from_wire
    monkeypatch.setattr(
        dns.message,
        "from_wire",
        lambda wire, *a, **k: parsed.append(len(wire)) or real_from_wire(wire, *a, **k),
    )
    response, events, bindings = asyncio.run(_ask_hostile(lambda data: _many_addresses(data, 300)))
    assert response.rcode() == dns.rcode.SERVFAIL and response.answer == []
    (event,) = events
    assert event.verdict is Verdict.DENY and event.reason == Reason.DNS_UPSTREAM_FAILURE
    assert "an answer of 4" in event.detail and "at most 4096" in event.detail
    assert bindings.count("sbx-1") == 0
    assert all(size <= 4096 for size in parsed)  # nothing the upstream sent was parsed


def test_answer_just_under_the_bound_still_resolves():
    """The bound is no lower than it says: 200 records (~3.3 KB) pass over UDP (the
    sandbox asks over TCP, as it would after our truncated answer)."""
    response, events, bindings = asyncio.run(
        _ask_hostile(lambda data: _many_addresses(data, 200), client_tcp=True)
    )
    assert response.rcode() == dns.rcode.NOERROR and len(response.answer[0]) == 200
    assert events[0].verdict is Verdict.ALLOW and bindings.count("sbx-1") == 200


@pytest.mark.parametrize(
    "announce",
    [
        pytest.param(lambda reply: 65535, id="prefix-announces-64k"),
        pytest.param(len, id="whole-6k-answer"),
    ],
)
def test_oversized_tcp_answer_refused_on_its_length_prefix(announce):
    """Truncated over UDP, then a TCP answer announcing more than MAX_ANSWER_BYTES:
    SERVFAIL at once (not after the timeout), the body never read, no binding."""
    tcp = _HostileTcp(lambda data: _many_addresses(data, 400), announce)
    response, events, bindings = asyncio.run(
        _ask_hostile(lambda data: _many_addresses(data, 0, truncated=True), tcp)
    )
    assert response.rcode() == dns.rcode.SERVFAIL and response.answer == []
    (event,) = events
    assert event.reason == Reason.DNS_UPSTREAM_FAILURE
    assert "at most 4096" in event.detail and event.duration < 1.5
    assert bindings.count("sbx-1") == 0
    assert tcp.hung_up == [True]  # the body was never read


def test_tcp_answer_to_another_query_is_refused():
    """Over TCP, too, a reply must carry the query's id and question."""

    def other_id(data):
        reply = _many_addresses(data, 3)
        return bytes([reply[0] ^ 0xFF]) + reply[1:]

    tcp = _HostileTcp(other_id)
    response, events, bindings = asyncio.run(
        _ask_hostile(lambda data: _many_addresses(data, 0, truncated=True), tcp)
    )
    assert response.rcode() == dns.rcode.SERVFAIL
    assert "ValueError" in events[0].detail and bindings.count("sbx-1") == 0


async def ask_over_udp(server: DnsFilter, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0, payload=4096)
    return await dns.asyncquery.udp(query, "127.0.0.1", timeout=3, port=server.port)


class HandoverUpstream(FakeUpstream):
    """Answers like FakeUpstream, after `handover()` ran: what happens to a sandbox
    address while its query is upstream (its task ends, another task is given it)."""

    def __init__(self, zone, handover):
        super().__init__(zone)
        self.handover = handover

    def answer(self, wire: bytes, udp: bool) -> bytes | None:
        self.handover()
        return super().answer(wire, udp)


@pytest.mark.parametrize(
    "successor",
    [
        pytest.param(None, id="address-freed"),
        pytest.param(("sbx-1", "dev", "task-b"), id="address-given-to-another-task"),
        pytest.param(("sbx-1", "strict", "task-b"), id="another-task-stricter-profile"),
    ],
)
def test_an_answer_that_comes_after_its_task_ended_binds_nothing_and_stays_its_tasks(
    successor,
):
    """A task's query still upstream when the task ends: the answer may not bind the
    name to the address (a later task given it would inherit a name only the earlier
    one resolved), and the event is the asking task's, not nobody's or the next's."""
    registry = {"127.0.0.1": ("sbx-1", "dev", "task-a")}

    def handover():  # (twice for big.example.com: over UDP, then over TCP)
        registry.pop("127.0.0.1", None)
        if successor is not None:
            registry["127.0.0.1"] = successor

    async def scenario():
        upstream = HandoverUpstream(ZONE, handover)
        await upstream.start()
        sink, bindings = ListSink(), DnsBindings()
        server = DnsFilter(
            decide_name=FakePolicy(ALLOWED),
            sandbox_for=registry.get,
            sink=sink,
            upstreams=["127.0.0.1"],
            upstream_port=upstream.port,
            bindings=bindings,
            timeout=1,
        )
        await server.start("127.0.0.1", 0)
        try:
            # example.com takes the quick path; big.example.com (over 512 bytes) dnspython's.
            for name in ("example.com", "big.example.com"):
                registry["127.0.0.1"] = ("sbx-1", "dev", "task-a")
                reply = await ask_over_udp(server, name)
                assert reply.rcode() == dns.rcode.NOERROR  # task A still gets it
        finally:
            await server.stop()
            upstream.stop()
        return sink.events, bindings

    events, bindings = asyncio.run(scenario())
    assert bindings.count("sbx-1") == 0
    assert not bindings.names_for("sbx-1", "93.184.216.34")
    assert [(e.name, e.task_id) for e in events] == [
        ("example.com", "task-a"),
        ("big.example.com", "task-a"),
    ]


def test_an_answer_for_a_task_that_still_holds_its_address_is_bound():
    """The control of the test above: the same queries with no handover are bound."""
    registry = {"127.0.0.1": ("sbx-1", "dev", "task-a")}

    async def scenario():
        upstream = HandoverUpstream(ZONE, lambda: None)
        await upstream.start()
        bindings = DnsBindings()
        server = DnsFilter(
            decide_name=FakePolicy(ALLOWED),
            sandbox_for=registry.get,
            sink=ListSink(),
            upstreams=["127.0.0.1"],
            upstream_port=upstream.port,
            bindings=bindings,
            timeout=1,
        )
        await server.start("127.0.0.1", 0)
        try:
            for name in ("example.com", "big.example.com"):
                await ask_over_udp(server, name)
        finally:
            await server.stop()
            upstream.stop()
        return bindings

    bindings = asyncio.run(scenario())
    assert bindings.resolved("sbx-1", "example.com", "93.184.216.34")
    assert bindings.resolved("sbx-1", "big.example.com", "198.51.0.1")
