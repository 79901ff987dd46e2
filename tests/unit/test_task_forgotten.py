"""A task's end takes what the gateway kept for it: the next task at its address
starts afresh, and a service that runs for months does not grow per task
(tests/e2e/test_service_soak.py is the whole of it)."""

from __future__ import annotations

import asyncio
import socket

from sandgate.proxy.frontdoor.http1_relay import UpstreamPool
from sandgate.proxy.frontdoor.tls_contexts import TlsContexts
from sandgate.proxy.limits import LeafBudget, TokenBuckets
from sandgate.proxy.registry import Sandbox

ENDED = Sandbox("10.213.0.2", "ended", "default")
OTHER = Sandbox("10.213.0.6", "other", "default")


def test_a_forgotten_bucket_is_gone_and_the_next_task_starts_full():
    buckets = TokenBuckets(clock=lambda: 100.0)
    assert buckets.take(ENDED.address, 1)
    assert not buckets.take(ENDED.address, 1)  # empty: the task used its second
    buckets.take(OTHER.address, 1)
    buckets.forget(ENDED.address)
    assert len(buckets) == 1
    assert buckets.take(ENDED.address, 1)  # the next task at the address


def test_a_forgotten_leaf_budget_keeps_no_free_names():
    leaves = LeafBudget(clock=lambda: 100.0)
    assert leaves.take(ENDED, ("a.example",), 1)
    assert leaves.take(ENDED, ("a.example",), 1)  # a name it had: free
    leaves.forget(ENDED)
    assert len(leaves.buckets) == 0
    assert leaves.take(ENDED, ("a.example",), 1)  # charged again: one token
    assert not leaves.take(ENDED, ("a.example",) * 2, 1)


class _Session:
    has_ticket = True


def test_forgetting_a_task_drops_its_leaves_and_upstream_sessions_only(tmp_path):
    contexts = TlsContexts(tmp_path)
    contexts._leaves[(ENDED, ("a.example",))] = object()
    contexts._leaves[(OTHER, ("a.example",))] = object()
    for sandbox in (ENDED, OTHER):
        key = (sandbox.task_id, sandbox.address, "203.0.113.10", 443, "a.example", True)
        contexts.keep_upstream_session(key, _Session())
    contexts.forget(ENDED)
    assert list(contexts._leaves) == [(OTHER, ("a.example",))]
    assert [k[0] for k in contexts._sessions] == ["other"]


class _Poller:
    def __init__(self) -> None:
        self.handlers: dict = {}

    def forget(self, fd: int, unregister: bool = False) -> None:
        self.handlers.pop(fd, None)


def test_forgetting_a_task_closes_its_idle_upstreams_at_once():
    loop = asyncio.new_event_loop()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        pool = UpstreamPool(_Poller(), loop)
        pool.give(("ended", ENDED.address, "203.0.113.10", 80), pairs[0][0])
        pool.give(("ended", ENDED.address, "203.0.113.11", 80), pairs[1][0])
        pool.give(("other", OTHER.address, "203.0.113.10", 80), pairs[2][0])
        pool.forget_task("ended", ENDED.address)
        assert pool.count == 1 and list(pool.idle) == [("other", OTHER.address, "203.0.113.10", 80)]
        assert pairs[0][0].fileno() == -1 and pairs[1][0].fileno() == -1  # closed
        assert pairs[0][1].recv(1) == b""  # the server saw the end now, not 4 s later
        assert pairs[2][0].fileno() != -1
    finally:
        pool.close()
        for a, b in pairs:
            a.close()
            b.close()
        loop.close()
