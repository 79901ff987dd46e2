"""The DNS filter's UDP intake (proxy/dns/server.py, `_UdpIntake`, `DnsFilter._take_in`):
a burst read at once, each sandbox's queries over its rate refused there with an event
each and never forwarded, the rest served round-robin over the sandboxes. On loopback:
127.0.0.2 and 127.0.0.3 play two sandboxes."""

from __future__ import annotations

import asyncio
import socket

import dns.message
import dns.rcode
import dns.rrset
from sandgate.proxy.dns import server as server_module
from sandgate.proxy.dns.server import DnsFilter
from sandgate.proxy.policy import Decision, Reason, Verdict
from sandgate.proxy.policy.model import Limits, Rule

FLOODER, HONEST = "127.0.0.2", "127.0.0.3"
FALLBACK = Rule(id="fallback", action=Verdict.DENY, file="rules.yaml", line=3)
ALLOWED = Rule(id="allowed", action=Verdict.ALLOW, file="rules.yaml", line=5)
SANDBOXES = {FLOODER: ("sbx-flood", "dev", "t-flood"), HONEST: ("sbx-honest", "dev", "t-honest")}


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _server(events: list, asked: list) -> DnsFilter:
    server = DnsFilter(
        decide_name=lambda profile, name: Decision(Verdict.ALLOW, Reason.RULE_ALLOW, "all"),
        sandbox_for=SANDBOXES.get,
        sink=type("Sink", (), {"emit": staticmethod(events.append)})(),
        upstreams=["192.0.2.1"],
        limits_for=lambda profile: Limits(dns_qps=3),
        clock=Clock(),  # stands still: no token comes back during the test
    )

    def ask_first(wire, on_reply):  # the order the queries were forwarded in
        asked.append(dns.message.from_wire(wire).question[0].name.to_text(omit_final_dot=True))
        asyncio.get_running_loop().call_soon(on_reply, OSError("test: no upstream"))

    async def ask_upstream(wire, first=None):  # what a failed first upstream goes on to
        assert first is not None, "every query is forwarded through ask_first first"
        return None, "test: no upstream"

    server._ask_first = ask_first
    server._ask_upstream = ask_upstream
    return server


def _client(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    return sock


def _replies(sock: socket.socket) -> list[dns.message.Message]:
    """What `sock` got until nothing more came for half a second."""
    replies = []
    sock.settimeout(0.5)
    try:
        while True:
            replies.append(dns.message.from_wire(sock.recv(4096)))
    except TimeoutError:
        return replies


def test_a_burst_is_refused_then_dropped_at_intake_and_the_other_sandbox_is_served_first():
    events, asked = [], []

    async def scenario():
        server = _server(events, asked)
        await server.start("127.0.0.1", 0)
        spawned = []
        spawn = server._spawn
        server._spawn = lambda coro: (spawned.append(1), spawn(coro))
        flooder, honest = _client(FLOODER), _client(HONEST)
        try:
            # All in the socket's queue before the server reads any: one read takes them.
            for i in range(20):
                query = dns.message.make_query(f"f{i}.example.com", "A").to_wire()
                flooder.sendto(query, ("127.0.0.1", server.port))
            honest.sendto(
                dns.message.make_query("h.example.com", "A").to_wire(), ("127.0.0.1", server.port)
            )
            for _ in range(200):
                if len(events) == 21:
                    break
                await asyncio.sleep(0.01)
            return (
                await asyncio.to_thread(_replies, flooder),
                await asyncio.to_thread(_replies, honest),
                len(spawned),
            )
        finally:
            flooder.close()
            honest.close()
            await server.stop()

    flood_replies, honest_replies, spawned = asyncio.run(scenario())
    # The flooder's three within its rate and the honest query were served, round-robin:
    # the honest one second, not behind the flooder's three.
    assert asked == ["f0.example.com", "h.example.com", "f1.example.com", "f2.example.com"]
    assert spawned == 4  # the 17 over the rate cost no task (the 4 a task each: no upstream)
    # Of the 17 over the rate, the first 3 (its dns_qps) got REFUSED, the rest nothing.
    rcodes = sorted(r.rcode() for r in flood_replies)
    assert rcodes == [dns.rcode.SERVFAIL] * 3 + [dns.rcode.REFUSED] * 3  # SERVFAIL: no upstream
    refused = [r for r in flood_replies if r.rcode() == dns.rcode.REFUSED]
    # Each REFUSED carries its question, so a stub takes it as the answer.
    assert sorted(str(r.question[0].name) for r in refused) == [
        f"f{i}.example.com." for i in range(3, 6)
    ]
    assert [r.rcode() for r in honest_replies] == [dns.rcode.SERVFAIL]  # no upstream here
    # One event per query, the refused ones too, named and attributed.
    assert len(events) == 21
    over = [e for e in events if e.reason is Reason.SANDBOX_LIMIT]
    assert len(over) == 17
    assert {(e.sandbox, e.task_id, e.verdict, e.rule_id) for e in over} == {
        ("sbx-flood", "t-flood", Verdict.DENY, "builtin:sandbox-dns-rate")
    }
    assert {e.name for e in over} == {f"f{i}.example.com" for i in range(3, 20)}
    assert [e.detail for e in over] == ["more than 3 DNS queries a second; A"] * 3 + [
        "more than 3 DNS queries a second; A; dropped, no reply: too many refused this second"
    ] * 14


def test_a_query_of_no_sandbox_is_refused_and_never_forwarded():
    events, asked = [], []

    async def scenario():
        server = _server(events, asked)
        await server.start("127.0.0.1", 0)
        stranger = _client("127.0.0.4")
        try:
            stranger.sendto(
                dns.message.make_query("x.example.com", "A").to_wire(), ("127.0.0.1", server.port)
            )
            return await asyncio.to_thread(_replies, stranger)
        finally:
            stranger.close()
            await server.stop()

    (reply,) = asyncio.run(scenario())
    assert reply.rcode() == dns.rcode.REFUSED and asked == []
    assert [e.reason for e in events] == [Reason.UNKNOWN_SANDBOX]


def test_a_free_udp_port_whose_tcp_twin_is_taken_is_passed_over(monkeypatch):
    """Port 0: the kernel's free UDP port may be the local end of one of the gateway's
    own upstream TCP connections (one ephemeral range). The start failed there,
    `address already in use`, and its stop then raised on the closed UDP socket."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    bound = server_module._bound_udp
    offered = []

    async def udp_on_the_taken_port_first(loop, host, _port):
        offered.append(host)
        return await bound(loop, host, port if len(offered) == 1 else 0)

    monkeypatch.setattr(server_module, "_bound_udp", udp_on_the_taken_port_first)

    async def scenario():
        server = _server([], [])
        await server.start("127.0.0.1", 0)
        try:
            return server.port
        finally:
            await server.stop()

    with taken:
        assert asyncio.run(scenario()) != port
    assert len(offered) == 2


def test_udp_answers_of_one_turn_go_out_after_their_events_taken_in_as_one_batch():
    """Every UDP answer made in one turn of the loop waits for the next: their events
    go to the sink in one batch (cheaper for the audit log, the journal, the chain),
    and only then do the replies leave, so no answer is ever out before its event is
    taken in (journaled)."""
    batches, early = [], []
    client = _client(HONEST)
    client.setblocking(False)

    class Sink:
        def emit(self, event):
            raise AssertionError("a UDP answer's event comes in a batch")

        def emit_batch(self, events):
            try:
                client.recv(4096)
                early.append("a reply was out before its event")
            except BlockingIOError:
                pass
            batches.append(events)

    server = DnsFilter(
        decide_name=lambda profile, name: Decision(Verdict.DENY, Reason.NO_RULE, FALLBACK),
        sandbox_for=SANDBOXES.get,
        sink=Sink(),
        upstreams=[],
        limits_for=lambda profile: Limits(dns_qps=100),
    )

    async def scenario():
        await server.start("127.0.0.1", 0)
        try:
            for i in range(10):  # in the socket's queue before the server reads: one read
                query = dns.message.make_query(f"d{i}.example.com", "A").to_wire()
                client.sendto(query, ("127.0.0.1", server.port))
            for _ in range(200):
                if sum(map(len, batches)) == 10:
                    break
                await asyncio.sleep(0.01)
            client.setblocking(True)
            return await asyncio.to_thread(_replies, client)
        finally:
            client.close()
            await server.stop()

    replies = asyncio.run(scenario())
    assert early == []
    assert [len(batch) for batch in batches] == [10]
    assert [e.name for e in batches[0]] == [f"d{i}.example.com" for i in range(10)]
    assert sorted(str(r.question[0].name) for r in replies) == sorted(
        f"d{i}.example.com." for i in range(10)
    )
    assert {r.rcode() for r in replies} == {dns.rcode.NXDOMAIN}


def test_a_query_that_comes_alone_is_answered_in_its_readers_pass_after_its_event():
    """A reader's pass that made one answer (the intake's, for a denied name; the
    upstream socket's, for an allowed one) sends it at the pass's end rather than at
    the loop's next turn (a turn more per query), and still only after its event is
    taken in."""
    order, deferred = [], []
    client = _client(HONEST)
    client.setblocking(False)

    class Sink:
        def emit_batch(self, events):
            try:
                client.recv(4096)
                order.append("a reply was out before its event")
            except BlockingIOError:
                pass
            order.extend(e.name for e in events)

    class Upstream(asyncio.DatagramProtocol):  # answers every A query with one address
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            response = dns.message.make_response(dns.message.from_wire(data))
            name = response.question[0].name
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "93.184.215.14"))
            self.transport.sendto(response.to_wire(), addr)

    def decide(profile, name):
        if name.startswith("allowed"):
            return Decision(Verdict.ALLOW, Reason.RULE_ALLOW, ALLOWED)
        return Decision(Verdict.DENY, Reason.NO_RULE, FALLBACK)

    async def scenario():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
        server = DnsFilter(
            decide_name=decide,
            sandbox_for=SANDBOXES.get,
            sink=Sink(),
            upstreams=["127.0.0.1"],
            upstream_port=transport.get_extra_info("sockname")[1],
            limits_for=lambda profile: Limits(dns_qps=100),
        )
        await server.start("127.0.0.1", 0)
        call_soon = loop.call_soon

        def recording(callback, *args, **kwargs):
            deferred.append(getattr(callback, "__name__", ""))
            return call_soon(callback, *args, **kwargs)

        loop.call_soon = recording
        replies = []
        try:
            for name in ("denied.example.com", "allowed.example.com"):
                client.sendto(
                    dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", server.port)
                )
                for _ in range(500):
                    try:
                        replies.append(dns.message.from_wire(client.recv(4096)))
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
        finally:
            loop.call_soon = call_soon
            client.close()
            await server.stop()
            transport.close()
        return replies

    replies = asyncio.run(scenario())
    assert [r.rcode() for r in replies] == [dns.rcode.NXDOMAIN, dns.rcode.NOERROR]
    assert [rrset.to_text() for rrset in replies[1].answer] == [
        "allowed.example.com. 60 IN A 93.184.215.14"
    ]
    assert order == ["denied.example.com", "allowed.example.com"]
    assert "_answer_held" not in deferred, deferred


def test_answers_held_for_the_next_turn_are_not_lost_when_the_filter_stops_first():
    """`stop` right after a query was answered (the run's teardown): the answer held
    for the loop's next turn still goes out, and its event reaches the sink, before
    the socket closes."""
    events = []
    server = DnsFilter(
        decide_name=lambda profile, name: Decision(Verdict.DENY, Reason.NO_RULE, FALLBACK),
        sandbox_for=SANDBOXES.get,
        sink=type("Sink", (), {"emit": staticmethod(events.append)})(),
        upstreams=[],
    )
    client = _client(HONEST)

    async def scenario():
        await server.start("127.0.0.1", 0)
        query = dns.message.make_query("gone.example.com", "A").to_wire()
        server._serve_udp(query, client.getsockname(), None)  # as the intake would
        await server.stop()  # before the loop turns again
        return list(events)

    try:
        seen_at_stop = asyncio.run(scenario())
        replies = _replies(client)
    finally:
        client.close()
    assert [(e.name, e.reason) for e in seen_at_stop] == [("gone.example.com", Reason.NO_RULE)]
    assert [r.rcode() for r in replies] == [dns.rcode.NXDOMAIN]
