"""Task-start cost of the task sandbox (issue 8), before and after, in one run.

    .venv/bin/python bench/bench_sandbox.py [--rounds 15] [--e2e-rounds 5] [--no-e2e]

Needs root. Every variant runs `true` in a network namespace this script creates
(`sgbench-<hex>`) and deletes in `finally`, together with its temporary files and
cgroup; nothing touches the root namespace's network.

Variants, each the median wall time of N rounds of one process start to its exit:

- netns exec      `ip netns exec NS true`: the floor (a netns join and an exec).
- before          the old isolation: bench/old_sandbox_init.py, the init sandgate ran before
                  the task sandbox (kept here only as this baseline):
                  netns, mount/UTS/PID namespaces, resolv.conf bind, capability drop.
- new, minimal    enforcer/sandbox/init.py with the least its spec can say: no user
                  namespace, no Landlock, no seccomp, no binds, no cgroups, one tmpfs
                  for $HOME (the init needs a writable home). The new
                  init always makes the host read-only and builds a minimal /dev,
                  so this is not the old isolation; it shows what the file view costs.
- new, full       the spec `sandgate run --no-workspace` writes: user namespace and
                  id maps, resolv.conf bind, tmpfs on /tmp /var/tmp /run /root,
                  sandgate's paths read-only, Landlock, the seccomp program.
- new, full+ws    the same plus a workspace (an idmapped bind; one extra fork for
                  the id-map helper).
- new, full+cg    the same as full, joining a task cgroup (memory + pids).

All init variants run as `sandgate run` starts them: `python -I -S FILE ARGS`.
The cgroup's creation and removal, which `sandgate run` pays once per task
outside the init, is timed on its own. With --e2e, `sandgate run ... -- true` end
to end, with the default limits and with `--allow-weaker-sandbox --memory none
--pids none` (no cgroup), each inside a host-like netns of its own.

Goal (issue 8): the new isolation adds at most 20 ms to a task's start.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandgate.enforcer.sandbox import cgroup, id_slots, seccomp, spec  # noqa: E402
from sandgate.enforcer.sandbox import init as sandbox_init  # noqa: E402

PY = sys.executable
OLD_INIT = ROOT / "bench" / "old_sandbox_init.py"
GOAL_MS = 20.0


def timed(argv: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    ms = (time.perf_counter() - t0) * 1000
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
        )
    return ms


def median_ms(argv: list[str], rounds: int, env: dict | None = None) -> float:
    timed(argv, env)  # warm the page cache; not counted
    return statistics.median(timed(argv, env) for _ in range(rounds))


def write_spec(
    path: Path,
    netns: str,
    *,
    full: bool,
    workspace: Path | None = None,
    program: Path | None = None,
    cgroup_procs: list[str] | None = None,
) -> Path:
    resolv = path.parent / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    ids = id_slots.claim(id_slots.host_id_pool()).ids  # held until this process ends
    if full:
        opts = spec.SandboxOptions(workspace=workspace)
        protected = spec.protected_paths([])
        view = spec.file_view(
            opts,
            protected=protected,
            hidden=[],
            file_binds=[(resolv, Path(os.path.realpath("/etc/resolv.conf")))],
        )
    else:
        # One tmpfs for $HOME: the init chowns a home that is not its own tmpfs,
        # which the read-only host refuses.
        view = {
            "home": "/root",
            "tmpfs": ["/root"],
            "binds": [],
            "writable": [],
            "hide": [],
            "cwd": "/",
        }
    document = spec.Spec(
        netns=netns,
        hostname="sgbench",
        argv=["true"],
        ids=ids,
        uid=0,
        gid=0,
        env=spec.task_environment(dict(os.environ), {}, {}, uid=0, home=view["home"]),
        home=view["home"],
        cwd=view["cwd"],
        tmpfs=view["tmpfs"],
        binds=view["binds"],
        hide=view["hide"],
        writable=view["writable"],
        cgroup_procs=cgroup_procs or [],
        seccomp=str(program) if full and program else None,
        landlock=full,
        userns=full,
    ).to_dict()
    path.write_text(json.dumps(document))
    return path


def new_init(spec_path: Path) -> list[str]:
    return [PY, "-I", "-S", sandbox_init.__file__, str(spec_path)]


def time_cgroup(rounds: int, tag: str) -> float:
    samples = []
    for i in range(rounds):
        t0 = time.perf_counter()
        cg = cgroup.TaskCgroup.create(f"{cgroup.PREFIX}bench-{tag}-{i}", cgroup.Limits())
        cg.remove()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def e2e(rounds: int, tag: str, extra: list[str]) -> float:
    """`sandgate run` inside a host-like netns of ours (it loads an nft table and a
    veth there, never in the root namespace)."""
    host_ns = f"sgbench-{tag}-h"
    subprocess.run(["ip", "netns", "add", host_ns], check=True)
    try:
        subprocess.run(["ip", "-n", host_ns, "link", "set", "lo", "up"], check=True)
        sandgate = str(Path(PY).with_name("sandgate"))
        argv = [
            "ip",
            "netns",
            "exec",
            host_ns,
            sandgate,
            "run",
            "--metrics-listen",
            "off",
            "--dns-upstream",
            "127.0.0.1",
            "--no-workspace",
            *extra,
            "--",
            "true",
        ]
        return median_ms(argv, rounds)
    finally:
        subprocess.run(["ip", "netns", "del", host_ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=15, help="rounds per init variant (default 15)"
    )
    parser.add_argument(
        "--e2e-rounds", type=int, default=5, help="rounds per `sandgate run` variant (default 5)"
    )
    parser.add_argument(
        "--no-e2e", action="store_true", help="skip the end-to-end `sandgate run` timings"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_sandbox: needs root (namespaces, mounts, cgroups)", file=sys.stderr)
        return 2
    tag = secrets.token_hex(3)
    netns = f"sgbench-{tag}"
    netns_path = f"/run/netns/{netns}"
    work = Path(tempfile.mkdtemp(prefix="sgbench-"))
    workspace = work / "workspace"
    workspace.mkdir()
    task_cgroup = None
    results: dict[str, float] = {}
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        program = work / "seccomp.bpf"
        program.write_bytes(seccomp.build_filter())
        task_cgroup = cgroup.TaskCgroup.create(f"{cgroup.PREFIX}bench-{tag}", cgroup.Limits())
        minimal = write_spec(work / "minimal.json", netns_path, full=False)
        full = write_spec(work / "full.json", netns_path, full=True, program=program)
        full_ws = write_spec(
            work / "full-ws.json", netns_path, full=True, program=program, workspace=workspace
        )
        full_cg = write_spec(
            work / "full-cg.json",
            netns_path,
            full=True,
            program=program,
            cgroup_procs=task_cgroup.procs_files,
        )
        n = args.rounds
        variants = {
            "netns exec (floor)": ["ip", "netns", "exec", netns, "true"],
            "before: old sandbox_init.py": [
                PY,
                "-I",
                "-S",
                str(OLD_INIT),
                "--netns",
                netns_path,
                "--bind",
                f"{work / 'resolv.conf'}:{os.path.realpath('/etc/resolv.conf')}",
                "--",
                "true",
            ],
            "new init, minimal spec": new_init(minimal),
            "new init, full spec": new_init(full),
            "new init, full + workspace": new_init(full_ws),
            "new init, full + cgroup": new_init(full_cg),
        }
        print(
            f"bench_sandbox: {n} rounds each, median; PYTHONDONTWRITEBYTECODE="
            f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}; cgroup dirs: {' '.join(task_cgroup.paths)}",
            flush=True,
        )
        # Interleaved rounds, so that load from others on the machine hits every variant alike.
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for argv in variants.values():
            timed(argv)
        for _ in range(n):
            for name, argv in variants.items():
                samples[name].append(timed(argv))
        results = {name: statistics.median(s) for name, s in samples.items()}
        results["cgroup create + remove (runner side)"] = time_cgroup(max(3, n // 3), tag)
        if not args.no_e2e:
            m = args.e2e_rounds
            results["sandgate run, default limits"] = e2e(m, tag, [])
            results["sandgate run, --allow-weaker-sandbox --memory none --pids none"] = e2e(
                m, tag, ["--allow-weaker-sandbox", "--memory", "none", "--pids", "none"]
            )
    finally:
        if task_cgroup is not None:
            task_cgroup.remove()
        subprocess.run(["ip", "netns", "del", netns], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    before = results["before: old sandbox_init.py"]
    width = max(map(len, results))
    print(f"\n{'variant':{width}}  {'median ms':>9}  {'vs before':>9}")
    for name, ms in results.items():
        versus = f"{ms / before:8.2f}x" if name.startswith(("new", "netns", "before")) else ""
        print(f"{name:{width}}  {ms:9.1f}  {versus:>9}")
    after = results["new init, full + cgroup"] + results["cgroup create + remove (runner side)"]
    added = after - before
    print(
        f"\nadded by the new isolation (full spec in a cgroup + cgroup create/remove, vs before): {added:+.1f} ms "
        f"({after / before:.2f}x); goal <= +{GOAL_MS:.0f} ms: {'met' if added <= GOAL_MS else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
