"""A method override in the query is decided for the method it names, whatever the
name the server reads it by (a red team found `x-tunneled-method` past the gateway,
session 52).

Plack::Middleware::MethodOverride (Debian's libplack-middleware-methodoverride-perl;
what a Dancer2 or other Plack app enables with `enable 'MethodOverride'`) turns a
POST into the method named by the `x-tunneled-method` query parameter (or the
X-HTTP-Method-Override header), upper-cased, and reads the name after URL-decoding
it (`x%2Dtunneled-method` is the same name); Catalyst's REST::ForBrowsers reads the
same parameter. The gateway read only `_method` in the query: under a rule allowing
GET and POST, `POST /items/1?x-tunneled-method=DELETE` passed and the DELETE handler
ran. It now reads `x-tunneled-method`, `x-http-method-override`, `_HttpMethod`, and
`method` where its value is an HTTP method (request_head._overrides), so the request
is decided for DELETE too and refused (400, ambiguous_method).

Controls: `DELETE` itself (403), the overrides the gateway read before (`_method`,
the header: 400), and honest requests: GET and POST are served, and a POST whose
`method` parameter is an API call's name (`?method=artist.getInfo`), not an HTTP
method, passes.

The origin is a Dancer2 app behind Plack::Middleware::MethodOverride on
HTTP::Server::PSGI in the fake internet; its handlers log what they ran. Both
gateway paths: `door` (the front door) and `engine` (mitmproxy; a websocket rule
sends the profile there).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import door_and_engine, internet_servers

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test
PORT = 8088

RULES = door_and_engine(
    f"""\
      - allow: allowed.test
        id: read-write
        ports: [{PORT}]
        methods: [GET, POST]
        paths: ["/items/**"]
"""
)

APP = r"""
package App; use Dancer2;
set logger => 'null';
my ($ip, $port, $log) = @ARGV;
sub ran {
    my $what = shift;
    my $line = "$what ran for " . request->method . " " . request->path . "\n";
    open(my $f, '>>', $log); print $f $line; close $f;
    $line
}
get '/items/:id' => sub { ran("GET-HANDLER") };
post '/items/:id' => sub { ran("POST-HANDLER") };
del '/items/:id' => sub { ran("DELETE-HANDLER") };
package main;
use Plack::Builder; use Plack::Runner;
my $app = builder { enable 'MethodOverride'; App->to_app };
my $runner = Plack::Runner->new;
$runner->parse_options('--listen', "$ip:$port", '-E', 'deployment');
$runner->run($app);
"""

# POSTs Plack's MethodOverride runs as DELETE: its own parameter, in the spellings
# it reads alike.
TUNNELED = {
    "tunneled": "/items/1?x-tunneled-method=DELETE",
    "tunneled_lower": "/items/2?x-tunneled-method=delete",
    "tunneled_escaped": "/items/3?x%2Dtunneled-method=DELETE",
}


def origin(net, tmp_path: Path):
    probe = ["perl", "-MDancer2", "-MPlack::Middleware::MethodOverride", "-e1"]
    if not shutil.which("perl") or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("needs libdancer2-perl and libplack-middleware-methodoverride-perl")
    app = tmp_path / "app.pl"
    app.write_text(APP)
    log = tmp_path / "dancer.log"
    log.write_text("")
    argv = ["perl", str(app), IP, str(PORT), str(log)]
    return internet_servers(net, [argv], [f"{IP}:{PORT}"]), log


def url(target: str) -> str:
    return f"http://allowed.test:{PORT}{target}"


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_method_tunneled_in_the_query_is_decided_for_that_method(net, tmp_path, profile):
    servers, log = origin(net, tmp_path)
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "honest_get": sandbox.curl(url("/items/1")),
        "honest_post": sandbox.curl("-X", "POST", url("/items/1")),
        "api_method": sandbox.curl("-X", "POST", url("/items/4?method=artist.getInfo")),
        # Controls: DELETE itself, and the overrides the gateway read before.
        "delete": sandbox.curl("-X", "DELETE", url("/items/1")),
        "query_method": sandbox.curl("-X", "POST", url("/items/1?_method=DELETE")),
        "header": sandbox.curl(
            "-X", "POST", "-H", "X-HTTP-Method-Override: DELETE", url("/items/1")
        ),
        **{name: sandbox.curl("-X", "POST", url(t)) for name, t in TUNNELED.items()},
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "GET-HANDLER ran for GET /items/1" in result["honest_get"].out, why
    assert "POST-HANDLER ran for POST /items/1" in result["honest_post"].out, why
    assert "POST-HANDLER ran for POST /items/4" in result["api_method"].out, why
    assert result["delete"].status == 403, why
    for name in ("query_method", "header", *TUNNELED):
        assert result[name].status == 400, (name, why)
    assert result.verdicts(reason="ambiguous_method") == {
        ("deny", "ambiguous_method", "builtin:ambiguous-method")
    }, why
    assert len(result.events(reason="ambiguous_method")) >= 2 + len(TUNNELED), why
    assert "DELETE-HANDLER" not in ran, why
