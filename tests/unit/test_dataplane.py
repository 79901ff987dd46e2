"""The service's data plane (enforcer/dataplane.py): what each implementation does for
the service without a sandbox network. The pool's parts here start no worker; its
workers are tested in test_workers.py and tests/e2e/test_workers_e2e.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sandgate.enforcer.dataplane import InProcessGateway, open_data_plane
from sandgate.enforcer.workers import WorkerPool
from sandgate.proxy.gateway import GatewayConfig
from sandgate.proxy.policy import load_policy
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry.metrics import Metrics

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: web
"""


def _plane(tmp_path: Path, workers: int):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = GatewayConfig(listen_host="127.0.0.1", dns_upstreams=[], confdir=tmp_path / "ca")
    sink = _Sink()
    return open_data_plane(workers, config, load_policy([rules]), sink, Metrics(), sink)


class _Sink(list):
    """Stands in for the audit rate limit and the task summaries."""

    def emit(self, event) -> None:
        self.append(event)

    def start(self, loop) -> None:
        pass

    def stop(self) -> None:
        pass


def test_one_worker_is_the_in_process_gateway_with_one_slot_and_many_the_pool(tmp_path):
    one = _plane(tmp_path, 1)
    assert isinstance(one, InProcessGateway)
    assert one.assign() == one.assign() == InProcessGateway.SLOT
    assert isinstance(_plane(tmp_path, 2), WorkerPool)


def test_the_in_process_gateway_registers_forgets_and_describes_its_sandboxes(tmp_path):
    plane = _plane(tmp_path, 1)
    asyncio.run(plane.add_sandbox(plane.assign(), Sandbox("10.0.0.2", "task-1", "default")))
    assert plane.gateway.registry.get("10.0.0.2").task_id == "task-1"
    (entry,) = plane.describe()
    assert entry.pop("tables")["registry"] == 1
    assert entry == {
        "index": 0,
        "pid": os.getpid(),
        "sandboxes": 1,
        "connections": 0,
        "restarts": 0,
        "in_process": True,
    }
    plane.remove_sandbox("10.0.0.2")
    assert plane.gateway.registry.get("10.0.0.2") is None
    assert plane.describe()[0]["sandboxes"] == 0
    assert plane.describe()[0]["tables"]["registry"] == 0


def test_the_in_process_reload_reply_is_the_swaps_alone(tmp_path):
    reply = {"ok": True, "policy": "abc", "swap": {"connections_closed": 2}}
    asyncio.run(_plane(tmp_path, 1).reloaded(reply))
    assert reply == {"ok": True, "policy": "abc", "swap": {"connections_closed": 2}}


def test_the_pools_reload_reply_adds_each_worker_and_names_one_that_did_not_take_it(tmp_path):
    pool = _plane(tmp_path, 2)

    async def main() -> dict:
        reply = {"ok": True, "policy": "new", "swap": {"connections_closed": 0}}
        await pool.reloaded(reply)  # nothing pushed yet: nothing to add
        assert reply == {"ok": True, "policy": "new", "swap": {"connections_closed": 0}}
        pool.pushing = asyncio.get_running_loop().create_future()
        pool.pushing.set_result(
            [
                {"index": 0, "pid": 10, "closed": 2, "errors": [], "ok": True, "policy": "new"},
                {"index": 1, "pid": 11, "closed": 1, "errors": [], "ok": False, "policy": "old"},
            ]
        )
        await pool.reloaded(reply)
        return reply

    reply = asyncio.run(main())
    assert [w["index"] for w in reply["workers"]] == [0, 1]
    assert reply["swap"]["connections_closed"] == 3
    assert reply["ok"] is False
    assert reply["error"] == "worker 1 (pid 11) did not take policy new: it has old"


class _Audit:
    writable = True
    problem: str | None = None


def test_the_pool_passes_the_audit_logs_writability_on_until_it_stops(tmp_path):
    """--on-audit-failure block: what the workers are told (every worker that starts
    is told `audit_problem` too)."""
    pool = _plane(tmp_path, 2)
    audit = _Audit()

    async def main() -> None:
        pool.guard_audit(audit)
        await asyncio.sleep(0.05)
        assert pool.audit_problem is None
        audit.writable, audit.problem = False, "disk full"
        await _until(lambda: pool.audit_problem == "disk full")
        audit.writable = True
        await _until(lambda: pool.audit_problem is None)
        await pool.stop()
        audit.writable = False
        await asyncio.sleep(0.6)  # two checks' time: the watch is gone
        assert pool.audit_problem is None

    asyncio.run(main())


async def _until(probe, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)
