"""ACLs the task sets in the workspace, found after the run and disarmed
(enforcer/sandbox/planting.py, `_acl_loosened`), on real directories without a sandbox.

A default ACL changes no mode bits but is inherited by what the user's tools create
below the directory later, over their umask (red team kernel, finding 1); an access
ACL's named entries hide behind mode bits the user may already have had. Each new or
changed entry granting write beyond the owner is reported and loses its write; the
user's own ACLs, and what new directories inherit from them, are left.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import planting

U = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
DEFAULT, ACCESS = "system.posix_acl_default", "system.posix_acl_access"


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


BASE = ((USER_OBJ, 7, U), (GROUP_OBJ, 5, U))  # named entries go between (the kernel's order)
OTHERS_WRITE = acl(*BASE, (OTHER, 7, U))
GROUP_WRITE = acl((USER_OBJ, 7, U), (GROUP_OBJ, 7, U), (MASK, 7, U), (OTHER, 5, U))
GROUP_MASKED = acl((USER_OBJ, 7, U), (GROUP_OBJ, 7, U), (MASK, 5, U), (OTHER, 5, U))
READ_ONLY = acl(*BASE, (OTHER, 5, U))


def named_user(uid: int, perm: int = 7) -> bytes:
    return acl((USER_OBJ, 6, U), (USER, perm, uid), (GROUP_OBJ, 4, U), (MASK, 6, U), (OTHER, 4, U))


# Each test right after its workspace is made, and once it has settled (the walk after
# then takes each unchanged directory as the walk before found it: `_unchanged`).
SETTLED = [False]


@pytest.fixture(params=["fresh", "settled"])
def ws(tmp_path, request):
    SETTLED[0] = request.param == "settled"
    root = tmp_path / "ws"
    for sub in ("objects/ab", "refs/heads", "hooks"):
        (root / ".git" / sub).mkdir(parents=True)
    (root / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git/config").write_text("[core]\n\tbare = false\n")
    (root / "src").mkdir()
    return root


def _check(ws: Path, change) -> dict[str, str]:
    """{relative path: why} of what the check after `change` found, once disarmed."""
    before = planting.survey([ws])
    if SETTLED[0]:
        time.sleep(planting.SETTLED_NS / 1e9 + 0.02)
    change(ws)
    done = planting.disarm(planting.find_planted(before, planting.walk_after(before)))
    for item in done:
        assert item.renamed, item.describe()  # repaired in place, never moved
        assert item.disarmed_as == item.path
    return {str(item.path.relative_to(ws)) or ".": item.why for item in done}


def _acl(path: Path, name: str = DEFAULT) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _set(relative: str, value: bytes, name: str = DEFAULT):
    return lambda ws: os.setxattr(ws / relative, name, value)


@pytest.mark.parametrize(
    ("where", "value", "whom"),
    [
        pytest.param(".", OTHERS_WRITE, "every user", id="root-others"),
        pytest.param(".git", GROUP_WRITE, "its group", id="git-group"),
        pytest.param(".git/objects", OTHERS_WRITE, "every user", id="objects"),
        pytest.param(".git/objects/ab", OTHERS_WRITE, "every user", id="loose-object-dir"),
        pytest.param("src", acl((USER_OBJ, 7, U), (USER, 7, 4242), (GROUP_OBJ, 5, U),
                                (MASK, 7, U), (OTHER, 5, U)), "user 4242", id="named-user"),
        pytest.param("src", acl(*BASE, (GROUP, 7, 4242), (MASK, 7, U), (OTHER, 5, U)),
                     "group 4242", id="named-group"),
    ],
)  # fmt: skip
def test_a_default_acl_granting_write_is_removed_and_reported(ws, where, value, whom):
    found = _check(ws, _set(where, value))
    assert "a default ACL the task set" in found[where] and whom in found[where], found
    assert _acl(ws / where) is None
    (ws / where / "later").mkdir()  # the user's next directory there: their umask's mode
    assert not os.stat(ws / where / "later").st_mode & 0o002


def test_a_named_write_in_an_access_acl_loses_its_write_and_keeps_the_rest(ws):
    found = _check(ws, _set(".git/config", named_user(4242), ACCESS))
    assert "user 4242" in found[".git/config"] and "git config" in found[".git/config"], found
    kept = planting._acl_entries(_acl(ws / ".git/config", ACCESS))
    assert (USER, 5, 4242) in kept  # its read stays
    assert planting._acl_writers("access", _acl(ws / ".git/config", ACCESS)) == frozenset()


def test_an_access_acl_on_a_directory_a_named_writer_is_found(ws):
    value = acl((USER_OBJ, 7, U), (USER, 7, 4242), (GROUP_OBJ, 5, U), (MASK, 7, U), (OTHER, 5, U))
    found = _check(ws, _set(".git/hooks", value, ACCESS))
    assert "an ACL the task set on a directory gives user 4242" in found[".git/hooks"], found


def test_a_new_directory_with_its_own_default_acl_is_found(ws):
    def change(ws):
        (ws / "new").mkdir()
        os.setxattr(ws / "new", DEFAULT, OTHERS_WRITE)

    found = _check(ws, change)
    assert "every user" in found["new"], found


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(READ_ONLY, id="no-write"),
        pytest.param(GROUP_MASKED, id="group-write-masked"),
        pytest.param(named_user(4242, 5), id="named-read-only"),
    ],
)
def test_a_default_acl_granting_no_write_is_left(ws, value):
    assert _check(ws, _set(".git", value)) == {}
    assert _acl(ws / ".git") == value


def test_the_users_own_acls_and_what_inherits_them_are_left(ws):
    os.setxattr(ws / "src", DEFAULT, GROUP_WRITE)  # the user's, before the run
    os.setxattr(ws / ".git/config", ACCESS, named_user(4242))

    def change(ws):
        (ws / "src" / "inner").mkdir()  # inherits src's default (and access) ACL
        (ws / "src" / "inner" / "deeper").mkdir()

    assert _check(ws, change) == {}
    assert _acl(ws / "src") == GROUP_WRITE and _acl(ws / "src/inner") == GROUP_WRITE
    assert _acl(ws / ".git/config", ACCESS) == named_user(4242)


def test_a_changed_acl_is_judged_by_the_writers_it_adds(ws):
    os.setxattr(
        ws / "src",
        DEFAULT,
        acl((USER_OBJ, 7, U), (USER, 7, 1111), (GROUP_OBJ, 5, U), (MASK, 7, U), (OTHER, 5, U)),
    )
    changed = acl(
        (USER_OBJ, 7, U), (USER, 7, 1111), (USER, 7, 2222), (GROUP_OBJ, 5, U), (MASK, 7, U),
        (OTHER, 5, U),
    )  # fmt: skip
    found = _check(ws, _set("src", changed))
    assert "user 2222" in found["src"] and "user 1111" not in found["src"], found
    writers = planting._acl_writers("default", _acl(ws / "src"))
    assert writers == {(USER, 1111)}  # the user's writer kept, the task's write gone


def test_after_the_repair_a_second_check_finds_nothing(ws):
    _check(ws, _set(".git", OTHERS_WRITE))
    before = planting.survey([ws])
    assert planting.find_planted(before, planting.walk_after(before)) == []


def test_the_acl_parser_counts_only_writers_past_the_owner():
    assert planting._acl_writers("default", OTHERS_WRITE) == {(OTHER, U)}
    assert planting._acl_writers("access", OTHERS_WRITE) == frozenset()  # the mode's bits
    assert planting._acl_writers("default", GROUP_MASKED) == frozenset()
    assert planting._acl_writers("default", b"junk") == {planting.ACL_UNREADABLE}
