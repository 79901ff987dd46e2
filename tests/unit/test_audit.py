"""The audit log: one escaped line per event, a hash chain `verify` checks, a writer
that never blocks and loses nothing while its queue has room."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.enforcer.cli import main
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry import audit as audit_module
from sandgate.proxy.telemetry.audit import (
    GENESIS,
    AuditLog,
    AuditLogError,
    encode_line,
    log_files,
    verify,
)
from sandgate.proxy.telemetry.event import Event, EventKind

FORGERIES = [
    pytest.param('a"b\nc', id="quote-newline"),
    pytest.param('x"}\n{"kind":"task","verdict":"allow"', id="json-injection"),
    pytest.param("cr\rlf\r\n", id="cr-lf"),
    pytest.param("nul\x00esc\x1b[2Jdel\x7f", id="control"),
    pytest.param("line\u2028sep\u2029para\x85nel", id="unicode-line-breaks"),
    pytest.param("bidi\u202egnp.exe ünïcödé \U0001f600", id="non-ascii"),
    pytest.param("lone \udcff surrogate", id="surrogate"),
    pytest.param("back\\slash\\", id="backslash"),
]


def event(i: int = 0, **fields) -> Event:
    base = dict(
        kind=EventKind.REQUEST,
        verdict=Verdict.DENY,
        reason=Reason.HOST_MISMATCH,
        rule_id="builtin:host-mismatch",
        name=f"n{i}.example",
        dst_ip="203.0.113.10",
        dst_port=80,
        method="GET",
        path=f"/{i}",
        task_id="t1",
        sandbox="10.213.0.2",
        profile="default",
    )
    return Event(**{**base, **fields})


def write(path, events, **kw) -> AuditLog:
    log = AuditLog(path, **kw)
    for e in events:
        log.emit(e)
    log.close()
    return log


def lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- one event, one line ----------------------------------------------------------------


@pytest.mark.parametrize("value", FORGERIES)
def test_no_value_can_end_a_line_or_forge_one(tmp_path, value):
    path = tmp_path / "audit.jsonl"
    write(path, [event(1, name=value, path=value, detail=value), event(2)])
    raw = lines(path)
    assert len(raw) == 2
    assert all(b < 0x80 for b in raw[0]) and raw[0].count(b"\n") == 1 and b"\r" not in raw[0]
    assert not any(b < 0x20 or b == 0x7F for b in raw[0][:-1])  # every control escaped
    record = json.loads(raw[0])
    assert record["name"] == value and record["path"] == value and record["detail"] == value
    assert verify(path).ok


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(),
    port=st.integers(0, 2**40),
    seconds=st.floats(allow_nan=False, allow_infinity=False),
)
def test_a_line_is_the_event_as_json_for_any_value(text, port, seconds):
    e = event(1, name=text, path=text, detail=text, dst_port=port, latency=seconds)
    line, digest = encode_line(e, 7, GENESIS)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and all(b < 0x80 for b in line)
    record = json.loads(line)
    assert (record.pop("seq"), record.pop("prev"), record.pop("hash")) == (7, GENESIS, digest)
    assert record == e.to_dict()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"path": "/a:null,b", "detail": 'x":null'}, id="text-that-reads-null"),
        pytest.param({"dst_port": 2**70}, id="int-past-64-bits"),
        pytest.param(
            {"latency": 1.23e-05, "bytes_up": 0, "detail": ""}, id="small-float-zero-empty"
        ),
    ],
)
def test_values_orjson_leaves_to_the_escaper_are_written_as_they_are(fields):
    """What orjson writes differently from this log's rules, or not at all, goes
    through the JSON module's escaper (audit_members): the same record either way."""
    e = event(1, **fields)
    line, _ = encode_line(e, 1, GENESIS)
    assert all(b < 0x80 for b in line)
    record = json.loads(line)
    assert {k: record[k] for k in fields} == fields and record == {
        **e.to_dict(),
        "seq": 1,
        "prev": GENESIS,
        "hash": record["hash"],
    }


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(ipaddress.ip_address("203.0.113.1"), id="object"),
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="inf"),
    ],
)
def test_a_value_json_cannot_hold_fails_that_event_not_the_log(tmp_path, value):
    path = tmp_path / "audit.jsonl"
    log = write(
        path,
        [
            event(0),
            event(1, latency=value) if isinstance(value, float) else event(1, dst_ip=value),
            event(2),
        ],
    )
    assert (log.written, log.failed, log.lost) == (2, 1, 1)
    assert verify(path).ok and [json.loads(line)["path"] for line in lines(path)] == ["/0", "/2"]


def test_record_fields_in_schema_order_then_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, [event(1, latency=0.5), event(2)])
    first, second = (json.loads(line) for line in lines(path))
    keys = list(first)
    assert keys[:3] == ["kind", "verdict", "reason"] and keys[-3:] == ["seq", "prev", "hash"]
    assert "bytes_up" not in first  # None fields are left out
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert second["seq"] == 2 and second["prev"] == first["hash"]
    assert (
        first["latency"] == 0.5
        and first["kind"] == "request"
        and first["reason"] == "host_mismatch"
    )


# --- verify -------------------------------------------------------------------------------


@pytest.fixture
def log10(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, [event(i) for i in range(10)])
    return path


def _rewrite(path, transform):
    raw = lines(path)
    path.write_bytes(b"".join(transform(raw)))


def test_intact_log_verifies(log10):
    result = verify(log10)
    assert result.ok and result.lines == 10 and result.first_seq == 1 and result.last_seq == 10
    assert result.starts_fresh


@pytest.mark.parametrize(
    ("transform", "line", "problem"),
    [
        pytest.param(
            lambda r: r[:4] + [r[4].replace(b'"deny"', b'"allow"')] + r[5:],
            5,
            "hash mismatch",
            id="edited-value",
        ),
        pytest.param(
            lambda r: r[:4] + [r[4].replace(b',"path"', b', "path"')] + r[5:],
            5,
            "hash mismatch",
            id="edited-whitespace",
        ),
        pytest.param(lambda r: r[:3] + r[4:], 4, "chain broken", id="removed-line"),
        pytest.param(lambda r: r[:3] + [r[4], r[3]] + r[5:], 4, "chain broken", id="swapped-lines"),
        pytest.param(lambda r: r[:7] + [r[6]] + r[7:], 8, "chain broken", id="duplicated-line"),
        pytest.param(
            lambda r: r[:2] + [b'{"kind":"task"}\n'] + r[2:],
            3,
            "not an audit record",
            id="inserted-line",
        ),
        pytest.param(
            lambda r: r[:9] + [r[9][:-1]], 10, "incomplete last line", id="truncated-last-line"
        ),
        pytest.param(lambda r: r[:5] + [b"\n"] + r[5:], 6, "not an audit record", id="blank-line"),
        pytest.param(
            lambda r: r[:5] + [r[5].replace(b'"hash"', b'"hash":"x","h"')] + r[6:],
            6,
            "not an audit record",
            id="hash-not-last",
        ),
        # Hostile lines: a RecursionError traceback, a whole 1 GB line read into memory.
        pytest.param(
            lambda r: r[:5] + [b"[" * 100_000 + b"\n"] + r[5:],
            6,
            "not an audit record",
            id="deeply-nested-json",
        ),
        pytest.param(
            lambda r: r[:5] + [b'{"x":"' + b"a" * audit_module.MAX_RECORD_BYTES + b'"}\n'] + r[5:],
            6,
            "not an audit record (longer than",
            id="over-long-line",
        ),
    ],
)
def test_verify_reports_the_first_broken_line(log10, transform, line, problem):
    _rewrite(log10, transform)
    result = verify(log10)
    assert not result.ok
    assert (result.line, result.file) == (line, str(log10))
    assert result.problem.startswith(problem), result.problem


@pytest.mark.parametrize("kind", ["directory", "fifo", "absent"])
def test_verify_of_what_is_not_a_file_is_one_line_exit_2(tmp_path, kind, capsys):
    """Not a wait on a FIFO, not a traceback on a directory."""
    path = tmp_path / "audit.log"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    assert main(["audit", "verify", str(path)]) == 2
    expected = "no such file" if kind == "absent" else "not a regular file"
    assert capsys.readouterr().err == f"sandgate: {path}: {expected}\n"


def test_verify_flags_a_rehashed_edit_at_the_next_line(log10):
    """Editing a line and recomputing its own hash still breaks the link to the next one."""
    raw = lines(log10)
    record = json.loads(raw[2])
    record["verdict"] = "allow"
    record.pop("hash")
    body = json.dumps(record, separators=(",", ":")).encode()
    digest = audit_module.chain_hash(record["prev"], body)
    raw[2] = body[:-1] + f',"hash":"{digest}"}}\n'.encode()
    log10.write_bytes(b"".join(raw))
    result = verify(log10)
    assert (result.ok, result.line) == (False, 4)


def test_verify_goes_on_after_a_broken_line_and_names_every_one(log10, capsys):
    """One corrupt line in the middle does not leave the rest unchecked: each break is
    named, and what is intact around it is known (an edit after it is found too)."""
    _rewrite(
        log10,
        lambda r: (
            r[:2]
            + [r[2].replace(b'"deny"', b'"allow"')]  # edited: its own hash fails, its link holds
            + r[3:5]
            + [b"\x00\x00 a bad disk block\n"]  # line 6: garbage in place of a record
            + r[6:8]
            + [r[8].replace(b'"t1"', b'"t2"')]  # line 9: a second edit, after the garbage
            + r[9:]
        ),
    )
    result = verify(log10)
    assert not result.ok and (result.line, result.intact_lines, result.lines) == (3, 2, 10)
    assert [(b.line, b.problem.split(":")[0]) for b in result.breaks] == [
        (3, "hash mismatch"),
        (6, "not an audit record (not ASCII JSON with seq, prev and hash)"),
        (9, "hash mismatch"),
    ]
    assert result.last_seq == 10  # checked to the end
    assert main(["audit", "verify", str(log10)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in out[:3]] == [f"{log10}:{n}" for n in (3, 6, 9)]
    assert "BROKEN at line 3" in out[3] and "3 broken place(s) in 10 lines" in out[3]


def test_cutting_the_head_is_visible_as_a_chain_that_does_not_start_fresh(log10):
    _rewrite(log10, lambda r: r[3:])
    result = verify(log10)
    assert result.ok and not result.starts_fresh and result.first_seq == 4


def test_sandgate_audit_verify_exit_codes(log10, capsys):
    assert main(["audit", "verify", str(log10)]) == 0
    assert "ok: 10 lines, seq 1..10, chain intact" in capsys.readouterr().out
    _rewrite(log10, lambda r: r[:6] + [r[6].replace(b"/6", b"/7")] + r[7:])
    assert main(["audit", "verify", str(log10)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{log10}:7: hash mismatch")
    assert main(["audit", "verify", str(log10) + ".missing"]) == 2


# --- rotation and reopening ---------------------------------------------------------------


def test_rotation_continues_the_chain_across_files(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, [event(i, detail="x" * 200) for i in range(100)], max_bytes=4000)
    files = log_files(path)  # FILE.1, FILE.<seq> ..., FILE: oldest first
    assert len(files) > 5
    assert all(p.stat().st_size <= 4000 for p in files)
    result = verify(*files)
    assert result.ok and result.lines == 100 and result.starts_fresh and result.last_seq == 100
    # One rotated file alone verifies, but does not start fresh; out of order, it breaks.
    assert verify(files[2]).ok and not verify(files[2]).starts_fresh
    assert not verify(files[1], files[0]).ok


def test_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, [event(i) for i in range(3)])
    write(path, [event(i) for i in range(3, 5)])
    result = verify(path)
    assert result.ok and result.lines == 5 and result.last_seq == 5


def test_a_torn_last_line_is_cut_off_on_reopen(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, [event(i) for i in range(3)])
    with path.open("ab") as f:
        f.write(b'{"kind":"request","verd')  # a crash mid-write
    write(path, [event(9)])
    result = verify(path)
    assert result.ok and result.lines == 4


def test_refuses_to_append_to_a_file_that_is_no_audit_log(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(AuditLogError, match="not a sandgate audit log"):
        AuditLog(path)
    assert path.read_text() == "my notes\n"


def test_refuses_to_append_to_a_file_whose_last_line_is_deeply_nested(tmp_path):
    # json.loads raised RecursionError: a traceback at the start of `sandgate run`
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 60000 + "\n")
    with pytest.raises(AuditLogError, match="not a sandgate audit log"):
        AuditLog(path)


def test_two_writers_on_one_file_are_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    try:
        with pytest.raises(AuditLogError, match="in use by another"):
            AuditLog(path)
    finally:
        first.close()


def test_unwritable_location_is_an_audit_log_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(AuditLogError, match="cannot open"):
        AuditLog(tmp_path / "file" / "audit.jsonl")


# --- the writer under load and failure -------------------------------------------------------


def test_a_burst_of_100k_events_loses_nothing(tmp_path):
    """emit never waits for the writer: with the writer held on its first batch,
    100k emits all return (nothing written yet), and once it goes on all are written."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    held, release = threading.Event(), threading.Event()
    write_lines = log._write_lines

    def held_write(lines):
        held.set()
        release.wait()
        write_lines(lines)

    log._write_lines = held_write
    template = event(0, latency=0.0001)
    try:
        for i in range(100_000):
            log.emit(template.with_fields(path=f"/{i}"))
            if i == log.batch_size:
                log._wake.set()
                assert held.wait(10), "the writer never took a batch"
        assert log.written == 0 and log.queued >= 100_000 - 2 * log.batch_size
    finally:
        release.set()
    log.close()
    assert (log.lost, log.written, log.write_errors) == (0, 100_000, 0)
    result = verify(path)
    assert result.ok and result.lines == 100_000


def test_sustained_load_from_another_thread_loses_nothing(tmp_path):
    """Producers on another thread (the gateway's loop) for a second, at full speed."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    sent = 0

    def produce():
        nonlocal sent
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for _ in range(100):
                log.emit(event(sent))
                sent += 1
            time.sleep(0.001)  # the loop does other work between events

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join()
    log.close()
    assert log.lost == 0 and log.written == sent and verify(path).ok


@pytest.mark.parametrize("batch_size", [128, 2])  # parts of a batch; full ones too
def test_events_from_a_loop_a_thread_and_a_batch_are_chained_in_the_order_taken_in(
    tmp_path, monkeypatch, batch_size
):
    """Events emitted on a running loop, from another thread and as a batch are
    queued in the order taken in, and the writer thread chains them, full batches
    too: none on the thread that emitted it (the loop pays only the encoding and the
    journal record). The log holds them in the order they were emitted, one chain."""
    path = tmp_path / "audit.jsonl"
    chained_on = set()
    link = AuditLog._link

    def spied_link(self, taken):
        chained_on.add(threading.current_thread().name)
        return link(self, taken)

    monkeypatch.setattr(AuditLog, "_link", spied_link)
    log = AuditLog(path, batch_size=batch_size)
    order = []

    def emit(i):
        order.append(i)
        log.emit(event(i))

    async def scenario():
        emit(0)
        emit(1)
        assert log.lost == 0  # taken in (queued, or written already by the writer)
        other = threading.Thread(target=emit, args=(2,), name="other")  # no loop there
        other.start()
        other.join()
        emit(3)
        order.append(4)
        log.emit_batch([event(4)])
        await asyncio.sleep(0)
        emit(5)
        emit(6)

    asyncio.run(scenario())
    log.close()
    assert log.lost == 0 and verify(path).ok
    assert [json.loads(line)["path"] for line in lines(path)] == [f"/{i}" for i in order]
    assert order == [0, 1, 2, 3, 4, 5, 6]
    assert chained_on == {"sandgate-audit"}


def test_events_taken_in_by_a_loop_that_stops_turning_are_written_all_the_same(tmp_path):
    """A loop that took events in and never turns again (stopped, or stuck) does not
    keep them: the writer chains and writes them at its next look."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=0.02)
    loop = asyncio.new_event_loop()
    try:

        def take_in_and_stop():
            log.emit(event(1))
            log.emit(event(2))
            loop.stop()  # the loop never turns again

        loop.call_soon(take_in_and_stop)
        loop.run_forever()
        deadline = time.monotonic() + 5
        while log.written < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.written == 2 and [json.loads(x)["path"] for x in lines(path)] == ["/1", "/2"]
    finally:
        log.close()
        loop.close()
    assert verify(path).ok


def test_the_writer_writes_full_batches_and_the_rest_at_its_interval_or_a_drain(
    tmp_path, monkeypatch
):
    """Events that come while the writer writes a batch wait for the next full batch,
    its `flush_interval` or a drain, not for the end of that write: under load a
    writer that went on at once wrote a few lines a `write`. A drain writes a part of
    a batch at once, and none of it is lost or reordered."""
    path = tmp_path / "audit.jsonl"
    writing, release = threading.Event(), threading.Event()
    write_all = AuditLog._write_all
    writes = []

    def held_write(self, data):
        writes.append(data.count(b"\n"))
        writing.set()
        release.wait(10)
        write_all(self, data)

    monkeypatch.setattr(AuditLog, "_write_all", held_write)
    log = AuditLog(path, batch_size=4, flush_interval=30)
    try:
        for i in range(4):  # a full batch wakes the writer
            log.emit(event(i))
        assert writing.wait(5)
        for i in range(4, 7):  # three more while it writes
            log.emit(event(i))
        release.set()
        deadline = time.monotonic() + 5
        while log.written < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert (log.written, log.queued, writes) == (4, 3, [4])  # the three wait
        log.emit(event(7))  # a full batch again
        deadline = time.monotonic() + 5
        while log.written < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (log.written, writes) == (8, [4, 4])
        log.emit(event(8))
        started = time.monotonic()
        assert log.drain(5) and log.written == 9  # at once, not at the 30 s interval
        assert time.monotonic() - started < 2 and writes == [4, 4, 1]
    finally:
        release.set()
        log.close()
    assert [json.loads(x)["path"] for x in lines(path)] == [f"/{i}" for i in range(9)]
    assert verify(path).ok


def test_a_batch_is_chained_as_its_lines_one_by_one():
    """`chain_lines` (the writer's loop over a batch) makes the lines and hashes
    `encode_line` makes one at a time."""
    members = [audit_module.audit_members(event(i)) for i in range(5)]
    lines, seq, prev = audit_module.chain_lines(
        [(m, ("j", i)) for i, m in enumerate(members)], 6, GENESIS
    )
    expected, head = [], GENESIS
    for i, m in enumerate(members):
        line, head = encode_line(m, 7 + i, head)
        expected.append((line, 7 + i, head, ("j", i)))
    assert lines == expected and (seq, prev) == (11, head)
    assert [json.loads(line)["seq"] for line, *_ in lines] == [7, 8, 9, 10, 11]


def test_a_full_queue_counts_what_it_drops(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    release = threading.Event()
    real = AuditLog._write_lines

    def stuck(self, batch):
        release.wait(10)
        real(self, batch)

    monkeypatch.setattr(AuditLog, "_write_lines", stuck)
    log = AuditLog(path, queue_size=10, batch_size=1)
    log.emit(event(0))
    time.sleep(0.05)  # the writer takes event 0 and hangs
    for i in range(1, 31):
        log.emit(event(i))
    assert log.dropped == 20 and log.lost == 20 and log.queued == 10
    release.set()
    log.close()
    assert log.written == 11 and verify(path).ok


def test_failed_writes_are_undone_counted_and_retried(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.emit(event(0))
    assert log.drain()
    real_write, failures = os.write, []

    def flaky(fd, data):
        if len(failures) < 3:
            failures.append(1)
            real_write(fd, bytes(data)[:17])  # a partial line, then the disk fills up
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", flaky)
    for i in range(1, 6):
        log.emit(event(i))
    log.close()
    assert log.write_errors == 3 and log.lost == 0 and log.written == 6
    result = verify(path)
    assert result.ok and result.lines == 6


def test_a_disk_that_never_recovers_loses_the_events_at_close_and_counts_them(
    tmp_path, monkeypatch
):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, close_timeout=0.2)
    log.emit(event(0))
    assert log.drain()

    def broken(fd, data):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_module.os, "write", broken)
    for i in range(1, 4):
        log.emit(event(i))
    log.close()
    assert log.written == 1 and log.failed == 3 and log.lost == 3 and log.write_errors >= 3
    assert verify(path).ok


def test_events_after_close_are_counted_as_lost(tmp_path):
    log = write(tmp_path / "audit.jsonl", [event(0)])
    log.emit(event(1))
    assert log.lost == 1
    log.close()  # idempotent
