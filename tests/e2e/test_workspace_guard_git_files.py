"""A red team (session 50): a task made an existing loose object of the user's
repository writable by every account (chmod 0666, or an access ACL o::rw); the guard
checked the *directories* of .git/objects (modes and ACLs), not the object files in
them, so nothing was reported or repaired, and after the run `nobody` rewrote the
blob of the user's build script in place: the user's git served nobody's bytes.
Now the git dir's files the run changed are checked (`planting._git_files_loosened`):
the write is taken away and reported, and `nobody`'s rewrite fails."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

LOOSEN = """
    import os, struct, sys
    path = sys.argv[1]
    if sys.argv[2] == "chmod":
        os.chmod(path, 0o666)
    else:
        entries = ((0x01, 6), (0x04, 4), (0x20, 6))  # u::rw- g::r-- o::rw-
        os.setxattr(path, "system.posix_acl_access",
                    struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF) for t, p in entries))
    print(oct(os.stat(path).st_mode & 0o7777))
"""

REWRITE = """
import sys, zlib
body = b"#!/bin/sh\\necho swapped by nobody\\n"
with open(sys.argv[1], "wb") as f:  # the file's own write bit: no directory write needed
    f.write(zlib.compress(b"blob %d\\0" % len(body) + body))
"""


def _git(workspace: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null"}
    return subprocess.run(
        ["git", "-c", "user.name=u", "-c", "user.email=u@example.test", "-C", str(workspace), *args],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()  # fmt: skip


@pytest.mark.parametrize("how", ["chmod", "acl"])
def test_task_opens_a_loose_object_to_every_account(fakenet, tmp_path, how):
    base = Path("/srv") / f"rt-round3b-{os.getpid()}-{secrets.token_hex(3)}"
    old_umask = os.umask(0o022)
    try:
        workdir = base / "run"
        workspace = workdir / "steps"
        workspace.mkdir(parents=True)
        base.chmod(0o755)
        workdir.chmod(0o755)
        _git(workspace, "init", "-q")
        (workspace / "build.sh").write_text("#!/bin/sh\necho build\n")
        _git(workspace, "add", "build.sh")
        _git(workspace, "commit", "-q", "-m", "first")
        oid = _git(workspace, "rev-parse", "HEAD:build.sh")
        rel = f".git/objects/{oid[:2]}/{oid[2:]}"

        result = sandbox.run(
            fakenet, tmp_path, {"loosen": python(LOOSEN, rel, how)}, workdir=workdir
        )
        assert result["loosen"].rc == 0, result.describe()
        planted = [line for line in result.stderr.splitlines() if "the task planted" in line]

        swap = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", "-c", REWRITE, str(workspace / rel)],
            capture_output=True, text=True,
        )  # fmt: skip
        shown = _git(workspace, "show", "HEAD:build.sh")
        assert "swapped by nobody" not in shown, (
            f"task output {result['loosen'].out.strip()!r}; planted={planted}; after the run "
            f"nobody rewrote {rel} (rc={swap.returncode} {swap.stderr.strip()}); "
            f"git show HEAD:build.sh -> {shown!r}"
        )
    finally:
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)
