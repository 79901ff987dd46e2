"""An approval decided on what the approver saw, after the held request gave up.

The approver is shown an approval holding one POST with a 5-byte body (revision R).
The hold runs out before they decide (the default hold is 30 s; people take longer):
the request leaves, and "Approve once" then grants the *next* request exactly as
shown, whatever its body. The task, which knows its hold, sends the same POST again
with 20 kB of data. Before, the approval with `seen: R` (what the page always sends)
was accepted, and that 20 kB body went upstream: something other than what was
shown. A held request that leaves changes what once lets through, so it moves the
revision on, as one that joins does: the stale decision is refused (409, exit 125),
nothing is granted, and the approver looks again ("0 requests held").
"""

from __future__ import annotations

import json
import subprocess

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 1s}
    rules:
      - ask: allowed.test
        id: ask-upload
        methods: [POST]
        paths: ["/up"]
"""

SMALL, LARGE = 5, 20_000  # both within the socket buffers: no wait on an unread body
TASK = f"""
post() {{ head -c "$1" /dev/zero | tr '\\0' x > /tmp/body
  curl -s -o /dev/null --max-time 20 -H 'Expect:' --data-binary @/tmp/body \\
       -w '%{{http_code}}' http://allowed.test/up; }}
post {SMALL} > first.txt
n=0; while [ ! -e go ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done
post {LARGE} > second.txt
"""


def test_a_decision_on_a_request_that_left_its_hold_is_refused_not_granted(fakenet, tmp_path):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(fakenet, tmp_path, rules, "--admin-listen", "off").start()
    workdir = sandbox._workdir(tmp_path)
    steps = workdir / "steps"
    task = None
    try:
        task = subprocess.Popen(
            attach_argv(service, workdir, ["sh", "-c", f"cd {steps} && {TASK}"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def listed() -> list[dict]:
            result = service.ask("approvals", "list", "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        # What the approver is shown: one POST held, its 5-byte body.
        (shown,) = eventually(lambda: [a for a in listed() if a["held"] == 1], timeout=30)
        assert shown["shown"]["bodies"] == f"{SMALL} bytes", shown
        # The hold runs out before they decide.
        first = steps / "first.txt"
        assert eventually(lambda: first.exists() and first.read_text(), timeout=10) == "403"
        # (The listing is the service's mirror of the worker's record, a batch behind:
        # the worker itself moved the revision as the request left, and decides below.)
        (now,) = eventually(lambda: [a for a in listed() if a["held"] == 0], timeout=10)
        assert now["revision"] != shown["revision"], now
        stale = service.ask("approvals", "approve", shown["id"], "--seen", str(shown["revision"]))
        assert stale.returncode == 125, (stale.stdout, stale.stderr)
        assert "changed since it was shown" in stale.stderr and "0 held now" in stale.stderr
        # Nothing was granted: the larger POST is held and asked about again.
        (steps / "go").touch()
        out, err = task.communicate(timeout=60)
        assert task.returncode == 0, err
        assert (steps / "second.txt").read_text() == "403"
        assert fakenet.requests_seen() == []  # neither body went upstream
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()
