"""`sandgate run` with its audit log where a link was planted, or in a directory anyone
may write: refused in one line before the task runs (exit 125), and nothing is made
through the link. (The writer's handling of links while it writes, rotation and
`verify`: tests/unit/test_audit_links.py.)"""

from __future__ import annotations

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test
CURL = "curl -s -o /dev/null --max-time 3 -w '%{http_code}' https://allowed.test/x"


@pytest.mark.parametrize("case", ["dangling-link", "open-directory"])
def test_a_planted_link_or_an_open_directory_stops_the_run_before_the_task(net, tmp_path, case):
    """Before, a dangling link as the log had root make its target (anywhere: the test's
    stands for /etc/profile.d/x.sh) and write the audit lines, task-chosen URLs in
    them, there."""
    workdir = tmp_path / "run"
    (workdir / "steps").mkdir(parents=True)
    logs = workdir / "logs"
    logs.mkdir()
    victim = tmp_path / "profile.sh"
    target = logs / "audit.jsonl"
    if case == "dangling-link":
        target.symlink_to(victim)
        expected = f"{target} is a symbolic link"
    else:
        logs.chmod(0o777)
        expected = "writable by anyone"
    marker = workdir / "steps" / "ran"
    argv = sandbox._argv(net, workdir, ["sh", "-c", f"touch {marker}; {CURL}"],
                         sandbox.DEMO_RULES, ())  # fmt: skip
    argv[argv.index("--audit-log") + 1] = str(target)
    proc = net.run_in_host(argv, timeout=30)
    assert proc.returncode == 125, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("sandgate: ") and expected in line, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not net.requests_seen(ALLOWED_IP)
    assert not victim.exists()
