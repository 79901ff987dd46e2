"""New leaf certificates per sandbox (`limits: leaf_rate`, limits.LeafBudget, the
gate's `sandbox-leaf-rate` denial) and the leaf caches kept per task (the front
door's TlsContexts, mitmproxy's CertStore through lean_mitmproxy.leaves_per_task)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sandgate.proxy.gate import Outcome
from sandgate.proxy.limits import FREE_LEAVES, LeafBudget
from sandgate.proxy.policy import Reason
from sandgate.proxy.registry import Sandbox
from support.fakes import SANDBOX, client_hello, make_gate

OTHER = "10.213.0.3"
RULES = """\
version: 1
profiles:
  default:
    limits: {leaf_rate: 3}
    rules:
      - allow: 203.0.113.10/32
        methods: [GET]
        id: inspect-any-name
      - allow: 203.0.113.20/32
        id: pass-any-name
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_new_names_take_tokens_names_seen_lately_are_free():
    clock = Clock()
    budget = LeafBudget(clock)
    assert [budget.take("a", f"n{i}", 3) for i in range(4)] == [True] * 3 + [False]
    # n0..n2 have leaves: free however often, and they take nothing.
    assert all(budget.take("a", f"n{i % 3}", 3) for i in range(30))
    assert budget.take("b", "n9", 3)  # another sandbox has its own bucket
    clock.now += 1 / 3  # one token back at 3 a second
    assert [budget.take("a", "n3", 3), budget.take("a", "n4", 3)] == [True, False]


def test_only_the_latest_names_stay_free():
    clock = Clock()
    budget = LeafBudget(clock)
    for i in range(FREE_LEAVES + 1):
        assert budget.take("a", f"n{i}", 1000)
    clock.now += 10  # a full bucket of 1 token
    assert budget.take("a", "n0", 1)  # pushed out: a new leaf, the one token
    assert not budget.take("a", "n1", 1)  # also pushed out, and no token left
    assert budget.take("a", f"n{FREE_LEAVES}", 1)  # still free


@pytest.fixture
def gate(tmp_path):
    gate = make_gate(tmp_path, rules=RULES)
    gate.registry.add(Sandbox(OTHER, "task2", "default"))
    gate.leaves = LeafBudget(Clock())
    return gate


def handshake(gate, key: int, name: str, ip: str = "203.0.113.10", sandbox: str = SANDBOX):
    state = gate.on_connect(key, sandbox, 40000 + key, ip, 443)
    outcome = gate.on_first_bytes(state, client_hello(name))
    gate.on_close(state)
    return outcome


def test_the_gate_denies_inspected_tls_for_a_new_name_past_the_rate(gate):
    outcomes = [handshake(gate, i, f"n{i}.example.test") for i in range(4)]
    assert outcomes == [Outcome.INTERCEPT] * 3 + [Outcome.REJECT]
    denied = [e for e in gate.events if e.reason == Reason.SANDBOX_LIMIT]
    assert [(e.rule_id, e.name) for e in denied] == [
        ("builtin:sandbox-leaf-rate", "n3.example.test")
    ]
    assert "leaf_rate of 3 a second" in denied[0].detail
    # A name it has a leaf for still connects; so does another sandbox's new name,
    # and TLS passed through (no leaf) is not counted at all.
    assert handshake(gate, 10, "n0.example.test") is Outcome.INTERCEPT
    assert handshake(gate, 11, "n5.example.test", sandbox=OTHER) is Outcome.INTERCEPT
    passed = [handshake(gate, 20 + i, f"p{i}.test", ip="203.0.113.20") for i in range(5)]
    assert passed == [Outcome.PASSTHROUGH] * 5
    assert len([e for e in gate.events if e.reason == Reason.SANDBOX_LIMIT]) == 1


def test_the_front_doors_leaves_are_per_task(tmp_path):
    from sandgate.proxy.frontdoor.tls_contexts import TlsContexts

    contexts = TlsContexts(tmp_path)
    names = ("allowed.test", "203.0.113.10")
    mine = contexts.for_client(names, "task-a")
    assert contexts.for_client(names, "task-a") is mine
    # Another task gets a leaf of its own: no faster for a name task-a visited.
    assert contexts.for_client(names, "task-b") is not mine


def test_mitmproxys_leaves_are_per_task(tmp_path):
    from cryptography import x509
    from mitmproxy import certs
    from sandgate.proxy.lean_mitmproxy import leaves_per_task

    store = certs.CertStore.from_store(str(tmp_path), "mitmproxy", 2048)
    tls = SimpleNamespace(certstore=store)
    tls.get_cert = lambda c: tls.certstore.get_cert(c.sni, [x509.DNSName(c.sni)])
    leaves_per_task(tls, lambda c: c.owner)
    a = tls.get_cert(SimpleNamespace(owner="task-a", sni="allowed.test"))
    assert tls.get_cert(SimpleNamespace(owner="task-a", sni="allowed.test")) is a
    b = tls.get_cert(SimpleNamespace(owner="task-b", sni="allowed.test"))
    assert b is not a and b.cert.serial != a.cert.serial
    assert store.certs == {}  # the shared cache is left empty
