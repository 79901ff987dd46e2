"""The audit rate limit: a flood from one task is aggregated, never silently lost.

A task can make thousands of denied connections or DNS queries a second; one audit
line each would let it fill the disk (and the SIEM) with noise and push the lines
that matter out of sight. So, per task (its task_id, else its sandbox address), a
token bucket (`rate` events a second, `burst` at once) stands in front of the AUDIT
log only; the metrics and the task summary still see every event.

- Within the budget an event is written as it is.
- Past it, the event is counted into an aggregate keyed by what makes events
  "similar": (kind, verdict, reason, rule_id) of that task. The aggregate keeps the
  count, the first and last time, a few destinations (at most MAX_SAMPLES, each at
  most SAMPLE_CHARS characters, plus how many others) and the bytes, and becomes ONE
  record of the same kind with `suppressed: N` and the detail "N similar events
  suppressed ...": the one event schema, the one reason vocabulary.
- An aggregate is written when it is `interval` old (on the task's next event, or
  by `due`, which the adapter calls from a timer), when an event of its task passes
  with room left in the bucket (the flood is over), before an event that is never
  suppressed (below) of its task, and by `drain` (task end, gateway stop).
- Never suppressed: kinds task, policy and approval. They are rare, and the admin
  needs each one (a task's end, a reload, who approved what).
- Allowed connections and requests are aggregated too (else a flood of allowed
  connections would flood the log just the same), but never anonymously: their
  aggregate names the rule that allowed them, counts them, samples their
  destinations, and carries the summed bytes of `connection_end` events.
- But a destination never hides in an aggregate: the first allowed (or audited)
  event of each destination (an address:port, with up to NAMES_PER_ADDRESS Host or
  SNI names on it; a DNS name; a name:port without an address) that a task's flood
  would fold is written as it is, up to MAX_NAMED destinations a task in each pool. A
  task drained its budget with cheap events, touched five decoys under a rule that
  allows many names (a list, a wildcard, a CIDR), then sent its data to the name it
  meant, which the SOC saw only as "and 1 more". What this costs is bounded by the
  sandbox's own caps, not the task's will: an allowed name must have been resolved
  through the gateway (`dns_qps`), an allowed address connected to
  (`connection_rate`). Denied events keep their samples only: nothing left the
  sandbox for them, and naming each denied host would write a port or address scan
  line by line, the noise this limit is for (a denied name a task tried can still
  be folded into "and N more" of its aggregate: docs/telemetry.md).
- Nor do a destination's bytes hide in an aggregate (rt47 F3: the ends of a task's
  connections folded into one sum, five destinations sampled, so the 2 MB sent to the
  destination it meant read as the decoys' traffic). The end of a connection whose
  start was written as a line (within the budget, or named past it) is written as a
  line too: at most one per start line. An aggregate of `connection_end` events says
  the bytes of each destination it counts, at most MAX_ATTRIBUTED: an end to one more
  writes it out first, so a task pays a line per MAX_ATTRIBUTED destinations whose
  connections ended (bounded by `connection_rate`), not a line per end. The end's own
  line is also what lets the next open of a killed process's log (audit.py) see that
  connection end: an aggregate has no `source`, and the connection got a second,
  made-up end "while open" (rt47 F5). A bucket with such a connection open is not
  forgotten as idle.

Nothing is lost: every event admitted is either returned as it is or counted in
exactly one aggregate that `admit`, `due` or `drain` returns. Pure: no I/O, the
clock is injected (monotonic seconds for the bucket; events keep their own time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sandgate.proxy.policy.names import format_host_port
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import EncodedEvent, Event, EventKind, bound_text
from sandgate.proxy.telemetry.open_connections import MAX_FOLLOWED, source_of

NEVER_SUPPRESSED = frozenset({EventKind.TASK, EventKind.POLICY, EventKind.APPROVAL})
DEFAULT_RATE = 500.0  # events a second, per task
DEFAULT_BURST = 5000
FLUSH_INTERVAL = 1.0  # seconds: the longest an aggregate waits to be written
MAX_SAMPLES = 5
SAMPLE_CHARS = 120
# Allowed destinations a task's flood names in a line each (see above), per bucket and
# pool (names and DNS questions; addresses; names on addresses): at most this many
# strings of at most SAMPLE_CHARS each (under 3 MB in all), gone with the idle bucket.
MAX_NAMED = 4096
# Names (a Host, an SNI) a flood names on one allowed address (`ip:port`), each past
# the address's own line; up to MAX_NAMED such names a task. A request's Host costs a
# task nothing under a rule that allows an address (a range): 4,100 made-up Hosts on
# one keep-alive connection used up MAX_NAMED in under a second, and the destination
# it meant then hid in "and 1 more". So what costs a connection (a new address) and
# what costs a DNS query (a name it asked the gateway for: its `dns` event) are named
# in pools of their own that no free text can fill.
NAMES_PER_ADDRESS = 8
# Destinations whose bytes an aggregate of `connection_end` events attributes each (no
# "and N more" for bytes): an end to one more writes the aggregate first. Four entries
# of a destination (SAMPLE_CHARS) and its two counts fit the detail's 1,024 characters.
MAX_ATTRIBUTED = 4
_PASSED = frozenset({Verdict.ALLOW, Verdict.AUDIT})  # traffic that left the sandbox
# What opens a connection as the audit log's readers follow it (open_connections.py):
# an allowed `connection`, or the first allowed `request` of a plain-HTTP one.
_STARTS = frozenset({EventKind.CONNECTION, EventKind.REQUEST})
_FOLLOWED = _STARTS | {EventKind.CONNECTION_END}

SimilarKey = tuple[EventKind, Verdict, Reason, str | None]


@dataclass(frozen=True)
class FloodLimits:
    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST
    interval: float = FLUSH_INTERVAL

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1 or not self.interval > 0:
            raise ValueError("the audit rate and interval must be > 0 and the burst >= 1")


@dataclass
class _Aggregate:
    """The suppressed events of one task and one similar-key, not yet written."""

    template: Event  # the first one: the identity fields of the record
    since: float  # clock time of the first (for `interval`)
    count: int = 0
    last_time: float = 0.0
    samples: list[str] = field(default_factory=list)
    others: int = 0  # events whose destination is not among the samples
    last: str | None = None  # the latest of those (a flood's target tends to come last)
    # Allowed events to a destination new to the task that `_named_first` did not name:
    # its pools were full. Said in the record: the SOC learns naming has stopped.
    unnamed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # Ends of connections (`connection_end`): [up, down] by destination, for each of
    # at most MAX_ATTRIBUTED (`takes`); None for other kinds, which carry no bytes.
    bytes_to: dict[str | None, list[int]] | None = None
    protocols: set[str | None] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.template.kind is EventKind.CONNECTION_END:
            self.bytes_to = {}

    def takes(self, event: Event) -> bool:
        """Whether `event` can be counted in without hiding where bytes went: an end
        to a destination past MAX_ATTRIBUTED would add its bytes to the sum only."""
        bytes_to = self.bytes_to
        return bytes_to is None or len(bytes_to) < MAX_ATTRIBUTED or _destination(event) in bytes_to

    def add(self, event: Event, unnamed: bool = False) -> None:
        self.count += 1
        self.unnamed += unnamed
        self.last_time = event.time
        self.bytes_up += event.bytes_up or 0
        self.bytes_down += event.bytes_down or 0
        if len(self.protocols) < 2:
            self.protocols.add(event.protocol)
        destination = _destination(event)
        if self.bytes_to is not None:
            counts = self.bytes_to.setdefault(destination, [0, 0])
            counts[0] += event.bytes_up or 0
            counts[1] += event.bytes_down or 0
        if destination is None:
            return
        if destination in self.samples:
            return
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(destination)
        else:
            self.others += 1
            self.last = destination

    def record(self, limits: FloodLimits) -> Event:
        t = self.template
        if self.bytes_to is not None:
            destinations = ", ".join(
                f"{destination or 'no address'} ({up} bytes up, {down} down)"
                for destination, (up, down) in self.bytes_to.items()
            )
        else:
            destinations = ", ".join(self.samples) or "none named"
        if self.others:
            destinations += f" and {self.others} more, the last {self.last}"
        if self.unnamed:
            destinations += (
                f"; {self.unnamed} of them to destinations new to the task that are no longer "
                f"named one by one (past {MAX_NAMED} a task, {NAMES_PER_ADDRESS} names an address)"
            )
        return Event(
            kind=t.kind,
            verdict=t.verdict,
            reason=t.reason,
            rule_id=t.rule_id,
            rule_origin=t.rule_origin,
            detail=f"{self.count} similar events suppressed by the audit rate limit "
            f"({limits.rate:g}/s, burst {limits.burst}); destinations: {destinations}",
            time=self.last_time,
            first_time=t.time,
            suppressed=self.count,
            policy_hash=t.policy_hash,
            task_id=t.task_id,
            sandbox=t.sandbox,
            profile=t.profile,
            protocol=t.protocol if len(self.protocols) == 1 else None,
            bytes_up=self.bytes_up or None,
            bytes_down=self.bytes_down or None,
        )


# What `_named_first` makes of an allowed event past the budget.
NAMED, KNOWN, CAPPED = "named", "known", "capped"  # written; named before; pool full


def _named_first(bucket: _Bucket, event: Event) -> str:
    """NAMED if `event` (allowed) is the first of its destination past the budget, which
    is then noted: its address with up to NAMES_PER_ADDRESS names on it, or (a DNS
    question, an event without an address) its name; KNOWN if it was named before (or
    has no destination); CAPPED if it is new but its pool is full."""
    if event.dst_ip is None or event.kind is EventKind.DNS:
        destination = _destination(event)
        if destination is None or destination in bucket.named:
            return KNOWN
        if len(bucket.named) >= MAX_NAMED:
            return CAPPED
        bucket.named.add(destination)
        return NAMED
    address = format_host_port(event.dst_ip, event.dst_port) if event.dst_port else event.dst_ip
    name = bound_text(event.name, SAMPLE_CHARS) if event.name else None
    names = bucket.addresses.get(address)
    new = names is None
    if new:
        if len(bucket.addresses) >= MAX_NAMED:
            return CAPPED
        names = bucket.addresses[address] = set()
    if name is None or name in names:
        return NAMED if new else KNOWN
    if len(names) >= NAMES_PER_ADDRESS or bucket.names_on_addresses >= MAX_NAMED:
        return NAMED if new else CAPPED
    names.add(name)
    bucket.names_on_addresses += 1
    return NAMED


def _destination(event: Event) -> str | None:
    if event.name:
        host = event.name
    elif event.dst_ip:
        host = event.dst_ip
    else:
        return None
    text = format_host_port(host, event.dst_port) if event.dst_port else host
    return bound_text(text, SAMPLE_CHARS)


@dataclass
class _Bucket:
    tokens: float
    at: float  # clock time of the last refill
    pending: dict[SimilarKey, _Aggregate] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)  # allowed destinations written past the budget
    # The same by address (`ip:port`), each with the names written on it (_named_first).
    addresses: dict[str, set[str]] = field(default_factory=dict)
    names_on_addresses: int = 0
    # Sources ("ip:port") of the allowed connections whose start was written as a line
    # and whose end was not yet seen (`_follow`): their end gets a line of its own.
    started: set[str] = field(default_factory=set)


def _follow(bucket: _Bucket, event: Event | EncodedEvent) -> None:
    """`event` (of a kind in _FOLLOWED) is written as a line: note the start of its
    connection, or forget the connection it ends. The next open of a killed process's
    log follows its lines to find the connections it had open: an end folded into an
    aggregate (no source) left it a connection that ended and got a second, made-up
    end "while open" (rt47 F5). At most MAX_FOLLOWED a task, as that follower."""
    if event.kind is EventKind.CONNECTION_END:
        bucket.started.discard(source_of(event))
    elif event.verdict in _PASSED and len(bucket.started) < MAX_FOLLOWED:
        source = source_of(event)
        if source is not None:
            bucket.started.add(source)


class FloodControl:
    """Per-task token buckets and aggregates; see the module's docstring."""

    def __init__(self, limits: FloodLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}

    @property
    def held(self) -> int:
        """Events counted into aggregates not yet returned."""
        return sum(a.count for b in self.buckets.values() for a in b.pending.values())

    def admit(self, event: Event | EncodedEvent) -> tuple[list[Event | EncodedEvent], bool]:
        """What to write now for `event`, in order (aggregates first: they are older),
        and whether `event` itself was suppressed (counted into an aggregate). A
        worker's `EncodedEvent` is decoded only to be aggregated."""
        now = self.clock()
        return self._admit(event, self._refilled(event.task_id or event.sandbox or "", now), now)

    def _admit(
        self, event: Event | EncodedEvent, bucket: _Bucket, now: float
    ) -> tuple[list[Event | EncodedEvent], bool]:
        if event.kind in NEVER_SUPPRESSED:
            return [*self._flush(bucket), event], False
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            # Room left after this one: the flood is over, its aggregates go out now.
            out = self._flush(bucket) if bucket.tokens >= 1 and bucket.pending else []
            out.append(event)
            if event.kind in _FOLLOWED:
                _follow(bucket, event)
            return out, False
        original = event
        if event.__class__ is EncodedEvent:
            event = event.decoded()
        if event.kind is EventKind.CONNECTION_END and event.source in bucket.started:
            bucket.started.discard(event.source)
            return [original], False  # its start has a line: so has its end, and its bytes
        named = _named_first(bucket, event) if event.verdict in _PASSED else KNOWN
        if named is NAMED:
            if event.kind in _FOLLOWED:
                _follow(bucket, event)
            return [original], False  # its first line: a flood hides no destination
        key = (event.kind, event.verdict, event.reason, event.rule_id)
        out = []
        aggregate = bucket.pending.get(key)
        if aggregate is not None and (
            now - aggregate.since >= self.limits.interval or not aggregate.takes(event)
        ):
            out.append(bucket.pending.pop(key).record(self.limits))
            aggregate = None
        if aggregate is None:
            aggregate = bucket.pending[key] = _Aggregate(event, now)
        aggregate.add(event, unnamed=named is CAPPED)
        return out, True

    def admit_batch(
        self, events: list[Event | EncodedEvent]
    ) -> tuple[list[Event | EncodedEvent], list[Event | EncodedEvent]]:
        """`admit` for each of `events` in order, at one clock reading (a gateway
        worker's batch: its events were made within one flush tick): what to write
        now, in order, and the events suppressed. The same result as `admit` one by
        one with a clock that stands still; the common case (a bucket with room and
        nothing pending) costs a dict lookup and a subtraction per event."""
        now = self.clock()
        out: list[Event | EncodedEvent] = []
        suppressed: list[Event | EncodedEvent] = []
        buckets: dict[str, _Bucket] = {}  # refilled once per task and batch
        for event in events:
            task = event.task_id or event.sandbox or ""
            bucket = buckets.get(task)
            if bucket is None:
                bucket = buckets[task] = self._refilled(task, now)
            if not bucket.pending and bucket.tokens >= 1 and event.kind not in NEVER_SUPPRESSED:
                bucket.tokens -= 1
                out.append(event)
                if event.kind in _FOLLOWED:
                    _follow(bucket, event)
                continue
            lines, held = self._admit(event, bucket, now)
            out.extend(lines)
            if held:
                suppressed.append(event)
        return out, suppressed

    def due(self) -> list[Event]:
        """The aggregates at least `interval` old (for a timer), and forget the buckets
        that are full and hold nothing, no open connection either (idle tasks cost no
        memory)."""
        now = self.clock()
        out = []
        for task in list(self.buckets):
            bucket = self._refilled(task, now)
            for key, aggregate in list(bucket.pending.items()):
                if now - aggregate.since >= self.limits.interval:
                    out.append(bucket.pending.pop(key).record(self.limits))
            if not bucket.pending and not bucket.started and bucket.tokens >= self.limits.burst:
                del self.buckets[task]
        return out

    def drain(self) -> list[Event]:
        """Every aggregate held: the gateway stops. (A task's own end is a `task`
        event, which flushes its bucket in `admit`.)"""
        return [e for bucket in self.buckets.values() for e in self._flush(bucket)]

    def _refilled(self, task: str, now: float) -> _Bucket:
        bucket = self.buckets.get(task)
        if bucket is None:
            bucket = self.buckets[task] = _Bucket(float(self.limits.burst), now)
        elif now > bucket.at:
            bucket.tokens = min(
                float(self.limits.burst), bucket.tokens + (now - bucket.at) * self.limits.rate
            )
            bucket.at = now
        return bucket

    def _flush(self, bucket: _Bucket) -> list[Event]:
        out = [aggregate.record(self.limits) for aggregate in bucket.pending.values()]
        bucket.pending.clear()
        return out
