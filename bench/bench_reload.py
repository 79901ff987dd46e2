"""Hot-reload benchmark (not a test): how long the event loop stalls while a policy
of 100k rules is reloaded, and whether decisions keep being answered meanwhile.

    .venv/bin/python bench/bench_reload.py [--rules 100000] [--modes thread,thread-1ms,process]

One asyncio loop, as in the gateway, with a Gateway built over the synthetic rule
file of bench_policy.py (constructed, not started: no sockets) and three coroutines:

- a ticker: `await asyncio.sleep(0.001)` in a loop; the longest pause is the
  longest time between two ticks minus the 1 ms asked for;
- a decider: `decide(gateway.policy, ConnectFacts(...))` over random lookups, yielding
  to the loop every 20 decisions (as a busy gateway would between packets); a failed
  decision is one that raised or answered `internal_error`;
- the reload: `PolicyReloader.reload` of the same file (touched), whose load runs
  off the loop, then `swap_policy` on it.

Modes say where the load runs: `thread` (asyncio.to_thread, the reloader's
default), `thread-1ms` (the same, with sys.setswitchinterval(0.001) around the
reload, so the loop thread gets the GIL back sooner), `process` (load_policy in a
child process; the compiled policy comes back pickled and is unpickled in a
thread). Goal (issue 9): pause <= 50 ms at 100k rules, no failed decision.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_policy import generate, lookups  # noqa: E402
from sandgate.proxy.gateway import Gateway, GatewayConfig  # noqa: E402
from sandgate.proxy.policy import ConnectFacts, Reason, decide, load_policy  # noqa: E402
from sandgate.proxy.registry import Sandbox  # noqa: E402
from sandgate.proxy.reload import PolicyReloader  # noqa: E402

TICK = 0.001
DECISIONS_PER_YIELD = 20


def _load_pickled(paths) -> bytes:
    return pickle.dumps(load_policy(paths), protocol=pickle.HIGHEST_PROTOCOL)


def process_loader(pool: concurrent.futures.ProcessPoolExecutor):
    """A `load` for PolicyReloader that compiles in `pool`; called in a worker thread."""

    def load(paths):
        return pickle.loads(pool.submit(_load_pickled, paths).result())

    return load


async def measure(gateway: Gateway, reloader: PolicyReloader, facts: list) -> dict:
    stop = False
    pauses: list[float] = []
    counts = {"decisions": 0, "failed": 0}

    async def ticker():
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            pauses.append(now - last - TICK)
            last = now

    async def decider():
        i = 0
        while not stop:
            for _ in range(DECISIONS_PER_YIELD):
                try:
                    decision = decide(gateway.policy, facts[i % len(facts)])
                    failed = decision.reason is Reason.INTERNAL_ERROR
                except Exception:  # noqa: BLE001 - counted, the bench goes on
                    failed = True
                counts["failed"] += failed
                counts["decisions"] += 1
                i += 1
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(decider())]
    await asyncio.sleep(0.3)  # warm: the pauses of an idle loop
    idle = max(pauses)
    pauses.clear()
    before = counts["decisions"]
    started = time.perf_counter()
    result = await reloader.reload("bench")
    elapsed = time.perf_counter() - started
    during = counts["decisions"] - before
    stop = True
    await asyncio.gather(*tasks)
    return {
        "ok": result.ok,
        "reload_s": elapsed,
        "pause_ms": max(pauses) * 1000,
        "idle_pause_ms": idle * 1000,
        "decisions": during,
        "failed": counts["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=100_000)
    parser.add_argument("--modes", default="thread,thread-1ms,process")
    args = parser.parse_args()
    text, targets = generate(args.rules)
    names, addresses = lookups(targets, 2000)
    import ipaddress

    facts = [ConnectFacts("default", 443, name=n, name_resolved_to_ip=True) for n in names]
    facts += [
        ConnectFacts("default", 443, ip=ipaddress.ip_address(number)) for number, _ in addresses
    ]
    print(
        f"python {sys.version.split()[0]}, {args.rules} rules, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    header = f"{'mode':>10} | {'reload s':>8} | {'longest pause ms':>16} | {'(idle ms)':>9} | {'decisions during':>16} | {'failed':>6}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ProcessPoolExecutor(1) as pool:
        path = Path(tmp) / "rules.yaml"
        path.write_text(text)
        pool.submit(int).result()  # the child exists before anything is timed
        for mode in args.modes.split(","):
            gateway = Gateway(
                GatewayConfig(listen_host="127.0.0.1", dns_upstreams=[], confdir=Path(tmp)),
                load_policy([path]),
            )
            gateway.add_sandbox(Sandbox("10.0.0.2", "bench", "default"))
            load = process_loader(pool) if mode == "process" else load_policy
            reloader = PolicyReloader([path], gateway, load=load)
            switch = sys.getswitchinterval()
            if mode == "thread-1ms":
                sys.setswitchinterval(0.001)
            try:
                r = asyncio.run(measure(gateway, reloader, facts))
            finally:
                sys.setswitchinterval(switch)
            assert r["ok"]
            print(
                f"{mode:>10} | {r['reload_s']:>8.2f} | {r['pause_ms']:>16.1f} | {r['idle_pause_ms']:>9.1f} | "
                f"{r['decisions']:>16} | {r['failed']:>6}",
                flush=True,
            )
    print("goal: longest pause <= 50 ms during a reload of 100k rules, no failed decision")


if __name__ == "__main__":
    main()
