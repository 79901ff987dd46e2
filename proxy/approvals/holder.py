"""Approvals on the gateway's loop: holds connections and requests (asyncio futures)
for up to the profile's `hold` while a human decides, over the pure store
(`pending.py`). One `Approvals` per gateway; the control socket (and later an
HTTP admin server) use `list`, `get`, `approve`, `deny` and `subscribe` from the
same loop.

Every step is an `approval` event: a pending approval opened (`approval_requested`,
verdict ask), approved (`approval_granted`) or denied (`approval_denied`) with approver,
scope and wait; a held connection given up after `hold` (`approval_pending`); the
task of a pending approval ended (`approval_pending`, verdict ask: it stays pending);
an approval expired (`approval_expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from sandgate.proxy.approvals.pending import (
    ApprovalError,
    AskKey,
    Pending,
    PendingStore,
    Scope,
    State,
)
from sandgate.proxy.policy.model import DEFAULT_APPROVAL, ApprovalSettings
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventKind

log = logging.getLogger("sandgate.approvals")

EXPIRY_CHECK_S = 1.0


class Answer(Enum):
    """How a hold ended."""

    GRANTED = "granted"
    DENIED = "denied"
    PENDING = "pending"  # `hold` ran out; the approval stays open
    EXPIRED = "expired"
    QUEUE_FULL = "queue_full"


@dataclass(frozen=True, slots=True)
class HoldResult:
    answer: Answer
    pending: Pending | None  # None: queue full
    waited: float = 0.0


Subscriber = Callable[[str, dict], None]
"""`subscriber(what, approval)`: what is `new`, `approved`, `denied`, `expired` or
`task_ended` (still pending);
approval is `Pending.to_dict()`."""


class Approvals:
    def __init__(
        self,
        emit: Callable[[Event], None],
        settings_for: Callable[[str], ApprovalSettings] = lambda profile: DEFAULT_APPROVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.emit = emit
        self.settings_for = settings_for
        self.clock = clock
        self.store = PendingStore(clock)
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._subscribers: list[Subscriber] = []
        self._expiry: asyncio.Task | None = None
        # Set by the gateway's owner: persist an `always` approval (approved.yaml) and
        # reload: on_always(approval, approver, expires). An exception there is
        # reported to the approver.
        self.on_always: Callable[[Pending, str, str | None], Awaitable[None]] | None = None
        # Called whenever a connection starts or stops waiting on an approval (`held`,
        # `asks`), which subscribers are not told: a gateway worker passes the counts on
        # to the service's list (proxy/approvals/remote.py).
        self.on_held: Callable[[Pending], None] | None = None

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(State.EXPIRED)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            try:
                for found in self.store.expire():
                    self._decided(
                        found, "expired", Reason.APPROVAL_EXPIRED, "nobody decided in time"
                    )
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("approval expiry failed")

    def forget_task(self, task_id: str) -> None:
        """The task ended: its grants go; its pending approvals stay pending until
        `expire_pending`, which only --for, --always or a denial can now decide."""
        for found in self.store.forget_task(task_id):
            self._event(
                found,
                Verdict.ASK,
                Reason.APPROVAL_PENDING,
                f"approval {found.id} for {found.key.describe()}: the task has ended; it stays "
                f"pending for --for or --always (or deny) until it expires",
                {},
            )
            self._notify("task_ended", found)

    # --- holding --------------------------------------------------------------------------

    def granted(self, key: AskKey) -> HoldResult | None:
        """An earlier decision for `key`, at once (no hold), or None."""
        grant = self.store.grant_for(key)
        if grant is None:
            return None
        return HoldResult(Answer.GRANTED if grant.approved else Answer.DENIED, grant.pending)

    async def hold(
        self, key: AskKey, rule_id: str, fields: dict, body: int | None = 0
    ) -> HoldResult:
        """Ask (or join the ask) and wait up to the profile's `hold` for a decision.
        `fields`: event fields of the held connection (source, destination ...);
        `body`: a held request's declared body size (0: none; None: not declared),
        shown to the approver."""
        earlier = self.granted(key)
        if earlier is not None:
            return earlier
        settings = self.settings_for(key.profile)
        found, new = self.store.ask(
            key,
            expire_pending=settings.expire_pending,
            max_pending=settings.max_pending_per_sandbox,
            rule_id=rule_id,
        )
        if found is None:
            return HoldResult(Answer.QUEUE_FULL, None)
        if new:
            self._event(
                found,
                Verdict.ASK,
                Reason.APPROVAL_REQUESTED,
                f"approval {found.id} asked for {key.describe()} (rule {rule_id}); "
                f"held up to {settings.hold:g} s: sandgate approvals approve {found.id}",
                fields,
            )
            self._notify("new", found)
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(found.id, []).append(future)
        self.store.join(found, body)
        self._held_changed(found)
        started = self.clock()
        try:
            async with asyncio.timeout(settings.hold):
                state = await future
        except TimeoutError:
            waited = self.clock() - started
            self._event(
                found,
                Verdict.DENY,
                Reason.APPROVAL_PENDING,
                f"held {waited:.0f} s without a decision; approval {found.id} stays pending",
                fields,
                wait=waited,
            )
            return HoldResult(Answer.PENDING, found, waited)
        finally:
            self.store.leave(found, body)
            self._held_changed(found)
            waiters = self._waiters.get(found.id, [])
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(found.id, None)
        answer = {State.APPROVED: Answer.GRANTED, State.DENIED: Answer.DENIED}.get(
            state, Answer.EXPIRED
        )
        return HoldResult(answer, found, self.clock() - started)

    # --- deciding (control socket, admin server) ----------------------------------------------

    def list(self) -> list[dict]:
        now = self.clock()
        return [p.to_dict(now) for p in self.store.list()]

    def recent(self) -> list[dict]:
        now = self.clock()
        return [p.to_dict(now) for p in reversed(self.store.recent)]

    def get(self, pending_id: str) -> dict:
        return self.store.get(pending_id).to_dict(self.clock())

    async def approve(
        self,
        pending_id: str,
        approver: str,
        scope: Scope,
        *,
        duration: float | None = None,
        ticket: str | None = None,
        expires: str | None = None,
        widen: str | None = None,
        seen: int | None = None,
    ) -> dict:
        """Approve; ApprovalError (one line) if unknown, decided already or being decided,
        or if the scope or `widen` (a wildcard, with duration or always) cannot apply.
        `seen`: the revision the approver was shown; refused if more joined since
        (pending.check_seen). An `always` approval is persisted (on_always, with the
        rule's `expires` if given, for the wildcard if widened) before anything is
        released, as one decision (`_approve_always`)."""
        found = self.store.get(pending_id)
        if expires is not None and scope is not Scope.ALWAYS:
            raise ApprovalError("expires goes with always (it is written into the rule)")
        widened = self.store.check_scope(pending_id, scope, widen)
        self.store.check_seen(pending_id, seen)
        if scope is Scope.ALWAYS and found.state is State.PENDING:
            if self.on_always is None:
                raise ApprovalError(
                    "this gateway has no rule file to add to (--always needs --rules)"
                )
            return await self._approve_always(found, approver, ticket, expires, widen, seen)
        held = found.to_dict(self.clock())["shown"]  # what this decision let through
        found = self.store.approve(
            pending_id, approver, scope, duration=duration, ticket=ticket, widen=widened, seen=seen
        )
        self._decided(found, "approved", Reason.APPROVAL_GRANTED, _approved(found, held, duration))
        return found.to_dict(self.clock())

    async def _approve_always(
        self,
        found: Pending,
        approver: str,
        ticket: str | None,
        expires: str | None,
        widen: str | None,
        seen: int | None,
    ) -> dict:
        """`always` as one decision (docs/approvals.md, "always"):
        1. taken (`store.begin`: DECIDING) before anything is written, so a denial, a
           second approval or the expiry is refused meanwhile ("being approved"), and
           requests that join are covered by the rule (`seen` was checked here);
        2. recorded: its `approval_granted` event is emitted (journaled) before the rule
           is written, so the audit never lacks the grant of a rule in force, even if
           the gateway is killed while the file is written and loaded;
        3. persisted (`on_always`: append, reload; the file put back if the reload fails);
        4. committed (APPROVED: what it holds is released, the approver told) or, if it
           could not be persisted, aborted (PENDING again, an `approval_pending` event
           saying the grant was withdrawn and why, the approver told it was refused)."""
        pending_id = found.id
        held = found.to_dict(self.clock())["shown"]
        found = self.store.begin(pending_id, approver, ticket=ticket, widen=widen, seen=seen)
        what = _approved(found, held, None)
        self._event(
            found,
            Verdict.ALLOW,
            Reason.APPROVAL_GRANTED,
            self._detail(found, f"approved {what}")
            + f"; its rule approved:{found.id} goes into approved.yaml before anything is released",
            {},
            wait=self.clock() - found.created,
        )
        try:
            await self.on_always(found, approver, expires)
        except asyncio.CancelledError:
            # The gateway stops: whether the rule was written is not known here; the
            # event above records the grant, the approval stays being decided.
            raise
        except Exception as e:
            why = str(e) if isinstance(e, ApprovalError) else f"{type(e).__name__}: {e}"
            found = self.store.abort(pending_id)
            self._event(
                found,
                Verdict.ASK,
                Reason.APPROVAL_PENDING,
                f"approval {found.id} for {found.key.describe()}: the always approval by "
                f"{approver} is withdrawn, its rule not in force ({why[:400]}); nothing was "
                "approved, it stays pending",
                {},
            )
            if isinstance(e, ApprovalError):
                raise
            raise ApprovalError(f"the approved rule could not be put in force ({why[:300]})") from e
        found = self.store.commit(pending_id)
        self._decided(found, "approved", Reason.APPROVAL_GRANTED, f"approved {what}", emit=False)
        return found.to_dict(self.clock())

    async def deny(self, pending_id: str, approver: str) -> dict:
        """Deny; ApprovalError (one line) if unknown or decided already. A coroutine as
        `approve` is: the service's approvals with workers route it to one."""
        found = self.store.deny(pending_id, approver)
        self._decided(found, "denied", Reason.APPROVAL_DENIED, "denied (for this task)")
        return found.to_dict(self.clock())

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber` on every change; returns the unsubscribe function."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    # --- helpers ---------------------------------------------------------------------------------

    def _held_changed(self, found: Pending) -> None:
        if self.on_held is not None:
            try:
                self.on_held(found)
            except Exception:  # noqa: BLE001 - a count that cannot be passed on never fails a hold
                log.exception("approval held-count hook failed")

    def _decided(
        self, found: Pending, what: str, reason: Reason, detail: str, *, emit: bool = True
    ) -> None:
        """Wake what `found` holds, emit its event (`emit`: not already) and tell the
        subscribers."""
        for future in self._waiters.get(found.id, []):
            if not future.done():
                future.set_result(found.state)
        if emit:
            verdict = Verdict.ALLOW if found.state is State.APPROVED else Verdict.DENY
            self._event(
                found,
                verdict,
                reason,
                self._detail(found, detail),
                {},
                wait=(found.decided_at or self.clock()) - found.created,
            )
        self._notify(what, found)

    @staticmethod
    def _detail(found: Pending, detail: str) -> str:
        return (
            f"approval {found.id} for {found.key.describe()} {detail}"
            + (f" by {found.approver}" if found.approver else "")
            + (f", ticket {found.ticket}" if found.ticket else "")
            + (" (its task had ended)" if found.task_ended else "")
        )

    def _notify(self, what: str, found: Pending) -> None:
        record = found.to_dict(self.clock())
        for subscriber in list(self._subscribers):
            try:
                subscriber(what, record)
            except Exception:  # noqa: BLE001 - one broken watcher must not stop the others
                log.exception("approval subscriber failed")

    def _event(
        self,
        found: Pending,
        verdict: Verdict,
        reason: Reason,
        detail: str,
        fields: dict,
        wait: float | None = None,
    ) -> None:
        key = found.key
        # The request shown (method and target with its query), as a request event has it.
        method, path = key.method, key.path
        if key.request is not None:
            method, _, path = key.request.partition(" ")
        self.emit(
            Event(
                kind=EventKind.APPROVAL,
                verdict=verdict,
                reason=reason,
                rule_id=found.rule_id or None,
                detail=detail[:1000],
                **{
                    "task_id": key.task_id,
                    "sandbox": key.sandbox,
                    "profile": key.profile,
                    **fields,
                    "name": key.name,
                    "dst_port": key.port,
                    "protocol": key.protocol,
                    "method": method,
                    "path": path,
                },
                approval_id=found.id,
                approver=found.approver,
                scope=str(found.scope) if found.scope else None,
                widened=found.widened,
                wait=wait,
            )
        )


def _approved(found: Pending, held: dict, duration: float | None) -> str:
    """What a decision let through, in words (`held`: the record's `shown` before it)."""
    scope = found.scope
    what = f"for {duration:g} s" if scope is Scope.DURATION else str(scope)
    if found.widened:
        what += f", widened to {found.widened}"
    if scope is Scope.ONCE:
        return (
            what
            + f" ({held['held']}"
            + (f"; bodies: {held['bodies']}" if held["bodies"] else "")
            + ")"
        )
    return what + f" ({held['wider']})"
