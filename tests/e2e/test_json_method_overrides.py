"""A method override in a JSON body is decided as one in a form is.

Laravel and Lumen read a JSON body's members as the request's form input
(Illuminate's `Request::getInputSource`, for any Content-Type holding `/json` or
`+json`), and Symfony's method override, which they enable, takes `_method` from it:
under a rule that allows GET and POST, `POST /items/1` with the body
`{"_method": "DELETE"}` ran DELETE. Express's method-override with its README's
getter (`req.body._method`, the first of an array) does the same behind body-parser's
JSON parser, which inflates a gzip body first. The gateway read form bodies only.

A JSON body is now read too (proxy/policy/form_body.py `_Json`): kept, at most 64
KiB, and parsed at its end where `method` occurs in it; its top-level members are read
as a form's fields. A longer one, one that Python's json cannot parse, or a
compressed one, where a member may be named as an override, may name any method: it
is refused where the rules refuse one (here), and passes where they allow every
method. Each is refused (400 `ambiguous_method`) before the server runs anything; the
honest bodies pass, nested `_method` and JSON-RPC's `method` among them.

The `open` profile (every method allowed) runs the same requests: there each attack
runs as DELETE, so each is one the servers honour.

Origins in the fake internet: Lumen 8 (Debian's php-laravel-lumen-framework) on PHP's
built-in server, and Express 4 with body-parser and method-override (.venv/node,
scripts/install.sh --test), plain HTTP and HTTPS (curl's HTTP/2 to mitmproxy).
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, internet_servers
from test_form_method_overrides import IP, NODE_PATH
from test_form_override_compressed import node

pytestmark = pytest.mark.e2e

LUMEN, EXPRESS, EXPRESS_TLS = 8088, 8089, 8443
PORTS = f"[{LUMEN}, {EXPRESS}, {EXPRESS_TLS}]"
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

LUMEN_AUTOLOAD = Path("/usr/share/php/Laravel/Lumen/autoload.php")
LUMEN_APP = """<?php
require "%s";
$app = new Laravel\\Lumen\\Application("%s");
foreach (["get", "post", "put", "patch", "delete"] as $verb) {
    $app->router->$verb("/items/{id}", function ($id) use ($verb) {
        $line = "ran " . strtoupper($verb) . " /items/$id\\n";
        file_put_contents("%s", $line, FILE_APPEND);
        return $line;
    });
}
$app->run();
"""

EXPRESS_APP = r"""
const fs = require("node:fs");
const http = require("node:http");
const https = require("node:https");
const express = require("express");
const bodyParser = require("body-parser");
const methodOverride = require("method-override");
const [ip, port, tlsPort, log, cert, key] = process.argv.slice(2);
const app = express();
app.use(bodyParser.json());
app.use(methodOverride(function (req) {
  if (req.body && typeof req.body === "object" && "_method" in req.body) {
    const method = req.body._method; delete req.body._method; return method;
  }
}));
app.all("/items/*", (req, res) => {
  const line = `ran ${req.method} ${req.path}\n`;
  fs.appendFileSync(log, line); res.type("text").send(line);
});
http.createServer(app).listen(Number(port), ip);
const tls = { cert: fs.readFileSync(cert), key: fs.readFileSync(key) };
https.createServer(tls, app).listen(Number(tlsPort), ip);
"""

JSON = "application/json"
DELETE = {"_method": "DELETE"}


def post(url: str, body: bytes, content_type: str = JSON, *headers: str) -> str:
    b64 = base64.b64encode(body).decode()
    args = [a for h in headers for a in ("-H", h)]
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        "-H", f"Content-Type: {content_type}", *args, "--data-binary", "@body.bin", url
    )


def big(url: str) -> str:
    """`_method` after 300 KB: past what is kept and parsed (64 KiB), and past what is
    kept before any goes upstream (256 KiB)."""
    make = "import json; print(json.dumps({'pad': 'a' * 300_000, '_method': 'DELETE'}), end='')"
    return f'python3 -c "{make}" > big.json && ' + sandbox.curl(
        "-H", f"Content-Type: {JSON}", "--data-binary", "@big.json", url
    )


def steps() -> tuple[dict[str, str], list[str]]:
    """The sandbox's steps, and the labels of those that override POST with DELETE."""
    lumen = f"http://allowed.test:{LUMEN}/items/1"
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "lumen_honest": post(lumen, b'{"name": "x"}'),
        "lumen_honest_nested": post(lumen, json.dumps({"data": DELETE}).encode()),
        "lumen_honest_rpc": post(lumen, b'{"jsonrpc": "2.0", "method": "eth_call", "id": 1}'),
        "lumen_json": post(lumen, json.dumps(DELETE).encode()),
        "lumen_escaped": post(lumen, b'{"\\u005fmethod": "delete"}'),
        "lumen_vnd": post(lumen, json.dumps(DELETE).encode(), "application/vnd.api+json"),
        "lumen_param": post(lumen, json.dumps(DELETE).encode(), "text/plain; x=/json"),
        "lumen_chunked": post(
            lumen, json.dumps(DELETE).encode(), JSON, "Transfer-Encoding: chunked"
        ),
        "lumen_big": big(lumen),
    }
    for via, url in (
        ("plain", f"http://allowed.test:{EXPRESS}/items/1"),
        ("tls", f"https://allowed.test:{EXPRESS_TLS}/items/1"),
    ):
        steps[f"express_honest_{via}"] = post(url, b'{"name": "x"}')
        steps[f"express_json_{via}"] = post(url, json.dumps(DELETE).encode())
        steps[f"express_array_{via}"] = post(url, b'{"_method": ["DELETE", "GET"]}')
        steps[f"express_gzip_{via}"] = post(
            url, gzip.compress(json.dumps(DELETE).encode()), JSON, "Content-Encoding: gzip"
        )
    attacks = [label for label in steps if label != "resolve" and "honest" not in label]
    return steps, attacks


@pytest.mark.parametrize("profile", ["door", "engine", "open"])
def test_a_json_body_cannot_run_a_post_as_a_method_the_rules_refuse(net, tmp_path, profile):
    if not shutil.which("php") or not LUMEN_AUTOLOAD.exists():
        pytest.fail("needs php-cli and php-laravel-lumen-framework (scripts/install.sh --test)")
    lumen_log, express_log = tmp_path / "lumen.log", tmp_path / "express.log"
    lumen_log.write_text("")
    express_log.write_text("")
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "index.php").write_text(
        LUMEN_APP % (LUMEN_AUTOLOAD, tmp_path, lumen_log)
    )
    (tmp_path / "app.js").write_text(EXPRESS_APP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    servers = [
        ["php", "-S", f"{IP}:{LUMEN}", "-t", str(tmp_path / "public")],
        ["env", f"NODE_PATH={NODE_PATH}", node(), str(tmp_path / "app.js"), IP, str(EXPRESS),
         str(EXPRESS_TLS), str(express_log), str(net.workdir / "server.pem"),
         str(net.workdir / "server.key")],
    ]  # fmt: skip
    listens = [f"{IP}:{LUMEN}", f"{IP}:{EXPRESS}", f"{IP}:{EXPRESS_TLS}"]
    commands, attacks = steps()
    with internet_servers(net, servers, listens):
        result = sandbox.run(net, tmp_path, commands, rules=rules, extra=("--profile", profile))
    ran = lumen_log.read_text() + express_log.read_text()
    why = f"{result.describe()}\nservers:\n{ran}"
    for label in commands:
        if "honest" in label:
            assert "ran POST /items/1" in result[label].out, (label, why)
    if profile == "open":  # every attack is one the servers honour
        for label in attacks:
            assert "ran DELETE /items/1" in result[label].out, (label, why)
        assert not result.events(kind="request", verdict="deny"), why
        return
    statuses = {label: result[label].status for label in attacks}
    assert statuses == dict.fromkeys(attacks, 400), why
    assert "DELETE" not in ran, why  # the servers never ran one
    assert sorted(set(ran.splitlines())) == ["ran POST /items/1"], why
    assert result.verdicts(kind="request", verdict="deny") == {
        ("deny", "ambiguous_method", "builtin:ambiguous-method")
    }, why
    assert len(result.events(kind="request", verdict="deny")) == len(attacks), why
