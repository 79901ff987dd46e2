"""The sandbox init sandgate ran before issue 8 (net/mount/PID/UTS namespaces, caps dropped):
kept only as the "before" baseline of bench/bench_sandbox.py. Not product code.

The original docstring follows.

`sandgate run` starts `python -m enforcer.sandbox_init --netns PATH ... -- CMD`:

  outer (a child of sandgate, in the host's PID namespace)
    - joins the sandbox's network namespace, unshares mount, UTS and PID namespaces;
    - makes mounts private, binds resolv.conf and the CA bundle over the system's,
      hides sandgate's state directory (CA key, audit logs) under an empty tmpfs;
    - forks `init` and relays SIGINT/SIGTERM/SIGHUP/SIGQUIT to it; exits with its code.
  init (PID 1 of the new PID namespace)
    - mounts a fresh /proc; forks the task and relays signals to it (PID 1 ignores
      signals it has no handler for, so the task must not be PID 1), reaps
      orphans, exits with the task's status.
  task
    - drops the capabilities that would let root leave the sandbox (CAP_SYS_ADMIN
      for setns/mount, CAP_SYS_MODULE, CAP_SYS_PTRACE, ...), sets no_new_privs,
      and execs CMD. CAP_NET_ADMIN goes too (see DROPPED_CAPS): root in the sandbox
      cannot change its own routes or nftables either, which enforcement does not
      depend on anyway.
Both outer and init die with their parent (PR_SET_PDEATHSIG), and the kernel kills
every process of a PID namespace whose init dies: a SIGKILLed `sandgate run`
leaves no task running.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000,
    0x04000000,
    0x20000000,
    0x40000000,
)
MS_RDONLY, MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = (
    0x1,
    0x1000,
    0x4000,
    0x40000,
    0x2,
    0x4,
    0x8,
)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
# Capabilities that reach outside the sandbox's namespaces: joining other
# namespaces and remounting (SYS_ADMIN), kernel modules, raw devices and
# memory, tracing host processes, BPF, file handles (DAC_READ_SEARCH's
# open_by_handle_at), clocks, reboot, MAC policy, the kernel log. And NET_ADMIN:
# held in the initial user namespace it acts on every netns the sandbox can name
# (the host's has a netnsid in the sandbox's, through the veth) and on the host's
# devices through /sys: a link into the host's netns past the nftables rules, or
# the host's uplink taken down.
DROPPED_CAPS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_TIME": 25,
    "CAP_MKNOD": 27,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
RELAYED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
EXIT_SETUP_FAILED = 125  # like `env`/`unshare`: the sandbox could not be set up

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source and source.encode(), target.encode(), fstype and fstype.encode(), flags, None
        ),
        f"mount {source} on {target}",
    )


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


def enter_namespaces(netns_path: str, hostname: str) -> None:
    with open(netns_path) as f:
        _check(_libc.setns(f.fileno(), CLONE_NEWNET), f"setns {netns_path}")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID), "unshare")
    # Mounts made below must not propagate back to the host's mount namespace.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    socket.sethostname(hostname)


def bind_files(binds: list[tuple[str, str]]) -> None:
    for source, target in binds:
        if os.path.exists(target):
            _mount(source, os.path.realpath(target), None, MS_BIND)


def hide_dirs(paths: list[str]) -> None:
    """An empty read-only tmpfs over each directory: the task cannot read the
    gateway CA's private key or the audit logs, and without CAP_SYS_ADMIN it
    cannot unmount the cover."""
    for path in paths:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def drop_capabilities() -> None:
    for number in DROPPED_CAPS.values():
        # EINVAL: the kernel does not know this capability; nothing to drop.
        if _libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, f"drop capability {number}")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _relay_signals_to(pid: int) -> None:
    def relay(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in RELAYED_SIGNALS:
        signal.signal(signum, relay)


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def run_init(argv: list[str], env: dict[str, str]) -> int:
    """PID 1: mount /proc, run the task, relay signals, reap everything."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    task = os.fork()
    if task == 0:
        try:
            for signum in RELAYED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            drop_capabilities()
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            print(f"sandgate: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
            os._exit(127 if e.errno == 2 else 126)
    _relay_signals_to(task)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == task:
            return _exit_code(status)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox_init")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--hostname", default="sandbox")
    parser.add_argument("--bind", action="append", default=[], metavar="SOURCE:TARGET")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--hide", action="append", default=[], metavar="DIR")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    cmd = opts.cmd[1:] if opts.cmd[:1] == ["--"] else opts.cmd
    if not cmd:
        parser.error("no command")
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in opts.env)
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        enter_namespaces(opts.netns, opts.hostname)
        bind_files([tuple(b.split(":", 1)) for b in opts.bind])
        hide_dirs(opts.hide)
    except OSError as e:
        print(f"sandgate: sandbox setup failed: {e}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    sys.stdout.flush()
    init = os.fork()  # the first child after unshare(CLONE_NEWPID) is PID 1 there
    if init == 0:
        try:
            os._exit(run_init(cmd, env))
        except BaseException as e:  # noqa: BLE001 - PID 1 must report, then go
            print(f"sandgate: sandbox init failed: {e}", file=sys.stderr)
            os._exit(EXIT_SETUP_FAILED)
    _relay_signals_to(init)
    while True:
        try:
            _, status = os.waitpid(init, 0)
            return _exit_code(status)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main())
