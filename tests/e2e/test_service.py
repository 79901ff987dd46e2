"""The gateway as a service (issue 9): many sandboxes, one gateway, in the fake internet.

Each test starts its own `sandgate gateway` (tests/support/service.py) in the fake
internet's host netns and attaches tasks with `sandgate run --gateway`. Tests assert
what the task got, what the fake internet's servers saw, and the service's audit log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from sandgate.enforcer import control
from support import sandbox
from support.sandbox import curl, eventually, python
from support.service import TWO_PROFILES, GatewayProcess, attach, attach_argv, running

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


# Each test with `service` runs against both data planes: the default (one worker per
# core: two here and in CI) and `--workers 1` (the gateway in the service process,
# what a one-core host gets by default).
@pytest.fixture(params=[(), ("--workers", "1")], ids=["workers", "in-process"])
def service(net, tmp_path, request):
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    gateway = GatewayProcess(net, tmp_path, rules, *request.param).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _status(result, label: str) -> str:
    return result[label].out.strip().splitlines()[-1] if result[label].out.strip() else ""


def test_two_concurrent_tasks_are_each_held_to_their_own_profile(service, net, tmp_path):
    steps = {"web": curl("https://allowed.test/"), "www": curl("https://www.allowed.test/")}
    shared, rw = sandbox.shared_dir(tmp_path)
    # One task holds its sandbox open while the other runs: both are attached at once.
    holder_dir = sandbox._workdir(tmp_path)
    holder = subprocess.Popen(
        attach_argv(
            service,
            holder_dir,
            ["sh", "-c", f"touch {shared}/up; sleep 5"],
            profile="api",
            extra=rw,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(lambda: (shared / "up").exists(), timeout=15), holder.stderr
        assert service.status()["sandboxes"] == 1
        default = attach(service, tmp_path, steps)
        api = attach(service, tmp_path, steps, profile="api")
        assert service.status()["sandboxes"] == 1  # the two finished; the holder is still there
    finally:
        holder.wait(30)
    assert _status(default, "web") == "200" and _status(default, "www") != "200", default.describe()
    assert _status(api, "web") != "200" and _status(api, "www") == "200", api.describe()
    assert default.verdicts(kind="dns", name="www.allowed.test") == {
        ("deny", "no_rule", "default:fallback")
    }
    assert api.verdicts(kind="dns", name="allowed.test") == {("deny", "no_rule", "api:fallback")}
    assert {e["profile"] for e in default.audit} == {"default"} and {
        e["profile"] for e in api.audit
    } == {"api"}
    assert default.run_id != api.run_id
    assert service.status()["sandboxes"] == 0
    # The service answers the detach first and removes the sandbox right after.
    assert eventually(
        lambda: (
            not sandbox.leftovers(net, default.run_id) and not sandbox.leftovers(net, api.run_id)
        )
    )


def test_without_a_service_gateway_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sandbox.SANDGATE, "run", "--gateway", str(tmp_path / "none.sock"), "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 125
    assert (
        proc.stderr.strip()
        == f"sandgate: no gateway service at {tmp_path / 'none.sock'} (start one with: sandgate gateway)"
    )
    status = subprocess.run(
        [sandbox.SANDGATE, "status", "--control", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 125 and "Traceback" not in status.stderr


def test_a_broken_rule_edit_changes_nothing_and_a_good_one_takes_effect(service, net, tmp_path):
    before = service.status()["policy"]
    service.rules.write_text(TWO_PROFILES + "      - allow: [\n")  # a YAML syntax error
    reload = service.ask("reload")
    assert reload.returncode != 0 and "rules.yaml:" in reload.stderr, reload.stderr
    assert service.status()["policy"] == before
    r = attach(service, tmp_path, {"web": curl("https://allowed.test/")})
    assert _status(r, "web") == "200", r.describe()
    assert service.events(reason="policy_invalid"), "the failed reload is in the audit log"

    service.rules.write_text(TWO_PROFILES.replace("allow: allowed.test", "deny: allowed.test"))
    assert eventually(lambda: service.status()["policy"] != before, timeout=5), (
        "the file change reloaded"
    )
    r = attach(service, tmp_path, {"web": curl("https://allowed.test/")})
    assert _status(r, "web") != "200", r.describe()
    assert (
        net.requests_seen(ALLOWED_IP) and len(net.requests_seen(ALLOWED_IP)) == 1
    )  # only the first task's


def _fetch_in_a_loop(service, tmp_path):
    """An attached task fetching https://allowed.test/ every 0.1 s, each status (000:
    no answer) a line of `results`, until `shared`/stop exists."""
    shared, rw = sandbox.shared_dir(tmp_path)
    results = shared / "loop.txt"
    attempt = f"{curl('https://allowed.test/', timeout=1)} 2>/dev/null | tail -n1"
    script = f'while [ ! -e {shared}/stop ]; do echo "$({attempt})" >> {results}; sleep 0.1; done'
    runner = subprocess.Popen(
        attach_argv(service, sandbox._workdir(tmp_path), ["sh", "-c", script], extra=rw),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return runner, results, shared


def _statuses_a_while_later(results):
    """The statuses `_fetch_in_a_loop` writes in 1.5 s, from 1.5 s on (the attempts
    under way when the test acted have ended by then)."""
    time.sleep(1.5)
    marker = len(results.read_text().splitlines())
    time.sleep(1.5)
    return results.read_text().splitlines()[marker:]


def test_a_killed_service_leaves_no_egress_and_a_restart_takes_the_sandbox_back(
    service, net, tmp_path
):
    runner, results, shared = _fetch_in_a_loop(service, tmp_path)
    try:
        assert eventually(lambda: results.exists() and "200" in results.read_text(), timeout=15)
        run_id = service.first_task_id()
        # The process that holds the sandbox: a warm runner the command handed the run
        # to, not the command itself (which only relays signals to it).
        boxes = json.loads(service.ask("sandboxes", "--json").stdout)["sandboxes"]
        holders = {runner.pid, *(b["runner_pid"] for b in boxes if b["task_id"] == run_id)}
        service.kill()  # SIGKILL: no cleanup at all
        while_dead = _statuses_a_while_later(results)
        assert while_dead and "200" not in while_dead, while_dead  # no egress without the service
        served_while_dead = len(net.requests_seen(ALLOWED_IP))

        for pid in holders:  # they cannot take the sandbox back yet: others try
            os.kill(pid, signal.SIGSTOP)
        try:
            service.start()  # the same state dir, a new process: it re-adopts the live sandbox
            intruder = control.ControlClient.connect(service.control)
            try:
                with pytest.raises(control.ControlError, match="only the runner of"):
                    intruder.request("resume", run_id=run_id)
            finally:
                intruder.sock.close()
        finally:
            for pid in holders:
                os.kill(pid, signal.SIGCONT)
        ok = eventually(lambda: results.read_text().splitlines()[-1:] == ["200"], timeout=15)
        assert ok, (
            results.read_text().splitlines()[-5:],
            [(e.get("task_id"), e.get("detail")) for e in service.events() if e.get("detail")][
                -12:
            ],
        )
        assert service.events(task_id=run_id, reason="rule_allow", kind="task")
        assert any("re-adopted" in (e.get("detail") or "") for e in service.events(task_id=run_id))
        assert len(net.requests_seen(ALLOWED_IP)) > served_while_dead
        (shared / "stop").touch()
        assert runner.wait(30) == 0, runner.stderr.read()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert eventually(lambda: service.status()["sandboxes"] == 0, timeout=10)
    assert eventually(lambda: not sandbox.leftovers(net, run_id))


def test_a_service_that_starts_while_another_is_down_leaves_it_its_sandboxes(net, tmp_path):
    """Services on one host share RUN_DIR. Another service (its own control socket and
    rules) that starts while the first is dead must not adopt the first's sandbox: the
    task stays without egress until its own service is back, and then has it again."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    first = GatewayProcess(net, tmp_path, rules).start()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_rules = other_dir / "rules.yaml"
    other_rules.write_text(TWO_PROFILES.replace("allow: allowed.test", "allow: '*.allowed.test'"))
    other = GatewayProcess(net, other_dir, other_rules)
    runner, results, shared = _fetch_in_a_loop(first, tmp_path)
    try:
        assert eventually(lambda: results.exists() and "200" in results.read_text(), timeout=15)
        run_id = first.first_task_id()
        first.kill()
        other.start()
        assert other.status()["sandboxes"] == 0
        assert not other.events(task_id=run_id)  # neither adopted nor removed
        while_other = _statuses_a_while_later(results)
        assert while_other and "200" not in while_other, while_other
        other.stop()
        assert not other.events(task_id=run_id)

        first.start()
        ok = eventually(lambda: results.read_text().splitlines()[-1:] == ["200"], timeout=15)
        assert ok, results.read_text().splitlines()[-5:]
        assert any("re-adopted" in (e.get("detail") or "") for e in first.events(task_id=run_id))
        (shared / "stop").touch()
        assert runner.wait(30) == 0, runner.stderr.read()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        other.stop()
        first.stop()
    assert eventually(lambda: not sandbox.leftovers(net, run_id))


def test_a_sandbox_cannot_reach_the_control_socket_nor_the_metrics(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    metrics_port = 19464
    # Metrics on every address of the host netns: the gateway's veth address too.
    gateway = GatewayProcess(
        net, tmp_path, rules, "--metrics-listen", f"0.0.0.0:{metrics_port}"
    ).start()
    try:
        sock = gateway.control
        connect = python(f"""
            import socket
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({str(sock)!r}); print("connected")
            except OSError as e:
                print(type(e).__name__)
        """)
        r = attach(
            gateway,
            tmp_path,
            {
                "default_socket": "ls -A /run/sandgate 2>&1; ls -A /run",
                "visible_socket": connect,
                "metrics": curl(f"http://{ALLOWED_IP}:{metrics_port}/metrics", timeout=3),
                "metrics_gw": "gw=$(awk '/nameserver/{print $2}' /etc/resolv.conf); "
                + curl(f"http://$gw:{metrics_port}/metrics", timeout=3)
                .replace("'http://$gw", '"http://$gw')
                .replace("/metrics'", '/metrics"'),
            },
            extra=("--ro", str(gateway.control.parent)),
        )  # the test's dir, socket included, in the task's view
        assert r.returncode == 0, r.describe()
        assert r["default_socket"].out.strip() == "" or "No such file" in r["default_socket"].out
        assert r["visible_socket"].out.strip() in ("PermissionError", "ConnectionRefusedError"), (
            r.describe()
        )
        assert "sandgate_" not in r["metrics"].out and "sandgate_" not in r["metrics_gw"].out, (
            r.describe()
        )
        assert r["metrics_gw"].out.strip().endswith("000"), (
            r.describe()
        )  # dropped: no answer at all
        assert not [
            e
            for e in gateway.events()
            if "by uid" in (e.get("detail") or "") and e.get("task_id") not in (None, r.run_id)
        ]
    finally:
        gateway.stop()


def test_gateway_stop_drains(service, net, tmp_path):
    shared, rw = sandbox.shared_dir(tmp_path)
    workdir = sandbox._workdir(tmp_path)
    runner = subprocess.Popen(
        attach_argv(service, workdir, ["sh", "-c", f"touch {shared}/up; sleep 60"], extra=rw),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(lambda: (shared / "up").exists(), timeout=15)
        stop = service.ask("gateway", "stop", "--grace", "0.5")
        assert stop.returncode == 0, stop.stderr
        assert service.popen.wait(20) == 0
        assert runner.wait(20) != 0  # stopped after the grace period
    finally:
        if runner.poll() is None:
            runner.kill()
    assert not service.control.exists()


def test_runners_leaving_as_the_service_stops_leave_nothing_and_lose_no_event(net, tmp_path):
    """Runners whose connections close as the service stops (killed with it): a
    sandbox whose end had begun was no longer the service's, so the stop, finding none
    left, ended the service before its network, table and run dir were removed and
    before its end was recorded. The window was the read of its counters, which the
    first six make long here: their runner (this process) lives on, and the wait for
    it to be gone held each a thread of the service's six for 3 s."""
    with running(net, tmp_path, TWO_PROFILES) as service:
        clients, run_ids = [], []
        try:
            for _ in range(10):
                clients.append(control.ControlClient.connect(service.control))
                reply = clients[-1].request("attach", profile="default", runner_pid=os.getpid())
                run_ids.append(reply["run_id"])
            for client in clients[:6]:
                client.close()
            time.sleep(0.5)
        finally:
            for client in clients:
                client.close()
        service.popen.send_signal(signal.SIGTERM)
        assert service.popen.wait(30) == 0
    for run_id in run_ids:
        assert not sandbox.leftovers(net, run_id), run_id
    ended = {
        e["task_id"]: e["detail"]
        for e in service.events(kind="task")
        if e.get("detail", "").startswith("task ended:")
    }
    assert sorted(ended) == sorted(run_ids), ended


FAIRNESS_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: web-allowed
  hog:
    limits: {connections: 50, pending: 50}
    rules:
      - allow: allowed.test
        id: hog-allowed
"""

# A thousand idle connections, held open (nothing sent: each waits undecided).
HOG = """
import socket, time
address = socket.getaddrinfo("allowed.test", 443, socket.AF_INET, socket.SOCK_STREAM)[0][4]
held = []
for _ in range(1000):
    try:
        held.append(socket.create_connection(address, timeout=2))
    except OSError:
        pass
open("{up}", "w").write(str(len(held)))
time.sleep(8)
"""


def test_one_sandbox_flooding_connections_does_not_slow_another(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(FAIRNESS_RULES)
    gateway = GatewayProcess(net, tmp_path, rules).start()
    shared, rw = sandbox.shared_dir(tmp_path)
    hog_dir = sandbox._workdir(tmp_path)
    hog = subprocess.Popen(
        attach_argv(
            gateway,
            hog_dir,
            ["python3", "-c", HOG.format(up=shared / "up")],
            profile="hog",
            extra=rw,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(lambda: (shared / "up").exists(), timeout=60), hog.stderr
        # While the hog holds its share, the other sandbox gets every request through, quickly.
        polite = attach(
            gateway,
            tmp_path,
            {f"get{i}": curl("https://allowed.test/", timeout=5) for i in range(20)},
        )
        assert all(_status(polite, f"get{i}") == "200" for i in range(20)), polite.describe()
        assert max(polite[f"get{i}"].ms for i in range(20)) < 2000, polite.describe()
        assert not polite.events(reason="sandbox_limit")
        hog_events = [
            e for e in gateway.events(reason="sandbox_limit") if e.get("profile") == "hog"
        ]
        assert len(hog_events) >= 900, len(hog_events)  # the rest of its thousand, each recorded
        # Its caps, or, when the gateway's loop falls behind (a slow host), the intake's
        # refusal of the sandbox with the most connections waiting: the hog's, never
        # the other's (asserted above).
        assert {e["rule_id"] for e in hog_events} <= {
            "builtin:sandbox-connections",
            "builtin:sandbox-pending",
            "builtin:sandbox-intake",
        }
    finally:
        hog.wait(60)
        gateway.stop()


# One TLS connection to allowed.test, kept open; writes "closed" once the gateway ends it.
HOLD_TLS = """
import socket, ssl, time
ctx = ssl.create_default_context()
with socket.create_connection(("allowed.test", 443), timeout=30) as raw:
    tls = ctx.wrap_socket(raw, server_hostname="allowed.test")
    open("{up}", "w").write("up")
    tls.settimeout(30)
    try:
        data = tls.recv(1)
    except OSError as e:
        data = b""
    open("{done}", "w").write("closed" if not data else "data")
"""


def test_a_rule_edit_closes_an_open_connection_the_new_rules_deny(service, net, tmp_path):
    shared, rw = sandbox.shared_dir(tmp_path)
    up, done = shared / "up", shared / "done"
    workdir = sandbox._workdir(tmp_path)
    runner = subprocess.Popen(
        attach_argv(
            service, workdir, ["python3", "-c", HOLD_TLS.format(up=up, done=done)], extra=rw
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(up.exists, timeout=20), runner.stderr
        assert not done.exists()
        service.rules.write_text(TWO_PROFILES.replace("allow: allowed.test", "deny: allowed.test"))
        # (the file is made, then written: wait for its word)
        ended = eventually(lambda: done.exists() and done.read_text(), timeout=10)
        assert ended == "closed", "the gateway did not close the connection"
        # The audit writer is off the loop: give it a moment to write the line.
        assert eventually(lambda: service.events(reason="policy_changed"), timeout=5), [
            (e["kind"], e["reason"], e.get("name")) for e in service.events()
        ]
        changed = service.events(reason="policy_changed")
        assert changed[0]["name"] == "allowed.test" and changed[0]["verdict"] == "deny", changed
    finally:
        runner.wait(30)


def _spares(service) -> list[str]:
    """The run ids of the networks this service keeps warm (a state file, no runner)."""
    ids = []
    for state_file in sandbox.RUN_DIR.glob("*/service.json"):
        state = json.loads(state_file.read_text())
        if state["service_pid"] == service.popen.pid and state["runner_pid"] == 0:
            ids.append(state["run_id"])
    return ids


def test_an_attach_takes_a_warm_network_and_stop_leaves_none(service, net, tmp_path):
    assert eventually(lambda: service.status()["spares"] == 2, timeout=15)
    warm = set(_spares(service))
    assert len(warm) == 2
    result = attach(service, tmp_path, {"web": curl("https://allowed.test/")})
    assert result.returncode == 0, result.stderr
    assert _status(result, "web") == "200"
    assert result.run_id in warm  # the task got a network made before it asked
    assert eventually(lambda: not sandbox.leftovers(net, result.run_id))  # after the reply
    assert eventually(lambda: service.status()["spares"] == 2, timeout=15)  # made again
    warm = set(_spares(service))
    assert service.stop() == 0
    for run_id in warm:
        assert not sandbox.leftovers(net, run_id), run_id


def test_an_attached_task_inherits_nothing_of_its_runner(service, net, tmp_path):
    """The attached runner forks the sandbox init (no second interpreter): the task still
    gets only stdio, no ignored signals (SIGPIPE ends `yes | head`), and its own cgroup as its root."""
    steps = {
        "fds": "ls /proc/self/fd | sort -n | tr '\\n' ' '",
        "ignored": "grep SigIgn /proc/self/status",
        "cgroup": "cat /proc/self/cgroup",
    }
    result = attach(service, tmp_path, steps)
    assert result.returncode == 0, result.stderr
    # 0-2, and the descriptor `ls` opens on /proc/self/fd itself
    assert result["fds"].out.split() == ["0", "1", "2", "3"], result["fds"].out
    assert result["ignored"].out.split() == ["SigIgn:", "0000000000000000"]
    assert all(line.endswith(":/") for line in result["cgroup"].out.split()), result["cgroup"].out


def test_the_service_reads_its_extra_ca_once(net, tmp_path):
    """`--extra-ca` was checked at start (certificates only, a regular file) and read
    again for every sandbox: a key written into it later (or a FIFO or a link put in
    its place) reached every new task's CA bundle unchecked (or hung the attach)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    ca = tmp_path / "extra-ca.pem"
    ca.write_text(net.ca_cert.read_text())
    service = GatewayProcess(net, tmp_path, rules, "--workers", "1", "--extra-ca", str(ca))
    service.start()
    try:
        ca.write_text("-----BEGIN PRIVATE KEY-----\nsg-not-for-tasks\n-----END PRIVATE KEY-----\n")
        result = attach(service, tmp_path, {"bundle": "cat /etc/ssl/certs/ca-certificates.crt"})
        assert result.returncode == 0, result.describe()
        assert net.ca_cert.read_text().strip() in result["bundle"].out  # what start read
        assert "sg-not-for-tasks" not in result["bundle"].out
    finally:
        service.stop()


def test_an_attach_cannot_name_another_process_as_its_runner(net, tmp_path):
    """The service signals a sandbox's runner when it stops (TERM, then KILL) and gc
    keeps a run while its runner lives. The runner's pid came from the request, so a
    member of the socket's group could have root kill a process of its choosing at the
    next `gateway stop`: now the pid is the connection's own (SO_PEERCRED). Before,
    the attach was granted and the stop killed the bystander."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    service = GatewayProcess(net, tmp_path, rules, "--workers", "1", "--grace", "0").start()
    bystander = subprocess.Popen(["sleep", "60"])
    client = control.ControlClient.connect(service.control)
    try:
        try:  # the connection stays open through the stop, as a runner's would
            client.request("attach", profile="default", runner_pid=bystander.pid)
            granted = True
        except control.ControlError as e:
            assert "is not the connecting process" in str(e), e
            granted = False
        assert service.stop() == 0
        assert bystander.poll() is None, "the stop killed a process it was never given"
        assert not granted
    finally:
        client.sock.close()
        service.stop()
        bystander.kill()
        bystander.wait()
