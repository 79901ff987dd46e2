"""A rebase or cherry-pick the task left stopped runs no program of the task's when the
user continues it on the host.

`--continue` runs the todo list's `exec` lines (always guarded), and also the merge
strategy git reads from the stopped state, as `git merge-<strategy>`: git checks no
name, and one with a `/` runs as a path in the work tree (`../x` runs
`./git-merge-../x`). A rebase keeps it in `rebase-merge/strategy`, a cherry-pick or
revert in `sequencer/opts` (`options.strategy`, git-config syntax). The guard read only
the todo list: the user's `git rebase --continue` / `git cherry-pick --continue` ran
the task's program (red team, sandbox, finding 3). Now a strategy that is not one of
git's own is planted (the file renamed aside: git goes on with its default).

Controls in the same run: a todo list with an `exec` line is renamed and runs nothing,
and a stopped rebase whose `strategy` is `ort` (what `git rebase -s ort` writes) is
left alone and continues.
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


def _repo(path):
    """main: a, c, f=3; side (from a): b, f=2 (conflicts with main), g."""
    path.mkdir()

    def git(*a):
        subprocess.run(
            ["git", *a], cwd=path, check=True, capture_output=True, env={**ENV, "HOME": str(path)}
        )

    git("init", "-q", "-b", "main")
    (path / "a").write_text("a")
    (path / "f").write_text("1\n")
    git("add", "a", "f")
    git("commit", "-q", "-m", "a")
    git("checkout", "-q", "-b", "side")
    (path / "b").write_text("b")
    git("add", "b")
    git("commit", "-q", "-m", "b")
    (path / "f").write_text("2\n")
    git("commit", "-q", "-am", "f2")
    (path / "g").write_text("g")
    git("add", "g")
    git("commit", "-q", "-m", "g")
    git("checkout", "-q", "main")
    (path / "c").write_text("c")
    git("add", "c")
    (path / "f").write_text("3\n")
    git("commit", "-q", "-am", "c")


def _setup(ws):
    for name in ("rebase", "ctl", "ort", "pick"):
        _repo(ws / name)


PROGRAM = r"""
program() {
  mkdir -p "$1/git-merge-.."
  printf '#!/bin/sh\ntouch %s\nexit 2\n' "$MARK.$1" > "$1/git-merge-../x"
  chmod +x "$1/git-merge-../x"
}
"""

PLANT = (
    "set -e\n"
    "export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@x GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@x\n"
    f"{PROGRAM}"
    # three rebases of side onto main, stopped at once by a `break`
    "for r in rebase ctl ort; do\n"
    "  ( cd $r && git checkout -q side && GIT_SEQUENCE_EDITOR=\"sed -i '1i break'\" "
    "git rebase -q -i main >/dev/null 2>&1 || true )\n"
    "  test -d $r/.git/rebase-merge\n"
    "done\n"
    "program rebase && echo ../x > rebase/.git/rebase-merge/strategy\n"
    "printf 'exec touch %s.control\\n' \"$MARK\" >> ctl/.git/rebase-merge/git-rebase-todo\n"
    "echo ort > ort/.git/rebase-merge/strategy\n"
    # a cherry-pick of two commits stopped on the first one's conflict
    "( cd pick && git cherry-pick side~1 side >/dev/null 2>&1 || true )\n"
    "test -f pick/.git/sequencer/todo\n"
    "program pick && git config --file pick/.git/sequencer/opts options.strategy ../x\n"
    "echo planted\n"
)


def _run(repo, *args):
    return subprocess.run(
        ["git", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=30,
        env={**ENV, "HOME": str(repo.parent.parent), "GIT_EDITOR": "true"},
    )


def test_a_stopped_rebase_or_cherry_pick_runs_no_program_of_the_tasks(net, tmp_path):
    mark = tmp_path / "host-mark"
    result = sandbox.run(
        net, tmp_path, {"plant": f"MARK={mark} sh -c {shlex.quote(PLANT)}"}, setup=_setup
    )
    ws = result.steps_dir
    assert result.returncode == 0 and result["plant"].out.strip() == "planted", result.describe()
    reported = result.summary.get("workspace_planted", [])

    # Controls: the exec line is found, nothing runs; `ort` is git's own, left alone.
    assert str(ws / "ctl/.git/rebase-merge/git-rebase-todo") in reported, reported
    _run(ws / "ctl", "rebase", "--continue")
    assert not (tmp_path / "host-mark.control").exists()
    assert not any("/ort/" in path for path in reported), reported
    assert (ws / "ort/.git/rebase-merge/strategy").read_text() == "ort\n"

    # The user continues what the task left stopped.
    rebase = _run(ws / "rebase", "rebase", "--continue")
    (ws / "pick/f").write_text("2\n")  # the user resolves the conflict
    _run(ws / "pick", "add", "f")
    pick = _run(ws / "pick", "cherry-pick", "--continue")
    ran = [name for name in ("rebase", "pick") if (tmp_path / f"host-mark.{name}").exists()]
    assert not ran, (
        f"--continue in {ran} ran the task's git-merge-../x on the host "
        f"(rebase: rc={rebase.returncode} {rebase.stderr[-200:]!r}; cherry-pick: "
        f"rc={pick.returncode} {pick.stderr[-200:]!r}); guard reported: {reported}"
    )
    assert str(ws / "rebase/.git/rebase-merge/strategy") in reported, reported
    assert str(ws / "pick/.git/sequencer/opts") in reported, reported
