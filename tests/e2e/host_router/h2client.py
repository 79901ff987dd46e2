"""Raw HTTP/2 (or HTTP/1.1) client for the host_router tests (tests/e2e/test_host_router.py), run inside the sandbox.
usage: h2client.py IP PORT SNI MODE SPEC
MODE h2: SPEC is a JSON list of [name, value] header pairs sent as-is (pseudo headers
included), one request; prints the status and the body.
MODE h1: SPEC is a JSON list of raw HTTP/1 requests (strings) written one after another
on one TLS connection (SNI given) -- or plain TCP when SNI is '-'; prints what came back."""

import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events

ip, port, sni, mode, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
sni_name = None if sni == "none" else sni
raw = socket.create_connection((ip, port), timeout=8)

if mode == "h1":
    s = raw if sni == "-" else ctx.wrap_socket(raw, server_hostname=sni_name)
    for req in json.loads(spec):
        s.sendall(req.encode("latin-1"))
    s.settimeout(20)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except OSError:
        pass
    print(out.decode("latin-1"))
    sys.exit(0)

ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(raw, server_hostname=sni_name)
assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
conn = h2.connection.H2Connection(
    h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
)
conn.initiate_connection()
spec = json.loads(spec)
requests = spec if spec and isinstance(spec[0][0], list) else [spec]  # one or several streams
s.settimeout(8)
for i, fields in enumerate(requests):
    sid = 1 + 2 * i
    conn.send_headers(sid, [(n.encode(), v.encode()) for n, v in fields], end_stream=True)
    s.sendall(conn.data_to_send())
    status, body, done = None, b"", False
    try:
        while not done:
            data = s.recv(65536)
            if not data:
                done = "eof"
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers).get(b":status")
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    print("RESET", ev.error_code)
                    done = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    print("GOAWAY", ev.error_code, ev.additional_data)
                    done = "eof"
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
            s.sendall(conn.data_to_send())
    except OSError as e:
        print("ERR", e)
        done = "eof"
    print("STATUS", status.decode() if status else None)
    print(body.decode("latin-1"))
    if done == "eof":
        break
