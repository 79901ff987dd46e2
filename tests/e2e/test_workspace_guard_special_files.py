"""The workspace guard and special files: a FIFO, socket or device node the task
leaves where the user's git opens it is renamed aside and reported.

A FIFO in place of a file git opens (`.git/HEAD`, `.git/index`, `packed-refs`, a
ref, a loose object, a nested new repository's `HEAD`, `.gitignore`) would make the
user's next `git status` (or a git-aware shell prompt, an editor's git integration)
on the host block for good in its open: nobody will ever write it. A red team found
it (session 51): nothing was reported, and git hung after the run.

Control: an honest run leaves a repository whose `git status` answers at once.
"""

from __future__ import annotations

import json
import stat
import subprocess

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "u",
    "GIT_AUTHOR_EMAIL": "u@x",
    "GIT_COMMITTER_NAME": "u",
    "GIT_COMMITTER_EMAIL": "u@x",
}


def _setup(ws):
    (ws / "repo").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws / "repo", check=True, env=ENV)
    (ws / "repo/a.txt").write_text("a\n")
    subprocess.run(["git", "add", "a.txt"], cwd=ws / "repo", check=True, env=ENV)
    subprocess.run(["git", "commit", "-qm", "a"], cwd=ws / "repo", check=True, env=ENV)


def _host_git_status(repo, timeout=8.0):
    """The user's `git status` on the host, after the run: None when it hung."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=repo,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    return done


TRICKS = {
    "head": "rm .git/HEAD && mkfifo .git/HEAD",
    "index": "rm .git/index && mkfifo .git/index",
    "packed_refs": "mkfifo .git/packed-refs",
    "loose_object": "f=$(ls .git/objects/??/* | head -n1) && rm -f $f && mkfifo $f",
    "alternates": "mkfifo .git/objects/info/alternates",
    "nested_new_repo": "git init -q inner && rm inner/.git/HEAD && mkfifo inner/.git/HEAD",
    "work_tree_gitignore": "mkfifo .gitignore",
    "work_tree_gitattributes": "mkfifo .gitattributes",
}


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_a_fifo_left_in_a_repository_does_not_hang_the_users_git(net, tmp_path, trick):
    result = sandbox.run(
        net, tmp_path, {"plant": f"cd repo && {TRICKS[trick]} && echo done"}, setup=_setup
    )
    assert result["plant"].out.strip() == "done", result.describe()
    repo = result.steps_dir / "repo"
    fifos = [
        p
        for p in repo.rglob("*")
        if stat.S_ISFIFO(p.lstat().st_mode) and ".sandgate-planted" not in p.name
    ]
    summary = json.loads((result.steps_dir.parent / "summary.json").read_text())
    status = _host_git_status(repo)
    assert status is not None, (
        f"the user's git status on the host hung on {fifos} after the run; "
        f"planted: {summary.get('workspace_planted')}"
    )
    assert fifos == [], fifos  # each renamed aside: NAME.sandgate-planted
    events = result.events(reason="workspace_planted")
    assert events, result.describe()
    for event in events:
        assert "special file (a FIFO)" in event["detail"], event
        assert "renamed to" in event["detail"], event


def test_control_an_honest_run_leaves_a_repository_git_answers(net, tmp_path):
    result = sandbox.run(
        net, tmp_path, {"work": "cd repo && echo b > b.txt && echo done"}, setup=_setup
    )
    assert result["work"].out.strip() == "done", result.describe()
    status = _host_git_status(result.steps_dir / "repo")
    assert status is not None and status.returncode == 0, status
    assert "b.txt" in status.stdout
    assert not result.events(reason="workspace_planted"), result.describe()
