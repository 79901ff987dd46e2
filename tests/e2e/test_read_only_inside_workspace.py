"""A read-only path inside a writable root stays what it was after the run.

`--ro PATH` inside the workspace (a build script the host runs later), and
sandgate's own code and Python environment when they lie inside a workspace or a
`--rw` directory (a development checkout: the next `sandgate` runs as root from
there), are bound read-only over themselves. A mount point cannot be renamed or
removed, but a directory above it that is a plain directory of the workspace could:
`mv tools tools.old && mkdir -p tools/ci && echo evil > tools/ci/build.sh` moved the
read-only mount away with its directory and put the task's file at the path the
host runs. Every directory between the writable root and such a path is now bound
over itself too (writable, as the pinned git directories are: spec.file_view), so
the way to it cannot be renamed or removed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import spec
from support import sandbox

pytestmark = pytest.mark.e2e

ORIGINAL = "#!/bin/sh\necho the host's build\n"


def test_the_way_to_a_read_only_path_cannot_be_moved(net, tmp_path):
    def setup(ws: Path) -> None:
        (ws / "tools" / "ci").mkdir(parents=True)
        (ws / "tools" / "ci" / "build.sh").write_text(ORIGINAL)
        (ws / "tools" / "notes.txt").write_text("editable\n")

    workdir = sandbox._workdir(tmp_path)  # the run's workspace: WORKDIR/steps
    script = workdir / "steps" / "tools" / "ci" / "build.sh"
    steps = {
        "swap": "mv tools tools.old && mkdir -p tools/ci && echo evil > tools/ci/build.sh",
        "middle": "mv tools/ci tools/ci.old && mkdir tools/ci && echo evil > tools/ci/build.sh",
        "write": "echo evil > tools/ci/build.sh",
        "edit": "echo edited >> tools/notes.txt && mkdir tools/new && touch tools/ci/other",
        "rm": "rm -rf tools",
    }
    result = sandbox.run(
        net, tmp_path, steps, extra=("--ro", str(script)), setup=setup, workdir=workdir
    )
    assert result.returncode == 0, result.describe()
    for label in ("swap", "middle", "write", "rm"):
        assert result.steps[label].rc != 0, result.describe()
    assert "busy" in result.steps["swap"].err.lower(), result.steps["swap"].err
    assert result.steps["edit"].rc == 0, result.describe()  # the directories stay writable
    assert script.read_text() == ORIGINAL
    assert not (workdir / "steps" / "tools.old").exists()
    assert not (workdir / "steps" / "tools" / "ci.old").exists()


def test_sandgates_own_code_inside_a_writable_root_is_pinned_on_its_way(tmp_path):
    """The same for sandgate's code in a development checkout under the workspace
    (spec.file_view with the paths protected_paths gives)."""
    ws = tmp_path / "ws"
    code = ws / "src" / "sandgate" / "enforcer"
    code.mkdir(parents=True)
    opts = spec.SandboxOptions(workspace=ws)
    view = spec.file_view(opts, protected=[code], hidden=[], file_binds=[])
    binds = {b["target"]: b for b in view["binds"]}
    assert binds[str(code)]["writable"] is False
    for way in (ws / "src", ws / "src" / "sandgate"):
        assert binds[str(way)]["writable"] is True and binds[str(way)]["exact"], binds
    # Parents are mounted before what is below them.
    order = [b["target"] for b in view["binds"]]
    assert (
        order.index(str(ws / "src"))
        < order.index(str(ws / "src/sandgate"))
        < order.index(str(code))
    )


def test_a_read_only_path_inside_another_is_not_made_writable(net, tmp_path):
    """`--ro ws/tools --ro ws/tools/ci/build.sh`: the second pinned `tools` on its way,
    bound writable over the first's read-only bind (both at one depth, the writable
    one mounted last): the task wrote into the directory the admin made read-only. A
    way inside a read-only path is not pinned, and a read-only bind goes on top."""

    def setup(ws: Path) -> None:
        (ws / "tools" / "ci").mkdir(parents=True)
        (ws / "tools" / "ci" / "build.sh").write_text(ORIGINAL)
        (ws / "tools" / "deploy.sh").write_text(ORIGINAL)

    workdir = sandbox._workdir(tmp_path)
    tools = workdir / "steps" / "tools"
    steps = {
        "deploy": "echo evil > tools/deploy.sh",
        "new": "touch tools/new",
        "build": "echo evil > tools/ci/build.sh",
    }
    extra = ("--ro", str(tools), "--ro", str(tools / "ci" / "build.sh"))
    result = sandbox.run(net, tmp_path, steps, extra=extra, setup=setup, workdir=workdir)
    assert result.returncode == 0, result.describe()
    for label in steps:
        assert result.steps[label].rc != 0, result.describe()
    assert (tools / "deploy.sh").read_text() == ORIGINAL
    assert (tools / "ci" / "build.sh").read_text() == ORIGINAL
    assert not (tools / "new").exists()


def test_a_way_owned_by_someone_else_stays_theirs(net, tmp_path):
    """A way directory is idmapped as its writable root, not by its own owner: a
    root-owned `tools` in a workspace owned by another user, pinned on the way to a
    read-only path, mapped root's files to the task, which appended to root's
    deploy.sh and created files that were root's on the host."""

    def setup(ws: Path) -> None:
        (ws / "tools" / "ci").mkdir(parents=True)
        (ws / "tools" / "ci" / "build.sh").write_text(ORIGINAL)
        (ws / "tools" / "deploy.sh").write_text(ORIGINAL)
        os.chown(ws, 1000, 1000)  # the workspace is a user's; tools/ stays root's

    workdir = sandbox._workdir(tmp_path)
    tools = workdir / "steps" / "tools"
    steps = {"deploy": "echo evil >> tools/deploy.sh", "new": "touch tools/new"}
    extra = ("--ro", str(tools / "ci" / "build.sh"))
    result = sandbox.run(net, tmp_path, steps, extra=extra, setup=setup, workdir=workdir)
    assert result.returncode == 0, result.describe()
    for label in steps:
        assert result.steps[label].rc != 0, result.describe()
    assert (tools / "deploy.sh").read_text() == ORIGINAL
    assert not (tools / "new").exists()
