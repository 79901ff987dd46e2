"""Upstream TLS session resumption (proxy/upstream_sessions.py), through mitmproxy's
own TlsConfig against real TLS servers on loopback: resumed where the connection is
the one that verified the session, never elsewhere, and a wrong certificate is still
refused. The servers say themselves whether a handshake resumed."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import connection, options, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.certs import CertStore
from mitmproxy.proxy import context
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons
from OpenSSL import SSL
from sandgate.proxy.gateway_ca import ensure_ec_ca
from sandgate.proxy.upstream_sessions import UpstreamSessionCache, UpstreamSessionResumption
from support.sandbox import eventually

GOOD = "good.test"


def _server_files(tmp_path: Path, name: str, ca_dir: str) -> tuple[Path, Path]:
    """A leaf for `name` signed by the CA in tmp_path/ca_dir (made if missing)."""
    confdir = tmp_path / ca_dir
    ensure_ec_ca(confdir)
    entry = CertStore.from_store(confdir, "mitmproxy", 2048).get_cert(name, [x509.DNSName(name)])
    pem = tmp_path / f"{ca_dir}-{name}.pem"
    key = entry.privatekey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem.write_bytes(entry.cert.to_pem() + key)
    return pem, confdir / "mitmproxy-ca-cert.pem"


class TlsServer:
    """A loopback TLS server answering one request per connection; records, per
    handshake, (SNI, resumed) — or (SNI, error) for a handshake that failed."""

    def __init__(self, cert_pem: Path, max_version: ssl.TLSVersion):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_pem)
        self.ctx.maximum_version = max_version
        self.ctx.sni_callback = self._sni
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.handshakes: list[tuple[str | None, object]] = []
        self._sni_seen: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _sni(self, _sock, name, _ctx):
        self._sni_seen = name

    def _serve(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self._sni_seen = None
            with raw:
                try:
                    conn = self.ctx.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    self.handshakes.append((self._sni_seen, e))
                    continue
                self.handshakes.append((self._sni_seen, conn.session_reused))
                try:
                    conn.recv(4096)  # the request: one small record
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    conn.close()
                except (ssl.SSLError, OSError):
                    pass

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self.sock.close()
        self._thread.join(5)


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def world(request, tmp_path):
    """A good server (a certificate for good.test from the trusted CA), and a server
    with a certificate for good.test from a CA the gateway does not trust."""
    good_pem, trusted_ca = _server_files(tmp_path, GOOD, "trusted")
    rogue_pem, _ = _server_files(tmp_path, GOOD, "rogue")
    good, rogue = TlsServer(good_pem, request.param), TlsServer(rogue_pem, request.param)
    addon = UpstreamSessionResumption()
    config = tlsconfig.TlsConfig()
    with taddons.context(config, addon) as tctx:
        tctx.configure(config, ssl_verify_upstream_trusted_ca=str(trusted_ca))
        yield tctx, config, addon, good, rogue, trusted_ca
    good.close()
    rogue.close()


class Owner(NamedTuple):
    """A connection's task as the engine's `owner_of` gives it (a Sandbox's fields)."""

    task_id: str
    address: str


def fetch(config, addon, address, sni: str, peer: str = "10.0.0.2") -> bytes:
    """One upstream connection as mitmproxy makes it: TlsConfig then our addon in
    tls_start_server, the handshake, a request, the close. Raises SSL.Error if the
    handshake fails (after tls_failed_server, as mitmproxy would)."""
    client = connection.Client(
        peername=(peer, 40000), sockname=address, timestamp_start=time.time()
    )
    client.sni = sni
    ctx = context.Context(client, options.Options())
    server = connection.Server(address=address)
    ctx.server = server
    data = tls.TlsData(server, ctx)
    config.tls_start_server(data)
    addon.tls_start_server(data)
    ssl_conn = data.ssl_conn
    sock = socket.create_connection(address)
    try:
        while True:
            try:
                ssl_conn.do_handshake()
                break
            except SSL.WantReadError:
                _flush(ssl_conn, sock)
                ssl_conn.bio_write(sock.recv(65536) or b"")
            except SSL.Error:
                addon.tls_failed_server(tls.TlsData(server, ctx, ssl_conn))
                raise
        server.timestamp_tls_setup = time.time()
        ssl_conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        _flush(ssl_conn, sock)
        body = b""
        while chunk := sock.recv(65536):
            ssl_conn.bio_write(chunk)
            try:
                body += ssl_conn.recv(65536)
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                break
        return body
    finally:
        sock.close()
        addon.server_disconnected(ServerConnectionHookData(server, client))


def _flush(ssl_conn, sock):
    with contextlib.suppress(SSL.WantReadError):  # nothing to send
        sock.sendall(ssl_conn.bio_read(65536))


def test_second_connection_to_the_same_server_and_name_resumes(world):
    _, config, addon, good, _, _ = world
    for _ in range(3):
        assert fetch(config, addon, good.address, GOOD).endswith(b"ok")
    assert good.handshakes == [(GOOD, False), (GOOD, True), (GOOD, True)]
    assert (addon.full, addon.resumed) == (1, 2)


def test_a_session_is_never_offered_to_another_task(world):
    """Task B's first connection to a server task A reached is a full handshake: a
    shorter, resumed one would tell B (timing it) where A went."""
    _, config, addon, good, _, _ = world
    tasks = {"10.0.0.2": Owner("task-a", "10.0.0.2"), "10.0.0.6": Owner("task-b", "10.0.0.6")}
    addon.owner_of = lambda context: tasks.get(context.client.peername[0])
    fetch(config, addon, good.address, GOOD, peer="10.0.0.2")
    fetch(config, addon, good.address, GOOD, peer="10.0.0.6")
    fetch(config, addon, good.address, GOOD, peer="10.0.0.2")
    fetch(config, addon, good.address, GOOD, peer="10.0.0.6")
    assert good.handshakes == [(GOOD, False), (GOOD, False), (GOOD, True), (GOOD, True)]
    # A later task at B's address (the address given to another run) is another key.
    tasks["10.0.0.6"] = Owner("task-c", "10.0.0.6")
    fetch(config, addon, good.address, GOOD, peer="10.0.0.6")
    assert good.handshakes[-1] == (GOOD, False)


def test_wrong_certificate_is_refused_after_another_name_resumed(world):
    """good.test resumed on this server; then a name the certificate does not cover,
    at the same address, and the same name at another server whose certificate is
    from an untrusted CA: both refused, neither was offered the session."""
    _, config, addon, good, rogue, _ = world
    fetch(config, addon, good.address, GOOD)
    fetch(config, addon, good.address, GOOD)
    assert good.handshakes[-1] == (GOOD, True)

    with pytest.raises(SSL.Error, match="certificate verify failed"):
        fetch(config, addon, good.address, "other.test")
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        fetch(config, addon, rogue.address, GOOD)
    # The servers saw full handshakes (the client aborted on the certificate: a
    # failed or an unresumed handshake there), and nothing was cached from them.
    assert eventually(lambda: len(good.handshakes) == 3 and len(rogue.handshakes) == 1)
    assert good.handshakes[-1][0] == "other.test"
    assert good.handshakes[-1][1] is not True
    assert rogue.handshakes[-1][1] is not True
    assert (addon.full, addon.resumed) == (1, 1)
    # The good name still resumes.
    fetch(config, addon, good.address, GOOD)
    assert good.handshakes[-1] == (GOOD, True)


def test_another_ca_bundle_is_another_key(world, tmp_path):
    """The same CA under another file name is another SSL context: not resumed."""
    tctx, config, addon, good, _, trusted_ca = world
    fetch(config, addon, good.address, GOOD)
    copy = tmp_path / "copy-of-ca.pem"
    shutil.copy(trusted_ca, copy)
    tctx.configure(config, ssl_verify_upstream_trusted_ca=str(copy))
    fetch(config, addon, good.address, GOOD)
    assert [resumed for _, resumed in good.handshakes] == [False, False]


def test_a_session_older_than_the_lifetime_is_not_offered(world):
    _, config, addon, good, _, _ = world
    now = [1000.0]
    addon.cache = UpstreamSessionCache(max_age_s=60, clock=lambda: now[0])
    fetch(config, addon, good.address, GOOD)
    now[0] += 30
    fetch(config, addon, good.address, GOOD)  # resumed, renewed (TLS 1.3: new ticket)
    now[0] += 31  # 61 s after the full handshake: re-verify, although renewed at 30 s
    fetch(config, addon, good.address, GOOD)
    assert [resumed for _, resumed in good.handshakes] == [False, True, False]


def test_cache_takes_each_session_once_and_stays_bounded():
    now = [0.0]
    cache = UpstreamSessionCache(max_keys=2, per_key=2, max_age_s=10, clock=lambda: now[0])
    s1, s2, s3 = SSL.Session(), SSL.Session(), SSL.Session()
    cache.put("a", s1, 0.0)
    cache.put("a", s2, 0.0)
    cache.put("a", s3, 0.0)  # per_key 2: s1 out
    assert cache.take("a").session is s3
    assert cache.take("a").session is s2
    assert cache.take("a") is None
    cache.put("a", s1, 0.0)
    cache.put("b", s1, 0.0)
    cache.put("c", s1, 0.0)  # max_keys 2: "a" (least recently used) out
    assert cache.take("a") is None
    assert len(cache) == 2
    now[0] = 10.0
    assert cache.take("b") is None  # too old
    cache.put("d", s1, 0.0)  # too old to keep
    assert cache.take("d") is None
