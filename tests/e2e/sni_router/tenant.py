"""A tenant behind the router (tests/e2e/test_sni_routers.py): logs what it got (its
label, the SNI OpenSSL saw, the request line, the Host) and answers with its label.
usage: tenant.py IP PORT LABEL CERT KEY LOG  (CERT and KEY "-": plain HTTP)"""

import socket
import ssl
import sys
import threading

ip, port, label, cert, key, logpath = sys.argv[1:7]
log = open(logpath, "a", buffering=1)  # noqa: SIM115
ctx = None
if cert != "-":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sslobj, name, _: setattr(sslobj, "sni_seen", name)


def serve(conn):
    with conn:
        try:
            t = ctx.wrap_socket(conn, server_side=True) if ctx else conn
            data = b""
            while b"\r\n\r\n" not in data:
                piece = t.recv(4096)
                if not piece:
                    break
                data += piece
            line, _, rest = data.partition(b"\r\n")
            host = next(
                (v.strip() for n, _, v in (f.partition(b":") for f in rest.split(b"\r\n"))
                 if n.lower() == b"host"),
                b"",
            )  # fmt: skip
            log.write(
                f"{label} got sni={getattr(t, 'sni_seen', None)} "
                f"request={line.decode(errors='replace')!r} host={host.decode(errors='replace')}\n"
            )
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
