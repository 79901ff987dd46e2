"""A PostgreSQL-style TLS client, run inside the sandbox: the 8-byte SSLRequest
(unless `direct`), the server's 'S', then TLS with SNI, one message and its answer.
From the red-team report rt45/network (finding 2).

usage: pg_client.py IP PORT SNI preamble|direct"""

import socket
import ssl
import sys

ip, port, sni, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    s = socket.create_connection((ip, port), timeout=5)
    if mode == "preamble":
        s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # PostgreSQL SSLRequest
        print("server said", s.recv(1))
    t = ctx.wrap_socket(s, server_hostname=sni)
    t.sendall(b"SECRET-" + sni.encode() + b"-" + mode.encode())
    print(t.recv(100))
except Exception as e:  # noqa: BLE001
    print("error", e)
    sys.exit(1)
