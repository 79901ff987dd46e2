"""The check after the run (planting.py) against names and trees the task chose to
break it, in real runs (red team `life`, session 47).

- A name that is not UTF-8 (`\\xff`): os.scandir gives it surrogate-escaped, and the
  check's openat2 took `path.encode()`: UnicodeEncodeError out of the check, a
  traceback, the hook neither renamed nor reported, the cgroup and id slot left; the
  next run on that workspace died the same way in its walk before.
- The rename aside's names taken first (NAME.sandgate-planted, -2 ... -99): the hook
  stayed live. A name too long for the suffix: the same.
- `SUFFIX in name` skipped `.idea/runConfigurations/x.sandgate-planted.xml`.
- A chain 250 directories deep of 255-byte names: the walk kept each directory's
  ~64 KB relative path (629 MiB of the root runner for 14 MB of the task's disk),
  and wrote them all to the state directory (192 MiB).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sandgate.enforcer import run as run_module
from sandgate.enforcer.sandbox import planting
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

HOOK = "#!/bin/sh\\necho PWNED-ON-HOST\\n"
_RANDOM_ASIDE = re.compile(r"\.sandgate-planted-[0-9a-f]{32}\Z")


def _live_hooks(ws: Path) -> list[bytes]:
    """Every file named exactly `pre-commit` in a `hooks` directory: git runs it."""
    return [
        os.path.join(top, b"pre-commit")
        for top, _dirs, files in os.walk(os.fsencode(ws))
        if b"pre-commit" in files and top.endswith(b"/hooks")
    ]


def test_a_hook_under_a_name_that_is_not_utf8_is_renamed_aside_and_reported(net, tmp_path):
    plant = (
        "d=$(printf '\\377'); mkdir -p \"$d/.git/hooks\" && "
        f'printf \'{HOOK}\' > "$d/.git/hooks/pre-commit" && chmod +x "$d/.git/hooks/pre-commit"'
    )
    result = sandbox.run(net, tmp_path, {"plant": plant})  # asserts nothing is left behind
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0 and result["plant"].rc == 0, result.describe()
    assert not _live_hooks(result.steps_dir)
    hooks = os.path.join(os.fsencode(result.steps_dir), b"\xff", b".git", b"hooks")
    assert b"pre-commit.sandgate-planted" in os.listdir(hooks)
    assert result.summary["workspace_planted"] == [
        os.fsdecode(os.path.join(hooks, b"pre-commit"))
    ], result.summary
    assert result.events(reason="workspace_planted"), result.describe()


def test_a_repository_under_a_name_that_is_not_utf8_does_not_stop_the_next_run(net, tmp_path):
    """What a task may leave (or any checkout with a Latin-1 directory): a repository
    under `\\xff`, pinned for the run: the walk before, the init's bind of it."""

    def setup(ws: Path) -> None:
        git = os.path.join(os.fsencode(ws), b"\xff", b".git")
        for sub in (b"hooks", b"objects", b"refs", b"info"):
            os.makedirs(os.path.join(git, sub))
        with open(os.path.join(git, b"HEAD"), "w") as f:
            f.write("ref: refs/heads/main\n")
        with open(os.path.join(git, b"config"), "w") as f:
            f.write("[core]\n\trepositoryformatversion = 0\n")

    steps = {"ran": "echo task-ran", "pinned": "mv \"$(printf '\\377')/.git\" moved"}
    result = sandbox.run(net, tmp_path, steps, setup=setup)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0 and result["ran"].out == "task-ran\n", result.describe()
    assert result["pinned"].rc != 0, "the git directory was not bound over itself"


def test_a_hook_is_renamed_aside_when_the_task_took_every_numbered_name(net, tmp_path):
    plant = (
        "mkdir -p new/.git/hooks && cd new/.git/hooks && touch pre-commit.sandgate-planted && "
        "for n in $(seq 2 99); do touch pre-commit.sandgate-planted-$n; done && "
        f"printf '{HOOK}' > pre-commit && chmod +x pre-commit"
    )
    result = sandbox.run(net, tmp_path, {"plant": plant})
    assert result.returncode == 0 and result["plant"].rc == 0, result.describe()
    assert not _live_hooks(result.steps_dir), "a planted hook is still live"
    hooks = result.steps_dir / "new/.git/hooks"
    aside = [n for n in os.listdir(hooks) if n.startswith("pre-commit") and _RANDOM_ASIDE.search(n)]
    assert len(aside) == 1 and os.access(hooks / aside[0], os.X_OK), os.listdir(hooks)
    assert f"renamed to {aside[0]}" in result.stderr, result.stderr[-2000:]


def test_an_editor_file_with_a_name_too_long_for_the_suffix_is_renamed_aside(net, tmp_path):
    long_name = "t" * 250  # with `.sandgate-planted` over NAME_MAX (255 bytes)
    plant = f"mkdir -p .vscode && echo '{{}}' > .vscode/{long_name}"
    result = sandbox.run(net, tmp_path, {"plant": plant})
    assert result.returncode == 0 and result["plant"].rc == 0, result.describe()
    left = os.listdir(result.steps_dir / ".vscode")
    assert long_name not in left, "the planted editor file is still live"
    assert len(left) == 1 and _RANDOM_ASIDE.search(left[0]), left
    assert "NOT renamed" not in result.stderr, result.stderr[-2000:]


def test_a_name_with_the_suffix_inside_it_is_still_checked(net, tmp_path):
    """JetBrains reads every *.xml of .idea/runConfigurations: a name with the
    suffix in its middle is not one sandgate made."""
    name = "x.sandgate-planted.xml"
    plant = (
        f"mkdir -p .idea/runConfigurations && echo '<component/>' > .idea/runConfigurations/{name}"
    )
    result = sandbox.run(net, tmp_path, {"plant": plant})
    assert result.returncode == 0 and result["plant"].rc == 0, result.describe()
    runs = result.steps_dir / ".idea/runConfigurations"
    assert name not in os.listdir(runs), "the planted run configuration is still live"
    assert str(runs / name) in result.summary.get("workspace_planted", []), result.summary


# Depth 250, every name 255 bytes, then LEAVES directories at the bottom: each one
# costs the task an inode and a block; each relative path is ~64 KB.
DEEP = r"""
import os, sys
leaves = int(sys.argv[1])
fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
for d in range(250):
    name = ("d%03d" % d) + "x" * 251
    os.mkdir(name, dir_fd=fd)
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = sub
for i in range(leaves):
    os.mkdir(("%06d" % i) + "y" * 249, dir_fd=fd)
"""


def test_a_deep_tree_of_long_names_is_set_aside_and_kept_walk_bounded(net, tmp_path):
    """The walk stops at its bounds (planting.MAX_WALK_NAME_BYTES): the new tree it
    could not finish goes aside whole, the workspace root is reported as not all
    checked (NOT renamed), and the kept walk is not written past KEEP_MAX_BYTES."""
    result = sandbox.run(net, tmp_path, {"deep": python(DEEP, "3000")}, timeout=300)
    ws = result.steps_dir.resolve()
    cache = Path(planting._kept_path(run_module.STATE_DIR / "cache", [ws]))
    kept = cache.stat().st_size if cache.exists() else 0
    cache.unlink(missing_ok=True)  # ours: not left in the state directory
    top = "d000" + "x" * 251
    try:
        assert result.returncode == 0 and result["deep"].rc == 0, result.describe()
        assert not (ws / top).exists(), "the tree the check could not finish is still live"
        aside = [n for n in os.listdir(ws) if _RANDOM_ASIDE.search(n)]  # 255 bytes: no suffix
        assert len(aside) == 1 and (ws / aside[0] / ("d001" + "x" * 251)).is_dir(), aside
        assert re.search(r"steps: the check ran out of room.*NOT renamed", result.stderr), (
            result.stderr[-2000:]
        )
        # The summary and its last line never count it among the renamed paths.
        assert result.summary["workspace_not_renamed"] == [str(ws)], result.summary
        assert re.search(r"task: .*1 NOT renamed", result.stderr), result.stderr[-2000:]
        assert kept <= planting.KEEP_MAX_BYTES, f"the kept walk is {kept >> 20} MiB"
    finally:
        subprocess.run(["rm", "-rf", str(ws)], check=False)


# The walks before and after the same tree is made, in a process of their own (its
# ru_maxrss grows with what they keep).
SURVEY = r"""
import os, resource, sys
from pathlib import Path
from sandgate.enforcer.sandbox import planting
ws, leaves = Path(sys.argv[1]), int(sys.argv[2])
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = planting.survey([ws])
fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
for d in range(250):
    name = ("d%03d" % d) + "x" * 251
    os.mkdir(name, dir_fd=fd)
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = sub
for i in range(leaves):
    os.mkdir(("%06d" % i) + "y" * 249, dir_fd=fd)
after = planting.walk_after(before)
planted = planting.disarm(planting.find_planted(before, after))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start)
print(len(planted), sum(item.renamed for item in planted))
"""


def test_the_walk_after_a_deep_tree_of_long_names_costs_bounded_memory(tmp_path):
    """Without a sandbox. 3,250 directories grew the old walk's process by ~600 MiB."""
    ws = tmp_path / "ws"
    ws.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SURVEY, str(ws), "3000"], capture_output=True, text=True, timeout=300
    )
    subprocess.run(["rm", "-rf", str(ws)], check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_kib, counts = done.stdout.splitlines()
    assert int(grown_kib) < 100 * 1024, f"the walks grew the process by {grown_kib} KiB"
    assert counts == "2 1", counts  # the new tree renamed aside; the root reported only
