"""The task's syscall filter: kernel attack surface a task never needs, refused.

What it defends against. The task is root in its own user namespace, so every
kernel interface reachable from there is reachable by a hostile task: loading
kernel code, eBPF and perf (a long line of privilege escalations), keyrings that
are not namespaced, userfaultfd (the classic primitive for winning kernel
races), io_uring (its own escalations, and its requests bypass this filter),
file handles that open inodes past every mount (the "Shocker" escape), new
namespaces (a fresh user or network namespace hands the task CAP_NET_ADMIN /
CAP_SYS_ADMIN over objects it creates, which is how most unprivileged nf_tables
and mount exploits start), remounting its view of the host, set-id bits on
files (which the idmapped workspace would leave on the host as its owner's), the host clock,
packet sockets and exotic protocol families, typing into the caller's
terminal (TIOCSTI) or suspending its output (TCOOFF), fanotify (when host
processes open or run host files), allocating disk blocks in one call
(fallocate and its ioctls: gigabytes before the disk reserve's watcher looks,
where writes go at the disk's pace), host-wide budgets no cgroup bounds
(native AIO contexts, fs.aio-max-nr; huge pages: MAP_HUGETLB and its relatives),
and state that outlives the task in the host kernel or on the user's files (fscrypt
keys, fs-verity, inode flags that spread to what the user makes later, leases that
hold every host open of a workspace file).
Capabilities and namespaces already forbid much of this; the filter makes the
refusal independent of them and shrinks what a kernel bug can be reached
through. Each entry of `DENIED` says why, in one line.

The model is Docker's default profile (moby profiles/seccomp/default.json),
turned into a deny list: the default action is ALLOW, so a program that works
outside the sandbox keeps working; a syscall newer than libseccomp is listed
here by number (`UNIFIED_SYSCALL_NUMBERS`).

Syscalls newer than the table fail closed: every native number above
`NEWEST_REVIEWED_SYSCALL` gets ENOSYS (`newer_syscalls_fence`, runc's trick for
profiles older than the kernel), so a kernel upgrade cannot hand the task an
interface nobody has reviewed; ENOSYS is what a program sees on an older
kernel, so callers fall back. Raising the number means reviewing what the
kernel added in between (docs/sandbox.md lists the last review).

Architectures: the filter is for the native ABI only. Any other ABI reaching
the kernel (int 0x80 into the i386 table on x86_64, x32 numbers with bit 30
set) kills the whole process with SIGSYS (`BAD_ARCH_ACTION`): libseccomp emits
the arch check first and, on x86_64 without x32 in the filter, refuses
syscall numbers >= 0x40000000 too. Without that, every rule below could be
bypassed through the other syscall table.

Arguments: 32-bit arguments (socket's family, ioctl's request, personality)
are compared so that junk in the upper half of the register cannot make a
denied value look allowed: the kernel truncates, the filter does not, so
request masks cover only the low 32 bits and allow lists treat any value above
the largest allowed one as denied.

Where the parts run. `build_filter` runs outside the sandbox (it needs
libseccomp through `pyseccomp`, imported inside the function) and returns the
classic-BPF program as bytes; `install` and `available` are standard library
only, because the in-sandbox init runs as `python -I -S` and loads this file by
path.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
from collections import namedtuple

# clone(2)/unshare(2) flags that create a namespace. CLONE_NEWTIME shares its
# value with the exit-signal bits of clone(2), so it is only tested for unshare.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

# Socket families a task may open (everything else: EAFNOSUPPORT).
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
NETLINK_ROUTE = 0  # the only netlink protocol allowed: getaddrinfo and `ip addr` use it
SOCK_PACKET = 10  # socket(AF_INET, SOCK_PACKET) is the obsolete spelling of AF_PACKET
SOCK_TYPE_MASK = 0xF

# Terminal ioctls that act on the caller's terminal when the task inherits it.
TIOCSTI = 0x5412  # push bytes into the terminal's input: run commands in the caller's shell
TIOCLINUX = 0x541C  # virtual-console tricks, including pasting the selection as input
TIOCCONS = 0x541D  # redirect the host console's output to the task's terminal
TIOCSETD = 0x5423  # attach a line discipline: loads and runs rarely used tty drivers
TCXONC, TCOOFF = 0x540A, 0  # tcflow(fd, TCOOFF): suspend the terminal's output
# A virtual console's (linux/kd.h, vt.h), when sandgate runs from a text console and
# the task shares it: keyboard mode, key codes and maps, text or graphics mode, fonts
# and screen maps, switching consoles and taking over their switching. The caller of
# a console's own tty may (no capability): each outlives the task, which sandgate
# does not restore. The GIO_/KDG reads stay allowed.
VT_SETTINGS = (
    0x4B32,  # KDSETLED
    0x4B3A,  # KDSETMODE
    0x4B41,  # PIO_SCRNMAP
    0x4B45,  # KDSKBMODE
    0x4B47,  # KDSKBENT
    0x4B49,  # KDSKBSENT
    0x4B4B,  # KDSKBDIACR
    0x4B4D,  # KDSETKEYCODE
    0x4B4E,  # KDSIGACCEPT
    0x4B61,  # PIO_FONT
    0x4B63,  # KDSKBMETA
    0x4B67,  # PIO_UNIMAP
    0x4B68,  # PIO_UNIMAPCLR
    0x4B6A,  # PIO_UNISCRNMAP
    0x4B6C,  # PIO_FONTX
    0x4B6D,  # PIO_FONTRESET
    0x4B71,  # PIO_CMAP
    0x4B72,  # KDFONTOP
    0x4BFB,  # KDSKBDIACRUC
    0x5602,  # VT_SETMODE
    0x5605,  # VT_RELDISP
    0x5606,  # VT_ACTIVATE
    0x5607,  # VT_WAITACTIVE
    0x5608,  # VT_DISALLOCATE
    0x5609,  # VT_RESIZE
    0x560A,  # VT_RESIZEX
    0x560F,  # VT_SETACTIVATE
)
IOCTL_REQUEST_MASK = 0xFFFFFFFF  # the kernel reads ioctl's request as unsigned int

# fallocate(2) modes (linux/falloc.h) that only give blocks back: a hole punched, a
# range collapsed. Every other mode allocates (0, KEEP_SIZE, ZERO_RANGE, UNSHARE_RANGE,
# Linux 6.17's WRITE_ZEROES) or moves extents (INSERT_RANGE): EOPNOTSUPP, the answer
# of a file system without fallocate, on which glibc's posix_fallocate writes instead.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FREEING_FALLOCATE_MODES = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_COLLAPSE_RANGE)
# The XFS preallocation ioctls, _IOW('X', nr, struct space_resv): the VFS serves
# RESVSP/RESVSP64 (vfs_fallocate KEEP_SIZE) and ZERO_RANGE for every file system that
# has fallocate (fs/ioctl.c), inside the kernel, past the filter's fallocate rule;
# ALLOCSP/ALLOCSP64 allocate on ocfs2 (and XFS before 5.17). UNRESVSP (a hole) stays.
FS_IOC_ALLOCSP = 0x4030580A
FS_IOC_ALLOCSP64 = 0x40305824
FS_IOC_RESVSP = 0x40305828
FS_IOC_RESVSP64 = 0x4030582A
FS_IOC_ZERO_RANGE = 0x40305839
PREALLOCATING_IOCTLS = (
    FS_IOC_ALLOCSP,
    FS_IOC_ALLOCSP64,
    FS_IOC_RESVSP,
    FS_IOC_RESVSP64,
    FS_IOC_ZERO_RANGE,
)

# State that outlives the task, left in the host kernel or on the user's files by an
# ioctl any owner may issue (the task owns the workspace through its idmap).
# fscrypt (linux/fscrypt.h): a key added on any file of a file system with the
# `encrypt` feature (v2 keys need no privilege; a file of the read-only view will do)
# stays in that file system's keyring, charged to the slot's host uid, until it is
# unmounted: for / or /home, until reboot; its status is read by any later task (a
# channel between tasks). A policy, or ext4's first password salt, is written to
# disk. fs-verity (linux/fsverity.h) makes a file read-only for good. The reads of
# policies and nonces stay allowed.
FS_IOC_SET_ENCRYPTION_POLICY = 0x800C6613
FS_IOC_GET_ENCRYPTION_PWSALT = 0x40106614  # ext4 and f2fs write a new salt if none
FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617
FS_IOC_REMOVE_ENCRYPTION_KEY = 0xC0406618
FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS = 0xC0406619
FS_IOC_GET_ENCRYPTION_KEY_STATUS = 0xC080661A
FS_IOC_ENABLE_VERITY = 0x40806685
LASTING_FSCRYPT_IOCTLS = (
    FS_IOC_SET_ENCRYPTION_POLICY,
    FS_IOC_GET_ENCRYPTION_PWSALT,
    FS_IOC_ADD_ENCRYPTION_KEY,
    FS_IOC_REMOVE_ENCRYPTION_KEY,
    FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS,
    FS_IOC_GET_ENCRYPTION_KEY_STATUS,
    FS_IOC_ENABLE_VERITY,
)
# Inode flags and attributes (linux/fs.h). An owner needs no capability for most:
# sync, dirsync, nodump, noatime, no-COW, compression, casefold (+F), project
# inheritance. A directory hands them to all that is made below it, the user's work
# after the run included (every write synchronous, backups skipping it; casefold
# makes `.git/HOOKS` git's hooks where the guard compares names as bytes). The
# FS_IOC32_ forms differ in size bits only: compat code maps them, and a FUSE server
# is handed the number as sent. Reading them (GETFLAGS, FSGETXATTR) stays allowed;
# their syscall, file_setattr, is refused whole.
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_SETFLAGS = 0x40046602
FS_IOC_SETVERSION = 0x40087602  # the inode's generation: NFS handles to the file go stale
FS_IOC32_SETVERSION = 0x40047602
FS_IOC_FSSETXATTR = 0x401C5820
INODE_ATTRIBUTE_IOCTLS = (
    FS_IOC_SETFLAGS,
    FS_IOC32_SETFLAGS,
    FS_IOC_SETVERSION,
    FS_IOC32_SETVERSION,
    FS_IOC_FSSETXATTR,
)
# A file system's label and UUID: the kernel asks for the host's CAP_SYS_ADMIN, which
# the task lacks; refused here too, so that no file system's code for it is reached.
FS_IOC_SETFSLABEL = 0x41009432
EXT4_IOC_SETFSUUID = 0x4008662C
FILE_SYSTEM_IDENTITY_IOCTLS = (FS_IOC_SETFSLABEL, EXT4_IOC_SETFSUUID)

# fcntl(2) leases (linux/fcntl.h): a lease on a workspace file holds every host open
# of it, root's included, for up to fs.lease-break-time (45 s), and signals the task
# at each one (flock only holds those that lock too). F_SETLEASE is refused unless it
# lets go (F_UNLCK): EACCES, what a non-owner gets; compared as 64 bits, so an
# argument the kernel would truncate to F_UNLCK is refused too (fail closed).
# F_SETDELEG (after Linux 6.18: leases by another name, on directories too) takes
# its type in memory the filter cannot read: refused whole, with the EINVAL of a
# kernel that lacks it. Record locks (F_SETLK, F_OFD_SETLK) stay.
F_SETLEASE = 1024
F_SETDELEG = 1040
F_UNLCK = 2
FCNTL_CMD_MASK = 0xFFFFFFFF  # the kernel reads fcntl's command as unsigned int

# The page cache is one for everybody: posix_fadvise (fadvise64: advice is argument 3 on
# x86_64, aarch64, riscv64) with DONTNEED drops every clean, unmapped cached page of any
# file the task can open, whoever read it (the host's, other tasks'), and NOREUSE marks
# them to go first; preadv2/pwritev2 with RWF_NOWAIT (flags, argument 5) answer EAGAIN
# for a page not cached, without reading it. Together: empty a host file's cache, then
# see page by page what host processes read since (Gruss et al. 2019; the kernel
# closed mincore and cachestat to files the caller cannot write, not these).
POSIX_FADV_DONTNEED = 4
POSIX_FADV_NOREUSE = 5
CACHE_DROPPING_ADVICE = (POSIX_FADV_DONTNEED, POSIX_FADV_NOREUSE)
FADVISE_ADVICE_MASK = 0xFFFFFFFF  # the kernel reads the advice as int
RWF_NOWAIT = 0x08
# The answer for advice that only the task's own cache could use: success, and nothing
# done (SECCOMP_RET_ERRNO with 0). Advice the kernel may ignore anyway; callers (dd
# iflag=nocache, backup tools, databases) go on, where some treat an error as fatal.
NO_EFFECT = 0
# RLIMIT_CORE is fixed for the task (sandbox/inherit.py `core_limited`: 1 where the host
# pipes cores to a helper, which the kernel then never starts): a task that lowered it to
# 0 had apport or systemd-coredump run as root again and read its whole core (its memory
# limit's worth, into the host's memory). setrlimit/prlimit64 of it succeed without
# effect (programs that turn their own cores off go on: no core is made either way);
# prlimit64 that also asks for the old value gets EPERM (an answer it would not fill).
RLIMIT_CORE = 4
RLIMIT_RESOURCE_MASK = 0xFFFFFFFF  # the kernel reads the resource as unsigned int

# Huge pages (hugetlb) are charged to no memory cgroup (v1 never, v2 only under the
# memory_hugetlb_accounting mount option): a task with --memory 32M held every huge
# page the host had reserved, or with overcommitted ones, hundreds of MiB of its RAM.
# The flags that ask for them, in each call that takes them; the hugetlb controller
# is not needed (nor mounted on many hosts). THP (madvise MADV_HUGEPAGE) is memcg's.
MAP_HUGETLB = 0x40000  # mmap's flags (argument 3): x86_64, aarch64, riscv64
MFD_HUGETLB = 0x4  # memfd_create's flags (argument 1)
SHM_HUGETLB = 0o4000  # shmget's flags (argument 2)

# Mode bits that give whoever runs a file its owner's or group's ids. Through the
# idmapped workspace the task's files are the directory owner's on the host (root's,
# for a workspace root owns), so a set-id bit there is that owner's power for every
# host user who can run the file; no_new_privs only disarms it inside the sandbox.
S_ISUID = 0o4000
S_ISGID = 0o2000
SET_ID_BITS = (S_ISUID, S_ISGID)
# open flags under which the mode argument is used: a new file gets it.
CREATING_FLAGS = (os.O_CREAT, os.O_TMPFILE)

# personality(2) values a task may set: plain Linux, `linux32`/`uname26`
# emulations of the version string, and the query.
PER_LINUX = 0x0000000
PER_LINUX32 = 0x0000008
UNAME26 = 0x0020000
PERSONALITY_QUERY = 0xFFFFFFFF
PERSONALITY_ALLOWED_BITS = PER_LINUX32 | UNAME26
PERSONALITY_TOP_BIT = 1 << 31  # no persona uses it; set only in the query

# The argument index of clone(2)'s flags: s390 swaps the first two arguments.
CLONE_FLAGS_ARG = 1 if os.uname().machine.startswith("s390") else 0

# Syscalls newer than some libseccomp releases, by their number in the unified
# table (x86_64, aarch64, riscv64 and the other asm-generic arches share it).
UNIFIED_SYSCALL_NUMBERS = {"fchmodat2": 452, "open_tree_attr": 467, "file_setattr": 469}
UNIFIED_TABLE_MACHINES = ("x86_64", "aarch64", "riscv64")

# The newest syscall number of the unified table this filter was reviewed
# against: file_setattr (Linux 6.17; 6.18 added none). Above it: ENOSYS.
NEWEST_REVIEWED_SYSCALL = 469
# struct seccomp_data's arch for each UNIFIED_TABLE_MACHINES (linux/audit.h).
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7, "riscv64": 0xC00000F3}
# x86_64's x32 ABI sets this bit; libseccomp's program kills those (BAD_ARCH_ACTION).
X32_SYSCALL_BIT = 0x40000000

# SCMP_ACT_KILL_PROCESS for a syscall of another ABI: SIGSYS to the whole process,
# so no thread is left half-alive (libseccomp's default kills the thread only).
BAD_ARCH_ACTION = 0x80000000
# Actions the kernel must offer (/proc/sys/kernel/seccomp/actions_avail).
REQUIRED_ACTIONS = ("allow", "errno", "kill_process")
ACTIONS_AVAIL = "/proc/sys/kernel/seccomp/actions_avail"


# One argument comparison: (argument index, operator, value, mask). Operators are
# libseccomp's: "eq", "ne", "gt", "masked_eq" ((arg & mask) == value).
ArgTest = tuple[int, str, int, int]


# Refuse `syscalls` with `errno` when any element of `when` holds (always, if
# `when` is empty); each element is a tuple of ArgTests that must all hold.
# (A namedtuple, not a dataclass: the in-sandbox init imports this module, and
# dataclasses/typing would cost it several milliseconds.)
Denial = namedtuple("Denial", ("syscalls", "errno", "why", "when"), defaults=((),))


def _any_bit_set(arg: int, bits: tuple[int, ...]) -> tuple[tuple[ArgTest, ...], ...]:
    return tuple(((arg, "masked_eq", bit, bit),) for bit in bits)


def _not_in(arg: int, allowed: tuple[int, ...]) -> tuple[tuple[ArgTest, ...], ...]:
    """Argument `arg` is not exactly one of `allowed` (which the kernel reads as int).

    Above the largest allowed value is one test, so a value with junk in the
    upper 32 bits (which the kernel would truncate to an allowed one) is refused."""
    below = tuple(((arg, "eq", value, 0),) for value in range(max(allowed)) if value not in allowed)
    return below + (((arg, "gt", max(allowed), 0),),)


def _family_not_in(allowed: tuple[int, ...]) -> tuple[tuple[ArgTest, ...], ...]:
    """socket's family (argument 0) is not one of `allowed`."""
    return _not_in(0, allowed)


def _personality_not_allowed() -> tuple[tuple[ArgTest, ...], ...]:
    """personality's argument is not one of the plain values or the query.

    Allowed: any combination of PERSONALITY_ALLOWED_BITS, or 0xffffffff. Refused:
    junk above 32 bits; any other bit while the top bit is clear; and the top bit
    with any bit clear (one test per bit: libseccomp takes one test per argument)."""
    other_bits = tuple(1 << bit for bit in range(31) if not (1 << bit) & PERSONALITY_ALLOWED_BITS)
    top = PERSONALITY_TOP_BIT
    return (
        ((0, "gt", PERSONALITY_QUERY, 0),),
        *(((0, "masked_eq", bit, bit | top),) for bit in other_bits),
        *(((0, "masked_eq", top, top | (1 << bit)),) for bit in range(31)),
    )


def _creates_with_set_id(flags_arg: int, mode_arg: int) -> tuple[tuple[ArgTest, ...], ...]:
    """open/openat creating a file (O_CREAT or O_TMPFILE) whose mode has a set-id bit.

    Only when creating: the mode argument means nothing otherwise. Masks cover the
    low bits only, so junk above 32 bits cannot hide a bit the kernel would keep."""
    return tuple(
        ((flags_arg, "masked_eq", flag, flag), (mode_arg, "masked_eq", bit, bit))
        for flag in CREATING_FLAGS
        for bit in SET_ID_BITS
    )


def _ioctl_request_in(requests: tuple[int, ...]) -> tuple[tuple[ArgTest, ...], ...]:
    return tuple(((1, "masked_eq", request, IOCTL_REQUEST_MASK),) for request in requests)


_WHY_NO_SET_ID = (
    "set-id bits on a workspace file are its host owner's power (root's) for any host user"
)

_WHY_NO_INODE_FLAGS = (
    "inode flags (sync, nodump, casefold...) stay on the user's files and pass to all made below"
)

_CLONE_CREATES_NAMESPACE = _any_bit_set(CLONE_FLAGS_ARG, CLONE_NAMESPACE_FLAGS)
_UNSHARE_CREATES_NAMESPACE = _any_bit_set(0, (*CLONE_NAMESPACE_FLAGS, CLONE_NEWTIME))

_WHY_NO_NEW_NAMESPACE = (
    "a new namespace (user, net, mount...) hands the task capabilities over kernel code"
)

DENIED: tuple[Denial, ...] = (
    Denial(
        ("init_module", "finit_module", "delete_module"),
        errno.EPERM,
        "loading or removing kernel code is the whole kernel",
    ),
    Denial(("kexec_load", "kexec_file_load"), errno.EPERM, "replacing the running kernel"),
    Denial(
        ("bpf",),
        errno.EPERM,
        "eBPF verifier and JIT: a long list of privilege escalations; no task needs it",
    ),
    Denial(
        ("perf_event_open",),
        errno.EPERM,
        "perf: escalations, kernel address and cross-process side channels",
    ),
    Denial(
        ("keyctl", "add_key", "request_key"),
        errno.EPERM,
        "keyrings are not namespaced: read or plant keys of the host uid; frequent CVEs",
    ),
    Denial(
        ("userfaultfd",),
        errno.EPERM,
        "pauses kernel copies at will: the standard primitive for winning kernel races",
    ),
    Denial(
        ("open_by_handle_at", "name_to_handle_at"),
        errno.EPERM,
        "file handles open inodes past mounts and hidden paths (the Shocker escape)",
    ),
    Denial(
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
        errno.EPERM,
        "io_uring: frequent escalations, and its requests (socket, openat) bypass this filter",
    ),
    Denial(
        ("io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents"),
        errno.ENOSYS,
        "native AIO's contexts draw on the host-wide fs.aio-max-nr; ENOSYS: libaio users fall back",
    ),
    Denial(
        ("mmap",),
        errno.EPERM,
        "huge pages are charged to no memory cgroup; callers fall back to normal pages",
        _any_bit_set(3, (MAP_HUGETLB,)),
    ),
    Denial(
        ("memfd_create",),
        errno.EPERM,
        "a hugetlbfs memfd: huge pages, charged to no memory cgroup",
        _any_bit_set(1, (MFD_HUGETLB,)),
    ),
    Denial(
        ("shmget",),
        errno.EPERM,
        "SysV shared memory in huge pages, charged to no memory cgroup (EPERM, as the kernel)",
        _any_bit_set(2, (SHM_HUGETLB,)),
    ),
    Denial(("clone",), errno.EPERM, _WHY_NO_NEW_NAMESPACE, _CLONE_CREATES_NAMESPACE),
    Denial(("unshare",), errno.EPERM, _WHY_NO_NEW_NAMESPACE, _UNSHARE_CREATES_NAMESPACE),
    Denial(
        ("clone3",),
        errno.ENOSYS,
        "its flags sit in memory seccomp cannot read; ENOSYS makes libc fall back to clone",
    ),
    Denial(
        ("setns",),
        errno.EPERM,
        "joining another namespace through an inherited or /proc descriptor",
    ),
    Denial(
        (
            "mount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "open_tree_attr",
            "fsopen",
            "fsmount",
            "fsconfig",
            "fspick",
            "mount_setattr",
        ),
        errno.EPERM,
        "the task's view of the host is fixed: no remount, unmount of a hiding mount, new fs",
    ),
    Denial(
        ("chmod", "fchmod", "creat", "mknod"),
        errno.EPERM,
        _WHY_NO_SET_ID,
        _any_bit_set(1, SET_ID_BITS),
    ),
    Denial(
        ("fchmodat", "fchmodat2", "mknodat"),
        errno.EPERM,
        _WHY_NO_SET_ID,
        _any_bit_set(2, SET_ID_BITS),
    ),
    Denial(("open",), errno.EPERM, _WHY_NO_SET_ID, _creates_with_set_id(1, 2)),
    Denial(("openat",), errno.EPERM, _WHY_NO_SET_ID, _creates_with_set_id(2, 3)),
    Denial(
        ("openat2",),
        errno.ENOSYS,
        "its mode sits in memory seccomp cannot read; ENOSYS makes callers fall back to openat",
    ),
    Denial(("swapon", "swapoff"), errno.EPERM, "host memory configuration"),
    Denial(
        ("reboot",), errno.EPERM, "rebooting (or, in a PID namespace, killing the sandbox's init)"
    ),
    Denial(
        ("acct",),
        errno.EPERM,
        "process accounting is host-wide and writes to a file of the task's choosing",
    ),
    Denial(
        ("settimeofday", "clock_settime", "adjtimex", "clock_adjtime"),
        errno.EPERM,
        "the clock is not namespaced: changing it breaks TLS, logs and tokens on the host",
    ),
    Denial(
        ("syslog",), errno.EPERM, "the kernel log: kernel addresses and other tenants' messages"
    ),
    Denial(("quotactl", "quotactl_fd"), errno.EPERM, "disk quotas of host filesystems"),
    Denial(
        ("lookup_dcookie",),
        errno.EPERM,
        "profiling interface that resolves kernel paths; removed in Linux 6.10",
    ),
    Denial(("iopl", "ioperm"), errno.EPERM, "raw I/O port access is access to hardware"),
    Denial(
        ("uselib",),
        errno.EPERM,
        "obsolete a.out loader with past escalations; nothing current calls it",
    ),
    Denial(
        ("personality",),
        errno.EPERM,
        "odd personas (READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, no ASLR) weaken exploit mitigations",
        _personality_not_allowed(),
    ),
    Denial(
        ("modify_ldt",),
        errno.EPERM,
        "per-process segment tables: 16-bit code only, a record of kernel bugs (Docker refuses it)",
    ),
    Denial(
        ("ioctl",),
        errno.EPERM,
        "TIOCSTI/TIOCLINUX type commands into the caller's terminal after the task ends",
        _ioctl_request_in((TIOCSTI, TIOCLINUX)),
    ),
    Denial(
        ("ioctl",),
        errno.EPERM,
        "TIOCSETD autoloads and runs tty line disciplines (n_hdlc, n_gsm...); TIOCCONS the console",
        _ioctl_request_in((TIOCSETD, TIOCCONS)),
    ),
    Denial(
        ("ioctl",),
        errno.EPERM,
        "tcflow TCOOFF on the caller's terminal: sandgate's next line (a kill, its summary) hangs",
        (((1, "masked_eq", TCXONC, IOCTL_REQUEST_MASK), (2, "eq", TCOOFF, 0)),),
    ),
    Denial(
        ("ioctl",),
        errno.EPERM,
        "a text console's keyboard, keymaps, mode, fonts, switching: they outlive the task",
        _ioctl_request_in(VT_SETTINGS),
    ),
    Denial(
        ("fadvise64",),
        NO_EFFECT,
        "DONTNEED/NOREUSE drop host files' cached pages (a page-cache probe); done as a no-op",
        tuple(((3, "masked_eq", advice, FADVISE_ADVICE_MASK),) for advice in CACHE_DROPPING_ADVICE),
    ),
    Denial(
        ("setrlimit",),
        NO_EFFECT,
        "RLIMIT_CORE 0 has the host's core helper run as root on the task's core; a no-op",
        (((0, "masked_eq", RLIMIT_CORE, RLIMIT_RESOURCE_MASK),),),
    ),
    Denial(
        ("prlimit64",),
        NO_EFFECT,
        "RLIMIT_CORE 0 has the host's core helper run as root on the task's core; a no-op",
        (((1, "masked_eq", RLIMIT_CORE, RLIMIT_RESOURCE_MASK), (2, "ne", 0, 0), (3, "eq", 0, 0)),),
    ),
    Denial(
        ("prlimit64",),
        errno.EPERM,
        "RLIMIT_CORE set with the old value asked: the no-op above would not fill it",
        (((1, "masked_eq", RLIMIT_CORE, RLIMIT_RESOURCE_MASK), (2, "ne", 0, 0), (3, "ne", 0, 0)),),
    ),
    Denial(
        ("preadv2", "pwritev2"),
        errno.EOPNOTSUPP,
        "RWF_NOWAIT tells which pages of a host file are cached, without reading them",
        _any_bit_set(5, (RWF_NOWAIT,)),
    ),
    Denial(
        ("fanotify_init", "fanotify_mark"),
        errno.EPERM,
        "watches when host processes open, read or run host files the task can read",
    ),
    Denial(
        ("fallocate",),
        errno.EOPNOTSUPP,
        "one call takes gigabytes before the disk reserve looks; posix_fallocate then writes",
        _not_in(1, FREEING_FALLOCATE_MODES),
    ),
    Denial(
        ("ioctl",),
        errno.EOPNOTSUPP,
        "FS_IOC_RESVSP/ZERO_RANGE, ALLOCSP: fallocate by another name, inside the kernel",
        _ioctl_request_in(PREALLOCATING_IOCTLS),
    ),
    Denial(
        ("ioctl",),
        errno.EOPNOTSUPP,
        "fscrypt keys stay in the host kernel until unmount; policies and verity on the user's files",
        _ioctl_request_in(LASTING_FSCRYPT_IOCTLS),
    ),
    Denial(("ioctl",), errno.EPERM, _WHY_NO_INODE_FLAGS, _ioctl_request_in(INODE_ATTRIBUTE_IOCTLS)),
    Denial(("file_setattr",), errno.EPERM, _WHY_NO_INODE_FLAGS),
    Denial(
        ("ioctl",),
        errno.EPERM,
        "a file system's label or UUID: host-wide, and needs the host's CAP_SYS_ADMIN anyway",
        _ioctl_request_in(FILE_SYSTEM_IDENTITY_IOCTLS),
    ),
    Denial(
        ("fcntl", "fcntl64"),
        errno.EACCES,
        "a lease on a workspace file holds every host open of it and tells the task",
        (((1, "masked_eq", F_SETLEASE, FCNTL_CMD_MASK), (2, "ne", F_UNLCK, 0)),),
    ),
    Denial(
        ("fcntl", "fcntl64"),
        errno.EINVAL,
        "F_SETDELEG is a lease by another name, its type out of the filter's reach",
        (((1, "masked_eq", F_SETDELEG, FCNTL_CMD_MASK),),),
    ),
    Denial(
        ("socket", "socketpair"),
        errno.EAFNOSUPPORT,
        "only unix, inet, inet6 and netlink: packet sockets, vsock, bluetooth, ... are raw or exotic",
        _family_not_in(ALLOWED_FAMILIES),
    ),
    Denial(
        ("socket",),
        errno.EAFNOSUPPORT,
        "socket(AF_INET, SOCK_PACKET) is the obsolete spelling of a packet socket",
        (((0, "eq", AF_INET, 0), (1, "masked_eq", SOCK_PACKET, SOCK_TYPE_MASK)),),
    ),
    Denial(
        ("socket",),
        errno.EPROTONOSUPPORT,
        "netlink beyond NETLINK_ROUTE (netfilter, xfrm, crypto, generic...) is kernel config surface",
        (((0, "eq", AF_NETLINK, 0), (2, "ne", NETLINK_ROUTE, 0)),),
    ),
)


def build_filter(cache_dir: str | os.PathLike[str] | None = None) -> bytes:
    """The classic-BPF program for `DENIED` on the native architecture.

    With `cache_dir`, the program is kept there, keyed by a hash of this file
    (the table and its compiler), libseccomp's version and the machine: loading
    pyseccomp alone costs ~11 ms (ctypes.util.find_library runs ldconfig), a
    cached program ~2 ms. A cache file is used only when it and its directory
    belong to this user and nobody else can write them (it is a filter about to
    be trusted).
    Raises OSError when libseccomp is missing or refuses the table."""
    # Here, not at the top: this module is also loaded by path, without its package
    # (sandbox/init.py started as a script), where only `install` is used.
    from sandgate.enforcer import private_cache

    cache_file = None
    if cache_dir is not None:
        cache_file = os.path.join(cache_dir, f"seccomp-{cache_key()}.bpf")
        program = private_cache.read(cache_file)
        if program and len(program) % SOCK_FILTER_SIZE == 0:
            return program
    program = _compile()
    if cache_file is not None:
        private_cache.write(cache_file, program)
    return program


def _compile() -> bytes:
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: "Unable to find libseccomp"
        raise OSError(
            f"seccomp: cannot load libseccomp ({exc}): install libseccomp2 "
            "and the pyseccomp package"
        ) from exc
    operators = {
        "eq": pyseccomp.EQ,
        "ne": pyseccomp.NE,
        "gt": pyseccomp.GT,
        "masked_eq": pyseccomp.MASKED_EQ,
    }
    machine = os.uname().machine
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    syscall_filter.set_attr(pyseccomp.Attr.ACT_BADARCH, BAD_ARCH_ACTION)
    for denial in DENIED:
        action = pyseccomp.ERRNO(denial.errno)
        for name in denial.syscalls:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if number == -1:  # __NR_SCMP_ERROR: this libseccomp does not know the name
                if name not in UNIFIED_SYSCALL_NUMBERS or machine not in UNIFIED_TABLE_MACHINES:
                    raise OSError(
                        f"seccomp: libseccomp does not know the syscall {name!r} "
                        "on this architecture: upgrade libseccomp"
                    )
                number = UNIFIED_SYSCALL_NUMBERS[name]
            for tests in denial.when or ((),):
                # masked_eq's (value, mask) are libseccomp's (mask, datum) order reversed.
                args = [
                    pyseccomp.Arg(
                        index, operators[op], *((mask, value) if op == "masked_eq" else (value,))
                    )
                    for index, op, value, mask in tests
                ]
                try:
                    syscall_filter.add_rule(action, number, *args)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"seccomp: libseccomp refused the rule for {name} {tests}: {exc.strerror}",
                    ) from exc
    with os.fdopen(os.memfd_create("sandgate-seccomp-bpf"), "w+b") as exported:
        syscall_filter.export_bpf(exported)
        exported.seek(0)
        return newer_syscalls_fence(machine, NEWEST_REVIEWED_SYSCALL) + exported.read()


# Classic BPF: struct sock_filter's codes, and struct seccomp_data's offsets.
BPF_LD_W_ABS = 0x20
BPF_JEQ_K, BPF_JGT_K, BPF_JGE_K = 0x15, 0x25, 0x35
BPF_RET_K = 0x06
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH = 0, 4


def newer_syscalls_fence(machine: str, newest: int) -> bytes:
    """BPF that answers ENOSYS to a native syscall numbered above `newest`, and
    otherwise falls through to the program placed after it (libseccomp's).

    Another ABI's arch and numbers with the x32 bit (or -1) fall through too:
    libseccomp's program kills those, and must keep doing so. Empty for a machine
    whose table is not the unified one (numbers would mean something else there).
    Jumps are relative, so the program after it runs unchanged."""
    if machine not in AUDIT_ARCH:
        return b""
    instructions = (
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 0, 4, AUDIT_ARCH[machine]),  # another ABI: to the program after
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        (BPF_JGE_K, 2, 0, X32_SYSCALL_BIT),  # x32, -1: to the program after
        (BPF_JGT_K, 0, 1, newest),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
    )
    return b"".join(
        code.to_bytes(2, sys.byteorder)
        + bytes((jump_true, jump_false))
        + k.to_bytes(4, sys.byteorder)
        for code, jump_true, jump_false, k in instructions
    )


@functools.cache
def cache_key() -> str:
    """A hash of this file (the table and how it is compiled), libseccomp's version, the machine.

    Stricter than sandgate's version and cheaper: importlib.metadata alone costs ~17 ms.
    Once per process (the code that runs is the code that was loaded): a warm
    runner's pool computes it before it forks them (enforcer/zygote.py)."""
    try:  # CPython 3.11's own sha256, not hashlib's: loading OpenSSL costs ~12 ms of an attach
        from _sha256 import sha256
    except ImportError:  # another version: hashlib
        from hashlib import sha256

    with open(__file__, "rb") as source:
        material = source.read()
    material += f"|{_libseccomp_version()}|{os.uname().machine}".encode()
    return sha256(material).hexdigest()[:24]


def _libseccomp_version() -> str:
    """libseccomp's version, read without pyseccomp (whose import is the slow part)."""

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        library = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "missing"
    library.seccomp_version.restype = ctypes.POINTER(_Version)
    found = library.seccomp_version().contents
    return f"{found.major}.{found.minor}.{found.micro}"


# --- loading (standard library only) ---------------------------------------------

PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2  # prctl(PR_SET_SECCOMP, ...)
SECCOMP_SET_MODE_FILTER = 1  # seccomp(2) operation
SECCOMP_FILTER_FLAG_TSYNC = 1  # apply to every thread of the process, or fail
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277}
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
BPF_MAXINSNS = 4096


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes) -> None:
    """Set no_new_privs and load `program` (from `build_filter`) for every thread.

    Irreversible for this process and everything it starts. Raises OSError with
    the reason when the program is malformed or the kernel refuses it."""
    if (
        not program
        or len(program) % SOCK_FILTER_SIZE
        or len(program) // SOCK_FILTER_SIZE > BPF_MAXINSNS
    ):
        raise OSError(
            errno.EINVAL,
            f"seccomp: not a BPF program ({len(program)} bytes; expected a "
            f"multiple of {SOCK_FILTER_SIZE}, at most {BPF_MAXINSNS} instructions)",
        )
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise_errno("seccomp: prctl(PR_SET_NO_NEW_PRIVS)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // SOCK_FILTER_SIZE, ctypes.addressof(buffer))
    number = SYS_SECCOMP.get(os.uname().machine)
    if number is None:  # no seccomp(2) number known here: this thread only, through prctl
        result = libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)
    else:
        result = libc.syscall(
            ctypes.c_long(number),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
            ctypes.byref(fprog),
        )
    if result > 0:
        raise OSError(
            errno.EBUSY,
            f"seccomp: thread {result} could not take the filter "
            "(it has a filter of its own); install before starting threads",
        )
    if result != 0:
        _raise_errno("seccomp: loading the filter")


def _raise_errno(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{what} failed: {os.strerror(code)}")


def available() -> str | None:
    """None when the kernel can enforce `build_filter`'s program, else what is missing and the fix."""
    try:
        with open(ACTIONS_AVAIL) as actions_file:
            actions = set(actions_file.read().split())
    except OSError:
        return (
            f"seccomp filters: {ACTIONS_AVAIL} is missing; the kernel needs Linux >= 4.14 "
            "built with CONFIG_SECCOMP_FILTER=y"
        )
    missing = [action for action in REQUIRED_ACTIONS if action not in actions]
    if missing:
        return (
            f"seccomp filters: the kernel lacks the action(s) {', '.join(missing)} "
            f"({ACTIONS_AVAIL}); upgrade to Linux >= 4.14 with CONFIG_SECCOMP_FILTER=y"
        )
    return None
