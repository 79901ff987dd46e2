"""Fields a server serves a request by instead of its own target or Host, against a
real one (proxy/policy/request_head.py, `_overrides`, `with_overrides`).

A Werkzeug server in the fake internet on allowed.test's address does what common
frameworks do: ProxyFix takes X-Forwarded-Host as the Host (Rails' request.host,
Django's USE_X_FORWARDED_HOST), a middleware takes X-Original-URL and X-Rewrite-URL
as the path (IIS's URL Rewrite; Symfony and Zend until 2018), and it serves tenants
by host. The rules allow GET of allowed.test's /public/** only. Each override naming
another tenant or a path outside /public is sent on plain HTTP and on inspected TLS,
and refused; the server logs what it served, which must be allowed.test's /public
resources alone.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from support import sandbox
from support.sandbox import PYTHON, python

pytestmark = pytest.mark.e2e

PLAIN, TLS = 8092, 8452

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PLAIN}, {TLS}]
        methods: [GET]
        paths: ["/public/**"]
        id: public
"""

_SERVER = r"""
import json, logging, ssl, sys, threading
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

cert, key, log_path, plain, tls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
log = open(log_path, "a", buffering=1)
logging.getLogger("werkzeug").disabled = True

@Request.application
def tenants(request):
    log.write(json.dumps({"host": request.host.split(":")[0].lower(), "path": request.path}) + "\n")
    return Response(f"served {request.host} {request.path}\n")

def original_url(app):
    def middleware(environ, start_response):
        for name in ("HTTP_X_ORIGINAL_URL", "HTTP_X_REWRITE_URL"):
            if environ.get(name):
                environ["PATH_INFO"] = environ[name].split("?")[0]
        return app(environ, start_response)
    return middleware

app = original_url(ProxyFix(tenants, x_host=1))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
for port, tls_context in ((plain, None), (tls, context)):
    server = make_server("203.0.113.10", port, app, threaded=True, ssl_context=tls_context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# argv: port, tls (0/1), target, header fields as JSON pairs. Prints the status line.
_CLIENT = r"""
import json, socket, ssl, sys
port, tls, target, fields = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], json.loads(sys.argv[4])
socket.gethostbyname("allowed.test")  # the address bound to the name
s = socket.create_connection(("203.0.113.10", port), timeout=5)
if tls:
    s = ssl.create_default_context().wrap_socket(s, server_hostname="allowed.test")
extra = "".join(f"{n}: {v}\r\n" for n, v in fields)
s.sendall(f"GET {target} HTTP/1.1\r\nHost: allowed.test\r\n{extra}Connection: close\r\n\r\n".encode())
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except OSError:
    pass
print(data.split(b"\r\n", 1)[0].decode() or "closed")
"""

ATTACKS = {  # label -> header fields on GET /public/ok
    "original_url": [("X-Original-URL", "/private/key")],
    "rewrite_url": [("X-Rewrite-URL", "/private/key?x=1")],
    "forwarded_host": [("X-Forwarded-Host", "secret.test")],
    "forwarded_host_list": [("X-Forwarded-Host", "secret.test, allowed.test")],
    "forwarded_host_cgi": [("X_Forwarded_Host", "secret.test")],
    # The request's own host, spelled otherwise: it goes on as sent (session 49).
    "same_host_spelled_otherwise": [("X-Forwarded-Host", "ALLOWED.TEST")],
}
CONTROLS = {
    "control": [],
    "same_host": [("X-Forwarded-Host", "allowed.test")],
    "same_path": [("X-Original-URL", "/public/ok")],
}


@pytest.fixture(scope="module")
def served(fakenet, tmp_path_factory):
    """The tenant server in the fake internet; yields the path of what it served."""
    log = tmp_path_factory.mktemp("overrides") / "served.log"
    log.touch()
    pem, key = fakenet.workdir / "server.pem", fakenet.workdir / "server.key"
    argv = [PYTHON, "-c", _SERVER, pem, key, log, str(PLAIN), str(TLS)]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", fakenet.internet_ns, *map(str, argv)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready", "the tenant server did not start"
        yield log
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_path_or_host_override_reaches_nothing_the_rules_do_not_allow(fakenet, tmp_path, served):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {
        f"{label}_{transport}": python(_CLIENT, str(port), tls, "/public/ok", json.dumps(fields))
        for transport, port, tls in (("plain", PLAIN, "0"), ("tls", TLS, "1"))
        for label, fields in {**ATTACKS, **CONTROLS}.items()
    }
    r = sandbox.run(fakenet, tmp_path, steps, rules=rules)
    got = [json.loads(line) for line in served.read_text().splitlines()]
    assert got and all(g == {"host": "allowed.test", "path": "/public/ok"} for g in got), got
    for label in steps:
        if label.rsplit("_", 1)[0] in CONTROLS:
            assert " 200 " in r[label].out, r.describe()
        else:
            assert r[label].out.split()[1:2] in (["400"], ["403"]), r.describe()
    reasons = {e["reason"] for e in r.events(kind="request", verdict="deny")}
    assert reasons == {"ambiguous_path", "host_mismatch"}, r.describe()
