"""Inspected HTTPS/1.1 served by the front door itself: TLS with the client (a leaf
of the gateway CA, tls_contexts.py), then the same `Http1Session` as plain HTTP
(http1.py decides every request, `tls=True`: https in its events), and TLS to the
upstream once a request is allowed (lazy, as mitmproxy's connection strategy).

The door takes a connection the gate decided as INTERCEPT here (`serve_inspected`)
when its profile needs nothing only mitmproxy does (http1.needs_engine: requests
held for approval, WebSocket tunnels) and its ClientHello offers no ALPN or offers
http/1.1; a client offering h2 and http/1.1 gets http/1.1 (mitmproxy gave it h2).
Everything else is still handed to mitmproxy.

The sockets are the stdlib's non-blocking `ssl.SSLSocket`s in the door's
edge-triggered epoll set; `TlsHttp1Relay` is `Http1Relay` with TLS reads and writes
(its seams `_receive`, `_transmit`, `_upstream_ready`):
- a read drains OpenSSL until it wants the socket again (SSLWantReadError): a
  record already decrypted raises no socket edge. The end of the stream read after
  data in one go is reported by the next read (`_ended`);
- a read that wants to write (a TLS 1.3 KeyUpdate's answer did not fit the socket)
  waits for the socket's OUT edge, a write that wants to read for its IN edge;
- a write that did not finish is retried with the same bytes first (OpenSSL's
  rule); `owed` only loses bytes a write took, and a write is at most WRITE_MAX.
Upstream TLS connections go to the door's UpstreamPool as plain ones do, keyed by
the SNI too: a pooled connection was verified for exactly that name.

Failures: a client handshake that fails is `gate.on_tls_rejected` (as mitmproxy's
`tls_failed_client`), then closed; an upstream handshake that fails (verification
above all) is a 502 naming why, and the connection's end event says it; an
exception anywhere ends the connection through `Connection.crash`."""

from __future__ import annotations

import socket
import ssl
from typing import NamedTuple

from sandgate.proxy.clienthello import _first_handshake_message, server_name_and_alpn
from sandgate.proxy.frontdoor.http1_relay import Http1Relay
from sandgate.proxy.frontdoor.poller import CLOSED, IN, OUT
from sandgate.proxy.gate import MAX_FIRST_BYTES

WRITE_MAX = 64 * 1024  # bytes given to one SSL write (records of 16 KiB)
_HTTP1 = b"http/1.1"
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Hello(NamedTuple):
    sni: str | None
    alpn: tuple[bytes, ...]


def http1_hello(client: socket.socket) -> Hello | None:
    """The client's ClientHello (still unread in its socket) if it may be served as
    HTTP/1.1: no ALPN, or http/1.1 among its offers; None otherwise."""
    try:
        data = client.recv(MAX_FIRST_BYTES, socket.MSG_PEEK)
        body = _first_handshake_message(data)
        if body is None:
            return None
        sni, alpn = server_name_and_alpn(body)
    except (OSError, ValueError):
        return None  # mitmproxy's path says what it is
    if alpn and _HTTP1 not in alpn:
        return None
    return Hello(sni, tuple(alpn))


def serve_inspected(connection, hello: Hello) -> None:
    """Take over `connection` (the door's, decided INTERCEPT): the client's TLS
    handshake, then `TlsHttp1Relay`."""
    door, state = connection.door, connection.state
    # The name the gate decided (parse_domain: lower case, no trailing dot) is the one
    # used from here on, as mitmproxy's path sets `client.sni = state.name`: the raw
    # SNI named the upstream otherwise (sent, verified, pooled) in a spelling the
    # decision did not see, and a trailing dot failed verification.
    if hello.sni:
        hello = hello._replace(sni=state.name)
    # The leaf's names, as mitmproxy's `TlsConfig.get_cert` picks them (SNI, else the
    # address the client reached; then the destination's address).
    first = hello.sni or connection.client.getsockname()[0]
    names = tuple(dict.fromkeys((first, str(state.ip))))
    context = door.tls_contexts.for_client(names)
    client = context.wrap_socket(connection.client, server_side=True, do_handshake_on_connect=False)
    connection.client = client  # the same descriptor: its epoll entry stays
    ClientHandshake(connection, hello)


class ClientHandshake:
    """The client's handshake, on its socket's edges, within the door's first-bytes
    deadline; done, the connection becomes a `TlsHttp1Relay`."""

    __slots__ = ("connection", "hello")

    def __init__(self, connection, hello: Hello):
        self.connection, self.hello = connection, hello
        door = connection.door
        connection.silent_until = None
        connection.wake_at = connection.deadline = connection.loop.time() + door.first_bytes_timeout
        door.wait(connection)
        door.poller.handlers[connection.client_fd] = self.on_event
        self.on_event(IN | OUT)

    def on_event(self, events: int) -> None:
        connection = self.connection
        try:
            connection.client.do_handshake()
        except _WANT:
            if events & CLOSED:
                self._failed("the client closed the connection during the handshake")
            return
        except (ssl.SSLError, OSError) as e:
            self._failed(_why(e))
            return
        except Exception as e:  # noqa: BLE001
            connection.crash(e)
            return
        connection.door.unwait(connection)
        try:
            TlsHttp1Relay(connection, self.hello)
        except Exception as e:  # noqa: BLE001
            connection.crash(e)

    def _failed(self, why: str) -> None:
        connection = self.connection
        connection.door.gate.on_tls_rejected(connection.state, why)
        connection.finish(f"the client's TLS handshake failed: {why}", reset=True)


def _why(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return error.strerror or str(error)


class TlsHttp1Relay(Http1Relay):
    """`Http1Relay` over the front door's TLS sockets (see the module docstring)."""

    __slots__ = (
        "hello",
        "ended",  # sockets (not descriptors: reused) whose end came after data
        "cut",  # upstream sockets whose end without close_notify came after data
        "read_waits_out",  # sockets whose read waits for their OUT edge
        "write_waits_in",  # sockets whose write waits for their IN edge
    )

    def __init__(self, connection, hello: Hello):
        self.hello = hello
        self.ended: set[ssl.SSLSocket] = set()
        self.cut: set[ssl.SSLSocket] = set()
        self.read_waits_out: set[int] = set()
        self.write_waits_in: set[int] = set()
        super().__init__(connection, tls=True)

    # --- edges ----------------------------------------------------------------------

    def _on_client_event(self, events: int) -> None:
        super()._on_client_event(self._translated(self.connection.client_fd, events))

    def _on_upstream_event(self, events: int) -> None:
        upstream = self.connection.upstream
        if upstream is not None and self.session.connected:
            events = self._translated(upstream.fileno(), events)
        super()._on_upstream_event(events)

    def _translated(self, fd: int, events: int) -> int:
        """An OUT edge lets a read that wanted to write go on (IN), an IN edge a
        write that wanted to read (OUT)."""
        if events & OUT and fd in self.read_waits_out:
            self.read_waits_out.discard(fd)
            events |= IN
        if events & IN and fd in self.write_waits_in:
            self.write_waits_in.discard(fd)
            events |= OUT
        return events

    # --- reads and writes ---------------------------------------------------------------

    def _receive(self, sock: ssl.SSLSocket, buffer: bytearray) -> int:
        if sock in self.ended:
            self.ended.discard(sock)
            return 0
        if sock in self.cut:
            self.cut.discard(sock)
            raise ConnectionResetError("the upstream closed without close_notify")
        view, n, size = memoryview(buffer), 0, len(buffer)
        try:
            while n < size:
                try:
                    got = sock.recv_into(view[n:])
                except ssl.SSLWantReadError:
                    break  # drained: the socket's next IN edge says more came
                except ssl.SSLWantWriteError:
                    self.read_waits_out.add(sock.fileno())
                    break
                except ssl.SSLZeroReturnError:
                    got = 0
                except ssl.SSLEOFError:
                    # An upstream's TCP end without close_notify (its sockets do not
                    # suppress it): a cut, not an end, or a close-delimited body
                    # would be completed for the client. A reset, after the data.
                    if not n:
                        raise ConnectionResetError(
                            "the upstream closed without close_notify"
                        ) from None
                    self.cut.add(sock)
                    self.connection.loop.call_soon(self._read_end, sock)
                    return n
                if got == 0:
                    if n:  # the end, after data: the data now, the end next
                        self.ended.add(sock)
                        self.connection.loop.call_soon(self._read_end, sock)
                        return n
                    return 0
                n += got
        finally:
            view.release()
        return n if n else -1

    def _read_end(self, sock: ssl.SSLSocket) -> None:
        connection = self.connection
        if (sock in self.ended or sock in self.cut) and not connection.done:
            if sock is connection.client:
                self._on_client_event(IN)
            elif sock is connection.upstream:
                self._on_upstream_event(IN)
            else:  # dropped meanwhile
                self.ended.discard(sock)
                self.cut.discard(sock)

    def _drop_upstream(self) -> None:
        # Its descriptor may come back with the next upstream connection.
        upstream = self.connection.upstream
        if upstream is not None:
            self.ended.discard(upstream)
            self.cut.discard(upstream)
            self.read_waits_out.discard(upstream.fileno())
            self.write_waits_in.discard(upstream.fileno())
        super()._drop_upstream()

    def _transmit(self, sock: ssl.SSLSocket, data: bytearray) -> int:
        """Writes of at most WRITE_MAX until all went or the socket is full (a count
        under len(data) says so to the relay)."""
        sent, size = 0, len(data)
        while sent < size:
            piece = data if size <= WRITE_MAX else data[sent : sent + WRITE_MAX]
            try:
                sent += sock.send(piece)
            except ssl.SSLWantWriteError:
                break
            except ssl.SSLWantReadError:
                self.write_waits_in.add(sock.fileno())
                break
        return sent

    # --- the upstream ---------------------------------------------------------------------

    def _pool_key(self) -> tuple:
        """A pooled TLS connection was verified for one name: the key carries it."""
        return (*super()._pool_key(), "tls", self.hello.sni)

    def _upstream_ready(self) -> None:
        """The TCP connection is made: TLS with the upstream, verified, within the
        door's connect deadline."""
        connection = self.connection
        door = connection.door
        context = door.tls_contexts.for_upstream(alpn=bool(self.hello.alpn))
        # mitmproxy's server.sni: the client's SNI, else the destination's address
        # (checked against the certificate's IP addresses; no SNI is sent then).
        name = self.hello.sni or str(connection.state.ip)
        connection.upstream = context.wrap_socket(
            connection.upstream,
            server_hostname=name,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,  # a truncation is not an end (_receive)
        )
        connection.wake_at = connection.loop.time() + door.connect_timeout
        door.wait(connection)
        door.poller.handlers[connection.upstream.fileno()] = self._on_upstream_handshake
        self._on_upstream_handshake(IN | OUT)

    def _on_upstream_handshake(self, events: int) -> None:
        connection = self.connection
        try:
            try:
                connection.upstream.do_handshake()
            except _WANT:
                if not events & CLOSED:
                    return
                why = "the upstream closed the connection during the handshake"
            except (ssl.SSLError, OSError) as e:
                why = _why(e)
            else:
                connection.door.unwait(connection)
                connection.door.poller.handlers[connection.upstream.fileno()] = (
                    self._on_upstream_event
                )
                self.upstream_readable = self.upstream_writable = True
                self.session.upstream_connected()
                self._step()
                return
            connection.door.unwait(connection)
            self._drop_upstream()
            self.session.upstream_failed(f"TLS handshake failed: {why}")
            self._step()
        except Exception as e:  # noqa: BLE001
            connection.crash(e)
