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

from pathlib import Path

import pytest
from web_routers.routers import get, got, h1, h2, routed

pytestmark = pytest.mark.e2e

WEB = Path(__file__).parent / "web_routers"
HAPROXY = (WEB / "haproxy_hosts.cfg.tmpl").read_text()
VCL = (WEB / "host_router.vcl.tmpl").read_text()

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


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_the_default_port_written_out_reaches_the_allowed_tenant(net, tmp_path, rules):
    steps = {
        "honest_plain": h1(80, [get("/honest_plain", "allowed.test")], tls=False),
        "honest_tls": h1(443, [get("/honest_tls", "allowed.test")]),
        "plain_80": h1(80, [get("/plain_80", "allowed.test:80")], tls=False),
        "tls_443": h1(443, [get("/tls_443", "allowed.test:443")]),
        "h2_443": h2(
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/h2_443"),
                (":authority", "allowed.test:443"),
            ]
        ),  # fmt: skip
    }
    result, tenants = routed(net, tmp_path, rules, steps, HAPROXY, VCL)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert {"/honest_plain", "/honest_tls"} <= set(got(tenants, "ALLOWED-HTTP-TENANT")), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == [], why
