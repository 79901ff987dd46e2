"""Human approvals (issue 10) end to end in the fake internet: a task's connection is
held while a human decides from the CLI; the name it asks for never reaches the
upstream DNS server before approval; a hold that runs out is a 403 (HTTP) that names
the pending approval; `always` is a rule in approved.yaml that survives a restart."""

from __future__ import annotations

import json
import subprocess

import pytest
from support import sandbox
from support.sandbox import curl, eventually
from support.service import GatewayProcess, attach, attach_argv

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: HOLD}
    rules:
      - ask: allowed.test
        id: ask-allowed
      - deny: evil.test
"""


def _service(net, tmp_path, hold: str) -> GatewayProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("HOLD", hold))
    return GatewayProcess(net, tmp_path, rules).start()


def _pending(service: GatewayProcess) -> list[dict]:
    result = service.ask("approvals", "--json", "list")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _why_not_held(task: subprocess.Popen, service: GatewayProcess) -> str:
    """What the task and the service said, for a task that ended instead of being held."""
    out, err = task.communicate(timeout=30)
    return f"task exited {task.returncode}:\n{out}\n{err}\nservice log:\n{service.log.read_text()}"


def test_a_held_connection_completes_when_approved_and_dns_waits_for_it(fakenet, tmp_path):
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        workdir = sandbox._workdir(tmp_path)
        steps_dir = workdir / "steps"
        steps = {"held": curl("https://allowed.test/", timeout=40)}
        task = subprocess.Popen(
            attach_argv(service, workdir, ["sh", "-c", sandbox._script(steps, steps_dir)]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            pending = eventually(lambda: _pending(service) or task.poll() is not None, timeout=45)
            assert isinstance(pending, list), _why_not_held(task, service)
            (asked,) = pending
            assert (asked["name"], asked["port"], asked["protocol"]) == ("allowed.test", 443, "tls")
            assert {"id", "task_id", "profile", "method", "path", "waiting_s"} <= asked.keys()
            # Held, and the upstream resolver has not heard of the name.
            assert "allowed.test" not in fakenet.dns_queries_seen()
            assert fakenet.requests_seen() == []
            approved = service.ask("approvals", "approve", asked["id"], "--task")
            assert approved.returncode == 0, approved.stderr
            again = service.ask("approvals", "deny", asked["id"])
            assert again.returncode == 125 and "already approved (task)" in again.stderr
            out, err = task.communicate(timeout=60)
        finally:
            if task.poll() is None:
                task.kill()
                task.wait()
        result = sandbox._result(task.returncode, out, err, workdir, steps_dir)
        assert result["held"].out.strip().splitlines()[-1] == "200", result.describe()
        assert "allowed.test" in fakenet.dns_queries_seen()  # resolved after approval
        events = service.events(kind="approval")
        assert [e["reason"] for e in events][:2] == ["rule_ask", "approval_granted"]
        assert events[1]["approver"].startswith("uid 0") and events[1]["scope"] == "task"
        unknown = service.ask("approvals", "approve", "nosuchid")
        assert unknown.returncode == 125 and "no approval 'nosuchid'" in unknown.stderr
    finally:
        service.stop()


def test_a_hold_that_runs_out_is_a_403_then_always_survives_a_restart(fakenet, tmp_path):
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "1s")
    try:
        first = attach(service, tmp_path, {"http": curl("http://allowed.test/")})
        body = first["http"].out
        assert body.strip().splitlines()[-1] == "403", first.describe()
        document = json.loads(body.splitlines()[1])
        assert document["reason"] == "approval_pending" and document["retry"] is True
        approval_id = document["approval_id"]
        assert f"sandgate approvals approve {approval_id}" in body.splitlines()[0]
        assert fakenet.requests_seen() == []
        assert "allowed.test" not in fakenet.dns_queries_seen()
        # Still pending after the task gave up? No: the task ended, so it expired.
        approve = service.ask("approvals", "approve", approval_id, "--always")
        assert approve.returncode == 125 and "already expired" in approve.stderr
        # A task that is still running gets its approval; always writes the overlay.
        workdir = sandbox._workdir(tmp_path)
        steps_dir = workdir / "steps"
        script = sandbox._script(
            {"retry": f"{curl('http://allowed.test/')}; sleep 4; {curl('http://allowed.test/')}"},
            steps_dir,
        )
        task = subprocess.Popen(
            attach_argv(service, workdir, ["sh", "-c", script]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        (asked,) = eventually(lambda: _pending(service), timeout=20)
        done = service.ask("approvals", "approve", asked["id"], "--always", "--ticket", "T-1")
        assert done.returncode == 0, done.stderr
        out, err = task.communicate(timeout=60)
        result = sandbox._result(task.returncode, out, err, workdir, steps_dir)
        assert result["retry"].out.strip().splitlines()[-1] == "200", result.describe()
        overlay = (tmp_path / "approved.yaml").read_text()
        assert "allowed.test" in overlay and "T-1" in overlay and "uid 0" in overlay
    finally:
        service.stop()
    # After a restart the rule is in force and listed; nothing asks any more.
    service = GatewayProcess(fakenet, tmp_path, tmp_path / "rules.yaml").start()
    try:
        shown = subprocess.run(
            [sandbox.SANDGATE, "rules", "show", str(tmp_path / "rules.yaml")],
            capture_output=True,
            text=True,
        )
        assert f"approved:{asked['id']}" in shown.stdout, shown.stdout + shown.stderr
        later = attach(service, tmp_path, {"http": curl("http://allowed.test/")})
        assert later["http"].out.strip().splitlines()[-1] == "200", later.describe()
        assert _pending(service) == []
    finally:
        service.stop()
