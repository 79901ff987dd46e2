"""A multipart `_method` part is read in the spellings PHP reads (a red team,
session 53, found these past the gateway).

Symfony's HttpFoundation (Debian's php-symfony-http-foundation 5.4,
`Request::enableHttpMethodParameterOverride()`, as Laravel and Symfony apps run it)
on PHP 8.2's built-in server. PHP's multipart parser (main/rfc1867.c) takes a part's
name in single quotes as well as double (`name='_method'`, `name=' _method'`: PHP
drops a variable name's leading blanks) and ends a bare one at a blank
(`name=_method x`), and finds the boundary as the first `boundary` anywhere in the
Content-Type, then the next '=' (`boundaryx=XyZ; boundary=B` is XyZ to it,
`a=boundary; b=XyZ` too). The gateway read none of these as `_method` and Symfony ran
DELETE. It now reads a part's name in single quotes, and a bare one to its first
blank, as well (proxy/policy/form_body.py `_PART_NAME`), and refuses a Content-Type
naming `boundary` more than once or other than as the parameter's name: each is
refused (400) as the plain `name="_method"` part is (the control), an honest
multipart form passes, and Symfony runs no DELETE. Both gateway paths.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.servers import run_beside
from test_form_method_overrides import IP, PLAIN, RULES, URLS  # noqa: E402

pytestmark = pytest.mark.e2e

AUTOLOAD = Path("/usr/share/php/Symfony/Component/HttpFoundation/autoload.php")
APP = """<?php
require_once "%s";
use Symfony\\Component\\HttpFoundation\\Request;
Request::enableHttpMethodParameterOverride();
$r = Request::createFromGlobals();
$line = "ran " . $r->getMethod() . " " . $r->getPathInfo() . "\\n";
file_put_contents("%s", $line, FILE_APPEND);
echo $line;
"""


def post(url: str, content_type: str, body: bytes) -> str:
    b64 = base64.b64encode(body).decode()
    return f"echo {b64} | base64 -d > body.bin && " + sandbox.curl(
        "-H", f"Content-Type: {content_type}", "--data-binary", "@body.bin", url
    )


def part(name: bytes) -> bytes:
    return (b"--XyZ\r\nContent-Disposition: form-data; name=" + name
            + b"\r\n\r\nDELETE\r\n--XyZ--\r\n")  # fmt: skip


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_symfony_multipart_overrides_are_read(net, tmp_path, profile):
    if not shutil.which("php") or not AUTOLOAD.exists():
        pytest.fail("needs php-cli and php-symfony-http-foundation (scripts/install.sh --test)")
    log = tmp_path / "php.log"
    log.write_text("")
    (tmp_path / "index.php").write_text(APP % (AUTOLOAD, log))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = URLS["plain"]
    ct = "multipart/form-data; boundary=XyZ"
    steps = {
        "honest": sandbox.curl("-F", "a=1", url),
        "control": post(url, ct, part(b'"_method"')),
        "single_quoted": post(url, ct, part(b"'_method'")),
        "single_quoted_space": post(url, ct, part(b"' _method'")),
        "bare_then_space": post(url, ct, part(b"_method x")),
        # PHP finds the boundary as the first `boundary` substring, then the next '='.
        "boundary_prefix_param": post(
            url, "multipart/form-data; boundaryx=XyZ; boundary=B", part(b'"_method"')
        ),
        "boundary_in_a_value": post(
            url, "multipart/form-data; a=boundary; b=XyZ", part(b'"_method"')
        ),
    }
    argv = ["php", "-S", f"{IP}:{PLAIN}", str(tmp_path / "index.php")]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PLAIN}"], steps, rules, profile)
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "ran POST /items/1" in result["honest"].out, why
    assert result["control"].status == 400, why
    tricks = [k for k in steps if k not in ("resolve", "honest", "control")]
    assert {k: result[k].status for k in tricks} == dict.fromkeys(tricks, 400), why
    assert "DELETE" not in ran, why
