"""A deny holds against routers that fold Unicode case (a red team, session 51,
found both of these past the gateway).

Fastify's router (find-my-way) with `caseSensitive: false` decodes the path, then
lower-cases it with JavaScript's `toLowerCase()`, which maps U+212A KELVIN SIGN to
an ASCII `k`: `/public/%E2%84%AAeys` ran the handler of `/public/keys`. Django does
the same where a URL pattern is made case-insensitive the usual way,
`re_path(r"(?i)^admin/", ...)`: Python's `re` with IGNORECASE folds U+0131 (dotless
i) and U+0130 to `i`, so `/adm%C4%B1n/` ran the view a deny of `/admin/**` names. A
deny matched ASCII case only. It now also matches the path with each escaped
character that has an ASCII reading (by case or NFKC) read so (names.folded), and a
character read as a path's structure (fullwidth `/`, `..` in one character) is
refused (request_head._run_problem).

The origins are Fastify 4 from npm (scripts/install.sh --test puts it in
.venv/node) and Django from PyPI (the test extra), plain HTTP and TLS, in the fake
internet; both gateway paths (`door`, `engine`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PLAIN, TLS = 8088, 8443
# Where scripts/install.sh --test installs it (npm install --prefix .venv/node fastify@4).
NODE_PATH = str(Path(__file__).parents[2] / ".venv" / "node" / "node_modules")

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{PLAIN}, {TLS}]
        methods: [GET]
        paths: ["/public/**"]
      - deny: allowed.test
        id: no-keys
        ports: [{PLAIN}, {TLS}]
        paths: ["/public/keys"]
"""
)

APP = r"""
const fs = require('fs');
const [ip, plain, tls, log, cert, key] = process.argv.slice(2);
function routes(app) {
  const ran = (what) => async (req) => {
    fs.appendFileSync(log, `${what} ran for ${req.method} ${req.url}\n`);
    return `${what} ran for ${req.method} ${req.url}\n`;
  };
  app.get('/public/ok', ran('PUBLIC-OK'));
  app.get('/public/keys', ran('KEYS-HANDLER'));
  return app;
}
const fastify = require('fastify');
routes(fastify({ caseSensitive: false })).listen({ host: ip, port: +plain });
routes(fastify({ caseSensitive: false,
  https: { cert: fs.readFileSync(cert), key: fs.readFileSync(key) } })).listen({ host: ip, port: +tls });
"""


def url(path: str, tls: bool) -> str:
    return f"https://allowed.test:{TLS}{path}" if tls else f"http://allowed.test:{PLAIN}{path}"


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_path_is_not_reached_through_unicode_case_folding(net, tmp_path, profile):
    node = shutil.which("node")
    probe = subprocess.run(
        [node or "node", "-e", "require('fastify')"], env={**os.environ, "NODE_PATH": NODE_PATH}
    ) if node else None  # fmt: skip
    if probe is None or probe.returncode:
        pytest.skip("needs node and fastify 4 (scripts/install.sh --test)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    app = tmp_path / "app.js"
    app.write_text(APP)
    log = tmp_path / "fastify.log"
    log.write_text("")
    steps = {}
    for tls in (False, True):
        via = "tls" if tls else "plain"
        steps[f"honest_{via}"] = sandbox.curl(url("/public/ok", tls))
        steps[f"keys_{via}"] = sandbox.curl(url("/public/keys", tls))  # control
        steps[f"keys_upper_{via}"] = sandbox.curl(url("/public/KEYS", tls))  # control
        # U+212A KELVIN SIGN, which toLowerCase() makes 'k'.
        steps[f"kelvin_{via}"] = sandbox.curl(url("/public/%E2%84%AAeys", tls))
    argv = ["env", f"NODE_PATH={NODE_PATH}", node, str(app), IP, str(PLAIN), str(TLS), str(log)]
    argv += [str(net.workdir / "server.pem"), str(net.workdir / "server.key")]
    result = run_beside(
        net, tmp_path, [argv], [f"{IP}:{PLAIN}", f"{IP}:{TLS}"], steps, rules, profile
    )
    ran = log.read_text()
    why = f"{result.describe()}\nfastify:\n{ran}"
    for via in ("plain", "tls"):
        assert "PUBLIC-OK ran for GET /public/ok" in result[f"honest_{via}"].out, why
        assert result[f"keys_{via}"].status == 403, why
        assert result[f"keys_upper_{via}"].status == 403, why
    assert "KEYS-HANDLER" not in ran, why


# Django's resolver matches a `re_path` with Python's `re`, whose IGNORECASE on a
# str pattern folds Unicode case: `(?i)^admin/` (the usual recipe for case-insensitive
# URLs in Django) matches `admın/` (U+0131 dotless i) and `admİn/` (U+0130), and
# `(?i)secret` matches `ſecret` (U+017F long s). Served by wsgiref, plain and TLS.
DJANGO_PYTHON = sys.executable  # the test extra installs Django
DJANGO_APP = r"""
import ssl, sys, threading
from wsgiref.simple_server import WSGIRequestHandler, make_server
from django.conf import settings
ip, plain, tls, log_path, cert, key = sys.argv[1:7]
settings.configure(DEBUG=False, ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="x",
                   MIDDLEWARE=[], INSTALLED_APPS=[])
import django
django.setup()
from django.http import HttpResponse
from django.urls import path, re_path
log = open(log_path, "a", buffering=1)

def ran(what):
    def view(request, **kw):
        line = f"{what} ran for {request.method} {request.path}\n"
        log.write(line)
        return HttpResponse(line)
    return view

urlpatterns = [path("public/ok", ran("PUBLIC-OK")), re_path(r"(?i)^admin/", ran("ADMIN-HANDLER"))]

from django.core.wsgi import get_wsgi_application
app = get_wsgi_application()

class Quiet(WSGIRequestHandler):
    def log_message(self, *a):
        pass

a = make_server(ip, int(plain), app, handler_class=Quiet)
b = make_server(ip, int(tls), app, handler_class=Quiet)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
b.socket = context.wrap_socket(b.socket, server_side=True)
threading.Thread(target=b.serve_forever, daemon=True).start()
a.serve_forever()
"""

DJANGO_RULES = RULES.replace('["/public/**"]', '["/**"]').replace('"/public/keys"', '"/admin/**"')


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_django_view_is_not_reached_through_unicode_case_folding(net, tmp_path, profile):
    if (
        not Path(DJANGO_PYTHON).exists()
        or subprocess.run([DJANGO_PYTHON, "-c", "import django"]).returncode
    ):
        pytest.skip("needs Django (scripts/install.sh --test)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(DJANGO_RULES)
    app = tmp_path / "app.py"
    app.write_text(DJANGO_APP)
    log = tmp_path / "django.log"
    log.write_text("")
    steps = {}
    for tls in (False, True):
        via = "tls" if tls else "plain"
        steps[f"honest_{via}"] = sandbox.curl(url("/public/ok", tls))
        steps[f"admin_{via}"] = sandbox.curl(url("/admin/", tls))  # control
        steps[f"admin_upper_{via}"] = sandbox.curl(url("/ADMIN/", tls))  # control
        steps[f"dotless_i_{via}"] = sandbox.curl(url("/adm%C4%B1n/", tls))
        steps[f"dotted_i_{via}"] = sandbox.curl(url("/adm%C4%B0n/users", tls))
    argv = [DJANGO_PYTHON, str(app), IP, str(PLAIN), str(TLS), str(log)]
    argv += [str(net.workdir / "server.pem"), str(net.workdir / "server.key")]
    result = run_beside(
        net, tmp_path, [argv], [f"{IP}:{PLAIN}", f"{IP}:{TLS}"], steps, rules, profile
    )
    ran = log.read_text()
    why = f"{result.describe()}\ndjango:\n{ran}"
    for via in ("plain", "tls"):
        assert "PUBLIC-OK ran for GET /public/ok" in result[f"honest_{via}"].out, why
        assert result[f"admin_{via}"].status == 403, why
        assert result[f"admin_upper_{via}"].status == 403, why
    assert "ADMIN-HANDLER" not in ran, why
