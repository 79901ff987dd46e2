"""Honest paths holding common punctuation outside ASCII are forwarded: with only an
allow of `/wiki/**`, `/wiki/%E2%80%A6` (U+2026 HORIZONTAL ELLIPSIS `…`, NFKC `...`:
Wikipedia's page of that name), `/wiki/Wait%E2%80%A6_what`, the fullwidth question
mark `？` (U+FF1F, everyday Japanese and Chinese punctuation) and `⒈` (U+2488, NFKC
`1.`) reach the server as sent. A red team (session 51) found them refused
(`ambiguous_path`) by the first form of the check against characters a server that
normalises NFKC reads as a path's structure; it now refuses only those read as a
separator (`/ \\ ; %`) or as a `.` or `..` segment (request_head._escape_problem):
`℅` (U+2105, NFKC `c/o`) is one, refused here as the boundary.

Control: `/wiki/Ellipsis` is served. The origin is PHP's built-in server with a
router that logs what it served, plain HTTP in the fake internet; both gateway
paths.
"""

from __future__ import annotations

import shutil

import pytest
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PORT = 8088

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: wiki
        ports: [{PORT}]
        methods: [GET]
        paths: ["/wiki/**"]
"""
)

ROUTER = r"""<?php
file_put_contents(getenv('SERVED_LOG'), "served " . $_SERVER['REQUEST_URI'] . "\n", FILE_APPEND);
echo "served " . rawurldecode($_SERVER['REQUEST_URI']) . "\n";
"""

HONEST = {
    "ellipsis": "/wiki/%E2%80%A6",  # …  (Wikipedia: the page 'Ellipsis' redirects from it)
    "ellipsis_in_title": "/wiki/Wait%E2%80%A6_what",
    "fullwidth_question": "/wiki/%E3%81%AA%E3%81%9C%EF%BC%9F",  # なぜ？
    "digit_full_stop": "/wiki/%E2%92%88",  # ⒈
}
SEPARATOR = "/wiki/%E2%84%85"  # ℅: c/o to a server that normalises NFKC


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_honest_paths_with_common_unicode_punctuation_are_forwarded(net, tmp_path, profile):
    php = shutil.which("php")
    if not php:
        pytest.skip("needs php-cli")
    (tmp_path / "router.php").write_text(ROUTER)
    log = tmp_path / "served.log"
    log.write_text("")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = f"http://allowed.test:{PORT}"
    steps = {"control": sandbox.curl(f"{url}/wiki/Ellipsis")}
    steps |= {label: sandbox.curl(url + path) for label, path in HONEST.items()}
    steps["separator"] = sandbox.curl(url + SEPARATOR)
    argv = ["env", f"SERVED_LOG={log}", php, "-S", f"{IP}:{PORT}", str(tmp_path / "router.php")]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    served = log.read_text()
    why = f"{result.describe()}\nserver:\n{served}"
    assert result["control"].status == 200, why
    refused = {label: result[label].status for label in HONEST if result[label].status != 200}
    assert refused == {}, why
    for path in HONEST.values():
        assert f"served {path}\n" in served, why
    assert result["separator"].status == 400, why
    assert SEPARATOR not in served, why
