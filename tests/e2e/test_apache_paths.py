"""Apache httpd 2.4 behind inspected rules (a red team, session 50).

Name-based virtual hosts at one address (forbidden.test first: Apache's default
for a Host no vhost names), allowed.test's scripts under mod_cgi.

A deny rule names a resource (`deny: allowed.test, paths: ["/admin.cgi"]`). Apache
(and lighttpd, nginx with fastcgi_split_path_info, PHP-FPM) runs a script at any
path below its name: `/admin.cgi/x` runs admin.cgi with PATH_INFO `/x`. The gateway
read `/admin.cgi/x` as another resource and allowed it; a deny now takes everything
below what it names (load._compile_paths). Behind mod_rewrite's [P,NE] an escaped
'%' was decoded twice; such paths are refused (request_head.path_problem).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import pytest
from support import sandbox
from web_routers.apache import apache

pytestmark = pytest.mark.e2e

PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test
H = "\r\n"

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - deny: allowed.test
        id: no-admin
        ports: [8444, 8088]
        paths: ["/admin.cgi"]
      - allow: allowed.test
        id: site
        ports: [8444, 8088]
        methods: [GET]
        paths: ["/**"]
"""


def h1(port: int, target: str, host: str = "allowed.test", tls: bool = True, *fields: str) -> str:
    return sandbox.h1(IP, port, target, tls, host, fields)


def run(net, tmp_path, steps, rules=RULES, options=""):
    (tmp_path / "rules.yaml").write_text(rules)
    with apache(net, IP, options) as top:
        result = sandbox.run(
            net,
            tmp_path,
            {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=tmp_path / "rules.yaml",
            setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
        )
        log = (top / "access.log").read_text()
    return result, log


def test_a_denied_script_is_not_run_by_its_path_info(net, tmp_path):
    steps = {
        "honest": h1(8088, "/public/ok.txt", tls=False),
        "denied": h1(8088, "/admin.cgi", tls=False),
        "path_info_plain": h1(8088, "/admin.cgi/x", tls=False),
        "path_info_tls": h1(8444, "/admin.cgi/y"),
        "path_info_slash": h1(8444, "/admin.cgi/"),
    }
    result, log = run(net, tmp_path, steps)
    why = f"{result.describe()}\napache:\n{log}"
    assert "ALLOWED-TENANT ok" in result["honest"].out, why
    assert "ADMIN-SECRET" not in result["denied"].out, why
    ran = [line for line in log.splitlines() if "admin.cgi" in line and "status=200" in line]
    assert ran == [], why
    for label in ("path_info_plain", "path_info_tls", "path_info_slash"):
        assert "ADMIN-SECRET" not in result[label].out, (label, why)


def test_a_denied_stem_holds_against_content_negotiation(net, tmp_path):
    """With MultiViews (`Options +MultiViews`; `MultiviewsMatch Any` so that a
    script's handler extension counts), Apache serves `/admin` from admin.cgi: a name
    no deny of `/admin.cgi` can know. docs/rules.md says to deny the stem
    (`/admin*`), which holds for every name Apache gives the script."""
    rules = RULES.replace('paths: ["/admin.cgi"]', 'paths: ["/admin*"]')
    steps = {
        "honest": h1(8088, "/public/ok.txt", tls=False),
        "negotiated_plain": h1(8088, "/admin", tls=False),
        "negotiated_tls": h1(8444, "/admin/z"),
        "script": h1(8444, "/admin.cgi"),
        "path_info": h1(8088, "/admin.cgi/x", tls=False),
    }
    result, log = run(
        net, tmp_path, steps, rules=rules, options="+MultiViews\n    MultiviewsMatch Any"
    )
    why = f"{result.describe()}\napache:\n{log}"
    assert "ALLOWED-TENANT ok" in result["honest"].out, why
    ran = [line for line in log.splitlines() if "admin.cgi" in line and "status=200" in line]
    assert ran == [], why
    assert len(result.events(reason="rule_deny")) == 4, why


def test_apache_picks_the_vhost_the_gateway_decided(net, tmp_path):
    """Host spellings the gateway may read one way and Apache's name-based vhost
    matching another: every one reaches allowed.test's vhost or is refused (held)."""
    rules = RULES.replace('paths: ["/admin.cgi"]', 'paths: ["/nothing"]')
    steps = {
        "honest": h1(8088, "/public/ok.txt", tls=False),
        "upper_dot": h1(8088, "/public/ok.txt", "ALLOWED.TEST.", False),
        "zero_port": h1(8088, "/public/ok.txt", "allowed.test:08088", False),
        "absolute_upper": h1(
            8088, "http://ALLOWED.TEST:8088/public/ok.txt", "allowed.test:8088", False
        ),
        "absolute_https": h1(8444, "https://allowed.test/public/ok.txt", "allowed.test"),
        "absolute_userinfo": h1(
            8088, "http://forbidden.test@allowed.test/public/ok.txt", "allowed.test", False
        ),
        "tls_other_host": h1(8444, "/public/ok.txt", "forbidden.test"),
        "tls_port_host": h1(8444, "/public/ok.txt", "allowed.test:8444"),
        "tab_host": h1(8088, "/public/ok.txt", "\tallowed.test\t", False),
        "empty_host_then": h1(8088, "/public/ok.txt", "", False, "Host: allowed.test"),
        "pipelined": (
            f"{PY} h2client.py {IP} 8088 - h1 "
            + shlex.quote(
                json.dumps(
                    [
                        f"GET /public/ok.txt HTTP/1.1{H}Host: allowed.test{H}{H}"
                        f"GET /public/ok.txt HTTP/1.1{H}Host: forbidden.test{H}Connection: close{H}{H}"
                    ]
                )
            )
        ),  # fmt: skip
    }
    result, log = run(net, tmp_path, steps, rules=rules)
    why = f"{result.describe()}\napache:\n{log}"
    assert "ALLOWED-TENANT ok" in result["honest"].out, why
    assert "vhost=forbidden.test" not in log, why
    for label in steps:
        assert "FORBIDDEN-TENANT" not in result[label].out, (label, why)


def test_an_escaped_escape_does_not_reach_a_denied_path_behind_mod_rewrite(net, tmp_path):
    """mod_rewrite's [P,NE] (the usual answer to "mod_rewrite escapes my proxied URL
    twice") proxies the path it matched, which Apache has decoded once, without
    escaping it again: `/%2561dmin/secret.txt` (decided as itself: `%25` is a '%',
    nothing a rule names) reaches the application as `/%61dmin/secret.txt`, which
    it decodes to `/admin/secret.txt`; `/public/%252e%252e/admin/...` reaches it as
    `/public/%2e%2e/admin/...`, `/admin/...` once its dot segments are resolved."""
    rules = RULES.replace('paths: ["/admin.cgi"]', 'paths: ["/admin/**"]')
    steps = {
        "honest": h1(8088, "/public/ok.txt", tls=False),
        "denied": h1(8088, "/admin/secret.txt", tls=False),
        "escaped_escape": h1(8088, "/%2561dmin/secret.txt", tls=False),
        "escaped_dots_tls": h1(8444, "/public/%252e%252e/admin/secret.txt"),
    }
    (tmp_path / "rules.yaml").write_text(rules)
    backend_log = tmp_path / "backend.log"
    backend_log.write_text("")
    root = tmp_path / "app"
    (root / "public").mkdir(parents=True)
    (root / "admin").mkdir()
    (root / "public" / "ok.txt").write_text("APP public ok\n")
    (root / "admin" / "secret.txt").write_text("APP ADMIN-SECRET\n")
    inside = ["ip", "netns", "exec", net.internet_ns]
    backend = sandbox.Path(__file__).parent / "web_routers" / "files_backend.py"
    app = subprocess.Popen([*inside, PY, str(backend), IP, "19005", str(root), str(backend_log)])
    try:
        assert sandbox.eventually(lambda: "ready" in backend_log.read_text(), timeout=10)
        with apache(net, IP, template="apache_proxy.conf.tmpl"):
            result = sandbox.run(
                net,
                tmp_path,
                {"resolve": sandbox.dig("allowed.test"), **steps},
                rules=tmp_path / "rules.yaml",
                setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
            )
    finally:
        app.terminate()
        app.wait(5)
    log = backend_log.read_text()
    why = f"{result.describe()}\nbackend:\n{log}"
    assert "APP public ok" in result["honest"].out, why
    assert "ADMIN-SECRET" not in result["denied"].out, why
    assert "served=/admin/secret.txt" not in log, why
    for label in ("escaped_escape", "escaped_dots_tls"):
        assert "ADMIN-SECRET" not in result[label].out, (label, why)
