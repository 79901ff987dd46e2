"""The edges of handing `sandgate run --gateway` to a warm runner (enforcer/handoff.py,
enforcer/zygote.py), each checked on the warm path and on the paths without one (the
run in its own process, the embedded gateway), which must agree:

- the task gets its caller's umask and resource limits, not the runner's;
- ^Z at the terminal stops the task, and `fg` resumes it;
- a stopped runner costs a run a short wait, not five seconds, and never runs it late.
- a caller gone before its runner reads it is refused as gone (its pid may be reused).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sandgate.enforcer import handoff
from support import sandbox
from support.job import Job
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
    assert _show_as_caller(service, tmp_path) == bool(service.warm)  # or run by the caller


def _show_as_caller(service, tmp_path: Path) -> bool:
    """Run SHOW attached, from a shell that set CALLER's umask and limits; assert the
    task saw them; whether a warm runner ran it (not the caller's own process)."""
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
    return _runner_pid(service, summary["task_id"]) != int((workdir / "caller").read_text())


def test_the_task_cannot_get_more_than_its_caller_had(service, tmp_path):
    """A hard limit the caller lowered stays down in the task: it cannot raise it back."""
    workdir = _workdir(tmp_path)
    argv = attach_argv(
        service, workdir, ["sh", "-c", "ulimit -Hn; ulimit -n 2000 || echo refused"], extra=("-q",)
    )
    proc = subprocess.run(
        _shell("ulimit -n 1000", argv), capture_output=True, text=True, timeout=60
    )
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
        may_raise = int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16)
        assert _show_as_caller(service, tmp_path) == bool(may_raise & (1 << 24))  # CAP_SYS_RESOURCE
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


@contextlib.contextmanager
def _stopped_runners(fakenet, tmp_path: Path):
    """(a service, its two waiting runners, SIGSTOPped); they are continued at the end."""
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
        yield service, runners
    finally:
        for pid in runners:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        service.stop()


def test_stopped_runners_cost_a_run_a_short_wait_and_never_run_it_late(fakenet, tmp_path):
    """Every waiting runner SIGSTOPped: the run tries each for CLAIM_TIMEOUT_S, takes
    its token back, and goes on in its own process. Continued, the runners find the
    request of a caller that gave up on them, run nothing, and wait on."""
    with _stopped_runners(fakenet, tmp_path) as (service, runners):
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
        # 2 x CLAIM_TIMEOUT_S and the run (~0.5 s quiet, 1.8 s beside a CI run), not a
        # runner's wait of 5 s each.
        assert took < 4.0, took
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


def test_a_caller_gone_before_its_runner_reads_it_is_refused_and_the_runner_waits_on(
    fakenet, tmp_path
):
    """A runner reads its caller's /proc by the caller's pidfd (zygote.of_peer), never by
    a pid that may be another process's by then: a caller that connected and died
    before the runner came to it (the runners stopped meanwhile) is refused as gone,
    and the runner takes the next run."""
    with _stopped_runners(fakenet, tmp_path) as (service, runners):
        dead = []
        for path in handoff.runner_sockets(str(service.control)):
            connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
            caller = subprocess.run([sys.executable, "-c", connect, path], timeout=30)
            assert caller.returncode == 0  # connected, and gone (reaped) before any read
            dead.append(caller)
        assert len(dead) == 2
        for pid in runners:
            os.kill(pid, signal.SIGCONT)
        assert eventually(lambda: service.log.read_text().count("went away") == 2, timeout=10)
        assert "refused a caller: pid " in service.log.read_text()
        assert sorted(_waiting_runners(service)) == sorted(runners)  # they wait on
        workdir = _workdir(tmp_path)
        argv = attach_argv(service, workdir, ["sh", "-c", "echo ran >> runs"], extra=("-q",))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert (workdir / "steps" / "runs").read_text() == "ran\n"
        summary = json.loads((workdir / "summary.json").read_text())
        assert _runner_pid(service, summary["task_id"]) in runners  # a runner took this one


def _state(pid: int) -> str:
    """The process's state letter in /proc (R, S, T for stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


BEATING = "while [ ! -e done ]; do echo >> beat; sleep 0.05; done; exit 7"


def _beats(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


def _working_in(workspace: Path) -> list[int]:
    """The processes whose working directory is `workspace`: the task's (it starts
    there, and the path is the same inside)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/cwd") == str(workspace):
                found.append(int(entry))
    return found


def _states(pids: list[int]) -> list[str]:
    """The state letters of those of `pids` that still exist."""
    states = []
    for pid in pids:
        with contextlib.suppress(OSError):
            states.append(_state(pid))
    return states


def _all_stopped(pids: list[int]) -> bool:
    states = _states(pids)
    return bool(states) and set(states) == {"T"}


@pytest.mark.parametrize(
    ("service", "embedded"),
    [("warm", False), ("in-process", False), ("in-process", True)],
    ids=["warm", "in-process", "embedded"],
    indirect=["service"],  # the embedded run uses only the rules: no runner to vary
)
def test_ctrl_z_stops_the_task_and_fg_resumes_it(service, fakenet, tmp_path, embedded):
    """^Z at the terminal stops the task; SIGCONT (what `fg` sends) resumes it; the
    task's exit code comes back at the end. Handed to a warm runner, the `sandgate`
    command stops with it (its runner, not in the caller's job, enforces on). Run in
    the caller's process (attached, or embedded), `sandgate` itself is in the job and
    does not stop: a stopped runner enforces nothing, while a task process in a
    process group of its own runs on (terminal_relay.TTY_STOPS;
    test_terminal_answers.py)."""
    workdir = _workdir(tmp_path)
    if embedded:
        argv = sandbox._argv(fakenet, workdir, ["sh", "-c", BEATING], service.rules, ("-q",))
        argv = ["ip", "netns", "exec", fakenet.host_ns, *argv]
    else:
        argv = attach_argv(service, workdir, ["sh", "-c", BEATING], extra=("-q",))
    handed_over = service.warm > 0
    workspace = workdir / "steps"
    beat, job = workspace / "beat", Job(argv)
    try:
        assert eventually(lambda: _beats(beat) > 3, timeout=30)
        job.press(b"\x1a")  # ^Z
        if handed_over:
            assert job.next_report() == f"stopped {signal.SIGTSTP}"
        assert eventually(lambda: _all_stopped(_working_in(workspace)), timeout=5)
        stopped_at = _beats(beat)
        time.sleep(0.5)
        assert _beats(beat) == stopped_at  # nothing of the task runs
        if not handed_over:
            assert job.next_report(timeout=0.1).startswith("(nothing")  # sandgate runs on
        os.killpg(job.pid, signal.SIGCONT)  # `fg`
        if handed_over:
            assert job.next_report() == "continued"
        assert eventually(lambda: _beats(beat) > stopped_at + 3, timeout=10)
        assert "T" not in _states(_working_in(workspace))
        (workspace / "done").touch()
        assert job.next_report() == "exited 7"
    finally:
        job.close()
