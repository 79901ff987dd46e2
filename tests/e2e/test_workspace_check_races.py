"""The check after a run, raced by a task that shares the writable directory.

When a run's task has ended, its runner (root, in the host's mount namespace) walks
the writable roots again and renames each planted path aside (planting.py
`find_planted`, `disarm`). The walk opens every directory from its parent's
descriptor without following links, but the rename and the read of a config to
judge went BY PATH: a task of another run sharing the directory, still running,
could turn a directory on the way into a link to a host directory between the walk
and the rename, and the runner then renamed a HOST file of the same name aside
(`/etc/pam.d/common-auth` -> `common-auth.sandgate-planted`: every login broken), or
read a host file only root may read and quoted it in its report. Every path the
check acts on after the walk is now opened with openat2(RESOLVE_NO_SYMLINKS)
(mounts.open_exact), so a link anywhere on the way refuses the step.

The concurrent task times its swap with inotify: the runner's walk opening the
planted file's directory is its signal; the other run's task planted enough new
repositories that the runner still has their configs to read (the judge) before it
renames anything.
"""

from __future__ import annotations

import os
import shutil

import pytest
from sandgate.enforcer.sandbox import planting
from support import sandbox
from support.sandbox import eventually

pytestmark = pytest.mark.e2e

# The swapper, in the sandbox: wait for `victim` to exist, watch its directory, and
# on the first open of it (the other runner's walk) make `.vscode/x` a link to HOST.
SWAPPER = r"""
import ctypes, os, struct, sys, time
shared, host = sys.argv[1], sys.argv[2]
x = os.path.join(shared, ".vscode", "x")
watched = os.path.join(x, "victimdir")
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(watched, "victim")):
    if time.monotonic() > deadline:
        sys.exit("no victim")
    time.sleep(0.001)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
IN_OPEN = 0x20
assert libc.inotify_add_watch(fd, watched.encode(), IN_OPEN) >= 0
open(os.path.join(shared, "watching"), "w").close()
os.read(fd, 4096)  # the runner's walk opened the directory
os.rename(x, x + ".old")
os.symlink(host, x)
open(os.path.join(shared, "swapped"), "w").close()
"""

# The planter, in the other run: the file to be renamed, then many new repositories
# whose configs the runner reads after its walk (its window before the renames).
PLANTER = r"""
import os, sys, time
shared = sys.argv[1]
os.makedirs(os.path.join(shared, ".vscode", "x", "victimdir"))
with open(os.path.join(shared, ".vscode", "x", "victimdir", "victim"), "w") as f:
    f.write("{}")
for n in range(400):
    git = os.path.join(shared, "zz", f"r{n}", ".git")
    os.makedirs(git)
    with open(os.path.join(git, "config"), "w") as f:
        f.write("[core]\n\tfsmonitor = true\n" + "# padding\n" * 2000)
deadline = time.monotonic() + 30
while not os.path.exists(os.path.join(shared, "watching")) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def test_a_concurrent_task_cannot_make_the_check_rename_a_host_file(net, tmp_path):
    shared, rw = sandbox.shared_dir(tmp_path)
    host = tmp_path / "host"
    (host / "victimdir").mkdir(parents=True)
    victim = host / "victimdir" / "victim"
    victim.write_text("a host file\n")
    (shared / "swapper.py").write_text(SWAPPER)
    (shared / "planter.py").write_text(PLANTER)
    swapper = sandbox.start(
        net, tmp_path, f"/usr/bin/python3 {shared}/swapper.py {shared} {host}", extra=rw
    )
    try:
        planter = sandbox.run(
            net,
            tmp_path,
            command=["/usr/bin/python3", f"{shared}/planter.py", str(shared)],
            extra=rw,
        )
        assert planter.returncode == 0, planter.describe()
        assert eventually(lambda: (shared / "swapped").exists(), timeout=30), (
            "the swapper never saw the walk",
            planter.describe(),
        )
        done = swapper.finish()
        assert done.returncode == 0, done.describe()
    finally:
        swapper.kill()
    # The host file is where it was, untouched: the rename met the link and stopped.
    assert victim.read_text() == "a host file\n"
    assert os.listdir(host / "victimdir") == ["victim"]
    [line] = [p for p in planter.summary["workspace_planted"] if "victimdir" in p]
    assert line == str(shared / ".vscode/x/victimdir/victim"), planter.summary
    assert "NOT renamed" in planter.stderr, planter.stderr[-2000:]


def test_disarm_and_judge_follow_no_link_on_the_way(tmp_path):
    """The same race made by hand between find_planted and disarm: a directory on
    the planted path's way became a link to a host directory."""
    ws, host = tmp_path / "ws", tmp_path / "host"
    ws.mkdir()
    (host / "victimdir").mkdir(parents=True)
    (host / "victimdir" / "victim").write_text("host\n")
    (host / "repo" / ".git").mkdir(parents=True)
    (host / "repo" / ".git" / "config").write_text("[secret]\n\tonly-root-reads = this\n")
    before = planting.survey([ws])
    (ws / ".vscode" / "x" / "victimdir").mkdir(parents=True)
    (ws / ".vscode" / "x" / "victimdir" / "victim").write_text("{}")
    (ws / "r" / ".git").mkdir(parents=True)
    (ws / "r" / ".git" / "config").write_text("[core]\n\tbare = false\n")
    after = planting.walk_after(before)
    # Between the walk and the steps after it, both ways become links out.
    shutil.move(ws / ".vscode" / "x", ws / "x.old")
    (ws / ".vscode" / "x").symlink_to(host)
    shutil.move(ws / "r", ws / "r.old")
    (ws / "r").symlink_to(host / "repo")
    planted = planting.find_planted(before, after)
    why = {p.path: p.why for p in planted}
    # The config is not read through the link (its keys would be the host file's).
    assert "only-root-reads" not in why.get(ws / "r/.git/config", ""), why
    done = planting.disarm(planted)
    assert all(p.disarmed_as is None for p in done), done
    assert sorted(os.listdir(host / "victimdir")) == ["victim"]
    assert sorted(os.listdir(host / "repo" / ".git")) == ["config"]
