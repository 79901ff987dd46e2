"""A red team (session 50): the Host forwarded as decided on every way a
request reaches a Host router that matches `allowed.test` exactly on its default
ports (HAProxy `req.hdr(host) -m str` on 443, Varnish `req.http.host ==` on 80;
tests/e2e/web_routers/): keep-alive and pipelined second requests, bodies,
absolute-form targets, WebSocket upgrades, HTTP/2 streams, the default port spelled
with leading zeros or upper case."""

from __future__ import annotations

from pathlib import Path

import pytest
from web_routers.routers import H, get, got, h1, h2, routed

pytestmark = pytest.mark.e2e

WEB = Path(__file__).parent / "web_routers"
HAPROXY = (WEB / "haproxy_hosts.cfg.tmpl").read_text()
VCL = (WEB / "host_router.vcl.tmpl").read_text()

RULES_DOOR = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tenant-allowed
        methods: [GET, POST, OPTIONS]
        paths: ["/**"]
"""
RULES_MITM = RULES_DOOR + "        websocket: true\n"


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_every_way_in_forwards_the_decided_host(net, tmp_path, rules):
    ws = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")  # fmt: skip
    a = "allowed.test"

    def post(path, host, *fields):
        extra = "".join(f + H for f in fields)
        return f"POST {path} HTTP/1.1{H}Host: {host}{H}{extra}Content-Length: 4{H}Connection: close{H}{H}abcd"

    steps = {
        "honest_v": h1(80, [get("/honest_v", a)], tls=False),
        "honest_h": h1(443, [get("/honest_h", a)]),
        "keepalive_v": h1(80, [get("/a_v", a, close=False), get("/ka_v", f"{a}:80")], tls=False),
        "keepalive_h": h1(443, [get("/a_h", a, close=False), get("/ka_h", f"{a}:443")]),
        "pipelined_h": h1(
            443,
            [
                get("/b_h", a, close=False)
                + get("/pipe_h", f"{a}:443", close=False)
                + get("/pipe2_h", "ALLOWED.TEST:443")
            ],
        ),  # fmt: skip
        "zeros_v": h1(80, [get("/zeros_v", f"{a}:0080")], tls=False),
        "body_v": h1(80, [post("/body_v", f"{a}:80")], tls=False),
        "body_h": h1(443, [post("/body_h", f"{a}:443", "Expect: 100-continue")]),
        "absolute_v": h1(80, [get(f"http://{a}:80/absolute_v", f"{a}:80")], tls=False),
        "absolute_h": h1(443, [get(f"https://{a}:443/absolute_h", f"{a}:443")]),
        "options_h": h1(443, [get("/options_h", f"{a}:443").replace("GET", "OPTIONS", 1)]),
        "websocket_v": h1(80, [get("/websocket_v", f"{a}:80", *ws)], tls=False),
        "websocket_h": h1(443, [get("/websocket_h", f"{a}:443", *ws)]),
        "h2_streams": h2(
            [
                [(":method", "GET"), (":scheme", "https"), (":path", p), (":authority", au)]
                for p, au in (("/h2_a", a), ("/h2_b", f"{a}:443"), ("/h2_c", "ALLOWED.TEST:443"))
            ]
        ),  # fmt: skip
        "h2_host_field": h2(
            [(":method", "GET"), (":scheme", "https"), (":path", "/h2_host"), ("host", f"{a}:443")]
        ),  # fmt: skip
    }
    result, tenants = routed(net, tmp_path, rules, steps, HAPROXY, VCL)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert {"/honest_v", "/honest_h"} <= set(got(tenants, "ALLOWED-HTTP-TENANT")), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == [], why
