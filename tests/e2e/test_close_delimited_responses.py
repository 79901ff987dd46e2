"""A response whose end is the server's close (no Content-Length, no chunks: PHP's
built-in server, wsgiref, HTTP/1.0-style servers) reaches the client whole and at
once. A red team (session 51) saw the front door's plain-HTTP relay deliver the body
and then hold the client to its timeout, on about one request in three: the server's
data and FIN came in one epoll event, the relay took its short read for "drained"
and waited for an event the FIN never raises again (http1_relay.py `_read`). Both
gateway paths; each request a new connection, as curl makes them."""

from __future__ import annotations

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PORT = 8088
REQUESTS = 12

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
"""
)

# Answers each request with a close-delimited body, sent with the FIN at once.
SERVER = r"""
import socket, sys, threading
ip, port = sys.argv[1], int(sys.argv[2])
listener = socket.create_server((ip, port), backlog=64)
print("ready", flush=True)

def serve(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nserved\n")

while True:
    threading.Thread(target=serve, args=(listener.accept()[0],)).start()
"""


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_response_ended_by_the_servers_close_ends_at_once(net, tmp_path, profile):
    (tmp_path / "server.py").write_text(SERVER)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {
        f"get{i}": sandbox.curl(f"http://allowed.test:{PORT}/page{i}", timeout=3)
        for i in range(REQUESTS)
    }
    argv = [sandbox.SANDBOX_PYTHON, str(tmp_path / "server.py"), IP, str(PORT)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    # curl ends 0 once the body has ended; 28 if it waited out its 3 s for the end
    waited = {label: (step.rc, step.ms) for label, step in result.steps.items() if step.rc != 0}
    assert not waited, result.describe()
    for i in range(REQUESTS):
        assert result[f"get{i}"].out == "served\n\n200", result.describe()
