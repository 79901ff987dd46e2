"""A red team (session 49): a task's own TLS 1.2 resumptions, by ordinary clients, through the
gateway to a TLS 1.2-only nginx (tickets on one port, session cache only on another):
none may be refused (builtin:resumed-session)."""

from __future__ import annotations

import subprocess

import pytest
from support import sandbox
from support.servers import NGINX_FRAME, listening

pytestmark = pytest.mark.e2e

PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
T, C = 9443, 9444  # tickets; session cache only

# Formatted once, with the frame: its braces doubled.
NGINX = NGINX_FRAME.replace(
    "{http}",
    """\
    log_format t '$server_port reused=$ssl_session_reused proto=$ssl_protocol "$request"';
    access_log {w}/access.log t;
    ssl_protocols TLSv1.2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_session_cache shared:H:1m;
    server {{
        listen {ip}:{t} ssl;
        server_name allowed.test;
        root {w}/www;
    }}
    server {{
        listen {ip}:{c} ssl;
        server_name allowed.test;
        ssl_session_tickets off;
        root {w}/www;
    }}""",
)

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{T}, {C}]
        id: tenant-allowed
"""

NODE = """
const https = require('https');
process.argv.splice(1, 1);
const agent = new https.Agent({keepAlive: false, maxVersion: 'TLSv1.2'});
let n = 0;
function get() {
  https.get({host: 'allowed.test', port: +process.argv[1], path: '/a.txt', agent,
             headers: {Connection: 'close'}}, res => {
    res.on('data', () => {});
    res.on('end', () => {
      console.log('status', res.statusCode, 'reused', res.socket.isSessionReused());
      if (++n < 3) setTimeout(get, 100);
    });
  }).on('error', e => console.log('error', e.message));
}
get();
"""

PYSESS = """
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
session = None
for i in range(3):
    with socket.create_connection(('allowed.test', int(sys.argv[1]))) as s:
        with ctx.wrap_socket(s, server_hostname='allowed.test', session=session) as t:
            t.sendall(b'GET /a.txt HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n')
            data = b''
            while (p := t.recv(4096)):
                data += p
            print(i, 'reused', t.session_reused, data.split(b'\\r\\n')[0].decode())
            session = t.session
"""


def test_honest_resumptions_are_not_refused(net, tmp_path):
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    w = tmp_path / "nginx"
    (w / "www").mkdir(parents=True)
    (w / "www" / "a.txt").write_text("hello\n")
    (w / "www" / "b.txt").write_text("world\n")
    # A repository served by dumb HTTP: git fetches many files, a connection each.
    repo = tmp_path / "src"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(3):
        (repo / f"f{i}").write_text(str(i))
        subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=x", "-c", "user.email=x@x",
                        "commit", "-qm", f"c{i}"], check=True)  # fmt: skip
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(w / "www" / "repo.git")],
                   check=True)  # fmt: skip
    subprocess.run(["git", "-C", str(w / "www" / "repo.git"), "update-server-info"], check=True)
    (w / "nginx.conf").write_text(NGINX.format(w=w, ip=IP, t=T, c=C, cert=cert, key=key))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    inside = ["ip", "netns", "exec", net.internet_ns]
    nginx = subprocess.Popen(
        [*inside, "nginx", "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "err.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert sandbox.eventually(lambda: listening(net, [f"{IP}:{T}", f"{IP}:{C}"]), timeout=10), (
            w / "err.log"
        ).read_text()
        steps = {"resolve": sandbox.dig("allowed.test")}
        for port in (T, C):
            steps[f"curl_{port}"] = (
                f"curl -sS --tls-max 1.2 -H 'Connection: close' "
                f"https://allowed.test:{port}/a.txt https://allowed.test:{port}/b.txt "
                f"https://allowed.test:{port}/a.txt"
            )
            steps[f"reconnect_{port}"] = (
                f"timeout 20 openssl s_client -tls1_2 -reconnect -connect allowed.test:{port} "
                f"-servername allowed.test </dev/null 2>&1 | grep -E '^(New|Reused)'"
            )
            steps[f"python_{port}"] = sandbox.python(PYSESS, str(port))
            steps[f"node_{port}"] = f"timeout 20 node node_get.js {port}"
            steps[f"git_{port}"] = (
                f"timeout 30 git -c http.sslVersion=tlsv1.2 clone -q "
                f"https://allowed.test:{port}/repo.git g{port} && git -C g{port} log --oneline"
            )
            steps[f"gnutls_{port}"] = (
                f"timeout 20 gnutls-cli --priority NORMAL:-VERS-TLS1.3 --resume "
                f"--port {port} allowed.test </dev/null 2>&1 | grep -i 'resum'"
            )
        result = sandbox.run(
            net,
            tmp_path,
            steps,
            rules=rules,
            timeout=180,
            setup=lambda d: (d / "node_get.js").write_text(NODE),
        )
    finally:
        nginx.terminate()
        nginx.wait(5)
    access = (w / "access.log").read_text() if (w / "access.log").exists() else ""
    why = f"{result.describe()}\nnginx:\n{access}"
    refused = result.events(rule_id="builtin:resumed-session")
    assert "reused=r proto=TLSv1.2" in access, why  # resumptions happened
    assert not refused, why
    for port in (T, C):
        assert "reused true" in result[f"node_{port}"].out, why
        assert "reused True" in result[f"python_{port}"].out, why
        assert "Reused, TLSv1.2" in result[f"reconnect_{port}"].out, why
        assert "resumed session" in result[f"gnutls_{port}"].out, why
        assert "c0" in result[f"git_{port}"].out, why
        assert result[f"curl_{port}"].out == "hello\nworld\nhello\n", why
