"""Which host ids a run's task gets: a range of spec.ID_COUNT ids of its own, a slot
of the host's pool, held for the run's life.

Why one range a run and not one for all: the kernel keeps many limits per host user,
shared by every process of that uid, whatever its namespaces: pipe buffers
(fs.pipe-user-pages-soft, by real uid), inotify instances and watches, fanotify
groups and marks, RLIMIT_NPROC, RLIMIT_MSGQUEUE, RLIMIT_SIGPENDING and nested user
namespaces (charged up the user namespaces to the owner of the task's one, which
sandbox/init.py makes the slot's first id: see `run_init`). With one range for all,
one task that used up its pipe buffers made every other task's pipes one page, and
with root owning every task's user namespace, one task's 128 inotify instances were
also root's: the gateway's, the runner's, systemd's. docs/sandbox.md, "Its identity".

A slot is claimed with a non-blocking flock on `ID_SLOT_DIR/<first id>`, kept by the
runner (the process that calls `claim`) until `IdSlot.release` or its death. The
runner releases it after the task's cgroup is gone (prepare.PreparedSandbox.remove),
so the next holder's ids own nothing still alive. The lock files stay (unlinking one
a run may be opening would let two runs hold one slot); there is one per slot ever
used.

A lock alone is not enough: the kernel drops a SIGKILLed runner's at once, while its
task (running as the slot's ids) may still live: its parent-death signals and PID
namespace teardown are a chain of kills that a process in uninterruptible sleep, a
frozen cgroup or a large exit delays, and a runner that dies leaves its cgroup to
`sandgate gc`. So the lock file says where the task is: before any process has the
slot's ids, the holder writes a record there (`IdSlot.record`): `{"pid": ...,
"cgroups": [...]}`, its task's cgroups in every hierarchy, v1 and v2, as
/proc/<pid>/cgroup gives them, or null for a task without one; it empties the file
when it releases the slot with its task gone. An empty file is the normal path:
nothing more to look at. A record left there is a holder that died (or could not
remove its task's cgroup): the claimant takes the slot only when no process is left
in those cgroups, or, with no cgroup named (a run without limits, or a record that
cannot be parsed), when no process in /proc has an id of the slot. When that cannot
be told (a cgroup unreadable, no mount showing it, /proc unreadable), the slot is
not taken either.

Such a slot is skipped, not cleared: the claimant takes the next free one and leaves
the orphaned task to `sandgate gc` (`sweep`), which kills its cgroup and then empties
the record. Killing it at the claim would put a cross-run kill, and a wait of up to
cgroup.REMOVE_TIMEOUT_S for a process that does not die at once (just the kind
that is left), on a run's start; skipping costs one slot of 1,024 until gc.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import signal
from dataclasses import dataclass
from pathlib import Path

from sandgate.enforcer.sandbox import cgroup
from sandgate.enforcer.sandbox.spec import ID_BASE, ID_COUNT, SUBID_USER, IdRange, SandboxError

# The built-in pool: ID_SLOTS ranges of ID_COUNT ids from ID_BASE (2,000,000,000 to
# 2,067,108,863: below 2^31, which some tools take for a negative id). That many runs
# at once; the next is refused until one ends. An /etc/subuid `sandgate:BASE:COUNT`
# entry replaces it: COUNT // ID_COUNT slots.
ID_SLOTS = 1024
# The host's, like the sandbox addresses (run.ADDRESS_LOCK): whatever a run's RUN_DIR.
ID_SLOT_DIR = Path("/run/sandgate-ids")


@dataclass(frozen=True)
class IdPool:
    base: int
    slots: int
    source: str  # where it came from, for messages and docs

    def slot(self, index: int) -> IdRange:
        return IdRange(self.base + index * ID_COUNT, ID_COUNT, self.source)


def host_id_pool(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> IdPool:
    """The host ids the tasks' ids map to, as slots of ID_COUNT: /etc/subuid's `sandgate`
    entry when there is one (and /etc/subgid has one from the same id), else the
    built-in pool; refused when an account or another user's subordinate range owns
    any of the built-in pool's ids."""
    mine = [r for r in _subid_ranges(subuid) if r[0] == SUBID_USER and r[2] >= ID_COUNT]
    if mine:
        _, base, count = mine[0]
        gids = [
            r[2]
            for r in _subid_ranges(subgid)
            if r[0] == SUBID_USER and r[1] == base and r[2] >= ID_COUNT
        ]
        if not gids:
            raise SandboxError(
                f"{subuid} gives {SUBID_USER} ids from {base}, but {subgid} has no matching "
                f"range of {ID_COUNT} or more: add '{SUBID_USER}:{base}:{count}' to {subgid}"
            )
        return IdPool(base, min(count, gids[0]) // ID_COUNT, f"{subuid} ({SUBID_USER})")
    end = ID_BASE + ID_SLOTS * ID_COUNT
    fix = f"add a '{SUBID_USER}:BASE:COUNT' line (COUNT a multiple of {ID_COUNT}) to /etc/subuid"
    for who, start, count in _subid_ranges(subuid) + _subid_ranges(subgid):
        if start < end and start + count > ID_BASE:
            raise SandboxError(
                f"the sandbox ids {ID_BASE}-{end - 1} overlap {who}'s subordinate ids: "
                f"{fix} and /etc/subgid"
            )
    for account in pwd.getpwall():
        if ID_BASE <= account.pw_uid < end:
            raise SandboxError(
                f"the sandbox ids {ID_BASE}-{end - 1} include the account {account.pw_name} "
                f"(uid {account.pw_uid}): {fix}"
            )
    return IdPool(ID_BASE, ID_SLOTS, "built-in range")


def _subid_ranges(path: Path) -> list[tuple[str, int, int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts[1:]):
            ranges.append((parts[0], int(parts[1]), int(parts[2])))
    return ranges


class IdSlot:
    """A claimed slot: `ids` are this run's alone until `release` (or the holder's death)."""

    def __init__(self, ids: IdRange, lock_fd: int, recorded: int = 0):
        self.ids = ids
        self._fd: int | None = lock_fd
        self._recorded = recorded  # the lock file's size

    def record(self, cgroups: list[tuple[str, str]] | None) -> None:
        """Name where the task's processes are: its cgroups (TaskCgroup.named), or None
        when it has none (a claimant then looks for the slot's ids in /proc). Call it
        before any process has the slot's ids: a holder killed before names nothing,
        and nothing of its is left to look for."""
        if self._fd is not None:
            data = json.dumps({"pid": os.getpid(), "cgroups": cgroups}).encode()
            os.pwrite(self._fd, data, 0)
            if self._recorded > len(data):  # a longer one before: a tail would spoil it
                os.ftruncate(self._fd, len(data))
            self._recorded = len(data)

    def release(self, *, task_gone: bool = True) -> None:
        """Free the slot. `task_gone`: no process of the task is left, the record is
        emptied; else it stays, and the next claimant looks before it takes the slot."""
        if self._fd is not None:
            if task_gone and self._recorded:
                with contextlib.suppress(OSError):  # not emptied: the next claim looks
                    os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def claim(
    pool: IdPool, lock_dir: Path = ID_SLOT_DIR, *, fs: cgroup.CgroupFS = cgroup.HOST
) -> IdSlot:
    """The first free slot of `pool`, locked by this process (CLOEXEC: a forked sandbox
    init closes it, the task never has it to unlock), or SandboxError when every slot
    is taken or the lock dir cannot be made. A slot whose last holder died with its
    task's processes left (its lock file's record) is not free (`left_over`)."""
    try:
        lock_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise SandboxError(f"cannot make {lock_dir} (the sandbox id slots): {e.strerror}") from None
    # From slot 0, the lowest free taken: the next claim looks at a killed holder's slot
    # again and replaces its record once its task is gone (a hint where to start left
    # those records for gc: docs/performance.md, "Session 32"). Each slot looked at is
    # an open and a flock, by name in the directory opened once: beside 256 held slots
    # 2.1-2.2 ms a claim, 3.8-4.8 by path.
    try:
        folder = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"cannot open {lock_dir} (the sandbox id slots): {e.strerror}") from None
    orphaned = 0
    try:
        for index in range(pool.slots):
            ids = pool.slot(index)
            fd = _lock(lock_dir, str(ids.base), folder)
            if fd is None:
                continue
            try:
                recorded = os.fstat(fd).st_size  # 0: released with its task gone: nothing to read
                if recorded and left_over(ids, _read_record(fd), fs=fs):
                    os.close(fd)
                    orphaned += 1
                    continue
            except BaseException:
                os.close(fd)
                raise
            return IdSlot(ids, fd, recorded)
    finally:
        os.close(folder)
    left = (
        f" ({orphaned} of them hold a killed run's task, which `sandgate gc` removes)"
        if orphaned
        else ""
    )
    raise SandboxError(
        f"all {pool.slots} sandbox id ranges ({pool.source}) are in use, one a running task"
        f"{left}: wait for a run to end, or give sandgate more ids with a '{SUBID_USER}:BASE:COUNT' "
        f"line in /etc/subuid and /etc/subgid (COUNT a multiple of {ID_COUNT}, one a task)"
    )


def _lock(lock_dir: Path, name: str, folder: int | None = None) -> int | None:
    """`lock_dir/name` opened and flocked by us, or None when another process holds
    it. `folder`: `lock_dir` open (the name is opened there, no path walked)."""
    try:
        path = name if folder is not None else lock_dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=folder)
    except OSError as e:
        raise SandboxError(f"cannot open {lock_dir / name}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_record(fd: int) -> dict:
    """The record of a lock file that is not empty; one that cannot be read or parsed
    (a holder killed mid-write) names no cgroup: /proc is looked at instead."""
    try:
        record = json.loads(os.pread(fd, 65536, 0))
        cgroups = record["cgroups"]
        if cgroups is not None:
            cgroups = [(str(h), str(p)) for h, p in cgroups]
        return {"pid": record.get("pid"), "cgroups": cgroups}
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": None, "cgroups": None}


def left_over(
    ids: IdRange,
    record: dict,
    *,
    fs: cgroup.CgroupFS = cgroup.HOST,
    proc: Path = Path("/proc"),
) -> str | None:
    """What of a dead holder's task is left, by its record (None: nothing, the slot is
    free): processes in the cgroups it names, or, naming none, processes with an id
    of the slot. When that cannot be told, that is said: never None."""
    if record["cgroups"] is None:
        try:
            pids = processes_with(ids, proc)
        except OSError as e:
            return f"cannot look for processes with its ids in {proc}: {e}"
        return f"processes {sorted(pids)} have its ids" if pids else None
    for hierarchy, path in record["cgroups"]:
        try:
            pids = cgroup.members(hierarchy, path, fs=fs)
        except cgroup.CgroupError as e:
            return f"cannot tell whether its task is gone: {e}"
        if pids:
            return f"processes {sorted(pids)} of its task are left in {path}"
    return None


def processes_with(ids: IdRange, proc: Path = Path("/proc"), *, running: bool = False) -> set[int]:
    """The processes (zombies too, unless `running`) whose real, effective, saved or
    file-system uid or gid is one of `ids`. Raises OSError when /proc or a process's
    status cannot be read."""
    found = set()
    for entry in os.listdir(proc):
        if entry.isdigit() and _has_ids(proc / entry / "status", ids, running):
            found.add(int(entry))
    return found


def _has_ids(status_file: Path, ids: IdRange, running: bool) -> bool:
    try:
        status = status_file.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone meanwhile
    if running and ("\nState:\tZ" in status or "\nState:\tX" in status):
        return False
    return any(
        line.startswith(("Uid:", "Gid:"))
        and any(ids.base <= int(n) < ids.base + ids.count for n in line.split()[1:])
        for line in status.splitlines()
    )


def kill_processes_with(ids: IdRange) -> int:
    """SIGKILL every running process that has one of `ids` (processes_with), never one
    that merely took such a process's pid since (a pidfd is taken, then its ids read
    again); how many were signalled."""
    killed = 0
    for pid in processes_with(ids, running=True):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if _has_ids(Path(f"/proc/{pid}/status"), ids, running=True):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed += 1
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return killed


def sweep(
    pool: IdPool,
    lock_dir: Path = ID_SLOT_DIR,
    *,
    dry_run: bool = False,
    holders: set[int] | None = None,
    fs: cgroup.CgroupFS = cgroup.HOST,
) -> list[str]:
    """`sandgate gc`: free the slots whose holder died without releasing them. Held
    (by us, meanwhile) so that no run claims it, each has the cgroups its record names
    removed, killing what is left in them, as gc does a dead run's, then its record
    emptied. One whose task had no cgroup is freed once no process has its ids (a task
    without one dies with its PID namespace). Returns what was (with `dry_run`: would
    be) freed; raises cgroup.CgroupError when a cgroup cannot be removed (the slot
    stays taken). A slot held now is a live run's: untouched. `holders`: only the
    slots these dead processes held (the service, for a runner that died)."""
    freed = []
    for index in range(pool.slots):
        ids = pool.slot(index)
        path = lock_dir / str(ids.base)
        if not path.exists() or (fd := _lock(lock_dir, path.name)) is None:
            continue
        try:
            if not os.fstat(fd).st_size:
                continue
            record = _read_record(fd)
            if holders is not None and record["pid"] not in holders:
                continue
            what = f"id slot {ids.base} (of a runner killed with its task, pid {record['pid']})"
            if dry_run:
                freed.append(what)
                continue
            for hierarchy, named in record["cgroups"] or []:
                cgroup.remove_path(cgroup.find_named(hierarchy, named, fs=fs), fs=fs)
            if left_over(ids, record, fs=fs) is None:
                os.ftruncate(fd, 0)
                freed.append(what)
        finally:
            os.close(fd)
    return freed


def in_use(pool: IdPool, lock_dir: Path = ID_SLOT_DIR) -> list[int]:
    """The first ids of the slots held now (a probe: for tests and status)."""
    held = []
    for index in range(pool.slots):
        path = lock_dir / str(pool.slot(index).base)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(pool.slot(index).base)
        finally:
            os.close(fd)
    return held
