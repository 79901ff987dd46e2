"""`sandgate run --gateway`: a task attached to a running gateway service.

The service makes and owns the sandbox's network (enforcer/service.py); this side
builds the task sandbox (enforcer/sandbox/) and runs the task, exactly as an
embedded run does. It imports no mitmproxy, pyroute2 or asyncio: a warm service
plus this makes a task start in tens of milliseconds.

One loop waits on two things: the task's exit (a pidfd) and the control connection.
If the service goes away, the task keeps running without egress (its table points
at ports nobody listens on) and the runner asks a restarted service to take it
back (`resume`) every half second; the service removes the sandbox when this
runner's connection closes for good.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sandgate.enforcer import control
from sandgate.enforcer.sandbox import cgroup, prepare, spec
from sandgate.enforcer.sandbox import init as sandbox_init

if TYPE_CHECKING:
    from sandgate.enforcer import zygote

STATE_DIRS = (
    Path(os.environ.get("SANDGATE_STATE_DIR", "/var/lib/sandgate")),
    Path(os.environ.get("SANDGATE_RUN_DIR", "/run/sandgate")),
)
EXIT_SETUP = 125
RESUME_EVERY_S = 0.5


class AttachError(Exception):
    """The task could not be attached; one line for the person at the terminal."""


@dataclass
class AttachOptions:
    command: list[str]
    control: Path = control.DEFAULT_SOCKET
    profile: str = "default"
    sandbox: spec.SandboxOptions = field(default_factory=spec.SandboxOptions)
    limits: cgroup.Limits = field(default_factory=cgroup.Limits)
    summary_json: Path | None = None
    quiet: bool = False
    caller: zygote.Caller | None = None  # the handed-over run's `sandgate` process


def run_attached(opts: AttachOptions) -> int:
    try:
        client = control.ControlClient.connect(opts.control)
        reply = client.request(
            "attach", profile=opts.profile, command=opts.command, runner_pid=os.getpid()
        )
    except control.ControlError as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    run_id = reply["run_id"]
    try:
        prepared = _prepare(opts, reply, client)
    except (spec.SandboxError, OSError) as e:
        _detach(client, run_id, None, quiet=True)
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    for gap in prepared.gaps:
        _warn_weakened(client, gap)
    gaps_sent = len(prepared.gaps)
    try:
        child = ForkedInit(prepared.spec_path, keep=(*prepared.init_fds, *client.fds))
    except OSError as e:
        prepared.started()
        prepared.finish()  # the cgroup goes with the run that never started
        _detach(client, run_id, None, quiet=True)
        print(f"sandgate: cannot start the sandbox: {e}", file=sys.stderr)
        return EXIT_SETUP
    prepared.join(child.pid)
    prepared.started()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: child.poll() is None and child.send_signal(s))
    client = _wait(child, client, opts.control, run_id, opts.caller)
    code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    prepared.collect()
    hits = prepared.finish()
    if client is not None:
        for gap in prepared.gaps[gaps_sent:]:  # what the init reported
            _warn_weakened(client, gap)
        for hit in hits:
            _send(
                client,
                "event",
                what="limit",
                name=hit.limit,
                detail=f"the task hit its {hit.limit} limit {hit.count} times: {hit.detail}",
            )
    summary = _detach(client, run_id, code, quiet=opts.quiet)
    if summary is not None:
        if prepared.self_test:
            held = sum(p["ok"] for p in prepared.self_test)
            summary["self_test"] = {
                "held": held,
                "probes": len(prepared.self_test),
                "ms": prepared.self_test_ms,
            }
        if opts.summary_json:
            opts.summary_json.write_text(json.dumps(summary, indent=2))
        if not opts.quiet:
            _print_summary(summary, reply)
    return code


def _prepare(
    opts: AttachOptions, reply: dict, client: control.ControlClient
) -> prepare.PreparedSandbox:
    run_dir = Path(reply["dir"])
    audit = Path(reply["audit_log"])
    for root in ([opts.sandbox.workspace] if opts.sandbox.workspace else []) + list(
        opts.sandbox.rw
    ):
        if audit.resolve().is_relative_to(root):
            raise spec.SandboxError(
                f"the service's audit log {audit} is inside {root}, which the task can write"
            )
    binds = [(Path(reply["resolv_conf"]), Path(os.path.realpath("/etc/resolv.conf")))]
    env = {"SANDGATE_TASK_ID": reply["run_id"]}
    if reply.get("ca_bundle"):
        system = Path(reply["system_ca_bundle"])
        target = system.resolve() if system.exists() else Path(reply["ca_bundle"])
        binds.append((Path(reply["ca_bundle"]), target))
        env.update(dict.fromkeys(reply["ca_env_vars"], str(target)))
    hidden = [Path(p) for p in reply["hidden"] if Path(p).exists()]
    if not client.fds:
        raise spec.SandboxError("the gateway service sent no network namespace")
    netns_fd = client.fds[-1]  # the init joins it by /proc/self/fd: no mount namespace in between
    os.set_inheritable(netns_fd, True)
    return prepare.prepare(
        run_dir,
        reply["run_id"],
        opts.sandbox,
        opts.limits,
        netns=f"/proc/self/fd/{netns_fd}",
        argv=opts.command,
        env=env,
        file_binds=binds,
        hidden=hidden,
        protected=spec.protected_paths(list(STATE_DIRS)),
        seccomp_cache=STATE_DIRS[0] / "cache",
        runner_joins=True,
    )


def _wait(child: ForkedInit, client, path: Path, run_id: str, caller=None):
    """Until the task ends; keeps (or regains) the service. Returns the client, or None.
    A `caller` (a handed-over run) has its signals forwarded; when it is gone, the
    task is killed, as a runner's death kills it."""
    pidfd = os.pidfd_open(child.pid)
    try:
        next_try = 0.0
        while child.poll() is None:
            watched = [pidfd] + ([client.sock] if client is not None else [])
            watched += [caller] if caller is not None else []
            timeout = None if client is not None else max(0.0, next_try - time.monotonic())
            try:
                ready, _, _ = select.select(watched, [], [], timeout)
            except InterruptedError:
                continue
            if caller is not None and caller in ready:
                signals = caller.signals()
                for signum in signals if signals is not None else [signal.SIGKILL]:
                    child.send_signal(signum)
                if signals is None:
                    caller = None
            if client is not None and client.sock in ready:
                try:
                    lost = client.receive() is None
                except control.ControlError:
                    lost = True
                if lost:
                    print(
                        "sandgate: the gateway service went away: the task has no egress until it is back",
                        file=sys.stderr,
                    )
                    client.close()
                    client = None
            if client is None and time.monotonic() >= next_try:
                client = _resume(path, run_id)
                next_try = time.monotonic() + RESUME_EVERY_S
        child.wait()
        return client if client is not None else _resume(path, run_id)
    finally:
        os.close(pidfd)


def _resume(path: Path, run_id: str):
    try:
        client = control.ControlClient.connect(path, timeout=2)
        client.request("resume", run_id=run_id)
    except control.ControlError:
        return None
    print("sandgate: the gateway service is back; the task has egress again", file=sys.stderr)
    return client


def _send(client, cmd: str, **args) -> bool:
    try:
        client.request(cmd, **args)
        return True
    except control.ControlError as e:
        print(f"sandgate: warning: {e}", file=sys.stderr)
        return False


def _warn_weakened(client, gap: prepare.Gap) -> None:
    print(f"sandgate: warning: weaker sandbox: no {gap.feature}: {gap.why}", file=sys.stderr)
    _send(
        client,
        "event",
        what="weakened",
        name=gap.feature,
        detail=gap.why,
    )


def _detach(client, run_id: str, exit_code: int | None, *, quiet: bool) -> dict | None:
    if client is None:
        if not quiet:
            print(
                f"sandgate: task {run_id}: no gateway service to report to; its decisions are in the "
                "service's audit log",
                file=sys.stderr,
            )
        return None
    try:
        return client.request("detach", exit_code=exit_code)["summary"]
    except control.ControlError as e:
        print(f"sandgate: warning: {e}", file=sys.stderr)
        return None
    finally:
        client.close()


def _print_summary(summary: dict, reply: dict) -> None:
    from sandgate.proxy.telemetry.summary import TaskSummary

    summary = {**summary, "audit_log": f"{reply['audit_log']} (the gateway service's)"}
    TaskSummary.from_dict(summary).print_table(sys.stderr)


class ForkedInit:
    """The sandbox init (enforcer/sandbox/init.py) forked from this runner instead of
    started as `python -I -S init.py SPEC` as the embedded run does: the runner is one
    thread that has already imported init and its siblings (from the same root-owned
    install), so a fork saves a whole interpreter start, the largest part of a warm
    attach. The child keeps only stdio and `keep` (the report pipe, the netns), as
    Popen's close_fds would, and never returns into the runner's code."""

    def __init__(self, spec_path: Path, keep: tuple[int, ...]):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            code = EXIT_SETUP
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
                _close_all_but(keep)
                code = sandbox_init.main([str(spec_path)])
            except BaseException as e:  # noqa: BLE001 - the child must report, then go
                print(f"sandgate: sandbox setup failed: {e}", file=sys.stderr)
            finally:
                sys.stderr.flush()
                os._exit(code)
        for fd in keep:  # as Popen: the parent keeps no inheritable copy to leak later
            os.set_inheritable(fd, False)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def _close_all_but(keep: tuple[int, ...]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    for fd in keep:
        os.set_inheritable(fd, True)
