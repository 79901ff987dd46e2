"""A dead gateway worker's open connections (proxy/telemetry/open_connections.py): each
allowed connection it started and did not end gets exactly one `connection_end`,
attributed to its task, that says the worker's death ended it and that its bytes are
unknown; ended, denied and other connections get none."""

from __future__ import annotations

import asyncio
import mmap
from types import SimpleNamespace

import pytest
from sandgate.enforcer.workers import WorkerPool
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.audit import audit_members
from sandgate.proxy.telemetry.blackbox import BlackBox, blank
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind
from sandgate.proxy.telemetry.open_connections import OpenConnections
from sandgate.proxy.telemetry.summary import row_destination
from sandgate.proxy.worker import EventBatcher
from test_worker_events import _Sent

T0 = 1700000000.0


def conn(port: int, kind=EventKind.CONNECTION, verdict=Verdict.ALLOW, task="t1", **fields):
    allowed = verdict is not Verdict.DENY
    fields.setdefault("reason", Reason.RULE_ALLOW if allowed else Reason.NO_RULE)
    fields.setdefault("protocol", "tls")
    fields.setdefault("detail", "allowed by rule web")
    return Event(
        kind=kind, verdict=verdict, task_id=task, sandbox="10.0.0.2", profile="default",
        rule_id="web", rule_origin="rules.yaml:4", policy_hash="abc", time=T0,
        source=f"10.0.0.2:{port}", dst_ip="203.0.113.10", dst_port=443, name="allowed.test",
        **fields,
    )  # fmt: skip


def encoded(event: Event) -> EncodedEvent:
    """`event` as a worker sends it (proxy/worker.py, EventBatcher)."""
    return EncodedEvent(
        audit_members(event), event.task_id, event.sandbox, event.kind,
        event.verdict, event.reason, event.rule_id, row_destination(event),
    )  # fmt: skip


END = {"kind": EventKind.CONNECTION_END, "bytes_up": 5, "bytes_down": 9, "duration": 1.0}
WHY = "the death of gateway worker 1 (pid 42, signal SIGKILL)"


@pytest.mark.parametrize("form", [pytest.param(e, id=e.__name__) for e in (Event, EncodedEvent)])
def test_each_allowed_connection_not_ended_gets_one_end_saying_it_was_cut(form):
    made = [
        conn(1000),  # open: cut
        conn(1001),
        conn(1001, **END),  # ended: not cut
        conn(1002, verdict=Verdict.DENY),  # denied: never opened
        conn(1003, kind=EventKind.REQUEST, protocol="http", method="GET", path="/a"),  # plain HTTP
        conn(1003, kind=EventKind.REQUEST, protocol="http", method="GET", path="/b"),  # its next
        conn(1004, verdict=Verdict.AUDIT, reason=Reason.NO_RULE),  # allowed by an audit fallback
        conn(1000, task="t2"),  # another task's connection from the same source port
        conn(1005, kind=EventKind.DNS, protocol="dns"),  # not a connection
    ]
    tracked = OpenConnections()
    tracked.follow([encoded(e) if form is EncodedEvent else e for e in made])
    ends = tracked.cut(WHY, now=T0 + 7.5)
    assert [(e.task_id, e.source) for e in ends] == [
        ("t1", "10.0.0.2:1000"), ("t1", "10.0.0.2:1003"), ("t1", "10.0.0.2:1004"),
        ("t2", "10.0.0.2:1000"),
    ]  # fmt: skip
    for end in ends:
        assert end.kind is EventKind.CONNECTION_END and end.time == T0 + 7.5
        assert (end.rule_id, end.rule_origin, end.policy_hash, end.profile, end.sandbox) == (
            "web", "rules.yaml:4", "abc", "default", "10.0.0.2")  # fmt: skip
        assert (end.dst_ip, end.dst_port, end.name) == ("203.0.113.10", 443, "allowed.test")
        # Unknown, said so: no made-up number.
        assert end.bytes_up is None and end.bytes_down is None and end.duration is None
        assert end.detail.startswith(f"ended by {WHY} while open (open for at least 7.5 s)")
        assert "bytes up and down and the exact duration are unknown" in end.detail
        assert end.method is None and end.path is None and end.latency is None
    assert (ends[1].protocol, ends[2].verdict, ends[2].reason) == ("http", Verdict.AUDIT,
                                                                  Reason.NO_RULE)  # fmt: skip
    assert tracked.cut(WHY) == []  # once


def test_a_connection_that_ended_and_whose_port_was_used_again_is_open_once():
    tracked = OpenConnections()
    tracked.follow([conn(1000), conn(1000, **END), conn(1000, protocol="tcp")])
    assert [e.protocol for e in tracked.cut(WHY)] == ["tcp"]


def test_past_the_limit_a_start_is_counted_not_followed():
    tracked = OpenConnections(limit=2)
    tracked.follow([conn(p) for p in (1, 2, 3, 4)])
    assert len(tracked.open) == 2 and tracked.unfollowed == 2
    tracked.follow([conn(1, **END), conn(5)])
    assert [e.source for e in tracked.cut(WHY)] == ["10.0.0.2:2", "10.0.0.2:5"]


def test_a_quoted_source_in_the_detail_is_not_taken_for_the_source():
    forged = conn(1000, detail='x "source":"10.0.0.2:9" y')  # `detail` comes before `source`
    tracked = OpenConnections()
    tracked.follow([encoded(forged), encoded(conn(9, **END))])
    assert [e.source for e in tracked.cut(WHY)] == ["10.0.0.2:1000"]


def test_the_pool_ends_a_dead_workers_open_connections_sent_and_recovered():
    """One connection's start was sent, one's only in the black box, one ended: the
    worker dies; the sink gets one cut end for each of the first two, after the
    recovered events, and none for the third."""
    memory = mmap.mmap(-1, 1 << 16)
    blank(memory)
    sent, got = _Sent(), []

    async def make():
        batcher = EventBatcher(sent, BlackBox(memory))
        for event in (conn(1000), conn(1002), conn(1002, **END)):
            batcher.emit(event)
        batcher.flush()
        batcher.emit(conn(1001))  # the kill comes before the tick

    sent.buffered = lambda: 0
    asyncio.run(make())
    pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, got.append)
    worker = SimpleNamespace(index=1, pid=42, blackbox=memory, received=0, open=OpenConnections())
    for message in sent.messages:
        pool._take_events(worker, message)
    pool._recover(worker, "signal SIGKILL")
    pool._end_cut(worker, "signal SIGKILL")
    assert worker.cut == 2
    ends = got[4:]
    assert [(e.kind, e.source) for e in ends] == [
        (EventKind.CONNECTION_END, "10.0.0.2:1000"), (EventKind.CONNECTION_END, "10.0.0.2:1001"),
    ]  # fmt: skip
    assert all(e.detail.startswith(f"ended by {WHY} while open") for e in ends)
    pool._end_cut(worker, "signal SIGKILL")  # a second death of nothing open: nothing
    assert len(got) == 6 and worker.cut == 0
