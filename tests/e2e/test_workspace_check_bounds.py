"""What the workspace check costs the root runner is bounded, whatever the task left.

The walk before and after the task (planting.py) kept every entry of a directory
while it walked it: a task's million empty files (inodes cost it nothing: no memory,
no disk blocks, no limit of its own) cost the runner, a root process outside the
task's cgroup, ~170 MiB of host memory, ten million gigabytes. It now keeps only
directories and the files that are or may be control paths. And every file of a
hooks or editor directory is a control path, recorded, judged and renamed one by
one: a `.vscode/` of ten million files was as many records and renames. A hooks or
editor directory past planting.MAX_DIR_CONTROLS files (or a new one past
MAX_CONTROLS in all) is not listed but planted whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import planting
from support import sandbox

pytestmark = pytest.mark.e2e

SURVEY = """
import resource, sys
from pathlib import Path
from sandgate.enforcer.sandbox import planting
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = planting.survey([Path(sys.argv[1])])
planting.find_planted(before)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start)
"""


def _peak_kib(root: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", SURVEY, str(root)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_many_plain_files_cost_the_walk_no_memory(tmp_path):
    # tmpfs, where 300,000 files are made in about a second (a kind whose ctime the
    # walk trusts, as ext4's); the old walk's peak grew by ~50 MiB here.
    shm = Path("/dev/shm") / f"{tmp_path.name}-{os.getpid()}"
    crowd = shm / "ws" / "src"
    crowd.mkdir(parents=True)
    try:
        empty = _peak_kib(shm / "ws")
        for n in range(300_000):
            os.close(os.open(crowd / f"f{n:06}", os.O_CREAT | os.O_WRONLY, 0o644))
        grown = _peak_kib(shm / "ws") - empty
        assert grown < 15 * 1024, f"the walk's peak grew by {grown} KiB"
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=False)


def test_a_crowded_editor_directory_goes_aside_whole(net, tmp_path):
    many = planting.MAX_DIR_CONTROLS + 1
    steps = {
        "crowd": f"mkdir -p app/.vscode && cd app/.vscode && seq 1 {many} | xargs touch",
        "few": "mkdir -p lib/.vscode && echo '{}' > lib/.vscode/tasks.json",
    }
    result = sandbox.run(net, tmp_path, steps)
    assert result.returncode == 0, result.describe()
    ws = result.steps_dir
    assert sorted(result.summary["workspace_planted"]) == [
        str(ws / "app/.vscode"),
        str(ws / "lib/.vscode/tasks.json"),
    ], result.summary
    assert not (ws / "app/.vscode").exists()
    assert len(os.listdir(ws / "app/.vscode.sandgate-planted")) == many
    assert "than the check lists" in result.stderr, result.stderr[-2000:]
    assert (ws / "lib/.vscode/tasks.json.sandgate-planted").exists()


@pytest.mark.parametrize(
    "change",
    ["echo '{}' > tasks.json", "echo '{\"x\": 1}' > 17", "rm 18"],
    ids=["added", "rewritten", "removed"],
)
def test_a_directory_crowded_before_the_run_is_checked_for_changes(net, tmp_path, change):
    """Crowded before the run (the user's own), a `.vscode` kept no record, was crowded
    again after it, and so was never looked at: the task's tasks.json in it went
    unreported (planting._changed_since). One the task left alone stays."""
    many = planting.MAX_DIR_CONTROLS + 2  # crowded still with one removed

    def setup(ws: Path) -> None:
        for directory in ("app/.vscode", "untouched/.vscode"):
            (ws / directory).mkdir(parents=True)
            for n in range(many):
                (ws / directory / str(n)).write_text("{}")

    steps = {"change": f"cd app/.vscode && {change}"}
    result = sandbox.run(net, tmp_path, steps, setup=setup)
    assert result.returncode == 0 and result.steps["change"].rc == 0, result.describe()
    ws = result.steps_dir
    assert result.summary["workspace_planted"] == [str(ws / "app/.vscode")], result.summary
    assert (ws / "app/.vscode.sandgate-planted").is_dir()
    assert (ws / "untouched/.vscode").is_dir()


def test_the_walk_keeps_what_makes_a_git_directory_whatever_its_type(tmp_path):
    """The walk drops the plain files of a directory, not the names git looks for: a
    bare repository whose `objects` and `refs` are links is one to git (it follows
    them), so its config is judged as a repository's."""
    ws = tmp_path / "ws"
    ws.mkdir()
    before = planting.survey([ws])
    bare = ws / "bare"
    bare.mkdir()
    (ws / "objects-elsewhere").mkdir()
    (ws / "refs-elsewhere").mkdir()
    (bare / "HEAD").write_text("ref: refs/heads/main\n")
    (bare / "objects").symlink_to("../objects-elsewhere")
    (bare / "refs").symlink_to("../refs-elsewhere")
    (bare / "config").write_text("[core]\n\tfsmonitor = touch /tmp/never\n")
    planted = {p.path: p.why for p in planting.find_planted(before)}
    # the links too: git makes none in a git directory (a pointer could go through one)
    assert sorted(planted) == [bare / "config", bare / "objects", bare / "refs"], planted
    assert "core.fsmonitor" in planted[bare / "config"]
    assert "symbolic link in a git directory" in planted[bare / "refs"]


def test_padding_a_named_directory_hides_no_hook(tmp_path):
    """A directory a repository's config runs files from (`core.hooksPath`), past the
    64 bound read-only during the run: the task edits its pre-commit and pads the
    directory with 100,000 files. Only the first 4,096 entries were fingerprinted, in
    directory order, so the hook was most likely past them and never judged; now a
    named directory of more than that is planted whole."""
    shm = Path("/dev/shm") / f"{tmp_path.name}-{os.getpid()}-named"
    ws = shm / "ws"
    hooks = ws / "repo" / "githooks"
    hooks.mkdir(parents=True)
    try:
        git = ws / "repo" / ".git"
        (git / "objects").mkdir(parents=True)
        (git / "refs").mkdir()
        (git / "HEAD").write_text("ref: refs/heads/main\n")
        (git / "config").write_text("[core]\n\thooksPath = githooks\n")
        (hooks / "pre-commit").write_text("#!/bin/sh\ntrue\n")
        before = planting.survey([ws])
        assert hooks in before.named, before.named
        (hooks / "pre-commit").write_text("#!/bin/sh\ntouch /tmp/never\n")
        for n in range(100_000):
            os.close(os.open(hooks / f"pad{n:06}", os.O_CREAT | os.O_WRONLY, 0o644))
        planted = planting.disarm(planting.find_planted(before))
        assert not (hooks / "pre-commit").exists()  # git finds no hook there
        assert [p.path for p in planted] == [hooks], [p.describe() for p in planted]
        assert not hooks.exists() and (hooks.parent / "githooks.sandgate-planted").is_dir()
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=False)
