"""A lock the task takes on the caller's stdio does not outlive the task.

The task shares the caller's stdout and stderr: the same open file description
(`sandgate run ... 2>>agent.log`). flock(2) and OFD (F_OFD_SETLK) locks belong to the
open file description, not to a process, so one the task took there was still held
after every process of the task was gone, for as long as the caller kept its
descriptor (an agent's log, for the agent's whole session): any other program that
locks the file (a log rotator or shipper, the harness's next step) waited on it. A red
team found it (session 51). Now sandgate gives the description's locks back as they
were before the task, with its status flags and offset (enforcer/shared_stdio.py): the
task's are released, and a lock the caller held there itself is kept.

Control: after an honest task the file can be locked at once.
"""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

PY = "/usr/bin/python3"
TAKE = {
    "flock": "import fcntl; fcntl.flock(2, fcntl.LOCK_EX)",
    "ofd": (
        "import fcntl, struct; "
        "fcntl.fcntl(2, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 0, 0))"
    ),
    "honest": "pass",
}


def _ofd_lock(kind: int, start: int = 0, length: int = 0) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def _held(path, *, flock: int = fcntl.LOCK_EX, start: int = 0) -> str | None:
    """Which lock of another description keeps a fresh open of `path` from taking
    `flock`, or an OFD write lock from byte `start` on; None: neither."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, flock | fcntl.LOCK_NB)
        except BlockingIOError:
            return "flock"
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _ofd_lock(fcntl.F_WRLCK, start))
        except BlockingIOError:
            return "ofd"
        return None
    finally:
        os.close(fd)


def _run_with_stderr(net, tmp_path, task: str, log_fd: int) -> None:
    run = sandbox.start(net, tmp_path, f'{PY} -c "{TAKE[task]}"', stderr=log_fd)
    result = run.finish()
    assert result.returncode == 0, (tmp_path / "agent.log").read_text()[-2000:]


@pytest.mark.parametrize("task", sorted(TAKE))
def test_a_lock_on_the_callers_stderr_does_not_outlive_the_task(net, tmp_path, task):
    log = tmp_path / "agent.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _run_with_stderr(net, tmp_path, task, log_fd)
        held = _held(log)  # the caller still holds its descriptor
    finally:
        os.close(log_fd)
    assert held is None, f"a {held} lock of the task on the caller's stderr outlived the run"


def test_the_callers_own_locks_on_its_stderr_are_kept(net, tmp_path):
    """The caller holds a shared flock and an OFD write lock of bytes 0-99 on its
    stderr before the run; the task makes the first exclusive and the second the whole
    file's (both the same description's: a conversion, then a merge). After the run,
    the caller's are as they were, and nothing more."""
    log = tmp_path / "agent.log"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(log_fd, fcntl.LOCK_SH)
        fcntl.fcntl(log_fd, fcntl.F_OFD_SETLK, _ofd_lock(fcntl.F_WRLCK, 0, 100))
        _run_with_stderr(net, tmp_path, "flock", log_fd)
        _run_with_stderr(net, tmp_path, "ofd", log_fd)
        # Asked while the caller still holds its descriptor (its locks go with it):
        beside = _held(log, flock=fcntl.LOCK_SH, start=100)
        over_its_bytes = _held(log, flock=fcntl.LOCK_SH, start=0)
        exclusive = _held(log)
    finally:
        os.close(log_fd)
    assert beside is None, f"a {beside} lock of the task outlived the run"
    assert over_its_bytes == "ofd", "the caller's own OFD lock was released"
    assert exclusive == "flock", "the caller's own shared flock was released"
