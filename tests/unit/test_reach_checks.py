"""The files sandgate opens as root for a run, against the task's writable roots
(enforcer/sandbox/spec.py): refused where the task can write, unless bound read-only
again there."""

from __future__ import annotations

import pytest
from sandgate.enforcer.sandbox.spec import SandboxError, check_out_of_reach


def test_a_file_in_the_tasks_reach_is_refused_unless_it_is_bound_read_only(tmp_path):
    workspace = tmp_path / "ws"
    code = workspace / "checkout" / "rules"  # a development checkout as the workspace
    code.mkdir(parents=True)
    shipped, mine = code / "default.yaml", workspace / "rules.yaml"
    for path in (shipped, mine):
        path.write_text("version: 1\n")
    (code / "planted.yaml").symlink_to(mine)  # read-only part, resolving into the writable
    (tmp_path / "outside.yaml").symlink_to(mine)  # given outside, resolving inside

    read_only = [workspace / "checkout"]
    assert check_out_of_reach("--rules", shipped, [workspace], read_only=read_only) == shipped
    assert check_out_of_reach("--rules", tmp_path / "elsewhere.yaml", [workspace]) is not None
    for path in (mine, code / "planted.yaml", tmp_path / "outside.yaml"):
        with pytest.raises(SandboxError, match=f"inside {workspace}, which the task can write"):
            check_out_of_reach("--rules", path, [workspace], read_only=read_only)
    with pytest.raises(SandboxError):  # nothing bound read-only: the shipped file too
        check_out_of_reach("--rules", shipped, [workspace])
