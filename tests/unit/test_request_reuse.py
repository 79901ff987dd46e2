"""The gate reuses a request's decision for the next request on the same keep-alive
connection (gate._RequestMemo), and only while every fact it rests on holds: the
policy object, the Host, WebSocket or not, the DNS binding, the time before a rule
expiry (test_gate's rule-expiry test asks twice on one connection); never when a
rule for the destination checks methods or paths. The next connection's first
request takes the memo of an earlier connection with the same connection facts
(gate._memo_key), under the same checks."""

from __future__ import annotations

import pytest
from sandgate.proxy import gate as gate_module
from sandgate.proxy.dns.bindings import DnsBindings
from sandgate.proxy.gate import Outcome
from sandgate.proxy.policy import RequestFacts, load_policy
from sandgate.proxy.policy.decide import depends_on_request
from sandgate.proxy.policy.names import parse_ip
from sandgate.proxy.policy.request_head import RequestHead
from support.fakes import GATE_BINDINGS, GATE_RULES, SANDBOX, make_gate, request_head


@pytest.fixture
def gate(tmp_path, monkeypatch):
    gate = make_gate(tmp_path)
    gate.asked = []  # the facts of every decide() call

    def counting_decide(policy, facts):
        gate.asked.append(facts)
        return decide(policy, facts)

    decide = gate_module.decide
    monkeypatch.setattr(gate_module, "decide", counting_decide)
    return gate


def http_connection(gate, dst: str = "203.0.113.10", key=1, port=80):
    state = gate.on_connect(key, SANDBOX, 40000, dst, port)
    assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
    return state


def ask(gate, state, host="allowed.test", method="GET", path="/", websocket=False):
    head = request_head(host, method, path)
    if websocket:
        head = RequestHead(head.method, head.target, (*head.fields, (b"Upgrade", b"websocket")))
    decision, _ = gate.on_request(state, head, tls=False)
    return str(decision.reason), decision.rule_id


def rows(gate) -> list[tuple]:
    return [(str(e.verdict), str(e.reason), e.rule_id, e.name, e.path) for e in gate.events]


def test_the_next_request_to_the_same_host_reuses_the_decision(gate):
    state = http_connection(gate)
    asked_at_connect = len(gate.asked)
    assert ask(gate, state, path="/a") == ("rule_allow", "allowed")
    assert ask(gate, state, path="/b") == ("rule_allow", "allowed")
    assert len(gate.asked) == asked_at_connect + 1  # the policy was asked once
    # Each request still has its own event, with its own path.
    assert rows(gate) == [
        ("allow", "rule_allow", "allowed", "allowed.test", "/a"),
        ("allow", "rule_allow", "allowed", "allowed.test", "/b"),
    ]


def test_the_next_connection_to_the_same_host_reuses_the_decision(gate):
    first = http_connection(gate, key=1)
    assert ask(gate, first, path="/a") == ("rule_allow", "allowed")
    second = http_connection(gate, key=2)
    asked = len(gate.asked)
    assert ask(gate, second, path="/b") == ("rule_allow", "allowed")
    assert len(gate.asked) == asked  # the request was not decided again
    assert rows(gate)[-2:] == [
        ("allow", "rule_allow", "allowed", "allowed.test", "/a"),
        ("allow", "rule_allow", "allowed", "allowed.test", "/b"),
    ]


def test_a_connection_to_another_destination_does_not_take_the_memo(gate):
    assert ask(gate, http_connection(gate, key=1)) == ("rule_allow", "allowed")
    # The same Host to an address allowed.test never resolved to: its own decision.
    other = http_connection(gate, dst="203.0.113.11", key=2)
    assert ask(gate, other) == ("spoofed_destination", "builtin:spoofed-destination")
    # The same Host and address on a port its rule does not open.
    other_port = http_connection(gate, key=3, port=8080)
    assert ask(gate, other_port) == ("port_not_allowed", "default:fallback")


def test_a_reload_ends_the_reuse_for_later_connections(gate, tmp_path):
    assert ask(gate, http_connection(gate, key=1)) == ("rule_allow", "allowed")
    new = tmp_path / "new.yaml"
    new.write_text(GATE_RULES + "      - deny: allowed.test\n        id: now-denied\n")
    gate.policy = load_policy(new)
    assert ask(gate, http_connection(gate, key=2)) == ("rule_deny", "now-denied")
    gate.revoke_denied()
    assert gate._request_memos == {}  # the old policy is not kept alive by them


def test_a_forgotten_binding_ends_the_reuse_for_later_connections(gate):
    assert ask(gate, http_connection(gate, key=1)) == ("rule_allow", "allowed")
    gate.bindings.forget(SANDBOX)
    second = http_connection(gate, key=2)
    assert ask(gate, second) == ("spoofed_destination", "builtin:spoofed-destination")


def test_the_memos_kept_for_later_connections_are_bounded(gate, monkeypatch):
    monkeypatch.setattr(gate_module, "_REQUEST_MEMOS", 2)
    for key, host in enumerate(["allowed.test", "ssh.allowed.test", "x.test", "allowed.test"]):
        ask(gate, http_connection(gate, key=key), host=host)
        assert len(gate._request_memos) <= 2


def test_a_reload_ends_the_reuse(gate, tmp_path):
    state = http_connection(gate)
    assert ask(gate, state) == ("rule_allow", "allowed")
    new = tmp_path / "new.yaml"
    new.write_text(GATE_RULES + "      - deny: allowed.test\n        id: now-denied\n")
    gate.policy = load_policy(new)  # what Gateway.swap_policy does
    assert ask(gate, state) == ("rule_deny", "now-denied")


def test_a_reload_drops_the_memo_with_the_old_policy(gate):
    state = http_connection(gate)
    ask(gate, state)
    assert state.request_memo is not None
    gate.revoke_denied()
    assert state.request_memo is None  # the old policy is not kept alive by it


def test_an_expired_dns_binding_ends_the_reuse(tmp_path, monkeypatch):
    gate = make_gate(tmp_path)
    now = [1000.0]
    gate.bindings = DnsBindings(grace=10, clock=lambda: now[0])
    gate.bindings.record(SANDBOX, "allowed.test", GATE_BINDINGS["allowed.test"], 10)
    state = http_connection(gate)
    assert ask(gate, state) == ("rule_allow", "allowed")
    now[0] += 11  # the binding (TTL and grace) has expired
    assert ask(gate, state) == ("spoofed_destination", "builtin:spoofed-destination")
    # And a fresh answer for the name makes the same connection's requests real again.
    gate.bindings.record(SANDBOX, "allowed.test", GATE_BINDINGS["allowed.test"], 10)
    assert ask(gate, state) == ("rule_allow", "allowed")


def test_a_forgotten_binding_ends_the_reuse(gate):
    state = http_connection(gate)
    assert ask(gate, state) == ("rule_allow", "allowed")
    gate.bindings.forget(SANDBOX)
    assert ask(gate, state) == ("spoofed_destination", "builtin:spoofed-destination")


def test_another_host_on_the_same_connection_is_decided_anew(gate):
    state = http_connection(gate)
    assert ask(gate, state) == ("rule_allow", "allowed")
    # ssh.allowed.test resolved to the same address, but its rule is for port 22.
    assert ask(gate, state, host="ssh.allowed.test") == ("port_not_allowed", "default:fallback")
    assert ask(gate, state) == ("rule_allow", "allowed")


def test_a_websocket_request_is_decided_anew(gate):
    state = http_connection(gate)
    assert ask(gate, state) == ("rule_allow", "allowed")
    assert ask(gate, state, websocket=True) == ("protocol_not_allowed", "default:fallback")


def test_requests_to_a_destination_with_method_rules_are_each_decided(gate, monkeypatch):
    depends = []
    monkeypatch.setattr(
        gate_module, "depends_on_request", lambda *a: depends.append(a) or depends_on_request(*a)
    )
    state = http_connection(gate, dst="203.0.113.11")
    asked_at_connect = len(gate.asked)
    assert ask(gate, state, host="api.allowed.test") == ("rule_allow", "api-get")
    assert ask(gate, state, host="api.allowed.test", method="POST") == (
        "method_not_allowed",
        "default:fallback",
    )
    assert ask(gate, state, host="api.allowed.test") == ("rule_allow", "api-get")
    assert len(gate.asked) == asked_at_connect + 3
    assert state.request_memo.decision is None  # remembered: no decision to reuse here
    assert len(depends) == 1  # and that is asked once for the Host, not per request


@pytest.mark.parametrize(
    "name, ip, depends",
    [
        pytest.param("allowed.test", "203.0.113.10", False, id="plain-allow"),
        pytest.param("api.allowed.test", "203.0.113.11", True, id="method-rule"),
        pytest.param("db.allowed.test", "203.0.113.12", True, id="path-rule"),
        pytest.param("nothing.test", "203.0.113.66", False, id="no-rule"),
        pytest.param(None, "203.0.113.99", False, id="ip-deny"),
    ],
)
def test_depends_on_request(tmp_path, name, ip, depends):
    path = tmp_path / "rules.yaml"
    path.write_text(GATE_RULES)
    facts = RequestFacts("default", 80, "GET", "/", ip=parse_ip(ip), name=name)
    assert depends_on_request(load_policy(path), facts) is depends


def test_an_unknown_profile_depends_on_everything(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(GATE_RULES)
    facts = RequestFacts("nobody", 80, "GET", "/", name="allowed.test")
    assert depends_on_request(load_policy(path), facts) is True


# The decision by address at connect (gate._decide_at_connect), kept the same way.


def test_the_next_connection_to_the_same_address_reuses_the_connect_decision(gate):
    http_connection(gate, key=1)
    asked = len(gate.asked)
    assert gate.on_connect(2, SANDBOX, 40001, "203.0.113.10", 80) is not None
    assert len(gate.asked) == asked  # not asked again
    # Another port is its own question.
    assert gate.on_connect(3, SANDBOX, 40002, "203.0.113.10", 8080) is not None
    assert len(gate.asked) == asked + 1


def test_a_reload_that_denies_the_address_refuses_the_next_connection(gate, tmp_path):
    http_connection(gate, key=1)
    new = tmp_path / "new.yaml"
    new.write_text(GATE_RULES + "      - deny: 203.0.113.10\n        id: now-denied\n")
    gate.policy = load_policy(new)
    assert gate.on_connect(2, SANDBOX, 40001, "203.0.113.10", 80) is None
    assert (str(gate.events[-1].reason), gate.events[-1].rule_id) == ("rule_deny", "now-denied")
    gate.revoke_denied()
    assert gate._connect_memos == {}


def test_an_expired_address_rule_stops_refusing_at_connect(tmp_path):
    expiring = "        id: deny-ip\n        expires: 2099-06-30T12:00:00Z\n"
    gate = make_gate(tmp_path, rules=GATE_RULES.replace("        id: deny-ip\n", expiring))
    now = [gate.policy.next_expiry_at - 0.5]
    gate.wall_clock = lambda: now[0]
    assert gate.on_connect(1, SANDBOX, 40000, "203.0.113.99", 80) is None
    now[0] += 0.5  # the rule's instant, under the same policy object: no reload
    assert gate.on_connect(2, SANDBOX, 40001, "203.0.113.99", 80) is not None


def test_another_sandbox_or_profile_never_takes_the_memo(tmp_path):
    """The memos are per sandbox and profile: a sandbox whose profile denies the
    host is refused after another's allowed request to the same address and Host,
    and so is a new task on the first sandbox's address under that profile."""
    from sandgate.proxy.registry import Sandbox

    locked = "  locked:\n    rules:\n      - deny: allowed.test\n        id: locked-out\n"
    gate = make_gate(tmp_path, rules=GATE_RULES + locked)
    other = "10.200.9.2"
    gate.registry.add(Sandbox(other, "task2", "locked"))
    gate.bindings.record(other, "allowed.test", "203.0.113.10", 60)
    assert ask(gate, http_connection(gate, key=1)) == ("rule_allow", "allowed")
    state = gate.on_connect(2, other, 40000, "203.0.113.10", 80)
    assert gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
    assert ask(gate, state) == ("rule_deny", "locked-out")
    # The first sandbox's address, now a task under the locked profile.
    gate.registry.remove(SANDBOX)
    gate.registry.add(Sandbox(SANDBOX, "task3", "locked"))
    assert ask(gate, http_connection(gate, key=3)) == ("rule_deny", "locked-out")
    assert [e.task_id for e in gate.events if e.kind.value == "request"] == [
        "task1",
        "task2",
        "task3",
    ]


def test_a_body_is_read_for_overrides_only_where_a_rule_reads_the_method_or_path(tmp_path):
    """An override in a body (form_body.py) can change a decision only where a rule
    for the destination reads the method or path: elsewhere the gate leaves the body
    unread (not kept, not held back), on a reused decision too."""
    rules = GATE_RULES.replace("methods: [GET]", "methods: [GET, POST]")
    gate = make_gate(tmp_path, rules=rules)

    def form_body(state, host):
        head = request_head(host, "POST", "/items/1")
        fields = (*head.fields, (b"content-type", b"application/json"), (b"content-length", b"2"))
        decision, checked = gate.on_request(
            state, RequestHead(head.method, head.target, fields), False
        )
        assert decision.allowed, decision
        return checked.form_body

    anything = http_connection(gate)  # allowed.test: every method
    assert form_body(anything, "allowed.test") is None
    assert form_body(anything, "allowed.test") is None  # the decision reused
    methods = http_connection(gate, "203.0.113.11", key=2)  # api.allowed.test: GET, POST
    assert form_body(methods, "api.allowed.test") is not None
    assert form_body(methods, "api.allowed.test") is not None
