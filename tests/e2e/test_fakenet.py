"""Self-checks of the fake internet the other end-to-end tests stand on.

If these fail, every e2e failure elsewhere is suspect, so they check each server
from host_ns (where the gateway will run) and that nothing outlives a run.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from sandgate.enforcer.demo.fakenet import (
    HOSTS,
    NETNS_DIR,
    FakeInternet,
    cleanup_prefix,
    fresh_prefix,
)

pytestmark = pytest.mark.e2e


def eventually(probe, timeout: float = 2.0):
    """Poll until probe() is truthy: servers log just after they answer."""
    deadline = time.monotonic() + timeout
    while not (result := probe()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return result


def netns_pids(ns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dig(fakenet, *args: str) -> str:
    argv = ["dig", "+short", "+time=2", "+tries=1", f"@{fakenet.dns_ip}", *args]
    return fakenet.run_in_host(argv, check=True).stdout


def curl(fakenet, *args: str) -> subprocess.CompletedProcess:
    argv = ["curl", "-sS", "--max-time", "5", "--cacert", str(fakenet.ca_cert), *args]
    return fakenet.run_in_host(argv, check=True)


def test_dns_answers_every_name_and_logs_the_query(fakenet):
    fakenet.clear_logs()

    for name, addr in HOSTS.items():
        assert dig(fakenet, name).split() == [addr], name

    assert fakenet.dns_queries_seen() == list(HOSTS)


def test_dns_aaaa_over_tcp_and_nxdomain(fakenet):
    fakenet.clear_logs()

    assert dig(fakenet, "+tcp", "v6.allowed.test", "AAAA").split() == ["2001:db8::10"]
    assert dig(fakenet, "allowed.test", "AAAA") == ""
    status = fakenet.run_in_host(["dig", "+time=2", "+tries=1", f"@{fakenet.dns_ip}", "Nope.Test."])
    assert "status: NXDOMAIN" in status.stdout

    assert fakenet.dns_queries_seen() == ["v6.allowed.test", "allowed.test", "nope.test"]


@pytest.mark.parametrize(
    ("scheme", "port", "sni"),
    [
        pytest.param("http", 80, "", id="http"),
        pytest.param("https", 443, "allowed.test", id="https"),
    ],
)
def test_http_and_https_are_served_and_logged(fakenet, scheme, port, sni):
    fakenet.clear_logs()

    out = curl(
        fakenet, "--resolve", f"allowed.test:{port}:203.0.113.10", f"{scheme}://allowed.test/p?q=1"
    )

    assert out.stdout == "hello from 203.0.113.10 host=allowed.test GET /p?q=1\n"
    seen = eventually(lambda: fakenet.requests_seen("203.0.113.10"))
    assert [
        (r["server_port"], r["host"], r["method"], r["uri"], r["status"], r["sni"]) for r in seen
    ] == [(port, "allowed.test", "GET", "/p?q=1", 200, sni)]
    assert seen[0]["remote_addr"] == fakenet.host_ip
    assert fakenet.requests_seen("203.0.113.11") == []


def test_https_over_ipv6_with_http2(fakenet):
    fakenet.clear_logs()

    out = curl(
        fakenet,
        "--http2",
        "--resolve",
        "v6.allowed.test:443:[2001:db8::10]",
        "https://v6.allowed.test/",
    )

    assert out.stdout == "hello from 2001:db8::10 host=v6.allowed.test GET /\n"
    [seen] = eventually(lambda: fakenet.requests_seen("2001:db8::10"))
    assert (seen["protocol"], seen["sni"], seen["remote_addr"]) == (
        "HTTP/2.0",
        "v6.allowed.test",
        fakenet.host_ip6,
    )


def test_big_body(fakenet):
    out = curl(
        fakenet, "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "http://203.0.113.66/big"
    )
    assert out.stdout == f"200 {fakenet.big_size}"


def test_raw_tcp_banner_echo_and_count(fakenet):
    fakenet.clear_logs()

    out = fakenet.run_in_host(
        ["sh", "-c", "printf 'ping\\n' | socat -t 0.5 - TCP:203.0.113.10:22"],
        text=False,
        check=True,
    )

    assert out.stdout == b"SSH-2.0-fake\r\nping\n"
    assert fakenet.tcp_connections_seen("203.0.113.10", 22) == 1
    assert fakenet.tcp_connections_seen("203.0.113.66", 22) == 0


def test_udp_sink_counts_datagrams(fakenet):
    fakenet.clear_logs()

    fakenet.run_in_host(
        ["sh", "-c", "printf x | socat -u - UDP-SENDTO:203.0.113.66:9999"], check=True
    )

    assert eventually(lambda: fakenet.udp_datagrams_seen() == 1)
    assert fakenet.udp_datagrams_seen("203.0.113.66", 9999) == 1


def test_teardown_leaves_nothing_even_after_an_exception(tmp_path):
    prefix = fresh_prefix("sgx")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"), FakeInternet(prefix, tmp_path) as fn:
        startup = time.monotonic() - t0
        straggler = fn.popen_in_host(["sleep", "60"])  # e.g. a gateway the test forgot
        pids = netns_pids(fn.host_ns) | netns_pids(fn.internet_ns)
        raise RuntimeError("boom")

    assert startup < 1.5
    assert straggler.wait(timeout=5) == -9
    assert len(pids) >= 4  # nginx master + worker(s), dnsmasq, echo server, sleep
    assert not [pid for pid in pids if alive(pid)]
    assert not list(NETNS_DIR.glob(prefix + "*"))
    fn.close()  # idempotent


def test_cleanup_prefix_removes_a_crashed_run(tmp_path):
    prefix = fresh_prefix("sgx")
    fn = FakeInternet(prefix, tmp_path)
    fn.start()  # and then "crash": never closed by its owner
    pids = netns_pids(fn.host_ns) | netns_pids(fn.internet_ns)
    try:
        cleanup_prefix(prefix)

        assert not list(NETNS_DIR.glob(prefix + "*"))
        assert not [pid for pid in pids if alive(pid)]
    finally:
        fn.close()


@pytest.mark.parametrize("prefix", ["", "s", "../x", "sgt/"])
def test_cleanup_prefix_refuses_a_sweeping_or_odd_prefix(prefix):
    with pytest.raises(ValueError):
        cleanup_prefix(prefix)


def test_nothing_is_added_to_the_root_namespace(fakenet):
    # The root namespace may itself use 192.0.2.0/24 (this CI machine does), so
    # look for our links and server/sandbox networks rather than the transfer net.
    assert os.stat(NETNS_DIR / fakenet.host_ns).st_ino != os.stat("/proc/self/ns/net").st_ino
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert fakenet.prefix not in links
    routes = subprocess.run(
        ["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    routes += subprocess.run(
        ["ip", "-6", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    for net in ("203.0.113.", "198.51.100.", "198.18.", "10.213.", "10.99.", "2001:db8:"):
        assert net not in routes
