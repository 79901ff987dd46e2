"""The workspace guard's check after the run (enforcer/sandbox/planting.py), on real
directories without a sandbox: what counts as planted, what is left alone, and that
disarming renames exactly the planted paths."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sandgate.enforcer.sandbox import planting

HOOK = "#!/bin/sh\ntouch /tmp/never\n"
DATA_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tbare = false\n"
CODE_CONFIG = "[core]\n\tfsmonitor = touch /tmp/never\n"


def _git_dir(path: Path, config: str = DATA_CONFIG) -> Path:
    """What `git init` leaves, without git: HEAD, objects, refs, config, hooks."""
    for sub in ("objects", "refs/heads", "hooks", "info"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "config").write_text(config)
    (path / "hooks" / "pre-commit.sample").write_text(HOOK)
    (path / "info" / "exclude").write_text("# git ls-files --others --exclude-from\n")
    return path


# Each test in two ways: right after its workspace is made, and once the workspace
# has settled (planting.SETTLED_NS), when the walk after the task takes each directory
# whose inode and ctime did not change as the walk before found it.
SETTLED = [False]  # the running test's mode, for _planted


@pytest.fixture(params=["fresh", "settled"], autouse=True)
def _mode(request):
    SETTLED[0] = request.param == "settled"
    yield
    SETTLED[0] = False


def _settle() -> None:
    time.sleep(planting.SETTLED_NS / 1e9 + 0.02)


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    _git_dir(root / ".git")
    (root / "src").mkdir()
    return root


def _planted(ws: Path, change) -> dict[str, str]:
    if SETTLED[0]:
        _settle()
    before = planting.survey([ws])
    change(ws)
    return {str(p.path.relative_to(ws)): p.why for p in planting.find_planted(before)}


def _write(relative: str, text: str):
    def change(ws: Path) -> None:
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        (ws / relative).write_text(text)

    return change


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param(
            _write(".git/hooks/pre-commit", HOOK),
            {".git/hooks/pre-commit": "a git hook"},
            id="hook",
        ),
        pytest.param(
            _write(".git/config", CODE_CONFIG), {".git/config": "core.fsmonitor"}, id="config"
        ),
        pytest.param(
            _write(".git/config.worktree", CODE_CONFIG),
            {".git/config.worktree": "core.fsmonitor"},
            id="config-worktree",
        ),
        pytest.param(
            _write(".git/info/attributes", "* diff=x\n"),
            {".git/info/attributes": "attributes"},
            id="info-attributes",
        ),
        pytest.param(
            lambda ws: _git_dir(ws / "sub" / ".git", CODE_CONFIG),
            {"sub/.git/config": "core.fsmonitor"},
            id="nested",
        ),
        pytest.param(
            lambda ws: _git_dir(ws / "bare", CODE_CONFIG),
            {"bare/config": "core.fsmonitor"},
            id="bare-repository",
        ),
        pytest.param(
            lambda ws: _git_dir(ws / ".git" / "modules" / "m", CODE_CONFIG),
            {".git/modules/m/config": "core.fsmonitor"},
            id="submodule-git-dir",
        ),
        pytest.param(
            _write("src/.git", "gitdir: /elsewhere/on/the/host\n"),
            {"src/.git": "pointing outside"},
            id="gitfile-outside",
        ),
        pytest.param(
            lambda ws: (ws / "src" / ".git").symlink_to(ws / ".git"),
            {"src/.git": "symbolic link"},
            id="gitfile-link",
        ),
        pytest.param(
            lambda ws: (ws / ".git" / "hooks" / "post-checkout").symlink_to("/bin/true"),
            {".git/hooks/post-checkout": "symbolic link"},
            id="hook-link",
        ),
        pytest.param(
            lambda ws: os.link(ws / ".git" / "config", ws / "src" / "cfg"),
            {".git/config": "hard-linked"},
            id="config-hard-link",
        ),
        pytest.param(
            lambda ws: os.mkfifo(ws / ".git" / "config.worktree"),
            {".git/config.worktree": "special file"},
            id="config-fifo",
        ),
        pytest.param(
            _write(".vscode/tasks.json", "{}"), {".vscode/tasks.json": "editor"}, id="vscode"
        ),
        pytest.param(
            _write("src/.idea/workspace.xml", "<x/>"),
            {"src/.idea/workspace.xml": "editor"},
            id="idea",
        ),
        pytest.param(
            _write(".git/config", "[core\n"),
            {".git/config": "unreadable config"},
            id="unreadable-config",
        ),
    ],
)
def test_what_would_run_on_the_host_is_planted(ws, change, expected):
    found = _planted(ws, change)
    assert found.keys() == expected.keys(), found
    for path, words in expected.items():
        assert words in found[path], found


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_write("src/main.py", "print()\n"), id="work-tree-files"),
        pytest.param(
            _write(".git/config", DATA_CONFIG + '[remote "o"]\n\turl = x\n'), id="remote-add"
        ),
        pytest.param(_write(".git/hooks/post-update.sample", HOOK), id="sample-hook"),
        pytest.param(_write(".git/info/exclude", "*.o\n"), id="info-exclude"),
        pytest.param(_write(".git/refs/heads/feature", "0" * 40 + "\n"), id="a-branch"),
        pytest.param(_write(".git/objects/ab/cdef", "x"), id="an-object"),
        pytest.param(lambda ws: _git_dir(ws / "clone" / ".git"), id="a-clone"),
        pytest.param(
            lambda ws: (
                _git_dir(ws / ".git" / "worktrees" / "t"),
                (ws / ".git" / "worktrees" / "t" / "commondir").write_text("../..\n"),
                (ws / "t").mkdir(),
                (ws / "t" / ".git").write_text(f"gitdir: {ws}/.git/worktrees/t\n"),
                # what `git worktree add` writes: the way back to the `.git` file
                (ws / ".git" / "worktrees" / "t" / "gitdir").write_text(f"{ws}/t/.git\n"),
            ),
            id="a-worktree",
        ),
        pytest.param(
            lambda ws: (
                _git_dir(ws / ".git" / "modules" / "m"),
                (ws / "m").mkdir(),
                (ws / "m" / ".git").write_text("gitdir: ../.git/modules/m\n"),
            ),
            id="a-submodule",
        ),
    ],
)
def test_ordinary_work_is_not_planted(ws, change):
    assert _planted(ws, change) == {}


def test_what_was_there_before_is_not_planted(tmp_path):
    """The user's own hooks and config predate the task: unchanged, they are theirs."""
    root = tmp_path / "ws"
    git = _git_dir(root / ".git", CODE_CONFIG)
    (git / "hooks" / "pre-commit").write_text(HOOK)
    assert _planted(root, lambda ws: None) == {}


def test_a_rewrite_with_the_same_mtime_is_still_a_change(ws):
    def rewrite(ws: Path) -> None:
        config = ws / ".git" / "config"
        st = config.stat()
        config.write_text(CODE_CONFIG[: len(DATA_CONFIG)].ljust(len(DATA_CONFIG)))
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))  # the task can; ctime moves

    assert ".git/config" in _planted(ws, rewrite)


def test_disarm_renames_only_the_planted_paths_beside_them(ws):
    before = planting.survey([ws])
    (ws / ".git" / "hooks" / "pre-commit").write_text(HOOK)
    (ws / ".git" / "hooks" / "pre-commit.sandgate-planted").write_text("an earlier run's")
    (ws / "sub").mkdir()
    (ws / "sub" / ".git").symlink_to("/")
    done = planting.disarm(planting.find_planted(before))
    assert sorted(p.disarmed_as.name for p in done) == [
        ".git.sandgate-planted",
        "pre-commit.sandgate-planted-2",
    ]
    assert not os.path.lexists(ws / ".git" / "hooks" / "pre-commit")
    assert not os.path.lexists(ws / "sub" / ".git")
    assert (ws / "sub" / ".git.sandgate-planted").is_symlink()  # moved, never followed
    assert (ws / ".git" / "hooks" / "pre-commit.sample").exists()
    assert planting.find_planted(planting.survey([ws])) == []  # nothing by those names now


def test_the_walk_never_follows_links_out_of_the_workspace(tmp_path):
    outside = _git_dir(tmp_path / "outside" / ".git", CODE_CONFIG)
    root = tmp_path / "ws"
    root.mkdir()
    (root / "link").symlink_to(outside.parent)
    result = planting.survey([root])
    assert result.git_dirs == set() and list(result.controls) == []


def test_too_deep_to_walk_is_reported(ws, monkeypatch):
    monkeypatch.setattr(planting, "MAX_DEPTH", 3)
    found = _planted(ws, lambda ws: (ws / "a" / "b" / "c" / "d").mkdir(parents=True))
    assert found == {"a/b/c/d": "deeper than 3 directories: not checked"}


def test_many_planted_paths_are_reported_in_a_bounded_list(ws):
    before = planting.survey([ws])
    for n in range(120):
        (ws / ".git" / "hooks" / f"h{n:03}").write_text(HOOK)
    done = planting.disarm(planting.find_planted(before))
    shown = planting.summarised(done)
    assert len(done) == 120 and len(shown) == planting.MAX_REPORTED
    assert "and 70 more planted paths like it (71 of 71 renamed)" in shown[-1].why


def test_during_the_run_git_dirs_are_pinned_and_their_control_files_read_only(ws):
    (ws / "m").mkdir()
    (ws / "m" / ".git").write_text("gitdir: ../.git/modules/m\n")
    _git_dir(ws / ".git" / "modules" / "m")
    before = planting.survey([ws])
    assert planting.pinned_dirs(before) == [ws / ".git", ws / ".git" / "modules" / "m"]
    assert sorted(planting.read_only_binds(before)) == sorted(
        [ws / "m" / ".git"]
        + [ws / ".git" / n for n in ("config", "hooks", "info")]
        + [ws / ".git" / "modules" / "m" / n for n in ("config", "hooks", "info")]
    )


# A repository's own config naming files of its work tree (survey's `named`).
NAMING_CONFIG = """[core]
\trepositoryformatversion = 0
\thooksPath = .husky/_
\tfsmonitor = ./scripts/fsmonitor
\tpager = less -R
\teditor = vim
[include]
\tpath = ../.gitconfig
[filter "tidy"]
\tclean = sh tools/clean.sh --in=%f
[alias]
\tlint = !./lint.sh && echo done
\tst = status
[commit]
\ttemplate = .gitmessage
"""


def _named(ws: Path) -> dict[str, str]:
    before = planting.survey([ws])
    return {str(p.relative_to(ws)): role for p, (_, role) in before.named.items()}


def test_the_work_tree_files_a_config_runs_are_named(ws):
    (ws / ".git" / "config").write_text(NAMING_CONFIG)
    (ws / ".gitconfig").write_text("[diff]\n\texternal = ./tools/diff.sh\n")
    assert _named(ws) == {
        ".husky/_": "named",
        ".husky": "named",  # husky 9's .husky/_/h runs .husky/HOOK
        "scripts/fsmonitor": "named",
        ".gitconfig": "include",
        "tools/diff.sh": "named",  # named by the included file
        "tools/clean.sh": "named",
        "lint.sh": "named",
    }  # not: less, vim (on PATH), .gitmessage (only read as text)


def test_a_repository_without_such_config_names_nothing(ws):
    (ws / ".git" / "config").write_text(
        DATA_CONFIG
        + "[core]\n\tfsmonitor = false\n\tpager = less\n[lfs]\n\trepositoryformatversion = 0\n"
    )
    before = planting.survey([ws])
    assert before.named == {} and before.unguardable == []
    assert sorted(planting.read_only_binds(before)) == [
        ws / ".git" / n for n in ("config", "hooks", "info")
    ]


def test_named_paths_are_read_only_where_they_exist_and_checked_after(ws):
    (ws / ".git" / "config").write_text(NAMING_CONFIG)
    (ws / ".husky" / "_").mkdir(parents=True)
    (ws / ".husky" / "_" / "pre-commit").write_text(HOOK)
    (ws / ".husky" / "pre-commit").write_text("npx lint-staged\n")
    (ws / "lint.sh").write_text("exit 0\n")
    before = planting.survey([ws])
    binds = planting.read_only_binds(before)
    assert {ws / ".husky", ws / ".husky" / "_", ws / "lint.sh"} <= set(binds)
    assert ws / "scripts" / "fsmonitor" not in binds  # missing: checked after the run
    (ws / "lint.sh").write_text(HOOK)  # the binds are not here: the check sees it
    (ws / ".husky" / "post-merge").write_text(HOOK)
    (ws / "scripts").mkdir()
    (ws / "scripts" / "fsmonitor").write_text(HOOK)
    (ws / ".gitconfig").write_text("[user]\n\tname = data only\n")
    (ws / "src" / "main.py").write_text("print()\n")
    found = {str(p.path.relative_to(ws)): p.why for p in planting.find_planted(before)}
    assert found.keys() == {"lint.sh", ".husky/post-merge", "scripts/fsmonitor"}, found
    assert "alias.lint = !./lint.sh" in found["lint.sh"]
    assert "a work-tree file that a repository's config runs" in found["scripts/fsmonitor"]


def test_a_new_named_directory_is_renamed_aside_whole(ws):
    (ws / ".git" / "config").write_text("[core]\n\thooksPath = .githooks\n")
    before = planting.survey([ws])
    (ws / ".githooks").mkdir()
    (ws / ".githooks" / "pre-commit").write_text(HOOK)
    done = planting.disarm(planting.find_planted(before))
    assert [(p.path, p.disarmed_as) for p in done] == [
        (ws / ".githooks", ws / ".githooks.sandgate-planted")
    ]


def test_an_include_outside_the_workspace_is_followed(ws, tmp_path):
    outside = tmp_path / "shared.cfg"
    outside.write_text("[core]\n\tsshCommand = ./bin/ssh-wrapper -v\n")
    (ws / ".git" / "config").write_text(f"[include]\n\tpath = {outside}\n")
    assert _named(ws) == {"bin/ssh-wrapper": "named"}


def test_a_config_naming_the_workspace_itself_cannot_be_guarded(ws):
    (ws / ".git" / "config").write_text("[core]\n\thooksPath = .\n")
    before = planting.survey([ws])
    assert len(before.unguardable) == 1 and "core.hookspath = ." in before.unguardable[0]


def test_paths_git_only_works_in_or_reads_as_data_are_not_named(ws):
    (ws / ".git" / "config").write_text(
        "[core]\n\tworktree = ../src\n[lfs]\n\tfetchinclude = src/assets\n"
        "[http]\n\tproxy = http://proxy.example:8080/x\n[commit]\n\ttemplate = src/msg\n"
    )
    assert _named(ws) == {}


def test_a_link_on_the_way_to_a_named_path_goes_aside(ws):
    (ws / ".git" / "config").write_text("[core]\n\tfsmonitor = ./scripts/fsmonitor\n")
    before = planting.survey([ws])
    (ws / "evil").mkdir()
    (ws / "evil" / "fsmonitor").write_text(HOOK)
    (ws / "scripts").symlink_to("evil")
    done = planting.disarm(planting.find_planted(before))
    assert [(p.path, p.disarmed_as) for p in done] == [
        (ws / "scripts", ws / "scripts.sandgate-planted")
    ]
    assert "core.fsmonitor = ./scripts/fsmonitor" in done[0].why


# --- the walk after the task, from the walk before (survey(since=...)) ----------------


def _same(a: planting.Survey, b: planting.Survey) -> None:
    assert a.controls == b.controls
    assert a.git_dirs == b.git_dirs
    assert sorted(a.too_deep) == sorted(b.too_deep)


def test_an_unchanged_workspace_is_not_read_again(ws, monkeypatch):
    """Settled, the walk after opens each directory and reads none of them: every
    directory's inode and ctime are as the walk before found them. One that changed
    is read again (and only it, with what is new below it)."""
    _settle()
    before = planting.survey([ws])
    read: list[int] = []
    scandir = os.scandir
    monkeypatch.setattr(planting.os, "scandir", lambda fd: read.append(fd) or scandir(fd))
    _same(planting.survey([ws], since=before), planting.survey([ws]))
    assert len(read) == len(before.dirs)  # the whole walk, for comparison
    read.clear()
    after = planting.survey([ws], follow_configs=False, since=before)
    assert read == []
    _same(after, before)
    (ws / "src" / "new").mkdir()
    planting.survey([ws], follow_configs=False, since=before)
    assert len(read) == 2  # src (changed) and src/new (new)


def test_a_directory_of_another_file_system_is_read_again(ws, monkeypatch):
    _settle()
    before = planting.survey([ws])
    monkeypatch.setattr(planting, "_ctime_trusted", lambda fd: False)
    read: list[int] = []
    scandir = os.scandir
    monkeypatch.setattr(planting.os, "scandir", lambda fd: read.append(fd) or scandir(fd))
    planting.survey([ws], follow_configs=False, since=before)
    # and each directory of a git dir's objects, for special files (`_note_specials`)
    objects = sum(bin(found).count("1") for found in before.noted.values())
    assert len(read) == len(before.dirs) + objects


def test_a_changed_control_file_in_an_unchanged_directory_is_found(ws):
    """Its directory's entries are the same: the walk after states it again."""
    _settle()
    before = planting.survey([ws])
    (ws / ".git" / "config").write_text(CODE_CONFIG)
    found = planting.find_planted(before)
    assert [str(p.path.relative_to(ws)) for p in found] == [".git/config"]


# What a task may do to a settled workspace, one step at a time (paths below it).
NAMES = st.sampled_from(["a", "b", ".git", "hooks", "info", ".vscode", "HEAD", "objects", "refs"])
PATHS = st.lists(NAMES, min_size=1, max_size=4).map("/".join)
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["mkdir", "write", "remove", "rename", "link", "chmod"]), PATHS, PATHS
    ),
    min_size=1,
    max_size=8,
)


def _settled_tree(tmp_path_factory) -> Path:
    """A workspace with two repositories and an editor directory, settled."""
    root = tmp_path_factory.mktemp("ws")
    _git_dir(root / ".git")
    _git_dir(root / "a" / "nested" / ".git")
    (root / "b" / ".vscode").mkdir(parents=True)
    (root / "b" / ".vscode" / "tasks.json").write_text("{}")
    _settle()
    return root


def _apply(root: Path, step: tuple[str, str, str]) -> None:
    what, path, other = step
    target, second = root / path, root / other
    try:
        if what == "mkdir":
            target.mkdir(parents=True)
        elif what == "write":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(HOOK)
        elif what == "remove":
            shutil.rmtree(
                target
            ) if target.is_dir() and not target.is_symlink() else target.unlink()
        elif what == "rename":
            second.parent.mkdir(parents=True, exist_ok=True)
            target.rename(second)
        elif what == "link":
            second.parent.mkdir(parents=True, exist_ok=True)
            second.symlink_to(other)
        elif what == "chmod":
            target.chmod(0o700)
    except OSError:
        pass  # a step that does not apply (a missing path, a file where a directory is)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=STEPS)
def test_the_walk_after_finds_what_a_whole_walk_finds(tmp_path_factory, steps):
    """Whatever a task does to a settled workspace, the walk after that starts from
    the walk before finds the same control paths, git directories and too-deep
    directories as a whole walk of the workspace then."""
    root = _settled_tree(tmp_path_factory)
    before = planting.survey([root])
    for step in steps:
        _apply(root, step)
    _same(planting.survey([root], follow_configs=False, since=before), planting.survey([root]))


# --- the walk after kept for the next run's walk before (keep, kept_walk) --------------


def test_a_kept_walk_reads_back_as_it_was_written(ws, tmp_path):
    _settle()
    walked = planting.walk_after(planting.survey([ws]))
    cache = tmp_path / "cache"
    planting.keep(walked, cache)
    kept = planting.kept_walk(cache, [ws])
    assert kept is not None and kept.dirs == walked.dirs
    assert kept.started_ns == walked.started_ns
    assert planting.kept_walk(cache, [ws, tmp_path]) is None  # other roots: not theirs
    os.chmod(cache, 0o777)
    assert planting.kept_walk(cache, [ws]) is None  # no longer private: not trusted


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(lambda d: d["dirs"][0][7].append("../.."), id="subdir-up"),
        pytest.param(lambda d: d["dirs"][0][7].append("a/b"), id="subdir-path"),
        pytest.param(lambda d: d["dirs"][0][9].append("."), id="deep-dot"),
        pytest.param(lambda d: d["dirs"][0][7].append("a\x00b"), id="subdir-nul"),
        pytest.param(lambda d: d["dirs"][0][8].append(["../x", "hook"]), id="control-up"),
        pytest.param(lambda d: d["dirs"][0][8].append(["x", "nothing"]), id="unknown-role"),
        pytest.param(lambda d: d["dirs"][0].__setitem__(0, -1), id="root-index"),
        pytest.param(lambda d: d["dirs"][0].__setitem__(3, "1"), id="inode-text"),
        pytest.param(lambda d: d["dirs"][0].__setitem__(6, "root"), id="unknown-context"),
        pytest.param(lambda d: d.__setitem__("started_ns", True), id="start-bool"),
    ],
)
def test_a_kept_walk_that_does_not_read_back_is_not_used(ws, tmp_path, forged):
    """A record is trusted (a directory it calls unchanged is not read), so one that is
    not what `keep` writes is refused whole, and above all a name that is a path."""
    import json

    cache = tmp_path / "cache"
    planting.keep(planting.survey([ws]), cache)
    (path,) = cache.glob("walk-*.json")
    document = json.loads(path.read_text())
    forged(document)
    path.write_text(json.dumps(document))
    assert planting.kept_walk(cache, [ws]) is None


def test_the_oldest_kept_walks_go(tmp_path, monkeypatch):
    monkeypatch.setattr(planting, "KEEP_FILES", 2)
    cache = tmp_path / "cache"
    for n in range(4):
        root = tmp_path / f"ws{n}"
        root.mkdir()
        planting.keep(planting.survey([root]), cache)
        time.sleep(0.01)
    assert planting.kept_walk(cache, [tmp_path / "ws3"]) is not None
    assert planting.kept_walk(cache, [tmp_path / "ws0"]) is None
    assert len(list(cache.glob("walk-*.json"))) == 2


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(task=STEPS, between=STEPS)
def test_the_next_walk_before_from_a_kept_walk_finds_what_a_whole_walk_finds(
    tmp_path_factory, task, between
):
    """A run's walk after its task, kept; then whatever changes before the next run
    (the host's own work): that run's walk before, from the kept walk, finds what a
    whole walk finds, and so does its walk after."""
    root = _settled_tree(tmp_path_factory)
    cache = root.parent / f"{root.name}-cache"
    before = planting.survey([root])
    for step in task:
        _apply(root, step)
    planting.keep(planting.walk_after(before), cache)
    for step in between:
        _apply(root, step)
    again = planting.survey([root], since=planting.kept_walk(cache, [root]))
    whole = planting.survey([root])
    _same(again, whole)
    assert again.named == whole.named
