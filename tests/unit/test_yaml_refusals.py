"""What of YAML a rule file may not use (rt45 F8, F10), refused before the file is
composed, with FILE:LINE:COL and why: explicit tags (other tools read `!!binary
ZXZpbC50ZXN0` as `evil.test`; the loader would read the text), and aliases that stand
for more than MAX_ALIAS_NODES values (a small file that compiles quadratically in the
gateway's reload). An alias within the budget works as before."""

from __future__ import annotations

import time

import pytest
from sandgate.proxy.policy import ConnectFacts, PolicyError, decide, load_policy

MAX_ALIAS_NODES = 100_000  # proxy/policy/load.py's
HEAD = "version: 1\nprofiles:\n  default:\n    rules:\n"


def _refused(tmp_path, text: str) -> list[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    return [f"{p.line}:{p.column}: {p.message}" for p in error.value.problems]


def alias_bomb(n: int, m: int) -> str:
    """The report's generator: one anchored list of `m` names, then `n` rules aliasing it."""
    names = ", ".join(f"h{i}.example.test" for i in range(m))
    lines = [f"      - allow: &names [{names}]", "        ports: &p [443]"]
    lines += ["      - allow: *names"] * n
    return HEAD + "\n".join(lines) + "\n"


def test_the_reports_alias_bomb_is_refused_at_once(tmp_path):
    """N=1600 took 3.1 s and 448 MB to compile; refused now, well under a second."""
    started = time.perf_counter()
    (problem,) = _refused(tmp_path, alias_bomb(1600, 1600))
    took = time.perf_counter() - started
    assert took < 0.5, took
    assert problem.startswith("69:16: YAML aliases here stand for more than 100000 values")


def test_an_alias_within_the_budget_still_works(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        HEAD
        + "      - allow: allowed.test\n        ports: &web [80, 443]\n"
        + "      - allow: other.test\n        ports: *web\n"
    )
    policy = load_policy(path)
    for port, allowed in ((80, True), (443, True), (22, False)):
        facts = ConnectFacts(profile="default", port=port, name="other.test")
        assert decide(policy, facts).allowed is allowed, port
    # The report's smallest case (200 x 200: 40,000 values) is within the budget.
    assert MAX_ALIAS_NODES > 200 * 201
    path.write_text(alias_bomb(200, 200))
    assert load_policy(path).rule_count > 0


@pytest.mark.parametrize(
    "value, tag",
    [
        pytest.param("!!binary ZXZpbC50ZXN0", "tag:yaml.org,2002:binary", id="binary"),
        pytest.param("!!str evil.test", "tag:yaml.org,2002:str", id="str"),
        pytest.param("!anything evil.test", "!anything", id="local"),
        pytest.param("! evil.test", "!", id="non-specific"),
        pytest.param(
            "!<tag:example.com,2000:x> evil.test", "tag:example.com,2000:x", id="verbatim"
        ),
        pytest.param("!!seq [evil.test]", "tag:yaml.org,2002:seq", id="on-a-list"),
    ],
)
def test_an_explicit_tag_is_refused_where_it_stands(tmp_path, value, tag):
    (problem,) = _refused(tmp_path, HEAD + f"      - deny: {value}\n        id: d\n")
    assert problem.startswith(f"5:15: YAML tags are not supported ({tag!r})"), problem


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "      - deny: evil.test\n        comment: '!!binary ZXZpbC50ZXN0'\n", id="quoted"
        ),
        pytest.param("      - deny: evil.test  # no tags here!\n", id="in-a-comment"),
        pytest.param("      - deny: evil.test\n        comment: 'R&D'\n", id="ampersand"),
    ],
)
def test_tag_and_anchor_characters_in_text_are_text(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(HEAD + text)
    assert load_policy(path).rule_count >= 1
