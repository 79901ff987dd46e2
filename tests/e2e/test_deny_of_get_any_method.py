"""A deny of GET holds on servers whose handlers run for every method (a red team
found this past the gateway, session 52).

A deny of GET takes HEAD, since servers run the GET handler for a HEAD. Some
frameworks do not route by method at all unless told to: CherryPy's exposed methods
(Debian's python3-cherrypy3) and Pyramid's views without a `request_method`
predicate (python3-pyramid) run for OPTIONS, POST or any token. With every method
allowed on the site and `deny: methods: [GET], paths: ["/public/report"]`, `OPTIONS
/public/report` (and TRACE, PROPFIND, a method of the task's own) passed and the
denied handler ran on both. A deny of GET now takes every method but the writes it
does not name (model.Rule.matched_methods, passed_methods): a POST, a write, is
still the site's, and an OPTIONS elsewhere is still served.

The origins run in the fake internet and log the handler and method they ran. Both
gateway paths: `door` (the front door) and `engine` (mitmproxy; a websocket rule
sends the profile there).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, internet_servers

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PORT = 8088
PY = "/usr/bin/python3"

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: site
        ports: [{PORT}]
        paths: ["/**"]
      - deny: allowed.test
        id: no-report
        ports: [{PORT}]
        methods: [GET]
        paths: ["/public/report"]
"""
)

CHERRYPY_APP = r"""
import sys, cherrypy
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ran(what):
    line = "%s ran for %s %s\n" % (what, cherrypy.request.method, cherrypy.request.path_info)
    with open(log, "a") as f:
        f.write(line)
    return line
class Public:
    @cherrypy.expose
    def report(self):
        return ran("REPORT-HANDLER")
    @cherrypy.expose
    def ok(self):
        return ran("PUBLIC-OK")
class Root:
    public = Public()
cherrypy.config.update({"server.socket_host": ip, "server.socket_port": port,
    "log.screen": False, "engine.autoreload.on": False, "checker.on": False})
cherrypy.quickstart(Root())
"""

PYRAMID_APP = r"""
import sys
from wsgiref.simple_server import make_server, WSGIRequestHandler
from pyramid.config import Configurator
from pyramid.response import Response
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ran(what, request):
    line = "%s ran for %s %s\n" % (what, request.method, request.path)
    with open(log, "a") as f:
        f.write(line)
    return Response(line)
with Configurator() as config:
    config.add_route("report", "/public/report")
    config.add_view(lambda request: ran("REPORT-HANDLER", request), route_name="report")
    config.add_route("ok", "/public/ok")
    config.add_view(lambda request: ran("PUBLIC-OK", request), route_name="ok")
    app = config.make_wsgi_app()
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
make_server(ip, port, app, handler_class=Quiet).serve_forever()
"""


@pytest.mark.parametrize("framework", ["cherrypy", "pyramid"])
@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_deny_of_get_holds_where_handlers_run_for_every_method(net, tmp_path, profile, framework):
    if (
        not Path(PY).exists()
        or subprocess.run([PY, "-c", f"import {framework}"], capture_output=True).returncode
    ):
        package = {"cherrypy": "python3-cherrypy3"}.get(framework, f"python3-{framework}")
        pytest.skip(f"needs Debian's {package}")
    app = tmp_path / "app.py"
    app.write_text(CHERRYPY_APP if framework == "cherrypy" else PYRAMID_APP)
    log = tmp_path / "app.log"
    log.write_text("")
    servers = internet_servers(net, [[PY, str(app), IP, str(PORT), str(log)]], [f"{IP}:{PORT}"])
    url = f"http://allowed.test:{PORT}"
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "honest": sandbox.curl(f"{url}/public/ok"),
        "honest_options": sandbox.curl("-X", "OPTIONS", f"{url}/public/ok"),
        "control": sandbox.curl(f"{url}/public/report"),
        "control_head": sandbox.curl("-I", f"{url}/public/report"),
        "options": sandbox.curl("-X", "OPTIONS", f"{url}/public/report"),
        "trace": sandbox.curl("-X", "TRACE", f"{url}/public/report"),
        "propfind": sandbox.curl("-X", "PROPFIND", f"{url}/public/report"),
        "own_method": sandbox.curl("-X", "FETCH", f"{url}/public/report"),
        "post": sandbox.curl("-X", "POST", "-H", "Content-Length: 0", f"{url}/public/report"),
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PUBLIC-OK ran for GET /public/ok" in result["honest"].out, why
    assert result["control"].status == 403, why
    assert result["control_head"].status == 403, why
    assert "PUBLIC-OK ran for OPTIONS /public/ok" in result["honest_options"].out, why
    for label in ("options", "trace", "propfind", "own_method"):
        assert result[label].status == 403, (label, why)
    assert result.verdicts(kind="request", verdict="deny") == {
        ("deny", "rule_deny", f"{profile}-no-report")
    }, why
    assert "REPORT-HANDLER ran for POST" in result["post"].out, why  # a write: not denied
    assert [line for line in ran.splitlines() if "REPORT-HANDLER" in line] == [
        "REPORT-HANDLER ran for POST /public/report"
    ], why
