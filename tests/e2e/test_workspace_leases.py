"""A task's file lease on a workspace file would hold every host open of it (a red
team found it, session 51).

Through the idmapped workspace the task owns the user's files (inode_owner_or_capable),
so the kernel grants it fcntl(F_SETLEASE) on them. A read lease makes every host open
for writing (the user's editor saving, `git checkout`, even root) block until the task
lets go or the kernel's lease-break-time (45 s) runs out; a write lease makes every
host open at all (reads too: `cat`, `git diff`) block the same; and the task gets a
signal at each host open: it learns when the host touches the file, and holds it.
Unlike flock (advisory, only cooperating programs wait), a lease binds every opener.
The filter refuses F_SETLEASE unless it lets go (EACCES, what a non-owner gets);
record locks (F_SETLK, what builds and databases use) stay.

Control: the same host open of a file the task does not lease returns at once.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

LEASER = r"""
import fcntl, os, signal, sys, time
kind = sys.argv[1]
hits = []
signal.signal(signal.SIGIO, lambda *a: hits.append(time.time()))
try:
    if kind == "read":
        fd = os.open("victim", os.O_RDONLY)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    else:
        fd = os.open("victim", os.O_RDWR)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    print("lease taken", flush=True)
except OSError as e:
    print("lease refused:", e, flush=True)
fcntl.lockf(fd, (fcntl.LOCK_SH if kind == "read" else fcntl.LOCK_EX) | fcntl.LOCK_NB)  # still works
print("record lock taken", flush=True)
open("leased", "w").close()
deadline = time.time() + 25
while time.time() < deadline and not os.path.exists("go"):
    time.sleep(0.05)
print("host opens seen:", len(hits), flush=True)
"""


def _setup(ws):
    (ws / "victim").write_text("the user's file\n")
    (ws / "other").write_text("another file\n")


def _host_open(path, how, timeout=6.0):
    """The host's open of `path` (as root), in a child: seconds taken, None if it hung."""
    code = (
        "import os,sys; os.close(os.open(sys.argv[1], os.O_WRONLY if sys.argv[2]=='w' "
        "else os.O_RDONLY))"
    )
    started = time.monotonic()
    try:
        subprocess.run(["python3", "-c", code, str(path), how], timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - started


@pytest.mark.parametrize("kind, how", [("read", "w"), ("write", "r")])
def test_a_task_lease_does_not_hold_the_hosts_open(net, tmp_path, kind, how):
    run = sandbox.start(net, tmp_path, steps={"lease": python(LEASER, kind)}, setup=_setup)
    ws = run.workdir / "steps"
    try:
        deadline = time.monotonic() + 60
        while not (ws / "leased").exists():
            assert run.popen.poll() is None and time.monotonic() < deadline, run.finish()
            time.sleep(0.05)
        control = _host_open(ws / "other", how)
        took = _host_open(ws / "victim", how)
        (ws / "go").touch()
        result = run.finish()
    finally:
        run.kill()
    assert control is not None and control < 2, control
    assert "record lock taken" in result["lease"].out, result.describe()
    assert took is not None and took < 2, (
        f"the host's open ({how}) of the workspace file hung behind the task's {kind} lease; "
        f"task: {result['lease'].out.strip()}"
    )
