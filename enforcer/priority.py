"""The gateway's CPU priority over its own tasks.

A gateway serves every sandbox from one event loop per worker; a task's processes
competed with it for the cores at the same weight, so four busy tasks left a worker
~40 % of a core on a 2-core host and every other sandbox's connections waited
(docs/threat-model.md, "A fair share of a worker's CPU"). The gateway's threads run
at nice GATEWAY_NICE (a CFS weight ~3x a nice-0 thread's); a task's init sets itself
back to nice 0 (sandbox/init.py) and to an RLIMIT_NICE of 0, so the task cannot take
that back: lowering a nice value needs CAP_SYS_NICE on the host or that limit.

Not a bound (a task under `--cpus` has one): a share the gateway gets first when the
cores are busy, and nothing when they are not.
"""

from __future__ import annotations

import logging
import os

# -5 (a weight ~3x a nice-0 thread's), not -10 (~9x): at -10 the gateway's wake-ups
# preempted a busy task's own relay so often that its bulk downloads lost ~18 %
# (~5 % at -5), for a little more fairness (rapid reset, honest p50: 0.21-0.24 s at
# 0, 0.15-0.20 at -5, 0.13-0.19 at -10). docs/performance.md, "Session 15".
GATEWAY_NICE = -5

log = logging.getLogger("sandgate.priority")


def raise_gateway_priority() -> bool:
    """Every thread of this process (nice is per thread on Linux; threads made later
    take their maker's) at GATEWAY_NICE, unless at a higher priority already. False
    when the process may not (a unit without CAP_SYS_NICE: its `Nice=` sets it)."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > GATEWAY_NICE:
                os.setpriority(os.PRIO_PROCESS, tid, GATEWAY_NICE)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except PermissionError:
            log.info("the gateway keeps its nice value: no CAP_SYS_NICE to set %d", GATEWAY_NICE)
            return False
    return True
