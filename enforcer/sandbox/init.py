"""The sandbox init: namespaces, the file view, the task's identity, then the task.

Stdlib only: `sandgate run` starts it as `python -I -S .../sandbox/init.py SPEC`
(no site-packages: nothing the task could have planted is imported, and it starts
in tens of ms). SPEC is a JSON file in the run's root-only directory, written by
`sandbox/spec.py`; its sibling modules (mounts, landlock, seccomp) are loaded by path.

  outer (a child of sandgate: host root, host PID namespace)
    - joins the task's cgroups, the sandbox's network namespace, and new mount,
      UTS, IPC, PID and cgroup namespaces, all owned by the initial user namespace:
      nothing the task does later can change its routes, mounts or limits;
    - builds the file view: detached copies of the workspace and other binds first,
      then the whole host tree read-only, nosuid, nodev in one recursive call, fresh
      tmpfs on /tmp, /var/tmp, /run and $HOME, a minimal /dev, sandgate's state
      hidden, then the copies attached (the workspace idmapped, so files land on the
      host owned by the directory's owner);
    - forks `init`, writes its uid/gid maps (0..N-1 -> host ids that own nothing),
      relays signals, exits with its code.
  init (PID 1 of the new PID namespace)
    - mounts a fresh /proc, enters a new user namespace, forks the task, relays
      signals, reaps orphans, exits with the task's status.
  task
    - takes its ids, keeps only a small capability set (inside its user namespace,
      where nothing it can name is owned by it), no_new_privs, Landlock for writes,
      the seccomp filter last, then execs CMD in the workspace.
Both outer and init die with their parent (PR_SET_PDEATHSIG), and the kernel kills
every process of a PID namespace whose init dies: a SIGKILLed `sandgate run`
leaves no task running.

What was applied, and what could not be (with --allow-weaker-sandbox), goes back
to the runner as JSON lines on the report pipe, so it is recorded as an event.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import resource
import signal
import socket
import sys
import time

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
)
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
CAP_LAST = 63
# What root of the task keeps inside its own user namespace: Docker's default set
# without NET_RAW, MKNOD, AUDIT_WRITE, FSETID and SETFCAP. Each acts only on what that
# user namespace owns (its own files in the workspace and tmpfs, its own processes);
# none reaches the network, the mounts or the host, which the initial user namespace
# owns. Not SETFCAP: through the idmapped workspace a file capability the task sets is
# stored for the directory's host owner, and one for root is a plain capability on the
# host (`getcap` shows cap_setuid=ep). Not FSETID: it keeps set-id bits across writes
# and sets a set-gid bit for any group; the seccomp filter refuses set-id modes.
KEPT_CAPS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_SYS_CHROOT": 18,
}
RELAYED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# The terminal stops a task makes the kernel send to its whole process group, by
# reading (SIGTTIN) or writing and setting (SIGTTOU) the caller's terminal from the
# background, or through a suspend key it remapped (SIGTSTP: terminal_relay.TTY_STOPS):
# the outer process (below) stays in the run's process group, the terminal's job, and
# would stop with it, its exit record held (the runner ignores them too:
# terminal_relay.SharedTerminal.guard). PID 1 of a PID namespace ignores a stop it has
# no handler for (SIGNAL_UNKILLABLE); the task keeps the defaults.
TTY_STOPS = (signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# The ptys of the task's devpts (a warm run's terminal, made by PID 1, among them): all
# devpts instances but the host's share kernel.pty.max - kernel.pty.reserve (3,072 by
# default), and one task that took them all left none to other tasks and containers.
PTY_MAX = 256
# Docker's MaskedPaths and ReadonlyPaths (moby oci/defaults.go, and /proc/interrupts
# and /sys/devices/virtual/powercap of its current releases): the kernel's key list,
# timers and scheduler state name other tasks' processes, the interrupt and RAPL energy
# counters are side channels, /proc/sys and the others are the host's knobs.
PROC_MASKED = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
)
PROC_READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
SYS_MASKED = ("/sys/firmware", "/sys/devices/virtual/powercap")
TASK_NICE = 0  # the gateway runs at a lower nice value (enforcer/priority.py)
EXIT_SETUP_FAILED = 125  # like `env`/`unshare`: the sandbox could not be set up

_libc = ctypes.CDLL(None, use_errno=True)


def _sibling(name: str):
    """A module next to this file, loaded by path (this runs without site-packages)."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"sandgate.enforcer.sandbox.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mounts = _sibling("mounts")
landlock = _sibling("landlock")
seccomp = _sibling("seccomp")
probes = None  # loaded by main() only for a self-test: it imports ssl (~5 ms)
terminal = None  # loaded by main() only for a task with a pty of its own (a warm run's)


class SetupError(Exception):
    """The sandbox cannot be built as asked; the message names what and the fix."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


class Report:
    """JSON lines to the runner: {"weakened": feature, "why": ...}, {"applied": ...}."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def send(self, **record) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


# --- outer: namespaces and the file view ---------------------------------------------


STDIO_NAMES = ("stdin", "stdout", "stderr")
STREAM_TYPES = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


def check_stdio_sockets() -> None:
    """The caller's stdin, stdout and stderr go to the task as they are: one that is a
    socket is a socket of the host's network namespace, past the task's own. A
    connected stream (a journal stream, an ssh or CI log socket, an inetd connection)
    only takes bytes to its one peer, which the caller chose (and the task may shut it
    down: docs/sandbox.md, "The caller's stdio"); a datagram socket can be connected
    (or sent) anywhere, a listening one accepts the host's connections, an unconnected
    one connects anywhere: past the gateway. SetupError for those, naming the fd."""
    for fd, name in enumerate(STDIO_NAMES):
        try:
            if (os.fstat(fd).st_mode & 0o170000) != 0o140000:  # S_IFSOCK
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed: nothing there
        try:
            kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            try:
                sock.getpeername()
                connected = True
            except OSError:
                connected = False
            if kind in STREAM_TYPES and connected and not listening:
                continue
            what = (
                "a listening" if listening else "an unconnected" if not connected else "a datagram"
            )
            raise SetupError(
                f"{name} (fd {fd}) is {what} socket (family {int(sock.family)}): the task would "
                f"have it in the host's network namespace, where it reaches past the "
                f"gateway; give the task a pipe instead (`sandgate run ... | cat`) or a file"
            )
        finally:
            sock.close()


def take_limits(rlimits: list[list[int]]) -> None:
    """The caller's resource limits (enforcer/sandbox/inherit.py), set here, in the
    initial user namespace, where a hard limit may still rise back to the caller's
    (a runner's may be lower): init and the task inherit them."""
    for number, soft, hard in rlimits:
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as e:
            raise SetupError(
                f"cannot set the task's resource limit {number} to {soft}/{hard}: {e}"
            ) from None


def join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")


def wait_joined(fd: int) -> None:
    """The runner moves this process into the task's cgroup while it builds the view
    (the first move into a new memory cgroup waits ~15 ms for the kernel's RCU); one
    byte says it is done, before anything forks the task."""
    done = os.read(fd, 1)
    os.close(fd)
    if done != b"1":
        raise SetupError("the runner could not move the sandbox into its cgroup")


def enter_namespaces(netns_path: str, hostname: str) -> None:
    with open(netns_path) as f:
        _check(_libc.setns(f.fileno(), CLONE_NEWNET), f"setns {netns_path}")
    if netns_path.startswith("/proc/self/fd/"):  # the runner's descriptor: not the task's
        with contextlib.suppress(OSError, ValueError):
            os.close(int(netns_path.rsplit("/", 1)[1]))
    # Not yet CLONE_NEWPID: the first child forked after it becomes that namespace's
    # PID 1, and the helpers that build idmapped mounts fork too. Not yet CLONE_NEWCGROUP:
    # its root is the cgroup we are in when it is made, which must be the task's.
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC), "unshare")
    mounts.make_private("/")
    socket.sethostname(hostname)


class UnmappedUserns:
    """A child in a user namespace of its own whose maps are not written yet: what an
    idmapped mount takes (`idmap_userns`). A warm runner's seed makes one before the
    run (`be_seed`, `userns_ahead`): the run's first idmapped mount (its
    workspace) then takes two writes to /proc instead of a fork of this process, its
    start and its exit (~3-4 ms of the start, bench_attach --breakdown). A namespace
    made ahead is the same as one made at the run: an idmapped mount uses only its
    maps, which are written when the run's ids are known. The child dies with this
    process (PR_SET_PDEATHSIG)."""

    def __init__(self) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                # Its two ends only: the seed's socket to its runner closes with the
                # seed, and the seed's death is an end of file on `go`.
                for name in os.listdir("/proc/self/fd"):
                    if int(name) > 2 and int(name) not in (ready_w, go_r):
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
                os.write(ready_w, b"1")
                os.read(go_r, 1)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(go_r)
        self.fds = [ready_r, go_w]

    def move_above(self, lowest: int) -> None:
        """Its descriptors at `lowest` or above (the seed puts the run's below)."""
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest) for fd in self.fds]
        for fd in self.fds:
            os.close(fd)
        self.fds = moved

    def mapped(self, uid_map: str, gid_map: str) -> int:
        """Its namespace, mapped so, as an fd; OSError if it could not be made."""
        try:
            if os.read(self.fds[0], 1) != b"1":
                raise OSError(1, "cannot create a user namespace for the idmapped mount")
            _write_maps(self.pid, uid_map, gid_map)
            return os.open(f"/proc/{self.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            self.release()

    def release(self) -> None:
        """The child may go (reaped by `reap`, by when it has). Idempotent."""
        if self.fds:
            with contextlib.suppress(OSError):
                os.write(self.fds[1], b"1")
            for fd in self.fds:
                os.close(fd)
            self.fds = []

    def reap(self) -> None:
        """Released and reaped (the seed, once PID 1 is on its way: off the start's path)."""
        self.release()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


userns_ahead: UnmappedUserns | None = None  # a seed's (`be_seed`)

# What a seed holds while it waits (an embedded run's seed is in the terminal's
# foreground job: a ^C during the run's setup is the run's to handle, which then
# discards it), delivered once it is the init, as to an init forked then.
SEED_HOLDS = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM)


def be_seed(sock: socket.socket, procs_files: list[str] | None, mask=None) -> int:
    """A sandbox init made ahead of its run (attach.InitSeed), on `sock`: make the
    workspace's user namespace ahead (before the join: its child stays in the
    runner's cgroup, not the task's), join the task's cgroup (`procs_files`; None:
    sent first on `sock` as {"join": [...]}), say so, wait for the run's spec and
    descriptors, then be its init. `mask`: the signal mask the init gets (None: the
    one this process had before it held SEED_HOLDS)."""
    global userns_ahead  # noqa: PLW0603 - the init's main() takes it
    try:
        userns_ahead = UnmappedUserns()
    except OSError as e:  # the run makes its own, as without a seed
        print(f"sandgate runner: no user namespace made ahead: {e}", file=sys.stderr)
    if procs_files is None:
        message = sock.recv(65536)
        if not message:  # the runner went, or needs no seed after all
            return 0
        procs_files = json.loads(message)["join"]
    try:
        for path in procs_files:
            with open(path, "w") as f:
                f.write("0")
    except OSError as e:
        sock.send(b"failed")
        print(f"sandgate runner: cannot join {path}: {e.strerror}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    sock.send(b"joined")
    held = signal.pthread_sigmask(signal.SIG_BLOCK, SEED_HOLDS)
    message, fds, _flags, _addr = socket.recv_fds(sock, 65536, 64)
    if not message:  # the runner went, or gave up on us
        return 0
    signal.pthread_sigmask(signal.SIG_SETMASK, held if mask is None else mask)
    request = json.loads(message)
    targets = request["fds"]
    if len(targets) != len(fds):
        return EXIT_SETUP_FAILED
    # Above every number in play first, so that no dup2 below lands on one still needed.
    ahead = userns_ahead
    base = max([*targets, *fds, sock.fileno(), *(ahead.fds if ahead else ())]) + 1
    if ahead is not None:
        ahead.move_above(base)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, base) for fd in fds]
    for fd in fds:
        os.close(fd)
    sock.close()
    for target, fd in zip(targets, moved, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    return main([request["spec"]])


# glibc's posix_spawn leaves the child its own two signals (32 and 33: thread
# cancellation, set*id across threads) ignored, where its parent had handlers, and an
# exec keeps an ignored signal ignored: the task would inherit them so. glibc's
# sigaction refuses to touch them; the system call does not (its number per machine).
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}
_GLIBC_SIGNALS = (32, 33)


def can_undo_spawn_signals() -> bool:
    """Whether a spawned seed can set glibc's signals back to their default here."""
    return os.uname().machine in _RT_SIGACTION


def _undo_spawn_signals() -> None:
    default = (ctypes.c_ulong * 4)()  # SIG_DFL, no flags, no restorer, an empty mask
    number = _RT_SIGACTION[os.uname().machine]
    for signum in _GLIBC_SIGNALS:
        if _libc.syscall(number, signum, default, None, 8) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"rt_sigaction({signum}, SIG_DFL): {os.strerror(err)}")


def _spawned_seed(args: list[str]) -> int:
    """`init.py --seed FD MASK`: a seed spawned as an interpreter of its own
    (attach.InitSeed.spawn) on socket FD, the init to get signal mask MASK (signal
    numbers, comma-separated). It started with SEED_HOLDS held. A runner gone before
    PR_SET_PDEATHSIG was set is an end of file on FD, which ends it too. Should it
    fail before it joins, the runner goes on without it (attach.InitSeed.usable)."""
    fd = int(args[0])
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _undo_spawn_signals()
        for name in os.listdir("/proc/self/fd"):  # stdio and its socket, no other of the runner's
            if int(name) > 2 and int(name) != fd:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        mask = {signal.Signals(int(n)) for n in args[1].split(",") if n}
        return be_seed(socket.socket(fileno=fd), None, mask)
    except BaseException as e:  # noqa: BLE001 - as a forked seed (attach._fork): one line, then go
        print(f"sandgate: the sandbox init made ahead failed: {e}", file=sys.stderr)
        return EXIT_SETUP_FAILED


def idmap_userns(inside: int, outside: int, gid_inside: int, gid_outside: int) -> int:
    """A user namespace fd whose map sends the directory owner's ids (as on disk) to
    the task's host ids: through an idmapped mount, the task's files land on disk
    owned by the owner, and the owner's files look like the task's own. The one made
    ahead, if there is one not used yet."""
    maps = (f"{inside} {outside} 1", f"{gid_inside} {gid_outside} 1")
    if userns_ahead is not None and userns_ahead.fds:
        return userns_ahead.mapped(*maps)
    made = UnmappedUserns()
    try:
        return made.mapped(*maps)
    finally:
        made.reap()


def _write_maps(pid: int | str, uid_map: str, gid_map: str) -> None:
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


def build_view(spec: dict, report: Report) -> None:
    """The task's file view, in the only order that works: copies of what must stay
    reachable first, then the host read-only, then fresh space, then the copies."""
    host_uid, host_gid = spec["id_base"] + spec["uid"], spec["id_base"] + spec["gid"]
    clones = []
    # One user namespace per owner (uid, gid) the binds have, whatever their number: a
    # repository's pinned git directory and its read-only control files are binds of
    # the workspace's owner too, and each namespace made costs a fork (~1.5 ms).
    idmaps: dict[tuple[int, int], int] = {}
    try:
        for bind in spec["binds"]:
            fd, st = clone_source(bind)
            # Every copy, writable or not, and its submounts: nosuid and nodev before it
            # is attached. A device node in a writable root (a rootfs unpacked as root,
            # say) would otherwise be the host's device, its owner's (through the
            # idmap: the task's root's) to open.
            mounts.set_attr(fd, mounts.MOUNT_ATTR_NOSUID | mounts.MOUNT_ATTR_NODEV)
            # A read-only bind in the workspace (a git control file) is idmapped like the
            # workspace: git refuses a repository whose `.git` file looks someone else's.
            if bind["writable"] or bind.get("idmapped"):
                st = st or os.stat(bind["source"])
                # (a bind inside a writable root: as that root's owner, `idmap_of`)
                mapped = os.stat(bind["idmap_of"]) if "idmap_of" in bind else st
                owner = (mapped.st_uid, mapped.st_gid)
                try:
                    if owner not in idmaps:
                        idmaps[owner] = idmap_userns(owner[0], host_uid, owner[1], host_gid)
                    mounts.set_attr(fd, mounts.MOUNT_ATTR_IDMAP, userns_fd=idmaps[owner])
                except OSError as e:
                    if not spec["allow_weaker"]:
                        raise SetupError(
                            f"cannot idmap {bind['source']} ({e.strerror}): its filesystem does not "
                            "support idmapped mounts (Linux 5.12+; ext4, xfs, btrfs, tmpfs 6.3+ do). "
                            "Fix: put the workspace on such a filesystem, or --allow-weaker-sandbox "
                            "(files the task writes there are then owned by its unprivileged host id)"
                        ) from None
                    report.send(weakened="idmapped-mount", why=f"{bind['source']}: {e.strerror}")
            if not bind["writable"]:
                mounts.set_attr(fd, mounts.LOCKED_DOWN)
            clones.append((fd, bind, st))
    finally:
        for idmap in idmaps.values():
            os.close(idmap)
    devices = {
        name: mounts.clone_tree(f"/dev/{name}")
        for name in DEVICES
        if os.path.exists(f"/dev/{name}")
    }

    # The host's trees where the sandbox gets fresh ones (among them /run/netns/sg-<id>
    # of every other sandbox), before the rest is made read-only (fewer mounts to walk).
    mounts.detach_trees(["/sys", *spec["tmpfs"], "/dev"])
    mounts.set_attr("/", mounts.LOCKED_DOWN, recursive=True)

    mount_sys()
    for path in spec["tmpfs"]:
        os.makedirs(path, exist_ok=True)  # only ever below another tmpfs of ours
        sticky = path in ("/tmp", "/var/tmp")
        mounts.tmpfs(
            path,
            mode=0o1777 if sticky else 0o755,
            uid=None if sticky else spec["id_base"],
            gid=None if sticky else spec["id_base"],
            bounds=spec.get("tmpfs_bounds"),
        )
    if not os.path.isdir(spec["home"]):
        os.makedirs(spec["home"])
    if spec["home"] not in spec["tmpfs"]:
        os.chown(spec["home"], host_uid, host_gid)
    build_dev(devices, spec.get("tmpfs_bounds"))
    for fd, bind, st in clones:
        attach_bind(fd, bind, st)
    for path in spec["hide"]:
        mounts.mask(path)


def clone_source(bind: dict) -> tuple[int, os.stat_result | None]:
    """A detached copy of a bind's source, and (for an `exact` bind) the stat of what
    was copied. An `exact` bind's source (the workspace, a --rw path, a pinned git
    directory, a guarded control file: anything a task may reach) is found without
    following any symbolic link and must be the file the runner's walk found there
    (`inode`): by path, a task sharing the directory could swap in a link to a host
    directory just before this, and have it mounted writable and idmapped to its owner."""
    if not bind.get("exact"):
        return mounts.clone_tree(bind["source"]), None
    try:
        source = mounts.open_exact(bind["source"], bind.get("inode"))
    except mounts.Moved as e:
        raise SetupError(_moved(e, "bind")) from None
    try:
        return mounts.clone_fd(source, bind["source"]), os.fstat(source)
    finally:
        os.close(source)


def attach_bind(fd: int, bind: dict, st: os.stat_result | None) -> None:
    """Mount a bind's copy on its target. An `exact` bind's target is found without
    following links too, and, where it was there before this view (not a mount point
    made in a fresh tmpfs of ours), is the very file that was copied: a link or a
    rename swapped in since would put the read-only copy somewhere else and leave the
    path it guards writable."""
    target = bind["target"]
    if not bind.get("exact"):
        _ensure_mountpoint(target, fd)
        mounts.attach(fd, target)
        return
    expect = (st.st_dev, st.st_ino) if st is not None and target == bind["source"] else None
    if not os.path.lexists(target):
        _ensure_mountpoint(target, fd)
        expect = None
    try:
        where = mounts.open_exact(target, expect)
    except mounts.Moved as e:
        os.close(fd)
        raise SetupError(_moved(e, "mount point")) from None
    except OSError:
        os.close(fd)
        raise
    mounts.attach_at(fd, where, target)


def _moved(error: OSError, what: str) -> str:
    return (
        f"refusing to mount {error.strerror} (a {what} in a writable directory changed "
        "since sandgate looked at it: a task sharing the directory may have swapped it); "
        "nothing was mounted, run again"
    )


def mount_sys() -> None:
    """A fresh sysfs, read-only: the sandbox's network namespace's, so /sys/class/net
    lists its own interfaces and not the host's (the veth of every other sandbox);
    without the host's cgroup, debugfs and tracefs mounts below it (the task's own
    cgroups come back in mount_cgroups); Docker's masked sysfs paths masked. The
    host's /sys is detached (build_view)."""
    mounts.mount("sysfs", "/sys", "sysfs", mounts.READ_ONLY)
    for path in SYS_MASKED:
        mounts.mask(path)


def mount_cgroups(own_cgroups: str, name: str | None) -> None:
    """/sys/fs/cgroup with the task's own cgroup as the root of each hierarchy it has
    one in (`own_cgroups`: /proc/self/cgroup read before the cgroup namespace; `name`:
    the task cgroup's), mounted again from inside the namespace, read-only: tools that
    size themselves by their limits (a JVM, Go, Node) find them where they look, and no
    other task's cgroup is in view. Not the caller's other hierarchies: their root would
    be the caller's cgroup, with other runs below it. cgroup v2 alone: on /sys/fs/cgroup
    itself; v1 or hybrid: each hierarchy in a directory named by its controllers."""
    hierarchies = own_hierarchies(own_cgroups, name)
    top = "/sys/fs/cgroup"
    if hierarchies == [""]:
        mounts.mount("cgroup2", top, "cgroup2", mounts.READ_ONLY)
    elif hierarchies:
        mounts.tmpfs(top, mode=0o755, flags=mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
        for controllers in hierarchies:
            where = f"{top}/{controllers or 'unified'}"
            os.mkdir(where)
            fstype = "cgroup" if controllers else "cgroup2"
            mounts.mount(fstype, where, fstype, mounts.READ_ONLY, controllers or None)
            for controller in controllers.split(",") if "," in controllers else ():
                os.symlink(controllers, f"{top}/{controller}")  # cpu -> cpu,cpuacct
        mounts.set_attr(top, mounts.LOCKED_DOWN | mounts.MOUNT_ATTR_NOEXEC, recursive=False)


def own_hierarchies(own_cgroups: str, name: str | None) -> list[str]:
    """The hierarchies of a /proc/<pid>/cgroup text in which the process is in a cgroup
    named `name`, each as its controllers ("memory", "cpu,cpuacct"; "" for cgroup v2):
    what mounts it again."""
    lines = (line.split(":", 2) for line in own_cgroups.splitlines())
    return [
        controllers
        for controllers, path in ((parts[1], parts[2]) for parts in lines if len(parts) == 3)
        if name and path.rsplit("/", 1)[-1] == name
    ]


def _ensure_mountpoint(target: str, tree_fd: int) -> None:
    """A missing mount point can only be below a fresh tmpfs of ours: create it."""
    if os.path.lexists(target):
        return
    if os.path.isdir(f"/proc/self/fd/{tree_fd}"):
        os.makedirs(target)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()


def build_dev(devices: dict[str, int], shm_bounds: list[int] | None = None) -> None:
    """A minimal /dev: the harmless character devices, a private devpts, /dev/shm,
    and the fd links; no disks, no raw memory, no kernel message buffer. The host's
    /dev is detached (build_view)."""
    mounts.tmpfs("/dev", mode=0o755, flags=mounts.MS_NOSUID | mounts.MS_NOEXEC)
    for name, fd in devices.items():
        open(f"/dev/{name}", "w").close()
        mounts.attach(fd, f"/dev/{name}")
    os.mkdir("/dev/pts")
    mounts.mount(
        "devpts",
        "/dev/pts",
        "devpts",
        mounts.MS_NOSUID | mounts.MS_NOEXEC,
        f"newinstance,ptmxmode=0666,mode=0620,max={PTY_MAX}",
    )
    os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm")
    mounts.tmpfs("/dev/shm", mode=0o1777, bounds=shm_bounds)
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{link}")
    mounts.set_attr("/dev", mounts.MOUNT_ATTR_RDONLY, recursive=False)


# --- init and task ------------------------------------------------------------------------


def drop_capabilities(keep: set[int]) -> None:
    for number in range(CAP_LAST + 1):
        if number in keep:
            continue
        # EINVAL: the kernel does not know this capability; nothing to drop.
        if _libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, f"drop capability {number}")


def become_task(spec: dict, program: bytes | None, report: Report) -> None:
    """In the task's process, in this order: ids, capabilities, no_new_privs,
    Landlock, seccomp (last: it would refuse the calls before it)."""
    uid, gid = spec["uid"], spec["gid"]
    keep = set(KEPT_CAPS.values()) if spec["userns"] and uid == 0 else set()
    if spec["userns"]:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        # The bounding set first, while CAP_SETPCAP is held: this process's euid is
        # root of its user namespace (run_init), so a non-zero uid below clears every
        # capability it has, and with them the right to drop any.
        drop_capabilities(keep)
        os.setresuid(uid, uid, uid)
    else:
        drop_capabilities(keep)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    # A task is batch work (builds, installs, tests): SCHED_BATCH keeps its fair
    # share of the CPU but a wake-up of it no longer preempts what runs, the gateway
    # relaying its bytes above all (bench_workers `1` beside `1o`: 0.93x the gateway's
    # CPU per connection, docs/performance.md "Session 11"). Not a bound: the task may switch back
    # (`chrt -o 0`); the cgroup's CPU limit is the bound.
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    # Below the gateway that forked it (enforcer/priority.py): back to nice 0 (raising a
    # nice value needs no privilege), with no room to lower it again. A caller that ran
    # sandgate niced (`nice -n 10 sandgate run`) keeps its task that nice: lowering the
    # value needs CAP_SYS_NICE of the host's user namespace (it failed the run, EACCES).
    os.setpriority(os.PRIO_PROCESS, 0, max(TASK_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
    # No real-time scheduling either, whatever the caller's limit: SCHED_FIFO/RR would
    # starve the gateway, and without CONFIG_RT_GROUP_SCHED no cgroup bounds it (--cpus).
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    if spec["landlock"]:
        abi = landlock.restrict_writes(spec["writable"])
        if abi == 0:
            report.send(
                note="landlock",
                why="the kernel has no Landlock; mounts alone keep the host read-only",
            )
    if program is not None:
        seccomp.install(program)
    os.chdir(spec["cwd"])


def _relay_signals_to(pid: int) -> None:
    def relay(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in RELAYED_SIGNALS:
        signal.signal(signum, relay)


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _probe(spec: dict, report: Report, started: float) -> None:
    """`sandgate selftest` (the probes are the task) or `run --self-test` (before it)."""
    if spec.get("probe") == "all":
        results = probes.run_all(spec)
        report.send(self_test=results, ms=round((time.monotonic() - started) * 1000, 1))
        os._exit(0 if all(r["ok"] for r in results) else 1)
    if spec["self_test"]:
        results = probes.run_cheap(spec)
        report.send(self_test=results, ms=round((time.monotonic() - started) * 1000, 1))
        failed = [f"{r['probe']} ({r['seen']})" for r in results if not r["ok"]]
        if failed:
            raise SetupError("the sandbox self-test failed: " + ", ".join(failed))


def run_init(
    spec: dict, program: bytes | None, report: Report, mapped_r: int, unshared_w: int
) -> int:
    """PID 1: /proc, the user namespace, then the task; relay signals, reap everything.
    With a `terminal` in the spec: a session and a pty of the sandbox's own first
    (sandbox/terminal.py), whose foreground job the task is."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    mounts.detach_trees(["/proc"])  # the host's, and what is mounted below it
    mounts.mount("proc", "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
    for path in PROC_MASKED:
        mounts.mask(path)
    for path in PROC_READ_ONLY:
        mounts.make_read_only(path)
    pty = None
    if spec.get("terminal"):
        pty = terminal.Terminal(spec["terminal"])
        pty.open()  # still host root: its devpts is the initial user namespace's
    if spec["userns"]:
        # The user namespace's owner is its maker's effective uid, and the kernel
        # charges the task's inotify instances and watches, fanotify marks, nested
        # namespaces and per-user rlimits (NPROC, MSGQUEUE, SIGPENDING) up to the owner
        # too: made as root, every task's were root's (128 inotify instances for the
        # host's root and every task at once). Made as the task's first host id, they
        # are its id slot's alone (enforcer/sandbox/id_slots.py). Only the effective
        # uid: the real and saved stay root's, so the task (its root is that id) is
        # still not PID 1's user for kill and ptrace. A changed euid clears the
        # parent-death signal: set again.
        os.setresuid(-1, spec["id_base"], -1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(unshared_w, b"1")
        if os.read(mapped_r, 1) != b"1":
            raise SetupError("the user namespace's id maps were not written")
    task = os.fork()
    if task == 0:
        if pty is not None:
            pty.take()
        # Python ignores SIGPIPE and SIGXFSZ at start, and an ignored signal stays
        # ignored across exec: without this, `yes | head` would never end by SIGPIPE.
        for signum in (*RELAYED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        os.umask(spec.get("umask", 0o022))
        try:
            started = time.monotonic()
            become_task(spec, program, report)
            _probe(spec, report, started)
        except (OSError, SetupError) as e:
            print(f"sandgate: sandbox setup failed: {e}", file=sys.stderr)
            os._exit(EXIT_SETUP_FAILED)
        report.close()
        try:
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as e:
            print(f"sandgate: cannot run {spec['argv'][0]!r}: {e.strerror}", file=sys.stderr)
            os._exit(127 if e.errno == 2 else 126)
    report.close()
    _relay_signals_to(task)
    if pty is not None:
        return pty.serve(task, _exit_code)
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
    args = sys.argv[1:] if args is None else args
    if len(args) == 3 and args[0] == "--seed":
        return _spawned_seed(args[1:])
    if len(args) != 1:
        print("usage: init.py SPEC.json (started by sandgate run)", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        spec = json.load(f)
    if spec.get("probe") or spec.get("self_test"):
        global probes  # noqa: PLW0603 - before the task's ids: the stdlib may be out of reach then
        probes = _sibling("probes")
    if spec.get("terminal"):
        global terminal  # noqa: PLW0603 - as probes
        terminal = _sibling("terminal")
    report = Report(spec.get("report_fd"))
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        take_limits(spec.get("rlimits", []))
        if not spec.get("terminal"):  # else the task gets a pty of the sandbox's own
            check_stdio_sockets()
        os.umask(0o022)  # the sandbox's own files and mount points; the task's is the caller's
        program = None
        if spec.get("seccomp"):
            with open(spec["seccomp"], "rb") as f:
                program = f.read()
        joined_fd = spec.get("joined_fd")
        if joined_fd is None:
            join_cgroups(spec["cgroup_procs"])
        enter_namespaces(spec["netns"], spec["hostname"])
        if userns_ahead is not None and not any(
            bind["writable"] or bind.get("idmapped") for bind in spec["binds"]
        ):
            userns_ahead.release()  # nothing to map: it exits while the view is built
        build_view(spec, report)
        if joined_fd is not None:
            wait_joined(joined_fd)
        # After the join: the cgroup namespace's root is the task's own cgroup.
        with open("/proc/self/cgroup") as f:
            own_cgroups = f.read()
        _check(_libc.unshare(CLONE_NEWCGROUP | CLONE_NEWPID), "unshare(CLONE_NEWCGROUP|NEWPID)")
        mount_cgroups(own_cgroups, spec.get("cgroup_name"))
    except (OSError, SetupError) as e:
        print(f"sandgate: sandbox setup failed: {e}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    sys.stdout.flush()
    init = os.fork()  # the first child after unshare(CLONE_NEWPID) is PID 1 there
    if init == 0:
        try:
            os.close(unshared_r)
            os.close(mapped_w)
            os._exit(run_init(spec, program, report, mapped_r, unshared_w))
        except BaseException as e:  # noqa: BLE001 - PID 1 must report, then go
            print(f"sandgate: sandbox init failed: {e}", file=sys.stderr)
            os._exit(EXIT_SETUP_FAILED)
    os.close(unshared_w)
    os.close(mapped_r)
    # Only now, in this process alone: PID 1 and the task keep the defaults.
    for signum in TTY_STOPS:
        signal.signal(signum, signal.SIG_IGN)
    if spec["userns"]:
        if os.read(unshared_r, 1) == b"1":
            base, count = spec["id_base"], spec["id_count"]
            # PID 1's /proc/1 is in the fresh /proc it mounted (the host's is read-only here now).
            try:
                _write_maps(1, f"0 {base} {count}", f"0 {base} {count}")
                os.write(mapped_w, b"1")
            except OSError as e:
                print(
                    f"sandgate: sandbox setup failed: cannot map the task's ids: {e}",
                    file=sys.stderr,
                )
        os.close(mapped_w)
    if userns_ahead is not None:
        userns_ahead.reap()
    _relay_signals_to(init)
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
    # PID 1 is reaped, so every process of the sandbox is gone (its end killed the rest
    # of its pid namespace first). The runner goes on from this record rather than
    # from this process's end, whose teardown of the namespaces (the file view's
    # mounts) takes 1-2 ms more (attach._wait checks the task's cgroup is empty).
    code = _exit_code(status)
    report.send(exit=code)
    report.close()
    return code


def _exit(code: int) -> None:
    """Leave without the interpreter's finalization (~7 ms of an embedded run's end,
    which waits for this process: docs/performance.md, "Session 40"), as a forked
    init leaves (attach._fork); what was printed goes out first."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: the descriptor was closed when Python started
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
