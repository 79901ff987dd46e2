"""The front door's plain-HTTP path alone, on loopback: the gateway's CPU per new
connection and per keep-alive request, optionally under cProfile.

    .venv/bin/python bench/bench_http1.py [--seconds 3] [--conns 16] [--rounds N]
                                          [--baseline REV] [--with floor] [--profile OUT]
                                          [--h11] [--chunked]

Not a test and not the side-by-side table (bench_gateway.py is): a quick loop for
working on proxy/frontdoor/http1*.py. nginx answers on 127.0.0.1 (one worker, no
log); a real `Gateway` (audit log and metrics as sinks, as in `sandgate run`) runs
in a child process whose front door takes 127.0.0.1 as its sandbox and the
connection's original destination as 203.0.113.10:80 (allowed.test), connecting
to nginx instead; a client process keeps `--conns` exchanges in flight with one
selector. Nothing leaves loopback; the children are stopped at the end.

Reported per phase: requests/s, and the gateway's CPU (user + system, from
/proc/PID/stat) per request. `--profile OUT` runs the gateway under cProfile and
writes OUT.<phase>.pstats (and prints the top of each). `--h11` turns the fast
path off (proxy/frontdoor/http1_fast.py): every exchange through h11, for an A/B.
`--chunked`: nginx answers with a chunked body (an SSI page, as a dynamic page or a
git smart-HTTP answer comes) instead of a Content-Length.

`--with floor` adds, in the same run and in turn round by round (this machine's
speed moves within minutes: only rounds taken in turn compare), bench/floor_relay.py:
the least a Python gateway does for the same exchanges (one epoll loop; no policy,
no checks, no events). What sandgate spends above it is its decisions, checks and
records. Squid is not in this harness: as a reverse proxy (accel) on loopback its
CPU per connection rose round after round (396, 577, 769 us); bench_gateway.py
measures it intercepting, as sandgate works, and the floor beside it (setup F).
Then one table: the medians per variant and their ratios to sandgate's.

`--baseline REV` adds a second gateway whose sandgate is that git revision's tree
(exported to the work directory), in turn with the checkout's: an A/B in one run.
`--with no-telemetry` adds the checkout's gateway with the audit log's and the
metrics' `emit` and `emit_batch` made no-ops: what telemetry costs a request, in
turn; `no-audit`, `no-metrics`: one sink muted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hostspeed

DESTINATION = ("203.0.113.10", 80)
# `--with NAME`: the checkout's gateway with these sinks' `emit` and `emit_batch` no-ops.
MUTED = {"no-telemetry": ("audit", "metrics"), "no-audit": ("audit",), "no-metrics": ("metrics",)}
FLOOR = Path(__file__).resolve().parent / "floor_relay.py"
RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    limits: {connection_rate: 10000}  # the bench measures the gateway, not this cap
    rules:
      - allow: allowed.test
        id: bench-allowed
"""
INSPECT_RULES = """\
# bench_gateway.py's setup I, bench_callgrind.py's --inspected: allowed.test behind a
# method/path rule, so the gateway decrypts it to check each request.
version: 1
profiles:
  default:
    fallback: deny
    limits: {connection_rate: 10000}
    rules:
      - allow: allowed.test
        methods: [GET, HEAD]
        paths: ["/**"]
        id: bench-inspected
"""
NGINX = """\
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello from the bench upstream\\n"; }}
        location = /chunked {{ root {w}; default_type text/html; ssi on; }}
    }}
}}
"""
REQUEST_CLOSE = b"GET %s HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n"
REQUEST_KEEP = b"GET %s HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
CHUNKED_PATH = b"/chunked"  # nginx's SSI: a chunked body
CHUNKED_END = b"\r\n0\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


# --- the gateway (child process) -----------------------------------------------------------


def import_sandgate(tree: str | None, muted: tuple = ()) -> None:
    """Make `import sandgate` take `tree` (`--baseline`: an exported revision), not
    the checkout, or refuse; `muted`: of "audit" and "metrics", the sinks whose
    `emit` and `emit_batch` do nothing (both: bench_gateway.py's setup T)."""
    if tree:
        sys.path.insert(0, tree)
    from sandgate.proxy.telemetry.audit import AuditLog
    from sandgate.proxy.telemetry.metrics import Metrics

    imported = sys.modules["sandgate.proxy"].__file__
    if tree and not imported.startswith(tree):
        raise SystemExit(f"{Path(sys.argv[0]).name}: the baseline imported {imported}")
    for sink in muted:  # the DNS filter hands its answers' events over in batches
        cls = {"audit": AuditLog, "metrics": Metrics}[sink]
        cls.emit = cls.emit_batch = lambda self, event: None


def run_as_gateways_do(main) -> None:
    """Run the coroutine `main` on the loop a gateway process runs on: asyncio's, whose
    epoll set the front door shares (`poller.new_event_loop`, as enforcer/run.py and
    the service have it). On `asyncio.run`'s loop the door has a set of its own, which
    costs each wake-up a second epoll_wait and an asyncio callback."""
    from sandgate.proxy.frontdoor.poller import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


def loopback_gateway(
    work: Path, upstream_port: int, audit, rules_text: str = RULES, upstream_ca: Path | None = None
):
    """A `Gateway` (not started) with `audit` and the metrics as its sinks, whose front
    door takes 127.0.0.1 as its sandbox and DESTINATION as every connection's
    original destination, connecting to 127.0.0.1:`upstream_port` instead (with
    `rules_text`; `upstream_ca`: what inspected TLS verifies that upstream by)."""
    from sandgate.proxy.gateway import Gateway, GatewayConfig
    from sandgate.proxy.policy import load_policy
    from sandgate.proxy.registry import Sandbox
    from sandgate.proxy.telemetry.metrics import Metrics

    rules = work / "rules.yaml"
    rules.write_text(rules_text)
    config = GatewayConfig(
        "127.0.0.1", ["127.0.0.1"], work / "ca", dns_port=0, upstream_ca=upstream_ca
    )
    gateway = Gateway(config, load_policy([rules]), audit, Metrics())
    gateway.add_sandbox(Sandbox("127.0.0.1", "bench", "default"))
    # As if the sandbox had resolved the name through the DNS filter.
    gateway.bindings.record("127.0.0.1", "allowed.test", DESTINATION[0], 10**6)
    gateway.frontdoor.original_dst = lambda sock: DESTINATION
    gateway.frontdoor.upstream_address = lambda ip, port: ("127.0.0.1", upstream_port)
    return gateway


def gateway_main(
    work: str, upstream_port: int, ready, control, tree: str | None = None, muted: tuple = ()
) -> None:
    """A Gateway whose front door listens on loopback; `control` says when to start
    and stop a profile (phase names), and "exit". `tree`, `muted`: `import_sandgate`."""
    import_sandgate(tree, muted)
    from sandgate.proxy.telemetry.audit import AuditLog

    profile_to = os.environ.get("BENCH_HTTP1_PROFILE")
    if os.environ.get("BENCH_HTTP1_H11"):
        import functools

        from sandgate.proxy.frontdoor import http1_relay

        http1_relay.Http1Session = functools.partial(http1_relay.Http1Session, fast=False)

    async def serve() -> None:
        audit = AuditLog(Path(work, "audit.jsonl"))
        gateway = loopback_gateway(Path(work), upstream_port, audit)
        await gateway.start()
        ready.send(gateway.proxy_port)
        loop = asyncio.get_running_loop()
        profiler, phase = None, ""
        while True:
            command = await loop.run_in_executor(None, control.recv)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile_to}.{phase}.pstats")
                profiler = None
            if command == "exit":
                break
            phase = command
            if profile_to:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            control.send("started")
        await gateway.stop()
        audit.close()

    run_as_gateways_do(serve())


# --- the client (child process) ----------------------------------------------------------


def client_main(port: int, conns: int, seconds: float, keep: bool, path: bytes, out) -> None:
    """`conns` exchanges in flight; a new connection per request, or (keep) one per
    slot reused. Counts complete 200 responses."""
    request_close, request_keep = REQUEST_CLOSE % path, REQUEST_KEEP % path
    chunked = path == CHUNKED_PATH
    sel = selectors.DefaultSelector()
    done = errors = 0
    response_size: int | None = None  # learnt from the first keep-alive response

    def open_one() -> None:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE, [bytearray(), False])

    for _ in range(conns):
        open_one()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for key, events in sel.select(0.5):
            s, (got, sent) = key.fileobj, key.data
            if events & selectors.EVENT_WRITE and not sent:
                s.send(request_keep if keep else request_close)
                key.data[1] = True
                sel.modify(s, selectors.EVENT_READ, key.data)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            got += data
            if keep and data:
                if chunked:  # one chunked response ends with the last chunk
                    ended = got.endswith(CHUNKED_END)
                else:
                    if response_size is None and b"\r\n\r\n" in got:
                        head, _, _ = got.partition(b"\r\n\r\n")
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        response_size = len(head) + 4 + length
                    ended = response_size is not None and len(got) >= response_size
                if ended:
                    done += got.startswith(b"HTTP/1.1 200")
                    got.clear()
                    s.send(request_keep)
                continue
            if data:
                continue
            sel.unregister(s)
            s.close()
            if got.startswith(b"HTTP/1.1 200"):
                done += 1
            else:
                errors += 1
            open_one()
    out.put((done, errors))


def run_phase(
    port: int, conns: int, seconds: float, keep: bool, procs: int, path: bytes = b"/"
) -> tuple[int, int]:
    mp = multiprocessing.get_context("fork")
    queue = mp.Queue()
    children = [
        mp.Process(target=client_main, args=(port, conns, seconds, keep, path, queue))
        for _ in range(procs)
    ]
    for c in children:
        c.start()
    results = [queue.get(timeout=seconds + 30) for _ in children]
    for c in children:
        c.join(timeout=10)
    return sum(r[0] for r in results), sum(r[1] for r in results)


def export_tree(rev: str, to: Path) -> Path:
    """The revision's proxy/, enforcer/ and rules/ as the `sandgate` package under
    `to` (how the checkout is installed: pyproject.toml's package-dir)."""
    package = to / "sandgate"
    package.mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", repo, "archive", rev, "proxy", "enforcer", "rules"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", package], input=archive, check=True)
    return to


def wait_listening(port: int, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench_http1: {what} did not start")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--conns", type=int, default=16, help="exchanges in flight per client")
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--phases", default="new,keep")
    parser.add_argument("--profile", metavar="OUT", help="cProfile the gateway; OUT.<phase>.pstats")
    parser.add_argument("--h11", action="store_true", help="no fast path: h11 reads everything")
    parser.add_argument("--chunked", action="store_true", help="chunked responses from nginx")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also a gateway of this git revision's tree, in turn (an A/B in one run)",
    )
    parser.add_argument(
        "--with",
        dest="others",
        default="",
        help=f"floor, {', '.join(MUTED)} (comma-separated): also these, in turn (see above)",
    )
    args = parser.parse_args()
    others = [o for o in args.others.split(",") if o]
    if set(others) - {"floor", *MUTED}:
        parser.error(f"--with takes floor, {', '.join(MUTED)}")
    if args.chunked and "floor" in others:
        parser.error("--chunked is sandgate's alone: the floor reads Content-Length answers")
    nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if nginx is None:
        print("bench_http1: nginx missing (apt-get install -y nginx-light)", file=sys.stderr)
        return 2
    speed = hostspeed.measure()
    work = Path(tempfile.mkdtemp(prefix="sg-bench-http1-"))
    upstream_port = free_port()
    (work / "nginx.conf").write_text(NGINX.format(w=work, port=upstream_port))
    (work / "chunked").write_text("hello from the bench upstream\n")
    path = CHUNKED_PATH if args.chunked else b"/"
    upstream = subprocess.Popen(
        [nginx, "-p", work, "-c", work / "nginx.conf", "-e", work / "nginx-error.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if args.h11:
        os.environ["BENCH_HTTP1_H11"] = "1"
    if args.profile:
        os.environ["BENCH_HTTP1_PROFILE"] = str(Path(args.profile).resolve())
    mp = multiprocessing.get_context("spawn")
    ready_r, ready_w = mp.Pipe(duplex=False)
    # name -> (the tree it imports sandgate from, the sinks muted)
    gateways = {"sandgate": (None, ())}
    if args.baseline:
        gateways["baseline"] = (str(export_tree(args.baseline, work / "baseline-tree")), ())
    gateways |= {name: (None, MUTED[name]) for name in others if name in MUTED}
    servers, processes, controls = [upstream], [], {}
    variants = {}  # name -> (port, pid)
    try:
        for name, (tree, muted) in gateways.items():
            control, control_child = mp.Pipe()
            gateway = mp.Process(
                target=gateway_main,
                args=(str(work / name), upstream_port, ready_w, control_child, tree, muted),
            )
            (work / name).mkdir()
            gateway.start()
            processes.append(gateway)
            if not ready_r.poll(30):
                raise SystemExit(f"bench_http1: the gateway ({name}) did not start")
            variants[name], controls[name] = (ready_r.recv(), gateway.pid), control
        wait_listening(upstream_port, "nginx", upstream)
        if "floor" in others:
            floor = subprocess.Popen(
                [
                    sys.executable,
                    FLOOR,
                    "127.0.0.1",
                    "0",
                    "--upstream",
                    f"127.0.0.1:{upstream_port}",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            servers.append(floor)
            variants["floor"] = (int(floor.stdout.readline()), floor.pid)
        for port, _ in variants.values():
            run_phase(port, 2, 0.3, False, 1)  # warm-up
        names = list(variants)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                port, pid = variants[name]
                for phase in args.phases.split(","):
                    if name in controls:
                        controls[name].send(phase)
                        controls[name].recv()
                    (user0, system0), t0 = cpu_seconds(pid), time.perf_counter()
                    done, errors = run_phase(
                        port, args.conns, args.seconds, phase == "keep", args.procs, path
                    )
                    wall = time.perf_counter() - t0
                    user, system = cpu_seconds(pid)
                    user, system = user - user0, system - system0
                    cpu, per = user + system, 1e6 / max(done, 1)
                    results.setdefault((name, phase), []).append((done / wall, cpu * per))
                    label = f"{name} {phase}" if len(variants) > 1 else phase
                    print(
                        f"round {r + 1} {label:4s}: {done / wall:8,.0f} requests/s, "
                        f"CPU {cpu * per:6,.0f} us per request "
                        f"(user {user * per:,.0f}, system {system * per:,.0f}; "
                        f"{cpu / wall:.2f} cores), errors {errors}",
                        flush=True,
                    )
        print(f"\n{hostspeed.describe(speed, hostspeed.measure())}")
        if len(variants) > 1:
            print_table(names, args.phases.split(","), results, args.rounds)
        for control, gateway in zip(controls.values(), processes, strict=True):
            control.send("exit")
            gateway.join(timeout=15)
        if args.profile:
            import pstats

            for phase in args.phases.split(","):
                path = f"{args.profile}.{phase}.pstats"
                print(f"\n--- {path}")
                pstats.Stats(path).sort_stats("tottime").print_stats(25)
    finally:
        for gateway in processes:
            if gateway.is_alive():
                gateway.terminate()
                gateway.join(timeout=5)
        for server in servers:  # nginx, the floor
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(names: list[str], phases: list[str], results: dict, rounds: int) -> None:
    """Medians over the rounds per variant, and each variant's ratio to sandgate's."""
    print(f"medians of {rounds} rounds, variants in turn (ratios: variant / sandgate)")
    print(f"  {'':34s}" + "".join(f"{n:>12s}" for n in names))
    for phase in phases:
        for i, metric in enumerate(("requests/s", "CPU us per request")):
            medians = [statistics.median(v[i] for v in results[(n, phase)]) for n in names]
            cells = "".join(f"{m:12,.0f}" for m in medians)
            print(f"  {phase + ' ' + metric:34s}{cells}")
            ratios = "".join(f"{m / medians[0]:11.2f}x" for m in medians)
            print(f"  {'  / sandgate':34s}{ratios}")


if __name__ == "__main__":
    sys.exit(main())
