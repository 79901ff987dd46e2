"""A red team (session 50): a held request (an ask rule), approved, goes on with
the Host and path as decided too: `/%70ublic/x` with `Host: allowed.test:80` (and
`:443` on TLS) to a router that wants both `allowed.test` and `/public/` (Varnish on
80, HAProxy on 443), its default the internal tenant."""

from __future__ import annotations

import subprocess

import pytest
from support.sandbox import curl
from support.servers import internet_servers
from support.service import GatewayProcess
from test_approvals_e2e import Task
from web_routers.routers import IP, PY, TABLE, TENANT, got

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 40s}
    rules:
      - ask: allowed.test
        id: ask-public
        methods: [GET]
        paths: ["/public/**"]
"""
VCL = """\
vcl 4.1;
backend public { .host = "@IP@"; .port = "19003"; }
backend internal { .host = "@IP@"; .port = "19004"; }
sub vcl_recv {
    if (req.http.host == "allowed.test" && req.url ~ "^/public/") {
        set req.backend_hint = public;
    } else {
        set req.backend_hint = internal;
    }
    return (pass);
}
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
    bind @IP@:18443 ssl crt @PEM@ alpn h2,http/1.1
    use_backend public if { req.hdr(host) -m str allowed.test } { path_beg /public/ }
    default_backend internal
backend public
    server a @IP@:19003
backend internal
    server f @IP@:19004
"""


def test_an_approved_request_goes_on_as_decided(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "tenants.log"
    log.write_text("")
    pem = tmp_path / "combined.pem"
    pem.write_text(
        (net.workdir / "server.pem").read_text() + (net.workdir / "server.key").read_text()
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY.replace("@IP@", IP).replace("@PEM@", str(pem)))
    vcl = tmp_path / "router.vcl"
    vcl.write_text(VCL.replace("@IP@", IP))
    inside = ["ip", "netns", "exec", net.internet_ns]
    servers = [
        [PY, str(TENANT), IP, "19003", "ALLOWED-HTTP-TENANT", "-", "-", str(log)],
        [PY, str(TENANT), IP, "19004", "FORBIDDEN-HTTP-TENANT", "-", "-", str(log)],
        ["haproxy", "-db", "-f", str(cfg)],
        ["varnishd", "-F", "-j", "none", "-n", str(tmp_path / "varnish"),
         "-a", f"{IP}:18080", "-f", str(vcl), "-s", "malloc,16m"],
    ]  # fmt: skip
    nat = (
        f"table ip {TABLE} {{\n chain pre {{\n  type nat hook prerouting priority -100;\n"
        f"  ip daddr {IP} tcp dport 80 dnat to {IP}:18080\n"
        f"  ip daddr {IP} tcp dport 443 dnat to {IP}:18443\n }}\n}}\n"
    )
    subprocess.run([*inside, "nft", "-f", "-"], input=nat, text=True, check=True)
    steps = {
        "honest": curl("http://allowed.test/public/honest", timeout=45),
        "held_v": curl(
            "-H", "Host: allowed.test:80", "http://allowed.test/%70ublic/held_v", timeout=45
        ),
        "held_h": curl(
            "-k", "-H", "Host: allowed.test:443", "https://allowed.test/pub%6Cic/held_h", timeout=45
        ),
    }
    listens = [f"{IP}:{port}" for port in (18443, 18080, 19003, 19004)]
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        with internet_servers(net, servers, listens):
            task = Task(service, tmp_path, steps)
            try:
                seen: set[str] = set()
                for _ in steps:
                    asked = task.held(seen)
                    seen.add(asked["id"])
                    approved = service.ask("approvals", "approve", asked["id"])
                    assert approved.returncode == 0, approved.stdout + approved.stderr
            finally:
                result = task.finish()
    finally:
        service.stop()
        subprocess.run([*inside, "nft", "delete", "table", "ip", TABLE], check=False)
    tenants = log.read_text()
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "/public/honest" in got(tenants, "ALLOWED-HTTP-TENANT"), why
    assert got(tenants, "FORBIDDEN-HTTP-TENANT") == [], why
    assert {"/public/held_v", "/public/held_h"} <= set(got(tenants, "ALLOWED-HTTP-TENANT")), why
