"""Runner side of the task sandbox: check the kernel, build the seccomp program, make
the cgroup, write the spec; afterwards, read what the sandbox reported and which
limits the task hit, and remove the cgroup.

Never silently weaker: a missing kernel feature stops the run with a message naming
the feature and the fix, unless the admin passed --allow-weaker-sandbox, in which
case the run goes on with everything else and each gap becomes a `sandbox_weakened`
event (see docs/sandbox.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandgate.enforcer.sandbox import cgroup, id_slots, planting, seccomp, spec
from sandgate.enforcer.sandbox import init as sandbox_init
from sandgate.enforcer.sandbox.inherit import Inherited


@dataclass
class Gap:
    """A protection this run does without (only with --allow-weaker-sandbox)."""

    feature: str
    why: str


@dataclass
class PreparedSandbox:
    spec_path: Path
    report_r: int
    report_w: int
    cgroup: cgroup.TaskCgroup | None
    gaps: list[Gap] = field(default_factory=list)
    self_test: list[dict] = field(default_factory=list)
    self_test_ms: float | None = None
    joined_r: int | None = None  # the init's end of the joined pipe (runner_joins)
    joined_w: int | None = None
    # The workspace's git control files before the task (None: --no-workspace-guard)
    workspace: planting.Survey | None = None
    # Where the walk after the task is kept for the next run's walk before (planting.keep)
    walks: Path | None = None
    walked_after: planting.Survey | None = None  # kept at `remove`, off the exit's path
    # The task's host ids, this run's alone until `remove` (id_slots.py)
    ids: id_slots.IdSlot | None = None
    # The init's last record (init.main): its task's exit code, once all of it is gone
    exit_code: int | None = None
    _report: bytes = b""  # what the init and the task reported so far (take_report)

    @property
    def init_fds(self) -> tuple[int, ...]:
        """The descriptors the init must inherit."""
        return (self.report_w,) + ((self.joined_r,) if self.joined_r is not None else ())

    def join(self, pid: int) -> None:
        """runner_joins: move the started init into the task's cgroup, then tell it.
        A failure tells it nothing: it stops (exit 125) rather than run unlimited."""
        try:
            if self.cgroup is not None:
                self.cgroup.attach(pid)
            os.write(self.joined_w, b"1")
        except (cgroup.CgroupError, OSError) as e:
            print(f"sandgate: cannot move the sandbox into its cgroup: {e}", file=sys.stderr)
        finally:
            os.close(self.joined_w)
            self.joined_w = None

    def argv(self) -> list[str]:
        # By file path, isolated and without site: it needs only the standard
        # library, and nothing from site-packages is imported as host root.
        return [sys.executable, "-I", "-S", sandbox_init.__file__, str(self.spec_path)]

    def started(self) -> None:
        """The init has its copies of the pipes; the runner keeps only its own ends."""
        for fd in (self.report_w, self.joined_r, self.joined_w):  # joined_w: never started
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.joined_w = None

    def take_report(self) -> bool:
        """Read what the init and the task reported so far, without waiting; True once
        all of it is here: the init's last record, the task's exit code (`exit_code`),
        or the end of the pipe."""
        os.set_blocking(self.report_r, False)
        ended = True
        try:
            while chunk := os.read(self.report_r, 65536):
                self._report += chunk
        except BlockingIOError:
            ended = False
        except OSError:
            pass
        last = self._report[:-1].rpartition(b"\n")[2] if self._report.endswith(b"\n") else b""
        with contextlib.suppress(ValueError, AttributeError):
            if type(code := json.loads(last).get("exit")) is int:
                self.exit_code, ended = code, True
        return ended

    def collect(self) -> None:
        """What the init and the task reported (they closed the pipe before exec)."""
        self.take_report()
        with contextlib.suppress(OSError):
            os.close(self.report_r)
        for line in self._report.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if "weakened" in record:
                self.gaps.append(Gap(record["weakened"], record.get("why", "")))
            if "self_test" in record:
                self.self_test, self.self_test_ms = record["self_test"], record.get("ms")

    def check_workspace(self) -> list[planting.Planted]:
        """What the task left in its writable roots for the host's git or editor to run,
        each renamed aside (planting.py), at most planting.MAX_REPORTED of them to report;
        call once the task has ended. Its every process is killed first: the init's
        end does not wait for them (a kill of the outer init reaches PID 1 by its
        parent-death signal, and PID 1's namespace empties after), and a task process
        that wrote on during the check planted a hook it never saw."""
        self.end_processes()
        if self.workspace is None:
            return []
        self.walked_after = planting.walk_after(self.workspace)
        planted = planting.find_planted(self.workspace, self.walked_after)
        return planting.summarised(planting.disarm(planted))

    def end_processes(self, timeout: float = cgroup.REMOVE_TIMEOUT_S) -> None:
        """Kill every process left of the task and wait until none is: those in its
        cgroup, else (a run without limits has none) those with its id slot's host
        ids, every process of its user namespace. One that will not die is for
        `remove` to report."""
        if self.cgroup is not None:
            with contextlib.suppress(cgroup.CgroupError):
                self.cgroup.end_members(timeout)
            return
        if self.ids is None:
            return
        # Until none is left, zombies too (reaped as the namespace empties): `remove`
        # frees the slot only then, and kept it for gc when one was still there.
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                id_slots.kill_processes_with(self.ids.ids)
                if not id_slots.processes_with(self.ids.ids):
                    break
                time.sleep(0.01)

    def finish(self) -> list[cgroup.LimitHit]:
        """Which limits the task hit; the cgroup (and anything left in it) goes."""
        hits = self.limits_hit()
        self.remove()
        return hits

    def limits_hit(self) -> list[cgroup.LimitHit]:
        """Which limits the task hit (none when the counters cannot be read)."""
        if self.cgroup is None:
            return []
        with contextlib.suppress(cgroup.CgroupError):
            return self.cgroup.limits_hit()
        return []

    def remove(self) -> None:
        """The cgroup (and anything left in it) goes, then the task's id slot: freed
        after its last process, so the next run's ids own nothing still alive. A slot
        whose task may have processes left (its cgroup not removed; without a cgroup,
        some process still has its ids) keeps its record: the next claimant looks
        at it first, and `sandgate gc` frees it (id_slots.py)."""
        if self.walked_after is not None:
            planting.keep(self.walked_after, self.walks)
            self.walked_after = None
        task_gone = False
        try:
            if self.cgroup is not None:
                self.cgroup.remove()
                task_gone = True
            elif self.ids is not None:
                with contextlib.suppress(OSError):
                    task_gone = not id_slots.processes_with(self.ids.ids)
        except cgroup.CgroupError as e:  # never stop the teardown
            print(f"sandgate: warning: {e} (`sandgate gc` removes it later)", file=sys.stderr)
        finally:
            if self.ids is not None:
                self.ids.release(task_gone=task_gone)


def walk_before(writable: list[Path], walks: Path | None) -> planting.Survey:
    """The writable roots walked before the task, from the last run's walk after of the
    same roots where it is kept (what did not change since is not read again)."""
    return planting.survey(writable, since=planting.kept_walk(walks, writable))


def missing_features(limits: cgroup.Limits) -> list[Gap]:
    """What this kernel lacks for a full sandbox, each with the fix."""
    gaps = []
    try:
        userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        userns = 0
    if userns == 0:
        gaps.append(
            Gap(
                "user-namespace",
                "user namespaces are disabled (user.max_user_namespaces = 0); fix: "
                "sysctl -w user.max_user_namespaces=15000",
            )
        )
    if (problem := seccomp.available()) is not None:
        gaps.append(Gap("seccomp", problem))
    gaps += [Gap("cgroup", problem) for problem in cgroup.check(limits)]
    return gaps


def prepare(
    run_dir: Path,
    run_id: str,
    opts: spec.SandboxOptions,
    limits: cgroup.Limits,
    *,
    netns: str,
    argv: list[str],
    env: dict[str, str],
    file_binds: list[tuple[Path, Path]],
    hidden: list[Path],
    protected: list[Path],
    probe: str | None = None,
    seccomp_cache: Path | None = None,  # root-only, out of the task's view (STATE_DIR/cache)
    runner_joins: bool = False,  # the runner calls join(pid) while the init builds the view
    cgroup_ahead: cgroup.TaskCgroup | None = None,  # the init is forked in it: no join
    terminal: dict | None = None,  # a pty of the sandbox's own (sandbox/terminal.py)
    surveyed: planting.Survey | None = None,  # planting.survey(opts.writable), made already
    walks: Path | None = None,  # where workspace walks are kept (planting.keep; root-only)
    gaps: list[Gap] | None = None,  # missing_features(limits), found already
) -> PreparedSandbox:
    """Everything the sandbox init needs, in `run_dir` (root-only). Raises
    spec.SandboxError (with the fix) for a missing feature unless opts.allow_weaker.
    With `cgroup_ahead` (a warm runner's, made before the run) the run's limits are
    written into it and it is the task's cgroup, which nobody joins: the init is
    forked in it (attach.InitSeed)."""
    gaps = missing_features(limits) if gaps is None else list(gaps)
    if gaps and not opts.allow_weaker:
        raise spec.SandboxError(
            "the kernel cannot give this task the full sandbox:\n"
            + "\n".join(f"  - {g.feature}: {g.why}" for g in gaps)
            + "\n(--allow-weaker-sandbox runs it anyway, "
            "with each gap recorded as a sandbox_weakened event)"
        )
    missing = {g.feature for g in gaps}
    pool = id_slots.host_id_pool()
    program_path = None
    if "seccomp" not in missing:
        program_path = run_dir / "seccomp.bpf"
        # Cached beside sandgate's state (root-only, hidden from tasks): ~2 ms, not ~13.
        program_path.write_bytes(seccomp.build_filter(cache_dir=seccomp_cache))
    workspace = None
    if not opts.workspace_guard:
        gaps.append(
            Gap(
                "workspace-guard",
                "--no-workspace-guard: the task may write git hooks and config in the "
                "workspace, which the host's git runs",
            )
        )
    elif opts.writable:
        workspace = surveyed if surveyed is not None else walk_before(opts.writable, walks)
        if workspace.unguardable:
            raise spec.SandboxError(
                "a repository's config or control files run files anywhere in the "
                "writable directory, or through a link there, which the task may change "
                "and the host's git would then run: "
                + "; ".join(workspace.unguardable)
                + " (fix the config or the link, or --no-workspace-guard)"
            )
    pinned = planting.pinned_dirs(workspace) if workspace else []
    guarded = planting.read_only_binds(workspace) if workspace else []
    view = spec.file_view(
        opts,
        protected=protected,
        hidden=hidden,
        file_binds=file_binds,
        pinned=pinned,
        guarded=guarded,
        inodes=planting.identities(workspace, [*opts.writable, *pinned, *guarded])
        if workspace
        else None,
    )
    slot = id_slots.claim(pool)  # last of what can refuse the run before the pipes
    report_r, report_w = os.pipe()
    os.set_inheritable(report_w, True)
    joined_r = joined_w = None
    if runner_joins and cgroup_ahead is None:
        joined_r, joined_w = os.pipe()
        os.set_inheritable(joined_r, True)
    document = spec.Spec(
        netns=netns,
        hostname=f"sandbox-{run_id}",
        argv=argv,
        ids=slot.ids,
        uid=opts.uid,
        gid=opts.gid,
        env=spec.task_environment(dict(os.environ), opts.env, env, uid=opts.uid, home=view["home"]),
        home=view["home"],
        cwd=view["cwd"],
        tmpfs=view["tmpfs"],
        binds=view["binds"],
        hide=view["hide"],
        writable=view["writable"],
        cgroup_procs=[],  # below: the cgroup is made last, so nothing can fail and leave it
        seccomp=str(program_path) if program_path else None,
        userns="user-namespace" not in missing,
        allow_weaker=opts.allow_weaker,
        self_test=opts.self_test,
        tmpfs_bounds=spec.tmpfs_bounds(limits.memory_bytes),
        report_fd=report_w,
        joined_fd=joined_r,
        probe_paths={
            "code": [str(p) for p in protected if p.is_dir()],
            "state": [str(p) for p in hidden],
        },
        **(opts.inherited or Inherited.of_this_process()).to_spec(),
    ).to_dict()
    if probe:
        document["probe"] = probe
    if terminal:
        document["terminal"] = terminal
    task_cgroup = None
    try:
        if "cgroup" not in missing and (limits.controllers() or cgroup_ahead is not None):
            try:
                if cgroup_ahead is None:
                    task_cgroup = cgroup.TaskCgroup.create(f"sandgate-{run_id}", limits)
                else:
                    cgroup_ahead.set_limits(limits)
            except cgroup.CgroupError as e:
                if not opts.allow_weaker:
                    raise spec.SandboxError(f"cannot set the task's limits: {e}") from None
                gaps.append(Gap("cgroup", str(e)))
        task_cgroup = cgroup_ahead or task_cgroup  # made ahead, it goes with the run
        # Before the init: a killed runner's slot is taken again only once these are empty.
        slot.record(task_cgroup.named if task_cgroup is not None else None)
        joins = task_cgroup is not None and cgroup_ahead is None
        document["cgroup_procs"] = task_cgroup.procs_files if joins else []
        # The init mounts the hierarchies it is in this cgroup in (init.mount_cgroups).
        document["cgroup_name"] = task_cgroup.name if task_cgroup is not None else None
        spec_path = run_dir / "sandbox.json"
        spec_path.write_text(json.dumps(document))
    except BaseException:
        for fd in (report_r, report_w, joined_r, joined_w):
            if fd is not None:
                os.close(fd)
        if task_cgroup is not None:
            task_cgroup.remove()
        slot.release()
        raise
    return PreparedSandbox(
        spec_path,
        report_r,
        report_w,
        task_cgroup,
        gaps,
        joined_r=joined_r,
        joined_w=joined_w,
        workspace=workspace,
        walks=walks,
        ids=slot,
    )
