"""A router in front of two tenants at one address: HAProxy's `req.ssl_sni`, the most
common SNI router, and its `hdr(host)` for plain HTTP. The gateway passes TLS through
by the ClientHello's SNI, and forwards HTTP by the Host it decided; the router must
read the same name from the same bytes, or the connection reaches a tenant no rule
allowed.

- A hello split over records (a red team, session 48): the gateway joined the
  records and read `allowed.test`; HAProxy reads the first record as the whole hello,
  took the second record's header for an extension, jumped into the ALPN extension
  and found a server_name for `www.allowed.test` hidden there: the forbidden tenant
  served the task. A first record of 8 bytes: HAProxy found no SNI at all and used
  its default backend. Now a ClientHello split over records is refused
  (clienthello.py: no client library splits one that fits a record).
- An SNI spelled otherwise than decided (`allowed.test.`, `ALLOWED.TEST`): the
  gateway decided `allowed.test`; `req.ssl_sni -i allowed.test` does not match the
  trailing dot, and the router's default backend served it. Now passed-through
  hellos must spell their SNI as decided (lower case, no trailing dot).
- A hello in a record version no client sends (`16 00 01`: Go's crypto/tls takes
  it), or with a legacy_version of 0x0400 (OpenSSL takes it): the router finds no
  name in it and uses its default backend. Now refused.
- The same for a plain-HTTP Host (`allowed.test.`): `hdr(host) -i allowed.test` did
  not match it, and the router's default backend got the request. The gateway now
  forwards the Host it decided (`allowed.test`), the port as sent.

Each forbidden attempt is checked against the tenants' own log: nothing reached the
forbidden one; the honest hello reaches the allowed one in the same run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent / "sni_router"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test and www.allowed.test
PORT, HTTP_PORT = 8443, 8088
CLIENT = f"{PY} reframing_client.py {IP} {PORT} allowed.test www.allowed.test"

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PORT}, {HTTP_PORT}]
        id: tenant-allowed
"""


def through_router(net, tmp_path, default: str, steps: dict[str, str]):
    """HAProxy at IP:PORT routing TLS by req.ssl_sni to the allowed and the forbidden
    tenant (`default`: its default_backend line, or none), and at IP:HTTP_PORT plain
    HTTP by Host (its default backend the forbidden HTTP tenant); one sandbox runs
    `steps`. Returns the run's result and the tenants' log."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "tenants.log"
    log.touch()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        (HERE / "haproxy.cfg.tmpl")
        .read_text()
        .replace("@BIND@", f"{IP}:{PORT}")
        .replace("@GOOD@", f"{IP}:19001")
        .replace("@BAD@", f"{IP}:19002")
        .replace("@DEFAULT@", default)
        .replace("@HTTP_BIND@", f"{IP}:{HTTP_PORT}")
        .replace("@HTTP_GOOD@", f"{IP}:19003")
        .replace("@HTTP_BAD@", f"{IP}:19004")
    )
    certificate, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    tenants = [
        [PY, str(HERE / "tenant.py"), IP, str(port), *tenant, str(log)]
        for port, *tenant in [
            (19001, "ALLOWED-TENANT", certificate, key),
            (19002, "FORBIDDEN-TENANT", certificate, key),
            (19003, "ALLOWED-HTTP-TENANT", "-", "-"),
            (19004, "FORBIDDEN-HTTP-TENANT", "-", "-"),
        ]
    ]
    listens = [f"{IP}:{port}" for port in (PORT, HTTP_PORT, 19001, 19002, 19003, 19004)]
    with internet_servers(net, [*tenants, ["haproxy", "-db", "-f", str(config)]], listens):
        # Resolved through the gateway first, as the client's own lookup would.
        steps = {"resolve": sandbox.dig("allowed.test"), **steps}
        result = sandbox.run(net, tmp_path, steps, rules=rules, setup=copy_client)
    return result, log.read_text()


def copy_client(steps: Path) -> None:
    shutil.copy(HERE / "reframing_client.py", steps / "reframing_client.py")


def hellos(*modes: str) -> dict[str, str]:
    """The client once in each of `modes` (the path is the mode's name)."""
    return {mode: f"{CLIENT} /{mode} {mode}" for mode in modes}


def test_a_hello_split_over_records_is_refused_before_the_router_reads_it(net, tmp_path):
    steps = hellos("honest", "straight", "split", "tiny")
    result, tenants = through_router(net, tmp_path, "", steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert result["honest"].rc == 0 and "SECRET of ALLOWED-TENANT" in result["honest"].out, why
    assert result["straight"].rc != 0, why  # SNI www.allowed.test: no rule
    for mode in ("split", "tiny"):
        assert result[mode].rc != 0 and "SECRET" not in result[mode].out, why
    assert "FORBIDDEN-TENANT got" not in tenants and "FORBIDDEN-TENANT connection" not in tenants
    refused = result.events(kind="connection", verdict="deny", reason="malformed_tls")
    assert len(refused) == 2 and all("split over TLS records" in e["detail"] for e in refused), why
    allowed = result.events(kind="connection", verdict="allow", protocol="tls")
    assert len(allowed) == 1, why  # the honest hello alone


def test_an_sni_spelled_otherwise_than_decided_is_refused_when_passed_through(net, tmp_path):
    """With a default backend (the forbidden tenant), as a provider's catch-all has it:
    a hello without SNI would reach it, which the gateway refuses (missing_sni); so
    are the spellings the router matches as no name."""
    steps = hellos("honest", "nosni", "dot", "upper", "record0001", "legacy0400")
    result, tenants = through_router(net, tmp_path, "default_backend tenant_forbidden", steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert result["honest"].rc == 0 and "SECRET of ALLOWED-TENANT" in result["honest"].out, why
    for mode in ("nosni", "dot", "upper", "record0001", "legacy0400"):
        assert result[mode].rc != 0 and "SECRET" not in result[mode].out, why
    assert "FORBIDDEN-TENANT got" not in tenants and "FORBIDDEN-TENANT connection" not in tenants
    assert result.events(kind="connection", verdict="deny", reason="missing_sni"), why
    spelled = result.events(kind="connection", verdict="deny", reason="invalid_name")
    assert sorted(e["detail"].split("'")[1] for e in spelled) == ["ALLOWED.TEST", "allowed.test."]
    assert all(e["rule_id"] == "builtin:malformed-tls" for e in spelled), why
    versions = result.events(kind="connection", verdict="deny", reason="malformed_tls")
    assert sorted(e["detail"].split(": ", 1)[1] for e in versions) == [
        "ClientHello legacy_version 0400",
        "a ClientHello in a record of version 0001",
    ], why


def test_a_host_spelled_otherwise_than_decided_is_forwarded_as_decided(net, tmp_path):
    """Plain HTTP can be forwarded as decided: the Host is rewritten to the decided
    name and the connection's port (not the scheme's default: as clients write it),
    on the fast path and on h11's (a request with a body)."""
    url = f"http://allowed.test:{HTTP_PORT}"
    steps = {
        "honest": curl(f"{url}/honest"),
        "dot": curl("-H", "Host: allowed.test.", f"{url}/dot"),
        "dot_port": curl("-H", f"Host: ALLOWED.TEST.:{HTTP_PORT}", f"{url}/dot_port"),
        "dot_body": curl("-H", "Host: allowed.test.", "-d", "x=1", f"{url}/dot_body"),
    }
    result, tenants = through_router(net, tmp_path, "", steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    for label in steps:
        assert result[label].status == 200, (label, why)
        assert "SECRET of ALLOWED-HTTP-TENANT" in result[label].body, (label, why)
    assert "FORBIDDEN-HTTP-TENANT got" not in tenants, why
    hosts = sorted(line.rsplit("host=", 1)[1] for line in tenants.splitlines() if " got " in line)
    port = f"allowed.test:{HTTP_PORT}"
    assert hosts == [port] * 4, why
    assert len(result.events(kind="request", verdict="allow", name="allowed.test")) == 4, why
