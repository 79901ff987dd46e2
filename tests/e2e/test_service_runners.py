"""Warm runners from a `sandgate runners` process apart from the gateway service
(enforcer/cli/runners.py, enforcer/zygote.py: what containers/systemd/sandgate-runners.service
runs), in the fake internet.

A run is proved handed over by its runner: the sandbox's `runner_pid` is a child of
the `sandgate runners` process, not the `sandgate run` the test started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sandgate.enforcer import handoff
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"


class RunnersProcess:
    """`sandgate runners` for a service's control socket, stopped by its pid."""

    def __init__(self, control: Path, log: Path):
        self.control, self.log = control, log
        self.popen: subprocess.Popen | None = None

    def start(self) -> RunnersProcess:
        self.popen = subprocess.Popen(
            [sandbox.SANDGATE, "runners", "--control", str(self.control), "--warm", "2"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
        )
        assert eventually(lambda: len(self.listening()) == 2, timeout=20), self.log.read_text()
        return self

    def sockets(self) -> list[str]:
        return sorted(handoff.runner_sockets(str(self.control)))

    def listening(self) -> list[str]:
        """The runner sockets someone listens on (/proc/net/unix: __SO_ACCEPTCON)."""
        with open("/proc/net/unix") as f:
            listening = {
                fields[7]
                for line in f
                if len(fields := line.split()) == 8 and fields[3] == "00010000"
            }
        return [path for path in self.sockets() if path in listening]

    def children(self) -> list[int]:
        return [pid for pid in _pids() if _parent(pid) == self.popen.pid]

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture
def started(tmp_path):
    """Start services and runners; everything started is stopped at the end."""
    stops = []

    def start(thing):
        stops.append(thing)
        return thing.start()

    yield start
    for thing in reversed(stops):
        thing.stop()


def _runners(gateway: GatewayProcess, name: str = "runners") -> RunnersProcess:
    return RunnersProcess(gateway.control, gateway.workdir / f"{name}.log")


def _handed_over_run(gateway: GatewayProcess, runners: RunnersProcess, tmp_path) -> None:
    """A `sandgate run --gateway` that a runner of `runners` runs: its stdin is ours,
    its output comes back, and while it waits its runner is the pool's child."""
    workdir = tmp_path / f"run{time.monotonic_ns()}"
    (workdir / "steps").mkdir(parents=True)
    argv = attach_argv(gateway, workdir, ["sh", "-c", "read line; echo got $line"])
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert eventually(lambda: _sandboxes(gateway), timeout=30), proc.stderr
        (box,) = _sandboxes(gateway)
        assert box["runner_pid"] != proc.pid
        assert _parent(box["runner_pid"]) == runners.popen.pid  # the separate pool's runner
        out, err = proc.communicate(b"hello\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "got hello"
    assert eventually(lambda: len(runners.listening()) == 2, timeout=20)  # refilled


def _sandboxes(gateway: GatewayProcess) -> list[dict]:
    return json.loads(gateway.ask("sandboxes", "--json").stdout)["sandboxes"]


def test_runners_started_apart_serve_runs_and_the_services_own_pool_steps_aside(
    fakenet, tmp_path, rules, started
):
    control = tmp_path / "control" / "gateway.sock"
    control.parent.mkdir(mode=0o755)
    # The order a host may have: the runners first, then a gateway that would fork its own.
    runners = started(RunnersProcess(control, tmp_path / "runners.log"))
    gateway = started(GatewayProcess(fakenet, tmp_path, rules))
    assert eventually(
        lambda: "another pool of warm runners serves" in gateway.log.read_text(), timeout=20
    ), gateway.log.read_text()
    status = gateway.status()
    assert status["runners_pid"] == runners.popen.pid and status["warm_runners"] == 2
    assert len(runners.sockets()) == 2  # the service added none of its own
    # one pool per control socket: a second one says who serves it and leaves
    second = subprocess.run(
        [sandbox.SANDGATE, "runners", "--control", str(control)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 125
    assert second.stderr.strip().splitlines()[-1] == (
        f"sandgate: another pool of warm runners serves {control}: pid {runners.popen.pid}"
    )
    assert len(runners.listening()) == 2  # and removed nothing of the first
    _handed_over_run(gateway, runners, tmp_path)


def test_a_service_that_may_not_build_sandboxes_gets_warm_runs_from_separate_runners(
    fakenet, tmp_path, rules, started
):
    """As under the shipped hardened unit: no_new_privs, so the service forks no runners."""
    gateway = started(GatewayProcess(fakenet, tmp_path, rules, wrap=("setpriv", "--no-new-privs")))
    assert eventually(
        lambda: (
            "no warm runners: this process runs with fewer capabilities, no_new_privs"
            in gateway.log.read_text()
        ),
        timeout=20,
    ), gateway.log.read_text()
    assert gateway.status()["warm_runners"] == 0
    runners = started(_runners(gateway))
    assert gateway.status()["warm_runners"] == 2
    _handed_over_run(gateway, runners, tmp_path)


def test_a_dead_pool_keeps_no_run_waiting_and_a_new_one_replaces_it(
    fakenet, tmp_path, rules, started
):
    gateway = started(GatewayProcess(fakenet, tmp_path, rules, "--runners", "external"))
    runners = started(_runners(gateway))
    gateway_children = [_cmdline(pid) for pid in _pids() if _parent(pid) == gateway.popen.pid]
    assert not [c for c in gateway_children if "zygote" in c], gateway_children
    waiting, stale = runners.children(), runners.sockets()
    assert len(waiting) == 2
    runners.popen.kill()  # as a crash: no clean-up of its own
    runners.popen.wait()
    assert eventually(lambda: not [p for p in waiting if _parent(p) is not None], timeout=10)
    assert runners.sockets() == stale  # left behind, refusing connects
    status = gateway.status()
    assert status["warm_runners"] == 0 and status["runners_pid"] is None  # no pool holds them
    argv = ["run", "--gateway", str(gateway.control), "--", "true"]
    for path in stale:
        began = time.monotonic()
        assert handoff._offer(path, argv) is None
        assert time.monotonic() - began < 0.1  # refused at once: no wait, no timeout
    # so a run goes on in its own process, at once
    workdir = tmp_path / "in-process"
    (workdir / "steps").mkdir(parents=True)
    proc = subprocess.Popen(
        attach_argv(gateway, workdir, ["echo", "ran"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "ran", err
    mark = f"runner pid {proc.pid})"  # the run's own process was its runner
    assert eventually(
        lambda: any(mark in (e.get("detail") or "") for e in gateway.events(kind="task")),
        timeout=10,
    ), gateway.events(kind="task")
    # A new pool (systemd's restart) removes the dead one's sockets and serves again.
    again = started(_runners(gateway, "runners-again"))
    assert not set(stale) & set(again.sockets())
    assert not [p for p in stale if os.path.exists(p)]
    _handed_over_run(gateway, again, tmp_path)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_the_pool_replaces_runners_that_die_or_lose_their_socket_and_cleans_up(tmp_path, started):
    """No service needed: the pool alone, its runners, their sockets and its lock."""
    control = tmp_path / "control" / "gateway.sock"
    control.parent.mkdir(mode=0o755)
    runners = started(RunnersProcess(control, tmp_path / "runners.log"))
    first = runners.sockets()
    assert all(os.stat(path).st_mode & 0o777 == 0o600 for path in first)
    assert Path(f"{control}{handoff.LOCK_SUFFIX}").read_text().strip() == str(runners.popen.pid)
    # a runner killed while it waits: another takes its place, its socket goes
    victim = runners.children()[0]
    os.kill(victim, signal.SIGKILL)
    assert eventually(lambda: victim not in runners.children() and len(runners.listening()) == 2)
    assert len(runners.sockets()) == 2
    # a socket somebody removed: its runner waits for nobody, and is replaced (<= 5 s)
    before = runners.sockets()
    os.unlink(before[0])
    assert eventually(
        lambda: len(runners.listening()) == 2 and before[0] not in runners.sockets(), timeout=15
    ), runners.log.read_text()
    assert before[1] in runners.sockets()  # the other one was left alone
    assert len(runners.children()) == 2
    # a stop takes the waiting runners and their sockets with it
    waiting = runners.children()
    runners.stop()
    assert runners.popen.returncode == 0
    assert eventually(lambda: not [p for p in waiting if _parent(p) is not None], timeout=10)
    assert runners.sockets() == []
    assert "Traceback" not in runners.log.read_text()
