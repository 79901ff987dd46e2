"""A loop turn's share of work that sandboxes' connections make dear: mitmproxy's
handling of what it reads from a client (engine.py), whose cost the client chooses
(HTTP/2 frames by the thousand: ~1 ms a stream decided and sent upstream).

The event loop runs every ready callback once a turn, and a turn is as long as all
of them together: with k connections whose reads each cost c, every other
connection's next step waits k * c, however cheap its own work is. Here each read
says what handling the last one cost (`charge`), and asks before the next one
(`wait`): while the turn's reads have cost less than `budget`, it goes at once;
past it, it waits its sandbox's turn (frontdoor/intake.Intake, round-robin per
sandbox), and each turn lets through, one of each sandbox in turn, as many as
their last reads' costs fill `budget` (at least one). A busy turn then holds about
one dear read, whatever the number of sandboxes making them, and the door's own
work (accepts, decisions, relays) and a cheap client's read come every turn. An
uncontended worker's reads wait a turn once per `budget` of handling (when the
reads' costs add up to it), which on an idle loop is microseconds.

The loop is a parameter (`call_soon`, `create_future`) and so is nothing else:
tests drive the turns by hand.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Hashable

from sandgate.proxy.frontdoor.intake import Intake

# Seconds of charged handling a turn holds before reads wait their sandbox's turn.
TURN_BUDGET = 0.005


class Turns:
    """See the module docstring. `spent` is what the reads cost since the last turn
    began; `waiting` the reads held back, per sandbox."""

    __slots__ = ("budget", "spent", "waiting", "_costs", "_call_soon", "_new_future", "_next")

    def __init__(
        self,
        call_soon: Callable[[Callable[[], None]], asyncio.Handle],
        new_future: Callable[[], asyncio.Future],
        budget: float = TURN_BUDGET,
    ):
        self.budget = budget
        self.spent = 0.0
        # Never refuses: a read held back is a connection's next step, not a new one.
        self.waiting: Intake[tuple[Hashable, asyncio.Future]] = Intake(sys.maxsize, sys.maxsize)
        self._costs: dict[Hashable, float] = {}  # each waiting sandbox's last read's cost
        self._call_soon, self._new_future = call_soon, new_future
        self._next: asyncio.Handle | None = None  # the next turn's `_turn`

    def charge(self, sandbox: Hashable, seconds: float) -> None:
        """A read of `sandbox`'s took `seconds` to handle."""
        self.spent += seconds
        if self.spent >= self.budget or self.waiting:  # contended: remember, and turn
            self._costs[sandbox] = seconds
            if self._next is None:
                self._next = self._call_soon(self._turn)

    def wait(self, sandbox: Hashable) -> asyncio.Future | None:
        """None: read now. Else a future to await: the read's turn has come when it
        is done (cancelling it is safe)."""
        if self.spent < self.budget and not self.waiting:
            return None
        future = self._new_future()
        self.waiting.put(sandbox, (sandbox, future))
        self._costs.setdefault(sandbox, self.budget)  # unknown: a whole turn's
        if self._next is None:
            self._next = self._call_soon(self._turn)
        return future

    def _turn(self) -> None:
        """A new turn: let through what its budget holds, round-robin per sandbox
        (at least one read)."""
        self._next, self.spent = None, 0.0
        expected, released = 0.0, False
        while self.waiting and (not released or expected < self.budget):
            [(sandbox, future)] = self.waiting.take(1)
            if future.done():  # cancelled: its connection ended meanwhile
                continue
            future.set_result(None)
            expected += self._costs.get(sandbox, self.budget)
            released = True
        if self.waiting:
            self._next = self._call_soon(self._turn)
        else:
            self._costs.clear()
