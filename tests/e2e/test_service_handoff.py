"""`sandgate run --gateway` handed to a warm runner of the service (enforcer/handoff.py,
enforcer/zygote.py), in the fake internet.

Each test starts its own service; the runs are handed over (the service's record of
the run names a runner pid that is not the `sandgate` process the test started).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sandgate.enforcer import handoff
from sandgate.enforcer.sandbox import cgroup
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"


@pytest.fixture
def service(fakenet, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gateway = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        assert eventually(lambda: gateway.status()["warm_runners"] == 2, timeout=20)
        yield gateway
    finally:
        gateway.stop()


def _runner_sockets(service) -> list[str]:
    folder = service.control.parent
    return sorted(str(folder / n) for n in os.listdir(folder) if handoff.SUFFIX in n)


def _start(service, tmp_path, script: str, **popen) -> tuple[subprocess.Popen, Path]:
    """`sandgate run --gateway -- sh -c SCRIPT`, started (stdin and stdout /dev/null,
    stderr a pipe, unless `popen` says otherwise); and the workspace."""
    workdir = tmp_path / f"handoff{time.monotonic_ns()}"
    (workdir / "steps").mkdir(parents=True)
    argv = attach_argv(service, workdir, ["sh", "-c", script])
    streams = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    return subprocess.Popen(argv, **{**streams, **popen}), workdir / "steps"


def _the_sandbox(service) -> dict:
    assert eventually(lambda: json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"])
    (box,) = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
    return box


def test_a_handed_over_task_has_only_stdio_and_gets_the_callers_signals(service, tmp_path):
    read_end, write_end = os.pipe()
    proc, _ = _start(
        service,
        tmp_path,
        "ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; trap 'echo TERM; exit 7' TERM; "
        "sleep 30 & wait",
        stdout=write_end,
    )
    os.close(write_end)
    try:
        box = _the_sandbox(service)
        assert box["runner_pid"] != proc.pid  # a warm runner runs it, not the process we started
        with os.fdopen(read_end, "r") as out:
            fds = out.readline().split()
            proc.send_signal(signal.SIGTERM)  # forwarded to the task, whose trap answers
            assert proc.wait(30) == 7, proc.stderr.read()
            assert out.read() == "TERM\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fds == ["0", "1", "2", "3"]  # stdio, and `ls`'s own descriptor on /proc/self/fd


def test_the_task_writes_to_the_callers_own_pipe(service, tmp_path):
    proc, _ = _start(service, tmp_path, "readlink /proc/self/fd/1", stdout=subprocess.PIPE)
    inode = os.fstat(proc.stdout.fileno()).st_ino
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == f"pipe:[{inode}]"


def test_the_callers_death_kills_the_task_and_empties_its_cgroup(service, fakenet, tmp_path):
    proc, steps = _start(service, tmp_path, "while :; do date +%s%N >> beat; sleep 0.05; done")
    beat = steps / "beat"
    try:
        run_id = _the_sandbox(service)["task_id"]
        assert eventually(lambda: beat.exists() and len(beat.read_text().split()) > 3, timeout=20)
        assert sandbox.processes_of(run_id)  # the task runs
    finally:
        proc.kill()
        proc.wait()
    assert eventually(lambda: not sandbox.processes_of(run_id), timeout=15), sandbox.processes_of(
        run_id
    )
    assert eventually(lambda: not sandbox.leftovers(fakenet, run_id), timeout=15)
    assert not [p for p in cgroup.leftovers() if p.endswith(f"{cgroup.PREFIX}{run_id}")]
    beats = len(beat.read_text().split())
    time.sleep(0.5)
    assert len(beat.read_text().split()) == beats  # nothing of the task runs any more
    ended = service.events(task_id=run_id, kind="task")
    assert any((e.get("detail") or "").startswith("task ended") for e in ended), ended


def test_a_non_root_caller_is_refused_and_the_runner_waits_on(service, tmp_path):
    sockets = _runner_sockets(service)
    assert len(sockets) == 2
    target = sockets[0]
    assert os.stat(target).st_mode & 0o777 == 0o600  # root only, first of all
    os.chmod(target, 0o666)  # as if it were not: SO_PEERCRED still refuses
    # /tmp/pytest-of-root is 0700: the same socket at a path uid 65534 can walk to
    reachable = Path(tempfile.gettempdir()) / f"sgtest-handoff-{os.getpid()}.sock"
    os.link(target, reachable)
    marker = tmp_path / "ran"
    request = {"argv": ["run", "--gateway", str(service.control), "--", "touch", str(marker)]}
    request.update(env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp_path))
    reply_r, reply_w = os.pipe()
    child = os.fork()
    if child == 0:  # the caller: uid 65534
        try:
            os.close(reply_r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(10)
            conn.connect(str(reachable))
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
            os.write(reply_w, b"reply:" + conn.recv(4096))
        except (ConnectionResetError, BrokenPipeError):  # closed before or with the request unread
            os.write(reply_w, b"reply:")
        except OSError as e:
            os.write(reply_w, f"error: {e}".encode())
        finally:
            os._exit(0)
    os.close(reply_w)
    os.waitpid(child, 0)
    reachable.unlink()
    with os.fdopen(reply_r, "rb") as r:
        assert r.read() == b"reply:"  # closed without a word: not taken
    assert not marker.exists()
    assert json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"] == []
    assert os.path.exists(target)  # that runner still waits
    assert service.status()["warm_runners"] == 2
    assert eventually(lambda: "refused a caller: uid 65534" in service.log.read_text(), timeout=10)


def test_without_warm_runners_the_run_goes_on_in_process(fakenet, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", "0").start()
    try:
        proc, _ = _start(gateway, tmp_path, "echo ran", stdout=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.decode().strip() == "ran"
        assert not _runner_sockets(gateway)
        mark = f"runner pid {proc.pid})"  # the run's own process was its runner
        assert eventually(
            lambda: any(mark in (e.get("detail") or "") for e in gateway.events(kind="task")),
            timeout=10,
        ), gateway.events(kind="task")
    finally:
        gateway.stop()


def test_the_task_cgroup_is_made_under_the_callers_cgroup(service, tmp_path):
    """As if the caller had run it: the host's accounting of whoever started `sandgate`
    (a systemd scope, a CI job) still covers the task, not the service's."""
    mount = Path("/sys/fs/cgroup/pids")
    if not (mount / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy at /sys/fs/cgroup/pids")
    caller_cgroup = mount / f"sgtest-caller-{os.getpid()}"
    caller_cgroup.mkdir()
    try:
        proc, _ = _start(
            service,
            tmp_path,
            "sleep 30",
            # the caller joins its own cgroup before it execs sandgate
            preexec_fn=lambda: (caller_cgroup / "cgroup.procs").write_text("0"),
        )
        try:
            run_id = _the_sandbox(service)["task_id"]
            task_cgroup = caller_cgroup / f"{cgroup.PREFIX}{run_id}"
            assert eventually(task_cgroup.exists, timeout=10), sorted(caller_cgroup.iterdir())
            assert not (mount / f"{cgroup.PREFIX}{run_id}").exists()
        finally:
            proc.kill()
            proc.wait()
        assert eventually(lambda: not task_cgroup.exists(), timeout=15)
    finally:
        assert eventually(lambda: not (caller_cgroup / "cgroup.procs").read_text(), timeout=10)
        caller_cgroup.rmdir()
