"""No process of the task lives after the run, whatever state it is in when the run
ends: stopped, a ptrace-stopped tracee whose tracer died, a zombie leader with a
live thread, a shell waiting on a child, a daemon with an empty environment and a
kernel thread's name that the harness's own leftover check cannot see (a red team,
session 51: held). The check: every process on the host whose real uid is in the
sandbox id pool and whose working directory is this test's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

POOL = range(2_000_000_000, 2_067_108_864)

TRICKS = r"""
import ctypes, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
def daemon(fn):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            try:
                fn()
            finally:
                os._exit(0)
        os._exit(0)
# 1. stopped
daemon(lambda: os.kill(os.getpid(), signal.SIGSTOP) or time.sleep(300))
# 2. ptrace: a tracee stopped, its tracer gone
def traced():
    child = os.fork()
    if child == 0:
        libc.ptrace(0, 0, 0, 0)  # PTRACE_TRACEME
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(300)
        os._exit(0)
    time.sleep(0.2)
    os._exit(0)
daemon(traced)
# 3. zombie leader with a live thread
def zombie_leader():
    threading.Thread(target=lambda: time.sleep(300)).start()
    libc.syscall(60, 0)  # SYS_exit: only the leader thread ends
daemon(zombie_leader)
# 4. a shell waiting on its child
daemon(lambda: os.execve("/bin/sh", ["sh", "-c", "sleep 300 & wait"], {}))
# 5. empty environment, odd name
daemon(lambda: os.execve("/bin/sleep", ["[kworker/0:1]", "300"], {}))
time.sleep(0.5)
print("planted", flush=True)
"""


def _pool_processes(under):
    """Processes with a real uid in the pool whose working directory is below `under`
    (this test's run: other runs' tasks have pool ids too)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            lines = Path(f"/proc/{entry}/status").read_text().splitlines()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        uid = int(next(line for line in lines if line.startswith("Uid:")).split()[1])
        if uid in POOL and cwd.startswith(str(under)):
            state = next(line for line in lines if line.startswith("State:"))
            found.append((int(entry), uid, lines[0], state, cwd))
    return found


def test_no_task_process_outlives_the_run(net, tmp_path):
    result = sandbox.run(net, tmp_path, {"plant": python(TRICKS)})
    assert "planted" in result["plant"].out, result.describe()
    time.sleep(1)
    left = _pool_processes(tmp_path)
    assert not left, left


def test_control_the_check_sees_a_task_process_while_the_run_lives(net, tmp_path):
    run = sandbox.start(net, tmp_path, steps={"sleep": "touch started; sleep 20"})
    try:
        deadline = time.monotonic() + 30
        while not (run.workdir / "steps/started").exists():
            assert time.monotonic() < deadline and run.popen.poll() is None
            time.sleep(0.05)
        seen = _pool_processes(tmp_path)
    finally:
        run.kill()
    assert any("sleep" in p[2] for p in seen), seen
