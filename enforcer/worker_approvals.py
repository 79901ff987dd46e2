"""The service's approvals with `--workers N`: one list for humans over N workers' holds.

Each worker holds its sandboxes' connections and requests in its own `Approvals`
(the sockets are its) and reports every change over its link
(proxy/approvals/remote.py). `WorkerApprovals` mirrors what they report and stands in
for `Approvals` where the control socket (enforcer/approvals_control.py), the admin
page and API, the webhooks and the metrics use one: `list`, `recent`, `get`,
`approve`, `deny`, `subscribe`, `clock`, `store.list`, `on_always`.

- **Ids** are unique across workers (each hands out its own residue class,
  `pending.spread_ids`), so the mirror is keyed by id and knows each one's worker.
- **Deciding** goes to the worker that holds the approval and waits for its answer:
  the same record or the same one-line ApprovalError as in one process. A worker
  that dies takes its held connections with it: the mirror drops its approvals (a
  `gone` change) and a decision for one, or one waiting for the dead worker's
  answer, is a clear ApprovalError, never a hang.
- **`--for` (a duration)** grants the destination to every task of the profile, in
  whichever worker: a duration approval is passed on to the other workers (`grant`),
  and to a worker that starts again (`grants`), until it runs out.
- **`--always`** writes approved.yaml and reloads: the owning worker asks the service
  (`persist_always`, with the service's `on_always`), whose reload reaches every
  worker, before it releases its held connections.
- **Subscribers** (watch, the page's pushed refreshes, the webhooks) see every
  worker's changes once; a worker's `held` counts update the list silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sandgate.proxy.approvals.holder import Subscriber
from sandgate.proxy.approvals.pending import (
    RECENT,
    ApprovalError,
    Pending,
    Scope,
    decided_before,
    unknown,
)
from sandgate.proxy.worker_link import LinkClosed

log = logging.getLogger("sandgate.approvals")

# A decision may wait for a reload of every worker (`always`); a dead worker answers at
# once (LinkClosed). This bounds only a stuck one.
DECIDE_TIMEOUT = 600.0
DECIDED = ("approved", "denied", "expired")

Ask = Callable[[int, str, dict], Awaitable[dict]]
"""`ask(worker index, op, fields)`: a request to one worker and its reply; raises
LinkClosed (the worker went away), RuntimeError (it failed) or TimeoutError."""


@dataclass
class Mirrored:
    """A worker's pending approval as it last reported it (`stamp`: when, on `clock`)."""

    worker: int
    record: dict
    stamp: float

    @property
    def created(self) -> float:  # what the metrics read of a pending approval
        return float(self.record["created"])

    def now(self, now: float) -> dict:
        """The record with its times as of `now` (the workers' clock is the same
        system-wide monotonic clock as the service's)."""
        left = self.record.get("expires_in_s")
        return {
            **self.record,
            "waiting_s": round(now - self.created, 1),
            "expires_in_s": round(max(0.0, left - (now - self.stamp)), 1)
            if left is not None
            else None,
        }


class _PendingView:
    """`approvals.store.list()` as the metrics read it: pending, oldest first."""

    def __init__(self, mirror: WorkerApprovals):
        self.mirror = mirror

    def list(self) -> list[Mirrored]:
        return sorted(self.mirror.pending.values(), key=lambda m: m.created)


class WorkerApprovals:
    def __init__(self, ask: Ask, count: int, clock: Callable[[], float] = time.monotonic):
        self.ask = ask
        self.count = count
        self.clock = clock
        self.pending: dict[str, Mirrored] = {}
        self.decided: OrderedDict[str, dict] = OrderedDict()  # by id, newest last (bounded)
        self.recent_records: deque[dict] = deque(maxlen=RECENT)
        self.gone: OrderedDict[str, str] = OrderedDict()  # id -> why it went (bounded)
        self.grants: dict[str, dict] = {}  # live duration approvals, by id
        # `always` approvals whose rule the service put in force (by id, bounded): a
        # worker that dies before it answers leaves an approval that is in force.
        self.persisted: OrderedDict[str, dict] = OrderedDict()
        self.store = _PendingView(self)
        # The service's: append an `always` rule and reload (approvals_control.always_writer).
        self.on_always: Callable[[Pending, str, str | None], Awaitable[None]] | None = None
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Nothing runs here: each worker expires its own approvals."""

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # --- what the workers report ----------------------------------------------------------

    def changed(self, worker: int, what: str, record: dict) -> None:
        """Worker `worker` reports a change (`what`: new, held, task_ended, approved,
        denied, expired) of `record` (Pending.to_dict)."""
        pending_id = str(record["id"])
        now = self.clock()
        if what == "held":  # a count, told nobody; a late one of a decided approval is stale
            if pending_id in self.pending and record.get("state") in ("pending", "deciding"):
                self.pending[pending_id] = Mirrored(worker, record, now)
            return
        if what in DECIDED:
            self.pending.pop(pending_id, None)
            self._remember(pending_id, record)
            self.recent_records.append(record)
            if record.get("scope") == str(Scope.DURATION) and record.get("until"):
                self.grants[pending_id] = record
                for other in range(self.count):
                    if other != worker:
                        self._spawn(self._grant(other, record))
        else:
            self.pending[pending_id] = Mirrored(worker, record, now)
        self._notify(what, record if what in DECIDED else self.pending[pending_id].now(now))

    def worker_gone(self, worker: int, why: str) -> None:
        """Worker `worker` died (`why`): the connections it held went with it, so do its
        approvals (a `gone` change each); deciding one later says why."""
        for pending_id, entry in list(self.pending.items()):
            if entry.worker == worker:
                del self.pending[pending_id]
                self.gone[pending_id] = why
                while len(self.gone) > 4 * RECENT:
                    self.gone.popitem(last=False)
                self._notify("gone", entry.now(self.clock()))

    def live_grants(self) -> list[dict]:
        """Duration approvals still running: what a (re)started worker must be given."""
        now = self.clock()
        for pending_id, record in list(self.grants.items()):
            if float(record["until"]) <= now:
                del self.grants[pending_id]
        return list(self.grants.values())

    async def persist_always(self, message: dict) -> dict:
        """A worker's `always` request: the service's `on_always` (append, reload every
        worker); `refused` carries its one-line error to the worker's approve."""
        if self.on_always is None:
            return {"refused": "this gateway has no rule file to add to (--always needs --rules)"}
        found = Pending.from_dict(message["approval"], self.clock())
        try:
            await self.on_always(found, str(message["approver"]), message.get("expires"))
        except ApprovalError as e:
            return {"refused": str(e)}
        self.persisted[found.id] = {
            **message["approval"],
            "state": "approved",
            "approver": str(message["approver"]),
            "scope": str(Scope.ALWAYS),
            "waiting_s": round(self.clock() - found.created, 1),
            "expires_in_s": None,
        }
        while len(self.persisted) > 4 * RECENT:
            self.persisted.popitem(last=False)
        return {}

    # --- what humans ask (as of proxy/approvals/holder.Approvals) -------------------------------

    def list(self) -> list[dict]:
        now = self.clock()
        return [entry.now(now) for entry in self.store.list()]

    def recent(self) -> list[dict]:
        return list(reversed(self.recent_records))

    def get(self, pending_id: str) -> dict:
        entry = self.pending.get(pending_id)
        if entry is not None:
            return entry.now(self.clock())
        if pending_id in self.decided:
            return self.decided[pending_id]
        raise self._not_pending(pending_id)

    async def approve(self, pending_id: str, approver: str, scope: Scope, **options) -> dict:
        """As `Approvals.approve` (options: duration, ticket, expires, widen), in the
        worker that holds the approval."""
        return await self._decide(pending_id, "approve", approver, {"scope": str(scope), **options})

    async def deny(self, pending_id: str, approver: str) -> dict:
        return await self._decide(pending_id, "deny", approver, {})

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    # --- helpers ---------------------------------------------------------------------------------

    async def _decide(self, pending_id: str, op: str, approver: str, fields: dict) -> dict:
        entry = self.pending.get(pending_id)
        if entry is None:
            raise self._not_pending(pending_id)
        worker = entry.worker
        try:
            reply = await asyncio.wait_for(
                self.ask(worker, op, {"approval_id": pending_id, "approver": approver, **fields}),
                DECIDE_TIMEOUT,
            )
        except LinkClosed:
            if op == "approve" and pending_id in self.persisted:
                return self._in_force(pending_id, worker)
            raise ApprovalError(
                f"approval {pending_id}: gateway worker {worker}, which held it, stopped before "
                "it answered; its held connections are gone (the task asks again if it retries)"
            ) from None
        except RuntimeError as e:
            raise ApprovalError(
                f"approval {pending_id}: gateway worker {worker} did not decide: {e}"
            ) from None
        except TimeoutError:
            raise ApprovalError(
                f"approval {pending_id}: gateway worker {worker} did not answer within "
                f"{DECIDE_TIMEOUT:g} s; the decision may still be taken: see sandgate "
                f"approvals show {pending_id}"
            ) from None
        self.persisted.pop(pending_id, None)
        if reply.get("refused"):
            raise ApprovalError(str(reply["refused"]))
        return reply["approval"]

    def _in_force(self, pending_id: str, worker: int) -> dict:
        """An `always` whose rule the service wrote and loaded, decided in worker `worker`,
        which died before it answered: approved (the rule is in force, its event was in
        the worker's black box), not refused; what it held went with the worker."""
        record = self.persisted.pop(pending_id)
        log.warning(
            "approval %s: gateway worker %d stopped after its always rule was put in force",
            pending_id,
            worker,
        )
        self.pending.pop(pending_id, None)
        self.gone.pop(pending_id, None)
        self._remember(pending_id, record)
        self.recent_records.append(record)
        self._notify("approved", record)
        return record

    def _not_pending(self, pending_id: str) -> ApprovalError:
        if pending_id in self.decided:
            return decided_before(self.decided[pending_id])
        if pending_id in self.gone:
            return ApprovalError(f"approval {pending_id} is gone: {self.gone[pending_id]}")
        return unknown(pending_id)

    def _remember(self, pending_id: str, record: dict) -> None:
        self.decided[pending_id] = record
        self.decided.move_to_end(pending_id)
        while len(self.decided) > 4 * RECENT:
            self.decided.popitem(last=False)

    async def _grant(self, worker: int, record: dict) -> None:
        try:
            await self.ask(worker, "grant", {"approval": record})
        except (LinkClosed, RuntimeError, TimeoutError) as e:  # a restarted one gets it again
            log.warning("gateway worker %d: duration approval %s: %s", worker, record["id"], e)

    def _notify(self, what: str, record: dict) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(what, record)
            except Exception:  # noqa: BLE001 - one broken watcher must not stop the others
                log.exception("approval subscriber failed")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
