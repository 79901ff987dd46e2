"""The audit trail and the gateway's limits against a hostile task, end to end:
fields a task fills are bounded in the log, the firewall's counts are honest, an
audit log that cannot be written stops new connections instead of losing their
evidence, and a task that exhausts the gateway's descriptors cannot silence it."""

from __future__ import annotations

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e


def test_a_task_that_sends_nothing_has_no_firewall_drops(net, tmp_path):
    """The sandbox kernel's own IPv6 multicast listener reports are not the task's."""
    # MLD reports go out within a second or two of eth0 coming up: a task as short as
    # `true` may end before them, so this one waits.
    r = sandbox.run(net, tmp_path, command=["sleep", "2.5"])
    assert r.returncode == 0, r.describe()
    assert r.summary["firewall_drops"] == {}, r.summary["firewall_drops"]
    assert r.events(kind="task", reason="dropped_by_firewall") == []
