"""A `--ro` path named through a symbolic link inside a writable root is refused.

`--ro` paths are resolved: `--ro WS/tools/ci/build.sh`, where `tools` is a link in
the workspace to `real`, made `WS/real/ci/build.sh` read-only, and every directory on
the way to it was pinned (spec.file_view). But the link itself is the task's to
replace: `rm tools && mkdir -p tools/ci && echo evil > tools/ci/build.sh` left the
task's script at the very path the admin named, which the host runs after the run.
The way to a read-only path is only pinned when it is its real path, so such a path
is refused before the task starts, naming the link and the real path to give.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

ORIGINAL = "#!/bin/sh\necho the host's build\n"


@pytest.mark.parametrize("named", ["tools/ci/build.sh", "build.sh"])
def test_a_read_only_path_through_a_link_in_the_workspace_is_refused(net, tmp_path, named):
    def setup(ws: Path) -> None:
        (ws / "real" / "ci").mkdir(parents=True)
        (ws / "real" / "ci" / "build.sh").write_text(ORIGINAL)
        (ws / "tools").symlink_to("real")  # a directory on the way
        (ws / "build.sh").symlink_to("real/ci/build.sh")  # the path itself

    workdir = sandbox._workdir(tmp_path)
    ws = workdir / "steps"
    setup(ws)
    swap = (
        f"cd {ws} && rm -f tools build.sh && mkdir -p tools/ci && echo evil > tools/ci/build.sh"
        " && ln -s tools/ci/build.sh build.sh"
    )
    argv = sandbox._argv(net, workdir, ["sh", "-c", swap], sandbox.DEMO_RULES, ())
    argv[argv.index("--") : argv.index("--")] = ["--ro", str(ws / named)]
    popen = net.popen_in_host(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = popen.communicate(timeout=60)
    # Refused before the task started: the path named is still the host's script.
    assert (ws / named).read_text() == ORIGINAL, stderr
    assert popen.returncode == 2, stderr
    real = ws / "real" / "ci" / "build.sh"
    assert "symbolic link" in stderr and f"--ro {real}" in stderr, stderr


def test_a_link_outside_the_writable_roots_is_resolved_as_before(net, tmp_path):
    """A link the task cannot change (outside every writable root) is fine."""
    workdir = sandbox._workdir(tmp_path)
    ws = workdir / "steps"
    (ws / "ci").mkdir()
    (ws / "ci" / "build.sh").write_text(ORIGINAL)
    link = tmp_path / "ci-link"
    link.symlink_to(ws / "ci")
    steps = {"write": "echo evil > ci/build.sh"}
    result = sandbox.run(
        net, tmp_path, steps, extra=("--ro", str(link / "build.sh")), workdir=workdir
    )
    assert result.returncode == 0, result.describe()
    assert result.steps["write"].rc != 0
    assert (ws / "ci" / "build.sh").read_text() == ORIGINAL
