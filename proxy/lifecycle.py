"""The lifecycle of one sandbox connection at the gate: phases, and ONE table of
the steps each phase takes (in the spirit of h11's `_state.py`).

What belongs here: which step (a call from an adapter, or a decision's outcome)
may happen in which phase, and the phases it may lead to. What does not: the
decisions themselves (proxy/gate.py) and anything about sockets or mitmproxy.

A step missing from its phase's row is a bug in an adapter (an HTTP request on a
connection that was rejected, a hand-off of an undecided one): `advance` raises
`IllegalTransition`, naming phase and step. The gate turns that into a deny with
reason `internal_error` and its event: fail closed, still report.

    NEW --connect--> OPEN
    OPEN --first_bytes--> OPEN (wait) | PASSING | HTTP | INTERCEPTING | REJECTED
    OPEN --silence--> OPEN (web port) | SILENT (allowed) | REJECTED
    OPEN, SILENT --first_bytes--> ASKING (a human must approve: the adapter holds it)
    ASKING --answer--> PASSING | HTTP | INTERCEPTING | REJECTED
    SILENT --first_bytes--> SILENT (wait) | PASSING (raw bytes) | HTTP | INTERCEPTING | REJECTED
    SILENT --server_spoke--> PASSING
    HTTP, INTERCEPTING --hand_off--> HANDED_OFF --adopt--> HTTP, INTERCEPTING
    OPEN, SILENT, PASSING, HTTP, INTERCEPTING --revoke--> REJECTED (a new policy denies it)
    HANDED_OFF --revoke--> HANDED_OFF (in transit to mitmproxy, which adopts it, then sees it close)
    any but NEW --close--> CLOSED (a second close is a no-op)
"""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    # Hashed by identity (members are singletons, compared by identity anyway):
    # Enum's own __hash__ is a Python call, and `advance` hashes three members per
    # step, four steps a connection (~1 us of a plain-HTTP connection).
    __hash__ = object.__hash__

    NEW = "new"  # built by on_connect, not yet admitted
    OPEN = "open"  # admitted; nothing decided on its bytes yet
    SILENT = "silent"  # allowed as raw TCP on silence; the client has not spoken yet
    PASSING = "passing"  # allowed: bytes relayed untouched
    HTTP = "http"  # plain HTTP: each request is decided
    INTERCEPTING = (
        "intercepting"  # allowed TLS terminated with the gateway CA: each request is decided
    )
    ASKING = "asking"  # held while a human decides (proxy/approvals/)
    HANDED_OFF = "handed_off"  # given by the front door to mitmproxy, which adopts it
    REJECTED = "rejected"  # denied: the adapter closes it
    CLOSED = "closed"  # gone; its end is reported


class Step(Enum):
    __hash__ = object.__hash__  # as Phase's

    CONNECT = "connect"
    FIRST_BYTES = "first_bytes"  # decided once; asked again, the same answer
    SILENCE = "silence"
    SERVER_SPOKE = "server_spoke"  # the first bytes of a server allowed to speak first
    ANSWER = "answer"  # a held connection's approval was decided, or the hold ran out
    HAND_OFF = "hand_off"
    ADOPT = "adopt"
    REQUEST = "request"
    FAIL = "fail"  # an adapter failed around the connection (denied with internal_error)
    REVOKE = "revoke"  # a reloaded policy denies the open connection; its adapter closes it
    CLOSE = "close"


_DECIDED_ON_BYTES = frozenset(
    {Phase.PASSING, Phase.HTTP, Phase.INTERCEPTING, Phase.REJECTED, Phase.ASKING}
)

# phase -> step -> the phases the step may lead to. The one table.
TRANSITIONS: dict[Phase, dict[Step, frozenset[Phase]]] = {
    Phase.NEW: {Step.CONNECT: frozenset({Phase.OPEN})},
    Phase.OPEN: {
        Step.FIRST_BYTES: _DECIDED_ON_BYTES | {Phase.OPEN},
        Step.SILENCE: frozenset({Phase.OPEN, Phase.SILENT, Phase.REJECTED}),
        Step.FAIL: frozenset({Phase.REJECTED}),
        Step.REVOKE: frozenset({Phase.REJECTED}),
        Step.CLOSE: frozenset({Phase.CLOSED}),
    },
    Phase.SILENT: {
        Step.FIRST_BYTES: _DECIDED_ON_BYTES | {Phase.SILENT},
        Step.SERVER_SPOKE: frozenset({Phase.PASSING}),
        Step.FAIL: frozenset({Phase.REJECTED}),
        Step.REVOKE: frozenset({Phase.REJECTED}),
        Step.CLOSE: frozenset({Phase.CLOSED}),
    },
    Phase.ASKING: {
        Step.FIRST_BYTES: frozenset({Phase.ASKING}),
        Step.ANSWER: frozenset({Phase.PASSING, Phase.HTTP, Phase.INTERCEPTING, Phase.REJECTED}),
        Step.FAIL: frozenset({Phase.REJECTED}),
        Step.REVOKE: frozenset({Phase.REJECTED}),
        Step.CLOSE: frozenset({Phase.CLOSED}),
    },
    Phase.PASSING: {
        Step.FIRST_BYTES: frozenset({Phase.PASSING}),
        Step.FAIL: frozenset({Phase.PASSING}),
        Step.REVOKE: frozenset({Phase.REJECTED}),
        Step.CLOSE: frozenset({Phase.CLOSED}),
    },
    **{
        phase: {
            Step.FIRST_BYTES: frozenset({phase}),
            Step.REQUEST: frozenset({phase}),
            Step.HAND_OFF: frozenset({Phase.HANDED_OFF}),
            Step.FAIL: frozenset({phase}),
            Step.REVOKE: frozenset({Phase.REJECTED}),
            Step.CLOSE: frozenset({Phase.CLOSED}),
        }
        for phase in (Phase.HTTP, Phase.INTERCEPTING)
    },
    Phase.HANDED_OFF: {
        Step.ADOPT: frozenset({Phase.HTTP, Phase.INTERCEPTING}),
        Step.REVOKE: frozenset({Phase.HANDED_OFF}),
        Step.CLOSE: frozenset({Phase.CLOSED}),
    },
    Phase.REJECTED: {
        Step.FIRST_BYTES: frozenset({Phase.REJECTED}),
        Step.FAIL: frozenset({Phase.REJECTED}),
        Step.CLOSE: frozenset({Phase.CLOSED}),
    },
    Phase.CLOSED: {Step.CLOSE: frozenset({Phase.CLOSED})},
}


class IllegalTransition(Exception):
    """A step its phase does not take (an adapter's bug), or a target the step
    cannot reach from there (the gate's). Like h11's LocalProtocolError: the fault
    is on our side, never the sandbox's."""

    def __init__(self, phase: Phase, step: Step, target: Phase | None = None):
        self.phase, self.step, self.target = phase, step, target
        where = f"{step.value} in phase {phase.value}"
        super().__init__(
            f"illegal {where}" if target is None else f"illegal {where} -> {target.value}"
        )


def advance(phase: Phase, step: Step, target: Phase) -> Phase:
    """`target`, if `step` may take `phase` there; else IllegalTransition."""
    targets = TRANSITIONS[phase].get(step)
    if targets is None:
        raise IllegalTransition(phase, step)
    if target not in targets:
        raise IllegalTransition(phase, step, target)
    return target
