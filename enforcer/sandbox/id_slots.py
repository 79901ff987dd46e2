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
runner (the process that calls `claim`) until `IdSlot.release` or its death: the
kernel drops the lock of a killed runner, so no slot outlives its run and `sandgate
gc` has nothing to free. The runner releases it after the task's cgroup is gone
(prepare.PreparedSandbox.remove), so the next holder's ids own nothing still alive.
The lock files stay (unlinking one a run may be opening would let two runs hold one
slot); there is one per slot ever used, empty.
"""

from __future__ import annotations

import fcntl
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

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
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            ranges.append((parts[0], int(parts[1]), int(parts[2])))
    return ranges


class IdSlot:
    """A claimed slot: `ids` are this run's alone until `release` (or the holder's death)."""

    def __init__(self, ids: IdRange, lock_fd: int):
        self.ids = ids
        self._fd: int | None = lock_fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def claim(pool: IdPool, lock_dir: Path = ID_SLOT_DIR) -> IdSlot:
    """The first free slot of `pool`, locked by this process (CLOEXEC: a forked sandbox
    init closes it, the task never has it to unlock), or SandboxError when every slot
    is taken or the lock dir cannot be made."""
    try:
        lock_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise SandboxError(f"cannot make {lock_dir} (the sandbox id slots): {e.strerror}") from None
    for index in range(pool.slots):
        ids = pool.slot(index)
        try:
            fd = os.open(lock_dir / str(ids.base), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SandboxError(f"cannot open {lock_dir / str(ids.base)}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return IdSlot(ids, fd)
    raise SandboxError(
        f"all {pool.slots} sandbox id ranges ({pool.source}) are in use, one a running task: "
        f"wait for a run to end, or give sandgate more ids with a '{SUBID_USER}:BASE:COUNT' "
        f"line in /etc/subuid and /etc/subgid (COUNT a multiple of {ID_COUNT}, one a task)"
    )


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
