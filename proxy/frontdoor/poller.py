"""The front door's epoll set: every socket added once, edge-triggered, never
modified; the asyncio loop watches the whole set as one descriptor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
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


class Poller:
    """An epoll set whose events go to one handler per descriptor; the asyncio loop
    watches it as one readable descriptor and calls `dispatch`.

    A descriptor closed while a batch of events is dispatched may be reused by a
    socket opened in the same batch: an event still queued for the old socket must
    not reach the new one. So descriptors forgotten during a batch are skipped for
    the rest of it (a new socket's own events come with the next batch)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._dispatching = False
        self._forgotten: set[int] = set()
        loop.add_reader(self.epoll.fileno(), self.dispatch)

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, _WATCH)  # edge-triggered, yet reports the current state once

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
        handlers, forgotten = self.handlers, self._forgotten
        self._dispatching = True
        try:
            for fd, events in self.epoll.poll(0, 512):
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
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()


def upstream_error(sock: socket.socket, events: int) -> int:
    """The errno of a non-blocking connect that `events` (its first OUT or CLOSED)
    answered; 0: connected."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & FAILED else 0
