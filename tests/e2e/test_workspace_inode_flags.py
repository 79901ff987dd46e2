"""Inode flags a task could set on the user's workspace would stay after the run and
spread to what the user makes there later (a red team found it, session 51).

Through the idmapped workspace the task owns the user's directories, and ext4 lets an
owner set most inode flags without any capability (only immutable and append-only
need CAP_LINUX_IMMUTABLE, data journalling CAP_SYS_RESOURCE): `chattr +S +D +d` on
the workspace root. Those flags are inherited: every file and directory the user's
`git checkout`, `npm install` or build creates there afterwards would be written
synchronously (S), its directory updates too (D), and `d` (nodump) makes backup tools
that honour it (dump, borg --exclude-nodump) skip the user's new work. The after-run
check looks at modes and ACLs, not at inode flags, so the filter refuses every way
to set them (enforcer/sandbox/seccomp.py `INODE_ATTRIBUTE_IOCTLS`, `file_setattr`):
FS_IOC_SETFLAGS (chattr), FS_IOC_FSSETXATTR and the file_setattr syscall (6.17).

Control: after an honest run the root carries no such flag, and neither does a file
the user makes there; reading the flags (lsattr) still works in the task.
"""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

FS_IOC_GETFLAGS = 0x80086601
FS_SYNC_FL, FS_NODUMP_FL, FS_DIRSYNC_FL = 0x8, 0x40, 0x10000
SPREADING = FS_SYNC_FL | FS_NODUMP_FL | FS_DIRSYNC_FL

# The same flags through the extended-attribute interfaces: read, add SYNC and NODUMP
# (FS_XFLAG_*), write back; prints the error, then what the kernel now reports.
XFLAGS = r"""
import ctypes, fcntl, os, struct, sys
SYNC_NODUMP = 0x20 | 0x80  # FS_XFLAG_SYNC | FS_XFLAG_NODUMP
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def file_attr(number, buffer):
    if libc.syscall(ctypes.c_long(number), ctypes.c_long(-100), ctypes.c_char_p(b"."),
                    buffer, ctypes.c_long(len(buffer)), ctypes.c_long(0)) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
try:
    if sys.argv[1] == "fssetxattr":  # struct fsxattr: xflags first
        attr = bytearray(fcntl.ioctl(fd, 0x801C581F, bytes(28)))  # FS_IOC_FSGETXATTR
        struct.pack_into("I", attr, 0, struct.unpack_from("I", attr)[0] | SYNC_NODUMP)
        fcntl.ioctl(fd, 0x401C5820, bytes(attr))  # FS_IOC_FSSETXATTR
    else:  # file_getattr (468) / file_setattr (469): struct file_attr, xflags first
        attr = ctypes.create_string_buffer(24)
        file_attr(468, attr)
        struct.pack_into("Q", attr, 0, struct.unpack_from("Q", attr)[0] | SYNC_NODUMP)
        file_attr(469, attr)
    print("set")
except OSError as e:
    print("refused:", e)
print("flags now %#x" % struct.unpack("l", fcntl.ioctl(fd, 0x80086601, bytes(8)))[0])
"""

STEPS = {
    "chattr": "chattr +S +D +d .; echo chattr exit $?; lsattr -d .",
    "fssetxattr": python(XFLAGS, "fssetxattr"),
    "file_setattr": python(XFLAGS, "file_setattr"),
    "honest": "lsattr -d .",
}


def _flags(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8)))[0]
    finally:
        os.close(fd)


@pytest.mark.parametrize("task", list(STEPS))
def test_no_inherited_inode_flag_is_left_on_the_workspace(net, tmp_path, task):
    result = sandbox.run(net, tmp_path, {"flags": STEPS[task]})
    assert result["flags"].rc == 0, result.describe()  # reading the flags still works
    root = result.steps_dir
    later = root / "made-by-the-user-after-the-run"
    later.write_text("x\n")
    on_root, on_later = _flags(root) & SPREADING, _flags(later) & SPREADING
    assert not on_root and not on_later, (
        f"after the run the workspace root has flags {on_root:#x} and a file the user "
        f"makes there {on_later:#x}; task: {result['flags'].out.strip()}"
    )
