"""The audit log's writer process (proxy/telemetry/audit_process.py): the same lines
as the writer thread; nothing lost or written twice when the process or the
gateway is killed; the gateway still sees a failing or blocked write; the process
holds none of the gateway's descriptors and ignores the terminal's signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sandgate.proxy.telemetry import audit as audit_module
from sandgate.proxy.telemetry import blackbox
from sandgate.proxy.telemetry.audit import AuditLog, rotated_files, verify
from test_audit import event

COUNT = 20_000


def details(*paths) -> list[str]:
    return [json.loads(line)["detail"] for p in paths for line in p.read_bytes().splitlines()]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started(tmp_path, **settings) -> AuditLog:
    """A log whose writer process runs (started at the first full batch: of one)."""
    log = AuditLog(tmp_path / "audit.jsonl", writer_process=True, batch_size=1, **settings)
    log.emit(event(0))
    wait_for(lambda: log._process is not None)
    comm = Path(f"/proc/{log._process.pid}/comm")
    # In ps and top, and what bench/proctree.py looks for.
    wait_for(lambda: comm.read_text().strip() == "sandgate-audit")
    return log


def test_a_quiet_log_has_no_process(tmp_path):
    """Fewer events than a batch within the flush interval: the thread writes them
    (a run's start does not pay for a fork)."""
    log = AuditLog(tmp_path / "audit.jsonl", writer_process=True, flush_interval=0.01)
    for i in range(10):
        log.emit(event(i))
    assert log.drain(5)
    assert log._process is None and log.written == 10
    log.close()


def test_the_process_writes_the_lines_the_thread_writes(tmp_path):
    events = [event(i, detail=f"e{i}", time=1.0) for i in range(COUNT)]
    for mode in (False, True):
        log = AuditLog(tmp_path / f"{mode}.jsonl", journal=tmp_path / f"{mode}.ring",
                       writer_process=mode)  # fmt: skip
        for e in events:
            log.emit(e)
        assert log.drain(20)
        assert (log._process is not None) is mode
        assert log.written == log.seq == COUNT
        journal = log.journal.read_bytes()
        assert blackbox.written(journal) == COUNT  # what is on disk is not recovered again
        pid = log._process and log._process.pid
        log.close()
        if mode:
            assert not alive(pid)  # ended and reaped
    assert (tmp_path / "True.jsonl").read_bytes() == (tmp_path / "False.jsonl").read_bytes()
    assert verify(tmp_path / "True.jsonl").ok


def test_a_killed_process_loses_nothing_and_writes_nothing_twice(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    # Rotation every ~200 lines: the process is killed with FILE rotated under the
    # gateway's own descriptor, which must find FILE (and its lock) again.
    log = AuditLog(path, journal=tmp_path / "j.ring", writer_process=True, max_bytes=100_000)
    for i in range(COUNT):
        log.emit(event(i, detail=f"e{i}"))
        if i == COUNT // 2:
            wait_for(lambda: log._process is not None and log.written > 1000)
            pid = log._process.pid
            os.kill(pid, signal.SIGKILL)
    assert log.drain(20)
    assert log._process is None
    log.close()
    files = [*rotated_files(path), path]
    assert verify(*files).ok
    assert details(*files) == [f"e{i}" for i in range(COUNT)]
    assert log.written == COUNT and log.lost == 0
    assert f"the audit writer process (pid {pid}) ended (killed by signal 9" in caplog.text


def test_a_process_killed_in_the_middle_of_a_batch_writes_nothing_twice(tmp_path, caplog):
    """A FILE of ~3 lines: each batch is written in ~40 writes, between rotations. The
    process is SIGKILLed until one kill lands in the middle of a batch (the first
    does, nearly always): the thread finds those lines on disk, writes the rest of the
    batch, and goes on."""
    for attempt in range(10):
        path = tmp_path / str(attempt) / "audit.jsonl"
        path.parent.mkdir()
        log = AuditLog(path, writer_process=True, max_bytes=1_500)
        count = 600
        for i in range(count):
            log.emit(event(i, detail=f"e{i}"))
            if i == 300:
                wait_for(lambda: log._process is not None and log.written > 0)  # noqa: B023
                os.kill(log._process.pid, signal.SIGKILL)
        assert log.drain(30)
        log.close()
        files = [*rotated_files(path), path]
        assert verify(*files).ok
        assert details(*files) == [f"e{i}" for i in range(count)]
        assert log.written == count and log.lost == 0
        found = re.search(r"(\d+) lines of its last batch of (\d+) are on disk", caplog.text)
        assert found, caplog.text
        if 0 < int(found[1]) < int(found[2]):
            return
        caplog.clear()
    raise AssertionError("no kill landed in the middle of a batch in 10 attempts")


GATEWAY = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_audit import event
from sandgate.proxy.telemetry.audit import AuditLog
log = AuditLog(Path({path!r}), journal=Path({journal!r}), writer_process=True)
for i in range({count}):
    log.emit(event(i, detail=f"e{{i}}"))
while log._process is None:  # forked at the first full batch
    time.sleep(0.01)
print(log._process.pid if log._process else 0, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_gateways_events_are_each_in_the_log_once(tmp_path):
    """The gateway dies with batches sent to the process and events it had not sent:
    the process writes what it has and lets go of FILE; the next open appends the
    rest from the journal. Every event once, in order, the chain whole."""
    path, journal = tmp_path / "audit.jsonl", tmp_path / "j.ring"
    script = GATEWAY.format(tests=os.path.dirname(__file__), path=str(path),
                            journal=str(journal), count=COUNT)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    writer = int(done.stdout.split()[0])
    assert writer
    reopened = AuditLog(path, journal=journal)  # waits for the writer to let go
    reopened.close()
    assert not alive(writer)
    found = [d.split(";")[0] for d in details(path) if d.startswith("e")]
    assert found == [f"e{i}" for i in range(COUNT)]
    assert verify(path).ok


def test_a_failing_write_in_the_process_is_seen_by_the_gateway(tmp_path):
    """The audit budget reached: the process's writes fail; the gateway refuses
    (`writable` False, the reason); rotated files shipped away: everything lands, once."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, writer_process=True, max_bytes=20_000, max_total_bytes=60_000,
                   flush_interval=0.01)  # fmt: skip
    for i in range(300):
        log.emit(event(i, detail=f"e{i}"))
    wait_for(lambda: not log.writable)
    assert log._process is not None
    assert "audit budget" in log.problem
    assert log.write_errors >= 1

    def shipped_and_drained() -> bool:  # an admin shipping rotated files away as they come
        for rotated in rotated_files(path):
            rotated.rename(tmp_path / f"shipped-{rotated.name}")
        return log.drain(0.5)

    wait_for(shipped_and_drained, 30)
    assert log.writable and log.problem is None
    log.close()
    shipped = sorted(tmp_path.glob("shipped-*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    assert details(*shipped, *rotated_files(path), path) == [f"e{i}" for i in range(300)]


def test_a_blocked_write_in_the_process_is_seen_by_the_gateway(tmp_path):
    """The process stopped (SIGSTOP: as a write that does not return): after
    `stall_timeout` the gateway counts the log as not writable, and says why; going
    on, it writes what waited."""
    log = started(tmp_path, stall_timeout=0.5)
    os.kill(log._process.pid, signal.SIGSTOP)
    try:
        log.emit(event(1))
        wait_for(lambda: not log.writable)
        assert "blocked" in log.problem
    finally:
        os.kill(log._process.pid, signal.SIGCONT)
    assert log.drain(10)
    assert log.writable and log.written == 2
    log.close()


def test_the_process_holds_none_of_the_gateways_descriptors(tmp_path):
    ours, peer = socket.socketpair()
    log = started(tmp_path)
    kept = [os.readlink(f"/proc/{log._process.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{log._process.pid}/fd")]  # fmt: skip
    assert not [k for k in kept if k.startswith("socket:")], kept
    ours.close()
    peer.settimeout(5)
    assert peer.recv(1) == b""  # the only other copy was the process's: none
    peer.close()
    log.close()


def test_the_terminals_signals_do_not_stop_the_process(tmp_path):
    log = started(tmp_path)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(log._process.pid, signum)
    time.sleep(0.2)
    assert alive(log._process.pid)
    for i in range(100):
        log.emit(event(i))
    log.close()
    assert log.written == 101 and verify(log.path).ok


@pytest.mark.parametrize("holder", ["thread", "process"])
def test_a_second_writer_waits_only_briefly_for_the_lock(tmp_path, holder):
    log = started(tmp_path) if holder == "process" else AuditLog(tmp_path / "audit.jsonl")
    began = time.monotonic()
    with pytest.raises(audit_module.AuditLogError, match="in use by another"):
        AuditLog(tmp_path / "audit.jsonl")
    assert time.monotonic() - began < audit_module.LOCK_WAIT + 1
    log.close()
