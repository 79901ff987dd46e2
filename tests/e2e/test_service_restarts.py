"""A gateway worker killed (while the rule file is broken, or not) comes back at once,
serving the policy the service enforces, and decides its live sandbox's waiting
traffic under that sandbox's task.

`sandgate gateway --workers 2` serves one task that resolves allowed.test (a query
of its own to the nameserver) and fetches http://allowed.test/ over a new connection
every 0.1 s. The test breaks the rule file (the reload is refused: the last good
policy stays), or leaves it, stops the task's worker (SIGSTOP: the task's queries and connections
wait in the sockets the service keeps) and SIGKILLs it.

Before: the restarted worker compiled the rule files itself, so it exited at once
while they were broken, and was restarted ever more slowly: the task had no egress
until the file was fixed and a backoff later, and `status` still showed the dead
worker's policy. With an intact file, the new worker read its sockets before the
service had registered the sandbox with it: what waited there was denied as a
stranger's (`unknown_sandbox`, no task id). Now the worker is given the service's
policy and its sandboxes in its `start`, before it reads a socket.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import TWO_PROFILES, GatewayProcess, finish_attached, start_attached

pytestmark = pytest.mark.e2e

# argv: the shared dir. Every 0.1 s until `stop`: a query for allowed.test to the
# nameserver (UDP, 5 s), then GET / from the address it gave, on a new connection
# (5 s). Appends "<time> ok|<error>" per round to `log`; writes `up` after the first ok.
PROBE = r"""
import http.client, os, socket, sys, time
shared = sys.argv[1]
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
name = b"".join(bytes([len(p)]) + p for p in b"allowed.test".split(b"."))
def resolve():
    query = os.urandom(2) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query, (ns, 53))
        answer = s.recv(4096)
    if answer[3] & 0x0F:
        raise OSError(f"rcode {answer[3] & 0x0F}")
    return socket.inet_ntoa(answer[-4:])
log = open(f"{shared}/log", "a", buffering=1)
while not os.path.exists(f"{shared}/stop"):
    began = time.time()
    try:
        conn = http.client.HTTPConnection(resolve(), 80, timeout=5)
        conn.request("GET", "/", headers={"Host": "allowed.test"})
        status = conn.getresponse().status
        conn.close()
        result = "ok" if status == 200 else f"status {status}"
    except (OSError, http.client.HTTPException) as e:
        result = type(e).__name__
    log.write(f"{began} {result}\n")
    if result == "ok" and not os.path.exists(f"{shared}/up"):
        open(f"{shared}/up", "w").write("up")
    time.sleep(0.1)
"""


def _rounds(shared) -> list[tuple[float, str]]:
    lines = (shared / "log").read_text().splitlines() if (shared / "log").exists() else []
    return [
        (float(t), result) for t, result in (line.split(" ", 1) for line in lines if " " in line)
    ]


@pytest.mark.parametrize(
    "rule_file",
    [pytest.param("broken", id="the-rule-file-broken"), pytest.param("intact", id="intact")],
)
def test_a_killed_worker_serves_its_task_again_at_once_under_the_services_policy(
    net, tmp_path, rule_file
):
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    service = GatewayProcess(net, tmp_path, rules, "--workers", "2", "--warm", "0").start()
    shared, _ = sandbox.shared_dir(tmp_path)
    task = None
    try:
        good = service.status()["policy"]
        task = start_attached(service, tmp_path, PROBE, str(shared), profile="default")
        assert eventually(lambda: (shared / "up").exists(), timeout=60), service.log.read_text()
        (worker,) = [w for w in service.status()["workers"] if w["sandboxes"] == 1]

        if rule_file == "broken":  # the reload is refused, the last good policy stays
            rules.write_text(TWO_PROFILES + "      - allow: [\n")
            reload = service.ask("reload")
            assert reload.returncode != 0 and "invalid rules" in reload.stderr + reload.stdout
            assert service.status()["policy"] == good

        # The worker stops reading (the task's lookups and connections wait in its
        # sockets), then dies.
        os.kill(worker["pid"], signal.SIGSTOP)
        time.sleep(0.5)
        killed = time.time()
        os.kill(worker["pid"], signal.SIGKILL)

        def successor() -> dict | None:
            now = service.status()["workers"][worker["index"]]
            return now if now["pid"] not in (None, worker["pid"]) else None

        back = eventually(successor, timeout=10)
        assert back, service.log.read_text()[-3000:]
        assert back["policy"] == good and back["sandboxes"] == 1, back
        # The task is served again within seconds, under the last good policy.
        assert eventually(
            lambda: sum(r == "ok" for t, r in _rounds(shared) if t > killed) >= 5, timeout=10
        ), (_rounds(shared)[-20:], service.log.read_text()[-3000:])
        (shared / "stop").write_text("stop")
        err = finish_attached(task[0])
        assert task[0].returncode == 0, err
    finally:
        (shared / "stop").write_text("stop")
        if task is not None and task[0].poll() is None:
            task[0].kill()
            task[0].wait()
        service.stop()

    rounds = _rounds(shared)
    task_id = service.first_task_id()
    service.wait_task_ended(task_id)
    events = service.events()
    # Nothing of the task's was decided as a stranger's, before or after the kill.
    strangers = [e for e in events if e.get("reason") == "unknown_sandbox"]
    assert not strangers, strangers[:3]
    mine = [e for e in events if e.get("task_id") == task_id]
    restarted = [e for e in mine if e["reason"] == "worker_restarted"]
    assert len(restarted) == 1, restarted
    assert f"(pid {worker['pid']}) died (signal SIGKILL)" in restarted[0]["detail"]
    # The successor's decisions: the task's, under the last good policy.
    after = [
        e
        for e in mine
        if e["kind"] in ("dns", "connection", "request")
        and e["time"] > killed
        and e["verdict"] == "allow"
    ]
    assert after and {e["policy_hash"] for e in after} == {good}, after[-3:]
    # At most the round cut by the kill failed.
    failed = [(t, r) for t, r in rounds if t > killed - 1 and r != "ok"]
    assert len(failed) <= 1, failed
    service.verify_audit()
