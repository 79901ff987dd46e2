"""The gateway's instructions (and simulated cache misses) per plain-HTTP connection
(or TLS pass-through connection, or DNS query), counted under valgrind's callgrind: an
A/B that this host's noise cannot move.

    .venv/bin/python bench/bench_callgrind.py [--conns 400] [--with no-telemetry,no-audit,...]
                                              [--baseline REV]
                                              [--keep | --tls | --inspected | --dns udp|tcp|denied]

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

`--tls`: TLS pass-through connections instead (the same gateway; the connections' original
destination 203.0.113.10:443, nginx's TLS port behind it with a certificate made for the
run): a new connection a request, each client thread's handshake in full; the gateway
decides on the ClientHello's name and relays the handshake and the exchange.

`--inspected`: keep-alive requests over inspected TLS instead, counted per request (a
method/path rule, bench_gateway's setup I: the front door's own TLS relay decrypts, each
request is decided as plain HTTP's are, and goes on over TLS to nginx, verified against
the run's certificate); eight connections, one a thread, their handshakes before the
count.

`--dns udp|tcp|denied`: DNS queries instead, counted per query, in bench_dns.py's
setting (its `dns_gateway` with the journal, dnsmasq as the upstream): the allowed name
over UDP or TCP, or the denied one over UDP; eight client threads, each from a sandbox
address of its own, one query at a time (over TCP a connection per 25 queries, below
the filter's `max_tcp_queries`).

Variants (`--with`, comma-separated): bench_http1's muted sinks (`no-telemetry`: the audit
log's and the metrics' `emit` and `emit_batch` do nothing; `no-audit`, `no-metrics`),
`no-journal` (the audit log without its journal). `--baseline REV`: also that revision's tree.

Needs valgrind (`apt-get install -y valgrind`) and nginx (`--dns`: dnsmasq; `--tls`,
`--inspected`: openssl to make the certificate). Nothing leaves loopback; every process is stopped at
the end, the work directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_dns import ALLOWED, DENIED, SANDBOXES, dns_gateway, query_wire, start_dnsmasq
from bench_http1 import (
    DESTINATION,
    INSPECT_RULES,
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
DNS_ROWS = ("udp", "tcp", "denied")


# --- the gateway (`--serve`: its own process, under valgrind) --------------------------


def serve(work: Path, upstream_port: int, variant: str, tree: str | None, mode: str) -> None:
    """A gateway as bench_http1's (`mode` "dns": as bench_dns's; "tls": its connections'
    original destination port 443; "inspected": that, with INSPECT_RULES), with a journal; writes the port it serves (its
    front door's, or its DNS filter's) to work/port and serves until SIGTERM."""
    import_sandgate(tree, MUTED.get(variant, ()))
    from sandgate.proxy.telemetry.audit import AuditLog

    journal = None if variant == "no-journal" else work / "journal.ring"

    async def run() -> None:
        audit = AuditLog(work / "audit.jsonl", flush_interval=FLUSH_INTERVAL, journal=journal)
        if mode == "dns":
            gateway = dns_gateway(work, upstream_port, free_port(), audit)
        elif mode == "inspected":
            certificate = work.parent / "tls.crt"
            gateway = loopback_gateway(work, upstream_port, audit, INSPECT_RULES, certificate)
        else:
            gateway = loopback_gateway(work, upstream_port, audit)
        if mode in ("tls", "inspected"):
            gateway.frontdoor.original_dst = lambda sock: (DESTINATION[0], 443)
        await gateway.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        port = gateway.dns_port if mode == "dns" else gateway.proxy_port
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
                ok[i] += closing_exchange(s)

    return on_client_threads(one_thread, ok)


def _client_tls() -> ssl.SSLContext:
    """The clients' TLS: no ALPN (HTTP/1.1), certificates not checked."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def tls_connections(port: int, count: int) -> int:
    """`count` requests from CLIENT_THREADS threads, each on a new TLS connection (a
    full handshake, SNI allowed.test; the bench's own certificate is not checked);
    how many got a 200."""
    ok = [0] * CLIENT_THREADS
    context = _client_tls()

    def one_thread(i: int) -> None:
        for _ in range(count // CLIENT_THREADS):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=60) as raw,
                context.wrap_socket(raw, server_hostname="allowed.test") as s,
            ):
                ok[i] += closing_exchange(s)

    return on_client_threads(one_thread, ok)


def closing_exchange(s: socket.socket) -> bool:
    """One `Connection: close` request on `s`, its answer read to the server's close;
    whether it was a 200."""
    s.sendall(REQUEST_CLOSE % b"/")
    answer = b""
    while data := s.recv(65536):
        answer += data
    return answer.startswith(b"HTTP/1.1 200")


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
    row: str,
) -> dict:
    """One variant's counts per connection of `row` ("new": plain HTTP, "keep": per
    keep-alive request, "tls": TLS pass-through, "inspected": per inspected keep-alive
    request; "udp", "tcp", "denied": per DNS query of that row)."""
    mode = "dns" if row in DNS_ROWS else row if row in ("tls", "inspected") else ""
    vwork = work / variant.replace(" ", "-")
    vwork.mkdir()
    out = vwork / "callgrind.out"
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
        f"--callgrind-out-file={out}",
        sys.executable, __file__, "--serve", str(vwork), str(upstream_port), variant, tree or "",
        mode,
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
        if row == "keep":
            kept = [socket.create_connection(("127.0.0.1", port), timeout=60)
                    for _ in range(CLIENT_THREADS)]  # fmt: skip
        elif row == "inspected":
            context = _client_tls()
            kept = [context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60),
                                        server_hostname="allowed.test")
                    for _ in range(CLIENT_THREADS)]  # fmt: skip

        def drive(n: int) -> int:
            if mode == "dns":
                return dns_queries(port, n, row)
            return tls_connections(port, n) if mode == "tls" else connections(port, n, kept)

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
        what = "queries got no right answer" if mode == "dns" else "connections got no 200"
        raise RuntimeError(f"{variant}: {conns - ok} of {conns} {what}")
    lines = out.read_text().splitlines()
    names = next(line for line in lines if line.startswith("events:")).split()[1:]
    totals = next(line for line in reversed(lines) if line.startswith(("totals:", "summary:")))
    counted = dict(zip(names, map(int, totals.split()[1:]), strict=False))
    return {name: counted.get(name, 0) / conns for name in EVENTS}


def tls_listen(work: Path, port: int) -> str:
    """nginx's `listen` line for `--tls` and `--inspected`: `port` with TLS, a key and a
    self-signed certificate for allowed.test made into `work` (the clients do not check
    it; an inspecting gateway does)."""
    key, cert = work / "tls.key", work / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=allowed.test", "-addext", "subjectAltName=DNS:allowed.test",
         "-days", "2", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return f"listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        work, upstream_port, variant, tree, mode = sys.argv[2:7]
        serve(Path(work), int(upstream_port), variant, tree or None, mode)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conns", type=int, default=400, help="connections counted (x 8 threads)")
    parser.add_argument(
        "--with", dest="others", default="", help="no-telemetry, no-audit, no-metrics, no-journal"
    )
    parser.add_argument("--baseline", metavar="REV", help="also this git revision's tree")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument(
        "--keep", action="store_true", help="keep-alive requests (a connection per thread)"
    )
    rows.add_argument(
        "--tls", action="store_true", help="TLS pass-through connections (nginx's TLS port)"
    )
    rows.add_argument(
        "--inspected",
        action="store_true",
        help="keep-alive requests over inspected TLS (a method/path rule)",
    )
    rows.add_argument(
        "--dns",
        choices=DNS_ROWS,
        help="DNS queries instead (bench_dns's gateway and dnsmasq): the allowed name over "
        "UDP or TCP, or the denied one over UDP",
    )
    args = parser.parse_args()
    others = [o for o in args.others.split(",") if o]
    if set(others) - {*MUTED, "no-journal"}:
        parser.error(f"--with takes {', '.join(MUTED)}, no-journal")
    row = args.dns or next((r for r in ("keep", "tls", "inspected") if getattr(args, r)), "new")
    tools = ["valgrind", "callgrind_control", "dnsmasq" if args.dns else "nginx"]
    if args.tls or args.inspected:
        tools.append("openssl")
    path = os.environ.get("PATH", "") + ":/usr/sbin"
    missing = [t for t in tools if not shutil.which(t, path=path)]
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
            config = NGINX.format(w=work, port=upstream_port)
            if args.tls or args.inspected:
                config = config.replace(
                    f"listen 127.0.0.1:{upstream_port};", tls_listen(work, upstream_port)
                )
            (work / "nginx.conf").write_text(config)
            nginx = shutil.which("nginx", path=path)
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
                    row,
                )
            except RuntimeError as e:
                print(f"bench_callgrind: {e}", file=sys.stderr)
                return 1
        unit = {
            "new": "plain-HTTP connection (new connection, one request)",
            "keep": "plain-HTTP keep-alive request",
            "tls": "TLS pass-through connection (new connection, one request)",
            "inspected": "inspected HTTPS keep-alive request (a method/path rule)",
            "udp": "DNS query (allowed)",
            "tcp": "DNS query (allowed, over TCP)",
            "denied": "DNS query (denied)",
        }[row]
        print(f"\nper {unit}, {conns} counted")
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
