"""What a task plants in its workspace for the host's git to run later (planting.py).

Every variant is a repository (or a plain directory) under the workspace, made on
the host before the run; the task plants its payload there; then the TEST runs real
`git` on the host in it (status, diff, commit, checkout, fetch: whatever would run
the payload) and looks for the canary the payload would create, a file under /tmp
named for this test. The sandbox's own /tmp is a tmpfs: a payload that ran inside
(the task's own git) creates nothing the host sees.

One guarded run holds every variant and the legitimate work; one run with
--no-workspace-guard holds the same variants and shows that each payload does run
on the host without the guard (so a passing guarded case is not a payload that
never worked).
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import planting
from support import sandbox, service

pytestmark = pytest.mark.e2e

NAME = "test_workspace_planting"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "repo" (a repository made before the run), "plain" (a directory), "mount"
    payload: str  # shell, in the variant's directory, in the sandbox; {c} is the canary
    host: str  # shell, in `where` below the variant's directory, on the host
    where: str = "."
    setup: str = ""  # shell, in the variant's repository on the host, before the run


def _hook(path: str) -> str:
    """Shell that writes an executable hook at `path` touching the canary."""
    return f"printf '#!/bin/sh\\ntouch {{c}}\\n' > {path}; chmod +x {path}"


COMMIT = "git -c user.name=host -c user.email=host@test commit -q --allow-empty -m host"
# husky 9's layout: core.hooksPath = .husky/_, whose hooks run .husky/_/h, which runs
# the tracked .husky/HOOK that developers (and tasks) edit.
HUSKY = (
    'mkdir -p .husky/_ && printf \'#!/bin/sh\\n. "$(dirname "$0")/h"\\n\' > .husky/_/pre-commit && '
    'printf \'#!/bin/sh\\nexec sh -e "$(dirname "$0")/../$(basename "$0")"\\n\' > .husky/_/h && '
    "chmod +x .husky/_/pre-commit && echo true > .husky/pre-commit && "
    'echo \'{"name": "app", "version": "1.0.0"}\' > package.json && mkdir lib && '
    'echo \'{"name": "lib", "version": "1.0.0"}\' > lib/package.json && '
    "git add .husky/pre-commit package.json lib && git commit -q -m husky && "
    "git config core.hooksPath .husky/_"
)
VARIANTS = [
    Variant("hook", "repo", _hook(".git/hooks/pre-commit"), COMMIT),
    Variant("fsmonitor", "repo", "git config core.fsmonitor 'touch {c}; false'", "git status"),
    Variant(
        "hooks_path",
        "repo",
        "mkdir -p h; " + _hook("h/pre-commit") + "; git config core.hooksPath h",
        COMMIT,
    ),
    Variant(
        "ssh_command",
        "repo",
        "git config core.sshCommand 'touch {c}; false'",
        "git fetch -q ssh://example.invalid/x",
    ),
    Variant(
        "diff_external",
        "repo",
        "git config diff.external 'touch {c}; true'",
        "echo more >> a; git diff",
    ),
    Variant(
        "filter_driver",
        "repo",
        "echo '* filter=evil' > .gitattributes; git config filter.evil.clean 'touch {c}; cat'",
        "echo more >> a; git add a",
    ),
    Variant(
        "include_path",
        "repo",
        "printf '[core]\\n\\tfsmonitor = touch {c}; false\\n' > ../inc_{name}.cfg; "
        "git config include.path ../../inc_{name}.cfg",
        "git status",
    ),
    Variant(
        "info_attributes",
        "repo",
        "echo '* diff=evil' > .git/info/attributes; git config diff.evil.command 'touch {c}; true'",
        "echo more >> a; git diff",
    ),
    Variant(
        "submodule",
        "submodule",
        "git -C sm config core.fsmonitor 'touch {c}; false'; " + _hook(".git/modules/sm/hooks/post-checkout"),
        "git status; git submodule update --force --checkout",
    ),
    Variant(
        "worktree",
        "worktree",
        "cd tree && git config extensions.worktreeConfig true; "
        "printf '[core]\\n\\tfsmonitor = touch {c}; false\\n' > ../.git/worktrees/tree/config.worktree",
        "git status",
        where="tree",
    ),
    Variant("git_init", "plain", "git init -q; " + _hook(".git/hooks/pre-commit"), COMMIT),
    Variant(
        "renamed_git",
        "repo",
        "mv .git .git.old; git init -q; " + _hook(".git/hooks/pre-commit"),
        COMMIT,
    ),
    Variant(
        "git_file",
        "plain",
        "git init -q --separate-git-dir=$PWD/store wt; git -C wt config core.fsmonitor 'touch {c}; false'",
        "git status",
        where="wt",
    ),
    Variant(
        "nested_repo",
        "repo",
        "git init -q nested; git -C nested config core.fsmonitor 'touch {c}; false'",
        "git status",
        where="nested",
    ),
    Variant(
        "bare_repo",
        "plain",
        "git init -q --bare .; git config core.sshCommand 'touch {c}; false'",
        "git fetch -q ssh://example.invalid/x",
    ),
    Variant(
        "symlink",
        "repo",
        "mkdir -p ../evil_{name}; " + _hook("../evil_{name}/pre-commit")
        + "; rm -rf .git/hooks; ln -s $PWD/../evil_{name} .git/hooks; "
        "git init -q new; ln -s ../../../evil_{name}/pre-commit new/.git/hooks/pre-commit",
        COMMIT + "; cd new && " + COMMIT,
    ),
    # An interactive rebase stopped at `break`: the host's `git rebase --continue`
    # picks on and runs the `exec` line the task put after it.
    Variant(
        "rebase_exec",
        "repo",
        "git -c user.name=t -c user.email=t@test commit -q --allow-empty -m two; "
        "GIT_SEQUENCE_EDITOR=\"sed -i '1i break'\" git -c user.name=t -c user.email=t@test "
        "rebase -q -i HEAD~1 --exec 'touch {c}'",
        "git -c user.name=host -c user.email=host@test rebase --continue",
    ),
    Variant(
        "hardlink",
        "repo",
        "ln .git/config cfg; printf '[core]\\n\\tfsmonitor = touch {c}; false\\n' >> cfg",
        "git status",
    ),
    # A repository's own config (made before the run) runs files of its work tree.
    Variant("husky", "repo", "echo 'touch {c}' >> .husky/pre-commit", COMMIT, setup=HUSKY),
    Variant(
        "hooks_dir_new",
        "repo",
        "mkdir .githooks; " + _hook(".githooks/pre-commit"),
        COMMIT,
        setup="git config core.hooksPath .githooks",
    ),
    Variant(
        "include_worktree",
        "repo",
        "printf '[core]\\n\\tfsmonitor = touch {c}; false\\n' >> .gitconfig",
        "git status",
        setup="printf '[user]\\n\\tname = shared\\n' > .gitconfig && git config include.path ../.gitconfig",
    ),
    Variant(
        "fsmonitor_script",
        "repo",
        "printf '#!/bin/sh\\ntouch {c}\\nexit 1\\n' > scripts/fsmonitor",
        "git status",
        setup="mkdir scripts && printf '#!/bin/sh\\nexit 1\\n' > scripts/fsmonitor && "
        "chmod +x scripts/fsmonitor && git config core.fsmonitor ./scripts/fsmonitor",
    ),
    Variant(
        "filter_script",
        "repo",
        "echo '*.txt filter=tidy' > .gitattributes; printf '#!/bin/sh\\ntouch {c}\\ncat\\n' > tools/clean.sh",
        "echo x > f.txt; git add f.txt",
        setup="mkdir tools && printf '#!/bin/sh\\ncat\\n' > tools/clean.sh && chmod +x tools/clean.sh && "
        "git config filter.tidy.clean ./tools/clean.sh",
    ),
    Variant(
        "alias_script",
        "repo",
        "printf '#!/bin/sh\\ntouch {c}\\n' > lint.sh",
        "git lint",
        setup="printf '#!/bin/sh\\necho lint\\n' > lint.sh && chmod +x lint.sh && "
        "git config alias.lint '!./lint.sh'",
    ),
    Variant(
        "mounted_git",
        "mount",
        "mv .git .git.old; " + _hook(".git/hooks/pre-commit") + "; " + _hook(".git.old/hooks/pre-commit"),
        COMMIT,
    ),
]  # fmt: skip


def _git_env(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "setup",
        "GIT_AUTHOR_EMAIL": "setup@test",
        "GIT_COMMITTER_NAME": "setup",
        "GIT_COMMITTER_EMAIL": "setup@test",
    }


def _sh(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=20
    )


def _make_repo(path: Path, env: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = _sh(
        "git init -q -b main . && echo a > a && git add a && git commit -q -m one", path, env
    )
    assert done.returncode == 0, done.stderr


def canary(variant: Variant, tag: str) -> Path:
    return Path(f"/tmp/{NAME}-{variant.name}-{tag}")


def steps_for(tag: str) -> dict[str, str]:
    """Each variant's payload as a step, in its own directory."""
    steps = {}
    for v in VARIANTS:
        payload = v.payload.format(c=canary(v, tag), name=v.name)
        steps[v.name] = f"cd {shlex.quote(v.name)} && {{ {payload}; }}"
    return steps


@dataclass
class Layout:
    """The variants' directories of one run, and what the test must undo."""

    workspace: Path
    env: dict[str, str]
    tag: str
    mounts: list[Path]

    def run_on_host(self, variant: Variant) -> subprocess.CompletedProcess:
        return _sh(variant.host, self.workspace / variant.name / variant.where, self.env)

    def appeared(self) -> set[str]:
        """The variants whose canary exists: their payload ran on the host."""
        return {v.name for v in VARIANTS if canary(v, self.tag).exists()}

    def undo(self) -> None:
        for mount in self.mounts:
            subprocess.run(["umount", str(mount)], capture_output=True)
        for variant in VARIANTS:
            canary(variant, self.tag).unlink(missing_ok=True)


def make_layout(tmp_path: Path, workspace: Path, tag: str) -> Layout:
    home = tmp_path / f"home-{tag}"
    home.mkdir()
    layout = Layout(workspace, _git_env(home), tag, [])
    source = tmp_path / f"sub-source-{tag}"
    _make_repo(source, layout.env)
    _make_repo(workspace / "legit", layout.env)
    for variant in VARIANTS:
        where = workspace / variant.name
        if variant.kind == "plain":
            where.mkdir()
        elif variant.kind in ("repo", "submodule", "worktree"):
            _make_repo(where, layout.env)
        if variant.setup:
            done = _sh(variant.setup, where, layout.env)
            assert done.returncode == 0, (variant.name, done.stderr)
        if variant.kind == "submodule":
            done = _sh(
                f"git -c protocol.file.allow=always submodule add -q {source} sm "
                "&& git commit -q -m sm",
                where,
                layout.env,
            )
            assert done.returncode == 0, done.stderr
        if variant.kind == "worktree":
            done = _sh("git worktree add -q tree", where, layout.env)
            assert done.returncode == 0, done.stderr
        if variant.kind == "mount":
            # The repository's .git is a mount point (a bind of a git directory kept
            # elsewhere, as a container volume would be); unmounted by the test.
            store = tmp_path / f"store-{tag}"
            _make_repo(store, layout.env)
            where.mkdir()
            (where / ".git").mkdir()
            (where / "a").write_text("a\n")
            mount = ["mount", "--bind", str(store / ".git"), str(where / ".git")]
            subprocess.run(mount, check=True)
            layout.mounts.append(where / ".git")
    return layout


LEGIT = (
    "git -C submodule/sm status --short && git -C worktree/tree status --short && "
    "cd legit && git checkout -q -b feature && echo work > work.txt && git add work.txt && "
    "git -c user.name=agent -c user.email=agent@test commit -q -m work && "
    "git checkout -q main && "
    "git -c user.name=agent -c user.email=agent@test merge -q --no-ff -m merge feature && "
    "git clone -q . ../legit_clone && git -C ../legit_clone log --oneline | wc -l"
)
CONFIG_WRITE = "cd legit && git config user.name agent"
# Legitimate work in a husky repository: edit and commit (the hook runs, in the
# sandbox), `npm install` writing node_modules.
HUSKY_LEGIT = (
    "cd husky && echo work >> a && git add a && "
    "git -c user.name=agent -c user.email=agent@test commit -q -m work && "
    "npm install --offline --no-audit --no-fund --no-update-notifier --install-links ./lib "
    "&& ls node_modules/lib"
)


def _run(net, tmp_path, extra: tuple[str, ...] = (), settled: bool = False):
    """One run of every variant (and the legitimate work); the host's git after it.
    `settled`: the workspace made a while before the run, so that the walk after the
    task takes each unchanged directory as the walk before found it (planting.py)."""

    def setup(ws: Path) -> None:
        layouts.append(make_layout(tmp_path, ws, tag))
        if settled:
            time.sleep(planting.SETTLED_NS / 1e9 + 0.1)

    tag = secrets.token_hex(3)
    layouts: list[Layout] = []
    steps = {
        **steps_for(tag),
        "legit": LEGIT,
        "config_write": CONFIG_WRITE,
        "husky_legit": HUSKY_LEGIT,
    }
    try:
        result = sandbox.run(
            net,
            tmp_path,
            steps,
            extra=extra,
            setup=setup,
        )
        layout = layouts[0]
        ran = {v.name: layout.run_on_host(v) for v in VARIANTS}
        return result, layout, ran, layout.appeared()
    finally:
        for layout in layouts:
            layout.undo()


@pytest.mark.parametrize("settled", [False, True], ids=["fresh", "settled"])
def test_planted_payloads_never_run_on_the_host(net, tmp_path, settled):
    result, layout, ran, appeared = _run(net, tmp_path, settled=settled)
    assert result.returncode == 0, result.describe()
    assert not appeared, (appeared, {n: ran[n].stderr[-300:] for n in appeared})
    planted = result.events(reason="workspace_planted")
    assert planted and all(e["rule_id"] == "builtin:workspace-planted" for e in planted)
    ws = layout.workspace
    # What only the after-the-run check can catch was caught and renamed aside.
    for path in (
        ws / "git_init/.git/hooks/pre-commit.sandgate-planted",
        ws / "git_file/store/config.sandgate-planted",
        ws / "nested_repo/nested/.git/config.sandgate-planted",
        ws / "bare_repo/config.sandgate-planted",
        ws / "symlink/new/.git/hooks/pre-commit.sandgate-planted",
        ws / "worktree/.git/worktrees/tree/config.worktree.sandgate-planted",
    ):
        assert os.path.lexists(path), (path, result.describe())
    details = " ".join(e.get("detail", "") for e in planted)
    assert "core.fsmonitor" in details and "a git hook" in details, details
    assert str(ws / "git_init/.git/hooks/pre-commit") in result.summary["workspace_planted"]
    # What the mounts refused during the run, as the task saw it.
    assert "busy" in result["renamed_git"].err, result["renamed_git"].err
    assert "Read-only file system" in result["hook"].err, result["hook"].err
    assert "cross-device" in result["hardlink"].err, result["hardlink"].err
    # Legitimate work: branches, commits, checkout, merge, a clone; nothing flagged there.
    legit = result["legit"]
    assert legit.rc == 0 and legit.out.strip() == "3", result.describe()
    log = _sh("git log --oneline feature", ws / "legit", layout.env)
    assert "work" in log.stdout, log
    assert not [p for p in result.summary["workspace_planted"] if "/legit" in p]
    # What stops working: writing .git/config of a repository that was there before.
    config = result["config_write"]
    assert config.rc != 0 and "could not" in config.err.lower(), config.err
    # Work-tree files the repositories' own configs run: read-only during the run...
    for name in ("husky", "include_worktree", "fsmonitor_script", "filter_script", "alias_script"):
        assert "Read-only file system" in result[name].err, (name, result[name].err)
    assert (ws / "filter_script" / ".gitattributes").exists()  # data: the task may write it
    # ...and one that did not exist is renamed aside after it.
    assert (ws / "hooks_dir_new" / ".githooks.sandgate-planted" / "pre-commit").exists()
    assert "core.hookspath = .githooks" in details, details
    # Legitimate work in the husky repository: a commit (its hook ran in the sandbox)
    # and `npm install` writing node_modules.
    husky = result["husky_legit"]
    assert husky.rc == 0 and "package.json" in husky.out, result.describe()
    assert (ws / "husky" / "node_modules" / "lib" / "package.json").exists()
    assert "work" in _sh("git log --format=%s -3", ws / "husky", layout.env).stdout.split()
    assert not [p for p in result.summary["workspace_planted"] if "/husky" in p]


def test_without_the_guard_every_payload_runs_on_the_host(net, tmp_path):
    """--no-workspace-guard: the opt-out, recorded as a weakened sandbox; and proof
    that each variant's payload is real."""
    result, _, ran, appeared = _run(net, tmp_path, ("--no-workspace-guard",))
    assert result.returncode == 0, result.describe()
    missing = {v.name for v in VARIANTS} - appeared
    assert not missing, (
        missing,
        {n: (ran[n].stdout[-200:], ran[n].stderr[-300:]) for n in missing},
    )
    weakened = result.events(reason="sandbox_weakened")
    assert [e["rule_id"] for e in weakened] == ["builtin:weakened-workspace-guard"], weakened
    assert result.summary["sandbox_weakened"] == ["workspace-guard"]
    assert not result.events(reason="workspace_planted")


GIT_SERVER_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        ports: [8080]
        id: git-server
"""


def test_git_fetch_through_the_gateway_into_a_guarded_repository(net, tmp_path):
    """A repository made before the run fetches and fast-forwards from a git server
    in the fake internet (dumb HTTP) through the gateway; nothing is planted."""
    env = _git_env(tmp_path)
    origin = tmp_path / "srv" / "origin.git"
    origin.parent.mkdir()
    seed = tmp_path / "seed"
    _make_repo(seed, env)
    assert _sh(f"git clone -q --bare . {origin}", seed, env).returncode == 0
    rules = tmp_path / "rules.yaml"
    rules.write_text(GIT_SERVER_RULES)

    def setup(workspace: Path) -> None:
        repo = workspace / "repo"
        done = _sh(
            f"git clone -q {origin} {repo} && cd {repo} && "
            "git remote set-url origin http://allowed.test:8080/origin.git && "
            f"cd {seed} && echo two >> a && git commit -qam two && git push -q {origin} main && "
            f"git -C {origin} update-server-info",
            tmp_path,
            env,
        )
        assert done.returncode == 0, done.stderr

    server = sandbox.subprocess.Popen(
        ["ip", "netns", "exec", net.internet_ns, sandbox.PYTHON, "-u", "-m", "http.server",
         "8080", "--bind", "203.0.113.10", "--directory", str(origin.parent)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert "Serving HTTP" in server.stdout.readline()
        fetch = (
            "cd repo && git fetch -q origin && git merge -q --ff-only origin/main && "
            "git log --oneline | wc -l"
        )
        result = sandbox.run(net, tmp_path, {"fetch": fetch}, rules=rules, setup=setup)
    finally:
        server.kill()
        server.wait()
    assert result["fetch"].rc == 0 and result["fetch"].out.strip() == "2", result.describe()
    assert result.verdicts(kind="request", reason="rule_allow") == {
        ("allow", "rule_allow", "git-server")
    }, result.describe()
    assert "workspace_planted" not in result.summary


def test_a_run_attached_to_the_gateway_service_is_checked_too(net, tmp_path):
    """`sandgate run --gateway` (the lean runner, in-process or a warm one): the same
    check after the run, its event in the service's audit log and summary."""
    variant = next(v for v in VARIANTS if v.name == "git_init")
    tag = secrets.token_hex(3)
    steps = {"git_init": f"mkdir git_init && {steps_for(tag)['git_init']}"}
    try:
        with service.running(net, tmp_path, service.TWO_PROFILES) as gw:
            result = service.attach(gw, tmp_path, steps)
        layout = Layout(result.steps_dir, _git_env(tmp_path), tag, [])
        layout.run_on_host(variant)
        assert not layout.appeared(), result.describe()
    finally:
        canary(variant, tag).unlink(missing_ok=True)
    assert result.returncode == 0, result.describe()
    hook = result.steps_dir / "git_init" / ".git" / "hooks" / "pre-commit"
    assert not hook.exists() and hook.with_name("pre-commit.sandgate-planted").exists()
    assert result.summary["workspace_planted"] == [str(hook)], result.summary
    planted = result.events(reason="workspace_planted")
    assert [e["rule_id"] for e in planted] == ["builtin:workspace-planted"], result.describe()
    assert str(hook) in planted[0]["detail"]
    assert "PLANTED for the host" in result.stdout + result.stderr


def test_the_next_run_in_a_workspace_starts_from_the_last_runs_walk(net, tmp_path):
    """A run's walk after its task is kept (root-only, planting.keep), and the next run
    in the same workspace walks before its task from it: what the host did in between
    (a repository with a hook of its own) is that run's baseline, not a planting, and
    what that run's task plants is found and renamed aside as ever."""
    env = _git_env(tmp_path)
    settle = planting.SETTLED_NS / 1e9 + 0.1

    def setup(ws: Path) -> None:
        _make_repo(ws / "repo", env)
        time.sleep(settle)

    first = sandbox.run(net, tmp_path, {"work": "echo work > repo/a"}, setup=setup)
    assert first.returncode == 0 and "workspace_planted" not in first.summary, first.describe()
    ws = first.steps_dir
    _make_repo(ws / "host_repo", env)
    host_hook = ws / "host_repo" / ".git" / "hooks" / "pre-commit"
    host_hook.write_text("#!/bin/sh\ntrue\n")
    host_hook.chmod(0o755)
    time.sleep(settle)
    plant = "git init -q planted && git -C planted config core.fsmonitor 'touch /tmp/sg-never'"
    second = sandbox.run(net, tmp_path, {"plant": plant}, workdir=ws.parent)
    assert second.returncode == 0 and second["plant"].rc == 0, second.describe()
    assert second.summary["workspace_planted"] == [str(ws / "planted" / ".git" / "config")]
    assert (ws / "planted" / ".git" / "config.sandgate-planted").exists()
    assert host_hook.exists()  # the host's own, made between the runs: left alone


def test_a_config_that_runs_the_whole_workspace_refuses_the_run(net, tmp_path):
    """`core.hooksPath = .` names the workspace itself: it cannot be made read-only
    without the workspace, so the run does not start (one line, exit 125)."""
    workdir = sandbox._workdir(tmp_path)
    workspace = workdir / "steps"
    env = _git_env(tmp_path)
    _make_repo(workspace, env)
    assert _sh("git config core.hooksPath .", workspace, env).returncode == 0
    argv = sandbox._argv(net, workdir, ["sh", "-c", "echo ran > ran"], sandbox.DEMO_RULES, ())
    proc = net.run_in_host(argv, timeout=60)
    assert proc.returncode == 125, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "hooks" in line.lower()]
    assert line.startswith("sandgate: ") and "core.hookspath = ." in line, proc.stderr
    assert "--no-workspace-guard" in line and "Traceback" not in proc.stderr
    assert not (workspace / "ran").exists()  # the task never ran
