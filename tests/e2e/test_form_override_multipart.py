"""A multipart `_method` part is read in the spellings Rack and undici read (a red
team, session 53, found these past the gateway).

The gateway's reader (proxy/policy/form_body.py `_Multipart`) did not see these parts
while the server did, and the server ran DELETE:
- Rack 2.2 takes a quoted boundary up to `;` or `,` (`boundary="a;b"` is `a`), undici
  (Hono's formData) unescapes one (`"a\\"b"` is `a"b`, `"a\\b"` is `ab`): the gateway
  now refuses a boundary holding a backslash, `;`, `,`, a quote or a blank, which
  servers read otherwise than each other and no honest client sends.
- Rack names a part without a Content-Disposition name by its `Content-ID`: the
  gateway reads that name too.
- Rack and undici end a part's header section at CRLF CRLF only: a section ended by
  a bare-LF blank line before a CRLF one (`X-A: b\\n\\n` then a Content-Disposition)
  is refused.
Each is refused (400) as the plain `_method` part is (the control), and the server
runs no DELETE. Rack's MethodOverride on WEBrick over plain HTTP and HTTPS, Hono 4's
methodOverride on Node (POST and PUT); both gateway paths.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest
from support import sandbox
from support.servers import run_beside
from test_form_method_overrides import (  # noqa: E402  (the same origins)
    HONO_APP,
    HONO_RULES,
    IP,
    NODE_PATH,
    PLAIN,
    RULES,
    URLS,
    rack_origin,
)

pytestmark = pytest.mark.e2e

M = "multipart/form-data; boundary="
PART = b'Content-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n'

CONTROL = (M + "XyZ", b"--XyZ\r\n" + PART + b"--XyZ--\r\n")
RACK_TRICKS = {
    "boundary_semicolon": (M + '"a;b"', b"--a\r\n" + PART + b"--a--\r\n"),
    "boundary_comma": (M + '"a,b"', b"--a\r\n" + PART + b"--a--\r\n"),
    "content_id": (M + "XyZ", b"--XyZ\r\nContent-ID: _method\r\n\r\nDELETE\r\n--XyZ--\r\n"),
    "lf_head": (M + "XyZ", b"--XyZ\r\nX-A: b\n\n" + PART + b"--XyZ--\r\n"),
}
HONO_TRICKS = {
    "boundary_escaped_quote": (M + '"a\\"b"', b'--a"b\r\n' + PART + b'--a"b--\r\n'),
    "boundary_escaped_char": (M + '"a\\b"', b"--ab\r\n" + PART + b"--ab--\r\n"),
    "lf_head": (M + "XyZ", b"--XyZ\r\nX-A: b\n\n" + PART + b"--XyZ--\r\n"),
}


def post(url: str, content_type: str, body: bytes, method: str = "POST") -> str:
    """A command posting `body` (exact bytes) with `content_type`."""
    b64 = base64.b64encode(body).decode()
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        "-X", method, "-H", f"Content-Type: {content_type}", "--data-binary", "@body.bin", url
    )


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_rack_multipart_overrides_are_read(net, tmp_path, profile):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {"resolve": sandbox.dig("allowed.test")}
    for via, url in URLS.items():
        steps[f"control_{via}"] = post(url, *CONTROL)
        for label, (ct, body) in RACK_TRICKS.items():
            steps[f"{label}_{via}"] = post(url, ct, body)
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    for via in URLS:
        assert result[f"control_{via}"].status == 400, why  # the plain spelling is refused
    tricks = [label for label in steps if label != "resolve" and not label.startswith("control")]
    statuses = {label: result[label].status for label in tricks}
    assert statuses == dict.fromkeys(tricks, 400), why
    assert "DELETE" not in ran, why  # the server never ran one


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_hono_multipart_overrides_are_read(net, tmp_path, profile):
    node = shutil.which("node")
    env = {**os.environ, "NODE_PATH": NODE_PATH}
    probe = "require('hono/method-override'); require('@hono/node-server')"
    if not node or subprocess.run([node, "-e", probe], env=env).returncode:
        pytest.fail("needs node, hono 4 and @hono/node-server (scripts/install.sh --test)")
    (tmp_path / "app.js").write_text(HONO_APP)
    log = tmp_path / "hono.log"
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(HONO_RULES)
    url = URLS["plain"]
    steps = {"control": post(url, *CONTROL), "control_put": post(url, *CONTROL, method="PUT")}
    for label, (ct, body) in HONO_TRICKS.items():
        steps[label] = post(url, ct, body)
        steps[f"{label}_put"] = post(url, ct, body, method="PUT")
    node_argv = ["env", f"NODE_PATH={NODE_PATH}", node, str(tmp_path / "app.js"), IP, str(PLAIN)]
    result = run_beside(
        net, tmp_path, [[*node_argv, str(log)]], [f"{IP}:{PLAIN}"], steps, rules, profile
    )
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert result["control"].status == 400 and result["control_put"].status == 400, why
    tricks = [label for label in steps if label not in ("resolve", "control", "control_put")]
    statuses = {label: result[label].status for label in tricks}
    assert statuses == dict.fromkeys(tricks, 400), why
    assert "DELETE" not in ran, why
