"""Syscalls newer than the seccomp table, and its relatives, tried by a hostile task
(enforcer/sandbox/seccomp.py is a deny list; docs/sandbox.md, "The syscall filter").

Each probe is a raw syscall (ctypes) by /usr/bin/python3 as root of the task; the host
side checks that the effect did not happen. Found and closed in this review: a task
could attach any tty line discipline to a pty it opened (TIOCSETD: built-in ones run,
others are autoloaded as modules where dev.tty.ldisc_autoload is 1, as here), and
write its own LDT (modify_ldt, which Docker refuses); and any syscall a later kernel
adds would have been allowed. Now TIOCSETD/TIOCCONS and modify_ldt are refused, and
every native number above the newest reviewed one (file_setattr, 469) gets ENOSYS.

file_setattr is refused with FS_IOC_SETFLAGS and FS_IOC_FSSETXATTR: inode flags an
owner may set (sync, nodump, casefold) would stay on the user's workspace and spread
to what is made below (tests/e2e/test_workspace_inode_flags.py).

What stays allowed, and why it gives nothing: listmount/statmount see only the task's
own mount namespace; the *xattrat calls are setxattr by another name (file
capabilities and trusted xattrs need capabilities the task lacks); file_getattr only
reads; cachestat on a file the task cannot write is refused by the kernel;
pidfd_getfd, process_madvise, kcmp and pidfd_send_signal fail the ptrace checks
against the sandbox's init; mseal, futex_waitv, memfd_secret, lsm_* and landlock_*
act on the task itself.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import struct
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import seccomp
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

LIBC = ctypes.CDLL(None, use_errno=True)

NS_GET_MNTNS_ID = 0x8008B705  # _IOR(NSIO, 5, __u64)
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL, FS_APPEND_FL = 0x10, 0x20

# The task prints {probe: "ok" | errno name | [ "ok", what it got ]}.
NEW_SYSCALL_PROBES = r"""
import ctypes, errno, fcntl, json, os, pty, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
seen, keep = {}, []
def report(name, call):
    try:
        result = call()
        seen[name] = "ok" if result is None else ["ok", result]
    except OSError as e:
        seen[name] = errno.errorcode.get(e.errno, str(e.errno))
def raw(number, *args):
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        raise OSError(ctypes.get_errno(), "syscall")
    return result
def ref(data):
    buffer = ctypes.create_string_buffer(data, len(data) or 1)
    keep.append(buffer)
    return ctypes.addressof(buffer)
def cstr(text):
    return ref(text.encode() + b"\0")
AT_FDCWD = -100
host_mnt_ns = int(sys.argv[1])
with open("victim", "w") as f:
    f.write("workspace file\n")

# The new mount API: a clone of the host's tree, a fresh tmpfs, a remount.
report("open_tree_clone", lambda: raw(428, AT_FDCWD, cstr("/"), 1))  # OPEN_TREE_CLONE
report("open_tree_attr", lambda: raw(467, AT_FDCWD, cstr("/"), 1, 0, 0))
report("move_mount", lambda: raw(429, -1, cstr(""), AT_FDCWD, cstr("/tmp"), 4))
report("fsopen", lambda: raw(430, cstr("tmpfs"), 0))
report("fsconfig", lambda: raw(431, -1, 0, 0, 0, 0))
report("fsmount", lambda: raw(432, -1, 0, 0))
report("fspick", lambda: raw(433, AT_FDCWD, cstr("/"), 0))
report("mount_setattr", lambda: raw(442, AT_FDCWD, cstr("/"), 0, 0, 0))

# listmount: the task's own mount tree, the host's by its id, and every id up to its own.
def listmount(ns_id):
    request = struct.pack("=IIQQQ", 32, 0, 0xFFFFFFFFFFFFFFFF, 0, ns_id)  # LSMT_ROOT
    ids = (ctypes.c_uint64 * 512)()
    return raw(458, ref(request), ctypes.addressof(ids), 512, 0)
def mnt_ns_id():
    with open("/proc/self/ns/mnt") as ns:
        return struct.unpack("Q", fcntl.ioctl(ns, 0x8008B705, bytes(8)))[0]
own = mnt_ns_id()
seen["own_mnt_ns"] = own
report("listmount_own", lambda: listmount(0))
report("listmount_host", lambda: listmount(host_mnt_ns))
def scan():
    hits = []
    for ns_id in range(1, own + 64):
        try:
            listmount(ns_id)
            hits.append(ns_id)
        except OSError:
            pass
    return hits
report("listmount_scan", scan)

# *xattrat (6.13): a file capability, a trusted xattr, a user xattr.
def setxattrat(name, value):
    args = struct.pack("=QII", ref(value), len(value), 0)
    return raw(463, AT_FDCWD, cstr("victim"), 0, cstr(name), ref(args), len(args))
report("setxattrat_filecap", lambda: setxattrat("security.capability", bytes.fromhex(sys.argv[2])))
report("setxattrat_trusted", lambda: setxattrat("trusted.sg", b"x"))
report("setxattrat_user", lambda: setxattrat("user.sg", b"x"))

# file_getattr/file_setattr (6.17): immutable, append-only, a project id.
def file_setattr(xflags, projid=0):
    attr = struct.pack("=QIIII", xflags, 0, 0, projid, 0)
    return raw(469, AT_FDCWD, cstr("victim"), ref(attr), len(attr), 0)
report("file_getattr", lambda: raw(468, AT_FDCWD, cstr("victim"), ref(bytes(24)), 24, 0))
report("file_setattr_immutable", lambda: file_setattr(0x8))  # FS_XFLAG_IMMUTABLE
report("file_setattr_append", lambda: file_setattr(0x10))  # FS_XFLAG_APPEND
report("file_setattr_projid", lambda: file_setattr(0, 4242))

# The page cache of a host file; memory and LSM calls on the task itself.
def cachestat():
    fd = os.open("/etc/passwd", os.O_RDONLY)
    return raw(451, fd, ref(bytes(16)), ref(bytes(40)), 0)
report("cachestat_host_file", cachestat)
report("mseal", lambda: raw(462, 0, 0, 0))
report("lsm_list_modules", lambda: raw(461, ref(bytes(64)), ref(struct.pack("I", 64)), 0))
report("landlock_abi", lambda: raw(444, 0, 0, 1))  # LANDLOCK_CREATE_RULESET_VERSION

# Other processes: the sandbox's init is PID 1.
init = raw(434, 1, 0)  # pidfd_open
report("pidfd_getfd_init", lambda: raw(438, init, 0, 0))
report("process_madvise_init", lambda: raw(440, init, ref(struct.pack("=QQ", 0x400000, 4096)), 1, 20, 0))
report("pidfd_send_signal_init", lambda: raw(424, init, 10, 0, 0))  # SIGUSR1
report("kcmp_init", lambda: raw(312, 1, os.getpid(), 0, 0, 0))  # KCMP_FILE
report("open_by_handle_at", lambda: raw(304, AT_FDCWD, 0, 0))
report("quotactl_fd", lambda: raw(443, 0, 0, 0, 0))
report("fanotify_init", lambda: raw(300, 0x200, 0))  # FAN_CLASS_NOTIF|FAN_REPORT_FID: unprivileged

# A pty of its own: a line discipline (n_null is built in here), the console.
controller, terminal = pty.openpty()
report("tiocsetd", lambda: fcntl.ioctl(terminal, 0x5423, struct.pack("i", 27)) and None)
seen["discipline_after"] = struct.unpack("i", fcntl.ioctl(terminal, 0x5424, bytes(4)))[0]
report("tioccons", lambda: fcntl.ioctl(terminal, 0x541D) and None)
ldt_entry = struct.pack("=IIII", 5, 0, 0xFFFFF, 0x51)  # entry 5: 32-bit, page-granular, usable
report("modify_ldt_write", lambda: raw(154, 1, ref(ldt_entry), len(ldt_entry)))
report("personality_read_implies_exec", lambda: raw(135, 0x0400000))
print(json.dumps(seen))
"""

REFUSED_BY_THE_FILTER = {
    "open_tree_clone",
    "open_tree_attr",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "open_by_handle_at",
    "quotactl_fd",
    "fanotify_init",
    "tiocsetd",
    "tioccons",
    "modify_ldt_write",
    "personality_read_implies_exec",
    "file_setattr_immutable",
    "file_setattr_append",
    "file_setattr_projid",
}
REFUSED_BY_THE_KERNEL = {  # allowed by the filter; capabilities and ptrace checks refuse
    "listmount_host",
    "setxattrat_filecap",
    "setxattrat_trusted",
    "cachestat_host_file",
    "pidfd_getfd_init",
    "process_madvise_init",
    "pidfd_send_signal_init",
    "kcmp_init",
}
HARMLESS_AND_ALLOWED = {
    "listmount_own",
    "listmount_scan",
    "setxattrat_user",
    "file_getattr",
    "mseal",
    "lsm_list_modules",
    "landlock_abi",
}
# A v2 file capability (VFS_CAP_REVISION_2 | effective) holding CAP_SETUID.
CAP_SETUID_XATTR = "0000000280000000000000000000000000000000"


def _mount_namespace_id() -> int:
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    try:
        return struct.unpack("Q", fcntl.ioctl(fd, NS_GET_MNTNS_ID, bytes(8)))[0]
    finally:
        os.close(fd)


def _ran(outcome) -> bool:
    return outcome == "ok" or (isinstance(outcome, list) and outcome[0] == "ok")


def _xattr_absent(path: Path, name: str) -> bool:
    try:
        os.getxattr(path, name)
    except OSError as exc:
        return exc.errno == errno.ENODATA
    return False


def test_new_syscalls_reach_nothing_of_the_host(net, tmp_path):
    host_ns = _mount_namespace_id()
    r = sandbox.run(
        net, tmp_path, {"probe": python(NEW_SYSCALL_PROBES, str(host_ns), CAP_SETUID_XATTR)}
    )
    assert r["probe"].rc == 0 and r.returncode == 0, r.describe()
    seen = json.loads(r["probe"].out)
    assert set(seen) == REFUSED_BY_THE_FILTER | REFUSED_BY_THE_KERNEL | HARMLESS_AND_ALLOWED | {
        "own_mnt_ns",
        "discipline_after",
    }, seen
    assert {name: seen[name] for name in REFUSED_BY_THE_FILTER} == dict.fromkeys(
        REFUSED_BY_THE_FILTER, "EPERM"
    ), seen
    assert [name for name in REFUSED_BY_THE_KERNEL if _ran(seen[name])] == [], seen
    assert [name for name in HARMLESS_AND_ALLOWED if not _ran(seen[name])] == [], seen
    assert seen["discipline_after"] == 0  # N_TTY: the pty kept its discipline
    # listmount reaches the task's own mount namespace and no other, the host's included.
    assert seen["own_mnt_ns"] != host_ns
    assert seen["listmount_scan"] == ["ok", [seen["own_mnt_ns"]]], seen
    # On the host: the workspace file carries no capability, trusted xattr or flag.
    victim = r.steps_dir / "victim"
    assert _xattr_absent(victim, "security.capability")
    assert _xattr_absent(victim, "trusted.sg")
    with open(victim, "a") as appended:
        flags = struct.unpack("l", fcntl.ioctl(appended, FS_IOC_GETFLAGS, bytes(8)))[0]
        assert not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL), hex(flags)
        appended.write("host edit\n")
    victim.unlink()


# Each number's errno (0: it ran); sys.argv[1:] are the numbers.
NUMBERS_PROBE = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
found = {}
for number in map(int, sys.argv[1:]):
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(0) for _ in range(5)))
    found[number] = ctypes.get_errno() if result == -1 else 0
print(json.dumps(found))
"""

X32_MKDIR = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall(ctypes.c_long(int(sys.argv[1])), ctypes.c_char_p(b"x32_canary"), ctypes.c_long(0o755))
print("survived")
"""

# mkdir("i386_canary") through int 0x80 (the i386 table), from a page below 4 GiB.
I386_MKDIR = r"""
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
page = libc.mmap(None, mmap.PAGESIZE, 7, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, -1, 0)
path = b"i386_canary\0"
ctypes.memmove(page + 64, path, len(path))
code = (b"\x53\xb8" + (39).to_bytes(4, "little") + b"\xbb" + (page + 64).to_bytes(4, "little")
        + b"\xb9" + (0o755).to_bytes(4, "little") + b"\xcd\x80\x5b\xc3")
ctypes.memmove(page, code, len(code))
ctypes.CFUNCTYPE(ctypes.c_int)(page)()
print("survived")
"""


def _errno_unfiltered(number: int) -> int:
    result = LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(0) for _ in range(5)))
    return ctypes.get_errno() if result == -1 else 0


KILLED_BY_SIGSYS = 128 + signal.SIGSYS  # as the step's shell reports it


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64's numbers and its other ABIs")
def test_syscalls_newer_than_the_table_fail_closed_other_abis_die(net, tmp_path):
    """The boundary: the newest reviewed syscall passes the fence (file_setattr: the
    filter's own EPERM, not ENOSYS), every number above it gets ENOSYS, and an x32 or i386 call is still killed (the fence hands them to
    libseccomp's program). This kernel (6.18) has no syscall above 469, so ENOSYS here
    cannot tell the fence from the kernel: test_seccomp.py lowers the fence below
    mseal and file_getattr to show the mechanism."""
    newest = seccomp.NEWEST_REVIEWED_SYSCALL
    if _errno_unfiltered(newest) == errno.ENOSYS:
        pytest.skip(f"kernel without syscall {newest}: the control cannot reach it")
    numbers = (newest, newest + 1, newest + 2, 1000, seccomp.X32_SYSCALL_BIT - 1)
    x32_mkdir, x32_above = seccomp.X32_SYSCALL_BIT | 83, seccomp.X32_SYSCALL_BIT | (newest + 1)
    r = sandbox.run(
        net,
        tmp_path,
        {
            "numbers": python(NUMBERS_PROBE, *map(str, numbers)),
            "x32_mkdir": python(X32_MKDIR, str(x32_mkdir)),
            "x32_above": python(X32_MKDIR, str(x32_above)),
            "i386_mkdir": python(I386_MKDIR),
        },
    )
    found = {int(number): code for number, code in json.loads(r["numbers"].out).items()}
    assert found[newest] not in (0, errno.ENOSYS), found  # past the fence: the table's answer
    assert [found[n] for n in numbers[1:]] == [errno.ENOSYS] * 4, found
    # Another ABI is killed whatever the number: the fence does not turn it into ENOSYS.
    for label in ("x32_mkdir", "x32_above", "i386_mkdir"):
        assert r[label].rc == KILLED_BY_SIGSYS and "survived" not in r[label].out, r.describe()
    assert not (r.steps_dir / "x32_canary").exists()
    assert not (r.steps_dir / "i386_canary").exists()
