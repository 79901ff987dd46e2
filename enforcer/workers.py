"""`sandgate gateway --workers N` (N > 1): the data path in N worker processes.

The service keeps the control plane (control socket, sandbox networks and tables,
the audit log, /metrics, reloads) and hands each sandbox to one worker
(proxy/worker.py), which runs a whole `Gateway` for the sandboxes it was given:
their TCP and DNS go to that worker's ports, so a sandbox's DNS bindings and its
connections stay together.

- **Listeners are the service's.** `WorkerPool` makes each worker's listening
  sockets (front door TCP, DNS UDP and TCP; every address of the namespace, as the
  in-process gateway's) and passes them to the worker it spawns. A worker that dies
  leaves them open here: connections wait in the listen queue (no egress meanwhile:
  fail closed) and its restarted successor accepts them.
- **Sandbox -> worker when its network is made.** `assign` picks the worker with the
  fewest sandboxes and spares; the sandbox's nftables table is rendered with that
  worker's ports (warm spares too, so an attach re-points nothing); `add_sandbox`
  registers the task with the worker and waits for its ack.
- **Events** come back in batches (`events` notifications), in order, and go to the
  service's one fanout: one hash-chained audit log, the metrics, the task summaries,
  flood control, as with one process. Each comes as an `EncodedEvent` (its audit line
  encoded by the worker: the service only chains it; the fields flood control and the
  summary read) and the batch's metrics counted by the worker (`tally`). A worker's
  link is read to its end before the worker is taken for dead: what it flushed is
  never lost.
- **Policy**: a worker serves the service's policy, never the rule files as they
  are: the policy in force, pickled (worker_link.policy_payload, kept for the next
  start), is the payload of its `start`, and the service's reload (its own load,
  then `swap_policy` here) sends the new one to every worker, which reports its
  hash (asked again if the service's changed meanwhile). So a worker restarted
  while the files are broken, or edited and not reloaded, serves what the others do.
- **A worker that dies** is started again on the same sockets, with its sandboxes
  in its `start`: registered before it reads a socket (what waited there is decided
  under its task, not as a stranger's), and each gets a `worker_restarted` event; the
  other workers' sandboxes see nothing. Before that, the events it made but had not sent
  are read from its black box (proxy/telemetry/blackbox.py: a file next to the
  audit journal, or a memfd without one, that the service makes for each worker
  process and passes like its sockets; the worker writes each event there as it
  emits it) and go into the fanout, each marked recovered. The service marks in it
  what it took into its audit journal (`take`), so that if the service itself is
  killed, the next open of the audit log reads the rest. One that keeps dying is restarted ever more slowly.
- **Approvals**: a worker holds its sandboxes' asked connections and requests and
  reports each change; `approvals` (enforcer/worker_approvals.py) is the one list
  over all workers that the control socket, the admin page and the metrics read, and
  routes each decision to the worker that holds it. A `--for` grant is passed to
  every worker (and to a restarted one); an `always` is the service's (approved.yaml,
  then a reload of every worker); a dead worker's approvals leave the list.

The pool is one of the service's two data planes (enforcer/dataplane.py `DataPlane`;
the other is the in-process gateway): a slot is a worker's index.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandgate.enforcer.worker_approvals import WorkerApprovals
from sandgate.proxy.dns.server import TCP_BACKLOG
from sandgate.proxy.frontdoor.door import LISTEN_BACKLOG
from sandgate.proxy.gateway import Listeners, SwapReport, policy_loaded, said, stamped
from sandgate.proxy.gateway_ca import ca_cert_file
from sandgate.proxy.policy import CompiledPolicy
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry.audit import map_backed, worker_journal
from sandgate.proxy.telemetry.blackbox import DEFAULT_SIZE, blank, recover, take
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind, decode_members
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.open_connections import OpenConnections
from sandgate.proxy.ticks import INTAKE_PERIOD
from sandgate.proxy.worker_link import Link, LinkClosed, policy_payload

log = logging.getLogger("sandgate.gateway")

READY_TIMEOUT = 120.0  # a worker takes the policy (100k rules: ~2 s) and may start mitmproxy
STEADY_S = 10.0  # a worker that lived this long died once: restart at once
BACKOFF_MAX = 30.0
RELOAD_TRIES = 3
SETTLE_TIMEOUT = 2.0  # a detach waits this long at most for a worker's last events
# The service reads its workers' links on a clock (INTAKE_PERIOD, proxy/worker_link.py:
# `read_every`), not as each batch comes: a wake-up of the service per batch cost more
# than the batch at half load. The workers send just before each tick; events reach
# the audit writer up to this much later; a reply, a worker's death and a detach's
# `settle` are read at once.
# What a worker's end of its link may hold in the kernel while the service rests: a
# worker making ~20,000 events/s sends ~1 MB per INTAKE_PERIOD. The default (~200 KB)
# would leave the rest to asyncio's buffer in the worker (a copy and a wake-up more).
LINK_SNDBUF = 4 << 20
SO_SNDBUFFORCE = 32  # Linux (socket(7)); Python's socket module has no name for it
AUDIT_CHECK_S = 0.25  # how often the audit log's writability is passed on (guard_audit)
# Bench only: every sandbox to this worker index (the others idle), to tell the cost
# of a worker process apart from that of two busy processes on the cores at once.
PIN_ENV = "SANDGATE_BENCH_PIN_WORKER"


class WorkerStartError(RuntimeError):
    """A worker did not start the first time (the service does not start): why."""


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def make_listeners(host: str = "0.0.0.0") -> Listeners:
    """A worker's listening sockets, bound as the in-process gateway binds its own:
    the front door on a free TCP port, the DNS filter on one free port, UDP and TCP."""
    made: list[socket.socket] = []
    try:
        frontdoor = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        made.append(frontdoor)
        frontdoor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        frontdoor.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frontdoor.bind((host, 0))
        frontdoor.listen(LISTEN_BACKLOG)
        for _ in range(20):  # a free UDP port whose TCP twin is free too
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            made.append(udp)
            udp.bind((host, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            made.append(tcp)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, udp.getsockname()[1]))
            except OSError:
                continue
            tcp.listen(TCP_BACKLOG)
            for sock in made:
                if sock not in (frontdoor, udp, tcp):
                    sock.close()
            return Listeners(frontdoor=frontdoor, dns_udp=udp, dns_tcp=tcp)
        raise OSError("no free port for the DNS filter's UDP and TCP")
    except BaseException:
        for sock in made:
            sock.close()
        raise


@dataclass
class WorkerProcess:
    """One worker: its sockets (for good), its current process and link, its sandboxes."""

    index: int
    listeners: Listeners
    process: asyncio.subprocess.Process | None = None
    link: Link | None = None
    pid: int = 0
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)
    assigned: int = 0  # sandboxes and spares whose tables point here
    restarts: int = 0
    stats: dict = field(default_factory=dict)
    up: asyncio.Event = field(default_factory=asyncio.Event)  # serving, sandboxes registered
    policy: str = ""
    blackbox: mmap.mmap | None = None  # the current process's (proxy/telemetry/blackbox.py)
    received: int = 0  # the seq of the last event it sent that was read here
    recovered: tuple[int, int] = (0, 0)  # of the last dead process: events read back, lost
    # Its allowed connections not yet ended, from its events; at its death, each gets
    # a `connection_end` (`_end_cut`), and `cut` says how many the last death ended.
    open: OpenConnections = field(default_factory=OpenConnections)
    cut: int = 0

    @property
    def proxy_port(self) -> int:
        return self.listeners.frontdoor.getsockname()[1]

    @property
    def dns_port(self) -> int:
        return self.listeners.dns_udp.getsockname()[1]

    def describe(self) -> dict:
        return {
            "index": self.index,
            "pid": self.pid if self.up.is_set() else None,
            "sandboxes": len(self.sandboxes),
            "connections": self.stats.get("connections", 0),
            "restarts": self.restarts,
            "policy": self.policy if self.up.is_set() else None,  # a dead one serves none
            "proxy_port": self.proxy_port,
            "dns_port": self.dns_port,
            "tables": self.stats.get("tables", {}),
        }


class _Totals:
    """What Metrics.watch_gateway and the status read of the gate: summed over the
    workers' last stats (pushed every second)."""

    def __init__(self, workers: list[WorkerProcess]):
        self.workers = workers
        self.counts = self

    def _sum(self, key: str) -> int:
        return sum(int(w.stats.get(key, 0)) for w in self.workers if w.up.is_set())

    @property
    def connections(self) -> range:  # sized: len() is the open connections
        return range(self._sum("connections"))

    @property
    def open(self) -> int:
        return self._sum("open")

    @property
    def pending(self) -> int:
        return self._sum("pending")


class WorkerPool:
    def __init__(
        self,
        count: int,
        config: dict,
        policy: CompiledPolicy,
        sink: Callable[[Event | EncodedEvent], None],
        *,
        tally: Callable[[list], None] = lambda rows: None,
        restarting: Callable[[], None] = lambda: None,
        sink_batch: Callable[[list[EncodedEvent]], None] | None = None,
        audit: RateLimitedAudit | None = None,
        listen_host: str = "0.0.0.0",
    ):
        """`config`: what each worker needs (proxy/worker.py: dns_upstreams,
        dns_upstream_port, confdir, upstream_ca); `sink`: the service's event fanout
        (the workers' events come as `EncodedEvent`s); `sink_batch`, if given, takes
        each worker batch's events in one call instead (`EventFanout.emit_batch`: the
        same fanout, its per-event work done per batch); `tally`: takes the metrics the
        workers counted (`Metrics.add_tally`); `restarting`: told each time a worker
        that died is to be started again (`sandgate_worker_restarts_total`); `audit`: the audit rate limit in `sink`,
        started and stopped with the pool (as a Gateway does its own); `listen_host`:
        where the workers' sockets bind (every address, as one gateway's)."""
        self.listen_host = listen_host
        self.config = {**config, "service_pid": os.getpid(), "workers": count}
        self.policy = policy
        self.sink = sink
        self.sink_batch = sink_batch
        self.tally = tally
        self.restarting = restarting
        self.audit = audit
        self.workers: list[WorkerProcess] = []
        self._count = count
        self.by_address: dict[str, int] = {}  # sandbox address -> worker index
        self.registry = self.by_address  # len(): the sandboxes, as the metrics read it
        self.gate = _Totals(self.workers)
        # The workers share the confdir: the one that serves an inspecting sandbox has
        # made the CA before it acks `add_sandbox`.
        self.ca_cert = ca_cert_file(Path(config["confdir"]))
        self.approvals = WorkerApprovals(self._ask, count)
        self.audit_problem: str | None = None
        self.stopping = False
        self.pushing: asyncio.Task | None = None  # the last reload sent to the workers
        self._pushes = asyncio.Lock()  # one push after the other: the last sends the newest
        self._payload: tuple[str, bytes] | None = None  # the policy in force, pickled
        self._pickling = asyncio.Lock()
        # Told once a dead worker's successor serves (after its sandboxes' events).
        self.on_restart: Callable[[WorkerProcess, int, str], None] | None = None
        self._supervisors: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()
        self._audit_watch: asyncio.Task | None = None

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Make every worker's sockets, start the workers, wait until each serves."""
        if self.audit is not None:
            self.audit.start(asyncio.get_running_loop())
        for index in range(self._count):
            try:
                listeners = make_listeners(self.listen_host)
            except OSError as e:
                raise said(
                    e, f"gateway worker {index} cannot listen on {self.listen_host}"
                ) from None
            self.workers.append(WorkerProcess(index, listeners))
        self.approvals.start()
        first: list[asyncio.Future] = []
        for worker in self.workers:
            started = asyncio.get_running_loop().create_future()
            first.append(started)
            self._supervisors.append(
                asyncio.get_running_loop().create_task(self._supervise(worker, started))
            )
        for started in first:
            await started  # raises when a first start failed

    async def stop(self) -> None:
        """Stop every worker (each closes its connections, their end events come back
        and are handed on), then close the listening sockets."""
        self.stopping = True
        if self._audit_watch is not None:
            self._audit_watch.cancel()
        for worker in self.workers:
            if worker.link is not None and not worker.link.closed:
                with contextlib.suppress(LinkClosed, RuntimeError, TimeoutError):
                    await worker.link.request("stop", timeout=10)
        for worker in self.workers:
            if worker.link is not None:
                worker.link.close()
        if self._supervisors:
            await asyncio.wait(self._supervisors, timeout=10)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
            for sock in _sockets(worker.listeners):
                sock.close()
            if worker.blackbox is not None:  # its events are all in: nothing to recover
                worker.blackbox.close()
                worker.blackbox = None
        journal = getattr(getattr(self.audit, "audit", None), "journal", None)
        for worker in self.workers if journal is not None else ():
            with contextlib.suppress(OSError):
                worker_journal(journal, worker.index).unlink()
        await self.approvals.stop()
        if self.audit is not None:
            self.audit.stop()  # what the rate limit holds is written before the log closes

    async def _supervise(self, worker: WorkerProcess, started: asyncio.Future) -> None:
        """Start the worker; each time it dies, start it again (at once after a steady
        run, else ever more slowly); once the new one serves, a `worker_restarted`
        event for each of its sandboxes (the others saw nothing), and `on_restart`."""
        backoff = 0.0
        replaced: tuple[int, str] | None = None  # the dead worker's pid and exit
        while not self.stopping:
            began = time.monotonic()
            reading = None
            try:
                reading = await self._spawn(worker)
            except Exception as e:  # noqa: BLE001 - a failed restart is tried again
                if not started.done():
                    why = e.strerror if isinstance(e, OSError) and e.strerror else e
                    started.set_exception(WorkerStartError(f"gateway worker {worker.index}: {why}"))
                    return
                log.error("gateway worker %d did not start: %s", worker.index, e)
            else:
                if not started.done():
                    started.set_result(None)
                if replaced is not None:
                    self._restarted(worker, *replaced)
                await reading  # everything it sent is handled before it counts as dead
            code = await worker.process.wait() if worker.process is not None else None
            self._recover(worker, _exit_text(code))
            self._end_cut(worker, _exit_text(code))
            worker.up.clear()
            worker.stats = {}  # its connections died with it: no gauge counts them until the next push
            self.approvals.worker_gone(
                worker.index,
                f"gateway worker {worker.index} (pid {worker.pid}), which held it, exited with "
                f"{_exit_text(code)}; its held connections went with it (the task asks again "
                "if it retries)",
            )
            if self.stopping:
                return
            if reading is not None and worker.pid:
                replaced = (worker.pid, _exit_text(code))
            worker.restarts += 1
            self.restarting()
            lived = time.monotonic() - began
            backoff = 0.0 if lived >= STEADY_S else min(max(backoff * 2, 0.5), BACKOFF_MAX)
            log.error(
                "gateway worker %d (pid %d) exited with %s after %.1f s; restarting it%s",
                worker.index, worker.pid, _exit_text(code), lived,
                f" in {backoff:g} s" if backoff else "",
            )  # fmt: skip
            await asyncio.sleep(backoff)

    async def _spawn(self, worker: WorkerProcess) -> asyncio.Task:
        """Start worker's process on its sockets and `start` it: the service's policy,
        its sandboxes, the audit hold and the grants in force, all taken before it
        reads a socket; then it is up. Returns the task reading its link."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        room_for_a_burst(theirs)
        memfd, where = self._box_file(worker)
        fds = [theirs.fileno(), *(s.fileno() for s in _sockets(worker.listeners)), memfd]
        try:
            try:
                worker.blackbox, worker.received = map_backed(memfd, DEFAULT_SIZE), 0
            except OSError as e:  # a full state dir, say: which file
                raise said(e, f"its black box {where}") from None
            blank(worker.blackbox)
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-m", "sandgate.proxy.worker",
                "--index", str(worker.index), "--link", str(fds[0]),
                "--frontdoor", str(fds[1]), "--dns-udp", str(fds[2]), "--dns-tcp", str(fds[3]),
                "--blackbox", str(memfd), "--config", json.dumps(self.config),
                pass_fds=fds, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(memfd)  # the mapping stays
        worker.link = link = await Link.over(
            ours, lambda message: self._handle(worker, message), INTAKE_PERIOD
        )
        reading = asyncio.get_running_loop().create_task(link.run())
        # Its death is read at once: the batches it sent last, then the end of the link.
        died = asyncio.ensure_future(worker.process.wait())
        died.add_done_callback(lambda _: link.wake())
        waiting = asyncio.shield(died)
        given = list(worker.sandboxes.values())  # one added meanwhile: add_sandbox, once up
        grants = self.approvals.live_grants()  # `--for` approvals of the other workers
        starting = asyncio.ensure_future(self._start(worker, given, grants))
        done, _ = await asyncio.wait(
            [starting, waiting], timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        failed = starting not in done or starting.exception() is not None
        if failed:
            waiting.cancel()
            starting.cancel()
            if worker.process.returncode is None:
                worker.process.kill()
            await reading
            await worker.process.wait()
            if starting.done() and not starting.cancelled():
                why = starting.exception()
                if not isinstance(why, LinkClosed):
                    raise RuntimeError(f"did not start: {why}")
            raise RuntimeError(
                f"exited with {_exit_text(worker.process.returncode)} before it served"
                if waiting in done or starting.done()
                else f"not ready within {READY_TIMEOUT:g} s"
            )
        waiting.cancel()
        reply = starting.result()
        worker.pid, worker.policy = int(reply["pid"]), str(reply["policy"])
        for sandbox in given:  # detached while it started: forgotten there too
            if worker.sandboxes.get(sandbox.address) is not sandbox:
                await self._request_quietly(worker, "remove_sandbox", address=sandbox.address)
        granted = {grant.get("id") for grant in grants}
        for grant in self.approvals.live_grants():  # given since
            if grant.get("id") not in granted:
                await self._request_quietly(worker, "grant", approval=grant)
        while worker.policy != self.policy.hash:  # the service reloaded while it started
            sent = await self._reload_one(worker, "the worker's start", starting=True)
            if sent["policy"] is None:  # it died (its successor starts with the newest)
                log.error("gateway worker %d: policy %s not taken: %s", worker.index,
                          self.policy.hash, "; ".join(sent["errors"]))  # fmt: skip
                break
        # Up with no await since the last look at the policy: a swap from now on is
        # pushed to it (push_policy), one before was sent by the loop above.
        worker.up.set()
        return reading

    async def _start(self, worker: WorkerProcess, given: list[Sandbox], grants: list[dict]) -> dict:
        """The worker's `start` request and its reply (worker.py, `op_start`)."""
        policy_hash, payload = await self._policy_payload()
        return await worker.link.request(
            "start",
            timeout=None,  # the caller's READY_TIMEOUT
            payload=payload,
            policy=policy_hash,
            sandboxes=[_sandbox_fields(sandbox) for sandbox in given],
            audit_problem=self.audit_problem,
            grants=grants,
        )

    async def _policy_payload(self) -> tuple[str, bytes]:
        """The service's policy in force and its payload for a worker (worker_link.
        policy_payload), kept for the next worker that starts (100k rules: 0.64 s to
        make, 10.5 MB kept)."""
        async with self._pickling:
            policy = self.policy
            if self._payload is None or self._payload[0] != policy.hash:
                self._payload = (policy.hash, await asyncio.to_thread(policy_payload, policy))
            return self._payload

    def _box_file(self, worker: WorkerProcess) -> tuple[int, str]:
        """A descriptor of the file the worker's black box will be, and what it is: next
        to the audit journal (audit.worker_journal), which the next start reads if the
        service is killed; a memfd without a journal (it only outlives the worker, not us)."""
        journal = getattr(getattr(self.audit, "audit", None), "journal", None)
        if journal is None:
            name = f"sandgate-worker-{worker.index}-blackbox"
            return os.memfd_create(name, os.MFD_CLOEXEC), f"(memfd {name})"
        path = worker_journal(journal, worker.index)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path, flags, 0o600), str(path)

    def _handle(self, worker: WorkerProcess, message: dict):
        op = message.get("op")
        if op == "events":
            self._take_events(worker, message)
        elif op == "approval":
            self.approvals.changed(worker.index, str(message["what"]), message["approval"])
        elif op == "stats":
            worker.stats = message
        elif op == "always" and "id" in message:
            return self.approvals.persist_always(message)
        elif "id" in message:
            raise ValueError(f"the service takes no {str(op)[:40]!r} requests")
        return None

    def _restarted(self, worker: WorkerProcess, dead_pid: int, how: str) -> None:
        for sandbox in list(worker.sandboxes.values()):
            self.emit(
                Event(
                    kind=EventKind.TASK,
                    verdict=Verdict.DENY,
                    reason=Reason.WORKER_RESTARTED,
                    task_id=sandbox.task_id,
                    sandbox=sandbox.address,
                    profile=sandbox.profile,
                    detail=f"gateway worker {worker.index} (pid {dead_pid}) died ({how}): "
                    f"the sandbox's open connections were cut ({worker.cut} over the "
                    f"worker's sandboxes, each given a connection_end saying so) and new "
                    f"ones waited; "
                    f"{worker.recovered[0]} events it had made but not sent were read "
                    f"back from its black box, {worker.recovered[1]} lost; "
                    f"restarted as pid {worker.pid} ({worker.restarts} restarts)",
                )
            )
        if self.on_restart is not None:
            self.on_restart(worker, dead_pid, how)

    def _recover(self, worker: WorkerProcess, how: str) -> None:
        """The events the dead worker made past the last it sent, from its black box,
        into the fanout (audit log, metrics, summaries), each marked recovered. Read
        after waitpid: its exit is a full barrier, every store it made is visible."""
        box, worker.blackbox = worker.blackbox, None
        if box is None:
            return
        try:
            found = recover(box, worker.received)
        finally:
            box.close()
        mark = f"recovered from gateway worker {worker.index}'s black box (pid {worker.pid}, {how})"
        events, lost = [], found.lost
        for payload in found.payloads:
            try:
                event = decode_members(payload)
            except (ValueError, RecursionError) as e:  # RecursionError: [[[[... too deep
                log.error("gateway worker %d: a bad black box record: %s", worker.index, e)
                lost += 1
                continue
            events.append(
                event.with_fields(detail=f"{event.detail}; {mark}" if event.detail else mark)
            )
        worker.recovered = (len(events), lost)
        if lost and self.audit is not None:
            self.audit.count_lost(lost)  # sandgate_audit_events_lost_total
        if events:
            worker.open.follow(events)
            self._sink_all(events)
        if events or lost:
            log.error("gateway worker %d (pid %d, %s): %d unsent events recovered, %d lost",
                      worker.index, worker.pid, how, len(events), lost)  # fmt: skip

    def _end_cut(self, worker: WorkerProcess, how: str) -> None:
        """A `connection_end` for each allowed connection the dead worker had open
        (proxy/telemetry/open_connections.py): its own died with it."""
        why = f"the death of gateway worker {worker.index} (pid {worker.pid}, {how})"
        ends = worker.open.cut(why)
        worker.cut = len(ends)
        if ends:
            self._sink_all(ends)
            log.error("gateway worker %d (pid %d, %s): %d open connections cut",
                      worker.index, worker.pid, how, len(ends))  # fmt: skip

    def _take_events(self, worker: WorkerProcess, message: dict) -> None:
        """One `events` batch (proxy/worker.py, EventBatcher) into the sink, in order."""
        with contextlib.suppress(ValueError, TypeError):
            worker.received = max(worker.received, int(message.get("last", 0)))
        rows, members = message["events"], message.get("payload", b"").split(b"\n")
        if len(rows) != len(members):
            log.error("gateway worker %d sent %d events with %d audit lines; dropped",
                      worker.index, len(rows), len(members))  # fmt: skip
            return
        events = []
        for row, line in zip(rows, members, strict=True):
            try:
                events.append(EncodedEvent(line, *row))
            except (ValueError, TypeError) as e:
                log.error("gateway worker %d sent a bad event: %s", worker.index, e)
        worker.open.follow(events)
        self._sink_all(events)  # into the audit journal, then:
        with contextlib.suppress(ValueError, TypeError, struct.error):
            if "pos" in message and worker.blackbox is not None:
                take(worker.blackbox, int(message["last"]), int(message["pos"]))
        try:
            self.tally(message.get("metrics", []))
        except (ValueError, TypeError) as e:
            log.error("gateway worker %d sent bad metrics: %s", worker.index, e)

    def _sink_all(self, events: list[Event | EncodedEvent]) -> None:
        if self.sink_batch is not None:
            self.sink_batch(events)
        else:
            for event in events:
                self.sink(event)

    # --- sandboxes ----------------------------------------------------------------------

    def assign(self) -> int:
        """The worker a new sandbox network goes to: the one with the fewest (or, for
        bench/bench_workers.py's control run only, the one PIN_ENV names)."""
        pinned = os.environ.get(PIN_ENV, "")
        if pinned.isdigit() and int(pinned) < len(self.workers):
            worker = self.workers[int(pinned)]
        else:
            worker = min(self.workers, key=lambda w: (w.assigned, w.index))
        worker.assigned += 1
        return worker.index

    def release(self, index: int) -> None:
        if 0 <= index < len(self.workers):
            self.workers[index].assigned = max(0, self.workers[index].assigned - 1)

    def ports(self, index: int) -> tuple[int, int]:
        worker = self.workers[index]
        return worker.proxy_port, worker.dns_port

    def all_ports(self) -> tuple[list[int], list[int]]:
        return [w.proxy_port for w in self.workers], [w.dns_port for w in self.workers]

    async def add_sandbox(self, index: int, sandbox: Sandbox) -> None:
        """Register `sandbox` with worker `index` and wait for its ack (a worker being
        restarted takes it when it comes up)."""
        worker = self.workers[index]
        worker.sandboxes[sandbox.address] = sandbox
        self.by_address[sandbox.address] = index
        await asyncio.wait_for(worker.up.wait(), READY_TIMEOUT)
        try:
            await worker.link.request("add_sandbox", **_sandbox_fields(sandbox))
        except LinkClosed:  # died meanwhile: its successor registers it as it starts
            await asyncio.wait_for(worker.up.wait(), READY_TIMEOUT)
        except RuntimeError:
            self.remove_sandbox(sandbox.address)
            raise

    def remove_sandbox(self, address: str) -> None:
        """Forget `address` here and in its worker (the request goes out now; its
        answer is not waited for)."""
        worker = self._forget(address)
        if worker is not None and worker.up.is_set() and worker.link is not None:
            self._spawn_task(self._request_quietly(worker, "remove_sandbox", address=address))

    def _forget(self, address: str) -> WorkerProcess | None:
        """`address` no longer here: the worker that served it, if one did."""
        index = self.by_address.pop(address, None)
        if index is None:
            return None
        worker = self.workers[index]
        worker.sandboxes.pop(address, None)
        return worker

    async def retire(self, address: str) -> None:
        """`address` forgotten by its worker, then the events it made for it before
        in the sink: the worker answers the removal, then sends what it holds for its
        next tick and answers the flush (a link's requests are handled in order)."""
        worker = self._forget(address)
        if worker is None or not worker.up.is_set() or worker.link is None:
            return  # none, or dead: what it held is lost, `worker_restarted` says so
        for op, fields in (("remove_sandbox", {"address": address}), ("flush", {})):
            with contextlib.suppress(LinkClosed, RuntimeError, TimeoutError):
                await worker.link.request(op, timeout=SETTLE_TIMEOUT, **fields)

    async def gateway_ca(self) -> Path:
        return self.ca_cert

    # --- what the service reads and tells, as it would of one Gateway ---------------------

    def emit(self, event: Event) -> None:
        """The service's own events (control actions, task start and end): stamped as
        `Gateway.emit` stamps them, then into the same fanout as the workers'."""
        self.sink(stamped(event, self.policy.hash, self._sandbox_at))

    def _sandbox_at(self, address: str) -> Sandbox | None:
        index = self.by_address.get(address)
        return None if index is None else self.workers[index].sandboxes.get(address)

    def swap_policy(self, new: CompiledPolicy, *, cause: str = "") -> SwapReport:
        """The reloader's swap: the service's policy now, one `policy_loaded` event for
        the whole service, and every worker told to reload (`pushing`; each closes the
        connections the new policy denies, with their events)."""
        old, self.policy = self.policy, new
        workers = f"{len(self.workers)} workers"
        self.emit(policy_loaded(old, new, f"{workers}; {cause}" if cause else workers))
        self.pushing = asyncio.get_running_loop().create_task(self.push_policy(cause))
        return SwapReport(old.hash, new.hash, new.rule_count, 0, 0)

    async def push_policy(self, cause: str) -> list[dict]:
        """Every worker is sent the service's policy and reports its hash; one whose
        hash differs from the service's (a newer reload meanwhile) is sent it again.
        One entry per worker. Pushes go one after the other: each sends the policy
        in force when it sends, so the last leaves every worker on the newest."""
        async with self._pushes:
            return list(await asyncio.gather(*(self._reload_one(w, cause) for w in self.workers)))

    async def _reload_one(self, worker: WorkerProcess, cause: str, starting: bool = False) -> dict:
        """Send `worker` the policy in force (`starting`: the spawn's own, before the
        worker is up; else only a worker that is up: one starting, or dead and to be
        started again, is given the policy in force by its `start`)."""
        entry = {"index": worker.index, "pid": worker.pid, "closed": 0, "errors": []}
        if not (starting or worker.up.is_set()) or worker.link is None:
            why = "not running: it is given the service's policy when it starts"
            return {**entry, "ok": False, "policy": None, "errors": [why]}
        for _ in range(RELOAD_TRIES):
            try:
                policy_hash, payload = await self._policy_payload()
                reply = await worker.link.request(
                    "reload", timeout=READY_TIMEOUT, payload=payload, policy=policy_hash,
                    actor=cause,
                )  # fmt: skip
            except (LinkClosed, RuntimeError, TimeoutError, ValueError) as e:
                # a worker that died meanwhile is given the policy in force when it starts
                return {**entry, "ok": False, "policy": None, "errors": [f"{e}"[:500]]}
            worker.policy = reply["policy"]
            entry["closed"] += int(reply.get("closed", 0))
            entry["errors"] = reply.get("errors", [])
            if worker.policy == self.policy.hash:
                return {**entry, "ok": True, "policy": worker.policy}
        return {**entry, "ok": False, "policy": worker.policy}

    async def reloaded(self, reply: dict) -> None:
        """The service's reload `reply`, with each worker's report of the push; not ok
        when a worker did not take the policy."""
        if self.pushing is None:
            return
        workers = reply["workers"] = await self.pushing
        reply["swap"]["connections_closed"] = sum(w["closed"] for w in workers)
        behind = [w for w in workers if not w["ok"]]
        if behind:
            reply["ok"] = False
            reply["error"] = "; ".join(
                f"worker {w['index']} (pid {w['pid']}) did not take policy {reply['policy']}: "
                f"{'; '.join(w['errors']) or 'it has ' + str(w['policy'])}"
                for w in behind
            )

    def guard_audit(self, audit) -> None:
        """--on-audit-failure block: tell the workers when `audit` (an AuditLog) stops (or
        starts again) being writable; they refuse new connections meanwhile."""
        self._audit_watch = asyncio.get_running_loop().create_task(self._watch_audit(audit))

    async def _watch_audit(self, audit) -> None:
        told: str | None = None
        while not self.stopping:
            problem = None if audit.writable else (audit.problem or "not writable")
            if problem != told:
                told = problem
                await self._hold_audit(problem)
            await asyncio.sleep(AUDIT_CHECK_S)

    async def _hold_audit(self, problem: str | None) -> None:
        """The service's audit log cannot be written (`problem`), or can again (None):
        every worker refuses new connections meanwhile."""
        self.audit_problem = problem
        for worker in self.workers:
            if worker.up.is_set():
                await self._request_quietly(worker, "audit_hold", problem=problem)

    def describe(self) -> list[dict]:
        return [w.describe() for w in self.workers]

    def table_sizes(self) -> dict[str, int]:
        """The pool's per-sandbox tables on the service's side (`status` tables)."""
        return {
            "pool_sandboxes": len(self.by_address),
            "worker_sandboxes": sum(len(w.sandboxes) for w in self.workers),
            "worker_open_connections": sum(len(w.open.open) for w in self.workers),
            "pool_tasks": len(self._tasks),
            "approvals_pending": len(self.approvals.pending),
            "approval_grants": len(self.approvals.grants),
        }

    # --- helpers ------------------------------------------------------------------------

    async def _ask(self, index: int, op: str, fields: dict) -> dict:
        """A request to worker `index` (the approvals' route); LinkClosed if it is down."""
        worker = self.workers[index]
        if worker.link is None or worker.link.closed:
            raise LinkClosed(f"gateway worker {index} is not running")
        return await worker.link.request(op, timeout=None, **fields)

    async def _request_quietly(self, worker: WorkerProcess, op: str, **fields) -> None:
        try:
            await worker.link.request(op, timeout=30, **fields)
        except (LinkClosed, RuntimeError, TimeoutError) as e:
            log.warning("gateway worker %d: %s: %s", worker.index, op, e)

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def room_for_a_burst(sock: socket.socket) -> None:
    """LINK_SNDBUF on a worker's end of its link (past the sysctl's cap as root: the
    service's; an unprivileged caller gets what the cap allows)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, LINK_SNDBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_SNDBUF)


def _sockets(listeners: Listeners) -> tuple[socket.socket, ...]:
    return listeners.frontdoor, listeners.dns_udp, listeners.dns_tcp


def _sandbox_fields(sandbox: Sandbox) -> dict:
    return {"address": sandbox.address, "task_id": sandbox.task_id, "profile": sandbox.profile}


def _exit_text(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
