"""The sandbox's command-line options, shared by `sandgate run` and `sandgate selftest`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sandgate.enforcer.cli.common import path_option
from sandgate.enforcer.sandbox import cgroup, disk_reserve, spec
from sandgate.enforcer.sandbox.inherit import Inherited


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("task sandbox (see docs/sandbox.md)")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--workspace",
        type=path_option,
        metavar="DIR",
        help="mounted read-write at the same path, the task's working directory "
        "(default: the current directory)",
    )
    where.add_argument(
        "--no-workspace", action="store_true", help="no read-write directory from the host"
    )
    group.add_argument(
        "--ro",
        type=path_option,
        action="append",
        default=[],
        metavar="PATH",
        help="also make PATH read-only (e.g. a part of the workspace); repeatable",
    )
    group.add_argument(
        "--rw",
        type=path_option,
        action="append",
        default=[],
        metavar="PATH",
        help="also mount PATH read-write, like the workspace; repeatable",
    )
    group.add_argument(
        "--hide",
        type=path_option,
        action="append",
        default=[],
        metavar="PATH",
        help="hide PATH from the task (an empty directory or file); repeatable",
    )
    group.add_argument(
        "--user",
        default="0",
        metavar="UID[:GID]",
        help="the task's ids inside the sandbox (default 0, which owns nothing on the host)",
    )
    group.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="pass NAME from this environment, or set it; wins over sandgate's own; repeatable",
    )
    group.add_argument(
        "--env-file",
        type=path_option,
        action="append",
        default=[],
        metavar="FILE",
        help="NAME=VALUE lines to set in the task's environment; repeatable",
    )
    group.add_argument(
        "--memory",
        default="4G",
        metavar="SIZE",
        help="memory limit, e.g. 512M, 4G (default 4G; the task is OOM-killed past it)",
    )
    group.add_argument(
        "--disk-reserve",
        default=disk_reserve.DEFAULT_TEXT,
        metavar="SIZE|N%|none",
        help="free space the task must leave on the file systems it can write (workspace, "
        "--rw); below it the task is killed (default 1G, at most a tenth of the file system, "
        "and 5%% of its inodes)",
    )
    group.add_argument(
        "--pids", default="1024", metavar="N", help="process/thread limit (default 1024)"
    )
    group.add_argument(
        "--cpus", default=None, metavar="N", help="CPU limit in cores, e.g. 1.5 (default: none)"
    )
    group.add_argument(
        "--allow-weaker-sandbox",
        action="store_true",
        help="run even where the kernel lacks a sandbox feature; each gap is a warning "
        "and a sandbox_weakened event",
    )
    group.add_argument(
        "--no-workspace-guard",
        action="store_true",
        help="let the task change git hooks and config in the workspace, unchecked (by "
        "default they are read-only, and what it plants for the host's git is renamed aside "
        "after the run); recorded as a sandbox_weakened event",
    )
    group.add_argument(
        "--self-test",
        action="store_true",
        help="check the sandbox from inside before the task starts (a few ms)",
    )


def from_arguments(
    args: argparse.Namespace, state_dirs: list[Path], rule_files: tuple[Path, ...] = ()
) -> tuple[spec.SandboxOptions, cgroup.Limits]:
    """The options as checked values, or spec.SandboxError naming the option.
    `rule_files`: every file an embedded gateway's policy read or tried (its
    includes, approved.yaml), which must be out of the task's reach as --rules is."""
    protected = spec.protected_paths(state_dirs)
    workspace = None
    if not args.no_workspace:
        workspace = spec.check_writable("--workspace", args.workspace or Path.cwd(), protected)
    rw = tuple(spec.check_writable("--rw", p, protected) for p in args.rw)
    writable = ([workspace] if workspace else []) + list(rw)
    for option in ("--summary-json", "--audit-log"):  # `sandgate run`'s; not selftest's
        path = getattr(args, option[2:].replace("-", "_"), None)
        if path is not None:
            spec.check_out_of_reach(option, path, writable)
    if getattr(args, "rules", None) is not None and getattr(args, "gateway", None) is None:
        # An embedded run's (attached, the service's rules apply: attach._prepare).
        spec.check_rule_files(Path(args.rules), rule_files, writable, protected)
    uid, gid = spec.parse_user(args.user)
    try:
        limits = cgroup.Limits(
            memory_bytes=cgroup.parse_size(args.memory) if args.memory.lower() != "none" else None,
            pids=int(args.pids) if args.pids.lower() != "none" else None,
            cpus=cgroup.parse_cpus(args.cpus) if args.cpus else None,
        )
    except ValueError as e:
        raise spec.SandboxError(f"limits: {e}") from None
    try:
        reserve = disk_reserve.parse_reserve(args.disk_reserve)
    except ValueError as e:
        raise spec.SandboxError(f"--disk-reserve: {e}") from None
    watch = disk_reserve.DiskWatch(writable, reserve)
    try:
        why = watch.shortfall()
    finally:
        watch.close()
    if why is not None:
        raise spec.SandboxError(f"{why}: free some space, or lower --disk-reserve")
    return spec.SandboxOptions(
        workspace=workspace,
        uid=uid,
        gid=gid,
        ro=spec.check_paths("--ro", args.ro, writable),
        rw=rw,
        hide=spec.check_paths("--hide", args.hide),
        env=spec.parse_env(args.env, args.env_file, dict(os.environ), writable),
        allow_weaker=args.allow_weaker_sandbox,
        self_test=args.self_test,
        workspace_guard=not getattr(args, "no_workspace_guard", False),
        inherited=Inherited.of_this_process(),  # before an embedded gateway raises its own
        disk_reserve=reserve,
    ), limits
