"""`nice -n 10 sandgate run ...` (a build farm's usual way to start background work):
the sandbox's init put the task back to nice 0, which lowering a nice value in a user
namespace may not do (CAP_SYS_NICE of the host's), and the run failed before the task
with `sandbox setup failed: [Errno 13] Permission denied`. The task now keeps its
caller's nice value (and can lower it no further); an un-niced run's task is at 0."""

from __future__ import annotations

import pytest
from support.sandbox import SANDGATE

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("niceness", [0, 10])
def test_a_niced_caller_runs_its_task_at_its_nice_value(fakenet, tmp_path, niceness):
    argv = [
        "nice", "-n", str(niceness), SANDGATE, "run", "--dns-upstream", fakenet.dns_ip,
        "--audit-log", str(tmp_path / "audit.jsonl"), "--metrics-listen", "off",
        "--admin-listen", "off", "--no-workspace", "-q", "--",
        "sh", "-c", "nice; python3 -c 'import os; os.nice(-1)' 2>/dev/null && echo lowered || echo kept",
    ]  # fmt: skip
    result = fakenet.run_in_host(argv, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(niceness), "kept"], result.stdout + result.stderr
