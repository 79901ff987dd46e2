"""A path with many readings is decided without stalling the worker: an honest
request from another connection of the same sandbox is answered within 1 s while
four such paths are decided.

A deny path is matched against every reading of the request's path (the printable
escapes decoded, a cut at `%3F`, the folded form, `%2F` read as `/`, behind each
script name, without `@@`, decimal segments read as numbers). When each reading was
built by rewriting the whole path, and the numbers, scripts and views were read
again on every reading, their count multiplied: a 64 KB
`GET /a.php/b.php/1./1./...` (21 000 segments `1.`, with `%40 %C3%84 %2F @@ %3F` at
its end so that every reading differs) had 144 readings and about 3M float()
calls, some 3 s of the gateway's event loop, and an honest `GET /public/ok` waited
5 to 10 s. Numbers, scripts and views are now read on the base readings only (a
segment's text once), and a path whose readings pass 1 MiB in all is refused
(`ambiguous_path`) once they do, as this one is. Found by a red team (session 52).

Origin: PHP's built-in server, plain HTTP in the fake internet; both gateway paths.
Control: the deny still refuses `/projects/42`.
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
        id: site
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
      - deny: allowed.test
        id: no-project-42
        ports: [{PORT}]
        paths: ["/projects/42/**"]
"""
)

ROUTER = r"""<?php
$body = "served " . substr($_SERVER['REQUEST_URI'], 0, 40) . "\n";
header("Content-Length: " . strlen($body));
echo $body;
"""

# Every reading distinct: a printable escape, a non-ASCII upper-case letter (folded),
# an escaped '/', a view name, a cut, two script names; and 21 000 decimal segments.
TAIL = "/%40%C3%84%2Fq/@@c%3Fz"
SEGMENTS = (64000 - 40) // 3


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_path_of_many_readings_does_not_stall_other_requests(net, tmp_path, profile):
    php = shutil.which("php")
    if not php:
        pytest.skip("needs php-cli (scripts/install.sh --test)")
    (tmp_path / "router.php").write_text(ROUTER)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = f"http://allowed.test:{PORT}"
    # Built in the sandbox's shell: three 64 KB URLs are over one argument's limit.
    build = f"P=$(printf '/1.%.0s' $(seq {SEGMENTS}))"
    long_url = f"'{url}/a.php/b.php'\"$P\"'{TAIL}'"
    # Four connections, each sending it four times in turn: the honest request goes
    # while they are being decided (now refused in ~0.04 s of the loop each; 3 s to
    # decide before).
    one = f"curl -s -o /dev/null --max-time 60 {long_url}"
    background = " ; ".join(f"( for i in 1 2 3 4; do {one}; done & )" for _ in range(4))
    steps = {
        "before": sandbox.curl(f"{url}/public/ok"),
        "control": sandbox.curl(f"{url}/projects/42"),  # the deny holds
        "long": f"{build} ; {background} ; sleep 0.3",
        # Answered within 1 s, DNS lookup included (30 s curl timeout to measure it).
        "during": sandbox.curl(f"{url}/public/ok", timeout=30),
    }
    argv = [php, "-S", f"{IP}:{PORT}", str(tmp_path / "router.php")]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    why = result.describe()
    assert result["before"].status == 200, why
    assert result["before"].ms < 1000, (result["before"].ms, why)
    assert result["control"].status == 403, why
    assert result["during"].status == 200, why
    assert result["during"].ms < 1000, (result["during"].ms, why)
