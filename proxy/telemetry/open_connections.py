"""The allowed connections a gateway worker opened and has not yet ended, as the
service sees its events: what gets a `connection_end` when the worker dies.

The gate ends every allowed connection with a `connection_end` event (bytes and
duration, `ConnectionGate.on_close`). A worker that is killed (SIGKILL, the OOM
killer, a crash in C) never makes them: the kernel closes its sockets, the upstream
sees the connection end, and without this the audit log would show the connection
open forever. So the service follows each worker's events (those it received and
those read back from its black box): an allowed `connection` event, or an allowed
`request` (plain HTTP has no `connection` event: its first allowed request is its
start), opens an entry; a `connection_end` closes it. When the worker has died,
`cut` gives one `connection_end` for each entry still open, made from its start
event (task, sandbox, profile, rule, destination, name), saying in its detail that
the worker's death ended it and that its bytes are unknown: they died with the
worker, and a made-up zero would read as a connection that sent nothing.

An entry is keyed by task and source address ("ip:port"): while a connection is
open no other connection of its sandbox has its source port. A worker's event comes
as an `EncodedEvent` (its audit members, encoded by the worker): its source is read
from the members without decoding them (`source_of`), and the start event is decoded
only if it is cut. Pure: no I/O.
"""

from __future__ import annotations

import time

from sandgate.proxy.policy.reasons import Verdict
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind, decode_members

# Entries followed per worker at most (each holds its start event's audit members,
# ~0.5 KB): far above what the profiles' connection caps let a worker's sandboxes
# hold open; past it a start is counted in `unfollowed` instead.
MAX_FOLLOWED = 100_000
_STARTS = frozenset({EventKind.CONNECTION, EventKind.REQUEST})
_ALLOWED = frozenset({Verdict.ALLOW, Verdict.AUDIT})
# A member `"source":"...`: JSON escapes every quote inside a string (`\"`), so these
# bytes occur in an event's members only as the member itself.
_SOURCE = b'"source":"'


class OpenConnections:
    """One worker's allowed connections whose end has not been seen: `follow` each
    event it made, in order; `cut` once it died."""

    def __init__(self, limit: int = MAX_FOLLOWED):
        self.limit = limit
        self.open: dict[tuple[str | None, str], Event | EncodedEvent] = {}
        self.unfollowed = 0  # starts not followed: `limit` were open

    def follow(self, events: list[Event | EncodedEvent]) -> None:
        for event in events:
            kind = event.kind
            if kind is EventKind.CONNECTION_END:
                source = source_of(event)
                if source is not None:
                    self.open.pop((event.task_id, source), None)
            elif kind in _STARTS and event.verdict in _ALLOWED:
                source = source_of(event)
                if source is None:
                    continue
                key = (event.task_id, source)
                if key in self.open:
                    continue  # its next request, or a second decision: the first is its start
                if len(self.open) < self.limit:
                    self.open[key] = event
                else:
                    self.unfollowed += 1

    def cut(self, why: str, now: float | None = None) -> list[Event]:
        """A `connection_end` for each connection still open (then none is), oldest
        start first; `why`: what ended them ("gateway worker 1 (pid 42) died (signal
        SIGKILL)"). A start whose members do not decode is skipped."""
        now = time.time() if now is None else now
        ends = []
        for start in self.open.values():
            try:
                made = decode_members(start.members) if start.__class__ is EncodedEvent else start
            except ValueError:
                continue
            ends.append(_cut_end(made, why, now))
        self.open.clear()
        return ends


def _cut_end(start: Event, why: str, now: float) -> Event:
    opened = f"open for at least {max(0.0, now - start.time):.1f} s"
    detail = (
        f"ended by {why} while open ({opened}): bytes up and down and the exact "
        "duration are unknown (the worker counted them and died with them)"
    )
    return Event(
        kind=EventKind.CONNECTION_END,
        verdict=start.verdict,
        reason=start.reason,
        rule_id=start.rule_id,
        rule_origin=start.rule_origin,
        detail=detail,
        time=now,
        policy_hash=start.policy_hash,
        task_id=start.task_id,
        sandbox=start.sandbox,
        profile=start.profile,
        source=start.source,
        dst_ip=start.dst_ip,
        dst_port=start.dst_port,
        name=start.name,
        protocol=start.protocol,
    )


def source_of(event: Event | EncodedEvent) -> str | None:
    if event.__class__ is not EncodedEvent:
        return event.source
    members = event.members
    at = members.find(_SOURCE)
    if at < 0:
        return None
    at += len(_SOURCE)
    end = members.find(b'"', at)
    return None if end < 0 else members[at:end].decode("ascii", "replace")
