"""Approvals over gateway workers (enforcer/worker_approvals.py): the service's one list
over two fake workers, each a real `Approvals` behind a real link
(proxy/approvals/remote.py), as proxy/worker.py wires it, without processes."""

from __future__ import annotations

import asyncio
import re
import socket
import types

import pytest
from sandgate.enforcer.approvals_control import handle
from sandgate.enforcer.worker_approvals import WorkerApprovals
from sandgate.proxy.approvals.holder import Answer, Approvals
from sandgate.proxy.approvals.pending import ApprovalError, AskKey, Scope, spread_ids
from sandgate.proxy.approvals.remote import ApprovalsOverLink
from sandgate.proxy.policy import load_policy
from sandgate.proxy.policy.model import ApprovalSettings
from sandgate.proxy.policy.reasons import Reason
from sandgate.proxy.telemetry.metrics import Metrics
from sandgate.proxy.worker_link import Link

SETTINGS = ApprovalSettings(hold=5.0, expire_pending=60, max_pending_per_sandbox=5)
ROOT = "uid 0 (root)"


def key(task: str, name: str = "allowed.test", sandbox: str = "10.0.0.2") -> AskKey:
    return AskKey.make(
        task_id=task, sandbox=sandbox, profile="default", name=name, port=443, protocol="tls"
    )


class Service:
    """The mirror and two workers, linked as the pool links them."""

    def __init__(self):
        self.mirror = WorkerApprovals(self._ask, 2)
        self.events = [[], []]
        self.workers: list[Approvals] = []
        self.links: list[Link] = []  # the service's ends
        self.worker_links: list[Link] = []
        self.changes: list[tuple[str, str]] = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> Service:
        for index in range(2):
            approvals = Approvals(self.events[index].append, lambda profile: SETTINGS)
            ours, theirs = socket.socketpair()
            remote: list[ApprovalsOverLink] = []
            worker_link = await Link.over(
                theirs, lambda m, remote=remote: getattr(remote[0], f"op_{m['op']}")(m)
            )
            link = await Link.over(ours, lambda m, i=index: self._handle(i, m))
            remote.append(ApprovalsOverLink(approvals, worker_link, index=index, count=2))
            approvals.start()
            self.workers.append(approvals)
            self.links.append(link)
            self.worker_links.append(worker_link)
            self.tasks += [asyncio.create_task(link.run()), asyncio.create_task(worker_link.run())]
        self.mirror.subscribe(lambda what, record: self.changes.append((what, record["id"])))
        return self

    async def _ask(self, index: int, op: str, fields: dict) -> dict:
        return await self.links[index].request(op, timeout=None, **fields)

    def _handle(self, index: int, message: dict):  # as WorkerPool._handle
        if message["op"] == "approval":
            self.mirror.changed(index, message["what"], message["approval"])
            return None
        return self.mirror.persist_always(message)

    async def stop(self) -> None:
        for approvals in self.workers:
            await approvals.stop()
        for link in self.links + self.worker_links:
            link.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def with_service(scenario) -> None:
    """Run `scenario(service)` over a started Service, stopped after."""

    async def main():
        service = await Service().start()
        try:
            await scenario(service)
        finally:
            await service.stop()

    asyncio.run(main())


async def _until(probe, timeout: float = 5.0):
    async with asyncio.timeout(timeout):
        while not (found := probe()):
            await asyncio.sleep(0.005)
    return found


def test_ids_of_different_workers_never_meet():
    ids = [spread_ids(index, 3)() for index in (0, 1, 2) for _ in range(50)]
    assert all(len(i) == 8 and int(i, 16) % 3 == n // 50 for n, i in enumerate(ids))


def test_one_list_over_two_workers_each_decision_reaches_the_worker_that_holds_it():
    async def scenario(service):
        first = asyncio.create_task(service.workers[0].hold(key("t1"), "ask-web", {}))
        second = asyncio.create_task(
            service.workers[1].hold(key("t2", sandbox="10.0.0.3"), "ask-web", {})
        )
        listed = await _until(
            lambda: (
                len(service.mirror.list()) == 2
                and all(a["held"] == 1 for a in service.mirror.list())
                and service.mirror.list()
            )
        )
        assert {a["task_id"] for a in listed} == {"t1", "t2"}
        one = next(a["id"] for a in listed if a["task_id"] == "t1")
        two = next(a["id"] for a in listed if a["task_id"] == "t2")
        assert int(one, 16) % 2 == 0 and int(two, 16) % 2 == 1
        # The metrics read the mirror: two pending.
        assert len(service.mirror.store.list()) == 2

        reply = await handle(service.mirror, {"cmd": "approve", "id": one}, ROOT)
        assert reply["ok"] and reply["approval"]["state"] == "approved"
        assert (await first).answer is Answer.GRANTED
        assert not second.done()  # the other worker's hold goes on
        assert [a["id"] for a in service.mirror.list()] == [two]

        reply = await handle(service.mirror, {"cmd": "deny", "id": two}, ROOT)
        assert reply["ok"] and reply["approval"]["approver"] == ROOT
        assert (await second).answer is Answer.DENIED

        again = await handle(service.mirror, {"cmd": "deny", "id": one}, ROOT)
        assert again == {
            "ok": False,
            "error": f"deny: approval {one} was already approved (once) by {ROOT}: "
            "the first decision stands",
        }
        unknown = await handle(service.mirror, {"cmd": "approve", "id": "nosuchid"}, ROOT)
        assert unknown["error"] == "approve: no approval 'nosuchid' (see: sandgate approvals list)"
        assert [a["id"] for a in service.mirror.recent()] == [two, one]
        assert service.mirror.get(one)["state"] == "approved"
        # Subscribers saw each change once, not the held counts.
        assert sorted(service.changes) == sorted(
            [("new", one), ("new", two), ("approved", one), ("denied", two)]
        )
        # Each worker's events stayed its own: one request and one decision each.
        for events in service.events:
            assert [e.reason for e in events if e.kind.value == "approval"] in (
                [Reason.APPROVAL_REQUESTED, Reason.APPROVAL_GRANTED],
                [Reason.APPROVAL_REQUESTED, Reason.APPROVAL_DENIED],
            )

    with_service(scenario)


def test_a_duration_approval_holds_in_every_worker_and_is_kept_for_a_restarted_one():
    async def scenario(service):
        held = asyncio.create_task(service.workers[0].hold(key("t1"), "ask-web", {}))
        (asked,) = await _until(service.mirror.list)
        other_task = key("t9", sandbox="10.0.0.9")
        assert service.workers[1].granted(other_task) is None
        reply = await handle(
            service.mirror,
            {"cmd": "approve", "id": asked["id"], "scope": "duration", "duration": 60},
            ROOT,
        )
        assert reply["ok"], reply
        assert (await held).answer is Answer.GRANTED
        found = await _until(lambda: service.workers[1].granted(other_task))
        assert found.answer is Answer.GRANTED and found.pending.id == asked["id"]
        # Another destination is still asked about.
        assert service.workers[1].granted(key("t9", name="other.test")) is None
        assert [g["id"] for g in service.mirror.live_grants()] == [asked["id"]]

    with_service(scenario)


def test_always_is_the_services_to_write_and_its_refusal_reaches_the_approver():
    async def scenario(service):
        written = []

        async def on_always(found, approver, expires):
            if found.ticket == "T-bad":
                raise ApprovalError("the approved rule did not load: rules.yaml:3:1: boom")
            written.append((found.id, found.key.name, found.ticket, approver, expires))

        service.mirror.on_always = on_always
        held = asyncio.create_task(service.workers[1].hold(key("t1"), "ask-web", {}))
        (asked,) = await _until(service.mirror.list)
        refused = await handle(
            service.mirror,
            {"cmd": "approve", "id": asked["id"], "scope": "always", "ticket": "T-bad"},
            ROOT,
        )
        assert refused == {
            "ok": False,
            "error": "approve: the approved rule did not load: rules.yaml:3:1: boom",
        }
        assert written == [] and service.mirror.get(asked["id"])["state"] == "pending"
        reply = await handle(
            service.mirror,
            {"cmd": "approve", "id": asked["id"], "scope": "always", "ticket": "T-1"},
            ROOT,
        )
        assert reply["ok"] and reply["approval"]["scope"] == "always"
        assert written == [(asked["id"], "allowed.test", "T-1", ROOT, None)]
        assert (await held).answer is Answer.GRANTED

    with_service(scenario)


def test_a_worker_that_dies_takes_its_approvals_and_a_decision_for_them_is_an_error():
    async def scenario(service):
        async def on_always(found, approver, expires):  # the worker dies during the reload
            service.worker_links[1].close()
            await asyncio.Event().wait()  # which never ends

        service.mirror.on_always = on_always
        asyncio.create_task(service.workers[0].hold(key("t1"), "ask-web", {}))
        asyncio.create_task(service.workers[1].hold(key("t2", sandbox="10.0.0.3"), "r", {}))
        listed = await _until(lambda: len(service.mirror.list()) == 2 and service.mirror.list())
        kept, lost = sorted(listed, key=lambda a: a["task_id"])
        with pytest.raises(ApprovalError, match="stopped before it answered"):
            await service.mirror.approve(lost["id"], ROOT, Scope.ALWAYS)
        why = "gateway worker 1 (pid 7), which held it, exited with signal SIGKILL"
        service.mirror.worker_gone(1, why)
        assert [a["id"] for a in service.mirror.list()] == [kept["id"]]
        assert ("gone", lost["id"]) in service.changes
        with pytest.raises(ApprovalError, match=re.escape(f"approval {lost['id']} is gone: {why}")):
            await service.mirror.deny(lost["id"], ROOT)
        reply = await handle(service.mirror, {"cmd": "deny", "id": kept["id"]}, ROOT)
        assert reply["ok"]  # the other worker decides as before

    with_service(scenario)


def test_the_metrics_count_every_workers_pending_approvals(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nprofiles:\n  default:\n    fallback: ask\n")
    policy = load_policy([rules])

    async def scenario(service):
        for index in (0, 1):
            task = key(f"t{index}", sandbox=f"10.0.0.{index + 2}")
            asyncio.create_task(service.workers[index].hold(task, "r", {}))
        await _until(lambda: len(service.mirror.list()) == 2)
        metrics = Metrics()
        metrics.watch_gateway(
            types.SimpleNamespace(policy=policy, registry=(), approvals=service.mirror)
        )
        values = {
            s.name: s.value
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name.startswith("sandgate_approval")
        }
        assert values["sandgate_approvals_pending"] == 2
        assert 0 <= values["sandgate_approval_oldest_pending_seconds"] < 5

    with_service(scenario)
