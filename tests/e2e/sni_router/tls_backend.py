"""A TLS backend behind the SNI router (tests/e2e/test_sni_routers.py): logs what it
got (its label, the SNI OpenSSL saw, the request line) and answers with its label.
usage: tls_backend.py IP PORT LABEL CERT KEY LOG"""

import socket
import ssl
import sys
import threading

ip, port, label, cert, key, logpath = sys.argv[1:7]
log = open(logpath, "a", buffering=1)  # noqa: SIM115
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)


def cb(sslobj, name, c):
    sslobj.sni_seen = name


ctx.sni_callback = cb


def serve(conn):
    with conn:
        try:
            t = ctx.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = t.recv(4096)
                if not piece:
                    break
                data += piece
            line = data.split(b"\r\n", 1)[0].decode(errors="replace")
            log.write(f"{label} got sni={getattr(t, 'sni_seen', None)} request={line!r}\n")
            body = f"SECRET of {label}\n".encode()
            t.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            t.close()
        except Exception as e:
            log.write(f"{label} error {e!r}\n")


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, int(port)))
ls.listen(16)
log.write(f"{label} ready\n")
while True:
    c, _ = ls.accept()
    log.write(f"{label} connection\n")
    threading.Thread(target=serve, args=(c,), daemon=True).start()
