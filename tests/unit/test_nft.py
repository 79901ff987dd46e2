"""enforcer/nft.py without a kernel: the rendered ruleset and the nft wrappers."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sandgate.enforcer import nft, nft_wire
from sandgate.enforcer.nft import NftError, RulesetConfig, render_ruleset

GOLDEN = Path(__file__).parent.parent / "fixtures" / "nft" / "ruleset.golden"
CONFIG = RulesetConfig(table="sandgate", sandbox_ifaces="sgh-*", proxy_port=8080, dns_port=5353)


@pytest.fixture(autouse=True)
def command_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `nft` command path, whose subprocess these tests fake. (libnftables would
    act on this process's namespace, the host's: its test runs in a netns of its own.)"""
    monkeypatch.setattr(nft, "_library", None)


def test_every_sandbox_interface_is_what_the_drop_to_other_sandboxes_names() -> None:
    from sandgate.enforcer import netns

    assert nft.ALL_SANDBOX_IFACES == netns.HOST_IF_PREFIX + "*"
    assert netns.host_if_name("ab12").startswith(nft.ALL_SANDBOX_IFACES[:-1])


def test_ruleset_matches_golden_file() -> None:
    assert render_ruleset(CONFIG) == GOLDEN.read_text(), (
        f"the ruleset changed: review the difference, then rewrite {GOLDEN}"
    )


def test_ruleset_replaces_only_its_own_table() -> None:
    text = render_ruleset(
        RulesetConfig(table="sandgate_ab12", sandbox_ifaces="sgh-ab12", proxy_port=1, dns_port=2)
    )
    tables = set(re.findall(r"^(?:delete )?table (\w+ \w+)", text, re.MULTILINE))
    assert tables == {"inet sandgate_ab12"}
    assert text.startswith("table inet sandgate_ab12\ndelete table inet sandgate_ab12\n")


def test_a_new_table_is_created_not_replaced() -> None:
    """`new`: the same ruleset, headed by `create table` (no delete in the transaction)."""
    replacing = render_ruleset(CONFIG)
    created = render_ruleset(CONFIG, new=True)
    assert created.startswith("create table inet sandgate\ntable inet sandgate {\n")
    assert "delete" not in created
    assert created.split("\n", 1)[1] == replacing.split("\n", 2)[2]


def test_every_rule_matches_sandbox_interfaces_only() -> None:
    text = render_ruleset(CONFIG)
    rules = [
        line.strip()
        for line in text.splitlines()
        if line.startswith("\t\t") and not line.strip().startswith("type ")
    ]
    assert rules
    for rule in rules:
        assert rule.startswith(('iifname "sgh-*" ', 'oifname "sgh-*" ')), rule


def test_counters_are_declared_and_used() -> None:
    text = render_ruleset(CONFIG)
    declared = re.findall(r"^\tcounter (\w+) \{", text, re.MULTILINE)
    used = set(re.findall(r'counter name "(\w+)"', text))
    assert declared == list(nft.COUNTERS)
    assert used == set(declared)


def test_no_chain_is_named_with_a_keyword() -> None:
    # "fwd" is an nft statement: a chain so named does not load.
    assert "chain fwd " not in render_ruleset(CONFIG)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"table": "sand gate"}, id="table-with-space"),
        pytest.param({"table": "sandgate; flush ruleset"}, id="table-injection"),
        pytest.param({"table": "1sandgate"}, id="table-leading-digit"),
        pytest.param({"sandbox_ifaces": 'sgh-*" accept #'}, id="iface-injection"),
        pytest.param({"sandbox_ifaces": "*"}, id="iface-every-interface"),
        pytest.param({"sandbox_ifaces": "a-name-of-16-chr"}, id="iface-too-long"),
        pytest.param({"sandbox_ifaces": "sg*h"}, id="iface-inner-wildcard"),
        pytest.param({"proxy_port": 0}, id="port-zero"),
        pytest.param({"dns_port": 65536}, id="port-too-big"),
        pytest.param({"proxy_port": "8080"}, id="port-string"),
        pytest.param({"proxy_port": True}, id="port-bool"),
        pytest.param({"dns_port": 8080}, id="ports-equal"),
        pytest.param({"connection_rate": 0}, id="rate-zero"),
        pytest.param({"connection_rate": "200"}, id="rate-string"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict) -> None:
    base = {"table": "sandgate", "sandbox_ifaces": "sgh-*", "proxy_port": 8080, "dns_port": 53}
    with pytest.raises(ValueError):
        RulesetConfig(**(base | kwargs))


def test_missing_nft_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft, "NFT", "/nonexistent/nft")
    with pytest.raises(NftError, match="install the nftables package"):
        nft.apply_ruleset(render_ruleset(CONFIG))


def test_nft_failure_carries_nft_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 1, "", "Error: syntax error, unexpected fwd\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(NftError, match="unexpected fwd"):
        nft.apply_ruleset("table inet x { chain fwd { } }")


def test_list_tables_parses_nft_json(monkeypatch: pytest.MonkeyPatch) -> None:
    output = """{"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "sandgate", "handle": 1}},
        {"table": {"family": "inet", "name": "sandgate_ab12", "handle": 7}},
        {"table": {"family": "inet", "name": "filter", "handle": 9}}
    ]}"""

    def fake_run(argv, **kwargs):
        assert argv == [nft.NFT, "-j", "list", "tables", "inet"]
        return subprocess.CompletedProcess(argv, 0, output, "")

    monkeypatch.setattr(nft, "_libnftables", lambda: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert nft.list_tables() == ["sandgate", "sandgate_ab12"]
    assert nft.list_tables("sandgate_") == ["sandgate_ab12"]


def _nfnl_answer(kind: int, flags: int, seq: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("!BBH", 1, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def _counter_object(seq: int, name: str, packets: int, flags: int = 0x2) -> bytes:
    data = _nla(1, struct.pack("!Q", packets * 40)) + _nla(2, struct.pack("!Q", packets))
    attrs = _nla(1, b"sandgate_ab\0") + _nla(2, name.encode() + b"\0") + _nla(3, b"\0\0\0\1")
    return _nfnl_answer(0x0A12, flags, seq, attrs + _nla(4 | 0x8000, data))  # NEWOBJ


def test_read_counters_is_one_dump_of_the_tables_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    """NFT_MSG_GETOBJ for the table's counters, dumped; a dump the kernel marks
    interrupted is asked for again; no such table is an NftError. Never libnftables."""
    sent, answers = [], []

    class FakeSocket:
        def __init__(self, family, kind, proto):
            assert (family, kind, proto) == (socket.AF_NETLINK, socket.SOCK_RAW, 12)

        def settimeout(self, timeout):
            pass

        def send(self, data):
            sent.append(data)
            seq = struct.unpack_from("=IHHII", data)[3]
            answers.append(next(dumps)(seq))

        def recv(self, size):
            return answers.pop(0)

    def interrupted(seq):  # a commit during the dump: what it says may be stale
        return _counter_object(seq, "dropped_udp", 1, flags=0x12) + _nfnl_answer(3, 0x12, seq)

    def whole(seq):
        objects = _counter_object(seq, "dropped_udp", 3) + _counter_object(seq, "dropped_icmp", 0)
        return _nfnl_answer(0x0A00, 0, seq + 1000) + objects + _nfnl_answer(3, 0x2, seq)

    dumps = iter([interrupted, whole, lambda seq: _nfnl_answer(3, 0x2, seq)])
    monkeypatch.setattr(socket, "socket", FakeSocket)
    monkeypatch.setattr(nft_wire, "_local", threading.local())
    monkeypatch.setattr(nft, "_run_nft", lambda *a, **k: pytest.fail("ran libnftables"))
    assert nft.read_counters("sandgate_ab") == {"dropped_udp": 3, "dropped_icmp": 0}
    kind, flags = struct.unpack_from("=IHH", sent[0])[1:]
    assert (kind, flags) == (0x0A13, 0x301)  # GETOBJ, a dump request
    assert b"sandgate_ab\0" in sent[0] and len(sent) == 2
    with pytest.raises(NftError, match="no such table"):
        nft.read_counters("sandgate_ab")


def test_delete_table_is_one_batch_of_one_deltable(monkeypatch: pytest.MonkeyPatch) -> None:
    """NFT_MSG_DELTABLE for `inet <table>` between a batch's begin and end, its answer
    asked for; never libnftables or the `nft` command (they read every table first)."""
    sent = []

    class FakeSocket:
        def __init__(self, family, kind, proto):
            assert (family, kind, proto) == (socket.AF_NETLINK, socket.SOCK_RAW, 12)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def settimeout(self, timeout):
            pass

        def send(self, data):
            sent.append(data)

        def recv(self, size):  # the kernel's acknowledgement of message 2: no error
            return struct.pack("=IHHIIi", 36, 2, 0, 2, 0, 0) + bytes(16)

    monkeypatch.setattr(socket, "socket", FakeSocket)
    monkeypatch.setattr(nft_wire, "_local", threading.local())  # not this thread's real one
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran nft"))
    nft.delete_table("sandgate_ab12")
    (batch,) = sent
    messages, offset = [], 0
    while offset < len(batch):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", batch, offset)
        messages.append((kind, flags, seq, batch[offset + 16 : offset + length]))
        offset += (length + 3) & ~3
    assert [(k, f, s) for k, f, s, _ in messages] == [(0x10, 1, 1), (0x0A02, 5, 2), (0x11, 1, 3)]
    family, _version, res_id = struct.unpack_from("!BBH", messages[1][3])
    assert (family, res_id) == (1, 0)  # NFPROTO_INET
    assert messages[1][3][4:].rstrip(b"\0").endswith(b"sandgate_ab12")
    assert struct.unpack_from("!BBH", messages[0][3])[2] == 10  # NFNL_SUBSYS_NFTABLES
    with pytest.raises(ValueError):
        nft.delete_table("x; flush ruleset")


def test_service_guard_matches_golden_file() -> None:
    """The service's guard: its ports answer only sandbox interfaces."""
    golden = GOLDEN.with_name("guard.golden").read_text()
    assert nft.render_guard("sandgatesvc", 40000, 40001) == golden


@pytest.mark.e2e
def test_service_guard_loads_in_nft(tmp_path) -> None:
    """nft itself accepts the guard (checked in a throwaway netns, never the host's)."""
    name = f"sgtguard{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        check = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "-c", "-f", "-"],
            input=nft.render_guard("sandgatesvc", 40000, 40001),
            text=True,
            capture_output=True,
        )
        assert check.returncode == 0, check.stderr
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.e2e
def test_libnftables_path_loads_reads_and_deletes_like_nft() -> None:
    """Through libnftables (no `nft` process), in a throwaway netns: the table loads,
    its counters read, a syntax error carries nft's message, delete is idempotent; a
    `new` table loads, and a second `new` load of its name fails and changes nothing."""
    name = f"sgtlib{os.getpid() % 10000}"
    script = """
import sys
import threading
from sandgate.enforcer import nft, nft_wire
assert nft._libnftables() is not None
nft.apply_ruleset(nft.render_ruleset(nft.RulesetConfig(
    table="sandgate_lib", sandbox_ifaces="sgh-lib", proxy_port=8080, dns_port=5353)))
assert nft.list_tables() == ["sandgate_lib"], nft.list_tables()
assert set(nft.read_counters("sandgate_lib")) == set(nft.COUNTERS)
try:
    nft.apply_ruleset("table inet sandgate_x { chain c { bogus } }")
    sys.exit("a broken ruleset loaded")
except nft.NftError as e:
    assert "syntax error" in str(e), e
nft.delete_table("sandgate_lib")
nft.delete_table("sandgate_lib")
assert nft.list_tables() == [], nft.list_tables()
# A new table: created, then a second `new` load of that name fails, leaving the first.
fresh = nft.RulesetConfig(table="sandgate_new", sandbox_ifaces="sgh-new", proxy_port=1, dns_port=2)
nft.apply_ruleset(nft.render_ruleset(fresh, new=True))
assert nft.list_tables() == ["sandgate_new"], nft.list_tables()
other = nft.RulesetConfig(table="sandgate_new", sandbox_ifaces="sgh-other", proxy_port=3, dns_port=4)
try:
    nft.apply_ruleset(nft.render_ruleset(other, new=True))
    sys.exit("a new table replaced or merged into one that existed")
except nft.NftError as e:
    assert "exist" in str(e).lower(), e
listed = nft._run_nft(["list", "table", "inet", "sandgate_new"])
assert "sgh-new" in listed and "sgh-other" not in listed, listed
# The deletion is committed when it returns: the table is gone.
nft.delete_table("sandgate_new")
assert nft.list_tables() == [], nft.list_tables()
# The deletion by netlink: that name exactly, not one it begins, nor one beside.
for name in ("sandgate_ab", "sandgate_abc", "sandgate_b"):
    nft.apply_ruleset(nft.render_ruleset(nft.RulesetConfig(
        table=name, sandbox_ifaces="sgh-" + name[9:], proxy_port=1, dns_port=2), new=True))
nft.delete_table("sandgate_ab")
assert nft.list_tables() == ["sandgate_abc", "sandgate_b"], nft.list_tables()
"""
    run = _python_in_netns(name, script)
    assert run.returncode == 0, run.stderr


def test_the_kernels_dns_rate_never_drops_what_a_profile_may_send() -> None:
    """The table's per-sandbox DNS packet rate is a flood guard, not a policy: no
    profile's dns_qps may exceed it."""
    from sandgate.proxy.policy.model import MAX_LIMITS

    assert MAX_LIMITS.dns_qps <= nft.DNS_PACKETS_PER_S
    assert f"limit rate over {nft.DNS_PACKETS_PER_S}/second" in render_ruleset(CONFIG)
    assert nft.dns_packet_rate(MAX_LIMITS.dns_qps) >= MAX_LIMITS.dns_qps


@pytest.mark.parametrize(
    ("dns_qps", "rate"),
    [
        pytest.param(50, 100, id="the default profile: twice its rate"),
        pytest.param(1, 2, id="the least"),
        pytest.param(500, 1000, id="twice reaches the most"),
        pytest.param(1000, 1000, id="never past the most"),
    ],
)
def test_the_sandboxs_table_drops_dns_the_gateway_would_not_answer(dns_qps, rate) -> None:
    """The gateway answers dns_qps a second and REFUSES as many more; the table drops
    what is past that, so a flood costs the gateway only what it answers."""
    from sandgate.proxy.policy.model import Limits

    rates = nft.table_rates(Limits(dns_qps=dns_qps, connection_rate=37))
    assert rates == {"connection_rate": 37, "dns_rate": rate}
    assert (
        f'iifname "sgh-*" udp dport 53 limit rate over {rate}/second burst {rate} packets '
        'counter name "dropped_dns_flood" drop'
    ) in render_ruleset(dataclasses.replace(CONFIG, **rates))


def test_the_sandboxs_table_caps_its_new_connections_at_its_profiles_rate() -> None:
    """A SYN past the sandbox's connection rate is dropped (and counted) before the
    redirect: only the SYN (a handshake's first packet, not its SYN-ACK or data)."""
    text = render_ruleset(dataclasses.replace(CONFIG, connection_rate=37))
    assert (
        'iifname "sgh-*" tcp flags & (syn | ack) == syn limit rate over 37/second '
        'burst 37 packets counter name "dropped_connect_flood" drop'
    ) in text
    assert f"over {nft.CONNECTIONS_PER_S}/second" in render_ruleset(CONFIG)


def test_no_tcp_is_accepted_before_the_connection_rate() -> None:
    """Every new TCP connection meets the sandbox's connection rate, DNS over TCP's
    too: in chain `early`, the only accept before the SYN limit is UDP DNS's (when
    `tcp dport 53 accept` came first, a task opened ~7,000 connections a second into
    the worker's DNS listener)."""
    early = render_ruleset(CONFIG).split("chain early {", 1)[1].split("\n\t}", 1)[0]
    rules = [line.strip() for line in early.splitlines() if line.strip().startswith("iifname")]
    limit = next(i for i, rule in enumerate(rules) if "dropped_connect_flood" in rule)
    accepted_before = [rule for rule in rules[:limit] if rule.endswith(" accept")]
    assert accepted_before == ['iifname "sgh-*" udp dport 53 accept']
    assert 'iifname "sgh-*" tcp dport 53 accept' in rules[limit + 1 :]


@pytest.mark.e2e
def test_a_process_holding_a_thousand_descriptors_still_runs_nft() -> None:
    """A gateway service holding its sandboxes' connections (descriptors past
    FD_SETSIZE): libnftables' select() on a socket numbered past 1024 made glibc abort
    the process at the next attach. Now the `nft` command runs it; the process lives,
    and the table loads and lists (in a throwaway netns)."""
    name = f"sgtfds{os.getpid() % 10000}"
    script = """
import os, resource
from sandgate.enforcer import nft, nft_wire
resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 2048))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
assert held[-1] > 1024, held[-1]
nft.apply_ruleset(nft.render_ruleset(nft.RulesetConfig(
    table="sandgate_fds", sandbox_ifaces="sgh-fds", proxy_port=8080, dns_port=5353)))
assert nft.list_tables() == ["sandgate_fds"], nft.list_tables()
nft.delete_table("sandgate_fds")
print("alive")
"""
    run = _python_in_netns(name, script)
    assert (run.returncode, run.stdout) == (0, "alive\n"), run.stderr


def _python_in_netns(name: str, script: str) -> subprocess.CompletedProcess:
    """`script` run by this Python in a throwaway netns `name` (removed after)."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        return subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", script],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
