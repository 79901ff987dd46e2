"""The front door's epoll set: every socket added once, edge-triggered, never
modified. On a loop made by `new_event_loop` the set is the loop's own (one
epoll_wait per loop iteration serves asyncio's descriptors and the door's); on any
other loop it is a set of its own, which the loop watches as one descriptor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import select
import selectors
import socket
from collections.abc import Callable

log = logging.getLogger("sandgate.frontdoor")

IN, OUT = select.EPOLLIN, select.EPOLLOUT
CLOSED = (
    select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
)  # the peer shut down, reset, or failed
# A non-blocking connect that failed (refused, unreachable) reports these; one that
# succeeded never does: only then is SO_ERROR worth a syscall.
FAILED = select.EPOLLHUP | select.EPOLLERR
# Every socket of the front door is watched for all of these, edge-triggered, from
# the start: an event means "something changed since you last looked".
_WATCH = IN | OUT | select.EPOLLRDHUP | select.EPOLLET


class SharedEpollSelector(selectors.EpollSelector):
    """asyncio's selector, whose epoll set a front door's `Poller` shares: events of
    the door's descriptors go to the door's handlers from within `select`, those of
    asyncio's descriptors to the loop as usual.

    Why: with a set of its own, each wake-up of the door cost two epoll_wait calls
    (the loop's, which sees the door's set readable, then the door's) and an asyncio
    callback. A gateway worker at half load wakes about once per event, so this fixed
    cost per wake-up was a large part of what it spends per connection beyond a
    process at full load (docs/performance.md, "Workers, session 7, second pass").
    The door's handlers run before the callbacks this loop iteration found ready,
    which only puts a relay's deferred pump further behind (relay.py: fairness)."""

    poller: Poller | None = None  # the Poller whose descriptors share the set

    def select(self, timeout: float | None = None) -> list:
        poller = self.poller
        if poller is None:
            return super().select(timeout)
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:  # as EpollSelector: at least `timeout`, in whole milliseconds
            timeout = math.ceil(timeout * 1e3) * 1e-3
        fd_to_key = self._fd_to_key
        try:
            fd_events = self._selector.poll(timeout, max(len(fd_to_key) + len(poller.handlers), 1))
        except InterruptedError:
            return []
        ready, door = [], []
        for fd, event in fd_events:
            key = fd_to_key.get(fd)
            if key is None:
                door.append((fd, event))  # the door's, or a socket both have let go
                continue
            events = 0
            if event & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if event & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            ready.append((key, events & key.events))
        if door:
            poller.handle(door)
        return ready


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose epoll set the front door shares (`SharedEpollSelector`):
    the loop factory of the processes that run a gateway (asyncio.Runner)."""
    return asyncio.SelectorEventLoop(SharedEpollSelector())


class Poller:
    """An epoll set whose events go to one handler per descriptor: the loop's own
    when it was made by `new_event_loop` (and no other Poller took it), else one the
    loop watches as one readable descriptor (`dispatch`).

    A descriptor closed while a batch of events is dispatched may be reused by a
    socket opened in the same batch: an event still queued for the old socket must
    not reach the new one. So descriptors forgotten during a batch are skipped for
    the rest of it (a new socket's own events come with the next batch)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._dispatching = False
        self._forgotten: set[int] = set()
        selector = getattr(loop, "_selector", None)  # asyncio's; no public accessor
        if isinstance(selector, SharedEpollSelector) and selector.poller is None:
            self.shared: SharedEpollSelector | None = selector
            self.epoll = selector._selector  # the loop's epoll object
            selector.poller = self
        else:
            self.shared = None
            self.epoll = select.epoll()
            loop.add_reader(self.epoll.fileno(), self.dispatch)

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, _WATCH)  # edge-triggered, yet reports the current state once

    def take_over(self, fd: int, handler: Callable[[int], None]) -> None:
        """Give a watched (or forgotten, not yet closed) fd to another handler; it
        reports the current state once, as `watch` does."""
        self.handlers[fd] = handler
        self.epoll.modify(fd, _WATCH)

    def forget(self, fd: int, unregister: bool = False) -> None:
        """Stop handling fd: before it is closed (closing takes it out of the set),
        or, with `unregister`, before someone else takes the socket over."""
        if self.handlers.pop(fd, None) is not None:
            if self._dispatching:
                self._forgotten.add(fd)
            if unregister:
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)

    def dispatch(self) -> None:
        """The own set is readable: handle what it has."""
        self.handle(self.epoll.poll(0, 512))

    def handle(self, fd_events: list[tuple[int, int]]) -> None:
        handlers, forgotten = self.handlers, self._forgotten
        self._dispatching = True
        try:
            for fd, events in fd_events:
                if fd in forgotten:
                    continue
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(events)
                    except Exception:  # noqa: BLE001 - handlers fail closed themselves; keep the batch going
                        log.exception("front door: handler for fd %d failed", fd)
        finally:
            self._dispatching = False
            forgotten.clear()

    def close(self) -> None:
        if self.shared is None:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
            return
        # The set is the loop's, which selects alone again. The door closed its
        # sockets before (closing takes them out of the set); a number left here may
        # be asyncio's own by now, so nothing is unregistered by number.
        self.handlers.clear()
        self.shared.poller = None


def upstream_error(sock: socket.socket, events: int) -> int:
    """The errno of a non-blocking connect that `events` (its first OUT or CLOSED)
    answered; 0: connected."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & FAILED else 0
