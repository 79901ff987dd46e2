"""While the audit log cannot be written, nothing more leaves unrecorded: not only new
connections are refused (`audit_unavailable`), but also each request on a keep-alive
connection opened before, and each DNS query that would go upstream (a name is data
too). Before, a task that kept one connection open went on sending requests through
it, and its queries to the resolver, while the log could record none of them (and,
past the writer's queue, lost them)."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test, www.allowed.test

# One keep-alive connection, one request; then (the test fills the log's disk) requests
# on that same connection until one is not served, and a DNS query for an allowed name
# that has not been asked before; then (the test frees the disk) a request on a new one.
TASK = r"""
import http.client, os, subprocess, time
def wait_for(path):
    for _ in range(600):
        if os.path.exists(path):
            return
        time.sleep(0.05)
c = http.client.HTTPConnection("allowed.test", 80, timeout=5)
c.request("GET", "/before")
r = c.getresponse(); r.read()
open("before.txt", "w").write(str(r.status))
open("phase1", "w").close(); wait_for("go2")
during = []
for i in range(40):
    try:
        c.request("GET", f"/during{i}")
        r = c.getresponse(); r.read()
        during.append(str(r.status))
    except (OSError, http.client.HTTPException) as e:
        during.append(type(e).__name__)
    if during[-1] != "200":
        break
    time.sleep(0.1)
open("during.txt", "w").write(" ".join(during))
dig = subprocess.run(["dig", "+time=2", "+tries=1", "+noall", "+comments", "+answer",
                      "www.allowed.test"], capture_output=True, text=True)
open("dns.txt", "w").write(dig.stdout)
open("phase2", "w").close(); wait_for("go3")
for i in range(40):
    try:
        c = http.client.HTTPConnection("allowed.test", 80, timeout=5)
        c.request("GET", f"/after{i}")
        r = c.getresponse(); r.read()
        status = str(r.status)
    except (OSError, http.client.HTTPException) as e:
        status = type(e).__name__
    if status == "200":
        break
    time.sleep(0.2)
open("after.txt", "w").write(status)
"""


def test_an_unwritable_log_refuses_requests_on_open_connections_and_dns(net, tmp_path):
    workdir = tmp_path / "outage"
    steps, logdir, kept = workdir / "steps", workdir / "auditfs", workdir / "kept"
    for d in (steps, logdir, kept):
        d.mkdir(parents=True)
    (steps / "task.py").write_text(TASK)
    command = ["sh", "-c", f"cd {steps} && {sandbox.SANDBOX_PYTHON} task.py"]
    argv = sandbox._argv(net, workdir, command, sandbox.DEMO_RULES, ())
    argv[argv.index("--audit-log") + 1] = str(logdir / "audit.jsonl")
    # The log on a small tmpfs of the gateway's own mount namespace (`ip netns exec`
    # gives it one; it goes with the process), kept when the run ends.
    script = (
        'mount -t tmpfs -o size=256k sandgate-test-audit "$0" && "$@"; rc=$?; '
        'cp -a "$0"/audit.jsonl* "$KEPT"/; exit $rc'
    )
    popen = net.popen_in_host(
        ["env", f"KEPT={kept}", "sh", "-c", script, str(logdir), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sandbox.eventually((steps / "phase1").exists, timeout=30), "no phase1"
        filler = f"/proc/{popen.pid}/root{logdir}/filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        (steps / "go2").touch()
        assert sandbox.eventually((steps / "phase2").exists, timeout=30), "no phase2"
        # What got out while the log could not be written, before it can again.
        served = [s["uri"] for s in net.requests_seen(ALLOWED_IP)]
        resolved = net.dns_queries_seen()
        os.unlink(filler)
        (steps / "go3").touch()
        stdout, stderr = popen.communicate(timeout=60)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert popen.returncode == 0, stderr
    during = (steps / "during.txt").read_text().split()
    assert (steps / "before.txt").read_text() == "200"
    # The keep-alive connection's requests were refused by the gateway (403), not cut.
    assert during[-1] == "403", during
    refused_uri = f"/during{len(during) - 1}"
    assert refused_uri not in served, served
    # The query was refused, and the resolver never saw it.
    assert "status: REFUSED" in (steps / "dns.txt").read_text(), (steps / "dns.txt").read_text()
    assert "www.allowed.test" not in resolved, resolved
    assert (steps / "after.txt").read_text() == "200"
    # Every event kept and written once the disk had room: one intact chain, nothing lost.
    check = subprocess.run(
        [sandbox.SANDGATE, "audit", "verify", str(kept / "audit.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    events = [
        json.loads(line) for f in sorted(kept.iterdir()) for line in f.read_text().splitlines()
    ]
    held = {(e["kind"], e.get("rule_id")) for e in events if e.get("reason") == "audit_unavailable"}
    assert {("request", "builtin:audit-unavailable"), ("dns", "builtin:audit-unavailable")} <= held
    (request,) = [e for e in events if e["kind"] == "request" and e.get("path") == refused_uri]
    assert (request["verdict"], request["reason"], request["name"]) == (
        "deny", "audit_unavailable", "allowed.test",
    )  # fmt: skip
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["audit_lost"] == 0, summary


# The same through a gateway service with two workers (each holds its sandboxes'
# connections and DNS; the service tells them when its log stops being writable): the
# log's budget, reached by the task's own requests on one keep-alive connection.
SERVICE_TASK = r"""
import http.client, subprocess, time
c = http.client.HTTPConnection("allowed.test", 80, timeout=5)
statuses = []
for i in range(2000):
    try:
        c.request("GET", f"/keepalive{i}")
        r = c.getresponse(); r.read()
        statuses.append(str(r.status))
    except (OSError, http.client.HTTPException) as e:
        statuses.append(type(e).__name__)
    if statuses[-1] != "200":
        break
    time.sleep(0.005)
print(" ".join(statuses[-3:]), len(statuses))
dig = subprocess.run(["dig", "+time=2", "+tries=1", "+noall", "+comments", "www.allowed.test"],
                     capture_output=True, text=True)
print("REFUSED" if "status: REFUSED" in dig.stdout else dig.stdout)
"""


def test_a_service_over_its_audit_budget_refuses_requests_and_dns_in_its_workers(net, tmp_path):
    from support.service import GatewayProcess, attach

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: [allowed.test, www.allowed.test]\n        id: web\n"
    )
    service = GatewayProcess(
        net, tmp_path, rules, "--workers", "2", "--audit-budget", "64K"
    ).start()
    try:
        result = attach(service, tmp_path, {"task": sandbox.python(SERVICE_TASK)})
    finally:
        service.stop()
    last, *resolved = result["task"].out.splitlines() or [""]
    *statuses, count = last.split()
    # The budget was reached mid-connection: the next requests on it were refused.
    assert statuses[-1] == "403" and int(count) < 2000, result.describe()
    assert resolved == ["REFUSED"], result["task"].out
    served = [s["uri"] for s in net.requests_seen(ALLOWED_IP)]
    assert f"/keepalive{int(count) - 1}" not in served and "www.allowed.test" not in (
        net.dns_queries_seen()
    )
