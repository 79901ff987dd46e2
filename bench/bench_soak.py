"""Soak: does the gateway stay flat over many connections and a long mixed run?

    sudo .venv/bin/python bench/bench_soak.py [--connections 10000] [--minutes 30]
                                              [--rate 40] [--threads 4] [--keep]

Not a test (it asserts nothing and is not in the test run); it prints one report.
Root; builds a fake internet of its own (enforcer/demo/fakenet.py, prefix
`sgsoak<hex>`, removed in `finally`) and runs one embedded gateway with
`sandgate run -- python3 CLIENT` in its host namespace:

1. burst: --connections new TLS pass-through connections to allowed.test (GET /,
   Connection: close), --threads at a time, as fast as the gateway takes them;
2. mixed, for --minutes at about --rate connections a second in all: allowed TLS
   pass-through, allowed plain HTTP (two keep-alive requests each), inspected HTTPS
   (`GET /public/x` to api.allowed.test, two requests), TLS with a spoofed SNI
   (denied at the ClientHello), DNS queries for the two allowed names and a forbidden one.

While it runs, the gateway process's RSS and open descriptors are sampled every
second. The report gives them at the start and end of each phase, their peak, and
each phase's trend (least squares, per minute; also over its second half alone, which
leaves out warm-up such as the first inspected connections): "flat" is a trend within
noise and an end value near the start. After the run the audit log (with its rotated
files) is counted against what the client did: one connection event per TLS
connection, one request event per HTTP request, one DNS event per query; "lost"
is what the client did and the log does not show, and the hash chain's `seq` must
have no gap.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from sandgate.enforcer.demo.fakenet import FakeInternet, cleanup_prefix

SANDGATE = str(Path(sys.executable).with_name("sandgate"))
RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    limits: {connections: 4096, pending: 512, dns_qps: 1000, connection_rate: 10000}
    rules:
      - allow: allowed.test
        id: soak-allowed
      - allow: api.allowed.test
        methods: [GET]
        paths: ["/public/**"]
        id: soak-inspected
"""

# Runs inside the sandbox (/usr/bin/python3, stdlib only). Prints one JSON object:
# what it did, per kind, and when each phase began and ended (time.time()).
CLIENT = r"""
import json, socket, ssl, struct, sys, threading, time
connections, minutes, rate, threads = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["http/1.1"])
ip = {n: socket.gethostbyname(n) for n in ("allowed.test", "api.allowed.test")}
EVIL = "203.0.113.66"
done, failed, lock = {}, {}, threading.Lock()

def count(kind, ok=True):
    with lock:
        (done if ok else failed)[kind] = (done if ok else failed).get(kind, 0) + 1

def read_response(f):
    status = f.readline()
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    f.read(length)
    return status.split()[1] if status else b"000"

def tls_get(name, path="/", requests=1, addr=None, kind="tls"):
    try:
        with socket.create_connection((addr or ip[name], 443), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                f = s.makefile("rb")
                for i in range(requests):
                    last = i == requests - 1
                    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: {'close' if last else 'keep-alive'}\r\n\r\n".encode())
                    read_response(f)
        count(kind)
    except OSError:
        count(kind, ok=False)

def http_get(requests=2):
    try:
        with socket.create_connection((ip["allowed.test"], 80), timeout=10) as s:
            f = s.makefile("rb")
            for i in range(requests):
                last = i == requests - 1
                s.sendall(f"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: {'close' if last else 'keep-alive'}\r\n\r\n".encode())
                read_response(f)
        count("http")
    except OSError:
        count("http", ok=False)

def dns_query(name):
    query = struct.pack(">HHHHHH", 0x5a5a, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    resolver = open("/etc/resolv.conf").read().split("nameserver", 1)[1].split()[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        try:
            s.sendto(query, (resolver, 53))
            s.recv(512)
            count("dns")
        except OSError:
            count("dns", ok=False)

phases = {}
t0 = time.time()
jobs = iter(range(connections))
def burst():
    for _ in jobs:
        tls_get("allowed.test", kind="burst_tls")
workers = [threading.Thread(target=burst) for _ in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
phases["burst"] = (t0, time.time())

MIX = [
    lambda: tls_get("allowed.test"),
    lambda: http_get(),
    lambda: tls_get("api.allowed.test", "/public/x", requests=2, kind="inspected"),
    lambda: tls_get("allowed.test", addr=EVIL, kind="spoofed"),
    lambda: dns_query("allowed.test"),
    lambda: dns_query("forbidden.test"),
    # The client resolved its names once, at the start; a binding lives for its TTL
    # (plus grace), after which a connection to the address is spoofed_destination,
    # by design. Asking again keeps both names bound, as a client that resolves per
    # connection would (the 30-minute run without this lost api.allowed.test at 300 s).
    lambda: dns_query("api.allowed.test"),
]
t1 = time.time()
end = t1 + minutes * 60
def mixed(offset):
    i = offset
    while time.time() < end:
        started = time.time()
        MIX[i % len(MIX)]()
        i += 1
        time.sleep(max(0.0, threads / rate - (time.time() - started)))
workers = [threading.Thread(target=mixed, args=(k,)) for k in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
phases["mixed"] = (t1, time.time())
print(json.dumps({"done": done, "failed": failed, "phases": phases}))
"""


class Sampler:
    """RSS (KiB) and open descriptors of one process, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                rss = int(status.split("VmRSS:", 1)[1].split()[0])
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            except (OSError, IndexError):
                continue
            self.samples.append((time.time(), rss, fds))

    def during(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def _trend_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value), per minute; 0 for fewer than 3 points."""
    if len(points) < 3:
        return 0.0
    ts, vs = [p[0] for p in points], [p[1] for p in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / den if den else 0.0


def _audit_lines(path: Path) -> list[dict]:
    """The audit log and its rotated files, oldest first."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    lines = []
    for file in [*files, path]:
        if file.suffix in (".gz", ".zst"):
            continue  # a compressed backup would need reading too: reported as missing
        lines += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return lines


def _count_events(events: list[dict]) -> dict[str, int]:
    """What the log shows, in the client's terms. A record that stands for several
    suppressed events (a flood summary) counts as that many of its kind."""
    counts: Counter[str] = Counter()
    for e in events:
        n = 1 + int(e.get("suppressed", 0) or 0)
        kind, name, port, verdict = (
            e.get("kind"),
            e.get("name"),
            e.get("dst_port"),
            e.get("verdict"),
        )
        if kind == "connection" and port == 443 and name == "allowed.test":
            counts[
                "tls_connections_allowed" if verdict == "allow" else "tls_connections_denied"
            ] += n
        elif kind == "connection" and port == 443 and name == "api.allowed.test":
            counts[
                "inspected_connections" if verdict == "allow" else "inspected_connections_denied"
            ] += n
        elif kind == "request" and port == 80:
            counts["http_requests"] += n
        elif kind == "request" and port == 443:
            counts["inspected_requests"] += n
        elif kind == "dns":
            counts["dns_queries"] += n
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument(
        "--rate", type=float, default=40.0, help="mixed-phase actions a second, in all"
    )
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_soak: needs root (network namespaces, nftables)")

    prefix = f"sgsoak{secrets.token_hex(2)}"
    workdir = Path(tempfile.mkdtemp(prefix="sandgate-soak-"))
    try:
        with FakeInternet(prefix, workdir / "net") as net:
            rules, audit = workdir / "rules.yaml", workdir / "audit.jsonl"
            rules.write_text(RULES)
            steps = workdir / "steps"
            steps.mkdir()
            argv = [
                SANDGATE, "run", "--rules", str(rules), "--dns-upstream", net.dns_ip,
                "--extra-ca", str(net.ca_cert), "--audit-log", str(audit), "--metrics-listen", "off",
                "--summary-json", str(workdir / "summary.json"), "--workspace", str(steps), "--",
                "/usr/bin/python3", "-c", CLIENT, str(args.connections), str(args.minutes),
                str(args.rate), str(args.threads),
            ]  # fmt: skip
            started = time.time()
            proc = net.popen_in_host(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            with Sampler(proc.pid) as sampler:
                out, err = proc.communicate(timeout=args.minutes * 60 + 3600)
            if proc.returncode != 0:
                print(err[-3000:], file=sys.stderr)
                sys.exit(f"bench_soak: sandgate run exited {proc.returncode}")
            result = json.loads(out.strip().splitlines()[-1])
            time.sleep(1)
            report(args, result, sampler, _audit_lines(audit), time.time() - started)
    finally:
        cleanup_prefix(prefix)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(args, result: dict, sampler: Sampler, events: list[dict], wall: float) -> None:
    done, failed = result["done"], result["failed"]
    print(f"soak: {args.connections} burst connections, {args.minutes:g} min mixed at ~{args.rate:g}/s "
          f"({args.threads} threads); wall {wall:.0f} s")  # fmt: skip
    print(
        f"client: done {json.dumps(done, sort_keys=True)}; failed {json.dumps(failed, sort_keys=True)}"
    )
    burst = result["phases"]["burst"]
    print(f"burst: {done.get('burst_tls', 0) / max(burst[1] - burst[0], 1e-9):.0f} connections/s")

    print(
        "\n| phase | RSS start MB | RSS end MB | RSS peak MB | RSS trend MB/min | 2nd half | fds start | fds end | fds peak | fds trend /min |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase, (start, end) in result["phases"].items():
        samples = sampler.during(start, end)
        if not samples:
            continue
        rss = [(t, r / 1024) for t, r, _ in samples]
        fds = [(t, f) for t, _, f in samples]
        print(
            f"| {phase} | {rss[0][1]:.1f} | {rss[-1][1]:.1f} | {max(v for _, v in rss):.1f} | "
            f"{_trend_per_minute(rss):+.2f} | {_trend_per_minute(rss[len(rss) // 2 :]):+.2f} | "
            f"{fds[0][1]} | {fds[-1][1]} | {max(v for _, v in fds)} | "
            f"{_trend_per_minute(fds):+.2f} |"
        )

    shown = _count_events(events)
    made = {
        "tls_connections_allowed": done.get("burst_tls", 0) + done.get("tls", 0),
        "tls_connections_denied": done.get("spoofed", 0) + failed.get("spoofed", 0),
        "inspected_connections": done.get("inspected", 0),
        "inspected_connections_denied": failed.get("inspected", 0),  # e.g. an expired binding
        "inspected_requests": 2 * done.get("inspected", 0),
        "http_requests": 2 * done.get("http", 0),
        "dns_queries": done.get("dns", 0) + failed.get("dns", 0),
    }
    print("\n| events | client made | audit log shows | lost |")
    print("|---|---:|---:|---:|")
    for key, n in made.items():
        print(f"| {key} | {n} | {shown.get(key, 0)} | {max(0, n - shown.get(key, 0))} |")
    seqs = [e["seq"] for e in events if "seq" in e]
    gaps = sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1)
    print(f"\naudit log: {len(events)} lines, seq {seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'}, "
          f"{gaps} gap(s); by kind {dict(Counter(e.get('kind') for e in events))}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
