"""A hostile task against the host's side of an embedded `sandgate run`.

The task tries to make sandgate itself (its memory, its gateway, its end) or the
host pay beyond the limits the admin set: it ignores the signals that should stop
it, floods its output, fills its tmpfs, rewrites its own cgroup's limits and
fork-bombs while the gateway serves it. Each test checks the host side: how long
sandgate took to end and with what, its RSS, that the run left nothing behind
(sandbox.run and sandbox.leftovers check netns, veth, table, state and processes).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

# A task that will not be stopped: SIGTERM, SIGINT and SIGHUP ignored (an ignored
# signal stays ignored across exec, so its `sleep` ignores them too).
STUBBORN = "trap '' TERM INT HUP; echo ready; sleep 1000"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _started(net, tmp_path, script: str, *extra: str) -> tuple[sandbox.Started, str]:
    """A run whose task printed its first line (`ready`): it is past its setup."""
    started = sandbox.start(net, tmp_path, script, extra=extra)
    run_id = started.run_id()
    assert started.popen.stdout.readline().strip() == "ready"
    return started, run_id


def _ended(net, started: sandbox.Started, run_id: str, timeout: float) -> tuple[int, str, float]:
    """sandgate's exit code, its stderr and how long it took to end; nothing of it left."""
    began = time.monotonic()
    try:
        _, stderr = started.popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        started.kill()
        sandbox.gc(net)
        raise AssertionError(f"sandgate still ran {timeout} s after the signal") from None
    took = time.monotonic() - began
    assert not (left := sandbox.leftovers(net, run_id)), left
    return started.popen.returncode, stderr, took


def test_a_task_that_ignores_sigterm_is_killed_after_the_grace(net, tmp_path):
    started, run_id = _started(net, tmp_path, STUBBORN, "--stop-grace", "1")
    started.popen.send_signal(signal.SIGTERM)
    code, stderr, took = _ended(net, started, run_id, timeout=15)
    assert code == 137, stderr  # the init SIGKILLed, as a shell reports it
    assert 1 <= took < 8, took
    assert "killing the task: it did not end within 1 s of SIGTERM" in stderr
    assert "Traceback" not in stderr


def test_a_second_signal_kills_the_task_at_once(net, tmp_path):
    started, run_id = _started(net, tmp_path, STUBBORN)  # the default grace: 10 s
    started.popen.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started.popen.send_signal(signal.SIGINT)
    code, stderr, took = _ended(net, started, run_id, timeout=15)
    assert code == 137 and took < 6, (code, took, stderr)
    assert "killing the task: a second signal (SIGINT)" in stderr


def test_a_task_that_stops_within_the_grace_keeps_its_own_exit_code(net, tmp_path):
    started, run_id = _started(
        net,
        tmp_path,
        "trap 'echo stopping >&2; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
    )
    started.popen.send_signal(signal.SIGTERM)
    code, stderr, _ = _ended(net, started, run_id, timeout=15)
    assert code == 3, stderr
    assert "stopping" in stderr and "killing the task" not in stderr


@pytest.mark.parametrize("value", ["-1", "nan", "soon", "1e9"])
def test_a_bad_stop_grace_is_one_clear_error(net, value):
    proc = net.run_in_host([sandbox.SANDGATE, "run", "--stop-grace", value, "--", "true"])
    assert proc.returncode == 2, proc.stderr
    assert "--stop-grace" in proc.stderr and "Traceback" not in proc.stderr


def test_a_flood_of_output_passes_through_without_sandgate_holding_it(net, tmp_path):
    """1 GB on stdout: the task writes to sandgate's own descriptors, nothing is buffered."""
    started = sandbox.start(net, tmp_path, "head -c 1000000000 /dev/zero; echo done >&2")
    run_id = started.run_id()
    stdout = started.popen.stdout.buffer
    got = len(stdout.read1(1 << 20))
    baseline = _rss_kib(started.pid)
    peak = baseline
    while chunk := stdout.read1(1 << 20):
        got += len(chunk)
        if got % (64 << 20) < len(chunk):
            peak = max(peak, _rss_kib(started.pid))
    code, stderr, _ = _ended(net, started, run_id, timeout=60)
    assert code == 0 and "done" in stderr, stderr
    assert got == 1_000_000_000
    assert peak - baseline < 16 << 10, (baseline, peak)  # KiB: no copy of the output


def test_the_tasks_tmpfs_is_charged_to_its_memory_and_its_cgroup_is_out_of_reach(net, tmp_path):
    cgroup_files = [
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/cgroup.procs",
        "/sys/fs/cgroup/pids/pids.max",
        "/sys/fs/cgroup/unified/cgroup.procs",
        "/sys/fs/cgroup/unified/cgroup.subtree_control",
    ]
    rewrite = "; ".join(f"(echo -1 > {f}) 2>/dev/null && echo wrote {f}" for f in cgroup_files)
    r = sandbox.run(
        net,
        tmp_path,
        {
            "cgroup": f"{rewrite}; mkdir /sys/fs/cgroup/unified/escape 2>/dev/null && echo made; echo tried",
            # `&&`: the OOM killer may take `head` and leave the shell a moment to run
            # on (CI saw it); what must not happen is 300 MB written. Two mounts, each
            # bounded by the limit (spec.tmpfs_bounds), so ENOSPC cannot come first.
            "tmpfs": "head -c 150M /dev/zero > /dev/shm/fill && head -c 150M /dev/zero > /tmp/fill && echo survived",
        },
        extra=("--memory", "128M"),
    )
    assert r["cgroup"].out.strip() == "tried", r.describe()  # no write, no new cgroup
    # The 300 MB in /tmp are the task's memory: the limit (still 128M) killed it.
    assert r.returncode == 137, r.describe()
    assert "tmpfs" not in r.steps or "survived" not in r["tmpfs"].out, r.describe()
    assert [e["rule_id"] for e in r.events(reason="task_limit")] == ["builtin:limit-memory"]


def test_the_gateway_answers_while_the_task_fork_bombs_its_pids_limit(net, tmp_path):
    bomb = python("""
        import os, time
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                children += 1
        except OSError as e:
            open("refused", "w").write(f"{e.errno} {children}")
    """)
    # Started before the bomb (no fork left after it): waits for it, then asks.
    client = python("""
        import os, time, urllib.request
        while not os.path.exists("refused"):
            time.sleep(0.01)
        with urllib.request.urlopen("https://allowed.test/during-bomb", timeout=5) as response:
            print(response.status, open("refused").read())
    """)
    r = sandbox.run(net, tmp_path, {"bomb": f"{client} & {bomb}; wait"}, extra=("--pids", "32"))
    status, errno_, children = r["bomb"].out.split()
    assert (status, errno_) == ("200", "11") and int(children) < 32, r.describe()
    assert r.events(reason="task_limit", rule_id="builtin:limit-pids"), r.describe()


@pytest.mark.parametrize("second_signal", [False, True], ids=["grace-ends", "second-signal"])
def test_an_attached_task_that_ignores_sigterm_is_killed_too(net, tmp_path, second_signal):
    """The same for `run --gateway` (a warm runner of the service runs the task, the
    signals come from the caller): the grace, or a second signal, ends it; the service
    lets the sandbox go."""
    from support.service import GatewayProcess, attach_argv

    rules = tmp_path / "rules.yaml"
    rules.write_text(sandbox.DEMO_RULES.read_text())
    service = GatewayProcess(net, tmp_path, rules).start()
    workdir = sandbox._workdir(tmp_path)
    try:
        task = subprocess.Popen(
            attach_argv(service, workdir, ["sh", "-c", STUBBORN], extra=("--stop-grace", "1")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert task.stdout.readline().strip() == "ready"
        began = time.monotonic()
        task.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(0.2)
            task.send_signal(signal.SIGTERM)
        try:
            _, stderr = task.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            task.kill()
            raise AssertionError("sandgate run --gateway still ran 15 s after SIGTERM") from None
        took = time.monotonic() - began
        assert task.returncode == 137, stderr
        if second_signal:
            assert "killing the task: a second signal (SIGTERM)" in stderr and took < 1, took
        else:
            assert "killing the task: it did not end within 1 s of SIGTERM" in stderr
            assert 1 <= took < 8, took
        assert "Traceback" not in stderr
        sandbox.eventually(lambda: not service.status()["sandboxes"], timeout=10)
    finally:
        service.stop()
