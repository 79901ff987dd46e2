"""The after-run workspace check runs once every process of the task is gone
(prepare.PreparedSandbox.check_workspace, `end_processes`), not only its init.

The stop grace's end (or the disk reserve, or a second signal) SIGKILLs the
sandbox's outer process; PID 1 dies by its parent-death signal, and the rest of the
PID namespace after it. The runner reaped the outer and started the check at once:
the task's processes wrote on for some 20 ms while the walk and the renames ran, and
hooks written then stayed live and unreported (found by a red team: 3-19 of ~200 in
about one run of two). Now the task's cgroup is killed and emptied first; a run
without limits has none, and every process with its id slot's host ids is killed
and waited for instead (a second red team found the cgroup alone was not enough)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

# argv: repositories, workers. Each worker, deaf to SIGTERM, makes and removes
# pre-commit hooks in random repositories for as long as it lives.
CHURN = r"""
import os, random, signal, sys, time
repos, workers = int(sys.argv[1]), int(sys.argv[2])
for i in range(repos):
    os.makedirs(f"r{i}/.git/hooks", exist_ok=True)
hook = b"#!/bin/sh\necho PWNED-ON-HOST\n"
for _ in range(workers):
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            p = f"r{random.randrange(repos)}/.git/hooks/pre-commit"
            try:
                os.unlink(p)
            except FileNotFoundError:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
                os.write(fd, hook)
                os.close(fd)
            except OSError:
                pass
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open("churning", "w").close()
while True:
    time.sleep(1)
"""


def _live_hooks(workspace: Path) -> list[str]:
    return [
        os.path.join(top, name)
        for top, _dirs, files in os.walk(workspace)
        for name in files
        if name == "pre-commit"
    ]


@pytest.mark.parametrize(
    "limits",
    [(), ("--memory", "none", "--pids", "none")],
    ids=["cgroup", "no-cgroup"],  # without limits no cgroup: the task's ids find them
)
def test_no_task_process_writes_during_the_check_after_a_kill(net, tmp_path, limits):
    for attempt in range(4):  # the race was won in about one run of two
        work = tmp_path / f"attempt{attempt}"
        work.mkdir()
        started = sandbox.start(
            net, work, "trap '' TERM INT HUP; " + python(CHURN, "400", "40"),
            extra=("--stop-grace", "0.5", *limits),
        )  # fmt: skip
        steps, run_id = started.workdir / "steps", started.run_id()
        assert sandbox.eventually((steps / "churning").exists, timeout=30)
        started.popen.send_signal(signal.SIGTERM)  # ignored: SIGKILL after the grace
        started.popen.communicate(timeout=120)
        assert not sandbox.leftovers(net, run_id)
        # Its id slot freed too: a run without a cgroup kept it while a zombie of
        # the task had its ids (for `sandgate gc`).
        assert "would remove" not in sandbox.gc(net, "--dry-run").stdout
        live = _live_hooks(steps)
        assert live == [], f"attempt {attempt}: {len(live)} hooks left live: {live[:5]}"
