"""A TLS server that dispatches by the name its SNI callback sees (Python's ssl, as an
app that serves several tenants at one address would): the tenant whose context the
callback picked answers, and logs it.
usage: sni_dispatch.py [--old-versions] [--starttls] IP PORT CERT KEY LOG NAME=LABEL...
--old-versions: TLS 1.0 and 1.1 too. --starttls: an SMTP-like preamble first (EHLO,
STARTTLS; any other line gets a 500, as an SMTP server answers it)."""

import socket
import ssl
import sys
import threading

flags = {arg for arg in sys.argv[1:] if arg.startswith("--")}
ip, port, cert, key, logpath, *named = [arg for arg in sys.argv[1:] if arg not in flags]
tenants = dict(arg.split("=", 1) for arg in named)
log = open(logpath, "a", buffering=1)  # noqa: SIM115


def context(label):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if "--old-versions" in flags:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.label = label
    return ctx


contexts = {name: context(label) for name, label in tenants.items()}
main = context("DEFAULT")


def pick(sslobj, name, _):
    sslobj.seen = name
    if name in contexts:
        sslobj.context = contexts[name]


main.sni_callback = pick


def starttls(conn) -> bool:
    """The SMTP-like preamble; False when the client left before STARTTLS."""
    conn.sendall(b"220 starttls.test ESMTP ready\r\n")
    lines = conn.makefile("rb", buffering=0)
    while line := lines.readline(65536):
        word = line.strip().upper()
        if word.startswith((b"EHLO", b"HELO")):
            conn.sendall(b"250-starttls.test\r\n250 STARTTLS\r\n")
        elif word.endswith(b"STARTTLS"):
            conn.sendall(b"220 go ahead\r\n")
            return True
        else:
            conn.sendall(b"500 unrecognized command\r\n")
    return False


def serve(conn):
    with conn:
        try:
            if "--starttls" in flags and not starttls(conn):
                return
            t = main.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = t.recv(4096)
                if not piece:
                    break
                data += piece
            label = t.context.label
            line = data.partition(b"\r\n")[0].decode(errors="replace")
            log.write(
                f"{label} got sni={getattr(t, 'seen', None)} request={line!r} "
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
log.write("dispatch ready\n")
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
