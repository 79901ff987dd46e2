"""A red team (session 50): the canonical path forwarded on every way a request
reaches a path router (HAProxy `path_beg /public/` on TLS, Varnish
`req.url ~ "^/public/"` on plain HTTP; tests/e2e/web_routers/): keep-alive and
pipelined second requests, requests with bodies (h11's slow path, chunked,
Expect), absolute-form targets, WebSocket upgrades, several HTTP/2 streams. Any
request the internal tenant logs is a request no rule allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from web_routers.routers import H, get, got, h1, h2, routed

pytestmark = pytest.mark.e2e

WEB = Path(__file__).parent / "web_routers"
HAPROXY = (WEB / "haproxy_paths.cfg.tmpl").read_text()
HAPROXY = HAPROXY.replace("@IP@:8443", "@IP@:18443").replace(
    "frontend tls_h1\n    bind @IP@:8444 ssl crt @PEM@ alpn http/1.1\n"
    "    use_backend public if { path_beg /public/ }\n    default_backend internal\n",
    "",
)
VCL = (WEB / "varnish.vcl.tmpl").read_text()

RULES_DOOR = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: public-only
        methods: [GET, HEAD, POST, OPTIONS]
        paths: ["/public/**"]
"""
RULES_MITM = RULES_DOOR + "        websocket: true\n"


def post(path: str, host: str = "allowed.test", *fields: str, body: str = "abcd") -> str:
    extra = "".join(f + H for f in fields)
    return f"POST {path} HTTP/1.1{H}Host: {host}{H}{extra}Content-Length: {len(body)}{H}{H}{body}"


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_every_way_in_forwards_the_decided_path(net, tmp_path, rules):
    ws = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")  # fmt: skip
    chunked = (
        f"POST /p%75blic/chunked_v HTTP/1.1{H}Host: allowed.test{H}"
        f"Transfer-Encoding: chunked{H}Connection: close{H}{H}4{H}abcd{H}0{H}{H}"
    )
    steps = {
        "honest_v": h1(80, [get("/public/honest_v", "allowed.test")], tls=False),
        "honest_h": h1(443, [get("/public/honest_h", "allowed.test")]),
        "keepalive_v": h1(
            80,
            [
                get("/public/a_v", "allowed.test", close=False),
                get("/%70ublic/ka_v", "allowed.test"),
            ],
            tls=False,
        ),  # fmt: skip
        "keepalive_h": h1(
            443,
            [
                get("/public/a_h", "allowed.test", close=False),
                get("/%70ublic/ka_h", "allowed.test"),
            ],
        ),  # fmt: skip
        "pipelined_h": h1(
            443,
            [
                get("/public/b_h", "allowed.test", close=False)
                + get("/pu%62lic/pipe_h", "allowed.test", close=False)
                + get("/%70ublic/pipe2_h", "allowed.test")
            ],
        ),  # fmt: skip
        "body_v": h1(
            80, [post("/%70ublic/body_v", "allowed.test", "Connection: close")], tls=False
        ),
        "body_h": h1(443, [post("/%70ublic/body_h", "allowed.test", "Connection: close")]),
        "get_body_h": h1(
            443,
            [get("/%70ublic/get_body_h", "allowed.test", "Content-Length: 2", close=True) + "xy"],
        ),
        "expect_h": h1(
            443,
            [
                post(
                    "/%70ublic/expect_h",
                    "allowed.test",
                    "Expect: 100-continue",
                    "Connection: close",
                )
            ],
        ),
        "chunked_v": h1(80, [chunked], tls=False),
        "absolute_v": h1(
            80, [get("http://allowed.test/%70ublic/absolute_v", "allowed.test")], tls=False
        ),
        "absolute_h": h1(443, [get("https://allowed.test/%70ublic/absolute_h", "allowed.test")]),
        "options_h": h1(
            443, [get("/%70ublic/options_h", "allowed.test").replace("GET", "OPTIONS", 1)]
        ),
        "head_v": h1(
            80, [get("/%70ublic/head_v", "allowed.test").replace("GET", "HEAD", 1)], tls=False
        ),
        "websocket_v": h1(80, [get("/%70ublic/websocket_v", "allowed.test", *ws)], tls=False),
        "websocket_h": h1(443, [get("/%70ublic/websocket_h", "allowed.test", *ws)]),
        "h2_streams": h2(
            [
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", p),
                    (":authority", "allowed.test"),
                ]
                for p in ("/public/h2_a", "/%70ublic/h2_b", "/pub%6cic/h2_c?x=%41")
            ]
        ),  # fmt: skip
    }
    result, tenants = routed(net, tmp_path, rules, steps, HAPROXY, VCL)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert {"/public/honest_v", "/public/honest_h"} <= set(got(tenants, "ALLOWED-HTTP-TENANT")), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == [], why
