"""What one sandbox's nftables calls cost beside the tables of N other sandboxes.

    sudo .venv/bin/python bench/bench_nft.py [--tables 1,16,64,256] [--rounds 5]

Not a test: it prints numbers, it asserts nothing. Needs root, `ip` and nftables.

A gateway service keeps one nftables table per live sandbox in its namespace. Each
new network creates one (`nft.load_table`), each detach reads its counters
(`nft.read_counters`) and deletes it (`nft.delete_table`): netlink messages of
sandgate's own (enforcer/nft_wire.py) since session 31. libnftables reads tables of
the namespace before it runs a command (its cache), so a call through it grows with
the number of sandboxes. For N other tables, the median wall time of each call, and
side by side what sandgate did before through libnftables: the table loaded from
`render_ruleset`'s text and the counters read with `list table` (until session 31),
and with `list counters table` (until session 30: every table's objects and rules,
then some per table).

Safety: the namespace is the bench's own (`sgbench-nft-<hex>`), removed in `finally`;
nothing is added to the root namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

OLD_READ_BUDGET_S = 30.0  # the old read at most this long a size: it took 11.7 s at 256
# After a delete: the kernel frees the table after an RCU grace period, and closing a
# netlink socket (libnftables closes its own after every call) waits for that.
SETTLE_S = 0.05


def inside(sizes: list[int], rounds: int) -> list[dict]:
    """In the bench's namespace: the calls' medians, ms, for each size."""
    from sandgate.enforcer import nft

    def config(name: str) -> nft.RulesetConfig:
        return nft.RulesetConfig(
            table=f"sandgate_{name}", sandbox_ifaces=f"sgh-{name}", proxy_port=1000, dns_port=1001
        )

    def timed(call) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1000

    rows, made = [], 0
    for size in sizes:
        while made < size:
            nft.load_table(config(f"o{made:05d}"), new=True)
            made += 1
        create, old_create, read, listed, delete, old = [], [], [], [], [], []
        for i in range(rounds):
            text = nft.render_ruleset(config(f"t{i:05d}"), new=True)
            old_create.append(timed(lambda t=text: nft.apply_ruleset(t)))
            nft.delete_table(f"sandgate_t{i:05d}")
            time.sleep(SETTLE_S)
            ours = config(f"b{i:05d}")
            create.append(timed(lambda c=ours: nft.load_table(c, new=True)))
            read.append(timed(lambda c=ours: nft.read_counters(c.table)))
            args = ["list", "table", "inet", ours.table]
            listed.append(timed(lambda a=args: nft._nft_json(a)))
            if sum(old) / 1000 < OLD_READ_BUDGET_S / 2:
                args = ["list", "counters", "table", "inet", ours.table]
                old.append(timed(lambda a=args: nft._nft_json(a)))
            delete.append(timed(lambda c=ours: nft.delete_table(c.table)))
            time.sleep(SETTLE_S)
        rows.append(
            {
                "tables": size,
                "create": statistics.median(create),
                "old_create": statistics.median(old_create),
                "read": statistics.median(read),
                "listed": statistics.median(listed),
                "old_read": statistics.median(old),
                "old_rounds": len(old),
                "delete": statistics.median(delete),
                "library": nft._libnftables() is not None,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="1,16,64,256", help="the other tables, sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    sizes = sorted({int(s) for s in opts.tables.split(",")})
    if opts.inside:
        print(json.dumps(inside(sizes, opts.rounds)))
        return 0
    namespace = f"sgbench-nft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, os.path.abspath(__file__),
             "--inside", "--tables", opts.tables, "--rounds", str(opts.rounds)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    rows = json.loads(done.stdout)
    version = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    path = "libnftables (ctypes)" if rows[0]["library"] else "the nft command"
    print(f"{version}, through {path}; kernel {os.uname().release}; {os.cpu_count()} cores")
    print(
        f"median ms of {opts.rounds} rounds; text: the table from render_ruleset through "
        "libnftables; list table / list counters: the read through libnftables before "
        "session 31 / 30 (the last: fewer rounds where it is slow)\n"
    )
    print(
        f"{'other tables':>12} {'create':>8} {'text':>8} {'ratio':>6} {'read':>7} "
        f"{'list table':>11} {'ratio':>6} {'list counters':>14} {'delete':>8}"
    )
    for r in rows:
        print(
            f"{r['tables']:>12} {r['create']:>8.2f} {r['old_create']:>8.2f} "
            f"{r['old_create'] / r['create']:>5.0f}x {r['read']:>7.2f} {r['listed']:>11.2f} "
            f"{r['listed'] / r['read']:>5.0f}x {r['old_read']:>14.2f} {r['delete']:>8.2f}"
        )
    first, last = rows[0], rows[-1]
    print(
        f"\nfrom {first['tables']} to {last['tables']} other tables: create "
        f"{last['create'] / first['create']:.1f}x (old {last['old_create'] / first['old_create']:.0f}x), "
        f"read {last['read'] / first['read']:.1f}x, "
        f"old read {last['old_read'] / first['old_read']:.0f}x, "
        f"delete {last['delete'] / first['delete']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
