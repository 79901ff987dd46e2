"""TerminalRelay.serve at the end of a run: the pty hung up (the sandbox ended) while
a key was on its way to it, and the runner's exit code comes after. SharedTerminal's
give-back of the window size."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import threading

from sandgate.enforcer import handoff
from sandgate.enforcer.terminal_relay import SharedTerminal, TerminalRelay, raw_modes


def test_a_key_typed_as_the_pty_hangs_up_does_not_lose_the_exit_code():
    caller_master, caller_tty = os.openpty()  # the caller's terminal
    task_master, task_slave = os.openpty()  # the task's pty
    os.close(task_slave)  # every process of the sandbox has closed it: reads give EIO
    termios.tcsetattr(caller_tty, termios.TCSANOW, raw_modes(termios.tcgetattr(caller_tty)))
    os.write(caller_master, b"k")  # a key, typed just then
    runner, ours = socket.socketpair()
    relay = TerminalRelay([0, 1, 2])
    relay.tty_in = relay.tty_out = caller_tty
    relay.master = task_master
    os.set_blocking(task_master, False)
    relay.saved = termios.tcgetattr(caller_tty)  # raw, in the foreground
    # The exit code comes once the relay has seen the hang-up and read the key.
    later = threading.Timer(0.3, lambda: runner.sendall(b'{"exit": 3}\n'))
    later.start()
    try:
        assert relay.serve(handoff._Lines(ours), lambda _signum: None) == 3
        assert relay.master is None  # the pty was closed on its hang-up
    finally:
        later.join()
        for fd in (caller_master, caller_tty):
            os.close(fd)
        runner.close()
        ours.close()


def test_shared_terminal_gives_the_window_size_back():
    """SharedTerminal on a controlling terminal of a session of its own (a child's): a
    size the task set (1x1, pixels too) is the size from before again after give_back."""
    master, slave = os.openpty()
    before = struct.pack("4H", 33, 111, 880, 660)
    fcntl.ioctl(master, termios.TIOCSWINSZ, before)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the caller, in a session whose terminal is the pty
        code = 1
        try:
            os.setsid()
            os.close(os.open(os.ttyname(slave), os.O_RDWR))  # its controlling terminal
            shared = SharedTerminal.of_caller()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("4H", 1, 1, 0, 0))  # the task
            shared.give_back()
            os.write(report_w, fcntl.ioctl(slave, termios.TIOCGWINSZ, bytes(8)))
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        after = os.read(report_r, 8)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        for fd in (master, slave, report_r):
            os.close(fd)
    assert struct.unpack("4H", after) == (33, 111, 880, 660)
