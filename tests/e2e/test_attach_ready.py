"""The attach in two lines (enforcer/service.py `ready_line`, enforcer/attach.py
`_ready`): the service replies as soon as a sandbox network is the run's, and says
once more when the sandbox is served (its worker has registered it, the task's files
are written). The runner prepares its sandbox in between, and starts no task before
that second line; a sandbox the service cannot serve runs nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sandgate.enforcer import control
from sandgate.enforcer import service as service_module
from support.sandbox import curl, eventually
from support.service import TWO_PROFILES, attach_argv, running

pytestmark = pytest.mark.e2e


def _spares(service) -> list[Path]:
    """The run dirs of this service's spare networks (no runner has taken them)."""
    found = []
    for state in service_module.RUN_DIR.glob(f"*/{service_module.STATE_FILE}"):
        try:
            record = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if record.get("control") == str(service.control) and record.get("runner_pid") == 0:
            found.append(state.parent)
    return found


def _networks(service) -> list[Path]:
    """The run dirs of every network this service holds (spares and sandboxes)."""
    found = []
    for state in service_module.RUN_DIR.glob(f"*/{service_module.STATE_FILE}"):
        try:
            if json.loads(state.read_text()).get("control") == str(service.control):
                found.append(state.parent)
        except (OSError, ValueError):
            continue
    return found


def test_a_malformed_attach_takes_no_network(fakenet, tmp_path):
    """A `command` that is not a list of strings failed after a spare network was
    taken, and the network (netns, veth, table, run dir) stayed, owned by nobody, past
    the service's stop. It is refused before; a failure after the take removes it."""
    with running(fakenet, tmp_path, TWO_PROFILES) as service:
        assert eventually(lambda: len(_networks(service)) == 2, timeout=20)
        before = sorted(_networks(service))
        for command in (5, "sh", [1, 2], ["sh", None], {"a": 1}):
            client = control.ControlClient.connect(service.control)
            try:
                reply = client.request("attach", profile="default", command=command)
            except control.ControlError as e:
                reply = {"ok": False, "error": str(e)}
            finally:
                client.close()
            assert reply["ok"] is False, reply
            assert "command: expected a list of strings" in reply["error"], reply
        time.sleep(1)  # a refill would have come by now
        assert sorted(_networks(service)) == before
        status = service.status()
        assert (status["spares"], status["sandboxes"]) == (2, 0), status


def _workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / f"run{time.monotonic_ns()}"
    (workdir / "steps").mkdir(parents=True)
    return workdir


def test_the_reply_comes_first_and_the_second_line_once_the_files_are_there(fakenet, tmp_path):
    with running(fakenet, tmp_path, TWO_PROFILES) as service:
        client = control.ControlClient.connect(service.control)
        try:
            client.send("attach", profile="default", runner_pid=os.getpid(), ready_line=True)
            reply = client.reply()
            assert reply["ready_line"] is True and client.fds
            assert client.reply() == {"ok": True, "ready": True}
            assert Path(reply["resolv_conf"]).read_text().count("nameserver") == 1
            assert Path(reply["ca_bundle"]).is_file()  # the fake internet's CA (--extra-ca)
            assert client.request("detach", exit_code=0)["ok"]
        finally:
            client.close()
        # Without it, as before: one reply, once all of it is done.
        old = control.ControlClient.connect(service.control)
        try:
            reply = old.request("attach", profile="default", runner_pid=os.getpid())
            assert "ready_line" not in reply and Path(reply["resolv_conf"]).is_file()
        finally:
            old.close()


def test_a_sandbox_the_service_cannot_serve_runs_no_task(fakenet, tmp_path):
    """Its task's files cannot be written (resolv.conf is a directory in every spare):
    the second line is the error, the runner says it and exits 125 before the task,
    and the service keeps nothing of the sandbox."""
    with running(fakenet, tmp_path, TWO_PROFILES) as service:
        assert eventually(lambda: len(_spares(service)) == 2, timeout=20)
        for spare in _spares(service):
            (spare / "resolv.conf").mkdir()
        workdir = _workdir(tmp_path)
        argv = attach_argv(service, workdir, ["sh", "-c", "echo ran > ran"])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 125, proc.stderr
        # the service's word, as the second line said it: not the init's failure later
        assert proc.stderr.startswith("sandgate: attach: [Errno 21] Is a directory: "), proc.stderr
        assert "resolv.conf" in proc.stderr.splitlines()[0], proc.stderr
        assert not (workdir / "steps" / "ran").exists()
        assert eventually(lambda: service.status()["sandboxes"] == 0, timeout=20)
        failed = [e for e in service.events(kind="task") if "setup failed" in str(e)]
        assert failed, service.events(kind="task")


def test_no_task_starts_before_its_worker_has_registered_it(fakenet, tmp_path):
    """Both workers stopped: the reply comes (the network is the run's), but the task
    does not start until they run again; then its first request is allowed."""
    with running(fakenet, tmp_path, TWO_PROFILES, "--workers", "2") as service:
        workers = [w["pid"] for w in service.status()["workers"]]
        assert len(workers) == 2 and all(workers), workers
        workdir = _workdir(tmp_path)
        steps = workdir / "steps"
        task = f"echo started > started; {curl('https://allowed.test/')} > web"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            popen = subprocess.Popen(
                attach_argv(service, workdir, ["sh", "-c", task]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(2)
            assert popen.poll() is None and not (steps / "started").exists()
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        out, err = popen.communicate(timeout=60)
        assert popen.returncode == 0, err
        assert (steps / "started").read_text() == "started\n"
        assert (steps / "web").read_text().rstrip().endswith("200"), (steps / "web").read_text()
