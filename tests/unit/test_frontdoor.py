"""The front door on loopback: real sockets, a fake upstream on 127.0.0.1, and the
real gate. There is no redirect on loopback, so the original destination is
injected (`original_dst`) and the relay connects to the fake upstream in its place
(`upstream_address`). The gateway end to end is tests/e2e."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import socket
from pathlib import Path

import pytest
from sandgate.proxy.frontdoor import poller
from sandgate.proxy.frontdoor.door import TAKE_WHOLE_PAST, Connection, FrontDoor
from sandgate.proxy.gate import ConnState
from support.fakes import client_hello, make_gate

LOOPBACK = "127.0.0.1"  # the "sandbox": the source address of every test client
ALLOWED = ("203.0.113.10", 443)
EVIL = ("203.0.113.66", 443)
SSH = ("203.0.113.10", 22)


HELLO = client_hello("allowed.test")
# A TLS server's answer to HELLO: the front door holds what the client sends after
# its hello until it sees one (hello_watch.py), then relays plainly.
# A TLS 1.3 ServerHello (its supported_versions says so): the watch ends at it.
SERVER_HELLO = (
    bytes.fromhex("16030300320200002e0303") + bytes(32) + bytes.fromhex("001301000006002b00020304")
)


class SharedSetPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return poller.new_event_loop()


@pytest.fixture(autouse=True, params=["own epoll set", "the loop's epoll set"])
def loop_kind(request):
    """Every test runs on a plain asyncio loop (the door's own epoll set, watched as
    one descriptor) and on the gateway processes' loop, whose epoll set the door
    shares (poller.SharedEpollSelector)."""
    shared = request.param != "own epoll set"
    if shared:
        asyncio.set_event_loop_policy(SharedSetPolicy())
    yield shared
    asyncio.set_event_loop_policy(None)


@pytest.fixture
def gate(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK)
    yield gate
    # Each test ends with its connections closed, however they ended: what the
    # sandbox held (proxy/limits.py) is released, exactly once.
    assert (gate.counts.open, gate.counts.pending, len(gate.counts)) == (0, 0, 0)


class Upstream:
    """A fake server on loopback; `handler(reader, writer)` plays the server."""

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self):
        async def serve(reader, writer):
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


async def started(gate, dst, upstream_port=1, hand_off=None, **options) -> FrontDoor:
    async def refuse(sock, state):
        sock.close()

    door = FrontDoor(
        gate,
        hand_off or refuse,
        original_dst=lambda sock: dst,
        upstream_address=lambda ip, port: (LOOPBACK, upstream_port),
        **options,
    )
    await door.start(LOOPBACK, 0)
    return door


async def read_all(reader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b"<reset>"


def events(gate) -> list[tuple]:
    return [(str(e.kind), str(e.reason), e.rule_id, e.name, e.protocol) for e in gate.events]


async def until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(coroutine):
    asyncio.run(asyncio.wait_for(coroutine, 20))


# --- pass-through ---------------------------------------------------------------------


def test_allowed_tls_is_relayed_from_byte_0_with_half_close_and_counted(gate):
    async def server(reader, writer):
        assert await reader.readexactly(len(HELLO)) == HELLO
        writer.write(SERVER_HELLO)
        assert await reader.readexactly(4) == b"more"
        writer.write(b"s" * 70000)
        await writer.drain()
        assert await reader.read() == b""  # the client's FIN came through
        writer.write(b"bye")  # the other direction still works after it
        await writer.drain()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO + b"more")
            assert await reader.readexactly(len(SERVER_HELLO)) == SERVER_HELLO
            assert await reader.readexactly(70000) == b"s" * 70000
            writer.write_eof()
            assert await read_all(reader) == b"bye"
            writer.close()
            await until(lambda: len(gate.events) == 2)
            await door.stop()

    run(scenario())
    assert events(gate) == [
        ("connection", "rule_allow", "allowed", "allowed.test", "tls"),
        ("connection_end", "rule_allow", "allowed", "allowed.test", "tls"),
    ]
    end = gate.events[-1]
    assert (end.bytes_up, end.bytes_down) == (len(HELLO) + 4, len(SERVER_HELLO) + 70003)
    assert gate.connections == {}


def test_bulk_both_ways_with_a_slow_reader_arrives_whole(gate):
    size = 6 * 1024 * 1024
    blob = bytes(range(256)) * (size // 256)

    async def server(reader, writer):
        assert await reader.readexactly(len(HELLO)) == HELLO
        writer.write(SERVER_HELLO)
        received = hashlib.sha256(HELLO)
        remaining = size
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            assert chunk
            received.update(chunk)
            remaining -= len(chunk)
        assert received.digest() == hashlib.sha256(HELLO + blob).digest()
        writer.write(blob)
        await writer.drain()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO + blob)
            assert await reader.readexactly(len(SERVER_HELLO)) == SERVER_HELLO
            got = hashlib.sha256()
            total = 0
            while total < size:
                chunk = await reader.read(1 << 14)
                assert chunk
                got.update(chunk)
                total += len(chunk)
                if total < size // 4:
                    await asyncio.sleep(0.001)  # slower than the upstream: back-pressure
            assert got.digest() == hashlib.sha256(blob).digest()
            writer.close()
            await until(lambda: len(gate.events) == 2)
            await door.stop()

    run(scenario())
    assert (gate.events[-1].bytes_up, gate.events[-1].bytes_down) == (
        len(HELLO) + size,
        len(SERVER_HELLO) + size,
    )


def test_a_hello_in_pieces_is_waited_for(gate):
    async def server(reader, writer):
        assert await reader.readexactly(len(HELLO)) == HELLO
        writer.write(b"ok")

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            for i in range(0, len(HELLO), 100):
                writer.write(HELLO[i : i + 100])
                await writer.drain()
                await asyncio.sleep(0.02)
            assert await read_all(reader) == b"ok"
            writer.close()
            await door.stop()

    run(scenario())
    assert events(gate)[0] == ("connection", "rule_allow", "allowed", "allowed.test", "tls")


def test_the_deadline_tick_falls_on_the_workers_grid(gate):
    """A connection waiting for its first bytes has the door's deadline tick armed on
    the shared grid (proxy/ticks.py), where a worker's event flush also falls: one
    wake-up for both, not a timer of its own relative to whenever it was armed."""
    from sandgate.proxy.frontdoor.door import TICK
    from sandgate.proxy.ticks import LEAD

    async def scenario():
        door = await started(gate, ALLOWED)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        await until(lambda: door._ticker is not None)
        on_grid = [(door._ticker.when() + LEAD) / TICK]
        await asyncio.sleep(TICK * 1.5)  # re-armed by a tick, still waiting
        on_grid.append((door._ticker.when() + LEAD) / TICK)
        writer.close()
        await door.stop()
        return on_grid

    for ticks in asyncio.run(asyncio.wait_for(scenario(), 20)):
        assert abs(ticks - round(ticks)) < 1e-6


def test_raw_tcp_named_by_dns_binding(gate):
    async def server(reader, writer):
        writer.write(b"SSH-2.0-fake\r\n" + await reader.readexactly(6))

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(b"SSH-2\n")
            assert await read_all(reader) == b"SSH-2.0-fake\r\nSSH-2\n"
            writer.close()
            await door.stop()

    run(scenario())
    assert events(gate)[0] == ("connection", "rule_allow", "ssh", "ssh.allowed.test", "tcp")


def test_a_silent_client_on_a_non_web_port_gets_the_servers_banner(gate):
    async def server(reader, writer):
        writer.write(b"220 banner\r\n")  # server speaks first
        writer.write(await reader.readexactly(6))

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port, silence=0.1)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            assert await asyncio.wait_for(reader.readexactly(12), 5) == b"220 banner\r\n"
            writer.write(b"HELO x")
            assert await read_all(reader) == b"HELO x"
            writer.close()
            await door.stop()

    run(scenario())
    assert events(gate)[0] == ("connection", "rule_allow", "ssh", "ssh.allowed.test", "tcp")


# --- denials and ends without a relay -----------------------------------------------------


@pytest.mark.parametrize(
    "dst, data, reason",
    [
        pytest.param(EVIL, client_hello("allowed.test"), "spoofed_destination", id="spoofed-sni"),
        pytest.param(ALLOWED, b"SSH-2.0-tunnel\r\n", "not_http", id="not-http-on-443"),
        pytest.param(("203.0.113.66", 22), b"SSH-2.0-x\r\n", "no_rule", id="raw-unknown"),
        pytest.param(
            ("169.254.169.254", 80), b"GET / HTTP/1.1\r\n\r\n", "private_address", id="at-connect"
        ),
    ],
)
def test_denied_connections_never_reach_the_upstream(gate, dst, data, reason):
    async def server(reader, writer):
        raise AssertionError("reached the upstream")

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, dst, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(data)
            assert await read_all(reader) in (b"", b"<reset>")
            writer.close()
            await door.stop()
            return upstream.connections

    assert asyncio.run(scenario()) == 0
    assert [e[1] for e in events(gate)] == [reason]
    assert gate.connections == {}


def test_unknown_source_is_closed_at_connect(gate):
    gate.registry.remove(LOOPBACK)

    async def scenario():
        door = await started(gate, ALLOWED)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        writer.write(HELLO)
        assert await read_all(reader) in (b"", b"<reset>")
        await door.stop()

    run(scenario())
    assert [e[1] for e in events(gate)] == ["unknown_sandbox"]


@pytest.mark.parametrize(
    "dst, send, detail",
    [
        pytest.param(
            EVIL, b"", "closed before sending enough bytes to decide", id="closed-at-once"
        ),
        pytest.param(
            ALLOWED,
            b"\x16\x03",
            "closed before sending enough bytes to decide",
            id="two-bytes-then-fin",
        ),
        pytest.param(
            ALLOWED, None, "nothing decidable within 0.3 s; the gateway closed it", id="timeout"
        ),
    ],
)
def test_connections_that_end_undecided_get_no_data(gate, dst, send, detail):
    async def scenario():
        door = await started(gate, dst, first_bytes_timeout=0.3)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        if send is not None:
            writer.write(send)
            writer.write_eof()
        assert await read_all(reader) in (b"", b"<reset>")
        writer.close()
        await until(lambda: gate.events)
        await door.stop()

    run(scenario())
    assert [e[1] for e in events(gate)] == ["no_data"]
    assert gate.events[0].detail.startswith(detail)
    assert gate.connections == {}


def test_a_refused_upstream_resets_the_client_and_says_so(gate):
    with socket.socket() as closed:
        closed.bind((LOOPBACK, 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused

        async def scenario():
            door = await started(gate, ALLOWED, port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO)
            assert await read_all(reader) == b"<reset>"
            writer.close()
            await until(lambda: len(gate.events) == 2)
            await door.stop()

        run(scenario())
    allow, end = gate.events
    assert (str(end.kind), end.bytes_up, end.bytes_down) == ("connection_end", 0, 0)
    assert end.detail.endswith("; upstream connect failed: Connection refused")


def connection_objects() -> set[int]:
    """The ids of the front door's connections and the gate's states still in memory."""
    return {id(o) for o in gc.get_objects() if type(o) in (Connection, ConnState)}


@pytest.mark.parametrize("kind", ["tls pass-through", "plain http", "denied", "upstream refused"])
def test_a_closed_connection_is_freed_at_its_end_not_left_to_the_collector(gate, kind):
    """While open, a connection's objects refer to each other (its state's `abort` is
    its finish, its relay holds it); at its end they let go, so its objects are freed
    by their counts as it closes: left as cycles, they waited for the collector."""

    async def server(reader, writer):
        if kind != "plain http":
            await reader.readexactly(len(HELLO))
            writer.write(b"hi")
            await reader.read()
            return
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:  # kept by the gateway's pool: request after request
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    request = HELLO
    if kind == "plain http":
        request = b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n"

    async def scenario():
        async with Upstream(server) as upstream:
            with socket.socket() as closed:
                closed.bind((LOOPBACK, 0))  # bound, never listening: refused
                door = await started(
                    gate,
                    EVIL if kind == "denied" else ALLOWED,
                    closed.getsockname()[1] if kind == "upstream refused" else upstream.port,
                    plain_http=lambda state: kind == "plain http",
                )
                gc.collect()
                gc.disable()
                before = connection_objects()  # alive before: not this test's
                try:
                    for _ in range(3):
                        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
                        writer.write(request)
                        got = b""
                        if kind == "tls pass-through":
                            got = await reader.readexactly(2)
                            writer.write_eof()
                        got += await read_all(reader)
                        writer.close()
                        with contextlib.suppress(ConnectionError):
                            await writer.wait_closed()
                        assert (b"hi" in got) == (kind in ("tls pass-through", "plain http"))
                    await until(lambda: not gate.connections and not door._live)
                    await asyncio.sleep(0.05)  # the relay's last callbacks have run
                    left = connection_objects() - before
                finally:
                    gc.enable()
                    await door.stop()
        return left

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == set()
    ends = [e for e in gate.events if str(e.kind) in ("connection_end", "connection")]
    assert len(ends) >= 3  # every one of the three was decided, and reported


def test_idle_relays_are_closed(gate):
    async def server(reader, writer):
        await reader.read()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port, idle_timeout=0.2)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO)
            assert await read_all(reader) == b""
            writer.close()
            await door.stop()

    run(scenario())
    assert gate.events[-1].detail.endswith("; idle for 0.2 s; the gateway closed it")


def test_stop_closes_open_connections_and_reports_them(gate):
    async def server(reader, writer):
        await reader.read()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port)
            _, relayed = await asyncio.open_connection(LOOPBACK, door.port)
            relayed.write(HELLO)
            _, waiting = await asyncio.open_connection(LOOPBACK, door.port)
            await until(lambda: len(gate.connections) == 2 and gate.events)
            await asyncio.sleep(0.05)
            await door.stop()

    run(scenario())
    assert sorted(e[:2] for e in events(gate)) == [
        ("connection", "no_data"),
        ("connection", "rule_allow"),
        ("connection_end", "rule_allow"),
    ]
    ends = [
        e.detail
        for e in gate.events
        if str(e.kind) == "connection_end" or str(e.reason) == "no_data"
    ]
    assert len(ends) == 2 and all(detail.endswith("the gateway stopped") for detail in ends)
    assert gate.connections == {}


# --- hand-off -------------------------------------------------------------------------------


def test_plain_http_goes_to_mitmproxy_untouched_and_is_adopted(gate):
    request = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"

    async def mitmproxy(sock, state):
        # What the engine does: take the socket over, adopt the gate's decision.
        reader, writer = await asyncio.open_connection(sock=sock)
        peer = writer.get_extra_info("peername")
        state = gate.adopt((peer[0], peer[1]), "mitm-client-1")
        assert state is not None and state.outcome.value == "http"
        assert await reader.readexactly(len(request)) == request  # from byte 0
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        gate.on_close(state)

    async def scenario():
        door = await started(gate, ("203.0.113.10", 80), hand_off=mitmproxy)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        writer.write(request)
        assert (await read_all(reader)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        await door.stop()

    run(scenario())
    # Plain HTTP is decided per request, in mitmproxy; this stand-in decides none,
    # so the connection's end says so (no bytes counted: no_data).
    assert [(str(e.kind), str(e.reason)) for e in gate.events] == [("connection", "no_data")]
    assert gate.connections == {}


def test_a_hand_off_that_fails_before_adoption_still_ends_the_connection(gate):
    async def broken(sock, state):
        sock.close()
        raise RuntimeError("mitmproxy fell over")

    async def scenario():
        door = await started(gate, ("203.0.113.10", 80), hand_off=broken)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await read_all(reader) in (b"", b"<reset>")
        await until(lambda: not gate.connections)
        await door.stop()

    run(scenario())


# --- failing closed -------------------------------------------------------------------------


def test_a_failure_in_the_front_door_denies_and_closes(gate, monkeypatch):
    def boom(state, data):
        raise RuntimeError("bug")

    monkeypatch.setattr(gate, "on_first_bytes", boom)

    async def scenario():
        door = await started(gate, ALLOWED)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        writer.write(HELLO)
        assert await read_all(reader) in (b"", b"<reset>")
        await until(lambda: not gate.connections)
        await door.stop()

    run(scenario())
    assert [e[1] for e in events(gate)] == ["internal_error"]


@pytest.mark.parametrize("where", ["wait", "watch"])
def test_a_failure_right_after_admission_still_ends_the_connection_at_the_gate(
    gate, monkeypatch, where
):
    """The gate admitted the connection (it counts against the sandbox's limits);
    the front door failed before it could serve it: denied, closed, released."""

    async def scenario():
        door = await started(gate, ALLOWED)

        def boom(*args):
            raise OSError("out of something")

        if where == "wait":
            monkeypatch.setattr(door, "wait", boom)
        else:
            monkeypatch.setattr(door.poller, "watch", boom)
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO)
            assert await read_all(reader) in (b"", b"<reset>")
        except ConnectionResetError:
            pass  # reset before the client's loop saw its connect complete
        await until(lambda: gate.events)
        await door.stop()

    run(scenario())
    assert [e[1] for e in events(gate)] == ["internal_error"]
    assert gate.connections == {}


# --- after a silence decision, the client speaks first --------------------------------------


def test_a_client_speaking_first_after_silence_is_relayed_if_raw(gate):
    async def server(reader, writer):
        assert await reader.readexactly(6) == b"PING\r\n"  # this server waits for the client
        writer.write(b"PONG\r\n")

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port, silence=0.05)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            await until(lambda: gate.events)  # decided on silence
            writer.write(b"PING\r\n")
            assert await read_all(reader) == b"PONG\r\n"
            writer.close()
            await door.stop()

    run(scenario())
    assert events(gate)[:1] == [("connection", "rule_allow", "ssh", "ssh.allowed.test", "tcp")]
    assert [e[0] for e in events(gate)] == ["connection", "connection_end"]


def test_a_hello_after_silence_is_decided_before_any_byte_reaches_the_server(gate):
    received = []

    async def server(reader, writer):
        received.append(await reader.read())

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port, silence=0.05)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            await until(lambda: upstream.connections)  # allowed on silence, connected
            writer.write(client_hello("evil.test"))  # fronting: another name at this address
            assert await read_all(reader) in (b"", b"<reset>")
            await until(lambda: received)
            await door.stop()

    run(scenario())
    assert received == [b""]
    assert events(gate) == [
        ("connection", "rule_allow", "ssh", "ssh.allowed.test", "tcp"),
        ("connection", "no_rule", "default:fallback", "evil.test", "tls"),
    ]
    assert gate.connections == {}


def test_http_after_silence_goes_to_mitmproxy(gate):
    request = b"GET / HTTP/1.1\r\nHost: ssh.allowed.test\r\n\r\n"
    handed = []

    async def mitmproxy(sock, state):
        reader, writer = await asyncio.open_connection(sock=sock)
        handed.append(await reader.readexactly(len(request)))
        writer.close()

    async def server(reader, writer):
        await reader.read()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port, silence=0.05, hand_off=mitmproxy)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            await until(lambda: upstream.connections)
            writer.write(request)
            await read_all(reader)
            await door.stop()

    run(scenario())
    assert handed == [request]


# --- the shared epoll set ----------------------------------------------------------------


def test_the_door_shares_the_loops_epoll_set_one_door_only(gate, loop_kind):
    """On the gateway's loop the first door's sockets are in the loop's own epoll set
    (no second epoll_wait per wake-up); a second door on that loop keeps a set of its
    own. Both relay; stopping them leaves the loop selecting alone, serving its own
    sockets."""

    async def server(reader, writer):
        writer.write(await reader.readexactly(len(HELLO)))
        await writer.drain()

    async def exchange(door) -> bytes:
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        writer.write(HELLO)
        echoed = await reader.readexactly(len(HELLO))
        writer.close()
        return echoed

    async def scenario():
        loop = asyncio.get_running_loop()
        selector = loop._selector
        async with Upstream(server) as upstream:
            first = await started(gate, ALLOWED, upstream.port)
            second = await started(gate, ALLOWED, upstream.port)
            if loop_kind:
                assert selector.poller is first.poller
                assert first.poller.epoll is selector._selector
            else:
                assert first.poller.shared is None
            assert second.poller.shared is None and second.poller.epoll is not selector._selector
            assert await exchange(first) == HELLO and await exchange(second) == HELLO
            await until(lambda: len(gate.events) == 4)
            await first.stop()
            await second.stop()
            assert getattr(selector, "poller", None) is None
            third = await started(gate, ALLOWED, upstream.port)
            assert third.poller.shared is (selector if loop_kind else None)
            assert await exchange(third) == HELLO
            await until(lambda: len(gate.events) == 6)
            await third.stop()
        assert upstream.connections == 3

    run(scenario())
    assert [str(e.kind) for e in gate.events] == ["connection", "connection_end"] * 3


# --- accept ---------------------------------------------------------------------------


class CountingListener:
    """The door's listener, with its accepts counted: the ones that returned a
    connection and the ones that failed because the queue was empty."""

    def __init__(self, listener: socket.socket):
        self._listener = listener
        self.family = listener.family
        self.accepted = self.empty = 0

    def _accept(self):
        try:
            accepted = self._listener._accept()
        except BlockingIOError:
            self.empty += 1
            raise
        self.accepted += 1
        return accepted

    def __getattr__(self, name):
        return getattr(self._listener, name)


def test_a_burst_of_connections_is_all_accepted_without_an_accept_that_fails(gate):
    """More connections queued at once than one wake-up accepts (ACCEPTS_PER_WAKEUP):
    each is accepted and decided, and no accept runs into an empty queue."""
    burst = 150  # > 2 * ACCEPTS_PER_WAKEUP

    async def scenario():
        door = await started(gate, ("169.254.169.254", 80))  # denied at connect
        counting = door._listener = CountingListener(door._listener)
        # Connected before the loop runs again: the whole burst waits in the queue.
        clients = [socket.create_connection((LOOPBACK, door.port)) for _ in range(burst)]
        try:
            await until(lambda: len(gate.events) == burst)
            for client in clients:  # each one was served: closed by the door
                client.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert client.recv(1) == b""
        finally:
            for client in clients:
                client.close()
            await door.stop()
        return counting

    counting = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (counting.accepted, counting.empty) == (burst, 0)
    assert {e[1] for e in events(gate)} == {"private_address"}


def _flood_and_one_more(port: int, flood: int) -> list[socket.socket]:
    """`flood` connections from 127.0.0.2, then one from 127.0.0.3, all connected
    (queued in the kernel) before the loop runs again."""
    clients = [
        socket.create_connection((LOOPBACK, port), source_address=("127.0.0.2", 0))
        for _ in range(flood)
    ]
    clients.append(socket.create_connection((LOOPBACK, port), source_address=("127.0.0.3", 0)))
    return clients


def test_the_door_and_a_workers_listener_queue_as_many_as_the_host_allows(gate):
    """The accept queue is as deep as net.core.somaxconn allows, not 1024: sandboxes'
    `connection_rate` bursts refilled together filled 1024 while a busy worker's turn
    ran long (CI: an honest SYN dropped, retried a second later)."""
    from sandgate.enforcer.workers import make_listeners

    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())

    def bound(listener: socket.socket) -> int:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        return int.from_bytes(info[28:32], "little")  # tcpi_sacked: sk_max_ack_backlog

    async def scenario():
        door = await started(gate, ("169.254.169.254", 80))
        try:
            return bound(door._listener)
        finally:
            await door.stop()

    listeners = make_listeners("127.0.0.1")
    try:
        worker_bound = bound(listeners.frontdoor)
    finally:
        for sock in (listeners.frontdoor, listeners.dns_udp, listeners.dns_tcp):
            sock.close()
    assert asyncio.run(scenario()) == worker_bound == min(somaxconn, 65535) > 1024


@pytest.mark.parametrize(
    ("backlog", "flood"),
    [
        # past half a small bound (a host whose somaxconn is 128), and more than
        # ACCEPTS_PER_WAKEUP
        pytest.param(128, 100, id="half-a-small-bound"),
        # the door's own depth (somaxconn here: 4096): past TAKE_WHOLE_PAST, far from full
        pytest.param(None, TAKE_WHOLE_PAST + 100, id="past-512-of-a-deep-queue"),
    ],
)
def test_an_accept_queue_past_half_full_is_taken_whole_and_the_flood_refused(gate, backlog, flood):
    """A flood that fills the kernel's accept queue past TAKE_WHOLE_PAST, or half its
    bound (a worker whose turns it outran): one wake-up accepts all of it, where a full
    queue would drop the next SYN of any sandbox. The intake refuses the flood's excess,
    each with its event; the other source's connection is set up, not refused."""
    options = {} if backlog is None else {"backlog": backlog}

    async def scenario():
        door = await started(gate, ("169.254.169.254", 80), **options)
        counting = door._listener = CountingListener(door._listener)
        clients = _flood_and_one_more(door.port, flood)
        try:
            door._accept()  # the one wake-up, before the loop runs another
            in_one_wakeup = counting.accepted
            await until(lambda: len(gate.events) == flood + 1)
        finally:
            for client in clients:
                client.close()
            await door.stop()
        return in_one_wakeup

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == flood + 1
    refused = [e for e in gate.events if e.rule_id == "builtin:sandbox-intake"]
    assert refused and all(e.source.startswith("127.0.0.2:") for e in refused), refused[:1]


def test_a_busy_door_sets_up_a_sandboxs_connection_behind_one_of_a_flooders(gate, monkeypatch):
    """A flood of connections from one source and one from another, all queued before
    the loop runs, on a door whose turns count as busy (16 setups a turn): the other
    source's connection is set up behind at most one more of the flood's; the flood's
    past what the intake holds are refused, each with its event; none is lost."""
    from sandgate.proxy.frontdoor import door as door_module

    monkeypatch.setattr(door_module, "BUSY_TURN", -1.0)
    flood = 200

    async def scenario():
        door = await started(gate, ("169.254.169.254", 80))  # set up: denied at connect
        admitted, queued_at = [], {}
        admit, queue = door._admit, door._queue

        def recording_admit(sock, peer):
            admitted.append(peer[0])
            admit(sock, peer)

        def recording_queue(sock, peer):
            queued_at.setdefault(peer[0], len(admitted))
            queue(sock, peer)

        door._admit, door._queue = recording_admit, recording_queue
        clients = _flood_and_one_more(door.port, flood)
        try:
            await until(lambda: len(gate.events) == flood + 1)
        finally:
            for client in clients:
                client.close()
            await door.stop()
        return admitted, queued_at

    admitted, queued_at = asyncio.run(asyncio.wait_for(scenario(), 20))
    other = admitted.index("127.0.0.3")
    assert other - queued_at["127.0.0.3"] <= 1  # behind at most one of the flood's
    refused = [e for e in gate.events if e.rule_id == "builtin:sandbox-intake"]
    assert refused and all(str(e.reason) == "sandbox_limit" for e in refused)
    assert len(refused) + len(admitted) == flood + 1  # each one set up or refused
    assert all("wait to be set up" in e.detail for e in refused)


# --- a ClientHello later than the first bytes (hello_watch.py) ------------------------------

HELLO_RETRY = (
    bytes.fromhex("160303002c020000280303")
    + bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
    + bytes.fromhex("001301000000")
)
CCS = bytes.fromhex("140303000101")


@pytest.mark.parametrize(
    "second, allowed",
    [
        pytest.param(client_hello("allowed.test"), True, id="same-name"),
        pytest.param(client_hello("evil.test"), False, id="changed"),
    ],
)
def test_a_pipelined_second_hello_is_held_until_the_retry_then_decided(gate, second, allowed):
    got = bytearray()

    async def server(reader, writer):
        got.extend(await reader.readexactly(len(HELLO)))
        writer.write(HELLO_RETRY)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                got.extend(data)
                if len(got) == len(HELLO + CCS + second):
                    writer.write(b"done")
                    await writer.drain()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO + CCS + second)  # both hellos before the retry
            assert await reader.readexactly(len(HELLO_RETRY)) == HELLO_RETRY
            if allowed:
                assert await reader.readexactly(4) == b"done"
            else:
                with contextlib.suppress(ConnectionError):
                    assert await read_all(reader) in (b"", b"<reset>")
            writer.close()
            await until(lambda: gate.events and str(gate.events[-1].kind) == "connection_end")
            await door.stop()

    run(scenario())
    if allowed:
        assert bytes(got) == HELLO + CCS + second
        assert [e[0] for e in events(gate)] == ["connection", "connection_end"]
    else:
        assert bytes(got) in (HELLO, HELLO + CCS)  # never the second hello
        assert events(gate)[1] == (
            "connection",
            "spoofed_destination",
            "builtin:client-hello-changed",
            "evil.test",
            "tls",
        )


def test_a_retry_to_a_hello_after_an_answer_that_is_not_tls_is_watched(gate):
    # The server answers the first hello with no TLS; the client's second hello (the
    # same name) is allowed, the server sends a HelloRetryRequest to it: the third
    # hello must name the same server too.
    got = bytearray()
    third = client_hello("evil.test")

    async def server(reader, writer):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            got.extend(await reader.readexactly(len(HELLO)))
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            got.extend(await reader.readexactly(len(HELLO)))
            writer.write(HELLO_RETRY)
            await writer.drain()
            while data := await reader.read(65536):
                got.extend(data)

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, ALLOWED, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(HELLO)
            assert await reader.readexactly(28) == b"HTTP/1.1 400 Bad Request\r\n\r\n"
            writer.write(HELLO)
            assert await reader.readexactly(len(HELLO_RETRY)) == HELLO_RETRY
            writer.write(CCS + third)
            with contextlib.suppress(ConnectionError):
                await read_all(reader)
            writer.close()
            await until(lambda: gate.events and str(gate.events[-1].kind) == "connection_end")
            await door.stop()

    run(scenario())
    assert bytes(got) in (HELLO + HELLO, HELLO + HELLO + CCS)  # never the third hello
    assert events(gate)[1] == (
        "connection",
        "spoofed_destination",
        "builtin:client-hello-changed",
        "evil.test",
        "tls",
    )


def test_a_hello_after_a_preamble_on_a_raw_port_is_decided_before_it_goes(gate):
    got = bytearray()
    preamble = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # PostgreSQL's SSLRequest

    async def server(reader, writer):
        with contextlib.suppress(ConnectionError):
            got.extend(await reader.readexactly(len(preamble)))
            writer.write(b"S")
            await writer.drain()
            while data := await reader.read(65536):
                got.extend(data)

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(preamble)
            assert await reader.readexactly(1) == b"S"
            writer.write(client_hello("evil.test"))
            with contextlib.suppress(ConnectionError):
                await read_all(reader)
            writer.close()
            await until(lambda: gate.events and str(gate.events[-1].kind) == "connection_end")
            await door.stop()

    run(scenario())
    assert bytes(got) == preamble  # the hello never reached the server
    assert events(gate)[:2] == [
        ("connection", "rule_allow", "ssh", "ssh.allowed.test", "tcp"),
        ("connection", "no_rule", "default:fallback", "evil.test", "tls"),
    ]


def test_a_hello_after_starttls_on_a_server_first_port_is_decided_before_it_goes(gate):
    got = bytearray()

    async def server(reader, writer):
        with contextlib.suppress(ConnectionError):
            writer.write(b"220 smtp ready\r\n")
            await writer.drain()
            got.extend(await reader.readexactly(10))
            writer.write(b"220 go ahead\r\n")
            await writer.drain()
            while data := await reader.read(65536):
                got.extend(data)

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(gate, SSH, upstream.port, silence=0.05)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            assert await reader.readexactly(16) == b"220 smtp ready\r\n"  # allowed on silence
            writer.write(b"STARTTLS\r\n")
            assert await reader.readexactly(14) == b"220 go ahead\r\n"
            writer.write(client_hello("evil.test"))
            with contextlib.suppress(ConnectionError):
                await read_all(reader)
            writer.close()
            await until(lambda: gate.events and str(gate.events[-1].kind) == "connection_end")
            await door.stop()

    run(scenario())
    assert bytes(got) == b"STARTTLS\r\n"  # the hello never reached the server
    assert events(gate)[:2] == [
        ("connection", "rule_allow", "ssh", "ssh.allowed.test", "tcp"),
        ("connection", "no_rule", "default:fallback", "evil.test", "tls"),
    ]
