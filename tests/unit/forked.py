"""Run a function in a forked child: for irreversible process state (seccomp, Landlock).

The child's result comes back pickled through a pipe; the parent gets the child's
exit code too, so a test can tell "the call failed with EPERM" from "the kernel
killed the process" (a negative exit code: the signal)."""

from __future__ import annotations

import os
import pickle
import select
import signal
from collections.abc import Callable
from typing import Any, NamedTuple

CHILD_TIMEOUT_S = 120.0  # python -m venv inside the child takes a few seconds


class ChildResult(NamedTuple):
    exit_code: int  # os.waitstatus_to_exitcode: -SIGNAL when killed
    value: Any  # what the function returned; None when the child died first


class ChildRaised(AssertionError):
    """The function raised in the child; the message is the child's exception."""


def run_forked(function: Callable[..., Any], *args: Any) -> ChildResult:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(read_end)
        try:
            payload = ("returned", function(*args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            payload = ("raised", f"{type(exc).__name__}: {exc}")
        try:
            with os.fdopen(write_end, "wb") as pipe_writer:
                pipe_writer.write(pickle.dumps(payload))
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    with os.fdopen(read_end, "rb") as pipe_reader:
        while select.select([pipe_reader], [], [], CHILD_TIMEOUT_S)[0]:
            chunk = pipe_reader.read1(65536)
            if not chunk:
                break
            data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    if not data:
        return ChildResult(exit_code, None)
    outcome, value = pickle.loads(data)
    if outcome == "raised":
        raise ChildRaised(f"in the forked child: {value}")
    return ChildResult(exit_code, value)
