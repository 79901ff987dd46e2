"""A stand-in for an SNI router built on Go's crypto/tls (Traefik, Caddy-L4, ...), run
in the fake internet. Go takes any record version below 0x1000 in a connection's first
records (`16 00 01 ...`), not only 3.x. It reads the client's stream: lines (a
STARTTLS-like dialogue) are skipped, and each ClientHello (records of type 22, a
version below 0x1000) is logged by its tenant, the SNI, and answered `220 Ready`, which
is not TLS, so the client may send another. From rt45/network, round 2.

usage: sni_logger.py IP PORT LOG"""

import socket
import sys
import threading

ip, port, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(logpath, "a", buffering=1)  # noqa: SIM115


def sni_of(body: bytes) -> str | None:
    at = 2 + 32
    at += 1 + body[at]  # session id
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher suites
    at += 1 + body[at]  # compression
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    at += 2
    while at < end:
        kind, size = (
            int.from_bytes(body[at : at + 2], "big"),
            int.from_bytes(body[at + 2 : at + 4], "big"),
        )
        if kind == 0:
            return body[at + 9 : at + 4 + size].decode()
        at += 4 + size
    return None


def hello_at(buf: bytes) -> tuple[bytes, int] | None:
    """The hello's body and the bytes it took, from records at the start of buf; None
    until it is whole."""
    hs, at = b"", 0
    while len(buf) >= at + 5:
        if buf[at] != 22 or buf[at + 1] >= 0x10:
            raise ValueError(f"not a handshake record: {buf[at : at + 5].hex()}")
        size = int.from_bytes(buf[at + 3 : at + 5], "big")
        if len(buf) < at + 5 + size:
            return None
        hs += buf[at + 5 : at + 5 + size]
        at += 5 + size
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            return hs[4 : 4 + int.from_bytes(hs[1:4], "big")], at
    return None


def serve(conn, peer):
    with conn:
        buf = b""
        try:
            while data := conn.recv(65536):
                buf += data
                while buf:
                    if buf[0] == 22:
                        found = hello_at(buf)
                        if found is None:
                            break
                        body, used = found
                        buf = buf[used:]
                        log.write(f"hello for tenant={sni_of(body)}\n")
                        conn.sendall(b"220 Ready\r\n")
                    elif b"\n" in buf:
                        buf = buf[buf.index(b"\n") + 1 :]
                    else:
                        break
        except Exception as e:  # noqa: BLE001
            log.write(f"error {peer} {e!r}\n")


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, port))
ls.listen(16)
log.write("ready\n")
while True:
    c, p = ls.accept()
    threading.Thread(target=serve, args=(c, p), daemon=True).start()
