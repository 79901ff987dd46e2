"""Descriptors kept in reserve, so that a sandbox that opens connections until the
gateway has no descriptor left cannot also stop its audit log (rotation opens a
file) or its control socket (each command is a connection).

The gateway holds `count` spare descriptors (/dev/null) from the start. When the
front door's accept fails for want of a descriptor (EMFILE, ENFILE), or the
periodic probe finds none free, the reserve is released for the audit log and the
control socket, and until it can be taken back whole, plus one spare, every new
connection is refused at connect with `descriptors_exhausted` (an event each),
as nginx and Squid keep a spare descriptor to refuse with. The per-sandbox caps
(`limits:`) stay what they were; this guards the gateway process as a whole.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

from sandgate.proxy.policy.builtin import deny
from sandgate.proxy.policy.model import Decision

log = logging.getLogger("sandgate.descriptors")

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class DescriptorReserve:
    def __init__(self, count: int = 16, probe_interval: float = 0.5):
        self.count = count
        self.probe_interval = probe_interval  # how often a full process is looked for
        self.exhausted_since: float | None = None  # time.monotonic(); None: fds to spare
        self._fds: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._fill()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Probe every `probe_interval` s: a process that took its last descriptor
        elsewhere (mitmproxy's upstream side) is found even if nothing is accepted."""
        self._timer = loop.call_later(self.probe_interval, self._probe, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()

    def exhausted(self, why: str) -> None:
        """No descriptor was left (`why`): release the reserve; refuse new connections."""
        if self.exhausted_since is None:
            self.exhausted_since = time.monotonic()
            log.error(
                "out of descriptors (%s): %d reserved ones released for the audit log and "
                "the control socket; new connections are refused until some close",
                why,
                len(self._fds),
            )
        self._release()

    def hold(self) -> Decision | None:
        """For the gate's `hold_new`: a denial while descriptors are exhausted (looked
        at again first: a few system calls, and only while exhausted)."""
        if self.exhausted_since is None or self._recovered():
            return None
        return deny(
            "descriptors-exhausted",
            detail="the gateway has no file descriptor to spare; new connections are "
            "refused until open ones close",
        )

    def _probe(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.exhausted_since is None:
            if not self._spare():
                self.exhausted("no descriptor left")
        else:
            self._recovered()
        self._timer = loop.call_later(self.probe_interval, self._probe, loop)

    def _recovered(self) -> bool:
        """Exhausted: take the reserve back if it can be had whole, plus one spare."""
        if self._fill() and self._spare():
            log.warning(
                "descriptors to spare again after %.1f s; new connections are accepted",
                time.monotonic() - self.exhausted_since,
            )
            self.exhausted_since = None
            return True
        self._release()  # what _fill took goes back to the audit log and control socket
        return False

    def _fill(self) -> bool:
        while len(self._fds) < self.count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                if e.errno in OUT_OF_DESCRIPTORS:
                    return False
                raise
        return True

    def _release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    @staticmethod
    def _spare() -> bool:
        """Whether one more descriptor can be had now (taken and given back)."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            if e.errno in OUT_OF_DESCRIPTORS:
                return False
            raise
        return True
