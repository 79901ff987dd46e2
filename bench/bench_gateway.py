"""sandgate vs direct kernel forwarding vs Squid vs stock mitmdump, side by side on one
fake internet.

    sudo .venv/bin/python bench/bench_gateway.py [--quick] [--profile] [--keep] [--baseline REV]

Not a test: it prints numbers and ratios, it asserts nothing. It builds ONE fake
internet (enforcer/demo/fakenet.py: a "host" netns and an "internet" netns with nginx
and dnsmasq) and hangs sandbox network namespaces off the host netns, then runs
the same client script (bench/clients.py) in these setups:

  A  direct   a sandbox netns (enforcer/netns.py) wired to the host netns by a
              veth; ip_forward=1 inside the host netns only; no proxy.
  B  squid    another sandbox netns; Squid (squid-openssl) in the host netns as
              an intercepting proxy (`http_port intercept`, `https_port intercept
              ssl-bump`, peek at step 1 then splice all = SNI passthrough); an nft
              table of the bench's own in the host netns redirects the sandbox's
              TCP 80/443 to Squid; ip_forward=0.
  C  sandgate `ip netns exec HOST sandgate run --rules demo.yaml + connection_rate 10000
              --dns-upstream 198.51.100.53 --extra-ca CA -q -- python clients.py`:
              the clients run inside sandgate's own sandbox.
  T  sandgate C with telemetry off (audit log and metrics emit nothing).
  R  sandgate C with `--baseline REV`'s sandgate (that revision's tree, exported):
     an A/B of a change in the gateway's own setting, in turn with C and T.
  I  sandgate with a method/path rule: inspected HTTPS (mitmproxy decrypts).
  Q  sandgate I with `--baseline REV`'s sandgate: the same A/B for inspection.
  S  Squid with `ssl_bump bump all` (certificates generated per name).
  M  stock `mitmdump --mode transparent` with an allow-all addon.
  F  the floor (bench/floor_relay.py): the least a Python gateway does to relay
     plain HTTP (one epoll loop, the original destination, kept upstreams; no
     policy, no checks, no events), redirected to as Squid is in B. Where a relay
     in Python could be at best: sandgate above it is its own work, not the language's.

One table: medians over rounds, columns direct / sandgate / Squid / mitmdump with
sandgate's ratios, the machine and the versions (bench/README.md).

Metrics: HTTPS bulk download MB/s, new HTTPS connections/s, new plain-HTTP
connections/s (a new TCP connection per request), keep-alive requests/s (HTTPS and
plain HTTP: one connection per client thread, request after request), task start time, and the
gateway's RSS and CPU. `--profile` adds py-spy profiles of the gateway during the
connection-rate runs (`.venv/bin/pip install py-spy`).

Safety: nothing is added to the root netns; every netns, process and nft table
belongs to this run (per-run prefix) and is removed in `finally`, also on ^C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import floor_tls
import hostspeed
from bench_http1 import INSPECT_RULES

REPO = Path(__file__).resolve().parent.parent
CLIENTS = REPO / "bench" / "clients.py"
DEMO_RULES = REPO / "rules" / "examples" / "demo.yaml"
# The bench measures the gateway, not a profile's cap on new connections a second
# (docs/rules.md `connection_rate`, 200 by default: the clients open more).
BENCH_LIMITS = "    limits: {connection_rate: 10000}\n"
PY = sys.executable
# The clients (stdlib only) run in every setup with the system Python: inside a
# sandgate sandbox /root is a fresh tmpfs, so a venv built on pyenv is unreachable.
CLIENT_PY = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else PY
VENV_BIN = Path(PY).parent

SQUID_PORTS = {"B": (3128, 3129, 3130), "S": (3133, 3134, 3135)}  # admin, http, https
FLOOR_PORT = 3140  # F: plain HTTP only
FLOOR = REPO / "bench" / "floor_relay.py"
MITMDUMP_PORT = 8080
ALLOW_ALL_ADDON = """\
# Stock mitmdump's side of the inspected-HTTPS rows: an addon that looks at every
# request and lets it pass, as a policy that allows everything would.
class AllowAll:
    def request(self, flow):
        pass


addons = [AllowAll()]
"""


# --- task start probe (runs as its own process: `--probe-start OUT -- ARGS`) ---------


def probe_start(out: str, argv: list[str]) -> int:
    """`sandgate ARGV` in this process, with timers around the steps of `run`.

    Started as `python bench_gateway.py --probe-start OUT -- run ...`: the module
    above imports nothing heavy, so the first timer starts right after the
    interpreter is up. Writes {step: ms} to OUT.
    """
    import asyncio
    import functools
    import importlib

    marks: dict[str, float] = {}
    t_all = time.perf_counter()

    def add(name: str, t0: float) -> None:
        marks[name] = marks.get(name, 0.0) + (time.perf_counter() - t0) * 1000

    # As the CLI's main() does for an embedded run, before its imports: the compiled
    # dataclass methods kept in the state dir (enforcer/dataclass_cache.py; cmd_run
    # ends it). A revision without it (bench_start --baseline) has nothing to start.
    if argv[:1] == ["run"]:
        try:
            from sandgate.enforcer import dataclass_cache
        except ImportError:
            pass
        else:
            dataclass_cache.start()
    # In the order the CLI itself imports them (the product may set up import
    # tricks, e.g. for mitmproxy, that a different order would defeat).
    for label, module in (
        (STEP_IMPORT_CLI, "sandgate.enforcer.cli"),
        (STEP_IMPORT_RUN, "sandgate.enforcer.run"),
        (STEP_IMPORT_REST, "sandgate.enforcer.cli.run"),
    ):
        t0 = time.perf_counter()
        importlib.import_module(module)
        add(label, t0)

    import sandgate.enforcer.cli.run as cli_run
    import sandgate.enforcer.run as run
    from sandgate.enforcer import netns, nft
    from sandgate.enforcer.sandbox import prepare
    from sandgate.proxy.dns.server import DnsFilter
    from sandgate.proxy.engine import ProxyEngine

    missing = []

    def wrap_sync(obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None:  # the product changed: time what is still there
            missing.append(f"{getattr(obj, '__name__', obj)}.{attr}")
            return

        @functools.wraps(fn)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                add(label, t0)

        setattr(obj, attr, timed)

    def wrap_async(obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None:
            missing.append(f"{getattr(obj, '__name__', obj)}.{attr}")
            return

        @functools.wraps(fn)
        async def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                add(label, t0)

        setattr(obj, attr, timed)

    from sandgate.proxy.gateway import Gateway

    # Labels are (indent level, text): nested steps are part of the step above them.
    wrap_sync(cli_run, "load_rules", STEP_LOAD)  # where cmd_run looks it up
    wrap_sync(asyncio.Runner, "run", STEP_ASYNCIO)  # run.py runs its loop with a Runner
    wrap_sync(run, "_pick_addresses", STEP_PICK)
    wrap_sync(netns, "create_sandbox_net", STEP_NETNS)
    wrap_sync(netns, "_wait_until_up", STEP_LINKUP)
    wrap_async(DnsFilter, "start", STEP_DNS)
    wrap_async(ProxyEngine, "_start", STEP_MITM)
    wrap_sync(run, "_write_ca_bundle", STEP_CA)
    wrap_sync(nft, "apply_ruleset", STEP_NFT)
    wrap_sync(run.TaskRun, "_prepare_sandbox", STEP_PREPARE)
    wrap_async(run.TaskRun, "_run_task", STEP_TASK)
    wrap_sync(prepare.PreparedSandbox, "join", STEP_JOIN)
    wrap_sync(prepare.PreparedSandbox, "check_workspace", STEP_PLANTING)
    wrap_sync(prepare.PreparedSandbox, "finish", STEP_FINISH)
    wrap_async(run.TaskRun, "_teardown", STEP_TEARDOWN)
    wrap_sync(netns, "cut_off", STEP_CUTOFF)
    wrap_sync(netns, "destroy_sandbox_net", STEP_DESTROY)
    wrap_sync(netns, "release_sandbox_net", STEP_RELEASE)
    wrap_sync(nft, "read_counters", STEP_COUNTERS)
    wrap_sync(nft, "delete_table", STEP_DELTABLE)
    wrap_async(Gateway, "stop", STEP_GWSTOP)
    try:
        from sandgate.proxy.telemetry.metrics import Metrics
    except ImportError:
        pass
    else:
        wrap_sync(Metrics, "serve", STEP_METRICS_START)
        wrap_sync(Metrics, "stop", STEP_METRICS_STOP)

    from sandgate.enforcer.cli import main

    t0 = time.perf_counter()

    def write_marks(rc: int) -> None:
        add(STEP_MAIN, t0)
        marks[STEP_INPROCESS] = (time.perf_counter() - t_all) * 1000
        marks["t_end_wall"] = time.time()  # the caller times the interpreter's exit from here
        marks["rc"] = rc
        marks["unwrapped"] = missing
        Path(out).write_text(json.dumps(marks))

    # `sandgate run` ends with os._exit (no interpreter finalisation): write the
    # timings on the way out, then leave the way the product does.
    real_exit = os._exit
    probe_pid = os.getpid()

    def exit_with_marks(code: int) -> None:
        if os.getpid() == probe_pid:  # not in a child forked from it (the sandbox init)
            write_marks(code)
        real_exit(code)

    os._exit = exit_with_marks
    rc = main(argv)
    write_marks(rc)  # a command that returns instead
    return rc


def run_without_telemetry(argv: list[str]) -> int:
    """`sandgate ARGV` in this process with the audit log's and the metrics' `emit`
    doing nothing: the writer thread idles, no line is encoded or hashed, no metric
    moves. Setup T (`python bench_gateway.py --no-telemetry -- run ...`) against C
    is what telemetry costs a connection."""
    from sandgate.proxy.telemetry.audit import AuditLog
    from sandgate.proxy.telemetry.metrics import Metrics

    # `emit_batch` too: the DNS filter's answers come in batches.
    AuditLog.emit = AuditLog.emit_batch = Metrics.emit = Metrics.emit_batch = lambda self, e: None
    from sandgate.enforcer.cli import main

    return main(argv)


STEP_IMPORT_CLI = "import enforcer.cli (argparse, policy, yaml)"
STEP_IMPORT_RUN = "import enforcer.run (pyroute2, dnspython, ...)"
STEP_IMPORT_REST = "import enforcer.cli.run"
STEP_MAIN = "cli main()"
STEP_LOAD = "load rules"
STEP_ASYNCIO = "asyncio.Runner.run(TaskRun.run())"
STEP_PICK = "pick address (netlink dump)"
STEP_NETNS = "create netns + veth"
STEP_LINKUP = "wait for links up"
STEP_DNS = "DNS filter listen"
STEP_MITM = "mitmproxy import + start (if the rules inspect)"
STEP_CA = "write CA bundles (x2)"
STEP_NFT = "nft -f (ruleset)"
STEP_PREPARE = "prepare the sandbox (spec, cgroup, workspace)"
STEP_TASK = "task: sandbox init + CMD"
STEP_JOIN = "join the init to its cgroup"
STEP_PLANTING = "check the workspace (planting)"
STEP_FINISH = "remove the cgroup (limits hit)"
STEP_TEARDOWN = "teardown"
STEP_CUTOFF = "cut off (host veth down)"
STEP_DESTROY = "destroy netns + veth"
STEP_RELEASE = "release netns (the kernel deletes it and the veth)"
STEP_COUNTERS = "nft -j list (counters)"
STEP_DELTABLE = "nft delete table"
STEP_GWSTOP = "gateway stop"
STEP_METRICS_START = "metrics server start"
STEP_METRICS_STOP = "metrics server stop"
STEP_INPROCESS = "in-process total (imports + main)"
STEP_WALL = "wall: netns enter ... until exit"
STEP_OUTSIDE = "interpreter start (+ netns enter, the probe's own imports)"
STEP_EXIT = "interpreter exit (finalization, thread joins)"
BREAKDOWN = [  # (indent, label) in print order
    (0, STEP_IMPORT_CLI),
    (0, STEP_IMPORT_RUN),
    (0, STEP_IMPORT_REST),
    (0, STEP_MAIN),
    (1, STEP_LOAD),
    (1, STEP_ASYNCIO),
    (2, STEP_PICK),
    (2, STEP_NETNS),
    (3, STEP_LINKUP),
    (2, STEP_DNS),
    (2, STEP_MITM),
    (2, STEP_CA),
    (2, STEP_METRICS_START),
    (2, STEP_NFT),
    (2, STEP_PREPARE),
    (2, STEP_TASK),
    (3, STEP_JOIN),
    (2, STEP_TEARDOWN),
    (3, STEP_PLANTING),
    (3, STEP_FINISH),
    (3, STEP_CUTOFF),
    (3, STEP_COUNTERS),
    (3, STEP_DELTABLE),
    (3, STEP_DESTROY),
    (3, STEP_RELEASE),
    (3, STEP_GWSTOP),
    (3, STEP_METRICS_STOP),
    (0, STEP_INPROCESS),
    (0, STEP_OUTSIDE),
    (0, STEP_EXIT),
    (0, STEP_WALL),
]


# --- small helpers ---------------------------------------------------------------------


def ip_netns(ns: str, *argv) -> list[str]:
    return ["ip", "netns", "exec", ns, *map(str, argv)]


def timed_run(argv: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
    return (time.perf_counter() - t0) * 1000, proc


def median_ms(
    argv: list[str], n: int, env=None, notes: list | None = None
) -> tuple[float, list[float]]:
    """Median wall time of `n` runs; failed runs are left out (and noted)."""
    samples, failed = [], []
    for _ in range(n):
        ms, proc = timed_run(argv, env=env)
        if proc.returncode != 0:
            failed.append(proc.stderr.strip()[-300:])
            continue
        samples.append(ms)
    if failed and notes is not None:
        notes.append(
            f"{len(failed)} of {n} runs of {Path(argv[4] if argv[:3] == ['ip', 'netns', 'exec'] else argv[0]).name}"
            f" failed, e.g.: {failed[0]}"
        )
    if not samples:
        raise RuntimeError(f"{' '.join(argv)} failed: {failed[0]}")
    return statistics.median(samples), samples


class Sampler:
    """RSS and CPU time of one pid, sampled every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        import threading

        self.pid, self.interval = pid, interval
        self.samples: list[
            tuple[float, int, float, float]
        ] = []  # (wall time, rss bytes, cpu s, sys cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _read(self) -> tuple[int, float, float] | None:
        try:
            rss_pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except (OSError, IndexError, ValueError):
            return None
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]) / self._tick, int(fields[12]) / self._tick
        return rss_pages * self._page, utime + stime, stime

    def _loop(self) -> None:
        while not self._stop.is_set():
            got = self._read()
            if got is not None:
                self.samples.append((time.time(), *got))
            self._stop.wait(self.interval)

    def during(self, t_start: float, t_end: float) -> dict:
        inside = [s for s in self.samples if t_start <= s[0] <= t_end]
        if len(inside) < 2:
            return {}
        cpu = inside[-1][2] - inside[0][2]
        wall = inside[-1][0] - inside[0][0]
        return {
            "rss_peak_mb": max(s[1] for s in inside) / 2**20,
            "rss_start_mb": inside[0][1] / 2**20,
            "cpu_s": cpu,
            "cpu_sys_share": (inside[-1][3] - inside[0][3]) / cpu if cpu > 0 else None,
            "cpu_util": cpu / wall if wall > 0 else None,
        }


def attach_usage(res: dict, sampler: Sampler) -> None:
    """The proxy's RSS and CPU during each client phase of `res`."""
    for phase in PHASES:
        if "t_start" in res.get(phase, {}):
            usage = sampler.during(res[phase]["t_start"], res[phase]["t_end"])
            if usage.get("cpu_s") and res[phase].get("requests"):
                usage["cpu_us_per_request"] = 1e6 * usage["cpu_s"] / res[phase]["requests"]
            if usage.get("cpu_s") and res[phase].get("downloads"):
                mb = res[phase]["downloads"] * res[phase]["bytes_each"] / 1e6
                usage["cpu_ms_per_mb"] = 1e3 * usage["cpu_s"] / mb
            res[phase]["proxy"] = usage


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, utime+stime ticks, command name) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]), name)
    return table


def other_cpu() -> dict[int, tuple[int, str]]:
    """CPU ticks of every process that is not this bench or one of its descendants
    (other work on the machine, which skews the numbers)."""
    table = _proc_table()
    ours = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in table.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return {pid: (ticks, name) for pid, (_, ticks, name) in table.items() if pid not in ours}


def other_cpu_since(before: dict[int, tuple[int, str]], seconds: float) -> dict:
    """Cores used by other processes (alive at both ends) over `seconds`."""
    after = other_cpu()
    tick = os.sysconf("SC_CLK_TCK")
    per: dict[str, float] = {}
    for pid, (ticks, name) in after.items():
        if pid in before:
            per[name] = per.get(name, 0.0) + (ticks - before[pid][0]) / tick / max(seconds, 1e-3)
    top = sorted(((round(v, 2), k) for k, v in per.items() if v >= 0.05), reverse=True)[:3]
    return {"cores": round(sum(per.values()), 2), "top": [f"{k} {v}" for v, k in top]}


PHASES = ("bulk", "tls_rate", "http_rate", "tls_keep", "http_keep")
PHASE_METRIC = dict.fromkeys(PHASES, "per_s") | {"bulk": "mb_per_s"}
SETUP_NAMES = {
    "A": "direct forwarding",
    "B": "squid intercept + splice",
    "C": "sandgate run",
    "T": "sandgate run, telemetry off",
    "R": "sandgate run of the --baseline revision",
    "I": "sandgate run, inspecting (method/path rule)",
    "Q": "sandgate run of the --baseline revision, inspecting",
    "S": "squid intercept + ssl_bump bump",
    "M": "stock mitmdump, transparent, allow-all addon",
    "F": "the floor: a bare Python relay of plain HTTP",
}
SETUP_PHASES = {
    "A": ("bulk", "tls_rate", "http_rate", "tls_keep", "http_keep"),
    "B": ("bulk", "tls_rate", "http_rate", "http_keep"),
    "C": ("bulk", "tls_rate", "http_rate", "http_keep"),
    "T": ("tls_rate", "http_rate"),
    "R": ("tls_rate", "http_rate"),
    "I": ("bulk", "tls_rate", "tls_keep"),
    "Q": ("bulk", "tls_rate", "tls_keep"),
    "S": ("bulk", "tls_rate", "tls_keep"),
    "M": ("bulk", "tls_rate", "tls_keep", "http_rate", "http_keep"),
    "F": ("http_rate", "http_keep"),
}


def take_medians(res: dict) -> None:
    """Per phase, the median over the rounds of every number becomes res[phase]."""
    rounds = res.get("rounds", [])
    for phase in PHASES:
        good = [r[phase] for r in rounds if PHASE_METRIC[phase] in r.get(phase, {})]
        if good:
            res[phase] = dict(_medians(good), rounds=len(good))


def _medians(dicts: list[dict]) -> dict:
    out = {}
    for key, first in dicts[0].items():
        values = [d.get(key) for d in dicts]
        if all(isinstance(v, dict) for v in values):
            out[key] = _medians(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        else:
            out[key] = first
    return out


class Bench:
    def __init__(self, args, fn, workdir: Path):
        from sandgate.enforcer import netns

        self.args, self.fn, self.workdir = args, fn, workdir
        # demo.yaml with BENCH_LIMITS in its profile
        self.rules = workdir / "rules.yaml"
        self.rules.write_text(
            DEMO_RULES.read_text().replace(
                "    fallback: deny\n", "    fallback: deny\n" + BENCH_LIMITS, 1
            )
        )
        self.netns = netns
        suffix = fn.prefix[3:]
        # A sandbox netns per setup whose proxy (if any) the bench runs itself.
        self.sbx_ids = {key: f"b{suffix}{key.lower()}" for key in ("A", "B", "S", "M", "F")}
        self.nets = {}
        self.table = f"sgbench_{fn.prefix.replace('-', '_')}"
        self.proxies: dict[str, subprocess.Popen] = {}  # B, S: squid; M: mitmdump; F: floor
        self.gateways: list[subprocess.Popen] = []
        # The gateway CA and the audit logs go to the bench's work directory. The
        # run directory stays the default one: `sandgate gc` (run by anyone) spares
        # the sandboxes of runs whose pid file it finds there, and only there.
        self.state_dir = workdir / "sandgate-state"
        self.trust_dir = workdir / "trust"  # bound into sandgate's sandboxes (sandbox_cacert)
        self.trust_dir.mkdir()
        self.run_dir = Path(os.environ.get("SANDGATE_RUN_DIR", "/run/sandgate"))
        self.env = dict(os.environ, SANDGATE_STATE_DIR=str(self.state_dir))
        self.env["PATH"] = f"{VENV_BIN}:{self.env.get('PATH', '')}:/usr/sbin:/sbin"
        self.results: dict = {key: {} for key in SETUP_NAMES}
        self.results.update(start={}, notes=[])
        self.baseline_tree = None  # `--baseline REV`: that revision's sandgate (setup R)
        if args.baseline:
            from bench_http1 import export_tree

            self.baseline_tree = export_tree(args.baseline, workdir / "baseline")

    # -- plumbing

    def host(self, *argv, check=True, **kw) -> subprocess.CompletedProcess:
        proc = self.fn.run_in_host(list(argv), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} in host ns failed: {proc.stderr.strip()}"
            )
        return proc

    def client_argv(self, phases: list[str], resolve: bool, cacert=None) -> list[str]:
        """The clients' command line; `cacert` None: the default, $SSL_CERT_FILE (in a
        sandgate sandbox: the bundle `sandgate run` binds, the system's CAs with
        --extra-ca and, when the rules inspect, the gateway's CA; see sandbox_cacert)."""
        a = self.args
        argv = [
            CLIENT_PY,
            CLIENTS,
            *phases,
            "--host",
            "allowed.test",
            *(["--cacert", cacert] if cacert else []),
            "--bulk-seconds",
            a.bulk_seconds,
            "--rate-seconds",
            a.rate_seconds,
            "--procs",
            a.procs,
            "--threads",
            a.threads,
        ]
        if resolve:
            argv += ["--resolve", f"allowed.test:{self.fn.hosts['allowed.test']}"]
        return [str(x) for x in argv]

    def sandgate_argv(
        self, *command, telemetry: bool = True, rules: Path | None = None, tree: Path | None = None
    ) -> list[str]:
        sandgate = [str(VENV_BIN / "sandgate")]
        if not telemetry:
            sandgate = [PY, __file__, "--no-telemetry", "--"]
        elif tree is not None:
            sandgate = [PY, __file__, "--in-tree", str(tree), "--"]
        return [
            *sandgate,
            "run",
            "--rules",
            str(rules or self.rules),
            "--dns-upstream",
            self.fn.dns_ip,
            "--extra-ca",
            str(self.fn.ca_cert),
            "-q",
            "--ro",  # the clients' CA file (sandbox_cacert)
            str(self.trust_dir),
            *self.args.sandgate_arg,
            "--",
            *map(str, command),
        ]

    def make_sandboxes(self) -> None:
        # `sandgate gc` (which other runs and test suites on this machine may call)
        # removes every sg-* netns without a live pid file in the run directory:
        # register ours the way `sandgate run` does, so they survive it.
        for sid in self.sbx_ids.values():
            (self.run_dir / sid).mkdir(parents=True, exist_ok=True)
            (self.run_dir / sid / "pid").write_text(str(os.getpid()))
        with self.netns.entered_netns(self.fn.host_ns):
            for index, (key, sid) in enumerate(self.sbx_ids.items(), start=1):
                gw, sbx = self.netns.allocate_addresses(self.netns.DEFAULT_POOL, index)
                self.nets[key] = self.netns.create_sandbox_net(sid, gw, sbx)

    def cleanup(self) -> None:
        """Best effort, every step: our processes, sandboxes, nft table."""
        ids = list(self.sbx_ids.values())
        for proc in [*self.proxies.values(), *self.gateways]:
            if proc is not None and proc.poll() is None:
                # A sandgate run of ours that is still up: note its run id (its pid
                # file names it), so that its sandbox goes even if it must be killed.
                with contextlib.suppress(OSError):
                    for pid_file in self.run_dir.glob("*/pid"):
                        with contextlib.suppress(OSError, ValueError):
                            if int(pid_file.read_text()) == proc.pid:
                                ids.append(pid_file.parent.name)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        from pyroute2 import netns as pr_netns

        if Path(f"/run/netns/{self.fn.host_ns}").exists():
            with self.netns.entered_netns(self.fn.host_ns):
                for sid in ids:
                    with contextlib.suppress(Exception):
                        self.netns.destroy_sandbox_net(sid)
        for sid in ids:
            with contextlib.suppress(OSError):
                pr_netns.remove(self.netns.netns_name(sid))
        for sid in self.sbx_ids.values():
            with contextlib.suppress(OSError):
                (self.run_dir / sid / "pid").unlink()
                (self.run_dir / sid).rmdir()
        # The nft table lives in the host netns and goes with it (fakenet.close).

    def phases(self, key: str) -> tuple[str, ...]:
        """Setup `key`'s client phases, less those `--phases` leaves out."""
        wanted = self.args.phases
        return tuple(p for p in SETUP_PHASES[key] if wanted is None or p in wanted)

    def run_clients_in(self, key: str, phases=SETUP_PHASES["A"], cacert=None) -> dict:
        ns = self.nets[key].netns
        out = self.workdir / f"clients-{key}.json"
        cacert = cacert or self.fn.ca_cert
        argv = ip_netns(ns, *self.client_argv(list(phases), True, cacert), "--out", out)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"clients in {key} failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())

    # -- A: direct forwarding

    def round_direct(self) -> dict:
        self.host("sysctl", "-w", "net.ipv4.ip_forward=1")
        try:
            return self.run_clients_in("A", self.phases("A"))
        finally:
            self.host("sysctl", "-w", "net.ipv4.ip_forward=0")

    # -- B: Squid

    def _squid_files(self, key: str, bump: bool) -> Path:
        """Squid's work directory for setup `key`: TLS spliced after a peek at the
        SNI (B), or bumped (S: every connection decrypted with a certificate
        generated for its name by `security_file_certgen`, signed by a CA of the
        bench's own, EC P-256 like sandgate's)."""
        import pwd

        d = self.workdir / f"squid-{key}"
        d.mkdir(mode=0o755)
        cert, key_file = d / "squid.pem", d / "squid.key"
        ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE"]
        ca_ext += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-days", "2", "-subj", f"/CN=sandgate bench squid {key}", *ca_ext]
            + ["-keyout", key_file, "-out", cert],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        gw = self.nets[key].gateway_ip
        admin, http, https = SQUID_PORTS[key]
        if bump:
            certgen = "/usr/lib/squid/security_file_certgen"
            subprocess.run(
                [certgen, "-c", "-s", d / "ssl_db", "-M", "16MB"], check=True, capture_output=True
            )
            tls = f"""\
https_port {gw}:{https} intercept ssl-bump tls-cert={cert} tls-key={key_file} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program {certgen} -s {d}/ssl_db -M 16MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={self.fn.ca_cert}
"""
        else:
            tls = f"""\
https_port {gw}:{https} intercept ssl-bump tls-cert={cert} tls-key={key_file} generate-host-certificates=off
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump splice all
"""
        (d / "squid.conf").write_text(f"""\
# Squid as an intercepting proxy for sandbox {key}; written by bench_gateway.py.
http_port 127.0.0.1:{admin}
http_port {gw}:{http} intercept
{tls}http_access allow all
# no cache_dir: no disk cache; and nothing cached in memory either
cache deny all
cache_mem 0 MB
dns_nameservers {self.fn.dns_ip}
hosts_file none
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log stdio:{d}/access.log
cache_store_log none
netdb_filename none
pinger_enable off
logfile_rotate 0
coredump_dir {d}
shutdown_lifetime 0 seconds
via off
forwarded_for transparent
max_filedescriptors 65536
visible_hostname sandgate-bench
""")
        try:
            pw = pwd.getpwnam("proxy")
            for path in (d, *d.rglob("*")):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        except KeyError:
            os.chmod(d, 0o777)
        os.chmod(self.workdir, 0o755)
        return d

    def start_proxy(self, key: str) -> None:
        """Start setup `key`'s proxy in the host netns (B, S: squid; M: mitmdump; F:
        the floor), wait until it listens, and redirect the sandbox's TCP 80 to it (and
        443, but for the floor: plain HTTP only)."""
        from sandgate.enforcer.demo.fakenet import _proc_sockets

        t0 = time.perf_counter()
        if key == "M":
            d = self.workdir / "mitmdump"
            d.mkdir()
            (d / "allow_all.py").write_text(ALLOW_ALL_ADDON)
            http = https = MITMDUMP_PORT
            argv = [VENV_BIN / "mitmdump", "--mode", "transparent", "-q"]
            argv += ["--listen-host", str(self.nets[key].gateway_ip), "--listen-port", http]
            argv += [
                "--set",
                f"confdir={d}",
                "--set",
                f"ssl_verify_upstream_trusted_ca={self.fn.ca_cert}",
            ]
            argv += ["-s", d / "allow_all.py"]
            log_file = d / "mitmdump.out"
        elif key == "F":
            d = self.workdir / "floor"
            d.mkdir(exist_ok=True)
            http = https = FLOOR_PORT
            argv = [PY, FLOOR, str(self.nets[key].gateway_ip), http]
            log_file = d / "floor.out"
        else:
            d = self._squid_files(key, bump=key == "S")
            _, http, https = SQUID_PORTS[key]
            argv = ["squid", "-N", "-f", d / "squid.conf"]
            log_file = d / "squid.out"
        with open(log_file, "wb") as log:  # the child has its own copy
            proc = self.proxies[key] = self.fn.popen_in_host(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        gw = str(self.nets[key].gateway_ip)
        want = {(gw, http), (gw, https)}
        deadline = time.monotonic() + 30
        host_id = os.stat(f"/run/netns/{self.fn.host_ns}").st_ino
        while True:
            if proc.poll() is not None:
                cache_log = (
                    (d / "cache.log").read_text()[-2000:] if (d / "cache.log").exists() else ""
                )
                raise RuntimeError(f"{key} exited:\n" + log_file.read_text()[-2000:] + cache_log)
            try:
                in_host = os.stat(f"/proc/{proc.pid}/ns/net").st_ino == host_id
            except OSError:
                in_host = False
            if in_host and want <= _proc_sockets(proc.pid, "tcp"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{key} not listening after 30 s:\n" + log_file.read_text()[-2000:]
                )
            time.sleep(0.01)
        self.results[key]["proxy_start_ms"] = (time.perf_counter() - t0) * 1000
        iface = self.nets[key].host_if
        ruleset = f"""\
table inet {self.table}_{key.lower()} {{
    chain nat_prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{iface}" tcp dport 80 redirect to :{http}
        {"" if key == "F" else f'iifname "{iface}" tcp dport 443 redirect to :{https}'}
    }}
}}
"""
        self.host("nft", "-f", "-", input=ruleset)

    def stop_proxy(self, key: str) -> None:

        with contextlib.suppress(Exception):
            self.host("nft", "delete", "table", "inet", f"{self.table}_{key.lower()}", check=False)
        proc = self.proxies.get(key)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def round_proxy(self, key: str) -> dict:
        cacert = self.workdir / "mitmdump" / "mitmproxy-ca-cert.pem" if key == "M" else None
        if key == "S":
            cacert = self._bundle(self.workdir / "squid-S" / "squid.pem")
        with Sampler(self.proxies[key].pid) as sampler:
            res = self.run_clients_in(key, self.phases(key), cacert)
        attach_usage(res, sampler)
        return res

    def _bundle(self, extra: Path) -> Path:
        bundle = self.workdir / f"bundle-{extra.parent.name}.pem"
        if not bundle.exists():
            bundle.write_text(Path(self.fn.ca_cert).read_text() + extra.read_text())
        return bundle

    # -- C: sandgate

    def popen_sandgate(
        self, *command, telemetry=True, rules=None, tree=None, **kw
    ) -> subprocess.Popen:
        argv = self.sandgate_argv(*command, telemetry=telemetry, rules=rules, tree=tree)
        proc = self.fn.popen_in_host(argv, env=self.env, **kw)
        self.gateways.append(proc)
        return proc

    def first_sandgate_run(self) -> None:
        """The first run makes the gateway CA in the (per-bench) state dir."""
        ms, proc = timed_run(ip_netns(self.fn.host_ns, *self.sandgate_argv("true")), env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"sandgate run -- true failed: {proc.stderr.strip()}")
        self.results["start"]["first_run_ms"] = ms

    def sandbox_cacert(self, inspecting: bool) -> Path:
        """What the clients in a sandgate sandbox trust: the fake internet's CA, and
        the gateway's when it inspects; the file is bound read-only into the sandbox
        (`sandgate_argv`). Not $SSL_CERT_FILE, the bundle `sandgate run` binds: that
        holds the system's ~145 CAs too, and curl parses them all on every download
        (~15 ms a download here, as long as a 10 MiB transfer), where the other
        setups' clients trust one or two CAs (issue 11: that was most of sandgate's
        gap in the bulk row)."""
        parts = [Path(self.fn.ca_cert)]
        if inspecting:
            parts.append(self.state_dir / "ca" / "mitmproxy-ca-cert.pem")
        path = self.trust_dir / ("inspecting.pem" if inspecting else "passthrough.pem")
        path.write_text("".join(p.read_text() for p in parts))
        return path

    def round_sandgate(self, phases, telemetry=True, rules=None, tree=None) -> dict:
        cacert = self.sandbox_cacert(inspecting=rules is not None)
        # The task's /tmp is its own: the clients' JSON comes back on stdout.
        gw = self.popen_sandgate(
            *self.client_argv(list(phases), resolve=False, cacert=cacert),
            rules=rules,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            telemetry=telemetry,
            tree=tree,
        )
        with Sampler(gw.pid) as sampler:
            stdout, stderr = gw.communicate(timeout=300)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if gw.returncode != 0 or not lines:
            raise RuntimeError(
                f"sandgate run with the clients failed ({gw.returncode}): {stderr[-2000:]}"
            )
        res = json.loads(lines[-1])
        attach_usage(res, sampler)
        return res

    # -- the rounds

    def run_rounds(self, skip: set[str]) -> None:
        """`--rounds` rounds of every setup in turn; per metric the median of the
        rounds counts."""
        rounds = {
            "A": self.round_direct,
            "B": lambda: self.round_proxy("B"),
            "C": lambda: self.round_sandgate(self.phases("C")),
            "T": lambda: self.round_sandgate(self.phases("T"), telemetry=False),
            "R": lambda: self.round_sandgate(self.phases("R"), tree=self.baseline_tree),
            "I": lambda: self.round_sandgate(self.phases("I"), rules=self.inspect_rules()),
            "Q": lambda: self.round_sandgate(
                self.phases("Q"), rules=self.inspect_rules(), tree=self.baseline_tree
            ),
            "S": lambda: self.round_proxy("S"),
            "M": lambda: self.round_proxy("M"),
            "F": lambda: self.round_proxy("F"),
        }
        setups = [(k, fn) for k, fn in rounds.items() if k not in skip]
        keys = [k for k, _ in setups]
        for key in ("B", "S", "M", "F"):
            if key in keys:
                try:
                    self.start_proxy(key)
                except Exception as e:  # noqa: BLE001
                    self.results["notes"].append(f"{key} skipped: did not start: {e}")
                    setups = [(k, fn) for k, fn in setups if k != key]
        if {"C", "T", "I"} & set(keys):
            self.first_sandgate_run()
        try:
            for r in range(self.args.rounds):
                for key, fn in setups:
                    print(
                        f"round {r + 1}/{self.args.rounds}: {key} {SETUP_NAMES[key]} ...",
                        flush=True,
                    )
                    if self.args.wait_quiet > 0:
                        wait_quiet(min(5.0, self.args.wait_quiet), quick=True)
                    before = other_cpu()
                    t0 = time.monotonic()
                    try:
                        res = fn()
                    except Exception as e:  # noqa: BLE001 - note it, go on
                        self.results["notes"].append(f"round {r + 1} {key} failed: {str(e)[-800:]}")
                        continue
                    res["other_cpu_cores"] = other_cpu_since(before, time.monotonic() - t0)
                    self.results[key].setdefault("rounds", []).append(res)
        finally:
            for key in list(self.proxies):
                self.stop_proxy(key)
        for key in keys:
            take_medians(self.results[key])

    def inspect_rules(self) -> Path:
        """Rules that inspect allowed.test (a method/path rule: mitmproxy decrypts)."""
        path = self.workdir / "inspect.yaml"
        path.write_text(INSPECT_RULES)
        return path

    # -- task start

    def measure_start(self) -> None:
        print("task start times ...", flush=True)
        n = self.args.starts
        st = self.results["start"]
        st["netns_exec_ms"], _ = median_ms(ip_netns(self.nets["A"].netns, "true"), n)
        st["sandgate_run_ms"], st["sandgate_run_samples"] = median_ms(
            ip_netns(self.fn.host_ns, *self.sandgate_argv("true")),
            n,
            env=self.env,
            notes=self.results["notes"],
        )
        st["python_bare_ms"], _ = median_ms([PY, "-c", "pass"], n)
        st["python_import_mitmproxy_master_ms"], _ = median_ms(
            [PY, "-c", "import mitmproxy.master"], n
        )
        st["python_import_enforcer_run_ms"], _ = median_ms(
            [PY, "-c", "import sandgate.enforcer.run"], n
        )
        st["sandbox_init_true_ms"], _ = median_ms(
            ip_netns(self.nets["A"].netns, PY, "-c", "import argparse, ctypes, socket, signal"), n
        )
        # Breakdown: the same command with timers around each step (see probe_start).
        probes = []
        for i in range(max(3, n // 2)):
            out = self.workdir / f"probe-{i}.json"
            ms, proc = timed_run(
                ip_netns(
                    self.fn.host_ns,
                    PY,
                    Path(__file__).resolve(),
                    "--probe-start",
                    out,
                    "--",
                    *self.sandgate_argv("true")[1:],
                ),
                env=self.env,
            )
            if proc.returncode != 0 or not out.exists():
                self.results["notes"].append(f"a start probe failed: {proc.stderr.strip()[-300:]}")
                continue
            t_done = time.time()
            marks = json.loads(out.read_text())
            marks[STEP_WALL] = ms
            marks[STEP_EXIT] = (t_done - marks.pop("t_end_wall")) * 1000
            marks[STEP_OUTSIDE] = ms - marks[STEP_INPROCESS] - marks[STEP_EXIT]
            probes.append(marks)
        if not probes:
            return
        st["breakdown_ms"] = {
            k: statistics.median(p.get(k, 0.0) for p in probes)
            for k, v in probes[0].items()
            if isinstance(v, float)
        }
        if probes[0].get("unwrapped"):
            self.results["notes"].append(
                "start probe could not time: " + ", ".join(probes[0]["unwrapped"])
            )
        st["import_self_ms_by_package"] = import_profile()
        # -v says how long setup took, from inside the run.
        _, proc = timed_run(
            ip_netns(
                self.fn.host_ns,
                *self.sandgate_argv("true")[:1],
                "run",
                "-v",
                *self.sandgate_argv("true")[2:],
            ),
            env=self.env,
        )
        st["verbose_log"] = [line for line in proc.stderr.splitlines() if "ready" in line]

    # -- profile

    def profile(self) -> None:
        """py-spy on the gateway during each connection-rate run: first the on-CPU
        profile (`--gil`: samples where the event loop holds the GIL, i.e. runs
        Python), then the wall-clock one (also time in syscalls, waiting for the
        GIL or for a CPU). Both with thread ids; the summaries are per process."""
        spy = shutil.which("py-spy", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
        if spy is None:
            self.results["notes"].append(
                "profile skipped: py-spy missing (.venv/bin/pip install py-spy)"
            )
            return
        secs = int(self.args.profile_seconds)
        runs = [  # (label, client phase, rules): pass-through, then inspected (setup I)
            ("tls_rate", "tls_rate", None),
            ("http_rate", "http_rate", None),
            ("http_keep", "http_keep", None),
            ("inspected_tls_rate", "tls_rate", self.inspect_rules()),
            ("inspected_tls_keep", "tls_keep", self.inspect_rules()),
        ]
        for label, phase, rules in runs:
            print(f"profiling sandgate during {label} ...", flush=True)
            argv = self.client_argv([phase], resolve=False)
            argv[argv.index("--rate-seconds") + 1] = str(2 * secs + 3)
            gw = self.popen_sandgate(
                *argv, rules=rules, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            time.sleep(2.0)  # sandgate setup + client warm-up
            prof: dict = {}
            for kind, flags in (("on_cpu", ["--gil"]), ("wall", [])):
                raw = self.workdir / f"profile-{label}-{kind}.txt"
                spy_proc = subprocess.run(
                    [
                        spy,
                        "record",
                        "-p",
                        str(gw.pid),
                        "-d",
                        str(secs),
                        "-r",
                        "250",
                        "-f",
                        "raw",
                        "-t",
                        "--nonblocking",
                        "-o",
                        str(raw),
                        *flags,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=secs + 60,
                )
                if spy_proc.returncode != 0 or not raw.exists():
                    self.results["notes"].append(f"py-spy failed: {spy_proc.stderr.strip()[-500:]}")
                    continue
                prof[kind] = {"file": str(raw), **summarize_profile(raw, seconds=secs)}
            stdout, stderr = gw.communicate(timeout=120)
            client = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
            prof["rate_under_profiler"] = client.get(phase, {}).get("per_s")
            self.results.setdefault("profile", {})[label] = prof

    # -- system calls per connection

    def syscalls(self) -> None:
        """`strace -c` on the proxy (all its threads) for `--profile-seconds` while the
        plain-HTTP connection-rate clients run: system calls per connection by name,
        sandgate (C) beside Squid (B). Counts, not times: they come out the same on a
        busy machine as on a quiet one, which the rates do not. strace slows the proxy
        down; only the counts are read. Connections: the accepts that succeeded."""
        secs = self.args.profile_seconds
        rate_argv = self.client_argv(["http_rate"], resolve=False)
        rate_argv[rate_argv.index("--rate-seconds") + 1] = str(secs + 4)
        counts: dict[str, dict] = {}
        for key in ("C", "B"):
            print(f"strace -c on {SETUP_NAMES[key]} during http_rate ...", flush=True)
            if key == "C":
                proc = self.popen_sandgate(
                    *rate_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                pid = proc.pid
            else:
                shutil.rmtree(self.workdir / "squid-B", ignore_errors=True)  # the rounds' Squid
                self.start_proxy("B")
                argv = self.client_argv(["http_rate"], True, self.fn.ca_cert)
                argv[argv.index("--rate-seconds") + 1] = str(secs + 4)
                proc = subprocess.Popen(
                    ip_netns(self.nets["B"].netns, *argv),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                pid = self.proxies["B"].pid
            try:
                time.sleep(2.0)  # setup and the clients' warm-up
                raw = self.workdir / f"strace-{key}.txt"
                tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(raw), "-p", str(pid)])
                time.sleep(secs)
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=60)
                proc.wait(timeout=120)
            finally:
                if key == "B":
                    self.stop_proxy("B")
            counts[key] = parse_strace_counts(raw.read_text())
        self.results["syscalls"] = counts


def parse_strace_counts(text: str) -> dict:
    """{"per_connection": {syscall: calls per accepted connection}, "connections": N}
    from `strace -c`'s table (% time, seconds, usecs/call, calls, [errors], syscall;
    errors counted as calls: they cost a trip too; an accept that failed is no
    connection)."""
    calls: dict[str, int] = {}
    accepted = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) not in (5, 6) or not parts[0][0].isdigit() or parts[-1] == "total":
            continue
        name, count = parts[-1], int(parts[3])
        calls[name] = count
        if name in ("accept", "accept4"):
            accepted += count - (int(parts[4]) if len(parts) == 6 else 0)
    per = {name: n / max(accepted, 1) for name, n in calls.items()}
    return {"connections": accepted, "per_connection": per}


def report_syscalls(results: dict) -> str:
    counts = results.get("syscalls")
    if not counts:
        return ""
    c, b = counts.get("C", {}), counts.get("B", {})
    pc, pb = c.get("per_connection", {}), b.get("per_connection", {})
    out = [
        f"\nsystem calls per plain-HTTP connection (strace -c; sandgate {c.get('connections')} "
        f"connections, Squid {b.get('connections')}):",
        f"  {'syscall':<20} {'sandgate':>9} {'Squid':>9}",
    ]
    for name in sorted(set(pc) | set(pb), key=lambda n: -max(pc.get(n, 0), pb.get(n, 0))):
        if max(pc.get(name, 0), pb.get(name, 0)) >= 0.05:
            out.append(f"  {name:<20} {pc.get(name, 0):9.2f} {pb.get(name, 0):9.2f}")
    out.append(f"  {'all':<20} {sum(pc.values()):9.2f} {sum(pb.values()):9.2f}")
    return "\n".join(out)


def import_profile(top: int = 12) -> dict[str, float]:
    """Self time of `import enforcer.cli, enforcer.run` grouped by top-level package
    (python -X importtime, which itself adds some overhead)."""
    from collections import Counter

    proc = subprocess.run(
        [PY, "-X", "importtime", "-c", "import sandgate.enforcer.cli, sandgate.enforcer.run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    groups: Counter[str] = Counter()
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].startswith("import time:") or "self" in parts[0]:
            continue
        self_us = int(parts[0].split(":")[1])
        name = parts[2].strip()
        top_name = name.split(".")[0]
        if top_name == "mitmproxy":
            top_name = ".".join(name.split(".")[:2])
        elif top_name == "sandgate":
            top_name = ".".join(name.split(".")[1:3])
        groups[top_name] += self_us / 1000
    total = sum(groups.values())
    out = {name: round(ms, 1) for name, ms in groups.most_common(top)}
    out["(all)"] = round(total, 1)
    return out


def summarize_profile(path: Path, top: int = 30, seconds: float | None = None) -> dict:
    """Self and inclusive share per function (file:line dropped) from py-spy's
    collapsed stacks recorded with `-t` (the first frame names the thread)."""
    from collections import Counter

    self_t, incl, threads, total = Counter(), Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        thread, *frames = stack.split(";")
        threads[thread.split(": ", 1)[-1].strip() or thread] += n
        frames = [
            f.split(":", 1)[0] + ")" if ":" in f else f for f in frames
        ]  # "fn (file.py:12)" -> "fn (file.py)"
        if frames:
            self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    total = max(total, 1)
    pct = lambda c: [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)]  # noqa: E731
    out = {
        "samples": total,
        "threads_pct": pct(threads),
        "self_pct": pct(self_t),
        "inclusive_pct": pct(incl),
    }
    if seconds:
        out["samples_per_s"] = round(total / seconds)  # 250/s = one thread busy all the time
    return out


# --- report ------------------------------------------------------------------------------


def _get(res: dict, *path):
    for key in path:
        if not isinstance(res, dict) or key not in res:
            return None
        res = res[key]
    return res


# The one table: (section, [(label, phase, metric path, format, {column: setup})]).
# Columns: direct, sandgate, Squid, stock mitmdump; a cell without a setup is "-".
TABLE = [
    (
        "allowed pass-through (sandgate: front door; Squid: peek + splice)",
        [
            ("HTTPS bulk, MB/s (10 MiB, new conn each)", "bulk", ("mb_per_s",), "{:,.0f}", "ACB"),
            ("HTTPS new connections/s", "tls_rate", ("per_s",), "{:,.0f}", "ACB"),
            ("HTTPS p50 latency, ms", "tls_rate", ("latency_ms_p50",), "{:.1f}", "ACB"),
            ("HTTPS p99 latency, ms", "tls_rate", ("latency_ms_p99",), "{:.1f}", "ACB"),
            ("HTTP new connections/s", "http_rate", ("per_s",), "{:,.0f}", "ACBM"),
            ("HTTP p50 latency, ms", "http_rate", ("latency_ms_p50",), "{:.1f}", "ACBM"),
            ("proxy CPU per HTTPS connection, us", "tls_rate", ("proxy", "cpu_us_per_request"), "{:,.0f}", "-CB"),
            ("proxy CPU per HTTP connection, us", "http_rate", ("proxy", "cpu_us_per_request"), "{:,.0f}", "-CBM"),
            ("HTTP keep-alive requests/s", "http_keep", ("per_s",), "{:,.0f}", "ACBM"),
            ("HTTP keep-alive p50 latency, ms", "http_keep", ("latency_ms_p50",), "{:.2f}", "ACBM"),
            ("proxy CPU per HTTP keep-alive request, us", "http_keep", ("proxy", "cpu_us_per_request"), "{:,.0f}", "-CBM"),
            ("proxy CPU (cores) during HTTPS bulk", "bulk", ("proxy", "cpu_util"), "{:.2f}", "-CB"),
            ("proxy CPU per MB of HTTPS bulk, ms", "bulk", ("proxy", "cpu_ms_per_mb"), "{:.2f}", "-CB"),
            ("proxy RSS idle (before bulk; rules that inspect some names), MB", "bulk", ("proxy", "rss_start_mb"), "{:.1f}", "-CB"),
        ],
    ),
    (
        "inspected HTTPS (sandgate: method/path rule; Squid: ssl_bump bump; mitmdump: allow-all addon)",
        [
            ("new connections/s", "tls_rate", ("per_s",), "{:,.0f}", "AISM"),
            ("new conn p50 latency, ms", "tls_rate", ("latency_ms_p50",), "{:.1f}", "AISM"),
            ("new conn p99 latency, ms", "tls_rate", ("latency_ms_p99",), "{:.1f}", "AISM"),
            ("keep-alive requests/s", "tls_keep", ("per_s",), "{:,.0f}", "AISM"),
            ("keep-alive p50 latency, ms", "tls_keep", ("latency_ms_p50",), "{:.2f}", "AISM"),
            ("keep-alive p99 latency, ms", "tls_keep", ("latency_ms_p99",), "{:.2f}", "AISM"),
            ("bulk, MB/s (10 MiB, new conn each)", "bulk", ("mb_per_s",), "{:,.0f}", "AISM"),
            ("proxy CPU per new connection, us", "tls_rate", ("proxy", "cpu_us_per_request"), "{:,.0f}", "-ISM"),
            ("proxy CPU per keep-alive request, us", "tls_keep", ("proxy", "cpu_us_per_request"), "{:,.0f}", "-ISM"),
            ("proxy RSS peak during bulk, MB", "bulk", ("proxy", "rss_peak_mb"), "{:.1f}", "-ISM"),
        ],
    ),
]  # fmt: skip
COLUMNS = ("direct", "sandgate", "Squid", "mitmdump")
# The rows of C against T (telemetry on / off) and, with --baseline, of C against R.
TELEMETRY_ROWS = (
    ("HTTPS new connections/s", "tls_rate", ("per_s",)),
    ("HTTP new connections/s", "http_rate", ("per_s",)),
    ("proxy CPU per HTTPS connection, us", "tls_rate", ("proxy", "cpu_us_per_request")),
    ("proxy CPU per HTTP connection, us", "http_rate", ("proxy", "cpu_us_per_request")),
)
# The rows of I against Q (inspected, with --baseline).
INSPECTED_ROWS = (
    ("bulk, MB/s", "bulk", ("mb_per_s",)),
    ("new connections/s", "tls_rate", ("per_s",)),
    ("keep-alive requests/s", "tls_keep", ("per_s",)),
    ("proxy CPU per new connection, us", "tls_rate", ("proxy", "cpu_us_per_request")),
    ("proxy CPU per keep-alive request, us", "tls_keep", ("proxy", "cpu_us_per_request")),
)


def report(results: dict) -> str:
    A, B, C, st = results["A"], results["B"], results["C"], results["start"]

    def fmt(v, unit_fmt="{:,.0f}"):
        return "-" if v is None else unit_fmt.format(v)

    def ratio(x, y):
        return "-" if x is None or y in (None, 0) else f"{x / y:.2f}x"

    head = ("metric (median of rounds)", *COLUMNS, "sg/direct", "sg/Squid", "sg/mitmdump")
    rows: list[tuple[str, ...]] = []
    for section, lines in TABLE:
        rows.append((f"**{section}**",) + ("",) * (len(head) - 1))
        for label, phase, metric, f, setups in lines:
            values = [
                None if key == "-" else _get(results.get(key, {}), phase, *metric)
                for key in setups.ljust(4, "-")
            ]
            direct, sandgate, squid, mitmdump = values
            rows.append(
                (label, *(fmt(v, f) for v in values))
                + (ratio(sandgate, direct), ratio(sandgate, squid), ratio(sandgate, mitmdump))
            )
    rows.append(("**telemetry (sandgate pass-through): on / off / on vs off**",) + ("",) * 7)
    T = results.get("T", {})
    for label, phase, metric in TELEMETRY_ROWS:
        on, off = _get(C, phase, *metric), _get(T, phase, *metric)
        rows.append((label, "", fmt(on), fmt(off), ratio(on, off), "", "", ""))
    R = results.get("R", {})
    if R.get("rounds"):
        rows.append(("**this tree / the baseline (C / R), telemetry on**",) + ("",) * 7)
        for label, phase, metric in TELEMETRY_ROWS:
            this, base = _get(C, phase, *metric), _get(R, phase, *metric)
            rows.append((label, "", fmt(this), fmt(base), ratio(this, base), "", "", ""))
    Q = results.get("Q", {})
    if Q.get("rounds"):
        rows.append(("**this tree / the baseline (I / Q), inspected**",) + ("",) * 7)
        for label, phase, metric in INSPECTED_ROWS:
            this, base = _get(results["I"], phase, *metric), _get(Q, phase, *metric)
            rows.append((label, "", fmt(this), fmt(base), ratio(this, base), "", "", ""))
    rows.append(
        (
            "task start, ms (median)",
            fmt(st.get("netns_exec_ms")),
            fmt(st.get("sandgate_run_ms")),
            "",
            "",
            "",
            "",
            "",
        )
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        cells = (
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        return "| " + " | ".join(cells) + " |"

    out = [
        line(head),
        "|"
        + "|".join(("-" * (w + 1) + ":") if i else "-" * (w + 2) for i, w in enumerate(widths))
        + "|",
    ]
    out += [line(r) for r in rows]
    out += report_floor(results)
    out += report_inspected_bulk(results)
    machine = results.get("machine", {})
    out.append("")
    out.append(
        f"machine: {machine.get('cpus')} CPUs, kernel {machine.get('kernel')}; "
        + "; ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    )
    if machine.get("speed"):
        out.append(machine["speed"])

    errs = []
    for key in SETUP_NAMES:
        res = results.get(key, {})
        for phase in PHASES:
            p = res.get(phase, {})
            if p.get("error") or p.get("errors"):
                errs.append(
                    f"{key} {phase}: {p.get('error') or str(p.get('errors')) + ' errors, ' + str(p.get('first_error'))}"
                )
    out.append("")
    out.append(
        f"clients: {_get(A, 'tls_rate', 'concurrency')} concurrent (procs x threads), new connection per "
        f"request; bulk tool: {_get(A, 'bulk', 'tool')}; requests counted: "
        + ", ".join(
            f"{k} {_get(r, 'tls_rate', 'requests')}/{_get(r, 'http_rate', 'requests')}"
            for k, r in results.items()
            if k in SETUP_NAMES and r.get("rounds")
        )
    )
    if errs:
        out.append("ERRORS: " + "; ".join(errs))
    out.append(
        "rounds (bulk MB/s / HTTPS conn/s / HTTP conn/s / HTTPS keep-alive req/s / HTTP "
        "keep-alive req/s; CPU cores used "
        "meanwhile by other processes on the machine); the table shows the medians:"
    )
    for key in SETUP_NAMES:
        res = results.get(key, {})
        cells = []
        for i, r in enumerate(res.get("rounds", []), start=1):
            vals = " / ".join(fmt(_get(r, ph, PHASE_METRIC[ph])) for ph in PHASES)
            other = r.get("other_cpu_cores") or {}
            busy = f"{other.get('cores', 0):.2f}" + (
                f" ({', '.join(other['top'])})" if other.get("top") else ""
            )
            cells.append(f"#{i} {vals}; other {busy}")
        if cells:
            out.append(f"  {key}: " + " | ".join(cells))
    out.append("")
    out.append("task start (ms, median):")
    for key in (
        "netns_exec_ms",
        "sandgate_run_ms",
        "first_run_ms",
        "python_bare_ms",
        "python_import_mitmproxy_master_ms",
        "python_import_enforcer_run_ms",
    ):
        if key in st:
            out.append(f"  {key:40s} {st[key]:8.1f}")
    if "squid_start_ms" in B:
        out.append(f"  {'squid_start_ms (service, not per task)':40s} {B['squid_start_ms']:8.1f}")
    if st.get("breakdown_ms"):
        out.append(
            "  breakdown of `sandgate run -q -- true` (median of probes; nested steps indented):"
        )
        for level, label in BREAKDOWN:
            if label in st["breakdown_ms"]:
                out.append(
                    f"    {'  ' * level}{label:{52 - 2 * level}s} {st['breakdown_ms'][label]:8.1f}"
                )
    if st.get("import_self_ms_by_package"):
        out.append(
            "  import self time by package, ms (python -X importtime, inflated by its own overhead):"
        )
        out.append(
            "    " + ", ".join(f"{k} {v:.0f}" for k, v in st["import_self_ms_by_package"].items())
        )
    for line_ in st.get("verbose_log", []):
        out.append(f"  -v: {line_}")
    for note in results["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)


def report_floor(results: dict) -> list[str]:
    """Setup F beside sandgate and Squid: where a relay in Python could be at best."""
    F, C, B = results.get("F", {}), results.get("C", {}), results.get("B", {})
    if not F.get("rounds"):
        return []
    out = [
        "",
        "the floor (F: bench/floor_relay.py, a bare Python relay; medians):",
        f"  {'':38s} {'floor':>8s} {'sandgate':>9s} {'Squid':>8s} {'sg/floor':>9s} {'Squid/floor':>12s}",
    ]
    for label, phase, metric in (
        ("HTTP new connections/s", "http_rate", ("per_s",)),
        ("proxy CPU per HTTP connection, us", "http_rate", ("proxy", "cpu_us_per_request")),
        ("HTTP keep-alive requests/s", "http_keep", ("per_s",)),
        ("proxy CPU per keep-alive request, us", "http_keep", ("proxy", "cpu_us_per_request")),
    ):
        floor, sg, squid = (_get(r, phase, *metric) for r in (F, C, B))
        values = ["-" if v is None else f"{v:,.0f}" for v in (floor, sg, squid)]
        values += ["-" if v is None or not floor else f"{v / floor:.2f}x" for v in (sg, squid)]
        widths = (8, 9, 8, 9, 12)
        out.append(
            f"  {label:38s}" + "".join(f" {v:>{w}s}" for v, w in zip(values, widths, strict=True))
        )
    return out


def report_inspected_bulk(results: dict) -> list[str]:
    """What inspection adds to a download's time a MB (I against C), beside the least
    it must do a MB (bench/floor_tls.py) and what 2x mitmdump's bulk would leave it."""
    work = results.get("tls_floor")
    inspected, passed, mitmdump = (
        _get(results.get(key, {}), "bulk", "mb_per_s") for key in ("I", "C", "M")
    )
    if not (work and inspected and passed):
        return []
    added = 1e3 / inspected - 1e3 / passed
    out = [
        "",
        f"inspected bulk against its least work: decrypting and encrypting a MB again "
        f"({work['suite']}, Python's ssl over memory BIOs: bench/floor_tls.py) "
        f"{work['ms_per_mb']:.2f} ms; inspection adds {added:.2f} ms a MB to pass-through's "
        f"download (1/{inspected:,.0f} - 1/{passed:,.0f} MB/s), {added / work['ms_per_mb']:.2f}x that work",
    ]
    if mitmdump:
        left = 1e3 / (2 * mitmdump) - 1e3 / passed
        out.append(
            f"  2x mitmdump's bulk ({2 * mitmdump:,.0f} MB/s) would leave inspection "
            + (
                f"{left:.2f} ms a MB, {left / work['ms_per_mb']:.2f}x that work"
                if left > 0
                else "nothing: it is above pass-through's bulk"
            )
        )
    return out


def report_profile(results: dict) -> str:
    out = []
    for phase, prof in results.get("profile", {}).items():
        out.append(
            f"\npy-spy, gateway during {phase} ({prof.get('rate_under_profiler') or 0:,.0f}/s under the profiler)"
        )
        for kind, label in (
            ("on_cpu", "on-CPU (--gil: Python running)"),
            ("wall", "wall clock (incl. syscalls, waits)"),
        ):
            p = prof.get(kind)
            if not p:
                continue
            out.append(
                f"  {label}: {p['samples']} samples ({p.get('samples_per_s', '?')}/s of 250/s), "
                f"threads: "
                + ", ".join(f"{n} {v}%" for n, v in p["threads_pct"][:4])
                + f"; raw: {p['file']}"
            )
            out.append("    self:")
            out += [f"      {v:5.1f}%  {name}" for name, v in p["self_pct"][:12]]
            out.append("    inclusive:")
            top = p["inclusive_pct"][0][1] if p["inclusive_pct"] else 100
            # Leave out the frames every sample has (the CLI, asyncio.run, the loop).
            out += [f"      {v:5.1f}%  {name}" for name, v in p["inclusive_pct"] if v < 0.9 * top][
                :20
            ]
    return "\n".join(out)


# --- main ---------------------------------------------------------------------------------


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat)."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_wait: float, threshold: float = 0.15, quick: bool = False) -> float:
    """Wait (at most max_wait s) until the machine is nearly idle; returns the last busy fraction."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy(0.3 if quick else 1.0)
    while busy > threshold and time.monotonic() < deadline:
        print(
            f"waiting for a quiet machine: CPUs {100 * busy:.0f}% busy ...",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(2)
        busy = cpu_busy()
    return busy


def versions() -> dict[str, str]:
    """The versions the table was measured with."""
    import importlib.metadata

    found = {"python": sys.version.split()[0]}
    for package in ("mitmproxy", "dnspython"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool, argv in (("squid", ["-v"]), ("nginx", ["-v"]), ("openssl", ["version"])):
        exe = shutil.which(tool, path=path)
        if exe:
            out = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=10)
            text = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
            found[tool] = text.split("Version ")[-1].split("/")[-1].split(" (")[0].strip()
    return found


def missing_tools() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    need = {
        "ip": "iproute2",
        "nft": "nftables",
        "nginx": "nginx-light",
        "dnsmasq": "dnsmasq-base",
        "openssl": "openssl",
    }
    return [
        f"{tool} (apt-get install -y {pkg})"
        for tool, pkg in need.items()
        if not shutil.which(tool, path=path)
    ]


def run_in_tree(tree: str, argv: list[str]) -> int:
    """`sandgate ARGV` imported from `tree` (an exported revision: setup R), not from
    the checkout; refuses to run if the import came from anywhere else."""
    sys.path.insert(0, tree)
    from sandgate.enforcer.cli import main

    imported = sys.modules["sandgate.enforcer.cli"].__file__
    if not imported.startswith(tree):
        raise SystemExit(f"bench_gateway: the baseline imported {imported}")
    return main(argv)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--in-tree":
        rest = sys.argv[3:]
        return run_in_tree(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
    if len(sys.argv) > 1 and sys.argv[1] == "--no-telemetry":
        sys.path.insert(0, str(REPO))
        rest = sys.argv[2:]
        return run_without_telemetry(rest[1:] if rest[:1] == ["--"] else rest)
    if len(sys.argv) > 2 and sys.argv[1] == "--probe-start":
        sys.path.insert(0, str(REPO))
        rest = sys.argv[3:]
        return probe_start(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter runs (1 round, 1 s per rate, 5 starts)"
    )
    parser.add_argument("--rate-seconds", type=float, default=3.0)
    parser.add_argument("--bulk-seconds", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=8, help="client threads per process")
    parser.add_argument("--starts", type=int, default=10, help="task starts to take the median of")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of A, B, C; the best round counts"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the gateway during the rate runs"
    )
    parser.add_argument("--profile-seconds", type=int, default=4)
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="strace -c sandgate and Squid during plain-HTTP connections: calls per connection",
    )
    parser.add_argument("--skip", default="", help="comma list of A,B,C,T,R,I,S,M,F,start to skip")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="add setup R: C with git revision REV's sandgate, in turn with the others "
        "(an A/B of a change in the gateway's own setting)",
    )
    parser.add_argument(
        "--phases",
        type=lambda v: {p.strip() for p in v.split(",") if p.strip()},
        help=f"comma list of client phases to run (of {','.join(PHASES)}; default: each setup's all)",
    )
    parser.add_argument("--json", type=Path, help="write all results as JSON here")
    parser.add_argument(
        "--sandgate-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to every `sandgate run` (repeat: --sandgate-arg=--memory --sandgate-arg=none)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, profiles)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="S",
        help="first wait up to S seconds for other work on the machine to stop (0: don't)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rate_seconds, args.bulk_seconds, args.starts, args.rounds = 1.0, 1.0, 5, 1
    if os.geteuid() != 0:
        print(
            "bench_gateway: needs root (network namespaces, nftables): sudo .venv/bin/python bench/...",
            file=sys.stderr,
        )
        return 2
    if missing := missing_tools():
        print("bench_gateway: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import tempfile

    from sandgate.enforcer.demo.fakenet import FakeInternet, cleanup_prefix, fresh_prefix

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not args.baseline:
        skip |= {"R", "Q"}
    if not shutil.which("squid", path=os.environ.get("PATH", "") + ":/usr/sbin"):
        skip.add("B")
        print("note: squid missing, B skipped (apt-get install -y squid-openssl)", file=sys.stderr)
    if not shutil.which("curl"):
        print(
            "note: curl missing, bulk uses the Python client (apt-get install -y curl)",
            file=sys.stderr,
        )

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    t_all = time.monotonic()
    busy_start = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else cpu_busy()
    speed = hostspeed.measure()
    if busy_start > 0.15:
        print(
            f"note: CPUs {100 * busy_start:.0f}% busy before the bench: other work on this machine "
            "skews the numbers",
            file=sys.stderr,
        )
    prefix = fresh_prefix("sgb")
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    bench = None
    try:
        with FakeInternet(prefix, workdir / "net") as fn:
            bench = Bench(args, fn, workdir)
            try:
                bench.make_sandboxes()
                steps = [("rounds", lambda: bench.run_rounds(skip)), ("start", bench.measure_start)]
                if args.profile:
                    steps.append(("profile", bench.profile))
                if args.syscalls:
                    steps.append(("syscalls", bench.syscalls))
                for name, step in steps:
                    if name in skip:
                        continue
                    try:
                        step()
                    except Exception as e:  # noqa: BLE001 - report it, measure the rest
                        print(f"  {name} failed: {e}", file=sys.stderr)
                        bench.results["notes"].append(f"{name} failed: {str(e)[-1000:]}")
            finally:
                bench.cleanup()
        results = bench.results
        results["machine"] = {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "cpu_busy_before": busy_start,
            "versions": versions(),
            "speed": hostspeed.describe(speed, hostspeed.measure()),
        }
        if results.get("I", {}).get("rounds"):
            results["tls_floor"] = floor_tls.measure()
        results["total_seconds"] = time.monotonic() - t_all
        print()
        print(report(results))
        print(report_profile(results))
        print(report_syscalls(results))
        print(
            f"\n({os.cpu_count()} CPUs, kernel {os.uname().release}, CPUs {100 * busy_start:.0f}% busy before, "
            f"bench took {results['total_seconds']:.0f} s)"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return 0
    finally:
        try:
            cleanup_prefix(prefix)
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
