"""Adversarial review of inspected HTTPS/1.1 in the front door (tls_relay.py,
tls_contexts.py), on loopback: handshake abuse, names, truncation, resources.
Each attack also proves its effect did not happen (what the upstream got)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading

import pytest
import test_tls_relay
from support.fakes import client_hello
from test_frontdoor import LOOPBACK, Upstream, read_all, run, until
from test_tls_relay import NAME, tls_door, tls_upstream

gate, tls = test_tls_relay.gate, test_tls_relay.tls  # its fixtures

HOST = b"Host: api.allowed.test\r\n"


def ends(gate_) -> list:
    return [e for e in gate_.events if e.kind.value == "connection_end"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def blocking_client(port: int, context: ssl.SSLContext, sni: str | None) -> ssl.SSLSocket:
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    return context.wrap_socket(sock, server_hostname=sni)


def fetch(port: int, context: ssl.SSLContext, sni: str | None, request: bytes) -> bytes:
    """`request` through the door; all the answer until the door closes."""
    with blocking_client(port, context, sni) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def exchange(gate_, contexts, handler, server: ssl.SSLContext, talk):
    """A TLS upstream (`handler`, `server`), the door before it, `talk(port)` in a
    thread; its answer once the connection's end is reported."""
    answers = []

    async def scenario():
        upstream = await tls_upstream(handler, server)
        door = await tls_door(gate_, upstream, contexts)
        answers.append(await asyncio.to_thread(talk, door.port))
        await until(lambda: ends(gate_))
        await door.stop()
        upstream.server.close()

    run(scenario())
    return answers[0]


def test_a_client_stalling_mid_handshake_is_closed_at_the_deadline_with_its_end(gate, tls):
    contexts, _, _ = tls

    async def scenario():
        async with Upstream(lambda r, w: asyncio.sleep(0)) as upstream:
            door = await tls_door(gate, upstream, contexts)
            door.first_bytes_timeout = 0.5
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(client_hello(NAME, ["http/1.1"]))  # then nothing: no Finished
            await until(lambda: ends(gate), timeout=5)
            # Closed by the gateway: the read ends (the server's flight, then EOF).
            assert (await read_all(reader))[:1] in (b"\x16", b"<")
            writer.close()
            await door.stop()
            assert upstream.connections == 0

    run(scenario())
    [end] = ends(gate)
    assert "within 0.5 s" in end.detail


def test_a_thousand_aborted_handshakes_leave_no_descriptor_or_connection_behind(gate, tls):
    contexts, _, _ = tls
    hello = client_hello(NAME, ["http/1.1"])

    async def scenario():
        async with Upstream(lambda r, w: asyncio.sleep(0)) as upstream:
            door = await tls_door(gate, upstream, contexts)
            baseline = open_fds()
            for i in range(1000):
                reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
                # Half send a ClientHello and vanish; half add garbage first.
                writer.write(hello if i % 2 else hello + b"\x17\x03\x03\x00\x05junk!")
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                writer.close()
            await until(lambda: len(ends(gate)) == 1000, timeout=30)
            await until(lambda: open_fds() <= baseline, timeout=5)
            await door.stop()
            assert upstream.connections == 0

    run(scenario())
    assert (gate.counts.open, gate.counts.pending) == (0, 0)


@pytest.mark.parametrize("sni", ["API.Allowed.Test", "api.allowed.test."])
def test_the_upstream_is_named_and_verified_as_the_decided_name(gate, tls, sni):
    """mitmproxy's path sends the gate's normalised name (addon: client.sni = state.name)
    as SNI and verifies the upstream for it; so must this path."""
    contexts, servers, _ = tls
    seen_sni = []
    server = servers["good"]
    server.sni_callback = lambda sock, name, ctx: seen_sni.append(name)

    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE

    request = b"GET /x HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    answer = exchange(
        gate, contexts, handler, server, lambda port: fetch(port, client, sni, request)
    )
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    assert seen_sni == [NAME]


def test_a_client_cut_mid_body_without_close_notify_never_completes_the_body_upstream(gate, tls):
    """A chunked body cut by a TCP close (no close_notify): the upstream must not get
    a body that reads as whole (no last chunk), nor a request that answers."""
    contexts, servers, client = tls
    got = bytearray()

    async def handler(reader, writer):
        try:
            while chunk := await reader.read(65536):
                got.extend(chunk)
        except (ConnectionError, ssl.SSLError):
            got.extend(b"<reset>")

    client = ssl.create_default_context(cafile=contexts.confdir / "mitmproxy-ca-cert.pem")

    def talk(port, body):
        s = blocking_client(port, client, NAME)
        s.sendall(b"GET /x HTTP/1.1\r\n" + HOST + body)
        threading.Event().wait(0.3)
        s.shutdown(socket.SHUT_RDWR)  # SSLSocket.shutdown: no close_notify
        s.close()

    async def scenario():
        upstream = await tls_upstream(handler, servers["good"])
        door = await tls_door(gate, upstream, contexts)
        await asyncio.to_thread(
            talk, door.port, b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await until(lambda: ends(gate))
        await asyncio.sleep(0.3)
        await door.stop()
        upstream.server.close()

    run(scenario())
    assert b"hello" in got  # it was relayed as it came ...
    assert not got.rstrip(b"<reset>").endswith(b"0\r\n\r\n")  # ... never completed


def _server_context(tmp_path, key, issuer, names, days=(1, 30), label="leaf"):
    """A server context whose leaf (with `key`) names `names`, issued by `issuer`
    (key, cert; the leaf's own subject when None: self-signed), valid `days`
    (before, after) around now; negative `after`: expired."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    from test_tls_relay import _pem

    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(issuer_key, hashes.SHA256())
    )
    path = tmp_path / f"{label}.pem"
    path.write_bytes(b"".join(_pem(key, leaf)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(path)
    return context


@pytest.mark.parametrize(
    "case",
    [
        "valid",
        "wrong_name",
        "self_signed",
        "expired",
        "not_yet_valid",
        "unknown_ca",
        "no_sni_to_ip",
    ],
)
def test_an_upstream_that_fails_verification_never_gets_the_request_nor_the_client_its_bytes(
    gate, tls, tmp_path, case
):
    from cryptography.hazmat.primitives.asymmetric import ec
    from test_tls_relay import _ca

    contexts, _, _ = tls
    trusted_key, trusted = _ca("trusted")
    contexts.upstream_ca.write_bytes(_pem_cert(trusted))
    contexts._upstream.clear()
    key = ec.generate_private_key(ec.SECP256R1())
    issuer, names, days, sni = (trusted_key, trusted), (NAME,), (1, 30), NAME
    if case == "wrong_name":
        names = ("other.allowed.test",)
    elif case == "self_signed":
        issuer = None
    elif case == "expired":
        days = (30, -1)
    elif case == "not_yet_valid":
        days = (-1, 30)
    elif case == "unknown_ca":
        issuer = _ca("nobody's")
    elif case == "no_sni_to_ip":
        sni = None  # verified against the destination's address: a name-only leaf fails
    server = _server_context(tmp_path, key, issuer, names, days)
    got = []

    async def handler(reader, writer):
        got.append(await reader.read(1000))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nSECRET")
        await writer.drain()

    client = ssl.create_default_context(cafile=contexts.confdir / "mitmproxy-ca-cert.pem")
    client.check_hostname = sni is not None

    if sni is None:
        # No SNI: the gate allows it only by an IP rule, as inspected.
        from support.fakes import make_gate

        gate.policy = make_gate(tmp_path, rules=_IP_RULES, sandbox=LOOPBACK).policy
    request = b"GET /x HTTP/1.1\r\n" + HOST + b"\r\n"
    answer = exchange(
        gate, contexts, handler, server, lambda port: fetch(port, client, sni, request)
    )
    if case == "valid":  # the control: the same server with a good certificate answers
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"SECRET"), answer
        return
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"SECRET" not in answer
    assert not any(b"/x" in g for g in got)  # the request never reached it
    [end] = ends(gate)
    assert "TLS handshake failed" in end.detail, end.detail


_IP_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: 203.0.113.11
        methods: [GET]
        id: api-ip-get
"""


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_a_client_offering_only_tls_1_0_or_1_1_is_refused_before_any_upstream(gate, tls, version):
    contexts, _, _ = tls
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = old.maximum_version = getattr(ssl.TLSVersion, version)
    except (ssl.SSLError, ValueError):
        pytest.skip(f"this OpenSSL cannot offer {version}")
    failed = []

    def talk(port):
        try:
            blocking_client(port, old, NAME).close()
        except (ssl.SSLError, OSError) as e:
            failed.append(e)

    async def scenario():
        async with Upstream(lambda r, w: asyncio.sleep(0)) as upstream:
            door = await tls_door(gate, upstream, contexts)
            await asyncio.to_thread(talk, door.port)
            await until(lambda: ends(gate))
            await door.stop()
            assert upstream.connections == 0

    run(scenario())
    assert failed, "the handshake succeeded"
    # Not a refusal of the certificate: the gateway does not speak the client's TLS.
    refused = [e for e in gate.events if e.kind.value == "connection" and e.verdict.value == "deny"]
    assert [(e.reason.value, e.rule_id) for e in refused] == [
        ("protocol_not_allowed", "builtin:tls-handshake-failed")
    ], [(e.kind.value, e.reason.value, e.detail) for e in gate.events]
    assert "no TLS version or cipher in common" in refused[0].detail


def test_a_close_delimited_body_cut_without_close_notify_never_looks_complete(gate, tls):
    """An HTTP/1.0 body ends with the connection; only close_notify says it is whole.
    An upstream connection cut by a bare TCP close (an on-path FIN, a crash) must not
    become a complete response (here: re-framed chunked, with its last chunk)."""
    contexts, servers, _ = tls

    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"first half of the body")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # TCP closed, no close_notify

    client = ssl.create_default_context(cafile=contexts.confdir / "mitmproxy-ca-cert.pem")
    got = []

    def talk(port):
        with blocking_client(port, client, NAME) as s:
            s.sendall(b"GET /x HTTP/1.1\r\n" + HOST + b"\r\n")
            data = b""
            try:
                while chunk := s.recv(4096):
                    data += chunk
                    if data.endswith(b"0\r\n\r\n"):
                        break
            except OSError:
                pass
            got.append(data)

    async def scenario():
        upstream = await tls_upstream(handler, servers["good"])
        door = await tls_door(gate, upstream, contexts)
        await asyncio.to_thread(talk, door.port)
        await door.stop()
        upstream.server.close()

    run(scenario())
    [data] = got
    assert b"first half of the body" in data  # relayed as it came ...
    assert not data.endswith(b"0\r\n\r\n"), data  # ... never completed
