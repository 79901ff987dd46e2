"""`sandgate gc` and what a SIGKILLed service on its own control socket left (h-gcsvc).

Found and closed: a second service (`--control` another socket) keeps its upstream CA
bundle and admin token in STATE_DIR/services/<digest>/ and loads its own guard table;
a clean stop removes both, a SIGKILL left them for ever, since gc knew neither. Now
the service records itself in that directory (service_state.py) and gc removes the
directory and the guard table of one that is gone, and nothing of one that lives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sandgate.enforcer.service_state import guard_table, service_state_dir
from support import sandbox
from support.sandbox import curl, eventually
from support.service import GatewayProcess, attach

pytestmark = pytest.mark.e2e

# Inspected (a method rule): the service checks allowed.test's certificate with its
# own upstream CA bundle, in its state directory.
INSPECTED = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        methods: [GET]
        id: inspected
"""


def _guard(net, service: GatewayProcess) -> str:
    table = guard_table(service.control)
    return net.run_in_host(["nft", "list", "table", "inet", table], check=False).stdout


def _admin(service: GatewayProcess) -> tuple[str, Path]:
    """The service's approvals page and its token file, as its start line names them."""
    (found,) = eventually(
        lambda: re.findall(r"approvals page on (\S+) \(token in (\S+)\)", service.log.read_text()),
        timeout=10,
    )
    return found[0], Path(found[1])


def _admin_status(net, url: str, token: str) -> str:
    """The HTTP status of the approvals API for a bearer `token`."""
    argv = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"]
    argv += ["-H", f"Authorization: Bearer {token}", url + "api/approvals"]
    return net.run_in_host(argv, check=False).stdout.strip()


def _service(net, workdir: Path, rules: Path, admin_port: int) -> GatewayProcess:
    workdir.mkdir()
    return GatewayProcess(
        net, workdir, rules, "--workers", "1", "--warm", "0",
        "--admin-listen", f"127.0.0.1:{admin_port}",
    ).start()  # fmt: skip


def test_gc_removes_a_killed_services_state_and_guard_table(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(INSPECTED)
    service = _service(net, tmp_path / "a", rules, 9471)
    try:
        own, table = service_state_dir(service.control), guard_table(service.control)
        _, token_file = _admin(service)
        assert token_file.parent == own and (own / "upstream-ca.pem").exists()
        assert "drop" in _guard(net, service)
    finally:
        service.kill()
    assert own.exists() and "drop" in _guard(net, service)  # what the kill left

    listed = sandbox.gc(net, "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert f"would remove nft table {table}" in listed.stdout.splitlines()
    assert f"would remove service state {own}" in listed.stdout.splitlines()
    assert own.exists() and "drop" in _guard(net, service)  # a dry run touches nothing

    removed = sandbox.gc(net)
    assert removed.returncode == 0, removed.stderr
    assert f"removed nft table {table}" in removed.stdout.splitlines()
    assert f"removed service state {own}" in removed.stdout.splitlines()
    assert not own.exists()
    assert _guard(net, service) == ""


def test_gc_leaves_a_live_services_state_beside_a_killed_ones(net, tmp_path):
    """The live service keeps its directory and guard table, and with them its admin
    token and the CA bundle its inspected HTTPS checks upstreams with."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(INSPECTED)
    killed = _service(net, tmp_path / "killed", rules, 9472)
    killed.kill()
    live = _service(net, tmp_path / "live", rules, 9473)
    try:
        own, guard_before = service_state_dir(live.control), _guard(net, live)
        url, token_file = _admin(live)
        token = token_file.read_text().strip()
        assert _admin_status(net, url, token) == "200"

        result = sandbox.gc(net)
        assert result.returncode == 0, result.stderr
        assert f"removed service state {service_state_dir(killed.control)}" in result.stdout
        assert str(own) not in result.stdout, result.stdout
        assert guard_table(live.control) not in result.stdout, result.stdout

        assert sorted(p.name for p in own.iterdir()) == [
            "admin-token",
            "owner.json",
            "upstream-ca.pem",
        ]
        assert _guard(net, live) == guard_before
        assert live.status()["policy"]  # it answers
        assert _admin_status(net, url, token) == "200"  # its token is still the one
        r = attach(live, tmp_path, {"web": curl("https://allowed.test/")})
        assert r["web"].out.strip().splitlines()[-1] == "200", r.describe()
        assert any(e.get("rule_id") == "inspected" for e in r.audit), r.audit
    finally:
        live.stop()
    assert not own.exists()  # a clean stop still removes it
