"""The disk reserve covers every file system the task can write, mounts below a
writable root included.

The sandbox binds the workspace with everything mounted below it (open_tree
AT_RECURSIVE), writable as the workspace is, but the runner watched only the
writable roots' own file systems: a workspace on a data disk with a directory of it
mounted from the system disk (a cache, logs: where /var/lib/sandgate's audit log
lives) let the task fill that one to its last byte, and the gateway then failed
closed for every task. The watch now takes in each writable mount below a root
(disk_reserve.DiskWatch); read-only ones and kernel ones (no blocks) aside.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import disk_reserve
from support import sandbox
from test_task_fills_disk import FILL, disk_hits, free

pytestmark = pytest.mark.e2e


def test_a_disk_mounted_below_the_workspace_keeps_its_reserve(net, tmp_path):
    workdir = sandbox._workdir(tmp_path)
    data = workdir / "steps" / "data"
    data.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,nr_inodes=100000", "sgt-disk", data], check=True
    )
    try:
        r = sandbox.run(
            net,
            tmp_path,
            {"fill": f"cd data && {FILL}", "after": "echo not reached"},
            extra=("--disk-reserve", "32M"),
            workdir=workdir,
        )
        left, _ = free(data)
    finally:
        subprocess.run(["umount", "-l", data], check=False)
    assert r.returncode == 137, r.describe()
    assert f"the file system of {data} has" in r.stderr, r.describe()
    assert "after" not in r.steps, r.describe()
    assert left > 4 << 20, left
    assert disk_hits(r) and r.summary["limits_hit"] == ["disk"], r.describe()


def test_a_mount_moved_by_the_task_keeps_its_reserve(net, tmp_path):
    """The mount moves with a plain directory above it that the task renames: watched
    by path, the mount was then no longer found (a statvfs that fails is no reason to
    kill), and the task filled it unwatched. Watched by descriptor, it is found."""
    workdir = sandbox._workdir(tmp_path)
    data = workdir / "steps" / "cache" / "data"
    data.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,nr_inodes=100000", "sgt-disk", data], check=True
    )
    moved = workdir / "steps" / "moved" / "data"
    try:
        r = sandbox.run(
            net,
            tmp_path,
            {"move": "mv cache moved", "fill": f"cd moved/data && {FILL}", "after": "echo no"},
            extra=("--disk-reserve", "32M"),
            workdir=workdir,
        )
        left, _ = free(moved)
    finally:
        for path in (moved, data):
            subprocess.run(["umount", "-l", path], check=False, capture_output=True)
    assert r["move"].rc == 0, r.describe()  # the mount went with the directory
    assert r.returncode == 137, r.describe()
    assert "after" not in r.steps, r.describe()
    assert left > 4 << 20, left
    assert disk_hits(r) and r.summary["limits_hit"] == ["disk"], r.describe()


def test_mounts_below_reads_mountinfo_as_the_kernel_escapes_it(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 22 0:40 / /ws rw - ext4 /dev/sdb1 rw\n"
        "31 30 0:41 / /ws/my\\040cache rw - tmpfs tmpfs rw\n"
        "32 22 0:42 / /wsx rw - tmpfs tmpfs rw\n"
    )
    assert disk_reserve.mounts_below([Path("/ws")], str(info)) == [Path("/ws/my cache")]
