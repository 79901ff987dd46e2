"""An `always` approval ends with its rule, for the task that asked too.

What was wrong (red team `trail`, session 50): docs/approvals.md says that once an
`always` rule's `expires` has passed "the rule stops matching and the destination is
asked about again", and the admin revokes one by removing its rule from approved.yaml
and reloading. pending.py also filed an `always` as a task grant ("as task, until the
policy allows it by itself"), and `grant_for` answered from it for the rest of the
task: after the expiry (or the removal) the asking task went on unasked.

What holds now: the task grant of an `always` holds only while its rule approved:ID is
in force (PendingStore.in_force, answered by the gate from its policy): past the
rule's expiry, or once it is removed and reloaded, the task is asked again, and what
the approval let through is closed (tests/unit/test_gate_approvals.py)."""

from __future__ import annotations

import time

import pytest
from support.sandbox import curl, eventually
from test_approvals_e2e import Task, _pending, _service

pytestmark = pytest.mark.e2e


def test_an_always_approval_that_expired_still_lets_its_task_through(fakenet, tmp_path):
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        task = Task(
            service,
            tmp_path,
            {
                "held": curl("http://allowed.test/held", timeout=40),
                "inside": curl("http://allowed.test/inside"),
                "wait": "until [ -e go ]; do sleep 0.1; done",
                "after": curl("http://allowed.test/after", timeout=40),
            },
        )
        try:
            first = task.held()
            decided = time.time()
            approved = service.ask(
                "approvals", "approve", first["id"], "--always", "--expires", "8s"
            )
            assert approved.returncode == 0, approved.stderr
            assert eventually(lambda: (task.steps_dir / "inside.rc").exists(), timeout=20)
            # the rule (and so the approval) is past its expiry now
            time.sleep(max(0.0, decided + 11 - time.time()))
            (task.steps_dir / "go").touch()

            def asked_or_done():
                fresh = [a for a in _pending(service) if a["id"] != first["id"]]
                return fresh or (task.steps_dir / "after.rc").exists()

            outcome = eventually(asked_or_done, timeout=30)
            if isinstance(outcome, list):
                for a in outcome:
                    service.ask("approvals", "deny", a["id"])
        finally:
            result = task.finish()
        assert result["held"].status == 200, result.describe()
        assert result["inside"].status == 200, result.describe()
        seen = [r["uri"] for r in fakenet.requests_seen()]
        # The expired `always` must not let the task through unasked: the docs say the
        # destination is asked about again once the rule is past its expiry.
        assert isinstance(outcome, list), (
            f"after the rule expired the task was not asked again: 'after' got "
            f"{result['after'].status}, upstream saw {seen}; "
            f"events: {service.events(kind='request', path='/after')}"
        )
        assert "/after" not in seen
    finally:
        service.stop()


def test_an_always_rule_the_admin_removed_still_lets_its_task_through(fakenet, tmp_path):
    """The admin revokes an `always` by removing its rule from approved.yaml and
    reloading (the file is "to be reviewed in git"). Every other task is asked again;
    the task that asked goes on passing, unasked, for as long as it runs."""
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        task = Task(
            service,
            tmp_path,
            {
                "held": curl("http://allowed.test/held", timeout=40),
                "wait": "until [ -e go ]; do sleep 0.1; done",
                "after": curl("http://allowed.test/after-revoked", timeout=40),
            },
        )
        try:
            first = task.held()
            approved = service.ask("approvals", "approve", first["id"], "--always")
            assert approved.returncode == 0, approved.stderr
            assert eventually(lambda: (task.steps_dir / "held.rc").exists(), timeout=20)
            overlay = tmp_path / "approved.yaml"
            assert "approved:" in overlay.read_text()
            overlay.unlink()  # the admin revokes it (git revert of its only rule)
            reload = service.ask("reload")
            assert reload.returncode == 0, reload.stderr
            (task.steps_dir / "go").touch()

            def asked_or_done():
                fresh = [a for a in _pending(service) if a["id"] != first["id"]]
                return fresh or (task.steps_dir / "after.rc").exists()

            outcome = eventually(asked_or_done, timeout=30)
            if isinstance(outcome, list):
                for a in outcome:
                    service.ask("approvals", "deny", a["id"])
        finally:
            result = task.finish()
        assert result["held"].status == 200, result.describe()
        seen = [r["uri"] for r in fakenet.requests_seen()]
        assert isinstance(outcome, list), (
            f"after the always rule was removed the task was not asked again: 'after' got "
            f"{result['after'].status}, upstream saw {seen}; "
            f"events: {service.events(kind='request', path='/after-revoked')}"
        )
        assert "/after-revoked" not in seen
    finally:
        service.stop()
