"""The audit log's journal (proxy/telemetry/blackbox.py, AuditLog(journal=...)): what a
killed process took in but had not written is appended by the next one that opens
the log, marked recovered, the chain unbroken; a torn record or an overrun ring is
counted lost and said, never silent.

A kill is played by copying the log and the journal as they are while the writer
holds events (a flush interval of a minute: it writes only when told), then closing
that log (which writes them) and putting the copies back: the files as a SIGKILL at
that moment would have left them.
"""

from __future__ import annotations

import json
import os

import pytest
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry import blackbox
from sandgate.proxy.telemetry.audit import JOURNAL_SIZE, AuditLog, AuditLogError, verify
from sandgate.proxy.telemetry.event import Event, EventKind
from test_audit import event as audit_event

RECOVERED = "recovered from the audit journal"
CUT = "ended by the death of the sandgate process"


def request(i: int, **fields) -> Event:
    """An allowed request /i from its own source port (a connection of its own)."""
    allowed = dict(verdict=Verdict.ALLOW, reason=Reason.RULE_ALLOW, rule_id="web",
                   source=f"10.213.0.2:{40000 + i}", detail=f"request {i}")  # fmt: skip
    return audit_event(i, **{**allowed, **fields})


def killed(tmp_path, written: list[Event], queued: list[Event], journal=None, **kw):
    """The log and journal a process leaves when SIGKILLed after writing `written`
    and taking in `queued` (not yet written). Returns (log path, journal path)."""
    path, journal = tmp_path / "audit.jsonl", journal or tmp_path / "state" / "j.ring"
    log = AuditLog(path, journal=journal, flush_interval=60, batch_size=10**6, **kw)
    for event in written:
        log.emit(event)
    assert log.drain(5)
    for event in queued:
        log.emit(event)
    at_kill = path.read_bytes(), journal.read_bytes()
    log.close()
    assert not journal.exists()  # a clean close leaves no journal to recover
    path.write_bytes(at_kill[0])
    journal.write_bytes(at_kill[1])
    return path, journal


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def reopened(path, journal) -> tuple[AuditLog, list[dict]]:
    log = AuditLog(path, journal=journal)
    log.close()
    return log, records(path)


def test_a_killed_writers_queue_is_appended_by_the_next_open(tmp_path):
    path, journal = killed(
        tmp_path, [request(i) for i in range(3)], [request(i) for i in range(3, 7)]
    )
    assert [r["path"] for r in records(path)] == ["/0", "/1", "/2"]  # the kill lost 4
    log, after = reopened(path, journal)
    assert [r.get("path") for r in after[:7]] == [f"/{i}" for i in range(7)]
    for r in after[3:7]:
        assert r["detail"].startswith(f"request {r['path'][1:]}; {RECOVERED}"), r
    assert all(RECOVERED not in r["detail"] for r in after[:3])
    summary = after[-1]
    assert summary["reason"] == "audit_recovered" and summary["verdict"] == "allow"
    assert "4 events" in summary["detail"] and " 0 lost" in summary["detail"], summary
    assert log.recovered[:2] == (4, 0) and log.lost == 0
    assert verify(path).ok
    # Recovered once: the open after that finds nothing more.
    _, again = reopened(path, journal)
    assert again == after


def test_nothing_queued_at_the_kill_appends_nothing(tmp_path):
    # Requests on one connection (one source) that ended: nothing open, nothing queued.
    same = dict(source="10.213.0.2:40000")
    written = [request(0, **same), request(1, kind=EventKind.CONNECTION_END, **same)]
    path, journal = killed(tmp_path, written, [])
    before = path.read_bytes()
    log, _ = reopened(path, journal)
    assert path.read_bytes() == before and log.recovered is None


def test_each_connection_open_at_the_kill_gets_one_end(tmp_path):
    ended = dict(source="10.213.0.2:50000")
    written = [
        request(0, **ended),
        request(0, kind=EventKind.CONNECTION_END, bytes_up=10, bytes_down=20, **ended),
        request(1),  # open, its start on disk
    ]
    queued = [request(2)]  # open, its start only in the journal
    path, journal = killed(tmp_path, written, queued)
    _, after = reopened(path, journal)
    ends = [r for r in after if r["kind"] == "connection_end"]
    cut = [r for r in ends if CUT in r["detail"]]
    assert sorted(r["source"] for r in cut) == ["10.213.0.2:40001", "10.213.0.2:40002"]
    for end in cut:
        assert "bytes_up" not in end and end["rule_id"] == "web" and end["task_id"] == "t1"
    assert len(ends) == 3  # the one that ended keeps only its own
    assert "2 connections" in after[-1]["detail"]
    assert verify(path).ok


def test_a_torn_record_is_counted_lost_and_said(tmp_path):
    path, journal = killed(tmp_path, [request(0)], [request(i) for i in range(1, 4)])
    ring = bytearray(journal.read_bytes())
    last = ring.rfind(b'"path":"/3"')
    ring[last + 9] ^= 0xFF  # the kill mid-write: the last record's crc fails
    journal.write_bytes(ring)
    log, after = reopened(path, journal)
    recovered = [r for r in after if RECOVERED in r.get("detail", "")]
    assert [r["path"] for r in recovered] == ["/1", "/2"]
    summary = after[-1]
    assert summary["verdict"] == "deny" and " 1 lost" in summary["detail"], summary
    assert log.lost == 1  # sandgate_audit_events_lost_total
    assert verify(path).ok


def test_an_overrun_ring_is_counted_lost(tmp_path):
    # A ring of 8 KiB holds a dozen of these records: a writer 40 behind overran it.
    size = blackbox.HEADER_SIZE + 8192
    queued = [request(i, detail="x" * 400) for i in range(1, 41)]
    path, journal = killed(tmp_path, [request(0)], queued, journal_size=size)
    log, after = reopened(path, journal)
    recovered = [r for r in after if RECOVERED in r.get("detail", "")]
    assert 0 < len(recovered) < 40
    # The newest survive, in order; what was written over is counted.
    assert [r["path"] for r in recovered] == [f"/{i}" for i in range(41 - len(recovered), 41)]
    assert log.recovered[:2] == (len(recovered), 40 - len(recovered))
    assert log.lost == 40 - len(recovered)
    assert f" {40 - len(recovered)} lost" in after[-1]["detail"]
    assert verify(path).ok


def test_the_written_mark_never_passes_a_record_not_confirmed():
    buffer = bytearray(blackbox.HEADER_SIZE + 8192)
    blackbox.blank(buffer)
    box = blackbox.BlackBox(buffer)
    ends = []
    for i in range(5):
        box.write(b"r%d" % i)
        ends.append((box.pos, box.stream))
    box.confirm(2, *ends[1])  # the writer: records 1 and 2 on disk
    assert blackbox.written(buffer) == 2
    # The mark itself moves at the loop's next write; recovery skips by `written`.
    found = blackbox.recover(buffer, blackbox.written(buffer))
    assert found.payloads == [b"r2", b"r3", b"r4"] and found.lost == 0
    box.write(b"r5")
    found = blackbox.recover(buffer, blackbox.written(buffer))
    assert found.payloads == [b"r2", b"r3", b"r4", b"r5"] and found.lost == 0


@pytest.mark.parametrize("garbage", [b"", b"\0" * 10_000, b"not a ring" * 1000])
def test_a_journal_that_is_none_is_started_afresh(tmp_path, garbage):
    path, journal = tmp_path / "audit.jsonl", tmp_path / "j.ring"
    journal.write_bytes(garbage)
    log = AuditLog(path, journal=journal)
    log.emit(request(0))
    log.close()
    assert [r["path"] for r in records(path)] == ["/0"] and log.recovered is None


def test_gc_appends_a_journal_no_process_holds(tmp_path, monkeypatch):
    from sandgate.enforcer import run as run_module

    monkeypatch.setattr(run_module, "STATE_DIR", tmp_path / "state")
    journal = run_module.audit_journal(tmp_path / "audit.jsonl")
    path, _ = killed(tmp_path, [request(0)], [request(1)], journal=journal)
    assert run_module._left_journals() == []  # it names no log: not its to touch
    journal.with_suffix(".log").write_text(str(path))  # as the killed process left it
    held = AuditLog(tmp_path / "other.jsonl", journal=journal.with_name("other.ring"))
    try:
        # A journal whose log a live process holds is left alone.
        assert run_module._left_journals() == [(journal, path)]
    finally:
        held.close()
    run_module._append_left_journal(journal, path)
    assert [r.get("path") for r in records(path)[:2]] == ["/0", "/1"]
    assert RECOVERED in records(path)[1]["detail"]
    assert not journal.exists() and not journal.with_suffix(".log").exists()
    assert run_module._left_journals() == []


def test_gc_takes_no_journal_of_a_run_that_ended_after_it_looked(tmp_path, monkeypatch):
    """gc found a live run's journal, then, the run having ended meanwhile (its journal
    removed, its lock let go), got the lock: it took the journal for a killed run's
    and said it removed one (test_run_storm, once in many runs). Nothing was lost, but
    gc's word was false. What it finds is looked at again once the lock is its own."""
    import fcntl

    from sandgate.enforcer import run as run_module

    monkeypatch.setattr(run_module, "STATE_DIR", tmp_path / "state")
    path = tmp_path / "audit.jsonl"
    journal = run_module.audit_journal(path)
    log = AuditLog(path, journal=journal)  # a live run: its log locked, its journal there
    log.emit(request(0))

    class RunEndsFirst:  # the run ends between gc's look at the journals and its lock
        def flock(self, fd, how):
            log.close()
            return fcntl.flock(fd, how)

        def __getattr__(self, name):
            return getattr(fcntl, name)

    monkeypatch.setattr(run_module, "fcntl", RunEndsFirst())
    assert run_module._left_journals() == []
    assert not journal.exists()
    assert [r["path"] for r in records(path)] == ["/0"]


def test_a_closed_logs_journal_is_gone_before_its_lock(tmp_path, monkeypatch):
    """`sandgate gc` appends a journal whose log no process locks (a killed one's): the
    journal goes while the log is still locked. Unlinked after the lock, a gc between
    the two took an ending run's journal for a killed run's (test_run_storm: ~1 in 15)."""
    path, journal = tmp_path / "audit.jsonl", tmp_path / "j.ring"
    log = AuditLog(path, journal=journal)
    log.emit(request(0))
    seen = []
    real_close = os.close

    def close(fd: int) -> None:
        if fd == log._fd:
            seen.append((journal.exists(), journal.with_suffix(".log").exists()))
        real_close(fd)

    monkeypatch.setattr(os, "close", close)
    log.close()
    assert seen == [(False, False)]
    assert [r["path"] for r in records(path)] == ["/0"]


def outage_at_close(tmp_path, count: int, journal=None):
    """A log whose `--audit-budget` runs out after a few of `count` ends of connections
    (the same failing write as a full disk), then closed: it gives up on the rest.
    Returns (log path, journal path, the closed log)."""
    path, journal = tmp_path / "audit.jsonl", journal or tmp_path / "state" / "j.ring"
    log = AuditLog(path, journal=journal, max_total_bytes=2000, close_timeout=0.3)
    for i in range(count):
        log.emit(request(i, kind=EventKind.CONNECTION_END, bytes_up=10**9))
    log.close()
    return path, journal, log


def test_events_given_up_at_close_stay_in_the_journal_for_the_next_open(tmp_path):
    """rt47 F4: a clean close during an outage gave up on the queued events and then
    deleted the journal that held them: a task that filled the disk (or the budget)
    and exited lost its last events for good, where a SIGKILL loses none. The journal
    is kept; the next open appends them, says who left them, and removes it."""
    path, journal, log = outage_at_close(tmp_path, 20)
    assert log.given_up > 0 and len(records(path)) + log.given_up == 20
    assert journal.exists() and journal.with_suffix(".log").read_text() == str(path)
    # Kept, it costs its records' blocks, not all of JOURNAL_SIZE (16 MiB; found by
    # the second red team: one a run that ended in an outage, with no bound).
    assert journal.stat().st_size == JOURNAL_SIZE and journal.stat().st_blocks * 512 < 1 << 20

    again, after = reopened(path, journal)
    assert [r["path"] for r in after[:20]] == [f"/{i}" for i in range(20)]
    recovered = after[20 - log.given_up : 20]
    assert all("of a sandgate process that stopped while it could not write" in r["detail"]
               for r in recovered)  # fmt: skip
    note, summary = after[20], after[21]
    assert note["reason"] == "audit_unavailable" and "gave up on the" in note["detail"]
    assert summary["reason"] == "audit_recovered" and "stopped while" in summary["detail"]
    assert "killed" not in summary["detail"] and not any(CUT in r["detail"] for r in after)
    assert again.recovered == (log.given_up + 1, 0, 0)
    assert verify(path).ok and not journal.exists()


def test_gc_appends_what_a_closed_log_gave_up_on(tmp_path, monkeypatch):
    from sandgate.enforcer import run as run_module

    monkeypatch.setattr(run_module, "STATE_DIR", tmp_path / "state")
    journal = run_module.audit_journal(tmp_path / "audit.jsonl")
    path, _, log = outage_at_close(tmp_path, 10, journal)
    assert run_module._left_journals() == [(journal, path)]
    run_module._append_left_journal(journal, path)
    assert [r.get("path") for r in records(path)[:10]] == [f"/{i}" for i in range(10)]
    assert not journal.exists() and run_module._left_journals() == []


def test_a_journal_the_next_open_cannot_append_either_is_kept(tmp_path):
    """The class at the next open: a journal whose events could not be appended (the
    disk still full, a budget) was started afresh over them. The open fails, saying
    so, and keeps the journal (and a worker's black box) for one that can."""
    path, journal, log = outage_at_close(tmp_path, 10)
    box = journal.with_name(f"{journal.stem}.worker-0.ring")
    box.write_bytes(b"\0" * (blackbox.HEADER_SIZE + 4096))
    ring = bytearray(box.read_bytes())
    blackbox.blank(ring)
    blackbox.BlackBox(ring).write(b'"kind":"dns","verdict":"deny","reason":"no_rule"')
    box.write_bytes(ring)
    kept = journal.read_bytes()
    with pytest.raises(AuditLogError, match="they stay in its audit journal"):
        AuditLog(path, journal=journal, max_total_bytes=2000, close_timeout=0.3)
    assert journal.read_bytes() == kept and box.exists()
    _, after = reopened(path, journal)
    assert [r.get("path") for r in after[:10]] == [f"/{i}" for i in range(10)]
    assert any(r["kind"] == "dns" and RECOVERED not in r["detail"] for r in after)
    assert not journal.exists() and not box.exists()


def test_a_connection_whose_end_the_rate_limit_took_gets_no_made_up_end_after_a_kill(tmp_path):
    """rt47 F5, through the log: a task past its audit budget, its connections' lines
    as the rate limit let them through, the process killed with all of them written;
    the next open gives no connection that ended an end "while open"."""
    from sandgate.proxy.telemetry.flood import FloodControl, FloodLimits

    flood = FloodControl(FloodLimits(rate=0.001, burst=3, interval=1.0), clock=lambda: 0.0)
    ports = (41000, 41001, 41002)
    events = [audit_event(i) for i in range(3)]  # denied: the budget, spent
    for port in ports:
        start = request(port - 40000, kind=EventKind.CONNECTION, name="api.example")
        events += [start, start.with_fields(kind=EventKind.CONNECTION_END, bytes_up=5)]
    lines = [line for event in events for line in flood.admit(event)[0]] + flood.drain()
    assert any(line.suppressed for line in lines)
    path, journal = killed(tmp_path, lines, [])
    _, after = reopened(path, journal)
    assert not [r for r in after if CUT in r.get("detail", "")]


DEEP = b"[" * 5000  # json.loads raised RecursionError on it: a traceback at the open


def test_a_deeply_nested_connection_line_is_not_followed_and_the_open_goes_on(tmp_path):
    path, journal = killed(tmp_path, [request(0), request(1)], [request(2)])
    first, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(first + b"\n" + b'{"kind":"connection_start","x":' + DEEP + b"\n" + rest)
    log = AuditLog(path, journal=journal)
    log.close()
    after = [json.loads(line) for line in path.read_bytes().splitlines() if DEEP not in line]
    assert [r["path"] for r in after if RECOVERED in r.get("detail", "")] == ["/2"]
    assert log.recovered[:2] == (1, 0)
    assert [b.line for b in verify(path).breaks] == [2]  # the line put in, only


def test_a_deeply_nested_first_line_is_no_first_seq(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.emit(request(0))
    log.close()
    path.write_bytes(DEEP + b"\n" + path.read_bytes())
    log = AuditLog(path)
    log.close()
    assert log.file_first_seq is None


def test_a_deeply_nested_journal_record_is_counted_lost(tmp_path):
    path, journal = tmp_path / "audit.jsonl", tmp_path / "j.ring"
    ring = bytearray(blackbox.HEADER_SIZE + 65536)  # a record of up to 16 KiB
    blackbox.blank(ring)
    blackbox.BlackBox(ring).write(b'"x":' + DEEP)
    journal.write_bytes(ring)
    log = AuditLog(path, journal=journal)
    log.close()
    assert log.recovered[:2] == (0, 1) and log.lost == 1
    assert " 1 lost" in records(path)[-1]["detail"]


@pytest.mark.parametrize("planted", ["fifo", "link"])
def test_gc_neither_waits_on_nor_follows_what_was_put_in_place_of_the_log(
    tmp_path, monkeypatch, planted
):
    """`sandgate gc` locks a journal's log to see whether a process holds it: a FIFO
    put there (by a shipper who may write the directory) hung it, a link was followed.
    The journal is left for an open that can append it; gc goes on."""
    from sandgate.enforcer import run as run_module

    monkeypatch.setattr(run_module, "STATE_DIR", tmp_path / "state")
    journal = run_module.audit_journal(tmp_path / "audit.jsonl")
    path, _ = killed(tmp_path, [request(0)], [request(1)], journal=journal)
    journal.with_suffix(".log").write_text(str(path))
    path.rename(tmp_path / "moved.jsonl")
    if planted == "fifo":
        os.mkfifo(path)
        assert run_module._left_journals() in ([], [(journal, path)])  # and returned
    else:
        path.symlink_to(tmp_path / "moved.jsonl")
        assert run_module._left_journals() == []
    assert journal.exists()
