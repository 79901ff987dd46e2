"""The audit writer and the state files against a misbehaving disk, where the fault
can be injected in process: a FIFO or device given as the log, the live file
truncated under the writer (logrotate's copytruncate), a write that blocks, an
`always` approval whose rule cannot be written. The end-to-end side (real full and
read-only file systems under `sandgate run`) is tests/e2e/test_audit_disk.py."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from sandgate.enforcer.approvals_control import always_writer, handle
from sandgate.proxy.approvals import overlay as overlay_module
from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.approvals.pending import AskKey
from sandgate.proxy.gateway import audit_hold
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry import audit as audit_module
from sandgate.proxy.telemetry.audit import AuditLog, AuditLogError, log_files, verify
from sandgate.proxy.telemetry.event import Event, EventKind
from support.sandbox import eventually


def event(i: int) -> Event:
    return Event(
        kind=EventKind.CONNECTION,
        verdict=Verdict.ALLOW,
        reason=Reason.RULE_ALLOW,
        rule_id="allowed",
        name="allowed.test",
        dst_ip="203.0.113.10",
        dst_port=443,
        detail=f"event {i} " + "x" * 100,
    )


def emit(log: AuditLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        log.emit(event(i))


def test_a_fifo_as_the_log_is_refused_and_gets_no_byte(tmp_path):
    """A FIFO nobody reads took 64 KiB, then blocked the writer for good while the log
    still counted as writable (connections allowed, their events never written) and
    `close` waited forever."""
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(AuditLogError, match="not a regular file"):
            AuditLog(fifo)
        assert os.read(reader, 1) == b""  # no writer left, and nothing written into it
    finally:
        os.close(reader)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_a_device_as_the_log_is_refused(device):
    """/dev/null took every line and kept none: a log that records nothing, writable."""
    with pytest.raises(AuditLogError, match="not a regular file") as caught:
        AuditLog(device)
    assert "\n" not in str(caught.value)


def test_a_kernel_setting_as_the_log_is_refused_and_left_as_it_was():
    """/proc and /sys show the kernel's settings as regular files: `--audit-log
    /proc/sys/kernel/hostname` set the host's name to each audit line in turn. (This
    test's own name, /proc/PID/comm, stands for the settings a test must not change.)"""
    comm = Path(f"/proc/{os.getpid()}/comm")
    before = comm.read_text()
    with pytest.raises(AuditLogError, match=r"is on proc, the kernel's settings, not a file"):
        AuditLog(comm)
    assert comm.read_text() == before


def test_a_log_truncated_under_the_writer_then_a_failed_write_leaves_no_hole(tmp_path, monkeypatch):
    """copytruncate: the live file copied, then cut to 0 under the writer. The writer's
    undo of a failed write used to truncate back to its old idea of the size, which
    extends the file with NUL bytes up to it and glues the next line to them: that
    line was lost for `verify` ("not an audit record")."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, flush_interval=0.01)
    emit(log, 0, 50)
    assert log.drain()
    shutil.copy(path, tmp_path / "audit.jsonl.copy")
    os.truncate(path, 0)
    real_write, failures = os.write, []

    def full_once(fd, data):
        if not failures:
            failures.append(1)
            real_write(fd, bytes(data)[:17])  # a partial line, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", full_once)
    emit(log, 50, 10)
    log.close()
    assert failures and log.write_errors == 1 and log.lost == 0
    data = path.read_bytes()
    assert b"\0" not in data and len(data) < 10 * 500  # no hole up to the old 22 kB
    assert os.stat(path).st_blocks * 512 < 16 * 1024
    result = verify(path)
    assert result.ok and (result.first_seq, result.last_seq) == (51, 60)
    # The copy and the live file are one chain.
    assert verify(tmp_path / "audit.jsonl.copy", path).ok


def test_a_log_truncated_under_the_writer_rotates_by_its_real_size_and_first_line(tmp_path):
    """After copytruncate the writer rotated by the old size (early) and named the
    rotated file after the seq of the old first line: FILE.1, the very name logrotate
    gives its copy, which then blocked rotation for good ("exists; move it away")."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=6000, flush_interval=0.01)
    emit(log, 0, 30)  # FILE.1 + FILE
    assert log.drain()
    files = log_files(path)
    copy = path.with_name("audit.jsonl.copy")
    shutil.copy(path, copy)
    os.truncate(path, 0)
    emit(log, 30, 30)
    log.close()
    assert log.lost == 0 and log.write_errors == 0
    rotated = log_files(path)[len(files) - 1 :]
    assert len(rotated) >= 2
    # Each rotated file is named after its own first line, and the whole series,
    # with the copy in its place, is one intact chain.
    for f in rotated[:-1]:
        first = int(f.name.rsplit(".", 1)[1])
        assert f'"seq":{first},'.encode() in f.read_bytes().split(b"\n", 1)[0]
    assert verify(*files[:-1], copy, *rotated).ok


def test_a_write_that_blocks_makes_the_log_unwritable_until_it_returns(tmp_path, monkeypatch):
    """A hung disk (or network file system) blocks `write` without an error: the log
    counted as writable, so new connections passed while nothing reached the disk."""
    path = tmp_path / "audit.jsonl"
    release = threading.Event()
    real = AuditLog._write_all

    def hung(self, data):
        release.wait(10)
        real(self, data)

    log = AuditLog(path, flush_interval=0.01, stall_timeout=0.2)
    monkeypatch.setattr(AuditLog, "_write_all", hung)
    hold = audit_hold(log)
    try:
        emit(log, 0, 3)
        assert eventually(lambda: not log.writable)
        assert "blocked" in log.problem
        refusal = hold()
        assert refusal is not None and "blocked" in refusal.detail
        assert not path.read_bytes()  # what the refused connections' evidence would be in
    finally:
        release.set()
    assert eventually(lambda: log.writable and log.written == 3)
    assert hold() is None and log.problem is None
    log.close()
    assert verify(path).ok and log.lost == 0


def test_close_does_not_hang_on_a_write_that_never_returns(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    release = threading.Event()

    def never(self, data):
        release.wait(30)

    log = AuditLog(path, flush_interval=0.01, close_timeout=0.2, stall_timeout=0.2)
    monkeypatch.setattr(AuditLog, "_write_all", never)
    try:
        emit(log, 0, 1)
        assert eventually(lambda: not log.writable)
        emit(log, 1, 4)
        started = time.monotonic()
        log.close()
        assert time.monotonic() - started < 2
        assert log.failed == 4  # the queued ones, counted as lost (and said)
    finally:
        release.set()


def always_approval(overlay, break_disk) -> tuple[dict, list, list]:
    """Ask, break the disk (`break_disk()`), then `approve --always` through the
    control command: (the reply, the approvals still pending, the reloads done)."""
    reloads: list[str] = []

    async def scenario():
        approvals = Approvals(lambda event: None)

        async def reload(actor: str) -> list[str]:
            reloads.append(actor)
            return []

        approvals.on_always = always_writer(overlay, reload)
        ask = AskKey.make(
            task_id="t1", sandbox="10.213.0.2", profile="p", name="pastebin.test", port=443,
            protocol="tls",
        )  # fmt: skip
        held = asyncio.ensure_future(approvals.hold(ask, "r", {}))
        await asyncio.sleep(0.01)
        (pending,) = approvals.list()
        break_disk()
        request = {"cmd": "approve", "id": pending["id"], "scope": "always"}
        reply = await handle(approvals, request, "uid 0 (root)")
        still = approvals.list()
        held.cancel()
        return reply, still

    reply, still = asyncio.run(scenario())
    return reply, still, reloads


def test_an_always_whose_rule_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch):
    """approved.yaml's temporary file cannot be made (here: the disk is full; on a
    read-only disk the same OSError): the approver is told that nothing was approved,
    instead of the control connection dying with a traceback."""
    overlay = tmp_path / "approved.yaml"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    reply, still, reloads = always_approval(
        overlay, lambda: monkeypatch.setattr(overlay_module.tempfile, "mkstemp", full)
    )
    assert reply["ok"] is False and "nothing was approved" in reply["error"]
    assert "\n" not in reply["error"]
    assert len(still) == 1 and still[0]["state"] == "pending"  # not released
    assert not overlay.exists() and not reloads


def test_an_always_whose_rule_cannot_be_flushed_leaves_the_old_file(tmp_path, monkeypatch):
    """EIO at fsync: the rule may never reach the disk, so it is not in force either
    (no reload), the old approved.yaml stays as it was and no temporary file is left."""
    overlay = tmp_path / "approved.yaml"
    overlay.write_text("version: 1\n")

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    reply, still, reloads = always_approval(
        overlay, lambda: monkeypatch.setattr(overlay_module.os, "fsync", eio)
    )
    assert reply["ok"] is False and "Input/output error" in reply["error"]
    assert len(still) == 1 and not reloads
    assert overlay.read_text() == "version: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["approved.yaml"]
