"""A red team (session 50): an escaped reserved character slipped past a deny
glob that names it; a deny now also matches the path with every escape of a
printable ASCII character decoded (names.path_readings), and a deny glob written
escaped is matched decoded too.

The gateway decides paths in names.parse_path's form: escapes of *unreserved*
characters decoded, every other escape kept (hex upper-cased). A deny glob is
matched against that form, so a deny naming a reserved character as written
(`/@internal/**`, npm-style scopes; `/v1/secrets/*:access`, Google-style custom
methods; OData's `/$batch`) does not match the same path with that character
escaped (`/%40internal/x`, `/v1/secrets/db%3Aaccess`, `/%24batch`). The request was
allowed (by `/**`) and forwarded so; nginx decodes every escape before it matches
its locations (as Flask/Werkzeug, Express's static and http.server decode before
they route), and served the denied resource.
"""

from __future__ import annotations

import shutil

import pytest
from support import sandbox
from support.servers import nginx_server

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - deny: allowed.test
        id: no-internal
        ports: [8090, 8445]
        paths: ["/@internal/**", "/v1/secrets/*:access", "/$batch"]
      - allow: allowed.test
        id: site
        ports: [8090, 8445]
        methods: [GET]
        paths: ["/**"]
"""
# A WebSocket rule elsewhere sends the profile's plain HTTP to mitmproxy (needs_engine).
RULES_MITM = (
    RULES
    + """\
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""
)

NGINX = """\
    log_format routed 'NGINX request_uri=$request_uri uri=$uri status=$status';
    access_log {w}/access.log routed;
    server {{
        listen {ip}:8090;
        listen {ip}:8445 ssl;
        ssl_certificate {pem};
        ssl_certificate_key {key};
        location /@internal/ {{ return 200 "INTERNAL-SECRET $uri\\n"; }}
        location = /v1/secrets/db:access {{ return 200 "SECRET-VALUE $uri\\n"; }}
        location = /$batch {{ return 200 "BATCH-ENDPOINT $uri\\n"; }}
        location / {{ return 200 "PUBLIC $uri\\n"; }}
    }}
"""


def h1(port: int, target: str, tls: bool = True) -> str:
    return sandbox.h1(IP, port, target, tls)


@pytest.mark.parametrize("rules", [RULES_MITM, RULES], ids=["mitmproxy", "frontdoor"])
def test_an_escaped_reserved_character_does_not_slip_past_a_deny(net, tmp_path, rules):
    work = tmp_path / "nginx"
    work.mkdir()
    http = NGINX.format(
        w=work, ip=IP, pem=net.workdir / "server.pem", key=net.workdir / "server.key"
    )
    (tmp_path / "rules.yaml").write_text(rules)
    steps = {
        "honest": h1(8090, "/public/x", tls=False),
        "denied_scope": h1(8090, "/@internal/pkg", tls=False),
        "denied_method": h1(8445, "/v1/secrets/db:access", tls=True),
        "escaped_scope": h1(8090, "/%40internal/pkg", tls=False),
        "escaped_scope_tls": h1(8445, "/%40internal/pkg", tls=True),
        "escaped_method": h1(8445, "/v1/secrets/db%3Aaccess", tls=True),
        "escaped_dollar": h1(8090, "/%24batch", tls=False),
    }
    with nginx_server(net, work, http, [f"{IP}:8090", f"{IP}:8445"]):
        result = sandbox.run(
            net,
            tmp_path,
            {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=tmp_path / "rules.yaml",
            setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
        )
        log = (work / "access.log").read_text()
    why = f"{result.describe()}\nnginx:\n{log}"
    assert "PUBLIC /public/x" in result["honest"].out, why
    assert "INTERNAL-SECRET" not in result["denied_scope"].out, why
    assert "SECRET-VALUE" not in result["denied_method"].out, why
    served = [
        line for line in log.splitlines() if "status=200" in line and "uri=/public" not in line
    ]
    assert served == [], why
    for label in ("escaped_scope", "escaped_scope_tls", "escaped_method", "escaped_dollar"):
        out = result[label].out
        assert not any(s in out for s in ("INTERNAL-SECRET", "SECRET-VALUE", "BATCH-ENDPOINT")), (
            label,
            why,
        )
