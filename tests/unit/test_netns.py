"""enforcer/netns.py without a kernel: address allocation and argument checks."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network

import pytest
from sandgate.enforcer import netns
from sandgate.enforcer.netns import DEFAULT_POOL, allocate_addresses


@pytest.mark.parametrize(
    ("pool", "index", "expected"),
    [
        pytest.param(DEFAULT_POOL, 0, ("10.213.0.1", "10.213.0.2"), id="first"),
        pytest.param(DEFAULT_POOL, 1, ("10.213.0.5", "10.213.0.6"), id="second"),
        pytest.param(DEFAULT_POOL, 64, ("10.213.1.1", "10.213.1.2"), id="next-/24"),
        pytest.param(DEFAULT_POOL, 16383, ("10.213.255.253", "10.213.255.254"), id="last"),
        pytest.param(IPv4Network("192.0.2.0/30"), 0, ("192.0.2.1", "192.0.2.2"), id="one-/30"),
    ],
)
def test_allocate_addresses(pool: IPv4Network, index: int, expected: tuple[str, str]) -> None:
    assert allocate_addresses(pool, index) == tuple(IPv4Address(a) for a in expected)


@pytest.mark.parametrize(
    ("pool", "index"),
    [
        pytest.param(DEFAULT_POOL, 16384, id="past-the-end"),
        pytest.param(DEFAULT_POOL, -1, id="negative"),
        pytest.param(IPv4Network("192.0.2.0/31"), 0, id="pool-smaller-than-/30"),
    ],
)
def test_allocate_addresses_out_of_pool(pool: IPv4Network, index: int) -> None:
    with pytest.raises(ValueError):
        allocate_addresses(pool, index)


def test_names_fit_ifnamsiz() -> None:
    assert len(netns.host_if_name("a" * 11)) == 15


@pytest.mark.parametrize(
    ("sandbox_id", "gateway_ip", "sandbox_ip"),
    [
        pytest.param("a" * 12, "10.213.0.1", "10.213.0.2", id="id-too-long"),
        pytest.param("", "10.213.0.1", "10.213.0.2", id="id-empty"),
        pytest.param("AB12", "10.213.0.1", "10.213.0.2", id="id-upper-case"),
        pytest.param("../x", "10.213.0.1", "10.213.0.2", id="id-path"),
        pytest.param("ab12", "10.213.0.1", "10.213.0.6", id="different-/30s"),
        pytest.param("ab12", "10.213.0.1", "10.213.0.1", id="same-address"),
        pytest.param("ab12", "10.213.0.0", "10.213.0.2", id="network-address"),
        pytest.param("ab12", "10.213.0.1", "10.213.0.3", id="broadcast-address"),
        pytest.param("ab12", "10.213.0.1", "fe80::2", id="not-ipv4"),
    ],
)
def test_bad_arguments_fail_before_touching_the_kernel(
    monkeypatch: pytest.MonkeyPatch, sandbox_id: str, gateway_ip: str, sandbox_ip: str
) -> None:
    def must_not_run(name: str):
        raise AssertionError("create_sandbox_net reached the kernel")

    monkeypatch.setattr(netns, "_create_netns", must_not_run)
    with pytest.raises(ValueError):
        netns.create_sandbox_net(sandbox_id, gateway_ip, sandbox_ip)


def test_calls_from_a_running_event_loop_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(name: str):
        raise AssertionError("create_sandbox_net reached the kernel")

    monkeypatch.setattr(netns, "_create_netns", must_not_run)

    async def call_in_loop() -> None:
        with pytest.raises(RuntimeError, match="asyncio.to_thread"):
            netns.create_sandbox_net("ab12", "10.213.0.1", "10.213.0.2")
        with pytest.raises(RuntimeError, match="asyncio.to_thread"):
            netns.destroy_sandbox_net("ab12")

    asyncio.run(call_in_loop())


NO_LDCONFIG_SCRIPT = """
import ctypes.util, os, subprocess, sys
from sandgate.enforcer import netns

def refuse(*args, **kwargs):
    raise AssertionError(f"a process or a library search: {args}")

ctypes.util.find_library = refuse  # pyroute2 would run `ldconfig -p` through it
subprocess.Popen = refuse
run_id = sys.argv[1]
net = netns.create_sandbox_net(run_id, "10.213.0.1", "10.213.0.2")
assert os.path.exists(f"/run/netns/{net.netns}")
with netns.entered_netns(net.netns):  # a setns(2) of our own
    with open("/proc/thread-self/net/dev") as dev:
        assert net.sandbox_if in dev.read(), "not in the sandbox's netns"
netns.destroy_sandbox_net(run_id)
assert not os.path.exists(f"/run/netns/{net.netns}")
"""


def _run_in_a_throwaway_host(tag: str, script: str) -> list[str]:
    """`script` run with a sandbox id as argv[1], in a host netns of its own (its
    `sg-<id>` and the host netns deleted after, whatever happened): its stdout lines.
    Asserted: it exits 0 and leaves no netns of that name."""
    import os
    import subprocess
    import sys

    host, run_id = f"sgt{tag}{os.getpid() % 10000}", f"{tag}{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", host], check=True)
    try:
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{host}", sys.executable, "-c", script, run_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert not os.path.exists(f"/run/netns/sg-{run_id}")
        return proc.stdout.splitlines()
    finally:
        subprocess.run(["ip", "netns", "del", f"sg-{run_id}"], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", host], check=False)


@pytest.mark.e2e
def test_a_sandbox_net_comes_and_goes_without_starting_a_process() -> None:
    """Create, enter and destroy a sandbox net (in a throwaway host netns) with library
    searches and subprocesses refused: pyroute2 is given libc, it runs no `ldconfig -p`."""
    _run_in_a_throwaway_host("nl", NO_LDCONFIG_SCRIPT)


@pytest.mark.parametrize(
    ("link", "delete_fails", "expected"),
    [
        pytest.param(
            True,
            False,
            ["cut off", "counters", "delete table", "release net"],
            id="cut-off-then-table-then-net",
        ),
        pytest.param(
            False,
            False,
            ["cut off", "destroy net", "counters", "delete table"],
            id="no-link-net-first",
        ),
        pytest.param(
            True, True, ["cut off", "counters", "delete table", "release net"], id="delete-fails"
        ),
    ],
)
def test_unwire_never_leaves_a_path_without_the_table(
    monkeypatch: pytest.MonkeyPatch, link: bool, delete_fails: bool, expected: list[str]
) -> None:
    """The table goes only after the sandbox is cut off (or its network is gone), and
    the network goes in every case, also when deleting the table fails."""
    from sandgate.enforcer import nft
    from sandgate.enforcer.run import unwire

    calls: list[str] = []

    def cut_off(run_id: str) -> bool:
        calls.append("cut off")
        return link

    def delete_table(table: str) -> None:
        calls.append("delete table")
        if delete_fails:
            raise nft.NftError("nft failed")

    monkeypatch.setattr(netns, "cut_off", cut_off)
    monkeypatch.setattr(netns, "destroy_sandbox_net", lambda run_id: calls.append("destroy net"))
    monkeypatch.setattr(netns, "release_sandbox_net", lambda run_id: calls.append("release net"))
    monkeypatch.setattr(nft, "read_counters", lambda table: calls.append("counters") or {"x": 1})
    monkeypatch.setattr(nft, "delete_table", delete_table)
    assert unwire("ab12", "sandgate_ab12") == {"x": 1}
    assert calls == expected


CUT_OFF_SCRIPT = """
import socket, sys
from sandgate.enforcer import netns

run_id = sys.argv[1]
net = netns.create_sandbox_net(run_id, "10.213.0.1", "10.213.0.2")
try:
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("10.213.0.1", 5999))
    host.settimeout(0.5)
    with netns.entered_netns(net.netns):
        sandbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def arrives(payload):
        sandbox.sendto(payload, ("10.213.0.1", 5999))
        try:
            return host.recv(100) == payload
        except TimeoutError:
            return False

    print("before", arrives(b"before"))
    print("cut off", netns.cut_off(run_id))
    print("after", arrives(b"after"), arrives(b"again"))
    print("missing", netns.cut_off("nosuch0"))
finally:
    netns.destroy_sandbox_net(run_id)
"""


@pytest.mark.e2e
def test_a_cut_off_sandbox_reaches_nothing() -> None:
    """`cut_off` (the host end of the veth down) is what lets `unwire` delete the table
    before the veth: a packet the sandbox sends after it never arrives (in a throwaway
    host netns with no table at all, so nothing else could drop it), one before does."""
    assert _run_in_a_throwaway_host("cut", CUT_OFF_SCRIPT) == [
        "before True",
        "cut off True",
        "after False False",
        "missing False",
    ]


RELEASE_SCRIPT = """
import os, sys, time
from sandgate.enforcer import netns
from sandgate.enforcer.rtnl import Rtnl

run_id = sys.argv[1]
net = netns.create_sandbox_net(run_id, "10.213.0.1", "10.213.0.2")
print("cut off", netns.cut_off(run_id))
started = time.monotonic()
netns.release_sandbox_net(run_id)
print("name", os.path.exists(f"/run/netns/{net.netns}"))
with Rtnl() as host:
    print("host end up", host.link_up(host.link_index(net.host_if)))
    while host.link_index(net.host_if) is not None and time.monotonic() - started < 10:
        time.sleep(0.005)
    print("host end", host.link_index(net.host_if))
"""


@pytest.mark.e2e
def test_a_released_sandbox_net_is_deleted_by_the_kernel() -> None:
    """`release_sandbox_net` (what a run's teardown does once the sandbox is cut off)
    removes the netns's name at once, without the RCU wait of deleting the link; the
    kernel then deletes the namespace and both veth ends (the host end, down until
    then, goes within seconds), in a throwaway host netns."""
    assert _run_in_a_throwaway_host("rel", RELEASE_SCRIPT) == [
        "cut off True",
        "name False",
        "host end up False",
        "host end None",
    ]
