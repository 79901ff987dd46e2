"""Telemetry cost benchmark (not a test): decision throughput with telemetry on vs off.

    .venv/bin/python bench/bench_telemetry.py [--decisions 100000] [--queries 10000] [--rounds 7]

Measured side by side in one run, rounds interleaved, best round of each kept:

1. policy decisions: `decide()` on a mix of DNS questions, connections and HTTP
   requests (allowed and denied, demo rules), each turned into an `Event`,
   stamped as `Gateway.emit` stamps it (policy hash, task id) and sent through the
   `EventFanout` — with no sinks (off), the metrics sink, the audit log, both (on).
2. the DNS filter: `DnsFilter.handle` on queries for denied names (parse, decide,
   answer NXDOMAIN, emit) through a real `Gateway`, no sockets: the cheapest real
   decision point of the gateway, so the one where telemetry weighs most.
3. the parts, one thread: what each sink costs per event on the event loop
   (`emit`), and what the audit writer thread spends per line.

Cost is CPU time of the whole process (both threads: the audit writer shares the
GIL, so its work slows the gateway as much as work on the loop would), per
decision. Work comes in chunks of 1,000 decisions, after each of which the audit
writer catches up, as it does when the gateway's loop waits for I/O; the "burst"
column runs all decisions back to back instead (wall time, until the audit log is
written): an audit backlog of 100k events costs extra garbage-collector time.

Goal (issue 4): telemetry costs <= 10% of decision throughput. Run on a quiet
machine: other load inflates thread hand-overs and makes rounds disagree.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import random
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dns.message  # noqa: E402
from sandgate.proxy.gateway import Gateway, GatewayConfig  # noqa: E402
from sandgate.proxy.policy import ConnectFacts, NameFacts, RequestFacts, decide, load_policy  # noqa: E402
from sandgate.proxy.policy.load import RULES_DIR  # noqa: E402
from sandgate.proxy.registry import Sandbox  # noqa: E402
from sandgate.proxy.telemetry.audit import AuditLog, audit_members, encode_line  # noqa: E402
from sandgate.proxy.telemetry.event import Event, EventFanout, EventKind  # noqa: E402
from sandgate.proxy.telemetry.metrics import Metrics  # noqa: E402

DEMO = RULES_DIR / "examples" / "demo.yaml"
SANDBOX = "10.213.0.2"
CONFIGS = ("off", "metrics", "audit", "metrics+audit")
CHUNK = 1000
TLS_CONNECTION_US = 1600  # gateway CPU per TLS passthrough connection (DESIGN.md: ~620/s)


def _facts(count: int, seed: int = 7) -> list[tuple[EventKind, object, dict]]:
    """(kind, facts, event fields) for a realistic mix of decision points."""
    rng = random.Random(seed)
    allowed = [
        "allowed.test",
        "www.allowed.test",
        "api.allowed.test",
        "pypi.org",
        "files.pythonhosted.org",
    ]
    out = []
    for i in range(count):
        name = (
            rng.choice(allowed)
            if rng.random() < 0.6
            else "".join(rng.choices(string.ascii_lowercase, k=12))
            + rng.choice([".evil.test", ".example.com"])
        )
        ip = ipaddress.ip_address(f"203.0.113.{rng.randrange(1, 255)}")
        fields = {
            "sandbox": SANDBOX,
            "profile": "default",
            "source": f"{SANDBOX}:{40000 + i % 20000}",
        }
        roll = rng.random()
        if roll < 0.4:
            out.append(
                (
                    EventKind.DNS,
                    NameFacts("default", name),
                    {**fields, "name": name, "protocol": "dns", "duration": 0.0004},
                )
            )
        elif roll < 0.8:
            out.append(
                (
                    EventKind.CONNECTION,
                    ConnectFacts("default", 443, ip=ip, name=name, name_resolved_to_ip=True),
                    {
                        **fields,
                        "name": name,
                        "dst_ip": str(ip),
                        "dst_port": 443,
                        "protocol": "tls",
                        "latency": 0.00005,
                    },
                )
            )
        else:
            method = rng.choice(["GET", "GET", "POST"])
            path = rng.choice(["/public/repo", "/private/x", "/simple/"])
            out.append(
                (
                    EventKind.REQUEST,
                    RequestFacts(
                        "default", 443, method, path, ip=ip, name=name, name_resolved_to_ip=True
                    ),
                    {
                        **fields,
                        "name": name,
                        "dst_ip": str(ip),
                        "dst_port": 443,
                        "protocol": "https",
                        "method": method,
                        "path": path,
                        "latency": 0.00005,
                    },
                )
            )
    return out


def _sinks(config: str, workdir: Path, count: int) -> tuple[list, AuditLog | None]:
    sinks, audit = [], None
    if "metrics" in config:
        sinks.append(Metrics())
    if "audit" in config:
        # Room for every event: the burst runs events ~10x faster than the gateway
        # ever makes them (a DNS query alone costs ~90 us), for as long as it takes.
        audit = AuditLog(workdir / f"{config}-{time.monotonic_ns()}.jsonl", queue_size=count + 1)
        sinks.append(audit)
    return sinks, audit


class Clock:
    """CPU seconds of the process (all threads) and wall seconds, from creation."""

    def __init__(self) -> None:
        gc.collect()
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        return time.process_time() - self.cpu, time.perf_counter() - self.wall


def _finish(audit: AuditLog | None) -> None:
    if audit is not None:
        audit.close()  # waits for the writer: its work is part of the cost
        assert audit.lost == 0, f"audit lost {audit.lost} events"


def bench_decisions(policy, mix, config: str, workdir: Path, chunk: int) -> float:
    sinks, audit = _sinks(config, workdir, len(mix))
    fanout = EventFanout(*sinks)
    policy_hash, task_id = policy.hash, "bench"
    clock = Clock()
    for start in range(0, len(mix), chunk):
        for kind, facts, fields in mix[start : start + chunk]:
            decision = decide(policy, facts)
            event = Event.from_decision(kind, decision, **fields)
            fanout.emit(event.with_fields(policy_hash=policy_hash, task_id=task_id))
        if audit is not None and chunk < len(mix):
            audit.drain()
    _finish(audit)
    cpu, wall = clock.read()
    return cpu if chunk < len(mix) else wall


def bench_dns(policy, wires: list[bytes], config: str, workdir: Path, chunk: int) -> float:
    sinks, audit = _sinks(config, workdir, len(wires))
    gateway = Gateway(
        GatewayConfig(listen_host="127.0.0.1", dns_upstreams=["127.0.0.1"], confdir=workdir / "ca"),
        policy,
        *sinks,
    )
    gateway.add_sandbox(Sandbox(SANDBOX, "bench", "default"))

    async def run() -> float:
        handle = gateway.dns.handle
        clock = Clock()
        for start in range(0, len(wires), chunk):
            for i in range(start, min(start + chunk, len(wires))):
                await handle(wires[i], (SANDBOX, 40000 + i % 20000), udp=True)
            if audit is not None and chunk < len(wires):
                audit.drain()
        _finish(audit)
        cpu, wall = clock.read()
        return cpu if chunk < len(wires) else wall

    return asyncio.run(run())


def bench_parts(policy, mix, workdir: Path) -> dict[str, float]:
    """Microseconds per event for each piece, single-threaded, best of 3."""
    events = [
        Event.from_decision(kind, decide(policy, facts), **fields).with_fields(
            policy_hash="h", task_id="t"
        )
        for kind, facts, fields in mix
    ]
    parts: dict[str, float] = {}

    def best_of(label, run) -> None:
        times = []
        for _ in range(3):
            gc.collect()
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        parts[label] = min(times) / len(events) * 1e6

    def baseline():
        for kind, facts, fields in mix:
            Event.from_decision(kind, decide(policy, facts), **fields).with_fields(
                policy_hash="h", task_id="t"
            )

    encoded = [audit_members(e) for e in events]  # the loop's emit encodes them

    def writer():
        prev = "0" * 64
        for seq, members in enumerate(encoded, start=1):
            _, prev = encode_line(members, seq, prev)

    metrics = Metrics()
    best_of("decide + Event + stamp (the baseline)", baseline)
    best_of("Metrics.emit (loop)", lambda: [metrics.emit(e) for e in events])
    times = []
    for _ in range(3):
        audit = AuditLog(
            workdir / f"parts-{time.monotonic_ns()}.jsonl",
            queue_size=len(events) + 1,
            batch_size=len(events) + 1,
            flush_interval=3600,
        )  # the writer stays asleep
        gc.collect()
        started = time.perf_counter()
        for e in events:
            audit.emit(e)
        times.append(time.perf_counter() - started)
        audit.close()
    parts["AuditLog.emit (loop: enqueue)"] = min(times) / len(events) * 1e6
    best_of("audit line: chain (writer)", writer)
    return parts


def _report(
    title: str, unit: str, count: int, paced: dict[str, float], burst: dict[str, float]
) -> None:
    base, burst_base = paced["off"], burst["off"]
    print(f"\n{title}")
    print(
        f"  {'telemetry':15} {unit + '/cpu-s':>14} {'cpu us/' + unit:>15} {'cost vs off':>12}"
        f" {'burst cost':>11}"
    )
    for config in CONFIGS:
        seconds = paced[config]
        print(
            f"  {config:15} {count / seconds:14,.0f} {seconds / count * 1e6:15.2f} "
            f"{(seconds / base - 1) * 100:+11.1f}% {(burst[config] / burst_base - 1) * 100:+10.1f}%"
        )
    on = paced["metrics+audit"]
    print(
        f"  on/off throughput ratio {base / on:.3f}: telemetry costs {(on / base - 1) * 100:.1f}% "
        f"({(on - base) / count * 1e6:.2f} us per event; goal <= 10%)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    policy = load_policy([DEMO])
    mix = _facts(args.decisions)
    rng = random.Random(3)
    wires = [
        dns.message.make_query(
            "".join(rng.choices(string.ascii_lowercase, k=12)) + ".evil.test",
            rng.choice(["A", "AAAA"]),
        ).to_wire()
        for _ in range(args.queries)
    ]
    print(
        f"python {sys.version.split()[0]}, policy {DEMO.name} ({policy.rule_count} rules), "
        f"{args.rounds} rounds interleaved, best of each"
    )
    results: dict[str, dict[str, float]] = {
        "decisions": {},
        "decisions-burst": {},
        "dns": {},
        "dns-burst": {},
    }

    def keep(name: str, config: str, seconds: float) -> None:
        results[name][config] = min(results[name].get(config, seconds), seconds)

    with tempfile.TemporaryDirectory(prefix="sandgate-bench-") as tmp:
        workdir = Path(tmp)
        for _ in range(args.rounds):
            for config in CONFIGS:
                keep("decisions", config, bench_decisions(policy, mix, config, workdir, CHUNK))
                keep(
                    "decisions-burst",
                    config,
                    bench_decisions(policy, mix, config, workdir, len(mix)),
                )
                keep("dns", config, bench_dns(policy, wires, config, workdir, CHUNK))
                keep("dns-burst", config, bench_dns(policy, wires, config, workdir, len(wires)))
            for path in workdir.glob("*.jsonl"):
                path.unlink()
        parts = bench_parts(policy, mix, workdir)

    _report(
        f"1. policy decisions -> Event -> stamp -> fan-out ({args.decisions:,} mixed dns/connect/request)",
        "decision",
        args.decisions,
        results["decisions"],
        results["decisions-burst"],
    )
    _report(
        f"2. DnsFilter.handle, denied names, through Gateway.emit ({args.queries:,} queries)",
        "query",
        args.queries,
        results["dns"],
        results["dns-burst"],
    )
    print("\n3. per event, single thread (us)")
    for label, micros in parts.items():
        print(f"  {label:40} {micros:6.2f}")
    loop = parts["Metrics.emit (loop)"] + parts["AuditLog.emit (loop: enqueue)"]
    total = loop + parts["audit line: chain (writer)"]
    query_us = results["dns"]["off"] / args.queries * 1e6
    print(
        f"  telemetry on the event loop {loop:.2f} us/event; with the audit writer's GIL share {total:.2f} us/event:"
    )
    print(
        f"  {total / parts['decide + Event + stamp (the baseline)'] * 100:.0f}% of a bare decision, "
        f"{total / query_us * 100:.1f}% of a DNS query's handling, "
        f"~{total / TLS_CONNECTION_US * 100:.1f}% of a TLS connection through mitmproxy (~1.6 ms, DESIGN.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
