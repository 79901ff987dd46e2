"""A client, run inside the sandbox, for sni_logger.py: PAD bytes of STARTTLS-like
lines, then a ClientHello (Python's ssl, no handshake beyond it) for each SNI given,
each after the server's `220 Ready` to the one before. The first hello's records carry
the record version VERSION (hex: 0301 as clients send, 0001 as Go takes too).

usage: hello_sender.py IP PORT VERSION PAD SNI [SNI ...]
Prints what happened; exit 0 if every hello got its `220 Ready`."""

import contextlib
import socket
import ssl
import sys

ip, port, version, pad = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
names = sys.argv[5:]


def client_hello(sni: str, version: bytes) -> bytes:
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    data = bytearray(out.read())
    at = 0
    while at + 5 <= len(data):  # every record of it
        data[at + 1 : at + 3] = version
        at += 5 + int.from_bytes(data[at + 3 : at + 5], "big")
    return bytes(data)


line = b"NOOP " + b"x" * 93 + b"\r\n"
filler = (line * (pad // len(line) + 1))[:pad]
if filler:
    filler = filler[:-2] + b"\r\n"
try:
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(filler)
    for i, name in enumerate(names):
        s.sendall(client_hello(name, version if i == 0 else b"\x03\x01"))
        got = b""
        while b"\n" not in got:
            data = s.recv(100)
            if not data:
                raise EOFError(f"closed before the answer to the hello for {name}")
            got += data
        print("hello for", name, "answered", got)
except Exception as e:  # noqa: BLE001
    print("error", repr(e))
    sys.exit(1)
