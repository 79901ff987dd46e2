"""A task does not hand the user's repository to every local account.

The task cannot change the user's `.git/config`, `hooks`, `info` (read-only binds), but
the workspace is idmapped to its owner, so `chmod 0777 repo/.git` (or the workspace
root, or a directory a repository's config runs files from) succeeded, and nothing was
reported: after the run any local account (here `nobody`) moved the user's
`.git/hooks` aside, put its own `pre-commit` there, and the user's next `git commit` ran
it as the user (red team, sandbox, finding 5). Now the group and other write bits the
task added are removed after the run, and reported (planting._loosened, disarm).

Control: `nobody` cannot do the same in a repository the task did not touch; a mode
the user had set before the run (a group-writable directory) is left as it was.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

ENV = {
    "PATH": "/usr/bin:/bin",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "u",
    "GIT_AUTHOR_EMAIL": "u@x",
    "GIT_COMMITTER_NAME": "u",
    "GIT_COMMITTER_EMAIL": "u@x",
}


def _setup(ws):
    for name in ("repo", "ctl", "sub/inner"):
        (ws / name).mkdir(parents=True)
        subprocess.run(["git", "init", "-q"], cwd=ws / name, check=True, env={**ENV, "HOME": "/"})
        (ws / name / ".git/hooks").mkdir(exist_ok=True)
    (ws / "shared").mkdir()
    (ws / "shared").chmod(0o775)  # the user's own choice, before the run


# The user's pinned .git, a repository's git dir below a directory, and the root.
PLANT = "chmod 0777 repo/.git sub/inner/.git sub . && chmod 0770 shared && echo done"

NOBODY_PLANTS = """
set -e
cd "$1/.git"
mv hooks hooks.old
mkdir hooks
printf '#!/bin/sh\\ntouch %s\\n' "$2" > hooks/pre-commit
chmod 0755 hooks/pre-commit
"""


def _as_nobody(repo, mark):
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        + ["sh", "-c", NOBODY_PLANTS, "sh", str(repo), str(mark)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_task_does_not_hand_the_users_repository_to_every_local_account(net, tmp_path):
    # The test's tmp dirs must be traversable by `nobody` (a workspace under a home is).
    modes = {}
    for parent in [tmp_path, *tmp_path.parents]:
        if parent == parent.parent or parent == Path("/tmp"):
            break
        modes[parent] = os.stat(parent).st_mode & 0o7777
        os.chmod(parent, modes[parent] | 0o011)
    try:
        _check(net, tmp_path)
    finally:
        for parent, mode in modes.items():
            os.chmod(parent, mode)


def _check(net, tmp_path):
    result = sandbox.run(net, tmp_path, {"plant": PLANT}, setup=_setup)
    ws = result.steps_dir
    assert result.returncode == 0 and result["plant"].out.strip() == "done", result.describe()
    reported = result.summary.get("workspace_planted", [])

    ctl = _as_nobody(ws / "ctl", tmp_path / "mark.control")
    assert ctl.returncode != 0, "control: nobody could write an untouched repository"

    ran = []
    for name in ("repo", "sub/inner"):
        planted = _as_nobody(ws / name, tmp_path / "mark")
        subprocess.run(
            ["git", "commit", "-q", "--allow-empty", "-m", "x"],
            cwd=ws / name,
            capture_output=True,
            env={**ENV, "HOME": str(tmp_path)},
            timeout=30,
        )
        if (tmp_path / "mark").exists():
            ran.append(f"{name} (nobody's rc={planted.returncode})")
            (tmp_path / "mark").unlink()
    assert not ran, (
        f"nobody planted a hook that the user's git commit ran in {ran} "
        f"(mode of repo/.git now {oct(os.stat(ws / 'repo/.git').st_mode & 0o7777)}); "
        f"guard reported: {reported}"
    )
    for path in (ws / "repo/.git", ws / "sub/inner/.git", ws / "sub", ws):
        assert os.stat(path).st_mode & 0o022 == 0, path
        assert str(path) in reported, (path, reported)
    # Control: the user's own group-writable directory keeps what it had (0775 -> 0770
    # by the task: nothing added), and is not reported.
    assert os.stat(ws / "shared").st_mode & 0o7777 == 0o770
    assert str(ws / "shared") not in reported
