"""The caller's window size after a run that shares its terminal: an embedded `sandgate
run`, or one attached to a service in the caller's own process (`--gateway` with no warm
runner). The task has the caller's terminal itself (docs/sandbox.md, "The terminal"),
and TIOCSWINSZ goes through (tmux, script or expect in the sandbox set their own ptys'
sizes with it). A task's 1x1 stayed the terminal's size after the run: the shell
(checkwinsize), readline, vim, less and `ls` laid out for it until the user resized the
window. A red team found it (session 51). Now sandgate sets the size from before the
run back, with the modes (enforcer/terminal_relay.py `SharedTerminal`). A warm run's
task has a pty of its own and never had the caller's size to set.

Control: an honest task leaves the size the terminal had.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from pathlib import Path

import pytest
from support import sandbox
from support.job import Job
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
PYTHON = "/usr/bin/python3"  # pyenv's is out of the sandbox's reach
SIZE = (33, 111)

TASKS = {
    # in sandgate's own process group, the terminal's foreground job
    "shrink": """
import fcntl, struct, termios
fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("4H", 1, 1, 0, 0))
open("done", "w").close()
""",
    # from a foreground group of its own, through /dev/tty, to 0x0
    "own_group": """
import fcntl, os, signal, struct, termios
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
tty = os.open("/dev/tty", os.O_RDWR)
os.setpgid(0, 0)
os.tcsetpgrp(tty, os.getpgrp())
fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("4H", 0, 0, 0, 0))
open("done", "w").close()
""",
    "honest": 'open("done", "w").close()',
}


@pytest.fixture(scope="module", params=["embedded", "in-process"])
def way(request, fakenet, tmp_path_factory):
    """`argv(workdir, command)`: the run of `command` in workdir/steps."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    if request.param == "embedded":

        def embedded(workdir: Path, command: list[str]) -> list[str]:
            argv = sandbox._argv(fakenet, workdir, command, rules, ("-q",))
            return ["ip", "netns", "exec", fakenet.host_ns, *argv]

        yield embedded
        return
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", "0").start()
    try:
        assert eventually(lambda: gateway.status()["warm_runners"] == 0, timeout=20)

        def attached(workdir: Path, command: list[str]) -> list[str]:
            return attach_argv(gateway, workdir, command, extra=("-q",))

        yield attached
    finally:
        gateway.stop()


def _size(fd: int) -> tuple[int, int]:
    rows, columns, _, _ = struct.unpack("4H", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, columns


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_callers_window_size_is_the_same_after_the_run(way, tmp_path, task):
    workdir = tmp_path / "w"
    (workdir / "steps").mkdir(parents=True)
    job = Job(way(workdir, [PYTHON, "-c", TASKS[task]]), size=SIZE)
    try:
        assert job.next_report() == "exited 0", job.output
        assert (workdir / "steps/done").exists(), job.output
        after = _size(job.slave)
    finally:
        job.close()
    assert after == SIZE, f"the terminal is {after[0]}x{after[1]} after the run"
