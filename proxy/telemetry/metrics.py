"""Prometheus metrics: an event sink that counts, on its own registry, with bounded labels.

Labels are only ever verdict, reason, rule id, profile, protocol, method, kind,
direction, result or counter name — never a domain, a Host header or an IP address,
so a sandbox that resolves a million random names adds no series. The values that
come from outside the gateway's own vocabulary are capped as well, in case a bug
or a huge policy lets many through: rule ids and profiles keep their first
`max_label_values` distinct values and fold the rest into "other" (counted by
`sandgate_metric_label_overflow_total`); protocol and method are checked against
fixed sets.

`emit` runs on the gateway's event loop. The events a connection makes (the
`TALLIED` kinds) are counted into a `MetricsTally` (one dict row per label key, one
lock: ~0.6 µs) and added to the registry on a short tick, before every read of the
registry (a scrape, `get_sample_value`) and at `stop`: three prometheus-client
children per event, each behind its own lock, cost ~1.7 µs. Other events, and a
flush's rows, look the label tuple up in a dict of cached children (`labels(...)`
costs ~1 µs, an `inc()` on a cached child ~0.25 µs). `emit` does no I/O. State
that is cheaper to read than to track — the policy, open connections and sandboxes, the audit writer's counters, the nftables
drop counters — is read when Prometheus scrapes, by `_StateCollector`.

`/metrics` is served by prometheus_client's WSGI server in a daemon thread, not on
the event loop: a scrape costs the proxy only the GIL time of rendering a few
hundred series (see `serve`).

Start time: the exposition side (rendering, the WSGI server) is imported by the
server thread at the first scrape, off the start (lean_prometheus.py says why).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import math
import operator
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sandgate.proxy.telemetry.lean_prometheus  # noqa: F401 - before any prometheus_client import
from prometheus_client.metrics import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry
from sandgate.proxy.policy.model import HTTP_METHODS
from sandgate.proxy.policy.names import parse_host_port
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind
from sandgate.proxy.telemetry.task_events import LIMITS, SANDBOX_FEATURES

log = logging.getLogger("sandgate.metrics")

OTHER = "other"  # the label value everything past a cap is folded into
PROTOCOLS = frozenset({"tcp", "tls", "http", "https", "dns", "udp", "quic", "icmp", "ipv6"})
# Seconds. Policy decisions take microseconds; DNS includes the upstream's answer.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
DEFAULT_LISTEN = "127.0.0.1:9464"
# /metrics: a scrape (its request read, the page written) is cut SCRAPE_S after it was
# accepted, and at most SCRAPES_MAX are served at once; one more cuts the oldest.
# Prometheus scrapes one at a time, within its scrape_timeout (10 s by default).
SCRAPE_S = 10.0
SCRAPES_MAX = 16
_DECISION_LABELS = ("verdict", "reason", "rule", "profile")
# The kinds that are decisions (a latency each) and the kinds a gateway worker counts
# itself (`MetricsTally`): all but the rare task, policy and approval events, whose
# metrics the service counts from the events (their series need more than the key).
_DECIDING = frozenset({EventKind.CONNECTION, EventKind.DNS, EventKind.REQUEST, EventKind.APPROVAL})
TALLIED = frozenset({EventKind.CONNECTION, EventKind.CONNECTION_END, EventKind.DNS,
                     EventKind.REQUEST})  # fmt: skip
# What an event's series depend on: the key of `Metrics`' child cache and of a
# worker's tally rows (`_resolve` turns it into labels).
_label_key = operator.attrgetter(
    "kind", "verdict", "reason", "rule_id", "profile", "protocol", "method"
)
_MAX_CACHED_CHILDREN = 50_000  # a guard on memory; label caps already bound the series
# Seconds from the first event tallied to its flush into the registry: reads flush
# anyway, so this only bounds how stale a child read directly can be.
TALLY_INTERVAL = 1.0


class _Cap:
    """The first `limit` distinct values pass; later ones become "other"."""

    def __init__(self, label: str, limit: int, overflow: Counter):
        self.limit = limit
        self.seen: set[str] = set()
        self._overflow = overflow.labels(label)

    def __call__(self, value: str | None) -> str:
        if value is None:
            return ""
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        self._overflow.inc()
        return OTHER


@dataclass
class _Watched:
    """What the scrape-time collector reads. Each is optional."""

    policy: Callable[[], Any] | None = None  # -> CompiledPolicy (hash, rule_count)
    sandboxes: Callable[[], int] | None = None
    connections: Callable[[], int] | None = None
    sandbox_connections: Any = None  # ConnectionCounts (proxy/limits.py): open, pending
    audit: Any = None  # AuditLog: written, lost, write_errors, queued
    firewall: Callable[[], dict[str, int]] | None = None
    firewall_min_interval: float = 1.0
    # The service's: drops of sandboxes that ended, added as each ends (its table goes
    # with it, so a live read would fall back when it does). None: not exported.
    firewall_ended: dict[str, int] | None = None
    approvals: Callable[[], list] | None = None  # -> the pending approvals (pending.Pending)
    clock: Callable[[], float] = time.monotonic  # the approvals' clock, for their age


APPROVAL_WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_APPROVAL_OUTCOMES = {
    Reason.APPROVAL_GRANTED: "granted",
    Reason.APPROVAL_DENIED: "denied",
    Reason.APPROVAL_EXPIRED: "expired",
    Reason.APPROVAL_PENDING: "timeout",
}

_SANDBOX_RULE_PREFIX = {
    Reason.TASK_LIMIT: "builtin:limit-",
    Reason.SANDBOX_WEAKENED: "builtin:weakened-",
}


class Metrics:
    """An `EventSink` that turns events into Prometheus series on `self.registry`."""

    def __init__(self, *, max_label_values: int = 1000, max_profiles: int = 100):
        # No `*_created` series: they double the series count and no dashboard reads them.
        # (A process-wide switch of prometheus_client; sandgate has no other registry.)
        disable_created_metrics()
        # What `emit` tallied, added by `flush`; `_tally_lock` guards the rows against a
        # flush from the scrape thread, `_flush_lock` makes a read wait for a flush
        # under way (its rows are taken but not yet added).
        self._tally = MetricsTally()
        self._tally_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._tick_loop: asyncio.AbstractEventLoop | None = None  # a tick is pending on it
        self.registry = _FlushingRegistry(self.flush)
        r = self.registry
        self.connections = Counter(
            "sandgate_connections",
            "Connection decisions (TCP connect, TLS ClientHello, raw TCP).",
            [*_DECISION_LABELS, "protocol"],
            registry=r,
        )
        self.dns_queries = Counter(
            "sandgate_dns_queries",
            "DNS queries the DNS filter answered, by decision.",
            list(_DECISION_LABELS),
            registry=r,
        )
        self.http_requests = Counter(
            "sandgate_http_requests",
            "HTTP requests (plain or intercepted TLS), by decision.",
            [*_DECISION_LABELS, "protocol", "method"],
            registry=r,
        )
        self.approvals = Counter(
            "sandgate_approvals",
            "Approval outcomes (fallback ask).",
            list(_DECISION_LABELS),
            registry=r,
        )
        self.events = Counter(
            "sandgate_events",
            "Events the gateway emitted, by kind and verdict (the audit log gets each).",
            ["kind", "verdict"],
            registry=r,
        )
        self.bytes = Counter(
            "sandgate_bytes",
            "Bytes relayed for sandboxes, by direction (up: sandbox to internet).",
            ["direction", "kind", "profile"],
            registry=r,
        )
        self.latency = Histogram(
            "sandgate_decision_latency_seconds",
            "Time the gateway took to decide, per decision point (kind); dns includes the upstream answer.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            "sandgate_policy_reloads",
            "Policy loads and reloads, by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.task_limits = Counter(
            "sandgate_task_limits",
            "Tasks that hit a cgroup limit, by limit (memory, pids, cpus).",
            ["limit"],
            registry=r,
        )
        self.sandbox_weakened = Counter(
            "sandgate_sandbox_weakened",
            "Tasks run with --allow-weaker-sandbox without a protection, by feature.",
            ["feature"],
            registry=r,
        )
        self.approval_decisions = Counter(
            "sandgate_approval_decisions",
            "How approvals ended: outcome granted, denied, expired; timeout counts holds "
            "that ran out (the approval stays pending). scope: once, task, duration, always.",
            ["outcome", "scope"],
            registry=r,
        )
        self.approval_wait = Histogram(
            "sandgate_approval_wait_seconds",
            "Seconds from an approval's ask to its decision (granted or denied).",
            buckets=APPROVAL_WAIT_BUCKETS,
            registry=r,
        )
        self.approval_webhook_failures = Counter(
            "sandgate_approval_webhook_failures",
            "Approval webhook deliveries that failed every try (--approval-webhook).",
            registry=r,
        )
        self.admin_auth_failures = Counter(
            "sandgate_admin_auth_failures",
            "Requests to the approvals page or API with a wrong token or session "
            "(--admin-listen); the gateway's log names the address.",
            registry=r,
        )
        self.audit_suppressed = Counter(
            "sandgate_audit_events_suppressed",
            "Events the audit rate limit (--audit-rate, --audit-burst) wrote as part of an "
            "aggregate record ('N similar events suppressed') instead of a line each.",
            ["kind", "verdict", "reason"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "sandgate_worker_restarts",
            "Gateway workers that died and were started again (sandgate gateway --workers N).",
            registry=r,
        )
        # Every counter here starts from 0 with the process: a restart of the service is
        # a reset that Prometheus cannot always see (a counter may climb past its old
        # value before the next scrape); a change of this gauge says it happened.
        Gauge(
            "sandgate_start_time_seconds",
            "When this gateway process started (Unix time): its counters count from then.",
            registry=r,
        ).set(time.time())
        self.label_overflow = Counter(
            "sandgate_metric_label_overflow",
            "Label values folded into 'other' because a label reached its cap of distinct values.",
            ["label"],
            registry=r,
        )
        self._rule = _Cap("rule", max_label_values, self.label_overflow)
        self._profile = _Cap("profile", max_profiles, self.label_overflow)
        self._zero_the_alerted_series()
        self._children: dict[tuple, tuple] = {}
        self._bytes_children: dict[tuple, Any] = {}
        self._suppressed_children: dict[tuple, Any] = {}  # kinds x verdicts x reasons at most
        self.watched = _Watched()
        r.register(_StateCollector(self.watched))
        self._server_thread: threading.Thread | None = None
        self._wake_w: int | None = None  # written by stop(): the server thread returns

    def _zero_the_alerted_series(self) -> None:
        """Every series of a small fixed label set, at 0 from the start. A series born at
        its first increment starts at 1: `increase()` and `rate()` need a sample before
        it, so the first failed reload, overflow or limit would never fire an alert."""
        for kind in EventKind:
            for verdict in Verdict:
                self.events.labels(str(kind), str(verdict))
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)
        for limit in LIMITS:
            self.task_limits.labels(limit)
        for feature in SANDBOX_FEATURES:
            self.sandbox_weakened.labels(feature)
        for label in ("rule", "profile"):
            self.label_overflow.labels(label)

    # --- the sink ------------------------------------------------------------------

    def emit(self, event: Event | EncodedEvent) -> None:
        kind = event.kind
        if event.__class__ is EncodedEvent:
            if kind in TALLIED:
                return  # counted in its worker: add_tally
            event = event.decoded()
        elif kind in TALLIED:
            with self._tally_lock:
                self._tally.emit(event)
            if self._tick_loop is None:
                self._arm_tick()
            return
        self._count(event)

    def _count(self, event: Event) -> None:
        """An event's series, updated now (what a flush's `add_tally` does per row)."""
        kind = event.kind
        key = _label_key(event)
        children = self._children.get(key)
        if children is None:
            children = self._resolve(key)
        counter, events, latency = children
        events.inc()
        if counter is not None:
            counter.inc()
        seconds = _latency_of(event)
        if seconds is not None and latency is not None:
            latency.observe(seconds)
        if event.bytes_up or event.bytes_down:
            self._count_bytes(kind, event.profile, event.bytes_up, event.bytes_down)
        if kind is EventKind.TASK and event.reason in _SANDBOX_RULE_PREFIX:
            # The rule id names the limit or feature: builtin:limit-memory -> memory.
            prefix = _SANDBOX_RULE_PREFIX[event.reason]
            counter = (
                self.task_limits if event.reason is Reason.TASK_LIMIT else self.sandbox_weakened
            )
            counter.labels(self._rule((event.rule_id or "").removeprefix(prefix))).inc()
        # Verdict ask: a step that decides nothing (opened; its task ended, still pending).
        if (
            kind is EventKind.APPROVAL
            and event.reason in _APPROVAL_OUTCOMES
            and event.verdict is not Verdict.ASK
        ):
            self.approval_decisions.labels(
                _APPROVAL_OUTCOMES[event.reason], event.scope or ""
            ).inc()
            if event.reason in (Reason.APPROVAL_GRANTED, Reason.APPROVAL_DENIED) and event.wait:
                self.approval_wait.observe(event.wait)
        if kind is EventKind.POLICY:
            if event.reason is Reason.POLICY_LOADED:
                self.policy_reloads.labels("success").inc()
            elif event.reason is Reason.POLICY_INVALID:
                self.policy_reloads.labels("failure").inc()

    def add_tally(self, rows: list) -> None:
        """Add what a gateway worker counted (`MetricsTally.take`, one batch of its
        events): the same series as `emit` of each of them. Raises ValueError (or
        TypeError) for a row that is not one."""
        for row in rows:
            key, (n, seconds, buckets, up, down) = tuple(row[:7]), row[7:]
            children = self._children.get(key)  # the enums' strings find their entries
            if children is None:
                kind, verdict, reason, *labels = key
                children = self._resolve((EventKind(kind), Verdict(verdict), Reason(reason),
                                          *labels))  # fmt: skip
            counter, events, latency = children
            events.inc(n)
            if counter is not None:
                counter.inc(n)
            if buckets and latency is not None:
                _observe_many(latency, buckets, seconds)
            if up or down:
                self._count_bytes(EventKind(key[0]), key[4], up, down)

    def flush(self) -> None:
        """Add what `emit` tallied to the registry. Every read of the registry calls
        this first (`_FlushingRegistry`), and so does `stop`; any thread may."""
        with self._flush_lock:
            with self._tally_lock:
                rows = self._tally.take()
            if rows:
                self.add_tally(rows)
            loop = self._tick_loop
            if loop is not None and loop.is_closed():
                self._tick_loop = None  # it closed before the tick: the next loop arms one

    def _arm_tick(self) -> None:
        """Flush `TALLY_INTERVAL` seconds after the first event tallied since the last
        tick, on the loop that emits (none running: reads and `stop` still flush)."""
        # `_get_running_loop`: None where `get_running_loop` would raise, which would
        # cost an exception per event emitted off a loop (tests, benchmarks).
        loop = asyncio._get_running_loop()
        if loop is None:
            return
        loop.call_later(TALLY_INTERVAL, self._on_tick)
        self._tick_loop = loop

    def _on_tick(self) -> None:
        self._tick_loop = None
        self.flush()

    def count_suppressed(self, event: Event) -> None:
        """The audit rate limit held `event` back (RateLimitedAudit's on_suppressed)."""
        # Once a flood is held back this runs for each of its events: its child is kept.
        key = (event.kind, event.verdict, event.reason)
        child = self._suppressed_children.get(key)
        if child is None:
            child = self._suppressed_children[key] = self.audit_suppressed.labels(*map(str, key))
        child.inc()

    def _resolve(self, key: tuple) -> tuple:
        kind, verdict, reason, rule_id, profile, protocol, method = key
        decision = (str(verdict), str(reason), self._rule(rule_id), self._profile(profile))
        proto = protocol if protocol in PROTOCOLS else (OTHER if protocol else "")
        counter = None
        if kind is EventKind.CONNECTION:
            counter = self.connections.labels(*decision, proto)
        elif kind is EventKind.DNS:
            counter = self.dns_queries.labels(*decision)
        elif kind is EventKind.REQUEST:
            counter = self.http_requests.labels(
                *decision, proto, method if method in HTTP_METHODS else OTHER
            )
        elif kind is EventKind.APPROVAL:
            counter = self.approvals.labels(*decision)
        children = (
            counter,
            self.events.labels(str(kind), str(verdict)),
            self.latency.labels(str(kind)) if kind in _DECIDING else None,
        )
        if len(self._children) < _MAX_CACHED_CHILDREN:
            self._children[key] = children
        return children

    def _count_bytes(
        self, kind: EventKind, profile: str | None, up: int | None, down: int | None
    ) -> None:
        key = (kind, profile)
        children = self._bytes_children.get(key)
        if children is None:
            label = self._profile(profile)
            children = (
                self.bytes.labels("up", str(kind), label),
                self.bytes.labels("down", str(kind), label),
            )
            if len(self._bytes_children) < _MAX_CACHED_CHILDREN:
                self._bytes_children[key] = children
        if up:
            children[0].inc(up)
        if down:
            children[1].inc(down)

    # --- what is read at scrape time -------------------------------------------------

    def watch_gateway(self, gateway) -> None:
        """Read the policy, the sandbox registry and the open connections from a
        `proxy.gateway.Gateway` whenever Prometheus scrapes."""
        self.watched.policy = lambda: gateway.policy
        self.watched.sandboxes = lambda: len(gateway.registry)
        gate = getattr(gateway, "gate", None)
        self.watched.connections = lambda: len(getattr(gate, "connections", ()))
        self.watched.sandbox_connections = getattr(gate, "counts", None)
        approvals = getattr(gateway, "approvals", None)
        if approvals is not None:
            self.watched.approvals = approvals.store.list
            self.watched.clock = approvals.clock

    def watch_audit(self, audit) -> None:
        """Export an `AuditLog`'s written/lost/error counters and queue length."""
        self.watched.audit = audit

    def watch_firewall(
        self, read_counters: Callable[[], dict[str, int]], min_interval: float = 1.0
    ) -> None:
        """Export nftables drop counters; `read_counters` runs in the scrape thread,
        at most once per `min_interval` seconds (the last values stay when it fails)."""
        self.watched.firewall = read_counters
        self.watched.firewall_min_interval = min_interval

    def watch_firewall_ended(self, names) -> None:
        """Export the drop counters of sandboxes as they end (`count_firewall_drops`),
        every one of `names` from 0 on (a series born at its first drop hides that drop
        from `increase()`)."""
        self.watched.firewall_ended = dict.fromkeys(names, 0)

    def count_firewall_drops(self, counters: dict[str, int]) -> None:
        """A sandbox ended with these nftables drop counters: add them (once; its table
        is removed after)."""
        ended = self.watched.firewall_ended
        if ended is None:
            return
        for name, packets in counters.items():
            if packets > 0:
                ended[name] = ended.get(name, 0) + packets

    # --- serving ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text, as a scrape gets it."""
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve /metrics on host:port from a daemon thread; returns the bound
        address (port 0 picks a free one). Raises OSError if it cannot listen.

        The socket is bound here, so a port in use fails the call; the WSGI server
        (and its imports) comes up in the thread with the first connection, which
        waits in the backlog meanwhile."""
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HTTPServer
            listener.bind((host, port))
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        wake_r, self._wake_w = os.pipe()
        self._server_thread = threading.Thread(
            target=self._serve_forever,
            args=(listener, wake_r),
            name="sandgate-metrics",
            daemon=True,
        )
        self._server_thread.start()
        return host, listener.getsockname()[1]

    def _serve_forever(self, listener: socket.socket, wake_r: int) -> None:
        """Until stop(): `serve_forever` without its poll interval, which stop() would
        wait out at the end of every `sandgate run` (up to 20 ms here, 0.5 s by default).

        The WSGI server is made at the first scrape, not when the thread starts: its
        imports (wsgiref, http.server, email, urllib: ~20 ms of CPU) would otherwise
        take the GIL from the run's start, and most runs end unscraped."""
        server = None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            try:
                timeout = None
                while True:
                    ready = selector.select(timeout)
                    if any(key.fd == wake_r for key, _ in ready):
                        break
                    if server is None:
                        server = self._wsgi_server(listener)
                    if ready:
                        server._handle_request_noblock()  # accept + a thread (ThreadingMixIn)
                    timeout = server.expire()  # until the next scrape's deadline
            finally:
                if server is not None:
                    server.server_close()  # its socket is `listener`
                else:
                    listener.close()
                os.close(wake_r)

    def _wsgi_server(self, listener: socket.socket):
        """prometheus_client's threading WSGI server on the bound `listener`."""
        from wsgiref.simple_server import WSGIRequestHandler

        from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

        class QuietHandler(WSGIRequestHandler):
            """No access log line per scrape on stderr."""

            def log_message(self, format, *args) -> None:  # noqa: A002 - the base's name
                pass

        class MetricsServer(ThreadingWSGIServer):
            """A thread per scrape, as prometheus_client's, but at most SCRAPES_MAX at once
            (one more cuts the oldest) and each over after SCRAPE_S, whatever the client
            sends or reads (`expire`, from the accepting thread): idle connections from a
            local user would otherwise hold a thread and a descriptor each for ever."""

            address_family = listener.family

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.lock = threading.Lock()
                self.deadlines: dict[socket.socket, float] = {}  # the scrapes under way
                self.refused = 0

            def process_request(self, request, client_address):
                with self.lock:
                    if len(self.deadlines) >= SCRAPES_MAX:
                        # Room for this one: the oldest goes (a scrape takes milliseconds;
                        # the oldest is the idlest), so idle connections never keep a
                        # scrape out, nor more than SCRAPES_MAX threads.
                        oldest = min(self.deadlines, key=self.deadlines.__getitem__)
                        del self.deadlines[oldest]
                        self.refused += 1
                        with contextlib.suppress(OSError):
                            oldest.shutdown(socket.SHUT_RDWR)
                    self.deadlines[request] = time.monotonic() + SCRAPE_S
                request.settimeout(SCRAPE_S)
                try:
                    super().process_request(request, client_address)
                except BaseException:  # no thread: it is not under way
                    with self.lock:
                        self.deadlines.pop(request, None)
                    raise

            def process_request_thread(self, request, client_address):
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    with self.lock:
                        self.deadlines.pop(request, None)

            def handle_error(self, request, client_address):
                import sys

                if isinstance(sys.exc_info()[1], OSError):  # a scrape cut or gone: said nowhere
                    return
                super().handle_error(request, client_address)

            def expire(self) -> float | None:
                """Cut the scrapes past their deadline (a shutdown wakes the thread's
                read or write); the seconds until the next deadline, None: none."""
                now = time.monotonic()
                with self.lock:
                    for request, deadline in self.deadlines.items():
                        if deadline <= now:
                            with contextlib.suppress(OSError):
                                request.shutdown(socket.SHUT_RDWR)
                            self.deadlines[request] = now + 1.0  # again, if it lingers
                    soonest = min(self.deadlines.values(), default=None)
                return None if soonest is None else max(0.0, soonest - now)

        server = MetricsServer(listener.getsockname(), QuietHandler, bind_and_activate=False)
        server.socket.close()
        server.socket = listener
        server.server_name, server.server_port = socket.getfqdn(), listener.getsockname()[1]
        server.setup_environ()
        server.set_app(make_wsgi_app(self.registry))
        return server

    def stop(self) -> None:
        """Add what is tallied (nothing counted is lost at exit) and stop serving."""
        self.flush()
        if self._server_thread is not None:
            os.write(self._wake_w, b"x")
            self._server_thread.join()
            os.close(self._wake_w)
            self._server_thread = self._wake_w = None


def _latency_of(event: Event) -> float | None:
    """The seconds the latency histogram observes: the decision's latency; for DNS,
    which records the upstream's answer as its duration, that."""
    if event.latency is not None:
        return event.latency
    return event.duration if event.kind is EventKind.DNS else None


def _observe_many(child, buckets: list[int], total: float) -> None:
    """What `observe` of each of some values does to a histogram child, at once:
    `buckets` is [bucket index, count, ...] (the index as `observe` finds it),
    `total` the values' sum. prometheus_client has no call for it: this adds to the
    child's buckets and sum as `observe` does, through its private `_sum` and
    `_buckets` (unchanged across prometheus-client 0.x; a unit test compares the two,
    so a release that changes them fails it)."""
    child._sum.inc(total)
    for i in range(0, len(buckets), 2):
        child._buckets[buckets[i]].inc(buckets[i + 1])


class MetricsTally:
    """Events of the `TALLIED` kinds counted by label key, as `Metrics._count` would
    count them, one row per key: a gateway worker's (proxy/worker.py), taken with
    each batch of events it sends for the service's `Metrics.add_tally`, and the
    in-process gateway's, which `Metrics.emit` holds until its next `flush`. One
    row per key and batch, not one update per event. The other kinds are left to
    `Metrics`, which gets each such event anyway."""

    def __init__(self):
        self._rows: dict[tuple, list] = {}
        self._bounds = (*LATENCY_BUCKETS, math.inf)

    def emit(self, event: Event) -> None:
        kind = event.kind
        if kind not in TALLIED:
            return
        key = _label_key(event)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = [0, 0.0, {}, 0, 0]  # n, seconds, bucket -> n, up, down
        row[0] += 1
        if kind in _DECIDING:
            seconds = _latency_of(event)
            if seconds is not None and not math.isnan(seconds):
                row[1] += seconds
                bucket = bisect.bisect_left(self._bounds, seconds)
                row[2][bucket] = row[2].get(bucket, 0) + 1
        if event.bytes_up:
            row[3] += event.bytes_up
        if event.bytes_down:
            row[4] += event.bytes_down

    def take(self) -> list[list]:
        """The rows counted since the last `take` (JSON-ready), and start afresh:
        [kind, verdict, reason, rule_id, profile, protocol, method, n, seconds,
        [bucket, n, ...], bytes up, bytes down]."""
        rows = [
            [*key, n, seconds, [x for item in buckets.items() for x in item], up, down]
            for key, (n, seconds, buckets, up, down) in self._rows.items()
        ]
        self._rows = {}
        return rows


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port), port 0 for any free port;
    ValueError naming the problem."""
    try:
        return parse_host_port(text, allow_zero=True)
    except ValueError as e:
        raise ValueError(f"expected HOST:PORT (e.g. {DEFAULT_LISTEN}), got {text!r}: {e}") from None


class _FlushingRegistry(CollectorRegistry):
    """A registry that calls `flush` before it is read: a scrape, a filtered scrape
    (`?name[]=`: `restricted_registry`) and `get_sample_value` all see every event
    emitted before them."""

    def __init__(self, flush: Callable[[], None]):
        super().__init__(auto_describe=True)
        self._flush = flush

    def collect(self):
        self._flush()
        yield from super().collect()

    def restricted_registry(self, names):
        self._flush()
        return super().restricted_registry(names)


class _StateCollector:
    """Gauges and counters read from live objects when Prometheus scrapes."""

    def __init__(self, watched: _Watched):
        self.watched = watched
        self._firewall: dict[str, int] = {}
        self._firewall_read_at = 0.0
        self._lock = threading.Lock()

    def describe(self):
        return []  # names vary with what is watched; nothing to check at register time

    def collect(self):
        w = self.watched
        if w.policy is not None:
            policy = w.policy()
            info = GaugeMetricFamily(
                "sandgate_policy_info", "The policy in force (value 1), by hash.", labels=["hash"]
            )
            info.add_metric([policy.hash], 1)
            yield info
            yield GaugeMetricFamily(
                "sandgate_policy_rules",
                "Active rules in the policy in force.",
                value=policy.rule_count,
            )
        if w.sandboxes is not None:
            yield GaugeMetricFamily(
                "sandgate_active_sandboxes",
                "Sandboxes registered with the gateway.",
                value=w.sandboxes(),
            )
        if w.connections is not None:
            yield GaugeMetricFamily(
                "sandgate_active_connections",
                "Sandbox TCP connections the proxy holds open.",
                value=w.connections(),
            )
        if w.sandbox_connections is not None:
            held = GaugeMetricFamily(
                "sandgate_sandbox_connections",
                "Connections counted against the sandboxes' limits, summed over sandboxes.",
                labels=["state"],
            )
            held.add_metric(["open"], w.sandbox_connections.open)
            held.add_metric(["pending"], w.sandbox_connections.pending)
            yield held
        if w.approvals is not None:
            pending = w.approvals()
            yield GaugeMetricFamily(
                "sandgate_approvals_pending",
                "Approvals waiting for a human.",
                value=len(pending),
            )
            now = w.clock()
            yield GaugeMetricFamily(
                "sandgate_approval_oldest_pending_seconds",
                "Seconds the oldest pending approval has waited (0: none pending).",
                value=max((now - p.created for p in pending), default=0.0),
            )
        if w.audit is not None:
            audit = w.audit
            yield CounterMetricFamily(
                "sandgate_audit_events_written",
                "Events written to the audit log.",
                value=audit.written,
            )
            yield CounterMetricFamily(
                "sandgate_audit_events_lost",
                "Events that could not be queued or written to the audit log.",
                value=audit.lost,
            )
            yield CounterMetricFamily(
                "sandgate_audit_write_errors",
                "Failed writes to the audit log (each is retried).",
                value=audit.write_errors,
            )
            yield GaugeMetricFamily(
                "sandgate_audit_queue_length",
                "Events waiting for the audit writer.",
                value=audit.queued,
            )
            yield GaugeMetricFamily(
                "sandgate_audit_writable",
                "1 while the audit log can be written; 0 while writes fail or its budget is "
                "reached (new connections are refused with --on-audit-failure block).",
                value=1 if getattr(audit, "writable", True) else 0,
            )
        if w.firewall is not None or w.firewall_ended is not None:
            dropped = CounterMetricFamily(
                "sandgate_firewall_dropped_packets",
                "Sandbox packets nftables dropped, by counter.",
                labels=["counter"],
            )
            totals = collections.Counter(w.firewall_ended or {})
            if w.firewall is not None:
                totals.update(self._read_firewall())
            for name in sorted(totals):
                dropped.add_metric([name], totals[name])
            yield dropped

    def _read_firewall(self) -> dict[str, int]:
        with self._lock:
            now = time.monotonic()
            if now - self._firewall_read_at >= self.watched.firewall_min_interval:
                self._firewall_read_at = now
                try:
                    self._firewall = dict(self.watched.firewall())
                except Exception as e:  # noqa: BLE001 - a scrape must not fail on nft
                    log.debug("could not read firewall counters: %s", e)
            return dict(self._firewall)
