"""The caller's side of a warm run's terminal: `sandgate run --gateway` relays the
task's pty (enforcer/sandbox/terminal.py has the why) to and from its own terminal.

Only when the caller's stdio has its controlling terminal (handoff.py decides, and
imports this module only then: a run on pipes pays nothing). As `sudo` (use_pty)
and `ssh -t` do:
- while this process is its terminal's foreground job, the terminal is in raw mode
  and every key goes to the pty, whose own modes (the task's: the caller's, copied
  at the start, then whatever the task sets, e.g. `less` going raw) decide what a key
  does: ^C is SIGINT to the task's foreground job, ^Z stops it. In the background it
  reads nothing (the task's read then stops it, as the caller's terminal would);
- what the task writes to the pty goes to the caller's terminal;
- a change of the terminal's size (SIGWINCH) goes to the pty (the task gets its
  SIGWINCH from there);
- a stop of the task (the runner says so: {"stopped": N}) stops this process with
  the same signal once its terminal is back as it was, so the shell sees its job
  stopped; `fg` or `bg` resumes both (handoff.py forwards SIGCONT with whether this
  process is then in the foreground).

`SharedTerminal` is the other case: a run in the caller's own process (embedded, or
`--gateway` run in-process), whose task is in the caller's session and has its
terminal itself. sandgate holds the terminal's state from before the task and gives
it back after it, before it prints its summary.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import termios
import time

_RAW_IFLAG_OFF = (
    termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
    | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
)  # fmt: skip
_RAW_LFLAG_OFF = termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN
TIOCGEXCL = 0x80045440  # _IOR('T', 0x40, int): whether the terminal is in exclusive mode


def raw_modes(modes: list) -> list:
    """cfmakeraw(3) of termios.tcgetattr's list (a copy)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = modes
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [
        iflag & ~_RAW_IFLAG_OFF,
        oflag & ~termios.OPOST,
        (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8,
        lflag & ~_RAW_LFLAG_OFF,
        ispeed,
        ospeed,
        cc,
    ]


class TerminalRelay:
    """Bytes between the caller's terminal and the task's pty (the module's doc)."""

    def __init__(self, terminal: list[int]):
        """`terminal`: which of this process's stdio is its controlling terminal."""
        self.tty_in = terminal[0]
        self.tty_out = next(fd for fd in (1, 2, 0) if fd in terminal)
        self.master: int | None = None
        self.saved: list | None = None  # the terminal's modes before raw, while raw
        self.pending = b""  # keys the pty has not taken yet

    def in_foreground(self) -> bool:
        try:
            return os.tcgetpgrp(self.tty_in) == os.getpgrp()
        except OSError:
            return False

    def raw(self) -> None:
        """Raw mode, in the foreground only (a background tcsetattr stops us), and
        once the pty is here: the runner read the terminal's modes for it before, and
        must not read raw ones."""
        if self.master is None or self.saved is not None or not self.in_foreground():
            return
        with contextlib.suppress(termios.error, OSError):
            modes = termios.tcgetattr(self.tty_in)
            termios.tcsetattr(self.tty_in, termios.TCSANOW, raw_modes(modes))
            self.saved = modes

    def restore(self) -> None:
        """The terminal as it was (before a stop, and at the end)."""
        if self.saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.tty_in, termios.TCSADRAIN, self.saved)
            self.saved = None

    def resumed(self) -> None:
        self.raw()
        self.resize()  # it may have changed while stopped

    def resize(self) -> None:
        """The terminal's size to the pty (which signals its foreground job)."""
        if self.master is None:
            return
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(self.tty_out, termios.TIOCGWINSZ, bytes(8))
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def serve(self, lines, stop) -> int | None:
        """Relay until the runner sends the exit code (returned; None if the runner
        went away or said something else); `lines` is the
        runner's connection (handoff._Lines), `stop(signum)` stops this process as
        a terminal's stop signal would (handoff's, which forwards it first)."""
        while True:
            reading = [lines.conn]
            if self.master is not None:
                reading.append(self.master)
                if not self.pending and self.saved is not None:  # raw: in the foreground
                    reading.append(self.tty_in)
            # Keys read as the pty hung up (the sandbox ended) have nowhere to go.
            writing = [self.master] if self.pending and self.master is not None else []
            try:
                ready, writable, _ = select.select(
                    reading, writing, [], 0 if lines.ready() else None
                )
            except InterruptedError:
                continue
            if lines.conn in ready or lines.ready():
                message = lines.next_or_none()
                if message is None:
                    return None
                if message.get("terminal") and lines.fds:
                    self._attach(lines.fds.pop())
                elif isinstance(message.get("stopped"), int):
                    stop(message["stopped"])
                elif isinstance(message.get("exit"), int):
                    self._drain()
                    return message["exit"]
                continue
            if self.master in ready:
                self._output()
            if self.tty_in in ready:
                try:
                    self.pending = os.read(self.tty_in, 4096)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # the terminal hung up: the task gets no more keys
                    self.saved = None
            if self.master in writable:
                self._input()

    def _attach(self, master: int) -> None:
        for fd in [self.master] if self.master is not None else []:
            os.close(fd)
        self.master = master
        os.set_blocking(master, False)
        self.resize()
        self.raw()

    def _output(self) -> bool:
        """What the task wrote, to the caller's terminal; whether there was any."""
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return False
        except OSError:  # EIO: every process of the sandbox closed its end
            data = b""
        if not data:
            os.close(self.master)
            self.master = None
            return False
        view = memoryview(data)
        with contextlib.suppress(OSError):  # a hung-up terminal: the output goes nowhere
            while view:
                view = view[os.write(self.tty_out, view) :]
        return True

    def _input(self) -> None:
        try:
            written = os.write(self.master, self.pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(self.pending)
        self.pending = self.pending[written:]

    def _drain(self) -> None:
        """The task's last output (the sandbox has ended: the pty reads to its end)."""
        while self.master is not None and self._output():
            pass


class SharedTerminal:
    """The caller's controlling terminal, which the task shares in a run in the caller's
    own process: held before the task starts, given back once it has ended.

    The task may do to it what any job of the session may: a process group of its own
    in the foreground (setpgid, tcsetpgrp), TOSTOP, -echo or other modes, exclusive
    mode (TIOCEXCL). Then a line sandgate writes to the terminal (its summary; while the
    task runs, a "killing the task" line, printed before the kill) stopped sandgate with
    SIGTTOU, its gateway and disk watcher with it, while the task ran on; and the shell
    got its terminal back changed. So (docs/sandbox.md, "The terminal"):
    - `of_caller`, before the task starts: the terminal's state (its foreground group,
      modes, exclusive mode), on a descriptor of its own (/dev/tty);
    - `guard`, once the init is forked (the task keeps the defaults): SIGTTOU,
      SIGTTIN and SIGTSTP ignored by this process for the rest of its life (it ends with the run),
      so its writes, tcsetpgrp and tcsetattr go through wherever the foreground is,
      and a read of the terminal by a task process still in this process group while
      another group of the task has the foreground (the kernel then stops the
      reader's whole group: kill_pgrp, no permission check) stops the task's process,
      not this one (the sandbox's outer init ignores both as well: init.py
      TTY_STOPS); its gateway, disk watcher and stop-grace timer go on;
    - `give_back`, once every process of the task is gone and before anything is
      printed: output resumed (TCOON); the foreground back to the group that had it,
      if the one that has it now is empty (a live group is a job the shell put there);
      the modes as they were, if this process's group had the foreground at the start
      and has it again (else the shell's foreground job owns them); the window size
      as it was, on the same condition; exclusive mode cleared unless it was set before.

    The window size (TIOCSWINSZ, which seccomp lets through: tmux or script in the
    sandbox set their own ptys' sizes with it) is the terminal's one size, not a job's:
    a task's 1x1 stayed the shell's, readline's and vim's after the run, until the user
    resized the window. sandgate cannot tell the task's TIOCSWINSZ from the user's
    resize during the run: both set that one size and signal SIGWINCH to the
    foreground group, which is sandgate's own while the task's first process runs in
    it (so "the last size seen while sandgate's group had the foreground" would keep
    the task's). So the size from before the run comes back, and a resize by the user
    during the run is undone with the task's: the next resize sets it right, as it
    would have after the task's. In a background run it is left as it is: the terminal
    is the foreground job's, and a restore would resize it under that job.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.foreground = os.tcgetpgrp(fd)
        self.ours = self.foreground == os.getpgrp()
        self.modes = termios.tcgetattr(fd)
        self.size = _window_size(fd)
        self.exclusive = _exclusive(fd)

    @classmethod
    def of_caller(cls) -> SharedTerminal | None:
        """This process's controlling terminal and its state now; None without one."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ENXIO: no controlling terminal
            return None
        try:
            return cls(fd)
        except (OSError, termios.error):
            os.close(fd)
            return None

    def guard(self) -> None:
        for signum in TTY_STOPS:
            signal.signal(signum, signal.SIG_IGN)

    def give_back(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError, termios.error):
            termios.tcflow(self.fd, termios.TCOON)
        with contextlib.suppress(OSError, termios.error):
            # Output stopped by a STOP character (IXON: the task may remap it and make
            # the terminal send it, in its answer to a query) is not what TCOON
            # restarts: turning IXON off does (n_tty_set_termios), then back as it was.
            now = termios.tcgetattr(self.fd)
            if now[0] & termios.IXON:
                termios.tcsetattr(self.fd, termios.TCSANOW, [now[0] & ~termios.IXON, *now[1:]])
                termios.tcsetattr(self.fd, termios.TCSANOW, now)
        with contextlib.suppress(OSError):
            now = os.tcgetpgrp(self.fd)
            if now != self.foreground and not _still_used(now, GROUP_GONE_S):
                os.tcsetpgrp(self.fd, self.foreground)
        with contextlib.suppress(OSError, termios.error):
            ours_again = self.ours and os.tcgetpgrp(self.fd) == os.getpgrp()
            if ours_again and termios.tcgetattr(self.fd) != self.modes:
                termios.tcsetattr(self.fd, termios.TCSANOW, self.modes)
        with contextlib.suppress(OSError):
            ours_again = self.ours and os.tcgetpgrp(self.fd) == os.getpgrp()
            if ours_again and self.size is not None and _window_size(self.fd) != self.size:
                fcntl.ioctl(self.fd, termios.TIOCSWINSZ, self.size)
        if not self.exclusive:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, termios.TIOCNXCL)
        os.close(self.fd)
        self.fd = -1


# The stops a task can make the kernel send to the process group it shares with the
# runner, by reading (SIGTTIN) or writing, tcsetattr, tcsetpgrp (SIGTTOU) from the
# background, and SIGTSTP: the suspend key, which the task may remap (tcsetattr) to a
# key the user types or to one the terminal itself sends in its answer to a query the
# task writes (ESC [ c is answered ESC [ ? 1 ; 2 c: its `c`). A stopped runner
# enforces nothing (its disk watcher, stop-grace timer, gateway) while a task process
# in a group of its own runs on, and stopping every task process first is no freeze
# (a process continues itself with a timer's SIGCONT): ^Z stops the task's processes
# in the job, not sandgate.
TTY_STOPS = (signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP)


def _window_size(fd: int) -> bytes | None:
    """The terminal's struct winsize (rows, columns and pixels), as TIOCSWINSZ takes it."""
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
    except OSError:  # a terminal with no size to give back
        return None


def _exclusive(fd: int) -> bool:
    try:
        return int.from_bytes(fcntl.ioctl(fd, TIOCGEXCL, bytes(4)), "little") != 0
    except OSError:  # a kernel before 3.8 cannot say: clear it after the task
        return False


# The task's processes die with its PID namespace, just after its init: the group
# the task put in the foreground empties within milliseconds of the run's end.
GROUP_GONE_S = 0.5


def _still_used(pgrp: int, within: float) -> bool:
    """Whether process group `pgrp` still has a process after up to `within` seconds
    (a job the shell put in the foreground); False as soon as it is empty."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgrp, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # EPERM: a live process of someone else's
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.01)
