"""A second `sandgate gateway` on the control socket of a live one (h-pcli2).

Found and closed: the second service set itself up first (audit log, guard table),
found the socket taken only at the end, and on its way out deleted the guard table,
which the first service's sandboxes need to be kept off the gateway's own ports
(fail-open). Now it is refused before it touches anything: one line, exit 125."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from sandgate.enforcer.service import guard_table
from support import sandbox
from support.sandbox import eventually
from support.service import TWO_PROFILES, GatewayProcess

pytestmark = pytest.mark.e2e


def _guard(net, service: GatewayProcess) -> str:
    table = guard_table(service.control)
    return net.run_in_host(["nft", "list", "table", "inet", table], check=False).stdout


@pytest.mark.parametrize("audit", ["its-own-audit-log", "the-same-audit-log"])
def test_a_second_service_on_a_live_socket_is_refused_and_changes_nothing(net, tmp_path, audit):
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    first = GatewayProcess(net, tmp_path, rules, "--workers", "1").start()
    try:
        guard_before = _guard(net, first)
        assert "drop" in guard_before
        lines_before = first.audit.read_text()
        second_audit = first.audit if audit == "the-same-audit-log" else tmp_path / "second.jsonl"
        argv = [
            "nsenter", f"--net={sandbox.NETNS_DIR / net.host_ns}", "--",
            sandbox.SANDGATE, "gateway", "--rules", str(rules), "--control", str(first.control),
            "--dns-upstream", net.dns_ip, "--audit-log", str(second_audit),
            "--metrics-listen", "off", "--admin-listen", "off", "--workers", "1", "--warm", "0",
        ]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 125, proc.stderr
        assert (
            proc.stderr.strip()
            == f"sandgate: another gateway service is running at {first.control}"
        )
        assert (
            _guard(net, first) == guard_before
        )  # the first's guard table is still there, unchanged
        assert first.audit.read_text().startswith(lines_before)
        assert first.audit.read_text().count("gateway service started") == 1  # not the second's
        if audit == "its-own-audit-log":
            assert not second_audit.exists()
        assert first.status()["policy"]  # the first still answers
    finally:
        first.stop()


def test_services_on_other_control_sockets_keep_their_own_guard_tables(net, tmp_path):
    """Two services on one host, each on its own control socket: they shared one guard
    table name, so the second replaced the first's table (the first's ports were open
    to the LAN from then on) and, stopping, deleted it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = GatewayProcess(net, tmp_path / "a", rules, "--workers", "1").start()
    try:
        guard_before = _guard(net, first)
        second = GatewayProcess(
            net, tmp_path / "b", rules, "--workers", "1", "--admin-listen", "127.0.0.1:9466"
        ).start()  # an address of its own: the first has the default (docs/operations.md)
        try:
            assert guard_table(first.control) != guard_table(second.control)
            assert _guard(net, first) == guard_before
            assert "drop" in _guard(net, second)
        finally:
            second.stop()
        assert _guard(net, second) == ""  # the second took its own table with it
        assert _guard(net, first) == guard_before  # and left the first's as it was
        assert first.status()["policy"]
    finally:
        first.stop()
    assert _guard(net, first) == ""


def _token_file(service: GatewayProcess) -> Path:
    (path,) = eventually(
        lambda: re.findall(r"\(token in (\S+)\)", service.log.read_text()), timeout=10
    )
    return Path(path)


def test_services_on_other_control_sockets_keep_their_own_token_and_upstream_ca(net, tmp_path):
    """Two services on one host: both wrote STATE_DIR's admin-token and upstream CA
    bundle, so the second's token replaced the first's (the first's page refused the
    token its admin read) and the second's --extra-ca replaced the CA bundle the first
    checks upstream certificates with (every inspected request through the first a
    502). Each now has its own directory; the second's goes when it stops."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = GatewayProcess(net, tmp_path / "a", rules, "--workers", "1").start()
    try:
        token_a = _token_file(first)
        token_before, bundle_a = token_a.read_text(), token_a.parent / "upstream-ca.pem"
        assert net.ca_cert.read_text().strip() in bundle_a.read_text()
        other_ca = tmp_path / "other-ca.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(tmp_path / "other.key"), "-out", str(other_ca),
             "-subj", "/CN=another service's CA", "-days", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        second = GatewayProcess(
            net, tmp_path / "b", rules, "--workers", "1",
            "--admin-listen", "127.0.0.1:9466", "--extra-ca", str(other_ca),
        ).start()  # fmt: skip
        try:
            token_b = _token_file(second)
            assert token_b.parent != token_a.parent
            assert other_ca.read_text().strip() in (token_b.parent / "upstream-ca.pem").read_text()
            assert token_a.read_text() == token_before  # the first's token, untouched
            assert other_ca.read_text().strip() not in bundle_a.read_text()
        finally:
            second.stop()
        assert not token_b.parent.exists()  # the second's token and bundle went with it
        assert token_a.read_text() == token_before and bundle_a.exists()
    finally:
        first.stop()
