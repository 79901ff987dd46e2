"""How the front door's inspected TLS connections end (tls_relay.py, tls_io.py), on
loopback. Clean ends (TlsSocket.notify_close): close_notify on every clean end of a
connection the door terminates, to the client after its last response and to an
upstream the door closes or the pool drops; none on a reset (a cut stays a cut);
the peers are strict (`suppress_ragged_eofs=False`: a FIN without close_notify
raises, where a clean end reads b""). Failed ends: an upstream handshake that hits
the connect deadline is a 502 as a failed handshake is."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from types import SimpleNamespace

import test_tls_relay
from support.fakes import client_hello
from test_frontdoor import LOOPBACK, read_all, run, until
from test_tls_relay import NAME, requests, tls_door

gate, tls = test_tls_relay.gate, test_tls_relay.tls  # its fixtures

HOST = b"Host: api.allowed.test\r\n"


def read_to_end(sock: ssl.SSLSocket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: "close_notify" (recv gave b""),
    else the error's name (SSLEOFError: a FIN without close_notify; a reset)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (OSError, ssl.SSLError) as e:
        return data, type(e).__name__
    return data, "close_notify"


class StrictUpstream:
    """A TLS server on loopback, a thread per connection: reads a request head,
    answers `answer`, then (`then`) "close" (a bare FIN: no close_notify), "listen"
    (reads on), or "notify" (its close_notify, then waits for the gateway's) and
    records in `ends` how the gateway ended the connection."""

    def __init__(self, context: ssl.SSLContext, answer: bytes, then: str):
        self.context, self.answer, self.then = context, answer, then
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.ends: list[str] = []  # how each connection ended, as read_to_end says
        self.heads: list[bytes] = []
        self.serving: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            serving = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.serving.append(serving)
            serving.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        with self.context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as sock:
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            self.heads.append(head.split(b"\r\n")[0])
            sock.sendall(self.answer)
            if self.then == "listen":
                self.ends.append(read_to_end(sock)[1])
            elif self.then == "notify":
                try:
                    sock.unwrap()  # blocking: returns once the peer's close_notify came
                except (OSError, ssl.SSLError) as e:
                    self.ends.append(type(e).__name__)
                else:
                    self.ends.append("close_notify")
            # "close": SSLSocket.close sends no close_notify (that is unwrap's)

    def close(self) -> None:
        """No more connections; those served have ended and said how (`ends`): the
        gateway's close_notify may reach the client before this server has read it."""
        self.listener.close()
        for serving in self.serving:
            serving.join(timeout=10)


def through(gate_, tls_, upstream: StrictUpstream, talk, **door_options):
    """The door before `upstream`; `talk(port, client_context)` in a thread; its
    answer once the connection's end is reported and the door stopped."""
    contexts, _, client = tls_
    answers = []

    async def scenario():
        door = await tls_door(gate_, upstream, contexts, **door_options)
        answers.append(await asyncio.to_thread(talk, door.port, client))
        await until(lambda: any(e.kind.value == "connection_end" for e in gate_.events))
        await door.stop()
        upstream.close()

    run(scenario())
    return answers[0]


def connect(port: int, client: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    return client.wrap_socket(raw, server_hostname=NAME, suppress_ragged_eofs=False)


def test_an_http_1_0_client_reads_a_close_delimited_response_to_a_clean_end(gate, tls):
    """h11 frames the response close-delimited for an HTTP/1.0 client: only the
    gateway's close_notify tells it the body is whole."""
    body = b"until-close " * 1000
    upstream = StrictUpstream(tls[1]["good"], b"HTTP/1.0 200 OK\r\n\r\n" + body, "notify")

    def talk(port, client):
        with connect(port, client) as sock:
            sock.sendall(b"GET /public HTTP/1.0\r\n" + HOST + b"\r\n")
            return read_to_end(sock)

    answer, end = through(gate, tls, upstream, talk)
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"chunked" not in head, head
    assert got == body and end == "close_notify"
    # The server ended its body with close_notify; the door answered it with its own
    # as it dropped the connection (no pooling after a close-delimited answer).
    assert upstream.heads == [b"GET /public HTTP/1.1"]
    assert upstream.ends == ["close_notify"]


def test_an_upstream_cut_reaches_the_client_as_a_cut_without_close_notify(gate, tls):
    """The body ends with the server's bare FIN: the client must not read a clean
    end (its copy would look whole)."""
    upstream = StrictUpstream(tls[1]["good"], b"HTTP/1.0 200 OK\r\n\r\npartial", "close")

    def talk(port, client):
        with connect(port, client) as sock:
            sock.sendall(b"GET /public HTTP/1.0\r\n" + HOST + b"\r\n")
            return read_to_end(sock)

    answer, end = through(gate, tls, upstream, talk)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert end != "close_notify" and end in ("ConnectionResetError", "SSLEOFError"), end


def test_a_connection_the_gateway_resets_gets_no_close_notify(gate, tls):
    """The gateway stopping resets its connections: a cut, not an end."""
    upstream = StrictUpstream(
        tls[1]["good"], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "listen"
    )
    contexts, _, client = tls
    result = []

    async def scenario():
        door = await tls_door(gate, upstream, contexts)

        def first_answer():
            sock = connect(door.port, client)
            sock.sendall(b"GET /public HTTP/1.1\r\n" + HOST + b"\r\n")
            data = b""
            while not data.endswith(b"ok"):
                data += sock.recv(4096)
            return sock

        sock = await asyncio.to_thread(first_answer)
        await door.stop()  # with the connection open: reset
        result.append(await asyncio.to_thread(read_to_end, sock))
        sock.close()
        upstream.close()

    run(scenario())
    [(rest, end)] = result
    assert rest == b"" and end in ("ConnectionResetError", "SSLEOFError"), (rest, end)


def test_the_idle_sweep_ends_both_sides_with_close_notify(gate, tls):
    upstream = StrictUpstream(
        tls[1]["good"], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "listen"
    )

    def talk(port, client):
        with connect(port, client) as sock:
            sock.sendall(b"GET /public HTTP/1.1\r\n" + HOST + b"\r\n")
            return read_to_end(sock)  # then idle until the gateway closes it

    answer, end = through(gate, tls, upstream, talk, idle_timeout=0.4)
    assert answer.endswith(b"\r\n\r\nok") and end == "close_notify"
    assert upstream.ends == ["close_notify"]


def test_an_idle_upstream_the_pool_drops_gets_close_notify(gate, tls):
    """The client's `Connection: close` is its own: the upstream is kept idle in the
    pool, which closes it when the door stops."""
    upstream = StrictUpstream(
        tls[1]["good"], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "listen"
    )
    contexts, _, client = tls

    async def scenario():
        door = await tls_door(gate, upstream, contexts)

        def talk():
            with connect(door.port, client) as sock:
                sock.sendall(b"GET /public HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
                return read_to_end(sock)

        answer, end = await asyncio.to_thread(talk)
        assert answer.endswith(b"\r\n\r\nok") and end == "close_notify"
        await until(lambda: door.upstream_pool.count == 1)
        assert upstream.ends == []  # kept open in the pool
        await door.stop()
        await until(lambda: upstream.ends)
        upstream.close()

    run(scenario())
    assert upstream.ends == ["close_notify"]


def test_an_upstream_that_never_answers_the_client_hello_is_a_502_at_the_connect_deadline(
    gate, tls
):
    """TCP accepted, the ClientHello never answered: a failed handshake (502 naming
    the timeout, the end event saying it), not a reset of the client."""
    got = []
    listener = socket.create_server((LOOPBACK, 0))

    def mute_server():
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(5)
            try:
                while chunk := sock.recv(65536):
                    got.append(chunk)
            except OSError:
                pass

    threading.Thread(target=mute_server, daemon=True).start()
    upstream = SimpleNamespace(port=listener.getsockname()[1], close=listener.close)

    def talk(port, client):
        with connect(port, client) as sock:
            sock.sendall(b"GET /public HTTP/1.1\r\n" + HOST + b"\r\n")
            return read_to_end(sock)

    answer, end = through(gate, tls, upstream, talk, connect_timeout=0.3)
    why = b"TLS handshake failed: not finished within 0.3 s"
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and why in answer, answer
    assert end == "close_notify"  # the 502 is a clean answer
    [connection_end] = [e for e in gate.events if e.kind.value == "connection_end"]
    assert why.decode() in connection_end.detail
    # The upstream got a ClientHello and nothing after it (no request went).
    sent = b"".join(got)
    assert sent[:1] == b"\x16" and b"\x17\x03\x03" not in sent


def test_plain_http_after_a_client_hello_is_malformed_tls_not_a_certificate_refusal(gate, tls):
    """The ClientHello decided the connection; what follows it is not TLS: the event
    says so (malformed_tls), not "the client refused the gateway's certificate";
    the upstream never hears of it."""
    contexts = tls[0]
    upstream = StrictUpstream(tls[1]["good"], b"", "listen")

    async def scenario():
        door = await tls_door(gate, upstream, contexts)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        writer.write(client_hello(NAME, alpn=["http/1.1"]))
        assert await reader.read(1) == b"\x16"  # the gateway's flight began
        writer.write(b"GET /public HTTP/1.1\r\n" + HOST + b"\r\n")
        await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
        await read_all(reader)
        writer.close()
        await door.stop()
        upstream.close()

    run(scenario())
    denied = [e for e in gate.events if e.kind.value == "connection" and e.verdict.value == "deny"]
    assert [(e.reason.value, e.rule_id) for e in denied] == [
        ("malformed_tls", "builtin:tls-handshake-failed")
    ], [(e.reason.value, e.detail) for e in gate.events]
    assert "is not TLS" in denied[0].detail and "refused" not in denied[0].detail
    assert upstream.heads == [] and requests(gate) == []
