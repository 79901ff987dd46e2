"""The service's intake of its workers' events, in process: CPU per event of what
`sandgate gateway --workers N` does with each `events` batch (issue 11, "Every core").

    .venv/bin/python bench/bench_intake.py [--batches 1000] [--per-batch 13]
                                           [--per-event] [--profile]

No root, no network. Records batches as a worker's `EventBatcher` makes them (two
tasks, a TLS pass-through connection's two events each: `connection`, then
`connection_end`; `--per-batch` connections per 20 ms tick), then feeds their bytes to
a service-side `Link` whose handler is a `WorkerPool`'s, into the service's fanout:
audit rate limit -> audit log (a temporary file), metrics, task summaries. The flood
control's clock moves 20 ms per batch, as the ticks do. Prints the loop thread's CPU
per event (`time.thread_time`) and the process's including the audit writer thread.
`--per-event` takes the old path (`EventFanout.emit` per event, no `sink_batch`) to
compare within one run; `--profile` prints cProfile's top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from sandgate.enforcer.workers import WorkerPool
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.audit import AuditLog
from sandgate.proxy.telemetry.event import Event, EventFanout, EventKind
from sandgate.proxy.telemetry.flood import FloodLimits
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.telemetry.summary import TaskSummary
from sandgate.proxy.worker import FLUSH_PERIOD, EventBatcher
from sandgate.proxy.worker_link import Link

TASKS = [(f"task-{i}", f"10.200.{i}.2") for i in range(2)]  # one worker's share of 4


def connection_events(task: str, sandbox: str, i: int) -> list[Event]:
    common = {"task_id": task, "sandbox": sandbox, "profile": "default", "rule_id": "web",
              "policy_hash": "ab" * 8, "time": 1.7e9 + i, "protocol": "tls",
              "name": "allowed.test", "dst_ip": "203.0.113.10", "dst_port": 443}  # fmt: skip
    return [
        Event(
            kind=EventKind.CONNECTION,
            verdict=Verdict.ALLOW,
            reason=Reason.RULE_ALLOW,
            latency=0.0003,
            **common,
        ),  # fmt: skip
        Event(
            kind=EventKind.CONNECTION_END,
            verdict=Verdict.ALLOW,
            reason=Reason.RULE_ALLOW,
            bytes_up=517,
            bytes_down=4096,
            duration=0.004,
            **common,
        ),  # fmt: skip
    ]


class _Wire:
    """Stands for a worker's link: the bytes `Link.send` would write."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def send(self, message: dict, payload: bytes = b"") -> None:
        if payload:
            message = {**message, "payload": len(payload)}
        self.chunks.append(json.dumps(message, separators=(",", ":")).encode() + b"\n" + payload)


def record(batches: int, per_batch: int) -> list[bytes]:
    wire = _Wire()

    async def make() -> None:
        batcher = EventBatcher(wire)
        n = 0
        for _ in range(batches):
            for c in range(per_batch):
                task, sandbox = TASKS[c % len(TASKS)]
                for event in connection_events(task, sandbox, n):
                    batcher.emit(event)
                n += 1
            batcher.flush()

    asyncio.run(make())
    return wire.chunks


class _Summaries:
    """The service's summary sink (GatewayService.emit, .emit_batch) over fixed tasks."""

    def __init__(self):
        self.by_task = {task: TaskSummary() for task, _ in TASKS}

    def emit(self, event) -> None:
        summary = self.by_task.get(event.task_id)
        if summary is not None:
            summary.emit(event)

    def emit_batch(self, events) -> None:
        own: dict[str, list] = {}
        for event in events:
            own.setdefault(event.task_id, []).append(event)
        for task, events_of_task in own.items():
            if task in self.by_task:
                self.by_task[task].emit_batch(events_of_task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--per-batch", type=int, default=13, help="connections per tick")
    parser.add_argument("--per-event", action="store_true", help="the old path")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    chunks = record(args.batches, args.per_batch)
    events = args.batches * args.per_batch * 2
    clock = [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        metrics, summaries = Metrics(), _Summaries()
        audit_log = AuditLog(Path(tmp) / "audit.jsonl")
        audit = RateLimitedAudit(audit_log, FloodLimits(), metrics.count_suppressed,
                                 clock=lambda: clock[0])  # fmt: skip
        fanout = EventFanout(audit, metrics, summaries)
        pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, fanout.emit,
                          tally=metrics.add_tally,
                          sink_batch=None if args.per_event else fanout.emit_batch)  # fmt: skip
        profile = cProfile.Profile() if args.profile else None

        async def take() -> float:
            worker = SimpleNamespace(index=0)
            link = Link(lambda message: pool._handle(worker, message))
            began = time.thread_time()
            if profile:
                profile.enable()
            for chunk in chunks:
                clock[0] += FLUSH_PERIOD
                link.data_received(chunk)
            if profile:
                profile.disable()
            return time.thread_time() - began

        began = time.process_time()
        loop_s = asyncio.run(take())
        audit_log.close()
        process_s = time.process_time() - began
    counted = sum(sum(s.rows.values()) for s in summaries.by_task.values())
    print(f"{events} events ({'per event' if args.per_event else 'per batch'}): "
          f"loop thread {loop_s / events * 1e6:.2f} us/event, process incl. the audit "
          f"writer {process_s / events * 1e6:.2f} us/event; written {audit_log.written}, "
          f"summary rows counted {counted}")  # fmt: skip
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
