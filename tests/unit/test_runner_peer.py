"""Who handed a run over (enforcer/zygote.py `of_peer`, `refusal`): what a warm runner
reads of its caller in /proc is that process's, never another's that took its pid."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys

import pytest
from sandgate.enforcer import zygote

CALLER = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()"


@pytest.fixture
def caller(tmp_path):
    """(connection to a caller process, that process) — it waits until told to go."""
    path = str(tmp_path / "runner.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    process = subprocess.Popen([sys.executable, "-c", CALLER, path], stdin=subprocess.PIPE)
    listener.settimeout(20)
    conn, _ = listener.accept()
    listener.close()
    yield conn, process
    if process.poll() is None:
        process.kill()
        process.wait()
    conn.close()


def test_the_read_is_of_the_callers_pid(caller):
    conn, process = caller
    assert zygote.of_peer(conn, lambda pid: pid) == process.pid
    assert zygote.refusal(conn) is None  # root, as restricted as we are, our mount namespace


def test_a_caller_gone_before_the_read_is_refused(caller):
    conn, process = caller
    process.kill()
    process.wait()  # reaped: its pid is free for anyone
    read = []
    with pytest.raises(ProcessLookupError):
        zygote.of_peer(conn, read.append)
    assert read == []  # /proc was not read by a pid that may be another process's now
    assert zygote.refusal(conn) == f"pid {process.pid} went away"


def test_a_caller_gone_during_the_read_is_refused(caller):
    """What was read may be of a process that took the pid meanwhile: never used."""
    conn, process = caller

    def read_while_it_dies(pid: int) -> str:
        os.kill(pid, signal.SIGKILL)
        process.wait()
        return "what another process may have had"

    with pytest.raises(ProcessLookupError):
        zygote.of_peer(conn, read_while_it_dies)


@pytest.mark.parametrize("line", ["Pid:\n", "Pid:\tx\n", "Flags:\t02\n"])
def test_a_pidfd_info_without_a_pid_is_refused_not_a_crash(caller, monkeypatch, line):
    """An fdinfo the runner cannot read a pid from is an OSError (refusal's), never
    an IndexError or a read of some other pid."""
    conn, process = caller
    real_open = open
    monkeypatch.setattr(
        zygote,
        "open",
        lambda path, *a, **k: (
            io.StringIO(line)
            if str(path).startswith("/proc/self/fdinfo/")
            else real_open(path, *a, **k)
        ),
        raising=False,
    )
    read = []
    with pytest.raises(OSError):
        zygote.of_peer(conn, read.append)
    assert read == []
    assert zygote.refusal(conn).startswith(f"pid {process.pid}: cannot read")
