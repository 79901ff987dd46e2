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

What no flag gives back: when a stdio is a socket, the task may `shutdown(2)` it (the
shutdown is the socket's, shared), and sandgate's own lines after the task (its summary,
"the task planted ...") never reach the caller; the exit code, `--summary-json`, the
audit log and the events carry them all the same (docs/sandbox.md, "The caller's
stdio"). A socket there is the task's to close, as a terminal's hangup would be.
"""

from __future__ import annotations

import fcntl
import os
import stat

# The status flags F_SETFL changes (the others are fixed at open).
_SETTABLE = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME


class SharedStdio:
    def __init__(self, fds: tuple[int, ...] = (0, 1, 2)):
        self.flags: dict[int, int] = {}
        for fd in fds:
            try:
                self.flags[fd] = fcntl.fcntl(fd, fcntl.F_GETFL) & _SETTABLE
            except OSError:  # closed: nothing is written there
                continue

    def give_back(self) -> None:
        """After the task: the flags as they were, an output file's offset at its end."""
        for fd, flags in self.flags.items():
            try:
                now = fcntl.fcntl(fd, fcntl.F_GETFL)
                if now & _SETTABLE != flags:
                    fcntl.fcntl(fd, fcntl.F_SETFL, (now & ~_SETTABLE) | flags)
                if fd != 0 and stat.S_ISREG(os.fstat(fd).st_mode):
                    os.lseek(fd, 0, os.SEEK_END)
            except OSError:  # gone, or a file that cannot seek: written as it is
                continue
