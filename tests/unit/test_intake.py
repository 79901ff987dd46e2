"""The front door's intake (proxy/frontdoor/intake.py): round-robin order over the
sources, its bounds, and that every item put comes back exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sandgate.proxy.frontdoor.intake import Intake


def test_a_source_waits_behind_one_of_each_other_source_however_many_they_queued():
    intake = Intake(per_source=64, in_all=1000)
    for i in range(50):
        for attacker in ("a", "b", "c"):
            assert intake.put(attacker, f"{attacker}{i}") is None
    assert intake.put("honest", "h0") is None
    # a, b, c each once, then the honest one: not behind 150.
    assert intake.take(4) == ["a0", "b0", "c0", "h0"]
    assert intake.take(4) == ["a1", "b1", "c1", "a2"]
    assert len(intake) == 151 - 8


def test_a_source_that_arrives_joins_the_end_of_the_turn():
    intake = Intake(per_source=8, in_all=100)
    for item in ("a0", "a1", "b0", "b1"):
        intake.put(item[0], item)
    assert intake.take(1) == ["a0"]
    intake.put("c", "c0")
    # b is next, then a (served, so at the end), then the newcomer c.
    assert intake.take(10) == ["b0", "a1", "c0", "b1"]
    assert not intake and len(intake) == 0


@pytest.mark.parametrize(
    ("per_source", "in_all", "puts", "refused", "left"),
    [
        pytest.param(2, 10, ["a0", "a1", "a2"], ["a2"], {"a": 2}, id="per-source-cap"),
        pytest.param(
            10,
            4,
            ["a0", "a1", "a2", "b0", "b1"],
            [None, None, None, None, "a2"],
            {"a": 2, "b": 2},
            id="full-in-all-the-longest-gives-way",
        ),
        pytest.param(
            10,
            3,
            ["a0", "b0", "c0", "d0"],
            [None, None, None, "d0"],
            {"a": 1, "b": 1, "c": 1},
            id="a-tie-refuses-the-newcomer",
        ),
        pytest.param(
            10,
            3,
            ["a0", "a1", "a2", "h0"],
            [None, None, None, "a2"],
            {"a": 2, "h": 1},
            id="a-flood-never-pushes-out-a-lone-connection",
        ),
    ],
)
def test_bounds(per_source, in_all, puts, refused, left):
    intake = Intake(per_source=per_source, in_all=in_all)
    got = [intake.put(item[0], item) for item in puts]
    if len(refused) == len(puts):
        assert got == refused
    else:
        assert [r for r in got if r is not None] == refused
    assert {s: intake.queued(s) for s in left} == left
    assert len(intake) == sum(left.values()) <= in_all


def test_clear_returns_every_item_and_empties_it():
    intake = Intake(per_source=4, in_all=8)
    for item in ("a0", "b0", "a1"):
        intake.put(item[0], item)
    assert sorted(intake.clear()) == ["a0", "a1", "b0"]
    assert not intake and intake.take(5) == []


def test_it_holds_at_least_one():
    with pytest.raises(ValueError):
        Intake(per_source=0, in_all=4)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 5)),
            st.tuples(st.just("take"), st.integers(0, 7)),
        ),
        max_size=200,
    ),
    st.integers(1, 6),
    st.integers(1, 12),
)
def test_nothing_is_lost_and_the_bounds_hold(steps, per_source, in_all):
    intake = Intake(per_source=per_source, in_all=in_all)
    put, out, taken_in_order = [], [], []
    for n, (op, arg) in enumerate(steps):
        if op == "put":
            item = (arg, n)
            put.append(item)
            refused = intake.put(arg, item)
            if refused is not None:
                out.append(refused)
        else:
            taken = intake.take(arg)
            assert len(taken) == min(arg, len(taken) + len(intake))
            # Round-robin: a source still waiting got at most one fewer than any other.
            counts = {s: [src for src, _ in taken].count(s) for s in range(6)}
            for waiting in (s for s in range(6) if intake.queued(s)):
                assert all(counts[waiting] >= c - 1 for c in counts.values()), taken
            out += taken
            taken_in_order += taken
        assert len(intake) <= in_all
        assert all(intake.queued(s) <= per_source for s in range(6))
    # Per source, first in, first out.
    for source in range(6):
        ns = [n for s, n in taken_in_order if s == source]
        assert ns == sorted(ns)
    out += intake.clear()
    assert sorted(out) == sorted(put)
