"""mitmproxy embedded in the gateway's event loop, with only the addons sandgate needs,
imported and started only when something needs it.

mitmproxy listens on no port: the front door (proxy/frontdoor/) accepts every
sandbox connection and hands `serve` the sockets that need HTTP (plain HTTP, and
TLS that a rule inspects). `serve` runs them through a transparent-mode server
instance that is never started, so mitmproxy still reads the original destination
from the socket (SO_ORIGINAL_DST) and builds the same layers as when it listened.

Most tasks only ever pass TLS through, which the front door relays itself: for
them mitmproxy is dead weight, about half of a task's start (importing it) and
most of the gateway's memory. So nothing here imports mitmproxy at module level;
`start` does, in a worker thread (the loop keeps relaying while the import runs),
either up front, when the policy inspects, or on the first connection handed over.

The default addon set dispatches every hook to ~30 addons; trimmed to what the
transparent data path uses, the connection rate roughly doubles. Options exist only
once the addon that declares them is added, so options are set after `add`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Protocol

log = logging.getLogger("sandgate.engine")


class ByteCounts(Protocol):
    bytes_up: int  # read from the client
    bytes_down: int  # written to the client


def _count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: ByteCounts) -> None:
    """Make what mitmproxy reads from the client add to `counts.bytes_up`, what it
    writes to `counts.bytes_down`. The stream objects stay what they are (mitmproxy
    checks their type): only these two methods of these two instances change."""
    read, write = reader.read, writer.write

    async def counted_read(n: int = -1) -> bytes:
        data = await read(n)
        counts.bytes_up += len(data)
        return data

    def counted_write(data: bytes) -> None:
        counts.bytes_down += len(data)
        write(data)

    reader.read, writer.write = counted_read, counted_write


def _import_mitmproxy():
    """The mitmproxy pieces the engine uses, and sandgate's addon class (which
    imports mitmproxy too)."""
    import sandgate.proxy.lean_mitmproxy  # noqa: F401 - must come before any mitmproxy import
    from mitmproxy import options
    from mitmproxy.addons import core, disable_h2c, proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.proxy.mode_servers import ServerInstance

    from sandgate.proxy.addon import SandgateAddon
    from sandgate.proxy.lean_mitmproxy import (
        dispatch_hooks_directly,
        drop_per_request_checks,
        lighter_forks,
        lighter_lookups,
        parse_client_hellos_lean,
        reuse_leaf_objects,
        run_hooks_inline,
        unblock_unhandled_hooks,
    )
    from sandgate.proxy.upstream_sessions import UpstreamSessionResumption

    drop_per_request_checks()
    dispatch_hooks_directly()
    lighter_lookups()
    reuse_leaf_objects()
    run_hooks_inline()
    parse_client_hellos_lean()
    lighter_forks()
    return (
        options,
        (core, disable_h2c, proxyserver, tlsconfig),
        Master,
        ServerInstance,
        (SandgateAddon, UpstreamSessionResumption),
        unblock_unhandled_hooks,
    )


CA_BASENAME = "mitmproxy"  # mitmproxy's file names in confdir: mitmproxy-ca.pem, ...


def ensure_ec_ca(confdir: Path) -> bool:
    """Make the gateway's CA with an EC P-256 key, unless confdir has a CA already
    (an older RSA one is kept: sandboxes and admins may trust it). True if made.

    mitmproxy signs every leaf certificate with the CA's key and serves it as the
    leaf's key too, so the key type is what each intercepted handshake signs with:
    ECDSA P-256 takes ~0.05 ms where mitmproxy's default RSA-2048 takes ~1 ms, and
    its certificates are smaller. Files as mitmproxy's `CertStore.create_store`
    writes them (key + certificate; the certificate alone for the sandboxes)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    from mitmproxy.certs import CA_EXPIRY, CertStore

    ca_file = confdir / f"{CA_BASENAME}-ca.pem"
    if ca_file.exists():
        return False
    confdir.mkdir(parents=True, exist_ok=True)
    # mitmproxy's `create_ca`, with an EC key.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_BASENAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_BASENAME),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(name)
        .issuer_name(name)
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + CA_EXPIRY)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with CertStore.umask_secret():
        partial = ca_file.with_suffix(".pem.partial")
        partial.write_bytes(pem_key + pem_cert)
        (confdir / f"{CA_BASENAME}-ca-cert.pem").write_bytes(pem_cert)
        partial.rename(ca_file)  # last: a half-written CA is never taken for one
    return True


def settle_gc() -> None:
    """Once mitmproxy is imported and started, everything alive (its ~200k import-time
    objects above all) is moved out of the generations the cyclic GC collects.

    Every inspected connection leaves its layers, flows and generators behind as
    cycles (a layer and its context point at each other), so the collector runs
    every few connections, and each full collection walked all of mitmproxy's
    objects again (in-process: 30-60 us per connection, ~10 after). Frozen objects
    are never collected; these live as long as the process. policy/load.py freezes
    a loaded policy alike. (A higher threshold for the young generation was measured
    too and gave nothing: most of the GC's time is freeing the connections' cycles.)"""
    import gc

    gc.freeze()


class ProxyEngine:
    """One mitmproxy instance in transparent mode, serving the sockets it is handed.

    `gate` is what the addon applies (proxy/gate.py); `started()` imports and starts
    mitmproxy once, whoever asks first; `serve` asks."""

    def __init__(
        self, gate, confdir: Path, upstream_ca: Path | None = None, addon_args: tuple = ()
    ):
        self.gate = gate
        self.addon_args = addon_args  # SandgateAddon's after the gate: approvals, resolve
        self.confdir = confdir
        self.upstream_ca = upstream_ca
        self.addon = None  # the SandgateAddon, once started
        self.master = None
        self._server = None
        self._task: asyncio.Task | None = None
        self._starting: asyncio.Future | None = None

    async def started(self) -> None:
        """Import and start mitmproxy unless done already; raises what made it fail
        (every later caller gets the same failure: it is not retried)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        (
            options,
            (core, disable_h2c, proxyserver, tlsconfig),
            Master,
            ServerInstance,
            (Addon, UpstreamSessions),
            unblock_unhandled_hooks,
        ) = await asyncio.to_thread(_import_mitmproxy)
        await asyncio.to_thread(ensure_ec_ca, self.confdir)
        self.addon = Addon(self.gate, *self.addon_args)
        opts = options.Options()
        master = Master(opts)
        # No NextLayer addon: sandgate's addon is the only one that picks a layer, so
        # a connection it has not decided on yet (half a ClientHello) waits, and
        # cannot be given a layer by anyone else.
        master.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            self.addon,
            tlsconfig.TlsConfig(),
            # After TlsConfig: it offers a cached session to the upstream connection
            # TlsConfig has just made (proxy/upstream_sessions.py).
            UpstreamSessions(),
            disable_h2c.DisableH2C(),
        )
        unblock_unhandled_hooks(master.addons)  # the addon set is final
        update = {
            # No listener: connections come from the front door, through `serve`.
            "mode": [],
            # Lazy: never open an upstream connection before the policy allowed it.
            "connection_strategy": "lazy",
            "confdir": str(self.confdir),
            # Bodies of inspected requests stream through instead of being buffered.
            "stream_large_bodies": "1m",
            # A 101 to a request no websocket rule allowed is cut by the addon; were
            # it not, it must never become a raw TCP tunnel.
            "rawtcp": False,
        }
        if self.upstream_ca is not None:
            update["ssl_verify_upstream_trusted_ca"] = str(self.upstream_ca)
        opts.update(**update)
        self.master = master
        ps = master.addons.get("proxyserver")
        self._server = ServerInstance.make("transparent", ps)
        self._task = asyncio.create_task(master.run(), name="mitmproxy")
        # run() sets up (no) servers, then fires `running`; wait for that, or a failure.
        while not ps.is_running and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done():
            await self._shut_down()
            raise RuntimeError("mitmproxy did not start (see the log above)")
        settle_gc()
        log.info("mitmproxy started")

    async def serve(self, sock: socket.socket, counts: ByteCounts | None = None) -> None:
        """Serve one accepted, redirected client socket to its end; takes it over.
        The client's bytes are added to `counts` (its ConnState), as the front
        door's relay counts pass-through ones."""
        try:
            await self.started()
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        if counts is not None:
            _count(reader, writer, counts)
        await self._server.handle_stream(reader, writer)

    @property
    def ca_ready(self) -> bool:
        """The CA (key and certificate) exists from an earlier start: a task can be given
        its certificate before mitmproxy runs, and mitmproxy will load the same one."""
        return (self.confdir / "mitmproxy-ca.pem").is_file() and self.ca_cert.is_file()

    @property
    def ca_cert(self) -> Path:
        """The gateway CA's certificate (PEM), generated in confdir on first start."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    async def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            # An import cannot be interrupted; let it finish, then shut down.
            await asyncio.wait([self._starting])
        await self._shut_down()

    async def _shut_down(self) -> None:
        if self.master is None:
            return
        self.master.shutdown()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        self.master = None
