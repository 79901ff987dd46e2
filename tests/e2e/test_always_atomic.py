"""`approve --always` is one decision (docs/approvals.md, "always"): what the approver is
told, the rule in approved.yaml and the audit agree, whatever happens while the rule is
written and loaded (the reload waits 0.5 s for the file to settle):

- a denial (or another approval) meanwhile is refused ("being approved"), never
  reported as the decision while the rule goes into force;
- a request joining the held one meanwhile (the page's `seen`) is covered by the rule;
- a SIGKILL of the service meanwhile: after the restart, a rule in force has its
  `approval_granted` event in the audit (written before the rule);
- a second `always` by someone else meanwhile is refused; only one rule is written.

In every variant: an approver told "refused" means the task's later request is denied
and no rule is in approved.yaml; a rule in force means an `approval_granted` event.
(From the rt45 red-team report, F5.)
"""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
from support import sandbox
from support.sandbox import curl, eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 40s}
    rules:
      - ask: allowed.test
        id: ask-allowed
      - deny: evil.test
"""


def _pending(service: GatewayProcess) -> list[dict]:
    result = service.ask("approvals", "--json", "list")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Task:
    def __init__(self, service: GatewayProcess, tmp_path, steps: dict[str, str]):
        self.service = service
        self.workdir = sandbox._workdir(tmp_path)
        self.steps_dir = self.workdir / "steps"
        script = sandbox._script(steps, self.steps_dir)
        self.popen = subprocess.Popen(
            attach_argv(service, self.workdir, ["sh", "-c", script]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def held(self, timeout: float = 45) -> dict:
        def found():
            return _pending(self.service) or self.popen.poll() is not None

        pending = eventually(found, timeout=timeout)
        assert isinstance(pending, list), self.popen.communicate()
        return pending[0]

    def go(self, name: str) -> None:
        (self.steps_dir / name).touch()

    def finish(self, timeout: float = 90):
        try:
            out, err = self.popen.communicate(timeout=timeout)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        return sandbox._result(self.popen.returncode, out, err, self.workdir, self.steps_dir)


def _decide_in_background(service: GatewayProcess, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sandbox.SANDGATE, "approvals", *argv, "--control", str(service.control)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rule_in_force(tmp_path, approval_id: str) -> bool:
    overlay = tmp_path / "approved.yaml"
    return overlay.exists() and f"approved:{approval_id}" in overlay.read_text()


def _check_truth(service, tmp_path, approval_id: str, told_refused: bool, later) -> None:
    """The invariants of every variant."""
    in_force = _rule_in_force(tmp_path, approval_id)
    granted = eventually(
        lambda: service.events(kind="approval", approval_id=approval_id, reason="approval_granted"),
        timeout=5 if in_force else 0.5,
    )
    if told_refused:
        assert not in_force, (tmp_path / "approved.yaml").read_text()
        assert later.status != 200, later
    if in_force:
        assert granted, service.events(kind="approval")
        assert granted[0]["scope"] == "always"


def _wait_for_overlay(tmp_path) -> None:
    # written: its reload now waits for the file to settle (0.5 s)
    assert eventually(lambda: (tmp_path / "approved.yaml").exists(), timeout=20)


@pytest.mark.parametrize("second", [["deny"], ["approve", "--once"], ["approve", "--always"]])
def test_a_decision_during_the_always_reload_is_refused_and_the_always_stands(
    net, tmp_path, second
):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        task = Task(
            service,
            tmp_path,
            {
                "first": curl("http://allowed.test/first", timeout=60),
                "wait": "until [ -e go ]; do sleep 0.1; done",
                "later": curl("http://allowed.test/later-after-the-second", timeout=20),
            },
        )
        try:
            asked = task.held()
            always = _decide_in_background(service, "approve", asked["id"], "--always")
            _wait_for_overlay(tmp_path)
            other = service.ask("approvals", second[0], asked["id"], *second[1:])
            out, err = always.communicate(timeout=60)
        finally:
            task.go("go")
            result = task.finish()
        assert always.returncode == 0, (out, err)
        assert other.returncode == 125, other
        assert f"approval {asked['id']} is being approved (always)" in other.stderr, other.stderr
        assert result["first"].status == 200, result.describe()
        assert result["later"].status == 200, result.describe()
        overlay = (tmp_path / "approved.yaml").read_text()
        assert overlay.count(f"approved:{asked['id']}") == 1, overlay
        _check_truth(service, tmp_path, asked["id"], False, result["later"])
        decisions = [
            e["reason"]
            for e in service.events(kind="approval", approval_id=asked["id"])
            if e["reason"] in ("approval_granted", "approval_denied")
        ]
        assert decisions == ["approval_granted"], decisions
    finally:
        service.stop()


def test_a_request_joining_during_the_always_reload_is_covered_by_it(net, tmp_path):
    """The page sends `seen`; the task retries its held request while the always's rule
    is written and loaded: the decision was taken on what was shown, the rule covers
    the request that joined, the approver is told "approved", a later denial is refused."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        url = "http://allowed.test/same"
        task = Task(
            service,
            tmp_path,
            {
                "two": f"( {curl(url, timeout=60)} > first.out & ) ; "
                f"until [ -e go ]; do sleep 0.02; done; {curl(url, timeout=60)}",
                "wait2": "until [ -e go2 ]; do sleep 0.1; done",
                "later": curl("http://allowed.test/later", timeout=20),
            },
        )
        try:
            asked = task.held()
            always = _decide_in_background(
                service, "approve", asked["id"], "--always", "--seen", str(asked["revision"])
            )
            _wait_for_overlay(tmp_path)
            task.go("go")
            out, err = always.communicate(timeout=60)
            deny = service.ask("approvals", "deny", asked["id"])
        finally:
            task.go("go")
            task.go("go2")
            result = task.finish()
        told_refused = always.returncode != 0
        _check_truth(service, tmp_path, asked["id"], told_refused, result["later"])
        assert not told_refused, (out, err)
        assert deny.returncode == 125 and "first decision stands" in deny.stderr, deny
        assert result["two"].status == 200 and result["later"].status == 200, result.describe()
    finally:
        service.stop()


def test_a_kill_during_the_always_reload_leaves_the_grant_in_the_audit(net, tmp_path):
    """SIGKILL of the service after approved.yaml is written, before the approval is
    recorded as decided: after a restart the rule is in force, and the audit log holds
    its approval_granted (emitted, journaled, before the rule was written)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(net, tmp_path, rules).start()
    task = Task(service, tmp_path, {"first": curl("http://allowed.test/first", timeout=60)})
    try:
        asked = task.held()
        always = _decide_in_background(service, "approve", asked["id"], "--always")
        _wait_for_overlay(tmp_path)
        service.kill()
        out, err = always.communicate(timeout=30)
    finally:
        with contextlib.suppress(Exception):  # a killed service's runner writes no summary
            task.finish()
    told_refused = always.returncode != 0 and "refused" in (out + err)
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        second = Task(
            service, tmp_path, {"later": curl("http://allowed.test/after-restart", timeout=20)}
        )
        result = second.finish()
        assert _rule_in_force(tmp_path, asked["id"])
        assert result["later"].status == 200, result.describe()
        # and the restart said so (the record of the always being written was left)
        log = service.log.read_text()
        assert f"approval {asked['id']} (GET allowed.test:80 (http)/first, always, by " in log, log
        assert "was being written when the gateway stopped" in log
        assert f"its rule approved:{asked['id']} is in " in service.log.read_text()
        _check_truth(service, tmp_path, asked["id"], told_refused, result["later"])
    finally:
        service.stop()
