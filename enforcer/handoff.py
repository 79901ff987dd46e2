"""`sandgate run --gateway ...` handed to a warm runner of the gateway service.

The service keeps `--warm N` runners started (enforcer/zygote.py): processes that
have imported everything an attached run needs and wait on a root-only socket
beside the control socket, `<control>.z-<hex>`. Run as root, `sandgate run
--gateway` finds one before it imports anything else (argparse, the sandbox's
modules), sends it its arguments, environment and working directory with its
stdin, stdout and stderr (SCM_RIGHTS), then only forwards SIGINT, SIGTERM and
SIGHUP and waits for the exit code. The runner's interpreter start and imports
are off the task's start; the runner is the same code as before, in another
process. With no warm runner, or none that takes the run, nothing has happened
yet and the command runs as before, in this process.

This module imports only what the interpreter has loaded at its start (os, sys)
and three C modules: _socket, _signal and _json, not their Python wrappers. socket,
signal and json import enum, re, selectors and functools with them: ~4 ms of a
client's start on a quiet machine, more than the hand-over itself. The protocol,
JSON lines (the same bytes json.dumps writes):

    client -> runner   {"argv": [...], "env": {...}, "cwd": "..."} + a token (fd)
    runner -> client   {"claimed": true}: this runner, and no other, may run it
    client -> runner   {"stdio": [0, 1, 2]} + fds 0, 1, 2; with, when some of them is
                       the client's controlling terminal, "terminal": [which] and
                       "foreground": whether the client is its foreground job
    runner -> client   {"taken": true}, or {"refused": why}: the client runs it itself
    client -> runner   {"signal": N}, any number ({"signal": SIGCONT, "foreground": F}
                       on a terminal)
    runner -> client   on a terminal: {"terminal": true} + the task's pty (to relay),
                       then {"stopped": N} whenever the task stopped (the client stops)
    runner -> client   {"exit": N}, the task's exit code (or sandgate's: 2, 125)

The token decides who runs the task when a runner is slow to answer (stopped,
wedged): the read end of a pipe that holds one byte. A runner claims the run by
reading that byte before anything else; a client that has waited CLAIM_TIMEOUT_S
reads it back itself and goes on to the next runner, or runs the task in-process.
Exactly one of them gets the byte, so a runner that comes to the request after its
client gave up finds the pipe empty and runs nothing; a client that finds it empty
waits for that runner's answer, however long it takes (a refusal, or the runner's
end without a word, means nothing ran: it goes on). Stdio goes only to a runner
that claimed the run: one that never reads its socket holds no copy of the
caller's stdout open (a pipe's reader would wait for an EOF that never comes).

The runner kills the task when this connection ends (this process died), as a
runner's death kills it. Job control: the task is not in this terminal's session
(it runs in the runner's), so the terminal's ^Z stops this process alone; this
process first sends the SIGTSTP (SIGTTIN, SIGTTOU) on, and the runner stops the
task's process group with it, as the terminal stops the task of a run in-process;
the SIGCONT that resumes this process goes on too. When this process's stdio has
its controlling terminal, the task gets a pty of its own that this process relays
(enforcer/terminal_relay.py; docs/sandbox.md, "The terminal", has why and what
differs from a run in-process).
"""

import _json
import _signal
import _socket
import os
import sys

SUFFIX = ".z-"  # <control socket><SUFFIX><hex>: one warm runner's socket
LOCK_SUFFIX = ".runners"  # <control socket><LOCK_SUFFIX>: held (flock) by the one pool
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
# and SIGCONT: the task's process group's
STOPS = (_signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU)
# A live runner claims a run within a few ms, tens under load (docs/operations.md,
# "Warm runners"); past this, it is stopped or wedged and the next one is tried.
CLAIM_TIMEOUT_S = 0.2
DEFAULT_CONTROL = "/run/sandgate/gateway.sock"  # as control.DEFAULT_SOCKET
MAX_LINE = 1 << 20
STDIO_LINE_MAX = 256  # {"stdio": [0, 1, 2], "terminal": [...], "foreground": ...}
_FD_SPACE = _socket.CMSG_SPACE(4)  # one descriptor: the task's pty (only ever that)
EXIT_SETUP = 125
# Set by the `sandgate` command's native front (enforcer/cli/sandgate.c) when it offered
# the run to the runners already and none took it; never passed on to the task.
TRIED = "SANDGATE_HANDOFF_TRIED"


def hand_off(argv: list[str]) -> None:
    """Exit with the code of the run a warm runner took; return when none took it
    (not root, not `run --gateway`, no warm runner, or a refusal)."""
    if os.environ.pop(TRIED, None) is not None:  # by the native front, which runs us now
        return
    if argv[:1] != ["run"] or os.geteuid() != 0:
        return
    control = control_path(argv[1:])
    if control is None:
        return
    for path in runner_sockets(control):
        conn = _offer(path, argv)
        if conn is not None:
            code = _follow(conn)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def runner_sockets(control: str) -> list[str]:
    """The sockets of the runners waiting for runs on `control` (`<control>.z-<hex>`);
    a stale one (its runner died) refuses a connect at once."""
    folder, name = os.path.split(control)
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return []
    return [os.path.join(folder, e) for e in entries if e.startswith(name + SUFFIX)]


def control_path(args: list[str]) -> str | None:
    """The control socket `--gateway` names, as argparse reads it (nargs="?"), or
    None when the options before `--` have none (or ask for help)."""
    for i, arg in enumerate(args):
        if arg == "--" or arg in ("-h", "--help"):
            return None
        if arg.startswith("--gateway="):
            return arg.partition("=")[2]
        if arg == "--gateway":
            value = args[i + 1] if i + 1 < len(args) else None
            if value is not None and not value.startswith("-"):
                return value
            return os.environ.get("SANDGATE_CONTROL", DEFAULT_CONTROL)
    return None


def _offer(path: str, argv: list[str]) -> _socket.socket | None:
    """A connection to the runner at `path` that took the run, or None."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    token = -1
    try:
        conn.settimeout(CLAIM_TIMEOUT_S)
        conn.connect(path)
        token, filled = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.write(filled, b"!")
        os.close(filled)
        request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
        _send_fds(conn, encode(request).encode() + b"\n", [token])
        lines = _Lines(conn)
        try:
            reply = lines.next()
        except TimeoutError:
            if os.read(token, 1):  # taken back: that runner can never run it
                raise
            conn.settimeout(None)  # it claimed the run in time: its answer is coming
            reply = lines.next()
        conn.settimeout(None)
        if reply is not None and reply.get("claimed"):
            _send_fds(conn, _stdio_line(), [0, 1, 2])
            reply = lines.next()
        if reply is not None and reply.get("taken"):
            return conn
    except (OSError, ValueError):  # no runner there (any more), a slow or a broken one
        pass
    finally:
        if token >= 0:
            os.close(token)
    conn.close()
    return None


def _controlling_terminal() -> tuple[list[int], bool]:
    """Which of stdin, stdout and stderr is this process's controlling terminal
    (tcgetpgrp answers only for that one), and whether this process's group is its
    foreground job. Three ioctls: ENOTTY at once for a pipe or a file."""
    terminal, foreground = [], True
    for fd in (0, 1, 2):
        try:
            group = os.tcgetpgrp(fd)
        except OSError:
            continue
        terminal.append(fd)
        foreground = group == os.getpgrp()
    return terminal, foreground


def _stdio_line() -> bytes:
    terminal, foreground = _controlling_terminal()
    if not terminal:
        return b'{"stdio": [0, 1, 2]}\n'
    return (
        encode({"stdio": [0, 1, 2], "terminal": terminal, "foreground": foreground}).encode()
        + b"\n"
    )


def _follow(conn: _socket.socket) -> int:
    terminal, _ = _controlling_terminal()
    relay = None
    if terminal:  # the task has a pty of its own, which this process relays
        from sandgate.enforcer.terminal_relay import TerminalRelay

        relay = TerminalRelay(terminal)

    def forward(signum, _frame) -> None:
        message = {"signal": int(signum)}
        if signum == _signal.SIGCONT and relay is not None:
            relay.resumed()  # raw again, if in the foreground
            message["foreground"] = relay.in_foreground()
        try:  # noqa: SIM105 - contextlib is one import more on the timed path
            conn.sendall(encode(message).encode() + b"\n")
        except OSError:
            pass

    def stop(signum, _frame) -> None:
        forward(signum, None)  # the task first: stopped while this process is
        if relay is not None:
            relay.restore()  # the shell gets its terminal as it left it
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # stops here, until SIGCONT (not at all in an orphaned group)
        _signal.signal(signum, stop)
        forward(_signal.SIGCONT, None)

    for signum in (*FORWARDED, _signal.SIGCONT):
        _signal.signal(signum, forward)
    for signum in STOPS:
        _signal.signal(signum, stop)
    lines = _Lines(conn)
    if relay is not None:
        _signal.signal(_signal.SIGWINCH, lambda _s, _f: relay.resize())
        try:
            code = relay.serve(lines, lambda signum: stop(signum, None))
        finally:
            relay.restore()
        return _runner_gone() if code is None else code
    while True:
        message = lines.next_or_none()
        if message is None:
            return _runner_gone()
        if isinstance(message.get("exit"), int):
            return message["exit"]


def _runner_gone() -> int:
    print("sandgate: the gateway service's runner went away", file=sys.stderr)
    return EXIT_SETUP


def _send_fds(conn: _socket.socket, data: bytes, fds: list[int]) -> None:
    """socket.send_fds: `data` with copies of `fds` (SCM_RIGHTS, C ints)."""
    rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    conn.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


# json.dumps and json.loads are these two C functions once json is imported (json
# sets them up so, with these arguments), without importing json.
_encoder = _json.make_encoder(
    None, None, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
)


class _DecodeAs:
    """What json.JSONDecoder() passes _json.make_scanner: strict, no hooks."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int

    @staticmethod
    def parse_constant(name: str):  # NaN, Infinity: json.loads takes them; no message has one
        raise ValueError(f"not JSON: {name}")


_scanner = _json.make_scanner(_DecodeAs())


def encode(value) -> str:
    """json.dumps(value)."""
    return "".join(_encoder(value, 0))


def decode(text: str):
    """json.loads(text) for a message (ValueError if it is not one JSON value)."""
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        value, end = _scanner(text, start)
    except StopIteration:
        raise ValueError("not JSON") from None
    if text[end:].strip(" \t\r\n"):
        raise ValueError("extra data after the JSON value")
    return value


class _Lines:
    """JSON objects, one a line, from a socket, and the descriptors sent with them."""

    def __init__(self, conn: _socket.socket):
        self.conn, self.buffer = conn, b""
        self.fds: list[int] = []

    def ready(self) -> bool:
        """Whether a whole line is here already (next() does not wait)."""
        return b"\n" in self.buffer

    def next_or_none(self) -> dict | None:
        """The next object; None at the end, or for anything else (the runner's gone)."""
        try:
            return self.next()
        except (OSError, ValueError):
            return None

    def next(self) -> dict | None:
        """The next object, None at the end; ValueError for anything else."""
        while b"\n" not in self.buffer:
            chunk, ancillary, _flags, _addr = self.conn.recvmsg(65536, _FD_SPACE)
            for level, kind, data in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    self.fds += [
                        int.from_bytes(data[i : i + 4], sys.byteorder)
                        for i in range(0, len(data) - 3, 4)
                    ]
            if not chunk:
                return None
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE:
                raise ValueError("over-long line")
        line, _, self.buffer = self.buffer.partition(b"\n")
        message = decode(line.decode())
        if not isinstance(message, dict):
            raise ValueError("not an object")
        return message
