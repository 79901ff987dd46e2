"""What kind of file system an open file is on (statfs's f_type).

The files sandgate writes where an admin points it (`--audit-log`, `--summary-json`)
must hold what is written. The kernel's interface file systems show their settings as
regular files: `--audit-log /proc/sys/kernel/hostname` passed the regular-file check,
and every audit line set the host's name. A file on one of them is refused.
"""

from __future__ import annotations

import ctypes

_libc = ctypes.CDLL(None, use_errno=True)

# linux/magic.h: file systems whose files are the kernel's settings and controls. A list
# of these rather than of storage file systems: storage comes in more kinds than anyone
# can list (FUSE, 9p, virtiofs, ZFS...), and a file on one of them only stores.
KERNEL_INTERFACES = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x42494E4D: "binfmt_misc",
    0x6165676C: "pstore",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x65735543: "fusectl",
    0x7655821: "resctrl",
    0x6E667364: "nfsd",
    0x67596969: "rpc_pipefs",
    0x19800202: "mqueue",
    0x5A3C69F0: "apparmorfs",
    0x6C6F6F70: "binderfs",
}


def file_system_type(fd: int) -> int | None:
    """statfs's f_type of the file system `fd` is on; None if fstatfs failed."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs: f_type first (a long)
    if _libc.fstatfs(fd, buffer) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buffer).value


def kernel_interface(fd: int) -> str | None:
    """The name of the kernel interface file system `fd` is on (proc, sysfs...), or None."""
    return KERNEL_INTERFACES.get(file_system_type(fd))
