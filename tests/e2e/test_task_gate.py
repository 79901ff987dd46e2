"""The task of an embedded run starts only once its whole gateway is up.

`sandgate run` forks the sandbox init before its table is loaded, its approvals are
served and its audit log is on disk (enforcer/run.py `_start_init`), so that the
task's file view, namespaces, Landlock and seccomp are made meanwhile on the other
core; the task's process then waits for the runner's word (init.wait_go). With
rules that ask, the run's last `listen` (its approvals control socket) comes after
the init's start: strace holds or fails it deterministically. Held for 1.5 s, the
task still reaches an allowed site through the gateway (it ran after the rest).
Refused after 1 s, the task never runs (its step left no trace, though a task that
did not wait had a second to run), the run says why without a traceback, and
nothing of it is left behind. Both fail without the gate.
"""

from __future__ import annotations

import shutil

import pytest
from support import sandbox
from support.sandbox import curl, leftovers

pytestmark = pytest.mark.e2e

RULES = """version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
      - ask: www.allowed.test
"""
# The DNS filter's TCP listener, the front door's, then the control socket's.
CONTROL_LISTEN = 3


def _traced_run(net, tmp_path, inject: str, steps: dict[str, str]) -> sandbox.RunResult:
    """`sandgate run` of `steps` with strace injecting `inject` into its approvals
    control socket's `listen` (its main thread alone: the sandbox is not traced)."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/install.sh --test installs it)")
    rules = tmp_path / "ask.yaml"
    rules.write_text(RULES)
    workdir = sandbox._workdir(tmp_path)
    steps_dir = workdir / "steps"
    command = ["sh", "-c", sandbox._script(steps, steps_dir)]
    argv = sandbox._argv(net, workdir, command, rules, ("--admin-listen", "off"))
    strace = ["strace", "-qq", "-o", "/dev/null", "-e", "trace=listen",
              "-e", f"inject=listen:{inject}:when={CONTROL_LISTEN}"]  # fmt: skip
    proc = net.run_in_host([*strace, *argv], timeout=90)
    return sandbox._result(proc.returncode, proc.stdout, proc.stderr, workdir, steps_dir)


def test_a_task_waits_for_its_gateway_to_be_up(net, tmp_path):
    r = _traced_run(net, tmp_path, "delay_enter=1500000", {"fetch": curl("http://allowed.test/")})
    assert r.returncode == 0, r.describe()
    assert r["fetch"].status == 200, r.describe()
    assert [q["host"] for q in net.requests_seen()] == ["allowed.test"]
    assert not (left := leftovers(net, r.run_id)), left


def test_a_task_whose_gateway_fails_to_come_up_never_runs(net, tmp_path):
    r = _traced_run(net, tmp_path, "error=EPERM:delay_enter=1000000", {"ran": "echo ran"})
    assert r.returncode == 125, r.describe()
    assert "sandgate: cannot serve this run's approvals on " in r.stderr, r.stderr
    assert "Operation not permitted" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # The task's process was set up and waiting: it never ran a command.
    assert not (r.steps_dir / "ran.rc").exists() and not r.steps, r.describe()
    assert [e["detail"] for e in r.events(kind="task")] == ["task ended: was not started"]
    assert not (left := leftovers(net, r.audit[-1]["task_id"])), left
    assert net.requests_seen() == []
