"""The DNS filter over TCP (proxy/dns/server.py, `_TcpConnection`): RFC 7766 framing,
pipelined queries served at once and answered in order, and the connection's
bounds: queries in flight, a client that does not read, the idle timer, the
connection and query caps, the sandbox's rate and in-flight caps, a dropped or
failing query, `stop` with queries upstream; each query's event taken in before its
answer leaves. On loopback, against a UDP resolver of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import dns.message
import dns.rcode
import dns.rrset
from sandgate.proxy.dns import server as server_module
from sandgate.proxy.dns.server import TCP_PIPELINE, DnsFilter
from sandgate.proxy.policy import Decision, Reason, Verdict
from sandgate.proxy.policy.model import Limits, Rule

WHO = ("sbx-1", "dev", "t1")  # the sandbox at 127.0.0.1
FALLBACK = Rule(id="fallback", action=Verdict.DENY, file="rules.yaml", line=3)
OK = Rule(id="ok", action=Verdict.ALLOW, file="rules.yaml", line=4)
ADDRESS = "203.0.113.10"
HIGH_WATER = 64 * 1024  # asyncio's default for a transport's write buffer


def decide(profile: str, name: str) -> Decision:
    """Names starting with `ok` are allowed (forwarded), the rest denied (NXDOMAIN)."""
    if name.startswith("ok"):
        return Decision(Verdict.ALLOW, Reason.RULE_ALLOW, OK)
    return Decision(Verdict.DENY, Reason.NO_RULE, FALLBACK)


class Upstream(asyncio.DatagramProtocol):
    """A UDP resolver: answers each A query with ADDRESS after `delays[name]` seconds
    (None: never), and records the names asked."""

    def __init__(self, delays: dict):
        self.delays, self.asked = delays, []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text(omit_final_dot=True)
        self.asked.append(name)
        delay = self.delays.get(name, 0)
        if delay is not None:
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", ADDRESS))
            asyncio.get_running_loop().call_later(
                delay, self.transport.sendto, response.to_wire(), addr
            )


class Events:
    def __init__(self):
        self.events, self.batches = [], []

    def emit(self, event):
        self.events.append(event)

    def emit_batch(self, events):
        self.batches.append(list(events))
        self.events += events


@contextlib.asynccontextmanager
async def serving(sink=None, delays=None, **options):
    """A DnsFilter on 127.0.0.1 (the sandbox WHO) forwarding to an `Upstream`:
    (server, upstream). Stopped at the end unless the test stopped it."""
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(
        lambda: Upstream(delays or {}), local_addr=("127.0.0.1", 0)
    )
    server = DnsFilter(
        decide_name=decide,
        sandbox_for=options.pop("sandbox_for", {"127.0.0.1": WHO}.get),
        sink=sink if sink is not None else Events(),
        upstreams=["127.0.0.1"],
        upstream_port=transport.get_extra_info("sockname")[1],
        **{"timeout": 2, **options},
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server, upstream
    finally:
        await server.stop()
        transport.close()


def framed(name: str, qid: int) -> bytes:
    query = dns.message.make_query(name, "A")
    query.id = qid
    return query.to_wire(prepend_length=True)


async def answers(reader: asyncio.StreamReader, timeout: float = 3) -> list[dns.message.Message]:
    """Every answer until the gateway closes the connection."""
    replies = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                size = int.from_bytes(await reader.readexactly(2), "big")
            except asyncio.IncompleteReadError as e:
                assert e.partial == b""
                return replies
            replies.append(dns.message.from_wire(await reader.readexactly(size)))


async def ask(server: DnsFilter, *queries: bytes, half_close: bool = True):
    """Send `queries` in one write (closing our side after, if `half_close`): every
    answer until the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"".join(queries))
    if half_close:
        writer.write_eof()
    try:
        return await answers(reader)
    finally:
        writer.close()


def read_framed(sock: socket.socket, count: int) -> list[dns.message.Message]:
    """`count` answers from the blocking `sock`."""
    buffer, replies = b"", []
    while len(replies) < count:
        while len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
            data = sock.recv(4096)
            assert data, "closed early"
            buffer += data
        size = int.from_bytes(buffer[:2], "big")
        replies.append(dns.message.from_wire(buffer[2 : 2 + size]))
        buffer = buffer[2 + size :]
    return replies


def count_framed(data: bytes) -> int:
    """How many whole framed messages `data` starts with."""
    count = 0
    while len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
        data, count = data[2 + int.from_bytes(data[:2], "big") :], count + 1
    return count


def summary(replies) -> list[tuple[int, str]]:
    return [(r.id, dns.rcode.to_text(r.rcode())) for r in replies]


def test_pipelined_queries_are_served_at_once_and_answered_in_order():
    """Four queries in one write, the first slow upstream: the others are served
    meanwhile (their events first), but every answer leaves in the queries' order."""

    async def scenario():
        sink = Events()
        async with serving(sink, delays={"ok-slow.test": 0.3}) as (server, _):
            started = time.monotonic()
            names = ["ok-slow.test", "denied-1.test", "ok-fast.test", "denied-2.test"]
            replies = await ask(server, *(framed(n, i + 1) for i, n in enumerate(names)))
            return replies, time.monotonic() - started, [e.name for e in sink.events]

    replies, seconds, named = asyncio.run(scenario())
    assert summary(replies) == [(1, "NOERROR"), (2, "NXDOMAIN"), (3, "NOERROR"), (4, "NXDOMAIN")]
    assert seconds < 0.55  # one upstream wait, not a wait per query
    assert sorted(named[:3]) == ["denied-1.test", "denied-2.test", "ok-fast.test"]
    assert named[3] == "ok-slow.test"


def test_no_tcp_answer_leaves_before_its_event_is_taken_in():
    """As over UDP: a turn's events go to the sink as one batch, and only then do the
    answers leave."""
    early = []
    client = None  # the test's connection, read (non-blocking) in the sink

    class Sink(Events):
        def emit(self, event):
            raise AssertionError("a TCP answer's event comes in a batch")

        def emit_batch(self, events):
            try:  # the answers out so far: none of these events' may be among them
                out = count_framed(client.recv(65536, socket.MSG_PEEK))
            except BlockingIOError:
                out = 0
            if out > len(self.events):
                early.append(f"{out} answers out, {len(self.events)} events taken in")
            super().emit_batch(events)

    async def scenario():
        nonlocal client
        sink = Sink()
        async with serving(sink) as (server, _):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.setblocking(False)
            loop = asyncio.get_running_loop()
            names = ["denied-1.test", "denied-2.test", "ok.test", "denied-3.test"]
            await loop.sock_sendall(client, b"".join(framed(n, i) for i, n in enumerate(names)))
            for _ in range(200):
                if len(sink.events) == 4:
                    break
                await asyncio.sleep(0.01)
            client.setblocking(True)
            client.settimeout(2)
            replies = await asyncio.to_thread(read_framed, client, 4)
            client.close()
            return sink.batches, replies

    batches, replies = asyncio.run(scenario())
    assert summary(replies) == [(0, "NXDOMAIN"), (1, "NXDOMAIN"), (2, "NOERROR"), (3, "NXDOMAIN")]
    assert early == []
    assert sum(map(len, batches)) == 4 and len(batches) == 2  # the denied ones, then ok.test


def test_a_client_that_does_not_read_stops_being_read():
    """A client that sends queries as fast as it can and reads no answer: once the
    gateway's write buffer is over its high-water mark the connection is not read,
    so the gateway holds at most that buffer, a read's worth of queries and
    TCP_PIPELINE answers; the client's sends block."""
    made = server_module._TcpConnection.connection_made

    def small_buffers(self, transport):  # so that the kernel's buffers fill at once
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        made(self, transport)

    # Denied names of ~200 bytes: each answer (NXDOMAIN, the question echoed) as big.
    long_name = ".".join(["d" * 60] * 3) + ".test"
    chunk = b"".join(framed(long_name, i) for i in range(16))
    limit = 4 << 20

    def flood(port: int) -> int:
        sent = 0
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.settimeout(0.5)
            try:
                while sent < limit:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except TimeoutError:
                pass
            held = held_by_the_gateway()
            time.sleep(0.2)
            return sent, held, held_by_the_gateway()

    server = None

    def held_by_the_gateway():
        (connection,) = server._tcp_connections
        return (
            connection.transport.get_write_buffer_size(),
            len(connection.buffer),
            len(connection.queue),
            connection.taken,
            connection.transport.is_reading(),
        )

    async def scenario():
        nonlocal server
        server_module._TcpConnection.connection_made = small_buffers
        try:
            async with serving(max_tcp_queries=10**9) as (server, _):
                return await asyncio.to_thread(flood, server.port)
        finally:
            server_module._TcpConnection.connection_made = made

    sent, (written, buffered, queued, taken, reading), later = asyncio.run(scenario())
    assert sent < limit // 4, sent
    assert not reading
    assert written <= HIGH_WATER + TCP_PIPELINE * len(chunk) // 16
    assert buffered <= 256 * 1024 + 65537 and queued <= TCP_PIPELINE
    assert later[3] == taken  # nothing more was taken in


def test_an_idle_connection_closes_and_a_trickle_of_bytes_does_not_keep_it():
    """No query for `tcp_idle_timeout`: closed, whether the client sends nothing, or
    a message a byte at a time; an answered connection closes that long after its
    answer. One timer a connection: re-armed when it fires early, not per read."""
    armed = []

    async def scenario():
        loop = asyncio.get_running_loop()
        call_at = loop.call_at

        def counting(when, callback, *args, **kw):
            if getattr(callback, "__name__", "") == "_idle":
                armed.append(when)
            return call_at(when, callback, *args, **kw)

        loop.call_at = counting
        async with serving(tcp_idle_timeout=0.3) as (server, _):
            closed_after = {}

            async def trickle():
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                started = time.monotonic()
                for byte in framed("denied.test", 1):
                    if reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(1), 0.1)
                    if reader.at_eof():
                        break
                closed_after["trickle"] = (time.monotonic() - started, reader.at_eof())
                writer.close()

            async def answered():
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                for i in range(20):  # within the idle timeout: one timer
                    writer.write(framed("denied.test", i))
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    await reader.readexactly(size)
                answered_at = time.monotonic()
                assert await asyncio.wait_for(reader.read(1), 2) == b""
                closed_after["answered"] = time.monotonic() - answered_at
                writer.close()

            await asyncio.gather(trickle(), answered())
            return closed_after

    closed_after = asyncio.run(scenario())
    seconds, eof = closed_after["trickle"]
    assert eof and 0.25 <= seconds < 0.8, closed_after
    assert 0.25 <= closed_after["answered"] < 0.8, closed_after
    assert len(armed) <= 6, armed  # two connections: one timer each, re-armed a few times


SANDBOXES = {
    "127.0.0.1": WHO,
    "127.0.0.2": ("sbx-2", "dev", "t2"),
    "127.0.0.3": ("sbx-3", "dev", "t3"),
}


async def held_open(server: DnsFilter, source: str, qid: int):
    """A connection from `source` that asked one query: (reader, writer) if it was
    answered and stays open, else None (closed unanswered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))
    writer.write(framed("denied.test", qid))
    replies = await asyncio.wait_for(reader.read(4096), 3)
    if not replies:
        writer.close()
        return None
    assert summary([dns.message.from_wire(replies[2:])]) == [(qid, "NXDOMAIN")]
    return reader, writer


def test_a_sandbox_holds_no_more_tcp_connections_than_are_free():
    """Of `max_tcp_connections` (6), a sandbox that keeps its connections open gets
    no more than are still free (3: `limits.fair_share`), so a second one still
    connects (2 of the 3 left), and a third (the last). Each refused connection is
    closed unanswered with its event; its own closed make room for a sandbox again."""

    async def scenario():
        sink = Events()
        async with serving(sink, max_tcp_connections=6, sandbox_for=SANDBOXES.get) as (server, _):
            greedy = [await held_open(server, "127.0.0.1", i) for i in range(5)]
            second = [await held_open(server, "127.0.0.2", 10 + i) for i in range(3)]
            third = [await held_open(server, "127.0.0.3", 20 + i) for i in range(2)]
            full = await held_open(server, "127.0.0.1", 30)
            greedy[0][1].close()
            greedy[1][1].close()
            await asyncio.sleep(0.05)
            again = await held_open(server, "127.0.0.1", 31)
            for held in [*greedy[2:], *second, *third, again]:
                if held:
                    held[1].close()
            groups = [[h is not None for h in group] for group in (greedy, second, third)]
            return groups, full, again, sink

    (greedy, second, third), full, again, sink = asyncio.run(scenario())
    assert greedy == [True, True, True, False, False]
    assert second == [True, True, False]
    assert third == [True, False]  # the last place: only a sandbox holding none takes it
    assert full is None  # none free now, for anyone
    assert again is not None  # two of its own closed: 1 held, 2 free
    refused = [e for e in sink.events if e.rule_id == "builtin:sandbox-dns-tcp-share"]
    assert [(e.reason, e.sandbox, e.task_id) for e in refused] == [
        (Reason.SANDBOX_LIMIT, "sbx-1", "t1"),
        (Reason.SANDBOX_LIMIT, "sbx-1", "t1"),
        (Reason.SANDBOX_LIMIT, "sbx-2", "t2"),
        (Reason.SANDBOX_LIMIT, "sbx-3", "t3"),
        (Reason.SANDBOX_LIMIT, "sbx-1", "t1"),
    ]
    assert "holds 3 DNS-over-TCP connections" in refused[0].detail
    assert refused[-1].detail == "the DNS filter serves 6 TCP connections at once, all held"


def test_when_every_tcp_place_is_held_a_new_connection_is_refused_with_its_event():
    """Three sandboxes holding one each of 3: none is free, and a stranger's
    connection is refused too (its event names no sandbox)."""

    async def scenario():
        sink = Events()
        async with serving(sink, max_tcp_connections=3, sandbox_for=SANDBOXES.get) as (server, _):
            held = [await held_open(server, f"127.0.0.{i + 1}", i) for i in range(3)]
            stranger = await held_open(server, "127.0.0.4", 9)
            for h in held:
                if h:
                    h[1].close()
            return [h is not None for h in held], stranger, sink

    held, stranger, sink = asyncio.run(scenario())
    assert held == [True, True, True]
    assert stranger is None
    refused = [e for e in sink.events if e.rule_id == "builtin:sandbox-dns-tcp-share"]
    assert [(e.sandbox, e.source.startswith("127.0.0.4:")) for e in refused] == [(None, True)]
    assert refused[0].detail == "the DNS filter serves 3 TCP connections at once, all held"


def test_a_refusal_whose_event_fails_still_refuses():
    """`sandbox_for` raising while a refusal's event is made: the connection is closed
    all the same (asyncio would have left it open, its queries served), and the
    filter goes on serving the one it admitted."""

    def sandbox_for(ip):
        if ip == "127.0.0.2":
            raise RuntimeError("registry broken")
        return WHO

    async def scenario():
        async with serving(max_tcp_connections=1, sandbox_for=sandbox_for) as (server, _):
            first = await held_open(server, "127.0.0.1", 1)
            refused = await held_open(server, "127.0.0.2", 2)
            first[1].write(framed("denied.test", 3))
            still = await asyncio.wait_for(first[0].read(4096), 3)
            first[1].close()
            return refused, still

    refused, still = asyncio.run(scenario())
    assert refused is None
    assert summary([dns.message.from_wire(still[2:])]) == [(3, "NXDOMAIN")]


def test_the_tcp_listener_queues_as_many_connections_as_the_front_door():
    """asyncio listens with a backlog of 100 unless told: a burst of SYNs past it
    would wait a second's retransmission. Its bound is TCP_BACKLOG (tcp_info's
    tcpi_sacked on a listener: sk_max_ack_backlog)."""

    async def scenario():
        async with serving() as (server, _):
            sock = server._tcp.sockets[0]
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
            return int.from_bytes(info[28:32], "little")

    assert asyncio.run(scenario()) == server_module.TCP_BACKLOG == 1024


def test_queries_per_connection_are_capped_and_a_dropped_query_ends_the_connection():
    """`max_tcp_queries`: the connection closes once that many are answered, what
    came after unread. A dropped query (a 1-byte message) ends it after the answers
    before it; every query taken in has its event."""

    async def scenario():
        sink = Events()
        async with serving(sink, max_tcp_queries=3) as (server, _):
            queries = (framed("denied.test", i) for i in range(5))
            capped = await ask(server, *queries, half_close=False)  # the gateway ends it
            taken = len(sink.events)
            dropped = await ask(
                server, framed("denied.test", 7), b"\x00\x01\xbe", framed("denied.test", 8)
            )
            return capped, taken, dropped, [e.reason for e in sink.events[taken:]]

    capped, taken, dropped, reasons = asyncio.run(scenario())
    assert summary(capped) == [(0, "NXDOMAIN"), (1, "NXDOMAIN"), (2, "NXDOMAIN")]
    assert taken == 3
    assert summary(dropped) == [(7, "NXDOMAIN")]
    assert sorted(reasons) == sorted([Reason.NO_RULE, Reason.DNS_MALFORMED, Reason.NO_RULE])


def test_the_sandboxs_rate_and_in_flight_caps_hold_over_tcp():
    """`dns_qps`, its token taken as the query is read: past it REFUSED, each with its
    event; every one over TCP (as before), and without using up the sandbox's
    refusals of datagrams: its stub's next UDP query is still REFUSED, not dropped
    unanswered. `max_pending_per_sandbox`: a query past it is SERVFAIL."""

    class Clock:  # stands still: no token comes back during the test
        def __call__(self):
            return 100.0

    async def scenario():
        sink = Events()
        limits = {"limits_for": lambda profile: Limits(dns_qps=3), "clock": Clock()}
        async with serving(sink, **limits) as (server, _):
            rated = await ask(server, *(framed("denied.test", i) for i in range(8)))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(1)
                udp.sendto(framed("denied.test", 9)[2:], ("127.0.0.1", server.port))
                datagram = await asyncio.to_thread(udp.recv, 512)
            rate_events = list(sink.events)
        sink = Events()
        async with serving(sink, delays={"ok-slow.test": 0.2}, max_pending_per_sandbox=1) as (
            server,
            _,
        ):
            pending = await ask(server, framed("ok-slow.test", 1), framed("ok-b.test", 2))
        return rated, dns.message.from_wire(datagram), rate_events, pending, sink.events

    rated, datagram, rate_events, pending, pending_events = asyncio.run(scenario())
    assert [rcode for _, rcode in summary(rated)] == ["NXDOMAIN"] * 3 + ["REFUSED"] * 5
    assert datagram.rcode() == dns.rcode.REFUSED
    assert [e.reason for e in rate_events] == [Reason.NO_RULE] * 3 + [Reason.SANDBOX_LIMIT] * 6
    assert not any("dropped" in e.detail for e in rate_events)
    assert summary(pending) == [(1, "NOERROR"), (2, "SERVFAIL")]
    (limited,) = [e for e in pending_events if e.name == "ok-b.test"]
    assert limited.rule_id == "builtin:sandbox-dns-pending"


def test_a_failing_query_is_its_servfail_and_the_connection_goes_on():
    """A bug while taking a query in (here the registry raising) is that query's
    SERVFAIL and INTERNAL_ERROR event; the next query on the connection is served."""
    calls = []

    def flaky(ip):
        calls.append(ip)
        if len(calls) == 1:
            raise RuntimeError("registry bug")
        return WHO

    async def scenario():
        sink = Events()
        async with serving(sink) as (server, _):
            server.sandbox_for = flaky
            replies = await ask(server, framed("denied.test", 1), framed("denied.test", 2))
            return replies, [e.reason for e in sink.events]

    replies, reasons = asyncio.run(scenario())
    assert summary(replies) == [(1, "SERVFAIL"), (2, "NXDOMAIN")]
    assert reasons == [Reason.INTERNAL_ERROR, Reason.NO_RULE]


def test_stop_with_queries_upstream_closes_promptly_and_loses_no_event():
    """`stop` while queries wait for an upstream that never answers: the connections
    close at once (not after the upstream's timeout), and every query taken in has
    its event: those still upstream say the filter stopped."""

    async def scenario():
        sink = Events()
        async with serving(sink, delays={"ok-a.test": None, "ok-b.test": None}, timeout=5) as (
            server,
            upstream,
        ):
            first = await asyncio.open_connection("127.0.0.1", server.port)
            second = await asyncio.open_connection("127.0.0.1", server.port)
            first[1].write(framed("ok-a.test", 1) + framed("denied.test", 2))
            second[1].write(framed("ok-b.test", 3))
            for _ in range(200):
                if len(upstream.asked) == 2 and sink.events:
                    break
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await asyncio.wait_for(server.stop(), 2)
            stopped_in = time.monotonic() - started
            got = [await answers(reader) for reader, _ in (first, second)]
            for _, writer in (first, second):
                writer.close()
            return sink.events, stopped_in, got

    events, stopped_in, got = asyncio.run(scenario())
    assert stopped_in < 0.5
    assert got == [[], []]  # the denied answer waited behind ok-a's: no answer leaves
    assert sorted((e.name, e.reason) for e in events) == [
        ("denied.test", Reason.NO_RULE),
        ("ok-a.test", Reason.DNS_UPSTREAM_FAILURE),
        ("ok-b.test", Reason.DNS_UPSTREAM_FAILURE),
    ]
    assert all("stopped" in e.detail for e in events if e.name.startswith("ok"))
