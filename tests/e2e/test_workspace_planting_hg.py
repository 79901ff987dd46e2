"""Mercurial repositories in the workspace guard (planting.py, hgrc.py).

`hg` runs what a repository's `.hg/hgrc` names (`[hooks] pre-status = CMD` on the
next `hg status` of a shell prompt or an editor, `[extensions]`, `%include` of
more) and trusts the file when the user running it owns it, which a file the task
writes through the idmapped workspace is. The guard knew only git: a task's hgrc
stayed as it was. Now a new or changed `hgrc`/`hgrc-not-shared` is judged (only
`[paths]` and `[ui] username`, what `hg clone` writes, are harmless), a new
`sharedpath` or a `.hg` that is a link is planted, and each goes aside.

With `hg` installed on the host the test also runs it there, as the user would, and
looks for the canary the hook would make.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

CLONE_HGRC = """\
# example repository config (see 'hg help config' for more info)
[paths]
default = https://hg.example.test/repo

# path aliases to other clones of this repo in URLs or filesystem paths
#
# default:pushurl = ssh://jdoe@example.net/hg/jdoes-fork

[ui]
# username = Jane Doe <jdoe@example.com>
username = Task <task@example.test>
"""


def _repo(name: str, hgrc: str | None, extra: str = "") -> str:
    """Shell, in the workspace: a Mercurial repository as `hg init` makes one."""
    make = f"mkdir -p {name}/.hg/store && printf 'store\\n' > {name}/.hg/requires"
    if hgrc is not None:
        make += f" && printf '%s' {_quote(hgrc)} > {name}/.hg/hgrc"
    return make + (f" && {extra}" if extra else "")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _host_hg(repo: Path) -> None:
    hg = shutil.which("hg")
    if hg is not None:
        env = {**os.environ, "HGUSER": "host", "HGRCPATH": ""}
        subprocess.run([hg, "status"], cwd=repo, env=env, capture_output=True, timeout=60)


def test_a_planted_hgrc_goes_aside_and_a_cloned_one_stays(net, tmp_path):
    canary = Path(f"/tmp/test_workspace_planting_hg-{secrets.token_hex(3)}")
    hook = f"[hooks]\npre-status = touch {canary}\n"
    steps = {
        "hook": _repo("hook", hook),
        "ext": _repo("ext", f"[extensions]\nevil = {canary}.py\n"),
        "include": _repo("include", "[paths]\ndefault = x\n%include ../../evil.rc\n"),
        # A form feed ends no line to hg: `[paths]` after it is in the comment.
        "ff": _repo("ff", f"[paths]\n#c\f[paths]\n[hooks]\npre-status = touch {canary}\n"),
        "notshared": _repo("notshared", None, f"printf '{hook}' > notshared/.hg/hgrc-not-shared"),
        "shared": _repo("shared", None, "printf '/elsewhere/.hg' > shared/.hg/sharedpath"),
        "link": "mkdir -p elsewhere/.hg linked && ln -s ../elsewhere/.hg linked/.hg",
        "clone": _repo("clone", CLONE_HGRC),
    }
    try:
        result = sandbox.run(net, tmp_path, steps)
        assert result.returncode == 0, result.describe()
        assert all(step.rc == 0 for step in result.steps.values()), result.describe()
        ws = result.steps_dir
        planted = set(result.summary["workspace_planted"])
        expected = {
            ws / "hook/.hg/hgrc",
            ws / "ext/.hg/hgrc",
            ws / "include/.hg/hgrc",
            ws / "ff/.hg/hgrc",
            ws / "notshared/.hg/hgrc-not-shared",
            ws / "shared/.hg/sharedpath",
            ws / "linked/.hg",
        }
        assert planted == {str(p) for p in expected}, result.summary
        for path in expected:
            assert not os.path.lexists(path), path
            assert os.path.lexists(f"{path}.sandgate-planted"), path
        assert (ws / "clone/.hg/hgrc").read_text() == CLONE_HGRC  # data only: kept
        [event] = [
            e for e in result.events(reason="workspace_planted") if "hook/.hg/hgrc" in e["detail"]
        ]
        assert "Mercurial config that runs code: hooks.pre-status" in event["detail"], event
        for repo in ("hook", "ff", "notshared", "clone"):
            _host_hg(ws / repo)
        assert not canary.exists()
    finally:
        canary.unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("hg") is None, reason="needs Mercurial on the host")
def test_without_the_guard_the_hgrc_hook_runs_on_the_host(net, tmp_path):
    canary = Path(f"/tmp/test_workspace_planting_hg-{secrets.token_hex(3)}")
    steps = {"hook": _repo("hook", f"[hooks]\npre-status = touch {canary}\n")}
    try:
        result = sandbox.run(net, tmp_path, steps, extra=("--no-workspace-guard",))
        assert result.returncode == 0, result.describe()
        _host_hg(result.steps_dir / "hook")
        assert canary.exists()
    finally:
        canary.unlink(missing_ok=True)
