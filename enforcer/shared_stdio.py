"""The caller's stdin, stdout and stderr, shared with the task of a run in the caller's
own process (embedded, attached in-process, or a warm runner given the caller's stdio):
the task inherits the very open file descriptions sandgate writes its lines through,
and that the caller's next reader of its stdin reads.

So the task could change what sandgate writes after it: clear O_APPEND and move a
log file's offset to its start (`sandgate run ... >> agent.log`: sandgate's summary
then overwrote the top of the log, and the log ended with the summary the task
forged), or set O_NONBLOCK on a pipe (sandgate's lines then dropped on a full pipe).
`SharedStdio` notes the status flags before the task starts and, once the task is
gone, sets them again and puts a file's offset at its end: sandgate's lines land after
everything the task wrote, as the caller's redirection meant. What the task wrote
into the file itself is its output (it could write there anyway).

Stdin too (fd 0): a task that set O_NONBLOCK there left it on the caller's pipe or
terminal after the run, and the caller's next `read` got EAGAIN at once instead of
waiting for its producer. Its flags are given back; its offset is not moved (what the
task read of a stdin file is read: the caller's next reader goes on from there).

Locks too: a flock(2), an OFD lock (F_OFD_SETLK) or a lease is the open file
description's, not a process's, so one the task took on a shared stdio (`sandgate run
... 2>>agent.log`, then `flock(2, LOCK_EX)` in the task) was still held after every
process of the task was gone, for as long as the caller kept its descriptor: an
agent's session log for the whole session, and every log rotator or shipper or later
step that locks the file waited on it or failed. The runner's own descriptor is the
same description, so a flock(LOCK_UN), F_OFD_SETLK F_UNLCK or F_SETLEASE F_UNLCK from
it releases such a lock whoever took it. But the caller may hold one there itself (a
harness that locks its own log), which the run must leave as it was. So the locks the
description holds are noted before the task and compared after it, from
/proc/self/fdinfo/N: it lists the flock, OFD locks and lease of that very description
(its own, not the file's: a lock a log rotator holds through a description of its
own is not listed, where "a fresh open of the file cannot lock it" would have taken it
for the caller's). What changed is put back as it was: a lock the task added is
released, one of the caller's the task changed or released is set again where no one
else has taken it since (a non-blocking lock: if someone has, it stays theirs). POSIX
(F_SETLK) locks are a process's and died with the task's.

What no flag gives back: when a stdio is a socket, the task may `shutdown(2)` it (the
shutdown is the socket's, shared), and sandgate's own lines after the task (its summary,
"the task planted ...") never reach the caller; the exit code, `--summary-json`, the
audit log and the events carry them all the same (docs/sandbox.md, "The caller's
stdio"). A socket there is the task's to close, as a terminal's hangup would be.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

# The status flags F_SETFL changes (the others are fixed at open).
_SETTABLE = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME
_FLOCK_OF = {"READ": fcntl.LOCK_SH, "WRITE": fcntl.LOCK_EX}
_OFD_OF = {"READ": fcntl.F_RDLCK, "WRITE": fcntl.F_WRLCK}


@dataclass(frozen=True)
class DescriptionLocks:
    """The locks an open file description holds, whoever took them through it."""

    flock: int | None = None  # fcntl.LOCK_SH or LOCK_EX
    # (F_RDLCK or F_WRLCK, first byte, last byte or None: to the end of the file)
    ofd: tuple[tuple[int, int, int | None], ...] = ()
    lease: bool = False


def parse_fdinfo_locks(fdinfo: str) -> DescriptionLocks:
    """The `lock:` lines of /proc/PID/fdinfo/N (fs/locks.c lock_get_status), e.g.
    `lock:\t1: FLOCK  ADVISORY  WRITE 22208 fe:00:2146391 0 EOF` or
    `lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:2146391 10 14`; POSIX locks are left out."""
    flock, ofd, lease = None, [], False
    for line in fdinfo.splitlines():
        words = line.split()
        if len(words) < 8 or words[0] != "lock:":
            continue
        kind, mode, first, last = words[2], words[4], words[-2], words[-1]
        if kind == "FLOCK" and mode in _FLOCK_OF:
            flock = _FLOCK_OF[mode]
        elif kind == "OFDLCK" and mode in _OFD_OF:
            ofd.append((_OFD_OF[mode], int(first), None if last == "EOF" else int(last)))
        elif kind == "LEASE":
            lease = True
    return DescriptionLocks(flock, tuple(sorted(ofd, key=lambda lock: lock[1])), lease)


def ofd_steps(before: DescriptionLocks) -> list[tuple[int, int, int | None]]:
    """The F_OFD_SETLK calls, (type, first, last or None), that leave a description with
    `before`'s OFD locks, whatever it holds now: F_UNLCK of every range between them,
    then each of them again (a type the task changed goes back; one it released is taken
    again if no one else has it)."""
    steps: list[tuple[int, int, int | None]] = []
    start: int | None = 0
    for _, first, last in before.ofd:
        if first > start:
            steps.append((fcntl.F_UNLCK, start, first - 1))
        if last is None:
            start = None
            break
        start = max(start, last + 1)
    if start is not None:
        steps.append((fcntl.F_UNLCK, start, None))
    return steps + list(before.ofd)


class SharedStdio:
    def __init__(self, fds: tuple[int, ...] = (0, 1, 2)):
        self.flags: dict[int, int] = {}
        self.locks: dict[int, DescriptionLocks] = {}  # the caller's own (the module's doc)
        for fd in fds:
            try:
                self.flags[fd] = fcntl.fcntl(fd, fcntl.F_GETFL) & _SETTABLE
            except OSError:  # closed: nothing is written there
                continue
            locks = _locks(fd)
            if locks is not None:  # unknown: none is released after the task
                self.locks[fd] = locks

    def give_back(self) -> None:
        """After the task: the flags and the description's locks as they were, an output
        file's offset at its end."""
        for fd, flags in self.flags.items():
            if fd in self.locks:
                _give_back_locks(fd, self.locks[fd])
            try:
                now = fcntl.fcntl(fd, fcntl.F_GETFL)
                if now & _SETTABLE != flags:
                    fcntl.fcntl(fd, fcntl.F_SETFL, (now & ~_SETTABLE) | flags)
                if fd != 0 and stat.S_ISREG(os.fstat(fd).st_mode):
                    os.lseek(fd, 0, os.SEEK_END)
            except OSError:  # gone, or a file that cannot seek: written as it is
                continue


def _locks(fd: int) -> DescriptionLocks | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fdinfo:
            return parse_fdinfo_locks(fdinfo.read())
    except (OSError, ValueError):
        return None


def _give_back_locks(fd: int, before: DescriptionLocks) -> None:
    """Each kind of lock that differs from `before` set back (non-blocking, so a lock
    someone else took meanwhile is theirs; an error leaves that one as it is)."""
    now = _locks(fd)
    if now is None or now == before:
        return
    if now.flock != before.flock:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, (before.flock or fcntl.LOCK_UN) | fcntl.LOCK_NB)
    if now.ofd != before.ofd:
        for kind, first, last in ofd_steps(before):
            length = 0 if last is None else last - first + 1  # 0: to the end of the file
            lock = struct.pack("hhqqi4x", kind, os.SEEK_SET, first, length, 0)  # struct flock
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
    if now.lease and not before.lease:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
