"""A gateway worker's events on their way to the service (proxy/worker.py EventBatcher ->
enforcer/workers.py): what the service makes of them is what it makes of the same
events in process: the same audit lines, the same metrics, the same summary rows, the
same flood control."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from types import SimpleNamespace

import pytest
from sandgate.enforcer.workers import WorkerPool
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.audit import GENESIS, AuditLog, audit_members, encode_line, verify
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind
from sandgate.proxy.telemetry.flood import FloodControl, FloodLimits
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.telemetry.open_connections import OpenConnections
from sandgate.proxy.telemetry.summary import TaskSummary
from sandgate.proxy.worker import EventBatcher
from sandgate.proxy.worker_link import Link, LinkClosed


def ev(kind=EventKind.CONNECTION, verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW, **fields):
    fields.setdefault("task_id", "t1")
    fields.setdefault("sandbox", "10.0.0.2")
    fields.setdefault("profile", "default")
    fields.setdefault("rule_id", "web")
    fields.setdefault("time", 1700000000.5)
    return Event(kind=kind, verdict=verdict, reason=reason, **fields)


MIX = [
    ev(protocol="tls", name="allowed.test", dst_ip="203.0.113.10", dst_port=443, latency=0.0003),
    ev(protocol="tls", name="allowed.test", dst_ip="203.0.113.10", dst_port=443, latency=0.02),
    ev(
        EventKind.CONNECTION_END,
        protocol="tls",
        name="allowed.test",
        bytes_up=517,
        bytes_down=4096,
        duration=0.2,
        latency=None,
    ),  # fmt: skip
    ev(
        EventKind.CONNECTION,
        Verdict.DENY,
        Reason.NO_RULE,
        rule_id="default:fallback",
        protocol="tcp",
        dst_ip="198.51.100.7",
        dst_port=22,
        latency=7.0,
    ),  # past every bucket
    ev(
        EventKind.DNS,
        Verdict.DENY,
        Reason.NO_RULE,
        rule_id="default:fallback",
        name='evil"\n\u2603.test',
        duration=0.004,
    ),  # fmt: skip
    ev(EventKind.DNS, name="allowed.test", duration=0.0001),
    ev(
        EventKind.REQUEST,
        Verdict.DENY,
        Reason.METHOD_NOT_ALLOWED,
        protocol="https",
        method="DELETE",
        path="/x" * 3000,
        name="allowed.test",
        latency=0.00005,
    ),  # fmt: skip
    ev(EventKind.REQUEST, protocol="http", method="BREW", name="allowed.test", latency=0.001),
    ev(
        EventKind.APPROVAL,
        Verdict.ALLOW,
        Reason.APPROVAL_GRANTED,
        scope="task",
        wait=12.5,
        approval_id="a1",
        approver="uid 0 (root)",
        name="asked.test",
        latency=0.002,
    ),  # fmt: skip
    ev(
        EventKind.TASK,
        Verdict.DENY,
        Reason.TASK_LIMIT,
        rule_id="builtin:limit-memory",
        detail="memory limit",
    ),  # fmt: skip
    ev(
        EventKind.CONNECTION,
        Verdict.DENY,
        Reason.PRIVATE_ADDRESS,
        task_id=None,
        sandbox="10.0.0.9",
        profile=None,
        rule_id=None,
        dst_ip="10.1.1.1",
        dst_port=80,
    ),  # fmt: skip
]


class _Sent:
    """Stands for the worker's link: keeps what the batcher sends, as the wire carries it."""

    def __init__(self):
        self.messages: list[dict] = []

    def send(self, message: dict, payload: bytes = b"") -> None:
        message = json.loads(json.dumps(message))  # what the other side parses
        message["payload"] = payload
        self.messages.append(message)


def through_a_worker(events: list[Event], batches: int = 2) -> tuple[list, list]:
    """`events` sent as a worker sends them (in `batches` flushes) and taken in as the
    service takes them: (what its sink got, what its tally got)."""
    sent, got, tallies = _Sent(), [], []

    async def send():
        batcher = EventBatcher(sent)
        step = max(1, len(events) // batches)
        for i, event in enumerate(events, start=1):
            batcher.emit(event)
            if i % step == 0:
                batcher.flush()
        batcher.flush()

    asyncio.run(send())
    pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, got.append, tally=tallies.extend)
    for message in sent.messages:
        pool._take_events(SimpleNamespace(index=0, received=0, open=OpenConnections()), message)
    return got, tallies


def test_the_service_writes_the_same_audit_lines_it_would_have_encoded_itself(tmp_path):
    got, _ = through_a_worker(MIX)
    assert all(type(e) is EncodedEvent for e in got) and len(got) == len(MIX)
    prev = GENESIS
    for seq, (event, encoded) in enumerate(zip(MIX, got, strict=True), start=1):
        assert encode_line(encoded, seq, prev) == encode_line(event, seq, prev)
        assert encoded.decoded() == event
        prev = encode_line(event, seq, prev)[1]
    # Written by the writer thread, the chain verifies.
    log = AuditLog(tmp_path / "audit.jsonl")
    for encoded in got:
        log.emit(encoded)
    log.close()
    assert log.written == len(MIX)
    assert verify(tmp_path / "audit.jsonl").ok
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert json.loads(lines[4])["name"] == 'evil"\n\u2603.test'


def _series(metrics: Metrics) -> list:
    return sorted(
        (s.name, sorted(s.labels.items()), s.value)
        for family in metrics.registry.collect()
        for s in family.samples
    )


@pytest.mark.parametrize("batches", [1, 3, len(MIX)])
def test_the_metrics_a_worker_counts_are_those_the_events_make_in_process(batches):
    in_process = Metrics()
    for event in MIX * 3:
        in_process.emit(event)
    summed = Metrics()
    got, tallies = through_a_worker(MIX * 3, batches)
    for encoded in got:
        summed.emit(encoded)  # only the rare kinds: approval, task
    summed.add_tally(tallies)
    expected = _series(in_process)
    assert [s[:2] for s in _series(summed)] == [s[:2] for s in expected]
    # The same values; sums of seconds only up to the order of their additions.
    assert [s[2] for s in _series(summed)] == pytest.approx([s[2] for s in expected])
    # Not vacuous: the histogram, the bytes and the approvals' own series are there.
    names = {name for name, _, value in _series(summed) if value}
    assert {"sandgate_decision_latency_seconds_bucket", "sandgate_bytes_total",
            "sandgate_approval_decisions_total", "sandgate_task_limits_total",
            "sandgate_http_requests_total", "sandgate_dns_queries_total"} <= names  # fmt: skip


def test_a_flood_of_worker_events_is_aggregated_as_one_of_events():
    flood = [
        ev(
            EventKind.CONNECTION,
            Verdict.DENY,
            Reason.NO_RULE,
            rule_id="default:fallback",
            dst_ip="198.51.100.7",
            dst_port=1000 + i,
            time=1700000000.0 + i,
        )  # fmt: skip
        for i in range(12)
    ]
    got, _ = through_a_worker(flood)
    results = []
    for events in (flood, got):
        control = FloodControl(FloodLimits(rate=1.0, burst=3), clock=lambda: 0.0)
        out = []
        for event in events:
            lines, _ = control.admit(event)
            out.extend(lines)
        out.extend(control.drain())
        results.append([e.decoded() if type(e) is EncodedEvent else e for e in out])
    assert results[0] == results[1]
    assert [e.suppressed for e in results[1]] == [None, None, None, 9]


def test_a_task_summary_counts_worker_events_as_events():
    got, _ = through_a_worker(MIX)
    summaries = [TaskSummary(), TaskSummary()]
    for event, encoded in zip(MIX, got, strict=True):
        summaries[0].emit(event)
        summaries[1].emit(encoded)
    assert summaries[0].to_dict() == summaries[1].to_dict()
    assert len(summaries[1].rows) == 8  # connection_end and task events have no row


def test_a_bad_batch_is_refused_and_said_a_bad_event_skipped(caplog):
    got, tallies = [], []
    pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, got.append, tally=tallies.extend)
    good = ["t1", "10.0.0.2", "dns", "deny", "no_rule", "default:fallback", "x.test"]
    worker = SimpleNamespace(index=1, received=0, open=OpenConnections())
    with caplog.at_level(logging.ERROR):
        pool._take_events(worker, {"events": [good, good], "payload": b'"kind":"dns"'})
        assert got == [] and "2 events with 1 audit lines" in caplog.text
        bad = [*good[:4], "no_such_reason", *good[5:]]
        pool._take_events(worker, {"events": [bad, good], "payload": b"a\nb", "metrics": []})
    assert [e.members for e in got] == [b"b"] and "bad event" in caplog.text


def test_a_notification_carries_its_payload_in_order_and_a_bad_size_ends_the_link():
    async def main():
        seen = []
        a, b = socket.socketpair()
        sender, receiver = await Link.over(a, lambda m: None), await Link.over(b, seen.append)
        reading = asyncio.create_task(receiver.run())
        blob = bytes(range(256)) * 300  # newlines and all
        sender.send({"op": "events", "n": 1}, blob)
        sender.send({"op": "note", "n": 2})
        sender.send({"op": "events", "n": 3}, b"x")
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        assert [(m["n"], m.get("payload")) for m in seen] == [(1, blob), (2, None), (3, b"x")]
        # A size that is no size: the stream is out of step, the link ends.
        sender.transport.write(b'{"op":"events","payload":-5}\n')
        await asyncio.wait_for(reading, 5)
        assert receiver.closed
        with pytest.raises(LinkClosed):
            receiver.send({"op": "note"})
        sender.close()

    asyncio.run(main())


class _Writes(_Sent):
    """_Sent that also notes the loop's time of each write."""

    def __init__(self):
        super().__init__()
        self.at: list[float] = []

    def send(self, message: dict, payload: bytes = b"") -> None:
        super().send(message, payload)
        self.at.append(asyncio.get_running_loop().time())


def test_events_spread_over_a_tick_go_in_one_write_in_order_at_the_tick():
    """Events made over ~8 ms (each in a loop iteration of its own) go in one write per
    FLUSH_PERIOD tick they fall in, at the tick: not one per 5 ms after the first."""
    from sandgate.proxy.ticks import LEAD, next_tick
    from sandgate.proxy.worker import FLUSH_PERIOD

    async def main():
        sent = _Writes()
        batcher = EventBatcher(sent)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(next_tick(loop.time(), FLUSH_PERIOD, LEAD) - loop.time() + 0.0005)
        made, ticks = [], set()
        began = loop.time()
        for i in range(8):
            event = ev(dst_port=1000 + i)
            ticks.add(next_tick(loop.time(), FLUSH_PERIOD, LEAD))
            batcher.emit(event)
            made.append(event)
            await asyncio.sleep(0.001)
        spread = loop.time() - began
        await asyncio.sleep(FLUSH_PERIOD + 0.01)
        return sent, made, ticks, spread

    sent, made, ticks, spread = asyncio.run(main())
    assert spread > 0.005  # longer than the old 5 ms window: that sent 2+ writes
    assert len(sent.messages) == len(ticks) < len(made)
    rows = [row for m in sent.messages for row in m["events"]]
    assert [b for m in sent.messages for b in m["payload"].split(b"\n")] == [
        audit_members(e) for e in made
    ]
    assert len(rows) == len(made)
    # Each write at (just after) its tick: LEAD before a multiple of FLUSH_PERIOD.
    for at in sent.at:
        assert 0 <= at - (round((at + LEAD) / FLUSH_PERIOD) * FLUSH_PERIOD - LEAD) < 0.01


def test_two_workers_batchers_flush_at_the_same_instant():
    """Batchers whose first events come at different moments of one period flush at the
    same tick, LEAD before the service reads both at once."""
    from sandgate.proxy.ticks import INTAKE_PERIOD, LEAD, next_tick
    from sandgate.proxy.worker import FLUSH_PERIOD

    async def main():
        loop = asyncio.get_running_loop()
        await asyncio.sleep(next_tick(loop.time(), FLUSH_PERIOD, LEAD) - loop.time() + 0.001)
        one, two = EventBatcher(_Sent()), EventBatcher(_Sent())
        one.emit(ev())
        await asyncio.sleep(0.006)
        two.emit(ev())
        whens = one._timer.when(), two._timer.when()
        one.flush()
        two.flush()
        return whens

    first, second = asyncio.run(main())
    assert first == second
    read = first + LEAD  # the service's next read of the links: a tick of its clock
    assert abs(read / INTAKE_PERIOD - round(read / INTAKE_PERIOD)) < 1e-6
    assert next_tick(0.0, FLUSH_PERIOD) == FLUSH_PERIOD
    assert next_tick(FLUSH_PERIOD * 3, FLUSH_PERIOD) == FLUSH_PERIOD * 4
    assert next_tick(FLUSH_PERIOD * 3 - LEAD, FLUSH_PERIOD, LEAD) == FLUSH_PERIOD * 4 - LEAD


def test_the_front_doors_deadline_tick_falls_on_the_flush_grid():
    """A worker's periodic work shares its wake-ups: the door's deadline ticks are on
    the grid the event batches go on, and every flush instant is one of them."""
    from sandgate.proxy.frontdoor.door import TICK
    from sandgate.proxy.ticks import LEAD, next_tick
    from sandgate.proxy.worker import FLUSH_PERIOD

    assert abs(FLUSH_PERIOD / TICK - round(FLUSH_PERIOD / TICK)) < 1e-9
    for now in (0.0, 12.3456, 1e6 + 0.0789):
        flush = next_tick(now, FLUSH_PERIOD, LEAD)
        door = now
        while door < flush - 1e-9:
            door = next_tick(door, TICK, LEAD)
        assert abs(door - flush) < 1e-6


def test_retire_returns_once_the_workers_held_events_are_in_the_sink():
    """A detach has the worker forget the sandbox, then `flush` (pool.retire): the events
    it held for its next tick reach the service's sink, all and in order, before retire
    returns; what the worker reads from the address afterwards is no task's."""
    from sandgate.proxy.worker import Worker

    async def main():
        got, tallies = [], []
        pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, got.append, tally=tallies.extend)
        a, b = socket.socketpair()
        worker = Worker(0, {}, None, None)
        removed = []
        worker.gateway = SimpleNamespace(remove_sandbox=removed.append)
        worker.serving = True
        worker.link = await Link.over(a, worker.handle)
        worker.batcher = EventBatcher(worker.link)
        up = asyncio.Event()
        up.set()
        held = SimpleNamespace(
            index=0, up=up, link=None, sandboxes={}, received=0, open=OpenConnections()
        )
        held.link = await Link.over(b, lambda m: pool._handle(held, m))
        pool.workers.append(held)
        pool.by_address["10.0.0.2"] = 0
        for event in MIX:
            worker.batcher.emit(event)
        assert worker.batcher._timer is not None and got == []  # held for the tick
        await pool.retire("10.0.0.2")
        assert worker.batcher.rows == [] and removed == ["10.0.0.2"]
        assert "10.0.0.2" not in pool.by_address
        await pool.retire("10.9.9.9")  # no such sandbox: nothing to wait for
        worker.link.close()
        held.link.close()
        return got

    got = asyncio.run(main())
    assert [e.decoded() for e in got] == MIX


# --- the service's intake per batch (EventFanout.emit_batch) -----------------------------


def _flood_mix() -> list[Event]:
    """Two tasks, one of them flooding: passes, aggregates, a never-suppressed event
    that flushes them, a bucket that refills in between (the clock moves per batch)."""
    events = []
    for i in range(40):
        task = "t1" if i % 4 else "t2"
        events.append(ev(EventKind.CONNECTION, Verdict.DENY, Reason.NO_RULE, task_id=task,
                         rule_id="default:fallback", dst_ip="198.51.100.7",
                         dst_port=1000 + i, time=1700000000.0 + i))  # fmt: skip
        if i == 25:
            events.append(ev(EventKind.TASK, task_id="t1", detail="task ended"))
    return events


def test_flood_control_per_batch_is_flood_control_per_event():
    got, _ = through_a_worker(_flood_mix())
    results = []
    for batch in (False, True):
        now = [0.0]
        control = FloodControl(FloodLimits(rate=2.0, burst=4), clock=lambda now=now: now[0])
        out, held = [], 0
        for start in range(0, len(got), 7):  # batches of 7, the clock moving between them
            chunk = got[start : start + 7]
            if batch:
                lines, suppressed = control.admit_batch(chunk)
                out.extend(lines)
                held += len(suppressed)
            else:
                for event in chunk:
                    lines, suppressed = control.admit(event)
                    out.extend(lines)
                    held += suppressed
            now[0] += 3.0 if start == 14 else 0.5  # a pause: the flood is over, for a while
        out.extend(control.drain())
        results.append(([e.decoded() if type(e) is EncodedEvent else e for e in out], held))
    assert results[0] == results[1]
    records, held = results[1]
    # Not vacuous: some passed, some were aggregated, and every event is accounted for.
    assert 0 < held < len(got)
    assert sum(e.suppressed or 1 for e in records) == len(got)


def test_a_task_summary_counts_a_batch_as_its_events_one_by_one():
    got, _ = through_a_worker(MIX * 3 + _flood_mix())
    extra = ev(EventKind.DNS, name="service-made.test")  # an `Event` among them
    events = [*got[:5], extra, *got[5:]]
    for max_rows in (10_000, 4):  # 4: later destinations overflow the same way
        one, batch = TaskSummary(max_rows=max_rows), TaskSummary(max_rows=max_rows)
        for event in events:
            one.emit(event)
        batch.emit_batch(events[:9])
        batch.emit_batch(events[9:])
        assert batch.to_dict() == one.to_dict()
        assert sum(batch.rows.values()) == sum(one.rows.values()) > 30


class _Broken:
    def emit(self, event):
        raise RuntimeError("broken sink")

    def emit_batch(self, events):
        raise RuntimeError("broken sink")


class _OneByOne:
    def __init__(self, fail_on=None):
        self.got, self.fail_on = [], fail_on

    def emit(self, event):
        if event is self.fail_on:
            raise RuntimeError("this one")
        self.got.append(event)


def test_a_fanout_batch_reaches_every_sink_in_order_despite_a_broken_one(caplog):
    from sandgate.proxy.telemetry.event import EventFanout

    events = [ev(dst_port=p) for p in range(5)]
    before, after = _OneByOne(fail_on=events[2]), _OneByOne()
    with caplog.at_level(logging.ERROR):
        EventFanout(before, _Broken(), after).emit_batch(events)
    assert after.got == events  # the broken sink lost nothing for the others
    assert before.got == events[:2] + events[3:]  # one failing event: only that one
    assert caplog.text.count("failed") == 2


def test_the_audit_queue_takes_a_batch_whole_or_counts_each_event_it_cannot(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", queue_size=8, flush_interval=60)
    try:
        while not log._idle:  # the writer waits (60 s) before it looks at the queue again
            time.sleep(0.001)
        log._taken.extend([None] * 6)  # as if the writer were far behind
        log.emit_batch([ev(dst_port=p) for p in range(5)])
        assert log.queued == 8 and log.dropped == 3  # 2 fit; the rest counted as lost
    finally:
        log._taken.clear()
        log.close()
    log = AuditLog(tmp_path / "audit2.jsonl")
    log.emit_batch(MIX)
    log.close()
    assert log.written == len(MIX) and verify(tmp_path / "audit2.jsonl").ok


def test_a_pool_with_a_batch_sink_hands_each_batch_over_in_one_call():
    got, one = [], []
    pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, one.append, sink_batch=got.append)
    sent = _Sent()

    async def send():
        batcher = EventBatcher(sent)
        for event in MIX:
            batcher.emit(event)
        batcher.flush()

    asyncio.run(send())
    pool._take_events(
        SimpleNamespace(index=0, received=0, open=OpenConnections()), sent.messages[0]
    )
    assert one == [] and len(got) == 1
    assert [e.decoded() for e in got[0]] == MIX
