"""The audit log's retention and failure model: rotation keeps every file and never
overwrites one, `verify` checks a rotated set as one chain and names a missing file,
a budget or a failing open makes the log unwritable (never deletes), the writer
recovers and writes what it held, and the gate refuses new connections meanwhile."""

from __future__ import annotations

import errno
import json
import os
import resource
import time

import pytest
from forked import run_forked
from sandgate.enforcer.cli import main
from sandgate.proxy.gateway import audit_hold
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry import audit as audit_module
from sandgate.proxy.telemetry.audit import AuditLog, log_files, rotated_files, verify
from sandgate.proxy.telemetry.event import Event, EventKind
from support.fakes import make_gate


def event(i: int, detail: str = "x" * 200) -> Event:
    return Event(
        kind=EventKind.REQUEST,
        verdict=Verdict.ALLOW,
        reason=Reason.RULE_ALLOW,
        rule_id="allowed",
        name="allowed.test",
        method="GET",
        path=f"/{i}",
        detail=detail,
    )


def first_seq(path) -> int:
    with open(path, "rb") as f:
        return json.loads(f.readline())["seq"]


def rotated_log(path, count: int, **options) -> list:
    """`count` events written to a log at `path` rotating at 4000 bytes; its files."""
    log = AuditLog(path, max_bytes=4000, **options)
    for i in range(count):
        log.emit(event(i))
    log.close()
    return log_files(path)


def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {check}")
        time.sleep(0.01)
    return value


# --- rotation keeps everything ---------------------------------------------------------------


def test_a_flood_of_events_cannot_push_the_first_line_out_of_existence(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=4000)
    log.emit(event(0, detail="the evidence"))
    for i in range(1, 2000):  # ~700 KB: 170-odd rotations
        log.emit(event(i))
    log.close()
    files = log_files(path)
    assert len(files) > 150
    # Each rotated file is named for the seq of its first line, and none was deleted.
    for rotated in rotated_files(path):
        assert int(rotated.name.rsplit(".", 1)[1]) == first_seq(rotated)
    assert files[0].name == "audit.jsonl.1"
    assert json.loads(files[0].read_bytes().splitlines()[0])["detail"] == "the evidence"
    result = verify(*files)
    assert result.ok and result.lines == 2000 and result.starts_fresh and result.last_seq == 2000


def test_verify_names_the_rotated_file_that_is_missing(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    files = rotated_log(path, 200)
    removed = files[3]
    removed.unlink()
    result = verify(*log_files(path))
    assert not result.ok and result.file == str(files[4]) and result.line == 1
    assert f"a rotated file, {removed.name}, was removed" in result.problem
    # The CLI takes FILE alone and checks its whole rotated set.
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert removed.name in out and "BROKEN" in out


def test_verify_of_one_file_checks_its_rotated_set(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 100)
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(log_files(path))} files" in out and "100 lines, seq 1..100" in out


def test_an_existing_rotated_name_is_never_overwritten(tmp_path):
    path = tmp_path / "audit.jsonl"
    planted = tmp_path / "audit.jsonl.1"
    log = AuditLog(path, max_bytes=1000)
    planted.write_text("someone else's file\n")  # where the first rotation would go
    try:
        for i in range(10):
            log.emit(event(i))
        eventually(lambda: not log.writable)
        assert "exists" in log.problem
        assert planted.read_text() == "someone else's file\n"
        planted.rename(tmp_path / "elsewhere")  # the admin moves it away
        assert log.drain()
        assert log.writable
    finally:
        log.close()
    assert log.lost == 0 and log.written == 10
    assert verify(*log_files(path)).ok


def test_a_fresh_file_next_to_rotated_ones_continues_their_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 50)
    path.rename(tmp_path / "shipped.jsonl")  # the live file went to the SIEM
    log = AuditLog(path, max_bytes=4000)
    for i in range(50, 100):
        log.emit(event(i))
    log.close()
    files = log_files(path)
    rotated_before = sum(1 for f in files[:-1] if first_seq(f) < 50)
    assert rotated_before >= 1 and len({f.name for f in files}) == len(files)
    # The new lines chain on from the newest rotated file: one chain, names unique
    # (the shipped file's lines are a branch of it, kept with the SIEM).
    result = verify(*files)
    assert result.ok and result.starts_fresh


# --- the budget -----------------------------------------------------------------------


def test_a_full_budget_makes_the_log_unwritable_and_deletes_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=4000, max_total_bytes=30_000)
    try:
        for i in range(100):  # ~35 KB: more than the budget
            log.emit(event(i))
        eventually(lambda: not log.writable)
        assert "budget" in log.problem
        held = log.written
        assert held < 100 and log.write_errors >= 1 and log.lost == 0
        before = {p.name: p.read_bytes() for p in log_files(path)}
        time.sleep(0.3)  # retries: nothing rotated away, nothing deleted
        assert {p.name: p.read_bytes() for p in log_files(path)} == before
        assert sum(len(b) for b in before.values()) <= 30_000
        shipped = tmp_path / "shipped"
        shipped.mkdir()
        for rotated in rotated_files(path):  # the admin ships the rotated files
            rotated.rename(shipped / rotated.name)
        assert log.drain()
        assert log.writable and log.problem is None
    finally:
        log.close()
    assert log.written == 100 and log.lost == 0
    result = verify(*sorted(shipped.iterdir(), key=lambda p: int(p.suffix[1:])), *log_files(path))
    assert result.ok and result.lines == 100


def test_a_stray_name_with_a_non_ascii_digit_is_not_a_rotated_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.\u00b2").write_text("a stray file\n")  # '²'.isdigit() is True
    log = AuditLog(path, max_bytes=4000, max_total_bytes=1_000_000)
    try:
        for i in range(30):  # rotates: the budget counts the rotated files each time
            log.emit(event(i))
        assert log.drain() and log.writable
    finally:
        log.close()
    assert log.written == 30 and log.lost == 0
    assert "audit.jsonl.\u00b2" not in {f.name for f in log_files(path)}
    assert verify(*log_files(path)).ok


def test_a_fifo_or_a_directory_named_as_a_rotated_file_is_not_one(tmp_path):
    path = tmp_path / "audit.jsonl"
    rotated_log(path, 30)
    os.mkfifo(tmp_path / "audit.jsonl.7")  # read as a log file, verify waited forever
    (tmp_path / "audit.jsonl.5").mkdir()
    assert {f.name for f in log_files(path)}.isdisjoint({"audit.jsonl.7", "audit.jsonl.5"})
    assert main(["audit", "verify", str(path)]) == 0


def test_an_unexpected_error_in_a_write_holds_the_events_and_refuses_connections(
    tmp_path, monkeypatch
):
    """A bug in the writer must fail closed: the log unwritable (the gate refuses new
    connections), the lines held and retried, none counted as written or dropped."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=100_000)
    real_write_all, broken = log._write_all, [True]

    def buggy(data):
        if broken[0]:
            raise ValueError("a bug")
        return real_write_all(data)

    monkeypatch.setattr(log, "_write_all", buggy)
    try:
        for i in range(10):
            log.emit(event(i))
        eventually(lambda: not log.writable)
        assert "a bug" in log.problem and log.written == 0 and log.lost == 0
        broken[0] = False
        assert log.drain() and log.writable
    finally:
        log.close()
    assert log.written == 10 and log.lost == 0
    assert verify(*log_files(path)).ok


# --- failures: never stops, never deletes ------------------------------------------------------


def test_a_failing_open_at_rotation_renames_nothing_and_is_retried(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000)
    real_open, failures = os.open, []

    def no_descriptors(file, flags, mode=0o777, **kw):
        if str(file).endswith(".new") and len(failures) < 5:
            failures.append(file)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(file, flags, mode, **kw)

    monkeypatch.setattr(audit_module.os, "open", no_descriptors)
    try:
        for i in range(30):
            log.emit(event(i))
        assert log.drain()
    finally:
        log.close()
    assert len(failures) == 5 and log.write_errors >= 5
    assert log.written == 30 and log.lost == 0 and log.writable
    result = verify(*log_files(path))
    assert result.ok and result.lines == 30 and result.starts_fresh


def _exhaust_descriptors_then_recover(directory: str) -> dict:
    """In a forked child: a real RLIMIT_NOFILE, filled up while the writer must rotate."""
    path = os.path.join(directory, "audit.jsonl")
    log = AuditLog(path, max_bytes=2000, flush_interval=0.01)
    # Room for a few more than are open now (the child inherits pytest's), then none.
    limit = max(int(name) for name in os.listdir("/proc/self/fd")) + 8
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    hogs = []
    try:
        while True:
            hogs.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE
    for i in range(40):  # several rotations' worth
        log.emit(event(i))
    deadline = time.monotonic() + 5
    while log.writable and time.monotonic() < deadline:
        time.sleep(0.01)
    blocked = not log.writable
    problem = log.problem
    for fd in hogs:
        os.close(fd)
    drained = log.drain()
    log.close()
    return {
        "blocked": blocked,
        "problem": problem,
        "drained": drained,
        "written": log.written,
        "lost": log.lost,
        "writable": log.writable,
    }


def test_descriptors_exhausted_at_rotation_the_writer_holds_then_writes_everything(tmp_path):
    child = run_forked(_exhaust_descriptors_then_recover, str(tmp_path))
    assert child.exit_code == 0, child
    got = child.value
    assert got["blocked"] and "open files" in got["problem"].lower(), got
    assert (got["drained"], got["written"], got["lost"], got["writable"]) == (True, 40, 0, True)
    path = tmp_path / "audit.jsonl"
    result = verify(*log_files(path))
    assert result.ok and result.lines == 40 and result.starts_fresh
    assert not list(tmp_path.glob("*.new.*"))


# --- the gate refuses new connections while the log cannot be written ---------------------------


class FakeAudit:
    writable = True
    problem: str | None = None


# --- FILE moved or deleted under the writer (logrotate without copytruncate, rm) -------------


def write_some(log: AuditLog, numbers) -> None:
    for i in numbers:
        log.emit(event(i))
    assert log.drain()


def test_a_log_moved_away_while_written_goes_on_in_a_new_file(tmp_path):
    path, moved = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl-20260101"
    log = AuditLog(path)
    write_some(log, range(5))
    os.rename(path, moved)  # logrotate's rename; the writer still holds the old file
    write_some(log, range(5, 9))
    log.close()
    # Before: the 4 later lines went into the moved file and no FILE existed.
    assert len(moved.read_bytes().splitlines()) == 5
    assert first_seq(path) == 6 and verify(path).ok and verify(path).lines == 4
    whole = verify(moved, path)
    assert whole.ok and whole.lines == 9 and whole.starts_fresh and log.lost == 0


def test_a_log_deleted_while_written_loses_only_what_was_in_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    write_some(log, range(5))
    os.unlink(path)  # the writer's descriptor now appends to a file nobody can read
    write_some(log, range(5, 9))
    log.close()
    result = verify(path)
    assert result.ok and result.lines == 4 and (result.first_seq, result.last_seq) == (6, 9)
    assert not result.starts_fresh  # verify says earlier lines are elsewhere, or were removed


def test_a_log_deleted_just_before_a_write_has_that_batch_written_again(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    write_some(log, range(2))
    real_write_all, deletions = log._write_all, []

    def deleted_first(data):
        if not deletions:
            deletions.append(1)
            os.unlink(path)  # between the writer's look at FILE and its write
        real_write_all(data)

    monkeypatch.setattr(log, "_write_all", deleted_first)
    write_some(log, range(2, 5))
    log.close()
    result = verify(path)
    assert result.ok and (result.first_seq, result.last_seq, result.lines) == (3, 5, 3)
    assert log.write_errors == 1 and log.lost == 0


def test_a_foreign_file_put_in_place_of_the_log_is_not_appended_to(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    write_some(log, range(2))
    os.unlink(path)
    path.write_text("someone else's file\n")
    for i in range(2, 4):
        log.emit(event(i))
    eventually(lambda: not log.writable)  # so new connections are refused meanwhile
    assert "replaced by another file" in log.problem
    assert path.read_text() == "someone else's file\n"
    path.unlink()  # moved away: the held events are written
    eventually(lambda: log.writable and log.written == 4)
    log.close()
    result = verify(path)
    assert result.ok and (result.first_seq, result.last_seq) == (3, 4) and log.lost == 0


def test_new_connections_are_refused_while_the_audit_log_cannot_be_written(tmp_path):
    gate = make_gate(tmp_path)
    audit = FakeAudit()
    gate.hold_new = audit_hold(audit)
    open_before = gate.on_connect(("k", 1), "10.213.0.2", 40000, "203.0.113.10", 443)
    assert open_before is not None
    audit.writable, audit.problem = False, "No space left on device"
    assert gate.on_connect(("k", 2), "10.213.0.2", 40001, "203.0.113.10", 443) is None
    denied = gate.events[-1]
    assert (denied.verdict, denied.reason, denied.rule_id) == (
        Verdict.DENY,
        Reason.AUDIT_UNAVAILABLE,
        "builtin:audit-unavailable",
    )
    assert "No space left" in denied.detail
    # The connection admitted before goes on; once the log works, new ones pass again.
    assert gate.connections[("k", 1)] is open_before
    audit.writable, audit.problem = True, None
    assert gate.on_connect(("k", 3), "10.213.0.2", 40002, "203.0.113.10", 443) is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--audit-budget", "lots"], "expected a size", id="bad-budget"),
        pytest.param(["--on-audit-failure", "ignore"], "invalid choice", id="bad-mode"),
    ],
)
def test_bad_audit_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *argv, "--", "true"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
