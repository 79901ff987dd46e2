"""The scheme's default port, written out (a red team, session 50).

`Host: allowed.test:80` on port 80 (`:authority: allowed.test:443` on 443) names
the same origin as `allowed.test` (RFC 3986 6.2.3): the gateway decides it as
allowed.test, the port the connection's, and forwarded it as sent. No client sends
it; a Host router on a default port is written for the bare name (Varnish
`req.http.host == "allowed.test"`, HAProxy `req.hdr(host) -m str allowed.test`),
read `allowed.test:80` as another host, and served its default: the other tenant.
The Host now goes on as clients write it (gate._as_decided).

The routers listen on 18080/18443 in the fake internet; a DNAT in the fake
internet's own namespace (removed after) sends allowed.test's ports 80 and 443 to
them instead of the fake internet's nginx.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent / "web_routers"
H2CLIENT = Path(__file__).parent / "host_router" / "h2client.py"
TENANT = Path(__file__).parent / "sni_router" / "tenant.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test
H = "\r\n"
TABLE = "sgt_default_port"

RULES_MITM = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tenant-allowed
        ports: [80, 443]
        methods: [GET]
        paths: ["/**"]
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""
RULES_DOOR = "\n".join(RULES_MITM.splitlines()[:10]) + "\n"


def routed(net, tmp_path, rules_text: str, steps: dict[str, str]):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    log = tmp_path / "tenants.log"
    log.write_text("")
    pem = tmp_path / "combined.pem"
    pem.write_text(
        (net.workdir / "server.pem").read_text() + (net.workdir / "server.key").read_text()
    )
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(
        (HERE / "haproxy_hosts.cfg.tmpl").read_text().replace("@IP@", IP).replace("@PEM@", str(pem))
    )
    vcl = tmp_path / "router.vcl"
    vcl.write_text((HERE / "host_router.vcl.tmpl").read_text().replace("@IP@", IP))
    inside = ["ip", "netns", "exec", net.internet_ns]
    tenants = [
        [PY, str(TENANT), IP, str(port), label, "-", "-", str(log)]
        for port, label in [(19003, "ALLOWED-HTTP-TENANT"), (19004, "FORBIDDEN-HTTP-TENANT")]
    ]
    routers = [
        ["haproxy", "-db", "-f", str(haproxy_cfg)],
        ["varnishd", "-F", "-j", "none", "-n", str(tmp_path / "varnish"),
         "-a", f"{IP}:18080", "-f", str(vcl), "-s", "malloc,16m"],
    ]  # fmt: skip
    # allowed.test's ports 80 and 443 to the routers, in the fake internet's own
    # namespace (its nginx listens there), for this test only.
    nat = (
        f"table ip {TABLE} {{\n chain pre {{\n  type nat hook prerouting priority -100;\n"
        f"  ip daddr {IP} tcp dport 80 dnat to {IP}:18080\n"
        f"  ip daddr {IP} tcp dport 443 dnat to {IP}:18443\n }}\n}}\n"
    )
    subprocess.run([*inside, "nft", "-f", "-"], input=nat, text=True, check=True)
    listens = [f"{IP}:{port}" for port in (18443, 18080, 19003, 19004)]
    try:
        with internet_servers(net, [*tenants, *routers], listens):
            result = sandbox.run(
                net,
                tmp_path,
                {"resolve": sandbox.dig("allowed.test"), **steps},
                rules=rules,
                setup=lambda d: shutil.copy(H2CLIENT, d / "h2client.py"),
            )
    finally:
        subprocess.run([*inside, "nft", "delete", "table", "ip", TABLE], check=False)
    return result, log.read_text()


def h2(path: str, authority: str) -> str:
    fields = [(":method", "GET"), (":scheme", "https"), (":path", path), (":authority", authority)]
    return f"{PY} h2client.py {IP} 443 allowed.test h2 {shlex.quote(json.dumps(fields))}"


def h1(port: int, path: str, host: str, tls: bool = True) -> str:
    request = f"GET {path} HTTP/1.1{H}Host: {host}{H}Connection: close{H}{H}"
    sni = "allowed.test" if tls else "-"
    return f"{PY} h2client.py {IP} {port} {sni} h1 {shlex.quote(json.dumps([request]))}"


def got(tenants: str, label: str) -> set[str]:
    return {
        line.split("request='GET ")[1].split()[0]
        for line in tenants.splitlines()
        if line.startswith(f"{label} got")
    }


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_the_default_port_written_out_reaches_the_allowed_tenant(net, tmp_path, rules):
    steps = {
        "honest_plain": h1(80, "/honest_plain", "allowed.test", tls=False),
        "honest_tls": h1(443, "/honest_tls", "allowed.test"),
        "plain_80": h1(80, "/plain_80", "allowed.test:80", tls=False),
        "tls_443": h1(443, "/tls_443", "allowed.test:443"),
        "h2_443": h2("/h2_443", "allowed.test:443"),
    }
    result, tenants = routed(net, tmp_path, rules, steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert {"/honest_plain", "/honest_tls"} <= got(tenants, "ALLOWED-HTTP-TENANT"), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == set(), why
