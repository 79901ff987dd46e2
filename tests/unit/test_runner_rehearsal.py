"""A warm runner's rehearsal (zygote.rehearse): the first steps of a run, done while it
waits, so that the pages of the pool's memory they write are copied then, not during
a run. Counted in page faults, which the kernel keeps per process: no timing."""

from __future__ import annotations

import os
import resource
import sys

import pytest
from sandgate.enforcer import attach, zygote
from sandgate.enforcer.sandbox import options as sandbox_options


def _faults_of_a_runs_options(tmp_path, rehearsed: bool) -> int:
    """In a fresh fork of this process (as a runner is of the pool): the page faults
    of parsing a run's arguments and checking its options."""
    zygote._warm_up()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if rehearsed:
                zygote.rehearse(str(tmp_path / "gw.sock"))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            argv = ["run", "--gateway", str(tmp_path / "gw.sock"), "--no-workspace", "--", "x"]
            args = zygote._run_parser.parse_args(argv)
            sandbox_options.from_arguments(args, list(attach.STATE_DIRS))
            after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            os.write(write, str(after - before).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        faults = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return int(faults)


@pytest.mark.skipif(os.geteuid() != 0, reason="a run's options are checked as root's")
def test_a_rehearsed_runner_copies_its_pages_before_the_run(tmp_path):
    fresh = _faults_of_a_runs_options(tmp_path, rehearsed=False)
    rehearsed = _faults_of_a_runs_options(tmp_path, rehearsed=True)
    assert fresh > 150, fresh  # ~470 on this project's host: what the rehearsal is for
    assert rehearsed < fresh / 4, (rehearsed, fresh)


def test_the_rehearsal_runs_to_its_end_and_leaves_nothing(tmp_path, monkeypatch):
    """Its caller ignores its errors (a run must not depend on it): here none is raised,
    so a change of the steps it calls cannot leave it doing nothing unnoticed."""
    monkeypatch.chdir(tmp_path)
    before = {
        p: sorted(os.listdir(p))
        for p in [tmp_path, *map(str, attach.STATE_DIRS)]
        if os.path.isdir(p)
    }
    env = dict(os.environ)
    zygote.rehearse(str(tmp_path / "gw.sock"))
    after = {p: sorted(os.listdir(p)) for p in before}
    assert after == before
    assert dict(os.environ) == env
    assert "sandgate.enforcer.zygote" in sys.modules
