"""What a human approved is decided again with the checks a rule's allow gets.

Red team `trail` (session 50) found three short-cuts in proxy/gate.py where "the
human's answer stands" skipped those checks: a reload that makes a relayed connection
need inspection did not close an approved one (only a rule-allowed one), a held
connection was released after a reload on the decision made before it, and a
WebSocket tunnel let through by an approval `--for` a while outlived the approval; an
`always` also went on granting its task after its rule expired or was removed
(proxy/approvals/pending.py). The principle these tests hold, for each scope: the
policy in force decides; an approval only answers what it still asks, and only while
that approval is in force (a `--for` until its end, an `always` while its rule is).
The end-to-end versions: tests/e2e/test_approved_connections_meet_reloads.py,
test_approval_always_ends_with_its_rule.py, test_approval_for_closes_its_websocket.py."""

from __future__ import annotations

import itertools

import pytest
from sandgate.proxy.approvals.holder import Answer, HoldResult
from sandgate.proxy.approvals.pending import AskKey, PendingStore, Scope
from sandgate.proxy.dns.bindings import DnsBindings
from sandgate.proxy.gate import ConnectionGate, Outcome
from sandgate.proxy.policy import load_policy
from sandgate.proxy.policy.request_head import RequestHead
from sandgate.proxy.registry import Sandbox, SandboxRegistry
from support.fakes import SANDBOX, client_hello

APPROVAL_ID = "a1b2c3d4"
HEAD = "version: 1\nprofiles:\n  default:\n    rules:\n"
ASK = "      - ask: ask.test\n        ports: [443, 5432]\n        id: ask-it\n"
ASK_WS = (
    "      - ask: ws.ask.test\n        ports: [80]\n        methods: [GET]\n"
    "        websocket: true\n        id: ask-ws\n"
)
ALLOW_WS = (
    "      - allow: ws.allowed.test\n        ports: [80]\n        websocket: true\n        id: ws\n"
)
RULES = HEAD + ASK + ASK_WS + ALLOW_WS
# A reload that makes ask.test need inspection: a deny of some paths.
PATH_DENY = '      - deny: ask.test\n        paths: ["/admin/**"]\n        id: never-admin\n'
DENY = "      - deny: ask.test\n        ports: [443, 5432]\n        id: no-ask\n"
# A rule of paths on the raw-TCP port: bytes there cannot be held to it.
TCP_PATHS = '      - deny: ask.test\n        ports: [5432]\n        paths: ["/x"]\n'
DENIED = HEAD + DENY + ASK + ASK_WS + ALLOW_WS
ALLOW = "      - allow: ask.test\n        ports: [443, 5432]\n        id: allowed-now\n"
ALWAYS_RULE = (
    f"approved:\n  default:\n    - allow: ask.test\n      ports: [443]\n"
    f"      id: approved:{APPROVAL_ID}\n"
)
BINDINGS = {
    "ask.test": "203.0.113.20",
    "ws.ask.test": "203.0.113.31",
    "ws.allowed.test": "203.0.113.30",
}


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    """A gate with approvals over `rules`, one sandbox, its DNS bindings."""

    def __init__(self, tmp_path, rules: str = RULES):
        self.path = tmp_path / "rules.yaml"
        self.path.write_text(rules)
        registry = SandboxRegistry()
        registry.add(Sandbox(SANDBOX, "task1", "default"))
        bindings = DnsBindings()
        for name, ip in BINDINGS.items():
            bindings.record(SANDBOX, name, ip, 600)
        self.clock = Clock()
        ids = itertools.chain([APPROVAL_ID], (f"{n:08x}" for n in itertools.count(1)))
        self.store = PendingStore(self.clock, new_id=lambda: next(ids))
        self.events: list = []
        self.gate = ConnectionGate(
            load_policy(self.path), registry, bindings, self.events.append, approvals=self.store
        )
        self.watched: list = []
        self.gate.on_grant = self.watched.append
        self.keys = itertools.count()

    def reload(self, rules: str) -> list:
        """Put `rules` in force, as Gateway.swap_policy does: the keys it closes."""
        self.path.write_text(rules)
        self.gate.policy = load_policy(self.path)
        return [state.key for state in self.gate.revoke_denied()]

    def approve(self, key: AskKey, scope: Scope, duration: float | None = None) -> HoldResult:
        """A human approves the ask `key` while one connection or request is held on it."""
        found, _ = self.store.ask(key, expire_pending=600, max_pending=20)
        self.store.join(found)
        self.store.approve(found.id, "uid 0 (root)", scope, duration=duration)
        self.store.leave(found)
        return HoldResult(Answer.GRANTED, found, 1.0)

    def held(self, port: int = 443, data: bytes | None = None):
        """A connection to ask.test held at its first bytes (TLS, or raw TCP)."""
        state = self.gate.on_connect(next(self.keys), SANDBOX, 40000, BINDINGS["ask.test"], port)
        data = client_hello("ask.test") if data is None else data
        assert self.gate.on_first_bytes(state, data) is Outcome.ASK
        return state

    def approved(self, scope: Scope, duration=None, port=443, data=None):
        """A connection to ask.test held, approved with `scope`, answered: relayed."""
        state = self.held(port, data)
        answer = self.approve(state.ask_key, scope, duration)
        assert self.gate.on_answer(state, answer) is Outcome.PASSTHROUGH
        return state, answer.pending


SCOPES = [
    pytest.param(Scope.ONCE, None, id="once"),
    pytest.param(Scope.TASK, None, id="task"),
    pytest.param(Scope.DURATION, 3600.0, id="for"),
]


# --- 1. a reload: an approved relayed connection meets the new rules --------------------


@pytest.mark.parametrize("scope, duration", SCOPES)
def test_a_reload_that_makes_an_approved_relayed_connection_need_inspection_closes_it(
    tmp_path, scope, duration
):
    s = Setup(tmp_path)
    state, _ = s.approved(scope, duration)
    assert s.reload(RULES) == []  # the same question: the approval still answers it
    assert s.reload(RULES + PATH_DENY) == [state.key]
    (closed,) = [e for e in s.events if str(e.reason) == "policy_changed"]
    assert closed.rule_id == "builtin:policy-changed", closed
    assert "which a relayed connection cannot be held to" in closed.detail


def test_a_rule_allowed_relayed_connection_is_closed_alike(tmp_path):
    """The control: what the approved connections above now get."""
    s = Setup(tmp_path, RULES + ALLOW)
    state = s.gate.on_connect("k", SANDBOX, 40000, BINDINGS["ask.test"], 443)
    assert s.gate.on_first_bytes(state, client_hello("ask.test")) is Outcome.PASSTHROUGH
    assert s.reload(RULES + ALLOW + PATH_DENY) == ["k"]


@pytest.mark.parametrize("scope, duration", SCOPES)
def test_a_reload_that_denies_an_approved_connection_closes_it(tmp_path, scope, duration):
    s = Setup(tmp_path)
    state, _ = s.approved(scope, duration)
    assert s.reload(DENIED) == [state.key]
    (closed,) = [e for e in s.events if str(e.reason) == "policy_changed"]
    assert closed.rule_id == "no-ask", closed


def test_an_approved_raw_tcp_connection_is_closed_when_a_rule_checks_paths_there(tmp_path):
    """Raw TCP cannot be held to a rule of methods or paths: `not_http`, approved or not."""
    s = Setup(tmp_path)
    state, _ = s.approved(Scope.TASK, port=5432, data=b"\x00\x00\x00\x08binary")
    assert state.protocol == "tcp"
    assert s.reload(RULES + TCP_PATHS) == [state.key]
    (closed,) = [e for e in s.events if str(e.reason) == "policy_changed"]
    assert "not_http" in closed.detail, closed.detail


def test_an_approval_for_a_while_closes_its_connection_at_its_end(tmp_path):
    s = Setup(tmp_path)
    state, approval = s.approved(Scope.DURATION, 60.0)
    assert s.watched == [approval]  # the gateway decides again at its end
    s.clock.now += 59
    assert s.gate.revoke_denied() == []
    s.clock.now += 2
    assert [x.key for x in s.gate.revoke_denied()] == [state.key]
    (closed,) = [e for e in s.events if str(e.reason) == "policy_changed"]
    assert f"approval {APPROVAL_ID} (duration) has ended" in closed.detail


@pytest.mark.parametrize(
    "scope, duration, closed",
    [
        pytest.param(Scope.TASK, None, False, id="task"),
        pytest.param(Scope.DURATION, 60.0, True, id="for"),
    ],
)
def test_an_approval_still_answers_after_a_reload_in_between_allowed_it_by_a_rule(
    tmp_path, scope, duration, closed
):
    """A rule's allow in between does not take the approval away, nor stand for it."""
    s = Setup(tmp_path)
    state, _ = s.approved(scope, duration)
    assert s.reload(RULES + ALLOW) == []
    s.clock.now += 61  # a `--for` has ended by now; the rule allows it
    assert s.gate.revoke_denied() == []
    # Asked again: the task's approval still answers; the ended `--for` does not.
    assert s.reload(RULES) == ([state.key] if closed else [])


# --- 2. held across a reload: decided under the rules in force at the answer ------------


@pytest.mark.parametrize(
    "extra, port, data, outcome, reason",
    [
        pytest.param("", 443, None, Outcome.PASSTHROUGH, "approval_granted", id="unchanged"),
        pytest.param(
            PATH_DENY, 443, None, Outcome.INTERCEPT, "approval_granted", id="tls-inspected"
        ),
        pytest.param(ALLOW, 443, None, Outcome.PASSTHROUGH, "approval_granted", id="allowed-now"),
        pytest.param(
            ALLOW + PATH_DENY,
            443,
            None,
            Outcome.INTERCEPT,
            "approval_granted",
            id="allowed-inspected",
        ),
    ],
)
def test_a_connection_held_across_a_reload_is_decided_under_the_new_rules_at_its_answer(
    tmp_path, extra, port, data, outcome, reason
):
    s = Setup(tmp_path)
    state = s.held(port, data)
    assert s.reload(RULES + extra) == []  # still held: decided at its answer
    answer = s.approve(state.ask_key, Scope.TASK)
    assert s.gate.on_answer(state, answer) is outcome
    event = s.events[-1]
    assert (str(event.reason), event.approval_id) == (reason, APPROVAL_ID), event


@pytest.mark.parametrize(
    "rules, port, data",
    [
        pytest.param(DENIED, 443, None, id="deny"),
        pytest.param(RULES + TCP_PATHS, 5432, b"\x00\x00\x00\x08binary", id="tcp-not-http"),
    ],
)
def test_a_connection_held_across_a_reload_that_denies_it_is_closed_by_the_reload(
    tmp_path, rules, port, data
):
    s = Setup(tmp_path)
    state = s.held(port, data)
    assert s.reload(rules) == [state.key]


def test_a_held_connection_the_policy_denies_at_its_answer_is_refused(tmp_path):
    """A reload's deny closes a held connection at once; one answered anyway (the
    adapter's race) is refused: the deny wins over the approval."""
    s = Setup(tmp_path)
    state = s.held()
    s.path.write_text(DENIED)
    s.gate.policy = load_policy(s.path)  # swapped, not yet re-decided
    answer = s.approve(state.ask_key, Scope.TASK)
    assert s.gate.on_answer(state, answer) is Outcome.REJECT
    event = s.events[-1]
    assert (str(event.reason), event.rule_id) == ("policy_changed", "no-ask"), event
    assert "approved, but the policy in force at the answer denies it" in event.detail


# --- 3. always: as long as its rule is in force ----------------------------------------


def always(s: Setup, rule: str):
    """A connection to ask.test held, then approved `always` as the gateway does it:
    its rule written and reloaded (the held connection stays held), then committed."""
    state = s.held()
    assert s.reload(RULES + rule) == []
    answer = s.approve(state.ask_key, Scope.ALWAYS)  # filed as the task's grant too
    assert s.gate.on_answer(state, answer) is Outcome.PASSTHROUGH
    return state


def test_an_always_grants_its_task_only_while_its_rule_is_in_force(tmp_path):
    s = Setup(tmp_path)
    state = always(s, ALWAYS_RULE)
    assert s.store.grant_for(state.ask_key).approved  # its rule is in force
    assert s.reload(RULES + ALWAYS_RULE) == []
    # The admin removes the rule from approved.yaml and reloads: what the approval let
    # through closes, and the task is asked again.
    assert s.reload(RULES) == [state.key]
    (closed,) = [e for e in s.events if str(e.reason) == "policy_changed"]
    assert f"its rule approved:{APPROVAL_ID} is no longer in force" in closed.detail
    assert s.store.grant_for(state.ask_key) is None and not s.store.task


def test_an_always_whose_rule_expired_grants_nothing_more(tmp_path):
    s = Setup(tmp_path)
    expiring = ALWAYS_RULE + "      expires: 2099-06-30T12:00:00Z\n"
    expiry = load_policy(_file(tmp_path, RULES + expiring)).next_expiry_at
    s.gate.wall_clock = lambda: expiry - 1
    state = always(s, expiring)
    again = s.gate.on_connect("again", SANDBOX, 40001, BINDINGS["ask.test"], 443)
    assert s.gate.on_first_bytes(again, client_hello("ask.test")) is Outcome.PASSTHROUGH
    assert s.gate.revoke_denied() == []
    s.gate.wall_clock = lambda: expiry  # the rule's instant: its expiry timer runs this
    assert {x.key for x in s.gate.revoke_denied()} == {state.key, "again"}
    later = s.gate.on_connect("later", SANDBOX, 40002, BINDINGS["ask.test"], 443)
    assert s.gate.on_first_bytes(later, client_hello("ask.test")) is Outcome.ASK
    assert s.store.grant_for(later.ask_key) is None


def _file(tmp_path, text):
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return path


def test_a_store_without_a_gate_keeps_an_always_for_its_task():
    """PendingStore alone (no policy to ask): an `always` is the task's grant, as before."""
    store = PendingStore(Clock())
    key = AskKey.make(
        task_id="t1", sandbox=SANDBOX, profile="default", name="a.test", port=443, protocol="tls"
    )
    found, _ = store.ask(key, expire_pending=60, max_pending=5)
    store.approve(found.id, "uid 0", Scope.ALWAYS)
    assert store.grant_for(key).approved
    store.in_force = lambda approval: False
    assert store.grant_for(key) is None and not store.task


# --- 4. a WebSocket tunnel: as long as the approval of its upgrade ----------------------


def upgrade(host: str) -> RequestHead:
    return RequestHead(b"GET", b"/ws", ((b"host", host.encode()), (b"upgrade", b"websocket")))


def tunnel(s: Setup, key, scope: Scope | None, duration=None, host="ws.ask.test"):
    """A plain-HTTP connection whose WebSocket upgrade to `host` was let through (held
    and approved with `scope`; None: answered at once) and accepted (101)."""
    state = s.gate.on_connect(key, SANDBOX, 40000, BINDINGS[host], 80)
    assert s.gate.on_first_bytes(state, b"GET /ws HTTP/1.1\r\n") is Outcome.HTTP
    head = upgrade(host)
    decision, checked = s.gate.on_request(state, head, tls=False)
    if scope is not None:
        assert str(decision.verdict) == "ask", decision
        ask_key = s.gate.request_ask_key(state, decision, checked, False)
        answer = s.approve(ask_key, scope, duration)
        decision, checked = s.gate.on_request_answer(state, decision, answer, head, checked, False)
    assert decision.allowed and checked.websocket, decision
    s.gate.on_tunnel(state, checked)
    return state


def test_a_tunnel_approved_for_a_while_is_closed_at_the_approvals_end(tmp_path):
    s = Setup(tmp_path)
    first = tunnel(s, "first", Scope.DURATION, 60.0)
    second = tunnel(s, "second", None)  # answered at once by the same approval's grant
    assert second.tunnel_grant is first.tunnel_grant and s.watched
    s.clock.now += 59
    assert s.gate.revoke_denied() == []
    s.clock.now += 2
    assert sorted(x.key for x in s.gate.revoke_denied()) == ["first", "second"]
    closed = [e for e in s.events if str(e.reason) == "policy_changed"]
    assert all("approval_expired" in e.detail for e in closed), closed


@pytest.mark.parametrize("scope", [Scope.ONCE, Scope.TASK], ids=["once", "task"])
def test_a_tunnel_approved_without_an_end_stays_while_the_policy_still_asks(tmp_path, scope):
    s = Setup(tmp_path)
    tunnel(s, "t", scope)
    s.clock.now += 10_000
    assert s.reload(RULES) == []
    assert s.reload(HEAD + ASK + ALLOW_WS) == ["t"]  # no rule asks or allows it: closed


def test_a_tunnel_a_rule_allowed_is_closed_when_a_reload_makes_it_asked(tmp_path):
    """Nobody answered the question the policy asks now: the tunnel does not go on."""
    s = Setup(tmp_path)
    tunnel(s, "t", None, host="ws.allowed.test")
    asked = ALLOW_WS.replace("- allow:", "- ask:")
    assert s.reload(HEAD + ASK + ASK_WS + asked) == ["t"]
