"""What mitmproxy holds of a task's request bodies, end to end: `sandgate run` in the
fake internet, profiles whose HTTP goes to mitmproxy.

Two ways one task grew the shared gateway's memory without bound, each held here to
what the test asserts, while the front door (which reads a side only while what it
owes the other is small) never held more:

- an upload to an upstream whose connection is still being made (mitmproxy connects
  lazily, once the request is allowed): the stream waits paused, and mitmproxy read
  the client on and queued its body for it. To an address that never answers the SYN
  (an allowed server behind a firewall that drops), 300 MB sent were 300 MB held for
  the two minutes of SYN retries. Now the client is not read past 1 MiB queued so
  (addon.HeadLimitedHttpLayer.read_hold): its socket fills and its send blocks.
- HTTP/2 streams whose bodies never end: each buffered up to stream_large_bodies
  (1 MiB) before it streamed, and a connection has 100 streams: 4 connections held
  470 MB. Now 64 KiB a stream.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.crowd import run_and_grow
from support.sandbox import curl, python

pytestmark = pytest.mark.e2e

BLACKHOLE = "203.0.113.99"  # routed nowhere in the fake internet: SYNs dropped
MEGABYTES = 256
BOUND_KB = 64 << 10  # what the gateway may grow by over the whole run

# The websocket rule sends the profile's plain HTTP to mitmproxy (http1.needs_engine);
# an HTTP/2 client of an inspected rule goes there whatever the profile.
RULES = f"""\
version: 1
profiles:
  default:
    rules:
      - allow: {BLACKHOLE}
        ports: [80]
        websocket: true
        id: blackholed
      - allow: api.allowed.test
        methods: [GET, POST]
        id: api
"""

# In the sandbox: a POST to the blackholed address announcing 100 GB, then up to
# MEGABYTES of it for at most 8 s; prints "sent N" (what got into the socket).
UPLOAD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=3)
s.sendall(b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: 100000000000\r\n\r\n" % sys.argv[1].encode())
sent, block, start = 0, b"a" * 65536, time.time()
try:
    while time.time() - start < 8 and sent < int(sys.argv[2]) << 20:
        s.sendall(block)
        sent += len(block)
except OSError:
    pass
print("sent", sent)
"""

# In the sandbox: argv[1] HTTP/2 connections to api.allowed.test (h2 copied into the
# workspace), each with 99 POST streams of ~1 MB (no content-length) that never end;
# held 2 s, then a GET on each connection, whose status it prints.
STREAMS = r"""
import socket, ssl, sys, time
sys.path.insert(0, "h2lib")
import h2.config, h2.connection, h2.events

def pump(s, conn, wait=0.0):
    s.settimeout(wait or 0.001)
    events = []
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            events += conn.receive_data(data)
            s.settimeout(0.001)
    except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
        pass
    s.settimeout(10)
    s.sendall(conn.data_to_send())
    return events

held, block = [], b"x" * 16000
for _ in range(int(sys.argv[1])):
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2"])
    s = context.wrap_socket(socket.create_connection(("api.allowed.test", 443), timeout=10), server_hostname="api.allowed.test")
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    pump(s, conn, 0.2)
    for stream in range(1, 199, 2):  # 99: the GET below is the 100th
        conn.send_headers(stream, [(":method", "POST"), (":path", "/public/up"), (":scheme", "https"), (":authority", "api.allowed.test")])
        for _ in range(62):
            while conn.local_flow_control_window(stream) < len(block):
                pump(s, conn, 0.01)
            conn.send_data(stream, block)
        pump(s, conn)
    held.append((s, conn))
time.sleep(2)
for s, conn in held:
    conn.send_headers(1001, [(":method", "GET"), (":path", "/public/ok"), (":scheme", "https"), (":authority", "api.allowed.test")], end_stream=True)
    status, deadline = "none", time.time() + 5
    while status == "none" and time.time() < deadline:
        for event in pump(s, conn, 0.1):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1001:
                status = dict(event.headers)[b":status"].decode()
    print(status)
"""


def copy_h2(workspace: Path) -> None:
    import h2
    import hpack
    import hyperframe

    for package in (h2, hpack, hyperframe):
        source = Path(package.__file__).parent
        shutil.copytree(source, workspace / "h2lib" / source.name)


def test_mitmproxy_holds_bounded_request_bodies(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {
        # mitmproxy started and its HTTP/2 path warm: the baseline
        "warmup": curl("--http2", "https://api.allowed.test/public/warm", "-o", "/dev/null"),
        "upload": python(UPLOAD, BLACKHOLE, str(MEGABYTES)),
        "streams": python(STREAMS, "4"),
        # an honest upload still goes through, streamed (3 MB, no content-length)
        "honest": curl(
            "--http2", "-H", "Transfer-Encoding:", "--data-binary", "@body.bin",
            "https://api.allowed.test/public/honest", "-o", "/dev/null",
        ),
    }  # fmt: skip

    def setup(workspace: Path) -> None:
        copy_h2(workspace)
        (workspace / "body.bin").write_bytes(b"b" * (3 << 20))

    net.run_in_internet(["ip", "route", "add", "blackhole", f"{BLACKHOLE}/32"], check=True)
    try:
        started = sandbox.start(net, tmp_path, steps=steps, rules=rules, setup=setup)
        r, base, peak = run_and_grow(started)
    finally:
        net.run_in_internet(["ip", "route", "del", "blackhole", f"{BLACKHOLE}/32"])
    assert r["warmup"].status == 200, r.describe()
    # The upload blocked once the gateway stopped reading it (socket buffers: a few MB).
    assert int(r["upload"].out.split()[-1]) < 32 << 20, r.describe()
    # Each HTTP/2 connection still answers (its streams are not all stuck).
    assert r["streams"].out.split() == ["200"] * 4, r.describe()
    assert r["honest"].rc == 0 and r["honest"].status in (200, 405), r.describe()
    assert peak - base < BOUND_KB, (base, peak, r.describe())
    # The upload's read was still held at the run's end: its connection's end was
    # logged after the audit log had closed ("1 events LOST"), 5 s into the stop.
    assert "LOST" not in r.stderr, r.stderr
    ends = [e for e in r.audit if e.get("kind") == "connection_end"]
    assert [e for e in ends if e.get("dst_ip") == BLACKHOLE], r.describe()


HELD_RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 20s}
    rules:
      - allow: api.allowed.test
        methods: [GET]
        id: api-read
      - ask: api.allowed.test
        methods: [POST]
        id: ask-upload
"""

# In the sandbox: argv[1] HTTP/2 connections to api.allowed.test, each with 99 POST
# streams (held for approval) sending ~0.96 MB of body each, just under the 1 MiB a
# held request may queue; then prints how many streams were answered 413.
HELD_STREAMS = r"""
import socket, ssl, sys, time
sys.path.insert(0, "h2lib")
import h2.config, h2.connection, h2.events, h2.exceptions

def pump(s, conn, wait=0.0):
    s.settimeout(wait) if wait else s.setblocking(False)
    events = []
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            events += conn.receive_data(data)
    except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
        pass
    s.settimeout(10)
    s.sendall(conn.data_to_send())
    return events

refused, held, block = 0, [], b"x" * 16000
for _ in range(int(sys.argv[1])):
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2"])
    s = context.wrap_socket(socket.create_connection(("api.allowed.test", 443), timeout=10), server_hostname="api.allowed.test")
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    pump(s, conn, 0.2)  # the gateway's SETTINGS: its windows are wide open
    for stream in range(1, 199, 2):
        conn.send_headers(stream, [(":method", "POST"), (":path", "/public/held"), (":scheme", "https"), (":authority", "api.allowed.test")])
        for _ in range(60):
            try:
                conn.send_data(stream, block)
            except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
                break
            for event in pump(s, conn):  # what the gateway sends: read as it comes
                refused += isinstance(event, h2.events.ResponseReceived) and dict(event.headers)[b":status"] == b"413"
        for event in pump(s, conn):
            refused += isinstance(event, h2.events.ResponseReceived) and dict(event.headers)[b":status"] == b"413"
    held.append((s, conn))
time.sleep(2)
for s, conn in held:
    for event in pump(s, conn, 0.2):
        refused += isinstance(event, h2.events.ResponseReceived) and dict(event.headers)[b":status"] == b"413"
print("refused", refused)
"""


def test_http2_streams_held_for_approval_share_one_body_bound(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(HELD_RULES)
    steps = {
        "warmup": curl("--http2", "https://api.allowed.test/public/warm", "-o", "/dev/null"),
        "held": python(HELD_STREAMS, "2"),
    }
    started = sandbox.start(net, tmp_path, steps=steps, rules=rules, setup=copy_h2)
    r, base, peak = run_and_grow(started)
    assert r["warmup"].status == 200, r.describe()
    # Refused once the connection's held bodies passed 1 MiB: most of the streams.
    assert r["held"].out.startswith("refused "), r.describe()
    assert int(r["held"].out.split()[-1]) > 100, r.describe()
    assert r.events(kind="request", reason="body_too_large"), r.describe()
    assert not [e for e in net.requests_seen() if "held" in e["uri"]], net.requests_seen()
    assert peak - base < BOUND_KB, (base, peak, r.describe())
