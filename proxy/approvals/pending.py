"""Pending approvals, pure: the state table, coalescing, scopes and grants. No
asyncio, no sockets, no clock of its own (`clock` is injected).

One approval per *ask*: a task's wish to reach one destination, keyed by

    task + canonical name (or address) + port + protocol (+ method and path for a
    request ask) (+ the held request itself, method and target with its query, for
    any ask held as an HTTP request)

so parallel asks of one task for the same destination share one pending approval
(`EVIL.test.` and `evil.test` are one name), but two held requests that differ in
their query (`/docs?q=1`, `/docs?payload=...`) never do: the approver is shown the
one request an approval holds, query and all, and `once` lets through only requests
that are exactly it (docs/approvals.md, "What the approver is shown"). The grants
that outlast the held requests (task, duration, always) and a denial are for the
key without the request (`AskKey.any_request`): the path for any query. The states,
one table:

    PENDING  --approve--> APPROVED    (scope: once, task, duration)
    PENDING  --deny-----> DENIED
    PENDING  --expire---> EXPIRED     (nobody decided within expire_pending)
    PENDING  --begin----> DECIDING    (always: its rule is being written and loaded)
    DECIDING --commit---> APPROVED    (the rule is in force)
    DECIDING --abort----> PENDING     (it could not be; the rule was taken out again)

Any other step is refused with `ApprovalError`: an unknown id, one decided before
("already approved by uid 0 (root)"), so two approvers racing learn that the first
decision won, or one being decided ("being approved (always) by uid 0 (root)"): an
`always` decision is taken (`begin`) before its rule is written, so nothing can deny,
approve otherwise or expire it while approved.yaml is written and reloaded, and the
approver is told "approved" exactly when the rule is in force. Requests that join it
meanwhile are covered by the rule: `seen` is checked at `begin` only.

What an approval grants, by scope (`grant_for` answers for a new ask):
- once:     the connections or requests held for it at the time (for requests: all
            the very request shown); if none is held (they gave up after `hold`),
            the next one of the same ask (the same request, query included);
- task:     every ask of that task with the same key, until the task ends;
- duration: the same destination for every task of the profile, until the time
            runs out (`--for 1h`);
- always:   the rule `approved:ID` appended to approved.yaml by the adapter; filed
            as task too (what the rule cannot say, a WebSocket upgrade, stays
            granted to the task that asked), but only while that rule is in force
            (`in_force`, the gate's answer): once the rule is past its `expires`,
            or removed from approved.yaml and reloaded, the task is asked again.
A denial holds for the task: the same ask of the same task is denied at once,
without asking again, until the task ends.

A task that ends takes its grants and denials with it, but not its pending
approvals: they stay pending until `expire_pending` (marked `task_ended`), so a
decision read the next morning still counts. Only the profile-wide scopes
(duration, always) or a denial can decide them then; once or task would grant
nothing, and is refused with a message saying so.
Scope widening is never implicit: a grant is for its exact name, port, protocol
(method and path), never a wildcard, unless the approver chose one (`--widen
'*.example.com'`, with duration or always only): a wildcard in the policy's own
syntax that covers the asked name, never `*` or a public suffix (`widen_pattern`).
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sandgate.proxy.approvals.shown import shown_fields
from sandgate.proxy.policy.names import (
    InvalidName,
    parent_domains,
    parse_domain,
    parse_domain_pattern,
    parse_ip,
    parse_path,
)


class State(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    DECIDING = "deciding"  # an `always` being written and loaded: no other step but its own


class Scope(StrEnum):
    ONCE = "once"
    TASK = "task"
    DURATION = "duration"
    ALWAYS = "always"


# The one table: state -> step -> the state it leads to.
TRANSITIONS: dict[State, dict[str, State]] = {
    State.PENDING: {
        "approve": State.APPROVED,
        "deny": State.DENIED,
        "expire": State.EXPIRED,
        "begin": State.DECIDING,
    },
    State.DECIDING: {"commit": State.APPROVED, "abort": State.PENDING},
    State.APPROVED: {},
    State.DENIED: {},
    State.EXPIRED: {},
}

# How many decided approvals are kept for `recent` (the web page's history).
RECENT = 200

# Approvals open at once in one gateway, whoever asked. An ended task's approvals stay
# open until they expire (24 h by default) and no longer count toward its sandbox's
# max_pending_per_sandbox (the address may be a new task's): tasks run one after
# another, each asking its 20, opened approvals without end, each listed by the admin
# page and the CLI and sent to the webhook. Past it a new ask is approval_queue_full.
MAX_OPEN = 10_000

# Body sizes a record lists (of the held requests with a body; `held` counts them all).
MAX_SHOWN_BODIES = 10


class ApprovalError(Exception):
    """A decision that cannot be taken: unknown id, or decided already. One line."""


def unknown(pending_id: str) -> ApprovalError:
    return ApprovalError(f"no approval {pending_id[:40]!r} (see: sandgate approvals list)")


def decided_before(record: dict) -> ApprovalError:
    """The refusal of a second decision (`record`: the approval's `to_dict`): the first stands."""
    if record["state"] == "deciding":  # an `always` whose rule is being written and loaded
        return ApprovalError(
            f"approval {record['id']} is being approved ({record.get('scope') or 'always'}) "
            f"by {record.get('approver') or 'another approver'}: its rule is being written "
            f"and loaded; that decision comes first (see: sandgate approvals show {record['id']})"
        )
    if record["state"] == "expired":  # nobody decided: the hold ran out
        return ApprovalError(
            f"approval {record['id']} expired: nobody decided it in time, and it can no "
            "longer be decided (the task may ask again)"
        )
    by = f" by {record['approver']}" if record.get("approver") else ""
    scope = f" ({record['scope']})" if record.get("scope") else ""
    return ApprovalError(
        f"approval {record['id']} was already {record['state']}{scope}{by}: the first decision stands"
    )


def spread_ids(index: int, count: int) -> Callable[[], str]:
    """`PendingStore.new_id` for gateway worker `index` of `count`: random ids of the usual
    form (8 hex digits) whose value is `index` modulo `count`, so that no two workers ever
    hand out the same id and an id stays as hard to guess (32 - log2(count) random bits)."""

    def new_id() -> str:
        while True:
            candidate = secrets.token_hex(4)
            if int(candidate, 16) % count == index:
                return candidate

    return new_id


@dataclass(frozen=True, slots=True)
class AskKey:
    """What an ask is about; build it with `AskKey.make`, which canonicalises."""

    task_id: str
    sandbox: str
    profile: str
    name: str  # canonical domain, or an address when no name is known
    port: int
    protocol: str  # tcp, tls, http ...: a grant for TLS is not one for plain HTTP
    method: str | None = None  # request asks only
    path: str | None = None
    # A held HTTP request, exactly: "METHOD /path?query" (as forwarded). None for a
    # connection ask (TLS, TCP), and in the key a task, duration or denial is filed by.
    request: str | None = None

    @classmethod
    def make(
        cls,
        *,
        task_id: str,
        sandbox: str,
        profile: str,
        name: str,
        port: int,
        protocol: str,
        method: str | None = None,
        path: str | None = None,
        request: str | None = None,
    ) -> AskKey:
        """Canonical: name lower-cased, no trailing dot, punycode (or the address in
        its one spelling); method upper-cased; path canonical without the query;
        `request` (a held request's "METHOD target") exactly as given.
        ValueError for a name that is neither a host name nor an address."""
        ip = parse_ip(name)
        if ip is not None:
            canonical = str(ip)
        else:
            try:
                canonical = parse_domain(name)
            except InvalidName as e:
                raise ValueError(str(e)) from None
        return cls(
            task_id=task_id,
            sandbox=sandbox,
            profile=profile,
            name=canonical,
            port=int(port),
            protocol=protocol,
            method=method.upper() if method is not None else None,
            path=parse_path(path.split("?", 1)[0]) if path is not None else None,
            request=request,
        )

    def any_request(self) -> AskKey:
        """The key without the held request: what a task grant or a denial covers (the
        destination, or method and path for a request ask, with any query)."""
        return self if self.request is None else replace(self, request=None)

    @property
    def destination(self) -> tuple:
        """The key without the task: what a duration grant covers for the profile."""
        return (self.profile, self.name, self.port, self.protocol, self.method, self.path)

    def describe(self) -> str:
        where = f"{self.name}:{self.port} ({self.protocol})"
        if self.request is not None:
            method, _, target = self.request.partition(" ")
            return f"{method} {where}{target}"
        return f"{self.method} {where}{self.path}" if self.method else where

    def widened(self, domain: str) -> tuple:
        """`destination` with the name replaced by a wildcard's domain (`*.DOMAIN`)."""
        return (self.profile, domain, self.port, self.protocol, self.method, self.path)


def widen_pattern(key: AskKey, text: str) -> str:
    """The canonical wildcard (`*.example.com`) an approval of `key` may be widened to,
    parsed like a rule's: it must cover the asked name (a name strictly below its
    domain), and `*` or a public suffix (`*.com`, `*.co.uk`, and any the Public Suffix
    List's private section names: `*.github.io`, `*.ngrok-free.app`) is refused.
    ApprovalError, one line, for anything else."""
    try:
        # Every public suffix, the private section's too: a wildcard there (`*.ngrok-free.app`)
        # matches names anyone can register, which no approver means to approve.
        pattern = parse_domain_pattern(text.strip(), every_public_suffix=True)
    except InvalidName as e:
        raise ApprovalError(f"--widen: {e}") from None
    if not pattern.wildcard:
        raise ApprovalError(
            f"--widen {str(pattern)[:80]!r}: not a wildcard; widen to '*.DOMAIN' (the asked "
            "name is approved without --widen)"
        )
    if parse_ip(key.name) is not None or not key.name.endswith("." + pattern.domain):
        raise ApprovalError(
            f"--widen {pattern}: does not cover the asked name {key.name} (a wildcard "
            "matches only names below its domain)"
        )
    return str(pattern)


@dataclass(slots=True)
class Pending:
    """One approval. `held`: connections or requests waiting on it right now."""

    id: str
    key: AskKey
    created: float
    expires: float  # created + expire_pending: EXPIRED after this
    rule_id: str = ""  # the ask rule (or fallback) that asked
    state: State = State.PENDING
    held: int = 0
    asks: int = 0  # how many asks joined it (the first included)
    # The declared body size (Content-Length; None: not declared, chunked) of each held
    # request that has a body, oldest first: shown to the approver with `held`.
    bodies: list = field(default_factory=list)
    # Counts every request or connection that joined: an approver who says which
    # revision they were shown (`seen`) decides on exactly that (`check_seen`).
    revision: int = 0
    decided_at: float | None = None
    approver: str | None = None
    scope: Scope | None = None
    until: float | None = None  # a duration grant's end
    ticket: str | None = None
    widened: str | None = None  # the wildcard the approver widened it to (`*.example.com`)
    task_ended: bool = False  # its task is gone: only duration, always or deny decide it

    def to_dict(self, now: float) -> dict:
        key = self.key
        record = {
            "id": self.id,
            "state": str(self.state),
            "task_id": key.task_id,
            "sandbox": key.sandbox,
            "profile": key.profile,
            "name": key.name,
            "port": key.port,
            "protocol": key.protocol,
            "method": key.method,
            "path": key.path,
            "rule": self.rule_id,
            "created": self.created,
            "waiting_s": round((self.decided_at or now) - self.created, 1),
            "held": self.held,
            "asks": self.asks,
            "request": key.request,
            "bodies": self.bodies[:MAX_SHOWN_BODIES],
            "with_body": len(self.bodies),
            "revision": self.revision,
            "expires_in_s": round(max(0.0, self.expires - now), 1)
            if self.state in (State.PENDING, State.DECIDING)
            else None,
            "approver": self.approver,
            "scope": str(self.scope) if self.scope else None,
            "until": self.until,
            "ticket": self.ticket,
            "widened": self.widened,
            "task_ended": self.task_ended,
        }
        record["shown"] = shown_fields(record)
        return record

    @classmethod
    def from_dict(cls, record: dict, now: float) -> Pending:
        """The approval `to_dict(now)` described (what a gateway worker sends the service,
        and the service a worker): KeyError, TypeError or ValueError if malformed."""
        key = AskKey(
            task_id=str(record["task_id"]),
            sandbox=str(record["sandbox"]),
            profile=str(record["profile"]),
            name=str(record["name"]),
            port=int(record["port"]),
            protocol=str(record["protocol"]),
            method=record.get("method"),
            path=record.get("path"),
            request=record.get("request"),
        )
        created = float(record["created"])
        scope = record.get("scope")
        return cls(
            id=str(record["id"]),
            key=key,
            created=created,
            expires=now + float(record.get("expires_in_s") or 0.0),
            rule_id=str(record.get("rule") or ""),
            state=State(record.get("state", State.PENDING)),
            held=int(record.get("held", 0)),
            asks=int(record.get("asks", 0)),
            bodies=list(record.get("bodies") or []),
            revision=int(record.get("revision", 0)),
            decided_at=created + float(record["waiting_s"])
            if record.get("state", State.PENDING) not in (State.PENDING, State.DECIDING)
            else None,
            approver=record.get("approver"),
            scope=Scope(scope) if scope else None,
            until=record.get("until"),
            ticket=record.get("ticket"),
            widened=record.get("widened"),
            task_ended=bool(record.get("task_ended", False)),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What `grant_for` found for an ask: approved (with the approval that did it)
    or denied."""

    approved: bool
    pending: Pending


@dataclass
class PendingStore:
    """All approvals of one gateway. `clock`: seconds (monotonic or wall; the
    adapter's choice, used for every time here)."""

    clock: Callable[[], float]
    new_id: Callable[[], str] = field(default=lambda: secrets.token_hex(4))
    pending: dict[str, Pending] = field(default_factory=dict)  # by id: only PENDING ones
    by_key: dict[AskKey, Pending] = field(default_factory=dict)  # PENDING, by what they ask
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # decided, newest last
    # Grants and denials (see the module docstring).
    once: dict[AskKey, Pending] = field(default_factory=dict)
    task: dict[AskKey, Pending] = field(default_factory=dict)
    denied: dict[AskKey, Pending] = field(default_factory=dict)
    durations: dict[tuple, Pending] = field(default_factory=dict)
    widened_durations: dict[tuple, Pending] = field(default_factory=dict)  # by key.widened()
    _all: dict[str, Pending] = field(default_factory=dict)  # every id still remembered
    max_open: int = MAX_OPEN  # pending approvals at most, over all sandboxes
    # Whether a task grant still holds where the store cannot tell: an `always` only
    # while its rule is in the policy (the gate sets it: ConnectionGate._in_force).
    # None: every task grant holds until its task ends.
    in_force: Callable[[Pending], bool] | None = None

    # --- asking ------------------------------------------------------------------------

    def grant_for(self, key: AskKey, *, consume: bool = True) -> Grant | None:
        """An earlier decision that answers `key` now, or None (a human must be asked).
        A once grant is used up by the ask it answers (`consume`)."""
        found = self.denied.get(key.any_request())
        if found is not None:
            return Grant(False, found)
        found = self.task.get(key.any_request())
        if found is not None:
            if self.in_force is None or self.in_force(found):
                return Grant(True, found)
            del self.task[key.any_request()]  # its rule is gone: the task is asked again
        found = self.durations.get(key.destination)
        if found is not None:
            if found.until is not None and found.until > self.clock():
                return Grant(True, found)
            del self.durations[key.destination]
        if self.widened_durations and parse_ip(key.name) is None:
            for domain in parent_domains(key.name):
                found = self.widened_durations.get(key.widened(domain))
                if found is not None and found.until is not None and found.until > self.clock():
                    return Grant(True, found)
        found = self.once.get(key)
        if found is not None:
            if consume:
                del self.once[key]
            return Grant(True, found)
        return None

    def ask(
        self, key: AskKey, *, expire_pending: float, max_pending: int, rule_id: str = ""
    ) -> tuple[Pending | None, bool]:
        """Open a pending approval for `key`, or join the one already open: (the
        approval, whether it is new). (None, False) when the sandbox already has
        `max_pending` pending, or the gateway `max_open`: approval_queue_full."""
        found = self.by_key.get(key)
        if found is not None:
            found.asks += 1
            return found, False
        if len(self.pending) >= self.max_open:
            return None, False
        # Approvals of ended tasks do not count: the sandbox's address may be a new task's.
        mine = (p for p in self.pending.values() if not p.task_ended)
        if sum(1 for p in mine if p.key.sandbox == key.sandbox) >= max_pending:
            return None, False
        now = self.clock()
        pending_id = self.new_id()
        while pending_id in self._all:
            pending_id = self.new_id()
        found = Pending(pending_id, key, now, now + expire_pending, rule_id=rule_id, asks=1)
        self.pending[pending_id] = self.by_key[key] = self._all[pending_id] = found
        return found, True

    def join(self, found: Pending, body: int | None = 0) -> None:
        """A connection or request starts waiting on `found`. `body`: a held request's
        declared body size (0: none; None: not declared, e.g. chunked)."""
        found.held += 1
        found.revision += 1
        if body != 0:
            found.bodies.append(body)

    def leave(self, found: Pending, body: int | None = 0) -> None:
        """It stops waiting (released, refused, or its hold ran out). That changes
        what `once` lets through as much as a join does (the requests held now, or,
        none left, the next one with any body), so the revision moves on too: an
        approver shown the request that left decides again on what is held now."""
        found.held -= 1
        found.revision += 1
        if body != 0 and body in found.bodies:
            found.bodies.remove(body)

    # --- deciding ------------------------------------------------------------------------

    def check_seen(self, pending_id: str, seen: int | None) -> None:
        """ApprovalError if the approver was shown revision `seen` of a pending approval
        and more has joined since (a request held after the record was shown: its body,
        or it at all, was not seen). None: the caller vouches for nothing (the CLI
        without --seen decides on what is held at the time)."""
        found = self.get(pending_id)
        if seen is None or found.state is not State.PENDING or found.revision == seen:
            return
        raise ApprovalError(
            f"approval {found.id} changed since it was shown (revision {seen}, now "
            f"{found.revision}; {found.held} held now): look again "
            f"(sandgate approvals show {found.id}) and decide on what it holds now"
        )

    def get(self, pending_id: str) -> Pending:
        found = self._all.get(pending_id)
        if found is None:
            raise unknown(pending_id)
        return found

    def approve(
        self,
        pending_id: str,
        approver: str,
        scope: Scope,
        *,
        duration: float | None = None,
        ticket: str | None = None,
        widen: str | None = None,
        seen: int | None = None,
    ) -> Pending:
        """Once, task or duration at one step. (`always` works too, for a caller that
        persists nothing; the adapter uses begin, commit and abort.)"""
        if scope is Scope.DURATION and (duration is None or duration <= 0):
            raise ApprovalError("a duration approval needs a duration (--for 1h)")
        widened = self.check_scope(pending_id, scope, widen)
        self.check_seen(pending_id, seen)
        # The grant's end before the step: a duration that fails it (a 400-digit int
        # overflows a float) leaves the approval pending, not approved without an end.
        now = self.clock()
        try:
            until = now + duration if scope is Scope.DURATION else None
        except (OverflowError, TypeError):
            raise ApprovalError(f"a duration of {str(duration)[:40]} s cannot be granted") from None
        found = self._step(pending_id, "approve", approver, at=now)
        found.scope, found.ticket, found.widened = scope, ticket, widened
        if until is not None:
            found.until = until
        self._file_grant(found)
        return found

    def begin(
        self,
        pending_id: str,
        approver: str,
        *,
        ticket: str | None = None,
        widen: str | None = None,
        seen: int | None = None,
    ) -> Pending:
        """Decide `always` (PENDING -> DECIDING) before its rule is written: every other
        step is refused until `commit` (the rule is in force) or `abort` (it is not).
        The checks of `approve` happen here; the revision is the one decided on."""
        widened = self.check_scope(pending_id, Scope.ALWAYS, widen)
        self.check_seen(pending_id, seen)
        found = self._step(pending_id, "begin", approver)
        found.scope, found.ticket, found.widened = Scope.ALWAYS, ticket, widened
        return found

    def commit(self, pending_id: str) -> Pending:
        """The `always` begun is in force: DECIDING -> APPROVED, what it held released."""
        found = self.get(pending_id)
        approver = found.approver
        found = self._step(pending_id, "commit", approver)
        self._file_grant(found)
        return found

    def abort(self, pending_id: str) -> Pending:
        """The `always` begun could not be put in force: back to PENDING, undecided."""
        found = self._step(pending_id, "abort", None)
        found.scope = found.ticket = found.widened = None
        return found

    def _file_grant(self, found: Pending) -> None:
        key = found.key
        if found.scope is Scope.DURATION:
            self.adopt_grant(found)
        elif found.task_ended:
            pass  # always, with no task left to grant: the policy's new rule covers it
        elif found.scope is Scope.ONCE:
            if found.held == 0:
                self.once[key] = found  # for the next ask: the held ones gave up
        else:  # TASK, ALWAYS (while its rule is in force: `in_force`)
            self.task[key.any_request()] = found

    def adopt_grant(self, found: Pending) -> None:
        """File a duration approval (`until` set) as a grant for every task of its profile:
        one decided here, or in another gateway worker (the service passes it on, so that
        `--for 1h` holds for the profile whichever worker serves the task)."""
        if found.widened:
            self.widened_durations[found.key.widened(found.widened.removeprefix("*."))] = found
        else:
            self.durations[found.key.destination] = found

    def check_scope(self, pending_id: str, scope: Scope, widen: str | None = None) -> str | None:
        """ApprovalError if `scope` (and `widen`) cannot decide this pending approval:
        once or task for a task that has ended (nothing would be granted); always for a
        path with '*' (approved.yaml's rule would read it as a glob); a widening
        with a scope other than duration or always, or one `widen_pattern` refuses.
        Returns the canonical wildcard (None: not widened)."""
        found = self.get(pending_id)
        if found.state is not State.PENDING:
            return None  # _step says it was decided before
        if found.task_ended and scope in (Scope.ONCE, Scope.TASK):
            raise ApprovalError(
                f"approval {found.id}: the task has ended; approve --for or --always, or deny"
            )
        if scope is Scope.ALWAYS and found.key.path is not None and "*" in found.key.path:
            # The rule's `paths:` reads '*' as a wildcard (and '/**' as everything below):
            # written as asked, it would allow paths nobody was shown.
            raise ApprovalError(
                f"approval {found.id}: the asked path {found.key.path[:80]!r} holds '*', "
                "which a rule reads as a wildcard; approve --once, --task or --for"
            )
        if widen is None:
            return None
        if scope not in (Scope.DURATION, Scope.ALWAYS):
            raise ApprovalError(
                "--widen goes with --for or --always (a wider grant for the profile)"
            )
        return widen_pattern(found.key, widen)

    def deny(self, pending_id: str, approver: str) -> Pending:
        # No `seen` check: denying what was shown also denies what joined it since.
        found = self._step(pending_id, "deny", approver)
        if not found.task_ended:
            self.denied[found.key.any_request()] = found
        return found

    def expire(self) -> list[Pending]:
        """Approvals nobody decided in time move to EXPIRED; returned for their events."""
        now = self.clock()
        gone = [p for p in self.pending.values() if p.state is State.PENDING and p.expires <= now]
        for found in gone:
            self._step(found.id, "expire", None)
        for table in (self.durations, self.widened_durations):
            for destination, found in list(table.items()):
                if found.until is not None and found.until <= now:
                    del table[destination]
        return gone

    def forget_task(self, task_id: str) -> list[Pending]:
        """The task ended: its grants and denials go (duration grants stay: they are
        the profile's); its pending approvals stay pending until `expire_pending`,
        marked `task_ended` (returned, for their events)."""
        for table in (self.once, self.task, self.denied):
            for key in [k for k in table if k.task_id == task_id]:
                del table[key]
        ended = [p for p in self.pending.values() if p.key.task_id == task_id and not p.task_ended]
        for found in ended:
            found.task_ended = True
        return ended

    def list(self) -> list[Pending]:
        """Pending approvals, oldest first."""
        return sorted(self.pending.values(), key=lambda p: p.created)

    def _step(
        self, pending_id: str, step: str, approver: str | None, at: float | None = None
    ) -> Pending:
        """Move `pending_id` by `step`; a decision is dated `at` (default: now)."""
        found = self.get(pending_id)
        target = TRANSITIONS[found.state].get(step)
        if target is None:
            raise decided_before(found.to_dict(self.clock()))
        found.state, found.approver = target, approver
        if target is State.DECIDING or target is State.PENDING:
            return found  # still open: listed, joined, not yet in `recent`
        found.decided_at = self.clock() if at is None else at
        del self.pending[found.id]
        if self.by_key.get(found.key) is found:
            del self.by_key[found.key]
        self.recent.append(found)
        if len(self._all) > 4 * RECENT + len(self.pending):
            self._forget_old()
        return found

    def _forget_old(self) -> None:
        """Ids of long-decided approvals go (bounded memory); grants keep theirs."""
        keep = {id(p) for p in self.recent} | {
            id(p)
            for table in (
                self.once,
                self.task,
                self.denied,
                self.durations,
                self.widened_durations,
            )
            for p in table.values()
        }
        self._all = {
            i: p
            for i, p in self._all.items()
            if p.state in (State.PENDING, State.DECIDING) or id(p) in keep
        }
