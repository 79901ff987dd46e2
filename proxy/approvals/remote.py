"""A gateway worker's approvals, decided from the service (`sandgate gateway --workers
N`): the worker keeps what it holds (its `Approvals`: the held sockets are its own),
the service keeps the one list humans see (enforcer/worker_approvals.py).

Over the worker's link (proxy/worker_link.py) this sends, as notifications:

    {"op": "approval", "what": WHAT, "approval": Pending.to_dict()}

for every change `Approvals.subscribe` reports (new, approved, denied, expired,
task_ended) and, as `what: "held"`, whenever a connection starts or stops waiting
(the `held` and `asks` counts of the list); the worker's events are flushed first, so
that the audit log has an approval's event before anyone can see the approval. It
answers the requests

    approve {approval_id, approver, scope, duration?, ticket?, expires?, widen?}
                                          -> {approval} | {refused}
    deny {approval_id, approver}          -> {approval} | {refused}
    grant {approval}: a duration approval decided in another worker -> {}

(`approval_id`, not `id`, which the link's requests use; `refused`: the one-line ApprovalError the in-process gateway would raise), and asks
the service `always {approval, approver, expires}` -> {} | {refused}: append the rule
to approved.yaml and reload every worker (the service's job, `on_always`) before the
held connections here are released.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.approvals.pending import ApprovalError, Pending, Scope, spread_ids
from sandgate.proxy.worker_link import Link, LinkClosed


class ApprovalsOverLink:
    def __init__(
        self,
        approvals: Approvals,
        link: Link,
        *,
        index: int = 0,
        count: int = 1,
        before_send: Callable[[], None] = lambda: None,
    ):
        """`index` of `count` workers: this worker's ids (`spread_ids`); `before_send`:
        flush the worker's pending events."""
        self.approvals = approvals
        self.link = link
        self.before_send = before_send
        approvals.store.new_id = spread_ids(index, count)
        approvals.subscribe(self._send)
        approvals.on_held = lambda found: self._send("held", found.to_dict(approvals.clock()))
        approvals.on_always = self._always

    def _send(self, what: str, record: dict) -> None:
        self.before_send()
        with contextlib.suppress(LinkClosed):  # the service is gone: so is this worker soon
            self.link.send({"op": "approval", "what": what, "approval": record})

    async def _always(self, found: Pending, approver: str, expires: str | None) -> None:
        # The approval's `approval_granted` event goes first: the service takes it into
        # its audit journal before it writes the rule (the link is read in order).
        self.before_send()
        # No timeout of our own: given up here while the service goes on writing, the
        # approval would be refused with its rule in force. The service bounds its work
        # (the overlay lock, the reload); a dead service ends the link (LinkClosed).
        reply = await self.link.request(
            "always",
            timeout=None,
            approval=found.to_dict(self.approvals.clock()),
            approver=approver,
            expires=expires,
        )
        if reply.get("refused"):
            raise ApprovalError(str(reply["refused"]))

    # --- requests from the service -----------------------------------------------------

    async def op_approve(self, message: dict) -> dict:
        duration = message.get("duration")
        try:
            record = await self.approvals.approve(
                str(message["approval_id"]),
                str(message["approver"]),
                Scope(message.get("scope", "once")),
                duration=float(duration) if duration is not None else None,
                ticket=message.get("ticket"),
                expires=message.get("expires"),
                widen=message.get("widen"),
                seen=message.get("seen"),
            )
        except ApprovalError as e:
            return {"refused": str(e)}
        return {"approval": record}

    async def op_deny(self, message: dict) -> dict:
        try:
            return {
                "approval": await self.approvals.deny(
                    str(message["approval_id"]), str(message["approver"])
                )
            }
        except ApprovalError as e:
            return {"refused": str(e)}

    async def op_grant(self, message: dict) -> dict:
        found = Pending.from_dict(message["approval"], self.approvals.clock())
        if found.scope is not Scope.DURATION or found.until is None:
            raise ValueError(f"grant: approval {found.id} is not a duration approval")
        self.approvals.store.adopt_grant(found)
        return {}
