"""Which accepted connection a busy front door sets up next: round-robin over the
sandboxes (their source addresses), so that a sandbox's new connection waits behind
at most one of each other sandbox's, however many those opened.

Pure: no sockets, no clock. The door (door.py) puts what it accepted past its
setups of a loop turn (`SETUPS_PER_TURN`) here, takes up to that many a turn, and
refuses, with an event, what `put` hands back: the queue is bounded per source
(`per_source`) and in all (`in_all`, where the longest queue gives up its newest,
so that a flood never pushes out another sandbox's one connection).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Intake(Generic[T]):
    """Queues of items (accepted connections) per source, served round-robin.

    `put(source, item)` returns what must be refused instead: None (queued), `item`
    itself (its source's queue is full), or another source's newest item (the
    queue is full in all; that source held the most). `take(n)` returns up to n
    items, one of each source in turn; a source that arrives joins the end of the
    turn. Nothing put is lost: each item is returned once, by `take`, `put` or
    `clear`."""

    __slots__ = ("_queues", "_count", "per_source", "in_all")

    def __init__(self, per_source: int, in_all: int):
        if per_source < 1 or in_all < 1:
            raise ValueError("an intake holds at least one item per source and in all")
        self._queues: dict[Hashable, deque[T]] = {}  # in turn order: next served first
        self._count = 0
        self.per_source = per_source
        self.in_all = in_all

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def queued(self, source: Hashable) -> int:
        """How many of `source`'s items wait."""
        queue = self._queues.get(source)
        return len(queue) if queue else 0

    def put(self, source: Hashable, item: T) -> T | None:
        """Queue `item` of `source`; what to refuse instead, or None (see the class)."""
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = deque()
        elif len(queue) >= self.per_source:
            return item
        queue.append(item)
        self._count += 1
        if self._count <= self.in_all:
            return None
        # Full in all: the source with the most waiting gives up its newest (ties: the
        # one served last, the end of the turn, which is the newcomer's when it ties).
        longest = max(reversed(self._queues), key=lambda s: len(self._queues[s]))
        return self._pop_newest(longest)

    def take(self, n: int) -> list[T]:
        """Up to `n` items, round-robin over the sources, oldest first in each."""
        taken: list[T] = []
        queues = self._queues
        while queues and len(taken) < n:
            source = next(iter(queues))
            queue = queues.pop(source)
            taken.append(queue.popleft())
            if queue:
                queues[source] = queue  # to the end of the turn
        self._count -= len(taken)
        return taken

    def clear(self) -> list[T]:
        """Every item still queued (the door stops), oldest first per source."""
        queues, self._queues, self._count = self._queues, {}, 0
        return [item for queue in queues.values() for item in queue]

    def _pop_newest(self, source: Hashable) -> T:
        queue = self._queues[source]
        item = queue.pop()
        if not queue:
            del self._queues[source]
        self._count -= 1
        return item
