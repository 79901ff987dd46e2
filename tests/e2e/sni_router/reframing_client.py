"""A TLS client whose ClientHello a gateway that joins records decides by one name and
an HAProxy `req.ssl_sni` router routes by another (tests/e2e/test_sni_routers.py).

HAProxy's smp_fetch_ssl_hello_sni (src/payload.c) reads the ClientHello as if it were
one contiguous record: when the hello spans records, it reads the second record's
5-byte header as hello bytes. Here the hello is genuine (Python's ssl makes it, so the
transcript holds and the handshake completes with whichever server gets it); only its
record framing changes: record 1 ends where the extension list starts, so HAProxy
takes record 2's header `16 03 01 L1 L0` for an extension of type 0x1603 and length
0x0100 + L1, skips that many bytes, and lands inside the ALPN extension, where one
ALPN "protocol" (Python takes any ASCII, NUL included) holds the bytes of a
server_name extension for FAKE. OpenSSL joins the records and sees one SNI: REAL.

usage: reframing_client.py IP PORT REAL FAKE PATH MODE
  MODE: honest (plain hello, SNI REAL), straight (plain hello, SNI FAKE),
        split (the reframed hello above, SNI REAL), dot (SNI "REAL."),
        upper (SNI REAL in upper case), tiny (SNI REAL, a first record of 8 bytes),
        record0001 (SNI REAL in a record of version 0x0001: Go's crypto/tls takes it),
        legacy0400 (SNI REAL, legacy_version 0x0400: OpenSSL takes it; the transcript
        then differs, so only the server's first bytes tell), nosni (no SNI)
"""

import contextlib
import socket
import ssl
import sys

ip, port, real, fake, path, mode = sys.argv[1:7]
port = int(port)


def fake_sni_ext(name: str) -> bytes:
    n = name.encode()
    return (
        b"\x00\x00"
        + (len(n) + 5).to_bytes(2, "big")
        + (len(n) + 3).to_bytes(2, "big")
        + b"\x00"
        + len(n).to_bytes(2, "big")
        + n
    )


def first_flight(protocols, sni):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if protocols:
        ctx.set_alpn_protocols(protocols)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, inc, out, out.read()


def handshake_of(records: bytes) -> bytes:
    hs, at = b"", 0
    while at < len(records):
        size = int.from_bytes(records[at + 3 : at + 5], "big")
        hs += records[at + 5 : at + 5 + size]
        at += 5 + size
    return hs


def ext_list_start(hs: bytes) -> int:
    at = 4 + 2 + 32
    at += 1 + hs[at]
    at += 2 + int.from_bytes(hs[at : at + 2], "big")
    at += 1 + hs[at]
    return at + 2  # after the list's length


def extensions(hs: bytes):
    at = ext_list_start(hs)
    while at < len(hs):
        kind = int.from_bytes(hs[at : at + 2], "big")
        size = int.from_bytes(hs[at + 2 : at + 4], "big")
        yield kind, at, size
        at += 4 + size


def record(payload: bytes, version=b"\x03\x01") -> bytes:
    return b"\x16" + version + len(payload).to_bytes(2, "big") + payload


def build_split():
    """(obj, inc, out, bytes to send)."""
    decoy = fake_sni_ext(fake).decode("ascii")
    # Pass 1: where the ALPN extension lies (its place does not depend on its size).
    _, _, _, flight = first_flight(["x" * 10, "y" * 40], real)
    hs = handshake_of(flight)
    start = ext_list_start(hs)
    alpn_at = next(at for kind, at, _ in extensions(hs) if kind == 16) - start
    # The first protocol's data starts at alpn_at + 4 (ext header) + 2 (list) + 1.
    for high in range(1, 60):
        target = 255 + high  # HAProxy's next "extension" starts here (list offset)
        filler = target - (alpn_at + 7) - 1  # protocol 1: filler; protocol 2 starts at target
        if 1 <= filler <= 255:
            break
    else:
        raise SystemExit(f"no layout (ALPN at {alpn_at})")
    protocols = ["a" * filler, decoy + "b" * 8, "http/1.1"]
    obj, inc, out, flight = first_flight(protocols, real)
    hs = handshake_of(flight)
    start = ext_list_start(hs)
    rest = len(hs) - start
    size2 = max(high << 8, target + len(decoy) + 8)
    assert size2 >> 8 == high and size2 <= rest, (size2, high, rest)
    data = record(hs[:start]) + record(hs[start : start + size2])
    if start + size2 < len(hs):
        data += record(hs[start + size2 :])
    return obj, inc, out, data


def main():
    if mode == "split":
        obj, inc, out, data = build_split()
    elif mode == "dot":  # SNI "REAL." (the gateway reads REAL)
        obj, inc, out, data = first_flight(["http/1.1"], real + ".")
    elif mode == "upper":  # SNI "REAL" in upper case (the gateway reads REAL)
        obj, inc, out, data = first_flight(["http/1.1"], real.upper())
    elif mode in ("record0001", "legacy0400"):  # SNI REAL; a version no router reads
        obj, inc, out, data = first_flight(["http/1.1"], real)
        at = 1 if mode == "record0001" else 9  # the record's version, or legacy_version
        data = data[:at] + bytes.fromhex(mode[-4:]) + data[at + 2 :]
    elif mode == "nosni":  # no SNI at all: what the gateway refuses (missing-sni)
        obj, inc, out, data = first_flight(["http/1.1"], None)
    elif mode == "tiny":  # SNI REAL, the hello's first 8 bytes in a record of their own
        obj, inc, out, flight = first_flight(["http/1.1"], real)
        hs = handshake_of(flight)
        data = record(hs[:8]) + record(hs[8:])
    else:
        obj, inc, out, data = first_flight(["http/1.1"], fake if mode == "straight" else real)
    s = socket.create_connection((ip, port), timeout=10)
    s.sendall(data)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                s.sendall(out.read())
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("server closed during the handshake") from None
            inc.write(chunk)
    if out.pending:
        s.sendall(out.read())
    obj.write(f"GET {path} HTTP/1.1\r\nHost: {real}\r\nConnection: close\r\n\r\n".encode())
    s.sendall(out.read())
    answer = b""
    while True:
        try:
            piece = obj.read(65536)
            if not piece:
                break
            answer += piece
        except ssl.SSLWantReadError:
            chunk = s.recv(65536)
            if not chunk:
                break
            inc.write(chunk)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
    sys.stdout.write(answer.decode(errors="replace") + "\n")


main()
