"""A connection opened before the audit log failed, but decided after (its first
bytes came later), is refused while the log cannot be written (`audit_unavailable`).

The hold on an unwritable log (Gateway.guard_audit) refused each new connection at
its SYN; a connection is decided, though, on its first bytes (the ClientHello's
name) and only then connected upstream. A task opened TCP connections while the log
worked, sent nothing, filled the log's budget with its own requests, and then sent a
ClientHello on each: each was decided, connected and passed through, with nothing
able to record it.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.service import GatewayProcess, attach

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: [allowed.test, www.allowed.test]
        id: web
"""

TASK = r"""
import http.client, socket, ssl
early = socket.create_connection(("allowed.test", 443), timeout=5)  # nothing sent yet
c = http.client.HTTPConnection("www.allowed.test", 80, timeout=5)
statuses = []
for i in range(3000):
    try:
        c.request("GET", f"/fill{i}")
        r = c.getresponse(); r.read()
        statuses.append(str(r.status))
    except (OSError, http.client.HTTPException) as e:
        statuses.append(type(e).__name__)
        c = http.client.HTTPConnection("www.allowed.test", 80, timeout=5)
    if statuses[-1] == "403":
        break
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
try:
    tls = context.wrap_socket(early, server_hostname="allowed.test")
    tls.sendall(b"GET /late HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    late = tls.recv(100).split(b"\r\n")[0].decode() or "closed"
except OSError as e:
    late = type(e).__name__
print(statuses[-1], late)
"""


def test_a_connection_decided_after_the_log_failed_is_refused(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(net, tmp_path, rules, "--audit-budget", "64K").start()
    try:
        result = attach(service, tmp_path, {"task": sandbox.python(TASK)})
    finally:
        service.stop()
    filled, late = result["task"].out.split(maxsplit=1)
    late = late.strip()
    assert filled == "403", result.describe()
    assert not late.startswith("HTTP/"), late
    assert "/late" not in [seen["uri"] for seen in net.requests_seen()]
