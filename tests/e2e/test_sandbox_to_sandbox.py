"""One task aiming at another task's sandbox through the gateway, under a rule an admin
wrote for the company network (`allow: 10.0.0.0/8`): the sandbox pool (10.213.0.0/16)
lies inside it, so the rule opened every other sandbox's address. The gateway then
connected to the other sandbox from the host, whose SYN reached that task's kernel
(its table drops the answer, so no connection ever completed, but the other task
saw the SYN in /proc/net/tcp: a channel between tasks, the port its bits, and an
`allow` in the audit log). Now the sending sandbox's table drops a packet whose
destination routes out of a sandbox interface (`dropped_forward`), whatever the
rules say: no rule opens a sandbox to another."""

from __future__ import annotations

import re
import time

import pytest
from support import sandbox
from support.sandbox import eventually, python

pytestmark = pytest.mark.e2e

CORP_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: 10.0.0.0/8
        ports: [80, 443, 8080]
        id: corp
"""

# The other task: listens on 8080 for 8 s; prints every SYN its kernel saw there (a
# request socket in /proc/net/tcp, state 03) and every connection it accepted.
LISTENER = r"""
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(8); s.settimeout(0.05)
open("ready", "w").close()
seen, deadline = set(), time.monotonic() + 8
while time.monotonic() < deadline:
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":1F90") and fields[3] == "03":
            seen.add("syn " + fields[2])
    try:
        c, peer = s.accept()
        seen.add(f"accepted {peer[0]}")
    except OSError:
        pass
print("\n".join(sorted(seen)))
"""

CONNECT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 8080), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + sys.argv[1].encode() + b":8080\r\n\r\n")
        print("answered", s.recv(100))
except OSError as e:
    sys.exit(f"error: {e}")
"""


def test_no_rule_opens_one_sandbox_to_another(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(CORP_RULES)
    other = sandbox.start(
        net,
        tmp_path,
        steps={"listen": "ip -4 -o addr show eth0 > address; " + python(LISTENER)},
        rules=rules,
    )
    try:
        workspace = other.workdir / "steps"
        assert eventually(lambda: (workspace / "ready").exists(), timeout=15), "no listener"
        address = re.search(r"inet ([\d.]+)/", (workspace / "address").read_text()).group(1)
        started = time.monotonic()
        # `start`, not `run`: what the other task saw is asserted before leftovers are
        r = sandbox.start(net, tmp_path, steps={"connect": python(CONNECT, address)}, rules=rules)
        r = r.finish()
        connected_within = time.monotonic() - started
    finally:
        other_result = other.finish()

    assert connected_within < 8, "the listener stopped before the connect ended"
    # The other task's kernel saw nothing: no SYN, no connection.
    assert other_result["listen"].out.strip() == "", other_result.describe()
    assert r["connect"].rc != 0 and "answered" not in r["connect"].out, r.describe()
    # Dropped in the sending sandbox's table, before the gateway: no decision to make,
    # the firewall's count says it.
    assert r.events(kind="connection", dst_ip=address) == [], r.describe()
    assert r.events(kind="request", dst_ip=address) == [], r.describe()
    assert r.summary["firewall_drops"].get("dropped_forward", 0) >= 1, r.summary
    for run in (r, other_result):
        assert not (left := sandbox.leftovers(net, run.run_id)), left
