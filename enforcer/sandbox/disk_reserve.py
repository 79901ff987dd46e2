"""The disk reserve: the room a task must leave on the file systems it can write.

The workspace and the --rw paths are host file systems without a quota, usually the
one that also holds /var/lib/sandgate's audit log: a task that filled it would make
the gateway fail closed for every task (it cannot write its evidence), and leave no
room for another task's workspace. No quota mechanism works on every file system
(ext4 project quotas need a mount option, tmpfs and btrfs have others, a user's home
has none set up), so the runner watches instead: it reads each writable root's
statvfs and kills the task the moment the free space or the free inodes fall below
the reserve. A fixed poll came too late: a task fills 64 MiB of tmpfs in under 0.1 s.
So the next look comes before the fastest writer could have used up what is left
above the reserve (`Reserve.next_look`: that room at `MAX_WRITE_RATE`, inodes at
`MAX_CREATE_RATE`, between `MIN_POLL_S` and `POLL_S`): rare while the disk is far
from full, often only near the reserve. Pure parts (`parse_reserve`, `Reserve`) apart
from the I/O (`DiskWatch`, `room_of`).

What it bounds: writers, whose pace is the disk's or the page cache's (write, pwrite,
mmap, copy_file_range, sendfile and splice into a file, glibc's posix_fallocate
fallback): each goes into the reserve by at most what it adds between two looks. Not
a call that takes blocks all at once, which no watcher can: fallocate's allocating
modes and the FS_IOC_RESVSP/ZERO_RANGE ioctls (gigabytes in one call) are refused
by the task's seccomp filter instead (seccomp.py, EOPNOTSUPP). Sparse files
(ftruncate, a seek past the end) take no blocks; reflinks (FICLONE, copy_file_range
on xfs/btrfs) share them, and a write to a shared block is a write.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sandgate.enforcer.sandbox.cgroup import parse_size

POLL_S = 0.1  # the longest wait between two looks
MIN_POLL_S = 0.005  # the shortest (near the reserve: at most 200 statvfs a second)
MAX_WRITE_RATE = 8 << 30  # bytes a second: above tmpfs or page-cache speed here (2 cores)
MAX_CREATE_RATE = 500_000  # empty files a second
DEFAULT_TEXT = "1G"
# The default's bytes are capped at this share of a small file system, else a 4 GiB
# file system could never hold a run: the cap keeps 90% of it usable.
DEFAULT_SHARE_CAP = 0.1
INODE_SHARE, INODE_CAP = 0.05, 50_000  # inodes: 5% of them, at most 50,000
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")


@dataclass(frozen=True)
class Room:
    """What statvfs says of the file system under `path` (what an unprivileged user may use)."""

    path: Path
    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int  # 0: the file system does not count inodes (btrfs)


@dataclass(frozen=True)
class Reserve:
    """`size` bytes (capped at `share_cap` of the file system), or `share` of it."""

    size: int | None = None
    share: float | None = None
    share_cap: float | None = None
    text: str = DEFAULT_TEXT

    def bytes_of(self, total: int) -> int:
        if self.share is not None:
            return int(total * self.share)
        if self.share_cap is not None:
            return min(self.size, int(total * self.share_cap))
        return self.size

    @staticmethod
    def inodes_of(total: int) -> int:
        return min(int(total * INODE_SHARE), INODE_CAP)

    def shortfall(self, room: Room) -> str | None:
        """Why `room` is below this reserve, or None."""
        need = self.bytes_of(room.total_bytes)
        if room.free_bytes < need:
            return (
                f"the file system of {room.path} has {_mib(room.free_bytes)} free, "
                f"below the disk reserve of {_mib(need)} (--disk-reserve {self.text})"
            )
        inodes = self.inodes_of(room.total_inodes)
        if room.total_inodes and room.free_inodes < inodes:
            return (
                f"the file system of {room.path} has {room.free_inodes} free inodes, "
                f"below the disk reserve of {inodes} (5% of its inodes, at most {INODE_CAP})"
            )
        return None

    def next_look(self, room: Room) -> float:
        """Seconds until the fastest writer could bring `room` below this reserve."""
        left = (room.free_bytes - self.bytes_of(room.total_bytes)) / MAX_WRITE_RATE
        if room.total_inodes:
            inodes = room.free_inodes - self.inodes_of(room.total_inodes)
            left = min(left, inodes / MAX_CREATE_RATE)
        return min(max(left, MIN_POLL_S), POLL_S)


DEFAULT = Reserve(size=parse_size(DEFAULT_TEXT), share_cap=DEFAULT_SHARE_CAP)


def parse_reserve(text: str) -> Reserve | None:
    """ "1G", "512M", "5%", or "none" (no reserve: None); ValueError otherwise."""
    text = text.strip()
    if text.lower() == "none":
        return None
    if text == DEFAULT_TEXT:
        return DEFAULT
    if match := _PERCENT.fullmatch(text):
        share = float(match[1]) / 100
        if not 0 < share < 1:
            raise ValueError(f"invalid disk reserve {text!r}: a share must lie between 0% and 100%")
        return Reserve(share=share, text=text)
    return Reserve(size=parse_size(text), text=text)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def room_of(path: Path, fd: int | None = None) -> Room:
    """The room on `path`'s file system; through `fd` (an O_PATH descriptor of it) if
    given: wherever the directory has moved since."""
    st = os.statvfs(path) if fd is None else os.fstatvfs(fd)
    return Room(path, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, st.f_favail, st.f_files)


def mounts_below(roots: list[Path], mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """The mount points strictly below any of `roots`, as this process sees them: the
    sandbox binds a writable root with everything mounted below it (open_tree
    AT_RECURSIVE), writable as the root is."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = Path(_unescape(fields[4]))
        if any(point != root and point.is_relative_to(root) for root in roots):
            found.append(point)
    return found


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal \\NNN."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class DiskWatch:
    """The file systems the task can write, one path each (by device), against the
    reserve: each writable root's, and each writable one mounted below a root (a
    directory of a workspace on a data disk mounted from the system disk, which holds
    the audit log: unwatched, the task filled it to its last byte). A read-only mount
    below a root, or a kernel one (no blocks), the task cannot fill: not watched.

    Each is watched through a descriptor (O_PATH), not its path: a mount below a root
    moves with the directory above it, which the task may rename (`mv data data2`),
    and the path then named nothing, or another file system. The descriptors are
    this object's until `close` (or the run's process ends)."""

    def __init__(self, roots: list[Path], reserve: Reserve | None):
        self.reserve = reserve
        self.paths: list[Path] = []
        self._fds: list[int] = []
        devices: set[int] = set()
        if reserve is None:
            return
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        for root in roots:  # each watched, whatever it is: one that cannot be is an error
            self._watch(root, os.open(root, flags), devices)
        for path in mounts_below(roots):
            try:
                fd = os.open(path, flags)
                st = os.fstatvfs(fd)
            except OSError:
                continue  # gone already: nothing below the roots to fill there
            if st.f_flag & os.ST_RDONLY or st.f_blocks == 0:
                os.close(fd)
            else:
                self._watch(path, fd, devices)

    def _watch(self, path: Path, fd: int, devices: set[int]) -> None:
        device = os.fstat(fd).st_dev
        if device in devices:
            os.close(fd)
            return
        devices.add(device)
        self.paths.append(path)
        self._fds.append(fd)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def shortfall(self) -> str | None:
        """Why a watched file system is below the reserve now, or None."""
        return self.look()[0]

    def look(self) -> tuple[str | None, float]:
        """Why a watched file system is below the reserve now (or None), and in how
        many seconds to look again. A statvfs that fails is no reason to kill."""
        wait = POLL_S
        for path, fd in zip(self.paths, self._fds, strict=True):
            try:
                room = room_of(path, fd)
            except OSError:
                continue
            if (why := self.reserve.shortfall(room)) is not None:
                return why, wait
            wait = min(wait, self.reserve.next_look(room))
        return None, wait
