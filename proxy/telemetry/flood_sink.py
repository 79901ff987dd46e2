"""The audit rate limit as a sink: FloodControl (flood.py) in front of the audit log.

The gateway's fanout sends every event to the metrics and the summaries directly and
to the audit log through this. A timer on the gateway's loop writes the aggregates
that are due (a flood that stopped still gets its record within about a second);
`stop` writes everything held, before the audit log closes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from sandgate.proxy.telemetry.event import Event, EventSink
from sandgate.proxy.telemetry.flood import FloodControl, FloodLimits


class RateLimitedAudit:
    """An `EventSink`: `audit` gets what `FloodControl` lets through and its aggregate
    records; `on_suppressed(event)` is told of each event held back (the metric)."""

    def __init__(
        self,
        audit: EventSink,
        limits: FloodLimits,
        on_suppressed: Callable[[Event], None] = lambda event: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.audit = audit
        self.control = FloodControl(limits, clock)
        self.on_suppressed = on_suppressed
        # emit runs on the loop; a stop from another thread must not interleave with it.
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, event: Event) -> None:
        with self._lock:
            lines, suppressed = self.control.admit(event)
        for line in lines:
            self.audit.emit(line)
        if suppressed:
            self.on_suppressed(event)

    def emit_batch(self, events: list[Event]) -> None:
        """`emit` for each of `events` (a gateway worker's batch): one lock, one clock
        reading and one append to the audit log's queue for the batch."""
        with self._lock:
            lines, suppressed = self.control.admit_batch(events)
        emit_batch = getattr(self.audit, "emit_batch", None)
        if emit_batch is not None:
            emit_batch(lines)
        else:
            for line in lines:
                self.audit.emit(line)
        for event in suppressed:
            self.on_suppressed(event)

    def count_lost(self, count: int) -> None:
        """`count` events lost before they reached the audit log: counted in its `lost`
        (a sink that counts no losses, a test's list, ignores them)."""
        count_lost = getattr(self.audit, "count_lost", None)
        if count_lost is not None:
            count_lost(count)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write due aggregates every interval, on `loop`."""
        self._timer = loop.call_later(self.control.limits.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._write(self.control.due)
        self.start(loop)

    def stop(self) -> None:
        """No more timer; everything held is written (the gateway stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write(self.control.drain)

    def _write(self, take: Callable[[], list[Event]]) -> None:
        with self._lock:
            lines = take()
        for line in lines:
            self.audit.emit(line)
