"""A task that fills what it may write: the host and the other tasks keep their room.

Each test fills a throwaway file system of its own (a small tmpfs mounted under the
test's tmp_path, removed by that path), never the host's: the filled file system
holds the workspace and the run's audit log, as /var/lib/sandgate and a workspace
share the root file system on many hosts. What each proves unharmed: the audit log
still takes the run's last events, some room is left, a second task on that file
system still ran and its gateway still recorded its request.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import cgroup
from support import sandbox
from support.sandbox import curl, python
from support.service import attach, running

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str, inodes: int = 100_000):
    """A tmpfs of `size` at tmp_path/disk, unmounted by that path at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},nr_inodes={inodes},mode=755",
            "sgt-disk",
            disk,
        ],
        check=True,
    )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", disk], check=False)


# 200 MiB at ~500 MB/s, a fast SSD's pace: the runner looks at the disk between
# every 5 and 100 ms, so a reserve holds what a writer adds between two looks (and
# while the runner waits for a CPU). dd to this tmpfs writes GB/s: on a loaded
# 2-core CI machine it went through a 16 MiB reserve before the kill landed.
FILL = python(
    "import time\n"
    "with open('big', 'wb') as f:\n"
    "    for _ in range(200):\n"
    "        f.write(bytes(1 << 20)); f.flush(); time.sleep(0.002)\n"
)


# 30,000 empty files at ~4,000/s: the inode reserve (1,000) holds what a task makes
# between two looks, as with FILL's bytes. A shell loop of `: > f$i` makes 120,000/s,
# the whole reserve in 8 ms: CI saw it take the last inode, and the runner none left
# for the summary (the summary file is made before the task now: summary_file.py).
MAKE_FILES = python(
    "import time\n"
    "for i in range(30000):\n"
    "    open(f'f{i}', 'w').close()\n"
    "    if i % 5 == 0: time.sleep(0.001)\n"
)


def free(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_favail


def disk_hits(r) -> list[dict]:
    return r.events(reason="task_limit", rule_id="builtin:limit-disk")


def test_a_task_filling_its_workspace_disk_is_stopped_at_the_reserve(net, tmp_path):
    with small_disk(tmp_path, "96m") as disk:
        r = sandbox.run(
            net,
            disk,
            {"fill": FILL, "after": "echo not reached"},
            extra=("--disk-reserve", "32M"),
        )
        left, _ = free(disk)
    assert r.returncode == 137, r.describe()
    assert "sandgate: killing the task: the file system of" in r.stderr, r.describe()
    assert "below the disk reserve of 32 MiB" in r.stderr, r.describe()
    assert "after" not in r.steps, r.describe()
    # The host kept room (what the task wrote between two looks came out of the
    # reserve, not past it), and the audit log on that disk took the run's end.
    assert left > 4 << 20, left
    assert disk_hits(r) and r.summary["limits_hit"] == ["disk"], r.describe()
    assert r.events(kind="task", detail="task ended: exit code 137"), r.describe()


def test_a_task_making_empty_files_is_stopped_at_the_inode_reserve(net, tmp_path):
    with small_disk(tmp_path, "64m", inodes=20_000) as disk:
        r = sandbox.run(net, disk, {"files": MAKE_FILES})
        _, inodes_left = free(disk)
    assert r.returncode == 137, r.describe()
    assert "free inodes, below the disk reserve of 1000" in r.stderr, r.describe()
    assert inodes_left > 0, inodes_left  # what lies past the reserve: see FILL
    assert disk_hits(r), r.describe()


def test_a_second_task_on_the_filled_disk_keeps_its_gateway(net, tmp_path):
    """B writes nothing (--disk-reserve none: it is not the one stopped); its audit log
    lies on the disk A fills. B's gateway still records B's request after A's fill."""
    with small_disk(tmp_path, "64m") as disk:
        (disk / "a").mkdir()
        (disk / "b").mkdir()
        b = sandbox.start(
            net,
            disk / "b",
            steps={
                "wait": "while [ ! -e go ]; do sleep 0.05; done",
                "get": curl("http://allowed.test/"),
            },
            extra=("--disk-reserve", "none"),
        )
        a = sandbox.run(
            net, disk / "a", {"fill": FILL},
            extra=("--disk-reserve", "16M"),
        )  # fmt: skip
        (b.workdir / "steps" / "go").touch()  # B's request only now, after A's fill
        rb = b.finish(timeout=60)
    assert a.returncode == 137 and disk_hits(a), a.describe()
    assert rb.returncode == 0 and rb["get"].status == 200, rb.describe()
    assert rb.events(kind="request", verdict="allow", name="allowed.test"), rb.describe()


def test_tmpfs_mounts_are_sized_without_a_memory_limit(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {
            "df": "df -k /tmp /dev/shm /run $HOME | tail -n +2",
            "fill": "dd if=/dev/zero of=/dev/shm/big bs=1M count=600 2>&1; ls -s --block-size=M /dev/shm/big",
        },
        extra=("--memory", "none", "--pids", "none"),
    )
    sizes = {line.split()[5]: int(line.split()[1]) for line in r["df"].out.splitlines()}
    assert set(sizes.values()) == {512 << 10}, sizes
    assert "No space left on device" in r["fill"].out, r.describe()
    assert "512M" in r["fill"].out, r.describe()  # what it got, not a byte more


@pytest.mark.skipif(
    not os.path.exists("/sys/fs/cgroup/memory/memory.kmem.tcp.limit_in_bytes"),
    reason="cgroup v1's TCP accounting: v2 charges socket memory to memory.max",
)
def test_the_tasks_tcp_buffers_are_bounded_on_cgroup_v1(net, tmp_path):
    """200 loopback connections the task fills and never reads: 623 MiB of host
    memory, charged to no cgroup, before the TCP limit; now at most that limit."""
    code = textwrap.dedent("""
        import socket
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(512)
        queued, keep = 0, []
        for _ in range(200):
            c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
            c.setblocking(False)
            try:
                while True:
                    queued += c.send(b"x" * 65536)
            except BlockingIOError:
                pass
            keep.append((c, s))
        print(queued >> 20)
    """)
    r = sandbox.run(net, tmp_path, {"tcp": python(code)}, timeout=60)
    queued_mib = int(r["tcp"].out.split()[-1])
    assert 0 < queued_mib <= (cgroup.TCP_BYTES_V1 >> 20) + 16, r.describe()


def test_an_attached_runs_task_is_stopped_at_the_reserve_and_the_service_records_it(
    fakenet, tmp_path
):
    """`sandgate run --gateway`: the runner's own wait loop watches the disk (attach.py)."""
    rules = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
    with running(fakenet, tmp_path, rules) as gateway, small_disk(tmp_path, "96m") as disk:
        r = attach(
            gateway, disk, {"fill": FILL},
            extra=("--disk-reserve", "32M"),
        )  # fmt: skip
        left, _ = free(disk)
    assert r.returncode == 137, r.describe()
    assert "below the disk reserve of 32 MiB" in r.stderr, r.describe()
    assert left > 4 << 20, left
    assert disk_hits(r) and r.summary["limits_hit"] == ["disk"], r.describe()


def test_the_tasks_own_tmp_stops_a_shell_speed_file_maker_at_its_inode_bound(net, tmp_path):
    """The sandbox's /tmp is a tmpfs of its own with nr_inodes (one per 4 KiB of its
    size: 16,384 for --memory 64M): a file maker at shell speed (which the polling
    reserve cannot catch) stops there, on no host file system. (h-pquota)"""
    r = sandbox.run(
        net,
        tmp_path,
        {"files": "cd /tmp; i=0; while true > f$i; do i=$((i+1)); done 2>/dev/null; echo $i; df -i /tmp | tail -1"},
        extra=("--memory", "64M"),
    )  # fmt: skip
    made, df = r["files"].out.splitlines()
    assert 16_000 < int(made) < 16_384, r.describe()
    assert df.split()[1:5] == ["16384", "16384", "0", "100%"], r.describe()
