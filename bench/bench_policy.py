"""Policy matcher benchmark (not a test): compile time, memory and decision latency
at 1k / 10k / 100k rules.

    .venv/bin/python bench/bench_policy.py [--sizes 1000,10000,100000] [--lookups 100000]

For each size it writes a synthetic rule file (exact domains, `*.` wildcards, IPv4
and IPv6 CIDRs of several prefix lengths, some with ports or methods/paths, a few
denies), then measures:

- compile: `load_policy` wall time, and the YAML compose part of it;
- memory: tracemalloc peak while compiling, and what the compiled policy keeps;
- decide: p50/p99 of single `decide()` calls (perf_counter_ns around each call,
  so the ~40 ns of the clock itself is included) over random lookups, half hits
  and half misses, for names and for addresses.

Targets (issue 2): p50 <= 1 us, p99 <= 5 us per decision, compile <= 1 s at 100k.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from sandgate.proxy.policy import ConnectFacts, decide, load_policy  # noqa: E402
from sandgate.proxy.policy.load import _YamlLoader  # noqa: E402

WORDS = [
    "api",
    "cdn",
    "files",
    "static",
    "registry",
    "mirror",
    "pkg",
    "download",
    "git",
    "objects",
    "data",
    "edge",
]
TLDS = ["com", "net", "org", "io", "dev", "cloud", "de", "fr"]
V4_PREFIXES = [16, 20, 24, 28, 32]
V6_PREFIXES = [32, 48, 64, 128]


def _public_v4(rng: random.Random) -> int:
    # 11.0.0.0 - 99.255.255.255: public unicast, clear of every special range.
    return rng.randrange(11 << 24, 100 << 24)


def _public_v6(rng: random.Random) -> int:
    # 2400::/6 .. 2bff::: global unicast, clear of 6to4, Teredo and NAT64.
    return (0x24 + rng.randrange(8)) << 120 | rng.getrandbits(120)


def generate(count: int, seed: int = 1) -> tuple[str, dict[str, list]]:
    """A rule file with `count` rules, and the destinations it names (for hits)."""
    rng = random.Random(seed)
    lines = ["version: 1", "profiles:", "  default:", "    fallback: deny", "    rules:"]
    names, wildcards, v4, v6 = [], [], [], []
    for i in range(count):
        kind = rng.random()
        extra = []
        if kind < 0.45:  # 2 to 4 labels
            name = rng.choice(
                [
                    f"{rng.choice(WORDS)}{i}.{rng.choice(TLDS)}",
                    f"{rng.choice(WORDS)}{i}.{rng.choice(WORDS)}-{rng.randrange(1000)}.{rng.choice(TLDS)}",
                    f"{rng.choice(WORDS)}.{rng.choice(WORDS)}{i}.corp{rng.randrange(100)}.{rng.choice(TLDS)}",
                ]
            )
            names.append(name)
            target = name
        elif kind < 0.65:  # bases of 2 and 3 labels
            base = rng.choice(
                [
                    f"svc{i}.{rng.choice(TLDS)}",
                    f"svc{i}.{rng.choice(WORDS)}{rng.randrange(100)}.{rng.choice(TLDS)}",
                ]
            )
            wildcards.append(base)
            target = f'"*.{base}"'
        elif kind < 0.85:
            prefix = rng.choice(V4_PREFIXES)
            network = ipaddress.IPv4Network(
                (_public_v4(rng) >> (32 - prefix) << (32 - prefix), prefix)
            )
            v4.append(network)
            target = str(network)
        else:
            prefix = rng.choice(V6_PREFIXES)
            address = _public_v6(rng) >> (128 - prefix) << (128 - prefix)
            network = ipaddress.IPv6Network((address, prefix))
            v6.append(network)
            target = f'"{network}"'
        action = "deny" if rng.random() < 0.05 else "allow"
        if rng.random() < 0.10:
            extra.append("        ports: [443, 8443]")
        if rng.random() < 0.05:
            extra += ["        methods: [GET, HEAD]", '        paths: ["/v1/**"]']
        if rng.random() < 0.10:
            extra.append(f"        id: rule-{i}")
        lines.append(f"      - {action}: {target}")
        lines += extra
    return "\n".join(lines) + "\n", {"names": names, "wildcards": wildcards, "v4": v4, "v6": v6}


def lookups(targets: dict[str, list], count: int, seed: int = 2) -> tuple[list, list]:
    """`count` names and `count` addresses (number, version), half of them hits."""
    rng = random.Random(seed)
    names, addresses = [], []
    for i in range(count):
        hit = i % 2 == 0
        if hit and targets["wildcards"] and rng.random() < 0.3:
            name = f"{rng.choice(WORDS)}.{rng.choice(targets['wildcards'])}"
        elif hit and targets["names"]:
            name = rng.choice(targets["names"])
        else:
            name = rng.choice(
                [
                    f"miss{rng.randrange(10**9)}.{rng.choice(TLDS)}",
                    f"miss{rng.randrange(10**9)}.{rng.choice(WORDS)}.{rng.choice(TLDS)}",
                    f"www.miss{rng.randrange(10**9)}.{rng.choice(WORDS)}.{rng.choice(TLDS)}",
                ]
            )
        names.append(name)
        if rng.random() < 0.7:
            if hit and targets["v4"]:
                net = rng.choice(targets["v4"])
                ip = net.network_address + rng.randrange(net.num_addresses)
            else:
                ip = ipaddress.IPv4Address(_public_v4(rng))
        else:
            if hit and targets["v6"]:
                net = rng.choice(targets["v6"])
                ip = net.network_address + rng.randrange(min(net.num_addresses, 1 << 64))
            else:
                ip = ipaddress.IPv6Address(_public_v6(rng))
        addresses.append((int(ip), ip.version))
    return names, addresses


def percentiles(policy, kind: str, lookups: list, call=None) -> tuple[float, float, float]:
    """p50, p99 and mean of `call(facts)` (default: decide) over `lookups`, in
    microseconds.

    The facts of each call are built just before it, untimed, from a fresh copy of
    the name or address, as the gateway builds them from a packet: the facts are
    in the CPU cache, the policy's tables are not. (Timing a list of 100k facts
    built in advance would mostly time cache misses on the facts themselves.)
    """
    call = call or (lambda facts: decide(policy, facts))
    clock = time.perf_counter_ns
    v4, v6 = ipaddress.IPv4Address, ipaddress.IPv6Address
    samples = []
    for i, item in enumerate(lookups):
        if kind == "name":
            facts = ConnectFacts(
                profile="default", port=443, name=(item + ".")[:-1]
            )  # a new str, no cached hash
        else:
            number, version = item
            facts = ConnectFacts(
                profile="default", port=443, ip=v4(number) if version == 4 else v6(number)
            )
        start = clock()
        call(facts)
        if i >= 1000:  # after a warm-up
            samples.append(clock() - start)
    samples.sort()
    n = len(samples)
    return samples[n // 2] / 1000, samples[int(n * 0.99)] / 1000, statistics.fmean(samples) / 1000


def bench(count: int, lookup_count: int) -> dict:
    text, targets = generate(count)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rules-{count}.yaml"
        path.write_text(text, encoding="utf-8")

        gc.collect()
        gc.disable()  # as load_policy does
        start = time.perf_counter()
        yaml.compose(text, Loader=_YamlLoader)
        parse = time.perf_counter() - start
        gc.enable()

        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        policy = load_policy(path)
        compile_time, compile_cpu = time.perf_counter() - start, time.process_time() - cpu
        del policy

        gc.collect()
        tracemalloc.start()
        policy = load_policy(path)
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    names, addresses = lookups(targets, lookup_count)
    gc.collect()
    return {
        "rules": policy.rule_count,
        "compile": compile_time,
        "compile_cpu": compile_cpu,
        "parse": parse,
        "peak": peak / 2**20,
        "kept": kept / 2**20,
        "name": percentiles(policy, "name", names),
        "ip": percentiles(policy, "ip", addresses),
        # The floor on this machine: one dict lookup of the name in the policy's
        # exact-name table, timed the same way. decide() cannot be cheaper.
        "floor": percentiles(
            policy,
            "name",
            names,
            lambda facts, exact=policy.profiles["default"].exact: exact.get(facts.name),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--lookups", type=int, default=100_000)
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, YAML loader {_YamlLoader.__mro__[1].__name__}, "
        f"{args.lookups} lookups per kind (half hits), times per decide() call"
    )
    print(
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
        "(other processes share the caches and cores: latencies vary with it)"
    )
    header = (
        f"{'rules':>7} | {'compile s':>9} | {'cpu s':>6} | {'(yaml s)':>8} | {'peak MB':>7} | {'kept MB':>7} | "
        f"{'name p50 us':>11} | {'name p99 us':>11} | {'ip p50 us':>9} | {'ip p99 us':>9} | "
        f"{'floor p50 us':>12}"
    )
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes.split(",")):
        r = bench(size, args.lookups)
        print(
            f"{r['rules']:>7} | {r['compile']:>9.2f} | {r['compile_cpu']:>6.2f} | {r['parse']:>8.2f} | "
            f"{r['peak']:>7.1f} | {r['kept']:>7.1f} | "
            f"{r['name'][0]:>11.2f} | {r['name'][1]:>11.2f} | {r['ip'][0]:>9.2f} | {r['ip'][1]:>9.2f} | "
            f"{r['floor'][0]:>12.2f}",
            flush=True,
        )
    print("floor: one dict.get of the name in the exact-name table, timed like decide()")
    print("targets: p50 <= 1 us, p99 <= 5 us, compile <= 1 s at 100k rules")


if __name__ == "__main__":
    main()
