"""A red team (session 49): the front door keeps a sandbox's idle plain-HTTP upstream
connections by address alone (http1_relay._pool_key: task, sandbox, ip, port), so a
request decided for one name goes on a connection opened for another name at the
same address. A router that picks the backend once per connection (HAProxy in TCP
mode with an HTTP fetch, `tcp-request content` + `req.hdr(host)`: HTTP in TCP) reads
the first request's Host for the whole connection: the second name's request is
served by the first name's tenant, past that name's path rules. (Squid, which the
pool's docstring cites, keys its persistent connections by address *and* domain.)

Rules: allowed.test GET /public/** only; www.allowed.test GET /** (both at
203.0.113.10). The task asks allowed.test for /public/a, then www.allowed.test for
/private on a new connection: the allowed.test tenant must never serve /private."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
PORT = 8090

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: allowed-public
        ports: [{PORT}]
        methods: [GET]
        paths: ["/public/**"]
      - allow: www.allowed.test
        id: www-all
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
"""
# The same with a websocket rule elsewhere: plain HTTP goes to mitmproxy.
RULES_MITM = (
    RULES
    + """\
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""
)

ROUTER = """\
global
    maxconn 100
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend http_in_tcp
    mode tcp
    bind @IP@:@PORT@
    tcp-request inspect-delay 5s
    tcp-request content accept if HTTP
    use_backend allowed if { req.hdr(host),field(1,:) -i allowed.test }
    use_backend www if { req.hdr(host),field(1,:) -i www.allowed.test }
backend allowed
    mode tcp
    server a @IP@:19011
backend www
    mode tcp
    server w @IP@:19012
"""


def served(net, tmp_path, steps: dict[str, str], name: str, rules_text: str = RULES):
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    log = tmp_path / "tenants.log"
    log.write_text("")
    config = tmp_path / "haproxy.cfg"
    config.write_text(ROUTER.replace("@IP@", IP).replace("@PORT@", str(PORT)))
    tenant = str(HERE / "host_router" / "keepalive_tenant.py")
    tenants = [
        [PY, tenant, IP, str(port), label, str(log)]
        for port, label in [(19011, "ALLOWED-TENANT"), (19012, "WWW-TENANT")]
    ]
    listens = [f"{IP}:{port}" for port in (PORT, 19011, 19012)]
    with internet_servers(net, [*tenants, ["haproxy", "-db", "-f", str(config)]], listens):
        result = sandbox.run(
            net, tmp_path, steps, rules=rules,
            setup=lambda d: shutil.copy(HERE / "host_router" / "h2client.py", d / "h2client.py"),
        )  # fmt: skip
    tenants = log.read_text()
    return result, tenants


def test_a_pooled_upstream_connection_serves_one_name(net, tmp_path):
    steps = {
        "control": curl(f"http://allowed.test:{PORT}/private"),  # refused: path rule
        "public": curl(f"http://allowed.test:{PORT}/public/a"),
        "www_private": curl(f"http://www.allowed.test:{PORT}/private"),
    }
    result, tenants = served(net, tmp_path, steps, "pooled")
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "ALLOWED-TENANT got conn=1 path=/public/a" in tenants, why  # the honest control
    by_allowed = [x for x in tenants.splitlines() if x.startswith("ALLOWED-TENANT got")]
    assert all("path=/public/" in x for x in by_allowed), why


@pytest.mark.parametrize("rules", [RULES_MITM, RULES], ids=["mitmproxy", "frontdoor"])
def test_a_keepalive_host_change_does_not_take_the_first_hosts_upstream(net, tmp_path, rules):
    """The same without the pool: one client connection, `Host: allowed.test` then
    `Host: www.allowed.test` (both decided, both allowed)."""
    requests = [
        f"GET /public/b HTTP/1.1\r\nHost: allowed.test:{PORT}\r\n\r\n",
        f"GET /private2 HTTP/1.1\r\nHost: www.allowed.test:{PORT}\r\nConnection: close\r\n\r\n",
    ]
    steps = {
        "resolve": sandbox.dig("allowed.test") + "; " + sandbox.dig("www.allowed.test"),
        "keepalive": f"{PY} h2client.py {IP} {PORT} - h1 {shlex.quote(json.dumps(requests))}",
    }
    name = "keepalive_change_" + ("mitm" if rules is RULES_MITM else "door")
    result, tenants = served(net, tmp_path, steps, name, rules)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "ALLOWED-TENANT got conn=1 path=/public/b" in tenants, why
    by_allowed = [x for x in tenants.splitlines() if x.startswith("ALLOWED-TENANT got")]
    assert all("path=/public/" in x for x in by_allowed), why
