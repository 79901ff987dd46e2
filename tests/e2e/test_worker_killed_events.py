"""A gateway worker SIGKILLed under load leaves no request without its audit event.

`sandgate gateway --workers 2` serves two tasks, one per worker, each making plain
HTTP requests to an allowed server as fast as it can, every request with a path of
its own (/<task>/<n>). The test SIGKILLs both workers at once in the middle (two
chances of catching events that were made but not yet sent: a worker sends its
events on a 20 ms tick), lets the tasks go on with the restarted workers, then
compares nginx's access log with the service's audit log: every request nginx
answered has its `request` event (a worker's black box, proxy/telemetry/blackbox.py,
is read after its death), and `sandgate audit verify` passes.

A second test holds allowed connections open across the kill: each gets exactly one
`connection_end`, made by the service for the dead worker
(proxy/telemetry/open_connections.py), and the connections that ended before get
only their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import TWO_PROFILES, GatewayProcess, finish_attached, start_attached

pytestmark = pytest.mark.e2e

# argv: shared dir, the task's tag. Requests /<tag>/<n> on keep-alive connections
# until the test writes `stop`; a connection cut (its worker killed) is opened again.
# Writes `<tag>-up` after its first answer.
REQUESTS = r"""
import http.client, os, sys
shared, tag = sys.argv[1], sys.argv[2]
n, up = 0, False
while not os.path.exists(f"{shared}/stop"):
    conn = http.client.HTTPConnection("allowed.test", 80, timeout=5)
    try:
        while not os.path.exists(f"{shared}/stop"):
            n += 1
            conn.request("GET", f"/{tag}/{n}")
            conn.getresponse().read()
            if not up:
                open(f"{shared}/{tag}-up", "w").write("up")
                up = True
    except (OSError, http.client.HTTPException):
        pass
    finally:
        conn.close()
"""


# Each test here counts one audit event per request. A task this fast passes the
# audit rate limit's default (500 a second past a burst of 5,000) on a fast host, and
# its requests past it are aggregated into "N similar events suppressed" records: that
# limit's job (tests/e2e/test_audit_flood_e2e.py), not what these tests look at. CI
# once saw 398 of 11,999 requests so aggregated, each then "without its event".
NO_AGGREGATION = ("--audit-rate", "1000000", "--audit-burst", "1000000")


@contextlib.contextmanager
def serving(
    net, tmp_path: Path, workers: str, code: str, tags: tuple[str, ...], *args: str
) -> Iterator[tuple[GatewayProcess, Path, list]]:
    """`sandgate gateway --workers WORKERS` serving one task per tag (profile default:
    allowed.test), each running `code` (argv: the shared dir, its tag, `args`) until
    the shared dir has `stop`; yields (the service, the shared dir, the tasks:
    `start_attached`'s) once each has written `<tag>-up`. Every task is stopped, then
    the service, when the block ends (`stopped` inside it checks them)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    service = GatewayProcess(net, tmp_path, rules, "--workers", workers, *NO_AGGREGATION)
    shared, _ = sandbox.shared_dir(tmp_path)
    tasks: list = []
    try:
        service.start()
        for tag in tags:
            tasks.append(start_attached(service, tmp_path, code, str(shared), tag, *args,
                                        profile="default"))  # fmt: skip
        assert eventually(
            lambda: all((shared / f"{tag}-up").exists() for tag in tags), timeout=60
        ), service.log.read_text()
        yield service, shared, tasks
    finally:
        (shared / "stop").write_text("stop")
        for popen, _ in tasks:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        service.stop()


def nothing_aggregated(service: GatewayProcess) -> None:
    """No record of the audit log stands for several events (NO_AGGREGATION held): a
    request without its own event is then lost, not counted in an aggregate."""
    aggregated = [e for e in service.events() if "suppressed" in e]
    assert not aggregated, f"the audit rate limit aggregated requests: {aggregated[:2]}"


def stopped(shared: Path, tasks: list) -> None:
    """The tasks of `serving` told to stop, and each ended well."""
    (shared / "stop").write_text("stop")
    for popen, _ in tasks:
        err = finish_attached(popen)
        assert popen.returncode == 0, err


def test_every_request_upstream_saw_has_its_event(net, tmp_path):
    tags = ("ta", "tb")
    with serving(net, tmp_path, "2", REQUESTS, tags) as (service, shared, tasks):
        workers = service.status()["workers"]
        assert sorted(w["sandboxes"] for w in workers) == [1, 1], workers
        # Both in the middle of their load: SIGKILL both at once.
        eventually(lambda: len(net.requests_seen()) > 400, timeout=20)
        dead = {w["index"]: w["pid"] for w in workers}
        for pid in dead.values():
            os.kill(pid, signal.SIGKILL)
        assert eventually(
            lambda: all(
                w["pid"] not in (None, dead[w["index"]]) for w in service.status()["workers"]
            ),
            timeout=30,
        ), service.log.read_text()
        seen_before = len(net.requests_seen())
        eventually(lambda: len(net.requests_seen()) > seen_before + 200, timeout=20)
        stopped(shared, tasks)

        upstream = [r["uri"] for r in net.requests_seen() if r["uri"].split("/")[1] in tags]
        assert len(upstream) > 600, len(upstream)

        def missing() -> list[str]:
            recorded = {e.get("path") for e in service.events(kind="request")}
            return [uri for uri in upstream if uri not in recorded]

        eventually(lambda: not missing(), timeout=10)
        lost = missing()
        restarted = service.events(reason="worker_restarted")
        assert len(restarted) == 2, restarted
        nothing_aggregated(service)
        assert not lost, (
            f"{len(lost)} of {len(upstream)} requests upstream have no event: {lost[:20]}"
        )
        service.verify_audit()


# argv: shared dir, the task's tag, HELD. Two connections that end, then HELD that stay
# open (one request each, keep-alive, then idle) until the test writes `stop`; each
# connection's "ip:port" goes to `<tag>-ended` / `<tag>-held`, then `<tag>-up`.
HELD = 3
HOLDS = r"""
import http.client, os, sys, time
shared, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
def opened(n):
    conn = http.client.HTTPConnection("allowed.test", 80, timeout=5)
    conn.request("GET", f"/{tag}/{n}")
    conn.getresponse().read()
    return conn, "%s:%d" % conn.sock.getsockname()
ended = []
for n in range(2):
    conn, source = opened(f"ended{n}")
    conn.close()
    ended.append(source)
held = [opened(f"held{n}") for n in range(count)]
open(f"{shared}/{tag}-ended", "w").write("\n".join(ended))
open(f"{shared}/{tag}-held", "w").write("\n".join(source for _, source in held))
open(f"{shared}/{tag}-up", "w").write("up")
while not os.path.exists(f"{shared}/stop"):
    time.sleep(0.05)
"""
CUT = "ended by the death of gateway worker"


def test_connections_open_when_their_worker_is_killed_each_get_one_end(net, tmp_path):
    tags = ("ha", "hb")
    with serving(net, tmp_path, "2", HOLDS, tags, str(HELD)) as (service, shared, tasks):
        held = {s for tag in tags for s in (shared / f"{tag}-held").read_text().split()}
        ended = {s for tag in tags for s in (shared / f"{tag}-ended").read_text().split()}
        assert len(held) == 2 * HELD and len(ended) == 4

        def ends(source: str) -> list[dict]:
            return service.events(kind="connection_end", source=source)

        # The short ones' own ends are in the log: the workers sent them before the kill.
        assert eventually(lambda: all(ends(s) for s in ended), timeout=10)
        workers = service.status()["workers"]
        dead = {w["index"]: w["pid"] for w in workers}
        for pid in dead.values():
            os.kill(pid, signal.SIGKILL)
        assert eventually(
            lambda: len(service.events(reason="worker_restarted")) == 2, timeout=30
        ), service.log.read_text()
        assert eventually(lambda: all(ends(s) for s in held), timeout=10)
        stopped(shared, tasks)
        for tag in tags:
            task_id = service.events(kind="request", path=f"/{tag}/held0")[0]["task_id"]
            service.wait_task_ended(task_id)

        cut = [e for e in service.events(kind="connection_end") if CUT in e.get("detail", "")]
        assert sorted(e["source"] for e in cut) == sorted(held)  # each once, no other
        for source in held:
            (end,) = ends(source)  # exactly one: the worker made none
            (start,) = service.events(kind="request", source=source)
            assert (end["task_id"], end["rule_id"], end["name"], end["dst_port"]) == (
                start["task_id"], start["rule_id"], "allowed.test", 80)  # fmt: skip
            assert "bytes_up" not in end and "bytes up and down" in end["detail"], end
        for source in ended:
            (end,) = ends(source)
            assert CUT not in end.get("detail", "") and end["bytes_down"] > 0, end
        for event in service.events(reason="worker_restarted"):
            assert f"cut ({HELD} over the worker's sandboxes" in event["detail"], event
        service.verify_audit()
