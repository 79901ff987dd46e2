"""A gateway worker SIGKILLed under load leaves no request without its audit event.

`sandgate gateway --workers 2` serves two tasks, one per worker, each making plain
HTTP requests to an allowed server as fast as it can, every request with a path of
its own (/<task>/<n>). The test SIGKILLs both workers at once in the middle (two
chances of catching events that were made but not yet sent: a worker sends its
events on a 20 ms tick), lets the tasks go on with the restarted workers, then
compares nginx's access log with the service's audit log: every request nginx
answered has its `request` event (a worker's black box, proxy/telemetry/blackbox.py,
is read after its death), and `sandgate audit verify` passes.
"""

from __future__ import annotations

import os
import signal

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


def test_every_request_upstream_saw_has_its_event(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)  # default: allowed.test
    service = GatewayProcess(net, tmp_path, rules, "--workers", "2")
    shared, _ = sandbox.shared_dir(tmp_path)
    tags = ("ta", "tb")
    tasks = []
    try:
        service.start()
        for tag in tags:
            tasks.append(start_attached(service, tmp_path, REQUESTS, str(shared), tag,
                                        profile="default"))  # fmt: skip
        assert eventually(
            lambda: all((shared / f"{tag}-up").exists() for tag in tags), timeout=60
        ), service.log.read_text()
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
        (shared / "stop").write_text("stop")
        for popen, _ in tasks:
            err = finish_attached(popen)
            assert popen.returncode == 0, err

        upstream = [r["uri"] for r in net.requests_seen() if r["uri"].split("/")[1] in tags]
        assert len(upstream) > 600, len(upstream)

        def missing() -> list[str]:
            recorded = {e.get("path") for e in service.events(kind="request")}
            return [uri for uri in upstream if uri not in recorded]

        eventually(lambda: not missing(), timeout=10)
        lost = missing()
        restarted = service.events(reason="worker_restarted")
        assert len(restarted) == 2, restarted
        assert not lost, (
            f"{len(lost)} of {len(upstream)} requests upstream have no event: {lost[:20]}"
        )
        service.verify_audit()
    finally:
        (shared / "stop").write_text("stop")
        for popen, _ in tasks:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        service.stop()
