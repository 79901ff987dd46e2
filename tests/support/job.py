"""A shell's job control, in small, for tests on a terminal: `Job(argv)` runs argv as
a job of a shell on a pty of the test's own, and reports what becomes of it.

The shell (JOB_SHELL) is the session leader of the pty; it runs argv in a process
group of its own (whose parent is in the session: a ^Z stops it), as the foreground
job unless `background`, writes what happens to it ("stopped N", "continued",
"exited N") to a pipe, and takes `fg` from another pipe (the terminal to the job,
then SIGCONT), as `fg` in a real shell does.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading

JOB_SHELL = """
import fcntl, os, signal, sys, termios, threading
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # as a shell: it hands the terminal on
report = int(os.environ.pop("REPORT_FD"))
control = int(os.environ.pop("CONTROL_FD"))
background = os.environ.pop("BACKGROUND", "") == "1"
job = os.fork()
if job == 0:  # as bash: the terminal is the job's before it runs (both sides do it)
    os.setpgid(0, 0)
    if not background:
        os.tcsetpgrp(0, os.getpid())
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execvp(sys.argv[1], sys.argv[1:])
try:  # as bash: the child may have set its group and exec'd first (EACCES), or ended
    os.setpgid(job, job)
    if not background:
        os.tcsetpgrp(0, job)
except (PermissionError, ProcessLookupError):
    pass
os.write(report, f"job {job}\\n".encode())

def take_commands():
    for line in os.fdopen(control):
        if line.strip() == "fg":
            os.tcsetpgrp(0, job)
            os.killpg(job, signal.SIGCONT)

threading.Thread(target=take_commands, daemon=True).start()
while True:
    _, status = os.waitpid(job, os.WUNTRACED | os.WCONTINUED)
    if os.WIFSTOPPED(status):
        os.write(report, f"stopped {os.WSTOPSIG(status)}\\n".encode())
    elif os.WIFCONTINUED(status):
        os.write(report, b"continued\\n")
    else:
        os.write(report, f"exited {os.waitstatus_to_exitcode(status)}\\n".encode())
        break
# A shell outlives its jobs: were it to exit now, the session would lose its terminal
# (the kernel clears the terminal's foreground group as its session leader exits), and
# a test reading the terminal's state after the job would race that.
threading.Event().wait()
"""


class Job:
    """`argv` as a job of a terminal (JOB_SHELL), and what became of it; what it
    writes to the terminal is collected in `output` (so it never waits for a reader)."""

    def __init__(
        self, argv: list[str], *, background: bool = False, size: tuple[int, int] = (24, 80)
    ):
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("4H", *size, 0, 0))
        report_r, report_w = os.pipe()
        control_r, self.control = os.pipe()
        self.shell = subprocess.Popen(
            [sys.executable, "-c", JOB_SHELL, *argv],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            pass_fds=(report_w, control_r),
            env={
                **os.environ,
                "REPORT_FD": str(report_w),
                "CONTROL_FD": str(control_r),
                "BACKGROUND": "1" if background else "",
            },
        )
        os.close(report_w)
        os.close(control_r)
        self.reports = os.fdopen(report_r)
        self.output = b""
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        self.pid = int(self.next_report().split()[1])  # and its process group's

    def _read_output(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def next_report(self, timeout: float = 30.0) -> str:
        ready, _, _ = select.select([self.reports], [], [], timeout)
        if not ready:
            return f"(nothing in {timeout} s; the terminal shows: {self.output[-2000:]!r})"
        return self.reports.readline().strip()

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def resize(self, rows: int, columns: int) -> None:
        """As a terminal window resized: its foreground job gets SIGWINCH."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("4H", rows, columns, 0, 0))

    def fg(self) -> None:
        os.write(self.control, b"fg\n")

    def close(self) -> None:
        if self.shell.poll() is None:
            os.killpg(self.shell.pid, signal.SIGKILL)  # its session's leader: the shell
            self.shell.wait()
        self.reports.close()
        os.close(self.control)
        os.close(self.slave)
        os.close(self.master)
