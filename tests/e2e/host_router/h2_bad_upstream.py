"""An HTTP/2 upstream (TLS, ALPN h2) that answers each request badly, by its path:
/bad_headers: a response header block h2 refuses (an upper-case field name);
/big_headers: a response header block past 64 KiB (many CONTINUATION-sized fields);
/goaway: GOAWAY PROTOCOL_ERROR instead of a response; anything else: 200 "ok".
Logs each request's path. usage: h2_bad_upstream.py IP PORT CERT KEY LOG"""

import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events

ip, port, cert, key, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
log = open(logpath, "a", buffering=1)  # noqa: SIM115
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])


def serve(raw):
    try:
        s = ctx.wrap_socket(raw, server_side=True)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False
            )
        )
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    path = dict(ev.headers).get(b":path", b"").decode()
                    log.write(f"UPSTREAM got {path}\n")
                    sid = ev.stream_id
                    if path == "/bad_headers":
                        conn.send_headers(
                            sid, [(b":status", b"200"), (b"X-Upper", b"1")], end_stream=True
                        )
                    elif path == "/big_headers":
                        fields = [(b":status", b"200")] + [
                            (b"x-big-%d" % i, b"v" * 4000) for i in range(40)
                        ]
                        conn.send_headers(sid, fields, end_stream=True)
                    elif path == "/goaway":
                        conn.close_connection(error_code=1, additional_data=b"upstream says no")
                    else:
                        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"3")])
                        conn.send_data(sid, b"ok\n", end_stream=True)
            s.sendall(conn.data_to_send())
    except Exception as e:  # noqa: BLE001
        log.write(f"UPSTREAM error {e!r}\n")


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, port))
ls.listen(16)
log.write("ready\n")
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
