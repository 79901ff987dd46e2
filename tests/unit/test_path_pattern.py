"""A rule's path globs with two or more wildcards are matched by RE2 (linear time),
the others by Python's `re` (model.PathPattern): both must give the same answer on
every path, and the pattern must survive the kept policy's pickle."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.proxy.policy.load import _compile_paths
from sandgate.proxy.policy.model import PathPattern

SEGMENTS = ["a", "b", "A", "ab", "**", "*", "a*", "*b", "*.x", "a.x", "%41", "42", "0", "4*"]
globs = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(
    lambda parts: "/" + "/".join(parts)
)
paths = st.lists(
    st.sampled_from(["a", "b", "A", "ab", "a.x", "b.x", "", "x", "%41"]), max_size=7
).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=400, deadline=None)
@given(st.lists(globs, min_size=1, max_size=3), paths, st.booleans())
def test_re2_and_re_agree(rule_globs, path, deny):
    pattern = _compile_paths(tuple(rule_globs), deny)
    linear = PathPattern(pattern.regex, True)
    assert linear.fullmatch(path) == (pattern.regex.fullmatch(path) is not None)


def test_two_wildcards_or_a_double_star_before_the_end_are_linear():
    assert _compile_paths(("/**/x/**/y/**",), True).linear
    assert _compile_paths(("/**/*a*b",), True).linear
    # one `re` pass a glob: 30 denies of `/**/x` on a path of many readings took 0.8 s
    # (a red team, session 52); RE2 matches the alternation in one pass
    assert _compile_paths(("/**/admin",), True).linear
    assert not _compile_paths(("/admin/**",), True).linear
    assert not _compile_paths(("/*/admin",), True).linear
    assert not _compile_paths(("/public/**",)).linear


def test_a_kept_policy_pickles_the_pattern_without_re2():
    pattern = _compile_paths(("/**/x/**/y",), True)
    assert pattern.fullmatch("/a/x/b/y")  # RE2 compiled
    again = pickle.loads(pickle.dumps(pattern))
    assert again.linear and again._re2 is None and again.fullmatch("/x/y.json")
    assert not again.fullmatch("/x" * 30_000)
