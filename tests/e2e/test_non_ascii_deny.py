"""A red team (session 50): a deny glob written in UTF-8 (`/café/**`) loaded, but
never matched: a task can send the path only escaped (`/caf%C3%A9/x`; raw non-ASCII
is refused), and nginx, which decodes every escape before it matches its locations,
served the denied one. Such a rule path is now refused at load, naming its escaped
spelling (`/caf%C3%A9/**`), which takes the path in either case of its hex."""

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
        id: no-cafe
        ports: [8090]
        paths: ["/caf%C3%A9/**"]
      - allow: allowed.test
        id: site
        ports: [8090]
        methods: [GET]
        paths: ["/**"]
"""

NGINX = """\
    log_format routed 'NGINX request_uri=$request_uri uri=$uri status=$status';
    access_log {w}/access.log routed;
    server {{
        listen {ip}:8090;
        location /café/ {{ return 200 "CAFE-SECRET\\n"; }}
        location / {{ return 200 "PUBLIC $uri\\n"; }}
    }}
"""


def h1(target: str) -> str:
    return sandbox.h1(IP, 8090, target, tls=False)


def test_a_deny_of_a_non_ascii_path_holds_where_nginx_decodes_it(net, tmp_path):
    work = tmp_path / "nginx"
    work.mkdir()
    http = NGINX.format(w=work, ip=IP)
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    steps = {
        "honest": h1("/public/x"),
        "escaped": h1("/caf%C3%A9/menu"),
        "lower": h1("/caf%c3%a9/menu"),
    }
    with nginx_server(net, work, http, [f"{IP}:8090"]):
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
    # The effect: nginx served the denied location.
    assert "CAFE-SECRET" not in result["escaped"].out + result["lower"].out, why
    assert not [x for x in log.splitlines() if "status=200" in x and "caf" in x], why
