"""`sandgate gateway` SIGKILLed under load loses no event: what its audit writer still
queued is in the audit journal (proxy/telemetry/blackbox.py, a file under the state
dir), which the next start appends before anything new, each marked recovered. With
`--workers 2` the workers die with it; what they had not sent, or sent and the
service had not read, is in their black boxes, files next to the journal, which the
next start reads past what the service had taken.

Two tasks make plain HTTP requests to an allowed server as fast as they can, each
with a path of its own (/<task>/<n>, in order). The test SIGKILLs the service in the
middle, starts it again (it re-adopts the live sandboxes, the tasks go on), then
compares nginx's access log with the audit log: every request nginx answered has its
`request` event, the chain goes on unbroken (`sandgate audit verify` passes), the
events read back from the journal say so, and each connection the kill cut (each
task's keep-alive connection) has a `connection_end` saying the service's death
ended it. docs/telemetry.md says how many were recovered when this was measured.
"""

from __future__ import annotations

import re
import time

import pytest
from support.sandbox import eventually
from test_worker_killed_events import REQUESTS, serving, stopped

pytestmark = pytest.mark.e2e

RECOVERED = "of a killed sandgate process"  # the journal's, or a worker's black box's
CUT = "ended by the death of the sandgate process"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_killed_service_loses_no_event(net, tmp_path, workers):
    tags = ("ka", "kb")
    with serving(net, tmp_path, workers, REQUESTS, tags) as (service, shared, tasks):
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

        eventually(lambda: all(upstream[t] <= recorded()[t] for t in tags), timeout=10)
        have = recorded()
        lost = {tag: sorted(upstream[tag] - have[tag]) for tag in tags}
        recovered = [e for e in service.events() if RECOVERED in (e.get("detail") or "")]
        print(f"requests upstream: {sum(map(len, upstream.values()))}, with no event: "
              f"{sum(map(len, lost.values()))} {lost}; recovered: {len(recovered)}")  # fmt: skip
        assert not any(lost.values()), lost
        assert recovered, "the kill under load left nothing queued to recover?"
        (summary,) = service.events(reason="audit_recovered")
        assert f"{len(recovered)} events" in summary["detail"], summary
        assert " 0 lost" in summary["detail"], summary
        # Recovered lines come first after the kill, before the new process's own.
        seqs = [e["seq"] for e in recovered]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert summary["seq"] > seqs[-1]
        # Each task's connection open at the kill: one end, saying the kill ended it.
        cut = [e for e in service.events(kind="connection_end") if CUT in e.get("detail", "")]
        assert {e["task_id"] for e in cut} == {
            e["task_id"] for e in service.events(kind="request") if e["path"].startswith("/k")
        }, cut
        for end in cut:
            assert "bytes_up" not in end and end["seq"] < summary["seq"], end
        service.verify_audit()


def _numbers(records: list[dict], tags: tuple[str, ...], key: str = "uri") -> dict[str, set[int]]:
    """Each task's request numbers in `records` (nginx's `uri`, the audit log's `path`)."""
    found: dict[str, set[int]] = {tag: set() for tag in tags}
    for record in records:
        match = re.fullmatch(r"/(\w+)/(\d+)", record.get(key) or "")
        if match and match[1] in found:
            found[match[1]].add(int(match[2]))
    return found
