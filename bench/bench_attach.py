"""Task start: attached to a warm gateway service vs an embedded gateway, in one run.

    .venv/bin/python bench/bench_attach.py [--rounds 30] [--embedded-rounds 7]
                                           [--install wheel|checkout] [--as-is]
                                           [--runners service|external|none]

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
to exit, with a workspace (an idmapped bind of a fresh directory):

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

sandbox-runtime side by side (`--srt PATH`, default: `srt` on PATH, else skipped):
`srt true` in the same workspace and network namespace, as many rounds as the embedded variant and in turn with them, with its
default settings (bubblewrap, its HTTP and SOCKS bridges). Install it with
`npm install @anthropic-ai/sandbox-runtime` and `apt-get install bubblewrap socat
ripgrep`; it is no test dependency.
"""

from __future__ import annotations

import argparse
import compileall
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

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SANDGATE = str(Path(PY).with_name("sandgate"))
GOAL_MS = 50.0
EMBEDDED_GOAL_MS = 300.0
SANDBOX_RUNTIME_MS = 290.0


def compile_everything(extra: list[Path]) -> str:
    paths = [ROOT / "proxy", ROOT / "enforcer", sysconfig.get_paths()["purelib"], *extra]
    paths.append(sysconfig.get_paths()["stdlib"])
    for path in paths:
        compileall.compile_dir(str(path), quiet=2, workers=0)
    return "bytecode compiled first (as an installed package has it)"


def install_wheel(work: Path) -> tuple[str, Path]:
    """A wheel of the checkout in a fresh venv: (its `sandgate`, its site-packages)."""
    src = work / "src"  # a copy: the build's scratch files stay out of the checkout
    for name in ("pyproject.toml", "README.md", "proxy", "enforcer", "rules"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _check([PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)])
    (wheel,) = (work / "dist").glob("sandgate-*.whl")
    venv = work / "venv"
    _check([PY, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    (site / "bench-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _check([PY, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    return str(venv / "bin" / "sandgate"), site


def _check(argv: list) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_attach: {' '.join(map(str, argv))} failed:\n{proc.stderr}")
    return proc.stdout.strip()


def medians_ms(
    variants: dict[str, list[str]], rounds: int, cwd: Path
) -> dict[str, tuple[float, float]]:
    """{name: (median, min) ms} of each argv, the rounds taken in turn (load from
    others on the machine hits every variant alike)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, argv in variants.items():
            t0 = time.perf_counter()
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
            samples[name].append((time.perf_counter() - t0) * 1000)
            if proc.returncode != 0:
                raise SystemExit(f"bench_attach: {' '.join(argv)} failed:\n{proc.stderr}")
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def median_ms(argv: list[str], rounds: int, cwd: Path) -> tuple[float, float]:
    return medians_ms({"": argv}, rounds, cwd)[""]


def start_service(
    sandgate: str, host_ns: str, work: Path, runners: str
) -> tuple[list[subprocess.Popen], Path]:
    """The service (and a `sandgate runners`, for `runners` external), warm."""
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
    started = [
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(work / "gateway.log").open("w"))
    ]
    if runners == "external":
        runners_argv = [sandgate, "runners", "--control", str(control)]
        log = (work / "runners.log").open("w")
        started.append(subprocess.Popen(runners_argv, stdout=subprocess.DEVNULL, stderr=log))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = subprocess.run(
            [sandgate, "status", "--json", "--control", str(control)],
            capture_output=True,
            text=True,
        )
        warm = '"spares": 0' not in status.stdout and (
            runners == "none" or '"warm_runners": 0' not in status.stdout
        )
        if status.returncode == 0 and warm:
            return started, control
        if any(process.poll() is not None for process in started):
            break
        time.sleep(0.1)
    raise SystemExit(
        f"bench_attach: the service did not start:\n{(work / 'gateway.log').read_text()}"
    )


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
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_attach: needs root (namespaces, nftables, cgroups)", file=sys.stderr)
        return 2
    host_ns = f"sgbench-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="sgbench-"))
    os.chmod(work, 0o755)
    workspace = work / "workspace"
    workspace.mkdir()
    os.environ["SANDGATE_RUN_DIR"] = str(work / "run")
    started = []
    try:
        if args.install == "wheel":
            sandgate, site = install_wheel(work)
            measured = "a wheel of the checkout installed in a fresh venv"
        else:
            sandgate, site = SANDGATE, None
            measured = "this venv's editable install of the checkout"
        bytecode = (
            "bytecode as found (--as-is)"
            if args.as_is
            else compile_everything([site] if site else [])
        )
        subprocess.run(["ip", "netns", "add", host_ns], check=True)
        subprocess.run(["ip", "-n", host_ns, "link", "set", "lo", "up"], check=True)
        started, control = start_service(sandgate, host_ns, work, args.runners)
        attach = [sandgate, "run", "--gateway", str(control), "--", "true"]
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        median_ms(attach, 3, workspace)  # warm the page cache and the service's spares
        attached, attached_min = median_ms(attach, args.rounds, workspace)
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
        measured_embedded = medians_ms(variants, args.embedded_rounds, workspace)
        embedded, embedded_min = measured_embedded["embedded"]
        srt = measured_embedded.get("srt")
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        subprocess.run(["ip", "netns", "del", host_ns], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    print(f"sandgate run -- true, median wall time; {measured}; {bytecode}; {os.cpu_count()} cores")
    print(f"load average before the runs: {load}; warm runners: {args.runners}")
    print(f"{'variant':<12} {'median ms':>10} {'min ms':>8} {'rounds':>7}")
    print(f"{'attached':<12} {attached:>10.1f} {attached_min:>8.1f} {args.rounds:>7}")
    print(f"{'embedded':<12} {embedded:>10.1f} {embedded_min:>8.1f} {args.embedded_rounds:>7}")
    if srt is not None:
        print(f"{'srt true':<12} {srt[0]:>10.1f} {srt[1]:>8.1f} {args.embedded_rounds:>7}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
