"""A deny glob's punctuation also stands for the escapes the gateway keeps escaped.

A deny glob's ASCII punctuation stands for any ASCII punctuation but `/` and `%`
(load._denied_literal), for CherryPy's dispatcher, which reads each in a segment as
`_` (test_handler_name_punctuation.py). cheroot also decodes `%25`, `%23` and `%3F`
before CherryPy dispatches, which every reading of the gateway keeps escaped
(names._KEPT_ESCAPED): PATH_INFO of `/admin%25panel` is `/admin%panel`, of
`/admin%3Fpanel` `/admin?panel`, and the dispatcher ran `admin_panel` for each under
a deny of `/admin_panel/**` (a red team, session 52).

Origin: Debian's python3-cherrypy3 in the fake internet; both gateway paths.
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
        methods: [GET]
        paths: ["/**"]
      - deny: allowed.test
        id: no-admin
        ports: [{PORT}]
        paths: ["/admin_panel/**"]
"""
)

CHERRYPY_APP = r"""
import sys, cherrypy
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ran(what):
    line = "%s ran for %s %r\n" % (what, cherrypy.request.method, cherrypy.request.path_info)
    with open(log, "a") as f:
        f.write(line)
    return line
class Root:
    @cherrypy.expose
    def admin_panel(self, *args, **kwargs):
        return ran("ADMIN-PANEL-HANDLER")
    @cherrypy.expose
    def public_ok(self):
        return ran("PUBLIC-OK")
cherrypy.config.update({"server.socket_host": ip, "server.socket_port": port,
    "log.screen": False, "engine.autoreload.on": False, "checker.on": False})
cherrypy.quickstart(Root())
"""

KEPT_ESCAPED = {
    "percent": "/admin%25panel",
    "hash": "/admin%23panel",
    "question": "/admin%3Fpanel",
    "percent_below": "/admin%25panel/x",
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_cherrypy_handler_is_not_reached_by_a_kept_escape(net, tmp_path, profile):
    if not Path(PY).exists() or subprocess.run([PY, "-c", "import cherrypy"]).returncode:
        pytest.skip("needs Debian's python3-cherrypy3")
    app = tmp_path / "cherrypy_app.py"
    app.write_text(CHERRYPY_APP)
    log = tmp_path / "cherrypy.log"
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = f"http://allowed.test:{PORT}"
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "honest": sandbox.curl(f"{url}/public_ok"),
        "control": sandbox.curl(f"{url}/admin_panel"),
        "control_dash": sandbox.curl(f"{url}/admin-panel"),
    }
    for name, path in KEPT_ESCAPED.items():
        steps[name] = sandbox.curl("-g", "--path-as-is", url + path)
    servers = internet_servers(net, [[PY, str(app), IP, str(PORT), str(log)]], [f"{IP}:{PORT}"])
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PUBLIC-OK ran for GET" in result["honest"].out, why
    assert result["control"].status == 403, why
    assert result["control_dash"].status == 403, why
    passed = [n for n in KEPT_ESCAPED if result[n].status not in (400, 403)]
    assert not passed, f"passed the gateway: {passed}\n{why}"
    assert "ADMIN-PANEL-HANDLER" not in ran, why
