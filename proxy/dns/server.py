"""The DNS filter's server: UDP and TCP listeners, the upstream queries, one event
per query. What to answer is decided by the pure modules (`query`, `answer`); the
bindings it records are read by the connection gate."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import socket
import time
from collections.abc import Callable

import dns.flags
import dns.rcode
import dns.rdatatype
from sandgate.proxy.dns.answer import (
    filter_answer,
    filter_simple_answer,
    render,
    upstream_failure,
)
from sandgate.proxy.dns.bindings import DnsBindings, canonical_address
from sandgate.proxy.dns.placeholders import TTL as PLACEHOLDER_TTL
from sandgate.proxy.dns.placeholders import Placeholders
from sandgate.proxy.dns.query import (
    OUR_PAYLOAD,
    DecideName,
    QueryCheck,
    QuickCheck,
    check_query,
    header_response,
    make_response,
    quick_check,
    refused,
)
from sandgate.proxy.dns.upstream import AnswerTooLarge, UdpUpstream, tcp_ask
from sandgate.proxy.dns.wire import QTYPE_TEXT, render_simple, scan_query
from sandgate.proxy.limits import TokenBuckets, fair_share
from sandgate.proxy.policy.builtin import deny
from sandgate.proxy.policy.model import DEFAULT_LIMITS, Decision, Limits
from sandgate.proxy.policy.names import IPAddress, format_host_port
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventFanout, EventKind, EventSink

# What the UDP socket's receive queue may hold (`_room_for_bursts`).
DNS_RECEIVE_QUEUE = 8 << 20
# Datagrams read per wakeup of the UDP socket (`_UdpIntake`): enough that a flood is
# read faster than it arrives, few enough that the loop's other work gets its turn.
INTAKE_BATCH = 256
MAX_SOURCES = 4096  # datagram sources remembered as `sandbox_for` takes them
MAX_DATAGRAM = 65535
# Queries one TCP connection may have taken in and not yet answered (RFC 7766
# pipelining, answered in order): past it the connection is not read until its
# first answer is out, so a pipelining client cannot make the gateway hold more.
TCP_PIPELINE = 32
# The TCP listener's accept queue, as the front door's (frontdoor/door.py): asyncio's
# own default (100) is what it listens with, even on a socket a worker listened on.
TCP_BACKLOG = 1024
_PORT_ATTEMPTS = 16  # free UDP ports tried for one whose TCP twin is free too
SO_RCVBUFFORCE = 33  # Linux (socket(7)); Python's socket module has no name for it

log = logging.getLogger("sandgate.dns")

SandboxFor = Callable[[str], "tuple[str, str, str | None] | None"]
"""`sandbox_for(source_ip) -> (sandbox_id, profile, task_id)`, or None for a stranger.
The task is the asker: a sandbox address outlives its task and may become another's
while an upstream answer is awaited (`DnsFilter._bind`)."""


_Asker = tuple[str, "tuple[str, str, str | None]"]
"""(a query's canonical source address, `sandbox_for`'s answer for it)."""
_Outcome = tuple["bytes | None", Decision, dict]
"""A query's answer: (the response, None to send nothing; the decision; event fields)."""


@dataclasses.dataclass(slots=True)
class _Upstream:
    """A query the upstream must answer first: `forward` goes out; `quick` (the common
    shape) or `check` (any other) says how its answer is filtered."""

    wire: bytes
    forward: bytes
    quick: QuickCheck | None
    check: QueryCheck | None
    who: tuple
    source_ip: str
    udp: bool


class DnsFilter:
    """The asyncio DNS server the sandboxes' port-53 traffic is redirected to.

    Listens on UDP (`_UdpIntake`) and TCP (`_TcpConnection`: RFC 7766 framing,
    several queries per connection, pipelined ones answered in order, an idle
    timeout), both served in callbacks: no task per query but for the rare ones
    (`_forward_soon`). Each query gets exactly one event, taken in before its answer
    leaves (`_hold`); a query's failure is its SERVFAIL (`_failed`), never the
    server's. With nftables `redirect`, a UDP reply sent from the same socket is
    un-NATed by conntrack, so the sandbox sees it come from the address it queried.
    """

    def __init__(
        self,
        *,
        decide_name: DecideName,
        sandbox_for: SandboxFor,
        sink: EventSink,
        upstreams: list[str],
        upstream_port: int = 53,
        bindings: DnsBindings | None = None,
        keep_special: Callable[[str, IPAddress], bool] | None = None,
        timeout: float = 2.0,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 256,
        max_tcp_queries: int = 100,
        max_pending_per_sandbox: int = 128,
        limits_for: Callable[[str], Limits] | None = None,
        clock: Callable[[], float] = time.monotonic,
        placeholders: Placeholders | None = None,
        policy_hash: Callable[[], str | None] = lambda: None,
    ):
        """`placeholders`: answer names the policy asks a human about from the
        placeholder pool (proxy/dns/placeholders.py), never from upstream.
        `policy_hash()`: the hash of the policy in force, stamped on each event (None:
        the sink stamps it).
        `limits_for(profile)`: the profile's caps (its `dns_qps`); the defaults
        when not given. `clock` (monotonic seconds) drives the rate buckets."""
        self.decide_name = decide_name
        self.sandbox_for = sandbox_for
        # A failing sink is logged, never raised into a query (EventFanout).
        self.sink = EventFanout(sink)
        self.policy_hash = policy_hash
        # A denial for every query that would go upstream while the gateway forwards
        # nothing it could not record (Gateway.guard_audit), else None.
        self.hold: Callable[[], Decision | None] = lambda: None
        self.upstreams = list(upstreams)
        self.upstream_port = upstream_port
        self.bindings = bindings if bindings is not None else DnsBindings()
        self.keep_special = keep_special  # (profile, ip) -> an explicit CIDR rule allows it
        self.timeout = timeout
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_queries = max_tcp_queries
        self.max_pending_per_sandbox = max_pending_per_sandbox
        self.port: int | None = None
        self._udp: _UdpIntake | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._tcp_connections: set[_TcpConnection] = set()
        self._tcp_held: dict[str, int] = {}  # admitted TCP connections by source address
        self._tcp_admitted = 0
        self._pending: dict[str, int] = {}
        self._udp_upstreams: dict[str, UdpUpstream] = {}
        self._stopped = False  # replies that come in while stopping are not answered
        # `_hold`: (event, response, a datagram's source or a TCP query's `_TcpAnswer`)
        self._held: list[tuple[Event, bytes | None, tuple | _TcpAnswer]] = []
        self._reading = False  # in a reader's pass (`_read_then_answer`)
        self.limits_for = limits_for or (lambda profile: DEFAULT_LIMITS)
        self.rates = TokenBuckets(clock)  # queries a second, per sandbox
        self.refusals = TokenBuckets(clock)  # REFUSED replies to over-rate queries, per sandbox
        self._source_ips: dict[str, str | None] = {}  # a datagram's source -> `_source_ip`
        self.placeholders = placeholders

    async def start(
        self,
        listen_host: str = "",
        port: int = 0,
        *,
        sockets: tuple[socket.socket, socket.socket] | None = None,
    ) -> None:
        """Bind UDP and TCP on `listen_host:port` (port 0: any free port, the same
        for both; see `self.port`), or serve `sockets`: a bound UDP socket and a
        bound, listening TCP socket someone else made (a worker's, which the service
        owns: see enforcer/workers.py)."""
        loop = asyncio.get_running_loop()
        # Port 0: the kernel's free UDP port may be a TCP port in use, the local end of
        # one of the gateway's own upstream connections (the same ephemeral range:
        # thousands of them in TIME_WAIT after a busy minute): then another port.
        for attempt in range(1 if port or sockets is not None else _PORT_ATTEMPTS):
            if sockets is not None:
                udp_sock, tcp_sock = sockets
            else:
                udp_sock = await _bound_udp(loop, listen_host, port)
            _room_for_bursts(udp_sock)
            self._udp = _UdpIntake(self, udp_sock, loop)
            self.port = udp_sock.getsockname()[1]
            try:
                connection = functools.partial(_TcpConnection, self)
                if sockets is not None:
                    self._tcp = await loop.create_server(
                        connection, sock=tcp_sock, backlog=TCP_BACKLOG
                    )
                else:
                    self._tcp = await loop.create_server(
                        connection, listen_host, self.port, backlog=TCP_BACKLOG
                    )
                break
            except OSError as e:
                self._udp.close()
                self._udp = None
                if e.errno != errno.EADDRINUSE or attempt == _PORT_ATTEMPTS - 1 or port:
                    raise
        log.info("DNS filter listening on %s:%d (udp, tcp)", listen_host or "*", self.port)

    def forget(self, sandbox: str) -> None:
        """`sandbox` (an address) is gone: its rate buckets with it."""
        self.rates.forget(sandbox)
        self.refusals.forget(sandbox)

    async def stop(self) -> None:
        """Stop serving. What is held for the loop's next turn is answered first (its
        events taken in), then the sockets close: TCP connections at once (aborted if
        their client is not reading what was written). A query still upstream gets
        its event (no answer: `_gone`), so that no query taken in goes unrecorded."""
        self._stopped = True
        self._answer_held()  # before the sockets close, not at the loop's next turn
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        closed = [connection.close_now() for connection in list(self._tcp_connections)]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *closed, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        for upstream in self._udp_upstreams.values():
            upstream.close()  # what is still upstream is over: `_forward_soon`'s `answered`
        self._udp_upstreams.clear()
        self._answer_held()  # the events of what was still upstream
        self._udp = self._tcp = None

    # The intakes (UDP, TCP): a query within its sandbox's rate is served (`_serve`)
    # without waiting for the upstream, so a slow upstream never blocks other
    # sandboxes; one over it is refused at intake (`_shed`), never forwarded.

    def _take_in(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Serve the `datagrams` one read of the UDP socket got, in its order per
        sandbox: each sandbox's queries over its `dns_qps` are refused here (`_shed`:
        no task, no parsing beyond the question, still one event each), and the rest
        are served round-robin over the sandboxes (`_serve_udp`), so that a sandbox's
        query waits behind at most one of each other sandbox's, however many they sent."""
        admitted: dict[str | None, list[tuple[bytes, tuple, _Asker | None]]] = {}
        for wire, addr in datagrams:
            try:
                source_ip = self._source_ips.get(addr[0], False)
                if source_ip is False:
                    if len(self._source_ips) >= MAX_SOURCES:
                        self._source_ips.clear()
                    source_ip = self._source_ips[addr[0]] = _source_ip(addr[0])
                who = self.sandbox_for(source_ip) if source_ip else None
                if who is None:  # `_decide` says why (unknown-sandbox, or a bug's SERVFAIL)
                    admitted.setdefault(None, []).append((wire, addr, None))
                    continue
                over = self._over_rate(who[0], who[1])
                if over is None:
                    admitted.setdefault(who[0], []).append((wire, addr, (source_ip, who)))
                else:
                    self._shed(wire, addr, _event_fields(addr), who, over)
            except Exception:  # noqa: BLE001 - a bug costs this query, not the read's others
                fields = _event_fields(addr)
                self._reply(self._failed(wire, fields), fields, time.perf_counter(), addr, wire)
        for round_ in itertools.zip_longest(*admitted.values()):
            for datagram in round_:
                if datagram is not None:
                    self._serve_udp(*datagram)

    def _take_in_tcp(self, wire: bytes, to: _TcpAnswer) -> None:
        """A query read from a TCP connection (`_TcpConnection`), as `_take_in` takes a
        datagram: its sandbox's rate token taken here (`_shed` past it), then `_serve`.
        Never raises: a failure here is the query's SERVFAIL and event, never the
        connection's or the server's (asyncio would close the connection, and its
        queries would have no event)."""
        connection = to.connection
        fields = {"protocol": "dns", "source": connection.source}
        try:
            source_ip = connection.source_ip
            who = self.sandbox_for(source_ip) if source_ip else None
            if who is None:  # `_decide` says why (unknown-sandbox, or a bug's SERVFAIL)
                self._serve(wire, to, fields, connection.peer_ip, False, None)
                return
            over = self._over_rate(who[0], who[1])
            if over is None:
                self._serve(wire, to, fields, source_ip, False, (source_ip, who))
            else:
                self._shed(wire, to, fields, who, over)
        except Exception:  # noqa: BLE001 - one query must never take the server down
            self._reply(self._failed(wire, fields), fields, time.perf_counter(), to, wire)

    def _shed(
        self, wire: bytes, to: tuple | _TcpAnswer, fields: dict, who: tuple, over: Decision
    ) -> None:
        """Refuse the query `wire` of the sandbox `who`, over its rate (`over`): the
        event `_serve` would make for it, on the bytes (`wire.scan_query`) alone. At
        most `dns_qps` REFUSED datagrams a second: past that the query is dropped (its
        event says so), so a flood costs the gateway no reply, and its sandbox's
        stub, which ignores REFUSED anyway, no more than the wait it chose. Over TCP
        each is REFUSED, as before: the connection's back pressure bounds what its
        replies cost, and a TCP flood does not use up its sandbox's refusals of
        datagrams (its stub's UDP queries would go unanswered, and wait)."""
        started = time.perf_counter()
        sandbox, profile, task_id = who
        query = scan_query(wire)
        if query is None:  # not of the common shape: no question to echo, none named
            response, name, qtype = header_response(wire, dns.rcode.REFUSED), None, ""
        else:  # the name as asked, lower case: it was never checked, so not parsed
            response = render_simple(query, dns.rcode.REFUSED)
            name, qtype = query.name.lower(), QTYPE_TEXT[query.qtype]
        detail = _join(over.detail, qtype)
        if (
            response is not None
            and to.__class__ is tuple  # a datagram's source
            and not self.refusals.take(sandbox, self.limits_for(profile).dns_qps)
        ):
            response, detail = (
                None,
                _join(detail, "dropped, no reply: too many refused this second"),
            )
        self._hold(
            Event.from_decision(
                EventKind.DNS,
                dataclasses.replace(over, detail=detail),
                **fields,
                sandbox=sandbox,
                profile=profile,
                task_id=task_id,
                name=name,
                duration=time.perf_counter() - started,
            ),
            response,
            to,
        )

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _serve_udp(self, wire: bytes, addr: tuple, asker: _Asker | None) -> None:
        """A UDP query that `_take_in` admitted (its rate token taken there, its asker
        looked up: `asker`, or None for none): `_serve`."""
        self._serve(wire, addr, _event_fields(addr), addr[0], True, asker)

    def _serve(
        self,
        wire: bytes,
        to: tuple | _TcpAnswer,
        fields: dict,
        source: str,
        udp: bool,
        asker: _Asker | None,
    ) -> None:
        """An admitted query (its rate token taken, its asker looked up: `asker`, or None
        for none), to be answered to `to` (`_hold`): in the intake's pass when the
        filter needs no upstream (a denied name: what a flood is made of); else
        forwarded, never waited for: a slow upstream never blocks other sandboxes."""
        started = time.perf_counter()
        outcome = self._answer_now(wire, fields, source, udp, True, asker)
        if not isinstance(outcome, _Upstream):
            self._reply(outcome, fields, started, to, wire)
        elif not self._forward_soon(outcome, to, fields, started):
            self._spawn(self._serve_upstream(outcome, to, fields, started))

    def _forward_soon(
        self, pending: _Upstream, to: tuple | _TcpAnswer, fields: dict, started: float
    ) -> bool:
        """Forward the common query (`pending.quick`) to the first upstream and answer it
        in the reply's callback, without a task: a task per query (its steps, its
        timeout's timer) was ~15 % of an allowed query's time. Whatever is not a clean
        reply (a timeout, an error, a truncated or oversized answer) goes on in a task,
        from where the first upstream left it. False, for the task path from the start:
        another shape of query, no upstream, the sandbox's queries in flight at their
        cap, or no socket to send from."""
        sandbox = pending.who[0]
        if pending.quick is None or not self.upstreams or not self._reserve(sandbox):
            return False

        def answered(reply: bytes | Exception) -> None:
            self._release(sandbox)
            if self._stopped:  # as a task of a stopped server, cancelled: no answer
                outcome = self._gone(pending, fields)
            elif isinstance(reply, Exception) or reply[2] & 0x02:  # failed, or truncated (TC)
                self._spawn(self._serve_upstream(pending, to, fields, started, reply))
                return
            else:
                try:
                    outcome = self._filtered(pending, reply, "")
                except Exception:  # noqa: BLE001 - one query must never take the server down
                    outcome = self._failed(pending.wire, fields)
            self._reply(outcome, fields, started, to, pending.wire)

        try:
            self._ask_first(pending.forward, answered)
        except OSError:  # no socket: the task path says so, in its event
            self._release(sandbox)
            return False
        return True

    async def _serve_upstream(
        self,
        pending: _Upstream,
        to: tuple | _TcpAnswer,
        fields: dict,
        started: float,
        first: bytes | Exception | None = None,
    ) -> None:
        try:
            outcome = await self._answer_upstream(pending, fields, first)
        except asyncio.CancelledError:  # `stop`: no answer, but the query's event
            self._reply(self._gone(pending, fields), fields, started, to, pending.wire)
            raise
        self._reply(outcome, fields, started, to, pending.wire)

    def _gone(self, pending: _Upstream, fields: dict) -> _Outcome:
        """The outcome of `pending`, still upstream when the filter stopped: no answer
        (nothing is bound); its event says why."""
        try:
            _, decision, more = self._filtered(pending, None, "the DNS filter stopped")
        except Exception:  # noqa: BLE001 - one query must never take the server down
            _, decision, more = self._failed(pending.wire, fields)
        return None, decision, more

    def _reply(
        self,
        outcome: _Outcome,
        fields: dict,
        started: float,
        to: tuple | _TcpAnswer,
        wire: bytes,
    ) -> None:
        """`_hold` the event and response of the query `wire`; a failure to make the
        event (a bug) is its SERVFAIL and INTERNAL_ERROR event: over TCP, a query
        never answered would hold up every answer after it on its connection."""
        try:
            event, response = self._event(outcome, fields, started)
        except Exception:  # noqa: BLE001 - one query must never take the server down
            plain = {"protocol": "dns", "source": fields["source"]}
            event, response = self._event(self._failed(wire, plain), plain, started)
        self._hold(event, response, to)

    def _hold(self, event: Event, response: bytes | None, to: tuple | _TcpAnswer) -> None:
        """Emit `event` and send `response` (None: nothing; over TCP, the connection's
        end) to `to` (a datagram's source, or a TCP query's `_TcpAnswer`) at the loop's
        next turn, with every other answer made until then: their events go to the
        sink as one batch, then the replies go out, so each event is still taken in
        (journaled) before its answer leaves. A batch costs the sinks (encoding,
        the journal, the chain) about half of what the same events one at a time
        between the loop's other work do (the code and data stay in the cache)."""
        held = self._held
        held.append((event, response, to))
        if len(held) == 1 and not self._reading:
            asyncio.get_running_loop().call_soon(self._answer_held)

    def _read_then_answer(self, read: Callable, *args) -> None:
        """`read(*args)`, a reader's pass (the UDP intake's, an upstream socket's). A
        pass that made one answer answers it at its end, rather than at the loop's next
        turn: that turn cost a query that came alone an epoll_wait and asyncio's step
        more (a tenth of its CPU in the gateway, bench_dns's latency rows). Anything
        more waits for that turn as before, so that the answers of every reader ready
        at once go as one batch (answered at each pass's end, a busy filter's
        queries/s fell 5-15 %). Readers are the loop's callbacks: never nested."""
        self._reading = True
        try:
            read(*args)
        finally:
            self._reading = False
            held = len(self._held)
            if held == 1:
                self._answer_held()
            elif held:
                asyncio.get_running_loop().call_soon(self._answer_held)

    def _answer_held(self) -> None:
        held, self._held = self._held, []
        if not held:  # `stop` answered them already
            return
        self.sink.emit_batch([event for event, _, _ in held])
        udp = self._udp
        for _, response, to in held:
            if to.__class__ is tuple:  # a datagram's source
                if response is not None and udp is not None:
                    udp.sendto(response, to)
                continue
            try:
                to.answer(response)  # written in its connection's order
            except Exception:  # noqa: BLE001 - one connection's failure is not the others'
                log.exception("DNS answer over TCP to %s failed", to.connection.source)
                to.connection.close_now()

    # One query.

    async def handle(
        self, wire: bytes, source: tuple, *, udp: bool, rated: bool = False
    ) -> bytes | None:
        """Answer one query from `source` ((ip, port, ...)): the bytes to send back,
        or None to send nothing. Emits exactly one event. Never raises. `rated`: the
        query's token of its sandbox's rate was taken already. Not the servers' path
        (the intakes take the rate token and serve in callbacks: `_serve`), but the
        same halves below: tests and tools ask it one query at a time."""
        started, fields = time.perf_counter(), _event_fields(source)
        outcome = self._answer_now(wire, fields, source[0], udp, rated, None)
        if isinstance(outcome, _Upstream):
            outcome = await self._answer_upstream(outcome, fields)
        event, response = self._event(outcome, fields, started)
        self.sink.emit(event)
        return response

    # A query in two halves, each with the safety net that makes its failure a SERVFAIL
    # with its event: what needs no upstream, and what does.

    def _answer_now(self, wire: bytes, fields: dict, *where) -> _Outcome | _Upstream:
        """`_decide(wire, fields, *where)`."""
        try:
            return self._decide(wire, fields, *where)
        except Exception:  # noqa: BLE001 - one query must never take the server down
            return self._failed(wire, fields)

    async def _answer_upstream(
        self, pending: _Upstream, fields: dict, first: bytes | Exception | None = None
    ) -> _Outcome:
        """`first`: the first upstream's reply (or failure), when it came already."""
        try:
            reply, failure = await self._forward(pending.forward, pending.who[0], first)
            return self._filtered(pending, reply, failure)
        except Exception:  # noqa: BLE001 - one query must never take the server down
            return self._failed(pending.wire, fields)

    def _failed(self, wire: bytes, fields: dict) -> _Outcome:
        log.exception("DNS query from %s failed", fields["source"])
        return (
            header_response(wire, dns.rcode.SERVFAIL),
            deny("internal-error", "DNS filter error"),
            {},
        )

    def _event(self, outcome: _Outcome, fields: dict, started: float) -> tuple[Event, bytes | None]:
        """The query's one event; its response."""
        response, decision, more = outcome
        fields.update(more)
        fields["duration"] = time.perf_counter() - started
        # Stamped here, as the gateway's emit would (a copy of each event there).
        fields["policy_hash"] = self.policy_hash()
        # The event's detail says more than the decision's: the type and the answer.
        return Event.from_decision(EventKind.DNS, decision, **fields), response

    def _decide(
        self,
        wire: bytes,
        fields: dict,
        source_ip: str,
        udp: bool,
        rated: bool,
        asker: _Asker | None,
    ) -> _Outcome | _Upstream:
        """What needs no upstream: the answer, or what to ask the upstream (`_Upstream`).
        `asker`: (the canonical source, `sandbox_for`'s answer) when the intake has
        them."""
        if asker is None:
            source_ip = canonical_address(source_ip).compressed
            who = self.sandbox_for(source_ip)
        else:
            source_ip, who = asker
        if who is None:
            decision = deny("unknown-sandbox", "source is no sandbox")
            return header_response(wire, dns.rcode.REFUSED), decision, {}
        sandbox, profile, task_id = who
        # The asker's task, now: the event is stamped after the upstream's answer, when
        # the address may be no task's or a later one's.
        fields.update(sandbox=sandbox, profile=profile, task_id=task_id)
        quick = quick_check(wire, profile, self.decide_name)
        if quick is not None:  # on the bytes (`wire.py`) as far as the answer allows
            fields.update(name=quick.name)
            over = None if rated else self._over_rate(sandbox, profile)
            if over is not None:
                response = render_simple(quick.query, dns.rcode.REFUSED)
                return response, over, {"detail": _join(over.detail, quick.qtype)}
            if quick.forward is None:
                detail = _join(quick.decision.detail, quick.qtype)
                return quick.response, quick.decision, {"detail": detail}
            if (held := self.hold()) is not None:
                response = render_simple(quick.query, dns.rcode.REFUSED)
                return response, held, {"detail": _join(held.detail, quick.qtype)}
            return _Upstream(wire, quick.forward, quick, None, who, source_ip, udp)
        check = check_query(wire, profile, self.decide_name)
        fields.update(name=check.name)
        over = None if rated else self._over_rate(sandbox, profile)
        if over is not None:
            return refused(check, wire), over, {"detail": _join(over.detail, check.qtype or "")}
        if check.decision.verdict is Verdict.ASK and self.placeholders is not None:
            return self._placeholder(check, sandbox, udp)
        if check.action != "forward":
            detail = _join(check.decision.detail, check.qtype or "")
            return check.response, check.decision, {"detail": detail}
        if (held := self.hold()) is not None:
            return refused(check, wire), held, {"detail": _join(held.detail, check.qtype or "")}
        return _Upstream(wire, check.forward.to_wire(), None, check, who, source_ip, udp)

    def _filtered(
        self, pending: _Upstream, reply: bytes | Decision | None, failure: str
    ) -> _Outcome:
        """The answer to `pending` from the upstream's `reply` (see `_filter`). A query
        of the common shape is answered on the bytes when the answer needs no edit,
        through dnspython when the filter has work to do."""
        who, source_ip, udp = pending.who, pending.source_ip, pending.udp
        quick = pending.quick
        if quick is None:
            check = pending.check
            return self._filter(
                check.query, check.qtype, check.decision, reply, failure, who, source_ip, udp
            )
        if isinstance(reply, bytes):
            simple = filter_simple_answer(quick.query, quick.name, reply, udp=udp)
            if simple is not None:
                self._bind(who, source_ip, simple.bindings)
                detail = _join(quick.decision.detail, f"{quick.qtype} {simple.summary}")
                return simple.response, quick.decision, {"detail": detail}
        from dns.message import from_wire  # the slow path's (package docstring, "Imports")

        query = from_wire(pending.wire)
        return self._filter(query, quick.qtype, quick.decision, reply, failure, who, source_ip, udp)

    def _filter(
        self,
        query: dns.message.Message,
        qtype: str,
        decision: Decision,
        reply: bytes | Decision | None,
        failure: str,
        who: tuple,
        source_ip: str,
        udp: bool,
    ) -> tuple[bytes, Decision, dict]:
        """The response to the allowed `query` from the upstream's `reply` (None:
        none came, `failure` says why; a Decision: the sandbox's limit refused to
        forward), through `filter_answer`; records the bindings (`_bind`)."""
        profile = who[1]
        if reply is None or isinstance(reply, Decision):
            answer = upstream_failure(query, failure)
            if isinstance(reply, Decision):
                answer = answer._replace(decision=reply)
        else:
            keep = functools.partial(self.keep_special, profile) if self.keep_special else None
            answer = filter_answer(query, reply, keep_special=keep)
        self._bind(who, source_ip, answer.bindings)
        extra = answer.decision.detail if answer.decision else ""
        summary = f"{qtype} {_describe(answer.response)}"
        detail = _join(decision.detail, extra, summary)
        response = render(answer.response, query, udp=udp)
        return response, answer.decision or decision, {"detail": detail}

    def _bind(self, who: tuple, source_ip: str, bindings) -> None:
        """Record `bindings` for the sandbox of `who` (`sandbox_for`'s answer when the
        query came) if that task still holds `source_ip`: an answer that arrives after
        its task ended binds nothing, so no later task given the address inherits names
        that only the earlier one's profile could resolve."""
        if self.sandbox_for(source_ip) != who:
            return
        for name, ip, ttl in bindings:
            self.bindings.record(who[0], name, ip, ttl)

    def _placeholder(
        self, check: QueryCheck, sandbox: str, udp: bool
    ) -> tuple[bytes | None, Decision, dict]:
        """A name a human must approve first: an A answer from the placeholder pool (no
        data for other types), and not a byte to the upstream resolver."""
        import dns.rrset

        response = make_response(check.query)
        answered = ""
        if check.qtype == "A":
            address = self.placeholders.address_for(sandbox, check.name)
            response.answer.append(
                dns.rrset.from_text(
                    check.query.question[0].name, PLACEHOLDER_TTL, "IN", "A", address
                )
            )
            answered = f"placeholder {address}"
        detail = _join(
            check.decision.detail,
            f"{check.qtype} {answered or 'NOERROR, no data'}: answered from the placeholder "
            "pool; resolved upstream only after approval",
        )
        return render(response, check.query, udp=udp), check.decision, {"detail": detail}

    async def resolve_address(self, who: tuple, name: str) -> str | None:
        """Resolve `name` upstream for the sandbox of `who` (`sandbox_for`'s answer: a
        placeholder's name, after approval): its first usable IPv4 address, recorded
        as a binding; None if there is none. The answer is filtered like any other
        (rebinding), and the query is an event."""
        import dns.message

        sandbox, profile, task_id = who
        query = dns.message.make_query(name, dns.rdatatype.A, use_edns=0, payload=OUR_PAYLOAD)
        started = time.perf_counter()
        upstream, failure = await self._ask_upstream(query.to_wire())
        if upstream is None:
            answer = upstream_failure(query, failure)
        else:
            keep = functools.partial(self.keep_special, profile) if self.keep_special else None
            answer = filter_answer(query, upstream, keep_special=keep)
        self._bind(who, sandbox, answer.bindings)
        addresses = [
            rd.address
            for rrset in answer.response.answer
            if rrset.rdtype == dns.rdatatype.A
            for rd in rrset
        ]
        decision = answer.decision or deny("dns-upstream", "no address") if not addresses else None
        self.sink.emit(
            Event(
                kind=EventKind.DNS,
                verdict=Verdict.ALLOW if addresses else Verdict.DENY,
                reason=Reason.APPROVAL_GRANTED if addresses else decision.reason,
                detail=f"A {_describe(answer.response)}: resolved by the gateway for a "
                "placeholder, after approval",
                sandbox=sandbox,
                profile=profile,
                task_id=task_id,
                name=name,
                protocol="dns",
                duration=time.perf_counter() - started,
            )
        )
        return addresses[0] if addresses else None

    def _admit_tcp(self, connection: _TcpConnection) -> str | None:
        """The source whose place the new TCP `connection` takes, or None: refused.
        A source may hold no more of the `max_tcp_connections` than are still free
        (limits.fair_share), so that the connections one sandbox keeps open cannot
        refuse every other sandbox's. A refused one has its event (`sandbox_limit`)
        and is closed unanswered."""
        source = connection.source_ip or connection.peer_ip
        held = self._tcp_held.get(source, 0)
        full = fair_share(held, self._tcp_admitted, self.max_tcp_connections)
        if full is None:
            self._tcp_held[source] = held + 1
            self._tcp_admitted += 1
            return source
        cap = self.max_tcp_connections
        if full == "worker":
            detail = f"the DNS filter serves {cap} TCP connections at once, all held"
        else:
            detail = (
                f"the sandbox holds {held} DNS-over-TCP connections, and the DNS filter "
                f"has no more than that free of the {cap} it serves at once"
            )
        try:  # refused all the same if this fails: asyncio would leave it open
            who = self.sandbox_for(connection.source_ip) if connection.source_ip else None
            sandbox, profile, task_id = who or (None, None, None)
            event = Event.from_decision(
                EventKind.DNS,
                deny("sandbox-dns-tcp-share", detail),
                protocol="dns",
                source=connection.source,
                sandbox=sandbox,
                profile=profile,
                task_id=task_id,
            )
            self._hold(event, None, _TcpAnswer(connection))  # no answer: the caller closes it
        except Exception:  # noqa: BLE001 - one connection must never take the server down
            log.exception("DNS over TCP from %s: its refusal's event failed", connection.source)
        return None

    def _tcp_closed(self, source: str) -> None:
        """An admitted TCP connection of `source` is gone: its place is free again."""
        self._tcp_admitted -= 1
        if self._tcp_held[source] == 1:
            del self._tcp_held[source]
        else:
            self._tcp_held[source] -= 1

    def _over_rate(self, sandbox: str, profile: str) -> Decision | None:
        """A `sandbox_limit` denial when `sandbox` is over its profile's `dns_qps`,
        else None. Every query counts, whatever its answer would have been."""
        rate = self.limits_for(profile).dns_qps
        if self.rates.take(sandbox, rate):
            return None
        return deny("sandbox-dns-rate", f"more than {rate} DNS queries a second")

    async def _forward(
        self, wire: bytes, sandbox: str, first: bytes | Exception | None = None
    ) -> tuple[bytes | Decision | None, str]:
        """Forward the allowed query `wire`: (the upstream's reply, "") or (None, why
        not); at most `max_pending_per_sandbox` at a time per sandbox (else a
        `sandbox_limit` Decision), so one sandbox cannot tie up the upstream (or
        our memory) for the others. `first`: the first upstream's reply (or failure)
        to a query forwarded already, within the cap then (`_forward_soon`)."""
        if not self._reserve(sandbox, capped=first is None):
            limit = f"more than {self.max_pending_per_sandbox} DNS queries in flight"
            return deny("sandbox-dns-pending", limit), "too many queries in flight"
        try:
            return await self._ask_upstream(wire, first)
        finally:
            self._release(sandbox)

    def _reserve(self, sandbox: str, *, capped: bool = True) -> bool:
        """One more query of `sandbox` in flight; False (and none) when `capped` and it
        has `max_pending_per_sandbox` already."""
        in_flight = self._pending.get(sandbox, 0)
        if capped and in_flight >= self.max_pending_per_sandbox:
            return False
        self._pending[sandbox] = in_flight + 1
        return True

    def _release(self, sandbox: str) -> None:
        """One query of `sandbox` in flight less."""
        self._pending[sandbox] -= 1
        if not self._pending[sandbox]:
            del self._pending[sandbox]

    def _upstream_worst(self) -> float:
        """The longest a query may be upstream: each upstream over UDP, then over TCP
        after a truncated answer (`_ask_upstream`)."""
        return 2 * self.timeout * max(1, len(self.upstreams))

    def _udp_upstream(self, server: str) -> UdpUpstream:
        upstream = self._udp_upstreams.get(server)
        if upstream is None:
            upstream = self._udp_upstreams[server] = UdpUpstream(
                server, self.upstream_port, around_read=self._read_then_answer
            )
        return upstream

    def _ask_first(self, wire: bytes, on_reply: Callable[[bytes | Exception], None]) -> None:
        """Send `wire` to the first upstream over UDP; `on_reply(its reply, or what
        ended the wait)` later. Raises OSError when no socket can be opened."""
        self._udp_upstream(self.upstreams[0]).send(wire, self.timeout, on_reply)

    async def _ask_upstream(
        self, wire: bytes, first: bytes | Exception | None = None
    ) -> tuple[bytes | None, str]:
        """The first upstream's answer to `wire` (UDP through the shared sockets; again
        over TCP when truncated), or None and why not: an answer over
        `MAX_ANSWER_BYTES` is no answer (`upstream.AnswerTooLarge`), never parsed.
        `first`: the first upstream's UDP reply (or failure), when it came already."""
        errors = []
        for server in self.upstreams:
            try:
                if first is None:
                    reply = await self._udp_upstream(server).ask(wire, self.timeout)
                else:
                    reply, first = first, None
                    if isinstance(reply, Exception):
                        raise reply
                if not reply[2] & 0x02:  # TC clear
                    return reply, ""
                return await tcp_ask(wire, server, self.upstream_port, self.timeout), ""
            except AnswerTooLarge as e:
                errors.append(f"{server}: {e}")
            except (OSError, EOFError, ValueError) as e:  # TimeoutError is an OSError
                errors.append(f"{server}: {type(e).__name__}")
        return None, "upstream: " + ("; ".join(errors) or "none configured")


class _UdpIntake:
    """The UDP socket, read in batches: at each wakeup up to INTAKE_BATCH datagrams,
    handed to `DnsFilter._take_in` at once (asyncio's datagram transport reads one per
    wakeup and the server then spent a task on each: a flood of many sandboxes, each
    within its kernel cap, queued the others' queries for seconds). Replies are sent
    at once; one the socket has no room for is dropped (UDP: the client asks again)."""

    def __init__(self, owner: DnsFilter, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.owner, self.sock, self.loop = owner, sock, loop
        self.buffer = bytearray(MAX_DATAGRAM)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.read)

    def read(self) -> None:
        datagrams = []
        view = memoryview(self.buffer)
        for _ in range(INTAKE_BATCH):
            try:
                size, addr = self.sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # an ICMP error for an earlier reply: nothing to do
                log.debug("DNS UDP socket error: %s", e)
                continue
            datagrams.append((bytes(view[:size]), addr))
        if datagrams:
            self.owner._read_then_answer(self.owner._take_in, datagrams)

    def sendto(self, data: bytes, addr: tuple) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError as e:  # a full send queue, or a client that went away
            log.debug("DNS UDP reply to %s not sent: %s", addr[0], e)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _TcpAnswer:
    """One query of a TCP connection, in the connection's order: where `DnsFilter._hold`
    sends its answer (`answer`), which goes out once every earlier one has."""

    __slots__ = ("connection", "response", "done")

    def __init__(self, connection: _TcpConnection):
        self.connection = connection
        self.response: bytes | None = None
        self.done = False

    def answer(self, response: bytes | None) -> None:
        """`response` is this query's answer (None: dropped, the connection ends)."""
        if not self.done:
            self.response, self.done = response, True
            self.connection.flush()


class _TcpConnection(asyncio.Protocol):
    """One DNS-over-TCP connection (RFC 7766: a 2-byte length before each message),
    served in callbacks as the UDP intake is: no task or coroutine per connection or
    per query (the stream reader's, the `asyncio.timeout`s around each read and
    drain, and the coroutine that answered each query were most of a TCP query's
    cost).

    Each whole query read is taken in (`DnsFilter._take_in_tcp`) at once and answered
    through `DnsFilter._hold`; answers leave in the queries' order (`queue`, `flush`).
    Bounds:
    - at most TCP_PIPELINE queries taken in and not yet answered: past it the
      connection is not read (what was read and not taken waits in `buffer`, at most
      one read's worth and one message); nor while the transport's write buffer is
      over its high-water mark (`pause_writing`): a client that sends and does not
      read stops being read, and the gateway holds no more than that buffer;
    - `max_tcp_queries` a connection, then it closes once they are answered (what
      came after is not read); a dropped query (no response) closes it at once,
      after the answers before it;
    - one idle timer (`_idle`): the connection closes when nothing moved (no query
      taken in, no answer written) for `tcp_idle_timeout` seconds, plus the
      upstream's worst case while a query is upstream and the client reads; a
      partial message does not count, nor do answers it does not read (it is
      aborted then: its unsent answers dropped). Progress moves a deadline; the
      timer is re-armed only when it fires early.
    A source holding as many of the `max_tcp_connections` as are still free has its
    next one closed as it is made (`DnsFilter._admit_tcp`)."""

    def __init__(self, owner: DnsFilter):
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.source = ""  # the peer as events name it (host:port)
        self.peer_ip = ""
        self.source_ip: str | None = None  # canonical, as `sandbox_for` takes it
        self.buffer = bytearray()  # read, not yet taken in: a part of a message, or more
        self.queue: collections.deque[_TcpAnswer] = collections.deque()
        self.taken = 0  # queries taken in, of `max_tcp_queries`
        self.reading = True
        self.writing_paused = False
        self.last = False  # no more queries are taken: the cap, or a dropped query
        self.eof = False  # the client sent its last query
        self.closing = False  # nothing more is written
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future | None = None  # `close_now`'s, set at connection_lost
        self.place: str | None = None  # whose of the filter's TCP places it holds (`_admit_tcp`)
        self.loop = asyncio.get_running_loop()

    # asyncio's calls

    def connection_made(self, transport: asyncio.Transport) -> None:
        owner = self.owner
        self.transport = transport
        owner._tcp_connections.add(self)
        peer = transport.get_extra_info("peername")
        if not peer or owner._stopped:
            self.close_now()
            return
        self.peer_ip, self.source = peer[0], format_host_port(peer[0], peer[1])
        self.source_ip = _source_ip(peer[0])
        self.place = owner._admit_tcp(self)
        if self.place is None:
            self.close_now()
            return
        self.deadline = self.loop.time() + owner.tcp_idle_timeout
        self.timer = self.loop.call_at(self.deadline, self._idle)

    def data_received(self, data: bytes) -> None:
        if self.last:  # after the cap: not taken, not kept
            return
        buffer = self.buffer
        if buffer:
            buffer += data
            del buffer[: self._take(buffer)]
        else:  # the common case: whole queries in one read, taken without a copy
            used = self._take(data)
            if used < len(data):
                buffer += memoryview(data)[used:]
        self._steer()

    def eof_received(self) -> bool:
        """The client sent its last query: answer what was taken in (and what the
        buffer holds whole), then close (True: the transport stays open until then)."""
        self.eof = True
        self._more()
        return True

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._steer()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.deadline = self.loop.time() + self.owner.tcp_idle_timeout
        self._more()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = self.last = True
        self.queue.clear()  # their answers, when they come, go nowhere
        self.buffer = bytearray()
        self.owner._tcp_connections.discard(self)
        if self.place is not None:
            place, self.place = self.place, None
            self.owner._tcp_closed(place)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    # the queries and their answers

    def _take(self, data: bytes | bytearray) -> int:
        """Take in each whole query at the start of `data` while there is room (at most
        TCP_PIPELINE unanswered, `max_tcp_queries` in all); the bytes used."""
        owner, queue = self.owner, self.queue
        room = min(TCP_PIPELINE - len(queue), owner.max_tcp_queries - self.taken)
        offset, size, taken = 0, len(data), 0
        while taken < room and size - offset >= 2:
            end = offset + 2 + (data[offset] << 8 | data[offset + 1])
            if end > size:
                break
            to = _TcpAnswer(self)
            queue.append(to)
            # (answered through `_hold`, at a later turn: never within this loop)
            owner._take_in_tcp(bytes(data[offset + 2 : end]), to)
            offset, taken = end, taken + 1
        if taken:
            self.taken += taken
            self.deadline = self.loop.time() + owner.tcp_idle_timeout
            if self.taken >= owner.max_tcp_queries:
                self.last = True
                self.buffer.clear()
                return size  # what came after the last query allowed is not read
        return offset

    def flush(self) -> None:
        """Write the answers at the head of the queue that are ready, in order; then
        take in what waited for room, or close once the last is out."""
        if self.closing:
            return
        queue, out = self.queue, []
        while queue and queue[0].done:
            response = queue.popleft().response
            if response is None:  # dropped: a TCP client must not wait for it
                self.last = True
                queue.clear()
                break
            out.append(len(response).to_bytes(2, "big") + response)
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.deadline = self.loop.time() + self.owner.tcp_idle_timeout
        self._more()

    def _more(self) -> None:
        """Take in what the buffer holds whole, if there is room now; close when the
        last query is answered; else read or not (`_steer`)."""
        if self.closing:
            return
        if self.buffer and not self.last and not self.writing_paused:
            del self.buffer[: self._take(self.buffer)]
        if not self.queue and (self.last or (self.eof and not self.writing_paused)):
            self.closing = True
            self.transport.close()  # after what is written; the idle timer still runs
            return
        self._steer()

    def _steer(self) -> None:
        """Read while there is room for a query and the client takes its answers."""
        want = not (
            self.writing_paused
            or self.last
            or self.eof
            or len(self.queue) >= TCP_PIPELINE
            or len(self.buffer) > MAX_DATAGRAM + 2  # a whole message waiting for room
        )
        if want != self.reading and not self.closing:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _idle(self) -> None:
        """The one idle timer: close when nothing moved (see the class docstring)."""
        self.timer = None
        deadline = self.deadline
        if self.queue and not self.writing_paused and not self.closing:
            deadline += self.owner._upstream_worst()  # an answer is still upstream
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._idle)
            return
        self.close_now()

    def close_now(self) -> asyncio.Future:
        """Close now: what is written goes out if the client reads it, else is
        dropped (abort). A future set once the connection is gone."""
        self.closing = self.last = True
        if self.lost is None:
            self.lost = self.loop.create_future()
            if self not in self.owner._tcp_connections:  # gone already
                self.lost.set_result(None)
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()  # (closing or not) its client does not read what is left
            elif not transport.is_closing():
                transport.close()
        return self.lost


async def _bound_udp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A UDP socket bound to `host:port` (the first address `host` has; "": any)."""
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _source_ip(text: str) -> str | None:
    """`text` (a datagram's source) as `sandbox_for` takes it; None if it is none."""
    try:
        return canonical_address(text).compressed
    except ValueError:
        return None


def _describe(response: dns.message.Message) -> str:
    """`NOERROR 93.184.216.34, 2606:2800::1`: the rcode and the addresses answered."""
    values = []
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            values += [rd.address for rd in rrset]
        elif rrset.rdtype == dns.rdatatype.HTTPS:
            values.append(f"{len(rrset)} HTTPS")
    text = dns.rcode.to_text(response.rcode())
    if response.flags & dns.flags.TC:
        text += " (truncated)"
    return f"{text} {', '.join(values)}".strip()


def _event_fields(source: tuple) -> dict:
    return {"protocol": "dns", "source": format_host_port(source[0], source[1])}


def _join(*parts: str) -> str:
    return "; ".join([part for part in parts if part])  # a list: join makes one anyway


def _room_for_bursts(sock) -> None:
    """A receive queue that holds a burst of every sandbox at once: each may send
    up to nft.DNS_PACKETS_PER_S queries in a burst (its table drops the rest), and a datagram
    costs about 1 KiB of the queue, so the default (~200 KiB, ~200 queries) was full
    after one task's burst and the kernel dropped the others' queries."""
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # FORCE: past rmem_max, as root
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, DNS_RECEIVE_QUEUE)
            return
