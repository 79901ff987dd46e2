"""Per-sandbox limits: the `limits:` key of rule files, the gate's counts of open
and pending connections, and the DNS filter's queries-a-second bucket."""

from __future__ import annotations

import asyncio

import dns.message
import dns.rcode
import pytest
from sandgate.proxy.dns.server import DnsFilter
from sandgate.proxy.gate import Outcome
from sandgate.proxy.limits import ConnectionCounts, Held, TokenBuckets
from sandgate.proxy.policy import Decision, Reason, Verdict, load_policy
from sandgate.proxy.policy.model import DEFAULT_LIMITS, Limits, Rule
from sandgate.proxy.registry import Sandbox
from support.fakes import GATE_RULES, SANDBOX, client_hello, make_gate

OTHER = "10.213.0.3"  # a second sandbox, same profile
ALLOWED = ("203.0.113.10", 443)
HELLO = client_hello("allowed.test")

# --- the rule files ---------------------------------------------------------------------


def load(tmp_path, text: str):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return load_policy(path)


def test_defaults_when_absent(tmp_path):
    policy = load(tmp_path, "version: 1\nprofiles:\n  default: {}\n")
    assert policy.profiles["default"].limits == Limits(connections=512, pending=64, dns_qps=50)
    assert policy.limits_for("default") == DEFAULT_LIMITS
    assert policy.limits_for("no-such-profile") == DEFAULT_LIMITS


def test_extends_inherits_each_key_not_given(tmp_path):
    policy = load(
        tmp_path,
        """\
version: 1
profiles:
  base:
    limits: {connections: 20, dns_qps: 5}
  child:
    extends: base
    limits:
      dns_qps: 7
  grandchild:
    extends: child
  free: {}
""",
    )
    limits = {name: profile.limits for name, profile in policy.profiles.items()}
    assert limits == {
        "base": Limits(connections=20, pending=64, dns_qps=5),
        "child": Limits(connections=20, pending=64, dns_qps=7),
        "grandchild": Limits(connections=20, pending=64, dns_qps=7),
        "free": DEFAULT_LIMITS,
    }


def test_the_maxima_are_accepted(tmp_path):
    policy = load(
        tmp_path,
        "version: 1\nprofiles:\n  p:\n    limits: {connections: 65536, pending: 65536, dns_qps: 1000, "
        "connection_rate: 10000}\n",
    )
    assert policy.profiles["p"].limits == Limits(65536, 65536, 1000, 10000)


@pytest.mark.parametrize(
    "value",
    ["0", "65537", "1.5", "12 connections", "１２", "[1]", "~", "0x10"],
    ids=["zero", "over-max", "fraction", "garbage", "fullwidth-digits", "list", "null", "hex"],
)
def test_bad_values_name_file_line_col(tmp_path, value):
    from sandgate.proxy.policy import PolicyError

    with pytest.raises(PolicyError) as raised:
        load(tmp_path, f"version: 1\nprofiles:\n  p:\n    limits:\n      connections: {value}\n")
    (problem,) = raised.value.problems
    assert (problem.line, problem.column) == (5, 20)
    assert "connections" in problem.message


# --- the gate: open and pending connections ---------------------------------------------


@pytest.fixture
def gate(tmp_path):
    rules = GATE_RULES.replace(
        "  default:\n", "  default:\n    limits: {connections: 3, pending: 2}\n"
    )
    gate = make_gate(tmp_path, rules=rules)
    gate.registry.add(Sandbox(OTHER, "task2", "default"))
    return gate


def connect(gate, key, sandbox=SANDBOX):
    return gate.on_connect(key, sandbox, 40000 + key, *ALLOWED)


def held(gate, sandbox=SANDBOX) -> tuple[int, int]:
    """What the task now at address `sandbox` holds."""
    h = gate.counts.of(gate.registry.get(sandbox))
    return h.open, h.pending


def limit_events(gate) -> list[tuple[str, str]]:
    return [(str(e.reason), e.rule_id) for e in gate.events if e.reason == Reason.SANDBOX_LIMIT]


def test_pending_cap_then_connection_cap_then_room_after_a_close(gate):
    a, b = connect(gate, 1), connect(gate, 2)
    assert held(gate) == (2, 2)
    # The third undecided connection is over `pending: 2`: denied at connect, no state.
    assert connect(gate, 3) is None
    assert limit_events(gate) == [("sandbox_limit", "builtin:sandbox-pending")]
    assert 3 not in gate.connections
    # Deciding one frees a pending place; the open one still counts.
    assert gate.on_first_bytes(a, HELLO) is Outcome.PASSTHROUGH
    assert held(gate) == (2, 1)
    c = connect(gate, 4)
    assert c is not None and held(gate) == (3, 2)
    assert gate.on_first_bytes(b, HELLO) is Outcome.PASSTHROUGH
    assert gate.on_first_bytes(c, HELLO) is Outcome.PASSTHROUGH
    assert held(gate) == (3, 0)
    # The fourth open connection is over `connections: 3`.
    assert connect(gate, 5) is None
    denied = gate.events[-1]
    assert (denied.verdict, denied.reason, denied.rule_id) == (
        Verdict.DENY,
        Reason.SANDBOX_LIMIT,
        "builtin:sandbox-connections",
    )
    assert (denied.sandbox, denied.dst_ip, denied.dst_port) == (SANDBOX, *ALLOWED)
    assert "3 open connections" in denied.detail
    # Another sandbox on the same gateway and profile is not affected.
    other = connect(gate, 6, sandbox=OTHER)
    assert other is not None and held(gate, OTHER) == (1, 1)
    # Close one: room for one more.
    gate.on_close(a)
    assert held(gate) == (2, 0)
    d = connect(gate, 7)
    assert d is not None and held(gate) == (3, 1)
    for state in (b, c, d, other):
        gate.on_close(state)
    assert (gate.counts.open, gate.counts.pending, len(gate.counts)) == (0, 0, 0)


def test_each_flooded_connection_gets_its_denial_event(gate):
    connect(gate, 1), connect(gate, 2)
    for key in range(3, 103):
        assert connect(gate, key) is None
    assert len(limit_events(gate)) == 100
    assert held(gate) == (2, 2)


def test_every_way_a_connection_ends_releases_it_once(gate):
    # Rejected on its bytes, then closed twice.
    rejected = connect(gate, 1)
    assert gate.on_first_bytes(rejected, b"\x16\x03\x01\x00\x05garbage") is Outcome.REJECT
    assert held(gate) == (1, 0)
    gate.on_close(rejected)
    gate.on_close(rejected)
    assert held(gate) == (0, 0)
    # Closed before any decision (no_data), while still pending.
    silent = connect(gate, 2)
    gate.on_close(silent, "client went away")
    assert held(gate) == (0, 0)
    # An adapter failure while undecided (internal_error), then the adapter's close.
    failed = connect(gate, 3)
    gate.fail(failed, RuntimeError("bug"))
    assert held(gate) == (1, 0)
    gate.on_close(failed)
    # Handed to mitmproxy and adopted: the count moves with it, released at its close.
    http = connect(gate, 4)
    assert (
        gate.on_first_bytes(http, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n") is Outcome.HTTP
    )
    assert gate.hand_off(http)
    assert gate.adopt(4, "mitm-1") is http
    assert held(gate) == (1, 0)
    gate.on_close(http)
    # Handed off, never adopted (mitmproxy failed first): the front door closes it.
    lost = connect(gate, 5)
    gate.on_first_bytes(lost, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    gate.hand_off(lost)
    gate.on_close(lost)
    # A hand-off the phase does not allow (undecided): denied, then closed.
    early = connect(gate, 6)
    assert not gate.hand_off(early)
    gate.on_close(early)
    # An exception inside a decision fails closed and is released like the rest.
    broken = connect(gate, 7)
    gate.bindings = None  # resolved() now raises
    assert gate.on_first_bytes(broken, HELLO) is Outcome.REJECT
    gate.on_close(broken)
    assert (gate.counts.open, gate.counts.pending, len(gate.counts)) == (0, 0, 0)
    assert gate.connections == {}


def test_a_task_given_a_freed_address_counts_only_its_own_connections(gate):
    # task1 holds its cap (3 open) and ends; its connections are still closing when
    # task3 is given the same address.
    old = [connect(gate, key) for key in (1, 2)]
    for state in old:
        assert gate.on_first_bytes(state, HELLO) is Outcome.PASSTHROUGH
    old.append(connect(gate, 3))
    assert connect(gate, 4) is None  # task1 is at its cap
    gate.registry.remove(SANDBOX)
    gate.registry.add(Sandbox(SANDBOX, "task3", "default"))
    assert held(gate) == (0, 0)
    new = [connect(gate, key) for key in (5, 6)]
    assert None not in new and held(gate) == (2, 2)
    assert [s.fields["task_id"] for s in new] == ["task3", "task3"]
    # task1's closes release task1's counts, never task3's.
    for state in old:
        gate.on_close(state)
    assert held(gate) == (2, 2) and gate.counts.open == 2
    # task3's own cap still holds it: a third undecided one is over `pending: 2`.
    assert connect(gate, 7) is None
    assert limit_events(gate)[-1] == ("sandbox_limit", "builtin:sandbox-pending")


def test_a_profiles_limits_follow_the_policy_in_force(gate, tmp_path):
    connect(gate, 1), connect(gate, 2)
    assert connect(gate, 3) is None
    # A reload (Gateway.swap_policy) raises the cap: the next connection is admitted.
    gate.policy = load(
        tmp_path, GATE_RULES.replace("  default:\n", "  default:\n    limits: {pending: 3}\n")
    )
    assert connect(gate, 4) is not None
    assert held(gate) == (3, 3)


def test_connection_counts_drop_a_sandbox_that_holds_nothing():
    counts = ConnectionCounts()
    counts.admit("a")
    counts.admit("a")
    counts.decided("a")
    assert counts.of("a") == Held(2, 1) and len(counts) == 1
    assert counts.full("a", Limits(connections=2)) == "connections"
    assert counts.full("a", Limits(pending=1)) == "pending"
    assert counts.full("a", Limits(connections=3, pending=2)) is None
    assert counts.full("b", Limits(connections=1, pending=1)) is None
    counts.decided("a")
    counts.closed("a")
    counts.closed("a")
    assert (counts.open, counts.pending, len(counts), counts.of("a")) == (0, 0, 0, Held())


# --- DNS: queries a second ---------------------------------------------------------------

ALLOW_ALL = Rule(id="allow-all", action=Verdict.ALLOW, file="rules.yaml", line=1)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_bursts_then_refills_at_the_rate():
    clock = Clock()
    buckets = TokenBuckets(clock)
    assert [buckets.take("a", 5) for _ in range(6)] == [True] * 5 + [False]
    assert buckets.take("b", 5)  # another key has its own bucket
    clock.now += 0.2  # one token back at 5 a second
    assert [buckets.take("a", 5) for _ in range(2)] == [True, False]
    clock.now += 10  # never more than the burst
    assert [buckets.take("a", 5) for _ in range(6)] == [True] * 5 + [False]


def test_token_buckets_forget_idle_keys_past_the_cap():
    clock = Clock()
    buckets = TokenBuckets(clock, max_keys=10)
    for i in range(10):
        buckets.take(f"s{i}", 1)
    clock.now += 1.0  # all of them full again: the same as no bucket
    buckets.take("new", 1)
    assert len(buckets) == 1


def test_dns_over_the_rate_is_refused_with_an_event_and_never_forwarded():
    events, upstream = [], []
    clock = Clock()
    sources = {"10.0.0.2": ("sbx-a", "dev", "ta"), "10.0.0.3": ("sbx-b", "dev", "tb")}
    server = DnsFilter(
        decide_name=lambda profile, name: Decision(Verdict.ALLOW, Reason.RULE_ALLOW, ALLOW_ALL),
        sandbox_for=sources.get,
        sink=type("Sink", (), {"emit": staticmethod(events.append)})(),
        upstreams=["192.0.2.1"],
        limits_for=lambda profile: Limits(dns_qps=3),
        clock=clock,
    )

    async def ask_upstream(wire, first=None):  # the forwarded query's wire bytes
        upstream.append(dns.message.from_wire(wire).question[0].name.to_text())
        return None, "test: no upstream"

    server._ask_upstream = ask_upstream

    def ask(source: str, name: str) -> dns.message.Message:
        wire = dns.message.make_query(name, "A").to_wire()
        return dns.message.from_wire(asyncio.run(server.handle(wire, (source, 5353), udp=True)))

    answers = [ask("10.0.0.2", f"n{i}.example.com") for i in range(5)]
    assert [a.rcode() for a in answers] == [dns.rcode.SERVFAIL] * 3 + [dns.rcode.REFUSED] * 2
    assert str(answers[-1].question[0].name) == "n4.example.com."  # a stub takes it as the answer
    assert upstream == [f"n{i}.example.com." for i in range(3)]  # the refused ones never left
    refused = events[-1]
    assert (refused.reason, refused.rule_id, refused.verdict) == (
        Reason.SANDBOX_LIMIT,
        "builtin:sandbox-dns-rate",
        Verdict.DENY,
    )
    assert (refused.sandbox, refused.name) == ("sbx-a", "n4.example.com")
    assert len(events) == 5  # one event per query, the refused ones too
    # The other sandbox has its own bucket; the first gets a token back after 1/3 s.
    assert ask("10.0.0.3", "b.example.com").rcode() == dns.rcode.SERVFAIL
    clock.now += 0.34
    assert ask("10.0.0.2", "later.example.com").rcode() == dns.rcode.SERVFAIL
    assert ask("10.0.0.2", "again.example.com").rcode() == dns.rcode.REFUSED
    assert upstream[-2:] == ["b.example.com.", "later.example.com."]


def test_a_sandbox_may_hold_no_more_than_the_worker_has_free():
    counts, limits = ConnectionCounts(), Limits(connections=100, pending=100)
    for _ in range(49):
        counts.admit("greedy")
    # 51 of a budget of 100 free: the greedy one may take one more, not two.
    assert counts.full("greedy", limits, budget=100) is None
    counts.admit("greedy")
    assert counts.full("greedy", limits, budget=100) == "share"
    assert counts.full("newcomer", limits, budget=100) is None
    assert counts.full("greedy", limits, budget=None) is None  # no worker cap
    # A second greedy one settles at a third: as many left free for a third sandbox.
    while counts.full("second", limits, budget=100) is None:
        counts.admit("second")
    assert (counts.of("second").open, 100 - counts.open) == (25, 25)
    assert counts.full("newcomer", limits, budget=100) is None
    # The whole budget held: nobody gets another.
    for _ in range(25):
        counts.admit("newcomer")
    assert counts.full("fourth", limits, budget=100) == "worker"
    # The profile's own caps come first.
    assert counts.full("greedy", Limits(connections=50), budget=100) == "connections"


def test_the_gate_denies_over_the_fair_share_with_its_rule_and_a_detail(gate):
    gate.connection_budget = 5
    states = [connect(gate, key) for key in (1, 2)]
    for state in states:
        gate.on_first_bytes(state, HELLO)
    other = connect(gate, 3, sandbox=OTHER)
    assert None not in [*states, other]
    assert connect(gate, 4) is None  # within its profile's caps (3 open, 2 pending)
    assert limit_events(gate)[-1] == ("sandbox_limit", "builtin:sandbox-fair-share")
    assert "holds 2 connections" in gate.events[-1].detail
    assert connect(gate, 5, sandbox=OTHER) is not None  # holds 1 of 2 free
    gate.on_close(states[0])
    assert connect(gate, 6) is not None


def test_connection_budget_leaves_the_worker_its_own_descriptors():
    from sandgate.proxy.limits import OTHER_DESCRIPTORS, connection_budget

    assert connection_budget(2048) == (2048 - OTHER_DESCRIPTORS) // 2 == 704
    assert connection_budget(1024) == 192
    assert connection_budget(100) == 64
