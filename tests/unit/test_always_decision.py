"""`always` is one decision (rt45 F5): taken (DECIDING) before its rule is written,
recorded (`approval_granted`) before it is written, then committed or, if the rule
cannot be put in force, aborted (pending again, the grant withdrawn in an event).
Whatever the approver is told agrees with the rule file and the audit."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from sandgate.enforcer.approvals_control import always_writer, handle
from sandgate.enforcer.worker_approvals import WorkerApprovals
from sandgate.proxy.approvals.holder import Answer, Approvals
from sandgate.proxy.approvals.pending import ApprovalError, AskKey, PendingStore, Scope, State
from sandgate.proxy.policy import Reason, Verdict
from sandgate.proxy.policy.model import ApprovalSettings
from sandgate.proxy.worker_link import LinkClosed

SETTINGS = ApprovalSettings(hold=5, expire_pending=60, max_pending_per_sandbox=5)


def key(name="a.example.test", task="t1") -> AskKey:
    return AskKey.make(
        task_id=task, sandbox="10.213.0.2", profile="p", name=name, port=443, protocol="tls"
    )


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the state table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(lambda s, i: s.deny(i, "uid 2"), id="deny"),
        pytest.param(lambda s, i: s.approve(i, "uid 2", Scope.ONCE), id="approve-once"),
        pytest.param(lambda s, i: s.approve(i, "uid 2", Scope.ALWAYS), id="approve-always"),
        pytest.param(lambda s, i: s.begin(i, "uid 2"), id="begin-again"),
    ],
)
def test_an_always_being_decided_refuses_every_other_decision(step):
    clock = Clock()
    s = PendingStore(clock)
    found, _ = s.ask(key(), expire_pending=60, max_pending=5)
    s.begin(found.id, "uid 1 (alice)")
    with pytest.raises(ApprovalError, match=r"is being approved \(always\) by uid 1 \(alice\)"):
        step(s, found.id)
    assert found.state is State.DECIDING and s.list() == [found]


def test_an_always_being_decided_does_not_expire_and_commits_or_aborts():
    clock = Clock()
    s = PendingStore(clock)
    found, _ = s.ask(key(), expire_pending=60, max_pending=5)
    s.begin(found.id, "uid 1", ticket="T-1")
    clock.now += 120
    assert s.expire() == [] and found.state is State.DECIDING
    s.abort(found.id)
    assert (found.state, found.scope, found.ticket, found.approver) == (
        State.PENDING,
        None,
        None,
        None,
    )
    assert [p.id for p in s.expire()] == [found.id]  # undecided again: it expires

    other, _ = s.ask(key("b.example.test"), expire_pending=60, max_pending=5)
    s.begin(other.id, "uid 1")
    s.join(other)  # joined meanwhile: the decision was taken on revision 0
    done = s.commit(other.id)
    assert (done.state, done.scope, done.approver) == (State.APPROVED, Scope.ALWAYS, "uid 1")
    assert s.grant_for(key("b.example.test")).approved


def test_seen_is_checked_when_the_always_is_taken():
    s = PendingStore(Clock())
    found, _ = s.ask(key(), expire_pending=60, max_pending=5)
    s.join(found)
    with pytest.raises(ApprovalError, match="changed since it was shown"):
        s.begin(found.id, "uid 1", seen=0)
    assert found.state is State.PENDING


# --- the holder: recorded before written, committed or withdrawn ---------------------------


def _scenario(tmp_path, reload, during=None):
    """Approve `always` the held ask while `during(approvals, id)` runs in the reload:
    (the approver's reply, what `during` got, the events, the held answer)."""
    events = []
    overlay = tmp_path / "approved.yaml"

    async def scenario():
        approvals = Approvals(events.append, lambda profile: SETTINGS)
        seen_in_reload = []

        async def reloading(actor):
            # the rule is written by now, and its grant recorded before that
            seen_in_reload.append(
                [e.reason for e in events]
                + [overlay.exists() and "approved:" in overlay.read_text()]
            )
            if during is not None:
                seen_in_reload.append(await during(approvals, held_id))
            return await reload(actor)

        approvals.on_always = always_writer(overlay, reloading)
        held = asyncio.ensure_future(approvals.hold(key(), "r", {}))
        await asyncio.sleep(0.01)
        (pending,) = approvals.list()
        held_id = pending["id"]
        reply = await handle(
            approvals, {"cmd": "approve", "id": held_id, "scope": "always"}, "uid 1"
        )
        if reply["ok"]:
            answer = await held
        else:
            held.cancel()
            answer = None
        return reply, seen_in_reload, answer, approvals.get(held_id)

    reply, seen, answer, record = asyncio.run(scenario())
    return reply, seen, events, answer, record


async def _ok(actor):
    return []


def test_the_grant_is_recorded_before_the_rule_is_written_and_released_after(tmp_path):
    async def deny(approvals, pending_id):
        return await handle(approvals, {"cmd": "deny", "id": pending_id}, "uid 2")

    reply, seen, events, answer, record = _scenario(tmp_path, _ok, deny)
    assert reply["ok"] and record["state"] == "approved", reply
    before, denied = seen
    assert before == [Reason.APPROVAL_REQUESTED, Reason.APPROVAL_GRANTED, True]
    assert not denied["ok"] and "is being approved (always) by uid 1" in denied["error"]
    assert answer.answer is Answer.GRANTED
    granted = [e for e in events if e.reason is Reason.APPROVAL_GRANTED]
    assert len(granted) == 1 and granted[0].verdict is Verdict.ALLOW
    assert granted[0].scope == "always" and "approved:" in granted[0].detail


@pytest.mark.parametrize(
    "reload",
    [
        pytest.param(lambda: ["rules.yaml:3:5: broken"], id="reload-errors"),
        pytest.param(lambda: 1 / 0, id="reload-raises"),
    ],
)
def test_an_always_that_cannot_be_put_in_force_is_withdrawn_and_stays_pending(tmp_path, reload):
    async def failing(actor):
        if "taken back" in actor:
            return []
        return reload()

    reply, _, events, _, record = _scenario(tmp_path, failing)
    assert not reply["ok"] and "did not load" in reply["error"], reply
    assert record["state"] == "pending" and record["approver"] is None
    overlay = tmp_path / "approved.yaml"
    assert not overlay.exists() or "approved:" not in overlay.read_text()
    withdrawn = events[-1]
    assert (withdrawn.reason, withdrawn.verdict) == (Reason.APPROVAL_PENDING, Verdict.ASK)
    assert "is withdrawn, its rule not in force" in withdrawn.detail


# --- with workers: a worker that dies once the service put the rule in force -------------


def test_a_worker_dying_after_its_always_rule_is_in_force_is_an_approval_not_a_refusal(tmp_path):
    async def scenario():
        mirror: WorkerApprovals

        async def ask(worker, op, fields):
            # the worker asks the service to persist, which succeeds; then it dies
            record = {**mirror.pending[fields["approval_id"]].record, "state": "deciding"}
            reply = await mirror.persist_always(
                {"approval": record, "approver": fields["approver"], "expires": None}
            )
            assert reply == {}
            mirror.worker_gone(worker, "gateway worker 0 (pid 1) died")
            raise LinkClosed

        mirror = WorkerApprovals(ask, 2)
        overlay = tmp_path / "approved.yaml"
        mirror.on_always = always_writer(overlay, _ok)
        store = PendingStore(Clock())
        found, _ = store.ask(key(), expire_pending=60, max_pending=5)
        mirror.changed(0, "new", found.to_dict(1000.0))
        reply = await handle(mirror, {"cmd": "approve", "id": found.id, "scope": "always"}, "u")
        return reply, mirror.get(found.id), overlay.read_text()

    reply, record, overlay = asyncio.run(scenario())
    assert reply["ok"] and record["state"] == "approved", reply
    assert f"approved:{record['id']}" in yaml.safe_dump(yaml.safe_load(overlay))


# --- a gateway killed while the rule is written and loaded ----------------------------------


@pytest.mark.parametrize("written", [True, False])
def test_a_kill_while_the_rule_is_written_is_reported_at_the_next_start(tmp_path, capsys, written):
    """The record of the always being written outlives a killed gateway; the next start
    (always_writer) says what came of it, whether the rule made it into the file or not,
    and removes the record."""
    overlay, intents = tmp_path / "approved.yaml", tmp_path / "state"

    async def scenario():
        approvals = Approvals(lambda event: None, lambda profile: SETTINGS)
        stuck = asyncio.Event()

        async def reload(actor):
            stuck.set()
            await asyncio.sleep(3600)  # killed here

        approvals.on_always = always_writer(overlay, reload, intents)
        asyncio.ensure_future(approvals.hold(key(), "r", {}))
        await asyncio.sleep(0.01)
        (pending,) = approvals.list()
        deciding = asyncio.ensure_future(approvals.approve(pending["id"], "uid 1", Scope.ALWAYS))
        await stuck.wait()
        deciding.cancel()  # as a SIGKILL would leave it: the record stays
        return pending["id"]

    approval_id = asyncio.run(scenario())
    (left,) = intents.iterdir()
    if not written:
        overlay.unlink()  # killed before the rename
    capsys.readouterr()
    always_writer(overlay, _ok, intents)  # the next start
    err = capsys.readouterr().err
    assert f"approval {approval_id} (a.example.test:443 (tls), always, by uid 1 at " in err
    if written:
        assert f"its rule approved:{approval_id} is in {overlay} and in force" in err
    else:
        assert f"its rule approved:{approval_id} is not in {overlay}: nothing of it" in err
    assert not left.exists()
    always_writer(overlay, _ok, intents)
    assert capsys.readouterr().err == ""


def test_an_approved_yaml_that_cannot_be_read_leaves_no_record_of_a_rule_being_written(
    tmp_path, capsys
):
    """approved.yaml that is not UTF-8 (edited by hand): the always is refused in one
    line, and no record says a rule was being written (the next start said so, falsely)."""
    overlay, intents = tmp_path / "approved.yaml", tmp_path / "state"
    overlay.write_bytes(b"version: 1\n# caf\xe9\n")

    async def scenario():
        approvals = Approvals(lambda event: None, lambda profile: SETTINGS)
        approvals.on_always = always_writer(overlay, _ok, intents)
        asyncio.ensure_future(approvals.hold(key(), "r", {}))
        await asyncio.sleep(0.01)
        (pending,) = approvals.list()
        return await handle(
            approvals, {"cmd": "approve", "id": pending["id"], "scope": "always"}, "uid 1"
        )

    reply = asyncio.run(scenario())
    assert reply["ok"] is False and "cannot be updated" in reply["error"], reply
    assert not intents.exists() or not any(intents.iterdir())
    capsys.readouterr()
    always_writer(overlay, _ok, intents)  # the next start: nothing to report
    assert capsys.readouterr().err == ""
