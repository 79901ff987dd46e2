"""Benchmark clients, run inside a sandbox; stdlib only; prints one JSON object.

bench_gateway.py runs this script the same way in every setup (direct forwarding,
Squid, sandgate); only name resolution differs: `--resolve NAME:IP` pins the
address (like curl --resolve) where no resolver is reachable, and without it the
name is resolved once, through the sandbox's resolv.conf (sandgate's DNS filter).

    clients.py [bulk] [tls_rate] [http_rate] --host allowed.test --cacert CA.pem
               [--resolve allowed.test:203.0.113.10] [--bulk-seconds 2] ...

bulk       HTTPS downloads of https://HOST/big, one new connection each (curl if
           installed, else Python), sequentially, for --bulk-seconds (at least
           --bulk-min, at most --bulk-max downloads). Reports MB/s (10^6 bytes/s).
tls_rate   new TLS connection per request: connect, handshake (verifying the
           certificate), `GET /` with Connection: close, read to EOF. --procs
           processes x --threads threads, for --rate-seconds (at most --rate-max
           requests in all). Reports completed requests/s and latency.
http_rate  the same over plain HTTP on port 80.
tls_keep   keep-alive HTTPS: each thread keeps one connection and sends `GET /`
           after `GET /` on it (a new connection only when the server closes it).
           Reports requests/s and latency per request.
http_keep  the same over plain HTTP on port 80.

--pace N caps a rate phase at N requests/s in all (each thread on a fixed schedule
of its share; one that falls behind does not catch up in a burst): the same offered
load in setups that could each take more (bench_workers.py --pace).

Each section carries `t_start`/`t_end` (wall clock, time.time()) so the caller can
match its own samples (gateway RSS) to the phase.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time


def _resolve(args) -> str:
    if args.resolve:
        name, _, ip = args.resolve.partition(":")
        if name != args.host or not ip:
            sys.exit(f"--resolve must be {args.host}:IP")
        return ip
    infos = socket.getaddrinfo(args.host, 443, socket.AF_INET, socket.SOCK_STREAM)
    return infos[0][4][0]


def _context(cacert: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cacert)
    # Plain HTTP/1.1 over TLS, as curl --http1.1 would do it.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# --- bulk ---------------------------------------------------------------------------


def _bulk_curl(args, ip: str) -> tuple[int, float, str]:
    argv = [
        "curl",
        "-sS",
        "--http1.1",
        "-o",
        "/dev/null",
        "--cacert",
        args.cacert,
        "--resolve",
        f"{args.host}:443:{ip}",
        "--max-time",
        "30",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        f"https://{args.host}{args.bulk_path}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=40)
    if out.returncode != 0:
        raise RuntimeError(f"curl failed ({out.returncode}): {out.stderr.strip()}")
    code, size, secs = out.stdout.split()
    if code != "200":
        raise RuntimeError(f"curl got HTTP {code}")
    return int(size), float(secs), "curl"


def _bulk_python(args, ip: str) -> tuple[int, float, str]:
    ctx = _context(args.cacert)
    started = time.perf_counter()
    with (
        socket.create_connection((ip, 443), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=args.host) as s,
    ):
        s.sendall(
            f"GET {args.bulk_path} HTTP/1.1\r\nHost: {args.host}\r\nConnection: close\r\n\r\n".encode()
        )
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total, head = 0, b""
        while n := s.recv_into(view):
            if not head:
                head = bytes(view[:n])
            total += n
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"python bulk client got {head[:40]!r}")
    body = total - (head.find(b"\r\n\r\n") + 4)
    return body, time.perf_counter() - started, "python"


def bulk(args, ip: str) -> dict:
    fetch = _bulk_curl if shutil.which("curl") else _bulk_python
    t_start = time.time()
    sizes, times, tool = [], [], "?"
    deadline = time.monotonic() + args.bulk_seconds
    while len(times) < args.bulk_max and (
        len(times) < args.bulk_min or time.monotonic() < deadline
    ):
        size, secs, tool = fetch(args, ip)
        sizes.append(size)
        times.append(secs)
    mbps = [s / t / 1e6 for s, t in zip(sizes, times, strict=True)]
    return {
        "tool": tool,
        "downloads": len(times),
        "bytes_each": sizes[0],
        "mb_per_s": sum(sizes) / sum(times) / 1e6,  # aggregate over transfer time
        "mb_per_s_median": statistics.median(mbps),
        "mb_per_s_max": max(mbps),
        "t_start": t_start,
        "t_end": time.time(),
    }


# --- connection rate ------------------------------------------------------------------


def _one_request(ip: str, port: int, host: str, ctx: ssl.SSLContext | None) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection((ip, port), timeout=10) as raw:
        s = ctx.wrap_socket(raw, server_hostname=host) if ctx else raw
        try:
            s.sendall(request)
            first = s.recv(4096)
            while s.recv(4096):
                pass
        finally:
            if ctx:
                s.close()
    if not first.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {first[:40]!r}")


class _KeepAlive:
    """One HTTPS (or, without ctx, plain HTTP) connection reused request after
    request (Content-Length bodies)."""

    def __init__(self, ip: str, host: str, ctx: ssl.SSLContext | None):
        self.ip, self.host, self.ctx, self.file = ip, host, ctx, None
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def __call__(self, *_ignored) -> None:
        if self.file is None:
            raw = socket.create_connection((self.ip, 443 if self.ctx else 80), timeout=10)
            self.sock = self.ctx.wrap_socket(raw, server_hostname=self.host) if self.ctx else raw
            self.file = self.sock.makefile("rb")
        try:
            self.sock.sendall(self.request)
            status = self.file.readline()
            length, close = 0, False
            while (line := self.file.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"connection" and b"close" in value.lower():
                    close = True
            if len(self.file.read(length)) != length or not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer {status[:40]!r}")
        except BaseException:
            close = True
            raise
        finally:
            if close:
                self.file.close()
                self.sock.close()
                self.file = None


def _rate_worker(
    ip, port, host, cacert, threads, stop_at, max_requests, queue, keep=False, interval=0.0
) -> None:
    ctx = _context(cacert) if cacert else None
    lock = threading.Lock()
    state = {"ok": 0, "errors": 0, "first_error": None, "lat": []}

    def loop() -> None:
        one_request = _KeepAlive(ip, host, ctx) if keep else _one_request
        due = time.monotonic() + random.uniform(0, interval)  # threads out of step
        while time.time() < stop_at:
            if interval:
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                due = max(due + interval, now)  # behind: no catching up in a burst
            with lock:
                if state["ok"] + state["errors"] >= max_requests:
                    return
            t0 = time.perf_counter()
            try:
                one_request(ip, port, host, ctx)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or repr(e)
                time.sleep(0.01)  # a failing setup must not spin
                continue
            dt = time.perf_counter() - t0
            with lock:
                state["ok"] += 1
                if len(state["lat"]) < 20000:
                    state["lat"].append(dt)

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=max(1.0, stop_at - time.time() + 15))
    queue.put(state)


def rate(args, ip: str, tls: bool, keep: bool = False) -> dict:
    port = 443 if tls else 80
    cacert = args.cacert if tls else None
    # Warm-up: one request (ARP, the gateway's first-connection paths), not counted.
    _one_request(ip, port, args.host, _context(args.cacert) if tls else None)
    mp = multiprocessing.get_context("fork")
    queue = mp.Queue()
    t_start = time.time()
    stop_at = t_start + args.rate_seconds
    per_proc_max = max(1, args.rate_max // args.procs)
    # --pace: each thread's share of the rate, as the time between its requests
    interval = args.procs * args.threads / args.pace if args.pace else 0.0
    procs = [
        mp.Process(
            target=_rate_worker,
            args=(
                ip,
                port,
                args.host,
                cacert,
                args.threads,
                stop_at,
                per_proc_max,
                queue,
                keep,
                interval,
            ),
        )
        for _ in range(args.procs)
    ]
    for p in procs:
        p.start()
    states = [queue.get(timeout=args.rate_seconds + 60) for _ in procs]
    t_end = time.time()
    for p in procs:
        p.join(timeout=10)
    ok = sum(s["ok"] for s in states)
    lat = sorted(x for s in states for x in s["lat"])
    return {
        "concurrency": args.procs * args.threads,
        "requests": ok,
        "errors": sum(s["errors"] for s in states),
        "first_error": next((s["first_error"] for s in states if s["first_error"]), None),
        "seconds": t_end - t_start,
        "per_s": ok / (t_end - t_start),
        "latency_ms_p50": 1000 * lat[len(lat) // 2] if lat else None,
        "latency_ms_p99": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
        "t_start": t_start,
        "t_end": t_end,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "phases",
        nargs="*",
        default=["bulk", "tls_rate", "http_rate"],
        choices=["bulk", "tls_rate", "http_rate", "tls_keep", "http_keep"],
    )
    parser.add_argument("--host", default="allowed.test")
    parser.add_argument("--resolve", help="NAME:IP, skip DNS (setups without a resolver)")
    parser.add_argument(
        "--cacert",
        default=os.environ.get("SSL_CERT_FILE"),
        help="CA bundle (default $SSL_CERT_FILE: what a sandgate sandbox trusts)",
    )
    parser.add_argument("--bulk-path", default="/big")
    parser.add_argument("--bulk-seconds", type=float, default=2.0)
    parser.add_argument("--bulk-min", type=int, default=3)
    parser.add_argument("--bulk-max", type=int, default=120)
    parser.add_argument("--rate-seconds", type=float, default=3.0)
    parser.add_argument("--rate-max", type=int, default=200_000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pace", type=float, default=0.0, help="requests/s in all (0: no cap)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    t0 = time.perf_counter()
    ip = _resolve(args)
    result: dict = {"ip": ip, "resolve_ms": (time.perf_counter() - t0) * 1000, "pid": os.getpid()}
    for phase in args.phases:
        try:
            if phase == "bulk":
                result[phase] = bulk(args, ip)
            else:
                tls = phase not in ("http_rate", "http_keep")
                result[phase] = rate(args, ip, tls=tls, keep=phase.endswith("_keep"))
        except Exception as e:  # noqa: BLE001 - one failed phase must not hide the others
            result[phase] = {"error": repr(e)}
    text = json.dumps(result)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
