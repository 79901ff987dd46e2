"""A stand-in for an SNI-routing multi-tenant Postgres proxy (Neon, Supabase, ...),
run in the fake internet: SSLRequest, 'S', then TLS; the tenant is the SNI. It logs
each connection's tenant and what the tenant got. From rt45/network (finding 2).

usage: pg_sni_server.py IP PORT CERT KEY LOG"""

import socket
import ssl
import sys
import threading

ip, port, cert, key, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
log = open(logpath, "a", buffering=1)  # noqa: SIM115
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)


def on_sni(sslobj, name, _ctx):
    threading.current_thread().tenant = name
    log.write(f"hello for tenant={name}\n")


ctx.sni_callback = on_sni


def serve(conn, peer):
    with conn:
        try:
            pre = conn.recv(8)
            if pre != b"\x00\x00\x00\x08\x04\xd2\x16\x2f":
                log.write(f"plain {peer} {pre!r}\n")
                return
            conn.sendall(b"S")
            tls = ctx.wrap_socket(conn, server_side=True)
            data = tls.recv(1000)
            tenant = getattr(threading.current_thread(), "tenant", None)
            log.write(f"tenant={tenant} data={data!r}\n")
            tls.sendall(b"ok from tenant " + str(tenant).encode() + b"\n")
        except Exception as e:  # noqa: BLE001
            log.write(f"error {e!r}\n")


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, port))
ls.listen(16)
log.write("ready\n")
while True:
    c, p = ls.accept()
    threading.Thread(target=serve, args=(c, p), daemon=True).start()
