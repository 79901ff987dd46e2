"""npm reads and installs a scoped package through an inspected registry rule, and a
deny of a scoped package holds in every spelling of its name, whether the deny is
written with its `/` (`/@corp/secret/**`) or escaped as npm logs it
(`/@corp%2Fsecret/**`).

npm asks a registry for a scoped package's document as `GET /@scope%2fname`
(npm-package-arg's `escapedName`: the `/` escaped, lower-case `%2f`), on
registry.npmjs.org, Verdaccio, Artifactory and Nexus alike, and for its tarball as
`/@scope/name/-/name-1.0.0.tgz`. The gateway refused every path holding `%2F`
(`ambiguous_path`, 400), so under the shipped `package-registries` preset no scoped
package (`@types/node`, `@babel/core`, ...) installed: npm said `E400` (a red team
found it, session 52). An escaped `/` is now decided in both readings, as part of a
name and as a segment break (names.path_readings): a deny takes the request if
either reading matches, an allow only if both do; request_head still refuses a `%2F`
that would make an empty or dot segment. A glob written with `%2F` matches the split
form too, so the deny written as npm logs the name also takes the tarball's path.

The registry is a small logging server in the fake internet that answers both
spellings with the package's document and any `.tgz` with a tarball made by `npm
pack`. Both gateway paths: `door` (the front door) and `engine` (mitmproxy; a
`websocket: true` rule sends the profile's plain HTTP there).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from support import sandbox
from support.servers import run_beside

pytestmark = pytest.mark.e2e

IP, PORT = "203.0.113.10", 8090
REGISTRY = f"http://allowed.test:{PORT}/"

SERVER = r"""
import base64, hashlib, http.server, json, sys, urllib.parse
ip, port, log_path, tarball_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
log = open(log_path, "a", buffering=1)
tarball = open(tarball_path, "rb").read()
integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()

def packument(name, mark):
    short = name.rsplit("/", 1)[-1]
    dist = {"tarball": f"http://allowed.test:{port}/{name}/-/{short}-1.0.0.tgz",
            "shasum": hashlib.sha1(tarball).hexdigest(), "integrity": integrity}
    return {"name": name, "dist-tags": {"latest": "1.0.0"}, "description": mark,
            "versions": {"1.0.0": {"name": name, "version": "1.0.0", "description": mark,
                                   "dist": dist}}}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/")
        docs = {"@corp/public": "PUBLIC-SCOPED", "@corp/secret": "SECRET-SCOPED",
                "plainpkg": "PLAIN-PACKAGE"}
        if name.endswith(".tgz"):
            body, kind = tarball, "application/octet-stream"
        elif name in docs:
            body, kind = json.dumps(packument(name, docs[name])).encode(), "application/json"
        else:
            body, kind = None, None
        self.send_response(200 if body else 404)
        body = body or b"{}"
        self.send_header("Content-Type", kind or "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        log.write(f"{self.command} {self.path} {int(code)}\n")

server = http.server.ThreadingHTTPServer((ip, port), Handler)
server.serve_forever()
"""

PROFILE = """\
  {profile}:
    fallback: deny
    rules:
      - allow: allowed.test
        id: {profile}-registry
        ports: [{port}]
        methods: [GET, HEAD]{websocket}
      - deny: allowed.test
        id: {profile}-no-corp-secret
        ports: [{port}]
        paths: ["{denied}"]
"""

NPM = "HOME=$PWD npm --no-update-notifier --cache $PWD/.npm-cache --fetch-retries 0"


def rules_text(denied: str) -> str:
    """Allow the registry (GET, HEAD), deny `denied`: as the profiles `door` and
    `engine` (its `websocket: true` sends plain HTTP through mitmproxy)."""
    door = PROFILE.format(profile="door", port=PORT, websocket="", denied=denied)
    websocket = "\n        websocket: true"
    engine = PROFILE.format(profile="engine", port=PORT, websocket=websocket, denied=denied)
    return "version: 1\nprofiles:\n" + door + engine


def view(name: str) -> str:
    return f"{NPM} view {name} description --registry {REGISTRY}"


def install(name: str, into: str) -> str:
    """npm install of `name` into the folder `into`, then its code printed."""
    npm = f"{NPM} install --no-audit --no-fund --registry {REGISTRY} --prefix {into}"
    return f"mkdir {into} && {npm} {name} && cat {into}/node_modules/{name}/index.js"


def packed(tmp_path) -> str:
    """A real npm tarball of `@corp/public` 1.0.0 (`npm pack`), whose code says
    PUBLIC-SCOPED-CODE: its path."""
    package = tmp_path / "package"
    package.mkdir()
    manifest = {"name": "@corp/public", "version": "1.0.0", "main": "index.js"}
    (package / "package.json").write_text(json.dumps(manifest))
    (package / "index.js").write_text('module.exports = "PUBLIC-SCOPED-CODE";\n')
    npm = ["npm", "pack", "--silent", "--cache", str(tmp_path / ".npm-cache")]
    npm += ["--pack-destination", str(tmp_path)]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(npm, cwd=package, env=env, check=True, capture_output=True)
    return str(tmp_path / "corp-public-1.0.0.tgz")


@pytest.mark.parametrize("profile", ["door", "engine"])
@pytest.mark.parametrize(
    "denied",
    [
        pytest.param("/@corp/secret/**", id="deny_with_slash"),
        pytest.param("/@corp%2Fsecret/**", id="deny_as_npm_logs_it"),
    ],
)
def test_scoped_packages_are_read_and_a_denied_one_is_not(net, tmp_path, denied, profile):
    log = tmp_path / "registry.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(denied))
    tarball = packed(tmp_path)
    secret_tarball = "@corp/secret/-/secret-1.0.0.tgz"
    steps = {
        "plain": view("plainpkg"),
        # The scoped package the rules allow: npm's own requests, `GET /@corp%2fpublic`
        # then the tarball `/@corp/public/-/public-1.0.0.tgz`.
        "scoped": view("@corp/public"),
        "install": install("@corp/public", "app"),
        "secret": view("@corp/secret"),
        "secret_install": install("@corp/secret", "app2"),
        "secret_upper_escape": sandbox.curl(f"{REGISTRY}@corp%2Fsecret"),
        "secret_lower_escape": sandbox.curl(f"{REGISTRY}@corp%2fsecret"),
        "secret_slash": sandbox.curl(f"{REGISTRY}@corp/secret"),
        "secret_at_escape": sandbox.curl(f"{REGISTRY}%40corp%2fsecret"),
        "secret_tarball": sandbox.curl(f"{REGISTRY}{secret_tarball}"),
        "secret_tarball_escaped": sandbox.curl(
            f"{REGISTRY}{secret_tarball.replace('/', '%2f', 1)}"
        ),
    }
    argv = [sandbox.PYTHON, "-I", "-S", "-c", SERVER, IP, str(PORT), str(log), tarball]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    seen = log.read_text()
    why = f"{result.describe()}\nregistry:\n{seen}"
    assert "PLAIN-PACKAGE" in result["plain"].out, why
    assert "PUBLIC-SCOPED" in result["scoped"].out, why
    assert "PUBLIC-SCOPED-CODE" in result["install"].out, why
    # npm's own spellings reached the registry: the escaped name (the gateway passes
    # escapes on in upper case), then the tarball.
    assert "GET /@corp%2Fpublic 200" in seen, why
    assert "GET /@corp/public/-/public-1.0.0.tgz 200" in seen, why
    # The denied package: npm is told 403 (no E400), and every spelling is refused.
    for label in ("secret", "secret_install"):
        assert result[label].rc != 0 and "E403" in result[label].err, (label, why)
    escapes = ("secret_upper_escape", "secret_lower_escape", "secret_at_escape")
    for label in (*escapes, "secret_slash", "secret_tarball", "secret_tarball_escaped"):
        assert result[label].status == 403, (label, why)
    assert result.verdicts(reason="rule_deny") == {
        ("deny", "rule_deny", f"{profile}-no-corp-secret")
    }, why
    assert "secret" not in seen.lower(), why
