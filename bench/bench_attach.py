"""Task start: attached to a warm gateway service vs an embedded gateway, in one run.

    .venv/bin/python bench/bench_attach.py [--rounds 30] [--embedded-rounds 7]
                                           [--install wheel|checkout] [--as-is]
                                           [--runners service|external|none]
                                           [--baseline REV] [--breakdown] [--beside N]

Needs root. Everything runs in a host-like network namespace this script creates
(`sgbench-<hex>`) and deletes in `finally` with the service it starts there; nothing
touches the root namespace's network. The service and the runs get a run directory
of their own (SANDGATE_RUN_DIR under the bench's temporary directory), so services
that other sessions run on this machine do not see this one's spare networks.

What is measured (`--install`):

- wheel (default): the `sandgate` a real user runs. The checkout is copied, built
  into a wheel (`pip wheel --no-deps`) and installed into a throwaway venv under
  /tmp whose dependencies come from this venv's site-packages through a plain path
  line in a .pth file (as tests/e2e/test_wheel.py does: nothing is downloaded, and
  that directory's own .pth files, the editable install's import finder among them,
  are not run). The venv is removed at the end.
- checkout: this venv's `sandgate`, an editable install whose import finder costs
  ~10 ms of `site` at every start.

Variants, each the median wall time of one `sandgate ... -- true` process from start
to exit, with a workspace (an idmapped bind of a fresh directory, or with
`--workspace-from DIR` of a copy of DIR):

- attached    `sandgate run --gateway SOCKET -- true` against a service that has been
              up for a while (warm: its spare networks are made, and its warm runners
              wait: the command hands the run to one, enforcer/handoff.py);
- embedded    `sandgate run -- true` (its own gateway, netns, veth and table).

Warm runners (`--runners`): service (default) the service forks them itself;
external: the service runs with no_new_privs, as under the shipped hardened unit,
so it forks none, and a `sandgate runners` started apart keeps them (the shipped
sandgate-runners.service); none: that service alone (the shipped unit without the
runners unit: every run in its own process).

Bytecode: this machine sets PYTHONDONTWRITEBYTECODE=1, so nothing is ever cached
and every start compiles sandgate's modules again, which no real install does. By
default the bench compiles sandgate, the venv's site-packages and the standard
library once (`compileall`, which writes caches whatever the variable says) and
says so; `--as-is` measures whatever caches exist.

Goal (issue 9): attached <= 50 ms median; issue 11: embedded <= 300 ms, to beat
sandbox-runtime (the issue's figure for it: about 290 ms on the earlier machine).

A/B (`--baseline REV`, wheel only): a wheel of git revision REV in a second venv,
with a second service of its own (its control socket and run directory) in the same
network namespace; its attached rounds are taken in turn with this checkout's, so
the host's speed that minute hits both alike. Printed as `baseline` and the ratio.

Breakdown (`--breakdown`, wheel only): where the attached rounds' time goes, by
step and by process (client, service, runner), from timers that bench/attach_probe.py
puts around each step in every process of the attach; the rounds then also pay the
timers (a few us a step). Printed per step: the median of its start after the
round's spawn, of its duration (all its calls in the round), and calls per round.

Beside others (`--beside N`): N attached runs of a sleeping task kept running through
all rounds, as on a busy service. Their nftables tables share the namespace, and
libnftables reads every table for most calls (bench/bench_nft.py), so each round's
attach and detach, and the embedded rounds, pay for them.

sandbox-runtime side by side (`--srt PATH`, default: `srt` on PATH, else skipped):
`srt true` in the same workspace and network namespace, as many rounds as the embedded variant and in turn with them, with its
default settings (bubblewrap, its HTTP and SOCKS bridges). Install it with
`npm install @anthropic-ai/sandbox-runtime` and `apt-get install bubblewrap socat
ripgrep`; it is no test dependency.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import hostspeed

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SANDGATE = str(Path(PY).with_name("sandgate"))
GOAL_MS = 50.0
EMBEDDED_GOAL_MS = 300.0
SANDBOX_RUNTIME_MS = 290.0
BLOCK_PAUSE_S = 0.5  # before a block of rounds (--block): the other service's refills end


def compile_everything(extra: list[Path]) -> str:
    paths = [ROOT / "proxy", ROOT / "enforcer", sysconfig.get_paths()["purelib"], *extra]
    paths.append(sysconfig.get_paths()["stdlib"])
    for path in paths:
        compileall.compile_dir(str(path), quiet=2, workers=0)
    return "bytecode compiled first (as an installed package has it)"


# What a wheel is built from (as tests/e2e/test_wheel.py builds it).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "proxy", "enforcer", "rules")


def install_wheel(work: Path, rev: str | None = None) -> tuple[str, Path]:
    """A wheel of the checkout (or of its git revision `rev`) in a fresh venv under
    `work`: (its `sandgate`, its site-packages)."""
    src = work / "src"  # a copy: the build's scratch files stay out of the checkout
    if rev is None:
        for name in SOURCES:
            if (ROOT / name).is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(ROOT / name, src / name, ignore=ignore)
            else:
                src.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
    else:
        src.mkdir(parents=True)
        archive = _check_bytes(["git", "-C", ROOT, "archive", rev])
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    _check([PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)])
    (wheel,) = (work / "dist").glob("sandgate-*.whl")
    venv = work / "venv"
    _check([PY, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    (site / "bench-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _check([PY, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    return str(venv / "bin" / "sandgate"), site


def _check_bytes(argv: list) -> bytes:
    proc = subprocess.run([str(a) for a in argv], capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_attach: {' '.join(map(str, argv))} failed:\n{proc.stderr}")
    return proc.stdout


def _check(argv: list) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_attach: {' '.join(map(str, argv))} failed:\n{proc.stderr}")
    return proc.stdout.strip()


def medians_ms(
    variants: dict[str, list[str]],
    rounds: int,
    cwd: Path,
    windows: dict[str, list] | None = None,
    envs: dict[str, dict] | None = None,
    gap: float = 0.0,
    block: int = 1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, tuple[float, float]]:
    """{name: (median, min) ms} of each argv, the rounds taken in turn (load from
    others on the machine hits every variant alike), `block` rounds of a variant at
    a time, with a pause of BLOCK_PAUSE_S before each block after the first (what
    one variant's service does after its last run then never falls in the other's
    block); each round's (start, end) in monotonic ns appended to `windows[name]`,
    where given; `envs[name]`: the variant's environment, where not this process's;
    `gap`: seconds between rounds. `cpu[name]`, where given: each round's CPU time of
    the whole machine (every process: the client, runner, init, service, refills)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    blocks = [
        (name, min(block, rounds - first)) for first in range(0, rounds, block) for name in variants
    ]
    for i, (name, count) in enumerate(blocks):
        if i and block > 1:
            time.sleep(BLOCK_PAUSE_S)
        for _ in range(count):
            time.sleep(gap)
            env = (envs or {}).get(name)
            t0, busy0 = time.perf_counter(), machine_busy_ms()
            start = time.monotonic_ns()
            argv = variants[name]
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
            samples[name].append((time.perf_counter() - t0) * 1000)
            if cpu is not None:
                cpu.setdefault(name, []).append(machine_busy_ms() - busy0)
            if windows is not None and name in windows:
                windows[name].append((start, time.monotonic_ns()))
            if proc.returncode != 0:
                raise SystemExit(f"bench_attach: {' '.join(argv)} failed:\n{proc.stderr}")
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def machine_busy_ms() -> float:
    """CPU time every core has spent busy since boot (/proc/stat: all but idle,
    iowait and steal), in ms."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) * 1000 / os.sysconf("SC_CLK_TCK")


def install_probe(site: Path) -> None:
    """bench/attach_probe.py into the venv, imported at every start there (a .pth);
    it times only where SGBENCH_MARKS is set (the service, the attached rounds)."""
    shutil.copy(ROOT / "bench" / "attach_probe.py", site / "sgbench_probe.py")
    (site / "sgbench-probe.pth").write_text("import sgbench_probe\n")


def breakdown(marks: Path, windows: list[tuple[int, int]]) -> list[str]:
    """Per step: median start after the round's spawn, median duration (its calls in
    the round summed), calls per round; steps in the order they start. A mark belongs
    to the round whose spawn-to-exit window holds its start."""
    per_round: dict[tuple[str, int], list[float]] = {}  # [first start, total, calls]
    for line in marks.read_text().splitlines():
        label, start_ns, end_ns = line.split(" ", 1)[1].rsplit(" ", 2)
        start, end = int(start_ns), int(end_ns)
        for i, (w0, w1) in enumerate(windows):
            if w0 <= start <= w1:
                first, total, n = per_round.get((label, i), ((start - w0) / 1e6, 0.0, 0))
                per_round[label, i] = [first, total + (end - start) / 1e6, n + 1]
                break
    rows = []
    for label in {label for label, _ in per_round}:
        mine = [v for (name, _), v in per_round.items() if name == label]
        rows.append(
            (
                statistics.median(v[0] for v in mine),
                label,
                statistics.median(v[1] for v in mine),
                sum(v[2] for v in mine) / len(windows),
            )
        )
    out = [f"{'step':<52} {'starts ms':>9} {'takes ms':>9} {'calls':>6}"]
    out += [f"{lb:<52} {at:>9.1f} {took:>9.2f} {n:>6.1f}" for at, lb, took, n in sorted(rows)]
    whole = statistics.median((w1 - w0) / 1e6 for w0, w1 in windows)
    out.append(f"{'(the round: spawn to exit)':<52} {0.0:>9.1f} {whole:>9.2f}")
    return out


def start_service(
    sandgate: str, host_ns: str, work: Path, runners: str, env: dict
) -> tuple[list[subprocess.Popen], Path]:
    """The service (and a `sandgate runners`, for `runners` external), warm; its
    socket, audit log and log in `work`, `env` its environment."""
    control = work / "gateway.sock"
    hardened = ["setpriv", "--no-new-privs"] if runners != "service" else []
    argv = [
        "nsenter",
        f"--net=/run/netns/{host_ns}",
        "--",
        *hardened,
        sandgate,
        "gateway",
        "--control",
        str(control),
        "--audit-log",
        str(work / "gateway-audit.jsonl"),
        "--metrics-listen",
        "off",
        "--dns-upstream",
        "127.0.0.1",
    ]
    log = (work / "gateway.log").open("w")
    started = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)]
    if runners == "external":
        runners_argv = [sandgate, "runners", "--control", str(control)]
        log = (work / "runners.log").open("w")
        started.append(
            subprocess.Popen(runners_argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = subprocess.run(
            [sandgate, "status", "--json", "--control", str(control)],
            capture_output=True,
            text=True,
            env=env,
        )
        warm = '"spares": 0' not in status.stdout and (
            runners == "none" or '"warm_runners": 0' not in status.stdout
        )
        if status.returncode == 0 and warm:
            return started, control
        if any(process.poll() is not None for process in started):
            break
        time.sleep(0.1)
    stop(started)  # main's `finally` never saw them
    raise SystemExit(
        f"bench_attach: the service did not start:\n{(work / 'gateway.log').read_text()}"
    )


def start_beside(sandgate: str, control: Path, count: int, env: dict) -> list[subprocess.Popen]:
    """`count` attached runs of a task that sleeps, once the service serves them all."""
    argv = [sandgate, "run", "--gateway", str(control), "--no-workspace", "--", "sleep", "1d"]
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    beside = []
    for _ in range(count):
        beside.append(subprocess.Popen(argv, **quiet, stderr=subprocess.DEVNULL, env=env))
        serving = 0
        deadline = time.monotonic() + 60
        while serving < len(beside):  # one at a time: as a service's sandboxes come
            asked = [sandgate, "sandboxes", "--json", "--control", str(control)]
            listed = subprocess.run(asked, capture_output=True, text=True, env=env)
            if listed.returncode == 0:
                serving = len(json.loads(listed.stdout)["sandboxes"])
            if time.monotonic() > deadline or any(p.poll() is not None for p in beside):
                stop(beside)
                raise SystemExit(f"bench_attach: the service serves {serving} of {count} beside")
            time.sleep(0.05)
    return beside


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM, in reverse order: a service removes its spare networks as it stops."""
    for process in reversed(processes):
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="attached rounds (default 30)")
    parser.add_argument(
        "--embedded-rounds", type=int, default=7, help="embedded rounds (default 7)"
    )
    parser.add_argument("--as-is", action="store_true", help="do not compile bytecode first")
    parser.add_argument(
        "--runners",
        choices=("service", "external", "none"),
        default="service",
        help="who keeps the warm runners: the service (default), a `sandgate runners` "
        "apart from a no_new_privs service, or nobody (that service alone)",
    )
    parser.add_argument(
        "--install",
        choices=("wheel", "checkout"),
        default="wheel",
        help="wheel: a wheel of the checkout in a throwaway venv, as a user installs it "
        "(default); checkout: this venv's editable install",
    )
    parser.add_argument(
        "--srt",
        default=shutil.which("srt"),
        help="sandbox-runtime's `srt`, measured beside the embedded run (default: on PATH)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time each step of the attached rounds in every process (wheel only)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also a wheel of git revision REV, with a service of its own, in turn (wheel only)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        help="attached rounds of one variant in a row, with --baseline (default 1: in turn); "
        "back to back within a block, and a pause between blocks",
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds between attached rounds (default 0: back to back); with --baseline, "
        "what one service does after a run (its refills) then never falls in the other's",
    )
    parser.add_argument(
        "--workspace-from",
        metavar="DIR",
        help="the workspace a copy of DIR (e.g. a checkout with its venv) instead of an "
        "empty directory: the run walks it before and after its task "
        "(enforcer/sandbox/planting.py)",
    )
    parser.add_argument(
        "--beside",
        type=int,
        default=0,
        metavar="N",
        help="N sandboxes of the service left running (a task that sleeps) through all "
        "rounds: a service's attach and detach beside others (their nftables tables share "
        "the namespace, which the embedded rounds and a --baseline service see too)",
    )
    args = parser.parse_args()
    if (args.breakdown or args.baseline) and args.install != "wheel":
        parser.error("--breakdown and --baseline need --install wheel")
    if args.rounds < 1 or args.embedded_rounds < 1:
        parser.error("--rounds and --embedded-rounds take 1 or more")
    if os.geteuid() != 0:
        print("bench_attach: needs root (namespaces, nftables, cgroups)", file=sys.stderr)
        return 2
    host_ns = f"sgbench-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="sgbench-"))
    os.chmod(work, 0o755)
    workspace = work / "workspace"
    if args.workspace_from:
        shutil.copytree(args.workspace_from, workspace, symlinks=True)
    else:
        workspace.mkdir()
    os.environ["SANDGATE_RUN_DIR"] = str(work / "run")
    env = dict(os.environ)
    if args.breakdown:
        env["SGBENCH_MARKS"] = str(work / "marks")
    base = work / "baseline"
    base_env = dict(os.environ, SANDGATE_RUN_DIR=str(base / "run"))
    started, beside = [], []
    windows: dict[str, list[tuple[int, int]]] = {"attached": []}
    try:
        if args.install == "wheel":
            sandgate, site = install_wheel(work)
            if args.breakdown:
                install_probe(site)
            measured = "a wheel of the checkout installed in a fresh venv"
            if args.baseline:
                base_sandgate, base_site = install_wheel(base, args.baseline)
                measured += f" (and one of {args.baseline}, the baseline)"
        else:
            sandgate, site = SANDGATE, None
            measured = "this venv's editable install of the checkout"
        bytecode = (
            "bytecode as found (--as-is)"
            if args.as_is
            else compile_everything([site, *([base_site] if args.baseline else [])] if site else [])
        )
        subprocess.run(["ip", "netns", "add", host_ns], check=True)
        subprocess.run(["ip", "-n", host_ns, "link", "set", "lo", "up"], check=True)
        started, control = start_service(sandgate, host_ns, work, args.runners, env)
        beside = start_beside(sandgate, control, args.beside, env)
        attaching = {"attached": [sandgate, "run", "--gateway", str(control), "--", "true"]}
        envs = {"attached": env}
        if args.baseline:
            more, base_control = start_service(base_sandgate, host_ns, base, args.runners, base_env)
            started += more
            attaching["baseline"] = [base_sandgate, "run", "--gateway", str(base_control)]
            attaching["baseline"] += ["--", "true"]
            envs["baseline"] = base_env
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        speed = hostspeed.measure()
        medians_ms(attaching, 3, workspace, envs=envs)  # the page cache, the spares
        windows["attached"].clear()
        cpu: dict[str, list[float]] = {}
        measured_attached = medians_ms(
            attaching, args.rounds, workspace, windows, envs, args.gap, args.block, cpu
        )
        attached, attached_min = measured_attached["attached"]
        baseline = measured_attached.get("baseline")
        steps = breakdown(work / "marks", windows["attached"]) if args.breakdown else []
        # `nsenter --net`, not `ip netns exec`: that one also mounts a private /sys,
        # and then every run mounts its cgroup hierarchies again (~100 ms here), which
        # a run from a shell in the host's namespaces never does.
        in_host = ["nsenter", f"--net=/run/netns/{host_ns}"]
        variants = {
            "embedded": [
                *in_host, sandgate, "run", "--metrics-listen", "off",
                "--dns-upstream", "127.0.0.1", "--audit-log", str(work / "embedded-audit.jsonl"),
                "--", "true",
            ],
        }  # fmt: skip
        if args.srt:
            variants["srt"] = [*in_host, args.srt, "true"]  # as the embedded run
        if args.baseline:
            variants["baseline embedded"] = [
                *in_host, base_sandgate, *variants["embedded"][len(in_host) + 1 :]
            ]  # fmt: skip
        envs = {"baseline embedded": base_env}
        measured_embedded = medians_ms(variants, args.embedded_rounds, workspace, envs=envs)
        embedded, embedded_min = measured_embedded["embedded"]
        base_embedded = measured_embedded.get("baseline embedded")
        srt = measured_embedded.get("srt")
    finally:
        stop(beside)
        stop(started)
        subprocess.run(["ip", "netns", "del", host_ns], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    where = f"a copy of {args.workspace_from}" if args.workspace_from else "an empty directory"
    print(f"sandgate run -- true, median wall time; {measured}; {bytecode}; {os.cpu_count()} cores")
    print(f"workspace: {where}")
    print(hostspeed.describe(speed, hostspeed.measure()))
    print(f"load average before the runs: {load}; warm runners: {args.runners}", end="")
    print(
        f"; {args.gap} s between attached rounds" if args.gap else "; rounds back to back", end=""
    )
    print(f", {args.block} of a variant in a row" if args.block > 1 else "")
    if args.beside:
        print(f"beside {args.beside} running sandboxes of the service (their tables too)")
    print(f"{'variant':<12} {'median ms':>10} {'min ms':>8} {'rounds':>7}")
    print(f"{'attached':<12} {attached:>10.1f} {attached_min:>8.1f} {args.rounds:>7}")
    print(f"{'embedded':<12} {embedded:>10.1f} {embedded_min:>8.1f} {args.embedded_rounds:>7}")
    if baseline is not None:
        print(f"{'baseline att':<12} {baseline[0]:>10.1f} {baseline[1]:>8.1f} {args.rounds:>7}")
        print(
            f"{'baseline emb':<12} {base_embedded[0]:>10.1f} {base_embedded[1]:>8.1f} "
            f"{args.embedded_rounds:>7}"
        )
        print(
            f"this / baseline ({args.baseline}), in turn: attached {attached / baseline[0]:.2f}, "
            f"embedded {embedded / base_embedded[0]:.2f}"
        )
    if srt is not None:
        print(f"{'srt true':<12} {srt[0]:>10.1f} {srt[1]:>8.1f} {args.embedded_rounds:>7}")
    for name, spent in cpu.items():
        # Back to back on N cores a round cannot take less wall time than its CPU / N.
        print(
            f"CPU of the machine per {name} round: {statistics.mean(spent):.1f} ms "
            f"(at least {statistics.mean(spent) / os.cpu_count():.1f} ms of wall time back to back)"
        )
    print(f"attached / embedded: {attached / embedded:.2f}")
    if srt is not None:
        print(f"embedded / sandbox-runtime, measured here: {embedded / srt[0]:.2f}")
        print(f"attached / sandbox-runtime, measured here: {attached / srt[0]:.2f}")
    else:
        print(
            f"attached / sandbox-runtime ({SANDBOX_RUNTIME_MS:.0f} ms, the issue's figure): "
            f"{attached / SANDBOX_RUNTIME_MS:.2f} (--srt measures it here)"
        )
    print(
        f"goal: embedded <= {EMBEDDED_GOAL_MS:.0f} ms: "
        f"{'met' if embedded <= EMBEDDED_GOAL_MS else 'NOT met'}"
    )
    print(f"goal: attached <= {GOAL_MS:.0f} ms: {'met' if attached <= GOAL_MS else 'NOT met'}")
    if steps:
        print("breakdown of the attached rounds (timers in every process; medians):")
        print("\n".join(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
