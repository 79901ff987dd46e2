"""A task that floods the gateway with denied connections, end to end: the audit log
gets far fewer lines than events, its aggregate records ("N similar events
suppressed") plus its own lines account for every connection the task made, the
chain verifies, the metric counts what was aggregated, the summary counts everything,
and the forbidden server got nothing."""

from __future__ import annotations

import re
import subprocess

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

EVIL_IP = "203.0.113.66"  # no rule names it
ATTEMPTS = 5000
METRICS_PORT = 29464

# Connect ATTEMPTS times in a tight loop, each sending an ssh greeting at once (a
# silent client is decided only after the front door's 0.3 s of silence); count the
# connections the gateway accepted (each one it must decide, and record), then wait
# for the test to scrape /metrics.
FLOOD = f"""
import os, socket, sys, time
made = 0
for _ in range({ATTEMPTS}):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("{EVIL_IP}", 22))
        made += 1
        s.sendall(b"SSH-2.0-flood\\r\\n")
        s.recv(1)
    except OSError:
        pass
    finally:
        s.close()
shared = sys.argv[1]
open(shared + "/made.tmp", "w").write(str(made))
os.rename(shared + "/made.tmp", shared + "/made")
for _ in range(600):
    if os.path.exists(shared + "/go"):
        break
    time.sleep(0.05)
"""


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


def _suppressed_metric(net, reason: str) -> float:
    page = net.run_in_host(
        ["curl", "-s", "--max-time", "3", f"http://127.0.0.1:{METRICS_PORT}/metrics"]
    ).stdout
    m = re.search(
        r'^sandgate_audit_events_suppressed_total\{kind="connection",'
        rf'reason="{reason}",verdict="deny"\}} (\S+)$',
        page,
        re.MULTILINE,
    )
    return float(m.group(1)) if m else 0.0


def test_a_flood_of_denied_connections_is_aggregated_and_every_one_is_counted(net, tmp_path):
    shared, rw = sandbox.shared_dir(tmp_path)
    script = f"{sandbox.SANDBOX_PYTHON} -c '{FLOOD}' {shared}"
    extra = (*rw, "--audit-rate", "50", "--audit-burst", "100",
             "--metrics-listen", f"127.0.0.1:{METRICS_PORT}")  # fmt: skip
    started = sandbox.start(net, tmp_path, script, extra=extra)
    try:
        if not sandbox.eventually(lambda: (shared / "made").exists(), timeout=120):
            started.kill()
            pytest.fail(f"the flood did not finish: {started.popen.stderr.read()[-3000:]}")
        made = int((shared / "made").read_text())
        # Every connection is in the metrics while the run still serves them.
        total = sandbox.eventually(lambda: _suppressed_metric(net, "no_rule") or None)
        (shared / "go").touch()
        r = started.finish()
    finally:
        started.kill()
    assert r.returncode == 0, r.describe()
    assert made > ATTEMPTS * 0.9, made

    own = r.events(kind="connection", dst_ip=EVIL_IP)
    aggregates = [e for e in r.audit if e.get("suppressed")]
    assert own and aggregates, r.describe()
    assert {(e["kind"], e["verdict"], e["reason"]) for e in aggregates} == {
        ("connection", "deny", "no_rule")
    }
    assert all(f"{EVIL_IP}:22" in e["detail"] for e in aggregates)
    assert all("similar events suppressed" in e["detail"] for e in aggregates)
    # Every connection the task made is in the log: on its own line or counted in one.
    suppressed = sum(e["suppressed"] for e in aggregates)
    assert len(own) + suppressed == made, (len(own), suppressed, made)
    assert len(r.audit) < made / 3, len(r.audit)
    assert total == suppressed
    # The summary counts every connection, aggregated or not.
    blocked = sum(
        row["count"]
        for row in r.summary["destinations"]
        if row["kind"] == "connection" and row["verdict"] == "deny"
    )
    assert blocked == made, r.summary["destinations"][:5]
    # The task's start and end are never aggregated.
    details = [e["detail"] for e in r.events(kind="task")]
    assert any(d.startswith("task started") for d in details), details
    assert any(d.startswith("task ended") for d in details), details
    # Nothing reached the forbidden server, and the log is one intact chain.
    assert net.tcp_connections_seen(EVIL_IP, 22) == 0
    check = subprocess.run(
        [sandbox.SANDGATE, "audit", "verify", str(r.steps_dir.parent / "audit.jsonl")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
