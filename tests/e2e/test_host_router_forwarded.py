"""A red team (session 49): host overrides the gateway does not see as such, against a real
Forwarded parser (Spring's UriComponentsBuilder, Debian's libspring-web-java 4.3).

Spring (UriComponentsBuilder.adaptFromForwardedHeaders 4.3-6.0; ForwardedHeaderUtils
6.1+, the same pattern case-insensitive), Reactor Netty's
DefaultHttpForwardedHeaderHandler and Vert.x's ForwardedParser find the host in a
Forwarded field with an unanchored regex, `host="?([^;,"]+)"?` + Matcher.find(), over
its first element: any `host=` in it counts, inside another parameter's quoted value
(`for="host=forbidden.test"`) or as the tail of another parameter's name
(`xhost=forbidden.test`). The gateway (request_head._overrides) reads only pairs
whose key is exactly `host`: it sees no host override in either, and forwards them.

The app: a JDK HTTP server whose tenant is the host Spring reports
(UriComponentsBuilder.fromHttpRequest, as ForwardedHeaderFilter and
ServletUriComponentsBuilder.fromCurrentRequest read it): allowed.test is the allowed
tenant, any other host the forbidden one (a catch-all). Its log is the proof.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import listening

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
SRC = HERE / "host_router" / "SpringTenants.java"
CP = ":".join(
    f"/usr/share/java/{j}.jar" for j in ("spring3-web", "spring3-core", "commons-logging")
)
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
PORT = 8088
H = "\r\n"

RULES_MITM = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tenant-allowed
        ports: [{PORT}]
        methods: [GET, POST]
        paths: ["/**"]
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""
RULES_DOOR = "\n".join(RULES_MITM.splitlines()[:10]) + "\n"


def req(path: str, *fields: str) -> str:
    """One plain HTTP/1.1 request to allowed.test:PORT with `fields`."""
    head = f"GET {path} HTTP/1.1{H}Host: allowed.test:{PORT}{H}" + "".join(f + H for f in fields)
    request = head + f"Connection: close{H}{H}"
    return f"{PY} h2client.py {IP} {PORT} - h1 {shlex.quote(json.dumps([request]))}"


def spring_served(net, tmp_path, rules: str, steps: dict[str, str], name: str):
    """`steps` run in a sandbox under `rules`, the Spring app in the fake internet at
    allowed.test's address: the run's result and the app's log."""
    if not Path("/usr/share/java/spring3-web.jar").exists() or not shutil.which("javac"):
        pytest.fail("apt-get install -y libspring-web-java default-jdk-headless")
    classes = tmp_path / "classes"
    subprocess.run(["javac", "-cp", CP, "-d", str(classes), str(SRC)], check=True)
    log = tmp_path / "tenants.log"
    log.write_text("")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    app = subprocess.Popen(
        ["ip", "netns", "exec", net.internet_ns, "java", "-Djava.net.preferIPv4Stack=true",
         "-cp", f"{CP}:{classes}", "SpringTenants", IP, str(PORT), str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert sandbox.eventually(lambda: "ready" in log.read_text(), timeout=20), "no app"
        assert sandbox.eventually(lambda: listening(net, [f"{IP}:{PORT}"]), timeout=10)
        result = sandbox.run(
            net,
            tmp_path,
            {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules_file,
            setup=lambda d: shutil.copy(HERE / "host_router" / "h2client.py", d / "h2client.py"),
        )
    finally:
        app.terminate()
        app.wait(10)
    tenants = log.read_text()
    return result, tenants


def forbidden_got(tenants: str) -> list[str]:
    return [line for line in tenants.splitlines() if line.startswith("FORBIDDEN")]


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_forwarded_host_inside_another_parameter_is_decided(net, tmp_path, rules):
    steps = {
        "honest": req("/honest", "Forwarded: for=192.0.2.1;proto=http"),
        # The gateway's own check holds for a plain host= (control: refused).
        "plain_host": req("/plain_host", "Forwarded: for=192.0.2.1;host=forbidden.test"),
        "in_quoted_for": req("/in_quoted_for", 'Forwarded: for="host=forbidden.test"'),
        "name_tail": req("/name_tail", "Forwarded: xhost=forbidden.test"),
        "in_by": req("/in_by", "Forwarded: for=192.0.2.1;by=host=forbidden.test"),
    }
    name = f"forwarded_{'door' if rules is RULES_DOOR else 'mitm'}"
    result, tenants = spring_served(net, tmp_path, rules, steps, name)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "ALLOWED-SPRING-TENANT got path=/honest" in tenants, why  # the honest control
    assert "path=/plain_host" not in tenants, why  # the gateway's check, as it is
    assert forbidden_got(tenants) == [], why


def test_x_forwarded_port_names_a_port_not_decided(net, tmp_path):
    """A host override naming another port is refused (`X-Forwarded-Host:
    allowed.test:9443` on a connection to 8088: host_mismatch), but X-Forwarded-Port,
    which Spring (and Werkzeug's ProxyFix x_port, Django's USE_X_FORWARDED_PORT,
    Rack) take as the request's port, is not read at all."""
    steps = {
        "honest": req("/honest"),
        "xfh_port": req("/xfh_port", "X-Forwarded-Host: allowed.test:9443"),  # control
        "xfp": req("/xfp", "X-Forwarded-Port: 9443"),
    }
    result, tenants = spring_served(net, tmp_path, RULES_DOOR, steps, "x_forwarded_port")
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert "ALLOWED-SPRING-TENANT got path=/honest" in tenants, why
    assert "path=/xfh_port" not in tenants, why
    assert forbidden_got(tenants) == [], why
