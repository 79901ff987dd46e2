"""The connection lifecycle: the transition table with no bytes and no sockets, and
the gate's promise that an illegal call is a reported deny, never an exception."""

from __future__ import annotations

import itertools

import pytest
from sandgate.proxy.gate import Outcome
from sandgate.proxy.lifecycle import TRANSITIONS, IllegalTransition, Phase, Step, advance
from support.fakes import SANDBOX, client_hello, make_gate, request_head

LEGAL = [
    (phase, step, target)
    for phase, row in TRANSITIONS.items()
    for step, targets in row.items()
    for target in sorted(targets, key=lambda p: p.value)
]


@pytest.mark.parametrize(
    "phase, step, target",
    [pytest.param(*case, id=f"{case[0].value}-{case[1].value}-{case[2].value}") for case in LEGAL],
)
def test_every_legal_step_reaches_its_target(phase, step, target):
    assert advance(phase, step, target) is target


@pytest.mark.parametrize(
    "phase, step, target",
    [
        pytest.param(
            Phase.REJECTED, Step.REQUEST, Phase.REJECTED, id="request-on-a-rejected-connection"
        ),
        pytest.param(
            Phase.PASSING, Step.REQUEST, Phase.PASSING, id="request-on-a-relayed-connection"
        ),
        pytest.param(Phase.OPEN, Step.HAND_OFF, Phase.HANDED_OFF, id="hand-off-undecided"),
        pytest.param(Phase.PASSING, Step.HAND_OFF, Phase.HANDED_OFF, id="hand-off-pass-through"),
        pytest.param(
            Phase.HANDED_OFF, Step.FIRST_BYTES, Phase.HANDED_OFF, id="bytes-before-adoption"
        ),
        pytest.param(Phase.CLOSED, Step.FIRST_BYTES, Phase.CLOSED, id="bytes-after-close"),
        pytest.param(Phase.PASSING, Step.SILENCE, Phase.PASSING, id="silence-after-a-decision"),
        pytest.param(Phase.PASSING, Step.SERVER_SPOKE, Phase.PASSING, id="server-spoke-not-silent"),
        pytest.param(Phase.NEW, Step.CLOSE, Phase.CLOSED, id="close-before-connect"),
        pytest.param(Phase.OPEN, Step.ADOPT, Phase.HTTP, id="adopt-not-handed-off"),
    ],
)
def test_a_step_its_phase_does_not_take_raises(phase, step, target):
    assert step not in TRANSITIONS[phase]
    with pytest.raises(
        IllegalTransition, match=f"illegal {step.value} in phase {phase.value}$"
    ) as info:
        advance(phase, step, target)
    assert (info.value.phase, info.value.step) == (phase, step)


@pytest.mark.parametrize(
    "phase, step, target",
    [
        pytest.param(Phase.OPEN, Step.SILENCE, Phase.PASSING, id="silence-allows-only-as-silent"),
        pytest.param(Phase.PASSING, Step.FIRST_BYTES, Phase.HTTP, id="no-second-decision"),
        pytest.param(
            Phase.HANDED_OFF, Step.ADOPT, Phase.PASSING, id="adopted-as-what-was-handed-off"
        ),
        pytest.param(Phase.OPEN, Step.FAIL, Phase.OPEN, id="a-failure-rejects-the-undecided"),
    ],
)
def test_a_target_the_step_cannot_reach_raises(phase, step, target):
    with pytest.raises(IllegalTransition, match=f"-> {target.value}$"):
        advance(phase, step, target)


def test_every_phase_has_a_row_and_every_admitted_one_can_close():
    assert set(TRANSITIONS) == set(Phase)
    for phase in set(Phase) - {Phase.NEW}:
        assert TRANSITIONS[phase][Step.CLOSE] == {Phase.CLOSED}, phase
    reachable = {Phase.NEW} | {
        t for row in TRANSITIONS.values() for targets in row.values() for t in targets
    }
    assert reachable == set(Phase)


# --- the gate walks the table -------------------------------------------------------------


class Clock:
    """One second per reading: latencies and durations are exact."""

    def __init__(self):
        self.readings = itertools.count(100.0)

    def __call__(self) -> float:
        return next(self.readings)


@pytest.fixture
def gate(tmp_path):
    gate = make_gate(tmp_path)
    gate.clock = Clock()
    return gate


def connect(gate, dst: str, port: int, key=("k", 1)):
    return gate.on_connect(key, SANDBOX, 40000, dst, port)


def test_pass_through_walk_with_exact_latency_and_duration(gate):
    state = connect(gate, "203.0.113.10", 443)  # clock 100
    assert state.phase is Phase.OPEN
    assert (
        gate.on_first_bytes(state, client_hello("allowed.test")) is Outcome.PASSTHROUGH
    )  # 101, emitted at 102
    assert state.phase is Phase.PASSING
    gate.on_close(state)  # 103
    assert state.phase is Phase.CLOSED
    allow, end = gate.events
    assert (str(allow.verdict), allow.latency) == ("allow", 1.0)
    assert (str(end.kind), end.duration) == ("connection_end", 3.0)


def test_silence_walk(gate):
    state = connect(gate, "203.0.113.10", 22)
    assert gate.on_silence(state) is Outcome.PASSTHROUGH and state.phase is Phase.SILENT
    assert gate.on_server_spoke(state) is Outcome.PASSTHROUGH and state.phase is Phase.PASSING
    assert [str(e.reason) for e in gate.events] == ["rule_allow"]


def test_hand_off_walk(gate):
    state = connect(gate, "203.0.113.10", 80, key=(SANDBOX, 40000))
    assert (
        gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n") is Outcome.HTTP
        and state.phase is Phase.HTTP
    )
    assert gate.hand_off(state) and state.phase is Phase.HANDED_OFF
    assert gate.adopt((SANDBOX, 40000), "mitm-1") is state and state.phase is Phase.HTTP
    assert gate.on_request(state, request_head("allowed.test"), tls=False)[0].allowed
    gate.on_close(state)
    gate.on_close(state)  # a second close is legal and reports nothing
    assert state.phase is Phase.CLOSED and gate.connections == {}
    # The request's allow, and the connection's end under it.
    assert [str(e.reason) for e in gate.events] == ["rule_allow", "rule_allow"]
    assert [str(e.kind) for e in gate.events] == ["request", "connection_end"]


def _illegal(gate, call: str) -> tuple:
    """Run an adapter's illegal call; return (what it returned, the connection)."""
    state = connect(gate, "203.0.113.10", 22)
    if call == "hand_off_undecided":
        return gate.hand_off(state), state
    gate.on_first_bytes(state, b"SSH-2.0-x\r\n")  # allowed, relayed
    assert state.phase is Phase.PASSING
    if call == "server_spoke_not_silent":
        return gate.on_server_spoke(state), state
    if call == "silence_after_decision":
        return gate.on_silence(state), state
    if call == "request_on_relay":
        return gate.on_request(state, request_head("allowed.test"), tls=False)[0].verdict, state
    gate.on_close(state)
    return gate.on_first_bytes(state, b"more"), state


@pytest.mark.parametrize(
    "call, returned, kind, phase",
    [
        pytest.param(
            "hand_off_undecided", False, "connection", Phase.REJECTED, id="hand-off-undecided"
        ),
        pytest.param(
            "server_spoke_not_silent",
            Outcome.REJECT,
            "connection",
            Phase.PASSING,
            id="server-spoke",
        ),
        pytest.param(
            "silence_after_decision", Outcome.REJECT, "connection", Phase.PASSING, id="silence"
        ),
        pytest.param("request_on_relay", "deny", "request", Phase.PASSING, id="request-on-relay"),
        pytest.param(
            "bytes_after_close", Outcome.REJECT, "connection", Phase.CLOSED, id="bytes-after-close"
        ),
    ],
)
def test_an_illegal_call_is_a_reported_deny_not_an_exception(gate, call, returned, kind, phase):
    result, state = _illegal(gate, call)
    assert result == returned
    last = gate.events[-1]
    assert (str(last.kind), str(last.verdict), str(last.reason), last.rule_id) == (
        kind,
        "deny",
        "internal_error",
        "builtin:internal-error",
    )
    assert "illegal" in last.detail
    assert state.phase is phase
