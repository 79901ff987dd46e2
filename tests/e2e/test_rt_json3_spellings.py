"""Red team json3 (session 53): JSON method overrides the gateway's `_Json` reader misses.

1. Lumen (Illuminate's Request on Symfony's HeaderBag) on PHP's built-in server takes
   `Content_Type: application/json` (or `Content.Type`) as the Content-Type: PHP files
   it as HTTP_CONTENT_TYPE, Symfony's ServerBag::getHeaders strips `HTTP_` and the
   HeaderBag reads `_` as `-`. The gateway reads only `content-type`: a POST without
   one is read as an urlencoded form, where `{"_method":"DELETE"}` names nothing.
2. Express's body-parser.json decodes a body in the Content-Type's `charset=utf-16`
   (or utf-32) with iconv-lite, which takes a body without a BOM as little-endian
   (it guesses from the bytes, little-endian by default). The gateway decodes such a
   body big-endian (form_body._read_decoded: "Java reads UTF-16 without a mark
   big-endian"), and the raw bytes hold no ASCII `method`: nothing is found.
3. The same parser with `charset=utf-7` and the name `+AF9-method`: `AF9` is `_` with
   non-zero padding bits, which iconv-lite ignores and Python's utf-7 codec refuses
   (decoded with "replace": U+FFFD), so the gateway's decoded reading has no `_method`.

Controls: the same body with `Content-Type: application/json` (Lumen) and the UTF-16
body with a BOM (Express) are refused. The `open` profile (every method allowed)
shows each attack runs DELETE on the real server.
"""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from support import sandbox
from support.servers import door_and_engine, internet_servers
from test_form_method_overrides import IP, NODE_PATH
from test_form_override_compressed import node
from test_json_method_overrides import EXPRESS_APP, LUMEN_APP, LUMEN_AUTOLOAD

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

DELETE = json.dumps({"_method": "DELETE"})


def post(url: str, body: bytes, *headers: str) -> str:
    """POST `body` with exactly `headers` (curl's own Content-Type removed)."""
    b64 = base64.b64encode(body).decode()
    args = [a for h in ("Content-Type:", *headers) for a in ("-H", h)]
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        *args, "--data-binary", "@body.bin", url
    )


def steps() -> tuple[dict[str, str], list[str], list[str]]:
    """The steps, the labels of the attacks (missed), and of the controls (refused)."""
    lumen = f"http://allowed.test:{LUMEN}/items/1"
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "lumen_honest": post(lumen, b'{"name": "x"}', "Content-Type: application/json"),
        "control_lumen_json": post(lumen, DELETE.encode(), "Content-Type: application/json"),
        "attack_lumen_content_underscore": post(
            lumen, DELETE.encode(), "Content_Type: application/json"
        ),
        "attack_lumen_content_dot": post(lumen, DELETE.encode(), "Content.Type: application/json"),
    }
    for via, url in (
        ("plain", f"http://allowed.test:{EXPRESS}/items/1"),
        ("tls", f"https://allowed.test:{EXPRESS_TLS}/items/1"),
    ):
        utf16 = "Content-Type: application/json; charset=utf-16"
        steps[f"express_honest_{via}"] = post(url, b'{"name": "x"}', utf16.replace("16", "8"))
        steps[f"control_express_utf16_bom_{via}"] = post(
            url, DELETE.encode("utf-16"), utf16  # Python's utf-16 writes a BOM
        )
        steps[f"attack_express_utf16le_{via}"] = post(url, DELETE.encode("utf-16-le"), utf16)
        steps[f"attack_express_utf32le_{via}"] = post(
            url, DELETE.encode("utf-32-le"), utf16.replace("16", "32")
        )
        steps[f"attack_express_utf7_padding_{via}"] = post(
            url, b'{"+AF9-method": "DELETE"}', utf16.replace("16", "7")
        )  # `_` in UTF-7 with non-zero padding bits: iconv-lite ignores them, Python's
        # codec replaces the character (U+FFFD)
    attacks = [label for label in steps if label.startswith("attack_")]
    controls = [label for label in steps if label.startswith("control_")]
    return steps, attacks, controls


def start(net, tmp_path):
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
    return rules, lumen_log, express_log, internet_servers(net, servers, listens)


@pytest.mark.parametrize("profile", ["door", "engine", "open"])
def test_rt_json3_content_type_spellings_and_utf16(net, tmp_path, profile):
    rules, lumen_log, express_log, servers = start(net, tmp_path)
    commands, attacks, controls = steps()
    with servers:
        result = sandbox.run(net, tmp_path, commands, rules=rules, extra=("--profile", profile))
    ran = lumen_log.read_text() + express_log.read_text()
    why = f"{result.describe()}\nservers:\n{ran}"
    for label in commands:
        if "honest" in label:
            assert "ran POST /items/1" in result[label].out, (label, why)
    if profile == "open":  # each attack and control is one the servers honour
        for label in attacks + controls:
            assert "ran DELETE /items/1" in result[label].out, (label, why)
        return
    for label in controls:
        assert result[label].status == 400, (label, why)
    statuses = {label: result[label].status for label in attacks}
    assert statuses == dict.fromkeys(attacks, 400), why
    assert "DELETE" not in ran, why
