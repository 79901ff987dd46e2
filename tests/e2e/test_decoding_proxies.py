"""A red team (session 50): a proxy that decodes the path once and passes it
on unescaped cuts it at an escaped '?' or '#'.

The fix for `%2561` (a red team, session 50, behind Apache's `RewriteRule ... [P,NE]`)
refuses an escaped '%' that forms an escape once decoded. Such a proxy decodes every
escape, though: `%3F` becomes a '?' (the rest of the path is the query) and `%23`
a '#' (the rest a fragment, dropped by Python's http.server, Express's parseurl and
WHATWG URL parsers). The gateway decided `/admin/secret.txt%23` as itself, which a
deny of `/admin/secret.txt` did not match (nor one of `/admin.cgi`, `/.env`,
`/config.php`, ...); the application served `/admin/secret.txt`. Now the path is also
decided cut at its first `%23` or `%3F` (names.path_readings): a deny takes it if it
matches either reading, an allow only if it matches both.

Proxies: Apache `RewriteRule ^/(.*)$ http://app/$1 [P,NE]` (2.4.60 and later refuse
a '?' so made, unless [UnsafeAllow3F]: `%23` still passes), and nginx
`proxy_pass http://app$uri;` (`$uri` is the decoded path: the usual way to proxy
"the path without its query").
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from support import sandbox
from support.servers import internet_servers, nginx_server
from web_routers.apache import apache

pytestmark = pytest.mark.e2e

PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"  # allowed.test
HERE = sandbox.Path(__file__).parent

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - deny: allowed.test
        id: no-secret
        ports: [8444, 8088, 8090, 8445]
        paths: ["/admin/secret.txt"]
      - allow: allowed.test
        id: site
        ports: [8444, 8088, 8090, 8445]
        methods: [GET]
        paths: ["/**"]
"""
# A WebSocket rule elsewhere sends the profile's plain HTTP to mitmproxy (needs_engine).
WS_ELSEWHERE = """\
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""

NGINX = """\
    server {{
        listen {ip}:8090;
        listen {ip}:8445 ssl;
        ssl_certificate {pem};
        ssl_certificate_key {key};
        location / {{ proxy_pass http://{ip}:19005$uri; }}
    }}
"""


def h1(port: int, target: str, tls: bool = True) -> str:
    return sandbox.h1(IP, port, target, tls)


@pytest.fixture
def app(net, tmp_path):
    """Python's http.server on IP:19005 serving public/ok.txt and admin/secret.txt;
    yields its log (what it served)."""
    log = tmp_path / "backend.log"
    log.write_text("")
    root = tmp_path / "app"
    (root / "public").mkdir(parents=True)
    (root / "admin").mkdir()
    (root / "public" / "ok.txt").write_text("APP public ok\n")
    (root / "admin" / "secret.txt").write_text("APP ADMIN-SECRET\n")
    inside = ["ip", "netns", "exec", net.internet_ns]
    backend = HERE / "web_routers" / "static_backend.py"
    process = subprocess.Popen([*inside, PY, str(backend), IP, "19005", str(root), str(log)])
    try:
        assert sandbox.eventually(lambda: "STATIC ready" in log.read_text(), timeout=10)
        yield log
    finally:
        process.terminate()
        process.wait(5)


def run(net, tmp_path, steps, rules=RULES):
    (tmp_path / "rules.yaml").write_text(rules)
    return sandbox.run(
        net,
        tmp_path,
        {"resolve": sandbox.dig("allowed.test"), **steps},
        rules=tmp_path / "rules.yaml",
        setup=lambda d: shutil.copy(sandbox.H2CLIENT, d / "h2client.py"),
    )


def served_secret(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.endswith("admin/secret.txt")]


def check(result, log, labels):
    why = f"{result.describe()}\nbackend:\n{log}"
    assert "APP public ok" in result["honest"].out, why
    assert "ADMIN-SECRET" not in result["denied"].out, why
    assert served_secret(log) == [], why
    for label in labels:
        assert "ADMIN-SECRET" not in result[label].out, (label, why)


def test_an_escaped_hash_does_not_cut_a_path_behind_mod_rewrite(net, tmp_path, app):
    steps = {
        "honest": h1(8088, "/public/ok.txt", tls=False),
        "denied": h1(8088, "/admin/secret.txt", tls=False),
        "escaped_question": h1(8088, "/admin/secret.txt%3F", tls=False),  # Apache: 403
        "escaped_hash": h1(8088, "/admin/secret.txt%23", tls=False),
        "escaped_hash_tls": h1(8444, "/admin/secret.txt%23x"),
    }
    with apache(net, IP, template="apache_proxy.conf.tmpl"):
        result = run(net, tmp_path, steps)
    check(result, app.read_text(), ["escaped_question", "escaped_hash", "escaped_hash_tls"])


@pytest.mark.parametrize("engine", ["mitmproxy", "frontdoor"])
def test_an_escaped_question_mark_does_not_cut_a_path_behind_nginx_uri(net, tmp_path, app, engine):
    work = tmp_path / "nginx"
    work.mkdir()
    http = NGINX.format(ip=IP, pem=net.workdir / "server.pem", key=net.workdir / "server.key")
    steps = {
        "honest": h1(8090, "/public/ok.txt", tls=False),
        "denied": h1(8090, "/admin/secret.txt", tls=False),
        "escaped_question": h1(8090, "/admin/secret.txt%3F", tls=False),
        "escaped_question_tls": h1(8445, "/admin/secret.txt%3Fx=1"),
        "escaped_hash": h1(8090, "/admin/secret.txt%23", tls=False),
    }
    rules = RULES + (WS_ELSEWHERE if engine == "mitmproxy" else "")
    with nginx_server(net, work, http, [f"{IP}:8090", f"{IP}:8445"]):
        result = run(net, tmp_path, steps, rules=rules)
    check(result, app.read_text(), ["escaped_question", "escaped_question_tls", "escaped_hash"])


ALLOW_ONLY = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tarballs-only
        ports: [8090, 8445]
        methods: [GET]
        paths: ["/public/**", "/**/*.tar.gz"]
"""


def test_a_suffix_allow_does_not_serve_another_file_behind_nginx_uri(net, tmp_path, app):
    """No deny needed: an allow of `/**/*.tar.gz` (release tarballs only) takes
    `/admin/secret.txt%23.tar.gz`, which nginx's `$uri` hands on as
    `/admin/secret.txt#.tar.gz`: the application serves /admin/secret.txt."""
    work = tmp_path / "nginx"
    work.mkdir()
    http = NGINX.format(ip=IP, pem=net.workdir / "server.pem", key=net.workdir / "server.key")
    steps = {
        "honest": h1(8090, "/public/ok.txt", tls=False),
        "denied": h1(8090, "/admin/secret.txt", tls=False),
        "hash_suffix": h1(8090, "/admin/secret.txt%23.tar.gz", tls=False),
        "question_suffix_tls": h1(8445, "/admin/secret.txt%3F.tar.gz"),
    }
    with nginx_server(net, work, http, [f"{IP}:8090", f"{IP}:8445"]):
        result = run(net, tmp_path, steps, rules=ALLOW_ONLY)
    check(result, app.read_text(), ["hash_suffix", "question_suffix_tls"])


HAPROXY_URL_DEC = """\
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 20s
    timeout server 20s
# A path "normalized" before routing, as HAProxy snippets do it.
frontend plain
    bind {ip}:8090
    http-request set-path %[path,url_dec]
    default_backend app
backend app
    server a {ip}:19005
"""


def test_an_escaped_hash_does_not_cut_a_path_behind_haproxy_url_dec(net, tmp_path, app):
    """HAProxy's `http-request set-path %[path,url_dec]` decodes the path once and
    sends it on so: `%23` and `%3F` cut it as nginx's `$uri` does."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_URL_DEC.format(ip=IP))
    steps = {
        "honest": h1(8090, "/public/ok.txt", tls=False),
        "denied": h1(8090, "/admin/secret.txt", tls=False),
        "escaped_question": h1(8090, "/admin/secret.txt%3F", tls=False),
        "escaped_hash": h1(8090, "/admin/secret.txt%23", tls=False),
    }
    with internet_servers(net, [["haproxy", "-db", "-f", str(cfg)]], [f"{IP}:8090"]):
        result = run(net, tmp_path, steps)
    check(result, app.read_text(), ["escaped_question", "escaped_hash"])
