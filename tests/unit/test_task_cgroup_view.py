"""Which of its cgroup hierarchies the sandbox init mounts again inside the task's
cgroup namespace (init.own_hierarchies): those where the task is in its own cgroup,
never the caller's others, whose root would show other runs (test_task_view.py)."""

from __future__ import annotations

import pytest
from sandgate.enforcer.sandbox import init

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
