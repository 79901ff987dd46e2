"""The terminal parts of the hand-off (enforcer/handoff.py, enforcer/zygote.py) and
the relay's raw mode (enforcer/terminal_relay.py), without a sandbox."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import termios

import pytest
from sandgate.enforcer import handoff, zygote
from sandgate.enforcer.terminal_relay import raw_modes


def _sent(line: bytes) -> tuple[list[int], list[int], bool]:
    """What a runner reads of a stdio message `line` (with three descriptors)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        r, w = os.pipe()
        try:
            socket.send_fds(theirs, [line], [r, w, r])
            fds, terminal, foreground = zygote._stdio(ours)
        finally:
            os.close(r)
            os.close(w)
        for fd in fds:
            os.close(fd)
        return fds, terminal, foreground


def test_without_a_terminal_the_stdio_message_is_the_old_one():
    """A run on pipes sends exactly what it sent before (no terminal fields)."""
    code = "from sandgate.enforcer import handoff; print(handoff._stdio_line())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        start_new_session=True,  # no controlling terminal
        check=True,
    )
    assert proc.stdout.strip() == repr(b'{"stdio": [0, 1, 2]}\n')


def test_the_runner_reads_which_stdio_is_the_terminal():
    assert _sent(b'{"stdio": [0, 1, 2]}\n')[1:] == ([], True)
    line = handoff.encode({"stdio": [0, 1, 2], "terminal": [2, 0], "foreground": False})
    assert _sent(line.encode() + b"\n")[1:] == ([0, 2], False)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param({"stdio": [0, 1, 2], "terminal": [3]}, id="not-stdio"),
        pytest.param({"stdio": [0, 1, 2], "terminal": "0"}, id="not-a-list"),
        pytest.param({"stdio": [0, 1, 2], "terminal": [True]}, id="bool-not-fd"),
        pytest.param({"stdio": [0, 1, 2], "terminal": [0.0]}, id="float-not-fd"),
        pytest.param({"stdio": [0, 1, 2], "foreground": 1}, id="foreground-not-bool"),
        pytest.param({"stdio": [0, 1, 2], "more": 1}, id="unknown-key"),
        pytest.param({"stdio": [0, 1]}, id="two-fds"),
        pytest.param([0, 1, 2], id="not-an-object"),
    ],
)
def test_the_runner_refuses_a_malformed_stdio_message(message):
    with pytest.raises(ValueError):
        _sent(handoff.encode(message).encode() + b"\n")


def test_raw_modes_are_cfmakeraw():
    master, slave = os.openpty()
    try:
        cooked = termios.tcgetattr(slave)
        termios.tcsetattr(slave, termios.TCSANOW, raw_modes(cooked))
        raw = termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)
    assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    assert not raw[0] & (termios.ICRNL | termios.IXON)
    assert not raw[1] & termios.OPOST
    assert raw[2] & termios.CSIZE == termios.CS8
    assert raw[6][termios.VMIN] in (1, b"\x01") and raw[6][termios.VTIME] in (0, b"\x00")
    assert cooked[3] & termios.ICANON  # a copy: the modes given are unchanged
