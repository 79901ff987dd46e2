"""The shared clock of a gateway's periodic work: ticks at fixed instants of
CLOCK_MONOTONIC (the loops' clock, one for every process of the machine), so that
work of different timers, and of different processes, falls into the same wake-ups.
"""

from __future__ import annotations

import math

# The service reads its workers' links on this clock (enforcer/workers.py: the links'
# `read_every`).
INTAKE_PERIOD = 0.1
# A worker's periodic work falls on one grid of instants, LEAD before multiples of its
# period on the shared clock: its event batches (proxy/worker.py, every
# INTAKE_PERIOD: just before the service reads them) and its front door's deadline
# tick (frontdoor/door.py, TICK: every other tick is a flush's). Timers of their own
# woke a worker at half load for each, and a wake-up costs a worker more than what it
# then does (docs/performance.md, "Session 13").
LEAD = 0.01


def next_tick(now: float, period: float, lead: float = 0.0) -> float:
    """The first multiple of `period`, less `lead`, after `now` (seconds of the loop's
    clock: CLOCK_MONOTONIC, one for every process of the machine, so processes that
    use the same period tick at the same instants)."""
    return (math.floor((now + lead) / period) + 1) * period - lead
