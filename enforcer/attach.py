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
import errno
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sandgate.enforcer import control, java_truststore
from sandgate.enforcer.sandbox import cgroup, disk_reserve, prepare, spec
from sandgate.enforcer.sandbox import init as sandbox_init
from sandgate.enforcer.shared_stdio import SharedStdio
from sandgate.enforcer.summary_file import SummaryFile, SummaryFileError

if TYPE_CHECKING:
    from sandgate.enforcer import zygote

STATE_DIRS = (
    Path(os.environ.get("SANDGATE_STATE_DIR") or "/var/lib/sandgate"),
    Path(os.environ.get("SANDGATE_RUN_DIR", "/run/sandgate")),
)
EXIT_SETUP = 125
RESUME_EVERY_S = 0.5
JOB_CONTROL = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCONT)


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
    seed: InitSeed | None = None  # a warm runner's init, waiting in a cgroup made ahead
    stop_grace: float = spec.STOP_GRACE  # --stop-grace


def run_attached(opts: AttachOptions) -> int:
    try:
        summary_file = SummaryFile(opts.summary_json) if opts.summary_json else None
        client = control.ControlClient.connect(opts.control)
        # ready_line: the reply comes before the service has the sandbox served (the
        # worker's registration, the task's files), and a second line once it has: the
        # sandbox is prepared meanwhile, and the init started only after that line.
        client.send(
            "attach",
            profile=opts.profile,
            command=opts.command,
            runner_pid=os.getpid(),
            ready_line=True,
        )
        gaps = prepare.missing_features(opts.limits)  # while the service attaches (~1 ms)
        reply = client.reply()
    except (SummaryFileError, control.ControlError) as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    run_id = reply["run_id"]
    seed = opts.seed if opts.seed is not None and opts.seed.usable() else None
    if seed is None and opts.seed is not None:
        opts.seed.discard()  # the run goes on as without it: a cgroup of its own, joined
    terminal = TaskTerminal.of(opts.caller)
    try:
        prepared = _prepare(opts, reply, client, seed, terminal, gaps)
    except (spec.SandboxError, OSError) as e:
        if terminal is not None:
            terminal.close()
        try:
            _ready(client, reply)  # read before the detach's own reply
        except control.ControlError as refused:
            # The service could not serve the sandbox and removed its side, its run dir
            # with it: what failed here may be that (a file of the dir gone), and its
            # word is the cause. There is nothing of the run left to detach from.
            print(f"sandgate: {refused}", file=sys.stderr)
            return EXIT_SETUP
        _detach(client, run_id, None, quiet=True)
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    try:
        _ready(client, reply)
    except control.ControlError as e:
        if terminal is not None:
            terminal.close()
        prepared.started()
        prepared.finish()  # the service removed its side (it says why)
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    for gap in prepared.gaps:
        _warn_weakened(client, gap)
    gaps_sent = len(prepared.gaps)
    shared = None
    if opts.caller is None:  # in the caller's own process: the task shares its terminal,
        from sandgate.enforcer.terminal_relay import SharedTerminal  # and may take it

        shared = SharedTerminal.of_caller()  # (as for an embedded run: run.TaskRun)
    stdio = SharedStdio()  # the caller's stdout and stderr, which the task shares
    try:
        child = ForkedInit(
            prepared.spec_path,
            (*prepared.init_fds, *client.fds, *(terminal.init_fds if terminal else ())),
            seed,
            own_group=opts.caller is not None,
        )
    except OSError as e:
        if terminal is not None:
            terminal.close()
        prepared.started()
        prepared.finish()  # the cgroup goes with the run that never started
        _detach(client, run_id, None, quiet=True)
        print(f"sandgate: cannot start the sandbox: {e}", file=sys.stderr)
        return EXIT_SETUP
    if shared is not None:
        shared.guard()  # only now: the init and the task keep SIGTTOU's default
    stopping = StopGrace(child, opts.stop_grace)
    for signum in STOP_SIGNALS:  # before the task can start (it waits for the join)
        signal.signal(signum, lambda s, _f: stopping.signal(s))
    if seed is None:
        prepared.join(child.pid)  # while the init builds its file view (a seed is in already)
    prepared.started()
    if terminal is not None:
        terminal.started()
    disk = DiskGuard(child, opts.sandbox)
    client = _wait(
        child, client, opts.control, run_id, opts.caller, terminal, stopping, disk, prepared
    )
    try:  # whatever fails from here, the teardown below runs (and frees the id slot)
        if terminal is not None:
            terminal.close()
        if child.returncode is None:  # ended by the init's last record; its process still ends
            code = prepared.exit_code
        else:
            code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        prepared.collect()
        planted = prepared.check_workspace()  # which ends every process of the task first
        if shared is not None:
            shared.give_back()  # every process of the task is gone: before any line
        stdio.give_back()
        print_kill_notices(stopping, disk)
        hits = prepared.limits_hit() + disk.hits()
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
        for item in planted:
            print(f"sandgate: warning: the task planted {item.describe()}", file=sys.stderr)
            if client is not None:
                _send(
                    client,
                    "event",
                    what="planted",
                    name=str(item.path)[:300],
                    detail=item.describe(),
                    renamed=item.renamed,
                )
        summary = _detach(client, run_id, code, quiet=opts.quiet)
        if summary is not None:
            # What this runner measured itself, not the service's copy: an event the service
            # did not take (a timeout, a restart) must not drop a limit from the summary.
            for key, values in (
                ("limits_hit", [hit.limit for hit in hits]),
                ("sandbox_weakened", [gap.feature for gap in prepared.gaps]),
                ("workspace_planted", [str(item.path)[:300] for item in planted]),
                (
                    "workspace_not_renamed",
                    [str(item.path)[:300] for item in planted if not item.renamed],
                ),
            ):
                summary.pop(key, None)
                if values:
                    summary[key] = values
            if prepared.self_test:
                held = sum(p["ok"] for p in prepared.self_test)
                summary["self_test"] = {
                    "held": held,
                    "probes": len(prepared.self_test),
                    "ms": prepared.self_test_ms,
                }
            if summary_file is not None and not summary_file.write(summary, code):
                code = EXIT_SETUP
            if not opts.quiet:
                _print_summary(summary, reply)
        elif summary_file is not None:
            # As a summary that cannot be written (summary_file.py): exit 125, so that the
            # caller does not read what is at that path (a run's before) as this run's.
            summary_file.close()
            print(
                f"sandgate: no summary for {opts.summary_json}: the gateway service sent none "
                f"(the task exited {code})",
                file=sys.stderr,
            )
            code = EXIT_SETUP
        if opts.caller is not None:  # the caller's wait ends here, not after the teardown
            opts.caller.exit(code)
    finally:
        child.wait()  # out of the task's cgroup, which goes next
        prepared.remove()
    return code


def _ready(client: control.ControlClient, reply: dict) -> None:
    """The service's second line, when its reply said one comes (`ready_line`): it
    serves the sandbox now. ControlError if it could not (it removed its side)."""
    if reply.get("ready_line") is True:
        client.reply()


def _prepare(
    opts: AttachOptions,
    reply: dict,
    client: control.ControlClient,
    seed: InitSeed | None,
    terminal: TaskTerminal | None = None,
    gaps: list[prepare.Gap] | None = None,
) -> prepare.PreparedSandbox:
    run_dir = Path(reply["dir"])
    # The service's own files, which the task must not write: its audit log, and
    # every rule file its policy read (the service reloads them when they change).
    protected = spec.protected_paths(list(STATE_DIRS))
    spec.check_out_of_reach(
        "the service's audit log", Path(reply["audit_log"]), opts.sandbox.writable,
        why="it could rewrite the record of what it did",
    )  # fmt: skip
    for path in reply.get("rule_files", ()):
        spec.check_out_of_reach(
            "the service's rule file", Path(path), opts.sandbox.writable, read_only=protected,
            why="it could rewrite every task's policy, which the service reloads",
        )  # fmt: skip
    binds = [(Path(reply["resolv_conf"]), Path(os.path.realpath("/etc/resolv.conf")))]
    env = {"SANDGATE_TASK_ID": reply["run_id"]}
    if reply.get("ca_bundle"):
        system = Path(reply["system_ca_bundle"])
        target = system.resolve() if system.exists() else Path(reply["ca_bundle"])
        binds.append((Path(reply["ca_bundle"]), target))
        env.update(dict.fromkeys(reply["ca_env_vars"], str(target)))
        if reply.get("java_truststore"):  # a service of before it sends none
            java_bind, java_env = java_truststore.sandbox_setup(Path(reply["java_truststore"]))
            binds.append(java_bind)
            env.update(java_env)
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
        protected=protected,
        seccomp_cache=STATE_DIRS[0] / "cache",
        walks=STATE_DIRS[0] / "cache",
        runner_joins=True,
        cgroup_ahead=seed.cgroup if seed is not None else None,
        terminal=terminal.settings if terminal is not None else None,
        gaps=gaps,
    )


def _wait(
    child: ForkedInit,
    client,
    path: Path,
    run_id: str,
    caller=None,
    terminal=None,
    stopping=None,
    disk: DiskGuard | None = None,
    prepared: prepare.PreparedSandbox | None = None,
):
    """Until the task ends; keeps (or regains) the service. Returns the client, or None.
    A `caller` (a handed-over run) has its signals forwarded; when it is gone, the
    task is killed, as a runner's death kills it. With a `terminal` (the task's pty),
    job control goes through the sandbox's PID 1, and its reports back to the caller.
    `stopping` (StopGrace): the stop signals' grace, whose end this loop looks at;
    `disk` (DiskGuard): the disk reserve, which it checks every `disk.every` seconds.
    `prepared`: its report, whose last record (the task's exit code) ends the wait
    before the init's own end when no process is left in the task's cgroup but the
    init; the init is reaped later (`child.wait()`)."""
    stopping = stopping or StopGrace(child, spec.STOP_GRACE)
    pidfd = os.pidfd_open(child.pid)
    woken, wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup = signal.set_wakeup_fd(wake)  # a signal ends the select: a grace begins
    report = prepared.report_r if prepared is not None else None
    try:
        next_try = 0.0
        while child.poll() is None:
            watched = [pidfd, woken] + ([client.sock] if client is not None else [])
            watched += [caller] if caller is not None else []
            watched += [terminal] if terminal is not None and terminal.open else []
            watched += [report] if report is not None else []
            now = time.monotonic()
            timeout = None if client is not None else max(0.0, next_try - now)
            if stopping.deadline is not None:
                left = stopping.left(now)
                timeout = left if timeout is None else min(timeout, left)
            if disk is not None and disk.every is not None:
                timeout = disk.every if timeout is None else min(timeout, disk.every)
            try:
                ready, _, _ = select.select(watched, [], [], timeout)
            except InterruptedError:
                continue
            if woken in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(woken, 512)
            stopping.check(time.monotonic())
            if disk is not None:
                disk.check()
            if caller is not None and caller in ready:
                signals = caller.signals()
                for signum in signals if signals is not None else [signal.SIGKILL]:
                    if signum in JOB_CONTROL and terminal is not None:
                        terminal.forward(signum)
                    elif signum in JOB_CONTROL:  # as a terminal stops (continues) a foreground job
                        child.signal_group(signum)
                    elif signum in STOP_SIGNALS:
                        stopping.signal(signum)
                    else:
                        child.send_signal(signum)
                if signals is None:
                    caller = None
            if terminal is not None and terminal in ready:
                terminal.receive()
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
            if report is not None and report in ready and prepared.take_report():
                if prepared.exit_code is not None and _only_init_left(prepared, child):
                    break
                report = None  # its end without that record: the init's own end, then
        return client if client is not None else _resume(path, run_id)
    finally:
        os.close(pidfd)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(woken)
        os.close(wake)


def _only_init_left(prepared: prepare.PreparedSandbox, child: ForkedInit) -> bool:
    """Whether the task's cgroup holds no process but the init (or none): the task's
    are all gone. Without a cgroup to tell, the init's own end is waited for."""
    try:
        return prepared.cgroup is not None and prepared.cgroup.members() <= {child.pid}
    except OSError:
        return False


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


class TaskTerminal:
    """The runner's side of a handed-over run's pty (sandbox/terminal.py has the
    why): a socket to the sandbox's PID 1, which sends the pty's master once (passed
    on to the caller, who relays it) and then the task's stops (passed on, once
    each: the caller stops with them); the caller's job control goes to PID 1."""

    def __init__(self, caller: zygote.Caller, settings: dict):
        self.caller = caller
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._theirs: int | None = theirs.detach()
        self.settings = {**settings, "job_fd": self._theirs}
        self.open = True
        self.epoch = 0  # continues sent to PID 1: a stop it reports from before is old
        self.held = False  # stopped, by the caller or by a stop passed on to it
        self._buffer = b""

    @classmethod
    def of(cls, caller: zygote.Caller | None) -> TaskTerminal | None:
        """For a caller whose stdio has its controlling terminal; None otherwise (or
        when that terminal's modes cannot be read: the task then gets the descriptors)."""
        if caller is None or not caller.terminal:
            return None
        import struct
        import termios

        fd = caller.terminal[0]
        try:
            modes = termios.tcgetattr(fd)
            size = struct.unpack("4H", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
        except (termios.error, OSError):
            return None
        modes[6] = [c if isinstance(c, int) else ord(c) for c in modes[6]]
        return cls(
            caller,
            {
                "fds": caller.terminal,
                "foreground": caller.foreground,
                "termios": modes,
                "winsize": size,
            },
        )

    @property
    def init_fds(self) -> tuple[int, ...]:
        return (self._theirs,) if self._theirs is not None else ()

    def fileno(self) -> int:
        return self.sock.fileno()

    def started(self) -> None:
        """The init has its end."""
        if self._theirs is not None:
            os.close(self._theirs)
            self._theirs = None

    def close(self) -> None:
        self.started()
        self.open = False
        self.sock.close()

    def forward(self, signum: int) -> None:
        """A job control signal of the caller's, to the task's process group."""
        if signum == signal.SIGCONT:
            self.epoch += 1
            self.held = False
            self._send({"continue": self.epoch, "foreground": self.caller.foreground})
        else:
            self.held = True
            self._send({"signal": signum})

    def _send(self, message: dict) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
        except OSError:
            data, fds = b"", []
        if not data:
            self.open = False
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("terminal") and fds:
                self.caller.send_fd(fds.pop(), terminal=True)
            elif (
                isinstance(message.get("stopped"), int)
                and not self.held
                and message.get("epoch") == self.epoch  # not one from before a continue
            ):
                self.held = True
                self.caller.send(stopped=message["stopped"])
        for fd in fds:
            os.close(fd)


# The signals that end a run in order (forwarded to the task, `StopGrace`, then the
# after-run check). SIGQUIT too: a task that shares the caller's terminal can make it
# send one to the runner's group (a key remapped with tcsetattr, typed by the user or
# by the terminal's own answer to a query it writes: ESC [ c), and its default action
# ended the runner before its workspace check.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class StopGrace:
    """The first stop signal goes to the task with `grace` seconds to end; a second
    one, or the grace's end (`check`, which `_wait` calls as its loop turns), kills its
    init, and the PID namespace with it: a task that ignores the signals cannot hold
    the run (and its sandbox) forever. As the embedded run does (run.TaskRun)."""

    def __init__(self, child: ForkedInit, grace: float):
        self.child, self.grace = child, grace
        self.deadline: float | None = None  # while a grace runs
        self.killed = False
        self._why = ""
        self.notice: str | None = None  # the line saying so: print_kill_notices

    def signal(self, signum: int) -> None:
        if self.child.returncode is not None or self.killed:
            return
        name = signal.Signals(signum).name
        if self.deadline is not None:
            self._kill(f"a second signal ({name})")
            return
        self.child.send_signal(signum)
        self.deadline = time.monotonic() + self.grace
        self._why = f"it did not end within {self.grace:g} s of {name} (--stop-grace)"

    def left(self, now: float) -> float:
        """Seconds until the grace ends (while one runs)."""
        return max(0.0, self.deadline - now)

    def check(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self._kill(self._why)

    def _kill(self, why: str) -> None:
        self.deadline, self.killed = None, True  # once
        if self.child.returncode is None:
            self.child.send_signal(signal.SIGKILL)
            self.notice = f"sandgate: killing the task: {why}"


class DiskGuard:
    """Kills the task the moment a file system it can write falls below the disk
    reserve (sandbox/disk_reserve.py), as a limit it hit. `check` as the runner's loop
    turns, again within `every` seconds (None: nothing to watch), which it updates:
    sooner the closer a file system is to its reserve."""

    def __init__(self, child: ForkedInit, options: spec.SandboxOptions):
        self.child = child
        self.watch = disk_reserve.DiskWatch(options.writable, options.disk_reserve)
        self.every = disk_reserve.MIN_POLL_S if self.watch.paths else None
        self.hit: cgroup.LimitHit | None = None
        self.notice: str | None = None  # the line saying so: print_kill_notices

    def check(self) -> None:
        if self.hit is not None or self.child.returncode is not None:
            return
        why, self.every = self.watch.look()
        if why is not None:
            self.hit = cgroup.LimitHit("disk", 1, why)
            self.child.send_signal(signal.SIGKILL)
            self.notice = f"sandgate: killing the task: {why}"

    def hits(self) -> list[cgroup.LimitHit]:
        return [self.hit] if self.hit is not None else []


def print_kill_notices(*guards: StopGrace | DiskGuard | None) -> None:
    """Why the runner killed the task, said once the task is gone and the terminal is
    given back, not as it happens: the task can stop the terminal's output (its STOP
    key remapped with tcsetattr, sent by the terminal's own answer to a query it
    writes), and a line written then blocked the runner's one thread before its
    after-run check, for as long as the output stayed stopped."""
    for guard in guards:
        if guard is not None and guard.notice is not None:
            print(guard.notice, file=sys.stderr)


class ForkedInit:
    """The sandbox init (enforcer/sandbox/init.py) forked from this runner instead of
    started as `python -I -S init.py SPEC` as the embedded run does: the runner is one
    thread that has already imported init and its siblings (from the same root-owned
    install), so a fork saves a whole interpreter start, the largest part of a warm
    attach. The child keeps only stdio and `keep` (the report pipe, the netns), as
    Popen's close_fds would, and never returns into the runner's code."""

    def __init__(
        self,
        spec_path: Path,
        keep: tuple[int, ...],
        seed: InitSeed | None = None,
        own_group: bool = False,
    ):
        """`own_group`: the sandbox (this init and all the task does not move) is a
        process group of its own, which `signal_group` stops and continues: a warm
        runner's, whose process group is the runner's; else it stays in this one (the
        terminal's foreground job, for a run in the caller's own process)."""
        self.returncode: int | None = None
        if seed is not None:  # forked already (in a group of its own), in the task's cgroup
            self.pid = seed.start(spec_path, keep)
        else:

            def be_init() -> int:
                _close_all_but(keep)
                return sandbox_init.main([str(spec_path)])

            self.pid = _fork(be_init, own_group=own_group)
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

    def signal_group(self, signum: int) -> None:
        """To the init's process group (own_group, or a seed's): the sandbox and every
        task process that kept it, as a terminal signals its foreground job."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)


def _fork(body: Callable[[], int], *, own_group: bool) -> int:
    """A child that runs `body` and exits with its code (EXIT_SETUP after a one-line
    report if it raises), never returning into the runner's code; it dies with this
    process (PR_SET_PDEATHSIG) and, with `own_group`, leads a process group of its own."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = EXIT_SETUP
        try:
            if own_group:
                os.setpgid(0, 0)
            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            _hide_command_line()
            code = body()
        except BaseException as e:  # noqa: BLE001 - the child must report, then go
            print(f"sandgate: sandbox setup failed: {e}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    if own_group:
        with contextlib.suppress(OSError):  # both sides: either may come first
            os.setpgid(pid, pid)
    return pid


# What a forked init shows as its command line (/proc/PID/cmdline, which the task may
# read of its PID 1: not ptrace-protected), instead of the runner's own.
INIT_NAME = b"sandgate-init"
ARG_START_FIELD = 48  # /proc/PID/stat's fields arg_start and arg_end (proc(5))


def _hide_command_line() -> None:
    """This process's argument area (the runner's command line: its --env values, an
    approval webhook's URL, file paths) overwritten with INIT_NAME and NULs, in place:
    the kernel reads /proc/PID/cmdline from there. In a forked child only (the init,
    and PID 1 forked from it); the runner keeps its own."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3 on: comm may hold spaces
    start, end = (int(fields[ARG_START_FIELD - 3 + i]) for i in (0, 1))
    size = end - start
    if start <= 0 or size <= 0:
        return
    shown = INIT_NAME[: size - 1]
    ctypes.memmove(start, shown + bytes(size - len(shown)), size)


def _close_all_but(keep: tuple[int, ...]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    for fd in keep:
        os.set_inheritable(fd, True)


SEED_JOIN_TIMEOUT_S = 2.0


class InitSeed:
    """A warm runner's next sandbox init, forked while the runner waits for a run
    (enforcer/zygote.py) and moved at once into a task cgroup made ahead
    (cgroup.TaskCgroup.ahead); or an embedded run's, spawned as the run begins and
    moved once its cgroup is made (`spawn`, `join`). When the run comes, its limits
    are written into that cgroup and this process becomes the init (a ForkedInit's
    child): the init is in its cgroup from its first instruction of the run, so no
    process migrates then, and no run waits for the kernel's RCU grace period (8-16
    ms) that a move into a cgroup costs (cgroup_attach_task takes
    cgroup_threadgroup_rwsem for writing).

    Why not the runner itself in the cgroup, to fork the init there: the runner would
    count against the task's pids and memory limits, be the OOM killer's first pick
    at the memory limit, and have to move out again (another grace period) before it
    may remove the cgroup. The seed is the process the init would be anyway.

    It keeps nothing of the runner's but stdio until `start` sends it the spec's path
    with the caller's stdio and the descriptors the init keeps (SCM_RIGHTS on a
    socket pair), which it puts at the numbers the spec names. It dies with the
    runner (PR_SET_PDEATHSIG); `discard` ends it and removes the cgroup."""

    def __init__(self, task_cgroup: cgroup.TaskCgroup, *, own_group: bool = True):
        """`own_group`: as ForkedInit's (a warm runner's seed leads a process group of
        its own; an embedded run's stays in the run's, the terminal's foreground job)."""
        self.cgroup = task_cgroup
        self._joined: bool | None = None
        self._used = False
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def be_seed() -> int:  # nothing of the runner's but stdio and `theirs`
            self._sock.close()
            _close_all_but((theirs.fileno(),))
            return sandbox_init.be_seed(theirs, task_cgroup.procs_files)

        # a warm runner's: its own process group, the run's (ForkedInit.signal_group)
        self.pid = _fork(be_seed, own_group=own_group)
        theirs.close()

    @classmethod
    def spawn(cls) -> InitSeed:
        """An embedded run's seed, started as an interpreter of its own (`python -I -S
        init.py --seed`) as the run begins, before most of its imports; its cgroup
        comes later (`join`), once the run's network exists. Not forked as a warm
        runner's is: forked from the run once it had imported the gateway (~35 MB),
        every page the run then wrote until the seed became the init was copied first
        (~1,800 copy-on-write faults, ~10 ms of the setup on this project's host:
        docs/performance.md, "Session 40"). A fresh interpreter shares no page with the
        run, and its start falls beside the run's imports, on the other core. It stays
        in the run's process group (the terminal's foreground job), holding
        SEED_HOLDS from its first instruction. OSError if it cannot be started."""
        self = cls.__new__(cls)
        self.cgroup = None
        self._joined = None
        self._used = False
        if not sandbox_init.can_undo_spawn_signals():
            raise OSError(errno.ENOSYS, "no rt_sigaction number known for this machine")
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # posix_spawn, not fork and exec: a fork write-protects every page of this
        # process, and each one it wrote next was a fault (~1,900 of them, 6 ms more in
        # all). The child starts with this thread's mask: SEED_HOLDS held.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, sandbox_init.SEED_HOLDS)
        try:
            os.set_inheritable(theirs.fileno(), True)
            argv = [sys.executable, "-I", "-S", sandbox_init.__file__, "--seed"]
            argv += [str(theirs.fileno()), ",".join(str(int(n)) for n in held)]
            self.pid = os.posix_spawn(sys.executable, argv, os.environ)
        except BaseException:
            self._sock.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            theirs.close()
        return self

    def join(self, task_cgroup: cgroup.TaskCgroup) -> None:
        """A spawned seed into `task_cgroup` (`usable` waits for its word). OSError if
        it is gone."""
        self.cgroup = task_cgroup
        self._sock.send(json.dumps({"join": task_cgroup.procs_files}).encode())

    def usable(self, timeout: float = SEED_JOIN_TIMEOUT_S) -> bool:
        """In its cgroup (its word waited for, at most `timeout`: a move takes a grace
        period), and that cgroup is where this run's belongs: made under the parent
        $SANDGATE_CGROUP_PARENT names now (the caller's environment, by then)."""
        if self.cgroup is None:  # a spawned seed given none
            return False
        if self._joined is None:
            self._sock.settimeout(timeout)
            try:
                self._joined = self._sock.recv(16) == b"joined"
            except OSError:
                self._joined = False
        return self._joined and not self._used and self.cgroup.made_under()

    def start(self, spec_path: Path, keep: tuple[int, ...]) -> int:
        """Make it the init of the run in `spec_path`, with stdio and `keep` at the
        numbers they have here; its pid. OSError if it is gone."""
        self._used = True
        fds = [0, 1, 2, *keep]
        message = json.dumps({"spec": str(spec_path), "fds": fds}).encode()
        try:
            socket.send_fds(self._sock, [message], fds)
        finally:
            self._sock.close()
        return self.pid

    def discard(self) -> None:
        """Unless it became an init: it goes, and its cgroup with it."""
        if self._used:
            return
        self._used = True
        self._sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        if self.cgroup is None:
            return
        try:
            self.cgroup.remove()
        except cgroup.CgroupError as e:
            print(f"sandgate: warning: {e} (`sandgate gc` removes it later)", file=sys.stderr)
