"""A red team (session 49): a server at an allowed name sends NewSessionTickets without end
after a TLS 1.2 full handshake's first flight: the front door's watch keeps every
ticket (HelloWatch.issued) until the server's ChangeCipherSpec, which never comes, so
the gateway's memory grows with what the server sends (here ~1.5 GB in 5 s; 4.4 GB in 15 s), in the
one process that serves every sandbox."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox
from support.servers import listening

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
FLOOD = HERE / "tls_resumption" / "nst_flood_server.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
PORT = 8443
SECONDS = 5

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        id: tenant-allowed
"""

CLIENT = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(i, o, server_hostname="allowed.test")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection(("allowed.test", int(sys.argv[1])))
s.sendall(o.read())
total = 0
while (piece := s.recv(1 << 20)):
    total += len(piece)
print("client read", total)
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_new_session_ticket_flood_does_not_grow_the_gateway(net, tmp_path):
    log = tmp_path / "flood.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    inside = ["ip", "netns", "exec", net.internet_ns]
    server = subprocess.Popen(
        [*inside, PY, str(FLOOD), IP, str(PORT), str(SECONDS), str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert sandbox.eventually(lambda: listening(net, [f"{IP}:{PORT}"]), timeout=10)
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "flood": f"sleep 2; timeout {SECONDS + 20} {PY} client.py {PORT}",
        }
        started = sandbox.start(
            net, tmp_path, steps=steps, rules=rules,
            setup=lambda d: (d / "client.py").write_text(CLIENT),
        )  # fmt: skip
        time.sleep(1.5)
        base = rss_kb(started.pid)
        peak = base
        deadline = time.monotonic() + SECONDS + 10
        while started.popen.poll() is None and time.monotonic() < deadline:
            peak = max(peak, rss_kb(started.pid))
            time.sleep(0.2)
        result = started.finish(timeout=60)
    finally:
        server.terminate()
        server.wait(5)
    why = f"{result.describe()}\nflood:\n{log.read_text()}\nrss base {base} kB, peak {peak} kB"
    print(why)
    assert "flood sent" in log.read_text(), why
    assert "client read" in result["flood"].out, why  # the bytes went through to the task
    # The secure behaviour: the gateway's memory does not follow the server's bytes.
    assert peak - base < 100_000, why
