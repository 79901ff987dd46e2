"""The gateway: one asyncio loop owning the state that must stay consistent.

It holds the compiled policy (one reference, the gate's: everything that decides
reads it, so `swap_policy` changes every decision at once), the sandbox registry,
the DNS bindings, and runs the
DNS filter, the front door (the transparent port: decides every connection through
the gate, splices allowed pass-through itself) and mitmproxy (with the sandgate
addon, for plain HTTP and inspected TLS, which the front door hands it) side by
side. Every event passes through `emit`, which stamps the policy hash and the task
id, so emitters only say what they saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.descriptors import DescriptorReserve
from sandgate.proxy.dns.bindings import DnsBindings
from sandgate.proxy.dns.placeholders import Placeholders
from sandgate.proxy.dns.server import DnsFilter
from sandgate.proxy.engine import ProxyEngine
from sandgate.proxy.frontdoor.door import FrontDoor
from sandgate.proxy.frontdoor.http1 import needs_engine
from sandgate.proxy.frontdoor.tls_contexts import TlsContexts
from sandgate.proxy.gate import ConnectionGate
from sandgate.proxy.gateway_ca import ensure_ec_ca
from sandgate.proxy.limits import connection_budget
from sandgate.proxy.policy import (
    CompiledPolicy,
    ConnectFacts,
    Decision,
    NameFacts,
    Reason,
    Verdict,
    decide,
)
from sandgate.proxy.policy.builtin import deny
from sandgate.proxy.registry import Sandbox, SandboxRegistry
from sandgate.proxy.telemetry.event import Event, EventFanout, EventKind, EventSink
from sandgate.proxy.telemetry.flood_sink import RateLimitedAudit

log = logging.getLogger("sandgate.gateway")


@dataclass(frozen=True)
class SwapReport:
    """What `Gateway.swap_policy` did."""

    old_hash: str
    new_hash: str
    rule_count: int
    connections_closed: int  # open connections the new policy denies
    bindings_dropped: int  # DNS bindings of names the new policy no longer allows


@dataclass(frozen=True)
class GatewayConfig:
    listen_host: str  # where the redirected traffic arrives (the host end of the veth)
    dns_upstreams: list[str]
    confdir: Path  # mitmproxy's CA lives here
    proxy_port: int = 0  # the transparent port (the front door's); 0: any free port
    dns_port: int = 0
    upstream_ca: Path | None = None  # CA bundle for verifying upstreams of inspected TLS
    dns_upstream_port: int = 53
    # Listening sockets someone else made (a worker's, which the service owns and
    # keeps open across the worker's restarts): then listen_host and the ports are unused.
    listeners: Listeners | None = None


@dataclass(frozen=True)
class Listeners:
    """A gateway's listening sockets, made ready by its owner: the front door's TCP
    socket (bound, listening) and the DNS filter's UDP and TCP sockets (one port)."""

    frontdoor: socket.socket
    dns_udp: socket.socket
    dns_tcp: socket.socket


class Gateway:
    def __init__(self, config: GatewayConfig, policy: CompiledPolicy, *sinks: EventSink):
        self.config = config
        self.registry = SandboxRegistry()
        self.bindings = DnsBindings()
        self.events = EventFanout(*sinks)
        self.placeholders = Placeholders(taken=is_local_address)
        # Pending approvals: held connections and requests, decided over the control socket.
        self.approvals = Approvals(self.emit, lambda profile: self.policy.approval_for(profile))
        self.gate = ConnectionGate(
            policy,
            self.registry,
            self.bindings,
            self.emit,
            approvals=self.approvals.store,
            placeholders=self.placeholders,
        )
        self.dns = DnsFilter(
            decide_name=lambda profile, name: decide(
                self.policy, NameFacts(profile, name, now=time.time())
            ),
            sandbox_for=self._sandbox_for,
            sink=self,
            upstreams=config.dns_upstreams,
            upstream_port=config.dns_upstream_port,
            bindings=self.bindings,
            keep_special=self._keep_special,
            limits_for=lambda profile: self.policy.limits_for(profile),
            placeholders=self.placeholders,
            policy_hash=lambda: self.policy.hash,
        )
        # mitmproxy, imported and started only when something needs it (see start).
        self.proxy = ProxyEngine(
            self.gate,
            config.confdir,
            upstream_ca=config.upstream_ca,
            addon_args=(self.approvals, self._resolve_placeholder),
        )
        # Taken when listening starts (after the descriptor limit is raised).
        self.descriptors: DescriptorReserve | None = None
        self._audit_hold: Callable[[], Decision | None] = lambda: None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_checked = time.time()  # expiries up to here are handled
        self._grant_timers: dict[str, asyncio.TimerHandle] = {}  # by approval id
        self.gate.hold_new = self._hold_new
        self.gate.on_grant = self._watch_grant
        self.frontdoor = FrontDoor(
            self.gate,
            self.proxy.serve,
            approvals=self.approvals,
            resolve=self._resolve_placeholder,
            # Plain HTTP is decided in the front door unless a rule needs mitmproxy's path.
            plain_http=self._plain_http,
            # Inspected HTTPS/1.1 too, with the CA mitmproxy uses (tls_relay.py);
            # SANDGATE_INSPECT_ENGINE=mitmproxy hands it all to mitmproxy (A/B).
            tls_contexts=None
            if os.environ.get("SANDGATE_INSPECT_ENGINE") == "mitmproxy"
            else TlsContexts(config.confdir, config.upstream_ca),
        )
        self._profile: str | None = None  # the one profile served (start), None: any
        self._plain_for: CompiledPolicy | None = None  # the policy `_plain` was made for
        self._plain: dict[str, bool] = {}

    async def start(self, *, profile: str | None = None) -> None:
        """Listen. `profile`: the one profile this gateway serves (a run's), None: any
        of the policy's. If such a profile inspects TLS, the gateway CA is made now
        (its tasks must trust it from their start; cryptography only). mitmproxy is
        started now only if such a profile needs it for whole connections
        (`wants_engine`: ask rules, websockets), so that the first held request does
        not wait for its import; else with the first connection handed to it (an
        h2-only client of inspected TLS), or when a reload adds such a rule."""
        self._profile = profile
        self.gate.connection_budget = connection_budget(raise_descriptor_limit())
        self.descriptors = self.frontdoor.descriptors = DescriptorReserve()
        self.descriptors.start(asyncio.get_running_loop())
        self.approvals.start()
        config, ready = self.config, self.config.listeners
        try:
            await self.dns.start(
                config.listen_host,
                config.dns_port,
                sockets=ready and (ready.dns_udp, ready.dns_tcp),
            )
        except OSError as e:
            raise said(e, f"the DNS filter cannot listen on {config.listen_host}") from None
        try:
            if inspects(self.policy, profile):
                await self.gateway_ca()
            if self.wants_engine(self.policy):
                await self.proxy.started("the policy, which asks or allows websockets")
            try:
                await self.frontdoor.start(
                    config.listen_host, config.proxy_port, listener=ready and ready.frontdoor
                )
            except OSError as e:
                raise said(e, f"the front door cannot listen on {config.listen_host}") from None
            self.watch_expiry()
            for sink in self._rate_limited():
                sink.start(asyncio.get_running_loop())
        except BaseException:
            await self.proxy.stop()
            await self.dns.stop()
            self.descriptors.stop()
            raise

    async def stop(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        for timer in self._grant_timers.values():
            timer.cancel()
        self._grant_timers.clear()
        await self.approvals.stop()
        await self.frontdoor.stop()
        await self.proxy.stop()
        await self.dns.stop()
        if self.descriptors is not None:
            self.descriptors.stop()
        for sink in self._rate_limited():
            sink.stop()  # what the audit rate limit holds is written before the log closes

    async def gateway_ca(self) -> Path:
        """The gateway CA's certificate, made (once, off the loop) if confdir has none:
        what a task whose profile inspects TLS must trust."""
        try:
            await asyncio.to_thread(ensure_ec_ca, self.config.confdir)
        except OSError as e:
            raise said(e, f"cannot make the gateway CA in {self.config.confdir}") from None
        return self.proxy.ca_cert

    def wants_engine(self, policy: CompiledPolicy) -> bool:
        """Whether mitmproxy should run from the start under `policy`: a profile served
        (see `start`) hands it whole connections (`needs_engine`), or inspected TLS is
        all handed to it (SANDGATE_INSPECT_ENGINE=mitmproxy: no TLS contexts)."""
        served = [p for p in policy.profiles if self._profile in (None, p)]
        if any(needs_engine(policy, profile) for profile in served):
            return True
        return self.frontdoor.tls_contexts is None and any(inspects(policy, p) for p in served)

    def _start_engine_for(self, policy: CompiledPolicy) -> None:
        """After a swap to `policy`: start mitmproxy in the background if it wants it
        (a failure is logged; the first connection handed over gets it again)."""
        if self.proxy.requested or not self.wants_engine(policy):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not serving (a test's swap): the first hand-off starts it
            return
        starting = asyncio.ensure_future(self.proxy.started("a reloaded policy that needs it"))
        starting.add_done_callback(_log_failure)

    def _plain_http(self, state) -> bool:
        """Whether the front door serves this plain-HTTP connection itself: once per
        policy and profile (`needs_engine` reads every rule), not per connection."""
        policy, profile = self.policy, state.sandbox.profile
        if self._plain_for is not policy:
            self._plain_for, self._plain = policy, {}
        plain = self._plain.get(profile)
        if plain is None:
            plain = self._plain[profile] = not needs_engine(policy, profile)
        return plain

    def table_sizes(self) -> dict[str, int]:
        """How many entries the gateway's per-sandbox and per-connection tables hold,
        for `status --json` (a service that runs for months must give back what each
        task took: bench/soak_service.py and tests/e2e/test_service_soak.py read these)."""
        gate, door, dns = self.gate, self.frontdoor, self.dns
        sizes = {
            "registry": len(self.registry),
            "connections": len(gate.connections),
            "connection_counts": len(gate.counts),
            "request_memos": len(gate._request_memos),
            "connect_memos": len(gate._connect_memos),
            "leaf_buckets": len(gate.leaves.buckets),
            "dns_bindings": len(self.bindings._sandboxes),
            "placeholders": len(self.placeholders._names),
            "dns_rates": len(dns.rates),
            "dns_refusals": len(dns.refusals),
            "dns_pending": len(dns._pending),
            "dns_tasks": len(dns._tasks),
            "approvals_pending": len(self.approvals.store.pending),
            "approval_grants": sum(
                len(t)
                for t in (
                    self.approvals.store.once,
                    self.approvals.store.task,
                    self.approvals.store.denied,
                )
            ),
            "approval_waiters": len(self.approvals._waiters),
            "grant_timers": len(self._grant_timers),
            "door_live": len(door._live),
            "door_waiting": len(door._waiting),
            "door_handed_off": len(door._handed_off),
            "upstream_pool": door.upstream_pool.count if door.upstream_pool else 0,
            "poller_handlers": len(door.poller.handlers) if door.poller else 0,
            "tls_leaves": len(door.tls_contexts._leaves) if door.tls_contexts else 0,
            "tls_sessions": len(door.tls_contexts._sessions) if door.tls_contexts else 0,
            "flood_buckets": sum(len(s.control.buckets) for s in self._rate_limited()),
        }
        with contextlib.suppress(RuntimeError):  # no loop: no tasks
            sizes["asyncio_tasks"] = len(asyncio.all_tasks())
        return sizes

    def _rate_limited(self) -> list[RateLimitedAudit]:
        return [sink for sink in self.events.sinks if isinstance(sink, RateLimitedAudit)]

    @property
    def proxy_port(self) -> int:
        """The transparent port: where nftables redirects the sandboxes' TCP."""
        return self.frontdoor.port

    @property
    def dns_port(self) -> int:
        return self.dns.port

    @property
    def policy(self) -> CompiledPolicy:
        """The policy in force: the gate's, the one reference every decision reads."""
        return self.gate.policy

    def swap_policy(self, new: CompiledPolicy, *, cause: str = "") -> SwapReport:
        """Put `new` in force for every decision at once (new connections, DNS
        queries, HTTP requests), emit its `policy` event (`cause`, e.g. who asked,
        goes into the detail), then close the open connections it denies (each with
        a `policy_changed` deny event) and drop the DNS bindings whose names it no
        longer allows. Runs on the loop, without awaiting: no decision sees half of it."""
        old, self.gate.policy = self.gate.policy, new
        self.emit(policy_loaded(old, new, cause))
        closed = self._close_revoked(
            "a policy reload", f"the policy changed ({old.hash} -> {new.hash}): denied now"
        )
        dropped = self.bindings.drop(_no_longer_allowed(self.registry, old, new))
        self.watch_expiry()
        self._start_engine_for(new)
        return SwapReport(old.hash, new.hash, new.rule_count, closed, dropped)

    def _close_revoked(self, why: str, problem: str) -> int:
        """Close the open connections the policy denies now (`gate.revoke_denied`,
        `why` in their events, `problem` in their ends); how many were closed."""
        closed = 0
        for state in self.gate.revoke_denied(why):
            if state.abort is None:
                log.error("sandgate: cannot close %s: no adapter owns it", state.fields["source"])
                continue
            state.abort(problem)
            closed += 1
        return closed

    # A rule's `expires` instant: decide() stops matching it then (time is a fact),
    # and a timer closes the open connections it allowed, as a reload would.
    # Timers run on the loop's monotonic clock and `expires` is wall-clock time: a
    # timer that fires early (the clocks drifted) is set again for what is left.

    def watch_expiry(self) -> None:
        """(Re)arm the timer for the policy's next rule expiry; on the loop."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        now = time.time()
        at = self.policy.next_expiry_after(self._expiry_checked)
        if at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving (a test's swap): nothing open to close
            return
        self._expiry_timer = loop.call_later(max(0.0, at - now) + 0.005, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry_timer = None
        now = time.time()
        expired = self.policy.expiring(self._expiry_checked, now)
        if expired:
            self._expiry_checked = expired[-1].expires_at
            ids = ", ".join(rule.id for rule in expired)
            self._close_revoked(f"the expiry of {ids}", f"{ids} expired: denied now")
        self.watch_expiry()

    # An approval `--for` a while: its connections close when it ends, as a rule's
    # `expires` closes its own (the grant's end is on the approvals' monotonic clock).

    def _watch_grant(self, approval) -> None:
        """A timer for the end of `approval` (a Pending with `until`), once per approval."""
        if approval.id in self._grant_timers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving: nothing open to close
            return
        delay = max(0.0, approval.until - self.approvals.clock()) + 0.005
        self._grant_timers[approval.id] = loop.call_later(delay, self._on_grant_end, approval)

    def _on_grant_end(self, approval) -> None:
        del self._grant_timers[approval.id]
        self._close_revoked(
            f"the end of approval {approval.id}", f"approval {approval.id} has ended: denied now"
        )

    def guard_audit(self, audit) -> None:
        """Refuse new connections (`audit_unavailable`) while `audit` (an AuditLog)
        cannot write: `--on-audit-failure block`. Their denials wait in its queue.
        Also each request on a connection already open, and each DNS query that would
        go upstream (a name is data too): else a keep-alive connection, or the resolver,
        went on carrying out what the log no longer recorded, and past its queue lost."""
        self._audit_hold = audit_hold(audit)
        self.gate.hold_requests = self.dns.hold = self._audit_hold

    def _hold_new(self) -> Decision | None:
        """The gate's `hold_new`: the audit log's denial, else the descriptors'."""
        return self._audit_hold() or (self.descriptors and self.descriptors.hold())

    def add_sandbox(self, sandbox: Sandbox) -> None:
        self.registry.add(sandbox)

    def remove_sandbox(self, address: str) -> None:
        """The sandbox's end: its open connections are closed (its network goes next,
        so nothing would end them: an upstream left open could go on sending, and a
        later task at the address would meet them), their ends under its task."""
        sandbox = self.registry.get(address)
        self.registry.remove(address)
        for state in [s for s in self.gate.connections.values() if s.sandbox.address == address]:
            if state.abort is not None:
                state.abort("its sandbox was removed: the task has ended")
        self.bindings.forget(address)
        self.placeholders.forget(address)
        self.dns.forget(address)
        if sandbox is not None:
            self.approvals.forget_task(sandbox.task_id or address)
            self.gate.forget_sandbox(sandbox)
            self.frontdoor.forget_sandbox(sandbox)

    async def _resolve_placeholder(self, state, name: str) -> str | Decision:
        """The address an approved placeholder's `name` resolves to, or the denial
        that keeps the request from going anywhere: no address upstream
        (dns_upstream_failure), or one a direct connection could not reach either (an
        IP deny rule, a private range opened only on other ports, the gateway host's
        own addresses, which the kernel drops only for the addresses a sandbox aims at,
        not for those the gateway finds itself). The name alone was decided (and
        approved); a refused address has its own `dns` event. Not asked while the
        audit log cannot be written (guard_audit): a name is data too."""
        if (held := self._audit_hold()) is not None:
            return held
        sandbox = state.sandbox
        ip = await self.dns.resolve_address(_asker(sandbox), name)
        if ip is None:
            return deny("dns-upstream", f"{name} has no public address upstream")
        refusal = self._refuse_resolved(sandbox.profile, state.port, name, ip)
        if refusal is None:
            return ip
        self.emit(
            Event.from_decision(
                EventKind.DNS,
                refusal,
                sandbox=sandbox.address,
                profile=sandbox.profile,
                name=name,
                dst_ip=ip,
                dst_port=state.port,
                protocol="dns",
            )
        )
        return refusal

    def _refuse_resolved(self, profile: str, port: int, name: str, ip: str) -> Decision | None:
        """A deny if a connection to `ip`:`port` for `name` may not go upstream."""
        if is_local_address(ip):
            return deny("private-address", f"{name} resolved to {ip}, the gateway host's own")
        facts = ConnectFacts(  # on the gate's clock, as its own decisions (rule expiry)
            profile, port, ipaddress.ip_address(ip), name,
            name_resolved_to_ip=True, now=self.gate.wall_clock(),
        )  # fmt: skip
        decision = decide(self.policy, facts)
        if decision.verdict is not Verdict.DENY:
            return None
        return replace(decision, detail=f"{name} resolved to {ip}: {decision.detail}")

    def _sandbox_for(self, source_ip: str) -> tuple[str, str, str | None] | None:
        sandbox = self.registry.get(source_ip)
        return _asker(sandbox) if sandbox else None

    def _keep_special(self, profile: str, ip) -> bool:
        compiled = self.policy.profiles.get(profile)
        return compiled is not None and compiled.opens_special_address(ip, time.time())

    def emit(self, event: Event) -> None:
        self.events.emit(stamped(event, self.policy.hash, self.registry.get))

    def emit_batch(self, events: list[Event]) -> None:
        """`emit` for each of `events`, handed to each sink as one batch (the DNS
        filter's: `DnsFilter._hold`)."""
        policy_hash, sandbox_at = self.policy.hash, self.registry.get
        self.events.emit_batch([stamped(event, policy_hash, sandbox_at) for event in events])


def _asker(sandbox: Sandbox) -> tuple[str, str, str | None]:
    """The DNS filter's view of a registered sandbox (dns.server.SandboxFor)."""
    return (sandbox.address, sandbox.profile, sandbox.task_id or None)


def stamped(event: Event, policy_hash: str, sandbox_at: Callable[[str], Sandbox | None]) -> Event:
    """`event` with the policy in force and its task (the sandbox's, `sandbox_at` its
    address), unless it has both. The gate stamps its connection events itself (two per
    connection, so the copy is worth saving); others leave it to the gateway's emit."""
    if event.policy_hash == policy_hash and event.task_id is not None:
        return event
    sandbox = sandbox_at(event.sandbox) if event.sandbox else None
    return event.with_fields(
        policy_hash=policy_hash,
        task_id=event.task_id or (sandbox.task_id if sandbox else None),
    )


def policy_loaded(old: CompiledPolicy, new: CompiledPolicy, cause: str = "") -> Event:
    """The `policy_loaded` event of a swap from `old` to `new` (`cause`: who asked)."""
    return Event(
        kind=EventKind.POLICY,
        verdict=Verdict.ALLOW,
        reason=Reason.POLICY_LOADED,
        detail=f"{new.rule_count} rules, hash {new.hash} (was {old.hash}), profiles "
        f"{', '.join(new.profiles)}, from {', '.join(new.files)}" + (f"; {cause}" if cause else ""),
    )


def is_local_address(address: str) -> bool:
    """Whether `address` is one of this network namespace's own (binding to any other
    fails): such an address cannot stand for a name, the sandbox's table drops it."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((address, 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _log_failure(starting: asyncio.Future) -> None:
    if not starting.cancelled() and starting.exception() is not None:
        log.error("sandgate: mitmproxy did not start: %s", starting.exception())


def inspects(policy: CompiledPolicy, profile: str | None = None) -> bool:
    """Whether a rule of `profile` (None: of any profile) needs HTTP inspection of TLS,
    and so the gateway's CA (and mitmproxy, for clients that offer only h2)."""
    profiles = policy.profiles.values() if profile is None else [policy.profiles[profile]]
    return any(rule.inspects for compiled in profiles for rule in compiled.rules)


def asks(policy: CompiledPolicy, profile: str | None = None) -> bool:
    """Whether `profile` (None: any profile) may hold a connection for a human: an
    `ask` rule, or `fallback: ask`. Rules that never ask need no approvals page."""
    profiles = policy.profiles.values() if profile is None else [policy.profiles[profile]]
    return any(
        rule.action is Verdict.ASK
        for compiled in profiles
        for rule in (compiled.fallback, *compiled.rules)
    )


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, and return it.

    Each relayed connection holds two descriptors; the default soft limit (often
    1024) would let a few sandboxes' connection caps exhaust the gateway, and with
    it the descriptors its audit log (rotation) and control socket need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, e)
    return soft


def audit_hold(audit) -> Callable[[], Decision | None]:
    """For `ConnectionGate.hold_new`: an `audit_unavailable` denial while `audit`
    (anything with `writable` and `problem`, an AuditLog) cannot write, else None."""

    def hold() -> Decision | None:
        if audit.writable:
            return None
        return deny(
            "audit-unavailable",
            detail=f"the audit log cannot be written ({audit.problem}); "
            "nothing more goes out until it can",
        )

    return hold


def _no_longer_allowed(
    registry: SandboxRegistry, old: CompiledPolicy, new: CompiledPolicy
) -> Callable[[str, str], bool]:
    """(sandbox, name) -> whether `old` let the sandbox's profile resolve the name and
    `new` does not. Bindings of names neither allowed (a CNAME chain's) stay as they were."""
    answers: dict[tuple[str, str], bool] = {}

    def unwanted(sandbox: str, name: str) -> bool:
        entry = registry.get(sandbox)
        if entry is None:
            return False  # forgotten with its sandbox
        key = (entry.profile, name)
        if key not in answers:
            facts = NameFacts(entry.profile, name)
            answers[key] = decide(old, facts).allowed and not decide(new, facts).allowed
        return answers[key]

    return unwanted


def said(error: OSError, what: str) -> OSError:
    """`error` with what failed before its reason (a path it names kept): one line for
    the admin, where the bare errno would not say which listener or file."""
    why = error.strerror or str(error)
    if error.filename and str(error.filename) not in what:
        why = f"{error.filename}: {why}"
    return OSError(error.errno, f"{what}: {why}")
