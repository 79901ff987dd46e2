"""A service that lives for months gives back what each task took (h-psoak).

The short version of bench/soak_service.py: one `sandgate gateway --workers 2` in the
fake internet, 60 attached runs in a row (DNS, pass-through, plain and inspected
HTTPS, a name and an address refused; every tenth runner SIGKILLed mid-run; a few
held for a human who approves or denies; rule reloads, good and broken, between
them). Once they have ended, nothing of them may be left in the service: its
per-task tables and each worker's empty (`status --json`), its descriptors back to
where they were, no run's netns, veth, table, run dir or process on the host, and
the metrics' series no more than before (their labels are bounded: no task's own).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
from support import sandbox, soak
from support.sandbox import eventually
from support.service import GatewayProcess

pytestmark = pytest.mark.e2e

RUNS = 60


class Soak:
    def __init__(self, net, tmp_path):
        self.net, self.tmp_path = net, tmp_path
        self.rules = tmp_path / "rules.yaml"
        self.rules.write_text(soak.RULES)
        self.metrics_port = random.randrange(20000, 30000)
        self.gateway = GatewayProcess(
            net, tmp_path, self.rules,
            "--workers", "2", "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
        )  # fmt: skip
        self.decided: list[str] = []

    def run(self, kind: str) -> None:
        """One attached run: "plain", "kill" (its runner SIGKILLed mid-run), "approve"
        or "deny" (its request held; a human decides)."""
        asks = kind in ("approve", "deny")
        code, args = (soak.ASK_TASK, []) if asks else (soak.TASK, ["3" if kind == "kill" else "0"])
        proc = subprocess.Popen(
            [
                sandbox.SANDGATE, "run", "--gateway", str(self.gateway.control),
                "--profile", "asker" if asks else "default", "--no-workspace", "--",
                sandbox.SANDBOX_PYTHON, "-c", code, *args,
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if asks:
                self.decide(kind)
            elif kind == "kill":
                time.sleep(1.5)
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def decide(self, how: str) -> None:
        def asked():
            listed = json.loads(self.gateway.ask("approvals", "--json", "list").stdout or "[]")
            return [p for p in listed if p["id"] not in self.decided and not p.get("task_ended")]

        found = eventually(asked, timeout=15)
        assert found, "the asker's request was never held"
        self.decided.append(found[0]["id"])
        assert self.gateway.ask("approvals", how, found[0]["id"]).returncode == 0

    def reload(self, broken: bool) -> None:
        self.rules.write_text(soak.BROKEN if broken else soak.RULES + f"# {time.time()}\n")
        self.gateway.ask("reload")

    def settled(self) -> dict:
        """`status --json` once no task's state is left (the workers push their tables
        every second); the last one seen if some stays."""
        last = {}

        def empty():
            last.update(self.gateway.status())
            return not soak.left_in_tables(last)

        eventually(empty, timeout=15, interval=0.5)
        return last

    def fds(self, status: dict) -> dict[str, int]:
        pids = {"service": status["pid"]} | {
            f"worker{w['index']}": w["pid"] for w in status["workers"]
        }
        return {name: soak.open_fds(pid) for name, pid in pids.items()}

    def sockets(self) -> str:
        """The host netns's TCP connections (what a descriptor too many holds)."""
        return self.net.run_in_host(["ss", "-tn", "state", "established"]).stdout


def kind_of(i: int) -> str:
    if i % 10 == 3:
        return "kill"
    if i % 20 == 7:
        return "approve"
    if i % 20 == 17:
        return "deny"
    return "plain"


def test_runs_leave_nothing_in_the_service(net, tmp_path):
    s = Soak(net, tmp_path)
    s.gateway.start()
    try:
        # One of each kind first: what is made once, lazily (the default executor's
        # threads, the gateway CA, a metric's first label sets), is in the baseline.
        for kind in ("plain", "kill", "approve", "deny", "plain"):
            s.run(kind)
        s.reload(broken=False)
        s.reload(broken=True)
        baseline = s.fds(s.settled())
        for i in range(RUNS):
            s.run(kind_of(i))
            if i % 15 == 14:
                s.reload(broken=i % 30 == 14)
            if i == RUNS // 2 - 1:
                series_halfway = soak.metrics_series(net, s.metrics_port)
        status = s.settled()
        series_after = soak.metrics_series(net, s.metrics_port)

        assert soak.left_in_tables(status) == {}, status
        assert status["sandboxes"] == 0 and status["spares"] == 2
        after = s.fds(status)
        assert all(after[k] <= baseline[k] + 3 for k in baseline), (baseline, after, s.sockets())
        assert series_after <= series_halfway + 8, (series_halfway, series_after)
        run_ids = {e["task_id"] for e in s.gateway.events(kind="task") if e.get("task_id")}
        assert len(run_ids) >= RUNS + 5

        def leftovers():
            return [x for r in sorted(run_ids) for x in sandbox.leftovers(net, r)]

        eventually(lambda: not leftovers(), timeout=10, interval=0.5)  # removals run after a detach
        assert leftovers() == []
    finally:
        s.gateway.stop()
