"""Inspected HTTPS/1.1 served by the front door itself: TLS with the client (a leaf
of the gateway CA, tls_contexts.py), then the same `Http1Session` as plain HTTP
(http1.py decides every request, `tls=True`: https in its events), and TLS to the
upstream once a request is allowed (lazy, as mitmproxy's connection strategy).

The door takes a connection the gate decided as INTERCEPT here (`serve_inspected`)
when its profile needs nothing only mitmproxy does (http1.needs_engine: requests
held for approval, WebSocket tunnels) and its ClientHello offers no ALPN or offers
http/1.1; a client offering h2 and http/1.1 gets http/1.1 (mitmproxy gave it h2).
Everything else is still handed to mitmproxy.

The sockets are `tls_io.TlsSocket`s (a TCP socket with an `SSLObject` over memory
BIOs: one recv per read, one send per flight; see tls_io.py) in the door's
edge-triggered epoll set; `TlsHttp1Relay` is `Http1Relay` with TLS reads and writes
(its seams `_receive`, `_transmit`, `_upstream_ready`). The end of the stream read
after data in one go is reported by the next read (`ended`).
Upstream TLS connections go to the door's UpstreamPool as plain ones do, keyed by
the SNI too: a pooled connection was verified for exactly that name.

Failures: a client handshake that fails is `gate.on_tls_rejected` (as mitmproxy's
`tls_failed_client`: policy/client_tls.py says what it was), then reset; an upstream
handshake that fails (verification above all), or not done by the door's connect deadline, is a 502 naming why, and
the connection's end event says it; an exception anywhere ends the connection
through `Connection.crash`. Clean ends send close_notify (tls_io.notify_close),
resets do not."""

from __future__ import annotations

import ssl
from typing import NamedTuple

from sandgate.proxy.clienthello import alpn_protocols
from sandgate.proxy.frontdoor.http1_relay import Http1Relay
from sandgate.proxy.frontdoor.poller import CLOSED, IN, OUT
from sandgate.proxy.frontdoor.tls_io import TlsSocket

_HTTP1 = b"http/1.1"


class Hello(NamedTuple):
    sni: str | None
    alpn: tuple[bytes, ...]


def http1_hello(state) -> Hello | None:
    """What the door needs of the ClientHello the gate decided on (`state`'s) if the
    connection may be served as HTTP/1.1: no ALPN, or http/1.1 among its offers;
    None otherwise. The SNI is the name the gate decided (parse_domain: lower case,
    no trailing dot), as mitmproxy's path sets `client.sni = state.name`: the raw SNI
    would name the upstream (sent, verified, pooled) in a spelling the decision did
    not see, and a trailing dot failed verification."""
    hello = state.client_hello
    if hello is None:
        return None
    try:
        alpn = alpn_protocols(hello.alpn)
    except ValueError:
        return None  # mitmproxy's path says what it is
    if alpn and _HTTP1 not in alpn:
        return None
    return Hello(state.name if hello.sni else None, tuple(alpn))


def serve_inspected(connection, hello: Hello) -> None:
    """Take over `connection` (the door's, decided INTERCEPT): the client's TLS
    handshake, then `TlsHttp1Relay`."""
    door, state = connection.door, connection.state
    # The leaf's names, as mitmproxy's `TlsConfig.get_cert` picks them (SNI, else the
    # address the client reached; then the destination's address).
    first = hello.sni or connection.client.getsockname()[0]
    names = tuple(dict.fromkeys((first, str(state.ip))))
    context = door.tls_contexts.for_client(names, state.sandbox)
    # The same descriptor: its epoll entry stays.
    connection.client = TlsSocket.wrap(connection.client, context, server_side=True)
    ClientHandshake(connection, hello)


class ClientHandshake:
    """The client's handshake, on its socket's edges, within the door's first-bytes
    deadline; done, the connection becomes a `TlsHttp1Relay`. A handshake not done by
    the deadline is a failed one (the client may have stopped at the gateway's
    certificate without an alert): its event names the stall."""

    __slots__ = ("connection", "hello")

    def __init__(self, connection, hello: Hello):
        self.connection, self.hello = connection, hello
        door = connection.door
        connection.silent_until = None
        connection.wake_at = connection.deadline = connection.loop.time() + door.first_bytes_timeout
        connection.on_deadline = self._stalled
        door.wait(connection)
        door.poller.handlers[connection.client_fd] = self.on_event
        self.on_event(IN | OUT)

    def on_event(self, events: int) -> None:
        connection = self.connection
        try:
            if not connection.client.handshake():
                if events & CLOSED:
                    self._failed("the client closed the connection during the handshake")
                return
        except OSError as e:  # ssl.SSLError among them
            self._failed(_why(e))
            return
        except Exception as e:  # noqa: BLE001
            connection.crash(e)
            return
        connection.door.unwait(connection)
        connection.on_deadline = None
        try:
            TlsHttp1Relay(connection, self.hello)
        except Exception as e:  # noqa: BLE001
            connection.crash(e)

    def _stalled(self) -> None:
        timeout = self.connection.door.first_bytes_timeout
        self._failed(f"the handshake stalled: not finished within {timeout:g} s")

    def _failed(self, why: str) -> None:
        connection = self.connection
        connection.on_deadline = None
        connection.door.gate.on_tls_rejected(connection.state, why)
        connection.finish(f"the client's TLS handshake failed: {why}", reset=True)


def _why(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):  # OpenSSL's reason as its message says it
        return error.reason.lower().replace("_", " ") if error.reason else str(error)
    return error.strerror or str(error)


class TlsHttp1Relay(Http1Relay):
    """`Http1Relay` over the front door's TLS sockets (see the module docstring)."""

    __slots__ = (
        "hello",
        "ended",  # sockets (not descriptors: reused) whose end came after data
    )

    def __init__(self, connection, hello: Hello):
        self.hello = hello
        self.ended: set[TlsSocket] = set()
        super().__init__(connection, tls=True)

    # --- edges -------------------------------------------------------------------------

    def _on_client_event(self, events: int) -> None:
        if events & CLOSED:
            self.connection.client.peer_closing = True
        super()._on_client_event(events)

    def _on_upstream_event(self, events: int) -> None:
        upstream = self.connection.upstream
        if events & CLOSED and isinstance(upstream, TlsSocket):
            upstream.peer_closing = True
        super()._on_upstream_event(events)

    # --- reads and writes ---------------------------------------------------------------

    def _receive(self, sock: TlsSocket, buffer: bytearray) -> int:
        if sock in self.ended:
            self.ended.discard(sock)
            if sock.truncated:
                raise ConnectionResetError(sock.truncated)
            return 0
        view = memoryview(buffer)
        try:
            n = sock.read_into(view)
        finally:
            view.release()
        if 0 < n < len(buffer) and sock.eof:
            # The end, after data: the data now, the end next (no socket edge will come).
            self.ended.add(sock)
            self.connection.loop.call_soon(self._read_end, sock)
        return n

    def _read_end(self, sock: TlsSocket) -> None:
        connection = self.connection
        if sock in self.ended and not connection.done:
            if sock is connection.client:
                self._on_client_event(IN)
            elif sock is connection.upstream:
                self._on_upstream_event(IN)
            else:
                self.ended.discard(sock)  # dropped meanwhile

    def _drop_upstream(self) -> None:
        # Its descriptor may come back with the next upstream connection.
        upstream = self.connection.upstream
        if upstream is not None:
            self.ended.discard(upstream)
            self._keep_session(upstream)
            if isinstance(upstream, TlsSocket):
                upstream.notify_close()  # done with it (not pooled): a clean end
        super()._drop_upstream()

    def _pool_upstream(self) -> None:
        self._keep_session(self.connection.upstream)
        super()._pool_upstream()

    def _transmit(self, sock: TlsSocket, data: bytearray) -> int:
        return sock.write_from(data)

    # --- the upstream ---------------------------------------------------------------------

    def _pool_key(self) -> tuple:
        """A pooled TLS connection was verified for one name: the key carries it."""
        return (*super()._pool_key(), "tls", self.hello.sni)

    def _upstream_name(self) -> str:
        """mitmproxy's server.sni: the client's SNI, else the destination's address
        (checked against the certificate's IP addresses; no SNI is sent then)."""
        return self.hello.sni or str(self.connection.state.ip)

    def _session_key(self) -> tuple:
        """What a kept upstream session was verified for (tls_contexts.py): this
        task's upstream address, the name checked, the context (ALPN offered or not)."""
        return (*self._pool_key(), self._upstream_name(), bool(self.hello.alpn))

    def _keep_session(self, upstream: TlsSocket) -> None:
        """Keep the session of a full, verified handshake (a failed one, or a TCP
        connect that failed, keeps nothing). Once per connection, and not after a
        resumption (the kept session still serves): reading a session from OpenSSL
        copies it whole, certificates parsed again, ~200 us."""
        if (
            isinstance(upstream, TlsSocket)
            and upstream.handshaken
            and not upstream.session_kept
            and not upstream.tls.session_reused
        ):
            upstream.session_kept = True
            self.connection.door.tls_contexts.keep_upstream_session(
                self._session_key(), upstream.tls.session
            )

    def _upstream_ready(self) -> None:
        """The TCP connection is made: TLS with the upstream, verified (or resumed from
        a verified session of the same name and address), within the door's connect
        deadline."""
        connection = self.connection
        door = connection.door
        contexts = door.tls_contexts
        connection.upstream = TlsSocket.wrap(
            connection.upstream,
            contexts.for_upstream(alpn=bool(self.hello.alpn)),
            server_side=False,
            server_hostname=self._upstream_name(),
            session=contexts.upstream_session(self._session_key()),
            truncation_is_reset=True,
        )
        connection.wake_at = connection.loop.time() + door.connect_timeout
        connection.on_deadline = self._upstream_timed_out  # a 502, as a failed handshake
        door.wait(connection)
        door.poller.handlers[connection.upstream.fileno()] = self._on_upstream_handshake
        self._on_upstream_handshake(IN | OUT)

    def _on_upstream_handshake(self, events: int) -> None:
        connection = self.connection
        try:
            try:
                done = connection.upstream.handshake()
            except OSError as e:  # ssl.SSLError (verification above all) among them
                why = _why(e)
            else:
                if not done:
                    if not events & CLOSED:
                        return
                    why = "the upstream closed the connection during the handshake"
                else:
                    connection.door.unwait(connection)
                    connection.on_deadline = None
                    connection.door.poller.handlers[connection.upstream.fileno()] = (
                        self._on_upstream_event
                    )
                    self.upstream_readable = self.upstream_writable = True
                    self.session.upstream_connected()
                    self._step()
                    return
            connection.door.unwait(connection)
            self._upstream_failed(f"TLS handshake failed: {why}")
        except Exception as e:  # noqa: BLE001
            connection.crash(e)

    def _pending_upstream_why(self) -> str:
        """The connect deadline covers the TLS handshake too (`_upstream_ready`)."""
        upstream = self.connection.upstream
        if isinstance(upstream, TlsSocket):
            timeout = self.connection.door.connect_timeout
            return f"TLS handshake failed: not finished within {timeout:g} s"
        return super()._pending_upstream_why()
