"""The task's cgroup: memory, process and CPU limits for one run, on cgroup v2 or v1.

Where each controller lives is read from /proc/self/mountinfo, never assumed:
- cgroup v2 (modern distributions): one `cgroup2` mount whose root
  `cgroup.controllers` lists memory, pids, cpu. The run gets one directory.
- cgroup v1 or hybrid (this kind of host: `memory`, `pids`, `cpu` each a `cgroup`
  mount under /sys/fs/cgroup/<controller>, cgroup2 mounted without them): the run
  gets one directory per hierarchy that holds a controller its limits need, and a
  process joins by writing to each of their `cgroup.procs`.

Where: a child `sandgate-<run>` of the calling process's own cgroup in each
hierarchy (/proc/self/cgroup), so the host's accounting of whoever started sandgate
(a systemd unit, a container) still covers the task; or of SANDGATE_CGROUP_PARENT
(a cgroup path such as `/sandgate`, taken in every hierarchy), created if missing.
A warm runner makes its next task's cgroup before the run is known
(`TaskCgroup.ahead`, `sandgate-warm-<hex>`, under the runner pool's cgroup), and
its init's process waits in it; the run's limits are written when it comes.

cgroup v2's no-internal-processes rule: a cgroup that holds processes cannot enable
controllers for its children (writing `cgroup.subtree_control` fails with EBUSY).
As with systemd's delegation, the processes of the parent (sandgate itself among
them) move into a leaf `<parent>/sandgate.self` first; later runs of a process that
lives in `sandgate.self` use its parent, so runs never nest in one another.

Limits are written before any process joins. Memory includes swap (v2
`memory.swap.max` 0, v1 `memory.memsw.limit_in_bytes`), else the task could swap
past its limit. A task at its limits sees what the kernel gives: fork/clone fail
with EAGAIN at pids.max, the OOM killer kills inside the cgroup at the memory
limit, the CPU quota throttles; `limits_hit()` tells the runner afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import posixpath
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

DEFAULT_MEMORY_BYTES = 4 << 30
DEFAULT_PIDS = 1024
MIN_MEMORY_BYTES = 1 << 20
MIN_CPUS = 0.01  # the kernel's smallest quota is 1 ms per 100 ms period
# The upper bounds say at the start what the kernel would refuse at a cgroup or tmpfs
# write (a size past 64 bits, a quota past the CFS bandwidth limit): each is beyond what
# a host has, so nothing a real limit asks for is refused. 4194304 is the kernel's
# PID_MAX_LIMIT: more pids than that cannot exist.
MAX_MEMORY_BYTES = 1 << 50
MAX_PIDS = 1 << 22
MAX_CPUS = 4096
CPU_PERIOD_US = 100_000
PREFIX = "sandgate-"
AHEAD_PREFIX = PREFIX + "warm-"  # a cgroup a warm runner made before its run (TaskCgroup.ahead)
SELF_LEAF = "sandgate.self"
PARENT_ENV = "SANDGATE_CGROUP_PARENT"
REMOVE_TIMEOUT_S = 5.0

# The controller each limit needs, and back.
CONTROLLER_OF = {"memory": "memory", "pids": "pids", "cpus": "cpu"}
LIMIT_OF = {controller: limit for limit, controller in CONTROLLER_OF.items()}

_NAME = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class CgroupError(RuntimeError):
    """The task's cgroup could not be found, created, configured or removed."""


# --- what the task may use ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits for one task; None means no limit of that kind."""

    memory_bytes: int | None = DEFAULT_MEMORY_BYTES
    pids: int | None = DEFAULT_PIDS
    cpus: float | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and (
            not _is_int(self.memory_bytes)
            or not MIN_MEMORY_BYTES <= self.memory_bytes <= MAX_MEMORY_BYTES
        ):
            raise ValueError(f"memory limit must be from 1M to 1024T, not {self.memory_bytes!r}")
        if self.pids is not None and (not _is_int(self.pids) or not 1 <= self.pids <= MAX_PIDS):
            raise ValueError(
                f"pids limit must be a whole number from 1 to {MAX_PIDS}, not {self.pids!r}"
            )
        if self.cpus is not None and (
            isinstance(self.cpus, bool)
            or not isinstance(self.cpus, int | float)
            or not math.isfinite(self.cpus)
            or not MIN_CPUS <= self.cpus <= MAX_CPUS
        ):
            raise ValueError(
                f"cpus limit must be a number from {MIN_CPUS} to {MAX_CPUS}, not {self.cpus!r}"
            )

    def controllers(self) -> tuple[str, ...]:
        """The cgroup controllers these limits need, in a fixed order."""
        return tuple(
            CONTROLLER_OF[limit]
            for limit in ("memory", "pids", "cpus")
            if getattr(self, _FIELD_OF[limit]) is not None
        )


_FIELD_OF = {"memory": "memory_bytes", "pids": "pids", "cpus": "cpus"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512M", "4G", "4GiB", "2t" (units are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional "
            "unit K, M, G or T, e.g. 512M or 4G"
        )
    number, unit = match.groups()
    return int(number) * (_UNITS[unit.lower()] if unit else 1)


def parse_cpus(text: str) -> float:
    """A CPU count such as "1.5" (one and a half CPUs' worth of time per period)."""
    try:
        cpus = float(text)
    except ValueError:
        cpus = math.nan
    if not math.isfinite(cpus) or not MIN_CPUS <= cpus <= MAX_CPUS:
        raise ValueError(
            f"invalid CPU count {text!r}: expected a number from {MIN_CPUS} to {MAX_CPUS}, "
            "e.g. 0.5 or 2"
        )
    return cpus


@dataclass(frozen=True)
class LimitHit:
    """A limit the task ran into: `count` times (OOM kills, refused forks, throttled periods)."""

    limit: Literal["memory", "pids", "cpus", "disk"]
    count: int
    detail: str


# --- the host's cgroup filesystems ------------------------------------------------


class CgroupFS:
    """The I/O edge: /proc and the cgroup mounts seen from `root` ("/" on a real host;
    a fake tree in tests, which override the few calls whose kernel behaviour a plain
    directory cannot show)."""

    def __init__(self, root: str = "/", mountinfo: str = "/proc/self/mountinfo"):
        self.root = root
        self.mountinfo = mountinfo
        self.own_cgroup = "/proc/self/cgroup"  # whose cgroups a run's are made under

    def path(self, absolute: str) -> str:
        return os.path.join(self.root, absolute.lstrip("/"))

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def write(self, path: str, text: str) -> None:
        """One write(2), as control files want; no O_CREAT: a missing file is an error."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def signal_members(self, cgroup_dir: str, signum: int) -> None:
        """Signal every process in the cgroup, never one that merely reuses a pid.

        A pidfd is taken first; a pid still listed in cgroup.procs afterwards is
        held either by the process the pidfd names or, if that one died, by a
        new one that the pidfd does not reach (ESRCH, killed on the next round).
        """
        procs = os.path.join(cgroup_dir, "cgroup.procs")
        pidfds = {}
        for pid in _pids(self, procs):
            with contextlib.suppress(ProcessLookupError):
                pidfds[pid] = os.pidfd_open(pid)
        try:
            still_there = _pids(self, procs)
            for pid, pidfd in pidfds.items():
                if pid in still_there:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signum)
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)

    def swap_active(self) -> bool:
        try:
            return len(self.read(self.path("/proc/swaps")).splitlines()) > 1
        except FileNotFoundError:
            return False


def _pids(fs: CgroupFS, procs_file: str) -> set[int]:
    try:
        return {int(line) for line in fs.read(procs_file).split()}
    except FileNotFoundError:
        return set()


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem mount from mountinfo: `root` is the cgroup shown at
    `mountpoint` ("/" unless bind-mounted or seen from a cgroup namespace)."""

    root: str
    mountpoint: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # super options; a v1 mount's controllers are among them


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a /proc/<pid>/mountinfo, in order."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if sep and len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            mounts.append(
                Mount(
                    _unescape(fields[3]),
                    _unescape(fields[4]),
                    rest[0],
                    frozenset(rest[2].split(",")),
                )
            )
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: cgroup path}; the v2 hierarchy's key is ""."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            paths[""] = path
        for controller in filter(None, controllers.split(",")):
            paths[controller] = path
    return paths


PRIVATE_MOUNTS = "/run/sandgate-cgroupfs"  # not in RUN_DIR, where every folder is a run


def _host_fs() -> CgroupFS:
    """Our own mounts. Where our mount namespace shows no cgroup filesystem but is not
    the host's (`ip netns exec` gives a private one with a fresh /sys), the hierarchies
    we belong to (/proc/self/cgroup: membership is per process, not per mount
    namespace) are mounted again in that private namespace, and vanish with it."""
    try:
        with open("/proc/self/mountinfo") as f:
            if parse_mountinfo(f.read()):
                return CgroupFS()
        _mount_own_hierarchies()
    except OSError:
        pass
    return CgroupFS()


def _mount_own_hierarchies() -> None:
    try:
        host_namespace = os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        host_namespace = False  # PID 1's is unreadable: ours is not the host's to change either way
    if host_namespace:
        return  # never mount on the host: report the missing controllers instead
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, _ = line.split(":", 2)
        if controllers and not set(controllers.split(",")) & set(LIMIT_OF):
            continue
        target = os.path.join(PRIVATE_MOUNTS, controllers or "unified")
        os.makedirs(target, exist_ok=True)
        if not os.path.ismount(target):
            fstype = b"cgroup" if controllers else b"cgroup2"
            libc.mount(b"cgroup", target.encode(), fstype, 0, controllers.encode() or None)


HOST = _host_fs()


@dataclass(frozen=True)
class Hierarchy:
    """Where some of our controllers live, and the directory runs are created in."""

    version: Literal[1, 2]
    mountpoint: str
    controllers: frozenset[str]
    parent: str
    root: str = "/"  # the cgroup its mount shows at `mountpoint`
    # What finds it again from another mount (`find_named`): "" for cgroup v2, else a
    # controller of its mount. Not one of `controllers`, which a run's limits narrow
    # (to none for a hierarchy of a warm runner's cgroup that no limit needs).
    key: str = ""


def _parent_override(parent: str | None) -> str | None:
    parent = parent if parent is not None else os.environ.get(PARENT_ENV) or None
    if parent is None:
        return None
    parts = parent.split("/")
    if not parent.startswith("/") or any(p in (".", "..") for p in parts):
        raise CgroupError(
            f"cgroup parent {parent!r} ({PARENT_ENV} or --cgroup-parent) must be "
            "an absolute cgroup path without . or .., e.g. /sandgate"
        )
    return "/" + "/".join(p for p in parts if p)


def _locate(fs: CgroupFS, override: str | None) -> dict[str, Hierarchy]:
    """{controller: its hierarchy} for memory, pids and cpu, those this host has."""
    own = parse_proc_cgroup(fs.read(fs.path(fs.own_cgroup)))
    located: dict[str, Hierarchy] = {}
    for mount in parse_mountinfo(fs.read(fs.path(fs.mountinfo))):
        mountpoint = fs.path(mount.mountpoint)
        if mount.fstype == "cgroup":
            version, here = 1, set(LIMIT_OF) & mount.options
            own_path = own.get(min(here)) if here else None
        else:
            version, own_path = 2, own.get("")
            here = set(LIMIT_OF) & set(
                fs.read(os.path.join(mountpoint, "cgroup.controllers")).split()
            )
        here -= located.keys()  # the same hierarchy mounted twice: the first usable mount
        if not here or own_path is None:
            continue
        relative = override if override is not None else _within(mount.root, own_path)
        if relative is None:
            continue
        hierarchy = Hierarchy(
            version,
            mountpoint,
            frozenset(here),
            posixpath.normpath(posixpath.join(mountpoint, relative.lstrip("/"))),
            mount.root,
            "" if version == 2 else min(here),
        )
        located.update(dict.fromkeys(here, hierarchy))
    return located


def _within(mount_root: str, own_path: str) -> str | None:
    """Our cgroup relative to what the mount shows, without a trailing sandgate.self."""
    base = mount_root.rstrip("/")
    if own_path != mount_root and not own_path.startswith(base + "/"):
        return None
    relative = own_path[len(base) :] or "/"
    return posixpath.dirname(relative) if posixpath.basename(relative) == SELF_LEAF else relative


def check(limits: Limits, *, parent: str | None = None, fs: CgroupFS = HOST) -> list[str]:
    """What this host lacks for `limits`, each naming the controller and the fix; [] if nothing."""
    try:
        located = _locate(fs, _parent_override(parent))
    except (CgroupError, OSError) as e:
        return [f"cgroups: cannot read where they are mounted: {e}"]
    problems: list[str] = []
    for controller in limits.controllers():
        hierarchy = located.get(controller)
        if hierarchy is None:
            problems.append(
                f"{controller}: this host has no cgroup controller {controller!r} (no v1 hierarchy "
                f"in /proc/self/mountinfo has it, nor the cgroup2 root's cgroup.controllers): "
                f"enable it in the kernel, or drop the {LIMIT_OF[controller]} limit"
            )
        else:
            problems += _problems_at(fs, hierarchy, controller)
    return list(dict.fromkeys(problems))


def _problems_at(fs: CgroupFS, hierarchy: Hierarchy, controller: str) -> list[str]:
    anchor = hierarchy.parent  # the nearest existing directory: missing ones are created
    while not os.path.isdir(anchor) and anchor != hierarchy.mountpoint:
        anchor = os.path.dirname(anchor)
    problems = []
    if not os.access(anchor, os.W_OK):
        problems.append(
            f"{controller}: no permission to create cgroups in {anchor}: run sandgate "
            "as root, or delegate that cgroup to its user (systemd: Delegate=yes)"
        )
    if hierarchy.version == 2:
        if controller not in fs.read(os.path.join(anchor, "cgroup.controllers")).split():
            problems.append(
                f"{controller}: the cgroup v2 controller is not delegated to {anchor}: enable it "
                f"in {os.path.dirname(anchor)}/cgroup.subtree_control (systemd: Delegate=yes)"
            )
    elif controller == "cpu" and not os.path.exists(
        os.path.join(hierarchy.mountpoint, "cpu.cfs_quota_us")
    ):
        problems.append(
            "cpu: the kernel has no CPU bandwidth control (CONFIG_CFS_BANDWIDTH; "
            f"{hierarchy.mountpoint}/cpu.cfs_quota_us is missing): drop the cpus limit"
        )
    elif (
        controller == "memory"
        and fs.swap_active()
        and not os.path.exists(os.path.join(hierarchy.mountpoint, "memory.memsw.limit_in_bytes"))
    ):
        problems.append(
            "memory: swap is on but cgroup v1 does not account it (memory.memsw.* "
            f"missing in {hierarchy.mountpoint}), so the task could swap past its "
            "memory limit: boot with swapaccount=1, or turn swap off"
        )
    return problems


# --- one run's cgroup ------------------------------------------------------------


@dataclass(frozen=True)
class _Dir:
    """The run's directory in one hierarchy; `hierarchy.controllers` are those it limits."""

    hierarchy: Hierarchy
    path: str


# cgroup v1 charges a task's TCP buffers to nothing unless its cgroup has a TCP limit:
# 200 loopback connections the task never reads held 623 MiB of host memory with
# 1 MiB charged, and enough of them reach the host-wide tcp_mem, where every TCP
# socket on the host (the gateway's, for every task) is under memory pressure. v2
# charges socket memory to memory.max.
TCP_BYTES_V1 = 256 << 20


def limit_settings(
    version: int,
    controllers: Iterable[str],
    limits: Limits,
    swap_file: bool,
    *,
    tcp_file: bool = False,
) -> list[tuple[str, str]]:
    """The (control file, value) writes that set `limits` in one cgroup directory,
    in order (v1's memsw must stay at or above the memory limit it follows).
    Controllers whose limit is None get no write. `tcp_file`: v1's cgroup has
    memory.kmem.tcp.limit_in_bytes (TCP_BYTES_V1, at most the memory limit)."""
    controllers = set(controllers) & set(limits.controllers())
    writes = []
    if "memory" in controllers:
        memory = str(limits.memory_bytes)
        if version == 2:
            writes.append(("memory.max", memory))
            if swap_file:
                writes.append(("memory.swap.max", "0"))
        else:
            writes.append(("memory.limit_in_bytes", memory))
            if swap_file:
                writes.append(("memory.memsw.limit_in_bytes", memory))
            if tcp_file:
                tcp = str(min(limits.memory_bytes, TCP_BYTES_V1))
                writes.append(("memory.kmem.tcp.limit_in_bytes", tcp))
    if "pids" in controllers:
        writes.append(("pids.max", str(limits.pids)))
    if "cpu" in controllers:
        quota = str(max(1000, round(limits.cpus * CPU_PERIOD_US)))
        if version == 2:
            writes.append(("cpu.max", f"{quota} {CPU_PERIOD_US}"))
        else:
            writes += [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", quota)]
    return writes


_SWAP_FILE = {1: "memory.memsw.limit_in_bytes", 2: "memory.swap.max"}
_TCP_FILE_V1 = "memory.kmem.tcp.limit_in_bytes"


class TaskCgroup:
    """One run's cgroup: a directory per hierarchy, limits set, empty until a process joins."""

    def __init__(self, name: str, limits: Limits, dirs: list[_Dir], fs: CgroupFS):
        self.name, self.limits, self._dirs, self._fs = name, limits, dirs, fs
        self.parent: str | None = None  # the parent override it was made under, if any

    @classmethod
    def create(
        cls, name: str, limits: Limits, *, parent: str | None = None, fs: CgroupFS = HOST
    ) -> TaskCgroup:
        """Create `name` (sandgate-<run id>) in every hierarchy `limits` need and set them.

        `parent` (else $SANDGATE_CGROUP_PARENT, else our own cgroup) is a cgroup path
        taken in each hierarchy. Raises CgroupError naming what is missing or failed;
        what was created by then is removed.
        """
        if not _NAME.fullmatch(name):
            raise CgroupError(
                f"invalid cgroup name {name!r}: expected {PREFIX}<run id> "
                "(letters, digits, '.', '_', '-')"
            )
        override = _parent_override(parent)
        problems = check(limits, parent=override, fs=fs)
        if problems:
            raise CgroupError("cannot set the task's limits: " + "; ".join(problems))
        located = _locate(fs, override)
        needed = set(limits.controllers())
        hierarchies = {located[c]: None for c in limits.controllers()}  # in order, once each
        cgroup = cls(name, limits, [], fs)
        cgroup.parent = override
        try:
            for hierarchy in hierarchies:
                made = _make_dir(
                    fs, replace(hierarchy, controllers=hierarchy.controllers & needed), name
                )
                cgroup._dirs.append(made)
                _configure(fs, made, limits)
        except BaseException:
            with contextlib.suppress(CgroupError):
                cgroup.remove()
            raise
        return cgroup

    @classmethod
    def ahead(cls, name: str, *, fs: CgroupFS = HOST) -> TaskCgroup:
        """A task cgroup made before its run is known (a warm runner's, enforcer/zygote.py):
        `name` in every hierarchy of memory, pids and cpu this host has, under the same
        parent as create()'s, with no limit yet. A process joins it while the runner
        waits; set_limits() writes the run's limits when the run comes, and the init is
        forked in it. Raises CgroupError; what was created by then is removed."""
        if not _NAME.fullmatch(name):
            raise CgroupError(f"invalid cgroup name {name!r}: expected {PREFIX}<name>")
        override = _parent_override(None)
        located = _locate(fs, override)
        if not located:
            raise CgroupError("this host has no cgroup hierarchy with memory, pids or cpu")
        cgroup = cls(name, Limits(memory_bytes=None, pids=None), [], fs)
        cgroup.parent = override
        try:
            for hierarchy in dict.fromkeys(located.values()):
                cgroup._dirs.append(_make_dir(fs, hierarchy, name))
        except BaseException:
            with contextlib.suppress(CgroupError):
                cgroup.remove()
            raise
        return cgroup

    def made_under(self, parent: str | None = None) -> bool:
        """Whether it was made where create(parent=parent) would make one now
        (SANDGATE_CGROUP_PARENT is read from the environment of the moment)."""
        try:
            return _parent_override(parent) == self.parent
        except CgroupError:
            return False

    def set_limits(self, limits: Limits) -> None:
        """Write `limits` into a cgroup made ahead, before the task is forked in it.
        The directories of controllers no limit needs stay, without a limit."""
        needed = set(limits.controllers())
        missing = needed - {c for d in self._dirs for c in d.hierarchy.controllers}
        if missing:
            raise CgroupError(f"{self.name} has no {' or '.join(sorted(missing))} controller")
        dirs = [
            replace(d, hierarchy=replace(d.hierarchy, controllers=d.hierarchy.controllers & needed))
            for d in self._dirs
        ]
        for d in dirs:
            _configure(self._fs, d, limits)
        self._dirs, self.limits = dirs, limits

    @property
    def paths(self) -> list[str]:
        return [d.path for d in self._dirs]

    @property
    def named(self) -> list[tuple[str, str]]:
        """Its directories apart from any mount: (hierarchy, cgroup path) each, the
        hierarchy a v1 controller of it or "" for cgroup v2, the path as
        /proc/<pid>/cgroup gives it. `members` finds them again from any mount
        namespace (a runner of `ip netns exec` mounts its hierarchies elsewhere)."""
        return [_named(d) for d in self._dirs]

    @property
    def procs_files(self) -> list[str]:
        """Write "0" to each (one write each, before forking) to move the writer in."""
        return [os.path.join(d.path, "cgroup.procs") for d in self._dirs]

    def attach(self, pid: int) -> None:
        for procs in self.procs_files:
            _set(self._fs, procs, str(pid))

    def members(self) -> set[int]:
        """The processes in it now, in any of its hierarchies (OSError if unreadable)."""
        return set().union(*(_pids(self._fs, procs) for procs in self.procs_files))

    def limits_hit(self) -> list[LimitHit]:
        """The limits the task ran into so far; read before remove()."""
        hits = []
        for d in self._dirs:
            try:
                hits += _hits_in(self._fs, d, self.limits)
            except OSError as e:
                raise CgroupError(f"cannot read the counters of {d.path}: {e.strerror}") from e
        return hits

    def remove(self, timeout: float = REMOVE_TIMEOUT_S) -> None:
        """Kill what is left in the cgroup, wait until it is empty and remove it (idempotent)."""
        _remove_dirs(self._fs, self.paths, timeout)
        self._dirs = []

    def end_members(self, timeout: float = REMOVE_TIMEOUT_S) -> None:
        """Kill every member and wait until none is left (CgroupError past `timeout`);
        the cgroup stays, with its counters."""
        _kill_members(self._fs, self.paths, timeout)


def _named(d: _Dir) -> tuple[str, str]:
    h = d.hierarchy
    relative = posixpath.relpath(d.path, h.mountpoint)
    return h.key, posixpath.normpath(posixpath.join(h.root, relative))


def _set(fs: CgroupFS, path: str, value: str) -> None:
    try:
        fs.write(path, value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


def _make_dir(fs: CgroupFS, hierarchy: Hierarchy, name: str) -> _Dir:
    path = os.path.join(hierarchy.parent, name)
    try:
        if hierarchy.version == 2:
            _enable_v2(fs, hierarchy.parent, hierarchy.controllers, hierarchy.mountpoint)
        else:
            _makedirs(fs, hierarchy.parent, hierarchy.mountpoint)
        fs.mkdir(path)
    except FileExistsError as e:
        raise CgroupError(
            f"{path} already exists: a run of that name is live or crashed "
            "(`sandgate gc` removes leftovers)"
        ) from e
    except OSError as e:
        raise CgroupError(f"cannot create {e.filename or path}: {e.strerror}") from e
    return _Dir(hierarchy, path)


def _configure(fs: CgroupFS, d: _Dir, limits: Limits) -> None:
    version, controllers = d.hierarchy.version, d.hierarchy.controllers
    swap_file = os.path.exists(os.path.join(d.path, _SWAP_FILE[version]))
    if "memory" in controllers and not swap_file and fs.swap_active():
        raise CgroupError(
            f"memory: swap is on but {d.path} has no {_SWAP_FILE[version]}, "
            "so the task could swap past its memory limit: enable swap accounting "
            "(CONFIG_MEMCG_SWAP, swapaccount=1) or turn swap off"
        )
    tcp_file = version == 1 and os.path.exists(os.path.join(d.path, _TCP_FILE_V1))
    for control_file, value in limit_settings(
        version, controllers, limits, swap_file, tcp_file=tcp_file
    ):
        _set(fs, os.path.join(d.path, control_file), value)


def _makedirs(fs: CgroupFS, path: str, mountpoint: str) -> None:
    if path != mountpoint and not os.path.isdir(path):
        _makedirs(fs, os.path.dirname(path), mountpoint)
        fs.mkdir(path)


def _enable_v2(fs: CgroupFS, path: str, controllers: frozenset[str], mountpoint: str) -> None:
    """Make `path` exist with `controllers` enabled for its children, every ancestor too.

    EBUSY means `path` holds processes (the no-internal-processes rule): they move
    into its leaf sandgate.self, then the write is tried again.
    """
    if path != mountpoint and not os.path.isdir(path):
        _enable_v2(fs, os.path.dirname(path), controllers, mountpoint)
        fs.mkdir(path)
    subtree_control = os.path.join(path, "cgroup.subtree_control")
    missing = sorted(controllers - set(fs.read(subtree_control).split()))
    if not missing:
        return
    request = " ".join("+" + controller for controller in missing)
    for _attempt in range(3):
        try:
            fs.write(subtree_control, request)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupError(
                    f"cannot write {request!r} to {subtree_control}: {e.strerror}"
                ) from e
        _evacuate(fs, path)
    raise CgroupError(
        f"cannot enable {request} in {subtree_control}: processes keep joining {path} "
        "(cgroup v2 allows no processes in a cgroup that enables controllers)"
    )


def _evacuate(fs: CgroupFS, path: str) -> None:
    leaf = os.path.join(path, SELF_LEAF)
    with contextlib.suppress(FileExistsError):
        fs.mkdir(leaf)
    for pid in sorted(_pids(fs, os.path.join(path, "cgroup.procs"))):
        try:
            fs.write(os.path.join(leaf, "cgroup.procs"), str(pid))
        except ProcessLookupError:
            continue
        except OSError as e:
            raise CgroupError(
                f"cannot move process {pid} from {path} into {leaf} "
                f"to enable controllers there: {e.strerror}"
            ) from e


def _keyed(text: str) -> dict[str, int]:
    """ "key value" lines (memory.events, pids.events, cpu.stat, memory.oom_control)."""
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _hits_in(fs: CgroupFS, d: _Dir, limits: Limits) -> list[LimitHit]:
    """Counters read back. Memory counts OOM kills only: usage reaching the limit
    (v1 failcnt, v2 `max`) also happens whenever page cache is reclaimed, harmlessly."""

    def read(control_file: str) -> str:
        return fs.read(os.path.join(d.path, control_file))

    version, controllers = d.hierarchy.version, d.hierarchy.controllers
    hits = []
    if "memory" in controllers:
        if version == 2:
            events = _keyed(read("memory.events"))
            kills, reached = events.get("oom_kill", 0), events.get("max", 0)
        else:
            kills, reached = (
                _keyed(read("memory.oom_control")).get("oom_kill", 0),
                int(read("memory.failcnt")),
            )
        if kills:
            hits.append(
                LimitHit(
                    "memory",
                    kills,
                    (
                        f"{kills} process(es) killed by the OOM killer at the memory limit of "
                        f"{limits.memory_bytes} bytes (usage reached the limit {reached} times)"
                    ),
                )
            )
    if "pids" in controllers:
        refused = _keyed(read("pids.events")).get("max", 0)
        if refused:
            hits.append(
                LimitHit(
                    "pids",
                    refused,
                    (
                        f"{refused} fork/clone call(s) failed with EAGAIN at the limit of "
                        f"{limits.pids} processes"
                    ),
                )
            )
    if "cpu" in controllers:
        stat = _keyed(read("cpu.stat"))
        throttled = stat.get("nr_throttled", 0)
        seconds = (
            stat.get("throttled_usec", 0) / 1e6
            if version == 2
            else stat.get("throttled_time", 0) / 1e9
        )
        if throttled:
            hits.append(
                LimitHit(
                    "cpus",
                    throttled,
                    (
                        f"throttled in {throttled} period(s), {seconds:.1f} s in all, at the limit of "
                        f"{limits.cpus:g} CPUs"
                    ),
                )
            )
    return hits


def _remove_dirs(fs: CgroupFS, paths: list[str], timeout: float) -> list[str]:
    """SIGKILL every member, wait until empty, rmdir; the paths removed (not those
    gone already)."""
    deadline = time.monotonic() + timeout
    _kill_members(fs, paths, timeout)
    removed = []
    for path in paths:
        while True:
            try:
                fs.rmdir(path)
                removed.append(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY: the last members are still exiting.
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {path}: {e.strerror}") from e
                time.sleep(0.01)
    return removed


def _kill_members(fs: CgroupFS, paths: list[str], timeout: float) -> None:
    """SIGKILL every member (v2: cgroup.kill, one write, race-free) and wait until no
    process is left in `paths`."""
    deadline = time.monotonic() + timeout
    for path in paths:
        kill_file = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill_file):
            with contextlib.suppress(FileNotFoundError):
                fs.write(kill_file, "1")
    while left := [p for p in paths if _pids(fs, os.path.join(p, "cgroup.procs"))]:
        if time.monotonic() > deadline:
            raise CgroupError(f"processes in {', '.join(left)} survived SIGKILL for {timeout:g} s")
        for path in left:
            fs.signal_members(path, signal.SIGKILL)
        time.sleep(0.01)


# --- leftovers of crashed runs (`sandgate gc`) ------------------------------------


def leftovers(prefix: str = PREFIX, *, fs: CgroupFS = HOST) -> list[str]:
    """Every cgroup directory named `prefix`* in the hierarchies of memory, pids and cpu,
    wherever it was created. Which belong to dead runs is the caller's to decide."""
    if not prefix.startswith(PREFIX):
        raise CgroupError(f"leftover prefix {prefix!r} must start with {PREFIX!r}")
    found = []
    for mountpoint in sorted({h.mountpoint for h in _locate(fs, None).values()}):
        for dirpath, dirnames, _files in os.walk(mountpoint):
            ours = [d for d in dirnames if d.startswith(prefix)]
            found += [os.path.join(dirpath, d) for d in ours]
            dirnames[:] = [d for d in dirnames if d not in ours]
    return sorted(found)


def remove_ahead(name: str, *, timeout: float = REMOVE_TIMEOUT_S, fs: CgroupFS = HOST) -> None:
    """Remove the cgroup `name` that TaskCgroup.ahead made in this process's place (a
    waiting runner's, when the runner died or its pool stops), killing what is in it."""
    if not name.startswith(AHEAD_PREFIX) or not _NAME.fullmatch(name):
        raise CgroupError(f"{name!r} is not the name of a cgroup made ahead ({AHEAD_PREFIX}*)")
    located = _locate(fs, _parent_override(None))
    paths = sorted({os.path.join(h.parent, name) for h in located.values()})
    _remove_dirs(fs, [p for p in paths if os.path.isdir(p)], timeout)


def remove_empty_ahead(*, fs: CgroupFS = HOST) -> list[str]:
    """Remove the empty cgroups made ahead in this process's place (a dead pool's
    runners left them: their seeds died with them); those removed. A live runner's
    holds its seed, so it is not empty (and a removal between its mkdir and its seed's
    move only sends that one run down the path without a cgroup made ahead)."""
    removed = []
    for hierarchy in set(_locate(fs, _parent_override(None)).values()):
        with contextlib.suppress(OSError):
            for entry in os.listdir(hierarchy.parent):
                path = os.path.join(hierarchy.parent, entry)
                if entry.startswith(AHEAD_PREFIX) and not _pids(fs, f"{path}/cgroup.procs"):
                    with contextlib.suppress(OSError):
                        fs.rmdir(path)
                        removed.append(path)
    return sorted(removed)


def find_named(hierarchy: str, path: str, *, fs: CgroupFS = HOST) -> str:
    """The directory of a cgroup that `TaskCgroup.named` gave, in our mounts (it may
    no longer exist). Raises CgroupError when no mount of ours shows that hierarchy
    down to `path`: then whether it holds processes cannot be told from here."""
    for mount in parse_mountinfo(fs.read(fs.path(fs.mountinfo))):
        if (mount.fstype == "cgroup2") != (hierarchy == ""):
            continue
        if hierarchy and hierarchy not in mount.options:
            continue
        base = mount.root.rstrip("/")
        if path == mount.root or path.startswith(base + "/"):
            return posixpath.join(fs.path(mount.mountpoint), path[len(base) :].lstrip("/"))
    where = f"cgroup v1 {hierarchy}" if hierarchy else "cgroup v2"
    raise CgroupError(f"no {where} mount here shows {path}")


def members(hierarchy: str, path: str, *, fs: CgroupFS = HOST) -> set[int]:
    """The processes now in a cgroup that `TaskCgroup.named` gave; none when it is
    gone. Raises CgroupError when that cannot be told (find_named; unreadable)."""
    directory = find_named(hierarchy, path, fs=fs)
    try:
        return _pids(fs, os.path.join(directory, "cgroup.procs"))
    except (OSError, ValueError) as e:
        raise CgroupError(f"cannot read the processes of {directory}: {e}") from e


def remove_path(path: str, *, timeout: float = REMOVE_TIMEOUT_S, fs: CgroupFS = HOST) -> bool:
    """Remove one directory from leftovers(), killing what still runs in it; False when
    it is gone already."""
    mountpoints = {h.mountpoint for h in _locate(fs, None).values()}
    if not _NAME.fullmatch(os.path.basename(path)) or not any(
        path.startswith(m.rstrip("/") + "/") for m in mountpoints
    ):
        raise CgroupError(
            f"{path} is not a sandgate cgroup (a {PREFIX}* directory in a cgroup hierarchy)"
        )
    return bool(_remove_dirs(fs, [path], timeout))
