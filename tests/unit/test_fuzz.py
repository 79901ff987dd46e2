"""Property-based fuzzing of what a task (or its upstream) can feed the gateway's pure
parsers: the ClientHello reader, DNS queries and upstream answers, and the rule
loader. The properties: never an exception the contract does not name, and never an
allow for malformed input. (HTTP request heads are fuzzed with the HTTP path.)

Each property runs a few hundred examples in well under a few seconds; the seeds
are hypothesis's own (derandomize is not set), so CI keeps exploring.
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import parse_client_hello as mitmproxy_parse
from sandgate.proxy.clienthello import parse_client_hello
from sandgate.proxy.dns.answer import filter_answer, render
from sandgate.proxy.dns.query import ALLOWED_QTYPES, check_query
from sandgate.proxy.gate import Outcome
from sandgate.proxy.policy import (
    ConnectFacts,
    Decision,
    PolicyError,
    Reason,
    Verdict,
    decide,
    load_policy,
)
from sandgate.proxy.policy.builtin import builtin_rule
from sandgate.proxy.policy.names import InvalidName, parse_domain, special_range
from support.fakes import SANDBOX, client_hello, make_gate

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALLOWED = "allowed.test"  # the one name the gate's rules (support.fakes.GATE_RULES) allow on 443


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """`seed` with a few bytes replaced, inserted or removed, or cut short: inputs
    near a valid message reach far deeper into a parser than random bytes do."""

    def mutate(data: bytes, edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
        buffer = bytearray(data)
        for kind, where, value in edits:
            at = where % (len(buffer) + 1)
            if kind == 0 and at < len(buffer):
                buffer[at] = value
            elif kind == 1:
                buffer.insert(at, value)
            elif at < len(buffer):
                del buffer[at]
        return bytes(buffer if cut is None else buffer[: cut % (len(buffer) + 1)])

    edit = st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255))
    return st.builds(
        mutate, st.just(seed), st.lists(edit, min_size=1, max_size=6), st.none() | st.integers(0)
    )


# --- the ClientHello reader ------------------------------------------------------------------

_HELLO = client_hello(ALLOWED)
_tls_bytes = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=600).map(lambda b: b"\x16\x03\x01" + b),
    _mutations(_HELLO),
)


def _read(data: bytes):
    """parse_client_hello's three-way result, with ValueError as a value."""
    try:
        return parse_client_hello(data)
    except ValueError as e:
        return e


@FAST
@given(_tls_bytes)
def test_clienthello_reader_only_ever_answers_hello_need_more_or_valueerror(data):
    result = _read(data)  # anything but ValueError propagates and fails the test
    if result is None or isinstance(result, ValueError):
        return
    assert result.sni is None or (isinstance(result.sni, str) and result.sni.isascii())
    # Where we read a name the policy could allow, mitmproxy's reader (standing for
    # the inspected path's and the upstream's view) reads the same: no two views of
    # one hello. (A name that is no host name, e.g. with a NUL, is denied anyway.)
    try:
        parse_domain(result.sni or "")
    except InvalidName:
        return
    try:
        theirs = mitmproxy_parse(data)
    except ValueError:
        return  # stricter there: the gate has refused it already, or it never reaches mitmproxy
    assert theirs is None or theirs.sni == result.sni


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return make_gate(tmp_path_factory.mktemp("gate"))


@FAST
@given(data=_tls_bytes)
def test_the_gate_never_allows_tls_it_cannot_read_or_that_names_another_host(gate, data):
    assume(data[:1] == b"\x16")
    state = gate.on_connect(("fuzz", 1), SANDBOX, 40000, "203.0.113.10", 443)
    assert state is not None
    try:
        outcome = gate.on_first_bytes(state, data)
        result = _read(data)
        if outcome in (Outcome.PASSTHROUGH, Outcome.INTERCEPT):
            assert not isinstance(result, ValueError) and result is not None, result
            assert result.sni is not None and result.sni.lower().rstrip(".") == ALLOWED
        if isinstance(result, ValueError):
            assert outcome is Outcome.REJECT
    finally:
        gate.on_close(state)
        gate.events.clear()
    assert gate.connections == {}


# --- DNS: the query check --------------------------------------------------------------------


def _decide_name(profile: str, name: str) -> Decision:
    """The policy for these tests: only ALLOWED may be resolved."""
    if name == ALLOWED:
        return Decision(Verdict.ALLOW, Reason.RULE_ALLOW, builtin_rule("internal-error"))
    return Decision(Verdict.DENY, Reason.NO_RULE, builtin_rule("internal-error"))


_QUERY = dns.message.make_query(ALLOWED, "A", use_edns=0).to_wire()
_label = st.binary(min_size=1, max_size=20) | st.sampled_from(
    [b"allowed", b"test", b"ALLOWED", b"allowed\x00", b"allowed.test", b"*", b"xn--", b"127"]
)


@st.composite
def _queries(draw) -> bytes:
    """Well-formed DNS messages with any question: labels of any bytes, any type and
    class, flags and EDNS as a client could set them."""
    labels = draw(st.lists(_label, min_size=0, max_size=4))
    try:
        name = dns.name.Name([*labels, b""])
    except dns.name.NameTooLong:
        assume(False)
    query = dns.message.make_query(
        name,
        draw(st.sampled_from([1, 28, 5, 65, 16, 255, 252, 64])),
        draw(st.sampled_from([1, 3, 255])),
        use_edns=draw(st.sampled_from([None, 0, 1])),
    )
    query.flags |= draw(st.sampled_from([0, dns.flags.QR, dns.flags.AA | dns.flags.CD]))
    query.set_opcode(draw(st.sampled_from([0, 0, 0, 2, 4, 5])))
    return query.to_wire()


_dns_bytes = st.one_of(st.binary(max_size=300), _mutations(_QUERY), _queries())


@FAST
@given(_dns_bytes)
def test_a_query_is_forwarded_only_for_an_allowed_name_and_type(wire):
    check = check_query(wire, "default", _decide_name)  # never raises
    assert check.action in ("forward", "respond", "drop")
    if check.action == "forward":
        assert check.decision.allowed and check.name == ALLOWED
        (question,) = check.forward.question
        assert question.name == dns.name.from_text(ALLOWED)
        assert question.rdtype in ALLOWED_QTYPES and question.rdclass == dns.rdataclass.IN
        assert check.forward.opcode() == 0 and not check.forward.flags & dns.flags.QR
    else:
        assert not check.decision.allowed
    if check.response is not None:
        response = dns.message.from_wire(check.response)  # what we send parses
        assert response.flags & dns.flags.QR and not response.answer


# --- DNS: the answer filter ------------------------------------------------------------------

_ip = st.ip_addresses().map(str) | st.sampled_from(
    [
        "169.254.169.254",
        "127.0.0.1",
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "168.63.129.16",
        "fd00:ec2::254",
    ]
)


@st.composite
def _answers(draw) -> tuple[dns.message.Message, dns.message.Message]:
    """A forwarded A/AAAA query and an upstream answer with CNAME chains and addresses
    of any kind, in any order, some at unrelated owners."""
    qtype = draw(st.sampled_from(["A", "AAAA"]))
    query = dns.message.make_query(ALLOWED, qtype)
    answer = dns.message.make_response(query)
    owners = [ALLOWED, "cdn.example.", "edge.example.", "other.example."]
    for _ in range(draw(st.integers(0, 6))):
        owner = draw(st.sampled_from(owners))
        if draw(st.booleans()):
            rrset = dns.rrset.from_text(owner, 60, "IN", "CNAME", draw(st.sampled_from(owners)))
        else:
            ip = ipaddress.ip_address(draw(_ip))
            kind = "A" if ip.version == 4 else "AAAA"
            rrset = dns.rrset.from_text(owner, 60, "IN", kind, str(ip))
        answer.answer.append(rrset)
    answer.set_rcode(draw(st.sampled_from([0, 0, 0, 3, 2, 5])))
    return query, answer


@FAST
@given(_answers())
def test_no_special_address_survives_the_answer_filter(pair):
    query, upstream = pair
    filtered = filter_answer(query, upstream)  # never raises
    for rrset in filtered.response.answer:
        for rd in rrset:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                assert special_range(ipaddress.ip_address(rd.address)) is None, rd.address
    for name, address, _ttl in filtered.bindings:
        assert special_range(ipaddress.ip_address(address)) is None
        assert name == ALLOWED or name.endswith(".example")
    wire = render(filtered.response, query, udp=True)
    assert dns.message.from_wire(wire).id == query.id


@FAST
@given(st.one_of(st.binary(max_size=400), _mutations(_QUERY)))
def test_any_upstream_bytes_give_an_answer_or_servfail(upstream):
    query = dns.message.make_query(ALLOWED, "A")
    filtered = filter_answer(query, upstream)  # never raises
    rcode = filtered.response.rcode()
    assert rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)
    for _name, address, _ttl in filtered.bindings:
        assert special_range(ipaddress.ip_address(address)) is None


# --- the rule loader -------------------------------------------------------------------------

KEYS = [
    "version", "profiles", "default", "other", "fallback", "extends", "include", "rules",
    "limits", "allow", "deny", "ports", "methods", "paths", "id", "expires", "comment",
    "connections", "dns_qps", "description",
]  # fmt: skip
SCALARS = [
    1, 2, 0, -1, 65536, 443, "1", "deny", "ask", "audit", "allow", "maybe", True, None, "",
    "a.test", "*.b.test", "*", "*.com", "10.0.0.0/8", "203.0.113.7", "0x7f.1", "a b",
    "a.test:443", "GET", "get", "BREW", "/x/**", "x", "/a/../b", "2027-01-01",
    "2027-01-01T00:00:00", "2027-13-01", "github", "nope", "../../etc/passwd", "\x00",
    "xn--", "ex\u0430mple.test", "default", "other",
]  # fmt: skip
PROBE = "probe.unlisted.example"  # named by no target above


def _documents() -> st.SearchStrategy:
    """YAML-ish documents: mappings and lists of the loader's own words."""
    scalars = st.sampled_from(SCALARS)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(KEYS) | scalars.map(str), inner, max_size=5)
        ),
        max_leaves=25,
    )


def _load(text: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(text, encoding="utf-8")
        return load_policy(path, today=datetime.date(2026, 1, 1))


def _load_or_problems(text: str):
    try:
        return _load(text)
    except PolicyError as e:
        assert e.problems, "a PolicyError names at least one problem"
        for problem in e.problems:
            assert problem.line >= 1 and problem.column >= 1
            assert problem.message and "\n" not in problem.message, problem
            assert "Traceback" not in problem.message
        return None


@SLOW
@given(
    st.one_of(
        _documents().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        _documents().map(lambda d: yaml.safe_dump({"version": 1, "profiles": {"default": d}})),
        _documents().map(
            lambda d: yaml.safe_dump({"version": 1, "profiles": {"default": {"rules": [d]}}})
        ),
        st.text(max_size=200),
    )
)
def test_the_loader_gives_a_policy_or_clean_errors_and_never_allows_what_nobody_named(text):
    policy = _load_or_problems(text)
    if policy is None:
        return
    for name, profile in policy.profiles.items():
        decision = decide(policy, ConnectFacts(name, 443, name=PROBE))
        assert decision.reason is Reason.NO_RULE and decision.rule is profile.fallback


GOOD_RULE = {"allow": "good.test", "id": "good"}
# One field of an otherwise valid rule for bad.test, made wrong.
BROKEN_FIELDS = st.sampled_from(
    [
        {"ports": ["99999"]},
        {"ports": "http"},
        {"ports": []},
        {"methods": ["BREW"]},
        {"paths": ["no-slash"]},
        {"paths": ["/a/../b"]},
        {"paths": ["/a**"]},
        {"expires": "2027-13-01"},
        {"expires": "2027-01-01T00:00:00"},
        {"id": "has space"},
        {"id": "good"},  # a duplicate
        {"colour": "red"},
        {"deny": "bad.test"},  # both allow and deny
        {"allow": "*"},
        {"allow": "*.com"},
        {"allow": "bad.test:443"},
        {"allow": "0x7f.1"},
        {"allow": "10.0.0.1/8"},
        {"allow": ["bad.test", "b d.test"]},
        {"allow": []},
        {"allow": {"nested": "bad.test"}},
        {"comment": ["a", "list"]},
    ]
)


@SLOW
@given(broken=BROKEN_FIELDS, first=st.booleans(), profile_fallback=st.sampled_from(["deny", "ask"]))
def test_one_malformed_field_rejects_the_whole_file(broken, first, profile_fallback):
    bad = {"allow": "bad.test", "id": "bad", **broken}
    rules = [bad, GOOD_RULE] if first else [GOOD_RULE, bad]
    text = yaml.safe_dump(
        {"version": 1, "profiles": {"default": {"fallback": profile_fallback, "rules": rules}}}
    )
    with pytest.raises(PolicyError) as caught:
        _load(text)
    assert all(p.line >= 1 and "\n" not in p.message for p in caught.value.problems)
