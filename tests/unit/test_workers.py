"""`sandgate gateway --workers N`: the event wire form, the worker link, and a pool of
two real worker processes on loopback (DNS only: no sandbox network, no nftables)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import dns.message
import dns.rcode
import pytest
from sandgate.enforcer import nft
from sandgate.enforcer.workers import PIN_ENV, WorkerPool, WorkerProcess, room_for_a_burst
from sandgate.proxy.policy import load_policy
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.telemetry.audit import audit_members
from sandgate.proxy.telemetry.event import FIELD_BOUNDS, FIELDS, EncodedEvent, Event, EventKind
from sandgate.proxy.telemetry.summary import row_destination
from sandgate.proxy.ticks import next_tick
from sandgate.proxy.worker_link import Link, LinkClosed

FULL = Event(
    kind=EventKind.CONNECTION_END,
    verdict=Verdict.ALLOW,
    reason=Reason.RULE_ALLOW,
    rule_id="web",
    rule_origin="rules.yaml:4",
    detail='a "quoted"\nline',
    time=1700000000.25,
    policy_hash="abc",
    task_id="t1",
    sandbox="10.0.0.2",
    profile="default",
    source="10.0.0.2:5000",
    dst_ip="203.0.113.10",
    dst_port=443,
    name="allowed.test",
    protocol="tls",
    bytes_up=10,
    bytes_down=20,
    duration=1.5,
    latency=0.001,
    suppressed=3,
    first_time=1699999999.0,
)


def _encoded(event: Event) -> EncodedEvent:
    """`event` as a worker sends it (proxy/worker.py, EventBatcher)."""
    return EncodedEvent(
        audit_members(event), event.task_id, event.sandbox, event.kind,
        event.verdict, event.reason, event.rule_id, row_destination(event),
    )  # fmt: skip


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(FULL, id="every-field"),
        pytest.param(
            Event(kind=EventKind.DNS, verdict=Verdict.DENY, reason=Reason.NO_RULE), id="bare"
        ),
        pytest.param(FULL.with_fields(path="/" + "x" * 5000), id="cut-path"),
    ],
)
def test_an_event_survives_the_wire_form(event):
    back = _encoded(event).decoded()
    assert back == event
    assert type(back.kind) is EventKind and type(back.reason) is Reason


def test_a_bad_wire_event_is_an_error_not_an_event():
    row = ["t1", "10.0.0.2", "connection", "allow", "no_such_reason", "web", None]
    with pytest.raises(ValueError, match="no_such_reason"):
        EncodedEvent(b'"kind":"connection"', *row)
    # Members that are no whole event, or no JSON: decoding them says so.
    good_row = [*row[:4], "rule_allow", "web", None]
    for members in (b'"kind":"connection"', b'"kind":', b"1]"):
        with pytest.raises(ValueError):
            EncodedEvent(members, *good_row).decoded()
    values = [getattr(FULL, name) for name in FIELDS]
    with pytest.raises(ValueError, match="fields"):
        Event.from_values(values[:-1])
    long = Event.from_values([*values[:5], "d" * 9000, *values[6:]])
    assert len(long.detail) < FIELD_BOUNDS["detail"] + 30  # bounded on the way in too


async def _linked(handle_a, handle_b):
    a, b = socket.socketpair()
    left, right = await Link.over(a, handle_a), await Link.over(b, handle_b)
    tasks = [asyncio.create_task(left.run()), asyncio.create_task(right.run())]
    return left, right, tasks


def test_the_link_answers_requests_and_keeps_notifications_in_order():
    async def main():
        seen = []

        def worker_side(message):
            if "id" not in message:
                seen.append(message["n"])
                return None

            async def answer():
                if message["op"] == "fail":
                    raise ValueError("no such thing")
                await asyncio.sleep(0.01)
                return {"echo": message["x"]}

            return answer()

        service, worker, tasks = await _linked(lambda m: None, worker_side)
        for n in range(100):
            service.send({"op": "note", "n": n})
        replies = await asyncio.gather(*(service.request("echo", x=i) for i in range(5)))
        assert [r["echo"] for r in replies] == list(range(5))
        with pytest.raises(RuntimeError, match="ValueError: no such thing"):
            await service.request("fail")
        assert seen == list(range(100))
        # The other side goes away: a request still waiting fails, it does not hang.
        hanging = asyncio.create_task(service.request("echo", x=1, timeout=5))
        worker.close()
        with pytest.raises(LinkClosed):
            await hanging
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_link_read_on_a_clock_takes_notifications_at_its_ticks_and_replies_at_once():
    """The service's end (`read_every`): after a read it rests until the next tick,
    and what was sent meanwhile is handled then, in order; a reply is read as it
    comes; woken (a worker died), it reads at once what was sent before the end."""
    period = 0.3

    async def main():
        loop = asyncio.get_running_loop()
        seen: list[tuple[int, float]] = []

        def worker_side(message):
            async def answer():
                return {"echo": message["x"]}

            return answer()

        a, b = socket.socketpair()
        service = await Link.over(a, lambda m: seen.append((m["n"], loop.time())), period)
        worker = await Link.over(b, worker_side)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(worker.run())]

        async def note(n: int) -> None:
            worker.send({"op": "note", "n": n})
            await asyncio.sleep(0.01)

        async def just_past_a_tick() -> float:
            tick = next_tick(loop.time(), period)
            await asyncio.sleep(tick - loop.time() + 0.01)
            return tick

        tick = await just_past_a_tick()
        await note(0)  # read at once; then the link rests until the next tick
        for n in range(1, 6):
            await note(n)
        await asyncio.sleep(tick + period - 0.05 - loop.time())
        assert [n for n, _ in seen] == [0]
        while len(seen) < 6:
            await asyncio.sleep(0.005)
        assert [n for n, _ in seen] == list(range(6))
        assert all(at >= tick + period for _, at in seen[1:])
        # Resting again (it read at that tick): a reply does not wait for the next one.
        began = loop.time()
        assert (await service.request("echo", x=7))["echo"] == 7
        assert loop.time() - began < period / 3
        # Sent, then gone, while the link rests: read at once when woken.
        await just_past_a_tick()
        await note(7)  # read at once (nothing came since the reply): rests from here
        await note(8)
        worker.close()
        gone = loop.time()
        service.wake()
        await asyncio.wait_for(asyncio.gather(*tasks), period)
        assert [n for n, _ in seen[-2:]] == [7, 8] and seen[-1][1] - gone < period / 3

    asyncio.run(main())


def test_a_link_read_on_a_clock_takes_all_that_was_sent_at_one_tick_not_one_read():
    """Megabytes of batches sent while the link rests (a busy worker's 100 ms) are
    all taken at the next tick: not one recv's worth per tick, which would let the
    backlog grow without end."""
    period = 0.3
    payload = b"x" * 60_000

    async def main():
        loop = asyncio.get_running_loop()
        seen: list[float] = []
        a, b = socket.socketpair()
        room_for_a_burst(b)  # as the pool gives a worker's end of its link
        service = await Link.over(a, lambda m: seen.append(loop.time()), period)
        worker = await Link.over(b, lambda m: None)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(worker.run())]
        tick = next_tick(loop.time(), period)
        await asyncio.sleep(tick - loop.time() + 0.01)
        worker.send({"op": "events"}, payload)  # read at once: the link rests from here
        while not seen:
            await asyncio.sleep(0.005)
        for _ in range(50):  # 3 MB, over ten asyncio reads
            worker.send({"op": "events"}, payload)
        await asyncio.sleep(tick + period - loop.time() + 0.1)  # just past the next tick
        assert len(seen) == 51, f"{len(seen) - 1} of 50 batches taken at the tick"
        assert all(at >= tick + period for at in seen[1:])
        worker.close()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_the_guard_table_covers_every_workers_ports():
    text = nft.render_guard("sandgatesvc", [40000, 40002], [40001, 40003])
    assert "tcp dport { 40000, 40002, 40001, 40003 } counter drop" in text
    assert "udp dport { 40001, 40003 } counter drop" in text
    with pytest.raises(ValueError):
        nft.render_guard("sandgatesvc", [40000], [40001, 40003])


def test_the_bench_pin_puts_every_sandbox_on_one_worker_and_is_off_by_default(monkeypatch):
    pool = WorkerPool(2, {"confdir": "/nonexistent"}, None, lambda event: None)
    pool.workers += [WorkerProcess(i, None) for i in range(2)]
    monkeypatch.delenv(PIN_ENV, raising=False)
    assert [pool.assign() for _ in range(4)] == [0, 1, 0, 1]  # the fewest first
    monkeypatch.setenv(PIN_ENV, "1")
    assert [pool.assign() for _ in range(3)] == [1, 1, 1]
    assert [w.assigned for w in pool.workers] == [2, 5]
    monkeypatch.setenv(PIN_ENV, "7")  # no such worker: ignored
    assert pool.assign() == 0


PLAIN = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: web
"""


def _ask_dns(port: int, name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", port))
        return dns.message.from_wire(sock.recv(4096)).rcode()


def test_two_workers_serve_their_sandboxes_send_events_back_and_come_back_after_a_kill(tmp_path):
    """Loopback stands for a sandbox: registered with worker 0, its DNS to worker 0's
    port is decided there (a denied name: no upstream needed) and the event reaches the
    service's sink with its task; after SIGKILL the new worker answers on the same port."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(PLAIN)
    events: list[Event] = []
    tallies: list[list] = []
    restarted = []
    restarting = []

    async def main():
        pool = WorkerPool(
            2,
            {"dns_upstreams": ["127.0.0.1"], "confdir": str(tmp_path)},
            load_policy([rules]),
            # the workers' events come encoded; the pool's own (a reload) as they are
            lambda e: events.append(e.decoded() if isinstance(e, EncodedEvent) else e),
            tally=tallies.extend,
            restarting=lambda: restarting.append(1),
            listen_host="127.0.0.1",
        )
        pool.on_restart = lambda worker, pid, how: restarted.append((worker.index, pid, how))
        await pool.start()
        try:
            index = pool.assign()
            assert index == 0 and pool.assign() == 1  # the fewest first
            await pool.add_sandbox(index, Sandbox("127.0.0.1", "task-1", "default"))
            proxy_port, dns_port = pool.ports(0)
            assert pool.ports(1) != (proxy_port, dns_port)
            rcode = await asyncio.to_thread(_ask_dns, dns_port, "denied.test")
            assert rcode == dns.rcode.NXDOMAIN
            # From worker 1, which does not know the address: an unknown sandbox.
            rcode = await asyncio.to_thread(_ask_dns, pool.ports(1)[1], "denied.test")
            assert rcode == dns.rcode.REFUSED
            await _until(lambda: len(events) >= 2)
            by_reason = {e.reason: e for e in events}
            assert by_reason[Reason.NO_RULE].task_id == "task-1"
            assert by_reason[Reason.NO_RULE].policy_hash == pool.policy.hash
            assert Reason.UNKNOWN_SANDBOX in by_reason
            # Their metrics came counted: one DNS query each, with its latency.
            counted = {(row[2], row[7]) for row in tallies if row[0] == "dns"}
            assert counted == {("no_rule", 1), ("unknown_sandbox", 1)}
            assert all(row[9] for row in tallies)
            # Stats come every second, summed over workers.
            await _until(lambda: all(w.stats for w in pool.workers), timeout=5)
            assert pool.gate.counts.open == 0 and len(pool.gate.connections) == 0

            victim = pool.workers[0].pid
            # Its last stats say it holds 7 connections (stopped: no newer push comes).
            os.kill(victim, signal.SIGSTOP)
            await asyncio.sleep(0.3)
            pool.workers[0].stats = {**pool.workers[0].stats, "connections": 7, "open": 7}
            os.kill(victim, signal.SIGKILL)
            await _until(lambda: restarted, timeout=20)
            assert restarted == [(0, victim, "signal SIGKILL")] and restarting == [1]
            # They died with it: the gauges do not count them until the new one's first push.
            assert len(pool.gate.connections) == 0 and pool.gate.counts.open == 0
            assert pool.workers[0].pid != victim and pool.workers[0].restarts == 1
            assert pool.workers[1].restarts == 0
            events.clear()
            rcode = await asyncio.to_thread(_ask_dns, dns_port, "denied.test")
            assert rcode == dns.rcode.NXDOMAIN  # the same port, the sandbox taken back
            await _until(lambda: events)
            assert events[0].task_id == "task-1" and events[0].reason is Reason.NO_RULE

            # A reload reaches every worker, and each reports the service's hash.
            rules.write_text(PLAIN.replace("allowed.test", "other.test"))
            new = load_policy([rules])
            pool.swap_policy(new)
            report = await pool.pushing
            assert [(w["ok"], w["policy"]) for w in report] == [(True, new.hash)] * 2
        finally:
            pids = [w.pid for w in pool.workers]
            await pool.stop()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    asyncio.run(main())


@pytest.mark.parametrize(
    "rule_file",
    [
        pytest.param("broken", id="the-rule-file-broken"),
        pytest.param("edited", id="a-valid-edit-not-reloaded"),
        pytest.param("intact", id="the-rule-file-intact"),
    ],
)
def test_a_restarted_worker_serves_the_services_policy_to_its_sandboxes_from_its_first_read(
    tmp_path, rule_file
):
    """A worker killed while the rule file on disk is broken (or edited and not
    reloaded) comes back with the policy the service enforces: it compiled the files
    itself, and could not start while they were broken (its sandboxes cut off until
    they were fixed) or took the edit. A DNS query its sandbox sent while it was down
    (it waited in the socket the service keeps) is decided under the sandbox's task:
    the new worker served its socket before the service registered the sandbox with
    it, and such a query was REFUSED as a stranger's (`unknown_sandbox`, no task).
    While it is down, the status shows it serving no policy."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(PLAIN)
    events: list[Event] = []
    restarted = []

    async def main():
        pool = WorkerPool(
            2,
            {"dns_upstreams": ["127.0.0.1"], "confdir": str(tmp_path)},
            load_policy([rules]),
            lambda e: events.append(e.decoded() if isinstance(e, EncodedEvent) else e),
            listen_host="127.0.0.1",
        )
        pool.on_restart = lambda worker, pid, how: restarted.append(worker.pid)
        await pool.start()
        try:
            await pool.add_sandbox(0, Sandbox("127.0.0.1", "task-1", "default"))
            dns_port = pool.ports(0)[1]
            assert await asyncio.to_thread(_ask_dns, dns_port, "allowed.test") in (
                dns.rcode.NOERROR,
                dns.rcode.SERVFAIL,  # no upstream here: allowed, then not answered
            )
            if rule_file == "broken":
                rules.write_text(PLAIN + "      - allow: [\n")
            elif rule_file == "edited":
                rules.write_text(PLAIN.replace("allowed.test", "denied.test"))
            victim = pool.workers[0].pid
            os.kill(victim, signal.SIGSTOP)
            await asyncio.sleep(0.1)
            events.clear()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(20)
                query = dns.message.make_query("denied.test", "A")
                sock.sendto(query.to_wire(), ("127.0.0.1", dns_port))  # waits in the socket
                os.kill(victim, signal.SIGKILL)
                await _until(lambda: not pool.workers[0].up.is_set())
                described = pool.describe()[0]
                assert (described["pid"], described["policy"]) == (None, None)
                answer = dns.message.from_wire(await asyncio.to_thread(sock.recv, 4096))
            await _until(lambda: restarted, timeout=20)
            assert answer.rcode() == dns.rcode.NXDOMAIN  # decided: the sandbox's, denied
            assert pool.workers[0].policy == pool.policy.hash
            assert pool.describe()[0]["policy"] == pool.policy.hash
            await _until(lambda: _dns_events(events, "denied.test"))
            decided = _dns_events(events, "denied.test")
            assert [(e.reason, e.task_id) for e in decided] == [(Reason.NO_RULE, "task-1")]
            assert decided[0].policy_hash == pool.policy.hash
            assert not [e for e in events if e.reason is Reason.UNKNOWN_SANDBOX]
            # allowed.test is still allowed: the service's policy, not the file's edit
            rcode = await asyncio.to_thread(_ask_dns, dns_port, "allowed.test")
            assert rcode in (dns.rcode.NOERROR, dns.rcode.SERVFAIL)
            await _until(lambda: _dns_events(events, "allowed.test"))
            # (allowed, so asked upstream, where nothing answers here)
            reasons = {e.reason for e in _dns_events(events, "allowed.test")}
            assert reasons == {Reason.DNS_UPSTREAM_FAILURE}, reasons
        finally:
            await pool.stop()

    asyncio.run(main())


def _dns_events(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e.kind is EventKind.DNS and (e.name or "").rstrip(".") == name]


async def _until(probe, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
