"""The task's terminal on a warm run: a pty of the sandbox's own, relayed by the caller.

Standard library only: PID 1 of the sandbox (sandbox/init.py) loads it by path, and
only when the spec has a `terminal` (attach.py sets one when the `sandgate` process
that handed its run to a warm runner has a controlling terminal among its stdio).

Why a pty and not the caller's terminal: a terminal is the controlling terminal of
one session, and a process can only be in the session of the process it was forked
from. The caller's terminal belongs to the caller's shell's session; a warm runner
is not in it, nor is anything it forks (TIOCSCTTY from another session fails, or,
with arg 1 and CAP_SYS_ADMIN, steals the terminal from the shell). So the sandbox
gets a session and a pty of its own, as `sudo` (use_pty), `ssh -t` and `docker run
-t` give their commands, and the caller's `sandgate` process (enforcer/handoff.py),
which is in the shell's session and its job, relays bytes between the two and
mirrors job control:

PID 1 here
  - setsid(), then a new pty from the sandbox's own devpts (so `tty` and `ps` inside
    name it: /dev/pts/0), with the caller's terminal modes and window size, as its
    controlling terminal; the master goes to the runner (job socket, SCM_RIGHTS),
    which passes it to the caller;
  - the task: a process group of its own, the pty's foreground group while the
    caller is in its terminal's foreground (as a shell runs a foreground job); its
    stdio that was the caller's terminal is the pty's other end;
  - reports each stop of the task to the runner: {"stopped": N, "epoch": E};
  - takes from the runner {"signal": N} (stop the task's group: a stop the caller got)
    and {"continue": E, "foreground": F} (resume it; while the caller is in the
    background, PID 1's own group is the pty's foreground, so a read by the task
    stops it with SIGTTIN, as a background job's read of the caller's terminal would).

E, the epoch, counts the continues the runner sent: a stop reported before the last
continue is an old one, which the runner drops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import termios

STOPS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class Terminal:
    """PID 1's side of the task's pty (the module's doc)."""

    def __init__(self, settings: dict):
        """`settings`: the spec's `terminal` (attach.py): the caller's terminal modes
        (termios.tcgetattr, cc as numbers) and window size (rows, columns, x and y
        pixels), which of the task's stdio was that terminal, whether the caller is in
        its foreground, and the job socket's descriptor."""
        self.settings = settings
        self.fds = settings["fds"]
        self.foreground = bool(settings["foreground"])
        self.job = socket.socket(fileno=settings["job_fd"])
        self.job.set_inheritable(False)
        self.slave = -1
        self.task = 0
        self.epoch = 0
        self.parked = 0  # the pty's foreground group while the caller is in the background
        self._buffer = b""

    def open(self) -> None:
        """In PID 1, as host root, before the task: a session and its pty; the master
        goes to the runner (and no copy stays here)."""
        os.setsid()
        master, self.slave = os.openpty()
        try:
            fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)
            termios.tcsetattr(self.slave, termios.TCSANOW, self.settings["termios"])
            fcntl.ioctl(
                self.slave, termios.TIOCSWINSZ, struct.pack("4H", *self.settings["winsize"])
            )
            socket.send_fds(self.job, [b'{"terminal": true}\n'], [master])
        finally:
            os.close(master)
        for signum in STOPS:  # the pty's foreground changes hands here, without stopping PID 1
            signal.signal(signum, signal.SIG_IGN)

    def take(self) -> None:
        """In the task's process, first: its own process group, the foreground one if
        the caller's is, and the pty as its stdio where the caller's terminal was."""
        os.setpgid(0, 0)
        if self.foreground:
            os.tcsetpgrp(self.slave, os.getpid())  # SIGTTOU is still ignored here
        for signum in STOPS:
            signal.signal(signum, signal.SIG_DFL)
        for fd in self.fds:
            os.dup2(self.slave, fd)
        os.close(self.slave)
        self.job.close()

    def serve(self, task: int, exit_code) -> int:
        """PID 1's loop: reap every child, report the task's stops, follow the runner;
        `exit_code(status)` of the task when it ends."""
        self.task = task
        with contextlib.suppress(OSError):  # both sides: either may come first
            os.setpgid(task, task)
        if self.foreground:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(self.slave, task)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        watched = [wake_r, self.job]
        while True:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
                except ChildProcessError:
                    return 0
                if pid == 0:
                    break
                if pid == task and os.WIFSTOPPED(status):
                    self._send(stopped=os.WSTOPSIG(status), epoch=self.epoch)
                elif pid == task:
                    return exit_code(status)
            try:
                ready, _, _ = select.select(watched, [], [])
            except InterruptedError:
                continue
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            if self.job in ready and not self._receive():
                watched.remove(self.job)  # the runner is gone: PDEATHSIG ends us soon

    def _send(self, **message) -> None:
        with contextlib.suppress(OSError):
            self.job.sendall(json.dumps(message).encode() + b"\n")

    def _receive(self) -> bool:
        """Carry out what the runner sent; False once it is gone."""
        try:
            data = self.job.recv(4096)
        except OSError:
            return False
        if not data:
            return False
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("signal") in STOPS:
                self._signal(message["signal"])
            if isinstance(message.get("continue"), int):
                self.epoch = message["continue"]
                self._follow_caller(bool(message.get("foreground")))
                self._signal(signal.SIGCONT)
        return True

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.task, signum)

    def _follow_caller(self, foreground: bool) -> None:
        """The task's group is the pty's foreground while the caller is its terminal's;
        else PID 1's group is, which never reads: a read by the task stops it."""
        if foreground == self.foreground:
            return
        self.foreground = foreground
        with contextlib.suppress(OSError):
            if not foreground:
                self.parked = os.tcgetpgrp(self.slave)
                os.tcsetpgrp(self.slave, os.getpgrp())
                return
            try:
                os.tcsetpgrp(self.slave, self.parked or self.task)
            except OSError:  # that group is gone
                os.tcsetpgrp(self.slave, self.task)
