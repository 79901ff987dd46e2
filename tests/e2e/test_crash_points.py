"""SIGKILL at the steps the other kill tests do not reach, and what is left after.

A run killed mid-setup, a dead process's pid handed to another process, a gc while
a run sets up: none of these may leave a netns with a path out that no gateway
decides, leftovers that `sandgate gc` keeps, or a restart that takes a dead runner
for a live one. The kill lands at a step deterministically: strace injects a long
delay at the syscall that starts the next step (the first `listen`: the gateway's
listeners, after the sandbox network and before its table), and the test kills
sandgate while it waits there. A pid is "reused" for real: the kernel's last pid is
set just below the dead process's (`/proc/sys/kernel/ns_last_pid`) and a `sleep` is
started, which gets it. Each test proves the effect did not happen: the fake
internet's logs for egress, `leftovers` for what is left, the sleeper for a kill.
(Covered elsewhere: a run killed while its task runs, test_gateway.py; a killed
service and its restart, test_service.py; a killed worker, test_workers_e2e.py; a
killed pool or runner, test_service_runners.py and test_service_handoff.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import NETNS_DIR, RUN_DIR, eventually, leftovers
from support.service import TWO_PROFILES, GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

EVIL_IP = "203.0.113.66"  # evil.test: no rule allows it
HELD = "echo ready; exec sleep 1000"  # a task that runs until it is killed


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _gone(pid: int) -> bool:
    """No process (nor zombie) has `pid` any more."""
    return not Path(f"/proc/{pid}").exists()


def _process_at(pid: int) -> subprocess.Popen:
    """A `sleep` with the pid of a process that is gone: the kernel hands out pids from
    the last one it gave, so one set just below `pid` makes the next fork get it
    (others fork meanwhile on a busy host: tried again)."""
    for _ in range(100):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(["sleep", "120"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"could not start a process with pid {pid}")


def _gc_output(net) -> str:
    cleaned = sandbox.gc(net)
    assert cleaned.returncode == 0, cleaned.stderr
    return cleaned.stdout


def _gc_removes_all_of(net, run_id: str) -> None:
    """`sandgate gc` names and removes the run's netns, table and state: nothing left."""
    out = _gc_output(net)
    for what in (f"netns sg-{run_id}", f"nft table sandgate_{run_id}", f"state {RUN_DIR / run_id}"):
        assert what in out, out
    assert leftovers(net, run_id) == []


@pytest.fixture
def forwarding_host(net):
    """The fake host namespace forwards IPv4, as a Docker or Kubernetes node does."""
    key = "net.ipv4.ip_forward"
    before = net.run_in_host(["sysctl", "-n", key], check=True).stdout.strip()
    net.run_in_host(["sysctl", "-qw", f"{key}=1"], check=True)
    try:
        yield net
    finally:
        net.run_in_host(["sysctl", "-qw", f"{key}={before}"], check=True)


def test_a_run_killed_before_its_table_leaves_a_netns_that_reaches_nothing(
    forwarding_host, tmp_path
):
    """Killed after its netns and veth exist, before its table is loaded: the netns is
    left with a default route to the host and no table at all. A process in it
    (root joining it, or anything that finds it before gc) must not be forwarded out."""
    net = forwarding_host
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/install.sh --test installs it)")
    workdir = sandbox._workdir(tmp_path)
    argv = sandbox._argv(net, workdir, ["sh", "-c", HELD], sandbox.DEMO_RULES, ())
    delay_first_listen = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=listen",
                          "-e", "inject=listen:delay_exit=30000000:when=1"]  # fmt: skip
    enter = ["nsenter", f"--net={NETNS_DIR / net.host_ns}", "--"]  # the test's mounts: as a host
    tracer = subprocess.Popen([*enter, *delay_first_listen, *argv], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    run_id = pid = None
    try:

        def ours() -> tuple[str, int] | None:  # the run dir whose pid is strace's child
            for pid_file in RUN_DIR.glob("*/pid"):
                try:
                    candidate = int(pid_file.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue
                if _parent(candidate) == tracer.pid:
                    return pid_file.parent.name, candidate
            return None

        found = eventually(ours, timeout=30)
        assert found, tracer.stderr.read() if tracer.poll() is not None else "no run dir"
        run_id, pid = found
        netns = f"sg-{run_id}"
        routed = eventually(
            lambda: "default" in subprocess.run(
                ["ip", "-n", netns, "route", "show"], capture_output=True, text=True
            ).stdout,
            timeout=20,
        )  # fmt: skip
        assert routed, leftovers(net, run_id)
        assert f"nft table sandgate_{run_id}" not in leftovers(net, run_id)  # before the table
        os.kill(pid, 9)
        tracer.kill()  # the run's parent: its zombie goes to init, which reaps it
        tracer.wait()
        assert eventually(lambda: _gone(pid), timeout=10)
        left = leftovers(net, run_id)
        assert f"netns {netns}" in left and f"veth sgh-{run_id}" in left, left

        net.clear_logs()
        for url in (f"http://{EVIL_IP}/", f"https://{EVIL_IP}/"):
            probe = subprocess.run(
                ["ip", "netns", "exec", netns, "curl", "-sk", "-m", "2", url],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            assert probe.returncode != 0, f"{url} answered from the leftover netns: {probe.stdout}"
        assert net.requests_seen() == []

        out = _gc_output(net)
        assert f"netns {netns}" in out and f"state {RUN_DIR / run_id}" in out, out
        assert leftovers(net, run_id) == []
    finally:
        if tracer.poll() is None:
            tracer.kill()
        tracer.wait()
        if pid is not None and not _gone(pid):
            os.kill(pid, 9)
        if run_id is not None and leftovers(net, run_id):
            sandbox.gc(net)


def test_gc_removes_a_killed_runs_leftovers_though_its_pid_is_reused(net, tmp_path):
    """The run's pid file names a live process after all: one that got the dead run's
    pid. gc must see that it is not the run (and leave that process alone)."""
    started = sandbox.start(net, tmp_path, HELD, host_mounts=True)
    run_id, sleeper = started.run_id(), None
    try:
        assert started.popen.stdout.readline().strip() == "ready"
        pid = started.pid
        started.kill()  # SIGKILL: the netns, veth, table and run dir stay
        assert eventually(lambda: _gone(pid), timeout=10)
        sleeper = _process_at(pid)
        assert f"nft table sandgate_{run_id}" in leftovers(net, run_id)

        _gc_removes_all_of(net, run_id)
        assert sleeper.poll() is None  # the process with the reused pid was not touched
    finally:
        started.kill()
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        if leftovers(net, run_id):
            sandbox.gc(net)


def _attached(service, tmp_path) -> tuple[subprocess.Popen, dict]:
    """A task attached to `service` (run in its runner's own process: --warm 0), past
    its setup, and its sandbox as `sandgate sandboxes --json` lists it."""
    workdir = sandbox._workdir(tmp_path)
    runner = subprocess.Popen(
        attach_argv(service, workdir, ["sh", "-c", HELD]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert runner.stdout.readline().strip() == "ready", runner.stderr.read()
    listed = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
    (box,) = [b for b in listed if b["runner_pid"] == runner.pid]
    return runner, box


def _killed(service, runner) -> tuple[int, int]:
    """The service and the runner SIGKILLed (the task dies with its runner), both
    pids free again; returns them."""
    service_pid = service.popen.pid
    service.kill()
    runner.kill()
    runner.wait()
    assert eventually(lambda: _gone(service_pid) and _gone(runner.pid), timeout=10)
    return service_pid, runner.pid


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_PROFILES)
    return path


def test_a_restart_does_not_take_a_reused_runner_pid_for_the_dead_runner(net, tmp_path, rules):
    """The dead runner's pid now belongs to an unrelated process. The restarted service
    must remove the sandbox (not re-adopt it, registered and served), and its stop,
    which stops the runners of its sandboxes, must not signal that process."""
    service = GatewayProcess(net, tmp_path, rules, "--warm", "0").start()
    runner, sleeper = None, None
    try:
        runner, box = _attached(service, tmp_path)
        run_id = box["task_id"]
        _, runner_pid = _killed(service, runner)
        sleeper = _process_at(runner_pid)

        service.start()
        # (30 s: the killed task's cgroups go once its last process has; a CI run on a
        # machine loaded by other sessions' tests took longer than 10 s once)
        assert eventually(lambda: not leftovers(net, run_id), timeout=30), leftovers(net, run_id)

        def details() -> list[str]:
            return [e.get("detail") or "" for e in service.events(task_id=run_id)]

        # The event goes to the audit writer before the removal; written within its
        # flush interval, which the removal can beat.
        removed = "leftover sandbox removed: its runner is gone"
        assert eventually(lambda: any(removed in d for d in details()), timeout=5), details()
        assert not any("re-adopted" in d for d in details()), details()
        assert service.status()["sandboxes"] == 0
        assert service.stop() == 0
        assert sleeper.poll() is None  # neither SIGTERMed nor SIGKILLed by the drain
    finally:
        for proc in (runner, sleeper):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        service.stop()


def test_gc_removes_a_dead_services_sandbox_though_its_pids_are_reused(net, tmp_path, rules):
    """Service and runner dead, both pids handed to other processes: their state files
    name live pids, but not the processes that wrote them. gc removes the sandbox."""
    service = GatewayProcess(net, tmp_path, rules, "--warm", "0").start()
    runner, sleepers = None, []
    try:
        runner, box = _attached(service, tmp_path)
        run_id = box["task_id"]
        for pid in _killed(service, runner):
            sleepers.append(_process_at(pid))
        assert f"netns sg-{run_id}" in leftovers(net, run_id)

        _gc_removes_all_of(net, run_id)
        assert all(s.poll() is None for s in sleepers)
    finally:
        for proc in (runner, *sleepers):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        service.stop()


def test_gc_leaves_a_run_that_is_setting_up_and_removes_one_that_never_did(net):
    """A run's state dir exists a moment before its pid file (and a service's spare
    before its service.json): gc must not take that for a dead run. A dir that named
    no owner for a minute is a run killed right after its mkdir: gc removes it."""
    young = RUN_DIR / f"cp{os.getpid() % 10**8:08d}"[:11]
    young.mkdir(parents=True)
    (young / "pid").write_text("")  # as a pid file is between its open and its write
    try:
        assert f"state {young}" not in _gc_output(net)
        assert young.is_dir()
        old = time.time() - 120
        os.utime(young, (old, old))
        assert f"state {young}" in _gc_output(net)
        assert not young.exists()
    finally:
        shutil.rmtree(young, ignore_errors=True)
