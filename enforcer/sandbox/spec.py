"""What the task gets: its ids, its file view and its environment, as the JSON spec
that the sandbox init (sandbox/init.py) carries out.

Runner side, no kernel calls: everything here is decided and checked before any
namespace exists, so a bad --workspace or --env is one clear error and nothing
to tear down. docs/sandbox.md describes the result for admins.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sandgate.enforcer.sandbox.disk_reserve import DEFAULT as DEFAULT_DISK_RESERVE
from sandgate.enforcer.sandbox.disk_reserve import Reserve
from sandgate.enforcer.sandbox.inherit import Inherited

# The task's ids 0..ID_COUNT-1 map to host ids that own nothing: no account, no file,
# no process of the host; a range of its own a run, from ID_BASE.. (id_slots.py). An
# /etc/subuid and /etc/subgid entry for a `sandgate` user overrides the pool (as for
# rootless containers).
SUBID_USER = "sandgate"
ID_BASE = 2_000_000_000
ID_COUNT = 65536
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_THROUGH = ("PATH", "LANG", "LANGUAGE", "TERM", "TZ", "COLORTERM", "NO_COLOR")
# A workspace is mounted read-write: never one of these, nor anything below them
# (the host's programs, configuration, devices and state), nor a home root.
SYSTEM_DIRS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
)
NOT_WORKSPACES = (
    "/",
    "/home",
    "/root",
    "/var",
    "/opt",
    "/srv",
    "/mnt",
    "/media",
    "/tmp",
    "/var/tmp",
)
SANDBOX_TMPFS = ("/tmp", "/var/tmp", "/run")
# Each fresh tmpfs (those above, $HOME, /home, /dev/shm) is sized: without size= the
# kernel gives each half the host's RAM and as many inodes, and with `--memory none`
# nothing charges their pages to the task, so one task could take the host's memory.
# With a memory limit each may hold that much (the cgroup bounds their sum); without,
# TMPFS_BYTES_UNLIMITED each. Inodes: one per 4 KiB of size (an empty file costs ~1 KiB
# of kernel memory in inode and dentry caches).
TMPFS_BYTES_UNLIMITED = 512 << 20
TMPFS_BYTES_PER_INODE = 4096


def tmpfs_bounds(memory_bytes: int | None) -> tuple[int, int]:
    """(size, nr_inodes) of each of the task's tmpfs mounts, for its memory limit."""
    size = memory_bytes if memory_bytes is not None else TMPFS_BYTES_UNLIMITED
    return size, max(size // TMPFS_BYTES_PER_INODE, 1024)


class SandboxError(Exception):
    """The sandbox cannot be set up as asked; the message names the option and the fix."""


@dataclass(frozen=True)
class SandboxOptions:
    workspace: Path | None = None  # None: no workspace (--no-workspace)
    uid: int = 0
    gid: int = 0
    ro: tuple[Path, ...] = ()
    rw: tuple[Path, ...] = ()
    hide: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # what --env / --env-file gave, resolved
    allow_weaker: bool = False
    self_test: bool = False
    # Git control files in the workspace read-only during the run and checked after it
    # (sandbox/planting.py); off: --no-workspace-guard, a sandbox_weakened gap.
    workspace_guard: bool = True
    # The umask and limits of whoever ran `sandgate run` (a warm runner's caller);
    # None: this process's when the spec is written.
    inherited: Inherited | None = None
    # The room the task must leave on the file systems it can write (--disk-reserve);
    # None: none. The runner kills the task below it (disk_reserve.DiskWatch).
    disk_reserve: Reserve | None = DEFAULT_DISK_RESERVE

    @property
    def writable(self) -> list[Path]:
        """Where the task can write: its workspace and the --rw paths."""
        return ([self.workspace] if self.workspace else []) + list(self.rw)


@dataclass(frozen=True)
class IdRange:
    base: int
    count: int
    source: str  # where it came from, for messages and docs


def parse_user(text: str) -> tuple[int, int]:
    """--user UID[:GID] (numbers inside the sandbox; GID defaults to UID)."""
    uid_text, _, gid_text = text.partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        raise SandboxError(
            f"--user {text!r}: expected UID[:GID] as numbers, e.g. --user 1000"
        ) from None
    if not (0 <= uid < ID_COUNT and 0 <= gid < ID_COUNT):
        raise SandboxError(f"--user {text!r}: ids inside the sandbox are 0 to {ID_COUNT - 1}")
    return uid, gid


def parse_env(
    items: list[str], env_files: list[Path], caller: dict[str, str], writable: list[Path]
) -> dict[str, str]:
    """--env NAME (the caller's value), --env NAME=VALUE, --env-file FILE (NAME=VALUE
    lines, # comments); later ones win. `writable`: where the task can write
    (`read_for_task`)."""
    result: dict[str, str] = {}
    for path in env_files:
        try:
            lines = read_for_task("--env-file", path, writable).decode().splitlines()
        except UnicodeDecodeError:
            raise SandboxError(f"--env-file {path}: not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.removeprefix("export ").partition("=")
            if not sep or not _is_name(name):
                raise SandboxError(
                    f"--env-file {path}:{number}: expected NAME=VALUE, got {line[:60]!r}"
                )
            result[name] = value
    for item in items:
        name, sep, value = item.partition("=")
        if not _is_name(name):
            raise SandboxError(f"--env {item[:60]!r}: not a variable name (NAME or NAME=VALUE)")
        if sep:
            result[name] = value
        elif name in caller:
            result[name] = caller[name]
    return result


def _is_name(text: str) -> bool:
    return (
        bool(text)
        and (text[0].isalpha() or text[0] == "_")
        and all(c.isalnum() or c == "_" for c in text)
    )


def task_environment(
    caller: dict[str, str], passed: dict[str, str], sandgate: dict[str, str], *, uid: int, home: str
) -> dict[str, str]:
    """Only what the task needs and what was passed: nothing else of the caller's
    environment (cloud keys, tokens, SSH_AUTH_SOCK) reaches the task. A variable
    given with --env wins over one sandgate sets (e.g. its own CA bundle), but for
    JAVA_TOOL_OPTIONS, whose options are added after sandgate's (its truststore): a
    JVM takes the last of an option given twice, and keeps the others."""
    env = {name: caller[name] for name in PASSED_THROUGH if name in caller}
    env.update({name: value for name, value in caller.items() if name.startswith("LC_")})
    env.setdefault("PATH", DEFAULT_PATH)
    user = "root" if uid == 0 else "sandbox"
    env.update(HOME=home, USER=user, LOGNAME=user, **sandgate)
    env.update(passed)
    if "JAVA_TOOL_OPTIONS" in sandgate and passed.get("JAVA_TOOL_OPTIONS"):
        env["JAVA_TOOL_OPTIONS"] = f"{sandgate['JAVA_TOOL_OPTIONS']} {passed['JAVA_TOOL_OPTIONS']}"
    return env


def _under(path: Path, parent: Path) -> bool:
    return path == parent or path.is_relative_to(parent)


def check_writable(option: str, path: Path, protected: list[Path]) -> Path:
    """A workspace or --rw directory as an absolute real path, or SandboxError: never
    /, a system directory, a home root, nor anything inside sandgate's own code or state."""
    try:
        real = path.resolve(strict=True)
    except OSError as e:
        raise SandboxError(f"{option} {path}: {e.strerror}") from None
    if not real.is_dir():
        raise SandboxError(f"{option} {path}: not a directory")
    hint = " (pick a project directory with --workspace DIR, or --no-workspace)"
    if str(real) in NOT_WORKSPACES:
        raise SandboxError(f"{option} {real}: refusing to give a task {real} read-write{hint}")
    for system in SYSTEM_DIRS:
        if _under(real, Path(system)):
            raise SandboxError(f"{option} {real}: refusing a system directory ({system}){hint}")
    for own in protected:
        if _under(real, own):
            raise SandboxError(f"{option} {real}: it is inside sandgate's own files ({own}){hint}")
    return real


# Seconds a task has to end after the first stop signal (TERM, INT, HUP) is forwarded
# to it before its init is killed (--stop-grace; `docker stop` waits 10 s too).
STOP_GRACE = 10.0


# Why a file sandgate writes as root must be out of the task's reach.
LINK_TO_HOST_FILE = "it could make this a link to any host file"


def check_out_of_reach(
    option: str,
    path: Path,
    writable: list[Path],
    why: str = LINK_TO_HOST_FILE,
    read_only: list[Path] = (),
) -> Path:
    """A file that sandgate writes as root (--summary-json, --audit-log) or whose
    content must stay the admin's (--rules), or SandboxError when it lies where the task
    can write: there the task (or an earlier one) can make the file, or a directory on
    its way, a link to any host file, which sandgate would then overwrite, and could
    rewrite the audit log's record of what it did or its own policy. Checked as given
    and as resolved; `writable` are the task's resolved writable roots, `read_only`
    what is bound read-only again inside them (sandgate's own code: its shipped rules
    in a development checkout that is the workspace)."""
    # As given and as resolved, each: a name through a link in a writable root is the
    # task's to point elsewhere, wherever it points now (a shipped preset, read-only).
    for each in (Path(os.path.abspath(path)), path.resolve()):
        if any(_under(each, own) for own in read_only):
            continue  # bound read-only again inside the writable root
        for root in writable:
            if _under(each, root):
                raise SandboxError(
                    f"{option} {path}: inside {root}, which the task can write ({why}); "
                    "keep it outside the workspace and --rw paths"
                )
    return path


def check_rule_files(
    rules: Path, paths: tuple[Path, ...], writable: list[Path], read_only: list[Path]
) -> None:
    """An embedded run's --rules and every file its policy read (`paths`: includes,
    approved.yaml) out of the task's reach (check_out_of_reach): an `always` approval
    appends to approved.yaml and reloads every file mid-run, and the next run loads
    them, so the task must not be their author."""
    for path in (rules, *paths):
        check_out_of_reach(
            "--rules" if path == rules else f"--rules {rules} reads",
            path, writable, read_only=read_only,
            why="it could rewrite its own policy, for this run (an `always` approval "
            "reloads every file) and the next",
        )  # fmt: skip


def read_for_task(option: str, path: Path, writable: list[Path]) -> bytes:
    """The bytes of a file that sandgate reads as root for the task (--env-file,
    --extra-ca), or SandboxError: when finding it passes through a place the task can
    write and the file opened lies elsewhere (the task, of this or a concurrent run,
    made it or a directory on its way a link to a host file that root may read and
    the task may not, whose content would reach the task's environment or CA bundle),
    or when it is not a regular file (a FIFO would block the run). Read once, through
    the descriptor that was checked: a link swapped in after the check is not followed."""
    from sandgate.proxy.policy.files import read_regular_file

    def lies_within_reach(fd: int) -> None:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if visits and not any(_under(real, root) for root in writable):
            raise SandboxError(
                f"{option} {path}: a link from {visits}, which the task can write, to "
                f"{real}; give the file's own path"
            )

    try:
        visits = _visits_writable(path, writable)
        return read_regular_file(path, opened=lies_within_reach)
    except OSError as e:
        raise SandboxError(f"{option} {path}: {e.strerror or e}") from None


def _visits_writable(path: Path, writable: list[Path]) -> Path | None:
    """The first place under `writable` that finding `path` passes through (a
    directory or a link on its way, links followed as the kernel does), or None."""
    pending = list(reversed(Path(path).absolute().parts[1:]))  # `..` kept: the kernel's, below
    current, hops = Path("/"), 0
    while pending:
        part = pending.pop()
        if part == "..":
            current = current.parent
            continue
        current = current / part
        for root in writable:
            if _under(current, root):
                return root
        if current.is_symlink():
            hops += 1
            if hops > 40:  # the kernel gives up too (ELOOP): the open fails
                return None
            target = os.readlink(current)
            pending.extend(reversed([p for p in Path(target).parts if p not in ("/", ".")]))
            current = Path("/") if os.path.isabs(target) else current.parent
    return None


def protected_paths(state_dirs: list[Path]) -> list[Path]:
    """sandgate's code, its Python environment and its state: never writable by a task."""
    paths = [*_code_paths(), *(p.resolve() for p in state_dirs)]
    return list(dict.fromkeys(paths))


@functools.cache
def _code_paths() -> tuple[Path, ...]:
    """Where this process's sandgate and Python are: resolved once a process (a warm
    runner inherits them from its pool): they are what it has imported already."""
    import sandgate.enforcer
    import sandgate.proxy
    import sandgate.rules

    code = [
        Path(m.__file__).resolve().parent
        for m in (sandgate.proxy, sandgate.enforcer, sandgate.rules)
    ]
    return (*code, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())


@dataclass
class Spec:
    """The JSON document that sandbox/init.py reads (keys are its contract)."""

    netns: str
    hostname: str
    argv: list[str]
    env: dict[str, str]
    ids: IdRange
    uid: int
    gid: int
    home: str
    cwd: str
    tmpfs: list[str]
    binds: list[dict]
    hide: list[str]
    writable: list[str]
    cgroup_procs: list[str]
    seccomp: str | None
    landlock: bool = True
    userns: bool = True
    allow_weaker: bool = False
    self_test: bool = False
    tmpfs_bounds: tuple[int, int] | None = None  # (size, nr_inodes) of each tmpfs
    report_fd: int | None = None
    joined_fd: int | None = None  # the runner joins the cgroup for the init (runner_joins)
    umask: int = 0o022  # the task's (enforcer/sandbox/inherit.py)
    rlimits: list[list[int]] = field(
        default_factory=list
    )  # [RLIMIT_*, soft, hard]: every process's
    probe_paths: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "ids"}
        data.update(id_base=self.ids.base, id_count=self.ids.count)
        return data


def file_view(
    opts: SandboxOptions,
    *,
    protected: list[Path],
    hidden: list[Path],
    file_binds: list[tuple[Path, Path]],
    pinned: list[Path] = (),
    guarded: list[Path] = (),
    inodes: dict[Path, tuple[int, int]] | None = None,
) -> dict:
    """Binds, tmpfs, hidden paths and writable roots for the spec. Read-only binds of
    sandgate's own files go after the workspace and --rw binds they may lie in.
    `pinned`: git directories in the workspace bound over themselves, writable (a
    mount point cannot be renamed away); `guarded`: their control files, read-only
    (sandbox/planting.py). Every bind but sandgate's own files (`file_binds`, in its
    root-only run directory) is `exact`: a resolved path, which the init opens without
    following any link and mounts by descriptor; `inodes` (planting.identities: what
    the walk before the task found at each path, (st_dev, st_ino)) is checked there
    too, so that nothing a concurrent task swapped in since is mounted."""
    uid = opts.uid
    home = "/root" if uid == 0 else "/home/sandbox"
    tmpfs = [*SANDBOX_TMPFS, "/root"] + ([] if uid == 0 else ["/home"])
    inodes = inodes or {}
    binds = [{"source": str(src), "target": str(dst), "writable": False} for src, dst in file_binds]

    def exact(path: Path, **kind) -> dict:
        inode = inodes.get(path)
        return {"source": str(path), "target": str(path), **kind, "exact": True} | (
            {"inode": list(inode)} if inode else {}
        )

    writable_roots = [p for p in ([opts.workspace] if opts.workspace else []) + list(opts.rw)]

    for path in [*writable_roots, *pinned]:
        binds.append(exact(path, writable=True))
    for path in guarded:
        binds.append(exact(path, writable=False, idmapped=True))
    read_only = list(opts.ro) + [
        p for p in protected if any(_under(p, w) for w in writable_roots) and p.exists()
    ]
    for path in read_only:
        binds.append(exact(path, writable=False))
    # The way to a read-only path in a writable root, bound over itself: a mount point
    # cannot be renamed or removed, a plain directory above one could, and the mount went
    # with it (`mv tools tools.old && mkdir -p tools/ci` put the task's build.sh, or
    # sandgate's own code of a development checkout, at the path the host runs next).
    # A way inside a read-only path is read-only with it: not pinned (bound writable, it
    # would cover that path's read-only bind with a writable one). A way is idmapped as
    # the writable bind it lies in (init: `idmap_of`), not by its own owner: a
    # root-owned directory in a user's workspace mapped root's files to the task, which
    # the workspace's own bind shows as no one's. (A pinned git directory keeps its
    # owner's mapping on purpose: git refuses a repository that looks someone else's.)
    held_by = [*writable_roots, *pinned]  # the binds a way may lie in, mapped as they are
    pinned_ways = set(held_by)

    def idmap_of(way: Path) -> dict:
        holders = [bind for bind in held_by if way != bind and _under(way, bind)]
        return {"idmap_of": str(max(holders, key=lambda b: len(b.parts)))} if holders else {}

    for path in read_only:
        for root in writable_roots:
            if path != root and _under(path, root):
                for way in reversed(path.parents):
                    if any(_under(way, other) for other in read_only):
                        break
                    if way != root and _under(way, root) and way not in pinned_ways:
                        binds.append(exact(way, writable=True, **idmap_of(way)))
                        pinned_ways.add(way)
    # Parents before children: a --ro directory must not cover a workspace inside it,
    # and sandgate's own files inside a workspace go read-only over it; at one path, the
    # read-only bind last (on top).
    binds.sort(key=lambda bind: (len(Path(bind["target"]).parts), not bind["writable"]))
    writable = [str(p) for p in writable_roots] + [*SANDBOX_TMPFS, "/dev", home]
    return {
        "home": home,
        "tmpfs": tmpfs,
        "binds": binds,
        "writable": writable,
        "hide": [str(p) for p in [*hidden, *opts.hide]],
        "cwd": str(opts.workspace) if opts.workspace else home,
    }


def check_paths(option: str, paths: list[Path], writable: list[Path] = ()) -> tuple[Path, ...]:
    """--ro/--rw/--hide paths: absolute, existing, real. `writable` (for --ro: the
    workspace and --rw roots, real paths): a path that goes through a symbolic link
    inside one is refused. Only the real path is bound read-only and pinned on its
    way (file_view); the link is the task's to replace, and the path the admin named
    (the build script the host runs after the run) would then be the task's file."""
    result = []
    for path in paths:
        try:
            real = path.resolve(strict=True)
            found = _link_in(path, writable)
        except OSError as e:
            raise SandboxError(f"{option} {path}: {e.strerror}") from None
        if found is not None:
            link, root = found
            raise SandboxError(
                f"{option} {path}: {link} is a symbolic link inside the writable {root}: "
                f"the task could point it elsewhere, and {path} would name its file after "
                f"the run; give the real path: {option} {real}"
            )
        result.append(real)
    return tuple(result)


def _link_in(path: Path, roots: list[Path]) -> tuple[Path, Path] | None:
    """The first symbolic link on `path`'s way (itself included) that lies inside one
    of `roots`, with that root; links elsewhere are followed (the task cannot change
    them)."""
    path = path if path.is_absolute() else Path.cwd() / path
    at = Path(path.anchor)
    for part in path.parts[1:]:
        at = at / part
        if at.is_symlink():
            for root in roots:
                if _under(at, root):
                    return at, root
        at = at.resolve(strict=True)
    return None
