"""A task's POSIX ACLs on the workspace do not outlive the run (red team kernel, finding 1).

The workspace is idmapped to its owner, so the task may set extended attributes on the
user's directories, `system.posix_acl_default` among them (setxattr: no seccomp rule,
no Landlock right; the bind of `.git` is writable). A default ACL changes nothing of
the directory's own mode, so the check after the run looked only at write bits
(planting._loosened) and saw nothing; but what is created below the directory later
inherits it, over the creator's umask: the user's next `git commit` made
`objects/XX/` `0757` (`nobody` swapped the blob the user's `git show` printed), the
user's next `git worktree add` made `.git/worktrees/wt/` and its `commondir` writable by
all (`nobody` repointed it, and the user's `git status` there ran nobody's fsmonitor as
root). The same held for the workspace root and any directory in it.

Now the walks read the default and access ACLs of every directory they stat (and of
`objects` and its loose-object directories, and the access ACL of control paths); an
entry granting write to the group, to others or to a named user or group that was not
there before is removed after the run, and reported in `workspace_planted`
(planting._acl_loosened, disarm). Controls: the user's own default ACL is left, and what
the task makes below it inherits it without a report.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

ACL = "system.posix_acl_default"

# In the sandbox: u::rwx g::r-x o::rwx as the default ACL of .git/objects and .git.
SET_DEFAULT_ACL = """
    import os, struct
    entries = ((0x01, 7), (0x04, 5), (0x20, 7))  # USER_OBJ rwx, GROUP_OBJ r-x, OTHER rwx
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF) for t, p in entries)
    for path in (".git/objects", ".git"):
        os.setxattr(path, "system.posix_acl_default", value)
    print(oct(os.stat(".git/objects").st_mode & 0o7777))
"""

# As nobody: replace the loose object at argv[1] (its directory is other-writable).
SWAP_OBJECT = """
import os, sys, zlib
path = sys.argv[1]
body = b"#!/bin/sh\\necho swapped by nobody\\n"
data = zlib.compress(b"blob %d\\0" % len(body) + body)
tmp = os.path.join(os.path.dirname(path), "tmp_swap")
with open(tmp, "wb") as f:
    f.write(data)
os.rename(tmp, path)
"""


def _warned(result) -> list[str]:
    """sandgate's lines about what the task planted (each names the path and why)."""
    return [line for line in result.stderr.splitlines() if "the task planted" in line]


def _acl(path: Path, name: str = ACL) -> str | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False).hex()
    except OSError:
        return None


def _git(workspace: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null"}
    return subprocess.run(
        [
            "git",
            "-c",
            "user.name=u",
            "-c",
            "user.email=u@example.test",
            "-C",
            str(workspace),
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()


def test_a_default_acl_on_git_objects_outlives_the_run_and_opens_the_users_next_objects(
    fakenet, tmp_path
):
    base = Path("/srv") / f"rt-kernel-acl-{os.getpid()}-{secrets.token_hex(3)}"
    old_umask = os.umask(0o022)
    try:
        workdir = base / "run"
        workspace = workdir / "steps"
        workspace.mkdir(parents=True)
        base.chmod(0o755)
        workdir.chmod(0o755)
        _git(workspace, "init", "-q")
        (workspace / "README").write_text("hello\n")
        _git(workspace, "add", "README")
        _git(workspace, "commit", "-q", "-m", "first")

        result = sandbox.run(fakenet, tmp_path, {"acl": python(SET_DEFAULT_ACL)}, workdir=workdir)
        assert result["acl"].rc == 0, result.describe()
        planted = _warned(result)

        # The run is over and its check has passed. The user commits a script, as usual.
        while True:  # content whose loose-object directory does not exist yet
            body = f"#!/bin/sh\necho build {secrets.token_hex(8)}\n"
            (workspace / "build.sh").write_text(body)
            oid = _git(workspace, "hash-object", "build.sh")
            if not (workspace / ".git" / "objects" / oid[:2]).exists():
                break
        _git(workspace, "add", "build.sh")
        _git(workspace, "commit", "-q", "-m", "build script")
        object_dir = workspace / ".git" / "objects" / oid[:2]
        mode = stat.S_IMODE(object_dir.stat().st_mode)

        # Another local account swaps the blob; the user's git reads nobody's bytes.
        swap = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", "-c", SWAP_OBJECT, str(object_dir / oid[2:])],
            capture_output=True, text=True,
        )  # fmt: skip
        shown = _git(workspace, "show", "HEAD:build.sh")
        print(
            f"acl kept: {_acl(workspace / '.git' / 'objects')}; planted={planted}; new "
            f"{object_dir.name}/ mode {oct(mode)}; swap rc={swap.returncode} "
            f"{swap.stderr.strip()}; git show: {shown!r}"
        )
        assert _acl(workspace / ".git" / "objects") is None
        assert any(
            f"{workspace}/.git/objects: a default ACL" in line and "every user" in line
            for line in planted
        ), planted
        assert not mode & 0o002 and "swapped by nobody" not in shown, (
            f"after the run, the user's own commit made {object_dir} mode {oct(mode)} (the "
            f"task's default ACL on .git/objects, left in place: planted={planted}), and "
            f"`nobody` replaced the blob of build.sh: git show HEAD:build.sh -> {shown!r}"
        )
    finally:
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)


# As nobody: point the worktree's commondir at a directory of its own whose config
# names an fsmonitor (objects and refs: links to the real ones, so git takes it).
HIJACK_WORKTREE = r"""
set -e
W="$1/.git/worktrees/wt"; MARK="$2"
mkdir "$W/evil"
ln -s "$1/.git/objects" "$W/evil/objects"
ln -s "$1/.git/refs" "$W/evil/refs"
printf '[core]\n\trepositoryformatversion = 0\n\tfsmonitor = "id > %s; false"\n' "$MARK" > "$W/evil/config"
printf 'evil\n' > "$W/commondir.new"
mv -f "$W/commondir.new" "$W/commondir"
"""


def test_a_default_acl_on_git_lets_any_account_run_code_in_the_users_next_worktree(
    fakenet, tmp_path
):
    base = Path("/srv") / f"rt-kernel-acl-{os.getpid()}-{secrets.token_hex(3)}"
    old_umask = os.umask(0o022)
    try:
        workdir = base / "run"
        workspace = workdir / "steps"
        workspace.mkdir(parents=True)
        base.chmod(0o755)
        workdir.chmod(0o755)
        _git(workspace, "init", "-q")
        _git(workspace, "commit", "-q", "--allow-empty", "-m", "first")
        marker = base / "ran-as-the-user"

        result = sandbox.run(fakenet, tmp_path, {"acl": python(SET_DEFAULT_ACL)}, workdir=workdir)
        assert result["acl"].rc == 0, result.describe()
        planted = _warned(result)

        # After the run: the user makes a worktree (as agents' users do), umask 022.
        _git(workspace, "worktree", "add", "-q", "wt")
        admin = workspace / ".git" / "worktrees" / "wt"
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (admin, admin / "commondir")}
        hijack = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/bin/sh", "-c", HIJACK_WORKTREE, "sh", str(workspace), str(marker)],
            capture_output=True, text=True,
        )  # fmt: skip
        env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null"}
        subprocess.run(["git", "status"], cwd=workspace / "wt", capture_output=True, env=env)
        ran = marker.read_text().strip() if marker.exists() else None
        print(
            f"planted={planted}; modes={modes}; hijack rc={hijack.returncode} "
            f"{hijack.stderr.strip()}; marker={ran!r}"
        )
        assert _acl(workspace / ".git") is None
        assert any(f"{workspace}/.git: a default ACL" in line for line in planted), planted
        assert ran is None, (
            f"the task's default ACL on .git made the user's later `git worktree add` "
            f"admin dir {modes} (planted={planted}); `nobody` repointed its commondir "
            f"and the user's `git status` in the worktree ran nobody's fsmonitor: {ran!r}"
        )
    finally:
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)


# In the sandbox, as the task's root (the workspace's owner through the idmap): ACLs
# of every kind the check must see, and what it must leave.
VARIANTS = """
    import os, struct
    U = 0xFFFFFFFF
    USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
    def acl(*entries):
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    base = ((USER_OBJ, 7, U), (GROUP_OBJ, 5, U))
    # the root and a directory of the user's: others may write what is made there
    for path in (".", "sub"):
        os.setxattr(path, "system.posix_acl_default", acl(*base, (OTHER, 7, U)))
    # a git directory: its owning group, through the mask
    os.setxattr("repo/.git", "system.posix_acl_default",
                acl((USER_OBJ, 7, U), (GROUP_OBJ, 7, U), (MASK, 7, U), (OTHER, 5, U)))
    # a named group (the owner's: the only one the idmap maps) on the user's directory
    os.setxattr("repo/src", "system.posix_acl_access",
                acl(*base, (GROUP, 7, 0), (MASK, 7, U), (OTHER, 5, U)))
    # a new directory of the task's, and one below the user's own default ACL
    os.mkdir("new")
    os.setxattr("new", "system.posix_acl_default", acl(*base, (OTHER, 7, U)))
    os.mkdir("shared/inner")
    print("done")
"""

# The user's own default ACL, before the run: u::rwx g::rwx m::rwx o::r-x
SHARED_DEFAULT = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
    for tag, perm in ((0x01, 7), (0x04, 7), (0x10, 7), (0x20, 5))
)


def test_acls_the_task_sets_are_removed_and_the_users_own_are_kept(fakenet, tmp_path):
    def setup(ws: Path) -> None:
        for name in ("sub", "repo/src", "shared"):
            (ws / name).mkdir(parents=True)
        _git(ws / "repo", "init", "-q")
        os.setxattr(ws / "shared", ACL, SHARED_DEFAULT)

    result = sandbox.run(fakenet, tmp_path, {"acl": python(VARIANTS)}, setup=setup)
    ws = result.steps_dir
    assert result["acl"].out.strip() == "done", result.describe()
    reported = result.summary.get("workspace_planted", [])
    warned = "\n".join(_warned(result))
    for path, name in (
        (ws, ACL),
        (ws / "sub", ACL),
        (ws / "repo/.git", ACL),
        (ws / "new", ACL),
        (ws / "repo/src", "system.posix_acl_access"),
    ):
        assert str(path) in reported, (path, reported, warned)
        assert f"{path}: " in warned and "; write removed from the ACL" in warned, warned
        value = _acl(path, name)
        assert value is None or not _grants_write(value, name), (path, value)
    # What the user's tools make there now takes their umask: not writable by others.
    made = ws / "sub" / "later"
    made.mkdir()
    assert not made.stat().st_mode & 0o022, oct(made.stat().st_mode)
    # Controls: the user's own default ACL stays, and what the task made below it
    # inherited it without a report.
    assert str(ws / "shared") not in reported and str(ws / "shared/inner") not in reported
    assert _acl(ws / "shared") is not None and _acl(ws / "shared/inner") == _acl(ws / "shared")


def _grants_write(value: str, name: str) -> bool:
    """Whether an ACL (hex) lets a group, a named entry, or (a default one) others write."""
    data = bytes.fromhex(value)
    entries = [
        (int.from_bytes(data[i : i + 2], "little"), int.from_bytes(data[i + 2 : i + 4], "little"))
        for i in range(4, len(data), 8)
    ]
    mask = next((perm for tag, perm in entries if tag == 0x10), 7)
    named = {0x02, 0x08} | ({0x04} if name == ACL else set())
    return any(
        perm & 2 and ((tag in named and mask & 2) or (tag == 0x20 and name == ACL))
        for tag, perm in entries
    )


def test_a_default_acl_on_a_rw_root_is_removed_too(fakenet, tmp_path):
    """A `--rw` root is walked as the workspace is: the user's next `python -m venv` or
    `git clone` there would make what others may write."""
    rw = tmp_path / "cache"
    rw.mkdir()
    task = f"""
        import os, struct
        value = struct.pack("<I", 2) + b"".join(
            struct.pack("<HHI", t, p, 0xFFFFFFFF) for t, p in ((1, 7), (4, 5), (0x20, 7))
        )
        os.setxattr({str(rw)!r}, "system.posix_acl_default", value)
        print("done")
    """
    result = sandbox.run(fakenet, tmp_path, {"acl": python(task)}, extra=("--rw", str(rw)))
    assert result["acl"].out.strip() == "done", result.describe()
    assert str(rw) in result.summary.get("workspace_planted", []), result.describe()
    assert _acl(rw) is None
