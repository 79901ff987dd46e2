"""Includes and extends chains: followed a few levels deep, refused past MAX_CHAIN with
FILE:LINE, never a RecursionError (some 900 levels ended every load in one: a
traceback from `rules lint` and a start or reload with no place named)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sandgate.enforcer.cli import main
from sandgate.proxy.policy import PolicyError, load_policy
from sandgate.proxy.policy.load import MAX_CHAIN


def include_chain(directory: Path, depth: int) -> Path:
    for i in range(depth):
        include = f"include: [p{i + 1}.yaml]\n" if i < depth - 1 else ""
        (directory / f"p{i}.yaml").write_text(
            f"version: 1\n{include}rules:\n  - allow: a{i}.example\n"
        )
    top = directory / "top.yaml"
    top.write_text("version: 1\nprofiles:\n  default:\n    include: [p0.yaml]\n")
    return top


def extends_chain(directory: Path, depth: int) -> Path:
    text = "version: 1\nprofiles:\n"
    for i in range(depth):
        parent = f"    extends: p{i + 1}\n" if i < depth - 1 else ""
        text += f"  p{i}:\n{parent}    rules:\n      - allow: b{i}.example\n"
    path = directory / "ext.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("chain", [include_chain, extends_chain])
def test_a_chain_within_the_bound_loads(tmp_path, chain):
    policy = load_policy(chain(tmp_path, MAX_CHAIN))
    assert policy.rule_count >= MAX_CHAIN


@pytest.mark.parametrize(
    ("chain", "message"),
    [(include_chain, "includes nested more than"), (extends_chain, "extends nested more than")],
)
@pytest.mark.parametrize("depth", [MAX_CHAIN + 2, 3000])
def test_a_deeper_chain_is_a_problem_with_its_place_not_a_recursion_error(
    tmp_path, capsys, chain, message, depth
):
    path = chain(tmp_path, depth)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert error.value.problems and all(message in p.message for p in error.value.problems)
    assert all(p.line > 1 for p in error.value.problems)  # the include or extends named
    assert main(["rules", "lint", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "RecursionError" not in err
