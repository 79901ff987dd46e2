"""A loop turn's share of dear reads (proxy/turns.py), with the turns driven by hand:
reads go at once until the turn's budget is spent, then wait their sandbox's turn,
round-robin; each turn lets through what the waiting sandboxes' last costs fill."""

from __future__ import annotations

from sandgate.proxy.turns import Turns


class Future:
    def __init__(self):
        self.result, self.cancelled = None, False

    def done(self) -> bool:
        return self.result is not None or self.cancelled

    def set_result(self, _) -> None:
        assert not self.done()
        self.result = "go"


class Loop:
    """call_soon's callbacks, run by `turn()`."""

    def __init__(self):
        self.ready = []

    def call_soon(self, callback):
        self.ready.append(callback)
        return callback

    def turn(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


def turns(budget: float = 0.005) -> tuple[Turns, Loop]:
    loop = Loop()
    return Turns(loop.call_soon, Future, budget), loop


def test_reads_go_at_once_until_the_budget_is_spent():
    t, loop = turns()
    assert t.wait("a") is None
    t.charge("a", 0.001)
    assert t.wait("b") is None and loop.ready == []  # uncontended: no turn scheduled
    t.charge("b", 0.004)  # the turn's budget is spent
    assert len(loop.ready) == 1
    held = t.wait("a")
    assert held is not None and not held.done()
    loop.turn()  # a new turn: the waiting read goes
    assert held.done() and t.spent == 0 and not t.waiting


def test_a_busy_turn_lets_one_dear_read_through_round_robin_and_a_cheap_one_comes_soon():
    t, loop = turns()
    t.charge("a", 0.060)  # four attackers' reads of ~60 ms, an honest one of 1 ms
    held = {s: t.wait(s) for s in ("a", "b", "c")}
    for s in ("b", "c"):
        t.charge(s, 0.060)
    honest = t.wait("h")
    order = []
    for _ in range(6):
        loop.turn()
        order.append(sorted(s for s, f in {**held, "h": honest}.items() if f.done()))
    # One dear read a turn (each costs a turn's budget or more), in turn per sandbox.
    assert order[:4] == [["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "h"]]


def test_cheap_reads_fill_a_turn_together():
    t, loop = turns()
    t.charge("x", 0.010)
    waiting = [(s, t.wait(s)) for s in "abcdef"]
    for s in "abcdef":
        t.charge(s, 0.001)  # their last reads were cheap
    loop.turn()
    # As many as their costs fill the budget: five of 1 ms.
    assert [s for s, f in waiting if f.done()] == list("abcde")
    loop.turn()
    assert all(f.done() for _, f in waiting) and not t.waiting


def test_a_cancelled_wait_is_skipped_and_nothing_is_left_behind():
    t, loop = turns()
    t.charge("a", 0.010)
    gone, kept = t.wait("a"), t.wait("b")
    gone.cancelled = True
    loop.turn()
    assert kept.done() and not t.waiting
    loop.turn()
    assert loop.ready == []  # nothing waits: no more turns scheduled
