"""A task that shares the caller's terminal makes it send the keys that signal the
runner's process group (enforcer/terminal_relay.py TTY_STOPS, attach.STOP_SIGNALS).

In an embedded `sandgate run` (and one attached to a service in the caller's
process) the task shares the caller's terminal and sandgate's process group, the
terminal's foreground job. TIOCSTI is refused, so the task cannot type; but a
terminal emulator answers queries written to it, and its answer arrives as input:
Device Attributes, ESC [ c, is answered ESC [ ? 1 ; 2 c by tmux and xterm-likes. The
task remaps VQUIT (or VSUSP) to `c` with tcsetattr (it is the foreground job), and
the line discipline turned the answer's last byte into SIGQUIT (SIGTSTP) for the
whole group: sandgate died before its after-run workspace check (a planted hook ran
on the host), or stopped with its disk watcher while a task process in a group of
its own filled the disk. Found by a red team; now SIGQUIT ends the run in order and
SIGTSTP is ignored by the runner and the outer init. The test plays the terminal
(support.job); `test_a_real_terminal_turns_its_answer_into_a_signal` shows tmux does
answer so.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import sandbox
from support.job import Job
from support.service import GatewayProcess, attach_argv
from test_task_fills_disk import small_disk

pytestmark = pytest.mark.e2e

PYTHON = "/usr/bin/python3"
RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
QUERY = b"\x1b[c"  # Device Attributes (DA1)
ANSWER = b"\x1b[?1;2c"  # what tmux answers (test_a_real_terminal_turns_its_answer_into_a_signal)

# Remap one of the terminal's signal keys to `c` and ask the terminal who it is.
# argv[1]: VQUIT or VSUSP. The first process stays in sandgate's process group.
ASK_TERMINAL = r"""
import os, sys, termios, time
modes = termios.tcgetattr(0)
modes[6][getattr(termios, sys.argv[1])] = b"c"
termios.tcsetattr(0, termios.TCSANOW, modes)
os.write(1, b"\x1b[c")
time.sleep(float(sys.argv[2]))
"""

# HIGH: plant a hook in a new repository, then SIGQUIT sandgate through the terminal.
PLANT_THEN_QUIT = (
    "git init -q newrepo && "
    "printf '#!/bin/sh\\ntouch {canary}\\n' > newrepo/.git/hooks/pre-commit && "
    "chmod +x newrepo/.git/hooks/pre-commit && "
    f"exec {PYTHON} -c {shlex.quote(ASK_TERMINAL)} VQUIT 20"
)

# MEDIUM: a child in a process group of its own (not the terminal's foreground: the
# terminal's SIGTSTP misses it) waits until the task's first process, in sandgate's
# group, is stopped, then writes argv[1] MiB to `big`; the first process stops
# sandgate's whole group with SIGTSTP through the terminal's answer.
STOP_THEN_FILL = r"""
import json, os, signal, sys, termios, time
child = os.fork()
if child == 0:
    os.setpgid(0, 0)
    parent, state = os.getppid(), "?"
    for _ in range(200):
        time.sleep(0.05)
        state = open(f"/proc/{parent}/stat").read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            break
    time.sleep(1.0)  # sandgate, stopped with it, is by now
    json.dump({"parent": state}, open("child.json", "w"))
    open("done.pending", "w").close()
    try:
        with open("big", "wb") as f:
            for _ in range(int(sys.argv[1])):
                f.write(bytes(1 << 20)); f.flush(); time.sleep(0.002)
    except OSError:
        pass  # the file system is full
    os.rename("done.pending", "done")
    os.kill(parent, signal.SIGCONT)
    os._exit(0)
modes = termios.tcgetattr(0)
modes[6][termios.VSUSP] = b"c"
termios.tcsetattr(0, termios.TCSANOW, modes)
os.write(1, b"\x1b[c")
os.waitpid(child, 0)
sys.exit(7)
"""


def _answering(job: Job, stop: threading.Event) -> threading.Thread:
    """Answer every DA query the job writes to its terminal, as a terminal emulator does."""

    def answer() -> None:
        answered = 0
        while not stop.is_set():
            if job.output.count(QUERY) > answered:
                answered += 1
                job.press(ANSWER)
            time.sleep(0.01)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def _embedded_argv(fakenet, workdir: Path, command: list[str], extra=()) -> list[str]:
    rules = workdir / "rules.yaml"
    rules.write_text(RULES)
    (workdir / "steps").mkdir(exist_ok=True)
    argv = sandbox._argv(fakenet, workdir, command, rules, tuple(extra))
    inner = shlex.join(["ip", "netns", "exec", fakenet.host_ns, *argv])
    return ["sh", "-c", f"ulimit -c 0; cd {shlex.quote(str(workdir))}; exec {inner}"]


def test_a_real_terminal_turns_its_answer_into_a_signal(tmp_path):
    """The premise, without sandgate: in tmux, `stty quit c` then DA ends the shell.
    (Were it not so, the tests below would prove nothing about real terminals.)"""
    sock, out = tmp_path / "tmux.sock", tmp_path / "survived"
    tmux = ["tmux", "-S", str(sock), "-f", "/dev/null"]
    script = f"stty quit c; printf '\\033[c'; sleep 3; touch {out}; sleep 60"
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "--", "sh", "-c", script],
                   check=True)  # fmt: skip
    try:
        time.sleep(4)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    assert not out.exists()  # tmux answered ESC[?1;2c: its `c` was SIGQUIT


@pytest.mark.parametrize("way", ["embedded", "in-process"])
def test_the_task_cannot_quit_sandgate_and_skip_the_workspace_check(fakenet, tmp_path, way):
    """sandgate died of SIGQUIT (Python's default), its after-run workspace check
    never ran, and the hook the task planted in a new repository ran on the host at
    the user's next `git commit`."""
    canary = tmp_path / "host-canary"
    workdir = tmp_path / "run"
    workdir.mkdir()
    command = ["sh", "-c", PLANT_THEN_QUIT.format(canary=canary)]
    gateway = None
    if way == "embedded":
        argv = _embedded_argv(fakenet, workdir, command)
    else:  # `run --gateway` with no warm runner: the task runs in the caller's process
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", "0").start()
        (workdir / "steps").mkdir()
        inner = shlex.join(attach_argv(gateway, workdir, command))
        argv = ["sh", "-c", f"ulimit -c 0; cd {shlex.quote(str(workdir))}; exec {inner}"]
    stop = threading.Event()
    job = Job(argv)
    try:
        _answering(job, stop)
        report = job.next_report(timeout=60)
        time.sleep(1)
    finally:
        stop.set()
        job.close()
        if gateway is not None:
            time.sleep(3)  # the service ends the sandbox of a runner that died
            gateway.stop()
        sandbox.gc(fakenet)  # what a runner killed left (the flaw)
    repo = workdir / "steps" / "newrepo"
    # On the host, as the user would: git commit in the task's output.
    subprocess.run(
        ["git", "-c", "user.name=u", "-c", "user.email=u@x", "-c", "safe.directory=*",
         "commit", "-q", "--allow-empty", "-m", "x"],
        cwd=repo, capture_output=True, check=False,
    )  # fmt: skip
    assert not canary.exists(), "the planted hook ran on the host"
    # sandgate itself must not die of the signal (the job shell reports a death by a
    # signal as a negative code); the task's own 131 passed on by sandgate is fine.
    assert report.startswith("exited") and not report.startswith("exited -"), report
    summary = workdir / "summary.json"
    assert summary.exists() and json.loads(summary.read_text()).get("workspace_planted"), report


def test_the_task_cannot_stop_sandgate_and_write_on(fakenet, tmp_path):
    """SIGTSTP through the terminal's answer stopped sandgate (its disk watcher,
    stop-grace timer and gateway) and the outer init; a child in a background group of
    the task's own wrote on to the last byte of the file system, which every task and
    the audit log may share (as the SIGTTIN variant did: test_task_fills_disk.py).
    Now sandgate ignores SIGTSTP: the task's first process stops, sandgate and its
    disk reserve go on."""
    with small_disk(tmp_path, "96m") as disk:
        argv = _embedded_argv(
            fakenet, disk, [PYTHON, "-c", STOP_THEN_FILL, "200"], extra=("--disk-reserve", "32M")
        )
        stop = threading.Event()
        job = Job(argv)
        try:
            _answering(job, stop)
            first = job.next_report(timeout=60)
            if first.startswith("stopped"):  # the flaw: the child fills the disk meanwhile
                sandbox.eventually((disk / "steps" / "done").exists, timeout=30)
                job.fg()
                job.next_report(timeout=60)
        finally:
            stop.set()
            job.close()
        left = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        child = disk / "steps" / "child.json"
        seen = json.loads(child.read_text()) if child.exists() else None
    assert seen == {"parent": "T"}, seen  # the task's own first process did stop
    assert first.startswith("exited"), f"sandgate was stopped ({first})"
    assert left > 4 << 20, f"the disk was filled past the 32M reserve: {left} bytes left"


# Stop the terminal's output as ^S does (IXON): the STOP key remapped to `c`, the
# START key to a byte nobody types, and the terminal asked who it is; then argv[1]:
# "disk" fills the disk past the reserve (sandgate kills the task), "term" ignores
# SIGTERM (the stop grace's end kills it), "exit" just ends.
XOFF_THEN = r"""
import os, signal, sys, termios, time
modes = termios.tcgetattr(0)
modes[0] = (modes[0] | termios.IXON) & ~termios.IXANY
modes[6][termios.VSTOP], modes[6][termios.VSTART] = b"c", b"\xfe"
termios.tcsetattr(0, termios.TCSANOW, modes)
os.write(1, b"\x1b[c")
time.sleep(1.5)  # the answer's `c` has stopped the terminal's output by now
open("xoff-done", "w").close()
if sys.argv[1] == "disk":
    try:
        with open("big", "wb") as f:
            for _ in range(200):
                f.write(bytes(1 << 20)); f.flush(); time.sleep(0.002)
    except OSError:
        pass
    time.sleep(60)
elif sys.argv[1] == "term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
"""


@pytest.mark.parametrize("trigger", ["disk", "term", "exit", "in-process-term"])
def test_the_task_cannot_hang_sandgate_by_stopping_the_terminals_output(fakenet, tmp_path, trigger):
    """TCOOFF is refused, but the line discipline stops the output too when the STOP
    key comes in (IXON), and the task may remap that key and make the terminal send
    it. sandgate's "killing the task" line (the disk reserve, the stop grace) then
    blocked its one thread before the after-run check, the summary and the terminal's
    give-back (which TCOON did not restart): a planted hook stayed live, and only
    SIGKILL ended sandgate (found by a second red team). Now those lines are said
    after the task is gone and the terminal restarted (IXON turned off and on)."""
    what, gateway = trigger.rpartition("-")[2], None
    with small_disk(tmp_path, "96m") as disk:
        plant = PLANT_THEN_QUIT.split(" && exec ")[0].format(canary=tmp_path / "canary")
        command = ["sh", "-c", f"{plant} && exec {PYTHON} -c {shlex.quote(XOFF_THEN)} {what}"]
        extra = ("--disk-reserve", "32M") if trigger == "disk" else ("--stop-grace", "1")
        if trigger.startswith("in-process"):  # `run --gateway` with no warm runner
            rules = tmp_path / "rules.yaml"
            rules.write_text(RULES)
            gateway = GatewayProcess(fakenet, tmp_path, rules, "--warm", "0").start()
            (disk / "steps").mkdir()
            inner = shlex.join(attach_argv(gateway, disk, command, extra=extra))
            argv = ["sh", "-c", f"cd {shlex.quote(str(disk))}; exec {inner}"]
        else:
            argv = _embedded_argv(fakenet, disk, command, extra=extra)
        stop = threading.Event()
        job = Job(argv)
        try:
            _answering(job, stop)
            assert sandbox.eventually((disk / "steps" / "xoff-done").exists, timeout=60)
            if what == "term":  # a supervisor's (a CI job's limit) SIGTERM to sandgate
                os.kill(job.pid, signal.SIGTERM)
            report = job.next_report(timeout=30)
        finally:
            stop.set()
            job.close()
            if gateway is not None:
                gateway.stop()
        summary = json.loads((disk / "summary.json").read_text() or "{}")
        hooks = disk / "steps" / "newrepo" / ".git" / "hooks"
        live = (hooks / "pre-commit").exists()
    assert report.startswith("exited"), report
    assert summary.get("workspace_planted") and not live, summary
    if trigger != "exit":
        assert b"sandgate: killing the task:" in job.output
