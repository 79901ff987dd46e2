"""What inspecting a byte of TLS costs at least: one decryption (the upstream's
record) and one encryption (the client's), through Python's ssl over memory BIOs as
the front door's TLS relay does them (proxy/frontdoor/tls_io.py), on this CPU.

    .venv/bin/python bench/floor_tls.py        # ~1 s: the suite and ms a MB

bench_gateway.py puts it beside what inspection adds to a bulk download's time a MB
(inspected against pass-through): an inspecting relay of one stream cannot hand a
byte on before it decrypted it, nor the client read it before it was encrypted
again, so what of this work the other stages (the server's encryption, the client's
decryption, the kernel's copies) do not hide adds to the transfer
(docs/performance.md, "Session 42"). Not a test: it asserts nothing."""

from __future__ import annotations

import contextlib
import ssl
import tempfile
import time
from pathlib import Path

from sandgate.proxy.frontdoor.tls_io import WRITE_MAX  # plaintext encrypted a send


def _pair() -> tuple[ssl.SSLObject, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A handshaken server and client over memory BIOs; the server's context as the
    gateway's leaf contexts are made (tls_contexts.py: its own suite order first), the
    client's OpenSSL's defaults, as curl's and the gateway's upstream side are."""
    from sandgate.enforcer.demo.fakenet import _make_certs

    with tempfile.TemporaryDirectory(prefix="sg-floor-tls-") as work:
        ca, cert, key = _make_certs(Path(work))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cafile=str(ca))
    to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_out, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, server_out, server_side=True)
    client = client_ctx.wrap_bio(to_client, client_out, server_hostname="allowed.test")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        to_server.write(client_out.read())
        to_client.write(server_out.read())
    client.do_handshake()
    return server, client, server_out, to_client


def measure(seconds: float = 0.5) -> dict:
    """{"suite": ..., "ms_per_mb": ...}: a MB (10^6 bytes) encrypted by one side and
    decrypted by the other, best of three runs of `seconds`."""
    server, client, server_out, to_client = _pair()
    plain = bytes(WRITE_MAX)
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    best = None
    for _ in range(3):
        moved, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            server.write(plain)
            to_client.write(server_out.read())
            while to_client.pending or client.pending():
                try:
                    moved += client.read(len(buffer), view)
                except ssl.SSLWantReadError:
                    break
        per_mb = elapsed * 1e3 / (moved / 1e6)
        best = per_mb if best is None else min(best, per_mb)
    return {"suite": client.cipher()[0], "ms_per_mb": best}


if __name__ == "__main__":
    result = measure()
    print(f"{result['suite']}: {result['ms_per_mb']:.3f} ms a MB encrypted and decrypted again")
