"""The files sandgate opens as root for a run, against the task's writable roots
(enforcer/sandbox/spec.py): refused where the task can write, unless bound read-only
again there; files it reads for the task, refused where finding them passes through
the task's reach to a file outside it."""

from __future__ import annotations

import os

import pytest
from sandgate.enforcer.sandbox.spec import SandboxError, check_out_of_reach, read_for_task


def test_a_file_in_the_tasks_reach_is_refused_unless_it_is_bound_read_only(tmp_path):
    workspace = tmp_path / "ws"
    code = workspace / "checkout" / "rules"  # a development checkout as the workspace
    code.mkdir(parents=True)
    shipped, mine = code / "default.yaml", workspace / "rules.yaml"
    for path in (shipped, mine):
        path.write_text("version: 1\n")
    (code / "planted.yaml").symlink_to(mine)  # read-only part, resolving into the writable
    (tmp_path / "outside.yaml").symlink_to(mine)  # given outside, resolving inside
    # A name in the writable part that leads to the read-only one (a shipped preset):
    # the task points it elsewhere (found: an include named through such a link).
    (workspace / "preset.yaml").symlink_to(shipped)

    read_only = [workspace / "checkout"]
    assert check_out_of_reach("--rules", shipped, [workspace], read_only=read_only) == shipped
    assert check_out_of_reach("--rules", tmp_path / "elsewhere.yaml", [workspace]) is not None
    for path in (mine, code / "planted.yaml", tmp_path / "outside.yaml", workspace / "preset.yaml"):
        with pytest.raises(SandboxError, match=f"inside {workspace}, which the task can write"):
            check_out_of_reach("--rules", path, [workspace], read_only=read_only)
    with pytest.raises(SandboxError):  # nothing bound read-only: the shipped file too
        check_out_of_reach("--rules", shipped, [workspace])


def _reach(tmp_path):
    workspace, host = tmp_path / "ws", tmp_path / "host"
    workspace.mkdir()
    host.mkdir()
    (host / "secret").write_text("STOLEN=1\n")
    return workspace, host


def test_a_file_read_for_the_task_through_its_reach_must_lie_in_it(tmp_path):
    workspace, host = _reach(tmp_path)
    (workspace / "own.env").write_text("A=1\n")
    (workspace / "link").symlink_to(host / "secret")  # a planted file link
    (workspace / "dir").symlink_to(host)  # a planted directory link on the way
    (workspace / "inner").symlink_to(workspace / "own.env")  # a link within: fine
    admin = tmp_path / "admin"
    admin.mkdir()
    (admin / "via-workspace").symlink_to(workspace / "link")  # given outside, passing inside
    (admin / "to-workspace").symlink_to(workspace / "own.env")
    (workspace / "sub").mkdir()
    (admin / "into").symlink_to(workspace / "sub")  # `into/..` is the workspace, not admin/

    assert read_for_task("--env-file", workspace / "own.env", [workspace]) == b"A=1\n"
    assert read_for_task("--env-file", workspace / "inner", [workspace]) == b"A=1\n"
    assert read_for_task("--env-file", admin / "to-workspace", [workspace]) == b"A=1\n"
    assert read_for_task("--env-file", host / "secret", [workspace]) == b"STOLEN=1\n"
    (workspace / "secret").symlink_to(host / "secret")
    through_dotdot = admin / "into" / ".." / "secret"  # lexically admin/secret
    for path in (
        workspace / "link",
        workspace / "dir" / "secret",
        admin / "via-workspace",
        through_dotdot,
    ):
        with pytest.raises(SandboxError, match=f"a link from {workspace}, which the task can"):
            read_for_task("--env-file", path, [workspace])


def test_a_fifo_or_directory_read_for_the_task_is_refused_without_blocking(tmp_path):
    workspace, _ = _reach(tmp_path)
    os.mkfifo(workspace / "fifo")  # a planted FIFO: reading it would hold the run forever
    (workspace / "directory").mkdir()
    for name in ("fifo", "directory"):
        with pytest.raises(SandboxError, match=f"--env-file {workspace / name}: "):
            read_for_task("--env-file", workspace / name, [workspace])
