"""The Host the gateway forwards, against a real Host router: HAProxy terminating TLS
(h2 and HTTP/1.1) and plain HTTP in front of two tenants at one address, the
allowed one matched as configs often write it (`req.hdr(host) -m str allowed.test
allowed.test:PORT`, exact strings), the forbidden one its default backend. A red
team, session 49:

- A zero-padded port (`Host: allowed.test:08444`, `:authority: allowed.test:08443`):
  read as port 8444, the connection's, so the name was decided and allowed; but the
  Host went on as sent, the router matched neither string and its default backend
  served the task. On plain HTTP, inspected HTTP/1 (the front door's and
  mitmproxy's), HTTP/2 and after an approval alike. Now the Host goes on as decided,
  its port without leading zeros (gate._as_decided); a host override (X-Forwarded-
  Host), which goes on as sent, must be spelled so (`host_mismatch`).
- HTTP/2 request heads that h2 refuses (a `host` other than `:authority`, the other
  tenant's name; userinfo; no authority) closed the connection with a GOAWAY and left
  no event but the connection's allow and end. Now each is a `malformed_request`
  event naming the GOAWAY's text (lean_mitmproxy.mark_h2_protocol_errors).

Each attempt is checked against the tenants' own log (the forbidden one got
nothing) and the audit log; the honest request reaches the allowed tenant in the
same run.
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

HERE = Path(__file__).parent / "host_router"
TENANT = Path(__file__).parent / "sni_router" / "tenant.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test and www.allowed.test

# Inspected (methods, paths). The websocket rule (another name) sends the profile's
# inspected TLS to mitmproxy, so HTTP/2 clients get HTTP/2.
RULES_MITM = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tenant-allowed
        ports: [8443, 8444, 8088]
        methods: [GET, POST]
        paths: ["/**"]
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""
# The same without the websocket rule: the front door's own inspection (HTTP/1.1).
RULES_DOOR = "\n".join(RULES_MITM.splitlines()[:10]) + "\n"


def routed(net, tmp_path, rules_text: str, steps: dict[str, str]):
    """`steps` run in a sandbox under `rules_text`, HAProxy and the two tenants in
    the fake internet: the run's result and the tenants' log."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    log = tmp_path / "tenants.log"
    log.write_text("")
    pem = tmp_path / "combined.pem"
    pem.write_text(
        (net.workdir / "server.pem").read_text() + (net.workdir / "server.key").read_text()
    )
    config = tmp_path / "haproxy.cfg"
    template = (HERE / "haproxy.cfg.tmpl").read_text()
    config.write_text(template.replace("@IP@", IP).replace("@PEM@", str(pem)))
    tenants = [
        [PY, str(TENANT), IP, str(port), label, "-", "-", str(log)]
        for port, label in [(19003, "ALLOWED-HTTP-TENANT"), (19004, "FORBIDDEN-HTTP-TENANT")]
    ]
    listens = [f"{IP}:{port}" for port in (8443, 8444, 8088, 19003, 19004)]
    with internet_servers(net, [*tenants, ["haproxy", "-db", "-f", str(config)]], listens):
        result = sandbox.run(
            net,
            tmp_path,
            {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules,
            setup=lambda d: shutil.copy(HERE / "h2client.py", d / "h2client.py"),
        )
    return result, log.read_text()


def h2(path: str, *headers: tuple[str, str], authority: str | None = "allowed.test") -> str:
    """One HTTP/2 request to port 8443 (SNI allowed.test), its fields as given."""
    fields = [(":method", "GET"), (":scheme", "https"), (":path", path)]
    if authority is not None:
        fields.append((":authority", authority))
    fields += list(headers)
    return f"{PY} h2client.py {IP} 8443 allowed.test h2 {shlex.quote(json.dumps(fields))}"


def h1(port: int, path: str, host: str, *fields: str, tls: bool = True) -> str:
    """One HTTP/1.1 request to `port`: over TLS (SNI allowed.test) or plain."""
    return sandbox.h1(IP, port, path, tls, host, fields)


def forbidden_got(tenants: str) -> list[str]:
    return [line for line in tenants.splitlines() if line.startswith("FORBIDDEN-HTTP-TENANT got")]


def allowed_got(tenants: str) -> set[str]:
    return {
        line.split("request='GET ")[1].split()[0]
        for line in tenants.splitlines()
        if line.startswith("ALLOWED-HTTP-TENANT got")
    }


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_a_zero_padded_port_goes_on_without_its_zeros(net, tmp_path, rules):
    steps = {
        "honest": h2("/honest", authority="allowed.test:8443"),
        "h2_authority": h2("/h2_authority", authority="allowed.test:08443"),
        "h2_host_field": h2("/h2_host_field", ("host", "allowed.test:0008443"), authority=None),
        "h1_tls": h1(8444, "/h1_tls", "allowed.test:08444"),
        "h1_tls_respelt": h1(8444, "/h1_tls_respelt", "ALLOWED.TEST.:08444"),
        "h1_absolute": h1(8444, "https://allowed.test:08444/h1_absolute", "allowed.test:08444"),
        "plain": h1(8088, "/plain", "allowed.test:08088", tls=False),
        "override": h1(8444, "/override", "allowed.test", "X-Forwarded-Host: allowed.test:08444"),
    }
    result, tenants = routed(net, tmp_path, rules, steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert forbidden_got(tenants) == [], why
    # Each went to the allowed tenant, as decided (an h2 client goes to mitmproxy
    # under either rule set: the front door's own inspection is HTTP/1.1's).
    reached = {"/honest", "/h2_authority", "/h2_host_field", "/h1_tls", "/h1_tls_respelt"}
    assert allowed_got(tenants) == reached | {"/h1_absolute", "/plain"}, why
    # The override goes on as sent: refused, said.
    assert "SECRET" not in result["override"].out, why
    [refused] = [e for e in result.events(kind="request") if e["verdict"] == "deny"]
    assert refused["reason"] == "host_mismatch" and "08444" in refused["detail"], why


def test_http2_heads_h2_refuses_are_on_the_record(net, tmp_path):
    steps = {
        "honest": h2("/honest"),
        "other_tenant_host": h2("/other_tenant_host", ("host", "www.allowed.test")),
        "userinfo": h2("/userinfo", authority="www.allowed.test@allowed.test"),
        "no_authority": h2("/no_authority", authority=None),
    }
    result, tenants = routed(net, tmp_path, RULES_MITM, steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert allowed_got(tenants) == {"/honest"} and forbidden_got(tenants) == [], why
    refused = result.events(kind="connection", reason="malformed_request")
    assert [e["rule_id"] for e in refused] == ["builtin:malformed-request"] * 3, why
    details = " ".join(e["detail"] for e in refused)
    assert "mismatched :authority and Host" in details, why
    assert "does not have an :authority or Host" in details, why
    for label in ("other_tenant_host", "userinfo", "no_authority"):
        assert "GOAWAY" in result[label].out, (label, why)
