"""A `.git` file (or a hand-made worktree git dir) that makes a task's directory the
work tree of the user's repository.

A `gitdir:` file does not only choose the git directory: its own directory becomes the
work tree, and every path the repository's config names relative to the work tree
(husky's `core.hooksPath = .husky/_`, `core.fsmonitor = ./x`, a filter `./tools/...`)
then lies among the task's files. The guard keeps `.husky/_` read-only at the
repository's top, but judged a `.git` file harmless whenever it pointed at a git
directory of its walk: `sub/.git` = `gitdir: ../.git` with the task's
`sub/.husky/_/pre-commit` made the user's next `git commit` in `sub/` run the task's
hook on the host (red team, sandbox, finding 2).

Now a `.git` file is harmless only in a relation git makes (a linked worktree whose git
dir names it back, a submodule's), and only when the move names no work-tree file of
the task's; a `commondir` only in a worktree git dir below `<common>/worktrees/`.
Controls: the task's direct write to the guarded `.husky/_/pre-commit` is refused, and a
`git worktree add` of a repository whose config names no work-tree file is left working.
"""

from __future__ import annotations

import shlex
import subprocess

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


def _git(ws, *a):
    subprocess.run(
        ["git", *a], cwd=ws, check=True, capture_output=True, env={**ENV, "HOME": str(ws)}
    )


def _setup(ws):
    """husky 9: core.hooksPath = .husky/_ (guarded), and a plain repository beside."""
    _git(ws, "init", "-q", "-b", "main")
    (ws / ".husky/_").mkdir(parents=True)
    hook = ws / ".husky/_/pre-commit"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    _git(ws, "config", "core.hooksPath", ".husky/_")
    _git(ws, "add", ".husky")
    _git(ws, "commit", "-q", "-m", "init")
    (ws / "plain").mkdir()
    _git(ws / "plain", "init", "-q", "-b", "main")
    (ws / "plain/f").write_text("f\n")
    _git(ws / "plain", "add", "f")
    _git(ws / "plain", "commit", "-q", "-m", "init")


HOOK = r"""
mkdir -p sub/.husky/_
printf '#!/bin/sh\ntouch %s\n' "$MARK" > sub/.husky/_/pre-commit
chmod +x sub/.husky/_/pre-commit
"""
MOVES = {
    # the user's own .git, with sub/ as its work tree
    "gitdir-file-to-the-main-git-dir": "printf 'gitdir: ../.git\\n' > sub/.git",
    # a hand-made worktree git dir named .git in sub/: HEAD and commondir
    "worktree-git-dir-made-by-hand": (
        "mkdir sub/.git && git rev-parse HEAD > sub/.git/HEAD && "
        "echo ../../.git > sub/.git/commondir"
    ),
    # a real `git worktree add` of a repository whose hooks are work-tree files
    "git-worktree-add": (
        "mv sub/.husky sub-husky && git worktree add -q --detach sub && "
        "rm -rf sub/.husky && mv sub-husky sub/.husky"
    ),
}


def _commit(where):
    return subprocess.run(
        ["git", "commit", "--allow-empty", "-q", "-m", "the user's next commit"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=30,
        env={**ENV, "HOME": str(where.parent)},
    )


@pytest.mark.parametrize("move", list(MOVES.values()), ids=list(MOVES))
def test_a_pointer_does_not_move_a_guarded_hooks_path_into_the_tasks_files(net, tmp_path, move):
    mark = tmp_path / "host-mark"
    plant = (
        "set -e\n"
        "( printf '#!/bin/sh\\ntouch %s.control\\n' \"$MARK\" > .husky/_/pre-commit ) "
        "2>/dev/null && echo control-written || echo control-refused\n"
        f"{HOOK}{move}\n"
        # control: a worktree of a repository whose config names no work-tree file
        "git -C plain worktree add -q --detach ../plain-tree\n"
        "echo planted\n"
    )
    result = sandbox.run(
        net, tmp_path, {"plant": f"MARK={mark} sh -c {shlex.quote(plant)}"}, setup=_setup
    )
    ws = result.steps_dir
    assert result.returncode == 0, result.describe()
    assert result["plant"].out.split() == ["control-refused", "planted"], result.describe()
    reported = result.summary.get("workspace_planted", [])

    commit = _commit(ws / "sub")
    assert not (tmp_path / "host-mark.control").exists()
    assert not mark.exists(), (
        f"git commit in {ws / 'sub'} ran the task's sub/.husky/_/pre-commit on the host "
        f"(rc={commit.returncode} {commit.stderr[:200]!r}); guard reported: {reported}"
    )
    assert any(path.startswith(str(ws / "sub/.git")) for path in reported), reported
    # Control: the plain repository's new worktree is not touched and works.
    assert not any("plain" in path for path in reported), reported
    assert _commit(ws / "plain-tree").returncode == 0
