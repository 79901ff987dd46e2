"""The connection gate, pure: plain values in, an outcome and exactly one event per
decision out. No sockets, no mitmproxy."""

from __future__ import annotations

import dataclasses

import pytest
from sandgate.proxy.gate import MAX_FIRST_BYTES, Outcome
from sandgate.proxy.policy.request_head import RequestHead
from support.fakes import (
    GATE_RULES,
    SANDBOX,
    client_hello,
    extension,
    hello_with_extensions,
    make_gate,
    request_head,
    server_name,
)


@pytest.fixture
def gate(tmp_path):
    return make_gate(tmp_path)


def connect(gate, dst: str, port: int, src: str = SANDBOX, key=("k", 1)):
    return gate.on_connect(key, src, 40000, dst, port)


def summary(event) -> tuple:
    return (
        str(event.kind),
        str(event.verdict),
        str(event.reason),
        event.rule_id,
        event.name,
        event.protocol,
    )


@pytest.mark.parametrize(
    "src, dst, port, reason, rule",
    [
        pytest.param(
            "10.213.9.9",
            "203.0.113.10",
            443,
            "unknown_sandbox",
            "builtin:unknown-sandbox",
            id="unknown-source",
        ),
        pytest.param(
            SANDBOX,
            "169.254.169.254",
            80,
            "private_address",
            "builtin:private-address",
            id="metadata",
        ),
        pytest.param(SANDBOX, "203.0.113.99", 443, "rule_deny", "deny-ip", id="ip-deny-rule"),
        pytest.param(
            SANDBOX,
            "not an ip",
            443,
            "unknown_sandbox",
            "builtin:unknown-sandbox",
            id="bad-destination",
        ),
    ],
)
def test_hard_denials_at_connect(gate, src, dst, port, reason, rule):
    assert connect(gate, dst, port, src=src) is None
    assert [(str(e.reason), e.rule_id, e.dst_ip, e.dst_port) for e in gate.events] == [
        (reason, rule, dst, port)
    ]
    assert gate.connections == {}


def test_no_rule_yet_waits_for_the_bytes(gate):
    state = connect(gate, "203.0.113.66", 443)
    assert state is not None and gate.connections == {("k", 1): state}
    assert gate.events == []


@pytest.mark.parametrize(
    "dst, port, data, outcome, event",
    [
        pytest.param(
            "203.0.113.10",
            443,
            client_hello("allowed.test"),
            Outcome.PASSTHROUGH,
            ("connection", "allow", "rule_allow", "allowed", "allowed.test", "tls"),
            id="tls-allowed",
        ),
        pytest.param(
            "203.0.113.11",
            443,
            client_hello("api.allowed.test"),
            Outcome.INTERCEPT,
            ("connection", "allow", "rule_allow", "api-get", "api.allowed.test", "tls"),
            id="tls-inspected",
        ),
        pytest.param(
            "203.0.113.66",
            443,
            client_hello("allowed.test"),
            Outcome.REJECT,
            (
                "connection",
                "deny",
                "spoofed_destination",
                "builtin:spoofed-destination",
                "allowed.test",
                "tls",
            ),
            id="tls-spoofed",
        ),
        pytest.param(
            "203.0.113.66",
            443,
            client_hello(None),
            Outcome.REJECT,
            ("connection", "deny", "missing_sni", "builtin:missing-sni", None, "tls"),
            id="tls-no-sni",
        ),
        pytest.param(
            "203.0.113.10",
            443,
            b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
            Outcome.REJECT,
            ("connection", "deny", "malformed_tls", "builtin:malformed-tls", None, "tls"),
            id="tls-malformed",
        ),
        pytest.param("203.0.113.10", 80, b"GET / HTTP/1.1\r\n", Outcome.HTTP, None, id="http"),
        pytest.param(
            "203.0.113.10",
            22,
            b"SSH-2.0-x\r\n",
            Outcome.PASSTHROUGH,
            ("connection", "allow", "rule_allow", "ssh", "ssh.allowed.test", "tcp"),
            id="raw-by-binding",
        ),
        pytest.param(
            "203.0.113.66",
            22,
            b"SSH-2.0-x\r\n",
            Outcome.REJECT,
            ("connection", "deny", "no_rule", "default:fallback", None, "tcp"),
            id="raw-unknown",
        ),
        pytest.param(
            "203.0.113.10",
            443,
            b"SSH-2.0-tunnel\r\n",
            Outcome.REJECT,
            ("connection", "deny", "not_http", "builtin:not-http", None, "tcp"),
            id="not-http-on-443",
        ),
        pytest.param(
            "203.0.113.12",
            5432,
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            Outcome.REJECT,
            ("connection", "deny", "not_http", "builtin:not-http", "db.allowed.test", "tcp"),
            id="raw-where-a-rule-needs-http",
        ),
        pytest.param("203.0.113.10", 443, b"\x16\x03", Outcome.WAIT, None, id="two-bytes"),
        pytest.param(
            "203.0.113.10",
            22,
            b"GET",
            Outcome.WAIT,
            None,
            id="a-method-alone-waits-for-its-request",
        ),
        pytest.param(
            "203.0.113.10", 22, b"GET / HTTP/1.1\r\n", Outcome.HTTP, None, id="http-on-a-raw-port"
        ),
        pytest.param(
            "203.0.113.10",
            443,
            client_hello("allowed.test")[:40],
            Outcome.WAIT,
            None,
            id="half-hello",
        ),
    ],
)
def test_first_bytes(gate, dst, port, data, outcome, event):
    state = connect(gate, dst, port)
    assert gate.on_first_bytes(state, data) is outcome
    assert [summary(e) for e in gate.events] == ([event] if event else [])
    if outcome in (Outcome.PASSTHROUGH, Outcome.INTERCEPT):
        assert state.allowed is not None and state.allowed.allowed
    # Decided once: asking again gives the same outcome and no second event.
    assert gate.on_first_bytes(state, data) is outcome
    assert len(gate.events) == (1 if event else 0)


def test_a_client_hello_that_never_ends_is_refused_at_the_cap(gate):
    state = connect(gate, "203.0.113.10", 443)
    endless = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * (MAX_FIRST_BYTES - 9)
    assert gate.on_first_bytes(state, endless[:-1]) is Outcome.WAIT
    assert gate.on_first_bytes(state, endless) is Outcome.REJECT
    assert [str(e.reason) for e in gate.events] == ["malformed_tls"]


@pytest.mark.parametrize(
    "dst, port, outcome, reason",
    [
        pytest.param("203.0.113.10", 22, Outcome.PASSTHROUGH, "rule_allow", id="bound-name-allows"),
        pytest.param("203.0.113.66", 22, Outcome.REJECT, "no_rule", id="unknown-address"),
        pytest.param("203.0.113.10", 443, Outcome.WAIT, None, id="web-port-keeps-waiting"),
        pytest.param("203.0.113.12", 5432, Outcome.REJECT, "not_http", id="rule-needs-http"),
    ],
)
def test_silence_decides_non_web_ports_as_raw_tcp(gate, dst, port, outcome, reason):
    state = connect(gate, dst, port)
    assert gate.on_silence(state) is outcome
    assert [str(e.reason) for e in gate.events] == ([reason] if reason else [])


def test_raw_bytes_a_rule_of_methods_applies_to_are_not_http_before_any_ask(tmp_path):
    """`fallback: ask` and a deny of DELETE for db.allowed.test: raw bytes on 5432 can
    never be held to that rule. They were asked about (the ask carried `inspect`), and
    an approval passed them on for interception, as TLS, to die there: refused at once."""
    rules = (
        "version: 1\nprofiles:\n  default:\n    fallback: ask\n    rules:\n"
        "      - deny: db.allowed.test\n        ports: [5432]\n        methods: [DELETE]\n"
    )
    gate = make_gate(tmp_path, rules=rules)
    state = connect(gate, "203.0.113.12", 5432)
    assert gate.on_silence(state) is Outcome.REJECT
    assert [(str(e.reason), e.rule_id) for e in gate.events] == [("not_http", "builtin:not-http")]


def test_closed_before_a_decision_is_no_data(gate):
    state = connect(gate, "203.0.113.66", 25)
    gate.on_close(state, "nothing decidable within 30 s; the gateway closed it")
    (event,) = gate.events
    assert (str(event.reason), event.rule_id, event.dst_port) == ("no_data", "builtin:no-data", 25)
    assert event.detail == "nothing decidable within 30 s; the gateway closed it"
    assert gate.connections == {}


def test_allowed_connection_end_reports_bytes_and_what_ended_it(gate):
    state = connect(gate, "203.0.113.10", 443)
    gate.on_first_bytes(state, client_hello("allowed.test"))
    state.bytes_up, state.bytes_down = 517, 0
    gate.on_close(state, "upstream connect failed: Connection refused")
    allow, end = gate.events
    assert (str(end.kind), end.rule_id, end.bytes_up, end.bytes_down) == (
        "connection_end",
        "allowed",
        517,
        0,
    )
    assert end.detail == f"{allow.detail}; upstream connect failed: Connection refused"
    gate.on_close(state)  # a second close reports nothing more
    assert len(gate.events) == 2


def test_a_plain_http_connection_end_names_its_first_allowed_host(gate):
    """An address is shared by many sites: a plain-HTTP end without a name hid where
    its bytes went (past the audit budget, the request lines are sampled)."""
    state = connect(gate, "203.0.113.10", 80)
    assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
    assert gate.on_request(state, request_head("allowed.test"), tls=False)[0].allowed
    state.bytes_up = 2_000_000
    gate.on_close(state)
    end = gate.events[-1]
    assert (str(end.kind), end.name, end.bytes_up) == ("connection_end", "allowed.test", 2_000_000)


def test_a_rejected_connection_ends_without_another_event_an_undecided_http_one_with_its_own(
    gate,
):
    rejected = connect(gate, "203.0.113.66", 22, key=1)
    gate.on_first_bytes(rejected, b"SSH-2.0-x\r\n")
    http = connect(gate, "203.0.113.10", 80, key=2)
    gate.on_first_bytes(http, b"GET / HTTP/1.1\r\n")
    refused = connect(gate, "203.0.113.10", 80, key=3)
    gate.on_first_bytes(refused, b"GET /\x00 HTTP/1.1\r\n")
    refused.bytes_up = 40  # what the engine counted before its parser answered 400
    for state in (rejected, http, refused):
        gate.on_close(state)
    # No request was decided on either HTTP connection: never an allow, never silence.
    assert [(str(e.reason), e.verdict) for e in gate.events] == [
        ("no_rule", "deny"),
        ("no_data", "deny"),
        ("malformed_request", "deny"),
    ]
    assert gate.connections == {}


def test_hand_off_and_adopt_keep_one_decision(gate):
    state = connect(gate, "203.0.113.11", 443, key=("10.213.0.2", 40000))
    assert gate.on_first_bytes(state, client_hello("api.allowed.test")) is Outcome.INTERCEPT
    assert gate.adopt(("10.213.0.2", 40000), "mitm-1") is None  # not handed off: not adoptable
    gate.hand_off(state)
    assert gate.adopt(("10.213.0.2", 40000), "mitm-1") is state
    assert gate.connections == {"mitm-1": state} and state.key == "mitm-1"
    assert gate.adopt(("10.213.0.2", 40000), "mitm-2") is None
    assert len(gate.events) == 1


@pytest.mark.parametrize(
    "host, method, path, reason, name",
    [
        pytest.param("allowed.test", "GET", "/", "rule_allow", "allowed.test", id="allowed"),
        pytest.param("evil.test", "GET", "/", "no_rule", "evil.test", id="other-host"),
        pytest.param("203.0.113.66", "GET", "/", "host_mismatch", None, id="host-ip-differs"),
        pytest.param("", "GET", "/", "host_mismatch", None, id="no-host"),
        pytest.param("1" * 40, "GET", "/", "invalid_name", None, id="host-of-40-digits"),
        # past int()'s 4300 digits: was internal_error, a traceback per request
        pytest.param("1" * 4400, "GET", "/", "invalid_name", None, id="host-of-4400-digits"),
    ],
)
def test_requests(gate, host, method, path, reason, name):
    state = connect(gate, "203.0.113.10", 80)
    assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
    decision, _ = gate.on_request(state, request_head(host, method, path), tls=False)
    assert str(decision.reason) == reason
    (event,) = gate.events
    assert (str(event.kind), str(event.reason), event.name, event.method, event.protocol) == (
        "request",
        reason,
        name,
        method,
        "http",
    )


@pytest.mark.parametrize(
    "host, ip, override, reason",
    [
        pytest.param("allowed.test", "203.0.113.10", "DELETE", "rule_allow", id="no-method-rule"),
        pytest.param("api.allowed.test", "203.0.113.11", "DELETE", "ambiguous_method", id="denied"),
        pytest.param("api.allowed.test", "203.0.113.11", "get", "rule_allow", id="its-own"),
    ],
)
def test_a_method_override_is_decided_as_the_method_it_names(gate, host, ip, override, reason):
    """A server that honours X-HTTP-Method-Override runs that method: the request
    passes only where the rules would allow it too (no method rule: nothing changes)."""
    state = connect(gate, ip, 80)
    assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
    head = request_head(host)
    head = dataclasses.replace(
        head, fields=(*head.fields, (b"x-http-method-override", override.encode()))
    )
    decision, _ = gate.on_request(state, head, tls=False)
    assert str(decision.reason) == reason, decision.detail
    (event,) = gate.events
    assert str(event.reason) == reason and event.method == "GET"


def test_every_decision_fails_closed(gate, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(gate, "_decide_connect", boom)
    monkeypatch.setattr(gate, "_decide_request", boom)
    assert connect(gate, "203.0.113.10", 443) is None
    monkeypatch.undo()
    state = connect(gate, "203.0.113.10", 22)
    monkeypatch.setattr(gate, "_decide_connect", boom)
    monkeypatch.setattr(gate, "_decide_request", boom)
    assert gate.on_first_bytes(state, b"SSH-2.0-x\r\n") is Outcome.REJECT
    monkeypatch.undo()
    silent = connect(gate, "203.0.113.10", 22, key=2)
    monkeypatch.setattr(gate, "_decide_connect", boom)
    monkeypatch.setattr(gate, "_decide_request", boom)
    assert gate.on_silence(silent) is Outcome.REJECT
    assert not gate.on_request(state, request_head("allowed.test"), tls=False)[0].allowed
    assert [(str(e.kind), str(e.reason)) for e in gate.events] == [
        ("connection", "internal_error"),
        ("connection", "internal_error"),
        ("connection", "internal_error"),
        ("request", "internal_error"),
    ]
    assert (
        gate.fail(None, RuntimeError("adapter bug"), {"source": "x:1"}).reason == "internal_error"
    )


@pytest.mark.parametrize(
    "data, outcome, second_event",
    [
        pytest.param(b"PING\r\n", Outcome.PASSTHROUGH, None, id="raw-bytes-are-what-was-allowed"),
        pytest.param(
            client_hello("allowed.test"),
            Outcome.REJECT,
            ("connection", "deny", "port_not_allowed", "default:fallback", "allowed.test", "tls"),
            id="a-hello-gets-its-own-decision",
        ),
        pytest.param(
            client_hello("evil.test"),
            Outcome.REJECT,
            ("connection", "deny", "no_rule", "default:fallback", "evil.test", "tls"),
            id="fronting",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\n", Outcome.HTTP, None, id="http-goes-to-per-request-decisions"
        ),
        pytest.param(b"PUT", Outcome.WAIT, None, id="a-method-alone-waits"),
    ],
)
def test_a_client_that_speaks_after_a_silence_decision(gate, data, outcome, second_event):
    state = connect(gate, "203.0.113.10", 22)
    assert gate.on_silence(state) is Outcome.PASSTHROUGH
    assert gate.on_first_bytes(state, data) is outcome
    assert [summary(e) for e in gate.events] == [
        ("connection", "allow", "rule_allow", "ssh", "ssh.allowed.test", "tcp")
    ] + ([second_event] if second_event else [])
    assert state.silent == (outcome is Outcome.WAIT)
    assert (state.allowed is not None) == (outcome in (Outcome.PASSTHROUGH, Outcome.WAIT))


def test_half_a_hello_after_a_silence_decision_waits_under_it(gate):
    state = connect(gate, "203.0.113.10", 22)
    gate.on_silence(state)
    hello = client_hello("ssh.allowed.test")
    assert gate.on_first_bytes(state, hello[:40]) is Outcome.WAIT
    assert (
        state.outcome is Outcome.PASSTHROUGH and state.silent and state.name == "ssh.allowed.test"
    )
    assert gate.on_first_bytes(state, hello) is Outcome.PASSTHROUGH
    assert [(str(e.reason), e.protocol) for e in gate.events] == [
        ("rule_allow", "tcp"),
        ("rule_allow", "tls"),
    ]


def test_a_rule_that_expires_stops_matching_at_its_instant_on_the_gates_wall_clock(tmp_path):
    rules = GATE_RULES.replace(
        "        id: allowed\n", "        id: allowed\n        expires: 2099-06-30T12:00:00Z\n"
    )
    gate = make_gate(tmp_path, rules=rules)
    expiry = gate.policy.next_expiry_at
    gate.wall_clock = lambda: expiry - 0.5
    before = connect(gate, "203.0.113.10", 443, key=1)
    assert gate.on_first_bytes(before, client_hello("allowed.test")) is Outcome.PASSTHROUGH
    http = connect(gate, "203.0.113.10", 80, key=2)
    assert gate.on_first_bytes(http, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
    assert gate.on_request(http, request_head("allowed.test"), tls=False)[0].rule_id == "allowed"

    gate.wall_clock = lambda: expiry  # the same policy object: no reload
    after = connect(gate, "203.0.113.10", 443, key=3)
    assert gate.on_first_bytes(after, client_hello("allowed.test")) is Outcome.REJECT
    late, _ = gate.on_request(http, request_head("allowed.test"), tls=False)  # same connection
    assert (str(late.reason), late.rule_id) == ("no_rule", "default:fallback")
    assert [(str(e.verdict), e.rule_id) for e in gate.events] == [
        ("allow", "allowed"),
        ("allow", "allowed"),
        ("deny", "default:fallback"),
        ("deny", "default:fallback"),
    ]
    # A reload re-decides open connections on the same clock: the relayed one ends.
    assert [s.key for s in gate.revoke_denied()] == [1]


def test_a_websocket_tunnel_is_revoked_with_the_rule_that_allowed_its_upgrade(tmp_path):
    rules = GATE_RULES.replace(
        "        id: allowed\n",
        "        id: allowed\n        websocket: true\n        expires: 2099-06-30T12:00:00Z\n",
    )
    gate = make_gate(tmp_path, rules=rules)
    expiry = gate.policy.next_expiry_at
    gate.wall_clock = lambda: expiry - 0.5
    upgrade = RequestHead(b"GET", b"/ws", ((b"host", b"allowed.test"), (b"upgrade", b"websocket")))
    opened = {}
    for key in ("tunnel", "plain"):
        state = opened[key] = connect(gate, "203.0.113.10", 80, key=key)
        assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
        decision, checked = gate.on_request(state, upgrade, tls=False)
        assert decision.allowed and checked.websocket, decision
    gate.on_tunnel(opened["tunnel"], checked)  # the server answered 101 on this one
    assert gate.revoke_denied() == []  # still allowed: carries on
    # At the instant, the tunnel has no next request to be decided on: it is closed;
    # so is the connection still speaking HTTP, whose latest exchange the rule allowed
    # (its body or response may still be moving: gate._exchange_denial).
    gate.wall_clock = lambda: expiry
    assert sorted(s.key for s in gate.revoke_denied()) == ["plain", "tunnel"]
    revoked = [e for e in gate.events if str(e.reason) == "policy_changed"]
    assert {e.rule_id for e in revoked} == {"default:fallback"}, revoked


def hello_hiding_a_name(sni: str) -> bytes:
    """A ClientHello whose SNI is `sni`, carrying an encrypted_client_hello extension (a
    client that brought an ECH config, or a browser's GREASE one: alike on the wire)."""
    ech = extension(0xFE0D, b"\x00\x00\x01\x00\x01\x07" + bytes(40))
    return hello_with_extensions(server_name((0, sni.encode())) + ech)


@pytest.mark.parametrize(
    "dst, sni, outcome, reason, rule",
    [
        pytest.param(
            "203.0.113.10", "allowed.test", Outcome.REJECT, "protocol_not_allowed",
            "builtin:encrypted-client-hello", id="allowed-by-name-passed-through",
        ),
        pytest.param(
            "203.0.113.11", "api.allowed.test", Outcome.INTERCEPT, "rule_allow", "api-get",
            id="inspected",
        ),
        pytest.param(
            "203.0.113.20", "anything.test", Outcome.PASSTHROUGH, "rule_allow", "by-address",
            id="allowed-by-address",
        ),
        pytest.param(
            "203.0.113.10", "evil.test", Outcome.REJECT, "no_rule", "default:fallback",
            id="denied-anyway",
        ),
    ],
)  # fmt: skip
def test_a_hello_hiding_its_name_passes_through_only_where_the_name_did_not_decide(
    tmp_path, dst, sni, outcome, reason, rule
):
    # ECH: the SNI is only the outer name; a server fronting many names serves the hidden one.
    gate = make_gate(
        tmp_path, rules=GATE_RULES + "      - allow: 203.0.113.20\n        id: by-address\n"
    )
    state = connect(gate, dst, 443)
    assert gate.on_first_bytes(state, hello_hiding_a_name(sni)) is outcome
    (event,) = gate.events[-1:]
    assert (str(event.reason), event.rule_id) == (reason, rule)
