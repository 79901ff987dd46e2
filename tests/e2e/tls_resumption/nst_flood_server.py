"""A server at an allowed name that answers each ClientHello with a TLS 1.2 full
handshake's first flight, then handshake records without end (no ChangeCipherSpec):
mode `nst`: NewSessionTickets of 16000 bytes (the watch keeps each);
mode `tiny`: records full of empty handshake messages (4 bytes each; the watch
reads each); mode `big`: 16 KB messages (skipped by length). usage: nst_flood_server.py IP PORT SECONDS LOG [MODE]"""

import socket
import sys
import threading
import time

ip, port, seconds, logpath = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
mode = sys.argv[5] if len(sys.argv) > 5 else "nst"
log = open(logpath, "a", buffering=1)  # noqa: SIM115


def msg(kind, body):
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def rec(payload, kind=22):
    return bytes([kind, 3, 3]) + len(payload).to_bytes(2, "big") + payload


hello = msg(2, b"\x03\x03" + bytes(32) + b"\x20" + bytes(range(32)) + b"\xc0\x2f\x00")
first = rec(hello + msg(11, b"\x00\x00\x03\x00\x00\x00") + msg(14, b""))
if mode == "nst":
    chunk = rec(msg(4, b"\x00\x00\x1c\x20" + (16000).to_bytes(2, "big") + b"T" * 16000)) * 16
elif mode == "big":  # the control: the same bytes' worth in 16 KB messages
    chunk = rec(msg(12, bytes(16380))) * 16
else:
    chunk = rec(msg(12, b"") * 4096) * 16


def serve(c):
    sent, end = 0, time.monotonic() + seconds
    try:
        c.recv(65536)
        c.sendall(first)
        while time.monotonic() < end:
            c.sendall(chunk)
            sent += len(chunk)
    except OSError as e:
        log.write(f"flood error {e!r}\n")
    log.write(f"flood sent {sent} bytes\n")
    c.close()


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, port))
ls.listen(16)
log.write("flood ready\n")
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
