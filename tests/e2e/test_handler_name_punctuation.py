"""A deny holds against the names a framework's dispatcher gives a handler by rules
of its own: punctuation read as `_` (CherryPy) and a `@@` view name (Pyramid). A red
team found both past the gateway (session 52).

CherryPy (Debian's python3-cherrypy3 18.8) finds a handler by the path's segment
with every ASCII punctuation character turned into `_` (its default
`Dispatcher(translate=punctuation_to_underscores)`), so the exposed method
`admin_panel` runs for `/admin_panel` and for `/admin-panel`, `/admin.panel`,
`/admin~panel`, `/admin@panel`, `/admin%7Bpanel`... A deny of `/admin_panel/**` took
none of those, and a deny written as the site links it, `/admin-panel/**`, not
`/admin_panel`. Each ASCII punctuation character in a deny glob (but `/` and `%`)
now stands for any of them (load._compile_paths), so either deny takes every
spelling; `/public-ok`, a name no deny writes, is still served. cheroot also decodes
`%25`, `%23` and `%3F` before CherryPy dispatches, escapes every reading of the
gateway keeps escaped (names._KEPT_ESCAPED): PATH_INFO of `/admin%3Fpanel` is
`/admin?panel`, and `admin_panel` ran for it (round 2 of that red team); the
punctuation of a deny glob stands for those escapes too.

Pyramid (Debian's python3-pyramid 2.0) traversal reads a segment that starts with
`@@` as a view name, so the view `admin` of the root runs for `/admin` and for
`/@@admin` (`/%40%40admin`, which WebOb decodes). A deny now also reads such a
segment without its `@@` (names.path_readings): `deny /admin/**` takes `/@@admin`.
A view registered without a context is a view of every resource (`/public/admin`,
`/public/@@admin` run it too): docs/rules.md advises `/**/admin/**` there, which the
second case checks. Honest views, by name and by `@@name`, are still served.

The origins run in the fake internet and log each handler they run. Both gateway
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
PY = "/usr/bin/python3"  # Debian's python, with Debian's framework packages
PROFILES = ["door", "engine"]


def rules(denied: str) -> str:
    """An allow of every GET, and a deny of `denied`, for both gateway paths."""
    return door_and_engine(
        f"""\
      - allow: allowed.test
        id: site
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
      - deny: allowed.test
        id: no-admin
        ports: [{PORT}]
        paths: ["{denied}"]
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

PYRAMID_APP = r"""
import sys
from wsgiref.simple_server import make_server, WSGIRequestHandler
from pyramid.config import Configurator
from pyramid.response import Response
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class Root(dict):
    pass
def ran(what, request):
    line = "%s ran for %s %s (view %r)\n" % (what, request.method, request.path, request.view_name)
    with open(log, "a") as f:
        f.write(line)
    return Response(line)
def admin(request):
    return ran("ADMIN-HANDLER", request)
def ok(request):
    return ran("PUBLIC-OK", request)
def root(request):
    resource = Root()
    resource["public"] = Root()
    return resource
with Configurator(root_factory=root) as config:
    config.add_view(admin, name="admin")
    config.add_view(ok, name="ok")
    app = config.make_wsgi_app()
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
make_server(ip, port, app, handler_class=Quiet).serve_forever()
"""


def origin(net, tmp_path: Path, module: str, source: str):
    if (
        not Path(PY).exists()
        or subprocess.run([PY, "-c", f"import {module}"], capture_output=True).returncode
    ):
        package = {"cherrypy": "python3-cherrypy3"}.get(module, f"python3-{module}")
        pytest.skip(f"needs Debian's {package}")
    app = tmp_path / f"{module}_app.py"
    app.write_text(source)
    log = tmp_path / f"{module}.log"
    log.write_text("")
    argv = [PY, str(app), IP, str(PORT), str(log)]
    return internet_servers(net, [argv], [f"{IP}:{PORT}"]), log


def fetch_all(net, tmp_path, profile, denied, servers, paths):
    """GETs of `paths` (label: path) under an allow of all and a deny of `denied`."""
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules(denied))
    steps = {
        name: sandbox.curl("-g", f"http://allowed.test:{PORT}{p}") for name, p in paths.items()
    }
    with servers:
        return sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules_file, extra=("--profile", profile),
        )  # fmt: skip


# Every name CherryPy's dispatcher reads as `admin_panel` (the segment's punctuation,
# cheroot's decoded `%25 %23 %3F` too, turned into '_'), with characters the gateway
# forwards: the deny refuses each, whichever of them it is written with.
CHERRYPY_SPELLINGS = {
    "underscore": "/admin_panel",
    "underscore_below": "/admin_panel/x",
    "dash": "/admin-panel",
    "dash_below": "/admin-panel/x",
    "dot": "/admin.panel",
    "tilde": "/admin~panel",
    "bang": "/admin!panel",
    "at": "/admin@panel",
    "colon": "/admin:panel",
    "plus": "/admin+panel",
    "comma": "/admin,panel",
    "equals": "/admin=panel",
    "dollar": "/admin$panel",
    "paren": "/admin(panel",
    "brace": "/admin%7Bpanel",
    "percent": "/admin%25panel",
    "hash": "/admin%23panel",
    "question": "/admin%3Fpanel",
    "percent_below": "/admin%25panel/x",
}


@pytest.mark.parametrize("denied", ["/admin_panel/**", "/admin-panel/**"])
@pytest.mark.parametrize("profile", PROFILES)
def test_a_denied_cherrypy_handler_is_not_reached_by_punctuation(net, tmp_path, profile, denied):
    servers, log = origin(net, tmp_path, "cherrypy", CHERRYPY_APP)
    paths = {"honest": "/public_ok", "honest_dash": "/public-ok", **CHERRYPY_SPELLINGS}
    result = fetch_all(net, tmp_path, profile, denied, servers, paths)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PUBLIC-OK ran for GET /public_ok" in result["honest"].out, why
    assert "PUBLIC-OK ran for GET /public-ok" in result["honest_dash"].out, why
    passed = [n for n in CHERRYPY_SPELLINGS if result[n].status != 403]
    assert not passed, f"not refused by the deny: {passed}\n{why}"
    assert result.verdicts(kind="request", verdict="deny") == {
        ("deny", "rule_deny", f"{profile}-no-admin")
    }, why
    assert "ADMIN-PANEL-HANDLER" not in ran, why


# The deny as written, the spellings Pyramid runs the view `admin` for that it must
# refuse, and honest views by name and by view name, served.
PYRAMID_CASES = [
    pytest.param(
        "/admin/**",
        {"/admin", "/admin/x", "/@@admin", "/%40%40admin", "/@@admin/x"},
        {"/ok", "/@@ok"},
        id="root",
    ),
    pytest.param(
        "/**/admin/**",
        {
            "/admin",
            "/@@admin",
            "/public/admin",
            "/public/@@admin",
            "/public/%40%40admin",
            "/public/admin/x",
        },
        {"/ok", "/public/ok", "/public/@@ok"},
        id="any-resource",
    ),
]


@pytest.mark.parametrize(("denied", "refused", "served"), PYRAMID_CASES)
@pytest.mark.parametrize("profile", PROFILES)
def test_a_denied_pyramid_view_is_not_reached_by_its_view_name(
    net, tmp_path, profile, denied, refused, served
):
    servers, log = origin(net, tmp_path, "pyramid", PYRAMID_APP)
    labels = {p: f"path{i}" for i, p in enumerate(sorted(refused | served))}
    result = fetch_all(net, tmp_path, profile, denied, servers, {v: k for k, v in labels.items()})
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for path in served:
        assert "PUBLIC-OK ran for GET" in result[labels[path]].out, (path, why)
    passed = [p for p in sorted(refused) if result[labels[p]].status != 403]
    assert not passed, f"not refused by the deny: {passed}\n{why}"
    assert result.verdicts(kind="request", verdict="deny") == {
        ("deny", "rule_deny", f"{profile}-no-admin")
    }, why
    assert "ADMIN-HANDLER" not in ran, why


# Pyramid's traversal (ResourceTreeTraverser.__call__) puts the request header
# X-Vhm-Root in front of the path before it traverses (`vpath = vroot_path + path`),
# from any client: `GET /public/ok` with `X-Vhm-Root: /admin` ran the view `admin`
# past both denies (a red team, session 53). It is refused as a mount point is
# (request_head._OVERRIDES), in any spelling. (label, path, X-Vhm-Root or None)
CONTROLS = {"control": ("/admin", None), "control_view": ("/@@admin", None)}
TRICKS = {
    "vhm_root": ("/public/ok", "/admin"),
    "vhm_root_view": ("/ok", "/@@admin"),
    "vhm_root_slash": ("/", "/admin"),
    "vhm_root_underscore": ("/public/ok", "/admin"),  # sent as X_Vhm_Root below
}


@pytest.mark.parametrize("denied", ["/admin/**", "/**/admin/**"])
@pytest.mark.parametrize("profile", PROFILES)
def test_a_denied_pyramid_view_is_not_reached_through_a_virtual_root_header(
    net, tmp_path, profile, denied
):
    servers, log = origin(net, tmp_path, "pyramid", PYRAMID_APP)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules(denied))
    base = f"http://allowed.test:{PORT}"
    steps = {"honest": sandbox.curl("-g", f"{base}/public/ok")}
    for label, (path, root) in {**CONTROLS, **TRICKS}.items():
        name = "X_Vhm_Root" if label.endswith("underscore") else "X-Vhm-Root"
        headers = ("-H", f"{name}: {root}") if root else ()
        steps[label] = sandbox.curl("-g", *headers, f"{base}{path}")
    with servers:
        result = sandbox.run(
            net, tmp_path, {"resolve": sandbox.dig("allowed.test"), **steps},
            rules=rules_file, extra=("--profile", profile),
        )  # fmt: skip
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "PUBLIC-OK ran for GET /public/ok" in result["honest"].out, why
    for label in CONTROLS:
        assert result[label].status == 403, (label, why)
    passed = [label for label in TRICKS if result[label].status not in (400, 403)]
    assert not passed, f"passed the gateway with X-Vhm-Root: {passed}\n{why}"
    assert "ADMIN-HANDLER" not in ran, why
