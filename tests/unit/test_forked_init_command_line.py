"""A sandbox init forked from its runner (attach._fork: no cgroup limits, `run --gateway`
in the caller's process, a warm runner's seed) shows `sandgate-init` as its command
line, not the runner's: /proc/PID/cmdline is not ptrace-protected, and the task reads
its PID 1's (an approval webhook's URL, --env values, file paths were there)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from forked import run_forked
from sandgate.enforcer import attach


def _command_line() -> bytes:
    return Path("/proc/self/cmdline").read_bytes()


def _forked_init_command_line() -> bytes:
    """What a child of `attach._fork` shows, before its body runs."""
    read_end, write_end = os.pipe()

    def body() -> int:
        os.write(write_end, _command_line())
        return 0

    pid = attach._fork(body, own_group=False)
    os.close(write_end)
    shown = b""
    while chunk := os.read(read_end, 65536):
        shown += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return shown


def test_a_forked_init_shows_its_name_and_nothing_of_the_runners_command_line():
    runner = _command_line()
    shown = run_forked(_forked_init_command_line).value
    assert shown.rstrip(b"\0") == attach.INIT_NAME
    assert len(shown) == len(runner)  # the area overwritten in place, all of it
    assert sys.argv[0].encode() not in shown
    assert _command_line() == runner  # the runner (this process) keeps its own
