"""A run's network goes with the run, also when the task's last act was to close a
connection the gateway was still making upstream (an allowed server behind a firewall
that drops SYNs).

The task's FIN reached the gateway, whose kernel delays the ACK of a FIN (it expects
to answer with its own); the gateway, still connecting upstream, answered neither
before the run's teardown took the sandbox's link down. The task's socket, an orphan
in FIN-WAIT-1, was then retransmitted into the down link with backoff for ~100 s,
and kept the netns and its veth (and the veth's address) that long
(netns.give_up_orphans). `sandbox.run` fails a run whose veth is still there 20 s
after it ended (`leftovers`).
"""

from __future__ import annotations

import time

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

BLACKHOLE = "203.0.113.98"  # routed nowhere in the fake internet: SYNs dropped

RULES = f"""\
version: 1
profiles:
  default:
    rules:
      - allow: {BLACKHOLE}
        ports: [8080, 5432]
        id: behind-a-firewall
"""

# Connects through the gateway to the blackholed address, sends its first bytes,
# waits a second for an answer that never comes, closes and exits at once.
CLOSE_AND_EXIT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(sys.argv[3].encode())
s.settimeout(1)
try:
    print("answered", s.recv(100))
except TimeoutError:
    print("no answer")
s.close()
"""


@pytest.mark.parametrize(
    "port, first_bytes",
    [
        (8080, f"GET / HTTP/1.1\r\nHost: {BLACKHOLE}:8080\r\n\r\n"),
        (5432, "SSH-2.0-sandgate-test\r\n"),
    ],
    ids=["http", "raw-tcp"],
)
def test_the_network_goes_with_the_run(net, tmp_path, port, first_bytes):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    started = time.monotonic()
    # (sandbox.run asserts that nothing of the run is left, its veth within 20 s)
    result = sandbox.run(
        net,
        tmp_path,
        {"close": python(CLOSE_AND_EXIT, BLACKHOLE, str(port), first_bytes)},
        rules=rules,
    )
    assert result["close"].out.strip() == "no answer", result.describe()
    # The gateway had taken the connection and was connecting upstream for it.
    taken = [e for e in result.audit if e.get("dst_ip") == BLACKHOLE]
    assert taken and all(e["verdict"] == "allow" for e in taken), result.describe()
    assert time.monotonic() - started < 15, "the run's network outlived it"
