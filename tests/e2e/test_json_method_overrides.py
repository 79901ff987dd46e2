"""A method override in a JSON body is decided as one in a form is.

Laravel and Lumen read a JSON body's members as the request's form input
(Illuminate's `Request::getInputSource`, for any Content-Type holding `/json` or
`+json`), and Symfony's method override, which they enable, takes `_method` from it:
under a rule that allows GET and POST, `POST /items/1` with the body
`{"_method": "DELETE"}` ran DELETE. Express's method-override with its README's
getter (`req.body._method`, the first of an array) does the same behind body-parser's
JSON parser, which inflates a gzip body first, and Koa's koa-methodoverride behind
its body parsers, which parse `application/csp-report` as JSON. The gateway read form
bodies only.

A JSON body is now read too (proxy/policy/form_body.py `_Json`): kept, at most 64
KiB, and parsed at its end where `method` occurs in it; its top-level members are read
as a form's fields. A gzip or deflate one is inflated first (at most 4 MiB). A longer
one, one that Python's json cannot parse, or one in another coding, where a member
may be named as an override (`_method`, ...; not `method` alone), may name any
method: it is refused where the rules refuse one (here), and passes where they allow
every method. Each attack is refused (400 `ambiguous_method`) before the server runs
anything; the honest bodies pass: a nested `_method`, JSON-RPC's `method`, and past
64 KiB an MCP tools/call, a JSON-RPC batch and a HAR upload, and a gzip OTLP export.

A red team (json3, session 54) found on the first reader: Lumen taking
`Content_Type` or `Content.Type` as the Content-Type (PHP files it as
HTTP_CONTENT_TYPE); body-parser reading `charset=utf-16`/`utf-32` without a byte
order mark little-endian (the gateway read it big-endian, as Java does) and UTF-7's
`+AF9-` (padding bits set) as `_`; Koa's `application/csp-report`; Express apps behind
AWS SNS parsing `text/plain` as JSON (as this one does); and the honest bodies above
refused. A second (json4) found a UTF-16/32 body invalid in one byte order read in
the other only, and text/plain uploads of YAML or Python holding `_method:` refused.
Each is a step here (streams and reloads: test_json_override_streams).

The `open` profile (every method allowed) runs the same requests: there each attack
runs as DELETE, so each is one the servers honour.

Origins in the fake internet: Lumen 8 (Debian's php-laravel-lumen-framework) on PHP's
built-in server; Express 4 with body-parser and method-override, plain HTTP and HTTPS
(curl's HTTP/2 to mitmproxy); Koa 2 with koa-bodyparser 4 and @koa/bodyparser 6 and
koa-methodoverride (.venv/node, scripts/install.sh --test).
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, internet_servers
from test_form_method_overrides import IP, NODE_PATH
from test_form_override_compressed import node

pytestmark = pytest.mark.e2e

LUMEN, EXPRESS, EXPRESS_TLS, KOA4, KOA6 = 8088, 8089, 8443, 8090, 8091


def rules_and_open(ports: str) -> str:
    """allowed.test on `ports` for GET and POST in the `door` and `engine` profiles
    (door_and_engine), and for every method in `open`."""
    return door_and_engine(
        f"""\
      - allow: allowed.test
        id: read-and-create
        ports: {ports}
        methods: [GET, POST]
"""
    ) + (
        f"  open:\n    rules:\n      - allow: allowed.test\n        id: any-method\n"
        f"        ports: {ports}\n"
    )


RULES = rules_and_open(f"[{LUMEN}, {EXPRESS}, {EXPRESS_TLS}, {KOA4}, {KOA6}]")

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

# As Express apps behind AWS SNS configure it: SNS posts JSON as text/plain.
EXPRESS_APP = r"""
const fs = require("node:fs");
const http = require("node:http");
const https = require("node:https");
const express = require("express");
const bodyParser = require("body-parser");
const methodOverride = require("method-override");
const [ip, port, tlsPort, log, cert, key] = process.argv.slice(2);
const app = express();
app.use(bodyParser.json({ type: ["application/json", "text/plain"] }));
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
  const line = `ran ${ctx.method} ${ctx.path}\n`;
  fs.appendFileSync(log, line); ctx.type = "text"; ctx.body = line;
});
app.listen(Number(port), ip);
"""

JSON = "Content-Type: application/json"
DELETE = json.dumps({"_method": "DELETE"}).encode()
PAD = 70_000  # past _MOST_JSON (64 KiB), under body-parser's 100 kB


def _mcp_call(size: int) -> bytes:  # MCP's Streamable HTTP: a JSON-RPC 2.0 tools/call
    arguments = {"path": "notes.txt", "content": "a" * size}
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "write_file", "arguments": arguments}}).encode()  # fmt: skip


def _rpc_batch(calls: int) -> bytes:  # an Ethereum JSON-RPC batch
    return json.dumps([
        {"jsonrpc": "2.0", "id": i, "method": "eth_getBalance",
         "params": ["0x" + f"{i:040x}", "latest"]} for i in range(calls)
    ]).encode()  # fmt: skip


def _har(entries: int) -> bytes:  # a HAR upload: nested `"method": "GET"`
    return json.dumps({"log": {"version": "1.2", "entries": [
        {"request": {"method": "GET", "url": f"https://example.test/page/{i}" + "x" * 100,
                     "headers": []}} for i in range(entries)
    ]}}).encode()  # fmt: skip


SOURCE = b"""class Client:
    def __init__(self, method: str) -> None:
        self._method: str = method
"""
YAML = b"routes:\n  - path: /items\n    _method: DELETE  # the form field our views send\n"


def _bad_unit(bits: int, unit: bytes) -> bytes:
    """`{"_method": "DELETE", "x": "?"}` little-endian, its `?` a unit no codec of
    Python's takes (a lone surrogate, a code point past U+10FFFF)."""
    head, tail = '{"_method": "DELETE", "x": "', '"}'
    return head.encode(f"utf-{bits}-le") + unit + tail.encode(f"utf-{bits}-le")


# Written into the sandbox's workspace (`setup`): bodies too long for a command line.
FILES = {
    "big.json": json.dumps({"pad": "a" * 300_000, "_method": "DELETE"}).encode(),
    "mcp.json": _mcp_call(PAD),
    "batch.json": _rpc_batch(600),
    "har.json": _har(400),
    "otlp.json.gz": gzip.compress(b'{"resourceLogs": []}'),
}


def post(url: str, body: bytes | str, *headers: str) -> str:
    """POST `body` (bytes, or the name of a file of FILES) with exactly `headers`
    (curl's own Content-Type removed)."""
    args = [a for h in ("Content-Type:", *headers) for a in ("-H", h)]
    if isinstance(body, str):
        return sandbox.curl(*args, "--data-binary", f"@{body}", url)
    b64 = base64.b64encode(body).decode()
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        *args, "--data-binary", "@body.bin", url
    )


def steps() -> dict[str, str]:
    """The sandbox's steps: `honest_` ones POST, `attack_` ones override POST with
    DELETE (so does `control_`: the plain form of a trick)."""
    lumen = f"http://allowed.test:{LUMEN}/items/1"
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "lumen_honest": post(lumen, b'{"name": "x"}', JSON),
        "lumen_honest_nested": post(
            lumen, json.dumps({"data": {"_method": "DELETE"}}).encode(), JSON
        ),
        "lumen_honest_rpc": post(lumen, b'{"jsonrpc": "2.0", "method": "eth_call", "id": 1}', JSON),
        "lumen_control": post(lumen, DELETE, JSON),
        "lumen_attack_escaped": post(lumen, b'{"\\u005fmethod": "delete"}', JSON),
        "lumen_attack_vnd": post(lumen, DELETE, "Content-Type: application/vnd.api+json"),
        "lumen_attack_param": post(lumen, DELETE, "Content-Type: text/html; x=/json"),
        "lumen_attack_chunked": post(lumen, DELETE, JSON, "Transfer-Encoding: chunked"),
        "lumen_attack_big": post(lumen, "big.json", JSON),
        "lumen_attack_content_underscore": post(lumen, DELETE, "Content_Type: application/json"),
        "lumen_attack_content_dot": post(lumen, DELETE, "Content.Type: application/json"),
        # text/plain that no parser takes as an object (Laravel reads none as JSON)
        "lumen_honest_yaml": post(lumen, YAML, "Content-Type: text/plain"),
        "lumen_honest_python": post(lumen, SOURCE, "Content-Type: text/plain"),
    }
    for via, url in (
        ("plain", f"http://allowed.test:{EXPRESS}/items/1"),
        ("tls", f"https://allowed.test:{EXPRESS_TLS}/items/1"),
    ):
        utf = "Content-Type: application/json; charset=utf-{}".format
        steps.update({
            f"express_honest_{via}": post(url, b'{"name": "x"}', JSON),
            f"express_honest_mcp_{via}": post(url, "mcp.json", JSON),
            f"express_honest_batch_{via}": post(url, "batch.json", JSON),
            f"express_honest_har_{via}": post(url, "har.json", JSON),
            f"express_honest_otlp_{via}": post(url, "otlp.json.gz", JSON, "Content-Encoding: gzip"),
            f"express_control_{via}": post(url, DELETE, JSON),
            f"express_attack_array_{via}": post(url, b'{"_method": ["DELETE", "GET"]}', JSON),
            f"express_attack_gzip_{via}": post(url, gzip.compress(DELETE), JSON, "Content-Encoding: gzip"),
            f"express_attack_text_plain_{via}": post(url, DELETE, "Content-Type: text/plain"),
            f"express_attack_utf16_bom_{via}": post(url, json.dumps({"_method": "DELETE"}).encode("utf-16"), utf(16)),
            f"express_attack_utf16le_{via}": post(url, DELETE.decode().encode("utf-16-le"), utf(16)),
            # Invalid in one byte order or both: iconv-lite reads such bodies leniently
            # (little-endian), Python's codecs refuse them: refused, malformed_request.
            f"express_invalid_utf32le_{via}": post(url, DELETE.decode().encode("utf-32-le"), utf(32)),
            f"express_invalid_utf16le_surrogate_{via}": post(url, _bad_unit(16, b"\x00\xd8"), utf(16)),
            f"express_invalid_utf32le_past_unicode_{via}": post(url, _bad_unit(32, b"\x00\x00\x11\x00"), utf(32)),
            # `+AF9-` is `_` in UTF-7 with padding bits set: iconv-lite takes it so
            f"express_invalid_utf7_padding_{via}": post(url, b'{"+AF9-method": "DELETE"}', utf(7)),
            f"express_attack_utf7_{via}": post(url, b'{"+AF8-method": "DELETE"}', utf(7)),
        })  # fmt: skip
    for port, name in ((KOA4, "koa4"), (KOA6, "koa6")):
        url = f"http://allowed.test:{port}/items/1"
        steps[f"{name}_honest"] = post(url, b'{"name": "x"}', JSON)
        steps[f"{name}_control"] = post(url, DELETE, JSON)
        steps[f"{name}_attack_csp_report"] = post(
            url, DELETE, "Content-Type: application/csp-report"
        )
    return steps


def origins(net, tmp_path: Path, node: str) -> tuple[list[list[str]], list[Path]]:
    """The origins' commands, and their logs of what they ran."""
    logs = [tmp_path / f"{name}.log" for name in ("lumen", "express", "koa")]
    for log in logs:
        log.write_text("")
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "index.php").write_text(LUMEN_APP % (LUMEN_AUTOLOAD, tmp_path, logs[0]))
    (tmp_path / "app.js").write_text(EXPRESS_APP)
    (tmp_path / "koa.js").write_text(KOA_APP)
    env = ["env", f"NODE_PATH={NODE_PATH}", node]
    servers = [
        ["php", "-S", f"{IP}:{LUMEN}", "-t", str(tmp_path / "public")],
        [*env, str(tmp_path / "app.js"), IP, str(EXPRESS), str(EXPRESS_TLS), str(logs[1]),
         str(net.workdir / "server.pem"), str(net.workdir / "server.key")],
        *([*env, str(tmp_path / "koa.js"), IP, str(port), parser, str(logs[2])]
          for port, parser in ((KOA4, "koa-bodyparser"), (KOA6, "@koa/bodyparser"))),
    ]  # fmt: skip
    return servers, logs


def _node() -> str:
    """node, with express and koa and their body parsers and overrides in NODE_PATH."""
    node_ = node()
    probe = "for (const m of ['koa', 'koa-bodyparser', '@koa/bodyparser', 'koa-methodoverride']) require(m)"
    if subprocess.run(
        [node_, "-e", probe], env={"NODE_PATH": NODE_PATH}, capture_output=True
    ).returncode:
        pytest.fail(
            "needs koa, koa-bodyparser, @koa/bodyparser, koa-methodoverride (scripts/install.sh --test)"
        )
    return node_


@pytest.mark.parametrize("profile", ["door", "engine", "open"])
def test_a_json_body_cannot_run_a_post_as_a_method_the_rules_refuse(net, tmp_path, profile):
    if not shutil.which("php") or not LUMEN_AUTOLOAD.exists():
        pytest.fail("needs php-cli and php-laravel-lumen-framework (scripts/install.sh --test)")
    servers, logs = origins(net, tmp_path, _node())
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def write_files(workspace: Path) -> None:
        for name, content in FILES.items():
            (workspace / name).write_bytes(content)

    commands = steps()
    unreadable = [label for label in commands if "_invalid_" in label]
    attacks = [label for label in commands if "_attack_" in label or "_control" in label]
    attacks += unreadable
    listens = [f"{IP}:{port}" for port in (LUMEN, EXPRESS, EXPRESS_TLS, KOA4, KOA6)]
    with internet_servers(net, servers, listens):
        result = sandbox.run(
            net, tmp_path, commands, rules=rules, extra=("--profile", profile), setup=write_files
        )
    ran = "".join(log.read_text() for log in logs)
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
        ("deny", "ambiguous_method", "builtin:ambiguous-method"),
        ("deny", "malformed_request", "builtin:malformed-request"),
    }, why
    malformed = result.events(kind="request", verdict="deny", reason="malformed_request")
    assert len(malformed) == len(unreadable), why
    assert len(result.events(kind="request", verdict="deny")) == len(attacks), why
