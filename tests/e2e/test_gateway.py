"""The gateway end to end: `sandgate run` in the fake internet (issue 3's test cases).

Each test runs a few clients in one sandbox (tests/support/sandbox.py) and asserts
three things: what each client got; what the fake internet's servers saw (for a
forbidden destination: nothing at all); and the audit-log decision, by reason and
rule id. Clients trust only the sandbox's system CA bundle, and never use -k.

Rules: rules/examples/demo.yaml unless a test writes its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import (
    NETNS_DIR,
    VETH_INTO_HOST_NETNS,
    curl,
    dig,
    eventually,
    icmp_echo,
    leftovers,
    netns_inode,
    pids_in_netns,
    py_get,
    py_issuer,
    python,
    tcp_hello,
    udp_send,
)

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test, www.allowed.test, ssh.allowed.test
API_IP = "203.0.113.11"  # api.allowed.test: inspected, GET/HEAD on /public/** only
EVIL_IP = "203.0.113.66"  # evil.test and friends
V6_IP = "2001:db8::10"
METADATA_IP = "169.254.169.254"
INTERNAL_IP = "10.99.0.10"

FALLBACK = ("deny", "no_rule", "default:fallback")
SPOOFED = ("deny", "spoofed_destination", "builtin:spoofed-destination")
MISMATCH = ("deny", "host_mismatch", "builtin:host-mismatch")
PRIVATE = ("deny", "private_address", "builtin:private-address")
REBINDING = ("deny", "dns_rebinding", "builtin:dns-rebinding")
NOT_HTTP = ("deny", "not_http", "builtin:not-http")
ALLOWED = ("allow", "rule_allow", "demo-allowed")

FAKE_CA = "sandgate fake internet CA"  # issuer of the fake internet's server certificate
GATEWAY_CA = "mitmproxy"  # issuer of the certificates the gateway makes when it inspects


@pytest.fixture
def net(fakenet):
    """The session's fake internet, with its server logs read from here on."""
    fakenet.clear_logs()
    return fakenet


def settled(probe):
    """nginx logs a request just after answering it: give the log a moment."""
    return eventually(probe, timeout=2.0)


# 1 ---------------------------------------------------------------------------------


def test_allowed_http_and_https_with_curl_and_python(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "curl_https": curl("https://allowed.test/"),
        "curl_http": curl("http://allowed.test/"),
        "python_https": py_get("https://allowed.test/py"),
        "python_http": py_get("http://allowed.test/py"),
        "issuer": py_issuer("allowed.test"),
    })  # fmt: skip

    for label in ("curl_https", "curl_http", "python_https", "python_http"):
        assert (r[label].rc, r[label].status) == (0, 200), r.describe()
    # Passed through untouched: the server's own certificate reached the client.
    assert r["issuer"].out.strip() == FAKE_CA, r.describe()
    seen = settled(
        lambda: len(net.requests_seen(ALLOWED_IP)) >= 4 and net.requests_seen(ALLOWED_IP)
    )
    assert sorted((e["scheme"], e["sni"], e["uri"]) for e in seen) == [
        ("http", "", "/"),
        ("http", "", "/py"),
        ("https", "allowed.test", "/"),
        ("https", "allowed.test", "/py"),
    ]
    assert r.verdicts(kind="connection", name="allowed.test") == {ALLOWED}
    assert r.verdicts(kind="request", name="allowed.test") == {ALLOWED}
    assert r.returncode == 0


# 2 ---------------------------------------------------------------------------------


def test_blocked_domain_gets_nxdomain_and_even_pinned_never_reaches_its_server(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "by_name": curl("https://evil.test/"),
        "pinned_https": curl("--resolve", f"evil.test:443:{EVIL_IP}", "https://evil.test/"),
        "pinned_http": curl("--resolve", f"evil.test:80:{EVIL_IP}", "http://evil.test/"),
        "deny_rule": dig("forbidden.test"),
    })  # fmt: skip

    assert r["by_name"].rc == 6, r.describe()  # could not resolve host
    assert (r["pinned_https"].rc, r["pinned_https"].status) == (35, 0), r.describe()  # TLS cut
    assert r["pinned_http"].status == 403 and "no_rule" in r["pinned_http"].body, r.describe()
    assert r["deny_rule"].dns_status == "NXDOMAIN", r.describe()
    assert net.requests_seen(EVIL_IP) == []
    assert not {"evil.test", "forbidden.test"} & set(net.dns_queries_seen())
    assert r.verdicts(kind="dns", name="evil.test") == {FALLBACK}
    assert r.verdicts(kind="connection", name="evil.test", dst_ip=EVIL_IP) == {FALLBACK}
    assert r.verdicts(kind="request", name="evil.test", dst_ip=EVIL_IP) == {FALLBACK}
    assert r.verdicts(kind="dns", name="forbidden.test") == {
        ("deny", "rule_deny", "demo-forbidden")
    }


# 3 ---------------------------------------------------------------------------------


def test_blocked_raw_ip(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "https": curl(f"https://{EVIL_IP}/"),
        "http": curl(f"http://{EVIL_IP}/"),
    })  # fmt: skip

    assert (r["https"].rc, r["https"].status) == (35, 0), r.describe()
    assert r["http"].status == 403 and "no_rule" in r["http"].body, r.describe()
    assert net.requests_seen(EVIL_IP) == []
    # TLS to a bare IP has no SNI; no IP rule allows the address.
    assert r.verdicts(kind="connection", dst_ip=EVIL_IP, dst_port=443) == {
        ("deny", "missing_sni", "builtin:missing-sni")
    }
    assert r.verdicts(kind="request", dst_ip=EVIL_IP, dst_port=80) == {FALLBACK}


# 4 ---------------------------------------------------------------------------------


def test_sni_spoofing_an_allowed_name_at_another_address_is_blocked(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "resolve": dig("allowed.test"),
        "https": curl("--resolve", f"allowed.test:443:{EVIL_IP}", "https://allowed.test/"),
        "http": curl("--resolve", f"allowed.test:80:{EVIL_IP}", "http://allowed.test/"),
    })  # fmt: skip

    assert r["resolve"].dns_answers == [ALLOWED_IP], r.describe()
    assert (r["https"].rc, r["https"].status) == (35, 0), r.describe()
    assert r["http"].status == 403 and "spoofed_destination" in r["http"].body, r.describe()
    assert net.requests_seen(EVIL_IP) == []
    assert r.verdicts(kind="connection", name="allowed.test", dst_ip=EVIL_IP) == {SPOOFED}
    assert r.verdicts(kind="request", name="allowed.test", dst_ip=EVIL_IP) == {SPOOFED}


# 5 ---------------------------------------------------------------------------------


def test_host_header_that_disagrees_is_refused(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "http_evil_host": curl("-H", "Host: evil.test", "http://allowed.test/"),
        "http_ip_host": curl("-H", f"Host: {EVIL_IP}", "http://allowed.test/"),
        "https_evil_host": curl("-H", "Host: evil.test", "https://api.allowed.test/public/x"),
        "https_other_host": curl("-H", "Host: allowed.test", "https://api.allowed.test/public/x"),
    })  # fmt: skip

    for label, reason in (
        ("http_evil_host", "no_rule"),
        ("http_ip_host", "host_mismatch"),
        ("https_evil_host", "host_mismatch"),
        ("https_other_host", "host_mismatch"),
    ):
        assert r[label].status == 403 and reason in r[label].body, r.describe()
    assert net.requests_seen() == []  # no request reached any server
    # Plain HTTP has no SNI: a Host naming a destination that no rule allows is
    # judged as that destination (tests/unit/test_addon.py pins no_rule here); a
    # Host that contradicts the destination address is a mismatch.
    assert r.verdicts(kind="request", name="evil.test", dst_ip=ALLOWED_IP) == {FALLBACK}
    assert r.verdicts(kind="request", name=None, dst_ip=ALLOWED_IP, dst_port=80) == {MISMATCH}
    # Inspected TLS: the Host must be the SNI.
    assert r.verdicts(kind="request", dst_ip=API_IP) == {MISMATCH}
    assert {e["name"] for e in r.events(kind="request", dst_ip=API_IP)} == {
        "evil.test",
        "allowed.test",
    }


# 6 ---------------------------------------------------------------------------------

WILDCARD_RULES = """\
# Only a wildcard: the apex and look-alike names must stay out.
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: "*.allowed.test"
        id: wild
"""


def test_wildcard_matches_subdomains_only_not_apex_or_look_alikes(net, tmp_path):
    rules = tmp_path / "wildcard.yaml"
    rules.write_text(WILDCARD_RULES)
    r = sandbox.run(net, tmp_path, {
        "sub": curl("https://www.allowed.test/"),
        "deeper": dig("x.www.allowed.test"),
        "apex": dig("allowed.test"),
        "prefix": dig("evilallowed.test"),
        "suffix": dig("allowed.test.evil.test"),
        "apex_pinned": curl("--resolve", f"allowed.test:443:{ALLOWED_IP}", "https://allowed.test/"),
        "prefix_pinned": curl("--resolve", f"evilallowed.test:443:{EVIL_IP}", "https://evilallowed.test/"),
        "suffix_pinned": curl(
            "--resolve", f"allowed.test.evil.test:443:{EVIL_IP}", "https://allowed.test.evil.test/"
        ),
    }, rules=rules)  # fmt: skip

    assert r["sub"].status == 200, r.describe()
    for label in ("apex", "prefix", "suffix"):
        assert r[label].dns_status == "NXDOMAIN", r.describe()
    for label in ("apex_pinned", "prefix_pinned", "suffix_pinned"):
        assert (r[label].rc, r[label].status) == (35, 0), r.describe()
    # x.www.allowed.test has no record in the fake internet: the wildcard lets the
    # question through to the upstream, which answers NXDOMAIN.
    assert r["deeper"].dns_status == "NXDOMAIN"
    assert r.verdicts(kind="dns", name="x.www.allowed.test") == {("allow", "rule_allow", "wild")}
    queried = set(net.dns_queries_seen())
    assert {"www.allowed.test", "x.www.allowed.test"} <= queried
    assert not {"allowed.test", "evilallowed.test", "allowed.test.evil.test"} & queried
    seen = settled(lambda: net.requests_seen(ALLOWED_IP))
    assert [(e["sni"], e["uri"]) for e in seen] == [("www.allowed.test", "/")]
    assert net.requests_seen(EVIL_IP) == []
    for name in ("allowed.test", "evilallowed.test", "allowed.test.evil.test"):
        assert r.verdicts(kind="dns", name=name) == {FALLBACK}, name
        assert r.verdicts(kind="connection", name=name) == {FALLBACK}, name
    assert r.verdicts(kind="connection", name="www.allowed.test") == {
        ("allow", "rule_allow", "wild")
    }


# 7 ---------------------------------------------------------------------------------


def test_dns_is_filtered_and_every_resolver_is_the_gateway(net, tmp_path):
    with sandbox.sink(net, EVIL_IP, 53, tmp_path / "dns-sink.log") as evil_resolver_saw:
        r = sandbox.run(net, tmp_path, {
            "forbidden": dig("evil.test"),
            "txt": dig("TXT", "www.allowed.test"),
            "mx": dig("MX", "www.allowed.test"),
            "other_resolver": dig(f"@{EVIL_IP}", "allowed.test"),
            "other_resolver_tcp": dig("+tcp", f"@{EVIL_IP}", "api.allowed.test"),
            "upstream_itself": dig(f"@{net.dns_ip}", "evil.test"),
        })  # fmt: skip
        assert evil_resolver_saw() == []

    assert r["forbidden"].dns_status == "NXDOMAIN", r.describe()
    assert (r["txt"].dns_status, r["mx"].dns_status) == ("REFUSED", "REFUSED"), r.describe()
    # 203.0.113.66 runs no resolver that answers: these answers are the gateway's.
    assert r["other_resolver"].dns_answers == [ALLOWED_IP], r.describe()
    assert r["other_resolver_tcp"].dns_answers == [API_IP], r.describe()
    assert r["upstream_itself"].dns_status == "NXDOMAIN", r.describe()
    queried = set(net.dns_queries_seen())
    assert {"allowed.test", "api.allowed.test"} <= queried  # allowed questions go upstream
    assert not {"evil.test", "www.allowed.test"} & queried  # refused ones never do
    assert r.verdicts(kind="dns", name="evil.test") == {FALLBACK}
    assert r.verdicts(kind="dns", name="www.allowed.test") == {
        ("deny", "dns_qtype_not_allowed", "builtin:dns-qtype")
    }
    assert r.verdicts(kind="dns", name="allowed.test") == {ALLOWED}


# 8 ---------------------------------------------------------------------------------


def test_udp_icmp_and_ipv6_are_dropped_and_counted(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "udp_socat": f"echo hello | socat -u - UDP:{EVIL_IP}:9999",
        "udp_python": udp_send(EVIL_IP, 9999, count=3),
        "quic": udp_send(ALLOWED_IP, 443),
        "icmp": icmp_echo(ALLOWED_IP),
        "aaaa": dig("AAAA", "v6.allowed.test"),
        "v6_by_name": curl("-6", "https://v6.allowed.test/", timeout=3),
        "v6_literal": curl("-g", f"https://[{V6_IP}]/", timeout=3),
        "v6_link_local": udp_send("ff02::1%eth0", 9999),
    })  # fmt: skip

    for label in ("udp_socat", "udp_python", "quic", "v6_link_local"):
        assert r[label].rc == 0, r.describe()  # sent: the drop happens at the gateway
    # The task has no CAP_NET_RAW on the host (its own user namespace), so it cannot even
    # open a raw socket; nftables' ICMP drop stays as the second wall (test_kernel_enforcement).
    assert (r["icmp"].rc, r["icmp"].err.strip()) == (2, "refused"), r.describe()
    assert r["aaaa"].dns_answers == [V6_IP], r.describe()
    for label in ("v6_by_name", "v6_literal"):
        assert r[label].rc != 0 and r[label].status == 0, r.describe()  # no IPv6 route
    assert net.udp_datagrams_seen() == 0
    assert net.requests_seen(V6_IP) == [] and net.requests_seen(ALLOWED_IP) == []
    drops = r.summary["firewall_drops"]
    assert drops.get("dropped_udp", 0) >= 5, drops
    assert drops.get("dropped_ipv6", 0) >= 1, drops


# 9 ---------------------------------------------------------------------------------


def test_metadata_and_private_addresses_are_blocked_by_ip_and_by_name(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "metadata_http": curl(f"http://{METADATA_IP}/latest/meta-data/"),
        "metadata_https": curl(f"https://{METADATA_IP}/"),
        "metadata_name": dig("metadata.test"),
        "metadata_name_curl": curl("http://metadata.test/"),
        "internal_name": dig("internal.test"),
        "internal_pinned": curl("--resolve", f"internal.test:80:{INTERNAL_IP}", "http://internal.test/"),
    })  # fmt: skip

    for label in ("metadata_http", "metadata_https", "internal_pinned"):
        assert r[label].rc != 0 and r[label].status == 0, r.describe()  # closed at connect
    # The names are allowed (rule demo-private-names), their private answers are not.
    for label in ("metadata_name", "internal_name"):
        assert (r[label].dns_status, r[label].dns_answers) == ("NOERROR", []), r.describe()
    assert r["metadata_name_curl"].rc == 6, r.describe()
    assert net.requests_seen(METADATA_IP) == [] and net.requests_seen(INTERNAL_IP) == []
    assert r.verdicts(kind="connection", dst_ip=METADATA_IP) == {PRIVATE}
    assert r.verdicts(kind="connection", dst_ip=INTERNAL_IP) == {PRIVATE}
    for name, ip in (("metadata.test", METADATA_IP), ("internal.test", INTERNAL_IP)):
        stripped = r.events(kind="dns", name=name, reason="dns_rebinding")
        assert stripped and all(ip in e["detail"] for e in stripped), r.describe()
        assert REBINDING in r.verdicts(kind="dns", name=name)


# 10 --------------------------------------------------------------------------------


def test_method_and_path_rules_are_enforced_through_interception(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "get": curl("https://api.allowed.test/public/x"),
        "python_get": py_get("https://api.allowed.test/public/y"),
        "post": curl("-X", "POST", "-d", "secret=1", "https://api.allowed.test/public/x"),
        "python_delete": py_get("https://api.allowed.test/public/x", method="DELETE"),
        "private": curl("https://api.allowed.test/private"),
        "issuer": py_issuer("api.allowed.test"),
    })  # fmt: skip

    assert (r["get"].status, r["python_get"].status) == (200, 200), r.describe()
    # Intercepted: the certificate is the gateway's, trusted through the system bundle.
    assert r["issuer"].out.strip() == GATEWAY_CA, r.describe()
    for label, reason in (
        ("post", "method_not_allowed"),
        ("python_delete", "method_not_allowed"),
        ("private", "path_not_allowed"),
    ):
        body = r[label].body
        assert r[label].status == 403, r.describe()
        assert "Blocked by sandgate" in body and reason in body and "demo-api-read-only" in body, (
            body
        )
    seen = settled(lambda: len(net.requests_seen(API_IP)) >= 2 and net.requests_seen(API_IP))
    assert sorted((e["method"], e["uri"], e["sni"]) for e in seen) == [
        ("GET", "/public/x", "api.allowed.test"),
        ("GET", "/public/y", "api.allowed.test"),
    ]
    api = {"kind": "request", "name": "api.allowed.test"}
    assert r.verdicts(**api, method="GET", path="/public/x") == {
        ("allow", "rule_allow", "demo-api-read-only")
    }
    # The fallback answers; its reason says how near demo-api-read-only came.
    assert r.verdicts(**api, method="POST") == {("deny", "method_not_allowed", "default:fallback")}
    assert r.verdicts(**api, method="DELETE") == {
        ("deny", "method_not_allowed", "default:fallback")
    }
    assert r.verdicts(**api, path="/private") == {("deny", "path_not_allowed", "default:fallback")}


# 11 --------------------------------------------------------------------------------


def _host_links(net) -> str:
    return net.run_in_host(["ip", "-o", "link"], check=True).stdout


def test_root_in_the_sandbox_cannot_change_its_egress(net, tmp_path):
    host_links_before = _host_links(net)
    r = sandbox.run(net, tmp_path, {
        # The sandbox's own routes and nftables: enforcement does not live there, and
        # with no capability in the initial user namespace (enforcer/sandbox/init.py) root cannot touch them.
        "route_default": "ip route replace default dev eth0",
        "route_direct": "ip route add 203.0.113.0/24 dev eth0",
        "nft_flush": "nft flush ruleset",
        # A second way out: a link into the gateway's host netns (named by its netns
        # id: the veth's peer lives there) or, by file, into the fake internet's.
        "link_into_host": python(VETH_INTO_HOST_NETNS, "sgprobe0", "sgprobe1"),
        "link_into_internet": f"ip link add sgprobe2 type veth peer name sgprobe3 netns {net.internet_ns}",
        "host_uplink_mtu": f"echo 1280 > /sys/class/net/{net.host_if}/mtu",
        "nsenter_init": "nsenter --net=/proc/1/ns/net true",
        "nsenter_host": f"nsenter --net={NETNS_DIR / net.host_ns} true",
        "netns_exec_host": f"ip netns exec {net.host_ns} true",
        "mount": "mount -t tmpfs none /mnt",
        "umount_resolv_conf": "umount /etc/resolv.conf",
        # sandgate's own state (the gateway CA's private key, audit logs) is covered.
        "read_ca_key": "cat /var/lib/sandgate/ca/mitmproxy-ca.pem",
        "umount_state": "umount /var/lib/sandgate",
        # Whatever the above did or did not do:
        "allowed": curl("https://allowed.test/"),
        "blocked_ip_https": curl(f"https://{EVIL_IP}/"),
        "blocked_ip_http": curl(f"http://{EVIL_IP}/"),
        "blocked_name": curl("--resolve", f"evil.test:443:{EVIL_IP}", "https://evil.test/"),
    })  # fmt: skip

    tampering = (
        "link_into_host", "link_into_internet", "host_uplink_mtu", "route_default",
        "route_direct", "nft_flush", "nsenter_init", "nsenter_host", "netns_exec_host", "mount",
        "umount_resolv_conf", "read_ca_key", "umount_state",
    )  # fmt: skip
    for label in tampering:
        assert r[label].rc != 0, f"{label} succeeded as root in the sandbox\n{r.describe()}"
    assert "created" not in r["link_into_host"].out
    # No link added, the uplink's MTU unchanged; the sandbox's veth is the kernel's to
    # delete moments after the run (netns.release_sandbox_net).
    assert eventually(lambda: _host_links(net) == host_links_before, timeout=5), (
        _host_links(net),
        host_links_before,
    )
    assert "sgprobe" not in net.run_in_internet(["ip", "-o", "link"], check=True).stdout

    assert r["allowed"].status == 200, r.describe()
    assert (r["blocked_ip_https"].rc, r["blocked_name"].rc) == (35, 35), r.describe()
    assert r["blocked_ip_http"].status == 403, r.describe()
    assert net.requests_seen(EVIL_IP) == []
    assert [e["sni"] for e in settled(lambda: net.requests_seen(ALLOWED_IP))] == ["allowed.test"]
    assert r.verdicts(kind="connection", dst_ip=EVIL_IP, dst_port=443, name=None) == {
        ("deny", "missing_sni", "builtin:missing-sni")
    }
    assert r.verdicts(kind="connection", name="evil.test") == {FALLBACK}


# 12 --------------------------------------------------------------------------------


def test_gateway_killed_mid_task_leaves_the_sandbox_without_egress(net, tmp_path):
    shared, rw = sandbox.shared_dir(tmp_path)
    results = shared / "loop.txt"
    attempt = f"{curl('https://allowed.test/', timeout=1)} 2>/dev/null | tail -n1"
    blocked = f"{curl(f'http://{EVIL_IP}/', timeout=1)} 2>/dev/null | tail -n1"
    script = f'while true; do echo "$({attempt}) $({blocked})" >> {results}; sleep 0.05; done'
    # In the test's mount namespace, as on a real host, so that the netns outlives sandgate.
    started = sandbox.start(net, tmp_path, script, host_mounts=True, extra=rw)
    run_id = None
    try:
        run_id = started.run_id()
        netns = f"sg-{run_id}"
        # The task loops; the gateway answers: the allowed name 200, the raw IP 403.
        assert eventually(lambda: results.exists() and "200 403" in results.read_text(), 10)
        sandbox_ns = netns_inode(NETNS_DIR / netns)
        assert sandbox_ns and pids_in_netns(sandbox_ns), "no task process in the sandbox netns"

        os.kill(started.pid, signal.SIGKILL)
        started.popen.wait(timeout=10)

        # The task dies with its runner: nothing runs in the sandbox's netns any more.
        assert eventually(lambda: not pids_in_netns(sandbox_ns)), sandbox.processes_of(run_id)
        lines = results.read_text().count("\n")
        time.sleep(0.3)
        assert results.read_text().count("\n") == lines, "the task still writes results"

        # Netns, veth and table are left, but nothing listens behind the redirects.
        assert netns_inode(NETNS_DIR / netns) == sandbox_ns
        assert net.run_in_host(["ip", "link", "show", f"sgh-{run_id}"]).returncode == 0
        net.clear_logs()
        route = subprocess.run(
            ["ip", "-n", netns, "route", "show", "default"], capture_output=True, text=True
        )
        gateway_ip = route.stdout.split()[2]
        probes = {
            "allowed": [
                "curl", "-sS", "-m", "2", "--cacert", str(net.ca_cert),
                "--resolve", f"allowed.test:443:{ALLOWED_IP}", "https://allowed.test/",
            ],
            "raw_ip": ["curl", "-sS", "-m", "2", f"http://{EVIL_IP}/"],
            "dns_gateway": ["dig", "+time=1", "+tries=1", f"@{gateway_ip}", "allowed.test"],
            "dns_upstream": ["dig", "+time=1", "+tries=1", f"@{net.dns_ip}", "evil.test"],
        }  # fmt: skip
        for label, argv in probes.items():
            probe = subprocess.run(
                ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=10
            )
            assert probe.returncode != 0, f"{label} got out: {probe.stdout[-500:]}"
        assert net.requests_seen() == [] and net.dns_queries_seen() == []

        cleaned = sandbox.gc(net)
        assert cleaned.returncode == 0, cleaned.stderr
        for what in (
            f"netns sg-{run_id}",
            f"nft table sandgate_{run_id}",
            f"state /run/sandgate/{run_id}",
        ):
            assert what in cleaned.stdout, cleaned.stdout
        assert leftovers(net, run_id) == []
    finally:
        started.kill()
        if run_id is not None and leftovers(net, run_id):
            sandbox.gc(net)  # never leave a sg-* netns behind


# 13 --------------------------------------------------------------------------------


def test_exit_codes_propagate(net, tmp_path):
    assert sandbox.run(net, tmp_path, command=["sh", "-c", "exit 7"]).returncode == 7
    missing = sandbox.run(net, tmp_path, command=["sandgate-test-no-such-command"])
    assert missing.returncode == 127
    assert "sandgate-test-no-such-command" in missing.stderr


@pytest.mark.parametrize(
    "task, code",
    [
        pytest.param("trap 'echo TERM > {marker}; exit 42' TERM; touch {ready}; sleep 30 & wait $!",
                     42, id="trapped"),
        # (The marker before `ready`: a SIGTERM between the two left it empty.)
        pytest.param("echo TERM > {marker}; touch {ready}; exec sleep 30", 128 + signal.SIGTERM,
                     id="killed-by-it"),
    ],
)  # fmt: skip
def test_sigterm_reaches_the_task_and_its_exit_code_comes_back(net, tmp_path, task, code):
    shared, rw = sandbox.shared_dir(tmp_path)
    marker, ready = shared / "marker", shared / "ready"
    started = sandbox.start(net, tmp_path, task.format(marker=marker, ready=ready), extra=rw)
    try:
        assert eventually(ready.exists, timeout=10), "the task never started"
        signalled = time.monotonic()
        started.popen.send_signal(signal.SIGTERM)
        result = started.finish(timeout=20)
    finally:
        started.kill()
    assert time.monotonic() - signalled < 5, "sandgate waited for the task's sleep"
    assert marker.read_text().strip() == "TERM"
    assert result.returncode == code, result.describe()
    assert leftovers(net, result.run_id) == []


# 14 --------------------------------------------------------------------------------


def test_nothing_is_left_behind(net, tmp_path):
    """Every sandbox.run checks its own run; this also looks for strays of any run."""
    runs = [
        sandbox.run(net, tmp_path, {"curl": curl("https://allowed.test/")}),
        sandbox.run(net, tmp_path, command=["sh", "-c", "sleep 30 & sleep 30 & exit 3"]),
    ]
    assert [r.returncode for r in runs] == [0, 3]
    for r in runs:
        assert leftovers(net, r.run_id) == []
    tables = net.run_in_host(["nft", "list", "tables"], check=True).stdout
    assert "sandgate_" not in tables
    assert "sgh-" not in net.run_in_host(["ip", "-o", "link"], check=True).stdout


# 15 --------------------------------------------------------------------------------


def test_raw_tcp_is_named_by_the_sandboxes_dns_bindings(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "before_any_name": tcp_hello(ALLOWED_IP, 22),
        "resolve_web_name": dig("allowed.test"),
        "by_web_name": tcp_hello("allowed.test", 22),  # same address, a rule for 80/443 only
        "ssh": tcp_hello("ssh.allowed.test", 22),
        "evil_ip": tcp_hello(EVIL_IP, 22),
        "evil_name": tcp_hello("evil.test", 22),
        "not_http_80": tcp_hello("allowed.test", 80, "SSH-2.0-tunnel\r\n"),
        "not_http_443": tcp_hello("allowed.test", 443, "SSH-2.0-tunnel\r\n"),
    })  # fmt: skip

    assert (r["ssh"].rc, r["ssh"].out.strip()) == (0, "SSH-2.0-fake"), r.describe()
    for label in ("before_any_name", "by_web_name", "evil_ip", "evil_name", "not_http_80",
                  "not_http_443"):  # fmt: skip
        assert r[label].rc == 1 and r[label].out == "", r.describe()
    assert "Name or service not known" in r["evil_name"].err
    assert net.tcp_connections_seen(ALLOWED_IP, 22) == 1  # the ssh.allowed.test one
    assert net.tcp_connections_seen(EVIL_IP, 22) == 0
    assert net.requests_seen() == []  # the non-HTTP bytes never reached nginx
    assert r.verdicts(kind="connection", name="ssh.allowed.test") == {
        ("allow", "rule_allow", "demo-ssh")
    }
    assert r.verdicts(kind="connection", dst_ip=ALLOWED_IP, dst_port=22, name=None) == {FALLBACK}
    assert r.verdicts(kind="connection", dst_ip=EVIL_IP, dst_port=22) == {FALLBACK}
    assert r.verdicts(kind="connection", dst_ip=ALLOWED_IP, dst_port=80) == {NOT_HTTP}
    assert r.verdicts(kind="connection", dst_ip=ALLOWED_IP, dst_port=443) == {NOT_HTTP}
