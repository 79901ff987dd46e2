"""Telemetry end to end: a real Prometheus scrapes `sandgate run` in the fake internet.

In the fake internet's host namespace (the gateway's host) the test starts a
Prometheus server (Debian package `prometheus`; temporary config and storage,
1 s scrape interval, listening on 127.0.0.1 of that namespace only) and
`sandgate run --rules rules/examples/demo.yaml --metrics-listen 127.0.0.1:P
--audit-log FILE -- sh agent.sh`. The agent (in the sandbox) makes a known set of
allowed and blocked connections, requests and queries, then waits until the
test has asked Prometheus. Asserted:

- PromQL over Prometheus's HTTP API counts exactly the allowed and blocked
  connections and requests the agent caused, and the DNS answers the audit log
  records; no series carries a name or an address the agent used;
- the audit log holds exactly the expected events, with reasons and rule ids;
- `sandgate audit verify` passes, and reports the number of an edited line;
- a forged Host header (quotes, backslashes, control and non-ASCII bytes) stays
  inside one well-formed JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sandgate.proxy.policy.load import RULES_DIR
from support.prometheus import PrometheusServer, free_port, require_prometheus

pytestmark = pytest.mark.e2e

DEMO_RULES = RULES_DIR / "examples" / "demo.yaml"
SANDGATE = [sys.executable, "-m", "sandgate.enforcer.cli"]

# What the agent does (agent.sh below), and the events each step must cause.
AGENT = r"""
set -u
c() { curl -sS -o /dev/null --max-time 10 "$@" || true; }
c https://allowed.test/
c https://www.allowed.test/
c --resolve evil.test:443:203.0.113.66 https://evil.test/
c --resolve forbidden.test:443:203.0.113.66 https://forbidden.test/
c http://169.254.169.254/latest/meta-data/
c https://forbidden.test/
c http://allowed.test/pkg.tar.gz
c -H 'Host: a"b\nc' http://allowed.test/
python3 "$WORK/raw.py"
touch "$WORK/acted"
i=0
while [ ! -e "$WORK/release" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"""

# A Host header no client library would send: quote, backslash, ESC, DEL, a
# non-ASCII byte; and one UDP datagram for the firewall's drop counter.
RAW = r"""
import socket
s = socket.create_connection(("203.0.113.10", 80), timeout=5)
s.sendall(b'GET /x HTTP/1.1\r\nHost: q"\\\x1b[31m\x7f\xff.test\r\nConnection: close\r\n\r\n')
try:
    s.recv(1000)
except OSError:
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"ping", ("203.0.113.66", 9999))
"""

# (kind, verdict, reason, rule id, destination) of every connection and request event.
EXPECTED = Counter(
    {
        ("connection", "allow", "rule_allow", "demo-allowed", "allowed.test"): 1,
        ("connection", "allow", "rule_allow", "demo-www", "www.allowed.test"): 1,
        ("connection", "deny", "no_rule", "default:fallback", "evil.test"): 1,
        ("connection", "deny", "rule_deny", "demo-forbidden", "forbidden.test"): 1,
        (
            "connection",
            "deny",
            "private_address",
            "builtin:private-address",
            "169.254.169.254:80",
        ): 1,
        ("request", "allow", "rule_allow", "demo-allowed", "allowed.test"): 1,
        ("request", "deny", "invalid_name", "builtin:host-mismatch", "203.0.113.10:80"): 1,
        # control bytes (ESC, DEL) in the raw one: refused before the name is looked at
        ("request", "deny", "malformed_request", "builtin:malformed-request", "203.0.113.10:80"): 1,
    }
)
# (name, verdict, reason, rule id) of the DNS answers (curl asks A and AAAA, maybe twice).
EXPECTED_DNS = {
    ("allowed.test", "allow", "rule_allow", "demo-allowed"),
    ("www.allowed.test", "allow", "rule_allow", "demo-www"),
    ("forbidden.test", "deny", "rule_deny", "demo-forbidden"),
}
AGENT_NAMES_AND_ADDRESSES = (
    "allowed.test",
    "evil.test",
    "forbidden.test",
    "203.0.113.",
    "169.254.",
    "10.213.",
    "198.51.100.",
    'a"b',
)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()  # what sandgate said (once: exit 125 with no line)
            pytest.fail(f"{what}: process exited with {proc.returncode} first:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s")
        time.sleep(0.05)


def _by(result: dict[tuple, float], label: str) -> dict[str, float]:
    return {dict(key)[label]: value for key, value in result.items()}


def _destination(event: dict) -> str:
    return event.get("name") or f"{event['dst_ip']}:{event['dst_port']}"


@pytest.fixture
def prerequisites():
    require_prometheus()


def test_prometheus_scrapes_a_task_and_the_audit_log_matches(fakenet, tmp_path, prerequisites):
    work = tmp_path / "workspace"  # the task's; the audit log and summary stay outside it
    work.mkdir()
    (work / "agent.sh").write_text(AGENT)
    (work / "raw.py").write_text(RAW)
    audit = tmp_path / "audit.jsonl"
    metrics_port = free_port(fakenet.host_ns)
    prometheus = PrometheusServer(fakenet, work, metrics_port)
    run = None
    try:
        prometheus.wait_ready()
        run = fakenet.popen_in_host(
            [
                *SANDGATE,
                "run",
                "--rules",
                DEMO_RULES,
                "--dns-upstream",
                fakenet.dns_ip,
                "--extra-ca",
                fakenet.ca_cert,
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--audit-log",
                audit,
                "--summary-json",
                tmp_path / "summary.json",
                "--workspace",
                work,
                "--",
                "env",
                f"WORK={work}",
                "sh",
                work / "agent.sh",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(work / "acted", run, 60, "the agent's steps")

        # 1. Prometheus saw what the agent did, while the task is still running.
        want_connections = {"allow": 2.0, "deny": 3.0}
        deadline = time.monotonic() + 20
        while True:
            connections = _by(
                prometheus.query("sum by (verdict) (sandgate_connections_total)"), "verdict"
            )
            if connections == want_connections or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert connections == want_connections
        by_reason = prometheus.query(
            'sum by (reason, rule) (sandgate_connections_total{verdict="deny"})'
        )
        assert {tuple(v for _, v in key): n for key, n in by_reason.items()} == {
            ("no_rule", "default:fallback"): 1,
            ("rule_deny", "demo-forbidden"): 1,
            ("private_address", "builtin:private-address"): 1,
        }
        requests = _by(
            prometheus.query("sum by (verdict) (sandgate_http_requests_total)"), "verdict"
        )
        assert requests == {"allow": 1.0, "deny": 2.0}
        dns_seen = _by(prometheus.query("sum by (verdict) (sandgate_dns_queries_total)"), "verdict")
        assert prometheus.query("sandgate_active_sandboxes") and list(
            prometheus.query("sandgate_active_sandboxes").values()
        ) == [1.0]
        assert list(
            prometheus.query(
                'sandgate_firewall_dropped_packets_total{counter="dropped_udp"}'
            ).values()
        ) == [1.0]
        assert list(prometheus.query("sandgate_audit_events_lost_total").values()) == [0.0]
        assert _by(
            prometheus.query("sum by (direction) (sandgate_bytes_total)"), "direction"
        ).keys() == {"up", "down"}
        assert prometheus.query("sandgate_policy_info")  # one series, labelled with the policy hash
        assert list(
            prometheus.query("sandgate_decision_latency_seconds_count{kind='connection'}").values()
        ) == [5.0]
        # Only bounded labels: no series names a host or an address the agent used.
        series = prometheus.get("/api/v1/series", **{"match[]": '{__name__=~"sandgate_.+"}'})[
            "data"
        ]
        values = [v for s in series for k, v in s.items() if k not in ("instance", "job")]
        leaks = [v for v in values if any(bad in v for bad in AGENT_NAMES_AND_ADDRESSES)]
        assert not leaks, f"unbounded label values in Prometheus: {leaks}"

        (work / "release").touch()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.communicate()
        prometheus.stop()
    assert (
        f"audit log: {audit}" in err and f"metrics: http://127.0.0.1:{metrics_port}/metrics" in err
    )

    # 2. The audit log holds exactly the events the agent caused.
    raw_lines = audit.read_bytes().split(b"\n")
    assert raw_lines[-1] == b""
    records = [json.loads(line) for line in raw_lines[:-1]]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    decisions = Counter(
        (r["kind"], r["verdict"], r["reason"], r.get("rule_id"), _destination(r))
        for r in records
        if r["kind"] in ("connection", "request")
    )
    assert decisions == EXPECTED
    dns = [r for r in records if r["kind"] == "dns"]
    assert {(r["name"], r["verdict"], r["reason"], r["rule_id"]) for r in dns} == EXPECTED_DNS
    assert Counter(r["verdict"] for r in dns) == dns_seen  # the same count Prometheus has
    # Each allowed connection (pass-through, or plain HTTP with an allowed request)
    # closes with its byte counts and lifetime.
    ends = [r for r in records if r["kind"] == "connection_end"]
    allowed = {
        r["source"]
        for r in records
        if r["verdict"] == "allow"
        and (r["kind"] == "connection" or (r["kind"] == "request" and r["protocol"] == "http"))
    }
    assert sorted(r["source"] for r in ends) == sorted(allowed)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["duration"] >= 0 for r in ends)
    assert records[0]["kind"] == "policy" and records[0]["reason"] == "policy_loaded"
    assert records[1]["kind"] == "task" and records[1]["detail"].startswith("task started: env")
    assert records[-1]["kind"] == "task" and records[-1]["detail"] == "task ended: exit code 0"
    assert any(r["reason"] == "dropped_by_firewall" and r.get("protocol") == "udp" for r in records)
    task_ids = {r.get("task_id") for r in records if r["kind"] != "policy"}
    assert len(task_ids) == 1 and None not in task_ids
    assert len({r["policy_hash"] for r in records}) == 1

    # 3. Forged Host headers: still one ASCII line each, the value escaped inside.
    forged = [
        (line, r)
        for line, r in zip(raw_lines, records, strict=False)
        if r["reason"] in ("invalid_name", "malformed_request")
    ]
    assert len(forged) == 2
    for line, record in forged:
        assert all(0x20 <= b < 0x7F for b in line), line
        assert record["kind"] == "request" and record["method"] == "GET"
    # The quote is escaped in the line and comes back from the JSON as it was sent.
    assert 'a"b' in forged[0][1]["detail"] and b'a\\"b' in forged[0][0]
    assert 'q"' in forged[1][1]["detail"] and b'q\\"' in forged[1][0]

    # 4. `sandgate audit verify`: intact, then an edited line is found by number.
    verified = subprocess.run([*SANDGATE, "audit", "verify", audit], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{len(records)} lines" in verified.stdout
    number = next(i for i, r in enumerate(records, start=1) if r.get("name") == "evil.test")
    edited = work / "edited.jsonl"
    lines = audit.read_text().splitlines(keepends=True)
    lines[number - 1] = lines[number - 1].replace('"verdict":"deny"', '"verdict":"allow"')
    edited.write_text("".join(lines))
    broken = subprocess.run([*SANDGATE, "audit", "verify", edited], capture_output=True, text=True)
    assert broken.returncode == 1
    assert broken.stdout.startswith(f"{edited}:{number}: hash mismatch"), broken.stdout
