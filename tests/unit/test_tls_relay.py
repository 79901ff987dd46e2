"""Inspected HTTPS/1.1 in the front door (proxy/frontdoor/tls_relay.py,
tls_contexts.py): on loopback with a TLS upstream of a test CA, mitmproxy never
asked; and the TLS adapter's want-read / want-write handling against a fake socket."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import random
import socket
import ssl
from types import SimpleNamespace

import pytest
from sandgate.proxy.clienthello import parse_client_hello
from sandgate.proxy.frontdoor.tls_contexts import TlsContexts, _leaf_certificate
from sandgate.proxy.frontdoor.tls_relay import http1_hello
from support.fakes import client_hello, make_gate
from test_frontdoor import (
    LOOPBACK,
    Upstream,
    connection_objects,
    read_all,
    run,
    started,
    until,
)

API = ("203.0.113.11", 443)  # api.allowed.test: GET only (inspected)
NAME = "api.allowed.test"


@pytest.fixture
def gate(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK)
    yield gate
    assert (gate.counts.open, gate.counts.pending) == (0, 0)


def _ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pem(key, cert) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    return (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


@pytest.fixture
def tls(tmp_path):
    """The upstream's CA (trusted by the gateway), a server context for NAME signed
    by it, one signed by another CA (a wrong certificate), and the gateway's
    contexts; `client` trusts the gateway CA."""
    trusted_key, trusted = _ca("upstream test CA")
    other_key, other = _ca("nobody's CA")
    upstream_ca = tmp_path / "upstream-ca.pem"
    upstream_ca.write_bytes(_pem(trusted_key, trusted)[1])
    servers = {}
    for label, (key, ca) in {"good": (trusted_key, trusted), "wrong": (other_key, other)}.items():
        # A leaf with the CA's own key, as mitmproxy's: enough for a test server.
        leaf = _leaf_certificate(key, ca, (NAME,))
        key_pem, leaf_pem = _pem(key, leaf)
        path = tmp_path / f"{label}.pem"
        path.write_bytes(key_pem + leaf_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(path)
        servers[label] = context
    contexts = TlsContexts(tmp_path / "confdir", upstream_ca)
    contexts.for_client(("warm.test",), "warm")  # makes the gateway CA (gateway_ca.ensure_ec_ca)
    client = ssl.create_default_context(cafile=str(tmp_path / "confdir" / "mitmproxy-ca-cert.pem"))
    client.set_alpn_protocols(["h2", "http/1.1"])
    return contexts, servers, client


async def tls_upstream(handler, context) -> Upstream:
    """test_frontdoor's Upstream, speaking TLS with `context`; the caller closes it."""
    upstream = Upstream(handler)

    async def serve(reader, writer):
        upstream.connections += 1
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    upstream.server = await asyncio.start_server(serve, LOOPBACK, 0, ssl=context)
    upstream.port = upstream.server.sockets[0].getsockname()[1]
    return upstream


async def never(sock, state):
    raise AssertionError("inspected HTTPS/1.1 was handed to mitmproxy")


async def tls_door(gate, upstream, contexts, **options):
    return await started(
        gate,
        API,
        upstream.port,
        hand_off=never,
        plain_http=lambda state: True,
        tls_contexts=contexts,
        **options,
    )


async def through_door(gate, tls, server, certificate: str):
    """A TLS upstream playing `server` with the `certificate` context of `tls`, a
    door before it and a client connected through it (offering h2 and http/1.1)."""
    contexts, servers, client = tls
    upstream = await tls_upstream(server, servers[certificate])
    door = await tls_door(gate, upstream, contexts)
    reader, writer = await asyncio.open_connection(
        LOOPBACK, door.port, ssl=client, server_hostname=NAME
    )
    return upstream, door, reader, writer


def one_answer(gate, tls, server, certificate: str, request: bytes) -> bytes:
    """What the client gets for `request` through the door (see `through_door`),
    read to the end, once the connection's end event is out."""
    answers = []

    async def scenario():
        upstream, door, reader, writer = await through_door(gate, tls, server, certificate)
        writer.write(request)
        answers.append(await read_all(reader))
        writer.close()
        await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
        await door.stop()
        upstream.server.close()

    run(scenario())
    return answers[0]


def requests(gate) -> list[tuple]:
    return [
        (e.verdict.value, e.reason.value, e.protocol, e.method, e.path)
        for e in gate.events
        if e.kind.value == "request"
    ]


def test_inspected_https_is_decided_request_by_request_in_the_front_door(gate, tls):
    seen = []

    async def server(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n")[0])
            body = b"x" * 100000
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    async def scenario():
        upstream, door, reader, writer = await through_door(gate, tls, server, "good")
        # Offered h2 and http/1.1: HTTP/1.1 here (mitmproxy would pick h2).
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        host = b"Host: api.allowed.test\r\n"
        writer.write(b"GET /1 HTTP/1.1\r\n" + host + b"\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
        assert await reader.readexactly(100000) == b"x" * 100000
        writer.write(b"POST /2 HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n")
        rest = await read_all(reader)
        assert rest.startswith(b"HTTP/1.1 403 "), rest[:200]
        assert b"https://api.allowed.test/2" in rest
        writer.close()
        await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
        await door.stop()
        upstream.server.close()

    run(scenario())
    assert seen == [b"GET /1 HTTP/1.1"]  # the POST never went upstream
    assert requests(gate) == [
        ("allow", "rule_allow", "https", "GET", "/1"),
        ("deny", "method_not_allowed", "https", "POST", "/2"),
    ]


def test_an_inspected_connection_is_freed_at_its_end_not_left_to_the_collector(gate, tls):
    """As test_frontdoor's plain ones: at its end the inspected connection's objects
    (the door's connection, its TLS relay and ends, the gate's state) are freed by
    their counts, not left as cycles to the collector."""

    async def server(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    async def scenario():
        gc.collect()
        gc.disable()
        before = connection_objects()  # alive before: not this test's
        try:
            upstream, door, reader, writer = await through_door(gate, tls, server, "good")
            writer.write(b"GET /1 HTTP/1.1\r\nHost: api.allowed.test\r\nConnection: close\r\n\r\n")
            assert (await read_all(reader)).endswith(b"hi")
            writer.close()
            await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
            await asyncio.sleep(0.05)  # the relay's last callbacks have run
            left = connection_objects() - before
        finally:
            gc.enable()
        await door.stop()
        upstream.server.close()
        return left

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == set()
    assert requests(gate) == [("allow", "rule_allow", "https", "GET", "/1")]


def test_an_upstream_that_closes_after_each_response_serves_the_next_request_anew(gate, tls):
    """HTTP/1.0 answers and the server's close in the same read as the data (as
    Python's http.server, git's smart HTTP in test_policy_content): the next request,
    one with a body, goes on a new upstream connection, which may get the closed
    one's descriptor; the old end must not be read as the new one's."""

    async def server(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if b"Content-Length: 4" in head:
            await reader.readexactly(4)
        line = head.split(b"\r\n")[0]
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(line) + line)
        await writer.drain()

    async def scenario():
        upstream, door, reader, writer = await through_door(gate, tls, server, "good")
        host = b"Host: api.allowed.test\r\n"
        answers = []
        for _ in range(3):
            writer.write(b"GET /public HTTP/1.1\r\n" + host + b"Content-Length: 4\r\n\r\nbody")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append((head.split(b"\r\n")[0], await reader.readexactly(length)))
        writer.close()
        await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
        await door.stop()
        upstream.server.close()
        assert upstream.connections == 3
        return answers

    answers = []

    async def collect():
        answers.extend(await scenario())

    run(collect())
    assert answers == [(b"HTTP/1.1 200 OK", b"GET /public HTTP/1.1")] * 3
    end = [e for e in gate.events if e.kind.value == "connection_end"][0]
    assert "could not be parsed" not in (end.detail or "")


def test_an_upstream_with_a_wrong_certificate_gets_no_request_and_the_client_a_502(gate, tls):
    got = []

    async def server(reader, writer):
        got.append(await reader.read(1000))

    request = b"GET /secret HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n"
    answer = one_answer(gate, tls, server, "wrong", request)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer[:300]
    assert b"certificate verify failed" in answer
    assert b"/secret" not in b"".join(got)  # the handshake failed: no request reached it
    end = [e for e in gate.events if e.kind.value == "connection_end"][0]
    assert "certificate verify failed" in end.detail


def test_a_client_that_refuses_the_gateways_certificate_is_a_tls_rejected_event(gate, tls):
    contexts, servers, _ = tls
    distrusting = ssl.create_default_context()  # the system's CAs: not the gateway's

    async def scenario():
        async with Upstream(lambda r, w: asyncio.sleep(0)) as upstream:
            door = await tls_door(gate, upstream, contexts)
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection(
                    LOOPBACK, door.port, ssl=distrusting, server_hostname=NAME
                )
            await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
            await door.stop()
            assert upstream.connections == 0

    run(scenario())
    rejected = [e for e in gate.events if e.reason.value == "tls_rejected_by_client"]
    assert len(rejected) == 1 and NAME in rejected[0].detail


def test_only_clients_that_can_speak_http_1_1_are_served_here():
    def decided(data):
        """A connection state as the gate leaves it after these first bytes."""
        hello = parse_client_hello(data) if len(data) > 5 else None
        return SimpleNamespace(client_hello=hello, name=NAME)

    def hello(alpn):
        return client_hello(NAME, alpn=alpn)

    assert http1_hello(decided(hello(None))).sni == NAME
    assert http1_hello(decided(hello(["h2", "http/1.1"]))).alpn == (b"h2", b"http/1.1")
    assert http1_hello(decided(hello(["h2"]))) is None  # to mitmproxy
    assert http1_hello(decided(b"\x16\x03\x01\x00")) is None  # not even a whole hello


def test_a_client_whose_handshake_stalls_is_a_tls_rejected_event_naming_the_stall(gate, tls):
    """The ClientHello, then nothing (a client that stopped at the gateway's
    certificate without an alert): closed at the first-bytes deadline with its own
    event, not the generic "nothing decidable"; the upstream never hears of it."""
    contexts, _, _ = tls

    async def scenario():
        async with Upstream(lambda r, w: asyncio.sleep(0)) as upstream:
            door = await tls_door(gate, upstream, contexts, first_bytes_timeout=0.3)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(client_hello(NAME, alpn=["http/1.1"]))
            flight = await reader.read(1)  # the gateway's ServerHello began: it decided
            await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
            rest = await read_all(reader)
            writer.close()
            await door.stop()
            assert upstream.connections == 0
            return flight, rest

    answers = []

    async def collect():
        answers.append(await scenario())

    run(collect())
    [(flight, rest)] = answers
    assert flight == b"\x16"  # a handshake record
    assert rest in (b"<reset>", b"") or rest.startswith(b"\x14") or rest[:1] in (b"\x16", b"\x17")
    rejected = [e for e in gate.events if e.reason.value == "tls_rejected_by_client"]
    assert len(rejected) == 1, [(e.kind.value, e.reason.value, e.detail) for e in gate.events]
    assert "the handshake stalled: not finished within 0.3 s" in rejected[0].detail
    end = [e for e in gate.events if e.kind.value == "connection_end"][0]
    assert "stalled" in end.detail and "nothing decidable" not in end.detail
    assert requests(gate) == []


def test_a_new_upstream_connection_resumes_the_verified_session_of_the_same_name_and_address(
    gate, tls
):
    """The upstream closes after each answer, so each request needs a new upstream
    TLS connection: the second resumes the first's session (no certificate sent
    again; it was verified when made). A handshake that failed verification keeps
    no session."""
    contexts = tls[0]
    reused = []

    async def server(reader, writer):
        reused.append(writer.get_extra_info("ssl_object").session_reused)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def scenario(certificate):
        upstream, door, reader, writer = await through_door(gate, tls, server, certificate)
        answers = []
        for _ in range(2):
            writer.write(b"GET /public HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            answers.append(head.split(b"\r\n")[0])
            if not head.startswith(b"HTTP/1.1 200"):
                break
            await reader.readexactly(2)
        writer.close()
        await door.stop()
        upstream.server.close()
        return answers

    results = []

    async def collect():
        results.append(await scenario("wrong"))
        results.append(len(contexts._sessions))
        results.append(await scenario("good"))

    run(collect())
    wrong, kept_after_failure, good = results
    assert wrong == [b"HTTP/1.1 502 Bad Gateway"]
    assert kept_after_failure == 0
    assert good == [b"HTTP/1.1 200 OK"] * 2
    assert reused[-2:] == [False, True]


def test_a_response_that_ends_with_the_upstreams_close_reaches_the_client_whole(gate, tls):
    """No length: the body ends where the server closes (its close_notify, read as
    the end by the TLS core; a bare FIN after data is test_tls_io's)."""

    async def server(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"until-close " * 1000)
        await writer.drain()

    request = b"GET /public HTTP/1.1\r\nHost: api.allowed.test\r\nConnection: close\r\n\r\n"
    answer = one_answer(gate, tls, server, "good", request)
    head, _, chunked = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"chunked" in head, answer[:200]
    body = b""
    while True:  # h11 framed the close-delimited body in chunks for the client
        size, _, chunked = chunked.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        body, chunked = body + chunked[: int(size, 16)], chunked[int(size, 16) + 2 :]
    assert body == b"until-close " * 1000 and chunked == b"\r\n"


def test_large_bodies_reach_a_slow_client_byte_for_byte_on_one_connection(gate, tls):
    """The relay hands its reads to the session and encrypts views of what it owes
    (no copies): bodies of random bytes, two on one kept-alive connection, to a
    client with a small receive buffer that reads slowly at first (some of the
    gateway's sends fall short and their ciphertext waits), arrive exactly as the
    server sent them. (Which read the session keeps as it is: test_http1.py.)"""
    bodies = [random.randbytes(6_000_000 + 4321), random.randbytes(1_500_000 + 17)]

    async def server(reader, writer):
        for body in bodies:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        await reader.read()

    async def scenario():
        contexts, servers, client = tls
        upstream = await tls_upstream(server, servers["good"])
        door = await tls_door(gate, upstream, contexts)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, door.port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=client, server_hostname=NAME)
        for n, body in enumerate(bodies):
            writer.write(b"GET /public/%d HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n" % n)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK"), head
            got = bytearray()
            while len(got) < len(body):
                got += await reader.read(min(32768, len(body) - len(got)))
                if len(got) < 5_000_000:
                    await asyncio.sleep(0.001)  # slow at first
            assert got == body, f"body {n} differs first at {_first_difference(got, body)}"
        writer.close()
        await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
        await door.stop()
        upstream.server.close()
        assert upstream.connections == 1

    run(scenario())
    assert [r[:2] for r in requests(gate)] == [("allow", "rule_allow")] * 2


def _first_difference(got: bytes, want: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(got))
