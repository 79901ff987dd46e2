"""The deny docs/rules.md advises for a prefix router, `/admin*`, holds on one: a
Falcon sink (a red team found `/admin/**` passed by such a router, session 52).

Falcon 3.1 (Debian's python3-falcon) compiles a sink's prefix (`app.add_sink(sink,
"/admin")`, its way to take every path under a prefix) to a regular expression and
runs the sink where it `.match()`es the path, which anchors only its start: the sink
runs for `/adminx`, `/admin-x`, `/admin~`, `/admin%20`, `/adminx/users`... (Falcon 4
reads a prefix as whole segments). A deny of `/admin/**` takes none of those, and the
denied sink ran for each. This is the router's reading, not the gateway's: a deny
of `/admin/**` that also took `/admin*` would take `/administrators` and `/adminer`
on every other server. docs/rules.md ("What a path rule matches") says to deny
`/admin*` where a server routes by a prefix; this test checks that the advice holds
for every spelling that passed `/admin/**`, and that an honest path is still served.
BlackSheep's `/admin/*` (PyPI only, not in Debian) routes the same paths; it is not
run here.

The origin runs in the fake internet; its handlers log what they ran. Both gateway
paths: `door` (the front door) and `engine` (mitmproxy; a websocket rule sends the
profile there).
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
PY = "/usr/bin/python3"  # Debian's python, with Debian's python3-falcon

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
        paths: ["/admin*"]
"""
)

FALCON_APP = r"""
import sys
from wsgiref.simple_server import make_server, WSGIRequestHandler
import falcon
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ran(what, req, resp):
    line = "%s ran for %s %s\n" % (what, req.method, req.path)
    with open(log, "a") as f:
        f.write(line)
    resp.text = line
def admin(req, resp, **kwargs):
    ran("ADMIN-TREE-HANDLER", req, resp)
class Ok:
    def on_get(self, req, resp):
        ran("PUBLIC-OK", req, resp)
app = falcon.App()
app.add_route("/public/ok", Ok())
app.add_sink(admin, "/admin")
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
make_server(ip, port, app, handler_class=Quiet).serve_forever()
"""

# Paths the sink runs for: under `/admin` (what `/admin/**` names) and past its
# prefix (what it does not).
SPELLINGS = {
    "bare": "/admin",
    "slash": "/admin/",
    "below": "/admin/users",
    "letter": "/adminx",
    "dash": "/admin-x",
    "underscore": "/admin_x",
    "tilde": "/admin~",
    "at": "/admin@",
    "space": "/admin%20",
    "letter_below": "/adminx/users",
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_prefix_deny_holds_on_a_falcon_sink(net, tmp_path, profile):
    if (
        not Path(PY).exists()
        or subprocess.run([PY, "-c", "import falcon"], capture_output=True).returncode
    ):
        pytest.skip("needs Debian's python3-falcon")
    app = tmp_path / "app.py"
    app.write_text(FALCON_APP)
    log = tmp_path / "falcon.log"
    log.write_text("")
    servers = internet_servers(net, [[PY, str(app), IP, str(PORT), str(log)]], [f"{IP}:{PORT}"])
    url = f"http://allowed.test:{PORT}"
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "honest": sandbox.curl(f"{url}/public/ok"),
        **{name: sandbox.curl(url + path) for name, path in SPELLINGS.items()},
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PUBLIC-OK ran for GET /public/ok" in result["honest"].out, why
    passed = [n for n in SPELLINGS if result[n].status != 403]
    assert not passed, f"not refused by the deny: {passed}\n{why}"
    assert result.verdicts(kind="request", verdict="deny") == {
        ("deny", "rule_deny", f"{profile}-no-admin")
    }, why
    assert "ADMIN-TREE-HANDLER" not in ran, why
