"""Special files (FIFOs, sockets, device nodes) the task leaves where the user's git,
hg or editor opens them (planting: role "special", `_note_specials`).

A red team found it (session 51): a FIFO at `.git/HEAD`, `.git/index`, a new nested
repository's HEAD or `.gitignore` hung the user's `git status` on the host for good
after the run, and nothing was reported.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import planting

SPECIAL = "special file"


def _git_dir(path: Path) -> Path:
    """What `git init` leaves, without git, and one loose object and one pack."""
    for sub in ("objects/ab", "objects/pack", "objects/info", "refs/heads", "hooks", "info"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "config").write_text("[core]\n\tbare = false\n")
    (path / "index").write_bytes(b"DIRC")
    (path / "refs" / "heads" / "main").write_text("0" * 40 + "\n")
    (path / "objects" / "ab" / "cdef").write_bytes(b"x")
    (path / "objects" / "pack" / "pack-1.idx").write_bytes(b"x")
    return path


@pytest.fixture(params=["fresh", "settled"])
def ws(tmp_path, request):
    """A workspace with a repository, just made or settled (planting.SETTLED_NS: the
    walk after takes each unchanged directory as the walk before found it)."""
    root = tmp_path / "ws"
    _git_dir(root / ".git")
    (root / "src").mkdir()
    (root / ".gitignore").write_text("*.o\n")
    if request.param == "settled":
        time.sleep(planting.SETTLED_NS / 1e9 + 0.02)
    return root


def _planted(ws: Path, change) -> dict[str, str]:
    before = planting.survey([ws])
    change(ws)
    return {str(p.path.relative_to(ws)): p.why for p in planting.find_planted(before)}


def _fifo_for(relative: str):
    """The task's `rm -f FILE && mkfifo FILE`."""

    def change(ws: Path) -> None:
        path = ws / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return change


def _new_repo_with_fifo_head(ws: Path) -> None:
    _git_dir(ws / "inner" / ".git")
    _fifo_for("inner/.git/HEAD")(ws)


def _socket_at(relative: str):
    def change(ws: Path) -> None:
        with socket.socket(socket.AF_UNIX) as bound:
            bound.bind(str(ws / relative))

    return change


@pytest.mark.parametrize(
    "change, where",
    [
        pytest.param(_fifo_for(".git/HEAD"), ".git/HEAD", id="head"),
        pytest.param(_fifo_for(".git/index"), ".git/index", id="index"),
        pytest.param(_fifo_for(".git/packed-refs"), ".git/packed-refs", id="packed-refs"),
        pytest.param(_fifo_for(".git/refs/heads/main"), ".git/refs/heads/main", id="a-ref"),
        pytest.param(_fifo_for(".git/info/exclude"), ".git/info/exclude", id="info-exclude"),
        pytest.param(_fifo_for(".git/objects/ab/cdef"), ".git/objects/ab/cdef", id="loose-object"),
        pytest.param(
            _fifo_for(".git/objects/cd/ef01"), ".git/objects/cd/ef01", id="new-object-dir"
        ),
        pytest.param(
            _fifo_for(".git/objects/pack/pack-2.idx"), ".git/objects/pack/pack-2.idx", id="pack"
        ),
        pytest.param(
            _fifo_for(".git/objects/info/alternates"),
            ".git/objects/info/alternates",
            id="alternates",
        ),
        pytest.param(
            _fifo_for(".git/objects/info/commit-graphs/commit-graph-chain"),
            ".git/objects/info/commit-graphs/commit-graph-chain",
            id="commit-graph-chain",
        ),
        pytest.param(_new_repo_with_fifo_head, "inner/.git/HEAD", id="nested-new-repo"),
        pytest.param(_fifo_for(".gitignore"), ".gitignore", id="work-tree-gitignore"),
        pytest.param(_fifo_for("src/.gitattributes"), "src/.gitattributes", id="gitattributes"),
        pytest.param(_fifo_for(".gitmodules"), ".gitmodules", id="gitmodules"),
        pytest.param(_fifo_for(".mailmap"), ".mailmap", id="mailmap"),
        pytest.param(_fifo_for("src/main.py"), "src/main.py", id="any-work-tree-file"),
        pytest.param(_fifo_for(".hg/dirstate"), ".hg/dirstate", id="hg-dirstate"),
        pytest.param(
            _fifo_for(".hg/store/00changelog.i"), ".hg/store/00changelog.i", id="hg-store"
        ),
        pytest.param(_socket_at(".git/index.lock"), ".git/index.lock", id="socket"),
    ],
)
def test_a_special_file_the_task_leaves_is_planted(ws, change, where):
    found = _planted(ws, change)
    assert list(found) == [where], found
    assert SPECIAL in found[where]


def test_it_is_renamed_aside(ws):
    before = planting.survey([ws])
    _fifo_for(".git/HEAD")(ws)
    (done,) = planting.disarm(planting.find_planted(before))
    assert done.disarmed_as == ws / ".git" / f"HEAD{planting.SUFFIX}"
    assert not (ws / ".git" / "HEAD").exists()


def test_the_users_own_special_files_are_not_planted(ws):
    """A FIFO or socket the user had there is theirs, also where the task's commit adds
    objects beside one (the walk lists that objects directory then)."""
    os.mkfifo(ws / "src" / "pipe")
    os.mkfifo(ws / ".git" / "objects" / "ab" / "fifo")
    time.sleep(planting.SETTLED_NS / 1e9 + 0.02)

    def work(ws: Path) -> None:
        (ws / "src" / "main.py").write_text("print()\n")
        (ws / ".git" / "objects" / "ab" / "0123").write_bytes(b"x")

    assert _planted(ws, work) == {}


def test_a_repository_left_alone_has_no_objects_directory_listed(tmp_path, monkeypatch):
    """The walk after lists a git dir's objects directories only where one changed
    since the walk before: none of a settled repository the task left alone, one
    where it added an object."""
    ws = tmp_path / "ws"
    _git_dir(ws / ".git")
    time.sleep(planting.SETTLED_NS / 1e9 + 0.02)
    before = planting.survey([ws])
    listed: list[str] = []
    scandir = os.scandir

    def listing(fd):
        listed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return scandir(fd)

    monkeypatch.setattr(planting.os, "scandir", listing)
    planting.walk_after(before)
    assert not [path for path in listed if "/objects" in path], listed
    (ws / ".git" / "objects" / "ab" / "0123").write_bytes(b"x")
    planting.walk_after(before)
    assert [path for path in listed if "/objects" in path] == [str(ws / ".git/objects/ab")]


def test_a_crowd_of_special_files_stops_the_walk_as_out_of_room(ws, monkeypatch):
    """Each one kept costs the root runner (inodes are free): past MAX_CONTROLS the
    walk stops, and what it did not finish is reported (a new directory goes aside
    whole), never a million records in memory."""
    monkeypatch.setattr(planting, "MAX_CONTROLS", 20)
    before = planting.survey([ws])
    (ws / "crowd").mkdir()
    for n in range(50):
        os.mkfifo(ws / "crowd" / f"f{n}")
    after = planting.walk_after(before)
    assert after.out_of_room
    assert len(after.controls) <= 20
    found = {str(p.path.relative_to(ws)): p for p in planting.find_planted(before, after)}
    assert "crowd" in found and found["crowd"].movable, found
