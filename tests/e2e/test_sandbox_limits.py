"""Per-sandbox limits end to end: a task that holds more connections than its
profile's `limits: connections` gets the rest denied at connect (`sandbox_limit`),
each with its audit-log event, and gets its share back once it lets go."""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import curl, eventually, python

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test in the fake internet
LIMITED_RULES = """\
version: 1
profiles:
  default:
    limits: {connections: 20}
    rules:
      - allow: allowed.test
        id: allowed
"""
CAP = ("deny", "sandbox_limit", "builtin:sandbox-connections")

# Opens 40 idle connections to allowed.test:443 (nothing sent: each stays undecided
# at the gateway), then reports how many the gateway closed, and closes the rest.
HOLD_FORTY = """
import socket, sys, time
address = socket.getaddrinfo("allowed.test", 443, socket.AF_INET, socket.SOCK_STREAM)[0][4]
held = []
for _ in range(40):
    try:
        held.append(socket.create_connection(address, timeout=5))
    except OSError:
        pass
time.sleep(1.0)
kept = closed = 0
for s in held:
    s.setblocking(False)
    try:
        s.recv(1)  # b"": the gateway closed it
        closed += 1
    except BlockingIOError:
        kept += 1  # still open, nothing to read
    except OSError:
        closed += 1
print(len(held), kept, closed)
for s in held:
    s.close()
time.sleep(0.5)  # the gateway sees the closes
"""


def test_connections_over_the_sandboxes_limit_are_denied_and_released_after(net, tmp_path):
    rules = tmp_path / "limited.yaml"
    rules.write_text(LIMITED_RULES)
    r = sandbox.run(net, tmp_path, {
        "hold": python(HOLD_FORTY),
        "after": curl("https://allowed.test/after"),
    }, rules=rules)  # fmt: skip

    assert r["hold"].rc == 0, r.describe()
    opened, kept, closed = map(int, r["hold"].out.split())
    assert (opened, kept, closed) == (40, 20, 20), r.describe()
    denied = r.events(kind="connection", reason="sandbox_limit")
    assert len(denied) == 20, r.describe()
    assert r.verdicts(kind="connection", reason="sandbox_limit") == {CAP}
    assert all(e["dst_ip"] == ALLOWED_IP and e["dst_port"] == 443 for e in denied)
    # The 20 it kept ended undecided when the task closed them; none reached a server.
    assert len(r.events(kind="connection", reason="no_data")) == 20, r.describe()
    # Once they are closed, the sandbox has its share back.
    assert (r["after"].rc, r["after"].status) == (0, 200), r.describe()
    assert r.verdicts(kind="connection", name="allowed.test") == {
        ("allow", "rule_allow", "allowed")
    }
    seen = eventually(lambda: net.requests_seen(ALLOWED_IP), timeout=2.0)
    assert [(e["sni"], e["uri"]) for e in seen] == [("allowed.test", "/after")]
    assert r.returncode == 0
