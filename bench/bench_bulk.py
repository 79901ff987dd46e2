"""HTTPS downloads through an embedded `sandgate run`: the gateway's CPU per MB
(user and system) and MB/s, for the checkout and, in turn round by round, a git
revision (`--baseline REV`): an A/B of a change to the relay in one run.

    .venv/bin/python bench/bench_bulk.py [--baseline REV] [--rounds 6] [--downloads 80]
                                         [--pass-through]

Root. Not the side-by-side table (bench_gateway.py's bulk rows are): a loop for
working on the inspected relay (proxy/frontdoor/tls_io.py, tls_relay.py,
http1_relay.py). In a fake internet (enforcer/demo/fakenet.py: its own namespaces,
removed at the end), each round runs `sandgate run` with a method/path rule for
allowed.test (inspected: the front door terminates TLS both ways), or
`--pass-through` an allow by name, whose task is curl fetching /big (10 MiB) over a
new connection `--downloads` times, as bench_gateway.py's bulk phase does. The
gateway is the `sandgate run` process; its utime and stime (/proc) are read from
the 6th download's end to the second-to-last's, and divided by the MB moved
between them. MB/s is curl's, over each download's whole time (handshake
included). Medians over rounds; this machine's speed moves by ~15 % within
minutes, so only variants measured in turn compare.

`--baseline REV`: that revision's proxy/, enforcer/ and rules/ exported as the
`sandgate` package (bench_http1.export_tree) and imported before the checkout's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_gateway import INSPECT_RULES
from bench_http1 import export_tree

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # enforcer.demo.fakenet, as bench_gateway.py

from enforcer.demo.fakenet import FakeInternet, fresh_prefix  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SKIP = 5  # downloads before the measured part (the gateway's start, the CA, the pool)
# Setup I's rules; pass-through: the same allow without its method/path checks.
_CHECKS = '        methods: [GET, HEAD]\n        paths: ["/**"]\n'
assert _CHECKS in INSPECT_RULES
RULES = {
    "inspected": INSPECT_RULES,
    "pass-through": INSPECT_RULES.replace(_CHECKS, "").replace("bench-inspected", "bench-allowed"),
}
# `sandgate` from the tree given (sys.path first), else the checkout.
LAUNCH = (
    "import sys\n"
    "tree = sys.argv.pop(1)\n"
    "if tree: sys.path.insert(0, tree)\n"
    "sys.argv[0] = 'sandgate'\n"
    "import sandgate.proxy\n"
    "if tree and not sandgate.proxy.__file__.startswith(tree):\n"
    "    raise SystemExit(f'bench_bulk: the baseline imported {sandgate.proxy.__file__}')\n"
    "from sandgate.enforcer.cli import main\n"
    "sys.exit(main())\n"
)


def cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def one_round(fn, work: Path, rules: Path, tree: str, downloads: int, gateway_ca: Path) -> dict:
    """One `sandgate run` of `downloads` curl fetches; the gateway's CPU per MB."""
    out = Path(tempfile.mkdtemp(prefix="round-", dir=work))
    cacert = out / "ca.pem"  # the two CAs alone: curl parses its CA file every start
    cacert.write_text(
        fn.ca_cert.read_text() + (gateway_ca.read_text() if gateway_ca.exists() else "")
    )
    times = out / "times.txt"
    loop = (
        f"for i in $(seq {downloads}); do curl -sS --http1.1 -o /dev/null --cacert {cacert} "
        f'-w "%{{time_total}} %{{size_download}}\\n" https://allowed.test/big >> {times}; done'
    )
    argv = [
        "ip", "netns", "exec", fn.host_ns, sys.executable, "-c", LAUNCH, tree, "run",
        "--rules", str(rules), "--dns-upstream", fn.dns_ip, "--extra-ca", str(fn.ca_cert),
        "-q", "--no-workspace", "--rw", str(out), "--", "sh", "-c", loop,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def done() -> int:
        try:
            return len(times.read_text().splitlines())
        except OSError:
            return 0

    def wait_for(count: int) -> None:
        while done() < count:
            if proc.poll() is not None:
                raise SystemExit(f"bench_bulk: the run ended after {done()} downloads")
            time.sleep(0.002)

    wait_for(SKIP + 1)
    (u0, s0), d0 = cpu(proc.pid), done()
    wait_for(downloads - 1)
    (u1, s1), d1 = cpu(proc.pid), done()
    proc.wait()
    rows = [line.split() for line in times.read_text().splitlines()]
    sizes = {int(size) for _, size in rows}
    if sizes != {fn.big_size}:
        raise SystemExit(f"bench_bulk: downloads of {sorted(sizes)} bytes, not {fn.big_size}")
    mb = (d1 - d0) * fn.big_size / 1e6
    secs = [float(total) for total, _ in rows[SKIP:]]
    return {
        "user": (u1 - u0) * 1e3 / mb,
        "system": (s1 - s0) * 1e3 / mb,
        "mb_per_s": len(secs) * fn.big_size / 1e6 / sum(secs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", metavar="REV")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--downloads", type=int, default=80)
    parser.add_argument("--pass-through", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_bulk: needs root (network namespaces)", file=sys.stderr)
        return 2
    kind = "pass-through" if args.pass_through else "inspected"
    work = Path(tempfile.mkdtemp(prefix="sgbulk-"))
    rules = work / "rules.yaml"
    rules.write_text(RULES[kind])
    trees = {"checkout": ""}
    if args.baseline:
        trees[f"baseline {args.baseline}"] = str(export_tree(args.baseline, work / "baseline"))
    state = Path(os.environ.get("SANDGATE_STATE_DIR", "/var/lib/sandgate"))
    results: dict[str, list[dict]] = {label: [] for label in trees}
    with FakeInternet(fresh_prefix("sgk"), work / "fakenet") as fn:
        for n in range(args.rounds):
            for label, tree in trees.items():
                r = one_round(
                    fn, work, rules, tree, args.downloads, state / "ca" / "mitmproxy-ca-cert.pem"
                )
                results[label].append(r)
                print(
                    f"round {n + 1} {label}: {r['user'] + r['system']:.2f} ms a MB "
                    f"(user {r['user']:.2f}, system {r['system']:.2f}), {r['mb_per_s']:.0f} MB/s",
                    flush=True,
                )
    print(
        f"\n{kind} HTTPS downloads (10 MiB, new connection each), medians of {args.rounds} rounds in turn"
    )
    first = None
    for label, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("user", "system", "mb_per_s")}
        total = statistics.median(r["user"] + r["system"] for r in rs)
        ratio = (
            ""
            if first is None
            else f"  ({total / first[0]:.2f}x the CPU, {med['mb_per_s'] / first[1]:.2f}x the MB/s)"
        )
        first = first or (total, med["mb_per_s"])
        print(
            f"  {label:24s} gateway CPU {total:.2f} ms a MB (user {med['user']:.2f}, "
            f"system {med['system']:.2f}), {med['mb_per_s']:.0f} MB/s{ratio}"
        )
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
