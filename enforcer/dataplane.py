"""The service's data plane: what carries the sandboxes' traffic, as the service drives it.

`sandgate gateway` (enforcer/service.py) is the control plane: control socket,
sandbox networks and tables, the audit log, /metrics, reloads. The data plane is one
of two things, chosen once at start (`open_data_plane`):

- `InProcessGateway` (`--workers 1`): one `Gateway` (proxy/gateway.py) on the
  service's own loop;
- `WorkerPool` (enforcer/workers.py, `--workers N`): N worker processes, each a
  whole `Gateway` for the sandboxes it is given.

Both are a `DataPlane`. A sandbox network gets a *slot* when it is made (`assign`):
where its table points (`ports`), whom its task is registered with (`add_sandbox`).
The one gateway has one slot; the pool has a slot per worker.
"""

from __future__ import annotations

import os
from collections.abc import Sized
from pathlib import Path
from typing import Protocol

from sandgate.enforcer.workers import WorkerPool
from sandgate.proxy.gateway import Gateway, GatewayConfig, SwapReport
from sandgate.proxy.policy import CompiledPolicy
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry.audit import AuditLog
from sandgate.proxy.telemetry.event import Event, EventFanout, EventSink
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.metrics import Metrics


class DataPlane(Protocol):
    """What the service needs of the data path. `policy`, `swap_policy` and `emit` are
    the reloader's (proxy/reload.py `ReloadTarget`); `registry`, `gate` (its `counts`
    and `connections`) and `approvals` are what `Metrics.watch_gateway` reads; the
    control socket and the admin page decide `approvals`."""

    registry: Sized
    gate: object
    approvals: object

    @property
    def policy(self) -> CompiledPolicy: ...
    def swap_policy(self, new: CompiledPolicy, *, cause: str = "") -> SwapReport: ...
    def emit(self, event: Event) -> None: ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def guard_audit(self, audit: AuditLog) -> None:
        """--on-audit-failure block: refuse new connections while `audit` cannot write."""

    def all_ports(self) -> tuple[list[int], list[int]]:
        """Every (front door, DNS) port that sandboxes may reach: the guard table's."""

    def assign(self) -> int:
        """The slot of a sandbox network being made."""

    def release(self, slot: int) -> None:
        """A sandbox network assigned `slot` is gone."""

    def ports(self, slot: int) -> tuple[int, int]:
        """The front door and DNS ports a table for `slot` redirects to."""

    async def add_sandbox(self, slot: int, sandbox: Sandbox) -> None:
        """Serve `sandbox` from now on (returns once it does)."""

    def remove_sandbox(self, address: str) -> None: ...
    async def retire(self, address: str) -> None:
        """Stop serving `address`, then return once every event made for it has reached
        the sinks (a worker holds them for its next flush tick): before a task's
        summary, which then counts what the audit log holds of the task (what comes
        from the address afterwards is no task's: `unknown_sandbox`)."""

    async def gateway_ca(self) -> Path:
        """The gateway CA's certificate, made before this returns: what a task whose
        profile inspects TLS must trust."""

    async def reloaded(self, reply: dict) -> None:
        """Complete a successful reload's `reply` (the control socket's) with what the
        data plane did beyond the swap; sets `ok` False when part of it failed."""

    def describe(self) -> list[dict]:
        """One entry per data path process, for `status`."""


class InProcessGateway:
    """`--workers 1`: the data path is one `Gateway` on the service's loop."""

    SLOT = -1  # its one slot: no worker (what `sandboxes` shows as the worker)

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.registry = gateway.registry
        self.gate = gateway.gate
        self.approvals = gateway.approvals

    @property
    def policy(self) -> CompiledPolicy:
        return self.gateway.policy

    def swap_policy(self, new: CompiledPolicy, *, cause: str = "") -> SwapReport:
        return self.gateway.swap_policy(new, cause=cause)

    def emit(self, event: Event) -> None:
        self.gateway.emit(event)

    async def start(self) -> None:
        await self.gateway.start()

    async def stop(self) -> None:
        await self.gateway.stop()

    def guard_audit(self, audit: AuditLog) -> None:
        self.gateway.guard_audit(audit)

    def all_ports(self) -> tuple[list[int], list[int]]:
        return [self.gateway.proxy_port], [self.gateway.dns_port]

    def assign(self) -> int:
        return self.SLOT

    def release(self, slot: int) -> None:
        pass

    def ports(self, slot: int) -> tuple[int, int]:
        return self.gateway.proxy_port, self.gateway.dns_port

    async def add_sandbox(self, slot: int, sandbox: Sandbox) -> None:
        self.gateway.add_sandbox(sandbox)

    def remove_sandbox(self, address: str) -> None:
        self.gateway.remove_sandbox(address)

    async def retire(self, address: str) -> None:
        """The gateway emits into the sinks as it goes: nothing to wait for."""
        self.gateway.remove_sandbox(address)

    async def gateway_ca(self) -> Path:
        return await self.gateway.gateway_ca()  # made now if a reload added the first such rule

    async def reloaded(self, reply: dict) -> None:
        """The swap was the whole reload: nothing to add."""

    def describe(self) -> list[dict]:
        return [
            {
                "index": 0,
                "pid": os.getpid(),
                "sandboxes": len(self.registry),
                "connections": len(self.gate.connections),
                "restarts": 0,
                "in_process": True,
                "tables": self.gateway.table_sizes(),
            }
        ]


def open_data_plane(
    workers: int,
    config: GatewayConfig,
    policy: CompiledPolicy,
    audit: RateLimitedAudit,
    metrics: Metrics,
    summaries: EventSink,
) -> DataPlane:
    """`workers` > 1: a `WorkerPool`, else an `InProcessGateway`; not started. Every
    event goes to `audit`, `metrics` and `summaries` (the service's task summaries)."""
    if workers > 1:
        fanout = EventFanout(audit, metrics, summaries)
        return WorkerPool(
            workers,
            {
                "dns_upstreams": config.dns_upstreams,
                "confdir": str(config.confdir),
                "upstream_ca": str(config.upstream_ca),
            },
            policy,
            fanout.emit,
            sink_batch=fanout.emit_batch,
            tally=metrics.add_tally,
            restarting=metrics.worker_restarts.inc,
            audit=audit,
            listen_host=config.listen_host,
        )
    return InProcessGateway(Gateway(config, policy, audit, metrics, summaries))
