"""A connection a human approved meets a reload as one a rule allowed does.

What was wrong (red team `trail`, session 50): a reload that adds a path deny closes
a relayed (pass-through) TLS connection a *rule* allowed (builtin:policy-changed: "a
rule now checks HTTP methods or paths here, which a relayed connection cannot be held
to"), but not one a *human's approval* let through: gate._denial_under_new_policy
returned early for an approved connection ("the human's answer stands") before the
pass-through check, and the task sent the newly denied path through its uninspected
tunnel. A connection still held at the reload was released after the approval on the
decision made under the old rules, and relayed likewise.

What holds now: an approved connection is decided again with the checks a
rule-allowed one gets; the approval answers only the question the policy still asks
(gate._denial_under_new_policy), and a held connection is decided under the policy in
force at its answer (gate._answered_now): inspected, so the deny holds. Unit variants
(each scope, raw TCP, a deny, a rule that allows now): tests/unit/test_gate_approvals.py."""

from __future__ import annotations

import pytest
from support.sandbox import curl, eventually, python
from support.service import GatewayProcess
from test_approvals_e2e import Task

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 25s}
    rules:
      - RULE: allowed.test
        id: the-rule
      - deny: evil.test
"""
PATH_DENY = '      - deny: allowed.test\n        paths: ["/admin/**"]\n        id: never-admin\n'

# One TLS connection: GET /, then (after the test's go) GET /admin/secret on it.
KEEP_ALIVE = python("""
    import http.client, os, time
    c = http.client.HTTPSConnection("allowed.test", 443, timeout=40)
    c.request("GET", "/")
    r = c.getresponse(); r.read()
    print("first", r.status, flush=True)
    open("first-done", "w").close()
    while not os.path.exists("go"):
        time.sleep(0.1)
    try:
        c.request("GET", "/admin/secret")
        r = c.getresponse(); r.read()
        print("second", r.status, flush=True)
    except Exception as e:
        print("second failed", type(e).__name__, e, flush=True)
""")


@pytest.mark.parametrize("how", ["approved", "allowed"])
def test_a_reload_adding_a_path_deny_closes_a_relayed_connection(fakenet, tmp_path, how):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("RULE", "ask" if how == "approved" else "allow"))
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        task = Task(service, tmp_path, {"keep": KEEP_ALIVE})
        try:
            if how == "approved":
                asked = task.held()
                assert asked["protocol"] == "tls", asked
                approved = service.ask("approvals", "approve", asked["id"], "--task")
                assert approved.returncode == 0, approved.stderr
            assert eventually(lambda: (task.steps_dir / "first-done").exists(), timeout=30)
            rules.write_text(rules.read_text() + PATH_DENY)
            reload = service.ask("reload")
            assert reload.returncode == 0, reload.stderr
            (task.steps_dir / "go").touch()
        finally:
            result = task.finish()
        out = result["keep"].stdout if hasattr(result["keep"], "stdout") else ""
        served = [r["uri"] for r in fakenet.requests_seen()]
        assert served[:1] == ["/"], (served, result.describe())
        revoked = service.events(kind="connection", reason="policy_changed")
        assert "/admin/secret" not in served, (
            f"{how}: the reload's new deny of /admin/** did not hold on the open relayed "
            f"connection: the server got {served}; policy_changed events: {revoked}; "
            f"task: {out} {result.describe()}"
        )
        assert revoked and "a rule now checks HTTP methods or paths" in revoked[0]["detail"], (
            revoked
        )
    finally:
        service.stop()


# Both requests on one connection (curl reuses it for the same host), after the
# approval: GET / then GET /admin/secret.
INSPECTS_ELSEWHERE = "      - deny: other.test\n        methods: [POST]\n"
BOTH = curl("https://allowed.test/", "https://allowed.test/admin/secret", timeout=40)


def test_a_connection_held_across_a_reload_that_adds_a_path_deny_is_not_relayed_after_approval(
    fakenet, tmp_path
):
    """The reload comes while the TLS connection is held at its ClientHello (decided
    pass-through under the old rules); the human then approves it. The new rules check
    paths for allowed.test, so it must be inspected (or closed), never relayed."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    # A rule that inspects elsewhere, so that the task trusts the gateway's CA from its
    # start (a task attached to a profile that inspects nothing is given none).
    rules.write_text(RULES.replace("RULE", "ask") + INSPECTS_ELSEWHERE)
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        task = Task(service, tmp_path, {"both": BOTH})
        try:
            asked = task.held()
            assert asked["protocol"] == "tls", asked
            rules.write_text(rules.read_text() + PATH_DENY)
            reload = service.ask("reload")
            assert reload.returncode == 0, reload.stderr
            approved = service.ask("approvals", "approve", asked["id"], "--task")
            assert approved.returncode == 0, approved.stderr
        finally:
            result = task.finish()
        served = [r["uri"] for r in fakenet.requests_seen()]
        assert "/admin/secret" not in served, (
            f"the held connection was relayed after a reload that made allowed.test "
            f"inspected: the server got {served}; {result.describe()}"
        )
        # Approved, and inspected under the rules in force at the answer: the first
        # request is served, the denied path is refused by the new rule.
        assert served == ["/"], (served, result.describe())
        (answered,) = service.events(kind="connection", approval_id=asked["id"])
        assert answered["reason"] == "approval_granted", answered
        (refused,) = service.events(kind="request", path="/admin/secret")
        assert (refused["reason"], refused["rule_id"]) == ("rule_deny", "never-admin"), refused
    finally:
        service.stop()
