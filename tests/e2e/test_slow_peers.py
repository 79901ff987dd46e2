"""Back-pressure end to end (h-pslow): peers that do not read, or do not write, on
every data path of `sandgate gateway --workers 2`, N sandboxes at once beside an
honest one. The class: "a peer that does not read makes the gateway hold data".

A server of the test's own in the fake internet (SERVER, on api.allowed.test) sends
an endless body to whoever asks (`/big`, `/chunked`; raw TCP on RAW_PORT from the
connect on) and never reads an upload (`/sink`). Each attacker sandbox holds, on its
path, one connection per mode:

- "down": asks for the endless body and never reads its socket;
- "slow": the same, read at 1 KB/s (slowloris in reverse);
- "half": the same after shutting its write side (a half-close), never reading;
- "up": uploads an endless body (Content-Length 1 GiB) to the sink that never reads.

Paths: TLS pass-through ("tls"), plain HTTP in the front door ("plain", keep-alive,
chunked), inspected HTTPS/1.1 in the front door ("inspected"), inspected HTTP/2 in
mitmproxy ("h2", frames by hand: the sandbox's python has no h2), raw TCP allowed by
address ("raw"), DNS over TCP ("dns": queries sent, answers never read) and a
request held for approval whose client keeps sending its body ("ask", mitmproxy).

Each case asserts: the gateway's RSS (service and workers) grew by at most
PER_CONNECTION_KB per stalled connection however long the bodies are (they never
end), the server's bytes stopped moving once the pipes were full (what it sent to
the stalled readers, what the uploaders got into their sockets), and the honest
sandbox's requests answered within HONEST_BOUND. The numbers are printed
(`pytest -s`) and kept in docs/performance.md ("Back-pressure");
`SANDGATE_PSLOW_N` overrides N."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import threading
import time

import pytest
from sandgate.proxy.lean_mitmproxy import MAX_H2_BUFFERED
from support import sandbox
from support.crowd import HONEST, honest_times, rss_kb, spread
from support.servers import script_server
from support.service import finish_attached, running, start_attached

pytestmark = pytest.mark.e2e

N = int(os.environ.get("SANDGATE_PSLOW_N", 8))
SERVER_IP = "203.0.113.11"  # api.allowed.test
HTTP_PORT, TLS_PORT, RAW_PORT = 9080, 9443, 9022
# The documented bound (docs/architecture.md, "What one input may cost"): what the
# gateway holds for one stalled connection beyond the kernel's socket buffers.
PER_CONNECTION_KB = 1536
HONEST_BOUND = 1.0  # seconds: the slowest honest request
# What the server may still move once the pipes are full: the slow readers' 1 KB/s,
# and a relay's last chunk going out as the kernel's buffers autotune.
SETTLED_SLACK = 2 << 20
# How long the pipes may take to fill: the kernel's buffers on four sockets a
# connection (autotuned to several MiB each), through TLS on both sides.
SETTLE_TIMEOUT = 40

RULES = f"""\
version: 1
profiles:
  honest:
    rules:
      - allow: allowed.test
        id: web
  tls:
    rules:
      - allow: api.allowed.test
        ports: [{TLS_PORT}]
        id: passthrough
  plain:
    rules:
      - allow: api.allowed.test
        ports: [{HTTP_PORT}]
        id: plain
  inspected:
    rules:
      - allow: api.allowed.test
        ports: [{TLS_PORT}]
        methods: [GET, POST]
        id: inspected
  raw:
    rules:
      - allow: {SERVER_IP}/32
        ports: [{RAW_PORT}]
        id: raw
  ask:
    rules:
      - ask: api.allowed.test
        ports: [{HTTP_PORT}]
        id: asked
"""

# ip http tls raw cert key totals: an HTTP server on `http`, the same over TLS on
# `tls`, an endless sender on `raw`; every 0.2 s `totals` gets the bytes sent so far
# per (port, path) as JSON.
SERVER = r"""
import json, os, socket, ssl, sys, threading, time
ip, http, tls, raw, cert, key, totals_path = sys.argv[1:8]
BLOCK = b"x" * 65536
totals, lock = {}, threading.Lock()

def count(label, n):
    with lock:
        totals[label] = totals.get(label, 0) + n

def dump():
    while True:
        with lock:
            text = json.dumps(totals)
        with open(totals_path + ".tmp", "w") as f:
            f.write(text)
        os.replace(totals_path + ".tmp", totals_path)
        time.sleep(0.2)

def endless(conn, label, chunked=False):
    block = b"10000\r\n" + BLOCK + b"\r\n" if chunked else BLOCK
    while True:
        conn.sendall(block)
        count(label, len(block))

def head(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        got = conn.recv(65536)
        if not got:
            return None, b""
        data += got
    line = data.split(b"\r\n", 1)[0].split()
    return (line[0], line[1]), data.split(b"\r\n\r\n", 1)[1]

def serve_http(conn, port):
    try:
        while True:
            request, _ = head(conn)
            if request is None:
                return
            method, path = request
            label = f"{port}{path.decode()}"
            if path == b"/small":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif path.startswith(b"/big"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
                endless(conn, label)
            elif path.startswith(b"/chunked"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                endless(conn, label, chunked=True)
            else:  # /sink: never read
                time.sleep(3600)
    except (OSError, ValueError):
        pass
    finally:
        conn.close()

def serve_raw(conn, port):
    try:
        endless(conn, f"{port}")
    except OSError:
        conn.close()

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.set_alpn_protocols(["http/1.1"])

def tls_http(conn, port):
    try:
        conn = context.wrap_socket(conn, server_side=True)
    except (OSError, ValueError):
        conn.close()
        return
    serve_http(conn, port)

def listen(port, handler):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, int(port)))
    ls.listen(512)
    def accept():
        while True:
            conn, _ = ls.accept()
            threading.Thread(target=handler, args=(conn, port), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()

listen(http, serve_http)
listen(tls, tls_http)
listen(raw, serve_raw)
threading.Thread(target=dump, daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""

# path shared me: hold one connection per mode on `path` until `stop` appears (or
# 80 s); write `up-ME` once they are set up, `moved-ME` (the bytes moved per mode) every
# 0.2 s, and at the end `done-ME`: what `moved-ME` said at `up`, at the end, any error.
# "warm": one small exchange on the path, then exit (starts what the path needs).
ATTACK = r"""
import os, socket, ssl, struct, sys, threading, time
path, shared, me = sys.argv[1], sys.argv[2], sys.argv[3]
NAME, IP, HTTP, TLS, RAW = "api.allowed.test", "203.0.113.11", 9080, 9443, 9022
end = time.monotonic() + 80
stopped = lambda: os.path.exists(f"{shared}/stop") or time.monotonic() > end
moved, errors = {}, {}

def connect(alpn=None):
    if path in ("raw",):
        return socket.create_connection((IP, RAW), timeout=5)
    if path in ("plain", "ask"):
        return socket.create_connection((NAME, HTTP), timeout=5)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(alpn or ["http/1.1"])
    return context.wrap_socket(socket.create_connection((NAME, TLS), timeout=5), server_hostname=NAME)

def get(target):
    return f"GET {target} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()

POST = f"POST /sink HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 1073741824\r\n\r\n".encode()
BLOCK = b"u" * 65536

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def h2_head(method, target, more=b""):
    # :method, :scheme https, :path and :authority as literals without indexing
    auth = NAME.encode()
    return method + b"\x87" + bytes([4, len(target)]) + target + bytes([1, len(auth)]) + auth + more

def h2_open(s, window=2**31 - 1):
    # window 0: the client reads its socket but never lets a DATA byte come
    opening = frame(4, 0, 0, struct.pack(">HI", 4, window))
    if window:
        opening += frame(8, 0, 0, struct.pack(">I", window - 65535))
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + opening)

def read_on(s):
    s.settimeout(0.5)
    while not stopped():
        try:
            if not s.recv(65536):
                return
        except (socket.timeout, ssl.SSLWantReadError):
            pass

def hold_reading(s, mode):
    # down, half: never read; slow: 1 KB a second
    while not stopped():
        if mode == "slow":
            s.settimeout(1)
            try:
                moved[mode] = moved.get(mode, 0) + len(s.recv(1024))
            except (socket.timeout, ssl.SSLWantReadError):
                pass
        time.sleep(1 if mode == "slow" else 0.2)

def upload(s, h2=False):
    s.settimeout(0.5)
    window = stream_window = 65535
    got = bytearray()
    while not stopped():
        if h2:  # as far as the gateway's windows let it: read its WINDOW_UPDATEs
            s.setblocking(False)
            try:
                got += s.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            s.settimeout(0.5)
            while len(got) >= 9 and len(got) >= 9 + int.from_bytes(got[:3], "big"):
                size, kind, flags = int.from_bytes(got[:3], "big"), got[3], got[4]
                stream, payload = int.from_bytes(got[5:9], "big") & 0x7FFFFFFF, got[9:9 + size]
                if kind == 8:
                    if stream == 0:
                        window += int.from_bytes(payload, "big")
                    else:
                        stream_window += int.from_bytes(payload, "big")
                elif kind == 4 and not flags & 1:
                    s.sendall(frame(4, 1, 0))
                del got[:9 + size]
            room = min(window, stream_window, 16384)
            if room <= 0:
                time.sleep(0.1)
                continue
            data = frame(0, 0, 1, BLOCK[:room])
        else:
            data = BLOCK
        try:
            sent = s.send(data)
        except (socket.timeout, ssl.SSLWantWriteError):
            time.sleep(0.1)
            continue
        if h2:  # a frame is sent whole or the stream is broken: send its rest blocking
            if sent < len(data):
                s.settimeout(30)
                s.sendall(data[sent:])
                s.settimeout(0.5)
            window -= room
            stream_window -= room
            sent = room
        moved["up"] = moved.get("up", 0) + sent

def dns_flood(s):
    # queries for allowed names, as fast as the socket takes them; answers never read
    query = struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\x03api\x07allowed\x04test\x00" + struct.pack(">HH", 1, 1)
    s.settimeout(0.5)
    while not stopped():
        try:
            s.sendall(struct.pack(">H", len(query)) + query)
            moved["dns"] = moved.get("dns", 0) + 1
        except socket.timeout:
            time.sleep(0.1)
        except OSError as e:  # the gateway's 100 queries a connection, then its close
            errors["dns"] = str(e)
            return

def one(mode):
    try:
        if path == "dns":
            resolver = open("/etc/resolv.conf").read().split("nameserver")[1].split()[0]
            return dns_flood(socket.create_connection((resolver, 53), timeout=5))
        s = connect(["h2"] if path.startswith("h2") else None)
        if path == "h2window":
            h2_open(s, window=0)
            s.sendall(frame(1, 5, 1, h2_head(b"\x82", b"/big?" + mode.encode())))
            return read_on(s)
        if path == "h2":
            h2_open(s)
            if mode == "up":
                cl = b"\x0f\x0d\x0a1073741824"  # content-length, a literal without indexing
                s.sendall(frame(1, 4, 1, h2_head(b"\x83", b"/sink", cl)))
                return upload(s, h2=True)
            s.sendall(frame(1, 5, 1, h2_head(b"\x82", b"/big?" + mode.encode())))
        elif mode == "up":
            if path != "raw":
                s.sendall(POST)
            return upload(s)
        elif path != "raw":
            s.sendall(get(("/chunked?" if mode == "half" and path == "plain" else "/big?") + mode))
        if mode == "half":
            socket.socket.shutdown(s, socket.SHUT_WR)
        hold_reading(s, mode)
    except Exception as e:
        errors[mode] = f"{type(e).__name__}: {e}"

def warm():
    # one small exchange on the path: what it needs started (mitmproxy, a leaf
    # certificate, the upstream's TLS) is in the baseline, not in the stalls' growth
    if path == "dns":
        return
    if path == "ask":
        return  # a held request would wait for the approval's timeout
    s = connect(["h2"] if path.startswith("h2") else None)
    if path.startswith("h2"):
        h2_open(s)
        s.sendall(frame(1, 5, 1, h2_head(b"\x82", b"/small")))
        s.recv(65536)
    elif path == "raw":
        s.recv(1)
    else:
        s.sendall(get("/small"))
        answer = b""
        while not answer.endswith(b"ok") and (data := s.recv(65536)):
            answer += data
        open(f"{shared}/warm-{me}", "w").write(answer.split(b"\r\n")[0].decode(errors="replace"))
    s.close()

warm()
open(f"{shared}/ready-{me}", "w").write("ready")
while not os.path.exists(f"{shared}/go") and not stopped():
    time.sleep(0.05)
modes = {"dns": ["dns"], "ask": ["up"], "h2window": ["window", "window2"]}
modes = modes.get(path, ["down", "slow", "half", "up"])
for mode in modes:
    threading.Thread(target=one, args=(mode,), daemon=True).start()
time.sleep(0.5)
at_up = dict(moved)
open(f"{shared}/up-{me}", "w").write("up")
while not stopped():
    open(f"{shared}/moved-{me}.tmp", "w").write(repr(moved))
    os.replace(f"{shared}/moved-{me}.tmp", f"{shared}/moved-{me}")
    time.sleep(0.2)
open(f"{shared}/done-{me}", "w").write(repr({"up": at_up, "end": dict(moved), "errors": errors}))
"""

PATHS = ["tls", "plain", "inspected", "h2", "raw", "dns", "ask"]
STALLS = {
    "dns": 1,
    "ask": 1,
    "h2window": 2,
}  # stalled connections per attacker; else one per mode: 4


@pytest.fixture(scope="module")
def upstream(fakenet, tmp_path_factory):
    """SERVER on api.allowed.test's address; yields a reader of its totals."""
    totals = tmp_path_factory.mktemp("pslow") / "totals.json"
    cert, key = fakenet.workdir / "server.pem", fakenet.workdir / "server.key"
    args = (SERVER_IP, str(HTTP_PORT), str(TLS_PORT), str(RAW_PORT), str(cert), str(key))
    with script_server(fakenet, SERVER, *args, str(totals)):
        yield lambda: json.loads(totals.read_text()) if totals.exists() else {}


@pytest.fixture(scope="module")
def service(fakenet, tmp_path_factory):
    # A state directory of its own: the service writes its upstream CA bundle there
    # (STATE_DIR/gateway-upstream-ca.pem), and a service of another test session on
    # this host, with its own fake internet's CA, would overwrite the default one's
    # before the workers read it (the inspected upstream then fails to verify).
    state = tmp_path_factory.mktemp("pslow-state")
    saved = os.environ.get("SANDGATE_STATE_DIR")
    os.environ["SANDGATE_STATE_DIR"] = str(state)
    try:
        with running(
            fakenet, tmp_path_factory.mktemp("pslow-gw"), RULES, "--workers", "2", "--warm", "0"
        ) as gateway:
            yield gateway
    finally:
        if saved is None:
            del os.environ["SANDGATE_STATE_DIR"]
        else:
            os.environ["SANDGATE_STATE_DIR"] = saved


def uploaded(shared, n: int) -> int:
    """What the attackers' uploads got into their sockets so far (their `moved-I`)."""
    total = 0
    for i in range(n):
        with contextlib.suppress(OSError, SyntaxError, ValueError):
            total += ast.literal_eval((shared / f"moved-{i}").read_text()).get("up", 0)
    return total


def sampled(pid: int, progress, stop: threading.Event, samples: list) -> None:
    """(seconds, RSS KiB of the service's tree, `progress()`) every 0.25 s."""
    start = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - start, rss_kb(pid), progress()))
        stop.wait(0.25)


def settled(samples: list, timeout: float = SETTLE_TIMEOUT) -> int:
    """Wait until the bytes the server sent and the uploads took moved less than
    SETTLED_SLACK / 2 in four seconds (every pipe is full; one second was once a
    pause of mitmproxy's, not the end, and under a full test run two seconds once were
    too: 5.4 MB moved on after them): the index of that sample. Past `timeout`: the
    gateway takes data on for ever (or discards it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(samples) > 16 and samples[-1][2] - samples[-17][2] < SETTLED_SLACK / 2:
            return len(samples) - 1
        time.sleep(0.25)
    raise AssertionError(f"still moving after {timeout} s: {samples[-5:]}")


def stall(service, tmp_path, upstream, path: str, profile: str) -> dict:
    """N attackers of `path` attached and warmed (a baseline RSS taken), their stalls
    held until every pipe is full, then while the honest sandbox runs; returns what
    was measured."""
    shared, _ = sandbox.shared_dir(tmp_path)
    attackers = [
        start_attached(service, tmp_path, ATTACK, path, str(shared), str(i), profile=profile)
        for i in range(N)
    ]
    honest = None
    stop, samples = threading.Event(), []
    progress = lambda: sum(upstream().values()) + uploaded(shared, N)  # noqa: E731
    try:
        ready = sandbox.eventually(
            lambda: all((shared / f"ready-{i}").exists() for i in range(N)), timeout=60
        )
        assert ready, [p.stderr.read()[-1500:] for p, _ in attackers if p.poll() is not None]
        time.sleep(0.5)  # the warm exchanges' ends settle
        pid = service.popen.pid
        before = rss_kb(pid)
        (shared / "go").write_text("go")
        sampler = threading.Thread(target=sampled, args=(pid, progress, stop, samples))
        sampler.start()
        up = sandbox.eventually(
            lambda: all((shared / f"up-{i}").exists() for i in range(N)), timeout=30
        )
        assert up
        full = settled(samples)
        honest = start_attached(service, tmp_path, HONEST, str(shared), "10", profile="honest")
        honest_err = finish_attached(honest[0])
        time.sleep(1)
        stop.set()
        sampler.join()
    finally:
        stop.set()
        (shared / "stop").write_text("stop")
        errs = [finish_attached(p) for p, _ in attackers]
        if honest is not None and honest[0].poll() is None:
            honest[0].kill()
            honest[0].wait()
    assert (shared / "honest-times").exists(), honest_err[-2000:]
    warmed = {
        (shared / f"warm-{i}").read_text() for i in range(N) if (shared / f"warm-{i}").exists()
    }
    assert warmed <= {"HTTP/1.1 200 OK"}, warmed
    seen = [ast.literal_eval((shared / f"done-{i}").read_text()) for i in range(N)]
    times = honest_times(shared)
    # The stalls' cost: the peak until the pipes were full, before the honest sandbox
    # came (its attach costs the service a few MiB of its own: late_growth_kb).
    peak = max(rss for _, rss, _ in samples[: full + 1])
    stalled = N * STALLS.get(path, 4)
    result = {
        "before_kb": before,
        "peak_growth_kb": peak - before,
        "per_connection_kb": round((peak - before) / stalled),
        "late_growth_kb": max(rss for _, rss, _ in samples) - samples[full][1],
        "total_growth_kb": max(rss for _, rss, _ in samples) - before,
        "seconds_to_fill": round(samples[full][0], 1),
        "server_sent_and_uploaded": samples[-1][2],
        "moved_after_full": samples[-1][2] - samples[full][2],
        "seconds_held_full": round(samples[-1][0] - samples[full][0], 1),
        "honest": {k: spread(times, k) for k in ("https", "http")},
        "errors": [s["errors"] for s in seen if s["errors"]][:3],
        "attacker_stderr": [e[-300:] for e in errs if "Traceback" in e][:2],
    }
    print(f"\n{path} x{N}: {result}")
    print("server sent per (port, path):", upstream())
    failed = [t for t in times if t[2] != "HTTP/1.1 200 OK"]
    assert not failed, failed
    assert max(t for _, t, _ in times) < HONEST_BOUND, times
    assert not result["attacker_stderr"], result
    return result


@pytest.mark.parametrize("path", PATHS)
def test_stalled_peers_hold_bounded_memory_and_leave_the_honest_sandbox_fast(
    service, upstream, tmp_path, path
):
    profile = "inspected" if path == "h2" else "plain" if path == "dns" else path
    result = stall(service, tmp_path, upstream, path, profile)
    # Bounded: what the gateway holds per stalled connection, whatever the body's size
    # (they never end), and nothing more once the pipes were full.
    assert result["per_connection_kb"] <= PER_CONNECTION_KB, result
    assert result["moved_after_full"] <= SETTLED_SLACK, result


def test_an_http2_client_that_never_opens_its_window_costs_the_worker_its_bounded_queue(
    service, upstream, tmp_path
):
    """A client that reads its socket (TCP back-pressure never comes) but sets its
    window to 0: mitmproxy queues the response's body for it until the stream would
    take the connection's queue past MAX_H2_BUFFERED, then resets it, and closes its
    upstream (it read the body on and dropped it, for ever: 5 GB in 40 s). Bounded,
    but by that queue, not by the socket buffers: 8 MiB and more a connection, above
    the 1.5 MiB of the other paths (docs/performance.md, "Back-pressure")."""
    result = stall(service, tmp_path, upstream, "h2window", "inspected")
    # The queue, and what the allocator keeps of the queues let go (RSS rose on after
    # the server stopped: 6.8 MiB a connection when it did, 11.8 MiB at the end).
    bound = 2 * MAX_H2_BUFFERED // 1024
    assert result["total_growth_kb"] / (N * STALLS["h2window"]) <= bound, result
    assert result["moved_after_full"] <= SETTLED_SLACK, result
