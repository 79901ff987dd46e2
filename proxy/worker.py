"""A gateway worker: the data path for some of the service's sandboxes, in its own
process (`sandgate gateway --workers N`, N > 1; enforcer/workers.py starts them).

    python -I -m sandgate.proxy.worker --index I --link FD --frontdoor FD \\
        --dns-udp FD --dns-tcp FD [--blackbox FD] --config JSON

It runs one `Gateway` (DNS filter, front door, mitmproxy when needed, the gate, DNS
bindings, per-sandbox limits, held approvals) on listening sockets the service made
and keeps: if this process dies, connections wait in their listen queues (no egress
meanwhile: fail closed) until the service's next worker accepts them.

The service talks to it over `--link` (proxy/worker_link.py). Requests it answers:
`start` {policy, sandboxes, audit_problem, grants; the service's policy as payload}
(the first, once: its gateway is made with that policy, the sandboxes the service
gives it, a restarted worker's, are registered, the audit hold and the `--for`
grants in force are taken, and only then does it serve its sockets, so nothing
queued there is decided as a stranger's; replies {pid, proxy_port, dns_port,
policy}), `add_sandbox` {address, task_id, profile} (starts mitmproxy first when the
profile inspects: the service then hands the task the CA), `remove_sandbox`
{address}, `reload` {policy, actor; the service's new policy as payload} (swaps it
in; replies with the hash in force), `audit_hold` {problem} (the service's audit log
cannot be written: refuse new connections as the in-process gateway would), `flush`
(send the events held for the next tick now), `stats`, `stop`, and the approvals ops
`approve`, `deny`, `grant` (proxy/approvals/remote.py). It never reads the rule
files: it serves the policy the service enforces (worker_link.policy_payload).
Notifications it sends: `events`
at the next FLUSH_PERIOD tick after an event (`EventBatcher`; each event is in its
`--blackbox` first, proxy/telemetry/blackbox.py, for the service to read if this
process is killed before it sent them), `stats` every
STATS_INTERVAL seconds, `approval` {what, approval} on every change of its approvals. It asks the service `always` (append an approved rule, reload).

It imports nothing of enforcer/, and dies with the service (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from sandgate.proxy.approvals.remote import ApprovalsOverLink
from sandgate.proxy.frontdoor.poller import new_event_loop
from sandgate.proxy.gateway import Gateway, GatewayConfig, Listeners, inspects
from sandgate.proxy.policy.reasons import Reason
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry.audit import audit_members, mapped_ring
from sandgate.proxy.telemetry.blackbox import BlackBox
from sandgate.proxy.telemetry.event import Event, EventKind
from sandgate.proxy.telemetry.metrics import MetricsTally
from sandgate.proxy.telemetry.summary import row_destination
from sandgate.proxy.ticks import INTAKE_PERIOD, LEAD, next_tick
from sandgate.proxy.worker_link import Link, LinkClosed, policy_of

log = logging.getLogger("sandgate.worker")

STATS_INTERVAL = 1.0
MAX_BATCH = 2000  # events per `events` line
# Events wait for the next tick of a FLUSH_PERIOD clock (or until FLUSH_COUNT are
# pending) before they go: at 5 ms after the first event, a batch held 3-6 events and
# the wake-ups, not the events, were most of the link's cost. The ticks fall LEAD
# before each tick of the service's own clock, which reads the links
# (ticks.INTAKE_PERIOD), on CLOCK_MONOTONIC (`next_tick`): every worker sends
# once per read, just before it, with its front door's deadline tick in the same
# wake-up. A shorter period only made more wake-ups: what is sent waits in the socket
# for the read, and what is not yet sent is in the black box, which the service reads
# if the worker is killed, so none of it is lost either way.
FLUSH_PERIOD = INTAKE_PERIOD
FLUSH_COUNT = 256
PR_SET_PDEATHSIG = 1


class EventBatcher:
    """The worker gateway's one sink: events go to the service in batches, at the next
    tick of the FLUSH_PERIOD clock (`next_tick`), not one write per event.

    The service only chains and writes each event's audit line, counts it into its
    task's summary and its audit rate limit, and adds up the metrics, so what it needs
    is made here, where the event was made (decoding one JSON object per event, then
    encoding it again for the log, cost the service more than the event had cost the
    worker). One `events` notification holds, in order:
    - `events`: per event [task_id, sandbox, kind, verdict, reason, rule_id,
      destination] (`EncodedEvent`'s fields; destination: its summary row's);
    - `last`: the seq of the batch's last event (events are numbered 1, 2, ... as
      their black box records are: the service reads the box past it);
    - `pos` (with a black box, on a flush's last batch): where in the box the record
      after `last` starts (the service marks it taken: blackbox.py);
    - `metrics`: the batch's `MetricsTally` rows;
    - the payload: each event's audit members (`audit_members`), one per line (ASCII
      JSON escapes every control character: a value cannot hold a newline).

    The worker's own `policy_loaded` events are left out: a reload is the service's,
    which records it once (the connections each worker closes are events of their own).

    With a `blackbox`, each event's members are written there as it is emitted: the
    gate emits a decision before it takes effect, so an event that reached the
    upstream is in the box even if this process is killed before the next tick."""

    def __init__(self, link: Link, blackbox: BlackBox | None = None):
        self.link = link
        self.blackbox = blackbox
        self.seq = 0  # the last event's
        self.rows: list[tuple] = []
        self.members: list[bytes] = []
        self.tally = MetricsTally()
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, event: Event) -> None:
        if event.kind is EventKind.POLICY and event.reason is Reason.POLICY_LOADED:
            return
        members = audit_members(event)
        self.seq = self.blackbox.write(members) if self.blackbox else self.seq + 1
        self.members.append(members)
        self.rows.append(
            (event.task_id, event.sandbox, event.kind, event.verdict, event.reason,
             event.rule_id, row_destination(event))
        )  # fmt: skip
        self.tally.emit(event)
        if len(self.rows) >= FLUSH_COUNT:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(next_tick(loop.time(), FLUSH_PERIOD, LEAD), self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        metrics = self.tally.take()  # with the first batch: the service adds them up at once
        while self.rows:
            rows, self.rows = self.rows[:MAX_BATCH], self.rows[MAX_BATCH:]
            members, self.members = self.members[:MAX_BATCH], self.members[MAX_BATCH:]
            try:
                message = {"op": "events", "events": rows, "metrics": metrics,
                           "last": self.seq - len(self.rows)}  # fmt: skip
                if not self.rows and self.blackbox is not None:
                    message["pos"] = self.blackbox.pos  # where the record after `last` starts
                self.link.send(message, b"\n".join(members))
            except LinkClosed:
                log.error("sandgate worker: the service went away; %d events lost", len(rows))
                self.rows.clear()
                self.members.clear()
            metrics = []
        if self.blackbox is not None and not self.link.buffered():
            self.blackbox.mark_sent()  # all in the socket, which the service reads to its end


class RemoteAudit:
    """What `Gateway.guard_audit` reads, as the service last said it (`audit_hold`)."""

    writable = True
    problem: str | None = None


class Worker:
    def __init__(
        self,
        index: int,
        config: dict,
        listeners: Listeners,
        link_sock: socket.socket,
        blackbox: BlackBox | None = None,
    ):
        self.index = index
        self.blackbox = blackbox
        self.config = config
        self.listeners = listeners
        self.link_sock = link_sock
        self.audit = RemoteAudit()
        self.stopped = asyncio.Event()
        self.gateway: Gateway | None = None
        self.link: Link | None = None
        self.approvals: ApprovalsOverLink | None = None
        self.batcher: EventBatcher | None = None
        self._starting = False
        self.serving = False  # from the end of `start`
        self._swapping = asyncio.Lock()  # reloads in the order they came
        self._stats: asyncio.Task | None = None

    async def run(self) -> int:
        """Serve from the service's `start` until the service stops this worker or
        goes away."""
        self.link = await Link.over(self.link_sock, self.handle)
        reading = asyncio.get_running_loop().create_task(self.link.run())
        done, _ = await asyncio.wait(
            [reading, asyncio.ensure_future(self.stopped.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._stats is not None:
            self._stats.cancel()
        if reading in done:  # the service closed the link: it is gone or stopping us
            if self.gateway is not None:
                await self.gateway.stop()
            return 0
        await reading
        return 0

    # --- requests --------------------------------------------------------------------

    def handle(self, message: dict):
        op = message.get("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown op {str(op)[:40]!r}")
        if not self.serving and op not in ("start", "stop"):
            raise RuntimeError(f"{str(op)[:40]!r} before the worker started")
        return handler(message)

    async def op_start(self, message: dict) -> dict:
        """Serve the service's policy (the payload) for the sandboxes it gives: each
        registered, the audit hold and the grants taken, before the first socket is
        read. Once; a failure leaves the worker to be killed."""
        if self._starting:
            raise RuntimeError("started already")
        self._starting = True
        policy = await asyncio.to_thread(policy_of, message["payload"], str(message["policy"]))
        self.batcher = batcher = EventBatcher(self.link, self.blackbox)
        self.gateway = Gateway(
            GatewayConfig(
                listen_host="",
                dns_upstreams=list(self.config["dns_upstreams"]),
                dns_upstream_port=int(self.config.get("dns_upstream_port", 53)),
                confdir=Path(self.config["confdir"]),
                upstream_ca=Path(self.config["upstream_ca"])
                if self.config.get("upstream_ca")
                else None,
                listeners=self.listeners,
            ),
            policy,
            batcher,
        )
        self.approvals = ApprovalsOverLink(
            self.gateway.approvals,
            self.link,
            index=self.index,
            count=int(self.config.get("workers", 1)),
            before_send=batcher.flush,
        )
        self.gateway.guard_audit(self.audit)
        problem = message.get("audit_problem")
        self.audit.writable, self.audit.problem = problem is None, problem
        for fields in message.get("sandboxes", ()):
            # Its profile may have left the policy since it attached: registered all
            # the same, its connections are denied under its task (unknown_profile).
            self.gateway.add_sandbox(_sandbox(fields))
        for grant in message.get("grants", ()):  # `--for` approvals of the other workers
            await self.approvals.op_grant({"approval": grant})
        await self.gateway.start()  # the CA if a profile inspects; mitmproxy if one needs it
        self._stats = asyncio.get_running_loop().create_task(self._push_stats())
        self.serving = True
        return {
            "pid": os.getpid(),
            "proxy_port": self.gateway.proxy_port,
            "dns_port": self.gateway.dns_port,
            "policy": policy.hash,
        }

    async def op_add_sandbox(self, message: dict) -> dict:
        profile = str(message["profile"])
        if profile not in self.gateway.policy.profiles:
            raise ValueError(f"no profile {profile[:60]!r} in this worker's policy")
        self.gateway.add_sandbox(_sandbox(message))
        if inspects(self.gateway.policy, profile):
            await self.gateway.gateway_ca()  # the task must trust it: it exists before the reply
        return {}

    async def op_remove_sandbox(self, message: dict) -> dict:
        self.gateway.remove_sandbox(str(message["address"]))
        return {}

    async def op_reload(self, message: dict) -> dict:
        """Swap in the service's new policy (the payload), as PolicyReloader swaps one
        it loaded: its connections the new one denies are closed, with their events."""
        async with self._swapping:
            new = await asyncio.to_thread(policy_of, message["payload"], str(message["policy"]))
            actor = message.get("actor")
            old = self.gateway.policy
            swap = self.gateway.swap_policy(
                new, cause="reload on service" + (f" by {actor}" if actor else "")
            )
            await asyncio.to_thread(old.forget_decisions)  # off the loop too: 100k rules
        return {"ok": True, "loaded": True, "policy": new.hash, "errors": [],
                "closed": swap.connections_closed}  # fmt: skip

    async def op_audit_hold(self, message: dict) -> dict:
        problem = message.get("problem")
        self.audit.writable, self.audit.problem = problem is None, problem
        return {}

    async def op_approve(self, message: dict) -> dict:
        return await self.approvals.op_approve(message)

    async def op_deny(self, message: dict) -> dict:
        return await self.approvals.op_deny(message)

    async def op_grant(self, message: dict) -> dict:
        return await self.approvals.op_grant(message)

    async def op_stats(self, message: dict) -> dict:
        return self.stats()

    async def op_flush(self, message: dict) -> dict:
        """Send the events held for the next tick now: they are on the link before the
        reply (the service's detach waits for them, for the task's summary)."""
        self.batcher.flush()
        return {}

    async def op_stop(self, message: dict) -> dict:
        if self.gateway is not None:
            await self.gateway.stop()  # connection ends are emitted and batched
            self.batcher.flush()
        self.stopped.set()
        return {}

    def stats(self) -> dict:
        gate = self.gateway.gate
        return {
            "pid": os.getpid(),
            "policy": self.gateway.policy.hash,
            "sandboxes": len(self.gateway.registry),
            "connections": len(gate.connections),
            "open": gate.counts.open,
            "pending": gate.counts.pending,
            "tables": self.gateway.table_sizes(),
        }

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            with contextlib.suppress(LinkClosed):
                self.link.send({"op": "stats", **self.stats()})


def _sandbox(fields: dict) -> Sandbox:
    return Sandbox(str(fields["address"]), fields.get("task_id"), str(fields["profile"]))


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the service dies, so no orphan keeps serving."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandgate.proxy.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--link", type=int, required=True)
    parser.add_argument("--frontdoor", type=int, required=True)
    parser.add_argument("--dns-udp", type=int, required=True)
    parser.add_argument("--dns-tcp", type=int, required=True)
    parser.add_argument("--blackbox", type=int, help="a memfd the service made (blank)")
    parser.add_argument("--config", required=True, help="JSON: rules, dns_upstreams, confdir ...")
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    _die_with_parent(int(config["service_pid"]))
    # The service stops its workers over the link; a signal to the whole group (a
    # terminal's Ctrl-C, systemd's stop) is the service's to act on.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"sandgate worker {args.index}: %(message)s",
        stream=sys.stderr,
    )
    listeners = Listeners(
        frontdoor=socket.socket(fileno=args.frontdoor),
        dns_udp=socket.socket(fileno=args.dns_udp),
        dns_tcp=socket.socket(fileno=args.dns_tcp),
    )
    blackbox = None
    if args.blackbox is not None:
        with open(args.blackbox, "r+b") as memfd:  # the mapping outlives the descriptor
            blackbox = BlackBox(mapped_ring(memfd.fileno()))
    worker = Worker(args.index, config, listeners, socket.socket(fileno=args.link), blackbox)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # the door shares its epoll set
        return runner.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
