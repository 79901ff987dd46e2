"""The lines that frame a chunked body (chunk-size lines, the trailer section) are
bounded as a head is, on every HTTP/1 path, end to end: `sandgate run` in the fake
internet.

mitmproxy reads HTTP/1 bodies with h11's ChunkedReader, without h11's own bound on
what it buffers: a chunk-size line that never ends (`1` then gigabytes of `0`), or
trailer fields without the blank line that ends them, were buffered whole, from the
task's request as from a server's response (400 MB sent, 400 MB held: one task could
take the shared gateway's memory). The front door's h11 has the bound. Each case
streams far more than the bound and asserts the gateway cut it early (what got out
before the cut), held no more memory than the bound, and answered as for any broken
body: the client's connection closed, an upstream's a 502.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.crowd import run_and_grow
from support.sandbox import curl, python
from support.servers import script_server

pytestmark = pytest.mark.e2e

PORT = 8080
MEGABYTES = 192  # streamed by each case: far past the bound
SENT_BOUND = 16 << 20  # what may get out before the cut (socket buffers, both ends)
BOUND_KB = 64 << 10  # what the gateway may grow by over the whole run

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
        id: plain
      - allow: api.allowed.test
        methods: [GET, POST]
        id: inspected
"""

# A server whose chunked response never ends its framing: after `1\r\n`, zeros
# (/line), or after the last chunk, trailer fields (/trailer), argv[3] MB of them;
# /warmup is answered whole.
# Logs "PATH SENT" once the gateway stopped taking them (or all went out).
SERVER = r"""
import socket, sys, threading
ip, port, megabytes, log_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = open(log_path, "a", buffering=1)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((ip, port))
listener.listen(16)

def serve(c):
    sent, path = 0, "?"
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                return
            data += chunk
        path = data.split()[1].decode()
        if path == "/warmup":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        c.sendall(b"1\r\n" if path == "/line" else b"1\r\nx\r\n0\r\n")
        block = b"0" * 65536 if path == "/line" else b"X-Trailer: " + b"t" * 65520 + b"\r\n"
        c.settimeout(10)
        for _ in range(megabytes * 16):
            c.sendall(block)
            sent += len(block)
    except OSError:
        pass
    finally:
        log.write(f"{path} {sent}\n")
        c.close()

print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

# In the sandbox: a chunked POST whose framing never ends, to argv[1]:argv[2] (TLS if
# argv[3] is 1, offering ALPN argv[4]), then argv[5] MB: "line" (zeros after `1`) or
# "trailer" (fields after the last chunk). Prints "sent N" (the bytes after the head
# that got out before the gateway closed) and the answer's status line, if any.
CLIENT = r"""
import socket, ssl, sys
host, port, tls, alpn, mode, megabytes = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5], int(sys.argv[6])
s = socket.create_connection((host, port), timeout=10)
if tls:
    context = ssl.create_default_context()
    context.set_alpn_protocols([alpn])
    s = context.wrap_socket(s, server_hostname=host)
path = "/public/x" if tls else "/x"
s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
s.sendall(b"1\r\n" if mode == "line" else b"1\r\nx\r\n0\r\n")
block = b"0" * 16384 if mode == "line" else b"X-Trailer: " + b"t" * 16357 + b"\r\n"
sent = 0
try:
    for _ in range(megabytes * 64):
        s.sendall(block)
        sent += len(block)
except OSError:
    pass
answer = b""
try:
    answer = s.recv(4096)
except OSError:
    pass
print("sent", sent, answer.split(b"\r\n")[0].decode(errors="replace"))
"""


def endless_body(host: str, port: int, mode: str, tls: bool = False, alpn: str = "http/1.1"):
    return python(CLIENT, host, str(port), "1" if tls else "0", alpn, mode, str(MEGABYTES))


@pytest.mark.parametrize("profile", ["engine", "door"])
def test_chunked_framing_that_never_ends_is_cut_at_the_head_limit(net, tmp_path, profile):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "server.log"
    log.touch()
    steps = {
        "warmup": curl(f"http://allowed.test:{PORT}/warmup", "--max-time", "1"),
        # the task's request body, plain and inspected (mitmproxy takes inspected TLS
        # offering an ALPN it does not know, as any of an engine profile)
        "line": endless_body("allowed.test", 80, "line"),
        "trailer": endless_body("allowed.test", 80, "trailer"),
        "tls_line": endless_body("api.allowed.test", 443, "line", tls=True, alpn="x-other"),
        "tls_trailer": endless_body("api.allowed.test", 443, "trailer", tls=True),
        # the server's response body
        "down_line": curl(f"http://allowed.test:{PORT}/line", "-o", "/dev/null", timeout=20),
        "down_trailer": curl(f"http://allowed.test:{PORT}/trailer", "-o", "/dev/null", timeout=20),
    }
    with script_server(net, SERVER, "203.0.113.10", str(PORT), str(MEGABYTES), str(log)):
        started = sandbox.start(
            net, tmp_path, steps=steps, rules=rules, extra=("--profile", profile)
        )
        r, base, peak = run_and_grow(started)
    for label in ("line", "trailer", "tls_line", "tls_trailer"):
        words = r[label].out.split()
        assert words[:1] == ["sent"] and int(words[1]) < SENT_BOUND, (label, r.describe())
    # The server's endless framing: a 502, or, where its head had gone to the client
    # already (the front door's), the connection cut (curl's 200 and an error).
    for label in ("down_line", "down_trailer"):
        step = r[label]
        assert step.status == 502 or (step.status == 200 and step.rc != 0), (label, r.describe())
    sent = {line.split()[0]: int(line.split()[1]) for line in log.read_text().splitlines()}
    assert sent["/line"] < SENT_BOUND and sent["/trailer"] < SENT_BOUND, sent
    assert peak - base < BOUND_KB, (base, peak, r.describe())
