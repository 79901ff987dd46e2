"""Links in the workspace guard: control paths that are symbolic links, and bind
sources swapped for a link between the runner's walk and the init's mount.

1. A git directory's `config`, `config.worktree`, `hooks`, `info`, or a hook in
`hooks/`, may be a link into the work tree (`ln -s ../../scripts/pre-commit
.git/hooks/`). Git follows it on the host, so what it resolves to in a writable root
is guarded as the control path itself (planting.py `_follow_links`): read-only during
the run, judged after it, renamed aside when changed; a link git would follow through
another link the task can change (a chain, a link on the way) or to a writable root
itself cannot be guarded, and the run refuses to start. Each test makes the
repository on the host, lets the task attack, then runs the host's real `git` and
looks for the canary the payload would create; a run with --no-workspace-guard shows
each payload does run on the host without the guard (so a passing case is not a
payload that never worked).

2. The runner walks the workspace without following links, and the init mounted
what it found BY PATH: a task sharing the workspace could swap a path for a link to
a host directory in between and get it mounted writable, idmapped to its owner. The
init now opens every bind source with openat2(RESOLVE_NO_SYMLINKS), checks it is the
inode the walk found, and mounts by descriptor (mounts.open_exact, init.clone_source,
init.attach_bind). The swap is made deterministic with strace: it holds the init's
first open of the source (openat2, or open_tree in the code before) for seconds, the
test swaps the path for a link to a root-only host directory in that window, and the
run must refuse (exit 125) without the task ever running or the host directory being
written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import init, mounts, planting
from support import sandbox
from support.sandbox import eventually
from test_workspace_planting import _git_env, _sh  # the host's git, as that test runs it

pytestmark = pytest.mark.e2e

COMMIT = "git -c user.name=host -c user.email=host@test commit -q --allow-empty -m host"


def _make_repo(path: Path, env: dict[str, str], setup: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = _sh(
        "git init -q -b main . && echo a > a && git add a && git commit -q -m one", path, env
    )
    assert done.returncode == 0, done.stderr
    if setup:
        done = _sh(setup, path, env)
        assert done.returncode == 0, (setup, done.stderr)


def _hook(path: str) -> str:
    """Shell that writes an executable hook at `path` touching the canary {c}."""
    return f"printf '#!/bin/sh\\ntouch {{c}}\\n' > {path}; chmod +x {path}"


# --- 1: control paths that are links into the work tree ---------------------------


@dataclass(frozen=True)
class Link:
    name: str
    setup: str  # shell, in a fresh repository on the host: makes the link
    payload: str  # shell, in that repository, in the sandbox; {c}: the canary
    host: str  # shell, in that repository, on the host, after the run


SCRIPT = "mkdir -p scripts && printf '#!/bin/sh\\ntrue\\n' > scripts/pre-commit && chmod +x scripts/pre-commit"
FSMONITOR = "printf '[core]\\n\\tfsmonitor = \"touch {c}; false\"\\n'"
LINKS = [
    # A common setup: git runs the tracked file the hook links to.
    Link(
        "hook_file",
        f"{SCRIPT} && ln -s ../../scripts/pre-commit .git/hooks/pre-commit",
        _hook("scripts/pre-commit") + "; " + _hook(".git/hooks/pre-commit"),
        COMMIT,
    ),
    # Another: the whole hooks directory is in the work tree.
    Link(
        "hooks_dir",
        "mkdir githooks && touch githooks/.keep && rm -rf .git/hooks && ln -s ../githooks .git/hooks",
        _hook("githooks/post-checkout"),
        "git checkout -q -b other",
    ),
    Link(
        "config",
        "mv .git/config gitconfig-shared && ln -s ../gitconfig-shared .git/config",
        FSMONITOR + " >> gitconfig-shared",
        "git status",
    ),
    Link(
        "config_worktree",
        "git config extensions.worktreeConfig true && touch wt.cfg && ln -s ../wt.cfg .git/config.worktree",
        FSMONITOR + " >> wt.cfg",
        "git status",
    ),
    # The repository's own diff driver runs a program; the attributes choose it.
    Link(
        "info_dir",
        "git config diff.tool.command 'touch {c}; true' && mkdir gitinfo && touch gitinfo/exclude "
        "&& rm -rf .git/info && ln -s ../gitinfo .git/info",
        "echo '* diff=tool' > gitinfo/attributes",
        "echo more >> a; git diff",
    ),
    # A hook that is a link, in a hooks directory that is a link.
    Link(
        "hook_in_linked_dir",
        f"{SCRIPT} && mkdir githooks && rm -rf .git/hooks && ln -s ../githooks .git/hooks "
        "&& ln -s ../scripts/pre-commit githooks/pre-commit",
        _hook("scripts/pre-commit"),
        COMMIT,
    ),
    # A hook linked with an absolute path, and an editor's settings directory linked.
    Link(
        "absolute",
        f"{SCRIPT} && ln -s $PWD/scripts/pre-commit .git/hooks/pre-commit "
        "&& mkdir dotvscode && echo '{{}}' > dotvscode/tasks.json && ln -s dotvscode .vscode",
        _hook("scripts/pre-commit") + "; echo '{{\"tasks\": [\"touch {c}\"]}}' > dotvscode/tasks.json",
        COMMIT,
    ),
]  # fmt: skip


def _canary(link: Link, tag: str) -> Path:
    return Path(f"/tmp/test_workspace_links-{link.name}-{tag}")


def _run_links(net, tmp_path, extra: tuple[str, ...] = ()):
    """One run attacking every LINKS repository; then the host's git in each.
    Returns the run, the workspace, and the names whose canary appeared."""
    tag = secrets.token_hex(3)
    env = _git_env(tmp_path / f"home-{tag}")
    (tmp_path / f"home-{tag}").mkdir()

    def setup(ws: Path) -> None:
        for link in LINKS:
            _make_repo(ws / link.name, env, link.setup.format(c=_canary(link, tag)))

    steps = {
        link.name: f"cd {link.name} && {{ {link.payload.format(c=_canary(link, tag))}; }}"
        for link in LINKS
    }
    try:
        result = sandbox.run(net, tmp_path, steps, extra=extra, setup=setup)
        ws = result.steps_dir
        for link in LINKS:
            _sh(link.host, ws / link.name, env)
        return result, ws, {link.name for link in LINKS if _canary(link, tag).exists()}
    finally:
        for link in LINKS:
            _canary(link, tag).unlink(missing_ok=True)


def test_what_a_control_link_points_to_is_read_only_and_never_runs_on_the_host(net, tmp_path):
    result, ws, appeared = _run_links(net, tmp_path)
    assert result.returncode == 0, result.describe()
    assert not appeared, (appeared, result.describe())
    for link in LINKS:  # each write was refused during the run, not undone after it
        assert "Read-only file system" in result[link.name].err, (link.name, result.describe())
    assert "workspace_planted" not in result.summary, result.summary
    assert (ws / "hooks_dir" / "githooks" / "post-checkout").exists() is False
    assert "fsmonitor" not in (ws / "config" / "gitconfig-shared").read_text()
    assert "tasks" not in (ws / "absolute" / "dotvscode" / "tasks.json").read_text()
    # Git keeps working in them: a commit runs the linked hook (in the sandbox too).
    check = _sh(COMMIT, ws / "hook_file", _git_env(tmp_path))
    assert check.returncode == 0, check.stderr


def test_without_the_guard_every_link_payload_runs_on_the_host(net, tmp_path):
    """The same attacks with --no-workspace-guard: each payload is real. (With the
    code before the fix, the guarded run above behaved as this one.)"""
    result, _, appeared = _run_links(net, tmp_path, ("--no-workspace-guard",))
    assert result.returncode == 0, result.describe()
    assert appeared == {link.name for link in LINKS}, (appeared, result.describe())


REFUSED = [
    # A link on the way: `scripts` is a link the task could point elsewhere.
    pytest.param(
        f"{SCRIPT} && mv scripts tools && ln -s tools scripts "
        "&& ln -s ../../scripts/pre-commit .git/hooks/pre-commit",
        "is a link through",
        id="link-on-the-way",
    ),
    # A chain: the hook links to a link in the work tree.
    pytest.param(
        f"{SCRIPT} && ln -s scripts/pre-commit pc && ln -s ../../pc .git/hooks/pre-commit",
        "is a link through",
        id="chain",
    ),
    # The hooks directory is the work tree itself.
    pytest.param("rm -rf .git/hooks && ln -s .. .git/hooks", "a writable root", id="root"),
]


@pytest.mark.parametrize(("setup", "why"), REFUSED)
def test_a_control_link_that_cannot_be_guarded_refuses_the_run(net, tmp_path, setup, why):
    workdir = sandbox._workdir(tmp_path)
    workspace = workdir / "steps"
    _make_repo(workspace, _git_env(tmp_path), setup)
    argv = sandbox._argv(net, workdir, ["sh", "-c", "echo ran > ran"], sandbox.DEMO_RULES, ())
    proc = net.run_in_host(argv, timeout=60)
    assert proc.returncode == 125, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "is a link" in line]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("sandgate: ") and why in line, proc.stderr
    assert "--no-workspace-guard" in line and "Traceback" not in proc.stderr
    assert not (workspace / "ran").exists()  # the task never ran


def test_a_linked_hook_changed_during_the_run_is_renamed_aside(net, tmp_path):
    """The target is read-only to the task, but something else sharing the workspace
    (here the host, as a concurrent run would) may still change it: the check after
    the run judges it as the hook it is, and renames it aside."""
    env = _git_env(tmp_path)
    tag = secrets.token_hex(3)
    canary = Path(f"/tmp/test_workspace_links-during-{tag}")

    def setup(ws: Path) -> None:
        _make_repo(
            ws / "repo", env, f"{SCRIPT} && ln -s ../../scripts/pre-commit .git/hooks/pre-commit"
        )

    script = "touch ready; while [ ! -e go ]; do sleep 0.05; done"
    run = sandbox.start(net, tmp_path, script, setup=setup)
    try:
        ws = run.workdir / "steps"
        assert eventually(lambda: (ws / "ready").exists(), timeout=60), "the task never started"
        target = ws / "repo" / "scripts" / "pre-commit"
        target.write_text(f"#!/bin/sh\ntouch {canary}\n")
        (ws / "go").touch()
        result = run.finish()
        assert result.returncode == 0, result.describe()
        assert result.summary["workspace_planted"] == [str(target)], result.summary
        [event] = result.events(reason="workspace_planted")
        assert "through a link" in event["detail"] and ".git/hooks/pre-commit" in event["detail"]
        assert (ws / "repo" / "scripts" / "pre-commit.sandgate-planted").exists()
        _sh(COMMIT, ws / "repo", env)
        assert not canary.exists()
    finally:
        run.kill()
        canary.unlink(missing_ok=True)


def test_the_walk_names_what_control_links_resolve_to(tmp_path):
    """planting.survey on its own: each linked target is named, bound read-only
    (read_only_binds) with the inode the init checks (identities); the link met on
    the way or in a chain is refused by name."""
    env = _git_env(tmp_path)
    ws = tmp_path / "ws"
    _make_repo(ws / "hook", env, LINKS[0].setup)
    _make_repo(ws / "dir", env, next(x for x in LINKS if x.name == "hook_in_linked_dir").setup)
    _make_repo(ws / "out", env, f"ln -s {tmp_path}/elsewhere/pc .git/hooks/pre-commit")
    # A linked config is read as git reads it: what it names is guarded too.
    _make_repo(
        ws / "config",
        env,
        "git config core.hooksPath .husky && mkdir .husky && touch .husky/pre-commit "
        "&& mv .git/config shared.cfg && ln -s ../shared.cfg .git/config",
    )
    before = planting.survey([ws])
    assert before.unguardable == []
    assert before.named[ws / "config/shared.cfg"][1] == "include"  # judged as config
    for path in (
        ws / "hook/scripts/pre-commit",
        ws / "dir/githooks",
        ws / "dir/scripts/pre-commit",
        ws / "config/shared.cfg",
        ws / "config/.husky",
    ):
        assert path in before.named, sorted(before.named)
        assert path in planting.read_only_binds(before)
        assert planting.identities(before, [path]) == {
            path: (path.stat().st_dev, path.stat().st_ino)
        }
    assert not [p for p in before.named if "elsewhere" in str(p)]  # out of the roots
    (ws / "hook/scripts/pre-commit").write_text("#!/bin/sh\ntouch /tmp/never\n")
    planted = planting.find_planted(before)
    assert [p.path for p in planted] == [ws / "hook/scripts/pre-commit"], planted


# --- 2: a bind source swapped for a link between the walk and the mount ------------


def test_open_exact_follows_no_link_and_checks_the_inode(tmp_path):
    real = tmp_path / "real"
    (real / "dir").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    (real / "leaf").symlink_to(real / "dir")
    st = (real / "dir").stat()
    for opener in (mounts.open_exact, lambda p, e=None: _components(p, e)):
        fd = opener(str(real / "dir"), (st.st_dev, st.st_ino))
        assert os.fstat(fd).st_ino == st.st_ino
        os.close(fd)
        for path in (tmp_path / "link" / "dir", real / "leaf"):  # on the way; at the end
            with pytest.raises(mounts.Moved, match="symbolic link"):
                os.close(opener(str(path)))
    with pytest.raises(mounts.Moved, match="another file"):
        mounts.open_exact(str(real / "dir"), (st.st_dev, st.st_ino + 1))
    with pytest.raises(mounts.Moved):
        mounts.open_exact(str(real / "dir" / ".."))


def _components(path: str, expect=None) -> int:
    """open_exact's way before openat2 (Linux < 5.6), through the same checks."""
    fd = mounts._open_components([p for p in path.split("/") if p])
    if expect is not None and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != tuple(expect):
        os.close(fd)
        raise mounts.Moved(40, "another file")
    return fd


def test_the_init_refuses_a_bind_source_or_mount_point_that_changed(tmp_path):
    """init.clone_source and init.attach_bind, the init's side, given a spec whose
    source became a link, or another directory, after the walk; and a mount point
    that became a link after the copy. Nothing is mounted: each refuses first."""
    host = tmp_path / "host"
    host.mkdir()
    ws = tmp_path / "ws"
    (ws / ".git").mkdir(parents=True)
    st = (ws / ".git").stat()
    bind = {
        "source": str(ws / ".git"),
        "target": str(ws / ".git"),
        "writable": True,
        "exact": True,
        "inode": [st.st_dev, st.st_ino],
    }
    (ws / ".git").rename(ws / ".git-moved")
    (ws / ".git").symlink_to(host)
    with pytest.raises(init.SetupError, match="refusing to mount .*symbolic link"):
        init.clone_source(bind)
    (ws / ".git").unlink()
    (ws / ".git").mkdir()  # another directory at the path
    with pytest.raises(init.SetupError, match="another file"):
        init.clone_source(bind)
    (ws / ".git").rmdir()
    (ws / ".git").symlink_to(host)
    copy = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # stands in for the tree
    with pytest.raises(init.SetupError, match="mount point"):
        init.attach_bind(copy, bind, (ws / ".git-moved").stat())
    with pytest.raises(OSError):
        os.fstat(copy)  # closed by attach_bind


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _held_in_open(pid: int) -> int | None:
    """A process below `pid` that strace holds at the entry of openat2 (437) or
    open_tree (428), seen twice 50 ms apart."""
    for _ in range(2):
        held = set()
        for each in _descendants(pid):
            try:
                number = (Path(f"/proc/{each}/syscall").read_text().split() or ["-"])[0]
            except OSError:
                continue
            if number in ("428", "437"):
                held.add(each)
        if not held:
            return None
        time.sleep(0.05)
    return next(iter(held))


@pytest.mark.parametrize("which", ["pinned_git_dir", "workspace"])
def test_a_bind_source_swapped_for_a_link_before_the_mount_refuses_the_run(net, tmp_path, which):
    """The swap, made deterministic: strace holds the init's first open of the
    bind source (the workspace, or a pinned `.git`) for 3 s before the kernel looks
    the path up and 3 s after; the test swaps the path for a link to a root-only host
    directory during the first hold and back during the second, as a task of another
    run sharing the workspace would (flipping it back and forth). Before the fix the
    init cloned the host directory by path and mounted it writable, idmapped to root,
    where the workspace's directory is again: the task wrote into it as host root.
    Now the open finds the link and the run refuses before the task."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/install.sh --test installs it)")
    host = tmp_path / "hostdir"
    host.mkdir(mode=0o700)
    (host / "secret.txt").write_text("TOPSECRET\n")
    (host / "secret.txt").chmod(0o600)
    workdir = sandbox._workdir(tmp_path)
    ws = workdir / "steps"
    if which == "pinned_git_dir":
        (ws / "r" / ".git").mkdir(parents=True)  # a git directory by its name alone
    swapped = ws / "r" / ".git" if which == "pinned_git_dir" else ws
    where = "r/.git" if which == "pinned_git_dir" else "."
    task = f"echo TASK-RAN >&2; cat {where}/secret.txt; echo root-was-here > {where}/PWNED"
    argv = sandbox._argv(net, workdir, ["sh", "-c", task], sandbox.DEMO_RULES, ())
    hold = ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(swapped),
            "-e", "trace=open_tree,openat2",
            "-e", "inject=open_tree,openat2:delay_enter=3000000:delay_exit=3000000"]  # fmt: skip
    tracer = net.popen_in_host([*hold, *argv], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    aside = swapped.with_name(swapped.name + ".orig")
    try:
        held = eventually(lambda: _held_in_open(tracer.pid), timeout=60, interval=0.02)
        assert held, "the init never opened the bind source"
        seen = time.monotonic()  # within ~0.1 s of the hold's start
        swapped.rename(aside)
        swapped.symlink_to(host)
        time.sleep(max(0.0, seen + 4.5 - time.monotonic()))  # in the hold after the call
        swapped.unlink()
        aside.rename(swapped)
        out, err = tracer.communicate(timeout=120)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        if swapped.is_symlink():
            swapped.unlink()
        if aside.exists():
            aside.rename(swapped)
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt"], err  # nothing written
    assert "TOPSECRET" not in out and "TASK-RAN" not in err, err  # the task never ran
    assert tracer.returncode == 125, err
    assert "sandgate: sandbox setup failed: refusing to mount" in err, err
    assert "symbolic link" in err and "Traceback" not in err, err
