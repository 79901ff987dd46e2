"""The caller's stdin, and stdio that is a socket (red team kernel, finding 3).

The task shares the caller's stdio open file descriptions (an embedded run passes fds
0-2 on; a warm runner gets the caller's). enforcer/shared_stdio.py gave stdout and
stderr their status flags back after the task, but not stdin: a task that set
O_NONBLOCK on fd 0 left it on the caller's pipe after `sandgate run` returned, and the
caller's next `read` failed at once (EAGAIN) instead of waiting for its producer. Now
fd 0's flags are given back too (its offset is not moved: what the task read is read).

A stdio that is a socket: no flag gives back a `shutdown(2)` (the socket's, shared),
so a task may end sandgate's closing lines on a stderr socket; the exit code, the
summary file and the audit log are kept, and the docs say the socket is the task's to
close (docs/sandbox.md, "The caller's stdio"). A socket that reaches past its one peer
(a datagram socket, which the task could connect anywhere from the host's network
namespace, a listening one, an unconnected one) is refused before the task starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import threading
import time

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

TASK = (
    "import fcntl, os; fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK)"
)


def test_the_task_leaves_the_callers_stdin_non_blocking(fakenet, tmp_path):
    read_end, write_end = os.pipe()  # the caller's stdin: a producer feeds it later
    try:
        workdir = tmp_path / "w"
        (workdir / "steps").mkdir(parents=True)
        argv = sandbox._argv(
            fakenet, workdir, ["/usr/bin/python3", "-c", TASK], sandbox.DEMO_RULES, ()
        )
        proc = fakenet.popen_in_host(
            argv, stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        non_blocking = bool(fcntl.fcntl(read_end, fcntl.F_GETFL) & os.O_NONBLOCK)

        # The caller goes on: `read line` from the same stdin, its producer a bit slow.
        threading.Timer(0.5, lambda: os.write(write_end, b"next line\n")).start()
        started = time.monotonic()
        after = subprocess.run(
            ["sh", "-c", 'read line && echo "got: $line"'],
            stdin=read_end,
            capture_output=True,
            text=True,
            timeout=10,
        )
        waited = time.monotonic() - started
        print(
            f"O_NONBLOCK left: {non_blocking}; read: rc={after.returncode} "
            f"out={after.stdout!r} err={after.stderr.strip()!r} after {waited:.2f}s"
        )
        assert not non_blocking and after.stdout == "got: next line\n", (
            f"after the run the caller's stdin is O_NONBLOCK={non_blocking}; its next "
            f"`read` failed: rc={after.returncode} {after.stderr.strip()!r}"
        )
    finally:
        time.sleep(0.6)
        os.close(read_end)
        os.close(write_end)


SHUTDOWN = "import socket; socket.socket(fileno=2).shutdown(socket.SHUT_WR)"


def test_a_task_may_shut_a_stderr_socket_and_the_summary_file_and_exit_code_hold(fakenet, tmp_path):
    """stderr a connected stream socket (a systemd unit's journal stream, an ssh channel,
    a CI runner's log socket) goes to the task as it is: its shutdown is final, and
    sandgate's lines after the task do not arrive (documented); the exit code and the
    summary file carry the run's end all the same."""
    reader, caller_side = socket.socketpair()
    try:
        workdir = tmp_path / "s"
        (workdir / "steps").mkdir(parents=True)
        argv = sandbox._argv(
            fakenet, workdir, ["/usr/bin/python3", "-c", SHUTDOWN], sandbox.DEMO_RULES, ()
        )
        proc = fakenet.popen_in_host(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=caller_side.fileno()
        )
        caller_side.close()
        proc.communicate(timeout=90)
        reader.settimeout(5)
        said = b""
        while chunk := reader.recv(65536):
            said += chunk
        print(f"rc={proc.returncode}; sandgate's stderr as received: {said!r}")
        assert proc.returncode == 0
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["exit_code"] == 0, summary
    finally:
        reader.close()


def _refused(fakenet, tmp_path, **stdio) -> tuple[int, str]:
    workdir = tmp_path / "r"
    (workdir / "steps").mkdir(parents=True)
    marker = workdir / "steps" / "ran"
    argv = sandbox._argv(fakenet, workdir, ["touch", str(marker)], sandbox.DEMO_RULES, ())
    proc = fakenet.popen_in_host(argv, **stdio)
    proc.wait(timeout=90)
    assert not marker.exists(), "the task ran"
    return proc.returncode


def test_a_datagram_socket_as_stderr_is_refused(fakenet, tmp_path):
    """A UDP socket (`2>/dev/udp/...`, a syslog forwarder) would let the task `connect()`
    it anywhere from the host's network namespace, past the gateway."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller_side,
    ):
        receiver.bind(("127.0.0.1", 0))
        caller_side.connect(receiver.getsockname())
        rc = _refused(
            fakenet, tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=caller_side.fileno(),
        )  # fmt: skip
        receiver.settimeout(5)
        said = b""
        with contextlib.suppress(TimeoutError):
            while b"datagram socket" not in said:
                said += receiver.recv(65536)
    print(f"rc={rc}; {said!r}")
    assert rc == 125
    assert b"stderr (fd 2) is a datagram socket" in said and b"| cat" in said, said


@pytest.mark.parametrize("kind", ["listening", "unconnected"])
def test_a_listening_or_unconnected_socket_as_stdin_is_refused(fakenet, tmp_path, kind):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if kind == "listening":
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        proc_rc = _refused(
            fakenet, tmp_path, stdin=sock.fileno(), stdout=subprocess.PIPE,
            stderr=(err := tmp_path / "err").open("w"),
        )  # fmt: skip
    said = err.read_text()
    print(f"rc={proc_rc}; {said!r}")
    assert proc_rc == 125 and f"stdin (fd 0) is a{'n' if kind[0] == 'u' else ''} {kind}" in said


def test_the_task_reads_a_stdin_file_and_the_caller_goes_on_from_there(fakenet, tmp_path):
    """fd 0 a file: its flags come back, its offset stays where the task's reads left it."""
    feed = tmp_path / "feed"
    feed.write_text("first\nsecond\n")
    workdir = tmp_path / "f"
    (workdir / "steps").mkdir(parents=True)
    command = ["/usr/bin/python3", "-c", TASK + "; import sys; os.read(0, 6)"]
    argv = sandbox._argv(fakenet, workdir, command, sandbox.DEMO_RULES, ())
    with feed.open("rb") as stdin:
        proc = fakenet.popen_in_host(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        proc.communicate(timeout=90)
        assert proc.returncode == 0
        assert not fcntl.fcntl(stdin.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert stdin.read() == b"second\n"
