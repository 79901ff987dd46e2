"""`sandgate gateway`: one long-lived gateway that many sandboxes attach to.

The service owns what must be consistent across tasks: the compiled policy (reloaded
in place), the gateway's listeners (the front door, mitmproxy, the DNS filter), the
sandbox registry, the audit log and /metrics. A runner (`sandgate run --gateway`)
asks it over the control socket (enforcer/control.py) for a sandbox network; the
service creates the netns and veth, registers the address with the task's profile,
loads the sandbox's own nftables table (redirecting to the service's ports), and
hands back where things are. The runner builds the task sandbox itself and runs the
task; when its connection closes (detach, or the runner died) the service removes
the sandbox network and table.

Fail closed: if the service dies, every sandbox's table still redirects to ports
nobody listens on, so no sandbox has egress. A restarted service reads the state
it left under RUN_DIR/<run id>/service.json: a sandbox whose runner still lives is
re-adopted (registered again, its table pointed at the new ports), the others are
removed; each with an event. The listeners bind every address of the namespace, so
one more table (`sandgatesvc_<hash of the control socket's path>`) drops whatever
reaches those ports from anywhere but a sandbox interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandgate.enforcer import (
    approvals_control,
    control,
    handoff,
    netns,
    nft,
    priority,
    process_stamp,
)
from sandgate.enforcer.admin import Admin, AdminOptions, listen_refusal
from sandgate.enforcer.dataplane import DataPlane, open_data_plane
from sandgate.enforcer.run import (
    AUDIT_DIR,
    CA_ENV_VARS,
    RUN_DIR,
    STATE_DIR,
    SYSTEM_CA_BUNDLE,
    TABLE_PREFIX,
    RunError,
    _write_ca_bundle,
    claim_run_id,
    dns_upstreams,
    java_truststore_file,
    make_dir,
    make_sandbox_net,
    open_audit_log,
    os_error_text,
    unwire,
)
from sandgate.enforcer.sandbox import id_slots
from sandgate.enforcer.service_state import claim, guard_table, release
from sandgate.enforcer.workers import WorkerStartError
from sandgate.proxy.frontdoor.poller import new_event_loop
from sandgate.proxy.gateway import GatewayConfig, inspects
from sandgate.proxy.policy import PolicyError, load_policy
from sandgate.proxy.policy.load import approved_overlay
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.reload import PolicyReloader
from sandgate.proxy.telemetry import task_events
from sandgate.proxy.telemetry.audit import AuditLog
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind
from sandgate.proxy.telemetry.flood import FloodLimits
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.telemetry.summary import TaskSummary

log = logging.getLogger("sandgate.gateway")

STATE_FILE = "service.json"
JAVA_TRUSTSTORE = "java-cacerts.jks"  # in a task's directory, beside its ca-bundle.pem
SERVICE_AUDIT_LOG = AUDIT_DIR / "gateway.jsonl"
CONTROL_GROUP = "sandgate"
ADOPTED_CHECK_S = 1.0
# How long the end of a sandbox whose runner did not detach waits for the runner to
# be gone before it frees what the runner held (`_free_runners_slot`).
RUNNER_EXIT_WAIT_S = 3.0
REFILL_AFTER_S = 1.0  # a spare taken while another remains is replaced by then (_refill_later)


@dataclass
class ServiceOptions:
    rules: Path
    dns_upstreams: list[str] = field(default_factory=list)
    extra_ca: list[str] = field(default_factory=list)  # --extra-ca's PEM, read once (cli/common.py)
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9464)
    admin: AdminOptions = field(default_factory=AdminOptions)
    control: Path = control.DEFAULT_SOCKET
    audit_log: Path = SERVICE_AUDIT_LOG
    audit_budget: int | None = None
    on_audit_failure: str = "block"
    audit_limits: FloodLimits = field(default_factory=FloodLimits)  # --audit-rate, --audit-burst
    grace: float = 30.0
    pool: str = str(netns.DEFAULT_POOL)
    warm: int = 2  # sandbox networks made ahead, so that an attach does not wait for one;
    # as many runners started ahead (enforcer/zygote.py), so that a run does not wait
    # for an interpreter and its imports
    runners: str = "service"  # "external": a `sandgate runners` of its own keeps them
    workers: int = 1  # data path processes (enforcer/workers.py); 1: in this process


@dataclass
class Attached:
    """One sandbox the service wired: its network, table, run dir and task summary."""

    run_id: str
    profile: str
    address: str
    gateway_ip: str
    runner_pid: int
    command: list[str]
    summary: TaskSummary
    started: float = field(default_factory=time.time)
    runner_start: int | None = None  # the runner's start time: its pid may be reused
    connected: bool = True  # False: re-adopted after a restart, until its runner resumes
    rules_hash: str = ""
    worker: int = -1  # its data plane slot: the worker its table points at (--workers N > 1)
    table_rates: dict | None = None  # its loaded table's (nft.table_rates); None: none loaded
    inspected: bool = False  # its profile inspects TLS (at its attach): its CA bundle has ours

    @property
    def dir(self) -> Path:
        return RUN_DIR / self.run_id

    @property
    def table(self) -> str:
        return TABLE_PREFIX + self.run_id

    def to_dict(self) -> dict:
        return {
            "task_id": self.run_id,
            "profile": self.profile,
            "address": self.address,
            "runner_pid": self.runner_pid,
            "rules_hash": self.rules_hash,
            "connected": self.connected,
            "worker": self.worker,
            "started": round(self.started, 3),
            "command": self.command,
        }


class GatewayService:
    def __init__(self, opts: ServiceOptions):
        self.opts = opts
        self.sandboxes: dict[str, Attached] = {}
        self.metrics = Metrics()
        self.audit: AuditLog | None = None
        self.data_plane: DataPlane | None = None  # the in-process gateway or the workers
        self.draining = False
        self.started = time.monotonic()
        self.stopped = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self.admin: Admin | None = None
        self.state_dir: Path | None = None  # service_state.claim's, once started
        self._tasks: set[asyncio.Task] = set()
        # Warm spares: netns, veth and table made and loaded, no task and no profile yet
        # (traffic from one is an unknown source until an attach registers it).
        self.spares: list[Attached] = []
        self._filling = False
        self._refill_timer: asyncio.TimerHandle | None = None  # a deferred refill (_attach)
        self._unwiring: set[asyncio.Task] = set()  # removals still running after the reply
        # Attaches making a network and sandboxes' ends under way: the stop waits for them.
        self._under_way = 0
        self.runners: set[str] = set()  # the sockets of warm runners (enforcer/zygote.py)
        self._zygote: asyncio.subprocess.Process | None = None

    # --- life cycle -----------------------------------------------------------------

    async def run(self) -> int:
        try:
            await self._start()
        except (RunError, PolicyError, netns.SandboxNetError, nft.NftError, OSError) as e:
            await self._shutdown()
            raise RunError(os_error_text(e) if isinstance(e, OSError) else str(e)) from None
        loop = asyncio.get_running_loop()
        self.reloader.install_sighup(loop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        self._spawn(self._watch_adopted())
        self._spawn(self.reloader.watch())
        self._refill()
        if self.opts.warm and self.opts.runners == "service":
            self._spawn(self._keep_runners())
        print(
            f"sandgate gateway: serving on {self.opts.control} "
            f"(policy {self.data_plane.policy.hash}, {len(self.sandboxes)} sandboxes re-adopted)",
            file=sys.stderr,
            flush=True,
        )
        await self.stopped.wait()
        await self._shutdown()
        return 0

    async def _start(self) -> None:
        opts = self.opts
        # Before anything is set up: a second service would replace the first's guard
        # table and, failing later on the socket, delete it (the sandboxes would reach
        # the gateway's own ports) and write into its audit log.
        _refuse_if_served(opts.control)
        policy = await asyncio.to_thread(load_policy, [opts.rules])
        upstreams = dns_upstreams(opts.dns_upstreams)
        self.audit = open_audit_log(opts.audit_log, opts.audit_budget)
        make_dir(RUN_DIR, "SANDGATE_RUN_DIR")
        # Before the guard table: gc takes a recorded owner's, once it is gone.
        self.state_dir = own = claim(opts.control)
        upstream_ca = own / "upstream-ca.pem"  # state, not a run: RUN_DIR holds runs only
        _write_ca_bundle(upstream_ca, opts.extra_ca)
        config = GatewayConfig(
            listen_host="0.0.0.0",
            dns_upstreams=upstreams,
            confdir=STATE_DIR / "ca",
            upstream_ca=upstream_ca,
        )
        audit = RateLimitedAudit(self.audit, opts.audit_limits, self.metrics.count_suppressed)
        data_plane = self.data_plane = open_data_plane(
            opts.workers, config, policy, audit, self.metrics, self
        )
        self.reloader = PolicyReloader([opts.rules], data_plane)
        try:
            await data_plane.start()
        except (OSError, WorkerStartError) as e:  # which listener or worker, and why
            why = os_error_text(e) if isinstance(e, OSError) else e
            raise RunError(f"the gateway did not start: {why}") from None
        if opts.on_audit_failure == "block":
            data_plane.guard_audit(self.audit)
        # `always` approvals (with workers: asked by the worker that holds the approval)
        data_plane.approvals.on_always = approvals_control.always_writer(
            approved_overlay([opts.rules]), self._reload_for_approval
        )
        guard = nft.render_guard(guard_table(opts.control), *data_plane.all_ports())
        await asyncio.to_thread(nft.apply_ruleset, guard)
        self._serve_metrics()
        self.admin = Admin(
            opts.admin,
            data_plane.approvals,
            self.metrics.approval_webhook_failures.inc,
            self.metrics.admin_auth_failures.inc,
        )
        await self.admin.start(own / "admin-token", "sandgate gateway")
        data_plane.emit(
            Event(
                kind=EventKind.POLICY,
                verdict=Verdict.ALLOW,
                reason=Reason.POLICY_LOADED,
                detail=f"gateway service started: {policy.rule_count} rules from "
                f"{', '.join(policy.files)}"[:1000],
            )
        )
        await self._readopt()
        await self._listen_control()

    def _serve_metrics(self) -> None:
        self.metrics.watch_gateway(self.data_plane)
        self.metrics.watch_audit(self.audit)
        self.metrics.watch_firewall_ended(nft.COUNTERS)
        if self.opts.metrics_listen is not None:
            host, port = self.opts.metrics_listen
            try:
                self.metrics.serve(host, port)
            except OSError as e:
                # The address given, or the default: not served, the service does not
                # start (docs/operations.md): whoever has the port would answer the
                # scrapes, and its `sandgate_audit_writable 1` silence the alerts.
                raise RunError(listen_refusal("--metrics-listen", host, port, e)) from None

    async def _listen_control(self) -> None:
        path = self.opts.control
        make_dir(path.parent, "--control")
        _refuse_if_served(path)  # again: one may have started since _start's look
        old_umask = os.umask(0o177)  # no moment in which others could connect
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, str(path), limit=control.MAX_LINE
            )
        except OSError as e:
            raise RunError(f"--control {path}: cannot listen: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        group = _group_id(CONTROL_GROUP)
        if group is not None:
            os.chown(path, 0, group)
        os.chmod(path, 0o660)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                self.opts.control.unlink()
        # Connections still open may have begun an attach, or a sandbox's end (its runner
        # left as the stop came): such a sandbox is not in `sandboxes`, and not yet
        # among `_unwiring`, until it is done.
        while self._under_way:
            await asyncio.sleep(0.01)
        for attached in list(self.sandboxes.values()):
            await self._remove(attached, "the gateway service stopped", runner_lost=True)
        if self._refill_timer is not None:
            self._refill_timer.cancel()
        while self._filling:
            await asyncio.sleep(0.01)
        for spare in self.spares:
            self._unwire_later(spare)
        self.spares.clear()
        if self._zygote is not None:  # its waiting runners die with it: no run is theirs
            with contextlib.suppress(ProcessLookupError):
                self._zygote.terminate()  # not kill: it removes their cgroups made ahead
            try:
                await asyncio.wait_for(self._zygote.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._zygote.kill()
                await self._zygote.wait()
        for path in self.runners:
            with contextlib.suppress(OSError):
                os.unlink(path)
        while self._unwiring:  # also those that begin meanwhile
            await asyncio.wait(set(self._unwiring))
        if self.admin is not None:
            await self.admin.stop()
        if self.state_dir is not None:  # a second service's: its token is void now
            release(self.state_dir)
        if self.data_plane is not None:
            with contextlib.suppress(nft.NftError):
                await asyncio.to_thread(nft.delete_table, guard_table(self.opts.control))
            await self.data_plane.stop()
        self.metrics.stop()
        if self.audit is not None:
            self.audit.close()

    def _on_stop_signal(self, signum: int) -> None:
        self._spawn(self.drain(self.opts.grace, f"signal {signal.Signals(signum).name}"))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- events: the audit log and metrics get all; each task's summary its own --------

    def emit(self, event: Event | EncodedEvent) -> None:
        attached = self.sandboxes.get(event.task_id) if event.task_id else None
        if attached is not None:
            attached.summary.emit(event)

    def emit_batch(self, events: list[Event | EncodedEvent]) -> None:
        """A worker's batch: each task's events to its summary in one call."""
        by_task: dict[str, list[Event | EncodedEvent]] = {}
        for event in events:
            if event.task_id:
                by_task.setdefault(event.task_id, []).append(event)
        for task_id, own in by_task.items():
            attached = self.sandboxes.get(task_id)
            if attached is not None:
                attached.summary.emit_batch(own)

    def _control_event(
        self,
        peer: str,
        detail: str,
        *,
        kind=EventKind.TASK,
        attached: Attached | None = None,
        verdict=Verdict.ALLOW,
        reason=Reason.RULE_ALLOW,
        **fields,
    ) -> None:
        """Every control action goes to the audit log with who asked (SO_PEERCRED)."""
        common = (
            {"task_id": attached.run_id, "sandbox": attached.address, "profile": attached.profile}
            if attached
            else {}
        )
        self.data_plane.emit(
            Event(
                kind=kind,
                verdict=verdict,
                reason=reason,
                detail=f"{detail} (by {peer})"[:1000],
                **common,
                **fields,
            )
        )

    # --- control connections ------------------------------------------------------------

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer, peer_pid = _peer(writer)
        mine: Attached | None = None  # the sandbox this connection holds, if any
        detached = False
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, {"ok": False, "error": "request too long"})
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):  # RecursionError: [[[[... too deep
                    await _reply(writer, {"ok": False, "error": "not a JSON object"})
                    continue
                cmd = request.get("cmd")
                try:
                    if cmd == "resume" and mine is None:
                        mine = self._resume(request, peer, peer_pid)
                        await _reply_with_netns(writer, self._attach_reply(mine), mine)
                        continue
                    elif cmd == "attach" and mine is None:
                        mine = await self._attach(request, peer, peer_pid)
                        # Asked for (attach.py): the reply first, and a second line once
                        # the sandbox is served, while the runner prepares its sandbox.
                        ready_line = request.get("ready_line") is True
                        if ready_line:
                            reply = self._attach_reply(mine) | {"ready_line": True}
                            await _reply_with_netns(writer, reply, mine)
                        try:
                            await self._serve_attached(mine, peer)
                        except BaseException:
                            mine = None  # removed: this connection holds no sandbox
                            raise
                        if not ready_line:
                            await _reply_with_netns(writer, self._attach_reply(mine), mine)
                            continue
                        reply = {"ok": True, "ready": True}
                    elif cmd == "event" and mine is not None:
                        reply = self._runner_event(mine, request)
                    elif cmd == "detach" and mine is not None:
                        reply = await self._detach(mine, request, peer)
                        detached = True
                    elif cmd in ("attach", "resume", "event", "detach"):
                        reply = {"ok": False, "error": f"{cmd}: not on this connection"}
                    elif cmd == "watch":
                        await approvals_control.watch(self.data_plane.approvals, reader, writer)
                        break
                    elif cmd in approvals_control.COMMANDS:
                        reply = await approvals_control.handle(
                            self.data_plane.approvals, request, approvals_control.peer_user(writer)
                        )
                    else:
                        reply = await self._query(cmd, request, peer)
                except (RunError, netns.SandboxNetError, nft.NftError, OSError) as e:
                    reply = {"ok": False, "error": f"{cmd}: {e}"}
                except Exception as e:  # noqa: BLE001 - a control request never takes the service down
                    log.exception("control request %r failed", cmd)
                    reply = {
                        "ok": False,
                        "error": f"{cmd}: internal error ({type(e).__name__}); see the service's log",
                    }
                await _reply(writer, reply)
                if detached:
                    if self._refill_timer is not None:  # deferred by an attach: its run is over
                        self._refill()
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if mine is not None and not detached and mine.run_id in self.sandboxes:
                await self._remove(mine, "its runner went away", runner_lost=True)
            writer.close()

    async def _query(self, cmd, request: dict, peer: str) -> dict:
        if cmd == "status":
            policy = self.data_plane.policy
            return {
                "ok": True,
                "pid": os.getpid(),
                "policy": policy.hash,
                "rules": policy.rule_count,
                "rule_files": list(policy.files),
                "sandboxes": len(self.sandboxes),
                "spares": len(self.spares),
                "warm_runners": self._warm_runners(),
                "runners_pid": _pool_pid(str(self.opts.control)),
                "connections": self.data_plane.gate.counts.open,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "draining": self.draining,
                "control": str(self.opts.control),
                "workers": self.data_plane.describe(),
                "tables": self._table_sizes(),
            }
        if cmd == "sandboxes":
            return {"ok": True, "sandboxes": [a.to_dict() for a in self.sandboxes.values()]}
        if cmd == "reload":
            return await self.reload("control socket", peer)
        if cmd == "stop":
            grace = request.get("grace", self.opts.grace)
            if not isinstance(grace, int | float) or grace < 0:
                return {"ok": False, "error": "stop: grace must be a number of seconds >= 0"}
            self._spawn(self.drain(float(grace), peer))
            return {
                "ok": True,
                "draining": True,
                "sandboxes": len(self.sandboxes),
                "grace": float(grace),
            }
        return {
            "ok": False,
            "error": f"unknown command {str(cmd)[:40]!r} (status, sandboxes, reload, stop, "
            "approvals, approval, approve, deny, watch)",
        }

    def _table_sizes(self) -> dict[str, int]:
        """The service's own tables (each worker's are in its `workers` entry): what a
        service that runs for months must give back after each task."""
        sizes = {
            "sandboxes": len(self.sandboxes),
            "spares": len(self.spares),
            "tasks": len(self._tasks),
            "unwiring": len(self._unwiring),
            "runners": len(self.runners),
            "asyncio_tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
        }
        sizes.update(getattr(self.data_plane, "table_sizes", dict)())
        return sizes

    # --- sandboxes --------------------------------------------------------------------------

    async def _attach(self, request: dict, peer: str, peer_pid: int) -> Attached:
        """A sandbox network for the runner at the other end. Its pid is the
        connection's (SO_PEERCRED), never one the request names: the service signals
        the runner at its stop and `sandgate gc` keeps the run while it lives, so a
        named pid would let any member of the socket's group have root kill, or keep
        alive, a process of its choosing."""
        claimed = request.get("runner_pid")
        if claimed is not None and claimed != peer_pid:
            raise RunError(f"runner_pid {str(claimed)[:20]} is not the connecting process")
        if self.draining:
            raise RunError("the gateway service is stopping: no new sandboxes")
        with self._counted_under_way():  # until it is in `sandboxes`, or gone
            profile = request.get("profile", "default")
            policy = self.data_plane.policy
            if not isinstance(profile, str) or profile not in policy.profiles:
                raise RunError(
                    f"no profile {str(profile)[:60]!r} in the service's rules "
                    f"(profiles: {', '.join(policy.profiles)})"
                )
            command = request.get("command", [])
            if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
                raise RunError("command: expected a list of strings")
            attached = self.spares.pop() if self.spares else await self._new_network(profile)
            if self.spares:  # the next attach has one still: replace this one off this start
                self._refill_later()
            else:
                self._refill()
            try:  # from here on the network is this attach's: any failure removes it
                attached.profile, attached.rules_hash = profile, policy.hash
                attached.command = [a[:200] for a in command][:50]
                attached.runner_pid = peer_pid
                attached.runner_start = process_stamp.start_time(attached.runner_pid)
                attached.started = time.time()
                # Decided once, for the reply and the task's files both (a reload may come
                # between).
                attached.inspected = inspects(policy, profile)
                # `sandgate gc`: the run lives while its runner does
                (attached.dir / "pid").write_text(process_stamp.stamp(attached.runner_pid))
                self._write_state(attached)
                self.sandboxes[attached.run_id] = attached
            except BaseException:
                await self._remove(attached, "its setup failed")
                raise
            return attached

    async def _serve_attached(self, attached: Attached, peer: str) -> None:
        """The rest of an attach, before the task may send a packet: its table's rates,
        the worker's registration, the task's files; then its start event. Its failure
        removes the sandbox."""
        try:
            rates = nft.table_rates(self.data_plane.policy.limits_for(attached.profile))
            if attached.table_rates != rates:
                await self._apply_table(attached)  # a spare's table has the default rates
            # The worker's ack (a round trip) while the task's files are written; both
            # end before either's failure goes on (to `_remove`, which removes the dir).
            for outcome in await asyncio.gather(
                self._register(attached), self._write_task_files(attached), return_exceptions=True
            ):
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            await self._remove(attached, "its setup failed")
            raise
        attached.summary.task_started(
            attached.run_id, attached.profile, attached.address, attached.command
        )
        self.data_plane.emit(
            attached.summary.start_event.with_fields(
                detail=f"{attached.summary.start_event.detail} (attached by {peer}, "
                f"runner pid {attached.runner_pid})"[:1000]
            )
        )

    async def _register(self, attached: Attached) -> None:
        """The data plane serves it now (with workers: the sandbox's worker has acked)."""
        sandbox = Sandbox(attached.address, attached.run_id, attached.profile)
        await self.data_plane.add_sandbox(attached.worker, sandbox)

    async def _new_network(self, profile: str = "") -> Attached:
        """A sandbox network with its table loaded, owned by this service until a task
        takes it (its state file names the service, so `gc` and a restart know it);
        `profile`: its task's, else a spare's table has the default limits."""
        run_id = claim_run_id()  # its state dir made: the id is this network's
        attached = Attached(run_id, profile, "", "", 0, [], TaskSummary())
        attached.worker = self.data_plane.assign()
        try:

            def picked(gateway_ip, sandbox_ip) -> None:
                attached.gateway_ip, attached.address = str(gateway_ip), str(sandbox_ip)
                self._write_state(attached)

            await asyncio.to_thread(make_sandbox_net, run_id, self.opts.pool, picked)
            await self._apply_table(attached, new=True)
        except BaseException:
            self._unwire_later(attached)
            raise
        return attached

    def _refill(self) -> None:
        """Keep `warm` spare networks, made one after another off the attach path."""
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None
        if self._filling or self.draining or len(self.spares) >= self.opts.warm:
            return
        self._filling = True

        async def fill() -> None:
            try:
                while not self.draining and len(self.spares) < self.opts.warm:
                    self.spares.append(await self._new_network())
            except (RunError, netns.SandboxNetError, nft.NftError, OSError) as e:
                log.warning("cannot make a spare sandbox network: %s", e)
            finally:
                self._filling = False

        self._spawn(fill())

    def _refill_later(self) -> None:
        """A refill once the start that took a spare is over: making a network is
        ~15 ms of this process's and the kernel's time, which on a small host would
        slow the very start it replaces a spare for (measured: bench_attach
        --breakdown). It begins when a run detaches (after the reply: runs back to
        back) or REFILL_AFTER_S from now (a long task), whichever is first; an
        attach that leaves no spare refills at once."""
        if self._refill_timer is None:
            loop = asyncio.get_running_loop()
            self._refill_timer = loop.call_later(REFILL_AFTER_S, self._refill)

    async def _keep_runners(self) -> None:
        """`warm` runners waiting, kept by one zygote (enforcer/zygote.py), which tells
        which ones wait. It starts none when this service may not build sandboxes (a
        hardened unit) or a `sandgate runners` already serves the control socket;
        without warm runners, runs start their own runner, in the `sandgate` process
        (slower, nothing else changes)."""
        try:
            zygote = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-m", "sandgate.enforcer.zygote",
                "--control", str(self.opts.control), "--service-pid", str(os.getpid()),
                "--warm", str(self.opts.warm),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as e:
            log.warning("no warm runners: cannot start the zygote: %s", e)
            return
        self._zygote = zygote
        while line := await zygote.stdout.readline():
            word, _, path = line.decode(errors="replace").strip().partition(" ")
            if word == "ready":
                self.runners.add(path)
            elif word in ("taken", "gone"):
                self.runners.discard(path)
        code = await zygote.wait()
        if code and not self.stopped.is_set():
            log.warning("no warm runners: the zygote exited with %s", code)

    def _warm_runners(self) -> int:
        """Runners waiting for a run: the embedded zygote's, else those of a separate
        pool (`sandgate runners`), counted by their sockets."""
        if self._zygote is not None and self._zygote.returncode is None:
            return len(self.runners)
        if _pool_pid(str(self.opts.control)) is None:  # sockets with no pool: a dead one's
            return 0
        return len(handoff.runner_sockets(str(self.opts.control)))

    def _attach_reply(self, attached: Attached) -> dict:
        ca = attached.dir / "ca-bundle.pem"
        # The reply may come before the task's files are written (its second line):
        # whether they have a CA bundle is known from the attach (a re-adopted one's: on disk).
        has_ca = bool(self.opts.extra_ca) or attached.inspected or ca.exists()
        return {
            "ok": True,
            "run_id": attached.run_id,
            "dir": str(attached.dir),
            "netns": f"/run/netns/{netns.netns_name(attached.run_id)}",
            "sandbox_ip": attached.address,
            "resolv_conf": str(attached.dir / "resolv.conf"),
            "ca_bundle": str(ca) if has_ca else None,
            "ca_env_vars": list(CA_ENV_VARS),
            "java_truststore": str(attached.dir / JAVA_TRUSTSTORE) if has_ca else None,
            "system_ca_bundle": str(SYSTEM_CA_BUNDLE),
            "hidden": [str(STATE_DIR), str(RUN_DIR), str(self.opts.audit_log)],
            "audit_log": str(self.opts.audit_log),
            "policy": self.data_plane.policy.hash,
            "rule_files": [str(p) for p in self.data_plane.policy.paths],
        }

    def _write_state(self, attached: Attached) -> None:
        state = {
            "run_id": attached.run_id,
            "profile": attached.profile,
            "address": attached.address,
            "gateway_ip": attached.gateway_ip,
            "runner_pid": attached.runner_pid,  # 0: a spare no task has taken
            "runner_start": attached.runner_start,  # with the pid: that process (process_stamp)
            "service_pid": os.getpid(),
            "service_start": process_stamp.start_time(os.getpid()),
            "control": str(self.opts.control),  # whose it is, when services share RUN_DIR
            "command": attached.command,
            "started": attached.started,
        }
        (attached.dir / STATE_FILE).write_text(json.dumps(state))

    async def _write_task_files(self, attached: Attached) -> None:
        (attached.dir / "resolv.conf").write_text(
            f"# written by sandgate: the gateway's DNS filter\nnameserver {attached.gateway_ip}\noptions edns0\n"
        )
        extra = list(self.opts.extra_ca)
        if attached.inspected:
            extra.append((await self.data_plane.gateway_ca()).read_text())
        if extra:
            _write_ca_bundle(attached.dir / "ca-bundle.pem", extra)
            store = attached.dir / JAVA_TRUSTSTORE
            cached = java_truststore_file(extra, store)
            if cached != store:
                shutil.copyfile(cached, store)

    async def _apply_table(self, attached: Attached, *, new: bool = False) -> None:
        """Load the sandbox's table: `new` for a network just made (created, not
        replaced: nft.render_ruleset says why), else replaced (a re-adopted sandbox)."""
        proxy_port, dns_port = self.data_plane.ports(attached.worker)
        # The profile's rates when its task attaches (a reload changes them for the
        # next ones); a spare's, until then, the default profile's.
        rates = nft.table_rates(self.data_plane.policy.limits_for(attached.profile))
        table = nft.RulesetConfig(
            table=attached.table,
            sandbox_ifaces=netns.host_if_name(attached.run_id),
            proxy_port=proxy_port,
            dns_port=dns_port,
            **rates,
        )
        await asyncio.to_thread(nft.load_table, table, new=new)
        attached.table_rates = rates

    def _resume(self, request: dict, peer: str, peer_pid: int) -> Attached:
        """A re-adopted sandbox taken back by its runner: only by that process (its pid
        and start time), not by whoever on the socket names its run id (`sandgate
        sandboxes` lists them), who could detach it under the task or write its summary."""
        attached = self.sandboxes.get(str(request.get("run_id")))
        if attached is None or attached.connected:
            raise RunError(
                f"resume: no sandbox {str(request.get('run_id'))[:20]!r} waits for its runner"
            )
        if peer_pid != attached.runner_pid or not _runner_alive(attached):
            raise RunError(f"resume: only the runner of {attached.run_id} may take it back")
        attached.connected = True
        self._control_event(peer, "runner reconnected after a gateway restart", attached=attached)
        return attached

    def _runner_event(self, attached: Attached, request: dict) -> dict:
        """What only the runner sees: a limit its task hit, a protection it went without."""
        what, name = request.get("what"), str(request.get("name", ""))[:300]
        detail = str(request.get("detail", ""))[:900]
        where = {
            "task_id": attached.run_id,
            "sandbox": attached.address,
            "profile": attached.profile,
        }
        if what == "planted":  # a path the runner found and renamed aside (or could not)
            attached.summary.task.setdefault("workspace_planted", []).append(name)
            if request.get("renamed") is False:
                attached.summary.task.setdefault("workspace_not_renamed", []).append(name)
            self.data_plane.emit(task_events.workspace_planted(detail, **where))
        elif what == "limit" and name in task_events.LIMITS:
            attached.summary.task.setdefault("limits_hit", []).append(name)
            self.data_plane.emit(task_events.task_limit(name, detail, **where))
        elif what == "weakened" and name in task_events.SANDBOX_FEATURES:
            attached.summary.task.setdefault("sandbox_weakened", []).append(name)
            self.data_plane.emit(task_events.sandbox_weakened(name, detail, **where))
        else:
            return {"ok": False, "error": "event: unknown kind"}
        return {"ok": True}

    async def _detach(self, attached: Attached, request: dict, peer: str) -> dict:
        exit_code = request.get("exit_code")
        attached.summary.task["exit_code"] = exit_code if isinstance(exit_code, int) else None
        # Its task is gone: the table's counters are final now. Read (a netlink query in
        # a thread) while the worker sends the task's last events (a round trip): the
        # runner's caller waits for this reply.
        counting = asyncio.ensure_future(_final_counters(attached.table))
        if attached.address:  # the task's last events from its worker, into its summary
            try:
                await self.data_plane.retire(attached.address)
            except BaseException:
                counting.cancel()
                raise
        await self._remove(attached, f"exit code {exit_code}", counting)
        # One line of the control socket: the runner refuses a longer one.
        summary = attached.summary.to_dict(max_bytes=control.MAX_LINE - 1024)
        return {"ok": True, "summary": summary}

    async def _remove(
        self,
        attached: Attached,
        why: str,
        counting: asyncio.Future | None = None,
        *,
        runner_lost: bool = False,
    ) -> None:
        """The sandbox's end: its events now, from the table's counters (its task is gone;
        `counting`: their read, begun by the caller); its network, table and run dir
        after the reply, in that order (`_unwire_later`). `runner_lost`: the runner
        did not detach (it died, or the stop kills it): what it would have freed is
        freed once it is gone (`_free_runners_slot`)."""
        with self._counted_under_way():  # until `_unwire_later` has it and its end is recorded
            self.sandboxes.pop(attached.run_id, None)
            if attached.address:
                self.data_plane.remove_sandbox(attached.address)
            counters = await (counting or _final_counters(attached.table))
            self._unwire_later(attached, runner_lost=runner_lost)
            self.metrics.count_firewall_drops(counters)
            attached.summary.firewall_drops(counters)
            duration = time.time() - attached.started
            attached.summary.task_ended(attached.run_id, duration)
            where = {
                "task_id": attached.run_id,
                "sandbox": attached.address or None,
                "profile": attached.profile,
            }
            for event in task_events.firewall_drops(counters, **where):
                self.data_plane.emit(event)
            self.data_plane.emit(task_events.task_ended(why, duration, **where))

    @contextlib.contextmanager
    def _counted_under_way(self):
        self._under_way += 1
        try:
            yield
        finally:
            self._under_way -= 1

    def _unwire_later(self, attached: Attached, *, runner_lost: bool = False) -> None:
        """Netns and veth, then the table, then the run dir, off the loop; `_shutdown`
        waits for every one still running."""
        self.data_plane.release(attached.worker)
        attached.worker = -1

        async def unwire_now() -> None:
            with contextlib.suppress(Exception):  # a leftover never blocks the rest; gc has it
                await asyncio.to_thread(
                    unwire,
                    attached.run_id,
                    attached.table,
                    had_net=bool(attached.address),
                    count=False,  # _remove read them before the reply
                )
            if runner_lost:
                with contextlib.suppress(Exception):
                    await _free_runners_slot(attached)
            shutil.rmtree(attached.dir, ignore_errors=True)

        task = asyncio.get_running_loop().create_task(unwire_now())
        self._unwiring.add(task)
        task.add_done_callback(self._unwiring.discard)

    # --- restarts -----------------------------------------------------------------------------

    def _ours(self, state: dict) -> bool:
        """Whether a sandbox's state file is this service's to take back: not a live
        service's, and written by a service on this control socket. Services can share
        RUN_DIR; one that (re)starts while another is down must not adopt the other's
        sandboxes, which run under the other's rules (a profile of the same name is not
        the same policy): they wait for their own service, or `sandgate gc`. A state
        without `control` (written before it was recorded) counts as ours, as before."""
        control = str(self.opts.control)
        return not _owned_by_other_service(state) and state.get("control", control) == control

    async def _readopt(self) -> None:
        """Sandboxes a previous service left: live runners keep theirs, the rest go."""
        for state_file in sorted(RUN_DIR.glob(f"*/{STATE_FILE}")):
            try:
                state = json.loads(state_file.read_text())
                attached = Attached(
                    state["run_id"],
                    state["profile"],
                    state["address"],
                    state["gateway_ip"],
                    int(state["runner_pid"]),
                    list(state.get("command", [])),
                    TaskSummary(),
                    started=float(state.get("started", time.time())),
                    runner_start=_start_field(state, "runner_start"),
                    connected=False,
                    rules_hash=self.data_plane.policy.hash,
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring %s: %s", state_file, e)
                continue
            if not self._ours(state):
                continue
            if attached.runner_pid == 0:  # a spare network no task took: nothing to tell
                self._unwire_later(attached)
                continue
            alive = _runner_alive(attached) and attached.run_id in netns.list_sandbox_nets()
            if alive and attached.profile in self.data_plane.policy.profiles:
                self.sandboxes[attached.run_id] = attached
                attached.worker = self.data_plane.assign()
                await self._register(attached)
                await self._apply_table(attached)
                self._write_state(attached)
                attached.summary.task_started(
                    attached.run_id, attached.profile, attached.address, attached.command
                )
                self._control_event(
                    "the restarted gateway service",
                    "sandbox re-adopted: its runner is alive",
                    attached=attached,
                )
            else:
                self._control_event(
                    "the restarted gateway service",
                    "leftover sandbox removed: "
                    + ("its runner is gone" if not alive else "its profile is gone"),
                    attached=attached,
                    verdict=Verdict.DENY,
                    reason=Reason.UNKNOWN_SANDBOX,
                )
                await self._remove(
                    attached, "left over from a gateway service that died", runner_lost=True
                )

    async def _watch_adopted(self) -> None:
        """A re-adopted sandbox whose runner never comes back goes when the runner dies."""
        while not self.stopped.is_set():
            await asyncio.sleep(ADOPTED_CHECK_S)
            for attached in list(self.sandboxes.values()):
                if not attached.connected and not _runner_alive(attached):
                    await self._remove(
                        attached,
                        "its runner died while the gateway service was away",
                        runner_lost=True,
                    )

    # --- reload and stop -----------------------------------------------------------------------

    async def reload(self, trigger: str, actor: str | None = None) -> dict:
        """Load the rules again (off the loop); a broken file changes nothing: the last
        good policy stays and the reply carries the errors (FILE:LINE:COL)."""
        result = await self.reloader.reload(trigger, actor)
        reply = {**result.to_dict(), "policy": result.policy_hash, "rules": result.rule_count}
        if not result.ok:
            # "invalid rules" only when a line is at fault: a loader that failed
            # otherwise says so itself (proxy/reload.py).
            why = "invalid rules" if result.rules_at_fault else "the reload failed"
            reply["error"] = f"{why}, the running policy stays:\n" + "\n".join(result.errors)
        else:
            await self.data_plane.reloaded(reply)
        return reply

    async def _reload_for_approval(self, actor: str) -> list[str]:
        """Reload after an `always` approval wrote approved.yaml: the errors, if any (with
        workers: also a worker that did not take the new policy)."""
        reply = await self.reload("approval", actor)
        return [] if reply["ok"] else (reply["errors"] or [reply["error"]])

    async def drain(self, grace: float, actor: str) -> None:
        """No new sandboxes; running tasks finish, or are stopped after `grace` seconds."""
        if self.draining:
            return
        self.draining = True
        self.data_plane.emit(
            Event(
                kind=EventKind.POLICY,
                verdict=Verdict.ALLOW,
                reason=Reason.POLICY_LOADED,
                detail=f"gateway service stopping ({actor}): {len(self.sandboxes)} sandboxes, "
                f"grace {grace:g} s",
            )
        )
        deadline = time.monotonic() + grace
        while self.sandboxes and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for signum, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
            for attached in list(self.sandboxes.values()):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if _runner_alive(attached):  # not a pid reused by another process
                        os.kill(attached.runner_pid, signum)
            end = time.monotonic() + wait
            while self.sandboxes and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self.stopped.set()


async def _reply_with_netns(writer: asyncio.StreamWriter, reply: dict, attached: Attached) -> None:
    """The reply, and the sandbox's network namespace as a descriptor (SCM_RIGHTS): the
    runner joins it whatever mount namespace either side runs in (`ip netns exec`)."""
    await writer.drain()  # nothing of ours may be queued ahead of the direct send
    fd = os.open(f"/run/netns/{netns.netns_name(attached.run_id)}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # asyncio's TransportSocket has no sendmsg: a duplicate of the same socket does.
        raw = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        data = json.dumps(reply).encode() + b"\n"
        try:
            sent = socket.send_fds(raw, [data], [fd])
        finally:
            raw.close()
        if sent < len(data):
            writer.write(data[sent:])
            await writer.drain()
    finally:
        os.close(fd)


async def _reply(writer: asyncio.StreamWriter, reply: dict) -> None:
    writer.write(json.dumps(reply).encode() + b"\n")
    await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """Who is at the other end of a control connection (SO_PEERCRED, as of its
    connect): `uid U (pid P)` for the audit, and the pid (0: unknown)."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except (OSError, AttributeError):
        return "an unknown peer", 0
    return f"uid {uid} (pid {pid})", pid


def _pool_pid(control: str) -> int | None:
    """The pid of the pool that serves `control`, or None when none holds its lock."""
    try:
        fd = os.open(control + handoff.LOCK_SUFFIX, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isascii() and text.isdigit() else None
    finally:
        os.close(fd)


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


async def _final_counters(table: str) -> dict[str, int]:
    """The drop counters of a sandbox's table whose task is gone; {} when they cannot
    be read (a leftover never blocks the rest of a sandbox's end; gc has it)."""
    try:
        return await asyncio.to_thread(nft.read_counters, table)
    except Exception:  # noqa: BLE001 - whatever it is, the sandbox's end goes on
        return {}


def _owned_by_other_service(state: dict) -> bool:
    service_pid = state.get("service_pid")
    return (
        isinstance(service_pid, int)
        and service_pid != os.getpid()
        and service_pid > 1
        and process_stamp.alive(service_pid, _start_field(state, "service_start"))
    )


def _start_field(state: dict, key: str) -> int | None:
    """A start time of a state file (None when absent: a file of an older sandgate)."""
    value = state.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _free_runners_slot(attached: Attached) -> None:
    """A runner removes its task's cgroup and frees its id slot as its run ends; one
    that died first (SIGKILLed, by the stop's drain too, or while the service was
    away) left both, and what may still run in the cgroup. Once it is gone (its
    connection may close before it has exited: up to RUNNER_EXIT_WAIT_S), its slot is
    freed by the slot's record, which names the cgroup (made ahead or not), removed
    first. A runner still alive then frees its own.

    The wait is the loop's, not a thread's: a thread per lost runner, six of them
    (the default executor's size here), held every netns, table and counters call of
    the service for those seconds."""
    if attached.runner_pid <= 1:  # no runner of its own to have held one
        return
    deadline = time.monotonic() + RUNNER_EXIT_WAIT_S
    while _runner_alive(attached):
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.02)
    await asyncio.to_thread(id_slots.sweep, id_slots.host_id_pool(), holders={attached.runner_pid})


def _runner_alive(attached: Attached) -> bool:
    return attached.runner_pid > 1 and process_stamp.alive(
        attached.runner_pid, attached.runner_start
    )


def _refuse_if_served(path: Path) -> None:
    """RunError when a live service answers on the control socket `path`; the stale
    socket of a dead one is removed."""
    if path.exists() or path.is_symlink():
        if not (path.is_socket() or path.is_symlink()):  # connect() would be refused: kept
            raise RunError(f"--control {path}: exists and is not a socket (left as it is)")
        try:  # a live service answers; a stale socket of a dead one does not
            control.ControlClient.connect(path, timeout=1).close()
        except control.ControlError:
            path.unlink()
        else:
            raise RunError(f"another gateway service is running at {path}")


def serve(opts: ServiceOptions) -> int:
    priority.raise_gateway_priority()  # its workers, zygote and runners take it too
    try:
        # The front door shares the loop's epoll set (proxy/frontdoor/poller.py).
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(GatewayService(opts).run())
    except RunError as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return 125
