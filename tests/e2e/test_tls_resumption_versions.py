"""A red team (session 49): the forbidden tenant's session resumed under allowed.test in TLS
1.0 and 1.1 (a Python sni_callback dispatcher that accepts them): refused as in 1.2."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
DISPATCH = HERE / "sni_router" / "sni_dispatch.py"
PY = sandbox.SANDBOX_PYTHON
IP, PORT, FORBIDDEN = "203.0.113.10", 8443, "www.allowed.test"
RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        id: tenant-allowed
"""


def s_client(version: str, path: str, sni: str, *options: str) -> str:
    request = f"GET {path} HTTP/1.1\\r\\nHost: {sni}\\r\\nConnection: close\\r\\n\\r\\n"
    return (
        f"printf '{request}' | timeout 10 openssl s_client -quiet -{version} "
        f"-cipher DEFAULT:@SECLEVEL=0 -connect {IP}:{PORT} -servername {sni} {' '.join(options)}"
    )


@pytest.mark.parametrize("version", ["tls1", "tls1_1"])
def test_old_versions_do_not_resume_the_forbidden_session(net, tmp_path, version):
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    log = tmp_path / "tenants.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    inside = ["ip", "netns", "exec", net.internet_ns]
    tenants = ["allowed.test=ALLOWED-TENANT", f"{FORBIDDEN}=FORBIDDEN-TENANT"]
    dispatch = [PY, str(DISPATCH), "--old-versions", IP, str(PORT), cert, key, str(log), *tenants]
    with internet_servers(net, [dispatch], [f"{IP}:{PORT}"]):
        sess = tmp_path / "f.sess"
        got = subprocess.run(
            [*inside, "sh", "-c", s_client(version, "/accomplice", FORBIDDEN, f"-sess_out {sess}")],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert "SECRET of FORBIDDEN" in got.stdout, got.stdout + got.stderr
        nt = "-no_ticket"
        got = subprocess.run(
            [*inside, "sh", "-c",
             s_client(version, "/accomplice", FORBIDDEN, nt, f"-sess_out {tmp_path / 'i.sess'}")],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "honest": s_client(version, "/honest", "allowed.test", "-sess_out own.sess"),
            "own": s_client(version, "/own", "allowed.test", "-sess_in own.sess"),
            "resumed": s_client(version, "/resumed", "allowed.test", "-sess_in f.sess"),
            "id": s_client(version, "/id", "allowed.test", nt, "-sess_in i.sess"),
        }

        def setup(d):
            shutil.copy(sess, d / "f.sess")
            shutil.copy(tmp_path / "i.sess", d / "i.sess")

        result = sandbox.run(net, tmp_path, steps, rules=rules, setup=setup)
    tenants = log.read_text()
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "SECRET of ALLOWED" in result["honest"].out, why
    assert "SECRET of ALLOWED" in result["own"].out, why
    assert "request='GET /own HTTP/1.1' resumed=True" in tenants, why
    for label in ("resumed", "id"):
        assert "SECRET of FORBIDDEN" not in result[label].out, (label, why)
        assert not [
            line for line in tenants.splitlines() if "FORBIDDEN" in line and f"/{label} " in line
        ], (label, why)
    # The ticket's resumption is refused (Python's server keeps no session-id cache:
    # the id-only one gets a full handshake, to the allowed tenant).
    assert len(result.events(rule_id="builtin:resumed-session")) >= 1, why
