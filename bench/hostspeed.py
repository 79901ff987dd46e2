"""How fast this host is at the moment, in one line: the benches print it beside the
machine, so that a row measured on one host can be told from the code's doing.

Sessions of this project ran on hosts of one kind whose speed differed by 2-3x
(docs/performance.md, "Standing against issue 11's goals"): the ratios against the
peers are measured in turn and compare, but the absolute rows (the task's start,
the attach, the DNS filter's latency) move with the host. Three figures:

- start: `python -I -S -c pass`, wall, median of 11: the interpreter start a
  `sandgate` process, a runner's caller or a sandbox init pays before any of its
  own code (-I -S: the same whatever venv runs the bench).
- loop: a pure-Python loop (a million additions), CPU, best of 3 processes: what
  sandgate's Python per connection, per query and per start scales with.
- two at once: the same loop in two processes at the same time, the mean of their
  CPU times over the loop alone (median of 3 pairs). 1.0: two cores of their own; 2.0: one core's worth.
  On a 2-vCPU VM the second vCPU may share its host's core: then work moved to
  another process or thread costs the first one too.

Not imported by sandgate. Takes ~2 s.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

LOOP = """import time
t = time.process_time()
s = 0
for i in range(1_000_000):
    s += i
print((time.process_time() - t) * 1000)
"""


def _loops(n: int) -> list[float]:
    """The loop's CPU ms in each of `n` processes started at once."""
    started = [
        subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LOOP], stdout=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    return [float(p.communicate()[0]) for p in started]


def measure() -> dict[str, float]:
    starts = []
    for _ in range(11):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        starts.append((time.perf_counter() - began) * 1000)
    alone = min(_loops(1)[0] for _ in range(3))
    together = statistics.median(statistics.mean(_loops(2)) for _ in range(3))
    return {
        "start_ms": statistics.median(starts),
        "loop_ms": alone,
        "two_at_once": together / alone,
    }


def describe(before: dict[str, float], after: dict[str, float] | None = None) -> str:
    """One line; with `after`, the figures measured before and after the bench's runs."""

    def figures(speed: dict[str, float]) -> str:
        return (
            f"python start {speed['start_ms']:.1f} ms, loop {speed['loop_ms']:.0f} ms, "
            f"two at once {speed['two_at_once']:.2f}x"
        )

    if after is None:
        return f"host speed: {figures(before)} (bench/hostspeed.py)"
    return (
        f"host speed before the runs: {figures(before)}; after: {figures(after)} "
        "(bench/hostspeed.py)"
    )


if __name__ == "__main__":
    print(describe(measure()))
