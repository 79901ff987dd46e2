"""The DNS filter against querying its upstream directly, side by side on loopback.

    .venv/bin/python bench/bench_dns.py [--seconds 3] [--rounds 1] [--latency-queries 2000]

Not a test: it prints numbers, it asserts nothing. Loopback only (127.0.0.0/8), no
namespaces, no root needed; every process it starts is its child and is stopped
in `finally`.

- upstream: dnsmasq on 127.0.0.1 (its own port), answering `allowed.test` from its
  configuration (`--address`), no cache misses, no forwarding: a fast C server.
- sandgate: a real `Gateway` (proxy/gateway.py) in a child process, listening on
  127.0.0.1, with the audit log (a file in a temporary directory, with its journal)
  and the metrics as
  event sinks, as `sandgate run` has them, at the gateway's nice value
  (enforcer/priority.py: the clients here play the sandboxes' tasks, which run at 0),
  and rules that allow `allowed.test` and
  deny everything else. Its sandboxes are 127.0.0.2..127.0.0.33, spread over the
  client processes (each query socket or connection from one of them), so that the
  per-sandbox rate cap, `dns_qps` (set to its maximum, 1,000/s), stays far above
  what each is asked: the rows measure the filter, not the cap.

Rows, UDP and TCP:
- allowed name, direct: the clients ask dnsmasq;
- allowed name, via sandgate: the filter decides, forwards to dnsmasq, filters the
  answer, records the binding, emits the event;
- allowed name, the floor (bench/floor_dns.py): the least a Python forwarder does
  (no parsing, policy, bindings or events): what sandgate adds above it is its own
  work, and the floor's own latency is this host's price of any Python forwarder;
- denied name, via sandgate: answered by the filter alone (NXDOMAIN), never forwarded.

queries/s: `--procs` client processes, each keeping `--inflight` queries in flight
(UDP: one socket; TCP: that many connections, one query at a time on each, since
the filter answers a connection's queries in order) for `--seconds`. Latency: one
client, one query at a time, each from the next sandbox address (from one, a fast
host's back-to-back queries pass `dns_qps` and are dropped as they should be),
`--latency-queries` of them; p50/p99, and "added" =
via sandgate minus direct at the same percentile. The rows are measured in turn
(rates round by round, latencies in blocks of 500 queries): this host's speed
moves within minutes. Goal (issue 11): >= 5,000 queries/s and p99 added <= 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import multiprocessing
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hostspeed
from bench_http1 import run_as_gateways_do

ALLOWED, DENIED = "allowed.test", "denied.test"
SANDBOXES = [f"127.0.0.{i}" for i in range(2, 34)]
RULES = """version: 1
profiles:
  default:
    fallback: deny
    limits: {dns_qps: 1000, connections: 4096, connection_rate: 10000}
    rules:
      - allow: allowed.test
        id: bench-allowed
"""


def query_wire(name: str, qid: int) -> bytes:
    """A minimal A query (RD set) for `name` with id `qid`."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\x01\0\x01"


# --- the servers -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dnsmasq(port: int) -> subprocess.Popen:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    proc = subprocess.Popen(
        [dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null"]
        + ["--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}"]
        + [f"--address=/{ALLOWED}/203.0.113.10", "--user=root", "--pid-file=", "--cache-size=0"]
        + ["--max-tcp-connections=256"],
        stderr=subprocess.PIPE,
    )
    wait_answering(port, proc)
    return proc


def wait_answering(port: int, proc: subprocess.Popen) -> None:
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-500:] if proc.stderr else ''}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.1)
            s.bind((SANDBOXES[0], 0))
            s.sendto(query_wire(ALLOWED, 1), ("127.0.0.1", port))
            try:
                s.recv(512)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def dns_gateway(work: Path, upstream_port: int, port: int, audit):
    """The sandgate side (not started): a `Gateway` whose DNS filter listens on
    127.0.0.1:`port` and asks dnsmasq on `upstream_port`, with `audit` and the
    metrics as its sinks and SANDBOXES as its sandboxes."""
    from sandgate.proxy.gateway import Gateway, GatewayConfig
    from sandgate.proxy.policy import load_policy
    from sandgate.proxy.registry import Sandbox
    from sandgate.proxy.telemetry.metrics import Metrics

    rules = Path(work, "rules.yaml")
    rules.write_text(RULES)
    config = GatewayConfig(
        "127.0.0.1", ["127.0.0.1"], Path(work, "ca"), dns_port=port,
        dns_upstream_port=upstream_port,
    )  # fmt: skip
    gateway = Gateway(config, load_policy([rules]), audit, Metrics())
    for i, address in enumerate(SANDBOXES):
        gateway.add_sandbox(Sandbox(address, f"bench{i}", "default"))
    return gateway


def gateway_main(work: str, upstream_port: int, port: int) -> None:
    """The sandgate side, in its own process (as the gateway is in `sandgate run`)."""
    from sandgate.enforcer.priority import raise_gateway_priority
    from sandgate.proxy.telemetry.audit import AuditLog

    raise_gateway_priority()  # as `sandgate run` and the service run their gateway

    async def serve() -> None:
        # With its journal, as `sandgate run` opens it (enforcer/run.py, open_audit_log).
        audit = AuditLog(Path(work, "audit.jsonl"), journal=Path(work, "audit.ring"))
        gateway = dns_gateway(Path(work), upstream_port, port, audit)
        await gateway.start()
        await asyncio.Event().wait()

    run_as_gateways_do(serve())


# --- the clients -----------------------------------------------------------------------


def udp_load(sources: list[str], port: int, name: str, inflight: int, seconds: float, out) -> None:
    """`inflight` queries in flight, over one socket per sandbox address in `sources`."""
    socks = []
    sel = selectors.DefaultSelector()
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    wires = [query_wire(name, i) for i in range(65536)]
    qid, answered, lost = 0, 0, 0

    def start_all() -> None:
        nonlocal qid
        for i in range(inflight):
            socks[i % len(socks)].send(wires[qid])
            qid = (qid + 1) & 0xFFFF

    start_all()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ready = sel.select(0.2)
        if not ready:
            lost += inflight  # all in flight went missing: start again
            start_all()
            continue
        for key, _ in ready:
            sock = key.fileobj
            while True:
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
                answered += 1
                sock.send(wires[qid])
                qid = (qid + 1) & 0xFFFF
    out.put((answered, lost))


def tcp_load(sources: list[str], port: int, name: str, inflight: int, seconds: float, out) -> None:
    """`inflight` connections, each from the next sandbox address in `sources`."""
    sel = selectors.DefaultSelector()
    wire = query_wire(name, 7)
    framed = len(wire).to_bytes(2, "big") + wire
    turn = iter(range(1 << 62))

    def connect_and_ask() -> None:
        s = socket.socket()
        s.bind((sources[next(turn) % len(sources)], 0))
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        s.send(framed)
        sel.register(s, selectors.EVENT_READ, [b""])

    for _ in range(inflight):
        connect_and_ask()
    answered, reconnects = 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for key, _ in sel.select(0.2):
            s, state = key.fileobj, key.data
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:  # the filter closes after max_tcp_queries: open another
                sel.unregister(s)
                s.close()
                connect_and_ask()
                reconnects += 1
                continue
            buf = state[0] + data
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                buf = buf[2 + int.from_bytes(buf[:2], "big") :]
                answered += 1
                s.send(framed)
            state[0] = buf
    out.put((answered, reconnects))


def rate(port: int, name: str, tcp: bool, procs: int, inflight: int, seconds: float) -> float:
    out = multiprocessing.Queue()
    target = tcp_load if tcp else udp_load
    workers = [
        multiprocessing.Process(
            target=target, args=(SANDBOXES[i::procs], port, name, inflight, seconds, out)
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 30) for _ in workers]
    for w in workers:
        w.join()
    return sum(r[0] for r in results) / seconds


def latencies(port: int, name: str, tcp: bool, n: int) -> list[tuple[float, float]]:
    """(when it was sent, seconds) per query, one at a time, each from the next
    sandbox address: one sandbox asking back to back would be held to its `dns_qps`
    (on a fast host one query at a time is over 1,000/s), and the row would measure
    the cap."""
    wire = query_wire(name, 9)
    times = []
    if tcp:
        framed = len(wire).to_bytes(2, "big") + wire
        s = None
        for i in range(n):
            if i % 25 == 0:  # below the filter's max_tcp_queries per connection
                if s is not None:
                    s.close()
                source = SANDBOXES[(i // 25) % len(SANDBOXES)]
                s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
            t0 = time.perf_counter()
            s.sendall(framed)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                buf += s.recv(65536)
            times.append((t0, time.perf_counter() - t0))
        s.close()
        return times
    socks = []
    try:
        for source in SANDBOXES:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind((source, 0))
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
        for i in range(n):
            s = socks[i % len(socks)]
            t0 = time.perf_counter()
            s.send(wire)
            s.recv(4096)
            times.append((t0, time.perf_counter() - t0))
    finally:
        for s in socks:
            s.close()
    return times


def slow_period(sent: list[tuple[float, float]], over: float = 0.0004) -> str:
    """The queries more than `over` seconds above the median, and the gaps (ms)
    between them that recur most: a period there is periodic work in the gateway
    stalling its loop (session 24: the audit writer's batch, every 50 ms)."""
    median = pct([x for _, x in sent], 0.5)
    slow = [t for t, x in sent if x > median + over]
    gaps = collections.Counter(round((b - a) * 1e3) for a, b in itertools.pairwise(slow))
    common = ", ".join(f"{gap} ms x{count}" for gap, count in gaps.most_common(4) if gap > 5)
    return f"{len(slow)} of {len(sent)} queries over p50 + {over * 1e3:.1f} ms; gaps between them: {common}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- main ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per rate run (default 3)")
    parser.add_argument("--rounds", type=int, default=1, help="rate runs per row, median")
    parser.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--inflight", type=int, default=16, help="per client process (default 16)")
    parser.add_argument("--latency-queries", type=int, default=2000)
    args = parser.parse_args()
    upstream_port, filter_port = free_port(), free_port()
    speed = hostspeed.measure()
    with tempfile.TemporaryDirectory(prefix="sgbench-dns-") as work:
        dnsmasq = start_dnsmasq(upstream_port)
        gateway = multiprocessing.Process(
            target=gateway_main, args=(work, upstream_port, filter_port), daemon=True
        )
        gateway.start()
        floor = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("floor_dns.py"))]
            + ["127.0.0.1", "0", str(upstream_port)],
            stdout=subprocess.PIPE,
        )
        try:
            floor_port = int(floor.stdout.readline())
            rows = [  # (label, port, name)
                ("allowed, direct (dnsmasq)", upstream_port, ALLOWED),
                ("allowed, via sandgate", filter_port, ALLOWED),
                ("allowed, the floor", floor_port, ALLOWED),
                ("denied, via sandgate", filter_port, DENIED),
            ]
            wait_answering(filter_port, _Alive(gateway))
            wait_answering(floor_port, floor)
            results, tails = {}, {}
            for tcp in (False, True):
                proto = "TCP" if tcp else "UDP"
                # Round by round and block by block in turn: this host's speed moves
                # within minutes, and the "added" columns subtract two rows.
                rates = {row: [] for row in rows}
                for _ in range(args.rounds):
                    for row in rows:
                        rates[row].append(
                            rate(row[1], row[2], tcp, args.procs, args.inflight, args.seconds)
                        )
                sent = {row: [] for row in rows}
                block = max(1, min(500, args.latency_queries))
                for start in range(0, args.latency_queries, block):
                    for row in rows:
                        n = min(block, args.latency_queries - start)
                        sent[row] += latencies(row[1], row[2], tcp, n)
                for row in rows:
                    lat = [seconds for _, seconds in sent[row]]
                    results[(proto, row[0])] = (
                        statistics.median(rates[row]),
                        pct(lat, 0.5),
                        pct(lat, 0.99),
                    )
                    if row[1] != upstream_port and row[2] == ALLOWED:
                        tails[(proto, row[0])] = slow_period(sent[row])
        finally:
            floor.kill()
            floor.wait(10)
            gateway.terminate()
            gateway.join(10)
            dnsmasq.terminate()
            dnsmasq.wait(10)
    print(f"machine: {os.cpu_count()} CPUs, {os.uname().release}; python {sys.version.split()[0]}")
    print(hostspeed.describe(speed, hostspeed.measure()))
    print(
        f"{'':5}{'row':<28}{'queries/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'added p50':>11}{'added p99':>11}{'q/s vs direct':>15}"
    )
    for (proto, label), (qps, p50, p99) in results.items():
        direct = results[(proto, rows[0][0])]
        added = (
            ""
            if label == rows[0][0]
            else f"{(p50 - direct[1]) * 1e3:11.3f}{(p99 - direct[2]) * 1e3:11.3f}"
        )
        print(
            f"{proto:5}{label:<28}{qps:11,.0f}{p50 * 1e3:9.3f}{p99 * 1e3:9.3f}"
            f"{added or '':>22}{qps / direct[0]:14.2f}x"
        )
    for (proto, label), tail in tails.items():
        print(f"{proto} {label}, the tail: {tail}")
    print("goal: >= 5,000 queries/s via sandgate, p99 added <= 1 ms")
    return 0


class _Alive:
    """`wait_answering` wants a Popen-like poll() for a multiprocessing child."""

    def __init__(self, process: multiprocessing.Process):
        self.process, self.stderr = process, None

    def poll(self):
        return None if self.process.is_alive() else self.process.exitcode


if __name__ == "__main__":
    sys.exit(main())
