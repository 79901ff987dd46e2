"""A gateway worker's black box (proxy/telemetry/blackbox.py): what the service reads
back after the worker died is exactly the records it had not received, in order, and
what it cannot read back is counted lost, never made up."""

from __future__ import annotations

import asyncio
import mmap
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.enforcer.workers import WorkerPool
from sandgate.proxy.telemetry.audit import AuditLog, audit_members
from sandgate.proxy.telemetry.blackbox import (
    HEADER_SIZE,
    RECORD,
    BlackBox,
    blank,
    recover,
)
from sandgate.proxy.telemetry.flood import FloodLimits
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.telemetry.open_connections import OpenConnections
from sandgate.proxy.worker import EventBatcher
from test_telemetry_metrics import value
from test_worker_events import MIX, _Sent

SMALL = HEADER_SIZE + 4096


def box(size: int = 1 << 16) -> tuple[bytearray, BlackBox]:
    buffer = bytearray(size)
    blank(buffer)
    return buffer, BlackBox(buffer)


def payload(n: int, size: int = 40) -> bytes:
    return (f"record {n} ".encode() * size)[:size]


def test_a_blank_box_recovers_nothing_and_loses_nothing():
    buffer, _ = box()
    assert recover(buffer, 0) == ([], 0, 0)


def test_a_buffer_that_is_no_black_box_is_refused():
    with pytest.raises(ValueError, match="magic"):
        BlackBox(bytearray(SMALL))
    with pytest.raises(ValueError, match="too small"):
        BlackBox(bytearray(HEADER_SIZE))
    assert recover(bytearray(SMALL), 5) == ([], 0, 0)


def test_what_was_written_and_not_received_is_recovered_in_order():
    buffer, black = box()
    for n in range(1, 11):
        assert black.write(payload(n)) == n
    assert recover(buffer, 0) == ([payload(n) for n in range(1, 11)], 0, 10)
    assert recover(buffer, 7).payloads == [payload(n) for n in (8, 9, 10)]
    assert recover(buffer, 10) == ([], 0, 10)


def test_the_mark_skips_what_was_sent_and_the_seq_what_was_received_past_it():
    buffer, black = box()
    for n in range(1, 6):
        black.write(payload(n))
    black.mark_sent()
    for n in range(6, 9):
        black.write(payload(n))
    # The service read 5: the records before the mark are not even walked.
    assert recover(buffer, 5) == ([payload(6), payload(7), payload(8)], 0, 8)
    # It read 7 (a flush whose bytes were still in the worker's buffer left the mark).
    assert recover(buffer, 7) == ([payload(8)], 0, 8)


def test_a_write_torn_at_any_byte_yields_the_records_before_it_and_no_more():
    buffer, black = box()
    for n in range(1, 4):
        black.write(payload(n))
    before = bytes(buffer)
    start = black.pos
    black.write(payload(4, 100))
    after = bytes(buffer)
    end = black.pos
    for cut in range(start, end):  # the kill lands after byte `cut` of the record
        torn = bytearray(before)
        torn[start:cut] = after[start:cut]
        found = recover(torn, 0)
        assert found.payloads == [payload(n) for n in (1, 2, 3)], cut
        assert found.lost == 0  # its decision never took effect: the write comes first
    whole = bytearray(before)
    whole[start:end] = after[start:end]  # killed before `last_seq` was stored
    assert recover(whole, 0) == ([payload(1), payload(2), payload(3), payload(4, 100)], 0, 4)


def test_a_record_written_over_stale_bytes_of_a_past_lap_ends_the_walk_there():
    buffer, black = box(SMALL)
    n = 0
    for _ in range(300):  # several laps, each record sent and marked
        n += 1
        black.write(payload(n, 90))
        black.mark_sent()
    # The mark points where the next record goes: stale records of a past lap there.
    assert recover(buffer, n) == ([], 0, n)
    n += 1
    black.write(payload(n, 90))
    assert recover(buffer, n - 1) == ([payload(n, 90)], 0, n)


def test_unsent_records_across_the_end_of_the_ring_come_back_whole():
    buffer, black = box(SMALL)
    for n in range(1, 35):
        black.write(payload(n, 100))  # 116 bytes each: the 36th no longer fits
    black.mark_sent()
    assert black.pos > SMALL - 3 * (RECORD.size + 100)
    for n in range(35, 41):
        black.write(payload(n, 100))
    assert black.pos < HEADER_SIZE + 6 * (RECORD.size + 100)  # wrapped
    assert recover(buffer, 34) == ([payload(n, 100) for n in range(35, 41)], 0, 40)


def test_a_burst_larger_than_the_ring_keeps_the_newest_and_counts_the_rest_lost():
    buffer, black = box(SMALL)
    for n in range(1, 201):  # 200 * 116 bytes, never sent: the ring holds ~35
        black.write(payload(n, 100))
    found = recover(buffer, 0)
    kept = len(found.payloads)
    assert 20 < kept < 36
    assert found.payloads == [payload(n, 100) for n in range(201 - kept, 201)]
    assert found.lost == 200 - kept and found.last_seq == 200


def test_a_record_too_long_to_keep_is_counted_lost_and_the_next_still_come_back():
    buffer, black = box(SMALL)
    black.write(payload(1))
    black.write(b"x" * 2000)  # over a quarter of the ring
    black.write(payload(3))
    assert recover(buffer, 0) == ([payload(1), payload(3)], 1, 3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(min_value=1, max_value=700), st.just(0)), min_size=1, max_size=120
    ),
    st.integers(min_value=0, max_value=120),
)
def test_recovered_plus_lost_is_what_was_not_received(ops, received):
    """Any writes (sizes) and flushes (0), the service having received any number up to
    the last flush's: what comes back is the newest of the rest, in order, and with
    what is counted lost it is the rest."""
    buffer, black = box(SMALL)
    written, sent = [], 0
    for op in ops:
        if op == 0:
            black.mark_sent()
            sent = len(written)
        else:
            written.append(bytes([len(written) % 251]) * op)
            black.write(written[-1])
    after = min(received, len(written)) if received <= sent else sent
    found = recover(buffer, after)
    assert found.last_seq == len(written)
    assert found.lost + len(found.payloads) == len(written) - after
    assert found.payloads == written[len(written) - len(found.payloads) :]
    if not found.lost:
        assert found.payloads == written[after:]


def test_the_service_ingests_a_dead_workers_unsent_events_marked_recovered():
    """EventBatcher with a black box, half its events sent; the worker dies; the pool
    reads the box: the sink gets the other half, as the worker made them, marked."""
    memory = mmap.mmap(-1, 1 << 16)
    blank(memory)
    sent, got = _Sent(), []

    async def make():
        batcher = EventBatcher(sent, BlackBox(memory))
        half = len(MIX) // 2
        for event in MIX[:half]:
            batcher.emit(event)
        batcher.flush()
        for event in MIX[half:]:
            batcher.emit(event)  # the kill comes before the tick

    sent.buffered = lambda: 0
    # Not asyncio.run: its shutdown turns the loop again, and the second half's flush
    # tick (<= 20 ms ahead) fired there now and then. The loop stops with make().
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(make())
    finally:
        loop.close()
    pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, got.append)
    worker = SimpleNamespace(index=1, pid=4242, blackbox=memory, received=0, open=OpenConnections())
    for message in sent.messages:
        pool._take_events(worker, message)
    received = len(got)
    assert received == len(MIX) // 2 and worker.received == received
    pool._recover(worker, "signal SIGKILL")
    assert memory.closed and worker.blackbox is None
    assert worker.recovered == (len(MIX) - received, 0)
    mark = "recovered from gateway worker 1's black box (pid 4242, signal SIGKILL)"
    for made, event in zip(MIX[received:], got[received:], strict=True):
        assert event.detail.endswith(mark)
        assert audit_members(event.with_fields(detail=made.detail)) == audit_members(made)


def test_what_an_overrun_black_box_lost_is_in_the_audit_logs_lost_and_its_metric(tmp_path):
    """A dead worker wrote more than its ring holds since its last flush: the records
    it wrote over are counted in the audit log's `lost`, which
    `sandgate_audit_events_lost_total` exports, beside the ones the writer lost."""
    memory = mmap.mmap(-1, SMALL)
    blank(memory)
    black = BlackBox(memory)
    made = [
        audit_members(event.with_fields(detail=f"event {n}")) for n, event in enumerate(MIX * 8)
    ]
    for members in made:
        black.write(members)
    log = AuditLog(tmp_path / "audit.jsonl")
    metrics = Metrics()
    metrics.watch_audit(log)
    try:
        pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, log.emit,
                          audit=RateLimitedAudit(log, FloodLimits()))  # fmt: skip
        worker = SimpleNamespace(index=0, pid=7, blackbox=memory, received=0,
                                 open=OpenConnections())  # fmt: skip
        pool._recover(worker, "signal SIGKILL")
        recovered, lost = worker.recovered
        assert recovered and lost and recovered + lost == len(made)
        assert log.drain() and log.written == recovered
        assert log.lost == lost and value(metrics, "sandgate_audit_events_lost_total") == lost
        log.count_lost(-3)  # nonsense counts nothing
        assert log.lost == lost
    finally:
        log.close()
