"""The edges of handing `sandgate run --gateway` to a warm runner (enforcer/handoff.py,
enforcer/zygote.py), each checked on the warm path and on the paths without one (the
run in its own process, the embedded gateway), which must agree:

- the task gets its caller's umask and resource limits, not the runner's;
- ^Z at the terminal stops the task, and `fg` resumes it;
- a stopped runner costs a run a short wait, not five seconds, and never runs it late.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
# What the task reports of its umask and limits, and the mode of a file it makes.
SHOW = "umask; ulimit -Sn; ulimit -Hn; ulimit -Ss; : > made; stat -c %a made"


@pytest.fixture(params=["warm", "in-process"])
def service(request, fakenet, tmp_path):
    """A service with two warm runners, or with none (the run goes on in its own process)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    warm = 2 if request.param == "warm" else 0
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", str(warm)).start()
    gateway.warm = warm
    try:
        assert eventually(lambda: gateway.status()["warm_runners"] == warm, timeout=20)
        yield gateway
    finally:
        gateway.stop()


def _workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / f"edge{time.monotonic_ns()}"
    (workdir / "steps").mkdir(parents=True)
    return workdir


def _shell(prefix: str, argv: list[str]) -> list[str]:
    """`argv` run by a shell after `prefix` (umask, ulimit: what the caller sets)."""
    return ["bash", "-c", f"{prefix}; exec {shlex.join(argv)}"]


def _runner_pid(service, run_id: str) -> int:
    """The pid that ran the task, from the service's record of its start."""
    service.wait_task_ended(run_id)
    for event in service.events(task_id=run_id, kind="task"):
        detail = event.get("detail") or ""
        if "runner pid " in detail:
            return int(detail.rpartition("runner pid ")[2].rstrip(")"))
    raise AssertionError(service.events(task_id=run_id, kind="task"))


CALLER = "umask 077; ulimit -Sn 100; ulimit -s 4096"
# The caller's hard descriptor limit is this process's: above its soft one of 100.
EXPECTED = ["0077", "100", str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]), "4096", "600"]


def test_the_task_gets_the_callers_umask_and_limits(service, tmp_path):
    """The runner's are 022 and as many descriptors as its hard limit allows (the
    service raised its soft limit to it), an 8 MB stack."""
    workdir = _workdir(tmp_path)
    argv = attach_argv(service, workdir, ["sh", "-c", SHOW], extra=("-q",))
    proc = subprocess.run(
        _shell(f"{CALLER}; echo $$ > {workdir}/caller", argv),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == EXPECTED
    summary = json.loads((workdir / "summary.json").read_text())
    runner = _runner_pid(service, summary["task_id"])
    caller = int((workdir / "caller").read_text())
    assert (runner != caller) == bool(service.warm)  # handed over, or run by the caller itself


def test_the_task_cannot_get_more_than_its_caller_had(service, tmp_path):
    """A hard limit the caller lowered stays down in the task: it cannot raise it back."""
    workdir = _workdir(tmp_path)
    argv = attach_argv(
        service, workdir, ["sh", "-c", "ulimit -Hn; ulimit -n 2000 || echo refused"], extra=("-q",)
    )
    proc = subprocess.run(_shell("ulimit -n 1000", argv), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1000", "refused"]


def test_a_caller_with_a_higher_hard_limit_than_the_runners_gets_it(fakenet, tmp_path):
    """The runners may descend from a process with lower limits than the caller's: the
    task still gets the caller's. A runner with CAP_SYS_RESOURCE raises the limit
    for the task; one without refuses the run, which goes on in the caller's process."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    low = ("prlimit", "--nofile=1000:1000", "--")
    service = GatewayProcess(fakenet, tmp_path, rules, wrap=low).start()
    try:
        assert eventually(lambda: service.status()["warm_runners"] == 2, timeout=20)
        workdir = _workdir(tmp_path)
        argv = attach_argv(service, workdir, ["sh", "-c", SHOW], extra=("-q",))
        proc = subprocess.run(
            _shell(f"{CALLER}; echo $$ > {workdir}/caller", argv),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == EXPECTED
        summary = json.loads((workdir / "summary.json").read_text())
        runner = _runner_pid(service, summary["task_id"])
        may_raise = int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16)
        handed_over = runner != int((workdir / "caller").read_text())
        assert handed_over == bool(may_raise & (1 << 24))  # CAP_SYS_RESOURCE
    finally:
        service.stop()


def test_the_embedded_run_gives_the_task_the_callers_limits_not_the_gateways(fakenet, tmp_path):
    """The embedded gateway raises its soft descriptor limit to the hard one for its
    connections; the task still gets the caller's."""
    workdir = _workdir(tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    argv = sandbox._argv(fakenet, workdir, ["sh", "-c", SHOW], rules, ("-q",))
    proc = fakenet.run_in_host(_shell(CALLER, argv), timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == EXPECTED


def _waiting_runners(service) -> list[int]:
    """The pids of the warm runners waiting for a run (children of the service's zygote)."""

    def children(pid: int) -> list[int]:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]

    [zygote] = [
        p
        for p in children(service.popen.pid)
        if b"sandgate.enforcer.zygote" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    return children(zygote)


def test_stopped_runners_cost_a_run_a_short_wait_and_never_run_it_late(fakenet, tmp_path):
    """Every waiting runner SIGSTOPped: the run tries each for CLAIM_TIMEOUT_S, takes
    its token back, and goes on in its own process. Continued, the runners find the
    request of a caller that gave up on them, run nothing, and wait on."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    runners = []
    try:
        assert eventually(lambda: service.status()["warm_runners"] == 2, timeout=20)
        runners = _waiting_runners(service)
        assert len(runners) == 2
        for pid in runners:
            os.kill(pid, signal.SIGSTOP)
        workdir = _workdir(tmp_path)
        argv = attach_argv(service, workdir, ["sh", "-c", "echo ran >> runs"], extra=("-q",))
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        runs = workdir / "steps" / "runs"
        assert runs.read_text() == "ran\n"
        summary = json.loads((workdir / "summary.json").read_text())
        assert _runner_pid(service, summary["task_id"]) not in runners  # in its own process
        assert took < 1.2, took  # 2 x CLAIM_TIMEOUT_S and the run (~0.5 s here), not 2 x 5 s
        for pid in runners:
            os.kill(pid, signal.SIGCONT)
        assert eventually(lambda: all(_state(pid) == "S" for pid in runners), timeout=10)
        time.sleep(0.5)
        assert runs.read_text() == "ran\n"  # once: the runners that came late ran nothing
        assert sorted(_waiting_runners(service)) == sorted(runners)  # and wait on
        assert service.status()["warm_runners"] == 2
        again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert runs.read_text() == "ran\nran\n"
        summary = json.loads((workdir / "summary.json").read_text())
        assert _runner_pid(service, summary["task_id"]) in runners  # a runner took this one
    finally:
        for pid in runners:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        service.stop()


def _state(pid: int) -> str:
    """The process's state letter in /proc (R, S, T for stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
