"""Method overrides in the spellings PHP reads (proxy/policy/request_head.py
`_overrides`, `_read_as`), against PHP's own server running Symfony's
`Request::getMethod()` logic (Laravel's too): a POST with an override runs as the
method it names.

PHP files a query parameter under a mangled name (leading spaces dropped, ' ' and
'.' turned into '_'): `?.method=DELETE` is its `_method`. Its CGI-style header map
files `X_HTTP_METHOD_OVERRIDE` and `X.HTTP.Method.Override` under the same key as
`X-HTTP-Method-Override` (HTTP_X_HTTP_METHOD_OVERRIDE). The gateway allowed those
as plain POSTs while the server ran DELETE; each is refused now as the plain
spellings are (`ambiguous_method`, 400), and the server runs nothing but what was
decided.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from support import sandbox
from support.sandbox import eventually

pytestmark = pytest.mark.e2e

PORT = 8088  # on allowed.test's address
RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: api-read-and-create
        ports: [{PORT}]
        methods: [GET, POST]
        paths: ["/api/**"]
"""

# Symfony HttpFoundation's Request::getMethod() (5-7) on PHP's superglobals: the
# override header, then the body's and the query's `_method`; it logs what it runs.
ROUTER = r"""<?php
$real = strtoupper($_SERVER['REQUEST_METHOD']);
$method = $real;
if ($real === 'POST') {
    $o = $_SERVER['HTTP_X_HTTP_METHOD_OVERRIDE'] ?? null;
    if (!$o) { $o = $_POST['_method'] ?? ($_GET['_method'] ?? 'POST'); }
    if (is_string($o)) { $method = strtoupper($o); }
}
file_put_contents(getenv('SERVED_LOG'), json_encode(['real' => $real, 'runs' => $method,
    'uri' => $_SERVER['REQUEST_URI']]) . "\n", FILE_APPEND);
echo "runs $method\n";
"""

URL = f"http://allowed.test:{PORT}/api/items/1"
# label -> (curl's arguments after `-X POST -d a=1`, the URL's query)
OVERRIDES = {
    "header": (["-H", "X-HTTP-Method-Override: DELETE"], ""),
    "header_underscores": (["-H", "X_HTTP_METHOD_OVERRIDE: DELETE"], ""),
    "header_dots": (["-H", "X.HTTP.Method.Override: DELETE"], ""),
    "header_mixed": (["-H", "x_http.method-override: DELETE"], ""),
    "query": ([], "?_method=DELETE"),
    "query_dot": ([], "?.method=DELETE"),
    "query_space_dot": ([], "?%20.method=DELETE"),
    "query_spaces": ([], "?%20%20_method=DELETE"),
    "query_plus_dot": ([], "?a=1&+.method=DELETE"),
    "query_array": (["-g"], "?_method[]=DELETE"),
    "query_nul": ([], "?_method%00x=DELETE"),
}


def test_every_spelling_php_reads_as_an_override_is_refused(net, tmp_path):
    php = shutil.which("php")
    assert php, "php-cli is installed by scripts/install.sh --test"
    (tmp_path / "router.php").write_text(ROUTER)
    log = tmp_path / "served.jsonl"
    log.touch()
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.internet_ns, "env", f"SERVED_LOG={log}",
         php, "-S", f"203.0.113.10:{PORT}", str(tmp_path / "router.php")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        up = ["ip", "netns", "exec", net.internet_ns, "curl", "-s", "-o", "/dev/null",
              f"http://203.0.113.10:{PORT}/api/ready"]  # fmt: skip
        assert eventually(lambda: subprocess.run(up).returncode == 0, timeout=10)
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        steps = {"post": sandbox.curl("-X", "POST", "-d", "a=1", URL)}
        for label, (args, query) in OVERRIDES.items():
            steps[label] = sandbox.curl(*args, "-X", "POST", "-d", "a=1", URL + query)
        result = sandbox.run(net, tmp_path, steps, rules=rules)
    finally:
        server.kill()
        server.wait()
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    # The server ran the one honest POST (and the readiness GET), never a DELETE.
    assert [(r["real"], r["runs"]) for r in runs] == [("GET", "GET"), ("POST", "POST")], runs
    assert result["post"].status == 200, result.describe()
    refused = {label: result[label].status for label in OVERRIDES}
    assert refused == dict.fromkeys(OVERRIDES, 400), result.describe()
    denied = result.events(kind="request", verdict="deny")
    assert {e["reason"] for e in denied} == {"ambiguous_method"}, result.describe()
    assert len(denied) == len(OVERRIDES), result.describe()
