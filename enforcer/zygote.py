"""Warm runners for `sandgate run --gateway`, forked by a zygote the gateway service starts.

    python -I -m sandgate.enforcer.zygote --control SOCKET --service-pid PID

The zygote imports the whole attached-run path (argparse, `sandgate run`'s parser,
the sandbox's modules) once, then forks a runner for each `fork` line the service
writes to its stdin (a fork costs about a millisecond, a fresh interpreter with
these imports a few hundred under load). A runner listens on `<control>.z-<hex>`
(mode 0600, root only), tells the service `ready PATH`, and waits for one
`sandgate run --gateway` to hand it a run (enforcer/handoff.py has the protocol). It takes the first caller that is root
(SO_PEERCRED) and in its own mount namespace (the paths the caller names must mean
the same files here); anyone else is refused and it waits on. Then it becomes that
caller: its stdin, stdout, stderr, environment and working directory, and runs
exactly what `sandgate run --gateway` runs in-process (enforcer/attach.py: the
attach request, the sandbox, detach). The caller's end kills the task (attach's
`caller`); its signals are forwarded to it.

Lifetimes: the zygote dies with its service and a waiting runner with the zygote
(PR_SET_PDEATHSIG); once a runner has taken a run (it tells the service `taken
PATH`, and the service asks for the next one) it is that run's runner, and like
any runner outlives a restart of the service (it asks the new one to `resume`).
The zygote leaves the service's session and process group, so a ^C at the
service's terminal never reaches a task.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import struct
import sys

from sandgate.enforcer import attach, handoff  # noqa: F401 - imported ahead: the point of a warm runner
from sandgate.enforcer.cli import build_parser, run_command
from sandgate.enforcer.cli import run as cli_run
from sandgate.enforcer.sandbox import cgroup
from sandgate.proxy.telemetry import summary  # noqa: F401 - the summary table, printed at the end

PR_SET_PDEATHSIG = 1
REQUEST_TIMEOUT_S = 5.0
_libc = ctypes.CDLL(None)


class Caller:
    """The `sandgate` process that handed a run over: the signals it forwards, its end."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self._buffer = b""

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
                signum = json.loads(line).get("signal")
            except (ValueError, AttributeError):
                return None
            if signum in handoff.FORWARDED:
                forwarded.append(signum)
        return forwarded

    def send(self, **message) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall(json.dumps(message).encode() + b"\n")


def peer(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED, as of its connect)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


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
        ours, theirs = restrictions(), restrictions(pid)
    except (OSError, ValueError) as e:
        return f"pid {pid}: cannot read its status: {e}"
    if _weaker(ours, theirs):
        return f"pid {pid} may do more than this runner (capabilities, no_new_privs, seccomp)"
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/mnt"), os.stat("/proc/self/ns/mnt")
    except OSError as e:
        return f"pid {pid}: cannot read its mount namespace: {e.strerror}"
    if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
        return f"pid {pid} is in another mount namespace"
    return None


def _request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The caller's request and its three descriptors, or ValueError."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    data, fds = b"", []
    try:
        while b"\n" not in data:
            chunk, received, _flags, _addr = socket.recv_fds(conn, 65536, 3)
            fds += received
            if not chunk or len(data) + len(chunk) > handoff.MAX_LINE:
                raise ValueError("no complete request")
            data += chunk
        request = json.loads(data.partition(b"\n")[0])
        argv, env, cwd = request["argv"], request["env"], request["cwd"]
        if not (
            isinstance(argv, list)
            and all(isinstance(a, str) for a in argv)
            and argv[:1] == ["run"]
            and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(cwd, str)
            and len(fds) == 3
        ):
            raise ValueError("a malformed request")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        for fd in fds:
            os.close(fd)
        raise ValueError(str(e) or type(e).__name__) from None
    return request, fds


def take(listener: socket.socket) -> tuple[socket.socket, dict, list[int]]:
    """The first caller that may hand a run over, with its request and descriptors."""
    while True:
        conn, _ = listener.accept()
        why = refusal(conn)
        if why is None:
            try:
                request, fds = _request(conn)
                return conn, request, fds
            except ValueError as e:
                why = str(e)
        print(f"sandgate runner: refused a caller: {why}", file=sys.stderr, flush=True)
        conn.close()


def become(conn: socket.socket, request: dict, fds: list[int], control: str) -> int:
    """Run the caller's `sandgate run --gateway` as the caller would have."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    caller = Caller(conn)
    try:
        os.chdir(request["cwd"])
        args = build_parser("run").parse_args(request["argv"])
    except OSError as e:
        caller.send(refused=f"cannot enter {request['cwd']}: {e.strerror}")
        return 0
    except SystemExit as e:  # a usage error, printed on the caller's stderr: its answer
        caller.send(taken=True)
        caller.send(exit=e.code if isinstance(e.code, int) else 2)
        return 0
    if args.gateway is None or os.path.abspath(args.gateway) != control:
        caller.send(refused="another gateway service")
        return 0
    caller.send(taken=True)
    conn.setblocking(False)
    cgroup.HOST.act_for(peer(conn)[0])  # the task's cgroup goes under the caller's, as before
    code = run_command(lambda a: cli_run._run_attached(a, caller), args)
    sys.stdout.flush()
    sys.stderr.flush()
    caller.send(exit=code)
    return 0


def runner(listener: socket.socket, path: str, control: str) -> int:
    """In a child of the zygote: wait for a caller, then be its runner."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote's auto-reaping is not ours
    try:
        listener.listen(8)
        _tell(f"ready {path}")
        conn, request, fds = take(listener)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    _tell(f"taken {path}")
    _libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)  # the run's now: it outlives a service restart
    return become(conn, request, fds, control)


def _tell(line: str) -> None:
    """One line to the service (a pipe: short writes are atomic, children share it)."""
    os.write(1, line.encode() + b"\n")


def main(argv: list[str] | None = None) -> int:
    """The zygote: for each `fork` line on stdin, a child that waits for one run."""
    parser = argparse.ArgumentParser(prog="sandgate zygote", description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True)
    parser.add_argument("--service-pid", type=int, required=True)
    opts = parser.parse_args(argv)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != opts.service_pid:  # the service died before the line above
        return 0
    if _weaker(restrictions(), restrictions(1)):  # than the host's (or container's) init
        print(
            "sandgate zygote: no warm runners: the service runs with fewer capabilities, "
            "no_new_privs or a seccomp filter (a hardened systemd unit?), with which a runner "
            "could not build a sandbox; runs go on in their own process",
            file=sys.stderr,
            flush=True,
        )
        return 0
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # runners are reaped by the kernel
    control, me = os.path.abspath(opts.control), os.getpid()
    for line in sys.stdin:
        if line.strip() != "fork":
            continue
        path = f"{control}{handoff.SUFFIX}{secrets.token_hex(4)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from the start: no moment others could connect
        try:
            listener.bind(path)
        except OSError as e:
            print(f"sandgate zygote: cannot listen on {path}: {e}", file=sys.stderr, flush=True)
            listener.close()
            continue
        finally:
            os.umask(old_umask)
        if os.fork() == 0:
            code = 125
            try:
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() == me:
                    code = runner(listener, path, control)
            except BaseException as e:  # noqa: BLE001 - a runner must go, never return here
                print(f"sandgate runner: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
