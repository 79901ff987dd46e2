"""What an allowed WebSocket may cost the gateway, end to end: `sandgate run` in the
fake internet, a WebSocket server of the test's own behind a `websocket: true` rule.

Frames are not requests: once the upgrade was decided, the tunnel's messages are
relayed, never decided. mitmproxy's relay gathered each message whole before sending
it on, kept every message of the connection for as long as it lived, and inflated
permessage-deflate messages whole: a task (or its server) grew the worker's memory
without bound through one allowed connection. Each case here moves far more than
the bound through one WebSocket and asserts that the gateway's memory stayed within
it, and (from the server's log, or what the client read) that the messages still got
through, as fragments of the same message (lean_mitmproxy.stream_websocket_messages).
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.crowd import run_and_grow
from support.sandbox import python
from support.servers import script_server

pytestmark = pytest.mark.e2e

PORT = 8080
MEGABYTES = 192  # moved by each case: far past the bound
BOUND_KB = 64 << 10  # what the gateway may grow by over the whole run

RULES = f"""\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        websocket: true
        id: ws
"""

# Answers every upgrade with 101 and permessage-deflate, asked for or not (a server
# that names an extension the request did not offer). /up reads and counts what the
# client sends; /down sends one binary message of argv[3] MB in 64 KB fragments, then
# a close. Logs "PATH offered=BOOL bytes=N" once the connection ends.
SERVER = r"""
import socket, struct, sys, threading
ip, port, megabytes, log_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = open(log_path, "a", buffering=1)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((ip, port))
listener.listen(16)

def serve(c):
    total, path, offered = 0, "?", False
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                return
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.decode(errors="replace").split("\r\n")
        path = lines[0].split()[1]
        offered = any(l.lower().startswith("sec-websocket-extensions:") for l in lines[1:])
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: x\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
        if path == "/down":
            block = b"d" * 65536
            for i in range(megabytes * 16):
                c.sendall(struct.pack("!BBQ", 0x02 if i == 0 else 0x00, 127, len(block)) + block)
                total += len(block)
            c.sendall(b"\x80\x00" + b"\x88\x02\x03\xe8")  # the last (empty) fragment, a close
            c.recv(1)
            return
        total = len(data)
        while chunk := c.recv(1 << 20):
            total += len(chunk)
    except OSError:
        pass
    finally:
        log.write(f"{path} offered={offered} bytes={total}\n")
        c.close()

print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

# In the sandbox: a WebSocket to allowed.test (offering permessage-deflate), then
# argv[1]: "unfinished" (one message of argv[2] MB that never ends), "many" (argv[2]
# MB of whole 64 KB messages), "bomb" (one deflated message of argv[2] MB of zeros,
# ~1/1000 of that on the wire), "down" (read the server's message). Prints the
# upgrade's status line, then "sent N" or "received N" (payload bytes).
CLIENT = r"""
import socket, struct, sys, time, zlib
mode, megabytes = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("allowed.test", 8080), timeout=20)
path = "/down" if mode == "down" else "/up"
s.sendall((f"GET {path} HTTP/1.1\r\nHost: allowed.test:8080\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n").encode())
data = b""
while b"\r\n\r\n" not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
head, data = data.split(b"\r\n\r\n", 1) if b"\r\n\r\n" in data else (data, b"")
print(head.split(b"\r\n")[0].decode())

def frame(payload, fin=True, opcode=2, rsv1=False):
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    return struct.pack("!BBQ", first, 0x80 | 127, len(payload)) + b"\0\0\0\0" + payload

block, sent = b"u" * 65536, 0
try:
    if mode == "down":
        received = 0
        while chunk := data or s.recv(1 << 20):
            data = b""
            received += len(chunk)
        print("received", received)
        sys.exit()
    if mode == "bomb":
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        zeros = bytes(1 << 20)
        payload = b"".join(deflate.compress(zeros) for _ in range(megabytes))
        payload += deflate.flush(zlib.Z_SYNC_FLUSH)[:-4]
        s.sendall(frame(payload, rsv1=True))
        sent = len(payload)
    for i in range(megabytes * 16 if mode in ("unfinished", "many") else 0):
        if mode == "unfinished":
            s.sendall(frame(block, fin=False, opcode=2 if i == 0 else 0))
        else:
            s.sendall(frame(block))
        sent += len(block)
    time.sleep(1)  # for the gateway to take it all in
except OSError as e:
    print("error", e)
print("sent", sent)
"""


def test_an_allowed_websocket_costs_the_gateway_bounded_memory(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "ws.log"
    log.touch()
    steps = {
        "warmup": python(CLIENT, "many", "1"),
        "unfinished": python(CLIENT, "unfinished", str(MEGABYTES)),
        "many": python(CLIENT, "many", str(MEGABYTES)),
        "bomb": python(CLIENT, "bomb", str(MEGABYTES)),
        "down": python(CLIENT, "down", str(MEGABYTES)),
    }
    with script_server(net, SERVER, "203.0.113.10", str(PORT), str(MEGABYTES), str(log)):
        started = sandbox.start(net, tmp_path, steps=steps, rules=rules)
        # The baseline once mitmproxy has served a WebSocket (its imports, a leaf).
        r, base, peak = run_and_grow(started, timeout=60)
    for label in steps:
        assert r[label].out.startswith("HTTP/1.1 101"), (label, r.describe())
    assert peak - base < BOUND_KB, (base, peak, r.describe())

    # One line per connection as it ended, in the steps' order.
    ended = [line.split() for line in log.read_text().splitlines()]
    assert [words[0] for words in ended] == ["/up"] * 4 + ["/down"], ended
    # No extension reached the server; the one it named anyway was not used.
    assert {words[1] for words in ended} == {"offered=False"}, ended
    got = [int(words[2].removeprefix("bytes=")) for words in ended]
    total = MEGABYTES << 20
    # The never-ending message and the many messages reached the server as they were
    # sent (framed again: a little more than their payload); the deflated one was
    # refused (no extension was agreed), never inflated nor sent on.
    assert got[1] >= total and got[2] >= total, got
    assert got[3] < 1 << 20, got
    # The server's message, which ends only after MEGABYTES, reached the client.
    assert int(r["down"].out.split()[-1]) >= total, r.describe()
    assert r.verdicts(kind="request") == {("allow", "rule_allow", "ws")}, r.describe()
