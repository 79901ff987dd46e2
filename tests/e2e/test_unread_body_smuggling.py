"""A body that the server leaves unread is never read there as a request no rule
decided, end to end: `sandgate run` in the fake internet, a server of the test's own.

Many servers never read a body they get with a GET (RFC 9110 9.3.1 names this as a
request-smuggling risk; likewise HEAD, DELETE, OPTIONS, TRACE). One that keeps the
connection, as Python's http.server does at HTTP/1.1, then reads the body as the
next request: `GET /public/ok` (allowed) whose body is `GET /private/secret ...` ran
/private/secret on the server, past a rule allowing only /public/**. The gateway
refuses none of these bodies (Elasticsearch's GET _search and kubectl's DELETE send
them on purpose), but sends such a request upstream with `Connection: close`, the
last on its connection (request_head.leaves_body_unread): the server never parses
the body. Every path: plain HTTP and inspected HTTP/1.1 in the front door, the same
and inspected HTTP/2 (to this HTTP/1.1 server) in mitmproxy. The server's log shows
what it served.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python
from support.servers import script_server

pytestmark = pytest.mark.e2e

PLAIN, TLS = 8081, 8443

# `door`: the front door serves plain HTTP and inspected HTTP/1.1; `engine`: a
# websocket rule sends the profile's HTTP to mitmproxy (http1.needs_engine).
RULES = f"""\
version: 1
profiles:
  door:
    rules:
      - allow: allowed.test
        ports: [{PLAIN}, {TLS}]
        paths: ["/public/**"]
        id: door-public
  engine:
    rules:
      - allow: allowed.test
        ports: [{PLAIN}, {TLS}]
        paths: ["/public/**"]
        websocket: true
        id: engine-public
"""

# Python's http.server at HTTP/1.1 (keep-alive), plain and TLS (the fake internet's
# certificate), answering every GET, HEAD, DELETE, OPTIONS without reading a body.
# Logs "METHOD PATH" for each request it serves.
SERVER = r"""
import http.server, ssl, sys, threading
cert, key, log_path = sys.argv[1:4]
log = open(log_path, "a", buffering=1)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        log.write(f"{self.command} {self.path}\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"ok")

    do_HEAD = do_DELETE = do_OPTIONS = do_GET

    def log_message(self, *args):
        pass

plain = http.server.ThreadingHTTPServer(("203.0.113.10", 8081), Handler)
tls = http.server.ThreadingHTTPServer(("203.0.113.10", 8443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.set_alpn_protocols(["http/1.1"])
tls.socket = context.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
print("ready", flush=True)
plain.serve_forever()
"""

SMUGGLED = b"GET /private/secret HTTP/1.1\r\nHost: allowed.test:%d\r\n\r\n"

# In the sandbox: `METHOD /public/LABEL` with SMUGGLED as its body (Content-Length),
# plain or over TLS offering http/1.1; prints the status line of the answer.
HTTP1_CLIENT = r"""
import socket, ssl, sys
method, label, port, tls = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
s = socket.create_connection(("allowed.test", port), timeout=5)
if tls:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    s = context.wrap_socket(s, server_hostname="allowed.test")
body = b"GET /private/secret HTTP/1.1\r\nHost: allowed.test:%d\r\n\r\n" % port
s.sendall(b"%s /public/%s HTTP/1.1\r\nHost: allowed.test:%d\r\nContent-Length: %d\r\n\r\n"
          % (method.encode(), label.encode(), port, len(body)) + body)
answer = b""
try:
    while b"\r\n" not in answer:
        data = s.recv(4096)
        if not data:
            break
        answer += data
except OSError:
    pass
print(answer.split(b"\r\n")[0].decode(errors="replace") or "closed")
"""

# The same over HTTP/2 (h2 copied into the workspace): HEADERS, then the body in DATA.
H2_CLIENT = r"""
import socket, ssl, sys
sys.path.insert(0, "h2lib")
import h2.config, h2.connection
method, label = sys.argv[1], sys.argv[2]
context = ssl.create_default_context()
context.set_alpn_protocols(["h2"])
s = context.wrap_socket(socket.create_connection(("allowed.test", 8443), timeout=5), server_hostname="allowed.test")
conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.send_headers(1, [(":method", method), (":path", f"/public/{label}"), (":scheme", "https"),
                      (":authority", "allowed.test:8443")])
conn.send_data(1, b"GET /private/secret HTTP/1.1\r\nHost: allowed.test:8443\r\n\r\n", end_stream=True)
s.sendall(conn.data_to_send())
status = "closed"
try:
    while status == "closed":
        data = s.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if getattr(event, "headers", None):
                status = dict(event.headers).get(b":status", b"?").decode()
        s.sendall(conn.data_to_send())
except OSError:
    pass
print(status)
"""


def copy_h2(workspace: Path) -> None:
    import h2
    import hpack
    import hyperframe

    for package in (h2, hpack, hyperframe):
        source = Path(package.__file__).parent
        shutil.copytree(source, workspace / "h2lib" / source.name)


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_body_the_server_leaves_unread_never_runs_there_as_a_request(net, tmp_path, profile):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "server.log"
    log.touch()
    steps = {}
    for method in ("GET", "DELETE", "OPTIONS"):
        for port, tls in ((PLAIN, False), (TLS, True)):
            label = f"{method.lower()}_{'tls' if tls else 'plain'}"
            steps[label] = python(HTTP1_CLIENT, method, label, str(port), "1" if tls else "0")
        steps[f"{method.lower()}_h2"] = python(H2_CLIENT, method, f"{method.lower()}_h2")
    cert, key = net.workdir / "server.pem", net.workdir / "server.key"
    with script_server(net, SERVER, str(cert), str(key), str(log)):
        r = sandbox.run(
            net, tmp_path, steps, rules=rules, extra=("--profile", profile), setup=copy_h2
        )
    for label, step in r.steps.items():
        assert step.out.split()[:2] in (["HTTP/1.1", "200"], ["200"]), (label, r.describe())
    served = log.read_text().splitlines()
    assert sorted(served) == sorted(
        f"{label.split('_')[0].upper()} /public/{label}" for label in steps
    ), (
        served,
        r.describe(),
    )
    assert not [line for line in served if "private" in line], served
