"""A `..` segment that ends at an escaped `?` or `#` is refused (`ambiguous_path`).

The gateway decides a path with `%3F`/`%23` also cut there (names.path_readings),
for a proxy that decodes the path once and passes it on (nginx's `proxy_pass
http://app$uri`). nginx 1.22 does not resolve `..?`: `/public/..%3F` goes on as
`GET /public/..? HTTP/1.1`, and a backend that resolves dot segments (Apache's
ap_getparents, Tomcat) serves `/`, the parent of what an allow of `/public/**`
takes, which the rules refuse when asked for it. The cut `/public/..` passed the
allow until request_head refused a cut that ends in a dot segment (a red team,
session 52).

Chain: gateway -> nginx (`proxy_pass http://IP:8088$uri`) -> Apache 2.4 (the
web_routers harness: allowed.test's docroot, index.html `ALLOWED-TENANT index`).
"""

from __future__ import annotations

import shutil

import pytest
from support import sandbox
from support.servers import nginx_server
from web_routers.apache import apache

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: public-only
        ports: [8090, 8445]
        methods: [GET]
        paths: ["/public/**"]
"""

NGINX = """\
    server {{
        listen {ip}:8090;
        listen {ip}:8445 ssl;
        ssl_certificate {pem};
        ssl_certificate_key {key};
        location / {{
            proxy_set_header Host allowed.test;
            proxy_pass http://{ip}:8088$uri;
        }}
    }}
"""


def h1(port: int, target: str, tls: bool = True) -> str:
    return sandbox.h1(IP, port, target, tls)


CUT_DOTS = {
    "question_plain": (8090, "/public/..%3F", False),
    "question_tls": (8445, "/public/..%3F", True),
    "hash_plain": (8090, "/public/x/..%23/..%23", False),
}


def test_a_dot_segment_made_by_a_cut_does_not_reach_a_parent(net, tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES)
    work = tmp_path / "nginx"
    work.mkdir()
    http = NGINX.format(ip=IP, pem=net.workdir / "server.pem", key=net.workdir / "server.key")
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "honest": h1(8090, "/public/ok.txt", False),
        "control_root": h1(8090, "/", False),
        "control_index": h1(8445, "/index.html", True),
    }
    for name, (port, target, tls) in CUT_DOTS.items():
        steps[name] = h1(port, target, tls)
    with apache(net, IP) as top, nginx_server(net, work, http, [f"{IP}:8090", f"{IP}:8445"]):
        result = sandbox.run(
            net, tmp_path, steps, rules=tmp_path / "rules.yaml",
            setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
        )  # fmt: skip
        log = (top / "access.log").read_text()
    why = f"{result.describe()}\napache:\n{log}"
    assert "ALLOWED-TENANT ok" in result["honest"].out, why
    assert "ALLOWED-TENANT index" not in result["control_root"].out, why
    assert "ALLOWED-TENANT index" not in result["control_index"].out, why
    reached = [name for name in CUT_DOTS if "ALLOWED-TENANT index" in result[name].out]
    assert not reached, f"reached the parent: {reached}\n{why}"
