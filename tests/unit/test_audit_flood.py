"""The audit rate limit (proxy/telemetry/flood.py, flood_sink.py): bucket, aggregation,
flushes, never-suppressed kinds, and nothing lost."""

from __future__ import annotations

import asyncio
import json

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
    assert "pypi.org:443, pypi.org:8443" in record.detail


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
