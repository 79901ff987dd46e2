"""The kernel half of enforcement, end to end: real namespaces, veth, nftables.

Topology (all created here, under a per-run prefix, removed afterwards):

    sg-<a>, sg-<b> (sandboxes) --veth--> <prefix>-host (plays the gateway's host)

The host netns has no route anywhere, so a packet that the ruleset lets through
can only reach the listeners below, which stand in for mitmproxy (proxy port), the
DNS filter (DNS port) and the metrics endpoint (a gateway port that sandboxes must
not reach). The test thread enters the host netns to build and inspect it, and a
sandbox netns to send from it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import dns.message
import dns.rrset
import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from sandgate.enforcer import netns, nft

pytestmark = pytest.mark.e2e

PROXY_PORT = 18080
DNS_PORT = 15353
METRICS_PORT = 9464
DNS_ANSWER = "192.0.2.53"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


@dataclass
class Listeners:
    """Sockets in the host netns and what reached them."""

    proxy_hits: list[tuple[str, int]] = field(default_factory=list)  # original dst
    dns_hits: list[str] = field(default_factory=list)  # query names
    other_hits: list[str] = field(default_factory=list)  # anything else: a leak
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)


@dataclass
class World:
    prefix: str
    host_ns: str
    table: str
    a: netns.SandboxNet
    b: netns.SandboxNet
    listeners: Listeners
    create_ms: list[float]
    nft_ms: float

    @contextlib.contextmanager
    def in_host(self) -> Iterator[None]:
        with netns.entered_netns(self.host_ns):
            yield

    def counters(self) -> dict[str, int]:
        with self.in_host():
            return nft.read_counters(self.table)


def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the kernel enforcement test needs root (namespaces, nftables)")
    missing = [t for t in ("ip", "nft", "curl", "dig") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)}")


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _require_tools()
    prefix = "sgk" + secrets.token_hex(3)
    host_ns = f"{prefix}-host"
    # Sandbox netns are named sg-<id> machine-wide: the ids carry the run's random
    # part so that no other run's sandbox is ever touched.
    ids = [f"k{prefix[3:]}a", f"k{prefix[3:]}b"]
    table = f"sandgate_{prefix}"
    listeners = Listeners()
    subprocess.run(["ip", "netns", "add", host_ns], check=True)
    try:
        with netns.entered_netns(host_ns):
            assert _netns_inode("/proc/thread-self/ns/net") == _netns_inode(
                f"/run/netns/{host_ns}"
            ), "not inside the test's host netns: refusing to touch the network"
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            nets, create_ms = [], []
            for index, sandbox_id in enumerate(ids, start=1):
                gateway_ip, sandbox_ip = netns.allocate_addresses(netns.DEFAULT_POOL, index)
                started = time.perf_counter()
                nets.append(netns.create_sandbox_net(sandbox_id, gateway_ip, sandbox_ip))
                create_ms.append((time.perf_counter() - started) * 1000)
            config = nft.RulesetConfig(
                table=table,
                sandbox_ifaces=netns.HOST_IF_PREFIX + "*",
                proxy_port=PROXY_PORT,
                dns_port=DNS_PORT,
            )
            started = time.perf_counter()
            nft.load_table(config, new=True)  # as sandgate loads it: its own netlink messages
            nft_ms = (time.perf_counter() - started) * 1000
            _start_listeners(listeners)
        yield World(prefix, host_ns, table, nets[0], nets[1], listeners, create_ms, nft_ms)
    finally:
        listeners.stop.set()
        for thread in listeners.threads:
            thread.join(timeout=5)
        for sock in listeners.sockets:
            sock.close()
        _remove_everything(host_ns, ids, table)


def _remove_everything(host_ns: str, ids: list[str], table: str) -> None:
    """Idempotent teardown, also after a failed setup; every step runs."""
    try:
        if host_ns in pyroute2_netns.listnetns():
            try:
                with netns.entered_netns(host_ns):
                    for sandbox_id in ids:
                        netns.destroy_sandbox_net(sandbox_id)
                    nft.delete_table(table)
            finally:
                subprocess.run(["ip", "netns", "del", host_ns], check=False)
    finally:
        # Sandbox netns live in /run/netns whichever netns created them.
        for sandbox_id in ids:
            with contextlib.suppress(OSError):
                pyroute2_netns.remove(netns.netns_name(sandbox_id))


def _start_listeners(listeners: Listeners) -> None:
    def serve(target, *args) -> None:
        thread = threading.Thread(target=target, args=(listeners, *args), daemon=True)
        thread.start()
        listeners.threads.append(thread)

    def tcp(family: int, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.listen(16)
        sock.settimeout(0.2)
        listeners.sockets.append(sock)
        return sock

    def udp(family: int, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.settimeout(0.2)
        listeners.sockets.append(sock)
        return sock

    serve(_serve_proxy, tcp(socket.AF_INET, PROXY_PORT))
    serve(_serve_dns_udp, udp(socket.AF_INET, DNS_PORT))
    serve(_serve_dns_tcp, tcp(socket.AF_INET, DNS_PORT))
    serve(_serve_other, tcp(socket.AF_INET, METRICS_PORT), "tcp/metrics")
    serve(_serve_other, tcp(socket.AF_INET6, PROXY_PORT), "tcp6/proxy")
    serve(_serve_other, udp(socket.AF_INET, 9999), "udp/9999")
    serve(_serve_other, udp(socket.AF_INET6, 9999), "udp6/9999")


def _accepting(listeners: Listeners, sock: socket.socket) -> Iterator[socket.socket]:
    while not listeners.stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(2)
        yield conn


def _serve_proxy(listeners: Listeners, sock: socket.socket) -> None:
    for conn in _accepting(listeners, sock):
        with conn:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!H4s", raw, 2)
            listeners.proxy_hits.append((socket.inet_ntoa(packed), port))
            with contextlib.suppress(OSError):
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nproxy-port\n")


def _dns_reply(listeners: Listeners, wire: bytes) -> bytes:
    query = dns.message.from_wire(wire)
    listeners.dns_hits.append(query.question[0].name.to_text())
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", DNS_ANSWER))
    return response.to_wire()


def _serve_dns_udp(listeners: Listeners, sock: socket.socket) -> None:
    while not listeners.stop.is_set():
        try:
            wire, peer = sock.recvfrom(4096)
        except TimeoutError:
            continue
        except OSError:
            return
        sock.sendto(_dns_reply(listeners, wire), peer)


def _serve_dns_tcp(listeners: Listeners, sock: socket.socket) -> None:
    for conn in _accepting(listeners, sock):
        with conn, contextlib.suppress(OSError):
            (length,) = struct.unpack("!H", conn.recv(2))
            wire = b""
            while len(wire) < length:
                wire += conn.recv(length - len(wire))
            reply = _dns_reply(listeners, wire)
            conn.sendall(struct.pack("!H", len(reply)) + reply)


def _serve_other(listeners: Listeners, sock: socket.socket, name: str) -> None:
    if sock.type == socket.SOCK_DGRAM:
        while not listeners.stop.is_set():
            try:
                sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            listeners.other_hits.append(name)
    else:
        for conn in _accepting(listeners, sock):
            listeners.other_hits.append(name)
            conn.close()


def _in_sandbox(net: netns.SandboxNet, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", net.netns, *argv], capture_output=True, text=True, timeout=20
    )


def _tcp_connects(address: tuple, family: int = socket.AF_INET, source: str | None = None) -> bool:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(1)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _ping(destination: IPv4Address) -> bool:
    """Send one ICMP echo request; True if an echo reply from `destination` comes."""
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"sandgate"
    checksum = _inet_checksum(header + payload)
    packet = struct.pack("!BBHHH", 8, 0, checksum, ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(1)
        sock.sendto(packet, (str(destination), 0))
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            try:
                data, (source, _) = sock.recvfrom(1024)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            if source == str(destination) and data[ihl] == 0:
                return True
    return False


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _link_local(ifname: str) -> str | None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for addr in ipr.get_addr(family=socket.AF_INET6, index=index):
            if addr.get_attr("IFA_ADDRESS").startswith("fe80:"):
                return addr.get_attr("IFA_ADDRESS")
    return None


def _wait_for(probe, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while (value := probe()) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that moved, apart from dropped_ipv6: the sandbox kernel's own IPv6
    chatter (MLD reports for its link-local address) lands there at any time."""
    return {
        k: after[k] - before.get(k, 0)
        for k in after
        if after[k] != before.get(k, 0) and k != "dropped_ipv6"
    }


# -- tests ---------------------------------------------------------------------


def test_sandbox_net_is_wired(world: World) -> None:
    out = _in_sandbox(world.a, "ip", "-4", "route", "show", "default").stdout
    assert f"default via {world.a.gateway_ip} dev eth0" in out
    out = _in_sandbox(world.a, "ip", "-4", "-br", "addr", "show", "dev", "eth0").stdout
    assert f"{world.a.sandbox_ip}/30" in out
    with netns.entered_netns(world.a.netns):
        assert _wait_for(lambda: _link_local("eth0")) is not None
    out = _in_sandbox(world.a, "ip", "-6", "addr", "show", "scope", "global").stdout
    assert out.strip() == "", "the sandbox must have link-local IPv6 only"
    print(f"\ncreate_sandbox_net: {[round(ms, 1) for ms in world.create_ms]} ms")
    print(f"the table (nft.load_table): {world.nft_ms:.1f} ms")


def test_any_tcp_destination_reaches_the_proxy_port(world: World) -> None:
    before = len(world.listeners.proxy_hits)
    result = _in_sandbox(world.a, "curl", "-sS", "-m", "5", "http://203.0.113.77/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "proxy-port\n"
    assert world.listeners.proxy_hits[before:] == [("203.0.113.77", 80)]


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dns_to_any_address_reaches_the_dns_port(world: World, transport: str) -> None:
    before = len(world.listeners.dns_hits)
    result = _in_sandbox(
        world.a, "dig", "+short", "+time=2", "+tries=1", transport, "@198.51.100.99", "x.test"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == DNS_ANSWER
    assert world.listeners.dns_hits[before:] == ["x.test."]


def test_dns_to_the_gateway_reaches_the_dns_port(world: World) -> None:
    result = _in_sandbox(
        world.a, "dig", "+short", "+time=2", "+tries=1", f"@{world.a.gateway_ip}", "y.test"
    )
    assert result.stdout.strip() == DNS_ANSWER, result.stdout + result.stderr


def test_udp_and_quic_are_dropped(world: World) -> None:
    before = world.counters()
    with netns.entered_netns(world.a.netns):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", ("203.0.113.77", 9999))
            sock.sendto(b"quic", ("203.0.113.77", 443))
        # The host's own UDP port is the gateway's: counted there, not as UDP.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", (str(world.a.gateway_ip), 9999))
    time.sleep(0.2)
    assert _delta(before, world.counters()) == {"dropped_udp": 2, "dropped_to_gateway": 1}
    assert world.listeners.other_hits == []


def test_icmp_is_dropped(world: World) -> None:
    before = world.counters()
    with netns.entered_netns(world.a.netns):
        assert not _ping(IPv4Address("203.0.113.77"))
        assert not _ping(world.a.gateway_ip)
    assert _delta(before, world.counters()) == {"dropped_icmp": 1, "dropped_to_gateway": 1}


@pytest.mark.parametrize("port", [METRICS_PORT, PROXY_PORT, DNS_PORT], ids=str)
def test_gateway_ports_are_unreachable(world: World, port: int) -> None:
    before = world.counters()
    before_proxy = len(world.listeners.proxy_hits)
    with netns.entered_netns(world.a.netns):
        assert not _tcp_connects((str(world.a.gateway_ip), port))
    delta = _delta(before, world.counters())
    assert set(delta) == {"dropped_to_gateway"}, delta  # SYN and its retransmits
    assert world.listeners.other_hits == []
    assert len(world.listeners.proxy_hits) == before_proxy


def test_a_sandbox_cannot_aim_the_gateway_at_another(world: World) -> None:
    """A SYN to another sandbox's address never reaches the proxy port (the gateway
    would connect there from the host, whatever rule opened the address); DNS to it
    is still the DNS filter's."""
    before = world.counters()
    before_proxy = len(world.listeners.proxy_hits)
    with netns.entered_netns(world.a.netns):
        assert not _tcp_connects((str(world.b.sandbox_ip), 8080))
    delta = _delta(before, world.counters())
    assert set(delta) == {"dropped_forward"}, delta  # SYN and its retransmits
    assert len(world.listeners.proxy_hits) == before_proxy
    assert world.listeners.other_hits == []
    result = _in_sandbox(
        world.a, "dig", "+short", "+time=2", "+tries=1", "+tcp", f"@{world.b.sandbox_ip}", "z.test"
    )
    assert result.stdout.strip() == DNS_ANSWER, result.stdout + result.stderr


def test_the_host_opens_nothing_into_a_sandbox(world: World) -> None:
    """The host sends a sandbox only answers: a connection the host opens to a task's
    listener (the gateway's, to an address a name it resolved itself led to; any
    process's on the host) never reaches the task's kernel, not even its SYN. The
    answers to what the task opened still do (the tests above)."""
    port = 7777
    with netns.entered_netns(world.a.netns):
        listener = socket.socket()
        listener.bind(("0.0.0.0", port))
        listener.listen(8)
    try:
        with world.in_host():
            assert not _tcp_connects((str(world.a.sandbox_ip), port))
        with netns.entered_netns(world.a.netns), open("/proc/thread-self/net/tcp") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        syn_received = [r for r in rows if r[1].endswith(f":{port:04X}") and r[3] == "03"]
        assert syn_received == [], syn_received
    finally:
        listener.close()


def test_ipv6_is_dropped(world: World) -> None:
    with netns.entered_netns(world.host_ns):
        host_ll = _wait_for(lambda: _link_local(world.a.host_if))
    assert host_ll is not None
    with netns.entered_netns(world.a.netns):
        assert _wait_for(lambda: _link_local("eth0")) is not None
        before = world.counters()
        scope = socket.if_nametoindex("eth0")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", ("ff02::1", 9999, 0, scope))
        assert not _tcp_connects((host_ll, PROXY_PORT, 0, scope), socket.AF_INET6)
    after = world.counters()
    assert after["dropped_ipv6"] - before["dropped_ipv6"] >= 2
    assert _delta(before, after) == {}
    assert world.listeners.other_hits == []


def test_a_sandbox_cannot_pose_as_another(world: World) -> None:
    spoofed = str(world.b.sandbox_ip)
    with IPRoute(netns=world.a.netns, flags=0) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=spoofed, prefixlen=32)
    before = world.counters()
    before_proxy = len(world.listeners.proxy_hits)
    with netns.entered_netns(world.a.netns):
        assert not _tcp_connects(("203.0.113.77", 80), source=spoofed)
    assert set(_delta(before, world.counters())) == {"dropped_spoofed"}
    assert len(world.listeners.proxy_hits) == before_proxy
    # The real owner of the address still gets through.
    result = _in_sandbox(world.b, "curl", "-sS", "-m", "5", "http://203.0.113.8:8000/")
    assert result.stdout == "proxy-port\n", result.stderr
    assert world.listeners.proxy_hits[-1] == ("203.0.113.8", 8000)


def test_a_taken_name_fails_and_leaves_its_owner_alone(world: World) -> None:
    taken = world.a.netns.removeprefix(netns.NETNS_PREFIX)
    gateway_ip, sandbox_ip = netns.allocate_addresses(netns.DEFAULT_POOL, 9)
    with world.in_host(), pytest.raises(netns.SandboxNetError) as caught:
        netns.create_sandbox_net(taken, gateway_ip, sandbox_ip)
    assert caught.value.step == "create netns"
    result = _in_sandbox(world.a, "curl", "-sS", "-m", "5", "http://203.0.113.77/")
    assert result.stdout == "proxy-port\n", result.stderr


def test_a_failed_step_is_undone(world: World) -> None:
    sandbox_id = f"k{world.prefix[3:]}c"
    gateway_ip, sandbox_ip = netns.allocate_addresses(netns.DEFAULT_POOL, 10)
    with world.in_host(), IPRoute() as ipr:
        # A stale host interface of the same name makes the veth step fail.
        ipr.link("add", ifname=netns.host_if_name(sandbox_id), kind="veth", peer=world.prefix)
        try:
            with pytest.raises(netns.SandboxNetError) as caught:
                netns.create_sandbox_net(sandbox_id, gateway_ip, sandbox_ip)
            assert caught.value.step == "create veth"
            assert sandbox_id not in netns.list_sandbox_nets()
            assert ipr.link_lookup(ifname=netns.host_if_name(sandbox_id)), "not ours to remove"
        finally:
            ipr.link("del", ifname=netns.host_if_name(sandbox_id))
            netns.destroy_sandbox_net(sandbox_id)


def test_a_bad_ruleset_changes_nothing(world: World) -> None:
    good = nft.render_ruleset(
        nft.RulesetConfig(
            table=world.table, sandbox_ifaces="sgh-*", proxy_port=PROXY_PORT, dns_port=DNS_PORT
        )
    )
    # "fwd" is an nft keyword: this fails after the text has already deleted the
    # table, which the transaction must undo.
    bad = good.replace("chain forward {", "chain fwd {")
    with world.in_host(), pytest.raises(nft.NftError, match="fwd"):
        nft.apply_ruleset(bad)
    assert set(world.counters()) == set(nft.COUNTERS)
    result = _in_sandbox(world.a, "curl", "-sS", "-m", "5", "http://203.0.113.77/")
    assert result.stdout == "proxy-port\n", result.stderr


# Runs last (pytest keeps file order): it takes the world apart.
def test_teardown_leaves_nothing(world: World) -> None:
    ids = [net.netns.removeprefix(netns.NETNS_PREFIX) for net in (world.a, world.b)]
    with world.in_host():
        assert set(ids) <= set(netns.list_sandbox_nets())
        assert nft.list_tables(world.table) == [world.table]
        for sandbox_id in ids:
            netns.destroy_sandbox_net(sandbox_id)
            netns.destroy_sandbox_net(sandbox_id)  # idempotent
        nft.delete_table(world.table)
        nft.delete_table(world.table)
        assert nft.list_tables(world.table) == []
        with IPRoute() as ipr:
            links = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    assert [name for name in links if name.startswith(netns.HOST_IF_PREFIX)] == []
    assert set(ids).isdisjoint(netns.list_sandbox_nets())
    _remove_everything(world.host_ns, ids, world.table)
    leftovers = [n for n in pyroute2_netns.listnetns() if world.prefix in n or n[3:] in ids]
    assert leftovers == []
