"""The destinations a flood names (flood._named_first): free text cannot use them up.

A request's Host costs a task nothing under a rule that allows an address range, so
names on one address are bounded per address (NAMES_PER_ADDRESS), and addresses
(a connection each) and DNS questions (a query each) are named in pools of their
own: a flood of made-up Hosts leaves the next address, and the next DNS name, named.
"""

from __future__ import annotations

from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventKind
from sandgate.proxy.telemetry.flood import MAX_NAMED, NAMES_PER_ADDRESS, FloodControl, FloodLimits


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def request(host: str, ip: str = "203.0.113.10") -> Event:
    return Event(kind=EventKind.REQUEST, verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW,
                 rule_id="range", task_id="t1", dst_ip=ip, dst_port=80, name=host,
                 protocol="http")  # fmt: skip


def test_made_up_hosts_do_not_use_up_what_names_addresses_and_dns_names():
    flood = FloodControl(FloodLimits(1, 1, 1.0), Clock())
    flood.admit(request("budget.test", ip="198.51.100.1"))  # the budget, spent
    written = [e for i in range(MAX_NAMED + 100) for e in flood.admit(request(f"d{i}.decoy"))[0]]
    named = [e.name for e in written if not e.suppressed]
    assert named == [f"d{i}.decoy" for i in range(NAMES_PER_ADDRESS)]
    hidden = request("evil.test", ip="203.0.113.66")
    assert flood.admit(hidden) == ([hidden], False)  # a new address: its own line
    question = Event(kind=EventKind.DNS, verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW,
                     rule_id="range", task_id="t1", dst_ip="10.213.0.1", dst_port=53,
                     name="exfil.example", protocol="dns")  # fmt: skip
    assert flood.admit(question) == ([question], False)
    again = request("evil.test", ip="203.0.113.66")
    assert flood.admit(again)[1]  # its later events are folded


def test_past_every_pool_the_aggregate_says_so_and_names_the_last():
    """A task that fills the address pool (MAX_NAMED connections to distinct allowed
    addresses, ~20 s at the default connection_rate) then reaches its target: the
    target is folded, but its aggregate says that destinations new to the task are no
    longer named one by one, and names the last destination it folded."""
    clock = Clock()
    flood = FloodControl(FloodLimits(1, 1, 1.0), clock)
    flood.admit(request("budget.test", ip="198.51.100.1"))  # the budget, spent
    for i in range(MAX_NAMED):
        flood.admit(request(f"d{i}.decoy", ip=f"10.{i // 250}.{i % 250}.1"))
    for i in range(MAX_NAMED, MAX_NAMED + 10):
        assert flood.admit(request(f"d{i}.decoy", ip=f"10.99.{i % 250}.1"))[1]
    assert flood.admit(request("evil.test", ip="203.0.113.66"))[1]  # folded, but:
    clock.now = 2.0
    (record,) = flood.due()
    assert "the last evil.test:80" in record.detail, record.detail
    assert "11 of them to destinations new to the task" in record.detail, record.detail
    assert "no longer named one by one" in record.detail


def test_an_aggregate_of_known_destinations_does_not_say_naming_stopped():
    clock = Clock()
    flood = FloodControl(FloodLimits(1, 1, 1.0), clock)
    flood.admit(request("budget.test", ip="198.51.100.1"))
    first = request("a.test", ip="203.0.113.1")
    assert flood.admit(first) == ([first], False)
    for _ in range(3):
        assert flood.admit(request("a.test", ip="203.0.113.1"))[1]
    clock.now = 2.0
    (record,) = flood.due()
    assert "no longer named" not in record.detail and "the last" not in record.detail
