"""The workspace guard judges a `.git` file or a `commondir` by where git takes it.

git reads the WHOLE pointer file as the path (only trailing newlines and carriage
returns removed: setup.c read_gitfile_gently, get_common_dir_noenv), and the kernel
resolves each link in it before the `..` after it. The guard once read the first line
and normalised it lexically (`os.path.normpath`), so a pointer that "named" a git
directory of its walk took git, on the host, into a repository the task hid below a
git dir's `objects` (which the walk does not enter), whose `core.fsmonitor` the user's
next `git status` ran as the user (red team, sandbox, findings 1a-1c).

Each test: a pointer of one kind planted, the user's `git status` on the host
afterwards runs nothing of the task's (the test's mark file outside the workspace
stays absent) and the pointer is reported; its control, in the same run: the same
config in a repository of the task's own is renamed, and the user's own repository
refuses the task's direct write to its config.
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

# A repository of the task's own, with the same config: renamed (the control).
CONTROL = r"""
git init -q plain && git -C plain config core.fsmonitor "touch $MARK.control; false"
"""
# A complete repository hidden where the walk does not go, its fsmonitor the task's.
HIDE = r"""
hide() {
  git init -q --bare "$1"
  git --git-dir="$1" config core.bare false
  git --git-dir="$1" config core.fsmonitor "touch $MARK; false"
}
"""

# In the user's own repository at the workspace top (pinned, config/hooks read-only).
USERS_REPO = {
    # .git/L -> objects/a/b: L/.. is .git/objects/a; normpath said `.git`
    "commondir-through-a-link": r"""
mkdir -p .git/objects/a/b
hide .git/objects/.git
ln -s objects/a/b .git/L
echo 'L/../../.git' > .git/commondir
""",
    # no link: a second line git takes as part of the path (a directory named ".\n")
    "commondir-of-two-lines": r"""
mkdir -p '.git/.
' .git/objects/x
hide .git/objects/x/r
printf '.\n/../objects/x/r\n' > .git/commondir
""",
    # the link in the work tree, the pointer in .git: ../L/../.git "is" .git
    "commondir-through-a-work-tree-link": r"""
mkdir -p .git/objects/a/b
hide .git/objects/a/.git
ln -s .git/objects/a/b L
echo '../L/../.git' > .git/commondir
""",
}

# A `.git` file in a sub-directory (editors run `git status` in each one they find).
SUB_GITFILE = {
    "gitdir-through-a-link": r"""
mkdir -p decoy/.git sub hidden/.git/objects/a/b
hide hidden/.git/objects/decoy/.git
ln -s ../hidden/.git/objects/a/b sub/L
printf 'gitdir: L/../../decoy/.git\n' > sub/.git
""",
    "gitdir-of-two-lines": r"""
mkdir -p a/.git "a/.git
" a/hidden/.git/objects sub
hide a/hidden/.git/objects/r
printf 'gitdir: ../a/.git\n/../hidden/.git/objects/r\n' > sub/.git
""",
    # a trailing space, which git keeps (only newlines and CRs go): `a/.git ` is a link
    "gitdir-with-a-trailing-space": r"""
mkdir -p a/.git a/hidden/.git/objects sub
hide a/hidden/.git/objects/r
ln -s hidden/.git/objects/r "a/.git "
printf 'gitdir: ../a/.git \n' > sub/.git
""",
}


def _setup(ws):
    def git(*a):
        subprocess.run(
            ["git", *a], cwd=ws, check=True, capture_output=True, env={**ENV, "HOME": str(ws)}
        )

    git("init", "-q")
    (ws / "README").write_text("the user's project\n")
    git("add", "README")
    git("commit", "-q", "-m", "init")


def _status(where):
    return subprocess.run(
        ["git", "status", "--porcelain"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=30,
        env={**ENV, "HOME": str(where.parent)},
    )


def _plant(net, tmp_path, script):
    mark = tmp_path / "host-mark"
    plant = (
        "set -e\n"
        '( git config core.fsmonitor "touch $MARK.refused; false" ) 2>/dev/null'
        " && echo control-written || echo control-refused\n"
        f"{HIDE}{script}{CONTROL}echo planted\n"
    )
    result = sandbox.run(
        net, tmp_path, {"plant": f"MARK={mark} sh -c {shlex.quote(plant)}"}, setup=_setup
    )
    assert result.returncode == 0, result.describe()
    assert result["plant"].out.split() == ["control-refused", "planted"], result.describe()
    ws = result.steps_dir
    reported = result.summary.get("workspace_planted", [])
    # Control: the task's own repository with the same config is renamed, runs nothing.
    assert (ws / "plain/.git/config.sandgate-planted").exists(), reported
    _status(ws / "plain")
    assert not (tmp_path / "host-mark.control").exists()
    assert not (tmp_path / "host-mark.refused").exists()
    return result, mark, reported


@pytest.mark.parametrize("script", list(USERS_REPO.values()), ids=list(USERS_REPO))
def test_a_commondir_in_the_users_repository_runs_nothing_of_the_tasks(net, tmp_path, script):
    result, mark, reported = _plant(net, tmp_path, script)
    ws = result.steps_dir
    status = _status(ws)  # the user, at the top of their own repository
    assert not mark.exists(), (
        f"git status in {ws} ran the task's core.fsmonitor on the host "
        f"(rc={status.returncode} {status.stderr[:200]!r}); guard reported: {reported}"
    )
    assert str(ws / ".git/commondir") in reported, reported
    assert status.returncode == 0, status.stderr  # the user's repository works as before


@pytest.mark.parametrize("script", list(SUB_GITFILE.values()), ids=list(SUB_GITFILE))
def test_a_gitdir_file_runs_nothing_of_the_tasks(net, tmp_path, script):
    result, mark, reported = _plant(net, tmp_path, script)
    ws = result.steps_dir
    status = _status(ws / "sub")
    assert not mark.exists(), (
        f"git status in {ws / 'sub'} ran the task's core.fsmonitor on the host "
        f"(rc={status.returncode} {status.stderr[:200]!r}); guard reported: {reported}"
    )
    assert str(ws / "sub/.git") in reported, reported
