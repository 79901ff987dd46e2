"""Fields a real server routes a request by besides its path and method: gunicorn and
a Flask application behind the gateway (a red team, session 48).

- `SCRIPT_NAME` (and `PATH_INFO`): gunicorn takes them from a trusted front end
  (`--forwarded-allow-ips '*'`, as behind a load balancer; before 22 from anyone) and
  routes the application by the path without the mount point. `GET
  /public/x/private/key` with `SCRIPT_NAME: /public/x` was allowed by a rule for
  `/public/**` and Flask served `/private/key`. Now a request naming where the
  application is mounted is refused (`ambiguous_path`).
- A method override that is not one method (`DELETE, POST`): decided as that whole
  value, which a deny of DELETE did not match; Express's method-override runs the
  first of the list. Now refused (`ambiguous_method`).

Each refusal is checked against the server's own log: it got nothing, while the
honest request in the same run reached it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl
from support.servers import listening

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PATHS, METHODS = 8181, 8182
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PATHS}]
        methods: [GET]
        paths: ["/public/**"]
        id: public-only
      - allow: allowed.test
        ports: [{METHODS}]
        id: any-method
      - deny: allowed.test
        ports: [{METHODS}]
        methods: [DELETE]
        id: no-delete
"""

APP = """\
import json, os
from flask import Flask, request

app = Flask(__name__)


@app.route("/", defaults={"p": ""}, methods=["GET", "POST", "DELETE"])
@app.route("/<path:p>", methods=["GET", "POST", "DELETE"])
def any_path(p):
    with open(os.environ["APP_LOG"], "a") as log:
        log.write(json.dumps({"method": request.method, "routed": request.path}) + "\\n")
    return f"served {request.method} {request.path}\\n"
"""


def test_a_mount_point_or_a_list_of_methods_never_reaches_gunicorn(net, tmp_path):
    (tmp_path / "app.py").write_text(APP)
    log = tmp_path / "app.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    servers = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                net.internet_ns,
                GUNICORN,
                "--chdir",
                str(tmp_path),
                "-w",
                "1",
                "-b",
                f"{IP}:{port}",
                "--forwarded-allow-ips",
                "*",
                "app:app",
            ],
            env={"APP_LOG": str(log), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for port in (PATHS, METHODS)
    ]
    try:
        addresses = [f"{IP}:{PATHS}", f"{IP}:{METHODS}"]
        assert sandbox.eventually(lambda: listening(net, addresses), timeout=20), "no gunicorn"
        paths, methods = f"http://allowed.test:{PATHS}", f"http://allowed.test:{METHODS}"
        r = sandbox.run(net, tmp_path, {
            "honest": curl(f"{paths}/public/ok"),
            "private": curl(f"{paths}/private/key"),
            "script_name": curl("-H", "SCRIPT_NAME: /public/x", f"{paths}/public/x/private/key"),
            "anywhere": curl("-H", "SCRIPT_NAME: c/", f"{paths}/public/private/key"),
            "path_info": curl("-H", "PATH_INFO: /private/key", f"{paths}/public/ok"),
            "post": curl("-X", "POST", f"{methods}/item/1"),
            "delete": curl("-X", "DELETE", f"{methods}/item/1"),
            "list": curl("-X", "POST", "-H", "X-HTTP-Method-Override: DELETE, POST",
                         f"{methods}/item/1"),
        }, rules=rules)  # fmt: skip
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)
    served = [json.loads(line) for line in log.read_text().splitlines()]
    why = f"{r.describe()}\nserved: {served}"
    assert r["honest"].status == 200 and r["post"].status == 200, why
    assert r["private"].status == 403 and r["delete"].status == 403, why
    for label in ("script_name", "anywhere", "path_info"):
        assert r[label].status == 400, (label, why)
    assert r["list"].status == 400, why
    assert served == [
        {"method": "GET", "routed": "/public/ok"},
        {"method": "POST", "routed": "/item/1"},
    ], why
    assert {e["reason"] for e in r.events(kind="request", verdict="deny")} == {
        "path_not_allowed",
        "rule_deny",
        "ambiguous_path",
        "ambiguous_method",
    }, why
    mounts = r.events(kind="request", reason="ambiguous_path")
    assert len(mounts) == 3 and all("routes the path" in e["detail"] for e in mounts), why
