"""The front door's listener and its connections: accept, peek at the first bytes,
ask the gate, then relay (allowed pass-through), hand to mitmproxy (HTTP, inspected
TLS) or close. The package docstring tells the whole path and its limits."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from sandgate.proxy.descriptors import OUT_OF_DESCRIPTORS, DescriptorReserve
from sandgate.proxy.frontdoor.hello_watch import Decide, HelloWatch, Issued, Refuse, Resumed
from sandgate.proxy.frontdoor.http1_relay import Http1Relay, UpstreamPool
from sandgate.proxy.frontdoor.intake import Intake
from sandgate.proxy.frontdoor.poller import CLOSED, IN, OUT, Poller, upstream_error
from sandgate.proxy.frontdoor.relay import (
    LINGER_RESET,
    RELAY_CHUNK,
    End,
    Lingering,
    Relay,
    close_read,
    note,
)
from sandgate.proxy.frontdoor.tls_contexts import TlsContexts
from sandgate.proxy.frontdoor.tls_io import TlsSocket
from sandgate.proxy.frontdoor.tls_relay import Hello, http1_hello, serve_inspected
from sandgate.proxy.gate import MAX_FIRST_BYTES, WEB_PORTS, ConnectionGate, ConnState, Outcome
from sandgate.proxy.policy import Decision
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.ticks import LEAD, next_tick

log = logging.getLogger("sandgate.frontdoor")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; Python's socket module lacks it
ACCEPTS_PER_WAKEUP = 64
# The listener's accept queue: as deep as the host allows (the kernel clamps it to
# net.core.somaxconn, 4096 by default since Linux 5.4, as Go's net package asks).
# Sandboxes connect within their `connection_rate`, whose burst is as large: 8 of
# them at 200 refilled their buckets together and queued ~1,000 in 0.2 s while a
# busy worker's turn ran long on CI, and a queue of 1024 then dropped the next SYN of
# any sandbox (an honest request retried after a second). Room for 4096 holds the
# bursts of 20 such sandboxes; a host with more a worker raises somaxconn.
LISTEN_BACKLOG = 65535
# A queue longer than this is a flood outrunning the worker's turns: a wake-up then
# takes all of it (see `FrontDoor._accept`). Below it a wake-up takes at most
# ACCEPTS_PER_WAKEUP, so a lone sandbox's burst waits in the queue, not refused.
TAKE_WHOLE_PAST = 512
# New connections set up (`FrontDoor._admit`: the gate's connect decision, then their
# first bytes, upstream, relay in the turns that follow) per turn of the loop. What a
# wake-up accepts past these waits in the intake (intake.py) and is set up in the
# next turns, round-robin per sandbox: a busy worker's turns grow long, and so each
# sandbox's new connections come in turn, at the rate the worker serves, instead of
# in the kernel's accept queue behind every other sandbox's. A turn of an idle worker
# accepts one or two: set up at once, as before.
SETUPS_PER_TURN = 16
# A turn that took longer than this (from one intake drain to the next) is a busy
# worker's: the next sets up SETUPS_PER_TURN; a shorter one (a burst on an idle
# worker) as many as a wake-up accepts, so that a burst never outgrows the intake.
BUSY_TURN = 0.004
# Accepted connections waiting their turn, per sandbox (as many as its default
# `pending`) and in all (their sockets are counted in limits.OTHER_DESCRIPTORS); past
# these the connection is refused, with its event (`sandbox_limit`,
# `builtin:sandbox-intake`): in all, the sandbox with the most waiting gives way.
QUEUED_PER_SANDBOX = 64
QUEUED_IN_ALL = 64
# tcp_info's tcpi_unacked and tcpi_sacked (bytes 24-31): on a listening socket, the
# length of its accept queue (sk_ack_backlog) and its bound (sk_max_ack_backlog), so a
# wake-up accepts what is queued and stops without the accept that fails with EAGAIN,
# and knows when the queue fills (see `FrontDoor._accept`).
_TCP_INFO_QUEUE = struct.Struct("=II")
_TCP_INFO_LENGTH = 32
# How often deadlines (first bytes, silence, upstream connect) are looked at: one
# timer for all connections instead of one each, which would cost more than the
# decisions they guard. Deadlines are met to within this. The ticks fall on a
# worker's grid of periodic work (proxy/ticks.py): every other one is its flush's.
TICK = 0.05
# accept() errors that mean "out of descriptors or memory": stop accepting for a
# moment instead of spinning on a listener that stays readable (as asyncio does).
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The IPv4 destination the sandbox dialled before nftables redirected it here.
    (The ruleset redirects IPv4 only; the sandbox's IPv6 is dropped.)"""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntop(socket.AF_INET, address), port


class FrontDoor:
    """Listens on one IPv4 address; see the module docstring.

    `hand_off(sock, state)` serves a socket to its end and owns it (mitmproxy's
    transparent mode), counting its bytes in `state`. `original_dst` and `upstream_address` (which address to
    connect to for an original destination) are parameters so that tests can run
    on loopback, where nothing is redirected."""

    def __init__(
        self,
        gate: ConnectionGate,
        hand_off: Callable[[socket.socket, ConnState], Awaitable[None]],
        *,
        original_dst: Callable[[socket.socket], tuple[str, int]] = original_dst,
        upstream_address: Callable[[str, int], tuple[str, int]] | None = None,
        first_bytes_timeout: float = 30.0,
        silence: float | None = 0.3,
        connect_timeout: float = 30.0,
        idle_timeout: float = 600.0,
        backlog: int = LISTEN_BACKLOG,
        approvals=None,
        resolve: Callable[[ConnState, str], Awaitable[str | Decision]] | None = None,
        descriptors: DescriptorReserve | None = None,
        plain_http: Callable[[ConnState], bool] | None = None,
        tls_contexts: TlsContexts | None = None,
    ):
        """`approvals` (proxy/approvals/holder.Approvals) holds connections a human
        must approve; `resolve(state, name)` finds the real address of a placeholder's
        name (the DNS filter's upstream, after approval), or the denial that keeps
        it from connecting. `plain_http(state)`: whether
        a plain-HTTP connection is served here (frontdoor/http1.py) rather than
        handed to mitmproxy; None: never. `tls_contexts`: inspected TLS whose client
        speaks HTTP/1.1 is terminated here too (tls_relay.py), where `plain_http`
        says the profile needs nothing of mitmproxy's; None: never."""
        self.gate = gate
        self.approvals = approvals
        self.resolve = resolve
        self.descriptors = descriptors  # released when accept finds none left
        self.hand_off = hand_off
        self.plain_http = plain_http
        self.tls_contexts = tls_contexts
        self.original_dst = original_dst
        self.upstream_address = upstream_address
        self.first_bytes_timeout = first_bytes_timeout
        self.silence = silence
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.backlog = backlog
        self.port: int | None = None  # where it listens, once started
        self.loop: asyncio.AbstractEventLoop | None = None
        self.poller: Poller | None = None
        self.upstream_pool: UpstreamPool | None = None  # plain HTTP's idle upstreams
        self.lingering: Lingering | None = None  # refused clients' sockets, closing
        self._listener: socket.socket | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._waiting: dict[Connection, None] = {}  # with a deadline: undecided, or connecting
        self._live: set[Connection] = set()  # every connection it still owns
        self._handed_off: dict[asyncio.Task, ConnState] = {}
        # Accepted past a turn's SETUPS_PER_TURN, per source address; `_drainer` sets
        # up the next of them each turn while any wait.
        self.intake: Intake[tuple[socket.socket, tuple[str, int]]] = Intake(
            QUEUED_PER_SANDBOX, QUEUED_IN_ALL
        )
        self._drainer: asyncio.Handle | None = None
        self._drained_at = 0.0  # when the last turn's drain ran (or the first was due)
        self.buffer = bytearray(RELAY_CHUNK)  # one read buffer for every relay (relay.py)

    async def start(
        self, host: str = "", port: int = 0, *, listener: socket.socket | None = None
    ) -> None:
        """Listen on host:port, or accept from `listener`, a bound and listening TCP
        socket someone else made (a worker's, which the service owns: see
        enforcer/workers.py)."""
        self.loop = asyncio.get_running_loop()
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # Accepted sockets inherit it: small writes go out at once, as they
                # would between the two ends directly (asyncio's transports set it too).
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                listener.bind((host, port))
                listener.listen(self.backlog)
            except BaseException:
                listener.close()
                raise
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.poller = Poller(self.loop)
        self.upstream_pool = UpstreamPool(self.poller, self.loop)
        self.lingering = Lingering(self.poller, self.loop)
        self.loop.add_reader(listener.fileno(), self._accept)
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)

    def forget_sandbox(self, sandbox: Sandbox) -> None:
        """`sandbox`'s task ended: its idle upstreams and its leaves go."""
        if self.upstream_pool is not None:
            self.upstream_pool.forget_task(sandbox.task_id, sandbox.address)
        if self.tls_contexts is not None:
            self.tls_contexts.forget(sandbox)

    async def stop(self) -> None:
        """Stop listening and close every connection; their end events are emitted."""
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        for sock, peer in self.intake.clear():
            self._refuse(sock, peer, "the gateway stopped before setting it up")
        for connection in list(self._live):
            connection.finish("the gateway stopped", reset=True)
        if self.upstream_pool is not None:
            self.upstream_pool.close()
        if self.lingering is not None:
            self.lingering.close_all()
        if self.poller is not None:
            self.poller.close()
            self.poller = None
        for state in self._handed_off.values():
            if state.abort is not None:  # `_shut_down`, as mitmproxy's engine wrapped it
                state.abort("the gateway stopped")
        if self._handed_off:
            await asyncio.wait(list(self._handed_off), timeout=5)

    # --- accept -----------------------------------------------------------------------

    def _accept(self) -> None:
        released = False
        listener = self._listener
        # `_socket.socket._accept` and the socket made here with the listener's family
        # are what `socket.accept` does, without its Python-level checks and the
        # enum lookups of `self.family` and `self.type` per call (~1.3 us a connection).
        accept, family = listener._accept, listener.family
        # As many accepts as the queue holds, not until one fails with EAGAIN: the
        # failing accept and its exception cost ~3.9 us, the queue's length ~0.6 us,
        # and a wake-up finds one or two connections. The listener is watched
        # level-triggered (add_reader): what arrives after the count, or is left past
        # ACCEPTS_PER_WAKEUP, wakes the loop again. Another process accepting from the
        # same listener only makes an accept fail with EAGAIN, as before.
        try:
            info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
            queued, bound = _TCP_INFO_QUEUE.unpack_from(info, 24)
            # A queue past TAKE_WHOLE_PAST (or half its bound, on a host whose
            # somaxconn is small) is a flood outrunning the worker's turns: a full
            # queue drops the next SYN, any sandbox's (the client retries after a
            # second: CI saw an honest request take 1.4 s beside churning sandboxes).
            # Then this wake-up takes all of it, and the intake chooses whom to refuse
            # (the sandbox with the most waiting), with an event each.
            if queued <= min(TAKE_WHOLE_PAST, bound // 2):
                # At least one: woken with a count of 0 (a moment's mismatch between
                # the queue and its count), an accept that fails ends the wake-up,
                # where accepting none would leave a readable listener waking the
                # loop again.
                queued = max(1, min(queued, ACCEPTS_PER_WAKEUP))
        except (OSError, struct.error):  # not TCP, or a kernel without it: until EAGAIN
            queued = ACCEPTS_PER_WAKEUP
        setups = 0
        for _ in range(queued):
            try:
                fd, peer = accept()
                sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_DESCRIPTORS and self.descriptors and not released:
                    # The reserve goes to the audit log and control socket; the gate
                    # refuses new connections meanwhile: this one is accepted to be
                    # refused (an event, then closed), not left to spin the listener.
                    self.descriptors.exhausted(f"accept: {e.strerror}")
                    released = True
                    continue
                if e.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.error("front door: accept failed (%s); pausing for a second", e)
                    fd = self._listener.fileno()
                    self.loop.remove_reader(fd)
                    self.loop.call_later(1.0, self._resume_accepting, fd)
                else:
                    log.warning("front door: accept failed: %s", e)
                return
            # Set up now, unless this wake-up did its share or others wait their turn
            # (the drainer is due exactly while the intake holds any).
            if setups >= SETUPS_PER_TURN or self._drainer is not None:
                self._queue(sock, peer)
                continue
            setups += 1
            self._set_up(sock, peer)

    def _set_up(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            self._admit(sock, peer)
        except Exception:  # noqa: BLE001 - one bad connection must not stop the listener
            log.exception("front door: admitting %s:%s failed; closing it", *peer)
            sock.close()

    def _queue(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Wait in the intake for a later turn (see SETUPS_PER_TURN)."""
        refused = self.intake.put(peer[0], (sock, peer))
        if refused is not None:
            self._refuse(*refused, "")
        if self._drainer is None and self.intake:
            self._drained_at = self.loop.time()
            self._drainer = self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        """A turn's setups from the intake, round-robin per sandbox."""
        now = self.loop.time()
        busy, self._drained_at = now - self._drained_at > BUSY_TURN, now
        self._drainer = None
        for sock, peer in self.intake.take(SETUPS_PER_TURN if busy else ACCEPTS_PER_WAKEUP):
            self._set_up(sock, peer)
        if self.intake:
            self._drainer = self.loop.call_soon(self._drain)

    def _refuse(self, sock: socket.socket, peer: tuple[str, int], why: str) -> None:
        """Close an accepted connection the intake has no room for (or the door
        stopped with it waiting), with its denial (`ConnectionGate.on_refused`)."""
        try:
            dst = self.original_dst(sock)
        except OSError:
            dst = None  # not redirected here: no sandbox's, as in _admit
        sock.close()
        if dst is not None:
            why = why or (
                f"the gateway worker is busy: {self.intake.queued(peer[0])} new connections "
                "of the sandbox wait to be set up, in turn with other sandboxes' (at most "
                f"{QUEUED_PER_SANDBOX} a sandbox; of {QUEUED_IN_ALL} in all, the sandbox with "
                "the most gives way)"
            )
            self.gate.on_refused(peer[0], peer[1], *dst, why)

    def _resume_accepting(self, fd: int) -> None:
        if self._listener is not None and self._listener.fileno() == fd:
            self.loop.add_reader(fd, self._accept)

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.setblocking(False)
        try:
            dst = self.original_dst(sock)
        except OSError as e:
            # Not redirected here (only the ruleset's redirect reaches this port):
            # there is no destination to decide on, as mitmproxy had none either.
            log.warning("front door: no original destination for %s:%s (%s); closing", *peer, e)
            sock.close()
            return
        state = self.gate.on_connect(peer, peer[0], peer[1], dst[0], dst[1])
        if state is None:
            # Denied at connect; the gate emitted why. Bytes the client already sent
            # make this close a reset, as it was when mitmproxy closed it here.
            sock.close()
            return
        try:
            connection = Connection(self, state, sock, dst)
        except Exception as e:  # noqa: BLE001 - admitted: the gate must hear of its end
            self.gate.fail(state, e)
            self.gate.on_close(state)
            raise  # _accept logs it and closes the socket
        self._live.add(connection)
        try:
            self.poller.watch(connection.client_fd, connection.on_waiting_event)
        except Exception as e:  # noqa: BLE001
            connection.crash(e)

    # --- hand-off to mitmproxy ----------------------------------------------------------

    def _hand_off(self, connection: Connection) -> None:
        self._live.discard(connection)
        self.poller.forget(connection.client_fd, unregister=True)
        # mitmproxy owns it now: a policy reload ends it from below, as `stop` does.
        connection.state.abort = functools.partial(_shut_down, connection.client)
        task = self.loop.create_task(self._serve_handed_off(connection.client, connection.state))
        self._handed_off[task] = connection.state
        task.add_done_callback(self._handed_off.pop)

    async def _serve_handed_off(self, sock: socket.socket, state: ConnState) -> None:
        try:
            await self.hand_off(sock, state)
        except Exception:  # noqa: BLE001 - mitmproxy's failure ends this connection only
            log.exception("front door: mitmproxy failed on %s", state.fields["source"])
        finally:
            if self.gate.connections.get(state.key) is state:
                self.gate.on_close(state)  # mitmproxy never adopted it

    # --- deadlines ------------------------------------------------------------------------

    def wait(self, connection: Connection) -> None:
        """Look at `connection.wake_at` from now on, until `unwait`."""
        self._waiting[connection] = None
        if self._ticker is None:
            self._ticker = self.loop.call_at(next_tick(self.loop.time(), TICK, LEAD), self._tick)

    def unwait(self, connection: Connection) -> None:
        self._waiting.pop(connection, None)

    def _tick(self) -> None:
        now = self.loop.time()
        for connection in [c for c in self._waiting if c.wake_at <= now]:
            connection.timed_out()
        self._ticker = (
            self.loop.call_at(next_tick(now, TICK, LEAD), self._tick) if self._waiting else None
        )

    # --- idle relays ----------------------------------------------------------------------

    @property
    def _sweep_interval(self) -> float:
        return min(60.0, self.idle_timeout / 4)

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self._live):
            relay = connection.relay
            if relay is not None and now - relay.last_active > self.idle_timeout:
                connection.finish(f"idle for {self.idle_timeout:g} s; the gateway closed it")
        self._sweeper = self.loop.call_later(self._sweep_interval, self._sweep)


class Connection:
    """One admitted connection, from accept to close: waiting for its first bytes,
    connecting upstream, relaying. Its handlers get the epoll events of its sockets.
    Every handler fails closed: an exception ends the connection, and the gate
    reports it."""

    __slots__ = (
        "door",
        "loop",
        "state",
        "client",
        "client_fd",
        "client_closing",
        "dst",
        "upstream",
        "seen",
        "wake_at",
        "silent_until",
        "deadline",
        "relay",
        "holding",
        "done",
        "held",
        "on_deadline",
    )

    def __init__(
        self, door: FrontDoor, state: ConnState, client: socket.socket, dst: tuple[str, int]
    ):
        self.door, self.loop, self.state, self.client, self.dst = (
            door,
            door.loop,
            state,
            client,
            dst,
        )
        self.client_fd = client.fileno()
        self.client_closing = False  # the client's FIN or reset arrived before the relay began
        self.upstream: socket.socket | None = None
        self.seen = 0  # bytes peeked so far
        now = self.loop.time()
        self.deadline = now + door.first_bytes_timeout
        self.silent_until = now + door.silence if door.silence is not None else None
        self.wake_at = self._next_wake()
        door.wait(self)
        self.relay: Relay | None = None  # once relaying
        self.holding = False  # relaying only the server's bytes (see _relay)
        self.done = False
        self.held: asyncio.Task | None = None  # waiting for a human, or for a placeholder's address
        # Answers the deadline instead of "nothing decidable" or a pass-through's failed
        # connect once a later stage has taken the connection over (a client's TLS
        # handshake; an HTTP relay's upstream connect and TLS handshake: a 502).
        self.on_deadline: Callable[[], None] | None = None
        state.abort = functools.partial(self.finish, reset=True)  # a reload's revoke

    # --- first bytes ----------------------------------------------------------------------

    def on_waiting_event(self, events: int) -> None:
        try:
            self._peek(events)
        except Exception as e:  # noqa: BLE001
            self.crash(e)

    def _peek(self, events: int) -> None:
        if not events & IN:
            if events & CLOSED:
                self.finish(None)  # closed or reset before a byte
            return
        try:
            data = self.client.recv(MAX_FIRST_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            data = b""
        if len(data) > self.seen:
            outcome = self.door.gate.on_first_bytes(self.state, data)
            if outcome is not Outcome.WAIT:
                self.client_closing = bool(events & CLOSED)
                self._decided(outcome)
                return
            self.seen, self.silent_until = len(data), None
        if not data or events & CLOSED:
            # Closed, reset, or shut down for writing: no more bytes will come.
            self.finish(None)

    def _next_wake(self) -> float:
        return self.deadline if self.silent_until is None else min(self.deadline, self.silent_until)

    def timed_out(self) -> None:
        """`wake_at` has come: silence, no decision in time, or no upstream in time."""
        if self.upstream is not None and self.on_deadline is None:
            self._connect_failed("timed out")  # pass-through: a reset, as the server's own
            return
        try:
            if self.on_deadline is not None:
                self.on_deadline()
                return
            now = self.loop.time()
            if self.silent_until is not None and now >= self.silent_until:
                self.silent_until = None
                self._peek(IN)  # bytes may have come with this very loop turn
                if self.done or self.state.outcome is not None:
                    return
                if self.seen == 0:
                    outcome = self.door.gate.on_silence(self.state)
                    if outcome is not Outcome.WAIT:
                        self._decided(outcome)
                        return
            if now >= self.deadline:
                self.finish(
                    f"nothing decidable within {self.door.first_bytes_timeout:g} s; the gateway closed it"
                )
            else:
                self.wake_at = self._next_wake()
        except Exception as e:  # noqa: BLE001
            self.crash(e)

    def _decided(self, outcome: Outcome) -> None:
        self.door.unwait(self)
        if outcome is Outcome.ASK or (
            outcome is not Outcome.REJECT
            and self.state.placeholder is not None
            and self.state.upstream_ip is None
            # plain HTTP still to be asked about: the addon asks per request, and
            # resolves the name once one is approved
            and not (outcome is Outcome.HTTP and self.state.asking is not None)
        ):
            self._hold(outcome)
            return
        if outcome is Outcome.PASSTHROUGH:
            self._connect()
        elif outcome is Outcome.HTTP and self.door.plain_http and self.door.plain_http(self.state):
            Http1Relay(self)  # decided request by request here, without mitmproxy
        elif outcome is Outcome.INTERCEPT and (hello := self._inspected_here()) is not None:
            serve_inspected(self, hello)  # TLS terminated here, then as plain HTTP
        elif outcome is Outcome.HTTP or outcome is Outcome.INTERCEPT:
            if not self.door.gate.hand_off(self.state):
                self.finish(None, reset=True)  # the gate denied it and said why
                return
            self.done = True
            self.door._hand_off(self)
        else:  # REJECT: the gate emitted the denial
            self.finish(None, drain=True)

    def _inspected_here(self) -> Hello | None:
        """The ClientHello, if this inspected connection is served by the door."""
        door = self.door
        if door.tls_contexts is None or not (door.plain_http and door.plain_http(self.state)):
            return None
        return http1_hello(self.state)

    # --- held: a human decides, or a placeholder's name is resolved ----------------------

    def _hold(self, outcome: Outcome) -> None:
        """Read nothing meanwhile; a client that gives up ends the hold."""
        self.door.poller.handlers[self.client_fd] = self._while_held
        self.held = self.loop.create_task(self._held(outcome))

    def _while_held(self, events: int) -> None:
        if events & CLOSED and self.held is not None:
            self.held.cancel()
            self.finish("the client closed while held for approval")

    async def _held(self, outcome: Outcome) -> None:
        try:
            if outcome is Outcome.ASK:
                state = self.state
                answer = await self.door.approvals.hold(
                    state.ask_key, state.asking.rule.id, state.fields
                )
                if self.done:
                    return
                outcome = self.door.gate.on_answer(state, answer)
            if outcome is not Outcome.REJECT and self.state.placeholder is not None:
                ip = await self.door.resolve(self.state, self.state.placeholder)
                if self.done:
                    return
                if isinstance(ip, Decision):  # no address it may reach: its `dns` event says why
                    self.finish(ip.detail, reset=True)
                    return
                self.state.upstream_ip, self.dst = ip, (ip, self.dst[1])
            self.held = None
            self.door.poller.handlers[self.client_fd] = self.on_waiting_event
            self._decided(outcome)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            self.crash(e)

    # --- upstream -------------------------------------------------------------------------

    def _connect(self) -> None:
        ip, port = self.dst
        if self.door.upstream_address is not None:
            ip, port = self.door.upstream_address(ip, port)
        self.door.poller.handlers[self.client_fd] = self._while_connecting
        try:
            upstream = self.upstream = socket.socket(
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM | socket.SOCK_NONBLOCK,
            )
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = upstream.connect_ex((ip, port))
        except OSError as e:  # out of descriptors, say
            self._connect_failed(e.strerror or str(e))
            return
        if error not in (0, errno.EINPROGRESS):
            self._connect_failed(os.strerror(error))
            return
        self.wake_at = self.loop.time() + self.door.connect_timeout
        self.door.wait(self)
        self.door.poller.watch(upstream.fileno(), self._on_connect_event)

    def _while_connecting(self, events: int) -> None:
        # Nothing to do for the client until the upstream answers; remember a FIN
        # or reset, which edge-triggered epoll will not report again.
        if events & CLOSED:
            self.client_closing = True

    def _on_connect_event(self, events: int) -> None:
        try:
            if not events & (OUT | CLOSED):
                return
            error = upstream_error(self.upstream, events)
            if error:
                self._connect_failed(os.strerror(error))
                return
            self.door.unwait(self)
            self._relay(
                upstream_readable=bool(events & (IN | CLOSED)),
                upstream_closing=bool(events & CLOSED),
            )
        except Exception as e:  # noqa: BLE001
            self.crash(e)

    def _connect_failed(self, why: str) -> None:
        self.finish(f"upstream connect failed: {why}", reset=True)

    def _relay(self, upstream_readable: bool, upstream_closing: bool) -> None:
        # The client has unread bytes (the peeked ones) and, edge-triggered, will
        # not say so again: start as readable.
        client = End(self.client, readable=True, writable=True, closing=self.client_closing)
        upstream = End(
            self.upstream, readable=upstream_readable, writable=True, closing=upstream_closing
        )
        self.relay = Relay(
            client,
            upstream,
            self.state,
            self.door.buffer,
            self.loop.time,
            self.finish,
            functools.partial(self.loop.call_soon, self._resume),
        )
        # Allowed on silence: the server is to speak first. Until it does, the client
        # is not read; should it speak first, its bytes are decided (_client_spoke).
        self.holding = self.state.silent
        if not self.holding:
            self._watch_hellos()
        handlers = self.door.poller.handlers
        handlers[self.client_fd] = self._on_client_event
        handlers[upstream.fd] = self._on_upstream_event
        if self.holding:
            self._client_spoke(IN)  # it may have spoken while the upstream connection was made
        if self.relay is not None and not self.done:
            self._pump()

    def _watch_hellos(self) -> None:
        """Every plaintext ClientHello the upstream could get is decided: a TLS
        pass-through's after a HelloRetryRequest, and one after a raw-TCP preamble
        (PostgreSQL's SSLRequest, STARTTLS) on a non-web port (hello_watch.py)."""
        state, relay = self.state, self.relay
        if state.protocol == "tls":
            relay.watch, relay.judge = HelloWatch("tls"), self._judge_hello
        elif state.port not in WEB_PORTS:
            relay.watch, relay.judge = HelloWatch("raw"), self._judge_hello

    def _judge_hello(self, step: Decide | Resumed | Issued | Refuse) -> bool:
        """The watch's hello or resumed session, decided by the gate (True: it goes
        on), the sessions a server issued, or a refusal."""
        gate = self.door.gate
        if isinstance(step, Decide):
            return gate.on_later_hello(self.state, step.hello, step.second)
        if isinstance(step, Resumed):
            return gate.on_resumed(self.state, step.session_id)
        if isinstance(step, Issued):
            gate.on_sessions_issued(self.state, step.sessions)
            return True
        gate.on_hello_refused(self.state, step.detail)
        return False

    # --- relaying -----------------------------------------------------------------------------

    def _on_client_event(self, events: int) -> None:
        note(self.relay.client, events)
        if self.holding:
            self._client_spoke(events)
        else:
            self._pump()

    def _client_spoke(self, events: int) -> None:
        """The client sent bytes (or closed) before the server spoke, on a connection
        allowed on silence: the gate decides whether they may pass."""
        try:
            try:
                data = self.client.recv(MAX_FIRST_BYTES, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.holding = False  # closed or reset: the relay passes that on
                self._pump()
                return
            outcome = self.door.gate.on_first_bytes(self.state, data)
            if outcome is Outcome.WAIT:
                if events & CLOSED:  # no more will come: the silence decision stands
                    self.holding = False
                    self._watch_hellos()
                    self._pump()
                return
            if outcome is Outcome.PASSTHROUGH:
                self.holding = False
                self._watch_hellos()  # a TLS decision's (its hello) or the silence one's
                self._pump()
                return
            # Not for this relay: drop the upstream connection, which got no byte.
            self.door.poller.forget(self.upstream.fileno())
            self.upstream.close()
            self.upstream, self.relay = None, None
            self._decided(outcome)
        except Exception as e:  # noqa: BLE001
            self.crash(e)

    def _on_upstream_event(self, events: int) -> None:
        note(self.relay.upstream, events)
        self._pump()

    def _resume(self) -> None:
        """The relay's deferred pump (it stopped on its wakeup budget)."""
        if self.relay is not None and not self.done:
            self._pump()

    def _pump(self) -> None:
        try:
            relay = self.relay
            if self.holding:
                if (
                    not relay.move(relay.upstream, relay.client, up=False)
                    or not self.state.bytes_down
                ):
                    return  # ended, or the server has not spoken yet
                self.holding = False  # it has: a server-speaks-first protocol, as allowed
                if self.door.gate.on_server_spoke(self.state) is not Outcome.PASSTHROUGH:
                    self.finish(None, reset=True)  # the gate denied it and said why
                    return
                self._watch_hellos()  # STARTTLS: a hello may follow the protocol's bytes
                relay.client.readable = True  # what the client sent meanwhile is unread
            relay.pump()
        except Exception as e:  # noqa: BLE001
            self.crash(e)

    # --- the end ----------------------------------------------------------------------------

    def crash(self, error: Exception) -> None:
        log.error(
            "front door: connection from %s failed; closing it",
            self.state.fields["source"],
            exc_info=error,
        )
        if self.state.outcome is None:
            self.door.gate.fail(self.state, error)  # undecided: this is its (deny) decision
        self.finish(f"the gateway failed: {type(error).__name__}", reset=True)

    def finish(self, problem: str | None, *, reset: bool = False, drain: bool = False) -> None:
        """Close both ends and report the end once. `reset`: close with a reset (an
        upstream that reset, or could not be reached); `drain`: see `_close_read`."""
        if self.done:
            return
        self.done = True
        if self.held is not None and self.held is not asyncio.current_task():
            self.held.cancel()
        self.door.unwait(self)
        poller = self.door.poller
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if poller is not None:
                poller.forget(sock.fileno())
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
                continue
            if isinstance(sock, TlsSocket):
                sock.notify_close()  # a clean end: the peer can tell it from a cut
            if drain and sock is self.client and self.door.lingering is not None:
                self.door.lingering.close(sock)
            elif drain:
                close_read(sock)
            else:
                sock.close()
        self.door._live.discard(self)
        self.door.gate.on_close(self.state, problem)
        # What refers back to this connection (its state's `abort` is this finish; its
        # relay, the deadline's answer and a hold's task hold it) is let go of, so that
        # its objects are freed now by their counts: as cycles they were left to the
        # collector, ~15 objects a connection and a young collection every ~75 new ones.
        self.state.abort = self.relay = self.on_deadline = self.held = None


def _shut_down(sock: socket.socket, why: str = "") -> None:
    """End a socket mitmproxy owns from below, so that it closes it its usual way
    (its client_disconnected hook reports the end)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
