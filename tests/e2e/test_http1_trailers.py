"""HTTP/1 chunked bodies that end with trailer fields, on every HTTP/1 path, end to
end: `sandgate run` in the fake internet.

mitmproxy's HTTP/1 reader raised NotImplementedError on a trailer section, from the
task's request or from a server's response: its connection handler logged "mitmproxy
has crashed!" with a ~40-line traceback for each (a task could flood the gateway's
log) and left the connection hanging (a server that sends trailers broke every
download through it). The front door reads them and passes none on; mitmproxy now
does the same (lean_mitmproxy.drop_http1_trailers). Each case asserts what the
client got, what the server served, and that the gateway logged no crash.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import curl, python
from support.servers import script_server

pytestmark = pytest.mark.e2e

PORT = 8080

# `engine`: a websocket rule sends the profile's plain HTTP and inspected TLS to
# mitmproxy (http1.needs_engine); `door`: the front door serves both itself.
RULES = f"""\
version: 1
profiles:
  engine:
    rules:
      - allow: allowed.test
        ports: [80, {PORT}]
        websocket: true
        id: engine-plain
      - allow: api.allowed.test
        methods: [GET, POST]
        id: engine-inspected
  door:
    rules:
      - allow: allowed.test
        ports: [80, {PORT}]
        id: door-plain
      - allow: api.allowed.test
        methods: [GET, POST]
        id: door-inspected
"""

# A server whose chunked responses end with a trailer field.
SERVER = r"""
import socket, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("203.0.113.10", 8080))
listener.listen(16)

def serve(c):
    with c:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                return
            data += chunk
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
                  b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n")

print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

# In the sandbox: a chunked POST to argv[1] (TLS if argv[2] is 1) whose body ends with
# a trailer field, and a GET pipelined after it; prints the two answers' status lines.
CLIENT = r"""
import re, socket, ssl, sys
host, tls = sys.argv[1], sys.argv[2] == "1"
s = socket.create_connection((host, 443 if tls else 80), timeout=5)
if tls:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    s = context.wrap_socket(s, server_hostname=host)
path = "/public/" if tls else "/"
s.sendall(f"POST {path}trailer HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
          f"1\r\nx\r\n0\r\nX-Checksum: abc\r\n\r\n"
          f"GET {path}after HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
data = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError:
    pass
print(" ".join(m.decode() for m in re.findall(rb"HTTP/1\.1 \d\d\d", data)) or "none")
"""


@pytest.mark.parametrize("profile", ["engine", "door"])
def test_trailer_fields_are_dropped_not_a_crash(net, tmp_path, profile):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {
        "plain": python(CLIENT, "allowed.test", "0"),
        "tls": python(CLIENT, "api.allowed.test", "1"),
        "download": curl(f"http://allowed.test:{PORT}/trailers"),
    }
    with script_server(net, SERVER):
        r = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    # Both requests answered (nginx's 200 for each), the second read after the first's
    # trailer section.
    for label in ("plain", "tls"):
        assert r[label].out.split() == ["HTTP/1.1", "200"] * 2, (label, r.describe())
    assert r["download"].rc == 0 and r["download"].out == "hello\n200", r.describe()
    seen = {(e["method"], e["uri"]) for e in net.requests_seen()}
    assert seen >= {
        ("POST", "/trailer"),
        ("GET", "/after"),
        ("POST", "/public/trailer"),
        ("GET", "/public/after"),
    }, seen
    assert "crashed" not in r.stderr and "Traceback" not in r.stderr, r.stderr
