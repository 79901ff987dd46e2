"""The task's terminal on every path of `sandgate run`: handed to a warm runner (the
task gets a session and a pty of the sandbox's own, relayed by the caller:
enforcer/sandbox/terminal.py, enforcer/terminal_relay.py), run in the caller's own
process (attached), and embedded (both: the caller's terminal itself). On a terminal
the three must agree: /dev/tty opens, the task is its terminal's foreground job, a
foreground read reads, a background read stops the job (SIGTTIN), the window size is
the caller's and follows it, ^C interrupts the task, and TIOCSTI typed into no
terminal at all. On pipes the warm task gets the pipes, as before.
"""

from __future__ import annotations

import errno
import fcntl
import json
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest
from support import sandbox
from support.job import Job
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
PYTHON = "/usr/bin/python3"  # pyenv's is out of the sandbox's reach


@pytest.fixture(scope="module", params=["warm", "in-process", "embedded"])
def way(request, fakenet, tmp_path_factory):
    """How the run goes: `argv(workdir, command)` for it, and its name."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    if request.param == "embedded":

        def embedded(workdir: Path, command: list[str]) -> list[str]:
            argv = sandbox._argv(fakenet, workdir, command, rules, ("-q",))
            return ["ip", "netns", "exec", fakenet.host_ns, *argv]

        embedded.name = request.param
        yield embedded
        return
    warm = 2 if request.param == "warm" else 0
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", str(warm)).start()
    try:
        assert eventually(lambda: gateway.status()["warm_runners"] == warm, timeout=20)

        def attached(workdir: Path, command: list[str]) -> list[str]:
            assert eventually(lambda: gateway.status()["warm_runners"] == warm, timeout=20)
            return attach_argv(gateway, workdir, command, extra=("-q",))

        attached.name = request.param
        yield attached
    finally:
        gateway.stop()


def _workspace(tmp_path: Path) -> tuple[Path, Path]:
    workdir = tmp_path / f"t{time.monotonic_ns()}"
    (workdir / "steps").mkdir(parents=True)
    return workdir, workdir / "steps"


PROBE = """
import json, os, subprocess
seen = {}
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
    seen["dev_tty"] = "opens"
except OSError as e:
    seen["dev_tty"] = e.strerror
try:
    seen["foreground"] = os.tcgetpgrp(0) == os.getpgrp()
except OSError as e:
    seen["foreground"] = e.strerror
seen["size"] = list(os.get_terminal_size(0))
seen["tty"] = subprocess.run(["tty"], stdout=subprocess.PIPE, text=True).stdout.strip()
json.dump(seen, open("seen.json", "w"))
"""


def test_the_task_has_a_controlling_terminal_of_the_callers_size(way, tmp_path):
    workdir, workspace = _workspace(tmp_path)
    job = Job(way(workdir, [PYTHON, "-c", PROBE]), size=(33, 111))
    try:
        assert job.next_report() == "exited 0", job.output
    finally:
        job.close()
    seen = json.loads((workspace / "seen.json").read_text())
    assert seen["dev_tty"] == "opens"
    assert seen["foreground"] is True
    assert seen["size"] == [111, 33]
    # The warm task's pty is in the sandbox's own devpts, so `tty` can name it; the
    # caller's terminal (in-process, embedded) is not in that devpts: no name.
    assert seen["tty"] == ("/dev/pts/0" if way.name == "warm" else "not a tty")


READ = 'echo > started; read line; echo "$line" > got; exit 3'


def test_a_foreground_read_reads_the_keys(way, tmp_path):
    workdir, workspace = _workspace(tmp_path)
    job = Job(way(workdir, ["sh", "-c", READ]))
    try:
        assert eventually(lambda: (workspace / "started").exists(), timeout=30), job.output
        job.press(b"hello\n")
        assert job.next_report() == "exited 3", job.output
    finally:
        job.close()
    assert (workspace / "got").read_text() == "hello\n"


def _stopped_in_group(pgrp: int) -> list[int]:
    """The processes of process group `pgrp` that are stopped (state T)."""
    stopped = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgrp and fields[0] == "T":
            stopped.append(int(entry.name))
    return stopped


def test_a_background_read_stops_the_task_and_fg_lets_it_read(way, tmp_path):
    """As a shell's `sandgate run ... &` whose task reads the terminal: the task is
    stopped with SIGTTIN and reads nothing; `fg` resumes it in the foreground, and it
    reads. On the warm path the caller's `sandgate` stops with it, so the shell sees
    its job stopped ("Stopped (tty input)"). In the caller's own process `sandgate`
    ignores SIGTTIN (a task could otherwise stop the runner's disk watcher, stop grace
    and gateway: test_terminal_takeover.py), so the shell sees the job running while
    its task waits, stopped, in the job's process group; `fg` continues that group."""
    workdir, workspace = _workspace(tmp_path)
    job = Job(way(workdir, ["sh", "-c", READ]), background=True)
    try:
        if way.name == "warm":
            assert job.next_report() == f"stopped {signal.SIGTTIN}", job.output
        else:
            assert eventually(lambda: _stopped_in_group(job.pid), timeout=30), job.output
            assert job.next_report(timeout=1).startswith("(nothing in"), job.output
        assert (workspace / "started").exists()
        time.sleep(0.3)
        assert not (workspace / "got").exists()
        job.fg()
        if way.name == "warm":
            assert job.next_report() == "continued"
        job.press(b"later\n")
        assert job.next_report() == "exited 3", job.output
    finally:
        job.close()
    assert (workspace / "got").read_text() == "later\n"


WINCH = """
import os, signal, time
def changed(_s, _f):
    size = os.get_terminal_size(0)
    open("size", "w").write(f"{size.columns} {size.lines}")
signal.signal(signal.SIGWINCH, changed)
open("ready", "w").close()
while not os.path.exists("done"):
    time.sleep(0.05)
"""


def test_a_window_size_change_reaches_the_task(way, tmp_path):
    workdir, workspace = _workspace(tmp_path)
    job = Job(way(workdir, [PYTHON, "-c", WINCH]))
    try:
        assert eventually(lambda: (workspace / "ready").exists(), timeout=30), job.output
        job.resize(40, 100)
        size = workspace / "size"
        assert eventually(lambda: size.exists() and size.read_text() == "100 40", timeout=20), (
            size.exists() and size.read_text(),
            job.output,
        )
        (workspace / "done").touch()
        assert job.next_report() == "exited 0", job.output
    finally:
        job.close()


def test_ctrl_c_interrupts_the_task(way, tmp_path):
    workdir, workspace = _workspace(tmp_path)
    job = Job(way(workdir, ["sh", "-c", "echo > started; exec sleep 30"]))
    try:
        assert eventually(lambda: (workspace / "started").exists(), timeout=30), job.output
        time.sleep(0.2)  # the exec
        job.press(b"\x03")
        assert job.next_report(timeout=10) == f"exited {128 + signal.SIGINT}", job.output
    finally:
        job.close()


INJECT = """
import fcntl, json, os, termios
word = b"INJ" + b"ECTED\\n"
tried = {}
for name in ("stdin", "/dev/tty"):
    fd = 0 if name == "stdin" else os.open(name, os.O_RDWR)
    try:
        for byte in word:
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([byte]))
        tried[name] = "typed"
    except OSError as e:
        tried[name] = e.errno
json.dump(tried, open("tried.json", "w"))
"""


def test_tiocsti_types_into_no_terminal(way, tmp_path):
    """The task's TIOCSTI fails (seccomp) on its stdin and /dev/tty, and nothing it
    tried arrived: not echoed on the caller's terminal, not waiting in its input.
    The test's own TIOCSTI (root) shows that both would be seen."""
    workdir, workspace = _workspace(tmp_path)
    job = Job(way(workdir, [PYTHON, "-c", INJECT]))
    try:
        assert job.next_report() == "exited 0", job.output
        assert json.loads((workspace / "tried.json").read_text()) == {
            "stdin": errno.EPERM,
            "/dev/tty": errno.EPERM,
        }
        time.sleep(0.2)
        assert b"INJECTED" not in job.output
        assert _waiting_input(job) == 0
        for byte in b"CONTROL\n":  # the check itself: typed input is seen both ways
            fcntl.ioctl(job.slave, termios.TIOCSTI, bytes([byte]))
        assert _waiting_input(job) == len(b"CONTROL\n")
        assert eventually(lambda: b"CONTROL" in job.output, timeout=5)
    finally:
        job.close()


def _waiting_input(job: Job) -> int:
    return int.from_bytes(fcntl.ioctl(job.slave, termios.FIONREAD, bytes(4)), "little")


def test_on_pipes_the_task_gets_the_pipes(way, tmp_path):
    workdir, workspace = _workspace(tmp_path)
    show = "readlink /proc/self/fd/0 /proc/self/fd/1 | cut -d[ -f1; tty; cat"
    proc = subprocess.run(
        way(workdir, ["sh", "-c", show]),
        input="piped\n",
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal, whatever pytest's is
    )
    assert proc.stdout.split("\n") == ["pipe:", "pipe:", "not a tty", "piped", ""], proc.stderr
