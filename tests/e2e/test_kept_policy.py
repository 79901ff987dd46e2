"""`sandgate run` keeps its compiled policy for the next start (enforcer/policy_cache.py).
An admin's change between two runs must rule the second one: a rule file edited in
place (same size, same mtime), or a symlink pointed at another file. The first run
is allowed to reach allowed.test and keeps its policy; the second, after the change,
is denied by the new rule (its name does not resolve), and the server gets nothing."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from sandgate.enforcer.run import STATE_DIR
from support import sandbox
from support.sandbox import curl, eventually

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test in the fake internet
ALLOW = """version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: kept-allow
"""
# The same length: an edit that leaves size and (restored) mtime alike.
DENY = ALLOW.replace("allow: allowed.test", "deny:  allowed.test").replace(
    "kept-allow", "kept-block"
)
assert len(DENY) == len(ALLOW)


def kept_for(rules: Path) -> bool:
    """Whether the state directory keeps a compiled policy made from `rules`."""
    for entry in (STATE_DIR / "cache").glob("policy-*.pickle"):
        policy = pickle.loads(entry.read_bytes())[-1]
        if any(path == str(rules) for path, _ in policy.inputs):
            return True
    return False


GET = {"get": curl("http://allowed.test/")}


def get_twice(net, tmp_path, rules: Path, change) -> tuple:
    first = sandbox.run(net, tmp_path, GET, rules=rules)
    assert first["get"].status == 200, first.describe()
    assert kept_for(rules)
    change()
    net.clear_logs()
    second = sandbox.run(net, tmp_path, GET, rules=rules)
    return first, second


def assert_denied_by_the_new_rule(net, second) -> None:
    """The new deny rule's: the name does not resolve (the DNS filter's NXDOMAIN)."""
    assert (second["get"].rc, second["get"].status) == (6, 0), second.describe()
    assert second.verdicts(kind="dns", name="allowed.test") == {
        ("deny", "rule_deny", "kept-block")
    }, second.describe()
    assert not eventually(lambda: net.requests_seen(ALLOWED_IP), timeout=1.0)


def test_a_rule_file_edited_in_place_rules_the_next_run(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)

    def edit():
        before = rules.stat()
        rules.write_text(DENY)
        os.utime(rules, ns=(before.st_atime_ns, before.st_mtime_ns))

    _, second = get_twice(net, tmp_path, rules, edit)
    assert_denied_by_the_new_rule(net, second)


def test_a_rules_symlink_pointed_elsewhere_rules_the_next_run(net, tmp_path):
    rules, allow, deny = tmp_path / "rules.yaml", tmp_path / "allow.yaml", tmp_path / "deny.yaml"
    allow.write_text(ALLOW)
    deny.write_text(DENY)
    rules.symlink_to(allow)

    def repoint():
        rules.unlink()
        rules.symlink_to(deny)

    _, second = get_twice(net, tmp_path, rules, repoint)
    assert_denied_by_the_new_rule(net, second)
