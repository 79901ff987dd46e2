"""The task's RLIMIT_CORE on a host that pipes cores to a helper (enforcer/sandbox/inherit.py).

Red team kernel (session 50, "Held"): with kernel.core_pattern `|/usr/lib/systemd/
systemd-coredump ...` (or apport, or a coredump socket `@...`), a crashing task had the
host's helper run as root on bytes it chose, its core stored outside the disk reserve;
the task could raise RLIMIT_CORE (soft 0, hard unlimited) to make it store a full one.
The kernel runs no helper for a process whose RLIMIT_CORE is exactly 1 (0 does not stop
a pipe), so there the task's is 1, soft and hard; with a plain file pattern (`core`) the
caller's limits stay. That the task cannot change it (seccomp: a no-op) is in
test_seccomp.py (`test_the_core_limit_cannot_be_changed`).
"""

from __future__ import annotations

import resource

import pytest
from sandgate.enforcer.sandbox import inherit

CALLER = (
    (resource.RLIMIT_CORE, 0, resource.RLIM_INFINITY),
    (resource.RLIMIT_NOFILE, 1024, 4096),
)


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h", id="systemd"),
        pytest.param("|/usr/share/apport/apport -p%p -s%s -c%c", id="apport"),
        pytest.param("@/run/systemd/coredump.socket", id="socket"),
        pytest.param(None, id="unreadable"),
    ],
)
def test_a_core_helper_host_gives_the_task_a_core_limit_of_one(pattern: str | None) -> None:
    limited = dict((n, (s, h)) for n, s, h in inherit.core_limited(CALLER, pattern))
    assert limited[resource.RLIMIT_CORE] == (1, 1)
    assert limited[resource.RLIMIT_NOFILE] == (1024, 4096)


@pytest.mark.parametrize("pattern", ["core", "/var/crash/core.%e.%p", ""])
def test_a_plain_core_file_pattern_keeps_the_callers_limits(pattern: str) -> None:
    assert inherit.core_limited(CALLER, pattern) == CALLER


def test_the_spec_carries_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inherit, "core_pattern", lambda: "|/bin/false")
    spec = inherit.Inherited(0o022, CALLER).to_spec()
    assert [resource.RLIMIT_CORE, 1, 1] in spec["rlimits"]
    monkeypatch.setattr(inherit, "core_pattern", lambda: "core")
    assert inherit.Inherited(0o022, CALLER).to_spec()["rlimits"] == [list(r) for r in CALLER]
