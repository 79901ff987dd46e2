"""The gateway's threads at GATEWAY_NICE (enforcer/priority.py), in a child process
so that the test runner keeps its own nice value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sandgate.enforcer.priority import GATEWAY_NICE

CHILD = """
import os, threading
from sandgate.enforcer.priority import raise_gateway_priority
before = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
before.start()  # a thread made before: it is raised too
print(raise_gateway_priority())
after = threading.Thread(target=lambda: print(os.getpriority(os.PRIO_PROCESS, 0)))
after.start(); after.join()  # a thread made after: its maker's
print(sorted({os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threading.enumerate()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a nice value needs root")
def test_every_thread_runs_at_the_gateway_nice_value():
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:3] == ["True", str(GATEWAY_NICE), f"[{GATEWAY_NICE}]"], out


def test_without_the_privilege_it_says_so_and_goes_on():
    code = "from sandgate.enforcer.priority import raise_gateway_priority as r; print(r())"
    # setpriv: no CAP_SYS_NICE, as under a unit's bounding set without it
    argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_nice", sys.executable, "-c", code]
    if os.geteuid() != 0:
        argv = [sys.executable, "-c", code]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
