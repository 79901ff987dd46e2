"""The audit rate limit (proxy/telemetry/flood.py, flood_sink.py): bucket, aggregation,
flushes, never-suppressed kinds, and nothing lost."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.audit import AuditLog, verify
from sandgate.proxy.telemetry.event import Event, EventKind
from sandgate.proxy.telemetry.flood import MAX_NAMED, MAX_SAMPLES, FloodControl, FloodLimits
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.telemetry.summary import TaskSummary


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def denied(port: int = 22, task: str = "t1", **fields) -> Event:
    return Event(
        kind=EventKind.CONNECTION,
        verdict=Verdict.DENY,
        reason=Reason.PORT_NOT_ALLOWED,
        rule_id="r1",
        task_id=task,
        dst_ip="203.0.113.10",
        dst_port=port,
        protocol="tcp",
        **fields,
    )


def represented(lines: list[Event]) -> int:
    """How many emitted events `lines` stand for."""
    return sum(e.suppressed or 1 for e in lines)


def control(rate=10.0, burst=5, interval=1.0) -> tuple[FloodControl, Clock]:
    clock = Clock()
    return FloodControl(FloodLimits(rate, burst, interval), clock), clock


def test_within_the_burst_every_event_passes_as_it_is():
    flood, _ = control(burst=5)
    for i in range(5):
        event = denied(port=i)
        assert flood.admit(event) == ([event], False)
    assert flood.held == 0


def test_past_the_burst_events_are_aggregated_and_the_bucket_refills_at_the_rate():
    flood, clock = control(rate=10, burst=5)
    for _ in range(5):
        flood.admit(denied())
    assert flood.admit(denied()) == ([], True)
    assert flood.held == 1
    clock.now += 0.1  # one token back
    event = denied()
    lines, suppressed = flood.admit(event)
    assert not suppressed and lines == [event]  # no room left after it: the aggregate waits
    assert flood.held == 1


def test_aggregate_record_counts_samples_and_times():
    flood, clock = control(rate=1, burst=1, interval=1.0)
    flood.admit(denied())
    ports = list(range(1, 21))
    for port in ports:
        clock.now += 0.01
        assert flood.admit(denied(port=port, time=5000.0 + port))[1]
    clock.now += 1.0
    [record] = flood.due()
    assert record.kind is EventKind.CONNECTION
    assert (record.verdict, record.reason, record.rule_id) == (
        Verdict.DENY,
        Reason.PORT_NOT_ALLOWED,
        "r1",
    )
    assert record.suppressed == 20 and record.task_id == "t1"
    assert (record.first_time, record.time) == (5001.0, 5020.0)
    assert record.detail.startswith("20 similar events suppressed")
    assert "203.0.113.10:1, " in record.detail and f"and {20 - MAX_SAMPLES} more" in record.detail
    assert "203.0.113.10:6" not in record.detail  # only MAX_SAMPLES named
    assert record.dst_ip is None and record.name is None  # no single destination claimed
    assert flood.held == 0


def test_similar_key_separates_reasons_rules_and_tasks():
    flood, clock = control(rate=1, burst=1)
    flood.admit(denied(task="a"))
    flood.admit(denied(task="b"))
    flood.admit(denied(task="a"))
    flood.admit(denied(task="a").with_fields(rule_id="r2"))
    allowed = denied(task="b").with_fields(verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW)
    assert flood.admit(allowed) == ([allowed], False)  # its destination's first: named
    flood.admit(allowed)
    clock.now += 0.5  # half a token: still no room
    assert flood.due() == []
    clock.now += 0.5
    records = flood.due()
    assert sorted((r.task_id, r.rule_id, str(r.verdict)) for r in records) == [
        ("a", "r1", "deny"),
        ("a", "r2", "deny"),
        ("b", "r1", "allow"),
    ]
    assert all(r.suppressed == 1 for r in records)


def test_allowed_connection_ends_keep_count_destinations_and_bytes():
    flood, clock = control(rate=1, burst=1)
    flood.admit(denied())
    for port in (443, 8443):
        end = Event(
            kind=EventKind.CONNECTION_END,
            verdict=Verdict.ALLOW,
            reason=Reason.RULE_ALLOW,
            rule_id="pypi",
            task_id="t1",
            name="pypi.org",
            dst_port=port,
            bytes_up=100,
            bytes_down=2000,
            protocol="tls",
        )
        assert flood.admit(end) == ([end], False)  # each destination's first: named
        assert flood.admit(end)[1]
        assert flood.admit(end)[1]
    [record] = flood.drain()
    assert record.suppressed == 4 and record.rule_id == "pypi"
    assert (record.bytes_up, record.bytes_down, record.protocol) == (400, 8000, "tls")
    assert (
        "pypi.org:443 (200 bytes up, 4000 down), pypi.org:8443 (200 bytes up, 4000 down)"
        in record.detail
    )


@pytest.mark.parametrize("kind", [EventKind.TASK, EventKind.POLICY, EventKind.APPROVAL])
def test_task_policy_and_approval_events_are_never_suppressed_and_come_after_held_ones(kind):
    flood, _ = control(rate=1, burst=1)
    flood.admit(denied())
    flood.admit(denied())
    special = Event(kind=kind, verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW, task_id="t1")
    for _ in range(3):
        lines, suppressed = flood.admit(special)
        assert not suppressed and lines[-1] is special
    # The first flushed the task's aggregate before it; then nothing was held.
    assert flood.held == 0


def test_an_aggregate_is_written_when_the_flood_is_over():
    flood, clock = control(rate=10, burst=5)
    for _ in range(8):
        flood.admit(denied())
    clock.now += 10  # the bucket is full again
    event = denied()
    lines, _ = flood.admit(event)
    assert [e.suppressed for e in lines] == [3, None] and lines[1] is event


def test_a_long_flood_writes_an_aggregate_every_interval_without_the_timer():
    flood, clock = control(rate=1, burst=1, interval=1.0)
    written = []
    for _ in range(500):
        clock.now += 0.01
        written += flood.admit(denied())[0]
    records = [e for e in written if e.suppressed]
    assert 3 <= len(records) <= 5  # 5 seconds of flood


def test_nothing_is_lost_passed_plus_aggregated_equals_emitted():
    flood, clock = control(rate=50, burst=20)
    written, emitted = [], 0
    for step in range(3000):
        clock.now += 0.0007
        emitted += 1
        reason = (Reason.PORT_NOT_ALLOWED, Reason.NO_RULE, Reason.RULE_DENY)[step % 3]
        written += flood.admit(denied(port=step % 70).with_fields(reason=reason))[0]
        if step % 500 == 0:
            written += flood.due()
    written += flood.drain()
    assert represented(written) == emitted
    assert len(written) < emitted / 5
    assert flood.held == 0


def allowed(name: str, kind: EventKind = EventKind.CONNECTION, task: str = "t1") -> Event:
    return Event(
        kind=kind,
        verdict=Verdict.ALLOW,
        reason=Reason.RULE_ALLOW,
        rule_id="wide",
        task_id=task,
        name=name,
        dst_port=443,
        protocol="tls",
    )


def test_a_flood_hides_no_allowed_destination_up_to_max_named_and_loses_nothing():
    """Past the budget each allowed destination's first event is written as it is
    (a decoy-then-exfiltrate task cannot fold its destination into "and 1 more"); its
    later events, and denied ones, are aggregated; MAX_NAMED bounds the names a
    task's flood writes, and every event is still accounted for."""
    flood, _ = control(rate=1, burst=1)
    written, emitted = flood.admit(denied())[0], 1  # the budget, spent
    for i in range(MAX_NAMED + 10):
        for event in (allowed(f"d{i}.example"), allowed(f"d{i}.example"), denied(port=i)):
            emitted += 1
            written += flood.admit(event)[0]
    written += flood.drain()
    assert represented(written) == emitted
    named = [e.name for e in written if not e.suppressed and e.name]
    assert named == [f"d{i}.example" for i in range(MAX_NAMED)]  # each once, in order
    assert "d4100.example" not in named  # past the bound: folded, counted
    # Another task's flood names its own.
    flood.admit(denied(task="t2"))
    other = allowed("d0.example", task="t2")
    assert flood.admit(other) == ([other], False)


def test_a_named_destination_from_a_worker_is_written_as_the_worker_encoded_it():
    from sandgate.proxy.telemetry.audit import audit_members
    from sandgate.proxy.telemetry.event import EncodedEvent

    flood, _ = control(rate=1, burst=1)
    flood.admit(denied())
    event = allowed("exfil.example")
    encoded = EncodedEvent(audit_members(event), "t1", None, "connection", "allow",
                           "rule_allow", "wide", "exfil.example")  # fmt: skip
    out, suppressed = flood.admit_batch([encoded, encoded])
    assert out == [encoded] and suppressed == [encoded]


def test_idle_buckets_are_forgotten():
    flood, clock = control(rate=10, burst=5)
    for task in range(100):
        flood.admit(denied(task=str(task)))
    clock.now += 1
    flood.due()
    assert flood.buckets == {}


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        FloodLimits(rate=0)
    with pytest.raises(ValueError):
        FloodLimits(burst=0)


def test_sink_writes_a_verifiable_log_counts_the_metric_and_flushes_on_stop(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    metrics = Metrics()
    clock = Clock()
    sink = RateLimitedAudit(audit, FloodLimits(rate=1, burst=10), metrics.count_suppressed, clock)
    summary = TaskSummary()
    for port in range(1000):
        event = denied(port=port)
        sink.emit(event)
        summary.emit(event)
        metrics.emit(event)
    sink.stop()
    audit.close()
    assert verify(path).ok
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 11
    assert sum(line.get("suppressed", 1) for line in lines) == 1000
    assert lines[-1]["suppressed"] == 990 and "990 similar events suppressed" in lines[-1]["detail"]
    value = metrics.registry.get_sample_value(
        "sandgate_audit_events_suppressed_total",
        {"kind": "connection", "verdict": "deny", "reason": "port_not_allowed"},
    )
    assert value == 990
    # The metrics and the summary saw every event, not the aggregate.
    assert (
        metrics.registry.get_sample_value(
            "sandgate_events_total", {"kind": "connection", "verdict": "deny"}
        )
        == 1000
    )
    assert sum(summary.rows.values()) == 1000
    # A summary fed the audit lines (aggregates included) counts the same blocked total.
    from_log = TaskSummary()
    for line in lines:
        from_log.emit(
            denied().with_fields(suppressed=line.get("suppressed"), dst_port=line.get("dst_port"))
        )
    assert sum(from_log.rows.values()) == 1000


def test_sink_timer_writes_due_aggregates_on_the_loop():
    written = []

    class Collect:
        def emit(self, event):
            written.append(event)

    async def main():
        sink = RateLimitedAudit(Collect(), FloodLimits(rate=1, burst=1, interval=0.05))
        sink.start(asyncio.get_running_loop())
        for _ in range(10):
            sink.emit(denied())
        await asyncio.sleep(0.2)
        assert [e.suppressed for e in written] == [None, 9]
        sink.stop()

    asyncio.run(main())


def connection(name: str, port: int, kind: EventKind = EventKind.CONNECTION, **fields) -> Event:
    """An allowed TLS connection to `name` from source port `port`, or (kind) its end."""
    return Event(kind=kind, verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW, rule_id="wide",
                 task_id="t1", sandbox="10.213.0.2", source=f"10.213.0.2:{port}",
                 dst_ip="203.0.113.66", dst_port=443, name=name, protocol="tls",
                 **fields)  # fmt: skip


def ended(name: str, port: int, up: int) -> Event:
    return connection(name, port, EventKind.CONNECTION_END, bytes_up=up, bytes_down=7)


BYTES_OF = re.compile(r"([^ ,]+) \((\d+) bytes up, (\d+) down\)")


def bytes_by_destination(lines: list[Event]) -> dict[str, int]:
    """The bytes up the lines say went to each destination: an end's own, an
    aggregate's as its detail attributes them."""
    said: dict[str, int] = {}
    for line in lines:
        if line.kind is not EventKind.CONNECTION_END:
            continue
        if not line.suppressed:
            said[f"{line.name}:443"] = said.get(f"{line.name}:443", 0) + line.bytes_up
            continue
        for destination, up, _ in BYTES_OF.findall(line.detail):
            said[destination] = said.get(destination, 0) + int(up)
    return said


def test_past_the_budget_the_log_says_how_many_bytes_went_to_each_destination():
    """rt47 F3: past the budget, the ends of a task's connections were folded into one
    aggregate whose bytes were a sum over destinations sampled five at a time ("and 2
    more"): the 2 MB a task sent to the name it meant read as the decoys' traffic. An
    aggregate of ends now says the bytes of each destination it counts, and writes
    itself out before one more would go unattributed."""
    flood, _ = control(rate=1, burst=1)
    lines = flood.admit(denied())[0]  # the budget, spent
    pad = "x" * 100  # long names: seven of them overflow a detail (1,024 characters)
    names = [f"decoy{i}.{pad}.example" for i in range(6)] + [f"exfil.{pad}.example"]
    for i, name in enumerate(names):  # each destination named, its first connection ended
        lines += flood.admit(connection(name, 40000 + i))[0]
        lines += flood.admit(ended(name, 40000 + i, 10))[0]
    for i, name in enumerate(names):  # second connections: folded, start and end
        lines += flood.admit(connection(name, 41000 + i))[0]
    for i, name in enumerate(names):
        lines += flood.admit(ended(name, 41000 + i, 2_000_000 if "exfil" in name else 100))[0]
    lines += flood.drain()
    assert any(line.suppressed and line.kind is EventKind.CONNECTION_END for line in lines)
    truth = {f"{name}:443": 10 + (2_000_000 if "exfil" in name else 100) for name in names}
    assert bytes_by_destination(lines) == truth
    assert represented(lines) == 1 + 4 * len(names)


def test_the_end_of_a_connection_whose_start_has_a_line_has_one_too():
    """rt47 F5: the next open of a killed process's log follows its lines to give the
    connections it had open an end; one whose end was folded into an aggregate (no
    source) got a second, made-up end "while open". A connection whose start has a
    line (within the budget, or named past it) now has its end on a line too, past
    the budget and after its idle bucket would have been forgotten."""
    from sandgate.proxy.telemetry.audit import audit_members
    from sandgate.proxy.telemetry.event import EncodedEvent

    flood, clock = control(rate=1, burst=3)
    start = connection("api.example", 40000)
    encoded = EncodedEvent(audit_members(start), "t1", "10.213.0.2", "connection", "allow",
                           "rule_allow", "wide", "api.example")  # fmt: skip
    lines = flood.admit_batch([encoded])[0]  # within the budget (a worker's event)
    clock.now += 60
    lines += flood.due()  # its bucket is full and holds nothing: idle, but for it
    for port in range(3):
        lines += flood.admit(denied(port=port))[0]  # the budget, spent
    lines += flood.admit(connection("api.example", 40001))[0]  # named past the budget
    lines += flood.admit(connection("api.example", 40002))[0]  # folded: no line
    for port in (40000, 40001, 40002):
        lines += flood.admit(ended("api.example", port, 5))[0]
    lines += flood.drain()
    own = [e.source for e in lines if e.kind is EventKind.CONNECTION_END and not e.suppressed]
    assert own == ["10.213.0.2:40000", "10.213.0.2:40001"]
    assert represented(lines) == 9  # every event, in a line or an aggregate
