"""Warm runners for `sandgate run --gateway`: a pool of processes forked from one zygote.

    sandgate runners --control SOCKET --warm N        a pool of its own (its own unit)
    python -I -m sandgate.enforcer.zygote --control SOCKET --service-pid PID --warm N
                                                      the pool a gateway service embeds

The zygote imports the whole attached-run path (argparse, `sandgate run`'s parser,
the sandbox's modules) once, then keeps N runners forked (a fork costs about a
millisecond, a fresh interpreter with these imports a few hundred under load). A
runner listens on `<control>.z-<hex>` (mode 0600, root only) and waits for one
`sandgate run --gateway` to hand it a run (enforcer/handoff.py has the protocol). It takes the first caller that is root
(SO_PEERCRED) and in its own mount namespace (the paths the caller names must mean
the same files here); anyone else is refused and it waits on. Then it becomes that
caller: its stdin, stdout, stderr, environment and working directory, and runs
exactly what `sandgate run --gateway` runs in-process (enforcer/attach.py: the
attach request, the sandbox, detach). While it waits, a runner makes its task's
cgroup (`sandgate-warm-<hex>`, under the pool's) and forks its init's process into
it (attach.InitSeed): a run then writes its limits there, and migrates nothing.
The caller's end kills the task (attach's `caller`); its signals are forwarded to
it. The pool forks the next runner as soon as one dies or loses its socket, and as
soon as one is taken if none waits then; while another waits, only once the taken
one's run has started (Pool._fill says why).

One pool per control socket: it holds `<control>.runners` (flock, its pid inside),
so the service's embedded zygote steps aside for a `sandgate runners` that serves
its socket, and a pool removes the sockets a dead one left only while it holds it.

Lifetimes: the waiting runners die with the zygote, and the embedded zygote with its
service (PR_SET_PDEATHSIG); once a runner has taken a run it is that run's runner,
outlives its pool, and like any runner outlives a restart of the service (it asks
the new one to `resume`). Each runner is in a session of its own, so a ^C at the
terminal of the pool (or of the service) never reaches a task.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

from sandgate.enforcer import attach, handoff  # noqa: F401 - imported ahead: the point of a warm runner
from sandgate.enforcer.cli import build_parser, drop_what_stderr_cannot_take, run_command
from sandgate.enforcer.cli import run as cli_run
from sandgate.enforcer.sandbox import (
    cgroup,
    prepare,
    spec,
    terminal,  # noqa: F401 - a run on a terminal: its PID 1's
)
from sandgate.enforcer.sandbox import options as sandbox_options
from sandgate.enforcer.sandbox.inherit import Inherited
from sandgate.proxy.telemetry import summary  # noqa: F401 - the summary table, printed at the end

PR_SET_PDEATHSIG = 1
SO_PEERPIDFD = 77  # <asm-generic/socket.h> (Linux 6.5); Python has no name for it
REQUEST_TIMEOUT_S = 5.0
CHECK_S = 5.0  # how often a pool looks whether its runners' sockets are still there
RESPAWN_DELAY_S = 1.0  # after a runner that died within this long of its fork
REFILL_AFTER_S = 1.0  # a taken runner's replacement, while another waits: by then at the latest
_libc = ctypes.CDLL(None)


class Caller:
    """The `sandgate` process that handed a run over: the signals it forwards, its end."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self._buffer = b""
        self.exited = False
        self._own_stderr = -1  # the pool's, while the caller's is fd 2 (take_stdio)
        self.terminal: list[int] = []  # which of its stdio is its controlling terminal
        self.foreground = True  # whether it is that terminal's foreground job (its last word)

    def fileno(self) -> int:
        return self.conn.fileno()

    def signals(self) -> list[int] | None:
        """What it forwarded since the last call; None once it is gone (or talks nonsense)."""
        try:
            data = self.conn.recv(4096)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > 4096:
            return None
        forwarded = []
        for line in lines:
            try:
                message = json.loads(line)
                signum = message.get("signal")
            except (ValueError, AttributeError):
                return None
            if isinstance(message.get("foreground"), bool):  # with a SIGCONT: where it resumed
                self.foreground = message["foreground"]
            if signum in (*handoff.FORWARDED, *handoff.STOPS, signal.SIGCONT):
                forwarded.append(signum)
        return forwarded

    def send(self, **message) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall(json.dumps(message).encode() + b"\n")

    def send_fd(self, fd: int, **message) -> None:
        """`message` with `fd` (which is closed here): the task's pty, to relay."""
        try:
            socket.send_fds(self.conn, [json.dumps(message).encode() + b"\n"], [fd])
        except OSError:
            pass
        finally:
            os.close(fd)

    def take_stdio(self, fds: list[int]) -> None:
        """Make the caller's stdin, stdout and stderr ours (0, 1, 2)."""
        self._own_stderr = os.dup(2)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)

    def exit(self, code: int) -> None:
        """Tell the caller its exit code, and let go of its stdio: what this runner does
        after (the task cgroup's removal) is nobody's wait, neither the caller's nor a
        reader of its output waiting for the end of it (`$(sandgate run ...)`). A later
        warning goes to the pool's stderr."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.send(exit=code)
        self.exited = True
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(self._own_stderr if self._own_stderr >= 0 else null, 2)
        os.close(null)


def peer(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED, as of its connect)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def of_peer(conn: socket.socket, read):
    """`read(pid)` of the process at the other end, which connected: by the pid of its
    pidfd (SO_PEERPIDFD, taken at its connect), and only if that process is still
    there after the read. A pid alone may be another process's by the time /proc is
    read (the caller died, its pid was reused); a pid is not reused while its process
    (or its zombie) is there. ProcessLookupError when it went away; OSError when the
    kernel has no SO_PEERPIDFD (< 6.5): the caller is refused, and runs the task itself."""
    pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    try:
        pid = _pidfd_pid(pidfd)
        if pid <= 0:  # -1: it has exited; 0: in a PID namespace this one cannot see
            raise ProcessLookupError(f"the caller's process is gone (pidfd pid {pid})")
        value = read(pid)
        signal.pidfd_send_signal(pidfd, 0)  # ProcessLookupError: gone meanwhile
        return value
    finally:
        os.close(pidfd)


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                value = line[4:].strip()
                if not value.lstrip("-").isdigit():
                    break
                return int(value)  # -1: the process has exited (the caller refuses it)
    raise OSError(f"fd {pidfd} is not a pidfd")


def restrictions(pid: int | str = "self") -> tuple[int, int, int]:
    """(capabilities NOT in the bounding set, no_new_privs, seccomp mode) of a process:
    what a sandbox builder may lack (a systemd unit's CapabilityBoundingSet=,
    NoNewPrivileges=, RestrictNamespaces= and SystemCallFilter= set them)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    with open("/proc/sys/kernel/cap_last_cap") as f:
        every = (1 << (int(f.read()) + 1)) - 1
    missing = every & ~int(fields.get("CapBnd", "0"), 16)
    return missing, int(fields.get("NoNewPrivs", "0")), int(fields.get("Seccomp", "0"))


def _weaker(ours: tuple[int, int, int], theirs: tuple[int, int, int]) -> bool:
    """Whether a process restricted as `ours` may not do all that one as `theirs` may."""
    return bool(ours[0] & ~theirs[0]) or ours[1] > theirs[1] or ours[2] > theirs[2]


def refusal(conn: socket.socket) -> str | None:
    """Why this peer may not hand a run over, or None: root, in our mount namespace,
    and not able to do more than we can (then it runs the task itself)."""
    pid, uid, _gid = peer(conn)
    if uid != 0:
        return f"uid {uid} (pid {pid}) is not root"
    try:
        theirs, their_mnt = of_peer(conn, lambda p: (restrictions(p), os.stat(f"/proc/{p}/ns/mnt")))
        ours, our_mnt = restrictions(), os.stat("/proc/self/ns/mnt")
    except ProcessLookupError:
        return f"pid {pid} went away"
    except (OSError, ValueError) as e:
        return f"pid {pid}: cannot read its status and mount namespace: {e}"
    if _weaker(ours, theirs):
        return f"pid {pid} may do more than this runner (capabilities, no_new_privs, seccomp)"
    if (their_mnt.st_dev, their_mnt.st_ino) != (our_mnt.st_dev, our_mnt.st_ino):
        return f"pid {pid} is in another mount namespace"
    return None


def _request(conn: socket.socket) -> tuple[dict, int]:
    """The caller's request and its token (enforcer/handoff.py), or ValueError."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    data, fds = b"", []
    try:
        while b"\n" not in data:
            chunk, received, _flags, _addr = socket.recv_fds(conn, 65536, 1)
            fds += received
            if not chunk or len(data) + len(chunk) > handoff.MAX_LINE:
                raise ValueError("no complete request")
            data += chunk
        line, _, rest = data.partition(b"\n")
        request = json.loads(line)
        argv, env, cwd = request["argv"], request["env"], request["cwd"]
        if not (
            isinstance(argv, list)
            and all(isinstance(a, str) for a in argv)
            and argv[:1] == ["run"]
            and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(cwd, str)
            and len(fds) == 1
            and not rest  # nothing before our answer
        ):
            raise ValueError("a malformed request")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        for fd in fds:
            os.close(fd)
        raise ValueError(str(e) or type(e).__name__) from None
    return request, fds[0]


def _stdio(conn: socket.socket) -> tuple[list[int], list[int], bool]:
    """The caller's stdin, stdout and stderr, which it sends once we claimed the run,
    which of them is its controlling terminal, and whether it is that terminal's
    foreground job (handoff.py); ValueError if it does not (in REQUEST_TIMEOUT_S)."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    fds = []
    try:
        line, fds, _flags, _addr = socket.recv_fds(conn, handoff.STDIO_LINE_MAX, 3)
        message = json.loads(line)
        terminal = message.get("terminal", [])
        foreground = message.get("foreground", True)
        if (
            message.get("stdio") != [0, 1, 2]
            or len(fds) != 3
            or not line.endswith(b"\n")
            or set(message) - {"stdio", "terminal", "foreground"}
            or not isinstance(terminal, list)
            or not all(type(fd) is int and fd in (0, 1, 2) for fd in terminal)
            or not isinstance(foreground, bool)
        ):
            raise ValueError("no stdio")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        for fd in fds:
            os.close(fd)
        raise ValueError(str(e) or type(e).__name__) from None
    return fds, sorted(set(terminal)), foreground


def take(listener: socket.socket) -> tuple[socket.socket, dict]:
    """The first caller that may hand a run over and has not given up on this runner
    (its run is claimed: told so), with its request."""
    while True:
        conn, _ = listener.accept()
        why = refusal(conn)
        if why is None:
            try:
                request, token = _request(conn)
            except ValueError as e:
                why = str(e)
            else:
                if claim_run(token):
                    Caller(conn).send(claimed=True)
                    return conn, request
                conn.close()  # it runs elsewhere, having waited for us too long
                continue
        print(f"sandgate runner: refused a caller: {why}", file=sys.stderr, flush=True)
        conn.close()


def claim_run(token: int) -> bool:
    """Whether this runner, not its caller, took the one byte of the caller's token
    (enforcer/handoff.py): then the run is ours, and the caller waits for our answer."""
    try:
        os.set_blocking(token, False)  # a caller's pipe it kept writable never holds us
        return os.read(token, 1) != b""
    except OSError:
        return False
    finally:
        os.close(token)


def become(conn: socket.socket, request: dict, control: str, seed=None) -> int:
    """Run the caller's `sandgate run --gateway` as the caller would have; `seed`
    (attach.InitSeed) is the init this runner forked ahead, in the task's cgroup."""
    os.environ.clear()
    os.environ.update(request["env"])
    caller = Caller(conn)
    try:
        os.chdir(request["cwd"])
    except OSError as e:
        caller.send(refused=f"cannot enter {request['cwd']}: {e.strerror}")
        return 0
    try:  # its umask and limits too: the spec's (options.from_arguments reads them here)
        of_peer(conn, Inherited.of_process).apply()
    except (OSError, ValueError) as e:  # e.g. a hard limit above ours, and no CAP_SYS_RESOURCE
        caller.send(refused=f"cannot take the caller's umask and resource limits: {e}")
        return 0
    try:  # sent since our claim (while we did the above)
        fds, caller.terminal, caller.foreground = _stdio(conn)
    except ValueError as e:
        caller.send(refused=f"no stdio: {e}")
        return 0
    caller.take_stdio(fds)
    try:
        args = (_run_parser or build_parser("run")).parse_args(request["argv"])
    except SystemExit as e:  # a usage error, printed on the caller's stderr: its answer
        caller.send(taken=True)
        caller.exit(e.code if isinstance(e.code, int) else 2)
        return 0
    if args.gateway is None or os.path.abspath(args.gateway) != control:
        caller.send(refused="another gateway service")
        return 0
    caller.send(taken=True)
    conn.setblocking(False)
    code = run_command(lambda a: cli_run._run_attached(a, caller, seed), args)
    if not caller.exited:  # a usage or setup error, or a run that never started
        caller.exit(code)
    return 0


def runner(listener: socket.socket, path: str, control: str) -> int:
    """In a child of the zygote: wait for a caller, then be its runner."""
    seed = None
    try:
        seed = _seed(path)
        with contextlib.suppress(Exception):  # a rehearsal's failure is no run's
            rehearse(control)  # after the seed's fork: the pages it copies are ours alone
        listener.listen(8)
        _tell(f"ready {path}")
        conn, request = take(listener)
        # "taken" before the socket goes: the pool reads a missing socket as one
        # somebody removed (Pool._check_sockets), unless this line came first
        _tell(f"taken {path}")
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    _libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)  # the run's now: it outlives the pool
    os.close(_report_fd)
    try:
        return become(conn, request, control, seed)
    finally:
        if seed is not None:
            seed.discard()  # unless the run made it its init (then its cgroup went with the run)


def rehearse(control: str) -> None:
    """A run's first steps, once, keeping nothing, while this runner has no caller yet.
    A runner shares the pool's memory copy-on-write: the first write to each page (a
    reference count, a cache) copies it, ~5 us a page on this project's host, and the
    options of a run alone touch ~470 pages (2.9 ms in a fresh fork, 0.5 once
    rehearsed: docs/performance.md, "Session 27"). Reads only."""
    argv = ["run", "--gateway", control, "--no-workspace", "--", "true"]
    args = (_run_parser or build_parser("run")).parse_args(argv)
    _sandbox, limits = sandbox_options.from_arguments(args, list(attach.STATE_DIRS))
    prepare.missing_features(limits)
    json.loads(json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}))


def _seed(path: str):
    """The init of this runner's run, forked now into a task cgroup made now
    (attach.InitSeed), named for the runner's socket; None (one line on the pool's
    stderr) where none can be made: the run then makes and joins its own."""
    try:
        made = cgroup.TaskCgroup.ahead(ahead_name(path))
    except cgroup.CgroupError as e:
        print(f"sandgate runner: no task cgroup made ahead: {e}", file=sys.stderr, flush=True)
        return None
    try:
        return attach.InitSeed(made)
    except OSError as e:
        print(f"sandgate runner: cannot fork the next init: {e}", file=sys.stderr, flush=True)
        made.remove()
        return None


def ahead_name(path: str) -> str:
    """The cgroup a waiting runner made ahead, named for its socket `<control>.z-<hex>`."""
    return cgroup.AHEAD_PREFIX + path.rpartition(handoff.SUFFIX)[2]


_report_fd = -1  # a runner's end of its pool's report pipe (set in the child)


def _tell(line: str) -> None:
    """One line to the pool (a pipe: short writes are atomic, runners share it)."""
    os.write(_report_fd, line.encode() + b"\n")


class PoolError(Exception):
    """Why this process cannot keep warm runners (the one line a caller prints)."""


@dataclass
class _Waiting:
    pidfd: int
    inode: int  # of its socket: a socket removed, or replaced, is one nobody reaches
    born: float


@dataclass
class _Starting:
    pidfd: int  # a taken runner's: readable once it has exited (a short task's run is over)
    until: float  # monotonic: then its run's start is over anyway


class Pool:
    """`warm` runners waiting on `<control>.z-<hex>`, each forked from this process;
    one more as soon as one dies or its socket is removed, and for one a run took
    once that run's start is over (`_fill`). Each runner reports `ready PATH` and
    `taken PATH` on a pipe; the pool passes them on, and `gone PATH` for one that died
    waiting, to `report` (the service's stdout for an embedded pool, nothing for
    `sandgate runners`)."""

    def __init__(self, control: str, warm: int, report=None):
        self.control, self.warm, self.report = control, warm, report
        self.waiting: dict[str, _Waiting] = {}
        self.starting: dict[str, _Starting] = {}  # taken runners whose replacement waits
        self._reports, self._writer = os.pipe()
        os.set_blocking(self._reports, False)
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._reports, selectors.EVENT_READ)
        self._not_before = 0.0  # a runner that died young: wait before the next fork

    def serve(self) -> None:
        """Forever (until a signal's exception): keep `warm` runners waiting."""
        checked = time.monotonic()
        while True:
            delay = self._fill()
            ready = self._selector.select(min(CHECK_S, delay) if delay else CHECK_S)
            self._read_reports()  # first: a runner that reported `taken` is not gone
            for key, _ in ready:
                if key.data in self.starting:
                    self._started(key.data)
                elif key.data is not None:
                    self._died(key.data)
            if time.monotonic() - checked >= CHECK_S:
                self._check_sockets()
                checked = time.monotonic()

    def close(self) -> None:
        """The waiting runners go (they would with this process: PR_SET_PDEATHSIG),
        and their sockets with them; runners with a run go on."""
        for path, waiting in self.waiting.items():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(waiting.pidfd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(waiting.pidfd)
            _remove_ahead(path)
        self.waiting.clear()
        for path in list(self.starting):
            self._started(path)  # its run goes on: only our pidfd goes

    def _fill(self) -> float:
        """Fork runners up to `warm`; the seconds to wait before the next may be
        forked, or 0. While a taken runner's run starts and another runner waits,
        its replacement waits: a fork and the new runner's seed (its cgroup, the
        init's fork) are ~5 ms of the two cores the start runs on (bench_attach
        --breakdown). It is forked when that runner exits (a short task: runs back
        to back) or REFILL_AFTER_S after the take (a long one)."""
        now = time.monotonic()
        for path, starting in list(self.starting.items()):
            if now >= starting.until:
                self._started(path)
        while len(self.waiting) < self.warm:
            delay = self._not_before - time.monotonic()
            if delay > 0:
                return delay
            if self.starting and self.waiting:
                return max(0.001, min(s.until for s in self.starting.values()) - now)
            self._fork()
        return 0.0

    def _fork(self) -> None:
        path = f"{self.control}{handoff.SUFFIX}{secrets.token_hex(4)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from the start: no moment others could connect
        try:
            listener.bind(path)
            inode = os.stat(path).st_ino
        except OSError as e:
            print(f"sandgate runners: cannot listen on {path}: {e}", file=sys.stderr, flush=True)
            listener.close()
            self._not_before = time.monotonic() + RESPAWN_DELAY_S
            return
        finally:
            os.umask(old_umask)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._be_runner(listener, path, me)
        listener.close()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already died (and reaped: SIGCHLD is ignored)
            self._gone(path, time.monotonic())
            return
        self.waiting[path] = _Waiting(pidfd, inode, time.monotonic())
        self._selector.register(pidfd, selectors.EVENT_READ, path)

    def _be_runner(self, listener: socket.socket, path: str, pool: int) -> None:
        """In the child: never returns."""
        global _report_fd
        code = 125
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)  # the pool's handlers are not ours
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            os.setsid()  # a ^C at the pool's terminal never reaches a run
            if os.getppid() == pool:
                self._selector.close()
                for fd in (self._reports, *(w.pidfd for w in self.waiting.values()), *_inherited):
                    os.close(fd)  # the lock, above all: a run may outlive the pool
                _report_fd = self._writer
                code = runner(listener, path, self.control)
        except BaseException as e:  # noqa: BLE001 - a runner must go, never return here
            print(f"sandgate runner: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _read_reports(self) -> None:
        while True:
            try:
                chunk = os.read(self._reports, 65536)
            except BlockingIOError:
                break
            if not chunk:  # cannot be while the pool holds the write end; never spin
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            word, _, path = line.decode(errors="replace").partition(" ")
            if word == "taken" and path in self.waiting:
                waiting = self.waiting.pop(path)  # the run's now: only its start is ours to see
                self.starting[path] = _Starting(waiting.pidfd, time.monotonic() + REFILL_AFTER_S)
                if not self.waiting:
                    self._started(path)  # nobody waits: its replacement is forked at once
            if word in ("ready", "taken"):
                self._report(f"{word} {path}")

    def _started(self, path: str) -> None:
        """A taken runner's run has started (or ended): its replacement may be forked."""
        starting = self.starting.pop(path)
        self._selector.unregister(starting.pidfd)
        os.close(starting.pidfd)

    def _died(self, path: str) -> None:
        """A runner died before a run took it."""
        waiting = self.waiting.pop(path, None)
        if waiting is not None:
            self._selector.unregister(waiting.pidfd)
            os.close(waiting.pidfd)
            self._gone(path, waiting.born)

    def _gone(self, path: str, born: float) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        _remove_ahead(path)
        self._report(f"gone {path}")
        if time.monotonic() - born < RESPAWN_DELAY_S:  # not a fork a second
            self._not_before = time.monotonic() + RESPAWN_DELAY_S

    def _check_sockets(self) -> None:
        """A runner whose socket somebody removed waits for nobody: it goes, and
        the next fork replaces it."""
        lost = []
        for path, waiting in self.waiting.items():
            try:
                if os.stat(path).st_ino == waiting.inode:
                    continue
            except OSError:
                pass
            lost.append(path)
        self._read_reports()  # after the stat: a `taken` the runner told before its unlink
        for path in lost:
            if path in self.waiting:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self.waiting[path].pidfd, signal.SIGKILL)

    def _report(self, line: str) -> None:
        if self.report is not None:
            self.report(line)


def _remove_ahead(path: str) -> None:
    """The cgroup of a runner that died waiting (its seed went with it: PDEATHSIG)."""
    try:
        cgroup.remove_ahead(ahead_name(path))
    except (cgroup.CgroupError, OSError) as e:
        print(
            f"sandgate runners: {e} (`sandgate gc` removes it later)", file=sys.stderr, flush=True
        )


_inherited: list[int] = []  # descriptors of the pool a runner closes: its lock
_run_parser = None  # `sandgate run`'s parser, built once by the pool (see _warm_up)


def _warm_up() -> None:
    """What every run would otherwise do first, done once by the pool for all its
    runners (each inherits it with the fork): build `sandgate run`'s parser (argparse
    looks up translations and the terminal's size per option: ~3 ms), hash the seccomp
    program's cache key (reads the table's source, loads libseccomp), and load the
    name service modules that the check of the task's host ids enumerates accounts
    with (pwd.getpwall: libnss_* are loaded on the first call), and resolve where
    sandgate's code and Python are (the paths no --workspace may be in: ~0.3 ms a run,
    twice). A run still checks and reads all of it itself (its state directories
    too); only the loading is shared."""
    global _run_parser  # noqa: PLW0603 - once per pool, before its first fork
    import pwd

    from sandgate.enforcer.sandbox import seccomp

    _run_parser = build_parser("run")
    spec.protected_paths([])
    with contextlib.suppress(OSError):
        seccomp.cache_key()
    with contextlib.suppress(OSError):
        pwd.getpwall()


def claim(control: str) -> int:
    """The lock `<control>.runners` that one pool per control socket holds (its
    pid inside); PoolError naming the holder when another pool has it."""
    path = control + handoff.LOCK_SUFFIX
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise PoolError(f"another pool of warm runners serves {control}: pid {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def serve(control: str, warm: int, report=None) -> int:
    """Keep `warm` runners for the service at `control` until SIGTERM or SIGINT.
    PoolError when this process could not build sandboxes, or another pool serves."""
    if _weaker(restrictions(), restrictions(1)):  # than the host's (or container's) init
        raise PoolError(
            "no warm runners: this process runs with fewer capabilities, no_new_privs or a "
            "seccomp filter than PID 1 (a hardened systemd unit?), with which a runner could "
            "not build a sandbox; runs go on in their own process. Run `sandgate runners` "
            "without them (containers/systemd/sandgate-runners.service)"
        )
    folder = os.path.dirname(control)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    lock = claim(control)
    _inherited[:] = [lock]
    name = os.path.basename(control) + handoff.SUFFIX
    for entry in os.listdir(folder):  # a dead pool's runners: the lock says none lives
        if entry.startswith(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))
    with contextlib.suppress(cgroup.CgroupError, OSError):
        cgroup.remove_empty_ahead()  # and their cgroups (a SIGKILLed pool removed none)

    def stop(signum, _frame):
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # runners are reaped by the kernel
    _warm_up()
    pool = Pool(control, warm, report)
    try:
        pool.serve()
    except SystemExit:
        pass
    finally:
        pool.close()
        os.close(lock)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The service's zygote: a pool of `--warm` runners that dies with the service
    and tells it (stdout) which runners wait."""
    parser = argparse.ArgumentParser(prog="sandgate zygote", description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True)
    parser.add_argument("--service-pid", type=int, required=True)
    parser.add_argument("--warm", type=int, default=2)
    opts = parser.parse_args(argv)
    drop_what_stderr_cannot_take()  # the service's stderr, and its runs' callers' once taken
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != opts.service_pid:  # the service died before the line above
        return 0
    with contextlib.suppress(PermissionError):
        os.setsid()  # out of the service's process group: its ^C is not the pool's

    def report(line: str) -> None:
        os.write(1, line.encode() + b"\n")

    try:
        return serve(os.path.abspath(opts.control), opts.warm, report)
    except PoolError as e:
        print(f"sandgate zygote: {e}", file=sys.stderr, flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
