"""The check after the run (planting.py, mounts.py) against what a task chose to break
it, on real directories without a sandbox (red team `life`, session 47): names that
are not UTF-8, rename-aside names taken first or too long, a suffix inside a name,
paths it cannot reach, a walk past its bounds; and the summary's last line, which
never counts a path still live among the renamed ones. The same in real runs:
tests/e2e/test_workspace_check_hostile_names.py."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import mounts, planting
from sandgate.proxy.telemetry.summary import task_outcome

HOOK = "#!/bin/sh\ntouch /tmp/never\n"
RANDOM = "0123456789abcdef" * 2


def _repo(path: Path) -> Path:
    for sub in ("objects", "refs", "hooks", "info"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    return path


def _hook(hooks: Path, name: str = "pre-commit") -> Path:
    hook = hooks / name
    hook.write_text(HOOK)
    hook.chmod(0o755)
    return hook


def test_a_hook_under_a_name_that_is_not_utf8_is_found_and_renamed(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    before = planting.survey([ws])
    odd = ws / os.fsdecode(b"\xff")  # as os.scandir gives it: surrogate-escaped
    hook = _hook(_repo(odd / ".git") / "hooks")
    (done,) = planting.disarm(planting.find_planted(before))
    assert done.path == hook and done.renamed, done
    assert os.listdir(os.fsencode(odd / ".git/hooks")) == [b"pre-commit.sandgate-planted"]


def test_a_repository_under_a_name_that_is_not_utf8_is_walked_and_opened_exactly(tmp_path):
    git = _repo(tmp_path / os.fsdecode(b"caf\xe9") / ".git")
    (git / "config").write_text("[core]\n\tbare = false\n")
    (git / "commondir").write_text("..\n")
    survey = planting.survey([tmp_path])
    assert git in survey.git_dirs
    fd = mounts.open_exact(str(git), planting.identity(survey, git))
    os.close(fd)


def test_open_exact_reaches_a_path_longer_than_path_max(tmp_path):
    """The walk reaches any depth by descriptor; openat2 refuses a path over PATH_MAX
    (ENAMETOOLONG): then one component at a time, still never through a link."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for n in range(20):
        name = f"{n:03}" + "x" * 250
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)
    deep = str(tmp_path) + "".join(f"/{n:03}" + "x" * 250 for n in range(20))
    assert len(deep) > 4096
    os.close(mounts.open_exact(deep))


def test_mountinfo_names_are_read_as_bytes():
    assert mounts._unescape(b"/tmp/a\\040b/\xff") == "/tmp/a b/" + os.fsdecode(b"\xff")


def test_a_hook_whose_numbered_aside_names_are_all_taken_goes_to_a_random_name(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    taken = ["pre-commit.sandgate-planted"] + [
        f"pre-commit.sandgate-planted-{n}" for n in range(2, 100)
    ]
    for name in taken:
        (hooks / name).write_text("decoy")
    hook = _hook(hooks)
    (done,) = planting.disarm([planting.Planted(hook, "a git hook")])
    assert done.renamed and not hook.exists(), done
    assert done.disarmed_as.read_text() == HOOK
    assert planting._set_aside(done.disarmed_as.name)
    assert all((hooks / name).read_text() == "decoy" for name in taken)


def test_a_name_too_long_for_the_suffix_is_renamed_to_a_short_random_name(tmp_path):
    long = tmp_path / ("t" * 250)
    long.write_text("{}")
    (done,) = planting.disarm([planting.Planted(long, "an editor's settings")])
    assert done.renamed and not long.exists(), done
    assert done.disarmed_as.name.startswith(".sandgate-planted-"), done.disarmed_as


def test_a_path_the_check_cannot_reach_is_reported_not_renamed(tmp_path):
    (tmp_path / "real").mkdir()
    hook = _hook(tmp_path / "real")
    (tmp_path / "link").symlink_to("real")
    reached_by_link = tmp_path / "link" / "pre-commit"
    (done,) = planting.disarm([planting.Planted(reached_by_link, "a git hook")])
    assert not done.renamed and hook.exists()
    assert done.describe().endswith("NOT renamed")


def test_a_path_the_check_cannot_judge_is_planted(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    _repo(ws / ".git")
    before = planting.survey([ws])
    (ws / ".git" / "config").write_text("[core]\n\tbare = false\n")

    def broken(path, limit):
        raise RuntimeError("whatever the check did not foresee")

    monkeypatch.setattr(planting, "_read_small", broken)
    (planted,) = planting.find_planted(before)
    assert planted.path == ws / ".git" / "config" and "could not judge" in planted.why


@pytest.mark.parametrize(
    "name, aside",
    [
        ("pre-commit.sandgate-planted", True),
        ("pre-commit.sandgate-planted-2", True),
        ("pre-commit.sandgate-planted-99", True),
        (f"pre-commit.sandgate-planted-{RANDOM}", True),
        (f".sandgate-planted-{RANDOM}", True),
        ("x.sandgate-planted.xml", False),  # JetBrains reads it: a run configuration
        ("pre-commit.sandgate-planted-x", False),
        ("pre-commit", False),
    ],
)
def test_only_a_trailing_aside_suffix_counts_as_renamed_aside(name, aside):
    assert planting._set_aside(name) is aside


def test_a_run_configuration_with_the_suffix_inside_its_name_is_planted(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    before = planting.survey([ws])
    runs = ws / ".idea" / "runConfigurations"
    runs.mkdir(parents=True)
    (runs / "x.sandgate-planted.xml").write_text("<component/>")
    assert [p.path for p in planting.find_planted(before)] == [runs / "x.sandgate-planted.xml"]


def test_the_not_renamed_are_reported_first_and_counted_in_the_fold(tmp_path):
    items = [planting.Planted(tmp_path / f"r{n}", "x", tmp_path / f"a{n}") for n in range(60)]
    items.append(planting.Planted(tmp_path / "live", "x"))
    shown = planting.summarised(items, limit=5)
    assert shown[0].path == tmp_path / "live" and not shown[0].renamed
    assert "(57 of 57 renamed)" in shown[-1].why


def _tree(ws: Path, count: int) -> None:
    for n in range(count):
        (ws / "crowd" / f"d{n:03}").mkdir(parents=True)


def test_a_walk_past_its_bounds_stops_and_what_it_did_not_finish_is_not_passed(
    tmp_path, monkeypatch
):
    """The task's new tree goes aside whole; the root, the user's, is reported as not
    all checked and left where it is; the user's own directory is never renamed."""
    ws = tmp_path / "ws"
    _hook(_repo(ws / "mine" / ".git") / "hooks", "pre-commit.sample")
    monkeypatch.setattr(planting, "MAX_WALK_DIRS", 50)
    before = planting.survey([ws])
    assert not before.out_of_room
    _tree(ws, 100)
    after = planting.walk_after(before)
    assert after.out_of_room and ws in after.cut
    done = planting.disarm(planting.find_planted(before, after))
    by_path = {item.path: item for item in done}
    assert by_path[ws / "crowd"].renamed and not (ws / "crowd").exists()
    assert not by_path[ws].renamed and "not all of it checked" in by_path[ws].why
    assert (ws / "mine" / ".git").is_dir()
    assert set(by_path) == {ws, ws / "crowd"}


def test_a_walk_past_its_bytes_of_names_stops_too(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setattr(planting, "MAX_WALK_NAME_BYTES", 1000)
    before = planting.survey([ws])
    _tree(ws, 100)
    after = planting.walk_after(before)
    assert after.out_of_room and after.name_bytes <= 1000


def test_a_walk_too_big_to_keep_is_not_written(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    _tree(ws, 100)
    walked = planting.survey([ws])
    cache = tmp_path / "cache"
    monkeypatch.setattr(planting, "KEEP_MAX_BYTES", 1000)
    planting.keep(walked, cache)
    assert not cache.exists() or not os.listdir(cache)
    monkeypatch.setattr(planting, "KEEP_MAX_BYTES", 1 << 20)
    planting.keep(walked, cache)
    assert planting.kept_walk(cache, [ws]) is not None


def test_the_summary_line_never_counts_a_live_path_as_renamed():
    planted = ["/ws/a/.git/hooks/pre-commit", "/ws/b/.git/hooks/pre-commit"]
    line = task_outcome(
        {"exit_code": 0, "workspace_planted": planted, "workspace_not_renamed": planted[1:]}
    )
    assert "1 NOT renamed" in line and "first /ws/b/.git/hooks/pre-commit" in line
    assert "1 renamed to *.sandgate-planted" in line
    assert "renamed to *.sandgate-planted: 2" not in line
    all_renamed = task_outcome({"exit_code": 0, "workspace_planted": planted})
    assert "renamed to *.sandgate-planted: 2 path(s)" in all_renamed


def _deep(root: Path, levels: int = 20) -> Path:
    """A directory below `root` whose path is over PATH_MAX (4096 bytes): made one
    level at a time, by descriptor, as a task can."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for n in range(levels):
        name = f"{n:03}" + "x" * 250
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)
    return root.joinpath(*(f"{n:03}" + "x" * 250 for n in range(levels)))


def _in_deep(path: Path, text: str) -> None:
    """Write `text` at `path` (over PATH_MAX) through a descriptor of its directory."""
    parts = path.parts
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    for part in parts[1:-1]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, dir_fd=fd)
        below = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT, 0o755, dir_fd=fd)
    os.write(out, text.encode())
    os.close(out)
    os.close(fd)


def test_a_hook_deeper_than_path_max_is_renamed_aside(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    before = planting.survey([ws])
    deep = _deep(ws)
    for name in ("HEAD", "objects/x", "refs/x", "hooks/pre-commit"):
        _in_deep(deep / ".git" / name, HOOK)
    (done,) = planting.disarm(planting.find_planted(before))
    assert done.path == deep / ".git/hooks/pre-commit" and done.renamed, done


def test_a_repository_deeper_than_path_max_does_not_break_the_walk_before(tmp_path):
    """Its config cannot be read by path (ENAMETOOLONG): the run refuses with a
    reason (`unguardable`), never an exception out of the walk before the task."""
    deep = _deep(tmp_path)
    for name in ("HEAD", "objects/x", "refs/x", "commondir"):
        _in_deep(deep / ".git" / name, "..\n")
    _in_deep(deep / ".git" / "config", "[core]\n\thooksPath = h\n")
    survey = planting.survey([tmp_path])
    assert deep / ".git" in survey.git_dirs
    assert any("could not be read" in why for why in survey.unguardable), survey.unguardable
