"""sandgate's stderr that nobody can read any more: a pipe whose reader is gone
(`sandgate run ... 2>&1 | head`, a caller's log reader that died: EPIPE), a full disk
(ENOSPC), a terminal that hung up (EIO). What sandgate says there (warnings, the
summary, the service's lines) is dropped (cli.DroppingStream); what comes after it
still happens: the task's exit code, its summary file, its cgroup and id slot freed,
its events in the audit log, the service serving on.

Before, the first failed write raised out of the run's teardown: an embedded run
exited 141 or 1 with no summary file; a warm runner whose caller was killed with its
stderr's reader kept its id slot and its task cgroup until `sandgate gc` (the slot
every CI run left); a service with stderr on a full disk did not start.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
TASK = f"{sandbox.curl('http://allowed.test/')} >/dev/null; exit 3"


def _closed_pipe() -> int:
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def _full_disk() -> int:
    return os.open("/dev/full", os.O_WRONLY)


def _hung_up_terminal() -> int:
    controller, terminal = os.openpty()
    os.close(controller)
    return terminal


GONE = {"closed_pipe": _closed_pipe, "full_disk": _full_disk, "hung_up_terminal": _hung_up_terminal}


@pytest.fixture(params=sorted(GONE))
def gone_stderr(request):
    """A descriptor a write to fails (each kind of GONE), closed after the test."""
    fd = GONE[request.param]()
    with pytest.raises(OSError):
        os.write(fd, b"the premise: nobody takes this\n")
    yield fd
    os.close(fd)


def _rules(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return rules


class _UnreadLog:
    """A GatewayProcess's log that is `gone_stderr` (there is nothing to read)."""

    def __init__(self, fd: int):
        self.fd = fd

    def open(self, mode: str):
        return os.fdopen(os.dup(self.fd), mode)

    def read_text(self) -> str:
        return "(its stderr was gone)"


def _service(fakenet, tmp_path, log=None) -> GatewayProcess:
    """A started service (its stderr `log` if given), its warm runners ready."""
    gateway = GatewayProcess(fakenet, tmp_path, _rules(tmp_path))
    if log is not None:
        gateway.log = log
    gateway.start()
    try:
        assert eventually(lambda: gateway.status()["warm_runners"] == 2, timeout=20)
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture
def service(fakenet, tmp_path):
    gateway = _service(fakenet, tmp_path)
    yield gateway
    gateway.stop()


def _task_ended(events: list[dict], code: int) -> bool:
    return any(
        e["kind"] == "task" and f"exit code {code}" in (e.get("detail") or "") for e in events
    )


def test_an_embedded_run_ends_whole(net, tmp_path, gone_stderr):
    started = sandbox.start(net, tmp_path, TASK, rules=_rules(tmp_path), stderr=gone_stderr)
    result = started.finish()
    assert result.returncode == 3, result.describe()  # the task's, not 141 or 1
    assert result.summary["exit_code"] == 3
    assert ("allow", "rule_allow") in {(e["verdict"], e["reason"]) for e in result.audit}
    assert _task_ended(result.audit, 3), result.describe()
    assert not sandbox.leftovers(net, result.run_id)
    assert not sandbox.id_slots_held(started.pid)


def test_an_attached_run_ends_whole(service, tmp_path, gone_stderr):
    """The caller's stderr gone: the warm runner that took its run has it."""
    workdir = tmp_path / "attached"
    (workdir / "steps").mkdir(parents=True)
    argv = attach_argv(service, workdir, ["sh", "-c", TASK])
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=gone_stderr, timeout=90
    )
    assert proc.returncode == 3
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["exit_code"] == 3
    service.wait_task_ended(summary["task_id"])
    assert _task_ended(service.events(task_id=summary["task_id"]), 3)
    assert eventually(lambda: not sandbox.leftovers(service.fakenet, summary["task_id"]))
    service.verify_audit()
    assert service.stop() == 0


def test_a_killed_callers_runner_frees_its_slot_and_cgroup(service, tmp_path, gone_stderr):
    """The caller SIGKILLed while its task runs, its stderr gone: the runner kills the
    task, reports to the service, and removes the task's cgroup (made ahead, named for
    the runner) and frees its id slot, as when somebody reads its stderr."""
    workdir = tmp_path / "killed"
    (workdir / "steps").mkdir(parents=True)
    argv = attach_argv(service, workdir, ["sleep", "60"])
    caller = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=gone_stderr
    )
    try:
        assert eventually(
            lambda: json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"], timeout=20
        )
        (box,) = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
        runner = box["runner_pid"]
        assert runner != caller.pid  # a warm runner took it
        (record,) = sandbox.id_slots_held(runner).values()
        cgroups = {path.rpartition("/")[2] for _, path in record["cgroups"]}
        assert cgroups and all(sandbox.CGROUP_ROOT.glob(f"*/**/{c}") for c in cgroups)
    finally:
        caller.kill()
        caller.wait()
    assert eventually(lambda: not os.path.exists(f"/proc/{runner}"), timeout=20)
    assert not sandbox.id_slots_held(runner)
    assert not [p for c in cgroups for p in sandbox.CGROUP_ROOT.glob(f"*/**/{c}")]
    assert not sandbox.leftovers(service.fakenet, box["task_id"])
    service.wait_task_ended(box["task_id"])
    assert _task_ended(service.events(task_id=box["task_id"]), 137)


def test_the_service_serves_on_and_stops_cleanly(fakenet, tmp_path, gone_stderr):
    """The service's own stderr gone from its start: its lines at the start, on a
    reload and at the stop go nowhere; none stops it, and its runs are served."""
    gateway = _service(fakenet, tmp_path, _UnreadLog(gone_stderr))
    try:
        assert gateway.ask("reload").returncode == 0
        workdir = tmp_path / "served"
        (workdir / "steps").mkdir(parents=True)
        proc = subprocess.run(
            attach_argv(gateway, workdir, ["sh", "-c", TASK]),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert proc.returncode == 3, proc.stderr
        task = json.loads((workdir / "summary.json").read_text())["task_id"]
        gateway.wait_task_ended(task)
        events = gateway.events(task_id=task)
        assert ("allow", "rule_allow") in {(e["verdict"], e["reason"]) for e in events}
        assert gateway.popen.poll() is None
    finally:
        assert gateway.stop() == 0
    gateway.verify_audit()


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"])
def test_an_embedded_run_with_standard_streams_closed_runs_its_task(net, tmp_path, closed):
    """The caller closed sandgate's stdin, stdout or stderr (`>&-`, a daemon's child):
    the task runs and its exit code comes back. Before, a closed stdout failed the run
    before its task started (exit 1, tracebacks), and a closed stderr turned the task's
    3 into 120 (Python's flush at exit)."""
    workdir = tmp_path / "run"
    (workdir / "steps").mkdir(parents=True)
    task = ["sh", "-c", "echo ran > ran; echo out; echo err >&2; exit 3"]
    argv = sandbox._argv(net, workdir, task, _rules(tmp_path), ())
    proc = net.popen_in_host(
        ["sh", "-c", f'exec "$@" {closed}', "sh", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, (out, err)
    assert (workdir / "steps" / "ran").read_text() == "ran\n"
    assert json.loads((workdir / "summary.json").read_text())["exit_code"] == 3
    assert "Traceback" not in err, err
