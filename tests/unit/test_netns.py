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
