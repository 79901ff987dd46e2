"""An SMTP-like STARTTLS server that serves several tenants at one address and
dispatches by the name its SNI callback sees (as sni_router/sni_dispatch.py does, after
a STARTTLS preamble). Lines it does not know get a 500, as an SMTP server answers them.
usage: starttls_dispatch.py IP PORT CERT KEY LOG NAME=LABEL..."""

import socket
import ssl
import sys
import threading

ip, port, cert, key, logpath = sys.argv[1:6]
tenants = dict(arg.split("=", 1) for arg in sys.argv[6:])
log = open(logpath, "a", buffering=1)  # noqa: SIM115


def context(label):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.label = label
    return ctx


contexts = {name: context(label) for name, label in tenants.items()}
main = context("DEFAULT")


def pick(sslobj, name, _):
    sslobj.seen = name
    if name in contexts:
        sslobj.context = contexts[name]


main.sni_callback = pick


def serve(conn):
    with conn:
        try:
            conn.sendall(b"220 starttls.test ESMTP ready\r\n")
            f = conn.makefile("rb", buffering=0)
            while True:
                line = f.readline(65536)
                if not line:
                    return
                word = line.strip().upper()
                if word.startswith((b"EHLO", b"HELO")):
                    conn.sendall(b"250-starttls.test\r\n250 STARTTLS\r\n")
                elif word.endswith(b"STARTTLS"):
                    conn.sendall(b"220 go ahead\r\n")
                    break
                else:
                    conn.sendall(b"500 unrecognized command\r\n")
            t = main.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = t.recv(4096)
                if not piece:
                    break
                data += piece
            label = t.context.label
            first = data.partition(b"\r\n")[0].decode(errors="replace")
            log.write(
                f"{label} got sni={getattr(t, 'seen', None)} request={first!r} "
                f"resumed={t.session_reused} version={t.version()}\n"
            )
            body = f"SECRET of {label}\n".encode()
            t.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            t.close()
        except Exception as e:
            log.write(f"error {e!r}\n")


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, int(port)))
ls.listen(16)
log.write("starttls dispatch ready\n")
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
