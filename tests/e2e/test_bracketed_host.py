"""A Host with a name in brackets (`[allowed.test]`): the gateway read it as the name
inside, nginx reads it as written, matches no server_name and serves the address's
default server, a virtual host no rule allows. Plain HTTP, inspected HTTP/1.1 and
inspected HTTP/2 alike (inspection is the documented remedy for shared servers).
Brackets now hold an IPv6 address only (names.parse_host_port): such a Host is
refused, and the default server serves nothing."""

from __future__ import annotations

import json
import time

import pytest
from support import sandbox
from support.sandbox import curl, python
from support.servers import nginx_server

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [8080]
        id: rt-plain
      - allow: allowed.test
        ports: [8443]
        methods: [GET, HEAD]
        id: rt-inspected
"""

NGINX_HTTP = """\
    log_format rt escape=json '{{"port":"$server_port","host":"$host","server":"$server_name","uri":"$request_uri","sni":"$ssl_server_name"}}';
    access_log {w}/access.log rt;
    default_type text/plain;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen {ip}:8080 default_server;
        listen {ip}:8443 ssl http2 default_server;
        server_name secret.test;
        return 200 "SECRET-VHOST host=$host\\n";
    }}
    server {{
        listen {ip}:8080;
        listen {ip}:8443 ssl http2;
        server_name allowed.test;
        return 200 "allowed-vhost host=$host\\n";
    }}
"""

# argv: port, tls (0/1), Host, target. Resolves allowed.test through the gateway
# first (so the address is bound to the name), prints the body or "closed"/status.
CLIENT = r"""
import socket, ssl, sys
port, tls, host, target = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
socket.gethostbyname("allowed.test")
s = socket.create_connection(("203.0.113.10", port), timeout=3)
if tls:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    s = ctx.wrap_socket(s, server_hostname="allowed.test")
s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except OSError:
    pass
head, _, body = data.partition(b"\r\n\r\n")
print((head.split(b"\r\n")[0].decode() or "closed") + " | " + body.decode(errors="replace").strip()[:120])
"""


@pytest.fixture
def vhosts(fakenet, tmp_path):
    """The two virtual hosts' nginx; yields its access log."""
    w = tmp_path / "nginx"
    w.mkdir()
    pem, key = fakenet.workdir / "server.pem", fakenet.workdir / "server.key"
    with nginx_server(
        fakenet, w, NGINX_HTTP.format(w=w, ip=IP, cert=pem, key=key), [f"{IP}:8080", f"{IP}:8443"]
    ):
        yield w / "access.log"


def client(port, tls, host, target="/"):
    return python(CLIENT, str(port), "1" if tls else "0", host, target)


def test_a_name_in_brackets_reaches_no_other_virtual_host(fakenet, tmp_path, vhosts):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = sandbox.run(fakenet, tmp_path, {
        "plain_ok": client(8080, False, "allowed.test", "/plain-ok"),
        "plain_secret": client(8080, False, "secret.test", "/plain-secret-name"),
        "plain_bracket": client(8080, False, "[allowed.test]", "/plain-bracket"),
        "plain_bracket_port": client(8080, False, "[ALLOWED.TEST.]:8080", "/plain-bracket-port"),
        "plain_bracket_abs": client(8080, False, "[allowed.test]", "http://[allowed.test]/plain-bracket-abs"),
        "tls_ok": client(8443, True, "allowed.test", "/tls-ok"),
        "tls_bracket": client(8443, True, "[allowed.test]", "/tls-bracket"),
        "h2_bracket": curl("-k", "--http2", "-H", "Host: [allowed.test]", "https://allowed.test:8443/h2-bracket"),
        "h2_ok": curl("-k", "--http2", "https://allowed.test:8443/h2-ok"),
    }, rules=rules)  # fmt: skip
    time.sleep(0.3)  # nginx's access log line
    served = [json.loads(line) for line in vhosts.read_text().splitlines()]
    assert "allowed-vhost" in r["plain_ok"].out and "allowed-vhost" in r["tls_ok"].out, r.describe()
    assert "allowed-vhost" in r["h2_ok"].out, r.describe()
    assert "SECRET" not in r["plain_secret"].out, r.describe()
    assert [e for e in served if e["server"] != "allowed.test"] == [], served
    refused = {e["path"] for e in r.events(kind="request", verdict="deny")}
    for label in ("plain_bracket", "plain_bracket_port", "tls_bracket", "h2_bracket"):
        assert "403" in r[label].out, r.describe()
        assert "/" + label.replace("_", "-") in refused, r.describe()
