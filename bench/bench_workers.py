"""`sandgate gateway --workers N`: connections/s and the gateway's CPU per connection at
1 and 2 workers, in one run (issue 11, "Every core").

    .venv/bin/python bench/bench_workers.py [--sandboxes 4] [--seconds 5] [--rounds 3]
                                            [--workers 1,2[,2pin][,1o,2o][,squid1,squid2][,loop]]
                                            [--phase tls_rate|http_rate] [--pace N]

Needs root. Runs in the fake internet (enforcer/demo/fakenet.py: its own namespaces,
removed at the end; nothing touches the root namespace's network), with a run
directory of its own (SANDGATE_RUN_DIR). For each worker count, per round: a fresh
service in the fake internet's host netns; K sandboxes attached at once
(`sandgate run --gateway`), each running the connection-rate client of
bench_gateway.py (bench/clients.py: a new TLS connection per `GET /`, allowed
pass-through) for the same seconds; connections/s is the sum over sandboxes of
completed requests over the phase's seconds; the gateway's CPU is the service's and
its workers' utime+stime from /proc over the steady middle of the phase (the clients, nginx and the
runners are not counted). Medians over rounds, and the ratios 2w/1w.

Control runs (issue 11's "where the physical limit is"), as more --workers entries:
- `2pin`: 2 workers, every sandbox on worker 0 (the other idle; the pool's test-only
  PIN_ENV): the cost of the worker process, the link and the service's intake
  without two busy gateway processes on the cores at once;
- `squid1`, `squid2`: the peer's own split: Squid (peek at the SNI, then splice, as
  bench_gateway.py's setup B) with `workers 1` and `workers 2` (SMP, each kid its
  own accept queue: `worker-queues`), intercepting the same clients (one plain
  network namespace, --sandboxes processes of --threads threads); its CPU is its
  whole process tree's. Squid's 2 / 1 beside sandgate's says how much of the
  growth is the machine's (any event loop split over two processes at half load)
  and how much sandgate's own;
- `1o`, `2o`: 1 and 2 workers with the clients back under SCHED_OTHER (`chrt -o 0`
  in the sandbox): what the task's SCHED_BATCH (sandbox/init.py) gives the gateway;
- `loop`: a 1-worker round in which, with the clients running, the same pure-Python
  busy loop (fixed work) runs alone, then as two copies at once, several times:
  the CPU per unit of work of one vs two is the machine's tax for two busy
  processes (caches, scheduler), which the gateway code cannot remove.

Goal: the gateway's CPU per connection at 2 workers <= 1.1x that at 1 (on this 2-core
machine the clients share the cores with the gateway, so connections/s says less than
CPU per connection). The machine's other load skews both: run it quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENTS = REPO / "bench" / "clients.py"
SANDGATE = str(Path(sys.executable).parent / "sandgate")  # this venv's: the checkout
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RULES = """\
version: 1
profiles:
  default:
    limits: {connection_rate: 10000}  # the bench measures the gateway, not this cap
    rules:
      - allow: allowed.test
        id: web
        ports: [80, 443]
"""


def cpu_seconds(pid: int, which: str = "both") -> float:
    """utime + stime of `pid` (threads included; or `which`: "user", "system" alone),
    0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    user, system = int(fields[11]), int(fields[12])
    return {"both": user + system, "user": user, "system": system}[which] / CLOCK_TICKS


def minor_faults(pid: int) -> int:
    """Minor page faults of `pid` so far (pages the kernel mapped in: a heap that
    gives memory back and takes it again pays one per page), 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except OSError:
        return 0


class Service:
    def __init__(self, fn, work: Path, workers: int, env: dict | None = None):
        self.fn, self.work = fn, work
        self.control = work / "gateway.sock"
        rules = work / "rules.yaml"
        rules.write_text(RULES)
        argv = [
            "nsenter", f"--net=/run/netns/{fn.host_ns}", "--",
            SANDGATE, "gateway", "--rules", str(rules), "--dns-upstream", fn.dns_ip,
            "--extra-ca", str(fn.ca_cert), "--control", str(self.control),
            "--audit-log", str(work / "audit.jsonl"), "--metrics-listen", "off",
            "--admin-listen", "off", "--workers", str(workers), "--warm", "4",
        ]  # fmt: skip
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(work / "gateway.log").open("a"), env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.ask("status") is None:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the service did not start:\n{(work / 'gateway.log').read_text()}"
                )
            time.sleep(0.1)

    def ask(self, what: str) -> dict | None:
        proc = subprocess.run(
            [SANDGATE, what, "--json", "--control", str(self.control)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def client_argvs(self, args) -> list[list[str]]:
        """One `sandgate run` of the clients per sandbox, once the spare sandboxes are
        ready (a warm attach each)."""
        deadline = time.monotonic() + 30
        while (self.ask("status") or {}).get("spares", 0) < min(4, args.sandboxes):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return [
            [SANDGATE, "run", "--gateway", str(self.control), "--", "/usr/bin/python3",
             str(CLIENTS), args.phase, "--rate-seconds", str(args.seconds), "--procs", "1",
             "--threads", str(args.threads), "--pace", str(args.pace / args.sandboxes)]
            for _ in range(args.sandboxes)
        ]  # fmt: skip

    def pids(self) -> list[int]:
        status = self.ask("status") or {}
        workers = [w["pid"] for w in status.get("workers", []) if w.get("pid")]
        return sorted({self.popen.pid, *workers})

    def stop(self) -> None:
        subprocess.run([SANDGATE, "gateway", "stop", "--grace", "5", "--control",
                        str(self.control)], capture_output=True, timeout=30)  # fmt: skip
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class SquidPeer:
    """Squid intercepting a plain netns of clients, TLS peeked then spliced (the
    peer's pass-through, bench_gateway.py's setup B) with `workers` kids; in the fake
    internet's host netns, its own netns and nft table removed by `stop`."""

    POOL = "10.214.0.0/16"  # not the service's sandbox pool: no address shared

    def __init__(self, fn, work: Path, workers: int, index: int):
        from ipaddress import IPv4Network

        from sandgate.enforcer import netns

        self.fn, self.work, self.netns = fn, work, netns
        self.sid = f"{fn.prefix[3:]}q{index}"
        self.table = f"sgbench_{self.sid}"
        gw, sbx = netns.allocate_addresses(IPv4Network(self.POOL), 1)
        with netns.entered_netns(fn.host_ns):
            self.net = netns.create_sandbox_net(self.sid, gw, sbx)
        self.popen = None
        try:  # from here on, whatever fails: its netns (and squid, and table) go
            self._serve(workers, gw)
        except BaseException:
            self.stop()
            raise

    def _serve(self, workers: int, gw) -> None:
        import pwd

        fn, work = self.fn, self.work
        cert, key = work / "squid.pem", work / "squid.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=bench squid", "-keyout", key, "-out", cert],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        (work / "squid.conf").write_text(f"""\
workers {workers}
http_port 127.0.0.1:3128 worker-queues
http_port {gw}:3129 intercept worker-queues
https_port {gw}:3130 intercept ssl-bump tls-cert={cert} tls-key={key} generate-host-certificates=off worker-queues
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump splice all
http_access allow all
cache deny all
cache_mem 0 MB
dns_nameservers {fn.dns_ip}
hosts_file none
pid_filename {work}/squid.pid
cache_log {work}/cache.log
access_log none
cache_store_log none
netdb_filename none
pinger_enable off
logfile_rotate 0
coredump_dir {work}
shutdown_lifetime 0 seconds
max_filedescriptors 65536
visible_hostname sandgate-bench
""")
        pw = pwd.getpwnam("proxy")  # squid's kids run as proxy: its files, and a way in
        for path in (work, *work.iterdir()):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(work.parent, 0o755)
        self.popen = fn.popen_in_host(
            ["squid", "--foreground", "-f", work / "squid.conf"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(work / "squid.out").open("a"), start_new_session=True,
        )  # fmt: skip
        self._wait_listening(workers)
        fn.run_in_host(["nft", "-f", "-"], check=True, input=f"""\
table inet {self.table} {{
    chain nat_prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{self.net.host_if}" tcp dport 80 redirect to :3129
        iifname "{self.net.host_if}" tcp dport 443 redirect to :3130
    }}
}}
""")  # fmt: skip

    def _wait_listening(self, workers: int) -> None:
        log, deadline = self.work / "cache.log", time.monotonic() + 30
        while _text(log).count("SSL bumped HTTPS Socket") < workers:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"squid did not start:\n{_text(log)[-2000:]}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The master and its kids (the coordinator too, with workers > 1)."""
        tree, grew = {self.popen.pid}, True
        while grew:
            grew = False
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) not in tree:
                    try:
                        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, IndexError, ValueError):
                        continue
                    if ppid in tree:
                        tree.add(int(entry.name))
                        grew = True
        return sorted(tree)

    def client_argvs(self, args) -> list[list[str]]:
        """The same clients in one netns: --sandboxes processes of --threads threads."""
        return [[
            "ip", "netns", "exec", self.net.netns, "/usr/bin/python3", str(CLIENTS), args.phase,
            "--resolve", f"allowed.test:{self.fn.hosts['allowed.test']}",
            "--cacert", str(self.fn.ca_cert), "--rate-seconds", str(args.seconds),
            "--procs", str(args.sandboxes), "--threads", str(args.threads),
            "--pace", str(args.pace),
        ]]  # fmt: skip

    def stop(self) -> None:
        self.fn.run_in_host(["nft", "delete", "table", "inet", self.table])  # if it is there
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, 9)
                self.popen.wait()
        with self.netns.entered_netns(self.fn.host_ns):
            self.netns.destroy_sandbox_net(self.sid)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# The control loop: pure Python of the kinds a gateway does per event (dicts,
# strings, JSON, a hash); prints the CPU seconds its fixed work took. With NAP set
# it sleeps NAP seconds after every 8 iterations (~20 us of work), as a gateway
# process blocks in epoll between bursts: then it also pays for its wake-ups.
# With BIG it also reads a random one of 200,000 dicts (~40 MB, far more than a
# core's 2 MB L2) per iteration, as a gateway touches its connections' objects.
BUSY_LOOP = """
import hashlib, json, random, sys, time
nap, big = float(sys.argv[1]), sys.argv[2] == "big"
table = [{"n": n, "s": str(n) * 8} for n in range(200000 if big else 1)]
picks = [random.randrange(len(table)) for _ in range(40000)]
t = time.process_time()
for i in range(40000):
    d = {"task": "t%d" % i, "verdict": "allow", "n": table[picks[i]]["n"], "dest": "a:443"}
    hashlib.sha256(json.dumps(d).encode()).hexdigest()
    if nap and i % 8 == 0:
        time.sleep(nap)
print(time.process_time() - t)
"""
LOOP_REPEATS = 3
NAP = 0.0002
LOOP_KINDS = ("1", "2", "1nap", "2nap", "1big", "2big")


def switches(pid: int, kind: str = "voluntary") -> int:
    """Context switches of `pid`'s threads so far: voluntary (it blocked and was
    woken), or "nonvoluntary" (preempted: another process took its core)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith(f"{kind}_ctxt_switches"):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def busy_loops(copies: int, nap: float = 0.0, big: bool = False) -> list[float]:
    """CPU seconds of each of `copies` busy loops run at once."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(nap), "big" if big else ""],
                              stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]  # fmt: skip
    return [float(p.communicate()[0]) for p in procs]


def one_round(fn, work: Path, label: str, args, index: int = 0) -> dict:
    workers = int("".join(c for c in label if c.isdigit()) or 1)
    if label.startswith("squid"):
        service = SquidPeer(fn, work, workers, index)
    else:
        pinned = label.endswith("pin")
        env = {**os.environ, "SANDGATE_BENCH_PIN_WORKER": "0"} if pinned else None
        service = Service(fn, work, workers, env)
    try:
        argv = service.client_argvs(args)
        if label.endswith("o"):  # the task back to SCHED_OTHER (sandbox/init.py)
            argv = [[*a[: a.index("--") + 1], "/usr/bin/chrt", "-o", "0", *a[a.index("--") + 1 :]]
                    for a in argv]  # fmt: skip
        pids = service.pids()
        procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for a in argv]  # fmt: skip
        # The CPU window: the steady middle of the phase, from 1 s after the start
        # (the runs attach and warm up) to 0.5 s before its end (before any run
        # detaches: a sandbox's teardown is not a connection's cost). Connections in
        # it: the phase's rate times its length.
        samples: dict[str, float] = {}
        loops: dict[str, list[float]] = {k: [] for k in LOOP_KINDS}

        def sample(suffix: str) -> None:
            samples["cpu" + suffix] = sum(cpu_seconds(p) for p in pids)
            samples["service" + suffix] = cpu_seconds(service.popen.pid)
            samples["switches" + suffix] = sum(switches(p) for p in pids)
            samples["system" + suffix] = sum(cpu_seconds(p, "system") for p in pids)
            samples["faults" + suffix] = sum(minor_faults(p) for p in pids)
            for pid in pids:
                samples[f"p{pid}{suffix}"] = cpu_seconds(pid)
                samples[f"w{pid}{suffix}"] = switches(pid)
                samples[f"n{pid}{suffix}"] = switches(pid, "nonvoluntary")
            samples["t" + suffix] = time.time()

        def sampler_run() -> None:
            time.sleep(1.0)
            sample("0")
            if label == "loop":
                for _ in range(LOOP_REPEATS):
                    loops["1"] += busy_loops(1)
                    loops["2"] += busy_loops(2)
                    loops["1nap"] += busy_loops(1, NAP)
                    loops["2nap"] += busy_loops(2, NAP)
                    loops["1big"] += busy_loops(1, big=True)
                    loops["2big"] += busy_loops(2, big=True)
            time.sleep(max(0.5, args.seconds - 1.5 - (time.time() - samples["t0"])))
            sample("1")

        sampler = threading.Thread(target=sampler_run)
        sampler.start()
        outputs = [proc.communicate(timeout=args.seconds + 120) for proc in procs]
        sampler.join()
        results = [json.loads(out.splitlines()[-1]) for out, _ in outputs if out.strip()]
        if len(results) != len(procs):
            errors = [e[-500:] for p, (_, e) in zip(procs, outputs, strict=True) if p.returncode]
            raise RuntimeError(f"{len(procs) - len(results)} clients gave no result: {errors}")
        phases = [r[args.phase] for r in results]
        requests = sum(p.get("requests", 0) for p in phases)
        seconds = statistics.median(p["seconds"] for p in phases)
        window = samples["t1"] - samples["t0"]
        in_window = requests / seconds * window
        cpu = samples["cpu1"] - samples["cpu0"]
        service_cpu = samples["service1"] - samples["service0"]
        if label == "loop":
            return {"workers": label, **{f"loop{k}_s": statistics.median(v)
                                         for k, v in loops.items()}}  # fmt: skip
        return {
            "workers": label,
            # each process's share (the service first): where a 2-worker run's CPU went
            "per_process_us": [
                round(1e6 * (samples[f"p{p}1"] - samples[f"p{p}0"]) / in_window)
                for p in [service.popen.pid, *(p for p in pids if p != service.popen.pid)]
            ]
            if requests
            else None,
            # and its wake-ups: the service's fall with fewer, fuller event batches
            "per_process_wakeups": [
                round((samples[f"w{p}1"] - samples[f"w{p}0"]) / in_window, 3)
                for p in [service.popen.pid, *(p for p in pids if p != service.popen.pid)]
            ]
            if requests
            else None,
            # and how often it was preempted: two workers are, per connection, far
            # more often than one process (docs/performance.md, session 7, second pass)
            "per_process_preemptions": [
                round((samples[f"n{p}1"] - samples[f"n{p}0"]) / in_window, 3)
                for p in [service.popen.pid, *(p for p in pids if p != service.popen.pid)]
            ]
            if requests
            else None,
            "connections_per_s": requests / seconds,
            "requests": requests,
            "errors": sum(p.get("errors", 0) for p in phases),
            "gateway_cpu_s": cpu,
            "window_s": window,
            "cpu_us_per_connection": 1e6 * cpu / in_window if requests else None,
            # with workers: the control plane's part (events in, audit log, metrics)
            "service_us_per_connection": 1e6 * service_cpu / in_window if requests else None,
            "processes": len(pids),
            "system_us_per_connection": 1e6 * (samples["system1"] - samples["system0"]) / in_window
            if requests
            else None,
            "wakeups_per_connection": (samples["switches1"] - samples["switches0"]) / in_window
            if requests
            else None,
            "faults_per_connection": (samples["faults1"] - samples["faults0"]) / in_window
            if requests
            else None,
        }
    finally:
        service.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sandboxes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--pace", type=float, default=0.0,
        help="connections/s offered in all (0: as many as the clients get through)",
    )  # fmt: skip
    parser.add_argument("--phase", default="tls_rate", choices=["tls_rate", "http_rate"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_workers: needs root (namespaces, nftables)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from sandgate.enforcer.demo.fakenet import FakeInternet, fresh_prefix

    counts = args.workers.split(",")
    if any(
        not (c.isdigit() or c in ("2pin", "loop", "squid1", "squid2", "1o", "2o")) for c in counts
    ):
        parser.error("--workers: numbers, 2pin, 1o, 2o, squid1, squid2 or loop, comma-separated")
    prefix = fresh_prefix("sgw")
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    os.environ["SANDGATE_RUN_DIR"] = str(work / "run")
    rows: dict[str, list[dict]] = {n: [] for n in counts}
    try:
        with FakeInternet(prefix, work / "net") as fn:
            for round_no in range(args.rounds):
                for n in counts:  # interleaved: drifting load hits both alike
                    where = work / f"r{round_no}-w{n}"
                    where.mkdir()
                    row = one_round(fn, where, n, args, round_no)
                    rows[n].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pace = f", paced at {args.pace:g}/s in all" if args.pace else ""
    print(f"{args.sandboxes} sandboxes x {args.phase} ({args.threads} threads each{pace}), "
          f"{args.seconds:g} s, median of {args.rounds} rounds; gateway CPU = service + "
          f"workers")  # fmt: skip
    print(f"{'workers':>8} {'conn/s':>10} {'CPU us/conn':>12} {'of it service':>14} "
          f"{'of it kernel':>10} {'wakeups/conn':>13} {'errors':>7}")  # fmt: skip
    medians = {}
    for n in counts:
        if n == "loop":
            m = {k: statistics.median(r[f"loop{k}_s"] for r in rows[n])
                 for k in LOOP_KINDS}  # fmt: skip
            print(f"{'loop':>8} busy loop CPU alone {1e3 * m['1']:.0f} ms, two at once "
                  f"{1e3 * m['2']:.0f} ms each ({m['2'] / m['1']:.2f}x); napping "
                  f"{1e6 * NAP:g} us every ~20 us of work: {1e3 * m['1nap']:.0f} / "
                  f"{1e3 * m['2nap']:.0f} ms ({m['2nap'] / m['1nap']:.2f}x); over 40 MB: "
                  f"{1e3 * m['1big']:.0f} / {1e3 * m['2big']:.0f} ms "
                  f"({m['2big'] / m['1big']:.2f}x)")  # fmt: skip
            continue
        rate = statistics.median(r["connections_per_s"] for r in rows[n])
        cpu = statistics.median(r["cpu_us_per_connection"] or 0 for r in rows[n])
        service = statistics.median(r["service_us_per_connection"] or 0 for r in rows[n])
        errors = sum(r["errors"] for r in rows[n])
        medians[n] = (rate, cpu)
        wakeups = statistics.median(r["wakeups_per_connection"] or 0 for r in rows[n])
        system = statistics.median(r["system_us_per_connection"] or 0 for r in rows[n])
        print(f"{n:>8} {rate:>10.0f} {cpu:>12.0f} {service:>14.0f} {system:>10.0f} "
              f"{wakeups:>13.2f} {errors:>7}")  # fmt: skip
    for n, one in (
        ("2", "1"),
        ("2pin", "1"),
        ("squid2", "squid1"),
        ("2o", "1o"),
        ("1", "1o"),
        ("2", "2o"),
    ):
        base = medians.get(one)
        if base and base[0] and base[1] and n in medians:
            print(f"ratio {n}/{one}: connections/s {medians[n][0] / base[0]:.2f}x, "
                  f"CPU per connection {medians[n][1] / base[1]:.2f}x"
                  + (" (goal for 2: <= 1.10x)" if n == "2" else "")
                  + paired_ratios(rows[n], rows[one]))  # fmt: skip
    return 0


def paired_ratios(rows: list[dict], base_rows: list[dict]) -> str:
    """The CPU ratio of each round's pair, and their median. Setups run in turn
    within a round, so a pair shares the host's phase; the ratio of the medians above
    can take its two medians from rounds in different phases (this host's speed
    drifts by ~15 % over half an hour)."""
    pairs = [
        r["cpu_us_per_connection"] / b["cpu_us_per_connection"]
        for r, b in zip(rows, base_rows, strict=True)
        if r["cpu_us_per_connection"] and b["cpu_us_per_connection"]
    ]
    if len(pairs) < 2:
        return ""
    each = " / ".join(f"{x:.2f}x" for x in pairs)
    return f"; by round {each}, their median {statistics.median(pairs):.2f}x"


if __name__ == "__main__":
    sys.exit(main())
