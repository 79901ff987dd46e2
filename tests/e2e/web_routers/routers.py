"""Helpers for the web-router tests (a red team, session 50): a Host/path router (HAProxy and
Varnish) in the fake internet, reached as allowed.test's ports 80 and 443 through a
DNAT inside the fake internet's own namespace (removed after)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

from support import sandbox
from support.servers import internet_servers

E2E = Path(__file__).parent.parent
H2CLIENT = E2E / "host_router" / "h2client.py"
TENANT = E2E / "sni_router" / "tenant.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test
H = "\r\n"
TABLE = "sgt_web_routers"


def routed(net, tmp_path, rules_text: str, steps: dict[str, str], haproxy: str, vcl: str):
    """Run `steps` in a sandbox under `rules_text`, HAProxy (config text, @IP@ and
    @PEM@ filled in) on 18443 and Varnish (VCL text) on 18080, allowed.test's 443 and
    80 sent to them; tenants ALLOWED (19003) and FORBIDDEN (19004). Returns the
    result and the tenants' log."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    log = tmp_path / "tenants.log"
    log.write_text("")
    pem = tmp_path / "combined.pem"
    pem.write_text(
        (net.workdir / "server.pem").read_text() + (net.workdir / "server.key").read_text()
    )
    haproxy_cfg = tmp_path / "haproxy.cfg"
    haproxy_cfg.write_text(haproxy.replace("@IP@", IP).replace("@PEM@", str(pem)))
    vcl_file = tmp_path / "router.vcl"
    vcl_file.write_text(vcl.replace("@IP@", IP))
    inside = ["ip", "netns", "exec", net.internet_ns]
    tenants = [
        [PY, str(TENANT), IP, str(port), label, "-", "-", str(log)]
        for port, label in [(19003, "ALLOWED-HTTP-TENANT"), (19004, "FORBIDDEN-HTTP-TENANT")]
    ]
    routers = [
        ["haproxy", "-db", "-f", str(haproxy_cfg)],
        ["varnishd", "-F", "-j", "none", "-n", str(tmp_path / "varnish"),
         "-a", f"{IP}:18080", "-f", str(vcl_file), "-s", "malloc,16m"],
    ]  # fmt: skip
    nat = (
        f"table ip {TABLE} {{\n chain pre {{\n  type nat hook prerouting priority -100;\n"
        f"  ip daddr {IP} tcp dport 80 dnat to {IP}:18080\n"
        f"  ip daddr {IP} tcp dport 443 dnat to {IP}:18443\n }}\n}}\n"
    )
    subprocess.run([*inside, "nft", "-f", "-"], input=nat, text=True, check=True)
    listens = [f"{IP}:{port}" for port in (18443, 18080, 19003, 19004)]
    try:
        with internet_servers(net, [*tenants, *routers], listens):
            result = sandbox.run(
                net,
                tmp_path,
                {"resolve": sandbox.dig("allowed.test"), **steps},
                rules=rules,
                setup=lambda d: shutil.copy(H2CLIENT, d / "h2client.py"),
            )
    finally:
        subprocess.run([*inside, "nft", "delete", "table", "ip", TABLE], check=False)
    return result, log.read_text()


def h2(fields: list[tuple[str, str]], port: int = 443) -> str:
    return f"{PY} h2client.py {IP} {port} allowed.test h2 {shlex.quote(json.dumps(fields))}"


def h1(port: int, requests: list[str], tls: bool = True) -> str:
    sni = "allowed.test" if tls else "-"
    return f"{PY} h2client.py {IP} {port} {sni} h1 {shlex.quote(json.dumps(requests))}"


def get(path: str, host: str, *fields: str, close: bool = True) -> str:
    extra = "".join(f + H for f in fields)
    return (
        f"GET {path} HTTP/1.1{H}Host: {host}{H}{extra}"
        + (f"Connection: close{H}" if close else "")
        + H
    )


def got(tenants: str, label: str) -> list[str]:
    return [
        line.split("request='")[1].split()[1]
        for line in tenants.splitlines()
        if line.startswith(f"{label} got")
    ]
