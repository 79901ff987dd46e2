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


def test_a_rule_of_many_double_star_globs_matches_within_re2s_memory():
    """RE2's default 8 MiB held the DFA of ~100 `/**/` globs in one rule only until it
    ran out: a line on stderr each match, and its NFA, slower than `re` (a red team,
    session 52). absl writes to the process's stderr, so the match runs in its own."""
    import subprocess
    import sys

    script = (
        "from sandgate.proxy.policy.load import _compile_paths\n"
        "globs = tuple(f'/**/p{i}/{i * 7}' for i in range(150))\n"
        "pattern = _compile_paths(globs, True)\n"
        "assert pattern.linear\n"
        "paths = ['/a/p3/21', '/x' * 40 + '/p149/1043/y', '/q/' + 'p1/' * 200]\n"
        "print([pattern.fullmatch(p) for p in paths])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[True, True, False]"
    assert "out of memory" not in run.stderr, run.stderr
