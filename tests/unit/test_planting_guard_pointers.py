"""The workspace guard's check after the run (planting.py), for what the red team's
sandbox findings 1-5 opened, on real directories without a sandbox: pointers judged by
where the kernel takes them, `.git` files that move a work tree, a stopped rebase's or
cherry-pick's strategy, agent and editor settings, write bits for other accounts. Each
case failed on the code before the fix; the controls (what git itself makes) pass."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import planting

DATA_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tbare = false\n"
CODE_CONFIG = "[core]\n\tfsmonitor = touch /tmp/never\n"
HUSKY_CONFIG = DATA_CONFIG + "\thooksPath = .husky/_\n"


def _git_dir(path: Path, config: str = DATA_CONFIG) -> Path:
    for sub in ("objects", "refs/heads", "hooks", "info"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "config").write_text(config)
    return path


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    _git_dir(root / ".git")
    (root / "src").mkdir()
    return root


def _planted(ws: Path, change) -> dict[str, str]:
    before = planting.survey([ws])
    change(ws)
    return {str(p.path.relative_to(ws)): p.why for p in planting.find_planted(before)}


def _write(relative: str, data: str | bytes):
    def change(ws: Path) -> None:
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            (ws / relative).write_bytes(data)
        else:
            (ws / relative).write_text(data)

    return change


def _hidden(ws: Path, where: str) -> None:
    """A repository with code in its config where the walk does not go."""
    _git_dir(ws / where, CODE_CONFIG)


def _commondir_through_link(ws):
    (ws / ".git/objects/a/b").mkdir(parents=True)
    _hidden(ws, ".git/objects/.git")
    (ws / ".git/L").symlink_to("objects/a/b")
    (ws / ".git/commondir").write_text("L/../../.git\n")


def _commondir_two_lines(ws):
    (ws / ".git/.\n").mkdir()
    _hidden(ws, ".git/objects/x/r")
    (ws / ".git/commondir").write_text(".\n/../objects/x/r\n")


def _gitdir_through_link(ws):
    (ws / "decoy/.git").mkdir(parents=True)
    (ws / "hidden/.git/objects/a/b").mkdir(parents=True)
    _hidden(ws, "hidden/.git/objects/decoy/.git")
    (ws / "src/L").symlink_to("../hidden/.git/objects/a/b")
    (ws / "src/.git").write_text("gitdir: L/../../decoy/.git\n")


def _gitdir_trailing_space(ws):
    (ws / "a/.git").mkdir(parents=True)
    _hidden(ws, "a/hidden/.git/objects/r")
    (ws / "a/.git ").symlink_to("hidden/.git/objects/r")
    (ws / "src/.git").write_text("gitdir: ../a/.git \n")


def _gitdir_to_the_main_git_dir(ws):
    (ws / "src/.git").write_text("gitdir: ../.git\n")


def _gitdir_to_a_submodule_of_elsewhere(ws):
    _git_dir(ws / ".git/modules/m", DATA_CONFIG)
    (ws / "src/.git").write_text("gitdir: ../.git/modules/m\n")


def _worktree_dir_by_hand(ws):
    (ws / "src/.git").mkdir()
    (ws / "src/.git/HEAD").write_text("0" * 40 + "\n")
    (ws / "src/.git/commondir").write_text("../../.git\n")


def _new_worktree(ws, name="t"):
    wt = ws / ".git/worktrees" / name
    wt.mkdir(parents=True)
    (wt / "HEAD").write_text("0" * 40 + "\n")
    (wt / "commondir").write_text("../..\n")
    (wt / "gitdir").write_text(f"{ws}/{name}/.git\n")
    (ws / name).mkdir()
    (ws / name / ".git").write_text(f"gitdir: {wt}\n")


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param(_commondir_through_link, {".git/commondir": "through", ".git/L": "link"}),
        pytest.param(_commondir_two_lines, {".git/commondir": "newline"}),
        pytest.param(_gitdir_through_link, {"src/.git": "through"}),
        pytest.param(_write("src/.git", "gitdir: ../.git\n/../hidden\n"), {"src/.git": "newline"}),
        pytest.param(_write("src/.git", b"gitdir: ../.git\0/x\n"), {"src/.git": "NUL"}),
        pytest.param(_gitdir_trailing_space, {"src/.git": "through"}),
        pytest.param(_gitdir_to_the_main_git_dir, {"src/.git": "work tree is elsewhere"}),
        pytest.param(_worktree_dir_by_hand, {"src/.git/commondir": "worktree git dirs"}),
        pytest.param(
            lambda ws: (ws / ".git/objects-link").symlink_to("objects"),
            {".git/objects-link": "symbolic link in a git directory"},
            id="a-link-in-a-git-dir",
        ),
    ],
)
def test_a_pointer_is_judged_where_the_kernel_takes_it(ws, change, expected):
    found = _planted(ws, change)
    assert found.keys() == expected.keys(), found
    for path, words in expected.items():
        assert words in found[path], found


def test_a_pointer_through_a_magic_link_is_planted(ws, monkeypatch):
    """/proc/self/cwd is the runner's directory to the check, the user's to git."""
    monkeypatch.chdir(ws)
    found = _planted(ws, _write("src/.git", "gitdir: /proc/self/cwd/.git\n"))
    assert "through /proc/self" in found["src/.git"], found


def test_a_gitdir_file_into_a_submodule_of_another_work_tree_is_planted(tmp_path):
    """The user's submodule git dir, its core.worktree `m`: a new `src/.git` naming it."""
    ws = tmp_path / "ws"
    _git_dir(ws / ".git")
    _git_dir(ws / ".git/modules/m", DATA_CONFIG + "\tworktree = ../../../m\n")
    (ws / "m").mkdir()
    (ws / "m/.git").write_text("gitdir: ../.git/modules/m\n")
    (ws / "src").mkdir()
    found = _planted(ws, _write("src/.git", "gitdir: ../.git/modules/m\n"))
    assert "work tree is elsewhere" in found["src/.git"], found


def test_a_new_worktree_of_a_husky_repository_is_planted(tmp_path):
    ws = tmp_path / "ws"
    _git_dir(ws / ".git", HUSKY_CONFIG)
    (ws / ".husky/_").mkdir(parents=True)
    found = _planted(ws, _new_worktree)
    assert found.keys() == {"t/.git"}, found
    assert "core.hookspath = .husky/_" in found["t/.git"], found


def test_control_what_git_makes_is_not_planted(ws):
    """A new linked worktree (its git dir names the `.git` file back), a submodule (its
    core.worktree names the directory, or none), a real worktree's commondir."""

    def change(ws):
        _new_worktree(ws)
        _git_dir(ws / ".git/modules/n")
        (ws / "n").mkdir()
        (ws / "n/.git").write_text("gitdir: ../.git/modules/n\n")

    assert _planted(ws, change) == {}


@pytest.mark.parametrize(
    "relative, text, planted",
    [
        (".git/rebase-merge/strategy", "../x\n", True),
        (".git/rebase-merge/strategy", "ort\n", False),
        (".git/rebase-merge/strategy", "resolve\n", False),
        (".git/rebase-apply/strategy", "x/y\n", True),
        (".git/sequencer/opts", "[options]\n\tstrategy = ../x\n", True),
        (".git/sequencer/opts", "[options]\n\tstrategy = recursive\n\tsignoff = true\n", False),
        (".git/sequencer/opts", "[include]\n\tpath = ../x\n", True),
        (".git/rebase-merge/strategy_opts", "--theirs\n", False),
        (".git/rebase-merge/head-name", "refs/heads/main\n", False),
    ],
)
def test_a_stopped_rebases_strategy_is_judged(ws, relative, text, planted):
    found = _planted(ws, _write(relative, text))
    assert (relative in found) == planted, found
    assert found.keys() <= {relative}, found


@pytest.mark.parametrize(
    "relative",
    [
        ".claude/settings.json",
        ".mcp.json",
        "src/.mcp.json",
        ".gemini/settings.json",
        ".zed/settings.json",
        ".helix/languages.toml",
        ".cursor/mcp.json",
        ".continue/config.yaml",
        ".devcontainer/devcontainer.json",
        "app.code-workspace",
        ".aider.conf.yml",
        ".nvim.lua",
    ],
)
def test_agent_and_editor_settings_are_planted(ws, relative):
    found = _planted(ws, _write(relative, "{}"))
    assert found.keys() == {relative}, found
    assert "editor" in found[relative]


def test_control_files_that_only_look_alike_are_not_planted(ws):
    def change(ws):
        for relative in ("docs/claude.md", "src/mcp.json", "src/zed.toml", "CLAUDE.md"):
            _write(relative, "x")(ws)

    assert _planted(ws, change) == {}


def test_write_bits_the_task_adds_are_removed(ws):
    (ws / "shared").mkdir()
    (ws / "shared").chmod(0o775)  # the user's, before
    (ws / ".git/objects/ab").mkdir()

    def change(ws):
        (ws / ".git").chmod(0o777)
        (ws / ".git/objects/ab").chmod(0o777)  # not walked: its mode is looked at
        (ws / ".git/objects/cd").mkdir()
        (ws / ".git/objects/cd").chmod(0o775)  # new, as core.sharedRepository=group makes
        (ws / ".git/refs").chmod(0o775)
        (ws / "shared").chmod(0o777)
        (ws / "new").mkdir()
        (ws / "new").chmod(0o777)
        (ws / "grouped").mkdir()
        (ws / "grouped").chmod(0o775)  # new and group-writable: the caller's umask may

    before = planting.survey([ws])
    change(ws)
    planted = planting.disarm(planting.find_planted(before))
    found = {str(p.path.relative_to(ws)): p for p in planted}
    assert found.keys() == {".git", ".git/objects/ab", ".git/refs", "shared", "new"}, found
    assert all(p.renamed and "write bits removed" in p.describe() for p in planted)
    modes = {name: stat.S_IMODE(os.stat(ws / name).st_mode) for name in found}
    assert modes == {
        ".git": 0o755,
        ".git/objects/ab": 0o755,
        ".git/refs": 0o755,
        "shared": 0o775,
        "new": 0o775,
    }
    assert stat.S_IMODE(os.stat(ws / "grouped").st_mode) == 0o775
    assert stat.S_IMODE(os.stat(ws / ".git/objects/cd").st_mode) == 0o775


def test_a_loosened_link_is_not_followed(ws, tmp_path):
    """A repaired path is reached with no link on its way: a link swapped in for it
    after the walk leaves the file it points to as it was (reported NOT repaired)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)
    item = planting.Planted(ws / "gone", "test", loosened=0o002)
    (ws / "gone").symlink_to(outside)
    (done,) = planting.disarm([item])
    assert not done.renamed and "NOT repaired" in done.describe()
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o777


def test_a_worktrees_commondir_is_read_only_during_the_run(ws):
    """The pointer to the config and hooks git uses for a worktree: bound read-only, as
    its config, so that the task cannot point it elsewhere while host tools run git."""
    _new_worktree(ws)
    before = planting.survey([ws])
    assert ws / ".git/worktrees/t/commondir" in planting.read_only_binds(before)
