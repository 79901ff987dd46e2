"""shared_stdio's give-back of an open file description's locks: what /proc's fdinfo
says it holds, the OFD calls that set it back, and the whole on a real file (a lock
taken through a dup of the descriptor is the description's, as one the task takes
through its inherited copy)."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
from sandgate.enforcer.shared_stdio import (
    DescriptionLocks,
    SharedStdio,
    ofd_steps,
    parse_fdinfo_locks,
)

R, W, U = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK

FDINFO = """pos:\t0
flags:\t02100002
mnt_id:\t27
ino:\t2146391
lock:\t1: FLOCK  ADVISORY  READ 22208 fe:00:2146391 0 EOF
lock:\t2: OFDLCK ADVISORY  WRITE -1 fe:00:2146391 10 14
lock:\t3: OFDLCK ADVISORY  READ -1 fe:00:2146391 100 EOF
lock:\t4: POSIX  ADVISORY  WRITE 22208 fe:00:2146391 50 52
"""


def test_fdinfo_gives_the_descriptions_flock_and_ofd_locks_not_posix_ones():
    assert parse_fdinfo_locks(FDINFO) == DescriptionLocks(
        flock=fcntl.LOCK_SH, ofd=((W, 10, 14), (R, 100, None))
    )
    assert parse_fdinfo_locks("pos:\t0\nflags:\t02\n") == DescriptionLocks()


@pytest.mark.parametrize(
    "before, steps",
    [
        pytest.param((), [(U, 0, None)], id="none-before:unlock-all"),
        pytest.param(((W, 0, 99),), [(U, 100, None), (W, 0, 99)], id="head-kept"),
        pytest.param(
            ((R, 10, 14), (W, 20, None)),
            [(U, 0, 9), (U, 15, 19), (R, 10, 14), (W, 20, None)],
            id="gaps-between",
        ),
        pytest.param(((W, 0, None),), [(W, 0, None)], id="whole-file-kept"),
    ],
)
def test_ofd_steps_unlock_around_the_callers_locks_then_set_them_again(before, steps):
    assert ofd_steps(DescriptionLocks(ofd=before)) == steps


def _other_can_lock(path, *, flock=fcntl.LOCK_EX, start=0, length=0) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, flock | fcntl.LOCK_NB)
        lock = struct.pack("hhqqi4x", W, os.SEEK_SET, start, length, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _ofd(fd: int, kind: int, start: int = 0, length: int = 0) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0))


def test_the_tasks_locks_are_released(tmp_path):
    log = tmp_path / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        stdio = SharedStdio((fd,))
        task = os.dup(fd)
        fcntl.flock(task, fcntl.LOCK_EX)
        _ofd(task, W)
        os.close(task)  # the task is gone; its locks are the description's
        assert not _other_can_lock(log)
        stdio.give_back()
        assert _other_can_lock(log)
    finally:
        os.close(fd)


def test_the_callers_own_locks_stay_as_they_were(tmp_path):
    log = tmp_path / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _ofd(fd, W, 0, 100)
        stdio = SharedStdio((fd,))
        task = os.dup(fd)
        fcntl.flock(task, fcntl.LOCK_EX)  # the caller's shared lock made exclusive
        _ofd(task, W)  # and its bytes 0-99 made the whole file's
        os.close(task)
        stdio.give_back()
        assert _other_can_lock(log, flock=fcntl.LOCK_SH, start=100)
        assert not _other_can_lock(log, flock=fcntl.LOCK_SH, start=99, length=1)
        assert not _other_can_lock(log, start=100)  # the flock is shared again, not gone
    finally:
        os.close(fd)


def test_a_lease_the_task_took_is_released(tmp_path):
    data = tmp_path / "stdin"
    data.write_text("input\n")
    fd = os.open(data, os.O_RDONLY)  # a stdin file the task owns (in its workspace)
    try:
        stdio = SharedStdio((fd,))
        task = os.dup(fd)
        fcntl.fcntl(task, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        os.close(task)
        with open(f"/proc/self/fdinfo/{fd}") as fdinfo:
            assert parse_fdinfo_locks(fdinfo.read()).lease
        stdio.give_back()
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
    finally:
        os.close(fd)
