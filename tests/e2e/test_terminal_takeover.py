"""A task that takes the caller's terminal over, in an embedded `sandgate run` or one
attached to a service in the caller's own process (`--gateway` with no warm runner):
the task is in the caller's session and has its terminal itself (docs/sandbox.md, "The
terminal"). What sandgate does about it (enforcer/terminal_relay.py
`SharedTerminal`).

The takeover: a process group of its own in the
terminal's foreground (setpgid, tcsetpgrp), TOSTOP, -echo, exclusive mode
(TIOCEXCL). sandgate's next line to the terminal then stopped it with SIGTTOU: the
summary never came, the shell saw a stopped job and got its terminal back changed;
and a line while the task ran (the disk reserve's "killing the task", printed before
the kill) stopped the runner, its watcher with it, while the task wrote on. Now the
runner ignores SIGTTOU from the task's start, and gives the terminal back (its
foreground group, modes, exclusive mode) before it prints anything; tcflow's TCOOFF,
which would make that line hang instead, is refused (seccomp).

The same takeover's other stop: a read of the terminal by the task's first process,
still in sandgate's process group, while a child's group has the foreground: the
kernel sends SIGTTIN to the reader's whole group, and it stopped `sandgate run` and
the sandbox's outer init, its disk watcher with it, until someone typed `fg`. Now both
ignore SIGTTIN too; the task's own processes keep the default (its reader stops).
"""

from __future__ import annotations

import fcntl
import json
import os
import termios
from pathlib import Path

import pytest
from support import sandbox
from support.job import Job
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv
from test_task_fills_disk import small_disk

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
PYTHON = "/usr/bin/python3"  # pyenv's is out of the sandbox's reach
TIOCGEXCL = 0x80045440

# The takeover, then what it saw of it (took.json), then with an argument N, N MiB
# written to `big` (1 MiB a step, as test_task_fills_disk's FILL); exit code 7.
TAKEOVER = r"""
import errno, fcntl, json, os, signal, sys, termios, time
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
tty = os.open("/dev/tty", os.O_RDWR)
os.setpgid(0, 0)
os.tcsetpgrp(tty, os.getpgrp())
modes = termios.tcgetattr(tty)
modes[3] = (modes[3] | termios.TOSTOP) & ~termios.ECHO
termios.tcsetattr(tty, termios.TCSANOW, modes)
fcntl.ioctl(tty, termios.TIOCEXCL)
lflag = termios.tcgetattr(tty)[3]
took = {
    "foreground": os.tcgetpgrp(tty) == os.getpgrp(),
    "tostop": bool(lflag & termios.TOSTOP),
    "echo": bool(lflag & termios.ECHO),
    "exclusive": fcntl.ioctl(tty, 0x80045440, bytes(4)) != bytes(4),
}
try:
    termios.tcflow(tty, termios.TCOOFF)
    took["tcooff"] = "ok"
except termios.error as e:
    took["tcooff"] = errno.errorcode.get(e.args[0], str(e.args[0]))
json.dump(took, open("took.json", "w"))
if len(sys.argv) > 1:
    with open("big", "wb") as f:
        for _ in range(int(sys.argv[1])):
            f.write(bytes(1 << 20)); f.flush(); time.sleep(0.002)
sys.exit(7)
"""


# The other stop: a child takes the terminal's foreground in a group of its own; the
# task's first process, still in sandgate's process group, reads the terminal. The
# kernel sends SIGTTIN to the reader's whole group (kill_pgrp, no permission check):
# it stopped sandgate run (and the sandbox's outer init) with it, while the child wrote
# on (with an argument N: N MiB to `big`). The child notes whether its parent was
# stopped (it should be: the task's own job control is unchanged) and continues it,
# whose read then ends (its SIGCONT handler raises; the group it could give the
# terminal back to is outside its PID namespace: sandgate takes it back); exit 7.
READ_FROM_BACKGROUND = r"""
import errno, json, os, signal, sys, time
tty = os.open("/dev/tty", os.O_RDWR | os.O_NONBLOCK)
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.setpgid(0, 0)
    os.tcsetpgrp(tty, os.getpgrp())
    parent = os.getppid()
    state = "?"
    for _ in range(100):  # until the parent's read has stopped it
        time.sleep(0.05)
        state = open(f"/proc/{parent}/stat").read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            break
    time.sleep(1.0)  # sandgate, stopped with it before, would be so by now
    if len(sys.argv) > 1:
        with open("big", "wb") as f:
            for _ in range(int(sys.argv[1])):
                f.write(bytes(1 << 20)); f.flush(); time.sleep(0.002)
    json.dump({"parent": state}, open("child.json", "w"))
    os.kill(parent, signal.SIGCONT)
    os._exit(0)
class Continued(Exception):
    pass
def continued(signum, frame):
    raise Continued
signal.signal(signal.SIGCONT, continued)
time.sleep(0.3)
try:
    os.read(tty, 1)
    seen = "read"
except Continued:
    seen = "continued"
except OSError as e:
    seen = errno.errorcode.get(e.errno, str(e.errno))
os.waitpid(child, 0)
json.dump({"read": seen}, open("parent.json", "w"))
sys.exit(7)
"""


def _embedded(
    fakenet, workdir: Path, *args: str, extra: tuple[str, ...] = (), script: str = TAKEOVER
) -> list[str]:
    """`sandgate run` (embedded, with its summary: no -q) of `script` in workdir/steps."""
    rules = workdir / "rules.yaml"
    rules.write_text(RULES)
    (workdir / "steps").mkdir()
    argv = sandbox._argv(fakenet, workdir, [PYTHON, "-c", script, *args], rules, extra)
    return ["ip", "netns", "exec", fakenet.host_ns, *argv]


def _terminal_state(job: Job) -> dict:
    lflag = termios.tcgetattr(job.slave)[3]
    return {
        "foreground": os.tcgetpgrp(job.master),  # the master side may ask: not our terminal
        "echo": bool(lflag & termios.ECHO),
        "tostop": bool(lflag & termios.TOSTOP),
        "exclusive": fcntl.ioctl(job.slave, TIOCGEXCL, bytes(4)) != bytes(4),
    }


def _took(workdir: Path) -> dict:
    return json.loads((workdir / "steps" / "took.json").read_text())


TOOK = {"foreground": True, "tostop": True, "echo": False, "exclusive": True, "tcooff": "EPERM"}


@pytest.fixture(scope="module", params=["embedded", "in-process"])
def takeover_argv(request, fakenet, tmp_path_factory):
    """`argv(workdir, script=TAKEOVER)`: the run of `script` in workdir/steps, with its
    summary (no -q)."""
    if request.param == "embedded":
        yield lambda workdir, script=TAKEOVER: _embedded(fakenet, workdir, script=script)
        return
    tmp_path = tmp_path_factory.mktemp("takeover-service")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", "0").start()

    def attached(workdir: Path, script: str = TAKEOVER) -> list[str]:
        (workdir / "steps").mkdir()
        return attach_argv(gateway, workdir, [PYTHON, "-c", script])

    try:
        yield attached
    finally:
        gateway.stop()


def test_sandgate_takes_its_terminal_back_and_prints_its_summary(takeover_argv, tmp_path):
    job = Job(takeover_argv(tmp_path))
    try:
        before = _terminal_state(job)
        assert before == {"foreground": job.pid, "echo": True, "tostop": False, "exclusive": False}
        assert job.next_report(timeout=60) == "exited 7", job.output
        assert eventually(lambda: b"task: exit code 7" in job.output, timeout=5), job.output
        after = _terminal_state(job)
    finally:
        job.close()
    assert _took(tmp_path) == TOOK  # the takeover happened (but for TCOOFF)
    assert after == before  # sandgate's group in the foreground, echo on, no TOSTOP


def test_a_terminal_takeover_does_not_stop_the_disk_reserve(fakenet, tmp_path):
    """The runner's "killing the task" line comes while the task holds the terminal:
    it used to stop the runner (SIGTTOU), and the task wrote on to the last byte."""
    with small_disk(tmp_path, "96m") as disk:
        job = Job(_embedded(fakenet, disk, "200", extra=("--disk-reserve", "32M")))
        try:
            before = _terminal_state(job)
            assert job.next_report(timeout=60) == "exited 137", job.output
            assert eventually(lambda: b"limits hit: disk" in job.output, timeout=5), job.output
            after = _terminal_state(job)
        finally:
            job.close()
        left = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        assert _took(disk) == TOOK
    assert b"killing the task: the file system of" in job.output, job.output
    assert left > 4 << 20, left
    assert after == before


def _steps_json(workdir: Path, name: str) -> dict | None:
    path = workdir / "steps" / name
    return json.loads(path.read_text()) if path.exists() else None


def test_a_read_from_the_background_does_not_stop_sandgate(takeover_argv, tmp_path):
    """READ_FROM_BACKGROUND: the SIGTTIN to sandgate's process group stopped `sandgate
    run` (the shell saw "stopped 21") until someone typed `fg`. Now it stops the task's
    reader alone; sandgate and the init run on and the job ends with the task."""
    job = Job(takeover_argv(tmp_path, READ_FROM_BACKGROUND))
    try:
        before = _terminal_state(job)
        first = job.next_report(timeout=60)
        assert first == "exited 7", (first, job.output)
        assert eventually(lambda: b"task: exit code 7" in job.output, timeout=5), job.output
        after = _terminal_state(job)
    finally:
        job.close()
    assert _steps_json(tmp_path, "child.json") == {"parent": "T"}  # the task's reader stopped
    assert _steps_json(tmp_path, "parent.json") == {"read": "continued"}  # and went on after
    assert after == before


def test_a_sigttin_does_not_stop_the_disk_reserve(fakenet, tmp_path):
    """The same with the child writing 200 MiB to a 96 MiB disk with a 32 MiB reserve:
    the stopped runner's watcher let it write to the last byte. Now it is killed at the
    reserve (exit 137, `limits hit: disk`) while its parent is still stopped."""
    with small_disk(tmp_path, "96m") as disk:
        argv = _embedded(
            fakenet, disk, "200", extra=("--disk-reserve", "32M"), script=READ_FROM_BACKGROUND
        )
        job = Job(argv)
        try:
            before = _terminal_state(job)
            first = job.next_report(timeout=60)
            assert first == "exited 137", (first, job.output)
            assert eventually(lambda: b"limits hit: disk" in job.output, timeout=5), job.output
            after = _terminal_state(job)
        finally:
            job.close()
        left = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    assert b"killing the task: the file system of" in job.output, job.output
    assert left > 4 << 20, left
    assert after == before
