"""The github preset's push deny (`preset:github-no-push`) refuses a push, not reads
of files named after the command.

A deny takes any suffix after a `.` (session 51) and reads each ASCII punctuation
character of its glob as any of them (session 52). So under the `github` profile every
GET of a page or file named `git-receive-pack.<ext>` or `git_receive_pack.<ext>`
anywhere in a repository was refused (rule_deny):
`/git/git/blob/master/Documentation/git-receive-pack.adoc` (git's own manual page),
`/<owner>/git-http-backend/blob/main/src/actix/git_receive_pack.rs` (a Rust crate's
source), `.../git_receive_pack.cs` (a red team found it, session 53). The deny exists
for the smart-HTTP push, a POST to `.../git-receive-pack`: it now names that method.

The test takes the deny's paths and methods from the shipped preset and puts them on
allowed.test (an origin in the fake internet: Python's static file server), with an
allow of GET, HEAD and POST, so that the push (the control, a POST) is refused by
that deny alone. Both gateway paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from support import sandbox
from support.servers import door_and_engine, run_beside

pytestmark = pytest.mark.e2e

IP, PORT = "203.0.113.10", 8088
ROOT = Path(__file__).parents[2]
STATIC = ROOT / "tests" / "e2e" / "web_routers" / "static_backend.py"

HONEST = {
    "manual": "/git/git/blob/master/Documentation/git-receive-pack.adoc",
    "rust_source": "/byron/git-http-backend/blob/main/src/actix/git_receive_pack.rs",
    "csharp_source": "/mtb/adhoc/blob/main/git/git_receive_pack.cs",
}


def _push_deny() -> dict:
    preset = yaml.safe_load((ROOT / "rules" / "presets" / "github.yaml").read_text())
    return next(r for r in preset["rules"] if r.get("id") == "preset:github-no-push")


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_the_push_deny_does_not_refuse_reading_files_named_after_the_command(
    net, tmp_path, profile
):
    deny = _push_deny()
    methods = f"\n  methods: {deny['methods']}" if deny.get("methods") else ""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        door_and_engine(
            f"""\
- allow: allowed.test
  id: site
  ports: [{PORT}]
  methods: [GET, HEAD, POST]
- deny: allowed.test
  id: no-push
  ports: [{PORT}]
  paths: {list(deny["paths"])!r}{methods}
""".replace("'", '"')
        )
    )
    root = tmp_path / "site"
    for path in HONEST.values():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(f"HONEST FILE {path}\n")
    log = tmp_path / "static.log"
    log.write_text("")
    base = f"http://allowed.test:{PORT}"
    steps = {label: sandbox.curl(f"{base}{path}") for label, path in HONEST.items()}
    steps["push"] = sandbox.curl(
        "-X", "POST", "--data", "x", f"{base}/org/repo.git/git-receive-pack"
    )
    argv = [sys.executable, str(STATIC), IP, str(PORT), str(root), str(log)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    why = f"{result.describe()}\nserver:\n{log.read_text()}"
    assert result["push"].status == 403, why
    refused = [label for label in HONEST if "HONEST FILE" not in result[label].out]
    assert not refused, f"honest reads refused: {refused}\n{why}"
