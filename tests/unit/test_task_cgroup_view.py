"""What the sandbox init mounts again for the task's view: the cgroup hierarchies
where the task is in its own cgroup (init.own_hierarchies), never the caller's others,
whose root would show other runs (test_task_view.py); and where it unmounts the host's
trees (mounts.outermost_points)."""

from __future__ import annotations

import pytest
from sandgate.enforcer.sandbox import init, mounts

HYBRID = """\
9:name=systemd:/user.slice
8:pids:/agents/sandgate-ab12
5:devices:/user.slice
4:memory:/agents/sandgate-ab12
2:cpu,cpuacct:/agents/sandgate-ab12
0::/user.slice/session-1.scope
"""


@pytest.mark.parametrize(
    ("own_cgroups", "name", "expected"),
    [
        pytest.param(HYBRID, "sandgate-ab12", ["pids", "memory", "cpu,cpuacct"], id="v1-hybrid"),
        pytest.param("0::/system.slice/sandgate-ab12\n", "sandgate-ab12", [""], id="v2-only"),
        pytest.param(
            "0::/system.slice/sandgate-warm-9f\n", "sandgate-warm-9f", [""], id="warm-runner"
        ),
        # A cgroup of another run whose name starts like ours, or ours as a parent.
        pytest.param(
            "0::/sandgate-ab123\n4:memory:/sandgate-ab12/x\n", "sandgate-ab12", [], id="not-ours"
        ),
        pytest.param(HYBRID, None, [], id="no-task-cgroup"),
        pytest.param("garbage\n\n", "sandgate-ab12", [], id="malformed"),
    ],
)
def test_own_hierarchies(own_cgroups, name, expected):
    assert init.own_hierarchies(own_cgroups, name) == expected


def test_a_tree_is_detached_at_its_outermost_mount_points():
    """One lazy unmount per outermost point takes the mounts below it along (a host's
    /run/netns holds one mount per sandbox: one call, not hundreds)."""
    points = ["/", "/run", "/run/netns", "/run/netns/sg-1", "/run/user/0", "/run-x", "/runner"]
    assert mounts.outermost_points(points, "/run") == ["/run"]
    assert mounts.outermost_points(points[2:], "/run") == ["/run/netns", "/run/user/0"]
    assert mounts.outermost_points(["/tmp/a b", "/tmp/a b/c"], "/tmp") == ["/tmp/a b"]
    assert mounts.outermost_points(points, "/tmp") == []
