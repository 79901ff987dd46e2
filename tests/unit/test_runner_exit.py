"""A warm runner's end of a run (enforcer/zygote.py `Caller.exit`): the caller gets its
exit code, and a reader of the caller's output its end, before the runner's teardown
(the task cgroup's removal); what the runner says after goes to the pool's stderr."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

RUNNER = """
import os, socket, sys
from sandgate.enforcer.zygote import Caller

conn, out_w, err_w, go_r = (int(a) for a in sys.argv[1:])
caller = Caller(socket.socket(fileno=conn))
caller.take_stdio([os.open(os.devnull, os.O_RDONLY), out_w, err_w])
print("the summary")
print("to the caller", file=sys.stderr)
caller.exit(3)
os.read(go_r, 1)  # the teardown, until the test says go
print("a late warning", file=sys.stderr, flush=True)
"""


def _read_to_end(fd: int, timeout: float = 20.0) -> bytes:
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no end of the pipe in {timeout} s: {data!r}"
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def test_the_exit_code_and_the_end_of_output_come_before_the_teardown():
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    go_r, go_w = os.pipe()
    client, theirs = socket.socketpair()
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *map(str, (theirs.fileno(), out_w, err_w, go_r))],
        pass_fds=(theirs.fileno(), out_w, err_w, go_r),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for fd in (out_w, err_w, go_r):
            os.close(fd)
        theirs.close()
        client.settimeout(20)
        assert client.recv(100) == b'{"exit": 3}\n'
        assert _read_to_end(out_r) == b"the summary\n"
        assert _read_to_end(err_r) == b"to the caller\n"
        assert runner.poll() is None  # still in its teardown: nobody waited for it
        os.write(go_w, b"1")
        _, pool_stderr = runner.communicate(timeout=20)
        assert runner.returncode == 0
        assert pool_stderr == b"a late warning\n"  # not on the caller's, which has gone
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for fd in (out_r, err_r, go_w):
            os.close(fd)
        client.close()
