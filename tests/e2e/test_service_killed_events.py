"""What `sandgate gateway --workers 1` (the gateway on the service's own loop) loses
when it is SIGKILLed under load: the events its audit writer still queued.

Two tasks make plain HTTP requests to an allowed server as fast as they can, each
with a path of its own (/<task>/<n>, in order). The test SIGKILLs the service in the
middle, starts it again (it re-adopts the live sandboxes, the tasks go on), then
compares nginx's access log with the audit log. What may be missing is only what the
writer had queued (it writes within `flush_interval`, 50 ms, of each event): for each
task, a run of its last requests before the kill, nothing before it and nothing
after the restart; and the chain goes on from the last line on disk (`sandgate audit
verify` passes). docs/telemetry.md says how many were lost when this was measured.
"""

from __future__ import annotations

import re
import time

import pytest
from support.sandbox import eventually
from test_worker_killed_events import REQUESTS, serving, stopped

pytestmark = pytest.mark.e2e


def test_a_killed_service_loses_at_most_the_tail_its_audit_writer_queued(net, tmp_path):
    tags = ("ka", "kb")
    with serving(net, tmp_path, "1", REQUESTS, tags) as (service, shared, tasks):
        eventually(lambda: len(net.requests_seen()) > 400, timeout=20)
        service.kill()  # SIGKILL, in the middle of the load
        time.sleep(0.5)  # nginx logs a request once answered: the last in flight, too
        before_kill = _numbers(net.requests_seen(), tags)
        service.start()  # the same state: it re-adopts the sandboxes; the tasks go on
        eventually(lambda: len(net.requests_seen()) > sum(map(len, before_kill.values())) + 200,
                   timeout=30)  # fmt: skip
        stopped(shared, tasks)

        upstream = _numbers(net.requests_seen(), tags)

        def recorded() -> dict[str, set[int]]:
            return _numbers(service.events(kind="request"), tags, key="path")

        eventually(lambda: all(upstream[t] - recorded()[t] <= before_kill[t] for t in tags),
                   timeout=10)  # fmt: skip
        have = recorded()
        lost = {tag: sorted(upstream[tag] - have[tag]) for tag in tags}
        print(f"requests upstream: {sum(map(len, upstream.values()))}, with no event: "
              f"{sum(map(len, lost.values()))} {lost}")  # fmt: skip
        for tag in tags:
            if not lost[tag]:
                continue
            # Only the writer's queue: a run of the last requests before the kill.
            last = max(before_kill[tag])
            assert lost[tag] == list(range(lost[tag][0], last + 1)), (tag, lost[tag], last)
            assert len(lost[tag]) < 200, lost[tag]  # 50 ms of one task's requests
        service.verify_audit()


def _numbers(records: list[dict], tags: tuple[str, ...], key: str = "uri") -> dict[str, set[int]]:
    """Each task's request numbers in `records` (nginx's `uri`, the audit log's `path`)."""
    found: dict[str, set[int]] = {tag: set() for tag in tags}
    for record in records:
        match = re.fullmatch(r"/(\w+)/(\d+)", record.get(key) or "")
        if match and match[1] in found:
            found[match[1]].add(int(match[2]))
    return found
