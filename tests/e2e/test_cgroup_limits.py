"""Real cgroups on this host (v2, or v1 controllers as on hybrid hosts): a fork bomb
and a memory hog meet their limits, the host does not, and nothing is left behind.

Each test's cgroup is named per test and removed by that name even when it fails.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import textwrap

import pytest
from sandgate.enforcer.sandbox import cgroup
from sandgate.enforcer.sandbox.cgroup import Limits, TaskCgroup

pytestmark = pytest.mark.e2e

FORK_BOMB = textwrap.dedent("""
    import os, time
    forks = 0
    try:
        while forks < 200:  # bounded: without a limit it stops here and says so
            if os.fork() == 0:
                os.closerange(0, 3)  # so that the test sees the bomb end before they do
                time.sleep(2)
                os._exit(0)
            forks += 1
    except BlockingIOError:
        print("EAGAIN after", forks, flush=True)
        raise SystemExit(0)
    print("no limit after", forks, flush=True)
    raise SystemExit(1)
""")
MEMORY_HOG = 'data = b"\\x01" * (200 << 20)\nprint("survived", len(data))\n'


@pytest.fixture
def cgroup_name():
    name = f"sandgate-test-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        for path in cgroup.leftovers(name):
            cgroup.remove_path(path)


def make(name: str, limits: Limits) -> TaskCgroup:
    problems = cgroup.check(limits)
    assert problems == [], problems
    return TaskCgroup.create(name, limits)


def run_inside(task: TaskCgroup, code: str) -> subprocess.CompletedProcess:
    def join() -> None:  # what the sandbox's init does: join, then fork
        for procs in task.procs_files:
            with open(procs, "w") as f:
                f.write("0")

    return subprocess.run(
        [sys.executable, "-c", code], preexec_fn=join, capture_output=True, text=True, timeout=60
    )


def member_pidfds(task: TaskCgroup) -> list[int]:
    pids = set()
    for procs in task.procs_files:
        with open(procs) as f:
            pids |= {int(line) for line in f.read().split()}
    return [os.pidfd_open(pid) for pid in pids]


def test_fork_bomb_gets_eagain_and_is_reported(cgroup_name):
    task = make(cgroup_name, Limits(memory_bytes=None, pids=32))
    assert all(os.path.isdir(p) and os.path.basename(p) == cgroup_name for p in task.paths)
    assert task.limits_hit() == []

    bomb = run_inside(task, FORK_BOMB)

    assert bomb.returncode == 0, bomb.stdout + bomb.stderr
    forks = int(bomb.stdout.split()[-1])
    assert 0 < forks < 32  # the bomb's own process counts against the 32
    # The host is fine: this process still forks, and its cgroup has no such limit.
    assert subprocess.run(["true"]).returncode == 0
    [hit] = task.limits_hit()
    assert hit.limit == "pids" and hit.count >= 1 and "32 processes" in hit.detail

    # The bomb's children still sleep in the cgroup; remove() kills them.
    pidfds = member_pidfds(task)
    assert len(pidfds) == forks
    paths = task.paths
    task.remove()
    try:
        assert all(select.select([fd], [], [], 0)[0] for fd in pidfds)  # readable: exited
    finally:
        for fd in pidfds:
            os.close(fd)
    assert not any(os.path.exists(p) for p in paths)
    assert cgroup.leftovers(cgroup_name) == []


def test_memory_hog_is_oom_killed_and_reported(cgroup_name):
    task = make(cgroup_name, Limits(memory_bytes=64 << 20, pids=None))

    hog = run_inside(task, MEMORY_HOG)

    assert hog.returncode == -signal.SIGKILL, hog.stdout + hog.stderr
    assert "survived" not in hog.stdout
    [hit] = task.limits_hit()
    assert hit.limit == "memory" and hit.count >= 1 and str(64 << 20) in hit.detail
    paths = task.paths
    task.remove()
    assert not any(os.path.exists(p) for p in paths)


def test_within_limits_nothing_is_reported(cgroup_name):
    task = make(cgroup_name, Limits(memory_bytes=256 << 20, pids=64, cpus=1.5))

    ok = run_inside(task, "print(sum(range(10**5)))")

    assert ok.returncode == 0 and ok.stdout.strip() == str(sum(range(10**5)))
    assert task.limits_hit() == []
    task.remove()
    task.remove()  # idempotent
    assert cgroup.leftovers(cgroup_name) == []


def test_attach_moves_a_running_process_in(cgroup_name):
    task = make(cgroup_name, Limits(pids=8))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        task.attach(sleeper.pid)
        for procs in task.procs_files:
            with open(procs) as f:
                assert str(sleeper.pid) in f.read().split()
        task.remove()
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cpu_quota_throttles_and_is_reported(cgroup_name):
    task = make(cgroup_name, Limits(memory_bytes=None, pids=None, cpus=0.1))
    spin = "import time\nend = time.monotonic() + 0.5\nwhile time.monotonic() < end: pass\n"

    busy = run_inside(task, spin)

    assert busy.returncode == 0, busy.stderr
    [hit] = task.limits_hit()
    assert hit.limit == "cpus" and hit.count >= 2 and "0.1 CPUs" in hit.detail
    task.remove()
