"""What a task plants in its workspace for the host to run later, found and disarmed.

The workspace is the task's output and read-write by design. The user then runs
`git status`, `git commit` or opens the folder in an editor on the HOST, as
themselves, and git runs what a repository's control files name: hooks, and
programs in its config (`core.fsmonitor`, `core.hooksPath`, filter and diff drivers,
`include.path`...). A task that writes those has escaped the sandbox, with a delay.

Two layers (docs/sandbox.md, "What the task leaves for the host"):

1. During the run (`read_only_binds`, `pinned_dirs`): each repository's git
   directory found in the workspace at the start is bound over itself (a mount
   point cannot be renamed or removed: `mv .git .git.old && mkdir .git` fails with
   EBUSY), and its `config`, `config.worktree`, `hooks`, `info` and `commondir` (a
   worktree's) read-only. Git
   keeps working on objects, refs, the index and HEAD.
2. After the run (`survey` before, `find_planted` after, `disarm`): mounts can only
   cover what exists, so a repository the task makes (`git init`, a nested one, a
   bare one, a `.git` file pointing elsewhere, a renamed `.git` replaced) is found
   by walking every writable root when the task has ended, before `sandgate run`
   returns. Each control path that is new or changed is judged; what would run code
   on the host is renamed to NAME.sandgate-planted (git never runs that name) and
   reported. Every process of the sandbox is gone by then (its PID namespace with
   its init), so nothing changes the tree under the walk; the walk opens each
   directory by descriptor relative to its parent with O_NOFOLLOW, never a path.
   The walk after reads only the directories that changed since the walk before
   (`survey(since=...)`, `_unchanged`): same inode and ctime, same entries.

3. Work-tree files a repository's own config names (`named`): a repository that
   was there before the task may run files of its work tree by design: husky's
   `core.hooksPath = .husky/_`, `include.path = ../.gitconfig`, `core.fsmonitor =
   ./scripts/fsmonitor`, a filter driver `./tools/clean.sh`, `alias.x = !./x`
   (gitconfig.named_paths). Each such path in the writable roots is read-only
   during the run where it exists, and anything new or changed there after the run
   is planted; one that names a writable root itself cannot be guarded: the run
   refuses to start (`unguardable`).

4. Control paths that are symbolic links (`_follow_links`): `.git/hooks/pre-commit
   -> ../../scripts/pre-commit`, `.git/hooks -> ../githooks`, `.git/config ->
   ../gitconfig-shared`, `.vscode -> ../shared`. Git and editors follow them, so what
   such a link resolves to in a writable root is guarded as a named path (read-only
   during the run, judged after it: a config as config, anything else as planted when
   changed); the links in a linked hooks or info directory too. A link that resolves
   to a writable root itself, or through another link in a writable root (a chain, a
   link on the way: the task could retarget it, and a link cannot be bound
   read-only), cannot be guarded: the run refuses to start (`unguardable`). A link
   out of the writable roots is read-only to the task anyway.

Control paths, in any directory that git would take for a git directory (one
named `.git`, or one with HEAD and objects and refs, or HEAD and commondir, as a
bare repository or a worktree's or submodule's git dir): `config`,
`config.worktree`, `commondir`, `info/attributes`, everything in `hooks/`, every
symbolic link at its top (git makes none there), and of a rebase or cherry-pick
stopped half-way (`rebase-merge/`, `rebase-apply/`, `sequencer/`) the todo list
(`git rebase --continue` runs its `exec` lines) and the merge strategy (`strategy`,
`opts`: `--continue` runs `git merge-<strategy>`); anywhere: an entry named `.git`
that is not a directory (a `gitdir:` file, a link), every file in an editor's or
coding agent's settings directory (EDITOR_DIRS: `.vscode`, `.idea`, `.claude`,
`.zed`...) and the settings files EDITOR_FILES (`.mcp.json`, `*.code-workspace`...):
tools run the commands named there when they open the folder; of a Mercurial
repository, `.hg/hgrc`, `.hg/hgrc-not-shared` (harmless: only data,
hgrc.code_entries), `.hg/sharedpath` and a `.hg` that is a link; and every special
file (a FIFO, socket or device node: never harmless) the walk lists, and those made
during the run in a git dir's `objects` (its loose, pack and info directories) or an
`.hg/store` and its `data` (`_note_specials`): git opens HEAD, the index, refs,
objects, `.gitignore`, `.gitattributes`... and blocks for good in the open of a FIFO
nobody writes (a red team, session 51: the user's `git status` and every git-aware
prompt hung after the run).
What the check cannot finish is never passed over: a path it cannot reach or judge
(a link on the way, any error) is reported as planted and NOT renamed; a walk out of
room (MAX_WALK_DIRS, MAX_WALK_NAME_BYTES: the root runner's memory, outside the task's
limits) stops, and what it did not finish is planted whole where it is new, reported
as not checked (NOT renamed) where it is the user's (`Survey.cut`). The rename aside
cannot be taken from it: after NAME.sandgate-planted[-2..-99] comes a random name,
made with RENAME_NOREPLACE (`_aside_names`).

A new or changed one is harmless only when it is a regular file with one link and:
a config whose keys are all data (gitconfig.code_keys), a hook named *.sample (git
runs only the exact hook names), a todo list without `exec` lines, a strategy that is
one of git's own (BUILTIN_STRATEGIES), or a `gitdir:`/commondir that git and the
kernel take (`_judge_pointer`: the whole file, resolved a component at a time through
no link) to a git directory of the same survey in a relation git makes: a linked
worktree's or a submodule's `.git` file whose move of the work tree puts no path the
repository's config runs among the task's files (`_gitfile_relation`), a worktree git
dir's commondir naming the git dir it lies in (`<common>/worktrees/NAME`).

Write bits (`_loosened`): the task may chmod what the idmap makes its own (the pinned
`.git`, the root); group and other write bits it added to a directory or control path
that was there, and other-write bits on a new one, are removed after the run (disarm)
and reported: any local account could otherwise swap the user's hooks.

POSIX ACLs (`_acl_loosened`): the task may set them too (setxattr), and a default ACL
changes nothing of a directory's mode but is inherited by what the user's own tools
create there later, over their umask: `o::rwx` on `.git/objects` made the user's next
`objects/ab/` writable by every account, on `.git` their next `worktrees/wt/`. The walks
read the default and access ACLs of each directory they stat (`objects` and the
directories `_note_objects` states too) and the access ACL of each control path; an
entry granting write to the group, to others or to a named user or group that the ACL
there did not grant before (on a new path: that no default ACL of the walk before
granted, which it may have inherited) has its write removed after the run (disarm;
a new default ACL is removed whole) and is reported as the write bits are.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from sandgate.enforcer import private_cache
from sandgate.enforcer.sandbox import gitconfig, hgrc, mounts
from sandgate.proxy.approvals.shown import visible
from sandgate.proxy.file_systems import file_system_type

SUFFIX = ".sandgate-planted"
# Directories of editors' and coding agents' project settings, in any directory: each
# runs commands named there when it opens the folder on the host, as the user (a trusted
# folder): VS Code and Cursor (`.vscode`/`.cursor`: tasks with runOn folderOpen,
# interpreters, MCP servers), JetBrains (`.idea`: run configurations, startup tasks),
# Claude Code (`.claude/settings.json`: hooks such as SessionStart, run as shell
# commands), Gemini CLI (`.gemini/settings.json`: mcpServers), Zed (`.zed/settings.json`:
# lsp binary paths, tasks), Helix (`.helix/languages.toml`: language-server commands),
# Continue (`.continue/`: MCP servers), Codex (`.codex/`), Windsurf (`.windsurf/`),
# Kiro, Roo, Kilo Code, Amazon Q, Qwen Code (`mcp.json`, settings, hooks), opencode,
# JetBrains Fleet (run configurations), and dev containers
# (`.devcontainer/devcontainer.json`: `initializeCommand` runs on the host).
EDITOR_DIRS = frozenset(
    {".vscode", ".idea", ".cursor", ".claude", ".gemini", ".zed", ".helix", ".continue"}
    | {".codex", ".windsurf", ".kiro", ".roo", ".kilocode", ".amazonq", ".qwen"}
    | {".opencode", ".fleet", ".devcontainer"}
)
# Single files of the same kind, in any directory: `.mcp.json` (Claude Code and others
# start the MCP servers it names), `.aider.conf.yml` (aider runs its lint-cmd and
# test-cmd), Neovim's and Vim's project rc files (`exrc`) and LazyVim's `.lazy.lua`,
# opencode's and crush's configs (LSP and MCP commands), VS Code's `*.code-workspace`
# (tasks and settings, ending EDITOR_FILE_SUFFIX).
EDITOR_FILES = frozenset(
    {".mcp.json", ".aider.conf.yml", ".nvim.lua", ".nvimrc", ".exrc", ".lazy.lua"}
    | {"opencode.json", "opencode.jsonc", ".crush.json", "crush.json"}
)
EDITOR_FILE_SUFFIX = ".code-workspace"
CONFIG_FILES = frozenset({"config", "config.worktree"})
# Mercurial: `hg` runs what a repository's `.hg/hgrc` names (hooks such as pre-status,
# extensions) and trusts the file when the user who runs it owns it, which a file the
# task writes through the idmapped workspace is. `sharedpath` (`hg share`) makes it
# read the hgrc of the repository it names too.
HG_DIR = ".hg"
HG_CONFIG_FILES = frozenset({"hgrc", "hgrc-not-shared"})
# `commondir` too: a worktree's pointer to the config and hooks git uses for it (read
# through a link or a changed one, the task's repository ran on the host mid-run)
READ_ONLY_IN_GITDIR = ("config", "config.worktree", "hooks", "info", "commondir")
MAX_POINTER_BYTES = 4096
MAX_PINNED = 64  # git directories bound during the run; more are checked afterwards only
MAX_DEPTH = 256  # directories deeper are not walked: reported (one descriptor per level)
# Control paths a walk records (~0.5 KiB each). A hooks or editor directory (every file
# in it is one) with more than MAX_DIR_CONTROLS, or a new one past MAX_CONTROLS in all,
# is not listed but planted whole: a task's ten million files in .vscode/ (inodes are
# free) cost the root runner gigabytes, and ten million renames. A checkout has tens.
MAX_DIR_CONTROLS = 4096
MAX_CONTROLS = 100_000
# What one walk may cost the root runner, whose memory no limit of the task's bounds:
# directories (~0.5 KiB each as records and entries) and bytes of the names and relative
# paths it keeps. A chain 250 directories deep of 255-byte names made each directory's
# relative path ~64 KB: 3,250 directories (14 MB of the task's disk) cost 629 MiB. Past
# either, the walk stops (`Survey.cut`). A checkout with its venv: ~1,000 dirs, ~100 KB.
MAX_WALK_DIRS = 200_000
MAX_WALK_NAME_BYTES = 32 << 20
MAX_REPORTED = 50  # planted paths reported one by one; the rest in one line
DESCRIBED_CHARS = 1 << 14  # a path is at most 4096 bytes, each shown as up to 4 (\xNN)
MAX_INCLUDE_DEPTH = 10  # as git's own limit on nested include.path
MAX_NAMED_ENTRIES = 4096  # files fingerprinted below one named directory
# A rebase or cherry-pick stopped half-way keeps its todo list in the git directory;
# `git rebase --continue` on the host runs its `exec` (`x`) lines.
SEQUENCER_DIRS = frozenset({"rebase-merge", "rebase-apply", "sequencer"})
TODO_FILES = frozenset({"git-rebase-todo", "todo"})
# What else `--continue` reads there that names a program: the merge strategy, run as
# `git merge-<strategy>` (sequencer.c try_merge_command: no check of the name; one with
# a `/` runs as a path in the work tree): `strategy` (rebase) and `opts`
# (`options.strategy`, cherry-pick and revert, git-config syntax). Harmless only when it
# is one of git's own strategies. Not control paths, and why: `strategy_opts` only gives
# that (built-in) strategy its options; `gpg_sign_opt` and `options.gpg-sign` a key id
# (the gpg program comes from the guarded config); the rest is data (commits, names,
# messages, flags).
STRATEGY_FILES = frozenset({"strategy", "opts"})
BUILTIN_STRATEGIES = frozenset({"ort", "recursive", "resolve", "octopus", "ours", "subtree"})
# Group and other write bits (`_loosened`): what the task adds to the user's directories
# and control paths lets any local account change them after the run.
LOOSE_BITS = 0o022
# POSIX ACLs (`_acl_writers`), as the kernel keeps them in these extended attributes:
# a little-endian u32 version (2), then entries of u16 tag, u16 permissions, u32 id.
ACL_ATTRS = (("system.posix_acl_default", "default"), ("system.posix_acl_access", "access"))
ACL_VERSION = 2
ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x02, 0x04, 0x08, 0x10, 0x20
ACL_WRITE = 0x02
ACL_UNREADABLE = (-1, -1)  # the writer an ACL the walk could not parse counts as
_NO_ACL = frozenset({errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP})
MAX_TODO_BYTES = 1 << 20
_EXEC_LINE = re.compile(r"\s*(?:exec|x)(?:\s|$)")


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a file's content without reading it: the task can set mtime
    but not ctime, which any change (write, chmod, rename in) moves to now."""

    mode: int
    dev: int
    ino: int
    size: int
    ctime_ns: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns, st.st_nlink)


@dataclass(frozen=True)
class ControlPath:
    root: Path
    relative: str  # below root, '/'-separated
    # "config", "hook", "attributes", "commondir", "gitfile", "editor"; "named" (a
    # work-tree file a repository's config runs), "include" (one it reads as config)
    role: str
    fingerprint: Fingerprint

    @property
    def path(self) -> Path:
        return self.root / self.relative


class DirRecord(NamedTuple):
    """What a walk found in one directory: a later walk (`survey(since=...)`) takes it
    as it is while the directory is unchanged (`_unchanged`). A tuple: the walk makes
    one per directory (~1,000 for a checkout with its venv)."""

    dev: int
    ino: int
    ctime_ns: int
    given: str  # the context its parent's walk gave it
    context: str  # its own ("git" for a git directory found by its entries)
    subdirs: tuple[str, ...]  # the directories below it that the walk entered
    controls: tuple[tuple[str, str], ...]  # (name, role) of its control paths
    deep: tuple[str, ...]  # directories below it not walked (MAX_DEPTH)


@dataclass
class Survey:
    """The control paths and git directories of the writable roots at one moment."""

    roots: tuple[Path, ...]
    started_ns: int = 0  # the walk's start (time.time_ns(): the clock of ctime)
    dirs: dict[tuple[Path, str], DirRecord] = field(default_factory=dict)  # (root, relative)
    controls: dict[Path, ControlPath] = field(default_factory=dict)
    git_dirs: set[Path] = field(default_factory=set)
    too_deep: list[Path] = field(default_factory=list)  # not walked (MAX_DEPTH)
    # not listed (MAX_DIR_CONTROLS, MAX_CONTROLS, MAX_NAMED_ENTRIES): planted whole if new
    crowded: list[Path] = field(default_factory=list)
    # The walk's cost so far (MAX_WALK_DIRS, MAX_WALK_NAME_BYTES): directories walked or
    # listed to be, bytes of names and paths kept
    walked_dirs: int = 0
    name_bytes: int = 0
    named_bytes: int = 0  # the same for the named paths (`_fingerprint_named`)
    # Out of room: the walk stopped. `cut`: the directories it had not finished then
    # (innermost first, up to a root), and roots it never began: not checked
    out_of_room: bool = False
    cut: list[Path] = field(default_factory=list)
    # Work-tree paths the repositories' configs name, or a control path that is a link
    # resolves to (resolved, inside the roots), each with why; "include": read as config
    named: dict[Path, tuple[str, str]] = field(default_factory=dict)
    unguardable: list[str] = field(default_factory=list)  # named paths that are a root
    # Directories walked that group or others may write to (LOOSE_BITS), with their mode
    loose: dict[Path, int] = field(default_factory=dict)
    # A git dir's `objects` or an `.hg/store` (not walked) -> which of NOTED_OBJECTS were
    # directories there, their modes looked at (`_note_objects`): a bit each, in order
    noted: dict[Path, int] = field(default_factory=dict)
    # Of the directories `_note_objects` states, those whose ctime is at or after this
    # are listed for special files made since (`_note_specials`): the earlier walk's
    # start; 0: all (a file system whose ctime the walk does not trust); None: none
    # (no earlier walk: what is there is the user's). Set for each root as it is walked.
    specials_since_ns: int | None = None
    # (path, "default" or "access") -> the entries of that ACL granting write beyond
    # the owner (`_acl_writers`: (tag, id)); paths without such an ACL are not listed
    acls: dict[tuple[Path, str], frozenset[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Planted:
    """A control path the task left that would run code on the host."""

    path: Path
    why: str
    disarmed_as: Path | None = None  # where disarm() moved it; None: not moved
    # False: reported only, disarm() leaves it (a directory of the user's the check
    # could not finish: renaming it would break their workspace)
    movable: bool = True
    # Not renamed but repaired: the group/other write bits the task added, which
    # disarm() removes (`_loosened`); disarmed_as is then the path itself
    loosened: int = 0
    # Likewise an ACL's entries granting write ("default" or "access": `_acl_loosened`),
    # which disarm() takes the write from but for `acl_kept` (the writers it had before)
    acl: str = ""
    acl_kept: frozenset[tuple[int, int]] = frozenset()

    @property
    def renamed(self) -> bool:
        """Whether git and editors no longer find it by its name (the event's and the
        summary's `renamed`): False is a path still live on the host."""
        return self.disarmed_as is not None

    def describe(self) -> str:
        """One line for the user's terminal and the event: the task chose the names (and
        a config's keys in `why`), so every control, bidi or line-separator character is
        escaped visibly (`\\x1b`): a name of `\\x1b[8m` made sandgate's lines after it
        invisible, one with a newline forged a line of its own."""
        if self.loosened:
            done = "; write bits removed" if self.disarmed_as else "; NOT repaired"
        elif self.acl:
            done = "; write removed from the ACL" if self.disarmed_as else "; NOT repaired"
        else:
            done = f"; renamed to {self.disarmed_as.name}" if self.disarmed_as else "; NOT renamed"
        return visible(f"{self.path}: {self.why}{done}", DESCRIBED_CHARS)


def survey(
    roots: list[Path], *, follow_configs: bool = True, since: Survey | None = None
) -> Survey:
    """Walk each root (never following links) for git directories and control paths;
    with `follow_configs`, also the work-tree paths their configs name (`named`).
    `since`: an earlier survey of the same roots, whose directories that have not
    changed since are taken as they were, their control paths stated again
    (`_unchanged` says when a directory has not changed)."""
    result = Survey(tuple(roots), time.time_ns())
    for root in roots:
        if not _afford(result, len(str(root)), dirs=1):
            result.cut.append(root)  # a root the walk had no room left to begin
            continue
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        trusted = _ctime_trusted(fd)
        result.specials_since_ns = (
            0 if not trusted else None if since is None else since.started_ns - SETTLED_NS
        )
        _walk(result, root, fd, "", "plain", since if trusted else None)
    if follow_configs:
        for git_dir in sorted(result.git_dirs):
            try:
                _find_named(result, git_dir)
            except (OSError, ValueError) as e:  # a path too long, a name the kernel refuses
                result.unguardable.append(f"{git_dir}: its config could not be read ({e})")
        _follow_links(result)
        for path, (_, role) in result.named.items():
            _fingerprint_named(result, path, role)
    return result


def _find_named(result: Survey, git_dir: Path) -> None:
    """The work-tree paths that the configs git reads for this git directory name:
    its own, a linked worktree's common one, and what they include."""
    configs = [git_dir / "config", git_dir / "config.worktree"]
    common = _common_dir(git_dir)
    if common is not None:
        configs.append(common / "config")
    top = _work_tree(git_dir, _entries(git_dir / "config"))
    seen: set[Path] = set()
    for config in configs:
        _follow_config(result, config, top, 0, seen)


def _entries(config: Path) -> list[gitconfig.ConfigEntry]:
    """A config file's entries, read through links as git reads it; none when it is
    missing, too big or not git config (git refuses to work with the latter: nothing
    of it runs)."""
    try:
        data = _read_small(Path(os.path.realpath(config)), gitconfig.MAX_CONFIG_BYTES)
        return gitconfig.parse_config(data.decode("utf-8", "replace")) if data else []
    except (OSError, ValueError):
        return []


def _pointer_text(path: Path) -> str | None:
    """A small pointer file (commondir, a worktree's gitdir) read as git reads it
    (`_pointer_value`), through links; None if unreadable or not one git would take."""
    try:
        data = _read_small(Path(os.path.realpath(path)), MAX_POINTER_BYTES)
    except (OSError, ValueError):  # ValueError: a name the kernel cannot take
        return None
    return _pointer_value(data or b"", gitfile=False)


def _pointer_value(data: bytes, *, gitfile: bool) -> str | None:
    """The path a pointer file names, as git takes it: the WHOLE file with only
    trailing newlines and carriage returns removed (setup.c read_gitfile_gently,
    get_common_dir_noenv); a `.git` file must start with exactly `gitdir: `. None (not
    a path the check can judge) when anything else is odd: a NUL (git stops there), or
    a newline or carriage return left inside it (git takes them as part of the path:
    `gitdir: ../a/.git\n/../hidden` opened a directory named `.git\n`, while a reader
    of the first line judged `../a/.git`)."""
    text = os.fsdecode(data).rstrip("\r\n")
    if gitfile:
        if not text.startswith("gitdir: "):
            return None
        text = text.removeprefix("gitdir: ")
    if not text or any(c in text for c in "\0\n\r"):
        return None
    return text


def _pointed(base: Path, text: str) -> tuple[Path | None, list[Path]]:
    """Where the kernel takes the pointer `text` from the directory `base` (a relative
    one is relative to it: git's rule for both kinds), resolved a component at a time
    (`_resolve`), and every link met on the way, anywhere: one in a writable root the
    task may have made, and one outside may resolve differently for git than for the
    check (`/proc/self/cwd`: the runner's directory is not the user's). git writes
    pointers without links (real paths, or relative ones below a git dir)."""
    return _resolve(base / text, (Path("/"),))


def _common_dir(git_dir: Path) -> Path | None:
    """A worktree's common git directory (its `commondir` file), resolved as the kernel
    takes it; None without one."""
    common = _pointer_text(git_dir / "commondir")
    if common is None:
        return None
    return Path(os.path.realpath(git_dir / common))


def _work_tree(git_dir: Path, entries: list[gitconfig.ConfigEntry]) -> Path:
    """Where git runs hooks and commands for this git directory: core.worktree (a
    submodule's), a linked worktree's (its `gitdir` file names that tree's `.git`),
    the parent of a `.git`, else the git directory itself (a bare repository)."""
    for entry in entries:
        if entry.key == "core.worktree" and entry.value:
            return Path(os.path.normpath(git_dir / os.path.expanduser(entry.value)))
    linked = _pointer_text(git_dir / "gitdir") if (git_dir / "commondir").exists() else None
    if linked:
        return Path(os.path.realpath((git_dir / linked).parent))
    return git_dir.parent if git_dir.name == ".git" else git_dir


def _follow_config(result: Survey, config: Path, top: Path, depth: int, seen: set[Path]) -> None:
    """Name what one config file names, and follow its includes (also ones outside
    the workspace: a host file the task cannot change may name work-tree files)."""
    seen.add(config)
    for named in gitconfig.named_paths(_entries(config)):
        base = config.parent if named.include else top
        path = Path(os.path.realpath(base / os.path.expanduser(named.text)))
        why = f"{config}: {named.describe()}"
        if named.include and depth < MAX_INCLUDE_DEPTH and path not in seen:
            _follow_config(result, path, top, depth + 1, seen)
        _name(result, path, why, "include" if named.include else "named")
        if named.entry.key == "core.hookspath" and path.name == "_":
            # husky 9: .husky/_/HOOK runs .husky/_/h, which runs .husky/HOOK
            _name(result, path.parent, f"{why} (husky runs {path.parent.name}/HOOK)", "named")


def _name(result: Survey, path: Path, why: str, role: str) -> None:
    """Record a named path that lies in a writable root (only there can the task
    change it); one that is a root itself cannot be made read-only."""
    if path in result.roots:
        result.unguardable.append(f"{why}: names {path}, a writable root")
    elif _root_of(result, path) is not None and path not in result.named:
        result.named[path] = (why, role)


# What a link at a control path guards its target as (`_follow_links`): a config is
# judged as config after the run, anything else is planted when it changed.
LINKED_ROLES = {
    "config": "include",
    "commondir": "linked",
    "hook": "linked",
    "attributes": "linked",
    "gitfile": "linked",
    "editor": "linked",
    "hgrc": "linked",
    "hgshared": "linked",
    "hgdir": "linked",
}
MAX_HOPS = 40  # links followed in one resolution, as the kernel's limit (ELOOP)


def _follow_links(result: Survey) -> None:
    """What each control path that is a symbolic link resolves to in a writable root,
    named (read-only during the run, judged after it), as git and editors follow it."""
    for path, control in sorted(result.controls.items()):
        if stat.S_ISLNK(control.fingerprint.mode) and control.role in LINKED_ROLES:
            try:
                _guard_link(result, path, control.role)
            except (OSError, ValueError) as e:
                result.unguardable.append(f"{path} is a link the check could not follow ({e})")


def _guard_link(result: Survey, link: Path, role: str, depth: int = 0) -> None:
    """Name what `link` (a control path) resolves to; refuse (`unguardable`) what
    cannot be bound read-only: a link to a writable root, or through another link the
    task could change (one in a writable root, in a chain or on the way)."""
    target, through = _resolve(link, result.roots)
    others = [each for each in through if each != link]
    if others:
        result.unguardable.append(
            f"{link} is a link through {others[0]}, a link the task may change "
            f"(make {link.name} a link straight to the file it runs)"
        )
        return
    if target is None or _root_of(result, target) is None and target not in result.roots:
        return  # a loop (git cannot use it), or out of the writable roots: read-only
    if target in result.roots:
        result.unguardable.append(f"{link} is a link to {target}, a writable root")
        return
    if role == "gitfile" and target in result.git_dirs:
        return  # `.git` -> a git directory of this walk: pinned and guarded as one
    _name(result, target, f"{link} is a link to it", LINKED_ROLES[role])
    if depth == 0 and role in ("hook", "attributes") and link.name in ("hooks", "info"):
        # A linked hooks or info directory: links in it are hooks or attributes too.
        with contextlib.suppress(OSError):
            for entry in os.scandir(target):
                if entry.is_symlink():
                    _guard_link(result, Path(entry.path), role, depth + 1)


def _resolve(path: Path, roots: tuple[Path, ...]) -> tuple[Path | None, list[Path]]:
    """`path` resolved as the kernel would, a component at a time (None: a loop), and
    every link met on the way that lies in one of `roots`. A missing component ends
    nothing: the rest is taken as written (where a file would be made)."""
    pending = list(reversed(path.parts[1:]))
    current, hops, links = Path("/"), 0, []
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        current = current / part
        try:
            if not stat.S_ISLNK(os.lstat(current).st_mode):
                continue
            target = os.readlink(current)
        except OSError:
            continue
        hops += 1
        if hops > MAX_HOPS:
            return None, links
        if any(current == root or root in current.parents for root in roots):
            links.append(current)
        pending.extend(reversed([p for p in Path(target).parts if p != "/"]))
        current = Path("/") if os.path.isabs(target) else current.parent
    return current, links


def _root_of(result: Survey, path: Path) -> Path | None:
    """The writable root below which `path` lies (roots are real paths, as
    spec.check_writable makes them, so a resolved path compares)."""
    return next((root for root in result.roots if root in path.parents), None)


def _fingerprint_named(result: Survey, path: Path, role: str) -> None:
    """The named path and, for a directory, what is below it (up to MAX_NAMED_ENTRIES,
    and MAX_WALK_NAME_BYTES of paths for all named paths) as control paths; a missing
    one has none (it is new if it appears). One the check cannot list or state (a path
    over PATH_MAX, any error but its absence) is crowded: planted whole if it changed."""
    try:
        _list_named(result, path, role)
    except (OSError, ValueError):
        result.crowded.append(path)


def _list_named(result: Survey, path: Path, role: str) -> None:
    root = _root_of(result, path)
    link = _first_link(root, path)
    if link is not None:  # the task made a directory on the way a link: that goes aside
        path = link
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        below = _below(path, MAX_NAMED_ENTRIES, MAX_WALK_NAME_BYTES - result.named_bytes)
        if below is None:  # not listed: a check of some of it would miss the rest
            result.crowded.append(path)
        paths += below or []
    # Counted apart from the walk's room: a walk after the task that ran out of it must
    # not make the user's named paths crowded (planted) for that alone.
    cost = sum(2 * len(str(each)) for each in paths)
    if result.named_bytes + cost > MAX_WALK_NAME_BYTES:
        result.crowded.append(path)  # no room to list it: planted whole if it changed
        return
    result.named_bytes += cost
    for each in paths:
        try:
            fingerprint = Fingerprint.of(os.lstat(each))
        except (FileNotFoundError, NotADirectoryError):
            continue
        relative = str(each.relative_to(root))
        result.controls.setdefault(each, ControlPath(root, relative, role, fingerprint))


def _below(top: Path, limit: int, max_bytes: int) -> list[Path] | None:
    """Everything below the directory `top` (no link followed), or None when that is
    more than `limit` entries or `max_bytes` of paths. Never more in memory: a task's ten million
    files in a named directory were all listed (os.walk) before the limit was looked
    at, and what lay past the first `limit` was not checked at all (a hook hidden
    behind 5,000 files of padding)."""
    found: list[Path] = []
    pending = [top]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    max_bytes -= len(entry.path)
                    if len(found) == limit or max_bytes < 0:
                        return None
                    found.append(Path(entry.path))
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(Path(entry.path))
        except OSError:
            continue
    return found


def _first_link(root: Path, path: Path) -> Path | None:
    """The first of `path` and its directories below `root` that is a symbolic link
    (git would follow it out of what the check sees); None: none is."""
    for step in [*reversed(path.relative_to(root).parents), path.relative_to(root)][1:]:
        if (root / step).is_symlink():
            return root / step
    return None


def _walk(
    result: Survey, root: Path, fd: int, relative: str, context: str, since: Survey | None
) -> None:
    """Walk one directory (its fd is closed here) and everything below it. `context`:
    "plain", "git" (a git directory), "hooks" or "info" (in one), "editor". `since`:
    an earlier survey whose record of this directory stands if it has not changed."""
    try:
        st = os.fstat(fd)
        if st.st_mode & LOOSE_BITS:
            result.loose[root / relative if relative else root] = st.st_mode
        _note_acls(result, root / relative if relative else root, fd, len(relative))
        entries = None
        old = since.dirs.get((root, relative)) if since is not None else None
        if old is None or not _unchanged(old, st, context, since, root):
            entries = _scan(fd, context, _room(result, root, relative, since), result)
    except OSError:
        os.close(fd)
        return
    try:
        if entries is None:
            _take_unchanged(result, root, fd, relative, old, since)
        elif entries is CROWDED:
            if _afford(result, len(relative)):
                result.crowded.append(root / relative)  # no record: read again next time
        elif entries is not OUT_OF_ROOM:
            _walk_entries(result, root, fd, relative, context, since, st, entries)
        if result.out_of_room:
            result.cut.append(root / relative if relative else root)
    finally:
        os.close(fd)


def _walk_entries(
    result: Survey,
    root: Path,
    fd: int,
    relative: str,
    given: str,
    since: Survey | None,
    st: os.stat_result,
    entries: dict[str, os.DirEntry],
) -> None:
    """The control paths among a directory's `entries`, and the directories below it
    walked; its record kept when every entry was seen and the walk had room for all."""
    context = given
    if context == "plain" and _looks_like_git_dir(relative, entries):
        context = "git"
    if context == "git":
        result.git_dirs.add(root / relative if relative else root)
        if getattr(entries, "many_links", False):
            # more links than `_scan` keeps: planted whole if new (`Survey.crowded`)
            result.crowded.append(root / relative if relative else root)
            return
    subdirs, controls, deep = [], [], []
    complete = True  # every entry seen: else a later walk reads it again
    prefix = f"{relative}/" if relative else ""
    for name, entry in entries.items():
        if result.out_of_room:
            return  # no record: this directory is cut (`_walk`)
        child = prefix + name
        # The entry's type from the directory itself (d_type): a stat only for
        # the few control paths (a 16,700-entry checkout walked in 13 ms, not 35-56).
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            role = _role(name, is_dir, context)
            if role is None and context == "git" and entry.is_symlink():
                role = "gitlink"  # git makes none there: a way for a pointer to go
            if role is None and not is_dir and _special(entry):
                role = "special"  # git, hg or an editor that opens it would hang on it
            if role is not None and _afford(result, 2 * len(child)):
                st_child = entry.stat(follow_symlinks=False)
                result.controls[root / child] = ControlPath(
                    root, child, role, Fingerprint.of(st_child)
                )
                controls.append((name, role))
                _note_control_acl(result, root / child, fd, name, st_child.st_mode)
        except OSError:
            complete = False
            continue
        if is_dir and (context, name) in (("git", "objects"), ("hg", "store")):
            _note_objects(result, root, fd, child)
        if not is_dir or (context, name) in (("git", "objects"), ("hg", "store")):
            continue
        if child.count("/") >= MAX_DEPTH:
            if _afford(result, len(child)):
                result.too_deep.append(root / child)
                deep.append(name)
            continue
        subdirs.append(name)
        _enter(result, root, fd, name, child, context, since)
    if complete and not result.out_of_room:
        result.dirs[root, relative] = DirRecord(
            st.st_dev, st.st_ino, st.st_ctime_ns, given, context,
            tuple(subdirs), tuple(controls), tuple(deep),
        )  # fmt: skip


# What `_note_objects` states in a git dir's `objects`: itself, its pack and info
# directories, and the 256 directories of loose objects (git names them by the first
# byte of the object's name); in an `.hg/store`, itself and `data` (the revlogs below
# mirror the work tree's directories: not looked at). Stated by name, none read (a
# task's million entries there cost nothing) but for special files where one changed
# (`_note_specials`).
NOTED_OBJECTS = ("", "pack", "info", "data", *(f"{n:02x}" for n in range(256)))
# Below them, what git also opens: a split commit-graph's chain and graph files.
LISTED_BELOW_OBJECTS = ("info/commit-graphs",)


def _note_objects(result: Survey, root: Path, fd: int, child: str) -> None:
    """The modes of a git dir's `objects` (or an `.hg/store`: `child`, in `fd`) and of
    the directories kept in it (the walk does not enter them): one the task made
    writable by others would let any local account swap the user's loose objects or
    packs (a hook script's blob, checked out later: git does not check a loose object's
    hash when it reads it). Where one changed since the earlier walk, the special files
    in it too (`_note_specials`)."""
    try:
        sub = os.open(
            child.rsplit("/", 1)[-1],
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=fd,
        )
    except OSError:
        return
    found = 0
    try:
        for bit, name in enumerate(NOTED_OBJECTS):
            try:
                st = os.stat(name or ".", dir_fd=sub, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            found |= 1 << bit
            path = root / child / name if name else root / child
            if st.st_mode & LOOSE_BITS:
                if not _afford(result, len(child) + len(name)):
                    return  # out of room: the walk is cut (`_walk`)
                result.loose[path] = st.st_mode
            where = f"/proc/self/fd/{sub}/{name}" if name else sub
            _note_acls(result, path, where, len(child) + len(name))
            _note_specials(result, root, sub, child, name, st.st_ctime_ns)
        for name in LISTED_BELOW_OBJECTS:
            _note_specials(result, root, sub, child, name)
    finally:
        os.close(sub)
    if _afford(result, len(child)):
        result.noted[root / child] = found


def _note_specials(
    result: Survey, root: Path, fd: int, child: str, name: str, ctime_ns: int | None = None
) -> None:
    """The special files (FIFOs, sockets, devices) in `name` below the directory `fd`
    (`child`: a git dir's `objects` or an `.hg/store`, which the walk states but does
    not list) as control paths ("special"): git opens loose objects, packs and
    `info/alternates` there, hg its revlogs, and a FIFO among them hangs it for good.
    Listed only when the directory changed (its ctime: `ctime_ns` if the caller stated
    it) at or after `result.specials_since_ns`, and only what changed then too: a
    task's commit lists a few directories; a clean checkout, none. Read streaming, by
    d_type: of a task's million entries nothing is kept but special files (MAX_CONTROLS
    in all)."""
    since = result.specials_since_ns
    if since is None or ctime_ns is not None and ctime_ns < since:
        return
    here = f"{child}/{name}" if name else child
    try:
        found = _open_below(fd, name) if name else os.dup(fd)
    except OSError:
        return  # none there, or a link (what it reaches in the workspace is walked there)
    try:
        if os.fstat(found).st_ctime_ns < since:
            return
        with os.scandir(found) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False) or not _special(entry):
                    continue
                st_entry = entry.stat(follow_symlinks=False)
                relative = f"{here}/{entry.name}"
                if st_entry.st_ctime_ns < since:
                    continue
                if not _room_for_specials(result, 1) or not _afford(result, 2 * len(relative)):
                    return  # out of room: the walk is cut (`_walk`)
                result.controls[root / relative] = ControlPath(
                    root, relative, "special", Fingerprint.of(st_entry)
                )
    except OSError:
        return  # gone, or not a directory any more: nothing there git reads
    finally:
        os.close(found)


def _open_below(fd: int, relative: str) -> int:
    """A descriptor of the directory `relative` below `fd`, opened a component at a
    time with O_NOFOLLOW: a link on the way is not followed out of the workspace."""
    current = os.dup(fd)
    try:
        for part in relative.split("/"):
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            following = os.open(part, flags, dir_fd=current)
            os.close(current)
            current = following
    except OSError:
        os.close(current)
        raise
    return current


def _special(entry: os.DirEntry) -> bool:
    """Whether an entry that is not a directory is a FIFO, a socket or a device node:
    from its d_type, no stat (the directory's listing gives it)."""
    return not entry.is_file(follow_symlinks=False) and not entry.is_symlink()


def _room_for_specials(result: Survey, count: int) -> bool:
    """Whether the walk has room for `count` more special files as control paths
    (MAX_CONTROLS in all: each costs the root runner ~0.5 KiB, and a task's million
    FIFOs are free inodes). Past it, the walk stops as when out of room (`_afford`)."""
    if len(result.controls) + count > MAX_CONTROLS:
        result.out_of_room = True
    return not result.out_of_room


def _was_noted(before: Survey, path: Path) -> bool:
    """Whether `path` is one of the directories `_note_objects` found in the walk before."""
    for objects, name in ((path, ""), (path.parent, path.name)):
        found = before.noted.get(objects)
        if found is not None and name in _NOTED_BIT:
            return bool(found >> _NOTED_BIT[name] & 1)
    return False


_NOTED_BIT = {name: bit for bit, name in enumerate(NOTED_OBJECTS)}


def _note_acls(
    result: Survey, path: Path, where: int | str, cost: int, kinds=("default", "access")
) -> None:
    """The ACLs of `path` (read at `where`: a descriptor, or a path through one, with
    no link followed at its end) that grant write beyond its owner, noted in
    `result.acls`. One the walk cannot read but for "none there" counts as granting
    write to an unknown writer (ACL_UNREADABLE): never passed as harmless."""
    # The names first: one call, without the cost of an exception per missing ACL
    # (0.4 us against 5 us a directory; a directory has none but on a host with ACLs).
    nofollow = {} if isinstance(where, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(where, **nofollow)
    except OSError as e:
        names = [] if e.errno in _NO_ACL else [attr for attr, _ in ACL_ATTRS]
    for attr, kind in ACL_ATTRS:
        if kind not in kinds or attr not in names:
            continue
        try:
            writers = _acl_writers(kind, os.getxattr(where, attr, **nofollow))
        except OSError as e:
            if e.errno in _NO_ACL:
                continue
            writers = frozenset({ACL_UNREADABLE})
        if writers and _afford(result, cost):
            result.acls[path, kind] = writers


def _note_control_acl(result: Survey, path: Path, fd: int, name: str, mode: int) -> None:
    """The access ACL of a control path (`name` in the directory `fd`), not of a link
    (its ACL is the kernel's own) nor of a directory (the walk reads it there)."""
    if not stat.S_ISLNK(mode) and not stat.S_ISDIR(mode):
        _note_acls(result, path, f"/proc/self/fd/{fd}/{name}", len(str(path)), ("access",))


def _acl_entries(data: bytes) -> list[tuple[int, int, int]]:
    """The (tag, permissions, id) entries of an ACL as the kernel keeps it; ValueError
    when it is not one."""
    if len(data) < 4 or (len(data) - 4) % 8 or int.from_bytes(data[:4], "little") != ACL_VERSION:
        raise ValueError("not a POSIX ACL")
    return [
        (
            int.from_bytes(data[at : at + 2], "little"),
            int.from_bytes(data[at + 2 : at + 4], "little"),
            int.from_bytes(data[at + 4 : at + 8], "little"),
        )
        for at in range(4, len(data), 8)
    ]


def _acl_writers(kind: str, data: bytes) -> frozenset[tuple[int, int]]:
    """Who an ACL lets write beyond the owner, as (tag, id) of its entries: a named
    user or group whose entry and mask grant write; of a default ACL (what is created
    below the directory gets it, the creator's umask ignored) also the owning group
    (its entry and the mask) and others. The access ACL's owning group and others are
    the mode's group and other bits (`_loosened`). Unparsable: ACL_UNREADABLE."""
    try:
        entries = _acl_entries(data)
    except ValueError:
        return frozenset({ACL_UNREADABLE})
    mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), ACL_WRITE)
    masked = (ACL_USER, ACL_GROUP, ACL_GROUP_OBJ) if kind == "default" else (ACL_USER, ACL_GROUP)
    return frozenset(
        (tag, ident)
        for tag, perm, ident in entries
        if perm & ACL_WRITE
        and ((tag in masked and mask & ACL_WRITE) or (kind == "default" and tag == ACL_OTHER))
    )


def _afford(result: Survey, name_bytes: int, dirs: int = 0) -> bool:
    """Whether the walk has room for `name_bytes` more of names and paths kept and
    `dirs` more directories (MAX_WALK_NAME_BYTES, MAX_WALK_DIRS), counted if so. Once
    it has not, it never has again: the walk stops (`out_of_room`, `cut`): a walk that
    went on past a crowd the task made would still cost what the crowd is."""
    if (
        result.out_of_room
        or result.name_bytes + name_bytes > MAX_WALK_NAME_BYTES
        or result.walked_dirs + dirs > MAX_WALK_DIRS
    ):
        result.out_of_room = True
        return False
    result.name_bytes += name_bytes
    result.walked_dirs += dirs
    return True


class _Entries(dict):
    """What `_scan` keeps of a directory; `many_links`: it held more than MAX_GIT_LINKS
    symbolic links, the rest not kept (a git directory of those is crowded)."""

    many_links = False


MAX_GIT_LINKS = 64  # links `_scan` keeps in a plain directory (a git dir's are control paths)

# What `_scan` returns for a directory with more control paths than the walk has
# room for: it is not walked but planted whole (`Survey.crowded`).
CROWDED: dict[str, os.DirEntry] = {}
# What it returns when the walk has no room for what the directory holds (`_afford`).
OUT_OF_ROOM: dict[str, os.DirEntry] = {}


def _room(result: Survey, root: Path, relative: str, since: Survey | None) -> int:
    """How many control paths a hooks or editor directory may hold for the walk to list
    them: MAX_DIR_CONTROLS; one the earlier walk did not see (the task's), no more than
    MAX_CONTROLS leaves. One that did gets its own room whatever the task made
    elsewhere: a guarded hooks directory is never planted for the task's crowd."""
    if since is not None and (root, relative) in since.dirs:
        return MAX_DIR_CONTROLS
    return min(MAX_DIR_CONTROLS, MAX_CONTROLS - len(result.controls))


def _scan(fd: int, context: str, room: int, result: Survey) -> dict[str, os.DirEntry]:
    """The entries of a directory the walk looks at: directories, and files that are
    or may be control paths (those that make a plain directory a git directory and
    what git reads in one, and special files anywhere: a FIFO at `.git/HEAD` or
    `.gitignore` hangs the user's next `git status`); CROWDED when a hooks or editor
    directory (every file in it is a control path) has more than `room` of them. The other files (most of a
    checkout) are not kept while the walk goes on: a task's million empty files in
    one directory cost the root runner 170 MiB as directory entries, its ten million
    (inodes are free) gigabytes of host memory no limit of the task's bounds. What is
    kept is counted as the walk goes (`_afford`: its subdirectories as directories to
    walk, the names as bytes): OUT_OF_ROOM past that, with nothing more listed."""
    kept = _Entries()
    crowdable, files, links, specials = context in ("editor", "hooks"), 0, 0, 0
    with os.scandir(fd) as listing:
        for entry in listing:
            name = entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if not is_dir:
                    if crowdable:
                        files += 1
                        if files > room:
                            return CROWDED
                    elif (
                        name not in PLAIN_FILES
                        and (lower := name.lower()) not in PLAIN_FILES_ANY_CASE
                        and not lower.endswith(EDITOR_FILE_SUFFIX)
                        if context == "plain"
                        else _role(name, False, context) is None
                    ):
                        # Not kept for its name: one look at d_type for most of a
                        # checkout's files (no stat), kept if special or a plain link.
                        if entry.is_file(follow_symlinks=False):
                            continue
                        if not entry.is_symlink():
                            specials += 1  # a control path wherever it lies ("special")
                            if not _room_for_specials(result, specials):
                                return OUT_OF_ROOM
                        elif context != "plain":
                            continue
                        else:  # a control path if this is a git directory ("gitlink")
                            links += 1
                            if links > MAX_GIT_LINKS:
                                kept.many_links = True
                                continue
            except OSError:
                kept[name] = entry  # its error is the walk's (the record stays incomplete)
                continue
            if not _afford(result, len(name), dirs=int(is_dir)):
                return OUT_OF_ROOM
            kept[name] = entry
    return kept


# The files of a plain directory the walk looks at: what makes it a git directory
# (`_looks_like_git_dir`: by name, whatever the type, as git follows a link at
# `objects` or `refs`), what git reads in one (`_role` in "git"), and the names that
# are control paths anywhere when they are not directories.
PLAIN_FILES = frozenset({"HEAD", "objects", "refs", "commondir", "hooks", "info", *CONFIG_FILES})
PLAIN_FILES_ANY_CASE = frozenset({".git", HG_DIR, *EDITOR_DIRS, *EDITOR_FILES})


def _enter(
    result: Survey, root: Path, fd: int, name: str, child: str, context: str, since: Survey | None
) -> None:
    if not _afford(result, len(child) + len(name)):  # its record's key, its name in the parent's
        return
    try:
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return
    _walk(result, root, sub, child, _context_below(name, context), since)


# A directory whose ctime is this much older than the earlier walk's start counts
# as unchanged when its ctime is the same again: ctime comes from a clock that may
# be as coarse as a timer tick (up to 10 ms), so an entry made within a tick of the
# last change before that walk could leave it as it was. Older than that, any change
# after the walk's start gives a later ctime (kernels with multigrain timestamps,
# 6.13+, give a finer one anyway once a walk has read it).
SETTLED_NS = 100_000_000
# File systems whose directories' ctime the kernel itself keeps, and moves with every
# entry made, removed or renamed in them: ext2/3/4, xfs, btrfs, tmpfs. Elsewhere (NFS,
# FUSE, overlayfs...: the server or the daemon keeps it) every directory is read again.
CTIME_KEPT = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994})


def _unchanged(old: DirRecord, st: os.stat_result, given: str, since: Survey, root: Path) -> bool:
    """Whether a directory has the entries the earlier walk found: the same inode and
    ctime (any entry made, removed or renamed in it moves its ctime, which a task
    cannot set, unlike mtime), settled before that walk, on the root's own file
    system (a mount below the root may be another kind), reached in the same context."""
    return (
        old.given == given
        and (st.st_dev, st.st_ino, st.st_ctime_ns) == (old.dev, old.ino, old.ctime_ns)
        and old.ctime_ns < since.started_ns - SETTLED_NS
        and st.st_dev == getattr(since.dirs.get((root, "")), "dev", None)
    )


def _take_unchanged(
    result: Survey, root: Path, fd: int, relative: str, old: DirRecord, since: Survey
) -> None:
    """An unchanged directory as the earlier walk found it: its control paths stated
    again (their content may have changed), and the directories below it walked."""
    prefix = f"{relative}/" if relative else ""
    if old.context == "git":
        result.git_dirs.add(root / relative if relative else root)
        _note_objects(result, root, fd, prefix + "objects")
    if old.context == "hg":
        _note_objects(result, root, fd, prefix + "store")
    for name, role in old.controls:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        if not _afford(result, 2 * len(prefix + name)):
            return
        result.controls[root / (prefix + name)] = ControlPath(
            root, prefix + name, role, Fingerprint.of(st)
        )
        _note_control_acl(result, root / (prefix + name), fd, name, st.st_mode)
    for name in old.deep:
        if not _afford(result, len(prefix + name)):
            return
        result.too_deep.append(root / (prefix + name))
    if not _afford(result, 0, dirs=len(old.subdirs)):
        return
    for name in old.subdirs:
        _enter(result, root, fd, name, prefix + name, old.context, since)
    if not result.out_of_room:
        result.dirs[root, relative] = old


def _ctime_trusted(fd: int) -> bool:
    """Whether the file system of `fd` keeps directories' ctime itself (CTIME_KEPT)."""
    return file_system_type(fd) in CTIME_KEPT


def _context_below(name: str, context: str) -> str:
    if context == "editor" or name.lower() in EDITOR_DIRS:
        return "editor"
    if context == "plain" and name.lower() == HG_DIR:
        return "hg"
    if context == "git" and name in ("hooks", "info"):
        return name
    if context == "git" and name in SEQUENCER_DIRS:
        return "sequencer"
    return "plain"


def _looks_like_git_dir(relative: str, entries: dict[str, os.DirEntry]) -> bool:
    """As git's is_git_directory would, loosely: a `.git` directory, or HEAD with
    objects and refs (a bare repository), or HEAD with commondir (a worktree's)."""
    if relative.rsplit("/", 1)[-1].lower() == ".git":
        return True
    return "HEAD" in entries and (
        ("objects" in entries and "refs" in entries) or "commondir" in entries
    )


def _editor_file(name: str) -> bool:
    lower = name.lower()
    return lower in EDITOR_FILES or lower.endswith(EDITOR_FILE_SUFFIX)


def _role(name: str, is_dir: bool, context: str) -> str | None:
    """What a directory entry is to git or an editor; None: nothing that runs code."""
    if context == "editor":
        return None if is_dir else "editor"
    if context == "hooks":
        return None if is_dir else "hook"
    if context == "info":
        return "attributes" if name == "attributes" else None
    if context == "sequencer":
        if is_dir:
            return None
        return "todo" if name in TODO_FILES else "strategy" if name in STRATEGY_FILES else None
    if context == "hg":
        if name in HG_CONFIG_FILES:
            return "hgrc"
        return "hgshared" if name == "sharedpath" else None
    if name.lower() == ".git" and not is_dir:
        return "gitfile"  # a `gitdir:` file, or a link
    if name.lower() == HG_DIR and not is_dir:
        return "hgdir"  # a link hg would follow to a repository elsewhere
    if name.lower() in EDITOR_DIRS and not is_dir:
        return "editor"  # a link where an editor looks for its settings
    if not is_dir and _editor_file(name):
        return "editor"
    if context == "git":
        if name in CONFIG_FILES or name == "commondir":
            return "config" if name in CONFIG_FILES else "commondir"
        if name in ("hooks", "info") and not is_dir:
            return "hook" if name == "hooks" else "attributes"  # a link where git looks
    return None


def walk_after(before: Survey) -> Survey:
    """The roots of `before` walked again once the task has ended (from `before`: what
    did not change is not read again), with the paths its configs named then."""
    after = survey(list(before.roots), follow_configs=False, since=before)
    after.named = before.named  # what the configs named before the task: they are read-only
    for path, (_, role) in before.named.items():
        _fingerprint_named(after, path, role)
    return after


def find_planted(before: Survey, after: Survey | None = None) -> list[Planted]:
    """What the task left that would run code on the host: control paths that are new
    or changed since `before`, judged; from `after` (`walk_after(before)`)."""
    after = after if after is not None else walk_after(before)
    planted = _not_finished(before, after)
    cut_aside = {item.path for item in planted if item.movable}  # go aside whole, all in them
    old_deep, old_crowded = set(before.too_deep), set(before.crowded)
    planted += [
        Planted(path, f"deeper than {MAX_DEPTH} directories: not checked")
        for path in after.too_deep
        if path not in old_deep and not _below_any(path, cut_aside)
    ]
    crowded = [
        path
        for path in after.crowded
        if not _below_any(path, cut_aside)
        and (path not in old_crowded or _changed_since(path, before.started_ns - SETTLED_NS))
    ]
    planted += [
        Planted(
            path,
            f"a directory git or an editor runs files from, with more than the check "
            f"lists ({MAX_DIR_CONTROLS} files in one, {MAX_CONTROLS} in all): not checked",
        )
        for path in crowded
    ]
    renamed_dirs = {*cut_aside, *crowded}  # a new directory goes aside with what is in it
    for path, control in sorted(after.controls.items()):
        old = before.controls.get(path)
        if old is not None and old.fingerprint == control.fingerprint or _set_aside(path.name):
            continue  # unchanged, or renamed aside by an earlier run: no name git reads
        if _below_any(path, renamed_dirs):
            continue
        was_dir = old is not None and stat.S_ISDIR(old.fingerprint.mode)
        if was_dir and stat.S_ISDIR(control.fingerprint.mode):
            continue  # a named directory that was there: what changed in it is judged
        why = _judged(control, after)
        if why is not None:
            planted.append(Planted(path, why))
            if stat.S_ISDIR(control.fingerprint.mode):
                renamed_dirs.add(path)
    gone = {item.path for item in planted if item.movable} | renamed_dirs
    return (
        planted
        + _loosened(before, after, gone)
        + _acl_loosened(before, after, gone)
        + _git_files_loosened(before, after, gone)
    )


# Git's own files in a git dir (`_git_files_loosened`): objects, immutable, which git
# makes read-only whatever core.sharedRepository says, and what git reads to tell what a
# branch or the index holds (their group write may be a shared repository's).
GIT_FILE_DIRS = ("refs", "logs")
MAX_GIT_FILES = 200_000  # files looked at in all: a bound on the root runner's work


def _git_files_loosened(before: Survey, after: Survey, gone: set[Path]) -> list[Planted]:
    """Files of the git dirs the task made writable by other local accounts (a red
    team, session 50): a loose object, a pack or its index chmod 0666 or given an
    access ACL `o::rw` let any account rewrite the user's blobs after the run (git does
    not check a loose object's hash when it reads it); the index, HEAD, packed-refs,
    refs and logs likewise for every user. Only files whose ctime falls in the run are
    read (chmod and setxattr set it); disarm() takes the write away."""
    since = before.started_ns - SETTLED_NS
    inherited = frozenset().union(
        *(writers for (_, kind), writers in before.acls.items() if kind == "default")
    )
    budget = [MAX_GIT_FILES]
    found: list[Planted] = []
    for git_dir in sorted(before.git_dirs | after.git_dirs):
        if git_dir in gone or _below_any(git_dir, gone):
            continue
        places = [(git_dir, False, 0)]
        places += [(git_dir / name, False, MAX_DEPTH) for name in GIT_FILE_DIRS]
        places.append((git_dir / "objects", True, 1))
        for top, objects, depth in places:
            for path, st in _files_below(top, depth, budget):
                if st.st_ctime_ns < since or path in after.controls or _set_aside(path.name):
                    continue
                what = "git object" if objects else "git file (index, HEAD, refs, logs)"
                bits = st.st_mode & (LOOSE_BITS if objects else 0o002)
                if bits:
                    found.append(Planted(path, _git_file_why(what, _whom(bits)), loosened=bits))
                    continue
                writers = _file_acl_writers(path) - inherited
                if writers:
                    why = _git_file_why(what, _acl_whom(writers) + " (an ACL)")
                    found.append(Planted(path, why, acl="access"))
    return found


def _git_file_why(what: str, whom: str) -> str:
    return (
        f"a {what} the task made writable by {whom} (any local account could rewrite "
        "what the user's git reads from it)"
    )


def _files_below(top: Path, depth: int, budget: list[int]):
    """(path, lstat) of the regular files in `top` and, `depth` levels down, below it;
    no link followed; at most `budget[0]` in all (counted down)."""
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield Path(entry.path), st
        elif stat.S_ISDIR(st.st_mode) and depth > 0:
            yield from _files_below(Path(entry.path), depth - 1, budget)


def _file_acl_writers(path: Path) -> frozenset[tuple[int, int]]:
    try:
        return _acl_writers("access", os.getxattr(path, ACL_ATTRS[1][0], follow_symlinks=False))
    except OSError as e:
        return frozenset() if e.errno in _NO_ACL else frozenset({ACL_UNREADABLE})


def _loosened(before: Survey, after: Survey, gone: set[Path]) -> list[Planted]:
    """Directories and control paths the task made writable to other local accounts:
    the workspace is idmapped to its owner, so the task may chmod the user's pinned
    `.git` (or the root, a `.husky/_`...) 0777, and after the run any local account
    could swap its hooks for its own. Write bits for group or others that the task
    added to what was there before, and write bits for others on what is new (group
    ones there may be the caller's umask), are removed by disarm()."""
    found: dict[Path, tuple[int, str]] = {}
    for path, mode in after.loose.items():
        old = before.loose.get(path)
        root = next((r for r in before.roots if path == r or r in path.parents), None)
        relative = "" if root is None or path == root else str(path.relative_to(root))
        existed = old is not None or (root, relative) in before.dirs or _was_noted(before, path)
        added = mode & ~(old or 0) & LOOSE_BITS if existed else mode & 0o002
        if added:
            found[path] = (added, "directory")
    for path, control in after.controls.items():
        mode = control.fingerprint.mode
        if stat.S_ISLNK(mode) or not mode & LOOSE_BITS:
            continue
        old = before.controls.get(path)
        added = mode & ~old.fingerprint.mode & LOOSE_BITS if old is not None else mode & 0o002
        if added:
            found[path] = (added, _ROLE_NAMES[control.role])
    return [
        Planted(
            path,
            f"a {kind} the task made writable by {_whom(bits)} (any local account could "
            f"change it for the user's next git command or editor)",
            loosened=bits,
        )
        for path, (bits, kind) in sorted(found.items())
        if path not in gone and not _below_any(path, gone) and not _set_aside(path.name)
    ]


def _acl_loosened(before: Survey, after: Survey, gone: set[Path]) -> list[Planted]:
    """ACLs the task set that let other local accounts write: the entries granting
    write (`_acl_writers`) that the same ACL of the same path did not grant before; on
    a new path, that no default ACL of the walk before granted (what is made below a
    directory with the user's own default ACL inherits it). disarm() takes their
    write away (`_tighten_acl`)."""
    inherited = frozenset().union(
        *(writers for (_, kind), writers in before.acls.items() if kind == "default")
    )
    planted = []
    for (path, kind), writers in sorted(after.acls.items()):
        if path in gone or _below_any(path, gone) or _set_aside(path.name):
            continue
        kept = before.acls.get((path, kind))
        if kept is None and not _existed(before, path):
            kept = inherited
        added = writers - (kept or frozenset())
        if not added:
            continue
        what = _acl_kind_name(before, after, path)
        if kind == "default":
            why = (
                f"a default ACL the task set on a {what} gives {_acl_whom(added)} write to "
                f"what the user's tools create in it later (any local account could change "
                f"the user's next objects, worktrees or hooks)"
            )
        else:
            why = (
                f"an ACL the task set on a {what} gives {_acl_whom(added)} write to it (any "
                f"local account could change it for the user's next git command or editor)"
            )
        planted.append(Planted(path, why, acl=kind, acl_kept=writers - added))
    return planted


def _existed(before: Survey, path: Path) -> bool:
    """Whether the walk before found `path`: a directory it read or stated, a control path."""
    if path in before.controls or path in before.loose or _was_noted(before, path):
        return True
    root = _root_of(before, path)
    if root is None:
        return path in before.roots
    return (root, "" if path == root else str(path.relative_to(root))) in before.dirs


def _acl_kind_name(before: Survey, after: Survey, path: Path) -> str:
    control = after.controls.get(path) or before.controls.get(path)
    return _ROLE_NAMES[control.role] if control is not None else "directory"


def _acl_whom(writers: frozenset[tuple[int, int]]) -> str:
    names = []
    for tag, ident in sorted(writers):
        if (tag, ident) == ACL_UNREADABLE:
            names.append("accounts it could not read (an ACL not parsed)")
        elif tag == ACL_OTHER:
            names.append("every user")
        elif tag == ACL_GROUP_OBJ:
            names.append("its group")
        else:
            names.append(f"{'user' if tag == ACL_USER else 'group'} {ident}")
    return " and ".join(names)


def _whom(bits: int) -> str:
    return " and ".join(w for b, w in ((0o020, "its group"), (0o002, "every user")) if bits & b)


def _below_any(path: Path, directories: set[Path]) -> bool:
    return any(parent in directories for parent in path.parents)


def _not_finished(before: Survey, after: Survey) -> list[Planted]:
    """What the walk after the task ran out of room in (`Survey.cut`), as crowded
    directories are: the outermost one the task made is planted whole (renamed aside
    with all in it); the outermost of the user's (a root, one the walk before found)
    is reported as not checked, and left where it is."""
    why = (
        f"the check ran out of room here (over {MAX_WALK_DIRS} directories, "
        f"{MAX_WALK_NAME_BYTES >> 20} MiB of names or {MAX_CONTROLS} control paths in the "
        f"writable roots)"
    )
    planted: list[Planted] = []
    aside: set[Path] = set()  # what is below goes with it
    reported: set[Path] = set()  # the user's: one line says all below is not checked
    for path in sorted(set(after.cut), key=lambda each: len(each.parts)):
        if path in aside or _below_any(path, aside):
            continue
        if _made_by_task(before, path):
            aside.add(path)
            planted.append(Planted(path, f"{why}: a new directory, not checked"))
        elif not _below_any(path, reported):
            reported.add(path)
            planted.append(Planted(path, f"{why}: not all of it checked", movable=False))
    return planted


def _made_by_task(before: Survey, path: Path) -> bool:
    """Whether the directory `path` is new: its parent's record in the walk before
    (complete: every entry seen) lists no directory of its name. Unknown (no record
    of the parent) is not new: a user's directory is never renamed on a guess."""
    root = _root_of(before, path)
    if root is None:
        return False  # a root itself
    parent = "" if path.parent == root else str(path.parent.relative_to(root))
    record = before.dirs.get((root, parent))
    return record is not None and path.name not in (*record.subdirs, *record.deep)


# The names disarm() gives (`_aside_names`), at the end of a name: only these are
# taken for "renamed aside by an earlier run"; `x.sandgate-planted.xml` in
# .idea/runConfigurations/ is one JetBrains reads.
_ASIDE_NAME = re.compile(r"\.sandgate-planted(?:-[0-9]{1,2}|-[0-9a-f]{32})?\Z")


def _set_aside(name: str) -> bool:
    return _ASIDE_NAME.search(name) is not None


def _judged(control: ControlPath, after: Survey) -> str | None:
    """`_judge`, and a path it cannot judge (an error of any kind: a name the kernel
    cannot take, a file that went away) is planted: never passed, never an exception
    out of the check after the run (it would skip the rest: the renames, the report)."""
    try:
        return _judge(control, after)
    except Exception as e:  # noqa: BLE001 - whatever it is, the path is not known harmless
        return f"a {_ROLE_NAMES[control.role]} the check could not judge ({type(e).__name__})"


def _judge(control: ControlPath, after: Survey) -> str | None:
    """Why a new or changed control path would run code on the host; None: harmless."""
    mode = control.fingerprint.mode
    role = control.role
    if role == "named":
        return f"a work-tree file that a repository's config runs ({_named_why(control, after)})"
    if role == "linked":
        return f"a file git or an editor reaches through a link ({_named_why(control, after)})"
    if role == "hook" and stat.S_ISREG(mode) and control.relative.endswith(".sample"):
        return None
    kind = _kind(mode)
    if role == "hgdir" and stat.S_ISREG(mode):
        return None  # hg takes only a directory (or a link to one) for a repository
    if role == "special":
        return (
            f"a {kind} in the workspace (the user's git, hg or editor that opens it on "
            f"the host hangs on it for good, or acts on the device)"
        )
    if role == "gitlink":
        return (
            "a symbolic link in a git directory (git makes none there; a commondir or "
            "`gitdir:` path through it reaches what the check does not walk)"
        )
    if not stat.S_ISREG(mode):
        tool = "hg" if role.startswith("hg") else "git or an editor" if role == "editor" else "git"
        return f"a {kind} where {tool} reads a {_ROLE_NAMES[role]}"
    if control.fingerprint.nlink > 1:
        return f"a {_ROLE_NAMES[role]} hard-linked to another file"
    if role == "hook":
        return "a git hook (git runs it on the host)"
    if role == "attributes":
        return "git attributes in info/ (they choose filter and diff drivers)"
    if role == "editor":
        return (
            "an editor's or coding agent's workspace settings (they run the tasks, hooks, "
            "servers and tools named there when they open the folder)"
        )
    if role == "hgshared":
        return "a Mercurial sharedpath (hg reads the config of the repository it names)"
    limit = {
        "config": gitconfig.MAX_CONFIG_BYTES,
        "hgrc": gitconfig.MAX_CONFIG_BYTES,
        "strategy": gitconfig.MAX_CONFIG_BYTES,
        "todo": MAX_TODO_BYTES,
    }.get(role, MAX_POINTER_BYTES)
    try:
        data = _read_small(control.path, limit)
    except OSError as e:
        return f"an unreadable {_ROLE_NAMES[role]} ({e.strerror})"
    except ValueError as e:  # a name the kernel cannot take (an embedded NUL)
        return f"an unreadable {_ROLE_NAMES[role]} ({e})"
    if data is None:
        return f"a {_ROLE_NAMES[role]} over {limit} bytes"
    text = data.decode("utf-8", "replace")
    if role in ("config", "include"):
        keys = gitconfig.code_keys(text)
        return f"git config that runs code: {', '.join(keys)[:300]}" if keys else None
    if role == "hgrc":
        keys = hgrc.code_entries(text)
        return f"Mercurial config that runs code: {', '.join(keys)[:300]}" if keys else None
    if role == "todo":
        runs = [line.strip() for line in text.splitlines() if _EXEC_LINE.match(line)]
        return f"a rebase todo list that runs {runs[0][:200]!r} on --continue" if runs else None
    if role == "strategy":
        return _judge_strategy(control, text)
    return _judge_pointer(control, data, after)


def _judge_strategy(control: ControlPath, text: str) -> str | None:
    """A stopped rebase's `strategy` or a cherry-pick's `opts`: `--continue` runs
    `git merge-<strategy>`, a path in the work tree when it has a `/` in it. Harmless
    only when each strategy it names is one of git's own (BUILTIN_STRATEGIES)."""
    if control.relative.rsplit("/", 1)[-1] == "strategy":
        # read_oneliner: one trailing newline (or CR LF) off, the rest is the name
        named = [text.removesuffix("\n").removesuffix("\r")]
    else:
        try:
            entries = gitconfig.parse_config(text)
        except ValueError as e:
            return f"a cherry-pick or revert options file git cannot read as config ({e})"
        others = [e.key for e in entries if e.section != "options"]
        if others:  # git refuses them ("invalid key"): not what git writes
            return f"a cherry-pick or revert options file with keys git never writes: {others[0]!r}"
        named = [e.value or "" for e in entries if e.name == "strategy"]
    odd = [name for name in named if name not in BUILTIN_STRATEGIES]
    if odd:
        return (
            f"a merge strategy {odd[0][:200]!r} that `--continue` would run as "
            f"`git merge-{odd[0][:200]}` (not one of git's own)"
        )
    return None


def _judge_pointer(control: ControlPath, data: bytes, after: Survey) -> str | None:
    """A `.git` file or a `commondir`, judged by where the kernel takes it: read as git
    reads it (`_pointer_value`), resolved a component at a time from its directory
    (`_resolve`, as git's real_path does), through no link in a writable root, to a
    git directory the walk found (never one below a git dir's `objects` or an `.hg/
    store`, which the walk skips), in the relation git makes: a `.git` file of a
    linked worktree or a submodule (`_gitfile_relation`), a `commondir` of a
    worktree's git dir (`<common>/worktrees/<name>`)."""
    name = _ROLE_NAMES[control.role]
    gitfile = control.role == "gitfile"
    text = _pointer_value(data, gitfile=gitfile)
    if text is None:
        return f"a {name} git reads differently from a one-line path (a NUL, newline or CR in it, or no `gitdir: `)"
    target, links = _pointed(control.path.parent, text)
    if links:
        return (
            f"a {name} whose path goes through {links[0]}, a symbolic link (git writes "
            f"pointers without one; the task's may lead git elsewhere than the check)"
        )
    if target is None or target not in after.git_dirs:
        return f"a {name} pointing outside the workspace's repositories (to {target})"
    if not gitfile:
        if control.path.parent.parent != target / "worktrees":
            return (
                f"a {name} pointing at {target}, whose worktree git dirs are in "
                f"{target / 'worktrees'}: git would take its config and hooks for this one"
            )
        return None
    return _gitfile_relation(control, target, after)


def _gitfile_relation(control: ControlPath, target: Path, after: Survey) -> str | None:
    """A `.git` file makes its directory the work tree of the git dir it names, where
    that repository's config runs what it names relative to the work tree
    (`core.hooksPath = .husky/_`...). Harmless only in the relations git makes, and
    when the move puts no such path among the task's files (`_moved_named`): a linked
    worktree's git dir names this file back (its `gitdir`); a submodule's is below a
    `modules/` of a git dir, its core.worktree (if set) this directory. Anything else
    (`sub/.git` = `gitdir: ../.git`: the user's own repository with `sub/` as its work
    tree, and `sub/.husky/_` as its hooks) is planted."""
    here = control.path.parent
    related = False
    if (target / "commondir").exists():
        back = _pointer_text(target / "gitdir")
        if back is not None:
            linked, links = _pointed(target, back)
            related = not links and linked == control.path
    elif any(p.name == "modules" and p.parent in after.git_dirs for p in target.parents):
        worktree = [
            e.value for e in _entries(target / "config") if e.key == "core.worktree" and e.value
        ]
        if worktree:
            resolved, links = _pointed(target, worktree[-1])
            related = not links and resolved == here
        else:
            related = True  # git takes this directory: judged by what moves here
    if not related:
        return (
            f"a `.git` file pointing at {target}, a repository whose work tree is "
            f"elsewhere: git would take {here} for its work tree, and run what its config "
            f"names there"
        )
    moved = _moved_named(after, target, here)
    if moved:
        return (
            f"a `.git` file of a new worktree or submodule of a repository whose config "
            f"runs work-tree files ({moved[0]}): git would run the task's copies in {here}"
        )
    return None


def _moved_named(after: Survey, git_dir: Path, top: Path) -> list[str]:
    """What the configs of `git_dir` would name relative to the work tree `top`, in the
    writable roots, that the walk before did not guard (each with why)."""
    scratch = Survey(after.roots)
    configs = [git_dir / "config", git_dir / "config.worktree"]
    common = _common_dir(git_dir)
    if common is not None:
        configs.append(common / "config")
    seen: set[Path] = set()
    for config in configs:
        _follow_config(scratch, config, top, 0, seen)
    found = [why for path, (why, role) in scratch.named.items() if path not in after.named]
    return found + scratch.unguardable


def _named_why(control: ControlPath, after: Survey) -> str:
    """The config entry that names this path, a directory it is in, or a path below
    it (a link on the way)."""
    here = control.path
    for path, (why, _) in after.named.items():
        if path == here or path in here.parents or here in path.parents:
            return why
    return "a named path"


_ROLE_NAMES = {
    "linked": "file reached through a link",
    "config": "git config",
    "include": "git config",
    "named": "work-tree file git runs",
    "hook": "git hook",
    "attributes": "git attributes file",
    "commondir": "git commondir file",
    "gitfile": "`.git` file",
    "editor": "editor or agent settings file",
    "todo": "rebase or cherry-pick todo list",
    "strategy": "rebase or cherry-pick merge strategy",
    "gitlink": "symbolic link in a git directory",
    "hgrc": "Mercurial config",
    "hgshared": "Mercurial sharedpath file",
    "hgdir": "`.hg` repository",
    "special": "special file",
}


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISFIFO(mode):
        return "special file (a FIFO)"
    return "special file (a socket)" if stat.S_ISSOCK(mode) else "special file (a device)"


def _read_small(path: Path, limit: int) -> bytes | None:
    """The file's bytes (found without following a link, at its end or on its way:
    `_open_parent`), None when over `limit`. Not even opened when it is not a regular
    file: a config link or include naming a device (a watchdog, a tape) would act on
    its open."""
    parent = _open_parent(path)
    try:
        if not stat.S_ISREG(os.stat(path.name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(path.name, flags, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    return None if len(data) > limit else data


def disarm(planted: list[Planted]) -> list[Planted]:
    """Rename each planted path to NAME.sandgate-planted (NAME.sandgate-planted-2...)
    beside it, so that git and editors never find it by its name; the evidence stays
    for the user. The rename is relative to a descriptor of the parent directory
    opened without following links. One that cannot be renamed (a link on the way,
    any error) stays `disarmed_as` None: reported NOT renamed, never an exception."""
    done = []
    for item in planted:
        if item.loosened:
            fixed = item.path if _tighten(item.path, item.loosened) else None
            done.append(Planted(item.path, item.why, fixed, item.movable, item.loosened))
            continue
        if item.acl:
            fixed = item.path if _tighten_acl(item.path, item.acl, item.acl_kept) else None
            done.append(replace(item, disarmed_as=fixed))
            continue
        aside = _rename_aside(item.path) if item.movable else None
        done.append(Planted(item.path, item.why, aside, item.movable))
    return done


def _tighten(path: Path, bits: int) -> bool:
    """Remove `bits` from the mode of `path` (found with no link anywhere on its way or
    at its end: `mounts.open_exact`, chmod through its descriptor); False on any error."""
    try:
        fd = mounts.open_exact(str(path))
    except Exception:  # noqa: BLE001 - not reached: reported NOT repaired
        return False
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.chmod(f"/proc/self/fd/{fd}", mode & ~bits)
        return stat.S_IMODE(os.fstat(fd).st_mode) & bits == 0
    except Exception:  # noqa: BLE001 - reported NOT repaired, never out of the check
        return False
    finally:
        os.close(fd)


def _tighten_acl(path: Path, kind: str, kept: frozenset[tuple[int, int]]) -> bool:
    """Take write from every entry of the `kind` ACL of `path` that grants it but for
    `kept` (and from a default ACL's mask, if nothing kept needs it); a default ACL
    with nothing kept is removed whole (what is made there then takes the creator's
    umask). Found as `_tighten` finds it; False on any error, or when it still grants
    more."""
    attr = dict((k, a) for a, k in ACL_ATTRS)[kind]
    try:
        fd = mounts.open_exact(str(path))
    except Exception:  # noqa: BLE001 - not reached: reported NOT repaired
        return False
    where = f"/proc/self/fd/{fd}"
    try:
        data = os.getxattr(where, attr)
        if kind == "default" and not kept:
            os.removexattr(where, attr)
            return True
        entries = _acl_entries(data)
        # Every entry with write but the kept, the mask aside: a mask that hides one
        # now (the mode's group bits: `_loosened` may just have cleared them) would
        # give it back at the user's next chmod g+w.
        tags = (ACL_USER, ACL_GROUP, *((ACL_GROUP_OBJ, ACL_OTHER) if kind == "default" else ()))
        writers = {(tag, ident) for tag, perm, ident in entries if tag in tags}
        # A default ACL's mask is the group bits of what is made there: kept only for
        # a writer kept. An access ACL's is the mode's group bits (`_loosened`'s).
        clear_mask = kind == "default" and not any(tag != ACL_OTHER for tag, _ in kept)
        fixed = [
            (tag, perm & ~ACL_WRITE, ident)
            if ((tag, ident) in writers - kept) or (tag == ACL_MASK and clear_mask)
            else (tag, perm, ident)
            for tag, perm, ident in entries
        ]
        value = ACL_VERSION.to_bytes(4, "little") + b"".join(
            tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
            for tag, perm, ident in fixed
        )
        os.setxattr(where, attr, value)
        return _acl_writers(kind, os.getxattr(where, attr)) <= kept
    except Exception:  # noqa: BLE001 - reported NOT repaired, never out of the check
        return False
    finally:
        os.close(fd)


# Entries of a crowded directory `_changed_since` stats at most: past that, changed.
MAX_CROWDED_SCAN = 1_000_000


def _changed_since(directory: Path, since_ns: int) -> bool:
    """Whether a crowded directory (not listed by the walks: Survey.crowded) that was
    crowded before the run too has had an entry made, removed, renamed or written to
    since `since_ns` (its own ctime, or one of its files'), read streaming: nothing
    kept. Unlisted, one the task added a hook or an editor task to was never checked.
    Also True when it cannot be read, or holds more than MAX_CROWDED_SCAN entries."""
    try:
        found = mounts.open_exact(str(directory))  # no link on the way (`_open_parent`)
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=found)
        finally:
            os.close(found)
        try:
            if os.fstat(fd).st_ctime_ns >= since_ns:
                return True
            with os.scandir(fd) as listing:
                for count, entry in enumerate(listing):
                    if count >= MAX_CROWDED_SCAN:
                        return True
                    if entry.stat(follow_symlinks=False).st_ctime_ns >= since_ns:
                        return True
        finally:
            os.close(fd)
    except (OSError, ValueError):  # ValueError: a name the kernel cannot take
        return True
    return False


def _open_parent(path: Path) -> int:
    """An O_PATH descriptor of `path`'s directory, found without following a symbolic
    link anywhere on its way (mounts.open_exact; `path` is resolved: a root joined with
    what the walk found). The walk itself went from descriptor to descriptor, but what
    the check does after it went by path, as root in the host's view: a task of another
    run sharing the directory, still running, turned a directory on the way into a link
    to a host directory in between, and the rename aside renamed a host file
    (`/etc/pam.d/common-auth`), the judge read one only root may read. OSError
    (mounts.Moved) when a link is on the way."""
    return mounts.open_exact(str(path.parent))


def _rename_aside(path: Path) -> Path | None:
    """Where `path` went (`_aside_names`, the first name free); None: it could not be
    renamed (its parent not reached without a link, or an error of any kind)."""
    try:
        parent = _open_parent(path)
    except Exception:  # noqa: BLE001 - not reached: reported NOT renamed
        return None
    try:
        for name in _aside_names(path.name):
            try:
                _rename_new(parent, path.name, name)
            except FileExistsError:
                continue  # taken (the task may have made every numbered name)
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:
                    continue  # NAME and the suffix over 255 bytes: the last ones are short
                return None
            return path.parent / name
        return None
    except Exception:  # noqa: BLE001 - reported NOT renamed, never out of the check
        return None
    finally:
        os.close(parent)


ASIDE_NUMBERED = 99  # NAME.sandgate-planted, then -2 ... -99: the names a user reads


def _aside_names(name: str):
    """The names to rename `name` to, in turn: NAME.sandgate-planted, -2 ... -99, then
    names with 128 random bits the task cannot have made first (it made all 99: its
    hook stayed live), the last short enough for any NAME (NAME_MAX)."""
    yield f"{name}{SUFFIX}"
    for n in range(2, ASIDE_NUMBERED + 1):
        yield f"{name}{SUFFIX}-{n}"
    yield f"{name}{SUFFIX}-{secrets.token_hex(16)}"
    for _ in range(3):
        yield f"{SUFFIX}-{secrets.token_hex(16)}"


def _rename_new(parent: int, name: str, new: str) -> None:
    """Rename `name` to `new` in `parent`, never over what is there (FileExistsError):
    RENAME_NOREPLACE; where the file system cannot, a check then a rename (every
    process of the sandbox is gone: nothing makes `new` in between)."""
    try:
        mounts.rename_noreplace(parent, name, new)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    try:
        os.stat(new, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(name, new, src_dir_fd=parent, dst_dir_fd=parent)
        return
    raise FileExistsError(errno.EEXIST, f"{new!r} exists")


def summarised(planted: list[Planted], limit: int = MAX_REPORTED) -> list[Planted]:
    """At most `limit` items to report one by one, then one that counts the rest; those
    NOT renamed first (still live on the host: each one the user must see)."""
    planted = sorted(planted, key=lambda item: item.renamed)  # stable: False first
    if len(planted) <= limit:
        return planted
    rest = planted[limit - 1 :]
    renamed = sum(item.renamed for item in rest)
    first = rest[0]
    why = f"and {len(rest) - 1} more planted paths like it ({renamed} of {len(rest)} renamed)"
    return [
        *planted[: limit - 1],
        replace(first, why=f"{first.why}; {why}"),
    ]


def identity(before: Survey, path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what the walk found at `path` (a control path, a named one,
    or a directory it read whole: a root, a git directory, hooks/); None: not known."""
    control = before.controls.get(path)
    if control is not None:
        return control.fingerprint.dev, control.fingerprint.ino
    for root in before.roots:
        if path == root or root in path.parents:
            relative = "" if path == root else str(path.relative_to(root))
            record = before.dirs.get((root, relative))
            return (record.dev, record.ino) if record is not None else None
    return None


def identities(before: Survey, paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """`identity` of each of `paths` known to the walk: what the sandbox init checks a
    bind source is (spec.file_view `inodes`), so that nothing swapped in is mounted."""
    return {path: found for path in paths if (found := identity(before, path)) is not None}


def pinned_dirs(before: Survey, limit: int = MAX_PINNED) -> list[Path]:
    """The git directories to bind over themselves for the run (writable, idmapped
    like the workspace): a mount point cannot be renamed or removed."""
    return sorted(d for d in before.git_dirs if d not in before.roots)[:limit]


def read_only_binds(before: Survey, limit: int = MAX_PINNED) -> list[Path]:
    """What of each pinned git directory the task may read but not change, every
    `.git` file (a worktree's or submodule's pointer to its git directory), and the
    work-tree paths the repositories' configs name (`named`, up to `limit`)."""
    paths = [
        c.path
        for c in before.controls.values()
        if c.role == "gitfile" and stat.S_ISREG(c.fingerprint.mode)
    ]
    for git_dir in pinned_dirs(before, limit):
        for name in READ_ONLY_IN_GITDIR:
            path = git_dir / name
            with contextlib.suppress(OSError):
                os.lstat(path)
                if not path.is_symlink():
                    paths.append(path)
    # What the repositories' configs name, where it exists (else: checked after)
    named = [p for p in sorted(before.named) if p in before.controls and p not in paths]
    return paths + named[:limit]


# --- the walk kept for the next run's walk before (`kept`, `keep`) ------------------

KEEP_MAX_DIRS = 50_000  # a walk of more directories is not kept: reading it back costs more
# Nor one whose file would be bigger: it lies in the state directory (the audit log's
# file system, which the disk reserve does not watch), up to KEEP_FILES of them, and
# the next run reads it whole. 50,000 directories of a checkout: ~10 MB. The task's
# deep chain of 255-byte names made 3,250 directories a 192 MiB file.
KEEP_MAX_BYTES = 12 << 20
KEPT_RECORD_BYTES = 120  # a record's JSON beside its names (numbers, contexts)
KEEP_FILES = 64  # walks kept in the cache directory (one per set of roots); the oldest go
_CONTEXTS = frozenset({"plain", "git", "hooks", "info", "editor", "sequencer", "hg"})
_ROLES = frozenset(
    {"config", "hook", "attributes", "commondir", "gitfile", "editor", "todo"}
    | {"strategy", "gitlink", "special"}
    | {"hgrc", "hgshared", "hgdir"}
)


def kept_walk(cache_dir: Path | None, roots: list[Path]) -> Survey | None:
    """The directories a run's walk after its task found in these roots (`keep`), for
    this run's walk before to start from: what did not change since is not read
    again. None without one, or when it does not read back as what `keep` writes.
    The file is trusted as a seccomp program is (private_cache: root's, private):
    a record that lied would hide a directory's entries from both walks."""
    if cache_dir is None:
        return None
    data = private_cache.read(_kept_path(cache_dir, roots))
    if data is None:
        return None
    try:
        document = json.loads(data)
        if document["roots"] != [str(root) for root in roots]:
            return None
        kept = Survey(tuple(roots), _number(document["started_ns"]))
        numbers, texts, names, roles = [], [], [], []
        for index, relative, dev, ino, ctime, given, context, subdirs, controls, deep in document[
            "dirs"
        ]:
            controls = tuple((name, role) for name, role in controls)
            kept.dirs[roots[_number(index)], relative] = DirRecord(
                dev, ino, ctime, given, context, tuple(subdirs), controls, tuple(deep)
            )
            numbers += (index, dev, ino, ctime)
            texts += (relative, given, context)
            names += (*subdirs, *deep, *(name for name, _ in controls))
            roles += (role for _, role in controls)
        # Checked at once, not record by record (~920 records for a checkout: 2 ms less).
        joined = "\0".join(names)
        if (
            not all(type(n) is int for n in numbers)
            or min(numbers[::4], default=0) < 0
            or not all(type(t) is str for t in texts)
            or (set(texts[1::3]) | set(texts[2::3])) - _CONTEXTS
            or set(roles) - _ROLES
            or not all(type(n) is str for n in names)
            or "/" in joined
            or joined.count("\0") != max(len(names) - 1, 0)
            or {"", ".", ".."} & set(names)
        ):
            return None
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return kept


def keep(walked: Survey, cache_dir: Path | None) -> None:
    """`walked` (a walk after a task) kept for the next run on the same roots
    (`kept_walk`). Best effort: a walk not kept costs the next run time, not safety."""
    if cache_dir is None or len(walked.dirs) > KEEP_MAX_DIRS:
        return
    if walked.name_bytes + KEPT_RECORD_BYTES * len(walked.dirs) > KEEP_MAX_BYTES:
        return  # known too big before it is made: not even once in memory
    index = {root: i for i, root in enumerate(walked.roots)}
    document = {
        "roots": [str(root) for root in walked.roots],
        "started_ns": walked.started_ns,
        "dirs": [
            [index[root], relative, *record] for (root, relative), record in walked.dirs.items()
        ],
    }
    data = json.dumps(document).encode()
    if len(data) > KEEP_MAX_BYTES:
        return
    private_cache.write(_kept_path(cache_dir, list(walked.roots)), data)
    private_cache.keep_newest(cache_dir, "walk-*.json", KEEP_FILES)


def _kept_path(cache_dir: Path, roots: list[Path]) -> str:
    key = hashlib.sha256("\0".join(str(root) for root in roots).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"walk-{key}.json")


def _number(value) -> int:
    if type(value) is not int:
        raise TypeError("not an integer")
    return value
