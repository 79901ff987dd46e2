"""The relay's per-wakeup budget (proxy/frontdoor/relay.py): a bulk transfer whose
both ends keep up takes turns with the other connections instead of holding the
event loop until it is done.

The sockets are fakes, so that "both ends keep up" is exact (a source that always
fills the buffer, a sink that always takes everything) and the assertion is on the
order of events on a real asyncio loop, never on timing."""

from __future__ import annotations

import asyncio
import types

import pytest
from sandgate.proxy.frontdoor.relay import RELAY_CHUNK, WAKEUP_BUDGET, End, Relay

BULK = 64 << 20  # 64 MiB: 256 full reads


class Source:
    """Has `total` bytes to read, always a full buffer's worth at once, then would
    block (no FIN): the fastest sender there is."""

    def __init__(self, total: int):
        self.left = total

    def fileno(self):
        return -1

    def recv_into(self, buffer):
        if not self.left:
            raise BlockingIOError
        n = min(len(buffer), self.left)
        self.left -= n
        return n


class Sink:
    """Takes every byte sent at once, noting (its name, the bytes) in `log`."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.received = name, log, 0

    def fileno(self):
        return -1

    def send(self, data):
        self.received += len(data)
        self.log.append((self.name, len(data)))
        return len(data)


def _relay(source, sink, *, download: bool, loop) -> Relay:
    """A relay moving `source`'s bytes to `sink` (upstream to client if `download`)."""
    reading, writing = End(source, readable=True, writable=True), End(sink, False, True)
    client, upstream = (writing, reading) if download else (reading, writing)
    state = types.SimpleNamespace(bytes_up=0, bytes_down=0)
    relay = Relay(
        client, upstream, state, bytearray(RELAY_CHUNK), loop.time, _no_finish, lambda: None
    )
    relay.defer = lambda: loop.call_soon(relay.pump)  # as the front door's Connection does
    return relay


def _no_finish(problem, reset=False):
    pytest.fail(f"the relay ended: {problem}")


async def _bulk_and_small():
    loop = asyncio.get_running_loop()
    log: list[tuple[str, int]] = []
    bulk_source, small_source = Source(BULK), Source(300)
    bulk_sink, small_sink = Sink("bulk", log), Sink("small", log)
    bulk = _relay(bulk_source, bulk_sink, download=True, loop=loop)
    small = _relay(small_source, small_sink, download=False, loop=loop)
    loop.call_soon(bulk.pump)  # the bulk transfer's event came first
    loop.call_soon(small.pump)
    while bulk_source.left or small_sink.received < 300:
        await asyncio.sleep(0)
    return log, bulk, small, bulk_sink


def test_a_bulk_transfer_lets_a_small_request_through_after_one_budget():
    log, bulk, small, bulk_sink = asyncio.run(_bulk_and_small())
    first_small = next(i for i, (name, _) in enumerate(log) if name == "small")
    moved_before = sum(n for name, n in log[:first_small] if name == "bulk")
    # The small request waited for one wakeup's worth of the bulk, not for all of it.
    assert 0 < moved_before <= WAKEUP_BUDGET < BULK
    # ... and the bulk still arrived whole, in budget-sized turns, counted.
    assert bulk_sink.received == BULK == bulk.state.bytes_down
    assert small.state.bytes_up == 300
    assert not bulk.deferred and not bulk.upstream.readable  # drained: nothing left scheduled


def test_each_wakeup_moves_at_most_the_budget():
    """One pump call moves at most WAKEUP_BUDGET bytes and asks for the next."""
    deferred = []
    loop = types.SimpleNamespace(time=lambda: 0.0)
    log: list = []
    source, sink = Source(BULK), Sink("bulk", log)
    relay = _relay(source, sink, download=True, loop=loop)
    relay.defer = lambda: deferred.append(True)
    relay.pump()
    assert sink.received == WAKEUP_BUDGET and deferred == [True]
    assert relay.upstream.readable  # unread bytes remain: the deferred pump resumes them
    relay.pump()
    assert sink.received == 2 * WAKEUP_BUDGET and deferred == [True, True]
