"""Calls that allocate a file system's blocks in one go, against the disk reserve.

The reserve (enforcer/sandbox/disk_reserve.py) is a watcher: it bounds writers, whose
pace is the disk's, not a call that takes gigabytes at once. fallocate(2) did (one
`fallocate -l 1900M` filled a 2 GiB disk before the next look),
and so do the XFS preallocation ioctls, which the VFS serves on every file system with
fallocate (FS_IOC_RESVSP, RESVSP64, ZERO_RANGE: vfs_fallocate inside the kernel). Now
the seccomp filter answers EOPNOTSUPP to every allocating mode and to those ioctls,
as a file system without fallocate would; punching holes and collapsing ranges (they
free blocks) still work. glibc's posix_fallocate then writes a byte per block, which
the reserve stops like any writer.

Each test runs on an ext4 file system of its own: an image in the test's tmp dir on
a loop device, unmounted and detached at the end; never the host's disks.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import seccomp
from support import sandbox
from support.sandbox import python
from test_task_fills_disk import disk_hits, free

pytestmark = pytest.mark.e2e

MIB = 1 << 20
RESERVE = 128 * MIB
FALLOC_FL_ZERO_RANGE = 0x10


@contextlib.contextmanager
def small_ext4(tmp_path: Path, size: str):
    """An ext4 file system of `size` at tmp_path/disk (a sparse image on a loop device)."""
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["truncate", "-s", size, image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", image], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", loop, disk], check=True)
        try:
            yield disk
        finally:
            subprocess.run(["umount", disk], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        image.unlink(missing_ok=True)


# Every way to fallocate the task has, on file `f`, each printed as "ok" or its errno's
# name: the modes that allocate, a mode with junk above 32 bits (the kernel reads an
# int: 0, allocate), the ioctls, and the two modes that only free blocks.
ALLOCATORS = r"""
import ctypes, errno, fcntl, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_FALLOCATE = {"x86_64": 285, "aarch64": 47, "riscv64": 47}[os.uname().machine]
length = int(sys.argv[1])
fd = os.open("f", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"x" * 3 * 4096)
seen = {}
def report(name, call):
    try:
        call()
        seen[name] = "ok"
    except OSError as e:
        seen[name] = errno.errorcode.get(e.errno, str(e.errno))
def fallocate(mode, offset, size):
    if libc.syscall(ctypes.c_long(SYS_FALLOCATE), ctypes.c_long(fd), ctypes.c_long(mode),
                    ctypes.c_long(offset), ctypes.c_long(size)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")
def preallocate(request, size):  # struct space_resv: whence SEEK_SET, start 0, size
    fcntl.ioctl(fd, request, struct.pack("=hh4xqqiI16x", 0, 0, 0, size, 0, 0))
for name, mode in (("mode_0", 0), ("keep_size", 1), ("zero_range", 0x10),
                   ("insert_range", 0x20), ("unshare_range", 0x40), ("write_zeroes", 0x80),
                   ("junk_high_bits", 1 << 32)):
    report(name, lambda: fallocate(mode, 0, length))
for name, request in (("ioctl_resvsp", 0x40305828), ("ioctl_resvsp64", 0x4030582A),
                      ("ioctl_zero_range", 0x40305839)):
    report(name, lambda: preallocate(request, length))
report("punch_hole", lambda: fallocate(0x02 | 0x01, 0, 4096))
report("collapse_range", lambda: fallocate(0x08, 4096, 4096))
seen["blocks"] = os.fstat(fd).st_blocks * 512
print(json.dumps(seen))
"""
REFUSED = (
    "mode_0",
    "keep_size",
    "zero_range",
    "insert_range",
    "unshare_range",
    "write_zeroes",
    "junk_high_bits",
    "ioctl_resvsp",
    "ioctl_resvsp64",
    "ioctl_zero_range",
)

POSIX_FALLOCATE = r"""
import os, sys
fd = os.open("big", os.O_RDWR | os.O_CREAT, 0o644)
os.posix_fallocate(fd, 0, int(sys.argv[1]))
print("allocated", os.fstat(fd).st_blocks * 512)
"""

MOST_OF_THE_FREE_SPACE = "$(( $(df -B1 --output=avail . | tail -1) - 4 * 1024 * 1024 ))"


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64", "riscv64"), reason="numbers")
def test_fallocate_and_its_ioctls_take_no_blocks_the_freeing_modes_work(net, tmp_path):
    with small_ext4(tmp_path, "384M") as disk:
        before, _ = free(disk)
        r = sandbox.run(
            net,
            disk,
            {
                "fallocate": f"fallocate -l {MOST_OF_THE_FREE_SPACE} big; echo rc=$?; ls -s big",
                "calls": python(ALLOCATORS, str(before - 4 * MIB)),
            },
            extra=("--disk-reserve", "128M"),
        )
        left, _ = free(disk)
        control = _unfiltered_control(disk)
    assert r.returncode == 0 and not disk_hits(r), r.describe()
    # The clear error: fallocate(1)'s own words for EOPNOTSUPP, and nothing allocated.
    assert "fallocate failed: Operation not supported" in r["fallocate"].err, r.describe()
    assert "rc=1" in r["fallocate"].out and "0 big" in r["fallocate"].out, r.describe()
    seen = json.loads(r["calls"].out)
    # EOPNOTSUPP, whose number Python's errno.errorcode names ENOTSUP (95 on Linux).
    assert {name: seen[name] for name in REFUSED} == dict.fromkeys(REFUSED, "ENOTSUP"), seen
    assert seen["punch_hole"] == "ok" and seen["collapse_range"] == "ok", seen
    assert seen["blocks"] <= 3 * 4096, seen  # the file's own 3 blocks (less the hole), no more
    # The file system kept its room: nothing of the reserve, nor above it, was taken.
    assert left > before - 4 * MIB and left > RESERVE, (before, left)
    # The control: without the filter, each of these calls allocates at once.
    assert control == dict.fromkeys(control, True), control


def _unfiltered_control(disk: Path) -> dict[str, bool]:
    """Whether each allocating call (1 MiB) took blocks, run here without the filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    took = {}
    for name, mode, request in (
        ("mode_0", 0, None),
        ("zero_range", FALLOC_FL_ZERO_RANGE, None),
        ("ioctl_resvsp64", None, seccomp.FS_IOC_RESVSP64),
        ("ioctl_zero_range", None, seccomp.FS_IOC_ZERO_RANGE),
    ):
        path = disk / f"control-{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if request is None:
                assert libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(MIB)) == 0
            else:
                fcntl.ioctl(fd, request, struct.pack("=hh4xqqiI16x", 0, 0, 0, MIB, 0, 0))
            took[name] = os.fstat(fd).st_blocks * 512 >= MIB
        finally:
            os.close(fd)
            path.unlink()
    return took


def test_posix_fallocate_falls_back_to_writes_which_the_reserve_stops(net, tmp_path):
    """glibc's posix_fallocate takes EOPNOTSUPP for a file system without fallocate and
    writes a byte per block (~770 MiB/s here): a writer, which the reserve stops with
    room left, where one fallocate call took it all before the watcher looked."""
    with small_ext4(tmp_path, "384M") as disk:
        before, _ = free(disk)
        r = sandbox.run(
            net,
            disk,
            {"posix": python(POSIX_FALLOCATE, str(before - 4 * MIB)), "after": "echo no"},
            extra=("--disk-reserve", "128M"),
        )
        left, _ = free(disk)
    assert r.returncode == 137, r.describe()
    assert "sandgate: killing the task: the file system of" in r.stderr, r.describe()
    assert f"below the disk reserve of {RESERVE // MIB} MiB" in r.stderr, r.describe()
    assert "after" not in r.steps and disk_hits(r), r.describe()
    # What it wrote between two looks came out of the reserve, a small part of it.
    assert left > RESERVE // 4, (before, left)
    assert r.events(kind="task", detail="task ended: exit code 137"), r.describe()
