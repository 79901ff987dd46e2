"""Decisions that end while a connection lives: an allowed WebSocket upgrade made a
plain-HTTP connection a tunnel, then what allowed it ended (a rule's `expires`
instant, or a reload that removed the rule). The tunnel is closed then, with a
`policy_changed` event, and nothing sent into it afterwards reaches the server
(docs/rules.md, Expiry; docs/operations.md, reload rules). Before the fix the gate
treated the tunnel as plain HTTP ("each request is decided") and kept it open: the
frames after the instant reached the server.

The server is the test's own (it logs every request line and every WebSocket frame it
receives, with the time); the client sends one frame before the end and one after."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import eventually, python
from support.servers import script_server
from support.service import attach, attach_argv, running

pytestmark = pytest.mark.e2e

WS_IP, WS_PORT = "203.0.113.11", 8086  # api.allowed.test in the fake internet

# A WebSocket server: logs one JSON line per request head and per frame received
# (a text frame's text, else its opcode; and the time), answers an Upgrade with 101, anything else with 200.
WS_SERVER = r"""
import base64, hashlib, json, socket, sys, threading, time
ip, port, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
lock = threading.Lock()
listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((ip, port)); listener.listen(16)

def write(**entry):
    with lock:
        log.write(json.dumps(dict(entry, time=time.time())) + "\n")

def exactly(c, n, data):
    while len(data) < n:
        chunk = c.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
    return data[:n], data[n:]

def frames(c, data):
    while True:
        head, data = exactly(c, 2, data)
        size = head[1] & 0x7F
        if size == 126:
            raw, data = exactly(c, 2, data); size = int.from_bytes(raw, "big")
        elif size == 127:
            raw, data = exactly(c, 8, data); size = int.from_bytes(raw, "big")
        mask = b"\0\0\0\0"
        if head[1] & 0x80:
            mask, data = exactly(c, 4, data)
        payload, data = exactly(c, size, data)
        text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)).decode(errors="replace")
        if head[0] & 0x0F == 1:  # a text frame: the client's; a close frame is the proxy's
            write(frame=text)
        else:
            write(control=head[0] & 0x0F)

def serve(c):
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                return
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.decode(errors="replace").split("\r\n")
        write(request=lines[0])
        fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        key = fields.get("sec-websocket-key")
        if key is None:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        frames(c, data)
    except (OSError, EOFError):
        pass
    finally:
        write(closed=True)
        c.close()

print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

# In the sandbox: a WebSocket to api.allowed.test, one frame ("before"), then a wait
# until argv[1] (wall clock), one more frame ("after"), and whether the gateway closed
# the tunnel. Prints "upgrade STATUS", then "after closed|open|ERROR".
WS_CLIENT = """
import os, socket, sys, time
until = float(sys.argv[1])

def frame(text):
    payload, mask = text.encode(), os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked

s = socket.create_connection(("api.allowed.test", PORT), timeout=10)
s.sendall(b"GET /ws HTTP/1.1\\r\\nHost: api.allowed.test:PORT\\r\\nUpgrade: websocket\\r\\n"
          b"Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
          b"Sec-WebSocket-Version: 13\\r\\n\\r\\n")
answer = b""
while b"\\r\\n\\r\\n" not in answer:
    chunk = s.recv(65536)
    if not chunk:
        break
    answer += chunk
print("upgrade", answer.split(b"\\r\\n")[0].decode(errors="replace") or "closed", flush=True)
s.sendall(frame("before"))
time.sleep(max(0.0, until - time.time()))
try:
    s.sendall(frame("after"))
    s.settimeout(3)
    print("after", "closed" if s.recv(65536) == b"" else "open")
except socket.timeout:
    print("after open")
except OSError as e:
    print("after", type(e).__name__)
""".replace("PORT", str(WS_PORT))


def _rules(extra: str = "") -> str:
    # `allowed.test` keeps the profile's HTTP on one path whatever the WebSocket rule
    # becomes; the WebSocket rule is the only one that lets api.allowed.test:8086 in.
    return (
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        websocket: true\n"
        f"      - allow: api.allowed.test\n        ports: [{WS_PORT}]\n"
        f"        websocket: true\n        id: tunnel\n{extra}"
    )


def _seen(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _assert_cut_at(r, log, instant: float) -> None:
    """The tunnel worked before `instant`, was closed by a policy_changed event at or
    after it, and the server got no frame after it."""
    upgrade, after = r["ws"].out.splitlines()
    assert upgrade == "upgrade HTTP/1.1 101 Switching Protocols", r.describe()
    frames = eventually(lambda: [e for e in _seen(log) if "frame" in e])
    assert frames[0]["frame"] == "before" and frames[0]["time"] < instant, frames
    # the forbidden frame never arrived (the server closed its side, having none)
    assert [e["frame"] for e in _seen(log) if "frame" in e] == ["before"], _seen(log)
    assert after in ("after closed", "after ConnectionResetError", "after BrokenPipeError"), (
        r.describe()
    )
    (closed,) = r.events(kind="connection", reason="policy_changed")
    assert (closed["dst_ip"], closed["dst_port"]) == (WS_IP, WS_PORT), closed
    assert closed["time"] >= instant, closed


def test_a_websocket_tunnel_is_closed_when_the_rule_that_allowed_it_expires(net, tmp_path):
    instant = float(int(time.time()) + 7)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(instant))
    rules = tmp_path / "rules.yaml"
    rules.write_text(_rules(f"        expires: {expires}\n"))
    log = tmp_path / "ws.log"
    log.touch()
    with script_server(net, WS_SERVER, WS_IP, str(WS_PORT), str(log)):
        r = sandbox.run(net, tmp_path, {"ws": python(WS_CLIENT, str(instant + 1.5))}, rules=rules)
        _assert_cut_at(r, log, instant)
    (closed,) = r.events(kind="connection", reason="policy_changed")
    assert "closed by the expiry of tunnel" in closed["detail"], closed


def test_a_websocket_tunnel_is_closed_by_a_reload_that_removes_its_rule(net, tmp_path):
    """Through the gateway service (which reloads a saved rule file by itself)."""
    log = tmp_path / "ws.log"
    log.touch()
    kept = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
    with (
        script_server(net, WS_SERVER, WS_IP, str(WS_PORT), str(log)),
        running(net, tmp_path, _rules()) as service,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        until = time.time() + 10  # the attach, the upgrade, then the reload (polled each 1 s)
        task = pool.submit(attach, service, tmp_path, {"ws": python(WS_CLIENT, str(until))})
        assert eventually(
            lambda: [e for e in _seen(log) if e.get("frame") == "before"], timeout=9
        ), _seen(log)
        reloaded = time.time()
        service.rules.write_text(kept + "        websocket: true\n")
        r = task.result(timeout=40)
        _assert_cut_at(r, log, reloaded)
    (closed,) = r.events(kind="connection", reason="policy_changed")
    assert "closed by a policy reload" in closed["detail"], closed


def test_a_tunnel_of_a_task_whose_runner_was_killed_is_closed_upstream(net, tmp_path):
    """The runner of an attached task is SIGKILLed while its WebSocket is open: the
    sandbox is removed, and the gateway's upstream connection is closed with it (not
    left open for the server to go on sending into), its end under the task."""
    log = tmp_path / "ws.log"
    log.touch()
    with (
        script_server(net, WS_SERVER, WS_IP, str(WS_PORT), str(log)),
        running(net, tmp_path, _rules()) as service,
    ):
        workdir = sandbox._workdir(tmp_path)
        client = ["/usr/bin/python3", "-c", WS_CLIENT, str(time.time() + 60)]
        argv = attach_argv(service, workdir, client)
        runner = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert eventually(
                lambda: [e for e in _seen(log) if e.get("frame") == "before"], timeout=15
            ), _seen(log)
            # (the audit writer is a thread: the start event may still be on its way)
            started = eventually(lambda: service.events(kind="task", reason="rule_allow"))
            task_id = started[0]["task_id"]
            runner.kill()
            killed = time.time()
        finally:
            if runner.poll() is None:
                runner.kill()
            runner.wait()
        closed = eventually(lambda: [e for e in _seen(log) if "closed" in e], timeout=10)
        assert closed and closed[0]["time"] - killed < 10, _seen(log)
        ends = eventually(
            lambda: service.events(kind="connection_end", dst_port=WS_PORT), timeout=5
        )
        assert [e["task_id"] for e in ends] == [task_id], ends
        assert [e["frame"] for e in _seen(log) if "frame" in e] == ["before"], _seen(log)


# In the sandbox: one HTTP/2 connection (inspected TLS, through mitmproxy) to
# allowed.test; GET /before-expiry, a wait until argv[1], then GET /after-expiry on the
# same connection. Frames by hand (HPACK literals, no Huffman): the sandbox's python
# has no h2 library. Prints one line per request: its :status, or "closed".
H2_CLIENT = """
import socket, ssl, struct, sys, time
until = float(sys.argv[1])
context = ssl.create_default_context()
context.set_alpn_protocols(["h2"])
s = context.wrap_socket(socket.create_connection(("allowed.test", 443), timeout=5), server_hostname="allowed.test")
assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def literal(name, value):
    return b"\\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + frame(4, 0, 0))
buffer = b""

def status(stream, path):
    global buffer
    block = b"".join(literal(n, v) for n, v in ((b":method", b"GET"), (b":scheme", b"https"),
        (b":authority", b"allowed.test"), (b":path", path)))
    try:
        s.sendall(frame(1, 0x5, stream, block))  # END_STREAM | END_HEADERS
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = s.recv(65536)
                if not chunk:
                    return "closed"
                buffer += chunk
            size, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            sid = struct.unpack(">I", buffer[5:9])[0] & 0x7FFFFFFF
            payload, buffer = buffer[9:9 + size], buffer[9 + size:]
            if kind == 4 and not flags & 1:
                s.sendall(frame(4, 1, 0))  # SETTINGS ACK
            elif kind == 7:
                return "goaway"
            elif kind == 1 and sid == stream:
                return "answered"  # HPACK-coded; that it came is enough
    except OSError as e:
        return type(e).__name__

print("before", status(1, b"/before-expiry"), flush=True)
time.sleep(max(0.0, until - time.time()))
print("after", status(3, b"/after-expiry"))
"""


def test_an_inspected_http2_connection_is_closed_when_its_rule_expires(net, tmp_path):
    instant = float(int(time.time()) + 6)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(instant))
    rules = tmp_path / "rules.yaml"
    rules.write_text(  # paths: inspected, and h2 is mitmproxy's
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        paths: ['/*']\n        id: temporary\n"
        f"        expires: {expires}\n"
    )
    r = sandbox.run(net, tmp_path, {"h2": python(H2_CLIENT, str(instant + 1.5))}, rules=rules)
    assert r["h2"].out.splitlines()[0] == "before answered", r.describe()
    assert r["h2"].out.splitlines()[1] in ("after closed", "after goaway"), r.describe()
    (closed,) = r.events(kind="connection", reason="policy_changed")
    assert "closed by the expiry of temporary" in closed["detail"], closed
    assert closed["time"] >= instant, closed
    uris = [e["uri"] for e in net.requests_seen() if e["protocol"] == "HTTP/2.0"]
    assert "/before-expiry" in uris and "/after-expiry" not in uris, net.requests_seen()


# A task that holds one TLS connection (pass-through) open and sends a request on it
# every 0.3 s until the connection ends or `stop` appears in its workspace.
TICKER = r"""
import os, socket, ssl, sys
context = ssl._create_unverified_context()
raw = socket.create_connection(("allowed.test", 443), timeout=40)
conn = context.wrap_socket(raw, server_hostname="allowed.test")
n = 0
while not os.path.exists("stop"):
    n += 1
    try:
        conn.sendall(f"GET /tick{n} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
        if not conn.recv(65536):
            print("closed", n, flush=True)
            break
    except OSError as e:
        print("ended", n, type(e).__name__, flush=True)
        break
    print("ok", n, flush=True)
    __import__("time").sleep(0.3)
"""


def test_a_connection_an_approval_for_a_while_let_through_ends_with_it(fakenet, tmp_path):
    """`approve --for 4s` on a held pass-through TLS connection: the connection is
    closed when the approval ends, as one a rule's `expires` let through is at its
    instant. Before, it lived on for as long as the task kept it (the grant was only
    asked by new connections and requests)."""
    from test_approvals_e2e import Task, _service  # ask allowed.test, held 25 s

    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        task = Task(service, tmp_path, {"ticks": python(TICKER)})
        try:
            asked = task.held()
            approved = service.ask("approvals", "approve", asked["id"], "--for", "4s")
            assert approved.returncode == 0, approved.stderr
            decided = time.monotonic()
            assert eventually(lambda: _ticks(fakenet), timeout=10), "no request went through"
            time.sleep(max(0.0, decided + 6.0 - time.monotonic()))  # the grant ended at +4 s
            after_end = _ticks(fakenet)
            time.sleep(2.0)
            assert _ticks(fakenet) == after_end, "requests still went through after the end"
            (task.steps_dir / "stop").touch()
        finally:
            result = task.finish()
        assert "closed" in result["ticks"].out or "ended" in result["ticks"].out, result.describe()
        (closed,) = service.events(kind="connection", reason="policy_changed")
        assert f"the end of approval {asked['id']}" in closed["detail"], closed
        assert "approval_expired" in closed["detail"], closed
    finally:
        service.stop()


def _ticks(fakenet) -> int:
    return sum(r["uri"].startswith("/tick") for r in fakenet.requests_seen())
