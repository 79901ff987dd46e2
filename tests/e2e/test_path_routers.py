"""Path routers that match the raw request target (a red team, session 50).

A tenant's router often splits one name by path: the public application under
`/public/`, everything else an internal one (Varnish `req.url ~ "^/public/"`,
HAProxy `path_beg /public/`). Both match the bytes of the target as sent: neither
decodes escapes before matching. The gateway decides a path rule on the path's
canonical form (names.parse_path: escaped unreserved characters decoded, so
`/%70ublic/x` is `/public/x`), and forwarded the target as the client wrote it:
the router did not match `^/public/` and handed it to the internal tenant, which
no rule allows. It now forwards the form it decided (gate._as_decided). And an
allow of `/public/**` took the bare `/public`, which such routers send elsewhere:
it no longer does.

Each attempt is checked against the tenants' own log; the honest request reaches
the public tenant in the same run.
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

HERE = Path(__file__).parent / "web_routers"
TENANT = Path(__file__).parent / "sni_router" / "tenant.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test

RULES_MITM = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: public-only
        ports: [8443, 8444, 8088]
        methods: [GET]
        paths: ["/public/**"]
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
        (HERE / "haproxy_paths.cfg.tmpl").read_text().replace("@IP@", IP).replace("@PEM@", str(pem))
    )
    vcl = tmp_path / "router.vcl"
    vcl.write_text((HERE / "varnish.vcl.tmpl").read_text().replace("@IP@", IP))
    tenants = [
        [PY, str(TENANT), IP, str(port), label, "-", "-", str(log)]
        for port, label in [(19003, "ALLOWED-HTTP-TENANT"), (19004, "FORBIDDEN-HTTP-TENANT")]
    ]
    routers = [
        ["haproxy", "-db", "-f", str(haproxy_cfg)],
        ["varnishd", "-F", "-j", "none", "-n", str(tmp_path / "varnish"),
         "-a", f"{IP}:8088", "-f", str(vcl), "-s", "malloc,16m"],
    ]  # fmt: skip
    listens = [f"{IP}:{port}" for port in (8443, 8444, 8088, 19003, 19004)]
    with internet_servers(net, [*tenants, *routers], listens):
        result = sandbox.run(
            net,
            tmp_path,
            {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules,
            setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
        )
    return result, log.read_text()


def h2(path: str) -> str:
    fields = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "allowed.test"),
    ]
    return f"{PY} h2client.py {IP} 8443 allowed.test h2 {shlex.quote(json.dumps(fields))}"


def h1(port: int, target: str, tls: bool = True) -> str:
    return sandbox.h1(IP, port, target, tls)


def got(tenants: str, label: str) -> set[str]:
    return {
        line.split("request='GET ")[1].split()[0]
        for line in tenants.splitlines()
        if line.startswith(f"{label} got")
    }


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_an_escaped_prefix_does_not_reach_the_internal_tenant(net, tmp_path, rules):
    steps = {
        "honest_varnish": h1(8088, "/public/honest_varnish", tls=False),
        "honest_haproxy": h1(8444, "/public/honest_haproxy"),
        "varnish_plain": h1(8088, "/%70ublic/varnish_plain", tls=False),
        "haproxy_h1_tls": h1(8444, "/pub%6Cic/haproxy_h1_tls"),
        "haproxy_h2": h2("/%70ublic/haproxy_h2"),
        "varnish_mixed": h1(8088, "/p%75blic/varnish_mixed?q=1", tls=False),
    }
    result, tenants = routed(net, tmp_path, rules, steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert {"/public/honest_varnish", "/public/honest_haproxy"} <= got(
        tenants, "ALLOWED-HTTP-TENANT"
    ), why
    # The internal tenant is reached by no rule: nothing may get there.
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == set(), why


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_the_prefix_itself_does_not_reach_the_internal_tenant(net, tmp_path, rules):
    """`paths: ["/public/**"]` matched `/public` itself, which `^/public/` and
    `path_beg /public/` do not: the router's default, the internal tenant, got it,
    with any query the task liked. Now it is path_not_allowed."""
    steps = {
        "honest_varnish": h1(8088, "/public/honest_varnish", tls=False),
        "bare_varnish": h1(8088, "/public?exfil=bare_varnish", tls=False),
        "bare_haproxy": h1(8444, "/public?exfil=bare_haproxy"),
        "bare_h2": h2("/public?exfil=bare_h2"),
    }
    result, tenants = routed(net, tmp_path, rules, steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "/public/honest_varnish" in got(tenants, "ALLOWED-HTTP-TENANT"), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == set(), why
