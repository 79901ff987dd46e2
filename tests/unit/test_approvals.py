"""The approvals core: ask rules in the policy, the pending store's state table,
coalescing, scopes, races and floods; the placeholder pool; the holder on a loop."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
import textwrap

import pytest
import yaml
from sandgate.enforcer.approvals_control import always_writer, handle, serve
from sandgate.enforcer.cli import main
from sandgate.proxy.approvals.holder import Answer, Approvals
from sandgate.proxy.approvals.overlay import append_approved, rule_expiry
from sandgate.proxy.approvals.pending import (
    ApprovalError,
    AskKey,
    PendingStore,
    Scope,
    State,
    widen_pattern,
)
from sandgate.proxy.dns.placeholders import POOL, Placeholders, in_pool
from sandgate.proxy.gateway import asks
from sandgate.proxy.policy import (
    ConnectFacts,
    NameFacts,
    Reason,
    RequestFacts,
    Verdict,
    decide,
    load_policy,
)
from sandgate.proxy.policy.model import ApprovalSettings, parse_duration
from sandgate.proxy.telemetry.metrics import Metrics


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(name="api.example.test", task="t1", sandbox="10.213.0.2", port=443, **kw) -> AskKey:
    return AskKey.make(
        task_id=task, sandbox=sandbox, profile="p", name=name, port=port, protocol="tls", **kw
    )


def store() -> tuple[PendingStore, Clock]:
    clock = Clock()
    ids = iter(f"id{i}" for i in range(1000))
    return PendingStore(clock, new_id=lambda: next(ids)), clock


def ask(s: PendingStore, k: AskKey, max_pending=20):
    return s.ask(k, expire_pending=3600, max_pending=max_pending)


# --- the policy -------------------------------------------------------------------------


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            version: 1
            profiles:
              p:
                approval: {hold: 2s, expire_pending: 1h, max_pending_per_sandbox: 3}
                rules:
                  - ask: ["*.example.test", pastebin.test]
                  - allow: ok.example.test
                  - deny: evil.example.test
                  - ask: api.post.test
                    methods: [POST]
              q:
                fallback: ask
            """
        )
    )
    return load_policy(path)


@pytest.mark.parametrize(
    "name, verdict, reason",
    [
        pytest.param("pastebin.test", Verdict.ASK, Reason.RULE_ASK, id="ask-rule"),
        pytest.param("x.example.test", Verdict.ASK, Reason.RULE_ASK, id="ask-wildcard"),
        pytest.param("ok.example.test", Verdict.ALLOW, Reason.RULE_ALLOW, id="allow-beats-ask"),
        pytest.param("evil.example.test", Verdict.DENY, Reason.RULE_DENY, id="deny-beats-ask"),
        pytest.param("example.test", Verdict.DENY, Reason.NO_RULE, id="wildcard-not-base"),
    ],
)
def test_ask_rules_in_the_check_order(policy, name, verdict, reason):
    decision = decide(policy, ConnectFacts(profile="p", port=443, name=name))
    assert (decision.verdict, decision.reason) == (verdict, reason)
    assert decide(policy, NameFacts("p", name)).verdict == verdict


def test_request_ask_allows_the_connection_with_inspection_and_asks_the_request(policy):
    connect = decide(policy, ConnectFacts(profile="p", port=443, name="api.post.test"))
    assert (connect.verdict, connect.inspect) == (Verdict.ALLOW, True)
    assert decide(policy, NameFacts("p", "api.post.test")).verdict is Verdict.ALLOW
    post = RequestFacts(profile="p", port=443, method="post", path="/x", name="api.post.test")
    assert decide(policy, post).verdict is Verdict.ASK
    get = RequestFacts(profile="p", port=443, method="GET", path="/x", name="api.post.test")
    assert decide(policy, get).verdict is Verdict.DENY


def test_fallback_ask_and_approval_settings(policy):
    assert decide(policy, ConnectFacts(profile="q", port=443, name="a.test")).verdict is Verdict.ASK
    assert policy.approval_for("p") == ApprovalSettings(2.0, 3600.0, 3)
    assert policy.approval_for("q") == ApprovalSettings()


def test_which_profiles_may_ask_a_human(policy, tmp_path):
    """gateway.asks: an ask rule (any kind) or `fallback: ask`; a profile that never
    asks gets no approvals page in an embedded run (enforcer/run.py)."""
    assert asks(policy, "p") and asks(policy, "q") and asks(policy)
    path = tmp_path / "never.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  n:\n    fallback: deny\n    rules:\n      - allow: a.test\n"
        "      - deny: b.test\n  m:\n    rules:\n      - allow: c.test\n"
        "        methods: [GET]\n"
    )
    never = load_policy(path)
    assert not asks(never, "n") and not asks(never, "m") and not asks(never)


def test_durations():
    assert [parse_duration(t) for t in ("30s", "5m", "24h", "7d", "500ms")] == [
        30,
        300,
        86400,
        604800,
        0.5,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


# --- the store ----------------------------------------------------------------------------


def test_names_are_canonical_so_spellings_share_one_approval():
    s, _ = store()
    first, new = ask(s, key("EVIL.test."))
    second, again = ask(s, key("evil.test"))
    assert new and not again and first is second and first.asks == 2
    assert key("EVIL.test.").name == "evil.test"


def test_different_tasks_ports_protocols_are_different_asks():
    s, _ = store()
    ids = {
        ask(s, k)[0].id for k in (key(), key(task="t2"), key(port=22), key(method="GET", path="/a"))
    }
    assert len(ids) == 4


def test_state_table_first_decision_wins_and_the_second_is_told():
    s, _ = store()
    pending, _ = ask(s, key())
    s.approve(pending.id, "uid 0 (root)", Scope.TASK)
    with pytest.raises(ApprovalError, match="already approved \\(task\\) by uid 0 \\(root\\)"):
        s.deny(pending.id, "uid 1000 (alice)")
    assert pending.state is State.APPROVED and pending.approver == "uid 0 (root)"
    with pytest.raises(ApprovalError, match="no approval 'nope'"):
        s.approve("nope", "x", Scope.ONCE)


def test_a_duration_that_cannot_end_leaves_the_approval_pending():
    # The step came first: APPROVED, out of the pending list, with no `until`.
    s, _ = store()
    pending, _ = ask(s, key())
    with pytest.raises(ApprovalError, match="cannot be granted"):
        s.approve(pending.id, "uid 0 (root)", Scope.DURATION, duration=10**400)
    assert pending.state is State.PENDING and pending.approver is None
    assert s.get(pending.id) is pending and s.grant_for(key()) is None
    s.approve(pending.id, "uid 0 (root)", Scope.DURATION, duration=60)
    assert pending.until == pending.decided_at + 60 and s.grant_for(key()).approved


def test_scopes():
    s, clock = store()
    # once, nobody held: the next ask is granted, then asks again
    p, _ = ask(s, key("once.test"))
    s.approve(p.id, "a", Scope.ONCE)
    assert s.grant_for(key("once.test")).approved
    assert s.grant_for(key("once.test")) is None
    # task: the same task only
    p, _ = ask(s, key("task.test"))
    s.approve(p.id, "a", Scope.TASK)
    assert s.grant_for(key("task.test")).approved and s.grant_for(key("task.test")).approved
    assert s.grant_for(key("task.test", task="t2")) is None
    # duration: every task of the profile, until it runs out
    p, _ = ask(s, key("for.test"))
    s.approve(p.id, "a", Scope.DURATION, duration=60)
    assert s.grant_for(key("for.test", task="t9")).approved
    clock.now += 61
    assert s.grant_for(key("for.test", task="t9")) is None
    # never wider than asked: the parent name and another port are not covered
    assert s.grant_for(key("example.test")) is None
    assert s.grant_for(key("task.test", port=80)) is None
    # a denial answers the task's retries at once
    p, _ = ask(s, key("no.test"))
    s.deny(p.id, "a")
    assert s.grant_for(key("no.test")).approved is False
    s.forget_task("t1")
    assert s.grant_for(key("no.test")) is None and s.grant_for(key("task.test")) is None


def test_a_flood_hits_the_queue_cap_and_other_sandboxes_are_unaffected():
    s, _ = store()
    for i in range(3):
        assert ask(s, key(f"n{i}.test"), max_pending=3)[0] is not None
    assert ask(s, key("n9.test"), max_pending=3) == (None, False)
    assert len(s.list()) == 3  # the refused one opened nothing
    assert ask(s, key("n0.test"), max_pending=3)[0] is not None  # joining is no new one
    assert ask(s, key("n9.test", sandbox="10.213.0.6"), max_pending=3)[0] is not None


def test_ended_tasks_approvals_stay_open_but_the_gateway_holds_at_most_max_open():
    """Each task of a sandbox may open max_pending; an ended task's stay open (and stop
    counting for its sandbox), so tasks one after another would open them without end."""
    s, _ = store()
    s.max_open = 6
    for task in ("t1", "t2", "t3"):
        for i in range(2):
            assert ask(s, key(f"n{i}.test", task=task), max_pending=2)[0] is not None
        s.forget_task(task)
    assert len(s.list()) == 6
    assert ask(s, key("n9.test", task="t4"), max_pending=2) == (None, False)
    assert ask(s, key("n9.test", task="t9", sandbox="10.213.0.6"), max_pending=2) == (None, False)
    assert len(s.list()) == 6  # the refused ones opened nothing
    assert ask(s, key("n0.test", task="t1"))[0] is not None  # joining an open one still works
    s.deny(s.list()[0].id, "a")
    assert ask(s, key("n9.test", task="t4"), max_pending=2)[0] is not None


def test_expiry():
    s, clock = store()
    p, _ = ask(s, key())
    clock.now += 3601
    assert s.expire() == [p] and p.state is State.EXPIRED and s.list() == []
    with pytest.raises(ApprovalError, match="expired: nobody decided it in time"):
        s.approve(p.id, "a", Scope.ONCE)


def test_a_pending_approval_outlives_its_task_for_the_profile_wide_scopes():
    s, clock = store()
    (a, _), (b, _), (c, _), (d, _) = (ask(s, key(f"{n}.test"), max_pending=4) for n in "abcd")
    assert ask(s, key("e.test"), max_pending=4) == (None, False)
    assert s.forget_task("t1") == [a, b, c, d]
    assert all(p.state is State.PENDING and p.task_ended for p in (a, b, c, d))
    assert [p["task_ended"] for p in (x.to_dict(clock.now) for x in s.list())] == [True] * 4
    # once or task would grant nothing: refused, and still pending
    for scope in (Scope.ONCE, Scope.TASK):
        with pytest.raises(
            ApprovalError, match="the task has ended; approve --for or --always, or deny"
        ):
            s.approve(a.id, "uid 0 (root)", scope)
    assert a.state is State.PENDING and a.approver is None
    # the profile-wide scopes still apply: a later task of the profile is granted
    s.approve(a.id, "uid 0 (root)", Scope.DURATION, duration=60)
    assert s.grant_for(key("a.test", task="t2")).approved
    s.approve(b.id, "uid 0 (root)", Scope.ALWAYS)
    s.deny(c.id, "uid 0 (root)")
    # nothing is kept for the task that is gone
    assert not s.task and not s.denied and s.grant_for(key("c.test", task="t2")) is None
    # a new task at the same address has its own cap: the ended task's approval is not counted
    assert all(ask(s, key(f"n{i}.test", task="t2"), max_pending=4)[0] for i in range(4))
    assert ask(s, key("n9.test", task="t2"), max_pending=4) == (None, False)
    # and what nobody decides expires after expire_pending, as before
    clock.now += 3601
    assert d in s.expire() and d.state is State.EXPIRED


def test_the_holder_says_a_task_ended_and_refuses_once_with_a_clear_message():
    events, changes = [], []
    settings = ApprovalSettings(hold=0.1, expire_pending=60, max_pending_per_sandbox=5)

    async def scenario():
        approvals = Approvals(events.append, lambda profile: settings)
        approvals.subscribe(lambda what, record: changes.append((what, record["task_ended"])))
        held = await approvals.hold(key(), "r", {})
        approvals.forget_task("t1")
        refused = await handle(approvals, {"cmd": "approve", "id": held.pending.id}, "uid 0 (root)")
        listed = approvals.list()
        denied = await handle(approvals, {"cmd": "deny", "id": held.pending.id}, "uid 0 (root)")
        return held, refused, listed, denied

    held, refused, listed, denied = asyncio.run(scenario())
    assert held.answer is Answer.PENDING
    assert refused == {
        "ok": False,
        "error": f"approve: approval {held.pending.id}: the task has ended; "
        "approve --for or --always, or deny",
    }
    assert [(a["state"], a["task_ended"]) for a in listed] == [("pending", True)]
    assert denied["ok"] and denied["approval"]["state"] == "denied"
    ended = [e for e in events if "the task has ended" in e.detail]
    assert [(e.verdict, e.reason, e.approval_id) for e in ended] == [
        (Verdict.ASK, Reason.APPROVAL_PENDING, held.pending.id)
    ]
    assert events[-1].reason is Reason.APPROVAL_DENIED and "its task had ended" in events[-1].detail
    assert changes == [("new", False), ("task_ended", True), ("denied", True)]


def test_a_task_ending_is_no_decision_in_the_metrics():
    metrics = Metrics()
    settings = ApprovalSettings(hold=0.05, expire_pending=60, max_pending_per_sandbox=5)

    async def scenario():
        approvals = Approvals(metrics.emit, lambda profile: settings)
        await approvals.hold(key(), "r", {})
        approvals.forget_task("t1")

    asyncio.run(scenario())
    outcomes = {
        s.labels["outcome"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "sandgate_approval_decisions_total"
    }
    assert outcomes == {"timeout": 1.0}  # the hold's end; the task's end decided nothing


@pytest.mark.parametrize(
    "given, message",
    [
        pytest.param("*", "'\\*' would allow everything", id="bare-star"),
        pytest.param("*.test", "public suffix 'test'", id="single-label-suffix"),
        pytest.param("*.co.uk", "public suffix 'co.uk'", id="public-suffix"),
        pytest.param("*.ngrok-free.app", "anyone can register", id="private-public-suffix"),
        pytest.param("example.test", "not a wildcard", id="no-wildcard"),
        pytest.param(
            "*.other.test", "does not cover the asked name api.example.test", id="elsewhere"
        ),
        pytest.param("*.api.example.test", "does not cover", id="the-name-itself-is-not-below"),
        pytest.param("a.*.example.test", "only one leading|whole leftmost label", id="mid-star"),
        pytest.param("*.exa mple.test", "control character or space", id="bad-label"),
    ],
)
def test_a_widening_must_be_a_wildcard_that_covers_the_asked_name(given, message):
    with pytest.raises(ApprovalError, match=message):
        widen_pattern(key(), given)


def test_an_explicit_widening_covers_siblings_and_a_plain_approval_does_not():
    s, clock = store()
    assert widen_pattern(key(), " *.EXAMPLE.test. ") == "*.example.test"
    plain, _ = ask(s, key("www.plain.test"))
    s.approve(plain.id, "a", Scope.DURATION, duration=60)
    assert s.grant_for(key("api.plain.test")) is None
    wide, _ = ask(s, key())
    # only with the profile-wide scopes, and refused before anything is decided
    for scope in (Scope.ONCE, Scope.TASK):
        with pytest.raises(ApprovalError, match="--widen goes with --for or --always"):
            s.approve(wide.id, "a", scope, widen="*.example.test")
    with pytest.raises(ApprovalError, match="does not cover"):
        s.approve(wide.id, "a", Scope.DURATION, duration=60, widen="*.other.test")
    assert wide.state is State.PENDING
    s.approve(wide.id, "a", Scope.DURATION, duration=60, widen="*.Example.test")
    assert (
        wide.widened == "*.example.test" and wide.to_dict(clock.now)["widened"] == "*.example.test"
    )
    for name in ("api.example.test", "www.example.test", "a.b.example.test"):
        grant = s.grant_for(key(name, task="t2"))
        assert grant.approved and grant.pending is wide, name
    # never the wildcard's own domain, another port or protocol, or another profile
    assert s.grant_for(key("example.test")) is None
    assert s.grant_for(key("www.example.test", port=80)) is None
    other = AskKey.make(
        task_id="t1", sandbox="s", profile="q", name="www.example.test", port=443, protocol="tls"
    )
    assert s.grant_for(other) is None
    clock.now += 61
    assert s.grant_for(key("www.example.test")) is None
    s.expire()
    assert not s.widened_durations


def test_a_widened_always_writes_the_wildcard_rule_and_the_event_records_it(tmp_path, policy):
    events = []
    settings = ApprovalSettings(hold=0.1, expire_pending=60, max_pending_per_sandbox=5)
    rules = tmp_path / "rules.yaml"

    async def scenario():
        approvals = Approvals(events.append, lambda profile: settings)

        async def reload(actor):
            return []

        approvals.on_always = always_writer(tmp_path / "approved.yaml", reload)
        held = await approvals.hold(key("www.example.test"), "r", {})
        request = {
            "cmd": "approve",
            "id": held.pending.id,
            "scope": "always",
            "widen": "*.example.test",
        }
        return await handle(approvals, request, "uid 0 (root)")

    reply = asyncio.run(scenario())
    assert reply["ok"] and reply["approval"]["widened"] == "*.example.test", reply
    approved = yaml.safe_load((tmp_path / "approved.yaml").read_text())["approved"]["p"]
    assert [r["allow"] for r in approved] == ["*.example.test"]
    reloaded = load_policy(rules)
    for name in ("www.example.test", "sibling.example.test"):
        assert decide(reloaded, ConnectFacts(profile="p", port=443, name=name)).allowed, name
    assert not decide(
        reloaded, ConnectFacts(profile="p", port=80, name="sibling.example.test")
    ).allowed
    (granted,) = [e for e in events if e.reason is Reason.APPROVAL_GRANTED]
    assert granted.widened == "*.example.test" and "widened to *.example.test" in granted.detail


def test_always_overlay_is_a_rule_file_for_exactly_what_was_asked(tmp_path, policy):
    rules = tmp_path / "rules.yaml"
    s, _ = store()
    p, _ = ask(s, key("pastebin.test"))
    p.rule_id = "rules.yaml:6"
    append_approved(tmp_path / "approved.yaml", p, "uid 0 (root)")
    reloaded = load_policy(rules)
    assert decide(reloaded, ConnectFacts(profile="p", port=443, name="pastebin.test")).allowed
    assert not decide(reloaded, ConnectFacts(profile="p", port=80, name="pastebin.test")).allowed
    assert (
        decide(reloaded, ConnectFacts(profile="p", port=443, name="x.pastebin.test")).verdict
        is not Verdict.ALLOW
    )
    rule = next(r for r in reloaded.profiles["p"].rules if r.id == f"approved:{p.id}")
    assert rule.owner == "uid 0 (root)" and rule.file == "approved.yaml"


def test_a_placeholder_is_never_an_address_the_host_uses():
    used = {str(POOL[1]), str(POOL[3])}
    pool = Placeholders(taken=used.__contains__)
    handed = {pool.address_for("10.0.0.2", f"n{i}.test") for i in range(4)}
    assert handed == {str(POOL[i]) for i in (2, 4, 5, 6)}


def test_loopback_is_local_and_a_placeholder_is_not():
    from sandgate.proxy.gateway import is_local_address

    assert is_local_address("127.0.0.1")
    assert not is_local_address(str(POOL[7]))


def test_placeholders_per_sandbox():
    pool = Placeholders(max_per_sandbox=2)
    a = pool.address_for("s1", "a.test")
    assert in_pool(ipaddress.ip_address(a)) and ipaddress.ip_address(a) in POOL
    assert pool.address_for("s1", "a.test") == a
    assert pool.name_for("s1", a) == "a.test" and pool.name_for("s2", a) is None
    pool.address_for("s1", "b.test")
    pool.address_for("s1", "c.test")  # over the cap: a.test, least recently used, goes
    assert pool.name_for("s1", a) is None


# --- the holder on a loop -------------------------------------------------------------------


def test_hold_is_released_by_a_decision_and_times_out_otherwise():
    events = []
    settings = ApprovalSettings(hold=0.3, expire_pending=60, max_pending_per_sandbox=5)

    async def scenario():
        approvals = Approvals(events.append, lambda profile: settings)
        held = asyncio.ensure_future(approvals.hold(key(), "r", {}))
        await asyncio.sleep(0.05)
        (pending,) = approvals.list()
        assert pending["held"] == 1
        await approvals.approve(pending["id"], "uid 0 (root)", Scope.ONCE)
        first = await held
        timed_out = await approvals.hold(key("other.test"), "r", {})
        return first, timed_out, approvals

    first, timed_out, approvals = asyncio.run(scenario())
    assert first.answer is Answer.GRANTED
    assert timed_out.answer is Answer.PENDING and timed_out.pending.state is State.PENDING
    reasons = [e.reason for e in events]
    assert reasons == [
        Reason.APPROVAL_REQUESTED,
        Reason.APPROVAL_GRANTED,
        Reason.APPROVAL_REQUESTED,
        Reason.APPROVAL_PENDING,
    ]
    assert events[1].approver == "uid 0 (root)" and events[1].scope == "once"


# --- always with an expiry ------------------------------------------------------------------

NOON = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    "given, written",
    [
        ("2026-06-30", "2026-06-30"),
        ("2026-03-01", "2026-03-01"),  # today: the rule's last day
        ("2026-06-30T18:00:00Z", "2026-06-30T18:00:00+00:00"),
        ("2026-06-30T18:00:00+02:00", "2026-06-30T18:00:00+02:00"),
        ("30d", "2026-03-31T12:00:00Z"),
        (" 12h ", "2026-03-02T00:00:00Z"),
        ("9999-12-31", "9999-12-31"),  # "never": the day after it overflowed datetime
    ],
)
def test_an_always_expiry_is_a_date_an_instant_or_a_time_from_now(given, written):
    assert rule_expiry(given, NOON) == written


@pytest.mark.parametrize(
    "given, message",
    [
        ("tomorrow", "is not a date or an instant; write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ;"),
        ("2026-02-30", "is not a date"),
        ("2026-06-30T18:00:00", "has no time zone"),
        ("2026-02-28", "has already passed"),
        ("2026-03-01T11:59:59Z", "has already passed"),
        ("0d", "is no time at all"),
        ("5x", "'5x' is not a duration"),
        ("9999999d", "is too far off"),
        ("", "is not a date"),
    ],
)
def test_a_bad_always_expiry_is_one_line(given, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        rule_expiry(given, NOON)
    assert "\n" not in str(e.value)


def approve_for(duration) -> tuple[dict, dict | None]:
    """A raw control `approve` of a held connection for `duration` seconds: the reply,
    and the approval as listed after it (None: no longer pending)."""

    async def scenario():
        approvals = Approvals(lambda event: None)
        held = asyncio.ensure_future(approvals.hold(key("pastebin.test"), "r", {}))
        await asyncio.sleep(0.01)
        (pending,) = approvals.list()
        request = {"cmd": "approve", "id": pending["id"], "scope": "duration"}
        reply = await handle(approvals, {**request, "duration": duration}, "uid 0")
        still = next(iter(approvals.list()), None)
        held.cancel()
        return reply, still

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "duration",
    [
        pytest.param(float("inf"), id="inf"),  # JSON 1e400: a grant that never ended
        pytest.param(float("nan"), id="nan"),  # matched nothing, never swept
        pytest.param(10**400, id="400-digits"),  # overflowed the grant's end, once APPROVED
        pytest.param(9_999_999 * 86_400 + 1, id="past-9999999d"),
        pytest.param(True, id="bool"),
        pytest.param(0, id="zero"),
    ],
)
def test_a_duration_no_cli_could_send_is_refused_and_decides_nothing(duration):
    reply, still = approve_for(duration)
    assert not reply["ok"] and "duration must be a number of seconds" in reply["error"], reply
    assert still["state"] == "pending"


def test_the_longest_duration_the_cli_sends_is_taken():
    reply, still = approve_for(parse_duration("9999999d"))
    assert reply["ok"] and still is None, reply


def test_an_embedded_runs_socket_answers_a_nested_line(tmp_path):
    # json.loads raised RecursionError: no reply, and asyncio's "Unhandled exception"
    # on the run's stderr
    async def scenario():
        path = tmp_path / "control.sock"
        server = await serve(path, Approvals(lambda event: None))
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"[" * 5000 + b"\n" + b'{"cmd": "status"}\n')
        replies = [await reader.readline(), await reader.readline()]
        writer.close()
        server.close()
        return [json.loads(r) for r in replies]

    deep, status = asyncio.run(scenario())
    assert deep == {"ok": False, "error": "not a JSON object"} and status["ok"]


def test_an_embedded_runs_socket_answers_a_failing_command_and_serves_on(tmp_path, caplog):
    # No catch-all: no reply, the connection dropped, and asyncio's "Unhandled
    # exception in client_connected_cb" on the run's stderr
    class Broken(Approvals):
        def get(self, pending_id):
            raise RuntimeError("a bug")

    async def scenario():
        unhandled = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: unhandled.append(context)
        )
        path = tmp_path / "control.sock"
        server = await serve(path, Broken(lambda event: None))
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"cmd": "approval", "id": "a1"}\n{"cmd": "status"}\n')
        replies = [await reader.readline(), await reader.readline()]
        writer.close()
        server.close()
        await server.wait_closed()
        return [json.loads(r) for r in replies if r], unhandled

    replies, unhandled = asyncio.run(scenario())
    assert replies[0] == {
        "ok": False,
        "error": "approval: internal error (RuntimeError); see the run's log",
    }
    assert replies[1]["ok"] and replies[1]["embedded"] and not unhandled
    failed = [r for r in caplog.records if "approvals request 'approval' failed" in r.message]
    assert len(failed) == 1 and failed[0].exc_info


def test_always_with_an_expiry_is_written_into_the_rule_and_shown(tmp_path, policy, capsys):
    """Through the control command, as the CLI and the API send it: the rule in
    approved.yaml expires when asked; a bad expiry or one without `always` decides
    nothing."""
    rules = tmp_path / "rules.yaml"
    overlay = tmp_path / "approved.yaml"

    async def scenario():
        approvals = Approvals(lambda event: None)

        async def reload(actor: str) -> list[str]:
            load_policy(rules)
            return []

        approvals.on_always = always_writer(overlay, reload)
        held = asyncio.ensure_future(approvals.hold(key("pastebin.test"), "r", {}))
        await asyncio.sleep(0.01)
        (pending,) = approvals.list()
        ask = {"cmd": "approve", "id": pending["id"]}
        bad = await handle(approvals, {**ask, "scope": "always", "expires": "soon"}, "uid 0")
        not_always = await handle(approvals, {**ask, "scope": "task", "expires": "1d"}, "uid 0")
        ticket = await handle(approvals, {**ask, "scope": "always", "ticket": {"a": 1}}, "uid 0")
        assert ticket == {"ok": False, "error": "approve: ticket must be a string"}
        assert approvals.list() and not overlay.exists()
        good = await handle(approvals, {**ask, "scope": "always", "expires": "2099-12-31"}, "uid 0")
        await held
        return bad, not_always, good

    bad, not_always, good = asyncio.run(scenario())
    assert bad == {"ok": False, "error": bad["error"]} and "'soon' is not a date" in bad["error"]
    assert "expires goes with always" in not_always["error"]
    assert good["ok"] and good["approval"]["scope"] == "always"
    (rule,) = yaml.safe_load(overlay.read_text())["approved"]["p"]
    assert rule["expires"] == "2099-12-31" and rule["allow"] == "pastebin.test"
    loaded = next(r for r in load_policy(rules).profiles["p"].rules if r.id.startswith("approved:"))
    assert str(loaded.expires) == "2099-12-31"
    assert main(["rules", "show", str(rules)]) == 0
    assert "allow pastebin.test ports 443 expires 2099-12-31 [approved:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--always", "--expires", "2001-01-01"], "--expires 2001-01-01 has already passed"),
        (["--always", "--expires", "soon"], "--expires 'soon' is not a date or an instant"),
        (["--task", "--expires", "30d"], "--expires goes with --always"),
        (["--for", "1h", "--ticket", "T-1"], "--ticket goes with --always"),
        (["--widen", "*.example.test"], "--widen goes with --for or --always"),
        (["--task", "--widen", "*.example.test"], "--widen goes with --for or --always"),
    ],
)
def test_cli_bad_expiry_is_a_usage_error_before_any_socket(argv, message, tmp_path, capsys):
    code = main(["approvals", "approve", "someid", *argv, "--control", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_two_always_approvals_at_once_keep_each_others_rule(tmp_path, policy):
    """Approver A's rule is appended and its reload fails (the main rules are broken at
    that moment), approver B's is appended meanwhile and its reload succeeds: putting
    A's file back must not take B's rule with it (B's request went on as `always`)."""
    settings = ApprovalSettings(hold=5, expire_pending=60, max_pending_per_sandbox=5)
    overlay = tmp_path / "approved.yaml"

    async def scenario():
        approvals = Approvals(lambda event: None, lambda profile: settings)
        first_reload = asyncio.Event()

        async def reload(actor):
            if not first_reload.is_set():
                first_reload.set()
                await asyncio.sleep(0.2)  # the second approval arrives meanwhile
                return ["rules.yaml:3:5: broken for a moment"]
            return []

        approvals.on_always = always_writer(overlay, reload)
        a = await approvals.hold(key("a.example.test"), "r", {})
        b = await approvals.hold(key("b.example.test", task="t2"), "r", {})
        return await asyncio.gather(
            *(
                handle(approvals, {"cmd": "approve", "id": held.pending.id, "scope": "always"}, who)
                for held, who in ((a, "uid 1"), (b, "uid 2"))
            )
        )

    first, second = asyncio.run(scenario())
    assert not first["ok"] and "did not load" in first["error"], first
    assert second["ok"], second
    approved = yaml.safe_load(overlay.read_text())["approved"]["p"]
    assert [r["allow"] for r in approved] == ["b.example.test"]


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda p: p.write_text("approved: {p: [\n"), id="corrupted"),
        pytest.param(lambda p: p.mkdir(), id="a-directory"),
    ],
)
def test_always_into_a_spoiled_approved_yaml_is_one_line_and_changes_nothing(
    tmp_path, policy, spoil
):
    settings = ApprovalSettings(hold=5, expire_pending=60, max_pending_per_sandbox=5)
    overlay = tmp_path / "approved.yaml"
    spoil(overlay)
    reloads = []

    async def scenario():
        approvals = Approvals(lambda event: None, lambda profile: settings)

        async def reload(actor):
            reloads.append(actor)
            return []

        approvals.on_always = always_writer(overlay, reload)
        held = await approvals.hold(key("a.example.test"), "r", {})
        request = {"cmd": "approve", "id": held.pending.id, "scope": "always"}
        reply = await handle(approvals, request, "uid 0")
        return reply, approvals.get(held.pending.id)

    reply, still = asyncio.run(scenario())
    assert not reply["ok"] and reply["error"].startswith(f"approve: {overlay} cannot be"), reply
    assert "\n" not in reply["error"] and still["state"] == "pending", still
    assert reloads == []
