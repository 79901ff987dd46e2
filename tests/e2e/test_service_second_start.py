"""A second `sandgate gateway` on the control socket of a live one (h-pcli2).

Found and closed: the second service set itself up first (audit log, guard table),
found the socket taken only at the end, and on its way out deleted the guard table,
which the first service's sandboxes need to be kept off the gateway's own ports
(fail-open). Now it is refused before it touches anything: one line, exit 125."""

from __future__ import annotations

import subprocess

import pytest
from support import sandbox
from support.service import TWO_PROFILES, GatewayProcess

pytestmark = pytest.mark.e2e


def _guard(net) -> str:
    return net.run_in_host(["nft", "list", "table", "inet", "sandgatesvc"]).stdout


@pytest.mark.parametrize("audit", ["its-own-audit-log", "the-same-audit-log"])
def test_a_second_service_on_a_live_socket_is_refused_and_changes_nothing(net, tmp_path, audit):
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    first = GatewayProcess(net, tmp_path, rules, "--workers", "1").start()
    try:
        guard_before = _guard(net)
        assert "sandgatesvc" in guard_before
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
        assert _guard(net) == guard_before  # the first's guard table is still there, unchanged
        assert first.audit.read_text().startswith(lines_before)
        assert first.audit.read_text().count("gateway service started") == 1  # not the second's
        if audit == "its-own-audit-log":
            assert not second_audit.exists()
        assert first.status()["policy"]  # the first still answers
    finally:
        first.stop()
