"""The gateway's instructions (and simulated cache misses) per plain-HTTP connection
(or DNS query), counted under valgrind's callgrind: an A/B that this host's noise cannot move.

    .venv/bin/python bench/bench_callgrind.py [--conns 400] [--with no-telemetry,no-audit,...]
                                              [--baseline REV] [--keep] [--dns udp|tcp|denied]

Not a test. bench_http1.py's setting (nginx on loopback; a real `Gateway` whose front
door takes 127.0.0.1 as its sandbox and 203.0.113.10:80 as the connections' original
destination), with the audit log's journal as `sandgate run` has it. Each variant's
gateway runs in its own process under `valgrind --tool=callgrind --cache-sim=yes
--instr-atstart=no`; after 200 warm-up connections the count is turned on
(`callgrind_control -i on`), `--conns` connections are made (eight client threads,
a new connection per request, `Connection: close`), the audit writer gets its
interval to write them, and the count is turned off. Printed per connection:
instructions (Ir), data reads and writes, and the simulated first-level instruction
and data cache misses (I1mr, D1mr, D1mw), and each variant's ratio to the checkout's.

Why: on this host CPU time per connection moves by +-10 % between runs of one tree
(docs/performance.md, "Session 34"), more than most levers give. Instruction counts
repeat within ~1 %. They are not time: a cache miss costs more than an instruction,
which is why the misses are printed too, and valgrind's CPU has no SHA extensions,
so OpenSSL's sha256 (the audit chain) runs its software path here: ~18k
instructions a line, where the host's CPU takes ~2k cycles.

Under valgrind the gateway runs ~40x slower, so the audit writer's `flush_interval`
is 5 s here (50 ms in a real gateway): its batches fill to `batch_size` as they do
at full speed, instead of a few lines each.

`--keep`: keep-alive requests instead, counted per request (eight connections, one a
thread, opened before the count; a request event each).

`--dns udp|tcp|denied`: DNS queries instead, counted per query, in bench_dns.py's
setting (its `dns_gateway` with the journal, dnsmasq as the upstream): the allowed name
over UDP or TCP, or the denied one over UDP; eight client threads, each from a sandbox
address of its own, one query at a time (over TCP a connection per 25 queries, below
the filter's `max_tcp_queries`).

Variants (`--with`, comma-separated): bench_http1's muted sinks (`no-telemetry`: the audit
log's and the metrics' `emit` and `emit_batch` do nothing; `no-audit`, `no-metrics`),
`no-journal` (the audit log without its journal). `--baseline REV`: also that revision's tree.

Needs valgrind (`apt-get install -y valgrind`) and nginx (`--dns`: dnsmasq). Nothing
leaves loopback; every process is stopped at the end, the work directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_dns import ALLOWED, DENIED, SANDBOXES, dns_gateway, query_wire, start_dnsmasq
from bench_http1 import (
    MUTED,
    NGINX,
    REQUEST_CLOSE,
    REQUEST_KEEP,
    export_tree,
    free_port,
    import_sandgate,
    loopback_gateway,
    run_as_gateways_do,
)

WARM_CONNS = 200
CLIENT_THREADS = 8
FLUSH_INTERVAL = 5.0  # the audit writer's, under valgrind (see above)
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw")


# --- the gateway (`--serve`: its own process, under valgrind) --------------------------


def serve(work: Path, upstream_port: int, variant: str, tree: str | None, dns: bool) -> None:
    """A gateway as bench_http1's (`dns`: as bench_dns's), with a journal; writes the
    port it serves (its front door's, or its DNS filter's) to work/port and serves
    until SIGTERM."""
    import_sandgate(tree, MUTED.get(variant, ()))
    from sandgate.proxy.telemetry.audit import AuditLog

    journal = None if variant == "no-journal" else work / "journal.ring"

    async def run() -> None:
        audit = AuditLog(work / "audit.jsonl", flush_interval=FLUSH_INTERVAL, journal=journal)
        if dns:
            gateway = dns_gateway(work, upstream_port, free_port(), audit)
        else:
            gateway = loopback_gateway(work, upstream_port, audit)
        await gateway.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        port = gateway.dns_port if dns else gateway.proxy_port
        (work / "port.tmp").write_text(str(port))
        (work / "port.tmp").rename(work / "port")
        await stop.wait()
        await gateway.stop()
        audit.close()

    run_as_gateways_do(run())


# --- the driver ----------------------------------------------------------------------------


def connections(port: int, count: int, kept: list[socket.socket] | None = None) -> int:
    """`count` requests from CLIENT_THREADS threads, each on a new connection, or
    (`kept`: a connection per thread, opened before) one after the other on the
    thread's connection; how many got a 200."""
    ok = [0] * CLIENT_THREADS

    def one_thread(i: int) -> None:
        for _ in range(count // CLIENT_THREADS):
            if kept is not None:
                ok[i] += keep_alive_exchange(kept[i])
                continue
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(REQUEST_CLOSE % b"/")
                answer = b""
                while data := s.recv(65536):
                    answer += data
            ok[i] += answer.startswith(b"HTTP/1.1 200")

    return on_client_threads(one_thread, ok)


def dns_queries(port: int, count: int, row: str) -> int:
    """`count` queries from CLIENT_THREADS threads, one at a time each, from a sandbox
    address of its own: over UDP (row "udp": the allowed name; "denied": the denied
    one) or TCP ("tcp": the allowed name, a connection per 25 queries, below the
    filter's `max_tcp_queries`); how many got the answer they should (NOERROR with
    an answer, or NXDOMAIN)."""
    ok = [0] * CLIENT_THREADS
    name = DENIED if row == "denied" else ALLOWED
    rcode = 3 if row == "denied" else 0

    def one_thread(i: int) -> None:
        wire, s = query_wire(name, 7), None
        try:
            for k in range(count // CLIENT_THREADS):
                if row != "tcp":
                    if s is None:
                        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        s.bind((SANDBOXES[i], 0))
                        s.settimeout(60)
                        s.connect(("127.0.0.1", port))
                    s.send(wire)
                    answer = s.recv(4096)
                else:
                    if k % 25 == 0:
                        if s is not None:
                            s.close()
                        s = socket.create_connection(("127.0.0.1", port), 60, (SANDBOXES[i], 0))
                    s.sendall(len(wire).to_bytes(2, "big") + wire)
                    answer = b""
                    while len(answer) < 2 or len(answer) < 2 + int.from_bytes(answer[:2], "big"):
                        answer += s.recv(65536)
                    answer = answer[2:]
                ok[i] += answer[3] & 0x0F == rcode and (rcode > 0 or answer[6:8] != b"\0\0")
        finally:
            if s is not None:
                s.close()

    return on_client_threads(one_thread, ok)


def on_client_threads(one_thread, ok: list[int]) -> int:
    """`one_thread(i)` on each of CLIENT_THREADS threads, all at once; the sum of `ok`,
    where thread i counts its good answers in `ok[i]`."""
    threads = [threading.Thread(target=one_thread, args=(i,)) for i in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def keep_alive_exchange(s: socket.socket) -> bool:
    """One request on a kept connection, its whole answer read (Content-Length)."""
    s.sendall(REQUEST_KEEP % b"/")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return head.startswith(b"HTTP/1.1 200")


def count(
    work: Path,
    upstream_port: int,
    variant: str,
    tree: str | None,
    conns: int,
    keep: bool,
    dns: str | None,
) -> dict:
    """One variant's counts per connection (`keep`: per keep-alive request; `dns`: per
    query of that row)."""
    vwork = work / variant.replace(" ", "-")
    vwork.mkdir()
    out = vwork / "callgrind.out"
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
        f"--callgrind-out-file={out}",
        sys.executable, __file__, "--serve", str(vwork), str(upstream_port), variant, tree or "",
        "dns" if dns else "",
    ]  # fmt: skip
    with open(vwork / "valgrind.log", "w") as log:
        gateway = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    kept = None
    try:
        deadline = time.monotonic() + 300
        while not (vwork / "port").exists():
            if gateway.poll() is not None or time.monotonic() > deadline:
                tail = (vwork / "valgrind.log").read_text()[-2000:]
                raise RuntimeError(f"{variant}: the gateway did not start:\n{tail}")
            time.sleep(0.5)
        port = int((vwork / "port").read_text())
        if keep:
            kept = [socket.create_connection(("127.0.0.1", port), timeout=60)
                    for _ in range(CLIENT_THREADS)]  # fmt: skip

        def drive(n: int) -> int:
            return dns_queries(port, n, dns) if dns else connections(port, n, kept)

        drive(WARM_CONNS)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(gateway.pid)], check=True, capture_output=True
        )
        ok = drive(conns)
        time.sleep(FLUSH_INTERVAL + 1)  # the writer writes the last part of a batch
        subprocess.run(
            ["callgrind_control", "-i", "off", str(gateway.pid)], check=True, capture_output=True
        )
    finally:
        for s in kept or ():
            s.close()
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(timeout=120)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
    if ok != conns:
        what = "queries got no right answer" if dns else "connections got no 200"
        raise RuntimeError(f"{variant}: {conns - ok} of {conns} {what}")
    lines = out.read_text().splitlines()
    names = next(line for line in lines if line.startswith("events:")).split()[1:]
    totals = next(line for line in reversed(lines) if line.startswith(("totals:", "summary:")))
    counted = dict(zip(names, map(int, totals.split()[1:]), strict=False))
    return {name: counted.get(name, 0) / conns for name in EVENTS}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        work, upstream_port, variant, tree, dns = sys.argv[2:7]
        serve(Path(work), int(upstream_port), variant, tree or None, bool(dns))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conns", type=int, default=400, help="connections counted (x 8 threads)")
    parser.add_argument(
        "--with", dest="others", default="", help="no-telemetry, no-audit, no-metrics, no-journal"
    )
    parser.add_argument("--baseline", metavar="REV", help="also this git revision's tree")
    parser.add_argument(
        "--keep", action="store_true", help="keep-alive requests (a connection per thread)"
    )
    parser.add_argument(
        "--dns",
        choices=("udp", "tcp", "denied"),
        help="DNS queries instead (bench_dns's gateway and dnsmasq): the allowed name over "
        "UDP or TCP, or the denied one over UDP",
    )
    args = parser.parse_args()
    others = [o for o in args.others.split(",") if o]
    if set(others) - {*MUTED, "no-journal"}:
        parser.error(f"--with takes {', '.join(MUTED)}, no-journal")
    missing = [t for t in ("valgrind", "callgrind_control") if not shutil.which(t)]
    server = "dnsmasq" if args.dns else "nginx"
    if not shutil.which(server, path=os.environ.get("PATH", "") + ":/usr/sbin"):
        missing.append(server)
    if missing:
        print(f"bench_callgrind: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    conns = args.conns - args.conns % CLIENT_THREADS
    work = Path(tempfile.mkdtemp(prefix="sg-callgrind-"))
    upstream = None
    try:
        upstream_port = free_port()
        if args.dns:
            upstream = start_dnsmasq(upstream_port)
        else:
            nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
            (work / "nginx.conf").write_text(NGINX.format(w=work, port=upstream_port))
            upstream = subprocess.Popen([nginx, "-c", work / "nginx.conf", "-p", work])
        variants: dict[str, str | None] = {"sandgate": None, **dict.fromkeys(others)}
        if args.baseline:
            variants[f"baseline {args.baseline}"] = str(export_tree(args.baseline, work / "tree"))
        results = {}
        for variant, tree in variants.items():  # one at a time: counts, not times
            print(f"{variant}: {conns} {'queries' if args.dns else 'connections'} under callgrind ...",
                  flush=True)  # fmt: skip
            try:
                results[variant] = count(
                    work,
                    upstream_port,
                    variant.split()[0] if tree else variant,
                    tree,
                    conns,
                    args.keep,
                    args.dns,
                )
            except RuntimeError as e:
                print(f"bench_callgrind: {e}", file=sys.stderr)
                return 1
        if args.dns:
            unit = {"udp": "allowed", "tcp": "allowed, over TCP", "denied": "denied"}[args.dns]
            print(f"\nper DNS query ({unit}), {conns} counted")
        else:
            unit = "keep-alive request" if args.keep else "connection (new connection, one request)"
            print(f"\nper plain-HTTP {unit}, {conns} counted")
        print(f"{'variant':<22}" + "".join(f"{e:>10}" for e in EVENTS) + f"{'Ir ratio':>10}")
        base = results["sandgate"]["Ir"]
        for variant, per in results.items():
            cells = "".join(f"{per[e]:>10,.0f}" for e in EVENTS)
            print(f"{variant:<22}{cells}{per['Ir'] / base:>9.3f}x")
        return 0
    finally:
        if upstream is not None:
            upstream.terminate()
            upstream.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
