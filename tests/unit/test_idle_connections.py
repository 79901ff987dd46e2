"""Idle connections to /metrics and to the admin page (rt45 F9): a local user's idle or
slow (a byte at a time) connections are cut within a deadline, and past a cap the
oldest idle one makes room, so that they hold neither threads nor descriptors for
ever, nor keep a scrape or an approver out."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request

import pytest
from sandgate.enforcer.admin import server as admin_server
from sandgate.enforcer.admin.auth import Sessions
from sandgate.enforcer.admin.server import AdminServer
from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.telemetry import metrics as metrics_module
from sandgate.proxy.telemetry.metrics import Metrics

IDLE = 60  # connections a local user opens and leaves


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read()


def test_idle_scrape_connections_are_cut_and_bounded_and_a_scrape_still_works(monkeypatch):
    monkeypatch.setattr(metrics_module, "SCRAPE_S", 1.0)
    metrics = Metrics()
    _, port = metrics.serve("127.0.0.1", 0)
    try:
        assert b"sandgate" in _scrape(port)  # the server is up (made at the first scrape)
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /metr")  # and then a byte now and then: the deadline is overall
        time.sleep(0.3)
        # the cap holds: no thread per idle connection
        assert threading.active_count() <= before + metrics_module.SCRAPES_MAX + 2
        assert b"sandgate_events_total" in _scrape(port)  # a scrape still works meanwhile
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.3)
            slow.sendall(b"i")
        assert all(_closed_by_peer(s, 3.0) for s in [*idle, slow])
        assert time.monotonic() - started < 3.0
        time.sleep(0.2)
        assert threading.active_count() <= before + 1
    finally:
        for s in locals().get("idle", []):
            s.close()
        metrics.stop()


def test_idle_admin_connections_are_cut_and_bounded_and_the_page_still_answers(monkeypatch):
    monkeypatch.setattr(admin_server, "HEAD_S", 1.0)

    async def main():
        approvals = Approvals(lambda event: None)
        server = AdminServer(approvals, Sessions())
        _, port = await server.start("127.0.0.1", 0)
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(IDLE)]
            slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
            slow.write(b"GET / HTTP/1.1\r\n")
            await asyncio.sleep(0.2)
            assert len(server._clients) <= admin_server.MAX_CLIENTS_PER_ADDRESS
            # the page still answers meanwhile (the oldest idle connection made room)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            writer.close()
            started = time.monotonic()
            for _ in range(4):  # a header line every 0.3 s: each read is in time, the head not
                await asyncio.sleep(0.3)
                if slow.is_closing() or slow_reader.at_eof():
                    break
                with contextlib.suppress(ConnectionError):
                    slow.write(b"x-slow: 1\r\n")
            for r, _ in [*idle, (slow_reader, slow)]:
                assert await asyncio.wait_for(r.read(), 3) == b""
            assert time.monotonic() - started < 3.0
            await asyncio.sleep(0.05)
            assert not server._clients and not server._per_address
        finally:
            await server.stop()

    asyncio.run(main())


@pytest.mark.parametrize("cap", [3])
def test_past_the_admin_cap_with_nothing_idle_a_connection_is_closed_at_once(monkeypatch, cap):
    """Busy connections (a request under way, live updates) are never cut for a new
    one: then the new one is closed at once."""
    monkeypatch.setattr(admin_server, "MAX_CLIENTS", cap)

    async def main():
        server = AdminServer(Approvals(lambda event: None), Sessions())
        _, port = await server.start("127.0.0.1", 0)
        try:
            busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
            await asyncio.sleep(0.05)
            server._waiting.clear()  # as if each had a request under way
            reader, _ = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 2) == b""
            assert server.refused == 1 and len(server._clients) == cap
            for _, writer in busy:
                writer.close()
        finally:
            await server.stop()

    asyncio.run(main())
