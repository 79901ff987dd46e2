"""The one event schema, shared by the audit log, the task summary and the metrics.

Every decision the gateway makes becomes exactly one `Event`. Fields that do not
apply are None. docs/telemetry.md documents each field and its OCSF mapping.

Text a sandbox controls (a method, a Host or SNI, a path, a DNS question, and the
detail that may quote them) is bounded here, once, for every sink: an `Event` cannot
hold more than `FIELD_BOUNDS` characters in those fields, so a 1 MB header costs the
audit writer, the metrics and the summary no more than a short one. A cut value
keeps its head and says how much was cut (`...[+N chars]`).
"""

from __future__ import annotations

import json
import logging
import operator
import time
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Protocol

from sandgate.proxy.policy.model import Decision
from sandgate.proxy.policy.reasons import Reason, Verdict

log = logging.getLogger("sandgate.telemetry")


class EventKind(StrEnum):
    DNS = "dns"
    CONNECTION = "connection"
    CONNECTION_END = "connection_end"  # an allowed connection closed: bytes and duration
    REQUEST = "request"
    APPROVAL = "approval"
    POLICY = "policy"
    TASK = "task"


# Not slotted: an instance's fields live in its __dict__, so the gateway's two events
# per connection (`from_decision`, `with_fields`) are filled with one dict update
# instead of 30 frozen-field stores (~4.2 -> ~2.2 us an event).
@dataclass(frozen=True, kw_only=True)
class Event:
    kind: EventKind
    verdict: Verdict
    reason: Reason
    rule_id: str | None = None
    rule_origin: str | None = None  # "file:line" of the rule, "<builtin>:0" for protections
    detail: str = ""  # one human sentence for the admin
    time: float = field(default_factory=time.time)
    policy_hash: str | None = None
    task_id: str | None = None
    sandbox: str | None = None  # the sandbox's address: its identity at the gateway
    profile: str | None = None
    source: str | None = None  # "ip:port" of the sandbox end
    dst_ip: str | None = None
    dst_port: int | None = None
    name: str | None = None  # SNI, Host, or DNS question
    protocol: str | None = None  # tcp, tls, http, https, dns, udp ...
    method: str | None = None
    path: str | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    duration: float | None = None  # seconds; connections: open to close
    latency: float | None = None  # seconds the gateway took to decide (not upstream time)
    # Approvals (kind `approval`, and the connection/request a human decided).
    approval_id: str | None = None  # the pending approval's id
    approver: str | None = None  # who decided: "uid 1000 (alice)", a web user, an API key's name
    scope: str | None = None  # once, task, duration, always
    widened: str | None = None  # the wildcard an approval was explicitly widened to (--widen)
    wait: float | None = None  # seconds from the ask to the decision (or the hold's end)
    # An aggregate record of the audit rate limit (proxy/telemetry/flood.py): it stands
    # for `suppressed` events of this kind, verdict, reason and rule, made from
    # `first_time` to `time`, that the audit log did not get one line each for.
    suppressed: int | None = None
    first_time: float | None = None

    def __post_init__(self) -> None:
        for name, limit in _BOUNDED:
            value = getattr(self, name)
            if isinstance(value, str) and len(value) > limit:
                _set(self, name, bound_text(value, limit))

    @classmethod
    def from_decision(
        cls, kind: EventKind, decision: Decision, detail: str | None = None, **fields
    ) -> Event:
        """What `cls(kind=kind, verdict=..., detail=decision.detail, **fields)` makes
        (the same TypeError for a field it does not have or a decision's field given
        again), filled in one update: the gate makes two per connection. `detail`:
        the event's own sentence instead of the decision's (the DNS filter's says the
        query type and the answer)."""
        if not _OPEN_FIELDS.issuperset(fields):
            unknown = fields.keys() - _OPEN_FIELDS
            raise TypeError(
                f"Event has no field (or one the decision gives) {', '.join(sorted(unknown))}"
            )
        rule = decision.rule
        # Filled in place, in field order (_BLANK's): no dict of all fields to copy.
        new = object.__new__(cls)
        values = new.__dict__
        values.update(_BLANK)
        values["time"] = time.time()
        values.update(fields)
        values["kind"], values["verdict"] = kind, decision.verdict
        values["reason"], values["rule_id"] = decision.reason, rule.id
        values["rule_origin"] = rule.origin
        values["detail"] = decision.detail if detail is None else detail
        for name, limit in _BOUNDED:
            value = values[name]
            if isinstance(value, str) and len(value) > limit:
                values[name] = bound_text(value, limit)
        return new

    def with_fields(self, **changes) -> Event:
        """A copy with `changes` applied (what `dataclasses.replace` does, at a
        fraction of its cost: the gateway stamps every event)."""
        unknown = changes.keys() - _FIELD_SET
        if unknown:
            raise TypeError(f"Event has no field {', '.join(sorted(unknown))}")
        return _filled(Event, {**self.__dict__, **changes}, changes)

    def to_dict(self) -> dict:
        """JSON-ready, in field order: enums as their strings, None fields dropped."""
        record = {k: v for k, v in zip(FIELDS, field_values(self), strict=True) if v is not None}
        record["kind"], record["verdict"], record["reason"] = (
            str(self.kind),
            str(self.verdict),
            str(self.reason),
        )
        return record

    @classmethod
    def from_values(cls, values: list) -> Event:
        """The event with these field values, in `FIELDS` order (what
        `EncodedEvent.decoded` reads back). Raises ValueError for a wrong length or an
        unknown kind, verdict or reason. A text field longer than its bound and the
        cut marker is cut (one already cut stays as it is)."""
        if len(values) != len(FIELDS):
            raise ValueError(f"an event has {len(FIELDS)} fields, not {len(values)}")
        new = object.__new__(cls)
        for name, value in zip(FIELDS, values, strict=True):
            _set(new, name, value)
        _set(new, "kind", EventKind(new.kind))
        _set(new, "verdict", Verdict(new.verdict))
        _set(new, "reason", Reason(new.reason))
        for name, limit in _BOUNDED:
            value = getattr(new, name)
            if isinstance(value, str) and len(value) > limit + CUT_MARKER_MAX:
                _set(new, name, bound_text(value, limit))
        return new


# The most characters each field that a sandbox's bytes can fill may hold (the other
# fields come from sockets, the policy or the gateway itself): a DNS name has at most
# 253, a method is a short token, a detail one sentence that may quote them.
FIELD_BOUNDS = {"method": 32, "name": 300, "path": 2048, "detail": 1024}
_BOUNDED = tuple(FIELD_BOUNDS.items())


def bound_text(value: str, limit: int) -> str:
    """`value` if it has at most `limit` characters, else its head and how much was cut
    (the result has `limit` characters plus the marker, at most 20 more)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[+{len(value) - limit} chars]"


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Event))
CUT_MARKER_MAX = 20  # what bound_text adds at most: "...[+N chars]"
_FIELD_SET = frozenset(FIELDS)
field_values = operator.attrgetter(*FIELDS)
_set = object.__setattr__
# Every field at its default, in field order (`time` is stamped per event).
_BLANK = {f.name: None if f.default is MISSING else f.default for f in fields(Event)}
# What `from_decision` may be given: the fields a decision does not fill.
_OPEN_FIELDS = _FIELD_SET - {"kind", "verdict", "reason", "rule_id", "rule_origin", "detail"}


def _filled(cls: type[Event], values: dict, new_text: dict) -> Event:
    """An event of `values` (every field, in field order), bounding the text fields
    that `new_text` holds: the same event its `__init__` would make."""
    new = object.__new__(cls)
    new.__dict__.update(values)
    for name, limit in _BOUNDED:
        value = new_text.get(name)
        if isinstance(value, str) and len(value) > limit:
            new.__dict__[name] = bound_text(value, limit)
    return new


class EncodedEvent:
    """An event a gateway worker made, as the service takes it in (proxy/worker.py,
    enforcer/workers.py): its audit-log members already encoded there (`members`:
    `"kind":"dns",...`, what `audit.audit_members` gives; the service only chains them)
    and the few fields the service reads of every event: flood control's key
    (task_id, sandbox, kind, verdict, reason, rule_id) and the task summary's row
    (`destination`, None: no row). `decoded()` is the whole `Event`, for the rare
    reader that needs more (an aggregate of the audit rate limit, the metrics of an
    approval or task event). Raises ValueError for an unknown kind, verdict or reason."""

    __slots__ = ("members", "task_id", "sandbox", "kind", "verdict", "reason", "rule_id",
                 "destination")  # fmt: skip
    suppressed = None  # workers never aggregate: the audit rate limit is the service's

    def __init__(
        self,
        members: bytes,
        task_id: str | None,
        sandbox: str | None,
        kind: str,
        verdict: str,
        reason: str,
        rule_id: str | None,
        destination: str | None,
    ):
        self.members, self.task_id, self.sandbox = members, task_id, sandbox
        try:
            self.kind, self.verdict = _KINDS[kind], _VERDICTS[verdict]
            self.reason = _REASONS[reason]
        except (KeyError, TypeError):
            raise ValueError(f"not an event: kind {kind!r}, verdict {verdict!r}, "
                             f"reason {reason!r}") from None  # fmt: skip
        self.rule_id, self.destination = rule_id, destination

    def decoded(self) -> Event:
        """The `Event` these members encode (ValueError if they encode none)."""
        return decode_members(self.members)


def decode_members(members: bytes) -> Event:
    """The `Event` whose audit members (`audit.audit_members`) these are: a worker's
    line, or a record of its black box (ValueError if they encode none)."""
    record = json.loads(b"{" + members + b"}")  # an object, or ValueError
    return Event.from_values([record.get(name) for name in FIELDS])


_KINDS = {str(k): k for k in EventKind}
_VERDICTS = {str(v): v for v in Verdict}
_REASONS = {str(r): r for r in Reason}


class EventSink(Protocol):
    """Anything that takes events: the audit log, the metrics, the task summary.
    `emit` must not block the event loop."""

    def emit(self, event: Event) -> None: ...


class EventFanout:
    """Sends each event to every sink; a failing sink never stops the others."""

    def __init__(self, *sinks: EventSink):
        self.sinks = list(sinks)

    def add(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:  # noqa: BLE001 - one broken sink must not lose the event for the others
                log.exception("event sink %r failed", sink)

    def emit_batch(self, events: list[Event | EncodedEvent]) -> None:
        """`emit` for each of `events` in order (a gateway worker's batch): each sink
        takes the whole batch at once where it can (`emit_batch`: per batch, not per
        event, work such as a lock, a clock reading, a queue append), else one by one.
        Each sink still sees the events in order; a sink sees the whole batch before
        the next sink sees its first event."""
        for sink in self.sinks:
            emit_batch = getattr(sink, "emit_batch", None)
            if emit_batch is None:
                for event in events:
                    try:
                        sink.emit(event)
                    except Exception:  # noqa: BLE001 - as in `emit`
                        log.exception("event sink %r failed", sink)
                continue
            try:
                emit_batch(events)
            except Exception:  # noqa: BLE001 - one broken sink must not lose the events for the others
                log.exception("event sink %r failed", sink)
