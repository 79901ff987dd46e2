"""The sockets of a plain-HTTP connection the front door serves itself: moves bytes
between them and an `Http1Session` (http1.py, where every decision is made), in
the front door's edge-triggered epoll set, with its one read buffer.

It takes over a door `Connection` the gate decided as HTTP: the connection keeps
its end (`finish`: both sockets closed, `gate.on_close` once), its upstream
connect deadline (`door.wait`) and its idle sweep (`last_active`).

An upstream connection left idle when its client connection ends goes to the
door's `UpstreamPool`, from which the same task's next plain-HTTP connection to
the same address takes it (as Squid keeps server connections): connecting is a
large part of a short exchange's cost. Every request on it is decided as on a
new one; connections are never shared between tasks or sandboxes."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Hashable

from sandgate.proxy.frontdoor.http1 import Http1Session
from sandgate.proxy.frontdoor.poller import CLOSED, IN, OUT, Poller, upstream_error
from sandgate.proxy.frontdoor.relay import LINGER_RESET, RELAY_CHUNK, WAKEUP_BUDGET
from sandgate.proxy.frontdoor.tls_io import TlsSocket

# How long an idle upstream connection is kept: below the shortest keep-alive
# timeout servers commonly use (Apache's 5 s), so that the server rarely closes
# one as it is taken (_replay in http1.py covers that race).
POOL_IDLE = 4.0
# Idle connections per (task, sandbox, address, port): as many as one client keeps
# in flight to one server (npm 15 sockets, pip's pool 10, a browser 6) with room to
# spare, since they all come back idle together. At 8, 16 clients in flight lost
# ~40 % of their upstreams to the cap and paid a connect (~40 us, loopback) each.
# POOL_TOTAL bounds the descriptors.
POOL_PER_KEY = 32
POOL_TOTAL = 256  # idle connections in all


class UpstreamPool:
    """Idle upstream connections of plain HTTP by (task, sandbox, address, port), newest
    last. An idle one is dropped on any sign from its server (bytes, FIN, reset),
    after POOL_IDLE seconds, and when taken finds it closed."""

    def __init__(self, poller: Poller, loop: asyncio.AbstractEventLoop):
        self.poller, self.loop = poller, loop
        self.idle: dict[Hashable, list[tuple[float, socket.socket]]] = {}
        self.count = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._probe = select.poll()  # take's look at an idle connection

    def give(self, key: Hashable, sock: socket.socket) -> None:
        kept = self.idle.setdefault(key, [])
        if len(kept) >= POOL_PER_KEY or self.count >= POOL_TOTAL:
            self._close(sock)
            return
        kept.append((self.loop.time(), sock))
        self.count += 1
        fd = sock.fileno()
        self.poller.handlers[fd] = lambda events: self._on_idle_event(key, sock, events)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(POOL_IDLE / 2, self._sweep)

    def take(self, key: Hashable) -> socket.socket | None:
        """An idle connection for `key` that is still open, or None. Its epoll
        handler is the caller's to set."""
        kept, probe = self.idle.get(key), self._probe
        while kept:
            _, sock = kept.pop()
            self.count -= 1
            # Anything but "nothing yet" (bytes, FIN, an error) makes it unusable. A
            # poll of the descriptor, not a recv with MSG_PEEK: that one's "nothing
            # yet" is a BlockingIOError raised and caught, ~1 us more a connection.
            fd = sock.fileno()
            probe.register(fd, select.POLLIN)
            quiet = not probe.poll(0)
            probe.unregister(fd)
            if quiet:
                return sock
            self._close(sock)
        return None

    def close(self) -> None:
        for kept in self.idle.values():
            for _, sock in kept:
                self._close(sock)
        self.idle.clear()
        self.count = 0
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def forget_task(self, task_id: str | None, address: str) -> None:
        """The task's sandbox is gone: its idle upstreams are closed now, not POOL_IDLE
        later (no other task may take them, and their servers need not wait)."""
        for key in [k for k in self.idle if k[:2] == (task_id, address)]:
            for _, sock in self.idle.pop(key):
                self.count -= 1
                self._close(sock)

    def _on_idle_event(self, key: Hashable, sock: socket.socket, events: int) -> None:
        if events & (IN | CLOSED):  # an idle server has nothing to say: it closed, or broke
            self._forget(key, sock)

    def _forget(self, key: Hashable, sock: socket.socket) -> None:
        kept = self.idle.get(key, [])
        for i, (_, held) in enumerate(kept):
            if held is sock:
                del kept[i]
                self.count -= 1
                self._close(sock)
                return

    def _sweep(self) -> None:
        deadline = self.loop.time() - POOL_IDLE
        for key, kept in list(self.idle.items()):
            while kept and kept[0][0] < deadline:
                self.count -= 1
                self._close(kept.pop(0)[1])
            if not kept:
                del self.idle[key]
        self._sweeper = self.loop.call_later(POOL_IDLE / 2, self._sweep) if self.count else None

    def _close(self, sock: socket.socket) -> None:
        self.poller.forget(sock.fileno())
        if isinstance(sock, TlsSocket):
            sock.notify_close()  # dropped idle: a clean end for its server
        sock.close()


class Http1Relay:
    """One plain-HTTP connection's sockets; `connection` is the door's."""

    __slots__ = (
        "connection",
        "session",
        "client_readable",
        "client_writable",
        "upstream_readable",
        "upstream_writable",
        "upstream_ending",
        "client_ending",
        "last_active",
        "read_now",
        "deferred",
    )

    def __init__(self, connection, tls: bool = False):
        """`tls`: the sockets are the front door's TLS ends (tls_relay.py's subclass)."""
        self.connection = connection
        self.session = Http1Session(connection.door.gate, connection.state, tls=tls)
        # The peeked bytes are unread and, edge-triggered, will not be reported again.
        self.client_readable, self.client_writable = True, True
        self.upstream_readable = self.upstream_writable = False
        self.upstream_ending = False  # its server closed or reset it (the event said so)
        self.client_ending = False  # the client closed its side or reset (as above)
        self.last_active = connection.loop.time()
        self.read_now = 0  # bytes read in this step: at most WAKEUP_BUDGET (relay.py)
        self.deferred = False  # a later step is asked for already
        connection.relay = self  # the door's idle sweep reads `last_active`
        connection.door.poller.handlers[connection.client_fd] = self._on_client_event
        self._step()

    def _on_client_event(self, events: int) -> None:
        if events & (IN | CLOSED):
            self.client_readable = True
        if events & CLOSED:
            self.client_ending = True
        if events & (OUT | CLOSED):
            self.client_writable = True
        self._step()

    def _on_upstream_event(self, events: int) -> None:
        connection = self.connection
        if not self.session.connected:
            if not events & (OUT | CLOSED):
                return
            error = upstream_error(connection.upstream, events)
            connection.door.unwait(connection)
            connection.on_deadline = None
            if error:
                self._drop_upstream()
                self.session.upstream_failed(os.strerror(error))
            else:
                self._upstream_ready()
        if events & (IN | CLOSED):
            self.upstream_readable = True
        if events & (OUT | CLOSED):
            self.upstream_writable = True
        if events & CLOSED:
            self.upstream_ending = True
        self._step()

    def _step(self) -> None:
        """Send what is owed, read what may be read, until nothing moves or the
        wakeup budget is spent (then again on a later loop iteration, as relay.py)."""
        connection, session = self.connection, self.session
        self.read_now, self.deferred = 0, False
        try:
            moved = True
            while moved and not connection.done:
                moved = False
                if session.to_client and self.client_writable:
                    moved |= self._send(to_client=True)
                if session.connected and session.to_upstream and self.upstream_writable:
                    moved |= self._send(to_client=False)
                if session.drop_upstream:
                    session.drop_upstream = False
                    if session.reset_upstream and connection.upstream is not None:
                        connection.upstream.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET
                        )
                    self._drop_upstream()
                if session.closing:
                    if not session.to_client or session.reset:
                        if not (session.reset or self.upstream_ending) and session.upstream_idle:
                            self._pool_upstream()
                        # Closing with unread bytes would send a reset instead of a FIN;
                        # a client that said all it sends and whose last read drained
                        # the socket has none to read (close_read's recv is spared).
                        drain = self.client_readable or not session.client_said_all
                        connection.finish(session.problem, reset=session.reset, drain=drain)
                    return
                if session.need_upstream and connection.upstream is None:
                    self._connect()
                    moved = True
                    continue
                if self.read_now >= WAKEUP_BUDGET:
                    self._defer()
                    return
                if self.client_readable and session.wants_client_data:
                    moved |= self._read(connection.client, up=True)
                if self.upstream_readable and session.connected and session.wants_upstream_data:
                    moved |= self._read(connection.upstream, up=False)
        except Exception as e:  # noqa: BLE001 - fails closed: the door's crash reports it
            connection.crash(e)

    def _defer(self) -> None:
        if not self.deferred:
            self.deferred = True
            self.connection.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if not self.connection.done:
            self._step()

    # --- the seams a TLS relay overrides (tls_relay.py) ---------------------------------

    def _upstream_ready(self) -> None:
        """The upstream's TCP connection is made."""
        self.session.upstream_connected()

    def _receive(self, sock: socket.socket, buffer: bytearray) -> int:
        """Read into `buffer`: the count (under its size: drained, a later arrival
        raises an event), 0 at the end, -1 for nothing yet; OSError: a reset."""
        try:
            return sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return -1

    def _transmit(self, sock: socket.socket, data: bytearray) -> int:
        """Send from the start of `data`: the count sent (0: blocked); OSError: a reset."""
        try:
            return sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def _read(self, sock: socket.socket, up: bool) -> bool:
        connection, session = self.connection, self.session
        buffer = connection.door.buffer
        try:
            n = self._receive(sock, buffer)
        except OSError:  # reset
            if up:
                connection.finish(None, reset=True)
            else:
                session.upstream_lost("the upstream reset the connection")
            return True
        # Drained (or ended): a later arrival raises a new event (edge-triggered). A
        # FIN that came with the last event raises none: a side whose peer is gone is
        # read on to its end. (Without that, a response ended by the server's close,
        # its data and FIN in one event, waited for the client's timeout; a red team,
        # session 51.)
        if n == 0 or (n < RELAY_CHUNK and not (self.client_ending if up else self.upstream_ending)):
            if up:
                self.client_readable = False
            else:
                self.upstream_readable = False
        if n < 0:
            return False
        self.last_active = connection.loop.time()
        self.read_now += n
        # A bytearray of its own, given to the session (kept by none here): a body's
        # read is then owed as it is, not copied again (Http1Session._fast_body).
        data = buffer[:n]
        if up:
            connection.state.bytes_up += n
            session.client_data(data)
        else:
            session.upstream_data(data)
        return True

    def _send(self, to_client: bool) -> bool:
        """Send what the session owes one side; False if nothing moved."""
        connection, session = self.connection, self.session
        sock, owed = (
            (connection.client, session.to_client)
            if to_client
            else (connection.upstream, session.to_upstream)
        )
        try:
            sent = self._transmit(sock, owed)
        except OSError:
            if to_client:
                connection.finish(None, reset=True)
            else:
                session.upstream_lost("the upstream reset the connection")
            return True
        if sent < len(owed):
            if to_client:
                self.client_writable = False
            else:
                self.upstream_writable = False
        if to_client:
            connection.state.bytes_down += sent
        del owed[:sent]
        return sent > 0

    def _pool_key(self) -> tuple[str | None, str, str, int, str | None]:
        """Whose idle connections this one may take: the same task's (a sandbox's
        address is given to another task later), to the same address, made for the
        same Host (every request on a connection has its first's: gate._settle_request).
        By address alone, a request for one name took a connection made for another,
        which a router that picks its backend per connection served as the other's
        (a red team, session 49; Squid keys its pool by the domain too)."""
        connection = self.connection
        ip, port = connection.dst
        if connection.door.upstream_address is not None:
            ip, port = connection.door.upstream_address(ip, port)
        state = connection.state
        return state.sandbox.task_id, state.sandbox.address, ip, port, state.allowed_name

    def _pool_upstream(self) -> None:
        """Leave the idle upstream connection to the pool instead of closing it."""
        connection = self.connection
        upstream, connection.upstream = connection.upstream, None
        connection.door.upstream_pool.give(self._pool_key(), upstream)

    def _connect(self) -> None:
        """Take an idle connection to the upstream address from the pool, else
        connect to it, as the door's relay does."""
        connection = self.connection
        door = connection.door
        key = self._pool_key()
        ip, port = key[2], key[3]
        if self.session.may_reuse:
            upstream = door.upstream_pool.take(key)
            if upstream is not None:
                connection.upstream = upstream
                door.poller.handlers[upstream.fileno()] = self._on_upstream_event
                # Idle means drained and writable; a later arrival raises an event.
                self.upstream_readable, self.upstream_writable = False, True
                self.upstream_ending = False
                self.session.upstream_connected(reused=True)
                return
        self.upstream_readable = self.upstream_writable = self.upstream_ending = False
        try:
            upstream = socket.socket(
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM | socket.SOCK_NONBLOCK,
            )
        except OSError as e:  # out of descriptors, say
            self.session.upstream_failed(e.strerror or str(e))
            return
        connection.upstream = upstream
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = upstream.connect_ex((ip, port))
        if error not in (0, errno.EINPROGRESS):
            self._drop_upstream()
            self.session.upstream_failed(os.strerror(error))
            return
        # The door's deadline: `timed_out` calls `on_deadline` while the upstream is pending.
        connection.wake_at = connection.loop.time() + door.connect_timeout
        connection.on_deadline = self._upstream_timed_out
        door.wait(connection)
        door.poller.watch(upstream.fileno(), self._on_upstream_event)

    def _upstream_timed_out(self) -> None:
        """The door's connect deadline came with the upstream still pending: a failed
        connect (502 naming it), as a refused one is, not the client's reset."""
        self._upstream_failed(self._pending_upstream_why())

    def _pending_upstream_why(self) -> str:
        """Why a pending upstream failed at the connect deadline."""
        return "timed out"

    def _upstream_failed(self, why: str) -> None:
        """The pending upstream failed (`why`): dropped, and the session answers 502."""
        connection = self.connection
        connection.on_deadline = None
        try:
            self._drop_upstream()
            self.session.upstream_failed(why)
            self._step()
        except Exception as e:  # noqa: BLE001
            connection.crash(e)

    def _drop_upstream(self) -> None:
        connection = self.connection
        upstream, connection.upstream = connection.upstream, None
        if upstream is not None:
            connection.door.unwait(connection)
            connection.door.poller.forget(upstream.fileno())
            upstream.close()
