"""A deny of one npm package whose name has a `.` (`/lodash.merge/**`) refuses that
package and not the package named by the part before the dot: `npm view lodash` and
`npm install lodash` work.

A deny glob's last segment is also read by its stem, without its extensions, for
servers that serve `secret.git` as `secret` (git, MultiViews, Rails formats). On npm
a `.` is part of a name: `lodash.merge`, `socket.io`, `chart.js` are packages of
their own, next to `lodash`, `socket`, `chart`. When any `.suffix` counted as an
extension, the deny of one micro-package (a common audit action) took `lodash`, its
tarballs and every `lodash.*` package (npm E403). The stem now drops only known
extensions (`git`, archive, data and script formats). Found by a red team
(session 52).

Controls: `lodash.merge` itself is refused (E403), an unrelated package is read. The
registry: a logging server in the fake internet (the one of
tests/e2e/test_npm_scoped_packages.py), real npm in the sandbox; both gateway paths.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import test_npm_scoped_packages as scoped
from support import sandbox
from support.servers import run_beside

pytestmark = pytest.mark.e2e

IP, PORT = scoped.IP, scoped.PORT
REGISTRY = scoped.REGISTRY
SERVER = scoped.SERVER.replace(
    '{"@corp/public": "PUBLIC-SCOPED", "@corp/secret": "SECRET-SCOPED",\n'
    '                "plainpkg": "PLAIN-PACKAGE"}',
    '{"lodash": "LODASH-DOC", "lodash.merge": "LODASH-MERGE-DOC", "plainpkg": "PLAIN-PACKAGE"}',
)
assert SERVER != scoped.SERVER


def packed(tmp_path) -> str:
    package = tmp_path / "package"
    package.mkdir()
    manifest = {"name": "lodash", "version": "1.0.0", "main": "index.js"}
    (package / "package.json").write_text(json.dumps(manifest))
    (package / "index.js").write_text('module.exports = "LODASH-CODE";\n')
    npm = ["npm", "pack", "--silent", "--cache", str(tmp_path / ".npm-cache")]
    npm += ["--pack-destination", str(tmp_path)]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(npm, cwd=package, env=env, check=True, capture_output=True)
    return str(tmp_path / "lodash-1.0.0.tgz")


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_deny_of_one_dotted_package_does_not_take_its_stem(net, tmp_path, profile):
    log = tmp_path / "registry.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(scoped.rules_text("/lodash.merge/**"))
    tarball = packed(tmp_path)
    steps = {
        "plain": scoped.view("plainpkg"),
        "control": scoped.view("lodash.merge"),
        "view": scoped.view("lodash"),
        "install": scoped.install("lodash", "app"),
    }
    argv = [sandbox.PYTHON, "-I", "-S", "-c", SERVER, IP, str(PORT), str(log), tarball]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    seen = log.read_text()
    why = f"{result.describe()}\nregistry:\n{seen}"
    assert "PLAIN-PACKAGE" in result["plain"].out, why
    assert result["control"].rc != 0 and "E403" in result["control"].err, why
    assert "LODASH-DOC" in result["view"].out, why
    assert "LODASH-CODE" in result["install"].out, why
