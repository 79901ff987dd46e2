"""Task start and gateway memory of the embedded `sandgate run`, in one run.

    sudo .venv/bin/python bench/bench_start.py [--rounds 10] [--idle-conns 1000] [--no-memory]
                                               [--editable]

Not a test: it prints numbers, it asserts nothing. Needs root, `ip`, `nft`, and for
the memory part nginx and dnsmasq (the fake internet, enforcer/demo/fakenet.py).

Start: the median wall time of `nsenter --net=/run/netns/HOST sandgate run -q
--dns-upstream 127.0.0.1 --no-workspace -- true` (shipped default rules), inside a
host-like netns of the bench's own (`sgbench-<hex>`). `nsenter --net`, not `ip netns
exec`: the latter also gives the command a private mount namespace with a fresh
/sys and no cgroup filesystem, which sandgate then mounts again for itself (~15 ms
that a run on the host, in the host's mount namespace, never pays). What it
measures by default is a real install:

- "installed": `pip install --no-deps` of this checkout into a throwaway venv
  under /tmp (pip writes the bytecode caches, as every install does), its own
  `sandgate` console script. The dependencies are this venv's, on the new venv's
  sys.path through one `.pth` line (the folder is not a site dir of the new venv,
  so the editable install's finder in it stays off). Removed at the end.
- "editable, no caches" (with `--editable`, rounds interleaved): the checkout as it
  is run here. This environment sets PYTHONDONTWRITEBYTECODE=1 and sandgate is an
  editable install, so every start compiles sandgate's own modules afresh and
  `site` runs the editable finder (~10 ms).

Then the wall-clock breakdown of the installed start (bench_gateway.py's
`--probe-start`, timers around each step) and `python -X importtime` self time per
package, the fifteen largest.

Memory: in a fake internet, `sandgate run` with a rule that allows allowed.test (TLS
pass-through, nothing inspected) runs a task that resolves the name through the
gateway, waits, then opens `--idle-conns` TLS connections to nginx through the
gateway and holds them idle. The gateway's RSS (the `sandgate run` process, which
is the gateway) is read from /proc before and after: idle RSS, and RSS per idle
relayed connection.

`--inspect`: both parts with a rule that checks methods (`methods: [GET]`: HTTP
inspection of TLS) and a fresh SANDGATE_STATE_DIR for every `sandgate run`, so each
makes the gateway CA at its start, as a first run (or a new state dir) does; the
held connections of the memory part are then inspected ones (TLS terminated by the
front door), not pass-through.

Safety: the namespaces are the bench's own (per-run names) and removed in
`finally`; nothing is added to the root namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import hostspeed

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_gateway  # noqa: E402 - the start probe and its step labels

PY = sys.executable
RUN_ARGS = ["run", "-q", "--dns-upstream", "127.0.0.1", "--no-workspace", "--", "true"]
GOAL_START_MS, GOAL_IDLE_MB, GOAL_PER_CONN_KB = 300, 45, 30
INSTALLED = "installed (pip install ., bytecode compiled)"
FLOOR = "nsenter --net true (floor)"
EDITABLE = "editable checkout, no caches (PYTHONDONTWRITEBYTECODE)"

HOLDER = r"""
import resource, socket, ssl, sys, time
n = int(sys.argv[-1])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ip = socket.gethostbyname("allowed.test")
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
print("idle", flush=True)
time.sleep(2.5)
held = [ctx.wrap_socket(socket.create_connection((ip, 443)), server_hostname="allowed.test")
        for _ in range(n)]
print("held", len(held), flush=True)
time.sleep(2.5)
"""

MEMORY_RULES = """version: 1
profiles:
  default:
    fallback: deny
    limits: {connections: 4096, connection_rate: 10000}
    rules:
      - allow: allowed.test
        id: bench-allowed
"""


def purelib(python: Path | str) -> str:
    """The site-packages folder of `python`'s environment."""
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return subprocess.check_output([python, "-c", code], text=True).strip()


def install_venv(venv: Path, rev: str | None = None) -> Path:
    """This checkout (or its git revision `rev`) installed as a wheel installs it, into
    a throwaway venv; its python."""
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = purelib(python)
    # The same dependencies as this venv: its site-packages on sys.path (not a site
    # dir there, so its .pth files, the editable finder among them, are not run).
    Path(site, "sandgate-bench-deps.pth").write_text(purelib(PY) + "\n")
    # From a copy: setuptools builds in the source tree (build/, *.egg-info).
    source = venv.parent / f"source-{venv.name}"
    if rev is None:
        shutil.copytree(
            REPO,
            source,
            ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests"),
        )
    else:
        source.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    pip = [PY, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(source)]
    proc = subprocess.run(pip, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install of the checkout failed: {proc.stderr[-800:]}")
    # pip compiled sandgate's modules as it does on every install; check it did.
    if not any(Path(site, "sandgate", "enforcer", "__pycache__").glob("run.*.pyc")):
        raise RuntimeError("pip did not write bytecode caches for the installed sandgate")
    return python


INSPECT_LINE = "        methods: [GET]\n"  # appended to the allow rule: inspected TLS
INSPECT_START_RULES = (
    """version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
"""
    + INSPECT_LINE
)


def run_env(work: Path | None) -> dict:
    """The environment of one `sandgate run`: with `work`, a state dir of its own
    under it (no CA yet: the run makes it), else the usual one."""
    env = os.environ.copy()
    if work is not None:
        env["SANDGATE_STATE_DIR"] = tempfile.mkdtemp(prefix="state-", dir=work)
    return env


def timed_ms(argv: list[str], env: dict, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=cwd)
    ms = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return ms


def in_netns(name: str) -> list[str]:
    """The prefix that runs a command in netns `name`, in the host's mount namespace."""
    return ["nsenter", f"--net=/run/netns/{name}"]


def sandgate_of(python: Path) -> str:
    return str(python.with_name("sandgate"))


def measure_start(
    host_ns: str,
    rounds: int,
    pythons: dict[str, Path],
    run_args: list[str],
    fresh: Path | None,
    new_cwd: Path | None = None,
) -> dict[str, list[float]]:
    """With `new_cwd`, every start runs in a new empty directory under it, as a task
    started in a workspace of its own does (what the run keeps per working directory,
    if anything, is then never found)."""
    samples: dict[str, list[float]] = {mode: [] for mode in pythons}
    samples[FLOOR] = []
    for _ in range(rounds):  # interleaved: load from others hits every mode alike
        for mode, python in pythons.items():
            argv = [*in_netns(host_ns), sandgate_of(python), *run_args]
            cwd = Path(tempfile.mkdtemp(prefix="cwd-", dir=new_cwd)) if new_cwd else None
            samples[mode].append(timed_ms(argv, run_env(fresh), cwd))
        samples[FLOOR].append(timed_ms([*in_netns(host_ns), "true"], os.environ.copy()))
    return samples


def breakdown(
    host_ns: str, python: Path, work: Path, probes: int, run_args: list[str], fresh: Path | None
) -> dict[str, float]:
    """Median over `probes` of bench_gateway's in-process timers, plus what lies outside."""
    runs = []
    if not probes:
        return {}
    for i in range(probes):
        out = work / f"probe-{i}.json"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*in_netns(host_ns), python, bench_gateway.__file__, "--probe-start", str(out)]
            + ["--", *run_args],
            capture_output=True,
            text=True,
            env=run_env(fresh),
        )
        wall = (time.perf_counter() - t0) * 1000
        t_done = time.time()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the start probe failed: {proc.stderr[-500:]}")
        marks = json.loads(out.read_text())
        marks[bench_gateway.STEP_WALL] = wall
        marks[bench_gateway.STEP_EXIT] = (t_done - marks.pop("t_end_wall")) * 1000
        marks[bench_gateway.STEP_OUTSIDE] = (
            wall - marks[bench_gateway.STEP_INPROCESS] - marks[bench_gateway.STEP_EXIT]
        )
        runs.append(marks)
    return {
        label: statistics.median(m.get(label, 0.0) for m in runs)
        for _, label in bench_gateway.BREAKDOWN
    }


def import_self_times(python: Path, top: int = 15) -> list[tuple[str, float]]:
    """`-X importtime` self time of what `sandgate run` imports, by package (ms)."""
    proc = subprocess.run(
        [python, "-X", "importtime", "-c"]
        + ["import sandgate.enforcer.cli, sandgate.enforcer.run, sandgate.enforcer.cli.run"],
        capture_output=True,
        text=True,
        check=True,
    )
    groups: Counter[str] = Counter()
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or "self [us]" in parts[0]:
            continue
        name = parts[2].strip()
        key = ".".join(name.split(".")[:3]) if name.startswith("sandgate.") else name.split(".")[0]
        groups[key] += int(parts[0].split(":")[1]) / 1000
    return [("(all)", sum(groups.values()))] + groups.most_common(top)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def measure_memory(work: Path, conns: int, python: Path, inspect: bool) -> dict:
    from sandgate.enforcer.demo.fakenet import FakeInternet, fresh_prefix

    rules = work / "memory-rules.yaml"
    rules.write_text(MEMORY_RULES + (INSPECT_LINE if inspect else ""))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with FakeInternet(fresh_prefix("sgbm"), work / "fakenet") as net:
        argv = [*in_netns(net.host_ns), sandgate_of(python), "run", "-q", "--rules", str(rules)]
        argv += ["--dns-upstream", net.dns_ip, "--metrics-listen", "off", "--no-workspace"]
        # -c: the task's /tmp is its own (this bench's files are not in it).
        argv += ["--", "/usr/bin/python3", "-c", HOLDER, str(conns)]
        gateway = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=run_env(work if inspect else None),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
        )
        result = {}
        try:
            for line in gateway.stdout:
                time.sleep(1.0)  # let the gateway settle (and the last handshakes end)
                if line.startswith("idle"):
                    result["idle_kb"] = rss_kb(gateway.pid)
                elif line.startswith("held"):
                    result["held"] = int(line.split()[1])
                    result["held_kb"] = rss_kb(gateway.pid)
            gateway.wait(timeout=60)
        finally:
            if gateway.poll() is None:
                gateway.terminate()
                gateway.wait(timeout=30)
    if "held_kb" not in result:
        raise RuntimeError(
            f"the memory task did not finish (exit {gateway.returncode}): "
            f"{gateway.stderr.read()[-800:]}"
        )
    result["per_conn_kb"] = (result["held_kb"] - result["idle_kb"]) / max(result["held"], 1)
    return result


def report(res: dict) -> str:
    out = [f"machine: {os.cpu_count()} CPUs, {os.uname().release}; python {sys.version.split()[0]}"]
    out += [res["speed"]] if res.get("speed") else []
    where = f", each in {res['cwd']}" if res.get("cwd") else ""
    out.append(f"`sandgate {' '.join(res['run_args'])}`{where}, median of {res['rounds']} (ms):")
    for mode, samples in res["start"].items():
        out.append(f"  {mode:<44} {statistics.median(samples):8.0f}   (min {min(samples):.0f})")
    out.append(f"  goal: <= {GOAL_START_MS} ms ({INSTALLED})")
    if res.get("breakdown"):
        out.append(f"breakdown, {INSTALLED} (median of probes; nested steps indented):")
        for indent, label in bench_gateway.BREAKDOWN:
            ms = res["breakdown"].get(label, 0.0)
            if ms >= 0.05 or indent == 0:
                out.append(f"  {'  ' * indent}{label:<{52 - 2 * indent}} {ms:8.1f}")
    if res.get("imports"):
        out.append(f"import self time by package, {INSTALLED} (-X importtime, ms):")
        out += [f"  {name:<40} {ms:8.1f}" for name, ms in res["imports"]]
    mem = res.get("memory")
    if mem:
        out.append(
            f"gateway RSS: idle {mem['idle_kb'] / 1024:.1f} MB (goal <= {GOAL_IDLE_MB}); "
            f"{mem['held']} idle {res['held_kind']} connections: {mem['held_kb'] / 1024:.1f} MB, "
            f"{mem['per_conn_kb']:.1f} KB each (goal <= {GOAL_PER_CONN_KB})"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="starts per mode (default 10)")
    parser.add_argument("--probes", type=int, default=3, help="breakdown probes (default 3)")
    parser.add_argument("--idle-conns", type=int, default=1000, help="default 1000")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part")
    parser.add_argument(
        "--editable",
        action="store_true",
        help="also time this checkout's editable install without bytecode caches",
    )
    parser.add_argument(
        "--inspect",
        action="store_true",
        help="a rule that inspects TLS (methods), a fresh state dir (no CA yet) for every run",
    )
    parser.add_argument(
        "--workspace",
        action="store_true",
        help="with a workspace (an idmapped bind of a fresh directory), as bench_attach "
        "and a user's `sandgate run` have it, instead of --no-workspace",
    )
    parser.add_argument(
        "--workspace-from",
        type=Path,
        metavar="DIR",
        help="with --workspace: the workspace a copy of DIR (e.g. a checkout with its "
        "venv), which the run walks before and after its task (enforcer/sandbox/planting.py)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also time git revision REV installed the same way, interleaved with the "
        "checkout (an A/B in one run: load from others hits both alike)",
    )
    parser.add_argument(
        "--new-cwd",
        action="store_true",
        help="run every start in a new empty working directory, as a task started in "
        "its own workspace is (default: all from the bench's own)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_start: needs root", file=sys.stderr)
        return 2
    host_ns = f"sgbench-{secrets.token_hex(3)}"
    res: dict = {"rounds": args.rounds, "run_args": RUN_ARGS, "held_kind": "pass-through"}
    speed = hostspeed.measure()
    with tempfile.TemporaryDirectory(prefix="sgbench-start-") as tmp:
        work = Path(tmp)
        run_args, fresh = RUN_ARGS, None
        if args.workspace:
            if args.workspace_from:
                shutil.copytree(args.workspace_from, work / "workspace", symlinks=True)
            else:
                (work / "workspace").mkdir()
            at = run_args.index("--no-workspace")
            run_args = [*run_args[:at], "--workspace", str(work / "workspace"), *run_args[at + 1 :]]
            res["run_args"] = run_args
        if args.inspect:
            (work / "inspect.yaml").write_text(INSPECT_START_RULES)
            run_args, fresh = ["run", "--rules", str(work / "inspect.yaml"), *run_args[1:]], work
            res.update(run_args=run_args, held_kind="inspected (idle, handshake done)")
        installed = install_venv(work / "venv")
        pythons = {INSTALLED: installed}
        if args.baseline:
            pythons[f"baseline {args.baseline}, installed"] = install_venv(
                work / "venv-baseline", args.baseline
            )
        if args.editable:
            pythons[EDITABLE] = Path(PY)
        subprocess.run(["ip", "netns", "add", host_ns], check=True)
        try:
            subprocess.run(["ip", "-n", host_ns, "link", "set", "lo", "up"], check=True)
            new_cwd = work / "cwds" if args.new_cwd else None
            if new_cwd:
                new_cwd.mkdir()
                res["cwd"] = "a new empty directory"
            res["start"] = measure_start(host_ns, args.rounds, pythons, run_args, fresh, new_cwd)
            res["breakdown"] = breakdown(host_ns, installed, work, args.probes, run_args, fresh)
            res["imports"] = import_self_times(installed)
        finally:
            subprocess.run(["ip", "netns", "del", host_ns], check=False)
        if not args.no_memory:
            res["memory"] = measure_memory(work, args.idle_conns, installed, args.inspect)
    res["speed"] = hostspeed.describe(speed, hostspeed.measure())
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
