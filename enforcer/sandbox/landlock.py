"""A Landlock ruleset for the task's writes: defence in depth behind the read-only mounts.

What it defends against. The sandbox's mounts make the host read-only; a
mistake there (a forgotten writable submount, a bind the task can reach
through /proc/self/fd, a mount bug) would let the task write where it must
not. Landlock is enforced by the kernel per file access, independently of
mounts, uids and capabilities: once `restrict_writes` has run, this process
and everything it starts may create, change, remove, rename or truncate files
only beneath the paths it named, whatever the mounts say. Reads and execution
are not handled here (they stay governed by permissions and mounts), so tools
work as before. From ABI 6 the task is also scoped: it cannot connect to
abstract unix sockets nor signal processes created outside its Landlock domain
(the gateway's, the init's, the host's).

Standard library only (ctypes, raw syscalls): the in-sandbox init runs as
`python -I -S` and loads this file by path.

Mind the character devices: with IOCTL_DEV and WRITE_FILE handled, a device
opened *after* `restrict_writes` (/dev/null, /dev/tty, /dev/pts/N) can be
written and ioctl'd only when it is beneath a writable path. Descriptors opened
before keep the rights they were opened with.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

# Syscall numbers: identical in the unified table of x86_64, aarch64, riscv64.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0  # landlock_create_ruleset(NULL, 0, this) -> ABI
LANDLOCK_RULE_PATH_BENEATH = 1

# Filesystem access rights (include/uapi/linux/landlock.h), the ABI that added each.
ACCESS_FS_EXECUTE = 1 << 0  # not handled: reads and execution are not this ruleset's job
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2  # not handled
ACCESS_FS_READ_DIR = 1 << 3  # not handled
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2: rename/link across directories
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5: ioctl on character and block devices

WRITE_ACCESS_BY_ABI = {
    1: (
        ACCESS_FS_WRITE_FILE
        | ACCESS_FS_REMOVE_DIR
        | ACCESS_FS_REMOVE_FILE
        | ACCESS_FS_MAKE_CHAR
        | ACCESS_FS_MAKE_DIR
        | ACCESS_FS_MAKE_REG
        | ACCESS_FS_MAKE_SOCK
        | ACCESS_FS_MAKE_FIFO
        | ACCESS_FS_MAKE_BLOCK
        | ACCESS_FS_MAKE_SYM
    ),
    2: ACCESS_FS_REFER,
    3: ACCESS_FS_TRUNCATE,
    5: ACCESS_FS_IOCTL_DEV,
}
# The rights the kernel accepts on a rule for a file that is not a directory.
FILE_ONLY_ACCESS = ACCESS_FS_WRITE_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV

# Scopes (ABI 6): IPC with processes outside the Landlock domain.
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1
SCOPES_ABI = 6

NEWEST_KNOWN_ABI = 7  # ABI 7 adds audit-log flags only; nothing to handle here

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
O_PATH = getattr(os, "O_PATH", 0o10000000)


class _RulesetAttr(ctypes.Structure):
    """struct landlock_ruleset_attr; older kernels accept it whole when the newer fields are 0."""

    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: int | ctypes._Pointer | None) -> int:
    converted = [
        arg if isinstance(arg, ctypes._Pointer) else ctypes.c_long(arg or 0) for arg in args
    ]
    result = _libc.syscall(ctypes.c_long(number), *converted)
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when it lacks Landlock or it is disabled at boot."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise OSError(
            exc.errno, f"landlock: asking the ABI version failed: {exc.strerror}"
        ) from exc


def handled_write_access(abi: int) -> int:
    """Every write-type filesystem right that Landlock ABI `abi` knows."""
    access = 0
    for introduced, rights in WRITE_ACCESS_BY_ABI.items():
        if abi >= introduced:
            access |= rights
    return access


def restrict_writes(writable: list[str]) -> int:
    """Allow writes only beneath `writable`, for this process and all it starts.

    Paths that do not exist are skipped; a path that is not a directory gets the
    file rights only. Sets no_new_privs when it is not set. Returns the ABI
    applied (capped at NEWEST_KNOWN_ABI), 0 when the kernel has no Landlock and
    nothing was applied. Raises OSError naming the step on any other failure."""
    abi = min(abi_version(), NEWEST_KNOWN_ABI)
    if abi == 0:
        return 0
    handled = handled_write_access(abi)
    attr = _RulesetAttr(
        handled_access_fs=handled,
        scoped=SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= SCOPES_ABI else 0,
    )
    try:
        ruleset_fd = _syscall(
            SYS_LANDLOCK_CREATE_RULESET, ctypes.pointer(attr), ctypes.sizeof(attr), 0
        )
    except OSError as exc:
        raise OSError(
            exc.errno, f"landlock: creating the ruleset (ABI {abi}) failed: {exc.strerror}"
        ) from exc
    try:
        for path in writable:
            _allow_beneath(ruleset_fd, path, handled)
        _set_no_new_privs()
        try:
            _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0)
        except OSError as exc:
            raise OSError(
                exc.errno, f"landlock: restricting the process failed: {exc.strerror}"
            ) from exc
    finally:
        os.close(ruleset_fd)
    return abi


def _allow_beneath(ruleset_fd: int, path: str, handled: int) -> None:
    try:
        parent_fd = os.open(path, O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OSError(
            exc.errno, f"landlock: cannot open writable path {path!r}: {exc.strerror}"
        ) from exc
    try:
        is_directory = stat.S_ISDIR(os.fstat(parent_fd).st_mode)
        allowed = handled if is_directory else handled & FILE_ONLY_ACCESS
        rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=parent_fd)
        _syscall(
            SYS_LANDLOCK_ADD_RULE, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, ctypes.pointer(rule), 0
        )
    except OSError as exc:
        raise OSError(
            exc.errno, f"landlock: cannot allow writes beneath {path!r}: {exc.strerror}"
        ) from exc
    finally:
        os.close(parent_fd)


def _set_no_new_privs() -> None:
    if _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1:
        return
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"landlock: prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(code)}")
