"""A compressed form body is refused (a red team, session 53, found it past the
gateway).

Express 4 with body-parser's urlencoded parser and method-override reading
`req.body._method` (method-override's README recipe): body-parser inflates a body
sent with `Content-Encoding: gzip` or `deflate` (its default `inflate: true`) before
it parses the form. The gateway read the compressed bytes, found no `_method`, and
Express ran DELETE. A form body with a Content-Encoding other than identity is now
refused (`malformed_request`, 400; proxy/policy/form_body.py), as the plain
`_method=DELETE` is (the control); an honest form passes. Both gateway paths.

express, body-parser and method-override come from .venv/node (scripts/install.sh
--test).
"""

from __future__ import annotations

import base64
import gzip
import shutil
import subprocess
import zlib

import pytest
from support import sandbox
from support.servers import run_beside
from test_form_method_overrides import IP, NODE_PATH, PLAIN, RULES, URLS  # noqa: E402

pytestmark = pytest.mark.e2e

EXPRESS_APP = r"""
const fs = require("node:fs");
const express = require("express");
const bodyParser = require("body-parser");
const methodOverride = require("method-override");
const [ip, port, log] = process.argv.slice(2);
const app = express();
app.use(bodyParser.urlencoded({ extended: true }));
app.use(methodOverride(function (req) {
  if (req.body && typeof req.body === "object" && "_method" in req.body) {
    const method = req.body._method; delete req.body._method; return method;
  }
}));
app.all("/items/*", (req, res) => {
  const line = `ran ${req.method} ${req.path}\n`;
  fs.appendFileSync(log, line); res.type("text").send(line);
});
app.listen(Number(port), ip);
"""
FORM = "application/x-www-form-urlencoded"


def node() -> str:
    """node, with express, body-parser and method-override in NODE_PATH."""
    node = shutil.which("node")
    probe = "require('express'); require('method-override'); require('body-parser')"
    env = {"NODE_PATH": NODE_PATH}
    if not node or subprocess.run([node, "-e", probe], env=env, capture_output=True).returncode:
        pytest.fail(
            "needs node, express 4, body-parser, method-override (scripts/install.sh --test)"
        )
    return node


def post(url: str, body: bytes, *headers: str) -> str:
    b64 = base64.b64encode(body).decode()
    args = [a for h in headers for a in ("-H", h)]
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        "-H", f"Content-Type: {FORM}", *args, "--data-binary", "@body.bin", url
    )


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_express_compressed_form_is_refused(net, tmp_path, profile):
    (tmp_path / "app.js").write_text(EXPRESS_APP)
    log = tmp_path / "express.log"
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = URLS["plain"]
    form = b"a=1&_method=DELETE"
    steps = {
        "honest": post(url, b"a=1"),
        "control": post(url, form),
        "gzip": post(url, gzip.compress(form), "Content-Encoding: gzip"),
        "deflate": post(url, zlib.compress(form), "Content-Encoding: deflate"),
    }
    argv = ["env", f"NODE_PATH={NODE_PATH}", node(), str(tmp_path / "app.js")]
    result = run_beside(
        net, tmp_path, [[*argv, IP, str(PLAIN), str(log)]], [f"{IP}:{PLAIN}"], steps, rules,
        profile,
    )  # fmt: skip
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "ran POST /items/1" in result["honest"].out, why
    assert result["control"].status == 400, why
    assert result["gzip"].status == 400 and result["deflate"].status == 400, why
    assert "DELETE" not in ran, why
