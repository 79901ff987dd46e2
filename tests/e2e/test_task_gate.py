"""The task of an embedded run starts only once its gateway listens and its table is loaded.

`sandgate run` forks the sandbox init before its gateway listens and before the
sandbox's nftables table is loaded (enforcer/run.py `_start_init`), so that the
task's file view, namespaces, Landlock and seccomp are made meanwhile on the other
core; the task's process then waits for the runner's word (init.wait_go). strace
holds or fails the gateway's first `listen` (its DNS filter's TCP listener)
deterministically: held for 1.5 s, the task still reaches an allowed site through
the gateway (it ran after both); refused after 1 s, the task never runs (its step
left no trace, though a task that did not wait had a second to run), the run says
why without a traceback, and nothing of it is left behind.
"""

from __future__ import annotations

import shutil

import pytest
from support import sandbox
from support.sandbox import curl, leftovers

pytestmark = pytest.mark.e2e


def _traced_run(net, tmp_path, inject: str, steps: dict[str, str]) -> sandbox.RunResult:
    """`sandgate run` of `steps` with strace injecting `inject` into its first `listen`
    (its main thread alone: the sandbox is not traced)."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/install.sh --test installs it)")
    workdir = sandbox._workdir(tmp_path)
    steps_dir = workdir / "steps"
    command = ["sh", "-c", sandbox._script(steps, steps_dir)]
    argv = sandbox._argv(net, workdir, command, sandbox.DEMO_RULES, ())
    strace = ["strace", "-qq", "-o", "/dev/null", "-e", "trace=listen",
              "-e", f"inject=listen:{inject}:when=1"]  # fmt: skip
    proc = net.run_in_host([*strace, *argv], timeout=90)
    return sandbox._result(proc.returncode, proc.stdout, proc.stderr, workdir, steps_dir)


def test_a_task_waits_for_a_gateway_slow_to_listen(net, tmp_path):
    r = _traced_run(net, tmp_path, "delay_enter=1500000", {"fetch": curl("http://allowed.test/")})
    assert r.returncode == 0, r.describe()
    assert r["fetch"].status == 200, r.describe()
    assert [q["host"] for q in net.requests_seen()] == ["allowed.test"]
    assert not (left := leftovers(net, r.run_id)), left


def test_a_task_whose_gateway_cannot_listen_never_runs(net, tmp_path):
    # Refused after 1 s: time for a task that did not wait to run.
    r = _traced_run(net, tmp_path, "error=EPERM:delay_enter=1000000", {"ran": "echo ran"})
    assert r.returncode == 125, r.describe()
    assert "sandgate: the gateway cannot listen on " in r.stderr
    assert "Operation not permitted" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # The task's process was set up and waiting: it never ran a command.
    assert not (r.steps_dir / "ran.rc").exists() and not r.steps, r.describe()
    assert [e["detail"] for e in r.events(kind="task")] == ["task ended: was not started"]
    run_id = r.audit[-1]["task_id"]
    assert not (left := leftovers(net, run_id)), left
    assert net.requests_seen() == []
