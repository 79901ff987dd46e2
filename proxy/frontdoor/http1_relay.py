"""The sockets of a plain-HTTP connection the front door serves itself: moves bytes
between them and an `Http1Session` (http1.py, where every decision is made), in
the front door's edge-triggered epoll set, with its one read buffer.

It takes over a door `Connection` the gate decided as HTTP: the connection keeps
its end (`finish`: both sockets closed, `gate.on_close` once), its upstream
connect deadline (`door.wait`) and its idle sweep (`last_active`)."""

from __future__ import annotations

import errno
import os
import socket

from sandgate.proxy.frontdoor.http1 import Http1Session
from sandgate.proxy.frontdoor.poller import CLOSED, IN, OUT
from sandgate.proxy.frontdoor.relay import RELAY_CHUNK


class Http1Relay:
    """One plain-HTTP connection's sockets; `connection` is the door's."""

    __slots__ = (
        "connection",
        "session",
        "client_readable",
        "client_writable",
        "upstream_readable",
        "upstream_writable",
        "last_active",
    )

    def __init__(self, connection):
        self.connection = connection
        self.session = Http1Session(connection.door.gate, connection.state)
        # The peeked bytes are unread and, edge-triggered, will not be reported again.
        self.client_readable, self.client_writable = True, True
        self.upstream_readable = self.upstream_writable = False
        self.last_active = connection.loop.time()
        connection.relay = self  # the door's idle sweep reads `last_active`
        connection.door.poller.handlers[connection.client_fd] = self._on_client_event
        self._step()

    def _on_client_event(self, events: int) -> None:
        if events & (IN | CLOSED):
            self.client_readable = True
        if events & (OUT | CLOSED):
            self.client_writable = True
        self._step()

    def _on_upstream_event(self, events: int) -> None:
        connection = self.connection
        if not self.session.connected:
            if not events & (OUT | CLOSED):
                return
            error = connection.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            connection.door.unwait(connection)
            if error:
                self._drop_upstream()
                self.session.upstream_failed(os.strerror(error))
            else:
                self.session.upstream_connected()
        if events & (IN | CLOSED):
            self.upstream_readable = True
        if events & (OUT | CLOSED):
            self.upstream_writable = True
        self._step()

    def _step(self) -> None:
        """Send what is owed, read what may be read, until nothing moves."""
        connection, session = self.connection, self.session
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
                    self._drop_upstream()
                if session.closing:
                    if not session.to_client or session.reset:
                        connection.finish(session.problem, reset=session.reset, drain=True)
                    return
                if session.need_upstream and connection.upstream is None:
                    self._connect()
                    moved = True
                    continue
                if self.client_readable and session.wants_client_data:
                    moved |= self._read(connection.client, up=True)
                if self.upstream_readable and session.connected and session.wants_upstream_data:
                    moved |= self._read(connection.upstream, up=False)
        except Exception as e:  # noqa: BLE001 - fails closed: the door's crash reports it
            connection.crash(e)

    def _read(self, sock: socket.socket, up: bool) -> bool:
        connection, session = self.connection, self.session
        buffer = connection.door.buffer
        try:
            n = sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            n = -1
        except OSError:  # reset
            connection.finish(None if up else "the upstream reset the connection", reset=True)
            return False
        if n < RELAY_CHUNK:  # drained (or ended): a later arrival raises a new event
            if up:
                self.client_readable = False
            else:
                self.upstream_readable = False
        if n < 0:
            return False
        self.last_active = connection.loop.time()
        data = bytes(memoryview(buffer)[:n])
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
            sent = sock.send(owed)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            connection.finish(None if to_client else "the upstream reset the connection", reset=True)
            return False
        if sent < len(owed):
            if to_client:
                self.client_writable = False
            else:
                self.upstream_writable = False
        if to_client:
            connection.state.bytes_down += sent
        del owed[:sent]
        return sent > 0

    def _connect(self) -> None:
        """Connect to the connection's upstream address, as the door's relay does."""
        connection = self.connection
        door = connection.door
        ip, port = connection.dst
        if door.upstream_address is not None:
            ip, port = door.upstream_address(ip, port)
        self.upstream_readable = self.upstream_writable = False
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
        # The door's deadline: `timed_out` fails a connection whose upstream is pending.
        connection.wake_at = connection.loop.time() + door.connect_timeout
        door.wait(connection)
        door.poller.watch(upstream.fileno(), self._on_upstream_event)

    def _drop_upstream(self) -> None:
        connection = self.connection
        upstream, connection.upstream = connection.upstream, None
        if upstream is not None:
            connection.door.unwait(connection)
            connection.door.poller.forget(upstream.fileno())
            upstream.close()
