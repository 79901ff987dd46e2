"""UpstreamPool.take hands out an idle plain-HTTP upstream only while its server has
said nothing: bytes, a FIN or a reset make it unusable (closed, not handed out), on
real loopback TCP connections."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
from sandgate.proxy.frontdoor.http1_relay import UpstreamPool

KEY = ("task", "10.213.0.2", "203.0.113.10", 80)


class _Poller:
    def __init__(self) -> None:
        self.handlers: dict = {}

    def forget(self, fd: int, unregister: bool = False) -> None:
        self.handlers.pop(fd, None)


@pytest.fixture
def pairs():
    """make(n): n connected (gateway end, server end) TCP pairs on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    made = []

    def make(n: int) -> list[tuple[socket.socket, socket.socket]]:
        for _ in range(n):
            ours = socket.create_connection(listener.getsockname())
            ours.setblocking(False)
            made.append((ours, listener.accept()[0]))
        return made[-n:]

    yield make
    for ours, theirs in made:
        ours.close()
        theirs.close()
    listener.close()


@pytest.fixture
def pool():
    loop = asyncio.new_event_loop()
    pool = UpstreamPool(_Poller(), loop)
    yield pool
    pool.close()
    loop.close()


def _settle(server_end: socket.socket, what: str) -> None:
    if what == "bytes":
        server_end.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    elif what == "fin":
        server_end.shutdown(socket.SHUT_WR)
    elif what == "reset":
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server_end.close()
    time.sleep(0.05)  # loopback: delivered by then


def test_a_quiet_idle_upstream_is_handed_out_newest_first(pool, pairs):
    (older, _), (newer, _) = pairs(2)
    pool.give(KEY, older)
    pool.give(KEY, newer)
    assert pool.take(KEY) is newer
    assert pool.take(KEY) is older
    assert pool.take(KEY) is None and pool.count == 0
    assert newer.fileno() != -1 and older.fileno() != -1  # handed out open


@pytest.mark.parametrize("what", ["bytes", "fin", "reset"])
def test_an_idle_upstream_whose_server_spoke_is_closed_not_handed_out(pool, pairs, what):
    (quiet, _), (spoke, server_end) = pairs(2)
    pool.give(KEY, quiet)
    pool.give(KEY, spoke)  # newest: looked at first
    _settle(server_end, what)
    assert pool.take(KEY) is quiet
    assert spoke.fileno() == -1  # closed by the pool
    assert pool.count == 0 and pool.take(KEY) is None
