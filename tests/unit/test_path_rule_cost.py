"""A path rule's globs are matched in time linear in the path, whatever their shape,
so one request with a long path cannot hold the gateway's loop (no I/O here:
check_head and decide as the gate calls them).

A glob with two or more unbounded wildcards before its end (`/**/x/**/y/**`,
`/**/a/**/b`, `/**/*a*b*c`) compiles to a regex with two `.*`, and Python's
backtracking `re` takes time quadratic (or worse) in the path on a path that
nearly matches: `GET /x/x/x/...` of 60 KB (under the 64 KiB head limit) against
`/**/x/**/y/**` held decide() for over a minute, during which no other request,
connection or DNS answer of any task on that worker was served. Such globs are
now compiled to a `PathPattern` that RE2 matches (`linear`); a glob with one
wildcard (`/admin/**`) cannot backtrack so and stays with `re`.

This is not a timed test (speed lives in benchmarks): it checks that each
hostile 60 KB path gets its verdict, and that the risky shapes are compiled to
the linear-time matcher. Found by a red team (session 51).
"""

from __future__ import annotations

import pytest
from sandgate.proxy.policy import Decision, RequestFacts, decide, load_policy
from sandgate.proxy.policy.request_head import RequestHead, check_head

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: api.allowed.test
        id: site
        methods: [GET]
        paths: ["/**"]
      - deny: api.allowed.test
        id: shape
        paths: [{globs}]
"""

SIZE = 60_000  # bytes of path: a request head under the 64 KiB limit

# shape: (deny globs, whether they need the linear-time matcher,
#         a path of about SIZE bytes that nearly matches them (allowed),
#         one of about SIZE bytes that matches them (denied))
CASES = {
    "two-subtrees": (
        ["/**/x/**/y/**"],
        True,
        "/x" * (SIZE // 2),
        "/x" * (SIZE // 2) + "/y",
    ),
    "subtree-then-suffix": (
        ["/**/a/**/b"],
        True,
        "/a" * (SIZE // 4) + ".x" * (SIZE // 4),
        "/a" * (SIZE // 4) + ".x" * (SIZE // 4) + "/b",
    ),
    "stars-in-a-segment": (
        ["/**/*a*b*c"],
        True,
        "/" + "a" * (SIZE - 1),
        "/" + "a" * (SIZE - 3) + "bc",
    ),
    # Control: one wildcard, at the end: `re`, which does not backtrack on it.
    "one-subtree": (
        ["/admin/**"],
        False,
        "/public" + "/admin" * (SIZE // 6),
        "/admin" * (SIZE // 6),
    ),
}


def load(tmp_path, globs: list[str]):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(globs=", ".join(f'"{g}"' for g in globs)))
    return load_policy([rules])


def shape_rule(policy):
    rules = policy.profiles["default"].rules
    return rules[[rule.id for rule in rules].index("shape")]


def verdict(policy, target: str) -> tuple[str, str]:
    """(reason, rule id) the gateway gives `GET target` to api.allowed.test:443."""
    head = RequestHead(b"GET", target.encode(), ((b"host", b"api.allowed.test"),))
    checked = check_head(head, 443)
    assert not isinstance(checked, Decision), checked
    facts = RequestFacts(
        profile="default", port=443, method="GET", path=checked.path, name="api.allowed.test"
    )
    decision = decide(policy, facts)
    return str(decision.reason), decision.rule_id


@pytest.mark.parametrize("case", list(CASES))
def test_a_path_rule_is_compiled_to_a_linear_time_matcher_where_its_shape_needs_one(tmp_path, case):
    globs, linear, _, _ = CASES[case]
    policy = load(tmp_path, globs)
    assert shape_rule(policy).path_pattern.linear is linear, (case, globs)


@pytest.mark.parametrize("case", list(CASES))
def test_a_long_hostile_path_gets_its_verdict(tmp_path, case):
    globs, linear, near, hit = CASES[case]
    policy = load(tmp_path, globs)
    # Checked first: with a backtracking matcher the decisions below would hold
    # this test for minutes instead of failing.
    assert shape_rule(policy).path_pattern.linear is linear, (case, globs)
    assert len(near) >= SIZE - 8 and len(hit) >= SIZE - 8
    assert verdict(policy, near) == ("rule_allow", "site"), case
    assert verdict(policy, hit) == ("rule_deny", "shape"), case
    # Short controls of the same rule.
    assert verdict(policy, "/public/ok") == ("rule_allow", "site")
