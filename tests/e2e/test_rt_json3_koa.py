"""Red team json3 (session 53): Koa's body parsers read `application/csp-report` as JSON.

koa-bodyparser 4 and @koa/bodyparser 5 parse as JSON every Content-Type in their
`jsonTypes`, which hold `application/csp-report` (no "json" in it); koa-methodoverride
with a body getter then runs `{"_method": "DELETE"}` as DELETE. The gateway reads a body
for overrides only where the Content-Type holds "json", "form" or "multipart"
(request_head._form_body), so a POST with `Content-Type: application/csp-report` is not
read at all.

Control: the same body as `application/json` is refused. The `open` profile shows
each request runs DELETE.

Needs koa, koa-bodyparser, @koa/bodyparser, koa-methodoverride in KOA_NODE_PATH
(default /tmp/rt/json3/node/node_modules: `npm install koa@2 koa-bodyparser@4
@koa/bodyparser koa-methodoverride`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from support import sandbox
from support.servers import door_and_engine, internet_servers
from test_form_method_overrides import IP

pytestmark = pytest.mark.e2e

KOA_NODE_PATH = os.environ.get("KOA_NODE_PATH", "/tmp/rt/json3/node/node_modules")
KOA4, KOA5 = 8090, 8091
PORTS = f"[{KOA4}, {KOA5}]"
RULES = (
    door_and_engine(
        f"""\
      - allow: allowed.test
        id: read-and-create
        ports: {PORTS}
        methods: [GET, POST]
"""
    )
    + f"""\
  open:
    rules:
      - allow: allowed.test
        id: any-method
        ports: {PORTS}
"""
)

KOA_APP = r"""
const fs = require("node:fs");
const Koa = require("koa");
const methodOverride = require("koa-methodoverride");
const [ip, port, parser, log] = process.argv.slice(2);
const bodyParser = require(parser);
const app = new Koa();
app.use(typeof bodyParser === "function" ? bodyParser() : bodyParser.bodyParser());
app.use(methodOverride((req) => (req.body && typeof req.body === "object" ? req.body._method : undefined)));
app.use((ctx) => {
  const line = `ran ${ctx.method} ${ctx.path} ${parser}\n`;
  fs.appendFileSync(log, line); ctx.type = "text"; ctx.body = line;
});
app.listen(Number(port), ip);
"""

DELETE = json.dumps({"_method": "DELETE"})


def post(url: str, content_type: str, body: str = DELETE) -> str:
    return sandbox.curl("-H", f"Content-Type: {content_type}", "--data-binary", body, url)


@pytest.mark.parametrize("profile", ["door", "engine", "open"])
def test_rt_json3_koa_csp_report_is_json(net, tmp_path, profile):
    node = shutil.which("node")
    probe = "for (const m of ['koa','koa-bodyparser','@koa/bodyparser','koa-methodoverride']) require(m)"
    env = {"NODE_PATH": KOA_NODE_PATH}
    if not node or subprocess.run([node, "-e", probe], env=env, capture_output=True).returncode:
        pytest.fail(f"needs koa, koa-bodyparser, @koa/bodyparser, koa-methodoverride in {KOA_NODE_PATH}")
    log = tmp_path / "koa.log"
    log.write_text("")
    (tmp_path / "koa.js").write_text(KOA_APP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    servers = [
        ["env", f"NODE_PATH={KOA_NODE_PATH}", node, str(tmp_path / "koa.js"), IP, str(port),
         parser, str(log)]
        for port, parser in ((KOA4, "koa-bodyparser"), (KOA5, "@koa/bodyparser"))
    ]  # fmt: skip
    commands = {"resolve": sandbox.dig("allowed.test")}
    for port, name in ((KOA4, "koa4"), (KOA5, "koa5")):
        url = f"http://allowed.test:{port}/items/1"
        commands[f"{name}_honest"] = post(url, "application/json", '{"name": "x"}')
        commands[f"{name}_control_json"] = post(url, "application/json")
        commands[f"{name}_attack_csp_report"] = post(url, "application/csp-report")
    attacks = [label for label in commands if "_attack_" in label]
    controls = [label for label in commands if "_control_" in label]
    with internet_servers(net, servers, [f"{IP}:{KOA4}", f"{IP}:{KOA5}"]):
        result = sandbox.run(net, tmp_path, commands, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for label in commands:
        if "honest" in label:
            assert "ran POST /items/1" in result[label].out, (label, why)
    if profile == "open":
        for label in attacks + controls:
            assert "ran DELETE /items/1" in result[label].out, (label, why)
        return
    for label in controls:
        assert result[label].status == 400, (label, why)
    statuses = {label: result[label].status for label in attacks}
    assert statuses == dict.fromkeys(attacks, 400), why
    assert "DELETE" not in ran, why
