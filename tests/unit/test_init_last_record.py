"""A run's wait ends on the sandbox init's last record, the task's exit code
(sandbox/init.py main, written once PID 1 and every process of the sandbox are gone),
when the task's cgroup holds no process but the init: not on the init's own end,
whose teardown of the sandbox's namespaces takes longer (attach._wait). Anything
else, a process left in the cgroup above all, waits for the init's end as before."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from sandgate.enforcer import attach
from sandgate.enforcer.sandbox import prepare


class FakeCgroup:
    def __init__(self, members):
        self.members_now = set(members)

    def members(self) -> set[int]:
        return set(self.members_now)


class FakeClient:
    """The service's connection, which says nothing during the run."""

    def __init__(self):
        self.sock, self._peer = socket.socketpair()


def _init(records: list[bytes], linger: float, code: int = 0):
    """A child standing in for the init: it writes `records` to the report pipe, keeps
    running `linger` s (its teardown), then exits with `code`."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            for record in records:
                os.write(report_w, record)
                time.sleep(0.05)
            time.sleep(linger)
        finally:
            os._exit(code)
    os.close(report_w)
    child = attach.ForkedInit.__new__(attach.ForkedInit)
    child.pid, child.returncode = pid, None
    return child, report_r


def _prepared(report_r: int, cgroup) -> prepare.PreparedSandbox:
    return prepare.PreparedSandbox(Path("/nonexistent"), report_r, -1, cgroup)


def _exit_record(code: int) -> bytes:
    return json.dumps({"exit": code}).encode() + b"\n"


@pytest.fixture
def reap():
    children = []
    yield children.append
    for child in children:
        if child.returncode is None:
            os.kill(child.pid, 9)
            child.wait()


def test_the_last_record_ends_the_wait_while_the_init_still_ends(reap):
    weakened = json.dumps({"weakened": "landlock", "why": "old kernel"}).encode() + b"\n"
    child, report_r = _init([weakened, _exit_record(7)], linger=30, code=7)
    reap(child)
    prepared = _prepared(report_r, FakeCgroup({child.pid}))
    started = time.monotonic()
    attach._wait(child, FakeClient(), Path("/nonexistent"), "r1", prepared=prepared)
    assert time.monotonic() - started < 10  # not the init's 30 s
    assert child.returncode is None and prepared.exit_code == 7
    prepared.collect()
    assert [g.feature for g in prepared.gaps] == ["landlock"]  # the earlier records kept


@pytest.mark.parametrize(
    ("records", "cgroup"),
    [
        pytest.param([_exit_record(7)], "another", id="a-process-left-in-the-cgroup"),
        pytest.param([_exit_record(7)], None, id="no-cgroup-to-tell"),
        pytest.param([b'{"exit": "7"}\n'], "init", id="not-an-integer"),
        pytest.param([b'{"exit": 7}'], "init", id="no-newline-yet"),
        pytest.param([_exit_record(7) + b'{"weakened": "x"}\n'], "init", id="not-the-last"),
        pytest.param([b"[7]\n"], "init", id="not-an-object"),
    ],
)
def test_anything_else_waits_for_the_inits_end(reap, records, cgroup):
    child, report_r = _init(records, linger=1.0, code=3)
    reap(child)
    members = {"another": {child.pid, 1}, "init": {child.pid}}
    prepared = _prepared(report_r, FakeCgroup(members[cgroup]) if cgroup else None)
    attach._wait(child, FakeClient(), Path("/nonexistent"), "r1", prepared=prepared)
    assert child.returncode == 3  # reaped: the wait was for its end


def test_an_init_that_dies_without_the_record_is_waited_for(reap):
    child, report_r = _init([], linger=0.3, code=137)
    reap(child)
    prepared = _prepared(report_r, FakeCgroup({child.pid}))
    attach._wait(child, FakeClient(), Path("/nonexistent"), "r1", prepared=prepared)
    assert child.returncode == 137 and prepared.exit_code is None
