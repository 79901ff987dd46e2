"""The audit writer (root, in the service) never follows a link planted in the log's
directory by someone else who may write it (a log shipper, which docs/telemetry.md has
move or compress rotated files: it needs the directory writable).

What was wrong (red team `trail`, finding 4): rotation opened `FILE.new` with
O_CREAT|O_TRUNC and no O_NOFOLLOW, then renamed it over FILE, so a link planted as
`FILE.new` had root truncate its target and write every later audit line there; and a
FILE replaced by a dangling link was reopened through it, so root made the link's
target, anywhere (/etc/profile.d/x.sh), and wrote lines holding task-chosen text into it.

What holds now: every name in the log's directory is opened, made, linked and renamed
relative to a descriptor of that directory opened once, never through a symbolic link
(O_NOFOLLOW, O_EXCL for FILE.new, `follow_symlinks=False`, the rotated name linked from
the writer's descriptor). A stale or planted `FILE.new` is removed (a link there is
said); a link where FILE or a rotated file should be is an error naming it: at start
the log does not open, while writing the log counts as unwritable (new connections
refused, the events held) until it is removed, then everything is written. `verify`
reports a link as a broken place instead of reading through it. A log directory anyone
may write without the sticky bit is refused at start; one another user or group may
write is said (a warning). The journal's files are never followed either.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sandgate.enforcer.cli import main
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.audit import (
    AuditLog,
    AuditLogError,
    journal_log,
    log_files,
    verify,
)
from sandgate.proxy.telemetry.event import Event, EventKind

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the service's view)")


def _event(i: int) -> Event:
    return Event(
        kind=EventKind.REQUEST,
        verdict=Verdict.DENY,
        reason=Reason.HOST_MISMATCH,
        rule_id="builtin:host-mismatch",
        name=f"n{i}.example",
        dst_ip="203.0.113.10",
        dst_port=80,
        method="GET",
        path=f"/$(id)/{i}",
        detail="x" * 200,
        task_id="t1",
        sandbox="10.213.0.2",
        profile="default",
    )


def _as_nobody(action) -> None:
    """Run `action` in a child with uid/gid nobody (the log shipper's account)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the shipper could not plant its link"


def _eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {check}")
        time.sleep(0.01)
    return value


@pytest.fixture
def dirs():
    """(the log's directory, owned by the shipper; a directory only root may write)."""
    base = Path(tempfile.mkdtemp(prefix="audit-links-", dir="/tmp"))
    base.chmod(0o755)
    logs = base / "logs"  # the audit log's directory, writable by the shipper
    logs.mkdir()
    os.chown(logs, NOBODY, NOBODY)
    secret = base / "root-only"  # a directory only root may write (like /etc)
    secret.mkdir(mode=0o700)
    try:
        yield logs, secret
    finally:
        shutil.rmtree(base)


# --- the red team's two cases, planted by uid nobody -------------------------------------------


@needs_root
def test_a_link_planted_as_file_new_is_removed_not_followed(dirs, caplog):
    logs, secret = dirs
    victim = secret / "precious"
    victim.write_text("root's precious file\n")
    victim.chmod(0o600)
    path = logs / "audit.jsonl"
    log = AuditLog(path, max_bytes=3000)
    try:
        _as_nobody(lambda: os.symlink(victim, logs / "audit.jsonl.new"))
        for i in range(40):  # several rotations' worth
            log.emit(_event(i))
        assert log.drain(10)
    finally:
        log.close()
    assert victim.read_text() == "root's precious file\n"
    assert not path.is_symlink() and not os.path.lexists(logs / "audit.jsonl.new")
    assert "removing a symbolic link put there as" in caplog.text
    result = verify(*log_files(path))
    assert result.ok and result.lines == 40 and log.lost == 0


@needs_root
def test_a_file_replaced_by_a_dangling_link_is_refused_until_removed(dirs):
    logs, secret = dirs
    victim = secret / "profile.sh"  # e.g. /etc/profile.d/zz.sh, /etc/cron.d/x
    path = logs / "audit.jsonl"
    log = AuditLog(path)
    try:
        log.emit(_event(0))
        assert log.drain(10)

        def swap():
            os.unlink(path)
            os.symlink(victim, path)

        _as_nobody(swap)
        for i in range(1, 4):
            log.emit(_event(i))
        _eventually(lambda: not log.writable)  # new connections are refused meanwhile
        assert f"{path} is a symbolic link" in log.problem and str(victim) in log.problem
        assert not victim.exists()
        path.unlink()  # the admin removes the link: the held events are written
        assert log.drain(10) and log.writable
    finally:
        log.close()
    assert not victim.exists()
    assert not path.is_symlink() and log.lost == 0 and log.written == 4
    result = verify(path)
    assert result.ok and (result.first_seq, result.last_seq) == (2, 4)


# --- variants of the class -----------------------------------------------------------------------


def test_a_file_replaced_by_a_link_to_an_existing_file_is_not_written(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("")  # empty: what a reopen would have appended to
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)
    try:
        log.emit(_event(0))
        assert log.drain()
        path.unlink()
        path.symlink_to(victim)
        log.emit(_event(1))
        _eventually(lambda: not log.writable)
        assert "symbolic link" in log.problem
        assert victim.read_text() == ""
        path.unlink()
        assert log.drain() and log.writable
    finally:
        log.close()
    assert victim.read_text() == "" and log.lost == 0


def test_a_link_planted_as_the_next_rotated_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("kept\n")
    logs = tmp_path / "logs"
    path = logs / "audit.jsonl"
    log = AuditLog(path, max_bytes=3000)
    try:
        (logs / "audit.jsonl.1").symlink_to(victim)  # where the first rotation goes
        for i in range(20):
            log.emit(_event(i))
        _eventually(lambda: not log.writable)
        assert "audit.jsonl.1 exists (a symbolic link)" in log.problem
        (logs / "audit.jsonl.1").unlink()
        assert log.drain() and log.writable
    finally:
        log.close()
    assert victim.read_text() == "kept\n"
    assert not any(p.is_symlink() for p in logs.iterdir())
    result = verify(*log_files(path))
    assert result.ok and result.lines == 20 and log.lost == 0


@pytest.mark.parametrize("dangling", [True, False], ids=["dangling", "to-a-log"])
def test_a_link_in_place_of_the_log_at_start_is_an_error_naming_it(tmp_path, dangling):
    target = tmp_path / "elsewhere.jsonl"
    if not dangling:
        AuditLog(target).close()  # a real audit log: still not opened through the link
    path = tmp_path / "logs" / "audit.jsonl"
    path.parent.mkdir()
    path.symlink_to(target)
    with pytest.raises(AuditLogError, match=f"{path} is a symbolic link .*remove it"):
        AuditLog(path)
    assert target.exists() is not dangling


def test_a_link_among_the_rotated_files_at_start_is_an_error_naming_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.7").symlink_to("/etc/hostname")
    with pytest.raises(AuditLogError, match=r"audit.jsonl.7 is a symbolic link"):
        AuditLog(path)
    assert not path.exists() or path.stat().st_size == 0


def test_a_link_among_the_rotated_files_fails_the_budget_count_not_open(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_total_bytes=2000)
    try:
        for i in range(3):
            log.emit(_event(i))
        assert log.drain()
        (tmp_path / "audit.jsonl.9").symlink_to("/etc/hostname")
        for i in range(3, 12):  # past the budget: it counts the rotated files again
            log.emit(_event(i))
        _eventually(lambda: not log.writable)
        assert "audit.jsonl.9 is a symbolic link" in log.problem
    finally:
        log.close_timeout = 0.2
        log.close()


def test_an_empty_hard_link_in_place_of_the_log_is_not_appended_to(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("")
    path = tmp_path / "logs" / "audit.jsonl"
    path.parent.mkdir()
    os.link(victim, path)  # (fs.protected_hardlinks stops a non-owner; root may)
    with pytest.raises(AuditLogError, match="other hard links"):
        AuditLog(path)
    path.unlink()
    log = AuditLog(path)
    try:
        log.emit(_event(0))
        assert log.drain()
        path.unlink()
        os.link(victim, path)  # the same, while it is written
        log.emit(_event(1))
        _eventually(lambda: not log.writable)
        assert "replaced by another file" in log.problem
        path.unlink()
        assert log.drain()
    finally:
        log.close()
    assert victim.read_text() == "" and log.lost == 0


# --- verify reads no link --------------------------------------------------------------------------


def test_verify_reports_a_link_and_does_not_read_through_it(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=3000)
    for i in range(20):
        log.emit(_event(i))
    log.close()
    first = log_files(path)[0]
    kept = tmp_path / "kept"
    first.rename(kept)
    first.symlink_to(kept)  # the same lines, but through a link: not read
    result = verify(*log_files(path))
    assert not result.ok and (result.file, result.line) == (str(first), 0)
    assert "is a symbolic link" in result.problem
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{first}:0: {first} is a symbolic link" in out and "BROKEN" in out


def test_verify_does_not_wait_on_a_fifo_behind_a_link(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "audit.jsonl"
    link.symlink_to(fifo)
    results = []
    checking = threading.Thread(target=lambda: results.append(verify(link)), daemon=True)
    checking.start()
    checking.join(5)
    if checking.is_alive():  # followed, its open blocked for good: a writer ends it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        checking.join(5)
        raise AssertionError("verify opened the FIFO behind the link and waited on it")
    assert not results[0].ok and "symbolic link" in results[0].problem


# --- the directory's permissions ------------------------------------------------------------------


def test_a_log_directory_anyone_may_write_without_the_sticky_bit_is_refused(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    with pytest.raises(AuditLogError, match=r"writable by anyone .*chmod o-w"):
        AuditLog(logs / "audit.jsonl")
    assert not (logs / "audit.jsonl").exists()
    logs.chmod(0o1777)  # sticky, like /tmp: others cannot remove or rename root's files
    AuditLog(logs / "audit.jsonl").close()


def test_a_log_directory_inside_one_anyone_may_write_is_refused(tmp_path):
    open_dir = tmp_path / "open"
    (open_dir / "logs").mkdir(parents=True)
    open_dir.chmod(0o777)  # anyone may rename `logs` and put another directory there
    try:
        with pytest.raises(AuditLogError, match=f"is in {open_dir}, which is writable by anyone"):
            AuditLog(open_dir / "logs" / "audit.jsonl")
    finally:
        open_dir.chmod(0o755)


@needs_root
def test_a_log_directory_another_user_may_write_is_said_at_start(dirs, caplog):
    logs, _ = dirs
    with caplog.at_level(logging.WARNING, logger="sandgate.audit"):
        AuditLog(logs / "audit.jsonl").close()
    assert f"audit log directory {logs}" in caplog.text and "uid 65534" in caplog.text


# --- the journal ---------------------------------------------------------------------------------


def test_the_journals_files_are_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("kept\n")
    journal = tmp_path / "journal" / "audit.ring"
    journal.parent.mkdir(mode=0o700)
    journal.with_suffix(".log").symlink_to(victim)  # whose journal it is: written at open
    log = AuditLog(tmp_path / "audit.jsonl", journal=journal, journal_size=1 << 16)
    try:
        log.emit(_event(0))
        assert log.drain()
    finally:
        log.close()
    assert victim.read_text() == "kept\n"
    journal.with_suffix(".log").symlink_to(victim)
    with pytest.raises(OSError):
        journal_log(journal)  # `sandgate gc` skips it: a link is not read
    assert stat.S_ISLNK(os.lstat(journal.with_suffix(".log")).st_mode)
