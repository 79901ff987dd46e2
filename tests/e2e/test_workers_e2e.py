"""`sandgate gateway --workers 2` in the fake internet (issue 11, "Every core").

Each test starts its own service with two workers and attaches tasks that hold their
sandboxes open (files in a shared directory say how far each got), so that the test
can look at the service (status --json, /metrics, the audit log) while both run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import TWO_PROFILES, GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e


# Fetches both names ({name}-web, {name}-www: the status or the error), opens a TLS
# connection to argv[1], says so ({name}-up), then waits until the gateway closes it
# ({name}-done: closed) or the test says go; until go, fetches argv[1] again whenever
# the test asks ({name}-retry -> {name}-retried).
HOLD_TLS = """
import os, socket, ssl, sys, time
host, shared, name = sys.argv[1], sys.argv[2], sys.argv[3]
def status(url):
    import urllib.request
    try:
        return str(urllib.request.urlopen(url, timeout=10).status)
    except Exception as e:
        return type(e).__name__
for label, url in (("web", "https://allowed.test/"), ("www", "https://www.allowed.test/")):
    open(f"{shared}/{name}-{label}", "w").write(status(url))
raw = socket.create_connection((host, 443), timeout=30)
tls = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
open(f"{shared}/{name}-up", "w").write("up")
tls.settimeout(0.2)
how = "go"
while not os.path.exists(f"{shared}/go"):
    try:
        data = tls.recv(1)
    except socket.timeout:
        continue
    except OSError:
        data = b""
    how = "closed" if not data else "data"
    break
open(f"{shared}/{name}-done", "w").write(how)
while not os.path.exists(f"{shared}/go"):
    if os.path.exists(f"{shared}/{name}-retry"):
        os.unlink(f"{shared}/{name}-retry")
        open(f"{shared}/{name}-retried", "w").write(status(f"https://{host}/"))
    time.sleep(0.05)
"""

# Downloads /big over TLS slowly (argv[3] bytes a second), then writes how many bytes.
SLOW_DOWNLOAD = """
import socket, ssl, sys, time
shared, rate = sys.argv[1], float(sys.argv[2])
raw = socket.create_connection(("allowed.test", 443), timeout=30)
tls = ssl.create_default_context().wrap_socket(raw, server_hostname="allowed.test")
tls.sendall(b"GET /big HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n")
open(f"{shared}/slow-up", "w").write("up")
got, start = 0, time.monotonic()
while chunk := tls.recv(65536):
    got += len(chunk)
    time.sleep(max(0.0, start + got / rate - time.monotonic()))
open(f"{shared}/slow-done", "w").write(str(got))
"""


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_PROFILES)
    return path


@pytest.fixture
def metrics_port():
    return random.randrange(20000, 30000)


@pytest.fixture
def service(net, tmp_path, rules, metrics_port):
    gateway = GatewayProcess(
        net, tmp_path, rules, "--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}"
    ).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _task(service, tmp_path, code: str, *args: str, profile: str = "default"):
    shared, rw = sandbox.shared_dir(tmp_path)
    command = [sandbox.SANDBOX_PYTHON, "-c", code, *args]
    return subprocess.Popen(
        attach_argv(service, sandbox._workdir(tmp_path), command, profile=profile, extra=rw),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def _metric(net, port: int, name: str) -> float | None:
    text = net.run_in_host(["curl", "-s", f"http://127.0.0.1:{port}/metrics"]).stdout
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _metric_total(net, port: int, name: str) -> float:
    """The sum of every series of `name` (all its labels)."""
    text = net.run_in_host(["curl", "-s", f"http://127.0.0.1:{port}/metrics"]).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_hold_each_sandbox_to_its_profile_sum_their_metrics_and_reload_each(
    service, net, tmp_path, metrics_port
):
    shared, _ = sandbox.shared_dir(tmp_path)
    tasks = {
        "web": _task(service, tmp_path, HOLD_TLS, "allowed.test", str(shared), "web"),
        "api": _task(
            service, tmp_path, HOLD_TLS, "www.allowed.test", str(shared), "api", profile="api"
        ),
    }
    try:
        for name, task in tasks.items():
            assert eventually((shared / f"{name}-up").exists, timeout=30), task.stderr
        status = service.status()
        by_profile = {
            s["profile"]: s
            for s in json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
        }
        # One sandbox in each worker: the one with the fewest gets the next network.
        assert {by_profile["default"]["worker"], by_profile["api"]["worker"]} == {0, 1}
        assert [w["sandboxes"] for w in status["workers"]] == [1, 1], status["workers"]
        pids = [w["pid"] for w in status["workers"]]
        assert len(set(pids)) == 2 and os.getpid() not in pids and status["pid"] not in pids
        # Each held to its own profile.
        assert (_read(shared / "web-web"), _read(shared / "web-www")) == ("200", "URLError")
        assert (_read(shared / "api-web"), _read(shared / "api-www")) == ("URLError", "200")
        # The open connections are each worker's (pushed every second): summed.
        assert eventually(
            lambda: [w["connections"] for w in service.status()["workers"]] == [1, 1], timeout=5
        ), service.status()
        assert service.status()["connections"] == 2
        assert eventually(
            lambda: _metric(net, metrics_port, "sandgate_active_connections") == 2.0, timeout=5
        )
        assert _metric(net, metrics_port, "sandgate_active_sandboxes") == 2.0
        # The decision counters: each worker counts its own, the service adds them up;
        # they agree with the one audit log, which has both workers' events.
        tasks_of = {by_profile["default"]["task_id"], by_profile["api"]["task_id"]}
        assert {e["task_id"] for e in service.events(kind="dns")} == tasks_of

        def agree(kind: str, metric: str) -> bool:
            return _metric_total(net, metrics_port, metric) == len(service.events(kind=kind)) > 0

        assert eventually(lambda: agree("dns", "sandgate_dns_queries_total"), timeout=5)
        assert eventually(lambda: agree("connection", "sandgate_connections_total"), timeout=5)

        # A rule edit that denies both: each worker closes its own sandbox's connection.
        service.rules.write_text(
            TWO_PROFILES.replace("allow: allowed.test", "deny: allowed.test").replace(
                "allow: www.allowed.test", "deny: www.allowed.test"
            )
        )
        reply = json.loads(service.ask("reload", "--json").stdout)
        assert reply["ok"], reply
        assert eventually(
            lambda: _read(shared / "web-done") and _read(shared / "api-done"), timeout=10
        )
        assert (_read(shared / "web-done"), _read(shared / "api-done")) == ("closed", "closed")
        changed = service.events(reason="policy_changed")
        assert eventually(lambda: len(service.events(reason="policy_changed")) == 2, timeout=5)
        changed = service.events(reason="policy_changed")
        assert {e["profile"] for e in changed} == {"default", "api"}
        assert {e["task_id"] for e in changed} == {
            by_profile["default"]["task_id"],
            by_profile["api"]["task_id"],
        }
        # One policy_loaded per reload, however many workers: the service's.
        loads = service.events(kind="policy", reason="policy_loaded")
        assert sum("workers" in e["detail"] for e in loads) >= 1
        assert len({e["detail"] for e in loads}) == len(loads)
    finally:
        (shared / "go").write_text("go")
        for task in tasks.values():
            task.wait(30)
    for entry in by_profile.values():
        service.wait_task_ended(entry["task_id"])
        # The task's DNS (its worker's) and the service's own start and end events.
        kinds = {e["kind"] for e in service.events(task_id=entry["task_id"])}
        assert {"dns", "connection", "task"} <= kinds, kinds
    assert service.stop() == 0
    service.verify_audit()
    assert not [pid for pid in pids if _alive(pid)], "a worker outlived the service's stop"


def test_a_killed_worker_cuts_only_its_sandboxes_and_comes_back(service, net, tmp_path):
    shared, _ = sandbox.shared_dir(tmp_path)
    held = _task(service, tmp_path, HOLD_TLS, "allowed.test", str(shared), "held")
    assert eventually((shared / "held-up").exists, timeout=30), held.stderr
    # About 5 s for the 10 MiB: it runs across the other worker's death and restart.
    slow = _task(service, tmp_path, SLOW_DOWNLOAD, str(shared), str(net.big_size / 5))
    try:
        assert eventually((shared / "slow-up").exists, timeout=30), slow.stderr
        sandboxes = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
        assert len(sandboxes) == 2
        held_box = next(s for s in sandboxes if s["command"][-1] == "held")
        slow_box = next(s for s in sandboxes if s["command"][-1] != "held")
        assert held_box["worker"] != slow_box["worker"]
        workers = service.status()["workers"]
        victim = workers[held_box["worker"]]["pid"]
        other = workers[slow_box["worker"]]["pid"]
        os.kill(victim, signal.SIGKILL)
        # The held connection was the dead worker's: cut.
        assert eventually(lambda: _read(shared / "held-done"), timeout=10) == "closed"
        # A new worker serves the same ports and takes the sandbox back, with an event.
        assert eventually(
            lambda: service.status()["workers"][held_box["worker"]]["pid"] not in (None, victim),
            timeout=20,
        ), service.status()
        restarted = eventually(lambda: service.events(reason="worker_restarted"), timeout=5)
        assert [e["task_id"] for e in restarted] == [held_box["task_id"]], restarted
        assert f"pid {victim}" in restarted[0]["detail"], restarted[0]
        # What the dead worker had sent before it died is all in the log: the allowed
        # fetch (its connection and its end) and the held connection, whose end the
        # service made for the dead worker (no bytes: they died with it).
        before = service.events(task_id=held_box["task_id"])
        allowed = [e for e in before if e["kind"] == "connection" and e["verdict"] == "allow"]
        assert {e["name"] for e in allowed} == {"allowed.test"} and len(allowed) >= 2, before
        ends = [e for e in before if e["kind"] == "connection_end"]
        cut = [e for e in ends if "ended by the death of gateway worker" in e["detail"]]
        assert len(ends) == 2 and len(cut) == 1 and "bytes_down" not in cut[0], ends
        assert f"pid {victim}" in cut[0]["detail"], cut
        assert [e for e in before if e["kind"] == "dns"], before
        assert not (shared / "slow-done").exists(), "the transfer did not span the restart"
        status = service.status()
        assert status["workers"][held_box["worker"]]["restarts"] == 1
        assert status["workers"][slow_box["worker"]]["restarts"] == 0
        assert status["workers"][slow_box["worker"]]["pid"] == other
        # The other worker's transfer went on untouched: every byte, one connection.
        assert eventually(lambda: _read(shared / "slow-done"), timeout=30)
        body = int(_read(shared / "slow-done"))
        assert body > net.big_size, body  # the whole body plus the response head
        # The restarted worker's sandbox has egress again, through the same table.
        (shared / "held-retry").write_text("")
        assert eventually(lambda: _read(shared / "held-retried"), timeout=20) == "200"
    finally:
        (shared / "go").write_text("go")
        held.wait(30)
        slow.wait(30)
    ends = service.events(task_id=slow_box["task_id"], kind="connection_end")
    assert [e["bytes_down"] > body for e in ends] == [True], ends  # TLS records: a bit more
    assert not service.events(task_id=slow_box["task_id"], reason="worker_restarted")
    pids = [w["pid"] for w in service.status()["workers"]]
    service.kill()  # SIGKILL: the workers die with it (PR_SET_PDEATHSIG)
    assert eventually(lambda: not [pid for pid in pids if _alive(pid)], timeout=5), pids
    # What it left behind goes with a restart (as in test_service's killed-service test).
    GatewayProcess(net, tmp_path, service.rules, "--workers", "1").start().stop()


# TWO_PROFILES with an ask for default's www.allowed.test, held up to 60 s.
ASKING = TWO_PROFILES.replace(
    "  default:\n    rules:\n",
    "  default:\n    approval: {hold: 60s}\n    rules:\n"
    "      - ask: www.allowed.test\n        id: ask-www\n",
)
assert "ask-www" in ASKING

# Fetches http://www.allowed.test/<name> (held for a human) and writes the status and
# the body of a refusal to {name}-got.
FETCH_ASKED = """
import sys, urllib.request, urllib.error
shared, name = sys.argv[1], sys.argv[2]
open(f"{shared}/{name}-up", "w").write("up")
try:
    out = str(urllib.request.urlopen(f"http://www.allowed.test/{name}", timeout=90).status)
except urllib.error.HTTPError as e:
    out = f"{e.code} {e.read().decode(errors='replace')}"
except Exception as e:
    out = type(e).__name__
open(f"{shared}/{name}-got", "w").write(out)
"""


def test_approvals_over_two_workers_list_both_and_each_decision_reaches_its_own_request(
    net, tmp_path, rules
):
    """A reload adds an ask to a running two-worker service; a sandbox in each worker is
    held; the CLI and the API list both; approving one lets exactly that request
    through, denying the other gives its task the refusal and nginx never sees it."""
    keys = tmp_path / "admin-keys"
    added = subprocess.run(
        [sandbox.SANDGATE, "approvals", "keys", "add", "tester", "--file", str(keys)],
        capture_output=True,
        text=True,
    )
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    service = GatewayProcess(
        net, tmp_path, rules, "--workers", "2", "--admin-keys", str(keys)
    ).start()
    shared, _ = sandbox.shared_dir(tmp_path)
    tasks = {}
    try:
        rules.write_text(ASKING)
        reply = json.loads(service.ask("reload", "--json").stdout)
        assert reply["ok"], reply
        assert [w["ok"] for w in reply["workers"]] == [True, True], reply

        for name in ("one", "two"):
            tasks[name] = _task(service, tmp_path, FETCH_ASKED, str(shared), name)
            assert eventually((shared / f"{name}-up").exists, timeout=30), tasks[name].stderr
        boxes = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
        task_of = {b["command"][-1]: b["task_id"] for b in boxes}
        assert {b["worker"] for b in boxes} == {0, 1}, boxes

        def pending_now() -> list[dict]:
            result = service.ask("approvals", "list", "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        def both_held() -> list[dict]:
            found = pending_now()
            return found if len(found) == 2 and all(a["held"] == 1 for a in found) else []

        pending = eventually(both_held, timeout=30)
        assert pending, (pending_now(), service.log.read_text())
        id_of = {name: next(a["id"] for a in pending if a["task_id"] == task_of[name])
                 for name in ("one", "two")}  # fmt: skip
        assert len(set(id_of.values())) == 2
        assert all(
            (a["name"], a["port"], a["rule"]) == ("www.allowed.test", 80, "ask-www")
            for a in pending
        )
        # The admin API sees both too.
        api = net.run_in_host(
            ["curl", "-s", "-H", f"Authorization: Bearer {token}",
             "http://127.0.0.1:9465/api/approvals"],
            timeout=30,
        )  # fmt: skip
        assert {a["id"] for a in json.loads(api.stdout)["approvals"]} == set(id_of.values()), api

        approved = service.ask("approvals", "approve", id_of["one"])
        assert approved.returncode == 0, approved.stderr
        assert eventually(lambda: _read(shared / "one-got"), timeout=20) == "200"
        assert not (shared / "two-got").exists()  # the other worker's request is still held
        assert [r["uri"] for r in net.requests_seen()] == ["/one"]

        denied = net.run_in_host(
            ["curl", "-s", "-H", f"Authorization: Bearer {token}",
             "-H", "Content-Type: application/json", "-d", '{"decision": "deny"}',
             f"http://127.0.0.1:9465/api/approvals/{id_of['two']}"],
            timeout=30,
        )  # fmt: skip
        assert json.loads(denied.stdout)["approval"]["approver"] == "tester (api key)", denied
        got = eventually(lambda: _read(shared / "two-got"), timeout=20)
        assert got.startswith("403 ") and "approval_denied" in got and id_of["two"] in got, got
        assert [r["uri"] for r in net.requests_seen()] == ["/one"]  # /two never reached nginx

        again = service.ask("approvals", "deny", id_of["one"])
        assert again.returncode == 125 and "already approved (once)" in again.stderr
        assert pending_now() == []

        # A worker that dies takes its held request: the approval leaves the list, and
        # deciding it is a clear error.
        tasks["three"] = _task(service, tmp_path, FETCH_ASKED, str(shared), "three")
        held = eventually(lambda: [a for a in pending_now() if a["held"]], timeout=30)
        assert held, service.log.read_text()
        (third,) = held
        boxes = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
        (worker,) = [b["worker"] for b in boxes if b["task_id"] == third["task_id"]]
        victim = service.status()["workers"][worker]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert eventually(lambda: pending_now() == [], timeout=20)
        late = service.ask("approvals", "approve", third["id"])
        assert late.returncode == 125, late
        assert (
            f"approval {third['id']} is gone: gateway worker {worker} (pid {victim})" in late.stderr
        )
        assert eventually(lambda: _read(shared / "three-got"), timeout=20) != "200"
        assert "/three" not in [r["uri"] for r in net.requests_seen()]
    finally:
        (shared / "go").write_text("go")
        for task in tasks.values():
            task.wait(60)
        service.stop()
    decisions = {
        e["approval_id"]: e["reason"]
        for e in service.events(kind="approval")
        if e["reason"] in ("approval_granted", "approval_denied")
    }
    assert decisions == {id_of["one"]: "approval_granted", id_of["two"]: "approval_denied"}
