"""A TLS 1.2 session resumed under another name (a red team, session 49).

The gateway passes TLS through by the ClientHello's SNI. A TLS 1.2 server that
resumes a session (a ticket, RFC 5077, or a cached session id) takes the server
name from the session, not from the hello: OpenSSL's SSL_get_servername() returns
the session's name, and SNI routers that terminate TLS pick the tenant by it. The
owner of a tenant no rule allows gets a session for it anywhere (here: from the fake
internet, not through the gateway: `openssl s_client -sess_out`, a ticket and its
master secret in a file) and hands it to the task, which resumes it with SNI
`allowed.test` at the shared address. Before the fix the gateway passed it and the
forbidden tenant served the task, against stunnel (`sni =` services), a Python
`ssl` server dispatching in `sni_callback`, nginx (a stream `map $ssl_server_name`
router, tickets and its session cache; http vhosts that refuse fronting with
`$ssl_server_name != $host`) and HAProxy routing by `ssl_fc_sni`.

Now a pass-through connection allowed by name may resume only a session the gateway
saw issued to the sandbox on a connection decided for the same name, address and
port (proxy/tls_sessions.py); anything else is reset before the client's next bytes
(`builtin:resumed-session`). Each attack is checked against the tenants' own log and
the deny event; the honest connection reaches the allowed tenant in the same run,
and the task's own sessions, issued through the gateway, resume (tickets and the
session cache alike).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
TENANT = HERE / "sni_router" / "tenant.py"
DISPATCH = HERE / "sni_router" / "sni_dispatch.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test; www.allowed.test is the other tenant, no rule allows it
PORT = 8443
FORBIDDEN = "www.allowed.test"

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        id: tenant-allowed
"""

STUNNEL = """\
foreground = yes
pid =
debug = 5
[tls]
accept = {ip}:{port}
cert = {cert}
key = {key}
connect = {ip}:19099
[allowed]
sni = tls:allowed.test
cert = {cert}
key = {key}
connect = {ip}:19011
[forbidden]
sni = tls:{forbidden}
cert = {cert}
key = {key}
connect = {ip}:19012
"""


def s_client(path: str, sni: str, *options: str) -> str:
    request = f"GET {path} HTTP/1.1\\r\\nHost: {sni}\\r\\nConnection: close\\r\\n\\r\\n"
    return (
        f"printf '{request}' | timeout 10 openssl s_client -quiet -tls1_2 "
        f"-connect {IP}:{PORT} -servername {sni} {' '.join(options)}"
    )


def accomplice_ticket(net, where: Path, *options: str, file: str = "forbidden.sess") -> Path:
    """A TLS 1.2 session (ticket and master secret) for the forbidden tenant, got from
    the fake internet (not through the gateway), as its owner gets one anywhere."""
    session = where / file
    proc = subprocess.run(
        ["ip", "netns", "exec", net.internet_ns, "sh", "-c",
         s_client("/accomplice", FORBIDDEN, "-sess_out", str(session), *options)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert "SECRET of FORBIDDEN" in proc.stdout, proc.stdout + proc.stderr
    assert session.stat().st_size, session
    return session


def resume_across_names(net, tmp_path, servers: list[list[str]], addresses: list[str]):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "tenants.log"
    log.touch()
    with internet_servers(net, servers, addresses):
        session = accomplice_ticket(net, tmp_path)
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "honest": s_client("/honest", "allowed.test"),
            "resumed": s_client("/resumed", "allowed.test", "-sess_in", "forbidden.sess"),
        }
        result = sandbox.run(
            net, tmp_path, steps, rules=rules,
            setup=lambda d: shutil.copy(session, d / "forbidden.sess"),
        )  # fmt: skip
    return result, log.read_text()


def check(result, tenants: str):
    why = f"{result.describe()}\ntenants:\n{tenants}"
    # The control: the honest hello reaches the allowed tenant.
    assert "SECRET of ALLOWED" in result["honest"].out, why
    assert "/accomplice" in tenants, why  # the ticket was the forbidden tenant's
    # The gateway decided both task connections as allowed.test (pass-through).
    allowed = result.events(kind="connection", verdict="allow", protocol="tls")
    assert [e["name"] for e in allowed].count("allowed.test") >= 1, why
    # The task never reaches the forbidden tenant: the resumption was refused, and said.
    assert "SECRET of FORBIDDEN" not in result["resumed"].out, why
    [refused] = result.events(kind="connection", rule_id="builtin:resumed-session")
    assert refused["name"] == "allowed.test" and refused["reason"] == "spoofed_destination", why
    assert "did not see issued" in refused["detail"], why
    assert not [
        line for line in tenants.splitlines() if "FORBIDDEN" in line and "/resumed" in line
    ], why


def test_stunnel_sni_services_do_not_resume_the_forbidden_tenants_session(net, tmp_path):
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    conf = tmp_path / "stunnel.conf"
    conf.write_text(STUNNEL.format(ip=IP, port=PORT, cert=cert, key=key, forbidden=FORBIDDEN))
    log = tmp_path / "tenants.log"
    servers = [
        [PY, str(TENANT), IP, "19011", "ALLOWED-TENANT", "-", "-", str(log)],
        [PY, str(TENANT), IP, "19012", "FORBIDDEN-TENANT", "-", "-", str(log)],
        ["stunnel4", str(conf)],
    ]
    result, tenants = resume_across_names(
        net, tmp_path, servers, [f"{IP}:19011", f"{IP}:19012", f"{IP}:{PORT}"]
    )
    check(result, tenants)


def test_a_python_sni_callback_does_not_resume_the_forbidden_tenants_session(net, tmp_path):
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    log = tmp_path / "tenants.log"
    servers = [
        [PY, str(DISPATCH), IP, str(PORT), cert, key, str(log),
         "allowed.test=ALLOWED-TENANT", f"{FORBIDDEN}=FORBIDDEN-TENANT"],
    ]  # fmt: skip
    result, tenants = resume_across_names(net, tmp_path, servers, [f"{IP}:{PORT}"])
    check(result, tenants)


NGINX = """\
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process off;
worker_processes 1;
user root;
pid {w}/nginx.pid;
error_log {w}/err.log warn;
events {{ worker_connections 64; }}
stream {{
    # A TLS-terminating SNI router: the tenant by the name TLS negotiated.
    map $ssl_server_name $tenant {{
        allowed.test {ip}:19011;
        {forbidden} {ip}:19012;
        default {ip}:19099;
    }}
    server {{
        listen {ip}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:S:1m;
        proxy_pass $tenant;
    }}
}}
http {{
    client_body_temp_path {w}/t1; proxy_temp_path {w}/t2; fastcgi_temp_path {w}/t3;
    uwsgi_temp_path {w}/t4; scgi_temp_path {w}/t5;
    log_format tenant '$server_name got sni=$ssl_server_name host=$host '
                      'request="$request" reused=$ssl_session_reused';
    # Name-based vhosts that refuse domain fronting (a Host other than the SNI: 421).
    server {{
        listen {ip}:{http_port} ssl default_server;
        server_name allowed.test;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:H:1m;
        access_log {w}/tenants.log tenant;
        if ($ssl_server_name != $host) {{ return 421; }}
        location / {{ return 200 "SECRET of ALLOWED-VHOST\\n"; }}
    }}
    server {{
        listen {ip}:{http_port} ssl;
        server_name {forbidden};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:H:1m;
        access_log {w}/tenants.log tenant;
        if ($ssl_server_name != $host) {{ return 421; }}
        location / {{ return 200 "SECRET of FORBIDDEN-VHOST\\n"; }}
    }}
}}
"""
HTTP_PORT = 9443


@contextlib.contextmanager
def nginx_in_front(net, tmp_path) -> Iterator[Path]:
    """The tenants on 19011 and 19012, and nginx (NGINX) in front of them, for the
    block: the log every tenant writes to."""
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    w = tmp_path / "nginx"
    w.mkdir()
    log = tmp_path / "tenants.log"
    log.touch()
    (w / "nginx.conf").write_text(
        NGINX.format(
            w=w, ip=IP, port=PORT, http_port=HTTP_PORT, cert=cert, key=key, forbidden=FORBIDDEN
        ).replace(f"{w}/tenants.log", str(log))
    )
    servers = [
        [PY, str(TENANT), IP, port, label, "-", "-", str(log)]
        for port, label in (("19011", "ALLOWED-TENANT"), ("19012", "FORBIDDEN-TENANT"))
    ]
    servers.append(["nginx", "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "err.log")])
    listens = [f"{IP}:19011", f"{IP}:19012", f"{IP}:{PORT}", f"{IP}:{HTTP_PORT}"]
    with internet_servers(net, servers, listens):
        yield log


def vhost(path: str, *options: str, host: str = "allowed.test") -> str:
    """s_client to the http vhosts' port (SNI allowed.test, Host `host`)."""
    return (
        s_client(path, "allowed.test", *options)
        .replace(f":{PORT}", f":{HTTP_PORT}")
        .replace("Host: allowed.test", f"Host: {host}")
    )


def test_the_tasks_own_sessions_resume(net, tmp_path):
    """What the gateway saw issued resumes: a ticket, and a session id from nginx's
    cache, each got by the task through the gateway and offered again to the same
    name, address and port (another's is refused: tests/unit/test_tls_sessions.py)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(f"[{PORT}]", f"[{PORT}, {HTTP_PORT}]"))
    with nginx_in_front(net, tmp_path) as log:
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "ticket": vhost("/ticket", "-sess_out", "ticket.sess"),
            "ticket_again": vhost("/ticket_again", "-sess_in", "ticket.sess"),
            "id": vhost("/id", "-no_ticket", "-sess_out", "id.sess"),
            "id_again": vhost("/id_again", "-no_ticket", "-sess_in", "id.sess"),
        }
        result = sandbox.run(net, tmp_path, steps, rules=rules)
    tenants = log.read_text()
    why = f"{result.describe()}\ntenants:\n{tenants}"
    for label in ("ticket", "ticket_again", "id", "id_again"):
        assert "SECRET of ALLOWED-VHOST" in result[label].out, (label, why)
    reused = {
        line.split('"GET ')[1].split()[0] for line in tenants.splitlines() if "reused=r" in line
    }
    assert reused == {"/ticket_again", "/id_again"}, why
    assert not result.events(rule_id="builtin:resumed-session"), why


def test_nginx_stream_router_and_http_vhosts_do_not_resume_the_forbidden_session(net, tmp_path):
    """nginx 1.22: a stream `map $ssl_server_name` router (session cache and tickets),
    and http vhosts hardened against domain fronting (`$ssl_server_name != $host`:
    421). The resumed session makes $ssl_server_name the forbidden tenant's name, so
    the router sends the task there and the anti-fronting check passes a Host of the
    forbidden vhost. Controls: fronting without resumption gets the 421."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace(f"[{PORT}]", f"[{PORT}, {HTTP_PORT}]"))
    with nginx_in_front(net, tmp_path) as log:
        stream = accomplice_ticket(net, tmp_path)
        # No ticket: the session id alone, found in nginx's shared session cache.
        cached = accomplice_ticket(net, tmp_path, "-no_ticket", file="cached.sess")
        fronted = tmp_path / "vhost.sess"
        got = subprocess.run(
            ["ip", "netns", "exec", net.internet_ns, "sh", "-c",
             s_client("/accomplice", FORBIDDEN, "-sess_out", str(fronted))
             .replace(f":{PORT}", f":{HTTP_PORT}")],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert "SECRET of FORBIDDEN-VHOST" in got.stdout, got.stdout + got.stderr
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "honest": s_client("/honest", "allowed.test"),
            "resumed": s_client("/resumed", "allowed.test", "-sess_in", "stream.sess"),
            "id_resumed": s_client(
                "/id_resumed", "allowed.test", "-no_ticket", "-sess_in", "cached.sess"
            ),
            "vhost_honest": vhost("/vhost_honest"),
            "vhost_fronted": vhost("/vhost_fronted", host=FORBIDDEN),
            "vhost_resumed": vhost("/vhost_resumed", "-sess_in", "vhost.sess", host=FORBIDDEN),
        }

        def setup(d):
            shutil.copy(stream, d / "stream.sess")
            shutil.copy(fronted, d / "vhost.sess")
            shutil.copy(cached, d / "cached.sess")

        result = sandbox.run(net, tmp_path, steps, rules=rules, setup=setup)
    tenants = log.read_text()
    why = f"{result.describe()}\ntenants:\n{tenants}"
    # Controls: honest connections reach the allowed tenants; fronting alone gets 421.
    assert "SECRET of ALLOWED-TENANT" in result["honest"].out, why
    assert "SECRET of ALLOWED-VHOST" in result["vhost_honest"].out, why
    assert "421" in result["vhost_fronted"].out, why
    # No resumed session reaches a forbidden tenant: each was refused, and said.
    for label in ("resumed", "id_resumed", "vhost_resumed"):
        assert "SECRET of FORBIDDEN" not in result[label].out, (label, why)
    refused = result.events(kind="connection", rule_id="builtin:resumed-session")
    assert len(refused) == 3, why
    kinds = {e["detail"].split(" resumed ")[1].split(" the gateway")[0] for e in refused}
    assert kinds == {"a ticket", "a session id"}, why
    reached = [
        line
        for line in tenants.splitlines()
        if line.startswith(("FORBIDDEN-TENANT got", f"{FORBIDDEN} got")) and "resumed" in line
    ]
    assert not reached, why


HAPROXY = """\
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend tls_terminating_router
    bind {ip}:{port} ssl crt {crt}
    use_backend tenant_allowed if {{ ssl_fc_sni -i allowed.test }}
    use_backend tenant_forbidden if {{ ssl_fc_sni -i {forbidden} }}
backend tenant_allowed
    server a {ip}:19011
backend tenant_forbidden
    server f {ip}:19012
"""


def test_haproxy_ssl_fc_sni_router_does_not_resume_the_forbidden_tenants_session(net, tmp_path):
    """HAProxy 2.6 terminating TLS and routing by `ssl_fc_sni` (the usual config for
    name-based backends behind one certificate list): ssl_fc_sni is
    SSL_get_servername(), the resumed session's name. Tickets and the session cache."""
    crt = tmp_path / "crt.pem"
    crt.write_text(
        (net.workdir / "server.pem").read_text() + (net.workdir / "server.key").read_text()
    )
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY.format(ip=IP, port=PORT, crt=crt, forbidden=FORBIDDEN))
    log = tmp_path / "tenants.log"
    servers = [
        [PY, str(TENANT), IP, "19011", "ALLOWED-TENANT", "-", "-", str(log)],
        [PY, str(TENANT), IP, "19012", "FORBIDDEN-TENANT", "-", "-", str(log)],
        ["haproxy", "-db", "-f", str(conf)],
    ]
    result, tenants = resume_across_names(
        net, tmp_path, servers, [f"{IP}:19011", f"{IP}:19012", f"{IP}:{PORT}"]
    )
    check(result, tenants)
