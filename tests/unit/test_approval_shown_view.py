"""What an approver is shown vs what an approval lets through, the pure parts:
proxy/approvals/shown.py (escaping, cutting), the ask key with the held request
(pending.py: no coalescing across queries, once exact, wider scopes any query) and
the `seen` revision check. End to end: tests/e2e/test_approval_shown.py."""

from __future__ import annotations

import pytest
from sandgate.proxy.approvals.pending import ApprovalError, AskKey, PendingStore, Scope, State
from sandgate.proxy.approvals.shown import shown_fields, visible
from sandgate.proxy.policy.request_head import RequestHead, check_head


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def request_key(target: str, method: str = "GET", task: str = "t1", rule_path=True) -> AskKey:
    path = target.split("?", 1)[0]
    return AskKey.make(
        task_id=task,
        sandbox="10.213.0.2",
        profile="p",
        name="api.example.test",
        port=443,
        protocol="https",
        method=method if rule_path else None,
        path=path if rule_path else None,
        request=f"{method} {target}",
    )


def new_store() -> PendingStore:
    ids = iter(f"id{i}" for i in range(1000))
    return PendingStore(Clock(), new_id=lambda: next(ids))


def ask(s: PendingStore, k: AskKey):
    return s.ask(k, expire_pending=3600, max_pending=20)


# --- shown text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("/docs?q=1&x=%E2%80%AE", "/docs?q=1&x=%E2%80%AE", id="ascii-unchanged"),
        pytest.param("/a?f=\u202egpj.exe", "/a?f=\\u202egpj.exe", id="rtl-override"),
        pytest.param("/a\u2066b\u2069", "/a\\u2066b\\u2069", id="bidi-isolates"),
        pytest.param("/a\x1b[2Kb", "/a\\x1b[2Kb", id="terminal-escape"),
        pytest.param("/a\u200bb", "/a\\u200bb", id="zero-width-space"),
        pytest.param("/a\u2028b\nc\rd", "/a\\u2028b\\x0ac\\x0dd", id="line-breaks"),
        pytest.param("/a\x00b\x7f", "/a\\x00b\\x7f", id="nul-and-del"),
    ],
)
def test_hiding_characters_are_escaped_visibly(text, shown):
    assert visible(text) == shown


def test_a_long_value_is_cut_with_how_many_bytes_are_hidden():
    secret = "/docs?q=" + "a" * 500 + "&payload=SECRET"
    shown = visible(secret, 100)
    assert shown == secret[:100] + f"... ({len(secret) - 100} more bytes)"
    assert "SECRET" not in shown  # hidden, but the marker says so
    assert visible("/short", 100) == "/short"  # nothing cut: no marker
    # Escapes count against the limit; the marker counts the original's UTF-8 bytes.
    assert visible("\u202e" * 30, 12) == "\\u202e\\u202e... (84 more bytes)"


def test_the_checked_head_carries_the_query_exactly():
    head = check_head(RequestHead(b"GET", b"/docs?q=1&x=%41", ((b"host", b"a.test"),)), 80)
    assert (head.path, head.query) == ("/docs", "q=1&x=%41")
    assert check_head(RequestHead(b"GET", b"/docs", ((b"host", b"a.test"),)), 80).query is None
    assert check_head(RequestHead(b"GET", b"/docs?", ((b"host", b"a.test"),)), 80).query == ""


# --- the key: what coalesces and what each scope lets through ---------------------------


def test_requests_with_different_queries_never_share_an_approval():
    s = new_store()
    first, new = ask(s, request_key("/docs?q=1"))
    same, joined = ask(s, request_key("/docs?q=1"))
    other, other_new = ask(s, request_key("/docs?payload=c2VjcmV0"))
    bare, bare_new = ask(s, request_key("/docs"))
    assert new and not joined and same is first
    assert other_new and other is not first and bare_new and bare is not first
    assert [p.key.request for p in s.list()] == [
        "GET /docs?q=1",
        "GET /docs?payload=c2VjcmV0",
        "GET /docs",
    ]


def test_once_lets_through_exactly_the_request_shown_and_wider_scopes_any_query():
    s = new_store()
    found, _ = ask(s, request_key("/docs?q=1"))
    s.approve(found.id, "uid 0 (root)", Scope.ONCE)  # nobody held: the next one of it
    assert s.grant_for(request_key("/docs?payload=x"), consume=False) is None
    assert s.grant_for(request_key("/docs"), consume=False) is None
    assert s.grant_for(request_key("/docs?q=1")).approved
    assert s.grant_for(request_key("/docs?q=1")) is None  # used up

    task, _ = ask(s, request_key("/docs?q=2"))
    s.approve(task.id, "uid 0 (root)", Scope.TASK)
    assert s.grant_for(request_key("/docs?anything=else")).approved
    assert s.grant_for(request_key("/other?q=2")) is None  # the path stays exact
    assert s.grant_for(request_key("/docs?q=2", task="t2")) is None  # and the task


def test_a_denial_covers_the_path_with_any_query():
    s = new_store()
    found, _ = ask(s, request_key("/docs?payload=x"))
    s.deny(found.id, "uid 0 (root)")
    grant = s.grant_for(request_key("/docs?payload=y"))
    assert grant is not None and not grant.approved


def test_a_destination_ask_held_as_a_request_is_keyed_by_the_request_too():
    s = new_store()
    a, _ = ask(s, request_key("/?a=1", rule_path=False))
    b, new = ask(s, request_key("/?b=2", rule_path=False))
    assert new and a is not b
    s.approve(a.id, "uid 0 (root)", Scope.TASK)
    assert s.grant_for(request_key("/elsewhere?c=3", rule_path=False)).approved
    assert shown_fields(a.to_dict(0))["wider"] == "any request to api.example.test:443 (https)"


# --- held counts, bodies, and the revision shown -----------------------------------------


def test_the_record_shows_each_held_body_and_the_count():
    s = new_store()
    found, _ = ask(s, request_key("/up?x=1", method="POST"))
    s.join(found, 12)
    s.join(found, None)
    s.join(found, 0)
    record = found.to_dict(0)
    assert (record["held"], record["bodies"], record["with_body"]) == (3, [12, None], 2)
    shown = record["shown"]
    assert shown["request"] == "POST api.example.test:443 (https)/up?x=1"
    assert shown["held"] == "3 requests held"
    assert shown["bodies"] == "12 bytes; size not declared (up to 1048576 bytes)"
    assert shown["wider"] == "POST api.example.test:443 (https)/up with any query"
    for _ in range(12):
        s.join(found, 5)
    assert found.to_dict(0)["shown"]["bodies"].endswith("; and 4 more with a body")
    s.leave(found, 12)
    s.leave(found, None)
    assert found.bodies[:1] == [5] and found.held == 13


def test_an_approval_refuses_a_revision_older_than_what_joined_since():
    s = new_store()
    found, _ = ask(s, request_key("/up?x=1", method="POST"))
    s.join(found, 10)
    shown = found.to_dict(0)["revision"]
    s.join(found, 900_000)  # joined after the approver looked: a bigger body
    with pytest.raises(ApprovalError, match=r"changed since it was shown .*2 held now"):
        s.approve(found.id, "uid 0 (root)", Scope.ONCE, seen=shown)
    assert found.state is State.PENDING  # nothing decided
    s.approve(found.id, "uid 0 (root)", Scope.ONCE, seen=found.revision)
    assert found.state is State.APPROVED


def test_a_record_round_trips_its_request_bodies_and_revision():
    s = new_store()
    found, _ = ask(s, request_key("/docs?q=1"))
    s.join(found, 7)
    again = type(found).from_dict(found.to_dict(0), 0)
    assert (again.key, again.bodies, again.revision) == (found.key, [7], 1)
