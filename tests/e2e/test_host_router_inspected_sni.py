"""A red team (session 49): on inspected TLS the gateway decides the name in the client's SNI
(`allowed.test.`, `ALLOWED.TEST` are allowed.test) and forwards the Host as decided,
but its own upstream ClientHello carries the client's SNI as sent
(frontdoor/tls_relay.py `_upstream_name`: `self.hello.sni`; mitmproxy's
ClientTLSLayer sets `client.sni` from the hello after the addon set it to the decided
name, and the upstream's `server.sni` is taken from it). An SNI router upstream
(HAProxy `req.ssl_sni -i allowed.test`, the router of test_sni_routers.py, its
default backend the forbidden tenant) matches it as written.

Passed through, such an SNI is refused (gate._spelled_otherwise); inspected, it is
let through because "the gateway's own hello names the decided name" -- it does not.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
SNI = HERE / "sni_router"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
PORT = 8443

RULES_MITM = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tenant-allowed
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""
RULES_DOOR = "\n".join(RULES_MITM.splitlines()[:10]) + "\n"


# An SNI router as test_sni_routers.py's, one frontend matching as written (no -i:
# HAProxy's string match is case-sensitive, as nginx's `map $ssl_preread_server_name`
# without `hostnames` is for the trailing dot), its default backend the forbidden tenant.
ROUTER = """\
global
    maxconn 100
defaults
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend sni_router
    mode tcp
    bind @IP@:@PORT@
    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend tenant_allowed if { req.ssl_sni allowed.test }
    default_backend tenant_forbidden
backend tenant_allowed
    mode tcp
    server a @IP@:19001
backend tenant_forbidden
    mode tcp
    server f @IP@:19002
"""


def h2(path: str, sni: str) -> str:
    fields = [[":method", "GET"], [":scheme", "https"], [":path", path],
              [":authority", f"allowed.test:{PORT}"]]  # fmt: skip
    return f"{PY} h2client.py {IP} {PORT} {sni} h2 {shlex.quote(json.dumps(fields))}"


def h1(path: str, sni: str) -> str:
    request = f"GET {path} HTTP/1.1\r\nHost: allowed.test:{PORT}\r\nConnection: close\r\n\r\n"
    return f"{PY} h2client.py {IP} {PORT} {sni} h1 {shlex.quote(json.dumps([request]))}"


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_inspected_upstream_hello_names_the_decided_name(net, tmp_path, rules):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    log = tmp_path / "tenants.log"
    log.touch()
    config = tmp_path / "haproxy.cfg"
    config.write_text(ROUTER.replace("@IP@", IP).replace("@PORT@", str(PORT)))
    certificate, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    tenants = [
        [PY, str(SNI / "tenant.py"), IP, str(port), label, certificate, key, str(log)]
        for port, label in [(19001, "ALLOWED-TENANT"), (19002, "FORBIDDEN-TENANT")]
    ]
    listens = [f"{IP}:{port}" for port in (PORT, 19001, 19002)]
    with internet_servers(net, [*tenants, ["haproxy", "-db", "-f", str(config)]], listens):
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "honest": h1("/honest", "allowed.test"),
            "dot": h1("/dot", "allowed.test."),
            "upper_dot": h1("/upper_dot", "ALLOWED.TEST."),
            "upper": h1("/upper", "ALLOWED.TEST"),
            "mixed": h1("/mixed", "Allowed.Test"),
            "h2_upper": h2("/h2_upper", "ALLOWED.TEST"),
        }
        result = sandbox.run(
            net, tmp_path, steps, rules=rules_file,
            setup=lambda d: shutil.copy(HERE / "host_router" / "h2client.py", d / "h2client.py"),
        )  # fmt: skip
    tenants = log.read_text()
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "ALLOWED-TENANT got sni=allowed.test request='GET /honest" in tenants, why
    assert [x for x in tenants.splitlines() if x.startswith("FORBIDDEN-TENANT got")] == [], why
