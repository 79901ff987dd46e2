"""A request or connection held for approval, approved while the audit log cannot be
written, is refused (`audit_unavailable`), as every other request and connection then.

The hold on an unwritable log (Gateway.guard_audit) refused new connections, requests
on open ones and upstream DNS queries, but not the end of a hold: a task put a POST
(a TLS connection to an asked name, a request to a placeholder) on hold, filled the
log's budget with its own requests, and once a human approved, the POST went
upstream, the connection connected, the placeholder's name was resolved upstream:
nothing could record them, the very thing the hold is for.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 60s}
    rules:
      - allow: www.allowed.test
        id: web
      - ask: allowed.test
        id: ask-upload
        methods: [POST]
        paths: ["/up"]
      - ask: api.allowed.test
        id: ask-api
"""

# Three holds (a request, a TLS connection, a request to a placeholder); then, once the
# test saw them held, requests on one keep-alive connection until the log's budget
# refuses one; then the holds' ends.
TASK = r"""
import http.client, os, subprocess, time
def curl(out, *args):
    return subprocess.Popen(["sh", "-c", 'curl -s -o /dev/null --max-time 60 -w "%{http_code}" "$@" > ' + out, "sh", *args])
up = curl("up.txt", "-H", "Expect:", "--data-binary", "hello", "http://allowed.test/up")
conn = curl("conn.txt", "-k", "https://api.allowed.test/conn")  # held at its ClientHello
plain = curl("plain.txt", "http://api.allowed.test/plain")  # its name resolved once approved
for _ in range(1200):
    if os.path.exists("go"):
        break
    time.sleep(0.05)
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
open("filled", "w").write(" ".join(statuses[-2:]))
up.wait(); conn.wait(); plain.wait()
"""


def test_holds_approved_while_the_log_cannot_be_written_are_refused(fakenet, tmp_path):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(
        fakenet, tmp_path, rules, "--admin-listen", "off", "--audit-budget", "64K"
    ).start()
    workdir = sandbox._workdir(tmp_path)
    steps = workdir / "steps"
    (steps / "task.py").write_text(TASK)
    command = ["sh", "-c", f"cd {steps} && {sandbox.SANDBOX_PYTHON} task.py"]
    task = None
    try:
        task = subprocess.Popen(
            attach_argv(service, workdir, command),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def listed() -> list[dict]:
            result = service.ask("approvals", "list", "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        held = eventually(lambda: len(found := listed()) == 3 and found, timeout=30)
        assert held, listed()
        (steps / "go").touch()
        filled = steps / "filled"
        assert eventually(filled.exists, timeout=60), "the task never filled the log"
        assert filled.read_text().endswith("403"), filled.read_text()
        for approval in held:
            approved = service.ask("approvals", "approve", approval["id"], "--task")
            assert approved.returncode == 0, approved.stderr
        out, err = task.communicate(timeout=60)
        assert task.returncode == 0, err
        assert (steps / "up.txt").read_text() == "403"
        assert (steps / "conn.txt").read_text() == "000"  # refused: no TLS session
        assert (steps / "plain.txt").read_text() == "403"
        # Neither the approved POST nor the approved connection's request went out.
        uris = [seen["uri"] for seen in fakenet.requests_seen()]
        assert not {"/up", "/conn", "/plain"} & set(uris), uris
        # The asked name (a placeholder until approved) was not resolved upstream either.
        assert "api.allowed.test" not in fakenet.dns_queries_seen()
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()
