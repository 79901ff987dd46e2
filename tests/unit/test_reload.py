"""Hot reload: `Gateway.swap_policy` and `PolicyReloader`, on a real Gateway (its
gate, bindings and events; mitmproxy and DNS are not started) and real loopback
sockets through front doors, as in test_frontdoor.py: the original destination is
injected and the relay connects to a fake upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from sandgate.proxy.frontdoor.door import FrontDoor
from sandgate.proxy.gate import Outcome
from sandgate.proxy.gateway import Gateway, GatewayConfig
from sandgate.proxy.policy import PolicyError, load_policy
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.reload import PolicyReloader
from support.fakes import GATE_BINDINGS, GATE_RULES, client_hello

LOOPBACK = "127.0.0.1"
TLS_DST = ("203.0.113.10", 443)  # allowed.test, by its SNI
SSH_DST = ("203.0.113.10", 22)  # ssh.allowed.test, by the sandbox's DNS binding
# The same rules, but allowed.test is denied now.
REVOKING_RULES = GATE_RULES.replace(
    "      - allow: allowed.test\n        id: allowed\n",
    "      - deny: allowed.test\n        id: revoked\n",
)


class Events(list):
    def emit(self, event) -> None:
        self.append(event)

    def of(self, reason: str) -> list:
        return [e for e in self if e.reason == reason]


def make_gateway(tmp_path: Path, rules: str = GATE_RULES) -> tuple[Gateway, Path, Events]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    events = Events()
    gateway = Gateway(
        GatewayConfig(listen_host=LOOPBACK, dns_upstreams=[], confdir=tmp_path / "ca"),
        load_policy([path]),
        events,
    )
    gateway.add_sandbox(Sandbox(LOOPBACK, "task-1", "default"))
    for name, ip in GATE_BINDINGS.items():
        gateway.bindings.record(LOOPBACK, name, ip, 60)
    return gateway, path, events


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


async def echo(reader, writer) -> None:
    """The fake upstream: echoes what it gets until the other end closes."""
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def door_to(gateway: Gateway, dst: tuple[str, int], upstream_port: int) -> FrontDoor:
    async def refuse(sock):
        sock.close()

    door = FrontDoor(
        gateway.gate,
        refuse,
        original_dst=lambda sock: dst,
        upstream_address=lambda ip, port: (LOOPBACK, upstream_port),
    )
    await door.start(LOOPBACK, 0)
    return door


async def relayed(door: FrontDoor, first: bytes):
    """A client through `door` whose first bytes came back through the relay."""
    reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
    writer.write(first)
    assert await asyncio.wait_for(reader.readexactly(len(first)), 5) == first
    return reader, writer


async def closed(reader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def tls_and_ssh_doors(gateway):
    """An echoing upstream, and front doors to it for allowed.test:443 and :22."""
    upstream = await asyncio.start_server(echo, LOOPBACK, 0)
    port = upstream.sockets[0].getsockname()[1]
    return upstream, await door_to(gateway, TLS_DST, port), await door_to(gateway, SSH_DST, port)


async def still_relays_then_stop(gateway, reader, writer, upstream, *doors) -> None:
    """The relay of `reader`/`writer` still echoes; then close it and stop everything."""
    writer.write(b"still here")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
    writer.close()
    await until(lambda: not gateway.gate.connections)
    for door in doors:
        await door.stop()
    upstream.close()


# --- swap_policy ----------------------------------------------------------------------


def test_swap_closes_a_relayed_connection_the_new_policy_denies_and_keeps_one_it_allows(
    tmp_path,
):
    gateway, _, events = make_gateway(tmp_path)
    hello, ssh = client_hello("allowed.test"), b"SSH-2.0-client\r\n"
    old_hash = gateway.policy.hash

    async def scenario():
        upstream, tls_door, ssh_door = await tls_and_ssh_doors(gateway)
        tls_reader, _ = await relayed(tls_door, hello)
        ssh_reader, ssh_writer = await relayed(ssh_door, ssh)
        assert len(gateway.gate.connections) == 2

        report = gateway.swap_policy(load_policy_text(tmp_path, REVOKING_RULES), cause="test")

        assert await closed(tls_reader)  # the relay to allowed.test is gone
        await still_relays_then_stop(gateway, ssh_reader, ssh_writer, upstream, tls_door, ssh_door)
        return report

    report = run(scenario())
    assert (report.connections_closed, report.bindings_dropped) == (1, 1)
    assert report.old_hash == old_hash != report.new_hash == gateway.policy.hash
    [loaded] = events.of("policy_loaded")
    assert f"hash {report.new_hash} (was {old_hash})" in loaded.detail
    assert loaded.detail.endswith("; test")
    [revoked] = events.of("policy_changed")
    assert (revoked.kind, revoked.verdict, revoked.rule_id) == ("connection", "deny", "revoked")
    assert (revoked.name, revoked.protocol, revoked.dst_port) == ("allowed.test", "tls", 443)
    assert revoked.policy_hash == report.new_hash
    assert "rule_deny" in revoked.detail
    # Both relays report their end; the closed one says why; nothing else was denied.
    ends = {e.name: e for e in events if e.kind == "connection_end"}
    assert "the policy changed" in ends["allowed.test"].detail
    assert ends["allowed.test"].bytes_up == len(hello)
    assert ends["ssh.allowed.test"].bytes_up == len(ssh) + 10
    assert ends["ssh.allowed.test"].policy_hash == report.new_hash
    assert [e for e in events if e.verdict == "deny"] == [revoked]


def test_an_expiring_rule_closes_the_connections_it_allowed_at_its_instant(tmp_path):
    """`expires:` passes during the run, no reload: the relay the rule allowed is
    closed at that instant with a policy_changed event naming the expiry; a relay
    another rule allowed carries on; the next connection is denied."""
    expires = time.time() + 1.5
    instant = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(expires))
        + f".{int(expires % 1 * 1000):03d}Z"
    )
    rules = GATE_RULES.replace(
        "        id: allowed\n", f"        id: allowed\n        expires: {instant}\n"
    )
    gateway, _, events = make_gateway(tmp_path, rules)
    hello, ssh = client_hello("allowed.test"), b"SSH-2.0-client\r\n"

    async def scenario():
        upstream, tls_door, ssh_door = await tls_and_ssh_doors(gateway)
        gateway.watch_expiry()  # as Gateway.start does
        tls_reader, _ = await relayed(tls_door, hello)
        ssh_reader, ssh_writer = await relayed(ssh_door, ssh)
        assert time.time() < expires  # both were allowed before the instant
        assert await closed(tls_reader)  # ... and the expired rule's is gone after it
        closed_at = time.time()
        late_reader, late_writer = await asyncio.open_connection(LOOPBACK, tls_door.port)
        late_writer.write(hello)
        assert await closed(late_reader)  # a new connection under the expired rule
        await still_relays_then_stop(gateway, ssh_reader, ssh_writer, upstream, tls_door, ssh_door)
        return closed_at

    closed_at = run(scenario())
    assert expires <= closed_at < expires + 2
    [revoked] = events.of("policy_changed")
    assert (revoked.kind, revoked.verdict, revoked.name) == ("connection", "deny", "allowed.test")
    assert "closed by the expiry of allowed (no_rule)" in revoked.detail
    ends = {e.name: e for e in events if e.kind == "connection_end"}
    assert "allowed expired" in ends["allowed.test"].detail
    assert ends["ssh.allowed.test"].bytes_up == len(ssh) + 10
    late = [e for e in events if e.kind == "connection" and e.reason == "no_rule"]
    assert [(e.name, e.verdict) for e in late] == [("allowed.test", "deny")]


def test_a_removed_sandbox_s_open_connections_are_closed_with_it(tmp_path):
    """Its network goes next, so nothing else would end them; another sandbox's stay."""
    gateway, _, _ = make_gateway(tmp_path)
    gateway.add_sandbox(Sandbox("127.0.0.2", "task-2", "default"))
    gateway.bindings.record("127.0.0.2", "allowed.test", TLS_DST[0], 60)
    aborted = []
    for key, source in (("mine", LOOPBACK), ("other", "127.0.0.2")):
        state = gateway.gate.on_connect(key, source, 40000, *TLS_DST)
        hello = client_hello("allowed.test")
        assert gateway.gate.on_first_bytes(state, hello) is Outcome.PASSTHROUGH
        state.abort = lambda why, key=key: aborted.append((key, why))
    gateway.remove_sandbox(LOOPBACK)
    assert aborted == [("mine", "its sandbox was removed: the task has ended")]


def test_swap_drops_the_bindings_the_new_policy_no_longer_allows(tmp_path):
    gateway, _, _ = make_gateway(tmp_path)
    report = gateway.swap_policy(load_policy_text(tmp_path, REVOKING_RULES))
    assert report.bindings_dropped == 1
    assert not gateway.bindings.resolved(LOOPBACK, "allowed.test", "203.0.113.10")
    for name in ("ssh.allowed.test", "api.allowed.test"):
        assert gateway.bindings.resolved(LOOPBACK, name, GATE_BINDINGS[name])
    # The DNS filter decides with the new policy at once: the same one reference.
    assert not gateway.dns.decide_name("default", "allowed.test").allowed
    assert gateway.dns.decide_name("default", "ssh.allowed.test").allowed


def test_an_undecided_connection_to_a_newly_denied_address_is_closed_once(tmp_path):
    """Open, nothing sent yet: the new policy's IP deny is final at connect, so it is
    closed with policy_changed, and no second (no_data) denial follows."""
    gateway, _, events = make_gateway(tmp_path)
    rules = GATE_RULES + "      - deny: 203.0.113.10\n        id: deny-now\n"

    async def scenario():
        door = await door_to(gateway, TLS_DST, 1)
        reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
        await until(lambda: gateway.gate.connections)
        report = gateway.swap_policy(load_policy_text(tmp_path, rules))
        assert await closed(reader)
        writer.close()
        await door.stop()
        return report

    assert run(scenario()).connections_closed == 1
    assert [(e.kind, e.reason, e.rule_id) for e in events if e.verdict == "deny"] == [
        ("connection", "policy_changed", "deny-now")
    ]


# --- PolicyReloader ---------------------------------------------------------------------


def test_a_broken_file_changes_nothing_and_is_reported_file_line_col(tmp_path):
    gateway, path, events = make_gateway(tmp_path)
    old_hash = gateway.policy.hash
    path.write_text(GATE_RULES.replace("ports: [22]", "ports: [99999]"))
    reloader = PolicyReloader([path], gateway)

    result = run(reloader.reload("control", actor="uid 0"))

    assert not result.ok and result.swap is None and result.rules_at_fault
    assert (result.policy_hash, gateway.policy.hash) == (old_hash, old_hash)
    [error] = result.errors
    assert error == f"{path}:11:17: port '99999' is not a number from 1 to 65535"
    [failed] = events.of("policy_invalid")
    assert failed.kind == "policy" and failed.policy_hash == old_hash
    assert "reload on control by uid 0 failed" in failed.detail and error in failed.detail
    assert not events.of("policy_loaded")
    # Fixed, it loads.
    path.write_text(REVOKING_RULES)
    fixed = run(reloader.reload("SIGHUP"))
    assert fixed.ok and fixed.policy_hash == gateway.policy.hash != old_hash
    assert fixed.errors == () and fixed.swap.new_hash == fixed.policy_hash


def test_the_watcher_reloads_on_a_change_of_an_included_file(tmp_path):
    top, extra = tmp_path / "top.yaml", tmp_path / "extra.yaml"
    top.write_text(
        "version: 1\nprofiles:\n  default:\n    include: [extra.yaml]\n"
        "    rules:\n      - allow: top.test\n"
    )
    extra.write_text("version: 1\nrules:\n  - allow: one.test\n")
    gateway, _, events = make_gateway(tmp_path)
    reloader = PolicyReloader([top], gateway)
    run(reloader.reload("control"))
    assert extra.resolve() in gateway.policy.paths

    async def scenario():
        watcher = asyncio.create_task(reloader.watch(interval=0.02))
        await asyncio.sleep(0.1)
        extra.write_text("version: 1\nrules:\n  - allow: one.test\n  - allow: two.test\n")
        await until(lambda: len(events.of("policy_loaded")) == 2)
        extra.unlink()  # unreadable: a failed reload, not a crash
        await until(lambda: events.of("policy_invalid"))
        extra.write_text("version: 1\nrules:\n  - allow: three.test\n")
        await until(lambda: len(events.of("policy_loaded")) == 3)
        assert not watcher.done()
        watcher.cancel()

    run(scenario())
    assert f"reload on file change by {extra.resolve()}" in events.of("policy_loaded")[1].detail
    assert "cannot read rule file" in events.of("policy_invalid")[0].detail
    assert gateway.dns.decide_name("default", "three.test").allowed
    assert not gateway.dns.decide_name("default", "two.test").allowed


def test_the_watcher_follows_a_new_include_that_failed_to_load(tmp_path):
    """A top file that starts including a broken new file fails; fixing that file,
    which the policy in force never read, must still be noticed."""
    gateway, path, events = make_gateway(tmp_path)
    reloader = PolicyReloader([path], gateway)
    new = tmp_path / "new.yaml"

    async def scenario():
        watcher = asyncio.create_task(reloader.watch(interval=0.02))
        await asyncio.sleep(0.1)
        new.write_text("version: 1\nrules:\n  - allow: [\n")
        path.write_text(GATE_RULES.replace("  default:\n", "  default:\n    include: [new.yaml]\n"))
        await until(lambda: events.of("policy_invalid"))
        new.write_text("version: 1\nrules:\n  - allow: new.test\n")
        await until(lambda: events.of("policy_loaded"))
        watcher.cancel()

    run(scenario())
    assert gateway.dns.decide_name("default", "new.test").allowed


def test_concurrent_reloads_are_serialised(tmp_path):
    gateway, path, events = make_gateway(tmp_path)
    active, most = [0], [0]
    lock = threading.Lock()

    def slow_load(paths):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.1)
            return load_policy(paths)
        finally:
            with lock:
                active[0] -= 1

    reloader = PolicyReloader([path], gateway, load=slow_load)

    async def scenario():
        return await asyncio.gather(*(reloader.reload("control", f"uid {i}") for i in range(3)))

    results = run(scenario())
    assert most[0] == 1
    assert all(r.ok for r in results) and len(events.of("policy_loaded")) == 3
    assert [r.swap.old_hash == r.swap.new_hash for r in results] == [True] * 3


def test_a_loader_that_raises_something_unexpected_is_a_failed_reload(tmp_path):
    gateway, path, events = make_gateway(tmp_path)

    def broken(paths):
        raise MemoryError("no room")

    before = gateway.policy
    result = run(PolicyReloader([path], gateway, load=broken).reload("control"))
    # Said as what it is: no FILE:1:1 pretending the file's first line is at fault.
    assert (
        not result.ok
        and not result.rules_at_fault
        and result.errors
        == (
            f"the rules could not be loaded from {path}: MemoryError: no room (an unexpected "
            "error, at no known line: its traceback is in the log)",
        )
    )
    assert gateway.policy is before and result.policy_hash == before.hash
    assert events.of("policy_invalid")


def load_policy_text(tmp_path: Path, text: str):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return load_policy([path])


def test_policy_error_names_what_it_tried_to_read(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("version: 1\nprofiles:\n  default:\n    include: [missing.yaml]\n")
    with pytest.raises(PolicyError) as raised:
        load_policy([top])
    assert raised.value.paths == (top.resolve(), (tmp_path / "missing.yaml").resolve())


def test_a_replaced_policy_lets_go_of_its_memoised_decisions(tmp_path):
    """load_policy freezes a policy's objects (no GC pass scans them); a decision
    memoised on a rule refers back to it, a cycle nothing would collect: a reload
    breaks it, so that refcounting frees the replaced policy."""
    gateway, path, _ = make_gateway(tmp_path)
    decision = gateway.dns.decide_name("default", "allowed.test")
    rule = decision.rule
    assert rule.decision is decision  # memoised
    assert run(PolicyReloader([path], gateway).reload("control")).ok
    assert rule.decision is None and rule.inspected_decision is None
    assert decision.allowed  # what was handed out stays valid


# --- a file written in place: never loaded half-way -----------------------------------

# Half of it is a valid file: the wildcard without the deny under it.
WILDCARD_RULES = (
    "version: 1\nprofiles:\n  default:\n    rules:\n"
    '      - allow: "*.allowed.test"\n'
    "      - deny: evil.allowed.test\n"
)
HALF = WILDCARD_RULES[: WILDCARD_RULES.index("      - deny")]


def test_a_reload_while_the_file_is_written_in_place_waits_for_the_whole_file(tmp_path):
    """`cat > rules.yaml`: truncated, half written, a pause, the rest. A reload (SIGHUP,
    the watcher, `sandgate reload`) that starts in the pause must not load the half, in
    which evil.allowed.test is allowed: it loads the whole file once it is quiet."""
    gateway, path, events = make_gateway(tmp_path, WILDCARD_RULES)
    # The half is a valid file that allows evil.allowed.test.
    (tmp_path / "half").mkdir()
    half = load_policy_text(tmp_path / "half", HALF)
    assert half.rule_count == 1 and "evil.allowed.test" not in WILDCARD_RULES[: len(HALF)]
    assert not gateway.dns.decide_name("default", "evil.allowed.test").allowed
    reloader = PolicyReloader([path], gateway, settle=0.3)
    swapped_in: list[bool] = []
    swap = gateway.swap_policy

    def recording_swap(new, *, cause=""):
        report = swap(new, cause=cause)
        swapped_in.append(gateway.dns.decide_name("default", "evil.allowed.test").allowed)
        return report

    gateway.swap_policy = recording_swap

    async def scenario():
        with path.open("w") as writer:  # truncates
            writer.write(HALF)
            writer.flush()
            reload = asyncio.create_task(reloader.reload("SIGHUP"))
            await asyncio.sleep(0.2)  # less than the settle time
            assert not reload.done()
            writer.write(WILDCARD_RULES[len(HALF) :])
        return await reload

    result = run(scenario())
    assert result.ok and swapped_in == [False], swapped_in
    assert not gateway.dns.decide_name("default", "evil.allowed.test").allowed
    assert gateway.dns.decide_name("default", "www.allowed.test").allowed
    assert result.ms >= 300


def test_a_file_that_keeps_changing_is_not_loaded_and_the_old_policy_stays(tmp_path):
    gateway, path, events = make_gateway(tmp_path, WILDCARD_RULES)
    old_hash = gateway.policy.hash
    reloader = PolicyReloader([path], gateway, settle=0.2, settle_max=0.8)

    async def scenario():
        async def keep_writing():
            for i in range(40):
                path.write_text(HALF + f"# {i}\n")
                await asyncio.sleep(0.05)

        writer = asyncio.create_task(keep_writing())
        result = await reloader.reload("control")
        writer.cancel()
        return result

    result = run(scenario())
    assert not result.ok and gateway.policy.hash == old_hash
    [error] = result.errors
    assert error.startswith(
        f"{path.resolve()}:1:1: still being written: it kept changing for 0.8 s"
    )
    assert events.of("policy_invalid") and not events.of("policy_loaded")


def test_a_modification_time_in_the_future_settles_by_comparison(tmp_path):
    """The clock was set back after the file was written: its mtime is ahead of now.
    Two looks a settle time apart that agree load it (no wait for the clock to catch up)."""
    gateway, path, _ = make_gateway(tmp_path, WILDCARD_RULES)
    path.write_text(WILDCARD_RULES.replace("evil.allowed.test", "bad.allowed.test"))
    ahead = time.time() + 3600
    os.utime(path, (ahead, ahead))
    result = run(PolicyReloader([path], gateway, settle=0.2, settle_max=5).reload("control"))
    assert result.ok and 200 <= result.ms < 2000, result
    assert not gateway.dns.decide_name("default", "bad.allowed.test").allowed


def test_the_watcher_follows_a_symlinked_rule_file_whose_target_is_swapped(tmp_path):
    """`ln -sfn rules-v2.yaml rules.yaml` (a deploy that swaps a link, the old target
    kept): nothing the watcher looked at changed but the link, which must reload."""
    gateway, _, events = make_gateway(tmp_path, WILDCARD_RULES)
    v1, v2, link = tmp_path / "v1.yaml", tmp_path / "v2.yaml", tmp_path / "live.yaml"
    v1.write_text(WILDCARD_RULES)
    v2.write_text(WILDCARD_RULES.replace("deny: evil.allowed.test", "deny: www.allowed.test"))
    old = time.time() - 60
    for path in (v1, v2):
        os.utime(path, (old, old))
    link.symlink_to(v1.name)
    reloader = PolicyReloader([link], gateway, settle=0.05)
    run(reloader.reload("control"))
    assert gateway.dns.decide_name("default", "www.allowed.test").allowed

    async def scenario():
        watcher = asyncio.create_task(reloader.watch(interval=0.02))
        await asyncio.sleep(0.1)
        swapped = tmp_path / "swapped"
        swapped.symlink_to(v2.name)
        os.replace(swapped, link)
        await until(lambda: len(events.of("policy_loaded")) == 2)
        watcher.cancel()

    run(scenario())
    assert not gateway.dns.decide_name("default", "www.allowed.test").allowed
    assert gateway.dns.decide_name("default", "evil.allowed.test").allowed


def test_the_watcher_follows_a_symlinked_include_whose_target_is_swapped(tmp_path):
    """The same deploy for an included file: the loader reads the link's target, so the
    watcher must look at the include's own name too."""
    team = "version: 1\nrules:\n" + WILDCARD_RULES.split("rules:\n", 1)[1]
    v1, v2, link = tmp_path / "team-v1.yaml", tmp_path / "team-v2.yaml", tmp_path / "team.yaml"
    v1.write_text(team)
    v2.write_text(team.replace("deny: evil.allowed.test", "deny: www.allowed.test"))
    link.symlink_to(v1.name)
    gateway, path, events = make_gateway(
        tmp_path, "version: 1\nprofiles:\n  default:\n    include: [team.yaml]\n"
    )
    old = time.time() - 60
    for file in (v1, v2, path):
        os.utime(file, (old, old))
    reloader = PolicyReloader([path], gateway, settle=0.05)
    assert gateway.dns.decide_name("default", "www.allowed.test").allowed

    async def scenario():
        watcher = asyncio.create_task(reloader.watch(interval=0.02))
        await asyncio.sleep(0.1)
        swapped = tmp_path / "swapped"
        swapped.symlink_to(v2.name)
        os.replace(swapped, link)
        await until(lambda: events.of("policy_loaded"))
        watcher.cancel()

    run(scenario())
    assert not gateway.dns.decide_name("default", "www.allowed.test").allowed
    assert gateway.dns.decide_name("default", "evil.allowed.test").allowed
