"""Linux mount primitives for the sandbox init: the new mount API through ctypes.

Stdlib only: the in-sandbox init runs as `python -I -S` and loads this by path.
The new API (open_tree, mount_setattr, move_mount; Linux 5.12+) is what makes the
sandbox's file view simple and exact:
- `clone_tree` detaches a copy of a host path *before* the host view is covered,
  so a workspace under /tmp can still be mounted after /tmp became a fresh tmpfs;
- `set_attr(..., recursive=True)` makes a whole tree read-only, nosuid and nodev
  in one call, submounts included (remount-by-remount would race new mounts);
- an idmapped mount (MOUNT_ATTR_IDMAP) lets files that the task creates in the
  workspace land on the host owned by the directory's owner, while the task runs
  as an id that owns nothing;
- `open_exact` finds a path the runner resolved without following any symbolic
  link (openat2 RESOLVE_NO_SYMLINKS), and `clone_fd`/`attach_at` mount what that
  descriptor is, never what the path names by then: a task sharing the workspace
  cannot swap a link in between (docs/sandbox.md, "What the task leaves for the host").

Every path goes to the kernel as os.fsencode makes it (`_c_path`), as the os module
passes it: a name that is not UTF-8 (a task's `\\xff` directory, surrogate-escaped in
a str) is the same bytes again, never a UnicodeEncodeError out of the runner's check.
"""

from __future__ import annotations

import ctypes
import os
import re

# x86_64 and the asm-generic table (arm64, riscv) share these numbers since 5.2.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_OPENAT2, SYS_MOUNT_SETATTR = 428, 429, 437, 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
LOCKED_DOWN = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
READ_ONLY = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC  # flags of a fresh mount
MNT_DETACH = 0x2
EINVAL, ENAMETOOLONG, ENOSYS, ELOOP = 22, 36, 38, 40

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class Moved(OSError):
    """A bind source or target is not what the runner found there: a symbolic link
    on its path, or another file (a task sharing the directory swapped it)."""


def _c_path(path: str | None) -> bytes | None:
    """`path` as the kernel takes it: the bytes os.scandir read it from (surrogate
    escapes of a name that is not UTF-8 back to its bytes), as os.open would pass it."""
    return None if path is None else os.fsencode(path)


def _fail(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    if (
        _libc.mount(
            _c_path(source),
            _c_path(target),
            _c_path(fstype),
            flags,
            _c_path(data),
        )
        != 0
    ):
        raise _fail(f"mount {fstype or source} on {target}")


def make_private(path: str = "/") -> None:
    """Nothing mounted below here propagates to the host, nor from it."""
    mount(None, path, None, MS_REC | MS_PRIVATE)


def detach_trees(paths: list[str]) -> None:
    """Unmount everything at and below each of `paths` (lazily: nothing open there
    is disturbed). A mount that a later one covers still shows in
    /proc/self/mountinfo, with the names below it: a fresh /run over the host's would
    still list every other sandbox's /run/netns/sg-<id>. One umount2 per outermost
    mount point: a lazy unmount takes the mounts below it along, and each call may
    wait for an RCU grace period (one per mount of /run/netns, deepest first, cost
    ~0.2 s a run). One read of mountinfo for all of `paths`: beside 256 sandboxes
    its ~280 lines, read once per path, took ~10 ms of a run's start (bench_attach
    `--beside 256 --breakdown`)."""
    with open("/proc/self/mountinfo", "rb") as f:  # bytes: a mount point need not be UTF-8
        points = [_unescape(line.split()[4]) for line in f if len(line.split()) > 4]
    for path in paths:
        for point in outermost_points(points, path):
            while _libc.umount2(_c_path(point), MNT_DETACH) == 0:
                pass  # again: mounts stacked on one point go one at a time
            if ctypes.get_errno() != EINVAL:  # EINVAL: no mount point (any more)
                raise _fail(f"umount {point}")


def outermost_points(points: list[str], path: str) -> list[str]:
    """The mount points at or below `path` that lie below no other of them."""
    outermost: list[str] = []
    for point in sorted({p for p in points if p == path or p.startswith(path.rstrip("/") + "/")}):
        if not any(point.startswith(top.rstrip("/") + "/") for top in outermost):
            outermost.append(point)
    return outermost


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040);
    the other bytes are the name's own (os.fsdecode: as os.listdir would give them)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mask(path: str) -> None:
    """An empty read-only directory, or /dev/null, over `path` (if it exists)."""
    if os.path.isdir(path):
        tmpfs(path, mode=0o000, flags=READ_ONLY)
    elif os.path.exists(path):
        mount("/dev/null", path, None, MS_BIND)
        set_attr(path, LOCKED_DOWN, recursive=False)


def make_read_only(path: str) -> None:
    """`path` (a directory with what is mounted below it, or a file) read-only, if it exists."""
    if os.path.lexists(path):
        mount(path, path, None, MS_BIND | MS_REC)
        set_attr(path, LOCKED_DOWN | MOUNT_ATTR_NOEXEC, recursive=True)


def clone_tree(path: str) -> int:
    """A detached copy of the mount tree at `path` (a directory or a file), as an fd."""
    fd = _libc.syscall(
        SYS_OPEN_TREE, AT_FDCWD, _c_path(path), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
    )
    if fd < 0:
        raise _fail(f"open_tree {path}")
    return fd


def open_exact(path: str, expect: tuple[int, int] | list[int] | None = None) -> int:
    """An O_PATH descriptor of `path` (absolute, resolved already: no `.`, `..` or
    link in it), found without following any symbolic link, on its way or at its end;
    with `expect` (st_dev, st_ino: what the runner's walk found there), of that very
    file. Raises Moved when a link is on the path or the file is another one; OSError
    when it is missing."""
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise Moved(ELOOP, f"{path}: not a resolved absolute path")
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(SYS_OPENAT2, AT_FDCWD, _c_path(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        error = ctypes.get_errno()
        # before Linux 5.6, or a path longer than PATH_MAX (a task's deep tree: the walk
        # reached it from descriptor to descriptor): one component at a time
        if error in (ENOSYS, ENAMETOOLONG):
            fd = _open_components(parts)
        elif error == ELOOP:
            raise Moved(ELOOP, f"{path}: a symbolic link is on its path")
        else:
            raise OSError(error, f"{path}: {os.strerror(error)}")
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) == 0o120000:
            raise Moved(ELOOP, f"{path}: a symbolic link")
        if expect is not None and (st.st_dev, st.st_ino) != tuple(expect):
            raise Moved(ELOOP, f"{path}: another file than the one sandgate found there")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_components(parts: list[str]) -> int:
    """`/` then each of `parts` opened from its parent's descriptor with O_NOFOLLOW."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in parts:
        try:
            below = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        fd = below
        if (os.fstat(fd).st_mode & 0o170000) == 0o120000:
            os.close(fd)
            raise Moved(ELOOP, f"/{'/'.join(parts)}: a symbolic link is on its path")
    return fd


RENAME_NOREPLACE = 1


def rename_noreplace(dir_fd: int, old: str, new: str) -> None:
    """Rename `old` to `new`, both in the directory of `dir_fd` (an O_PATH descriptor
    will do), never over what is at `new` (FileExistsError): os.rename would replace a
    file there, or an empty directory. OSError(ENOSYS) without renameat2 in the libc;
    EINVAL from a file system that cannot (the caller checks, then renames)."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(ENOSYS, "renameat2: not in this libc")
    if renameat2(dir_fd, _c_path(old), dir_fd, _c_path(new), RENAME_NOREPLACE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"rename {old!r}: {os.strerror(error)}")


def clone_fd(fd: int, what: str) -> int:
    """A detached copy of the mount tree at an `open_exact` descriptor, as an fd."""
    tree = _libc.syscall(
        SYS_OPEN_TREE,
        fd,
        b"",
        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE | AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW,
    )
    if tree < 0:
        raise _fail(f"open_tree {what}")
    return tree


def set_attr(
    target: str | int,
    attr_set: int,
    attr_clr: int = 0,
    *,
    recursive: bool = True,
    userns_fd: int | None = None,
) -> None:
    """mount_setattr on a path, or on a detached tree's fd."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd if userns_fd is not None else 0)
    flags = AT_RECURSIVE if recursive else 0
    if isinstance(target, int):
        dirfd, path, flags = target, b"", flags | AT_EMPTY_PATH
    else:
        dirfd, path = AT_FDCWD, _c_path(target)
    if (
        _libc.syscall(
            SYS_MOUNT_SETATTR, dirfd, path, flags, ctypes.byref(attr), ctypes.sizeof(attr)
        )
        != 0
    ):
        raise _fail(f"mount_setattr {target}")


def attach(tree_fd: int, target: str) -> None:
    """Mount a detached tree on `target`, then close its fd."""
    try:
        if (
            _libc.syscall(
                SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, _c_path(target), MOVE_MOUNT_F_EMPTY_PATH
            )
            != 0
        ):
            raise _fail(f"move_mount onto {target}")
    finally:
        os.close(tree_fd)


def attach_at(tree_fd: int, target_fd: int, what: str) -> None:
    """Mount a detached tree on what an `open_exact` descriptor is, then close both."""
    try:
        flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
        if _libc.syscall(SYS_MOVE_MOUNT, tree_fd, b"", target_fd, b"", flags) != 0:
            raise _fail(f"move_mount onto {what}")
    finally:
        os.close(tree_fd)
        os.close(target_fd)


def tmpfs(
    target: str,
    *,
    mode: int = 0o755,
    bounds: list[int] | tuple[int, int] | None = None,
    flags: int = MS_NOSUID | MS_NODEV,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """`bounds`: (size in bytes, inodes); None: the kernel's default (half the RAM)."""
    options = [f"mode={mode:o}"]
    options += [f"size={bounds[0]}", f"nr_inodes={bounds[1]}"] if bounds else []
    options += [f"uid={uid}"] if uid is not None else []
    options += [f"gid={gid}"] if gid is not None else []
    mount("tmpfs", target, "tmpfs", flags, ",".join(options))
