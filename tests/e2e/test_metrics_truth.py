"""What `sandgate gateway --workers 2`'s /metrics tells a SOC dashboard is true.

A real Prometheus (1 s scrapes) watches the service while tasks make a mixed workload
(allowed, denied for several reasons, DNS, an approval, a UDP datagram the firewall
drops, many distinct names and paths), and one gateway worker is killed with SIGKILL in
the middle. Asserted:

- no counter series went down while the service ran: PromQL `resets()` over the whole
  run, the worker's restart included, is 0 for every counter and histogram series, and
  the restart itself is counted (`sandgate_worker_restarts_total`), and so is the first
  failed reload (`increase()` sees it: its series was there at 0 before);
- the counters agree with the audit log, per kind, verdict and reason;
- distinct names, SNIs and paths a task sends add no series;
- the gauges of what is gone (sandboxes, approvals, connections) go back to 0;
- `promtool check metrics` finds nothing wrong with the exposition, each family has one
  HELP and one TYPE, no series twice; a scrape is answered while a worker is stopped;
- a restart of the service (every counter back to 0) is visible as one
  (`sandgate_start_time_seconds` changes).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import sandbox
from support.prometheus import PrometheusServer, free_port, require_prometheus
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv, counted

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 1s}
    rules:
      - allow: allowed.test
        id: web-allowed
      - deny: forbidden.test
        id: forbidden
      - ask: www.allowed.test
        id: ask-www
"""

# The mixed workload: each line a decision of another kind or reason.
MIXED = r"""
set -u
c() { curl -sS -o /dev/null --max-time 10 "$@" || true; }
c https://allowed.test/
c http://allowed.test/pkg
c https://forbidden.test/
c --resolve forbidden.test:443:203.0.113.66 https://forbidden.test/
c --resolve evil.test:443:203.0.113.66 https://evil.test/
c http://169.254.169.254/latest/meta-data/
c http://www.allowed.test/asked
python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("203.0.113.66", 9999))'
"""

# argv[1] distinct DNS names, SNIs and paths, each under the prefix argv[2].
DISTINCT = r"""
import socket, ssl, sys, urllib.request
count, prefix = int(sys.argv[1]), sys.argv[2]
for i in range(count):
    try:
        socket.getaddrinfo(f"{prefix}{i}.junk.test", 443, socket.AF_INET)
    except OSError:
        pass
ctx = ssl.create_default_context()
for i in range(count // 4):
    try:
        with socket.create_connection(("203.0.113.66", 443), timeout=5) as raw:
            ctx.wrap_socket(raw, server_hostname=f"{prefix}{i}.sni.test")
    except OSError:
        pass
    try:
        urllib.request.urlopen(f"http://allowed.test/{prefix}/{i}?q={i}", timeout=5)
    except Exception:
        pass
"""

# The mixed workload, then (idle, no connection open) until the test says go, again.
MIXED_WAIT_MIXED = (
    MIXED + 'touch "$SHARED/idle"\nwhile [ ! -e "$SHARED/go" ]; do sleep 0.05; done\n' + MIXED
)

COUNTER_SAMPLES = ("_total", "_bucket", "_count", "_sum")  # what must never go down


def scrape(service_net, port: int) -> str:
    answer = service_net.run_in_host(
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics"], timeout=10
    )
    assert answer.returncode == 0, answer.stderr
    return answer.stdout


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label pairs): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"series twice: {key}"
            found[key] = sample.value
    return found


def total(found: dict[tuple, float], name: str, **labels) -> float:
    return sum(
        value
        for (sample, pairs), value in found.items()
        if sample == name and all(dict(pairs).get(k) == v for k, v in labels.items())
    )


def by(found: dict[tuple, float], name: str, *keys: str) -> dict[tuple, float]:
    sums: dict[tuple, float] = collections.Counter()
    for (sample, pairs), value in found.items():
        if sample == name and value:
            sums[tuple(dict(pairs).get(k) for k in keys)] += value
    return dict(sums)


def audit_by(records: list[dict], kind: str, *keys: str) -> dict[tuple, float]:
    sums: dict[tuple, float] = collections.Counter()
    for record in records:
        if record["kind"] == kind:
            sums[tuple(record.get(k) for k in keys)] += counted([record])
    return dict(sums)


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


def test_metrics_stay_true_over_a_worker_restart(net, tmp_path):
    require_prometheus()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port(net.host_ns)
    prometheus = PrometheusServer(net, tmp_path, port)
    service = GatewayProcess(
        net, tmp_path, rules, "--workers", "2", "--metrics-listen", f"127.0.0.1:{port}"
    )
    shared, rw = sandbox.shared_dir(tmp_path)
    waiting = None
    try:
        prometheus.wait_ready()
        service.start()

        def attach(script: str) -> subprocess.CompletedProcess:
            argv = attach_argv(service, sandbox._workdir(tmp_path), ["sh", "-c", script])
            return subprocess.run(argv, capture_output=True, text=True, timeout=120)

        # A task in each worker: one does the workload now, one waits for the test.
        waiting = subprocess.Popen(
            attach_argv(service, sandbox._workdir(tmp_path),
                          ["sh", "-c", f"SHARED={shared}\n{MIXED_WAIT_MIXED}"], extra=rw),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert eventually((shared / "idle").exists, timeout=60), service.log.read_text()
        first = attach(MIXED)
        assert first.returncode == 0, first.stderr

        # 1. Distinct names, SNIs and paths add no series: a second round of as many
        # new ones leaves the set of series as the first round left it.
        code = ["/usr/bin/python3", "-c", DISTINCT]
        for prefix in ("a", "b"):
            workdir = sandbox._workdir(tmp_path)
            done = subprocess.run(
                attach_argv(service, workdir, [*code, "200", prefix]),
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            after = set(samples(scrape(net, port)))
            if prefix == "a":
                series = after
        assert after == series, sorted(after - series)
        leaks = [key for key in after if any("junk" in v or ".test" in v for _, v in key[1])]
        assert not leaks, leaks

        # Prometheus has scraped the counters at their values before the restart.
        eventually(
            lambda: (
                prometheus.query("sum(sandgate_dns_queries_total)")
                and list(prometheus.query("sum(sandgate_dns_queries_total)").values())[0] > 400
            ),
            timeout=20,
        )

        # 2. A scrape is answered while a worker is stopped, and at once.
        workers = service.status()["workers"]
        busy = next(w for w in workers if w["sandboxes"] == 1)
        os.kill(busy["pid"], signal.SIGSTOP)
        try:
            began = time.monotonic()
            scrape(net, port)
            assert time.monotonic() - began < 1.0
        finally:
            os.kill(busy["pid"], signal.SIGCONT)

        # 3. SIGKILL the worker that serves the waiting task, then its workload.
        before = samples(scrape(net, port))
        os.kill(busy["pid"], signal.SIGKILL)
        assert eventually(
            lambda: service.status()["workers"][busy["index"]]["pid"] not in (None, busy["pid"]),
            timeout=30,
        )
        reload = service.ask("reload")  # and a reload: no counter goes down either
        assert reload.returncode == 0, reload.stderr
        rules.write_text(RULES + "  broken: [\n")  # a reload refused: the first failure
        assert service.ask("reload").returncode != 0
        rules.write_text(RULES)
        (shared / "go").write_text("go")
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        last = attach(MIXED)
        assert last.returncode == 0, last.stderr
        time.sleep(3)  # three scrapes after the last event

        # Every counter series only went up while the service ran (Prometheus's view).
        now = samples(scrape(net, port))
        counters = {name for name, _ in now if name.endswith(COUNTER_SAMPLES)}
        assert len(counters) > 15, counters
        went_down = {name: found for name in sorted(counters)
                     if (found := prometheus.query(f"resets({name}[10m]) > 0"))}  # fmt: skip
        assert not went_down, went_down
        # The first failed reload is an increase (its series was there at 0 before).
        failed = prometheus.query('increase(sandgate_policy_reloads_total{result="failure"}[10m])')
        assert list(failed.values()) and list(failed.values())[0] > 0.5, failed
        for key, value in before.items():
            if key[0].endswith(COUNTER_SAMPLES):
                assert now.get(key, 0) >= value, (key, value, now.get(key))
        assert total(now, "sandgate_worker_restarts_total") == 1

        # 4. The counters agree with the audit log, per kind, verdict and reason.
        def settled():
            records = service.events()
            found = samples(scrape(net, port))
            return found if total(found, "sandgate_events_total") == counted(records) else None

        now = eventually(settled, timeout=10)
        assert now, "sandgate_events_total never matched the audit log"
        records = service.events()
        for kind, metric in (
            ("connection", "sandgate_connections_total"),
            ("dns", "sandgate_dns_queries_total"),
            ("request", "sandgate_http_requests_total"),
            ("approval", "sandgate_approvals_total"),
        ):
            assert by(now, metric, "verdict", "reason") == audit_by(
                records, kind, "verdict", "reason"
            ), kind
        assert by(now, "sandgate_events_total", "kind", "verdict") == audit_by_kind(records)
        reasons = {r["reason"] for r in records}
        assert {"rule_allow", "rule_deny", "no_rule", "private_address", "approval_pending",
                "worker_restarted", "dropped_by_firewall"} <= reasons, reasons  # fmt: skip
        drops = sum(
            int(r["detail"].split()[3]) for r in records if r["reason"] == "dropped_by_firewall"
        )
        assert total(now, "sandgate_firewall_dropped_packets_total") == drops >= 2

        # 5. What is gone is gone from the gauges.
        pending = json.loads(service.ask("approvals", "list", "--json").stdout)
        assert pending and total(samples(scrape(net, port)), "sandgate_approvals_pending") == len(
            pending
        )
        for approval in pending:
            assert service.ask("approvals", "deny", approval["id"]).returncode == 0
        now = eventually(
            lambda: (
                (found := samples(scrape(net, port)))
                and total(found, "sandgate_approvals_pending") == 0
                and found
            ),
            timeout=10,
        )
        assert now, "approvals still pending"
        for gauge in (
            "sandgate_active_sandboxes",
            "sandgate_active_connections",
            "sandgate_approval_oldest_pending_seconds",
        ):
            assert total(now, gauge) == 0, gauge

        # 6. The exposition as promtool reads it; one HELP and TYPE per family.
        text = scrape(net, port)
        promtool = shutil.which("promtool") or "/usr/bin/promtool"  # Debian's prometheus
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        for prefix in ("# HELP ", "# TYPE "):
            names = [line.split()[2] for line in text.splitlines() if line.startswith(prefix)]
            assert len(names) == len(set(names)), collections.Counter(names).most_common(3)

        # 7. A restart of the service sets every counter back to 0: Prometheus sees it.
        assert service.stop() == 0
        service.start()
        started = "changes(sandgate_start_time_seconds[10m])"
        assert eventually(lambda: list(prometheus.query(started).values()) == [1.0], timeout=20)
    finally:
        (shared / "go").write_text("go")
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        service.stop()
        prometheus.stop()


def audit_by_kind(records: list[dict]) -> dict[tuple, float]:
    sums: dict[tuple, float] = collections.Counter()
    for record in records:
        sums[(record["kind"], record["verdict"])] += counted([record])
    return dict(sums)
