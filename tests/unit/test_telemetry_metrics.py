"""Prometheus metrics: bounded labels, the right counters per decision, a /metrics that serves."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dns.message
import pytest
from sandgate.proxy.gateway import Gateway, GatewayConfig
from sandgate.proxy.limits import ConnectionCounts
from sandgate.proxy.policy import load_policy
from sandgate.proxy.policy.load import RULES_DIR
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry import metrics as metrics_module
from sandgate.proxy.telemetry.event import Event, EventKind
from sandgate.proxy.telemetry.metrics import OTHER, Metrics, parse_listen

DEMO = RULES_DIR / "examples" / "demo.yaml"
SANDBOX_IP = "10.213.0.2"


def series(metrics: Metrics) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value) for family in metrics.registry.collect() for s in family.samples
    ]


def value(metrics: Metrics, name: str, **labels) -> float:
    return sum(
        v
        for n, ls, v in series(metrics)
        if n == name and all(ls.get(k) == x for k, x in labels.items())
    )


def event(
    kind=EventKind.CONNECTION, verdict=Verdict.DENY, reason=Reason.NO_RULE, **fields
) -> Event:
    fields.setdefault("rule_id", "default:fallback")
    fields.setdefault("profile", "default")
    return Event(kind=kind, verdict=verdict, reason=reason, **fields)


# --- 10,000 distinct denied names ----------------------------------------------------


def _random_name(rng: random.Random) -> str:
    label = "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(5, 30)))
    return rng.choice(
        [
            f"{label}.evil.test",
            f"{label}.{label[:3]}.example",
            f"{label}.allowed.test.evil",
            f"x{label}.c2.invalid",
        ]
    )


def test_ten_thousand_denied_names_keep_the_series_bounded():
    """Through the real gateway (DNS filter, decide, stamping, fan-out) in process:
    denied names are answered without an upstream, so no socket is needed."""
    policy = load_policy([DEMO])
    metrics = Metrics()
    gateway = Gateway(
        GatewayConfig(
            listen_host="127.0.0.1", dns_upstreams=["127.0.0.1"], confdir=Path("/nonexistent")
        ),
        policy,
        metrics,
    )
    gateway.add_sandbox(Sandbox(SANDBOX_IP, "task-1", "default"))
    metrics.watch_gateway(gateway)
    # One query a second by the rate buckets' clock: never over the sandbox's dns_qps,
    # so every name reaches decide (the rate limit has its own tests).
    gateway.dns.rates.clock = itertools.count().__next__
    rng = random.Random(4)
    qtypes = ["A", "AAAA", "TXT", "MX", "HTTPS"]

    async def ask(count: int) -> None:
        for i in range(count):
            wire = dns.message.make_query(_random_name(rng), rng.choice(qtypes)).to_wire()
            await gateway.dns.handle(wire, (SANDBOX_IP, 40000 + i % 20000), udp=True)
        # Names that are no names at all: still a bounded label set.
        await gateway.dns.handle(b"\x00\x01garbage", (SANDBOX_IP, 1), udp=True)
        await gateway.dns.handle(
            dns.message.make_query("evil.test", "A").to_wire(), ("10.9.9.9", 1), udp=True
        )

    asyncio.run(ask(1000))
    after_1k = {(n, tuple(sorted(ls.items()))) for n, ls, _ in series(metrics)}
    asyncio.run(ask(9000))
    after_10k = {(n, tuple(sorted(ls.items()))) for n, ls, _ in series(metrics)}

    assert value(metrics, "sandgate_dns_queries_total") == 10_004
    assert after_10k == after_1k, "new series appeared for new names"
    assert len(after_10k) < 120
    text = metrics.render().decode()
    assert (
        "evil" not in text
        and ".example" not in text
        and "10.9.9.9" not in text
        and SANDBOX_IP not in text
    )
    reasons = {ls["reason"] for n, ls, _ in series(metrics) if n == "sandgate_dns_queries_total"}
    assert reasons == {"no_rule", "dns_qtype_not_allowed", "dns_malformed", "unknown_sandbox"}
    started = time.perf_counter()
    metrics.render()
    assert time.perf_counter() - started < 0.05, (
        "a scrape of the bounded series should take milliseconds"
    )


def test_rule_ids_past_the_cap_fold_into_other_and_are_counted():
    metrics = Metrics(max_label_values=10)
    for i in range(500):
        metrics.emit(event(rule_id=f"rule-{i}", reason=Reason.RULE_DENY, protocol="tls"))
    rules = {ls["rule"] for n, ls, _ in series(metrics) if n == "sandgate_connections_total"}
    assert len(rules) == 11 and OTHER in rules
    assert value(metrics, "sandgate_connections_total") == 500
    assert value(metrics, "sandgate_connections_total", rule=OTHER) == 490
    assert value(metrics, "sandgate_metric_label_overflow_total", label="rule") == 490


def test_profiles_protocols_and_methods_are_bounded_too():
    metrics = Metrics(max_profiles=2)
    for i in range(50):
        metrics.emit(
            event(EventKind.REQUEST, profile=f"p{i}", protocol=f"proto{i}", method=f"M{i}")
        )
    metrics.emit(event(EventKind.REQUEST, profile="p0", protocol="https", method="POST"))
    samples = [ls for n, ls, _ in series(metrics) if n == "sandgate_http_requests_total"]
    assert {ls["profile"] for ls in samples} == {"p0", "p1", OTHER}
    assert {ls["protocol"] for ls in samples} == {OTHER, "https"}
    assert {ls["method"] for ls in samples} == {OTHER, "POST"}


@pytest.mark.parametrize(
    ("kind", "metric", "labels"),
    [
        pytest.param(
            EventKind.CONNECTION, "sandgate_connections_total", {"protocol": "tls"}, id="connection"
        ),
        pytest.param(EventKind.DNS, "sandgate_dns_queries_total", {}, id="dns"),
        pytest.param(
            EventKind.REQUEST,
            "sandgate_http_requests_total",
            {"protocol": "tls", "method": "GET"},
            id="request",
        ),
        pytest.param(EventKind.APPROVAL, "sandgate_approvals_total", {}, id="approval"),
    ],
)
def test_each_decision_kind_has_its_counter_and_latency(kind, metric, labels):
    metrics = Metrics()
    metrics.emit(
        event(
            kind,
            Verdict.ALLOW,
            Reason.RULE_ALLOW,
            rule_id="r1",
            protocol="tls",
            method="GET",
            latency=0.0003,
            name="secret.example",
            dst_ip="203.0.113.9",
        )
    )
    assert (
        value(
            metrics,
            metric,
            verdict="allow",
            reason="rule_allow",
            rule="r1",
            profile="default",
            **labels,
        )
        == 1
    )
    assert value(metrics, "sandgate_events_total", kind=str(kind), verdict="allow") == 1
    assert value(metrics, "sandgate_decision_latency_seconds_count", kind=str(kind)) == 1
    assert (
        value(metrics, "sandgate_decision_latency_seconds_bucket", kind=str(kind), le="0.0005") == 1
    )
    assert (
        value(metrics, "sandgate_decision_latency_seconds_bucket", kind=str(kind), le="0.00025")
        == 0
    )
    text = metrics.render().decode()
    assert "secret.example" not in text and "203.0.113.9" not in text


def test_dns_latency_is_the_query_duration():
    metrics = Metrics()
    metrics.emit(event(EventKind.DNS, duration=0.02))
    assert value(metrics, "sandgate_decision_latency_seconds_sum", kind="dns") == pytest.approx(
        0.02
    )


def test_task_and_policy_events_count_as_events_only():
    metrics = Metrics()
    metrics.emit(event(EventKind.TASK, Verdict.ALLOW, Reason.RULE_ALLOW, duration=3.0))
    metrics.emit(event(EventKind.POLICY, Verdict.ALLOW, Reason.POLICY_LOADED))
    metrics.emit(event(EventKind.POLICY, Verdict.DENY, Reason.POLICY_INVALID))
    metrics.emit(event(EventKind.POLICY, Verdict.ALLOW, Reason.POLICY_LOADED))
    assert value(metrics, "sandgate_policy_reloads_total", result="success") == 2
    assert value(metrics, "sandgate_policy_reloads_total", result="failure") == 1
    assert value(metrics, "sandgate_decision_latency_seconds_count") == 0
    assert value(metrics, "sandgate_events_total") == 4


def test_bytes_by_direction():
    metrics = Metrics()
    metrics.emit(event(bytes_up=100, bytes_down=5000))
    metrics.emit(event(bytes_up=1))
    assert value(metrics, "sandgate_bytes_total", direction="up", kind="connection") == 101
    assert value(metrics, "sandgate_bytes_total", direction="down", kind="connection") == 5000


def test_scrape_time_state_gateway_audit_firewall():
    class Policy:
        hash, rule_count = "abc123", 14

    class Audit:
        written, lost, write_errors, queued = 7, 1, 2, 3

    reads = []

    def firewall():
        reads.append(1)
        if len(reads) > 1:
            raise RuntimeError("table gone")
        return {"dropped_udp": 4, "dropped_icmp": 0}

    gateway = type("G", (), {})()
    gateway.policy, gateway.registry = Policy(), [1, 2]
    gateway.gate = type(
        "Gate", (), {"counts": ConnectionCounts(), "connections": {"a": 1, "b": 2, "c": 3}}
    )()
    for sandbox in ("10.0.0.2", "10.0.0.2", "10.0.0.3"):
        gateway.gate.counts.admit(sandbox)
    gateway.gate.counts.decided("10.0.0.2")
    metrics = Metrics()
    metrics.watch_gateway(gateway)
    metrics.watch_audit(Audit())
    metrics.watch_firewall(firewall, min_interval=0)
    assert value(metrics, "sandgate_policy_info", hash="abc123") == 1
    assert value(metrics, "sandgate_policy_rules") == 14
    assert value(metrics, "sandgate_active_sandboxes") == 2
    assert value(metrics, "sandgate_active_connections") == 3
    assert value(metrics, "sandgate_sandbox_connections", state="open") == 3
    assert value(metrics, "sandgate_sandbox_connections", state="pending") == 2
    assert value(metrics, "sandgate_audit_events_written_total") == 7
    assert value(metrics, "sandgate_audit_events_lost_total") == 1
    assert value(metrics, "sandgate_audit_write_errors_total") == 2
    assert value(metrics, "sandgate_audit_queue_length") == 3
    assert value(metrics, "sandgate_firewall_dropped_packets_total", counter="dropped_udp") == 4
    # nft failing later (the table is gone at teardown): the last values stay.
    assert value(metrics, "sandgate_firewall_dropped_packets_total", counter="dropped_udp") == 4
    assert len(reads) >= 2


def test_firewall_counters_are_read_at_most_once_per_interval():
    reads = []
    metrics = Metrics()
    metrics.watch_firewall(lambda: reads.append(1) or {"dropped_udp": len(reads)}, min_interval=60)
    for _ in range(5):
        metrics.render()
    assert len(reads) == 1


def test_a_services_firewall_drops_count_as_its_sandboxes_end_and_never_go_down():
    """The service removes a sandbox's table when the sandbox ends: its drops are added
    then, once, and every counter name is exported from 0 (a series born at its first
    drop would hide that drop from increase())."""
    metrics = Metrics()
    assert not [s for s in series(metrics) if s[0].startswith("sandgate_firewall")]
    metrics.watch_firewall_ended(["dropped_udp", "dropped_icmp"])
    drops = "sandgate_firewall_dropped_packets_total"
    assert value(metrics, drops, counter="dropped_udp") == 0
    assert value(metrics, drops, counter="dropped_icmp") == 0
    metrics.count_firewall_drops({"dropped_udp": 3, "dropped_icmp": 0})
    metrics.count_firewall_drops({"dropped_udp": 2, "dropped_ipv6": 1})
    assert value(metrics, drops, counter="dropped_udp") == 5
    assert value(metrics, drops, counter="dropped_icmp") == 0
    assert value(metrics, drops, counter="dropped_ipv6") == 1
    # `sandgate run`'s live read of its one table adds to what ended (nothing, there).
    metrics.watch_firewall(lambda: {"dropped_udp": 4}, min_interval=0)
    assert value(metrics, drops, counter="dropped_udp") == 9


def test_the_alerted_series_exist_at_zero_before_their_first_event():
    """increase() needs a sample before the first increment: a series born at 1 (the
    first failed reload) would never fire SandgatePolicyReloadFailed."""
    metrics = Metrics()
    assert value(metrics, "sandgate_policy_reloads_total", result="failure") == 0
    zeros = {(n, tuple(sorted(ls.items()))) for n, ls, v in series(metrics) if v == 0}
    assert ("sandgate_policy_reloads_total", (("result", "failure"),)) in zeros
    assert ("sandgate_events_total", (("kind", "connection"), ("verdict", "deny"))) in zeros
    assert ("sandgate_metric_label_overflow_total", (("label", "rule"),)) in zeros
    assert ("sandgate_task_limits_total", (("limit", "memory"),)) in zeros
    assert ("sandgate_sandbox_weakened_total", (("feature", "seccomp"),)) in zeros
    metrics.emit(event(EventKind.POLICY, reason=Reason.POLICY_INVALID))
    assert value(metrics, "sandgate_policy_reloads_total", result="failure") == 1


def test_worker_restarts_and_the_start_time_are_exported_from_the_start():
    """A restart of a worker, or of the whole process (all counters back to 0), is
    something a dashboard can see: a counter present at 0, a start-time gauge."""
    before = time.time()
    metrics = Metrics()
    assert value(metrics, "sandgate_worker_restarts_total") == 0
    assert before <= value(metrics, "sandgate_start_time_seconds") <= time.time()
    metrics.worker_restarts.inc()
    assert value(metrics, "sandgate_worker_restarts_total") == 1


def test_serves_metrics_over_http_from_a_thread():
    metrics = Metrics()
    metrics.emit(event())
    host, port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'sandgate_connections_total{profile="default",protocol="",reason="no_rule",' in body
    finally:
        metrics.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()


def test_the_exposition_side_is_not_imported_until_served():
    """What a start pays: the metric classes, not wsgiref, http.server, ssl (~15-20 ms)."""
    code = (
        "import sys\n"
        "from sandgate.proxy.telemetry.metrics import Metrics\n"
        "Metrics()\n"
        "heavy = {'prometheus_client.exposition', 'wsgiref.simple_server', 'http.server'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "print(Metrics().render().count(b'# TYPE sandgate_'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, rendered = out.stdout.splitlines()
    assert imported == "[]"
    assert int(rendered) > 10  # rendering imports what it needs by itself


def test_the_server_imports_the_exposition_side_at_the_first_scrape():
    """Serving costs a start nothing but the bound socket: the server thread makes the
    WSGI server (wsgiref, http.server, email) when the first scrape connects."""
    code = (
        "import sys, socket, time\n"
        "from sandgate.proxy.telemetry.metrics import Metrics\n"
        "m = Metrics()\n"
        "host, port = m.serve('127.0.0.1', 0)\n"
        "time.sleep(0.3)\n"
        "heavy = {'prometheus_client.exposition', 'wsgiref.simple_server', 'http.server'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "with socket.create_connection((host, port), timeout=5) as s:\n"
        "    s.sendall(b'GET /metrics HTTP/1.0\\r\\n\\r\\n')\n"
        "    reply = b''.join(iter(lambda: s.recv(65536), b''))\n"
        "m.stop()\n"
        "head, _, body = reply.partition(b'\\r\\n\\r\\n')\n"
        "print(head.split(b'\\r\\n')[0].decode(), body == m.render())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "HTTP/1.0 200 OK True"]


def test_a_taken_port_raises_oserror_for_the_caller_to_report():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            Metrics().serve("127.0.0.1", taken.getsockname()[1])


def test_sandgate_run_warns_and_goes_on_when_the_default_metrics_port_is_taken(capsys):
    """The default address (another run's, most often): a warning, the task goes on."""
    from sandgate.enforcer.run import RunOptions, TaskRun

    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # in use already: taken all the same
            taken.bind(RunOptions.metrics_listen)
            taken.listen()
        run = TaskRun(RunOptions(command=["true"], policy=load_policy([DEMO])))
        run._start_metrics()  # no exception: the task would go on
    assert "warning: no metrics for this run" in capsys.readouterr().err
    assert "metrics" not in run.summary.telemetry


@pytest.mark.parametrize("default", [False, True], ids=["another-address", "the-default-given"])
def test_sandgate_run_stops_when_a_metrics_address_given_is_taken(default):
    """--metrics-listen given explicitly, the default address too: whoever has the port
    would answer the scrapes: the run stops, before its task (enforcer/run.py starts it
    early then)."""
    from sandgate.enforcer.run import RunError, RunOptions, TaskRun

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # the default in use already: taken all the same
            taken.bind(RunOptions.metrics_listen if default else ("127.0.0.1", 0))
            taken.listen()
        host, port = RunOptions.metrics_listen if default else taken.getsockname()
        run = TaskRun(
            RunOptions(
                command=["true"],
                policy=load_policy([DEMO]),
                metrics_listen=(host, port),
                metrics_listen_given=True,
            )
        )
        with pytest.raises(RunError, match=rf"--metrics-listen 127.0.0.1:{port}: cannot listen"):
            run._start_metrics()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:9464", ("127.0.0.1", 9464), id="v4"),
        pytest.param("[::1]:9464", ("::1", 9464), id="v6"),
        pytest.param("localhost:0", ("localhost", 0), id="any-port"),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", ":9464", "host:", "host:http", "host:70000"])
def test_parse_listen_rejects(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


def test_bad_metrics_listen_is_a_usage_error(capsys):
    from sandgate.enforcer.cli import main

    assert main(["run", "--rules", str(DEMO), "--metrics-listen", "9464", "--", "true"]) == 2
    assert "--metrics-listen" in capsys.readouterr().err


def test_emit_cost_is_cached_children():
    """labels() resolves once per label tuple; later events hit the cache."""
    metrics = Metrics()
    e = event(protocol="tls", latency=0.0001)
    metrics.emit(e)
    started = time.perf_counter()
    for _ in range(20_000):
        metrics.emit(e)
    per_event = (time.perf_counter() - started) / 20_000
    metrics.flush()
    assert len(metrics._children) == 1
    assert value(metrics, "sandgate_connections_total") == 20_001
    assert per_event < 50e-6  # ~2 µs here; generous for slow CI machines


# --- the tally: a connection's events counted off the connection path ------------------


def _mix() -> list[Event]:
    """Events of every tallied kind, with latencies in several buckets (one past the
    last), DNS durations, bytes and methods, plus kinds that are not tallied."""
    out = []
    for i in range(40):
        kind = (EventKind.CONNECTION, EventKind.CONNECTION_END, EventKind.DNS,
                EventKind.REQUEST, EventKind.TASK)[i % 5]  # fmt: skip
        verdict, reason = ((Verdict.ALLOW, Reason.RULE_ALLOW), (Verdict.DENY, Reason.NO_RULE))[
            i % 2
        ]
        fields = {"rule_id": f"r{i % 3}", "protocol": ("tls", "http")[i % 2], "method": "GET"}
        if kind is EventKind.DNS:
            fields["duration"] = 0.0004 * i
        elif kind is EventKind.CONNECTION_END:
            fields.update(bytes_up=i, bytes_down=100 * i)
        else:
            fields["latency"] = (0.00003, 0.0002, 0.004, 9.0)[i % 4]
        out.append(event(kind, verdict, reason, **fields))
    return out


def _sorted_series(metrics: Metrics) -> list:
    return sorted((n, sorted(ls.items()), v) for n, ls, v in series(metrics))


def test_tallied_events_make_the_series_each_event_makes():
    per_event, tallied = Metrics(), Metrics()
    for e in _mix() * 3:
        per_event._count(e)  # prometheus-client per event, as before the tally
        tallied.emit(e)
    expected, got = _sorted_series(per_event), _sorted_series(tallied)
    assert [s[:2] for s in got] == [s[:2] for s in expected]
    assert [s[2] for s in got] == pytest.approx([s[2] for s in expected])
    assert value(tallied, "sandgate_events_total") == 120  # not vacuous
    assert value(tallied, "sandgate_decision_latency_seconds_bucket", le="+Inf") == 72


def _counted(counter) -> float:
    """A counter's total read from the counter itself, not through the registry
    (whose reads flush the tally first)."""
    return sum(s.value for family in counter.collect() for s in family.samples
               if s.name.endswith("_total"))  # fmt: skip


def test_tallied_events_reach_the_registry_only_when_flushed():
    metrics = Metrics()
    metrics.emit(event(protocol="tls", latency=0.0001))
    assert _counted(metrics.connections) == 0  # held in the tally: not on the event's path
    assert value(metrics, "sandgate_connections_total", protocol="tls") == 1  # a read flushes
    assert _counted(metrics.connections) == 1


def test_every_scrape_sees_every_event_emitted_before_it():
    metrics = Metrics()
    for n in range(1, 4):
        metrics.emit(event(protocol="tls", latency=0.0001))
        text = metrics.render().decode()
        assert f'sandgate_events_total{{kind="connection",verdict="deny"}} {n}.0' in text
    # A filtered scrape (/metrics?name[]=...) reads a restricted registry: it flushes too.
    metrics.emit(event(protocol="tls"))
    restricted = metrics.registry.restricted_registry(["sandgate_events_total"])
    assert [s.value for family in restricted.collect() for s in family.samples if s.value] == [4.0]


def test_served_metrics_are_exact_at_every_scrape():
    metrics = Metrics()
    host, port = metrics.serve("127.0.0.1", 0)
    try:
        for _ in range(5):
            metrics.emit(event(EventKind.DNS, Verdict.ALLOW, Reason.RULE_ALLOW, duration=0.001))
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        metrics.stop()
    assert (
        'sandgate_dns_queries_total{profile="default",reason="rule_allow",rule="default:fallback",verdict="allow"} 5.0'
        in text
    )


def test_nothing_tallied_is_lost_at_stop():
    metrics = Metrics()
    for _ in range(7):
        metrics.emit(event(EventKind.REQUEST, protocol="http", method="GET", latency=0.0001))
    metrics.emit(event(EventKind.CONNECTION_END, bytes_up=10, bytes_down=20))
    assert _counted(metrics.http_requests) == 0
    metrics.stop()
    assert _counted(metrics.http_requests) == 7
    assert _counted(metrics.events) == 8
    assert _counted(metrics.bytes) == 30


def test_the_loop_flushes_the_tally_on_a_tick(monkeypatch):
    monkeypatch.setattr(metrics_module, "TALLY_INTERVAL", 0.01)
    metrics = Metrics()

    async def emit_and_wait(wait: float) -> list[float]:
        seen = []
        for _ in range(2):  # the second tick is armed by the first event after the first
            metrics.emit(event(protocol="tls"))
            seen.append(_counted(metrics.connections))
            await asyncio.sleep(wait)
            seen.append(_counted(metrics.connections))
        return seen

    assert asyncio.run(emit_and_wait(0.2)) == [0, 1, 1, 2]
    # A loop that closes before its tick: a read flushes, and the next loop ticks.
    assert asyncio.run(emit_and_wait(0)) == [2, 2, 2, 2]
    assert value(metrics, "sandgate_connections_total") == 4
    assert asyncio.run(emit_and_wait(0.2)) == [4, 5, 5, 6]


def test_flushes_from_another_thread_lose_no_event():
    """The scrape thread flushes while the loop's thread tallies: every event is
    counted exactly once."""
    metrics = Metrics()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            metrics.flush()

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):
            metrics.emit(event(protocol="tls", rule_id=f"r{i % 7}", latency=0.0001))
    finally:
        stop.set()
        scraper.join()
    assert value(metrics, "sandgate_connections_total") == 20_000
    assert value(metrics, "sandgate_decision_latency_seconds_count") == 20_000
