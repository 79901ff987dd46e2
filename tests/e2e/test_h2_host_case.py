"""A red team (session 50): an HTTP/2 request's `host` field spelled otherwise
than its `:authority`.

check_head compares a `host` field with `:authority` ignoring case and decides on
`:authority`; gate._as_decided then finds the authority spelled as decided
(`allowed.test`) and sets no forward_host, so the `host` field goes on as sent
(`ALLOWED.TEST`) would go on as sent: mitmproxy, speaking HTTP/1.1 to the upstream,
keeps an existing Host field (it adds one from :authority only where none is).
Held: mitmproxy's HTTP/2 server
(h2) refuses a `host` that differs from `:authority` in any byte (GOAWAY), so neither
reaches a router. Kept as a regression test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from web_routers.routers import got, h2, routed

pytestmark = pytest.mark.e2e

RULES = """\
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

HAPROXY = """\
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend tls
    bind @IP@:18443 ssl crt @PEM@ alpn @ALPN@
    http-request capture req.hdr(host) len 100
    use_backend public if { req.hdr(host) -m str allowed.test }
    default_backend internal
backend public
    server a @IP@:19003
backend internal
    server f @IP@:19004
"""
VCL = (Path(__file__).parent / "web_routers" / "host_router.vcl.tmpl").read_text()


@pytest.mark.parametrize("alpn", ["http/1.1", "h2,http/1.1"], ids=["router_h1", "router_h2"])
def test_an_h2_host_field_goes_on_as_decided(net, tmp_path, alpn):
    base = [(":method", "GET"), (":scheme", "https")]
    steps = {
        "honest": h2([*base, (":path", "/honest"), (":authority", "allowed.test")]),
        "host_upper": h2(
            [
                *base,
                (":path", "/host_upper"),
                (":authority", "allowed.test"),
                ("host", "ALLOWED.TEST"),
            ]
        ),  # fmt: skip
        "host_mixed": h2(
            [
                *base,
                (":path", "/host_mixed"),
                (":authority", "allowed.test"),
                ("host", "Allowed.Test"),
            ]
        ),  # fmt: skip
    }
    result, tenants = routed(net, tmp_path, RULES, steps, HAPROXY.replace("@ALPN@", alpn), VCL)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "/honest" in got(tenants, "ALLOWED-HTTP-TENANT"), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == [], why
