"""Human approvals (issue 10) end to end in the fake internet: a task's connection is
held while a human decides from the CLI; the name it asks for never reaches the
upstream DNS server before approval; a hold that runs out is a 403 (HTTP) that names
the pending approval; `always` is a rule in approved.yaml that survives a restart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import curl, eventually
from support.service import GatewayProcess, attach, attach_argv

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: HOLD}
    rules:
      - ask: allowed.test
        id: ask-allowed
      - deny: evil.test
"""


def _service(net, tmp_path, hold: str) -> GatewayProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("HOLD", hold))
    return GatewayProcess(net, tmp_path, rules).start()


def _pending(service: GatewayProcess) -> list[dict]:
    result = service.ask("approvals", "--json", "list")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _why_not_held(task: subprocess.Popen, service: GatewayProcess) -> str:
    """What the task and the service said, for a task that ended instead of being held."""
    out, err = task.communicate(timeout=30)
    return f"task exited {task.returncode}:\n{out}\n{err}\nservice log:\n{service.log.read_text()}"


class Task:
    """A task of `service` running `steps` in the background, while the test decides."""

    def __init__(self, service: GatewayProcess, tmp_path, steps: dict[str, str]):
        self.service = service
        self.workdir = sandbox._workdir(tmp_path)
        self.steps_dir = self.workdir / "steps"
        self.popen = subprocess.Popen(
            attach_argv(
                service, self.workdir, ["sh", "-c", sandbox._script(steps, self.steps_dir)]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def held(self, seen: set[str] = frozenset(), timeout: float = 45) -> dict:
        """The one pending approval whose id is not in `seen`, once there is one."""

        def fresh() -> list[dict] | bool:
            found = [a for a in _pending(self.service) if a["id"] not in seen]
            return found or self.popen.poll() is not None

        found = eventually(fresh, timeout=timeout)
        assert isinstance(found, list), _why_not_held(self.popen, self.service)
        (asked,) = found
        return asked

    def finish(self, timeout: float = 60) -> sandbox.RunResult:
        try:
            out, err = self.popen.communicate(timeout=timeout)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        result = sandbox._result(self.popen.returncode, out, err, self.workdir, self.steps_dir)
        if result.summary:
            self.service.wait_task_ended(result.run_id)
        return result


def test_a_held_connection_completes_when_approved_and_dns_waits_for_it(fakenet, tmp_path):
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        task = Task(service, tmp_path, {"held": curl("https://allowed.test/", timeout=40)})
        try:
            asked = task.held()
            assert (asked["name"], asked["port"], asked["protocol"]) == ("allowed.test", 443, "tls")
            assert {"id", "task_id", "profile", "method", "path", "waiting_s"} <= asked.keys()
            # Held, and the upstream resolver has not heard of the name.
            assert "allowed.test" not in fakenet.dns_queries_seen()
            assert fakenet.requests_seen() == []
            approved = service.ask("approvals", "approve", asked["id"], "--task")
            assert approved.returncode == 0, approved.stderr
            again = service.ask("approvals", "deny", asked["id"])
            assert again.returncode == 125 and "already approved (task)" in again.stderr
        finally:
            result = task.finish()
        assert result["held"].out.strip().splitlines()[-1] == "200", result.describe()
        assert "allowed.test" in fakenet.dns_queries_seen()  # resolved after approval
        events = service.events(kind="approval")
        assert [e["reason"] for e in events][:2] == ["approval_requested", "approval_granted"]
        assert events[1]["approver"].startswith("uid 0") and events[1]["scope"] == "task"
        unknown = service.ask("approvals", "approve", "nosuchid")
        assert unknown.returncode == 125 and "no approval 'nosuchid'" in unknown.stderr
    finally:
        service.stop()


def test_a_hold_that_runs_out_is_a_403_stays_pending_after_the_task_and_always_survives_a_restart(
    fakenet, tmp_path
):
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "1s")
    try:
        first = attach(
            service,
            tmp_path,
            {"http": curl("http://allowed.test/"), "tls": curl("https://allowed.test/")},
        )
        # Pass-through TLS held for the hold, then closed: no response, the approval stays.
        assert first["tls"].status == 0 and first["tls"].rc != 0, first.describe()
        (timed_out,) = first.events(kind="connection", reason="approval_pending")
        assert timed_out["protocol"] == "tls" and timed_out["approval_id"]
        body = first["http"].out
        assert body.strip().splitlines()[-1] == "403", first.describe()
        document = json.loads(body.splitlines()[1])
        assert document["reason"] == "approval_pending" and document["retry"] is True
        approval_id = document["approval_id"]
        assert f"sandgate approvals approve {approval_id}" in body.splitlines()[0]
        assert fakenet.requests_seen() == []
        assert "allowed.test" not in fakenet.dns_queries_seen()
        # The task has ended; its approval stays pending (a decision read the next
        # morning still counts), but only for the profile: once/task are refused.
        line = eventually(
            lambda: [
                x
                for x in service.ask("approvals", "list").stdout.splitlines()
                if approval_id in x and "(task ended)" in x
            ]
        )
        assert line and "allowed.test:80 (http)" in line[0], _pending(service)
        once = service.ask("approvals", "approve", approval_id, "--task")
        assert once.returncode == 125, once.stderr
        assert "the task has ended; approve --for or --always, or deny" in once.stderr
        ended = eventually(
            lambda: service.events(
                kind="approval", approval_id=approval_id, reason="approval_pending", verdict="ask"
            )
        )
        assert len(ended) == 1 and "the task has ended" in ended[0]["detail"], ended
        done = service.ask(
            "approvals",
            "approve",
            approval_id,
            "--always",
            "--ticket",
            "T-1",
            "--expires",
            "2099-12-31",
        )
        assert done.returncode == 0, done.stderr
        granted = eventually(
            lambda: service.events(
                kind="approval", approval_id=approval_id, reason="approval_granted"
            )
        )
        assert granted[0]["scope"] == "always" and "its task had ended" in granted[0]["detail"]
        # A later task: the rule is in force, nothing is held or asked.
        retry = attach(service, tmp_path, {"retry": curl("http://allowed.test/")})
        assert retry["retry"].status == 200, retry.describe()
        assert [r["uri"] for r in fakenet.requests_seen()] == ["/"]
        overlay = (tmp_path / "approved.yaml").read_text()
        assert "allowed.test" in overlay and "T-1" in overlay and "uid 0" in overlay
    finally:
        service.stop()
    # After a restart the rule is in force and listed; nothing asks any more.
    service = GatewayProcess(fakenet, tmp_path, tmp_path / "rules.yaml").start()
    try:
        shown = subprocess.run(
            [sandbox.SANDGATE, "rules", "show", str(tmp_path / "rules.yaml")],
            capture_output=True,
            text=True,
        )
        assert f"expires 2099-12-31 [approved:{approval_id}]" in shown.stdout, (
            shown.stdout + shown.stderr
        )
        later = attach(service, tmp_path, {"http": curl("http://allowed.test/")})
        assert later["http"].out.strip().splitlines()[-1] == "200", later.describe()
        assert _pending(service) == []
    finally:
        service.stop()


def test_a_denial_is_a_403_naming_the_approval_or_a_closed_connection(fakenet, tmp_path):
    """Denied from the CLI: the held plain-HTTP request gets the documented 403, the
    held pass-through TLS connection is closed, a retry is denied without asking
    again; the name was never resolved and the server got nothing."""
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        task = Task(
            service,
            tmp_path,
            {
                "http": curl("http://allowed.test/", timeout=40),
                "tls": curl("https://allowed.test/", timeout=40),
                "again": curl("http://allowed.test/", timeout=40),
            },
        )
        try:
            http = task.held()
            assert (http["protocol"], http["port"]) == ("http", 80), http
            denied = service.ask("approvals", "deny", http["id"])
            assert denied.returncode == 0 and denied.stdout.startswith("denied:"), denied.stderr
            tls = task.held(seen={http["id"]})
            assert (tls["protocol"], tls["port"]) == ("tls", 443), tls
            assert service.ask("approvals", "deny", tls["id"]).returncode == 0
        finally:
            result = task.finish()
        step = result["http"]
        assert step.status == 403, result.describe()
        line, document = step.body.splitlines()[:2]
        assert "http://allowed.test/" in line and http["id"] in line
        document = json.loads(document)
        assert document["reason"] == "approval_denied" and document["retry"] is False
        assert document["approval_id"] == http["id"]
        assert document["destination"] == "GET http://allowed.test/"
        assert document["ask_an_admin"] is None  # decided: approving it now would fail
        # Closed at the ClientHello: no status, curl's TLS handshake failed.
        assert result["tls"].status == 0 and result["tls"].rc != 0, result.describe()
        # The denial holds for the task: the retry is refused at once, nobody is asked.
        assert result["again"].status == 403 and result["again"].ms < 5000, result.describe()
        assert json.loads(result["again"].body.splitlines()[1])["approval_id"] == http["id"]
        assert fakenet.requests_seen() == []
        assert "allowed.test" not in fakenet.dns_queries_seen()
        decided = {
            e["approval_id"]: e
            for e in service.events(reason="approval_denied")
            if e["kind"] == "approval"
        }
        assert decided.keys() == {http["id"], tls["id"]}
        assert all(e["approver"].startswith("uid 0") for e in decided.values())
        assert all(e["name"] == "allowed.test" and e["verdict"] == "deny" for e in decided.values())
        request = service.events(kind="request", reason="approval_denied")
        assert [e["approval_id"] for e in request] == [http["id"], http["id"]]
        connection = service.events(kind="connection", reason="approval_denied")
        assert [(e["approval_id"], e["protocol"]) for e in connection] == [(tls["id"], "tls")]
        assert _pending(service) == []
    finally:
        service.stop()


def test_an_approval_for_a_duration_runs_out_and_the_next_request_is_asked_again(fakenet, tmp_path):
    """`approve --for 8s`: the held request and one inside the window go through;
    after the window a request opens a new pending approval (denied here), and the
    server saw exactly the two allowed requests."""
    fakenet.clear_logs()
    service = _service(fakenet, tmp_path, "25s")
    try:
        # The task waits for the test's go (a file in its workspace) before the last request.
        task = Task(
            service,
            tmp_path,
            {
                "held": curl("http://allowed.test/held", timeout=40),
                "inside": curl("http://allowed.test/inside"),
                "wait": "until [ -e go ]; do sleep 0.1; done",
                "after": curl("http://allowed.test/after", timeout=40),
            },
        )
        try:
            first = task.held()
            approved = service.ask("approvals", "approve", first["id"], "--for", "8s")
            assert approved.returncode == 0, approved.stderr
            assert "for a duration" in approved.stdout
            decided_by = (
                time.monotonic()
            )  # the grant runs out 8 s after the decision, before this + 8 s
            inside = eventually(lambda: (task.steps_dir / "inside.rc").exists(), timeout=20)
            assert inside, "the request inside the window did not finish"
            time.sleep(max(0.0, decided_by + 8.5 - time.monotonic()))
            (task.steps_dir / "go").touch()
            again = task.held(seen={first["id"]})
            assert again["path"] is None and again["protocol"] == "http"
            assert service.ask("approvals", "deny", again["id"]).returncode == 0
        finally:
            result = task.finish()
        assert result["held"].status == 200, result.describe()
        assert result["inside"].status == 200, result.describe()
        assert result["after"].status == 403, result.describe()
        assert [r["uri"] for r in fakenet.requests_seen()] == ["/held", "/inside"]
        granted = service.events(kind="request", reason="approval_granted")
        assert [(e["path"], e["scope"], e["approval_id"]) for e in granted] == [
            ("/held", "duration", first["id"]),
            ("/inside", "duration", first["id"]),
        ]
        asked = [
            e["approval_id"] for e in service.events(kind="approval", reason="approval_requested")
        ]
        assert asked == [first["id"], again["id"]]
    finally:
        service.stop()


def test_an_embedded_run_is_approved_from_a_second_process_through_its_own_socket(
    fakenet, tmp_path
):
    """A developer's `sandgate run` (no service) holds the task's request; a second
    `sandgate approvals` process, given no --control, finds the run's own socket
    (RUN_DIR/<id>/control.sock), lists and approves it, and the task's curl completes."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("HOLD", "25s"))
    # A run directory and service socket of this test's own: "the single run" is ours.
    env = {
        **os.environ,
        "SANDGATE_RUN_DIR": str(tmp_path / "run-dir"),
        "SANDGATE_CONTROL": str(tmp_path / "no-service.sock"),
    }
    workdir = sandbox._workdir(tmp_path)
    steps_dir = workdir / "steps"
    script = sandbox._script({"held": curl("https://allowed.test/", timeout=40)}, steps_dir)
    argv = sandbox._argv(fakenet, workdir, ["sh", "-c", script], rules, ("--admin-listen", "off"))
    run = fakenet.popen_in_host(
        argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def approvals(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sandbox.SANDGATE, "approvals", *args], capture_output=True, text=True, env=env
        )

    def listed() -> list[dict] | bool:
        result = approvals("--json", "list")
        return (json.loads(result.stdout) if result.returncode == 0 else []) or (
            run.poll() is not None
        )

    try:
        pending = eventually(listed, timeout=45)
        assert isinstance(pending, list), run.communicate(timeout=30)
        (asked,) = pending
        assert (asked["name"], asked["protocol"]) == ("allowed.test", "tls")
        assert fakenet.requests_seen() == []
        approved = approvals("approve", asked["id"])
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.startswith(f"approved: {asked['id']} allowed.test:443")
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    result = sandbox._result(run.returncode, out, err, workdir, steps_dir)
    assert result["held"].status == 200, result.describe()
    assert "control.sock list" in err  # the run told the developer where its socket is
    assert [r["host"] for r in fakenet.requests_seen()] == ["allowed.test"]
    granted = [e for e in result.events(kind="approval") if e["reason"] == "approval_granted"]
    assert [(e["approval_id"], e["scope"]) for e in granted] == [(asked["id"], "once")]
    assert granted[0]["approver"].startswith("uid 0")
    # The run is gone, and so is its socket: nothing left to find.
    assert not sandbox.leftovers(fakenet, result.run_id)
    assert not (tmp_path / "run-dir" / result.run_id).exists()
    gone = approvals("list")
    assert gone.returncode == 125 and "no running `sandgate run`" in gone.stderr


def test_an_approved_name_that_does_not_resolve_is_a_502_and_goes_nowhere(fakenet, tmp_path):
    """Plain HTTP to the placeholder of a name with no address upstream: approved, the
    gateway resolves it, finds nothing, and answers 502 itself (naming the name and
    the reason) instead of sending the request on to the placeholder."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("HOLD", "25s").replace("allowed.test", "nowhere.test"))
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        task = Task(service, tmp_path, {"held": curl("http://nowhere.test/x", timeout=40)})
        try:
            asked = task.held()
            assert "nowhere.test" not in fakenet.dns_queries_seen()
            assert service.ask("approvals", "approve", asked["id"]).returncode == 0
        finally:
            result = task.finish()
        step = result["held"]
        assert step.status == 502, result.describe()
        # sandgate's own answer (mitmproxy's, after a failed connect, would not say this).
        assert "Blocked by sandgate: dns_upstream_failure" in step.body
        assert "nowhere.test has no public address upstream" in step.body
        assert fakenet.dns_queries_seen().count("nowhere.test") == 1  # only after approval
        assert fakenet.requests_seen() == []
        (event,) = service.events(kind="request", name="nowhere.test")
        assert (event["verdict"], event["reason"]) == ("deny", "dns_upstream_failure")
        assert event["approval_id"] == asked["id"] and event["dst_ip"].startswith("198.18.")
        # Nothing was forwarded, so no upstream connection and no bytes from one.
        assert not event.get("bytes_down")
    finally:
        service.stop()


def test_a_second_concurrent_embedded_run_gets_its_own_approvals_page(fakenet, tmp_path):
    """Two developers' `sandgate run`s at once, with rules that ask: the first has the
    page on the default 127.0.0.1:9465, the second (9465 taken) on a free port it
    prints, without a warning."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("HOLD", "1s"))
    shared, rw = sandbox.shared_dir(tmp_path)
    first = sandbox.start(
        fakenet, tmp_path, f"until [ -e {shared}/go ]; do sleep 0.1; done", extra=rw, rules=rules
    )
    try:
        said = ""
        while "approvals page" not in said and (line := first.popen.stderr.readline()):
            said += line
        assert "sandgate: approvals page on http://127.0.0.1:9465/" in said, said
        second = sandbox.run(fakenet, tmp_path, {"ok": "true"}, rules=rules)
        page = re.search(
            r"approvals page on http://127\.0\.0\.1:(\d+)/ \(token in (\S+)\)", second.stderr
        )
        assert page and int(page[1]) != 9465, second.describe()
        assert "no approvals page" not in second.stderr and page[2].endswith("/admin-token")
        assert second["ok"].rc == 0
    finally:
        (shared / "go").touch()
        done = first.finish()
    assert done.returncode == 0, done.describe()


@pytest.mark.parametrize("asking", [False, True], ids=["never-asks", "asks"])
def test_an_embedded_run_opens_approvals_only_where_its_rules_may_ask(fakenet, tmp_path, asking):
    """Rules that can hold nothing for a human (no ask rule, no `fallback: ask`): the
    run opens no approvals page and no approvals socket, writes no admin token and
    says nothing of either; its task runs as ever (enforcer/run.py, gateway.asks).
    Rules that ask: both, before the task starts."""
    rules = tmp_path / "rules.yaml"
    never = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
    rules.write_text(RULES.replace("HOLD", "1s") if asking else never)
    shared, rw = sandbox.shared_dir(tmp_path)
    script = f"touch {shared}/started; until [ -e {shared}/go ]; do sleep 0.1; done"
    run = sandbox.start(fakenet, tmp_path, script, extra=rw, rules=rules)
    try:
        run_dir = sandbox.RUN_DIR / run.run_id()
        assert eventually(lambda: (shared / "started").exists(), timeout=30)
        assert (run_dir / "pid").exists()  # the run's state dir, while its task runs
        assert (run_dir / "admin-token").exists() is asking
        assert (run_dir / "control.sock").exists() is asking
    finally:
        (shared / "go").touch()
        done = run.finish()
    assert done.returncode == 0, done.describe()
    assert ("approvals page on" in done.stderr) is asking, done.stderr
    assert ("approvals for this run" in done.stderr) is asking, done.stderr


def test_a_sandbox_flooding_asks_gets_approval_queue_full_and_the_server_nothing(fakenet, tmp_path):
    """max_pending_per_sandbox 2: the task's first two asks stay pending (held, then a
    403 approval_pending); the third gets approval_queue_full at once and opens no
    approval; no name was resolved and no server got a request."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        RULES.replace("HOLD", "1s, max_pending_per_sandbox: 2").replace(
            "ask: allowed.test", 'ask: [allowed.test, "*.allowed.test"]'
        )
    )
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        names = ("allowed.test", "www.allowed.test", "api.allowed.test")
        # The fake internet's own link is 198.18.0.0/30, inside the placeholder pool:
        # 198.18.0.2, its gateway host's address, is never handed out as a placeholder.
        steps = {f"ask{i}": curl(f"http://{n}/") for i, n in enumerate(names)}
        result = attach(service, tmp_path, steps)
        first, second, third = (result[f"ask{i}"] for i in range(3))
        for step in (first, second):
            assert step.status == 403, result.describe()
            assert json.loads(step.body.splitlines()[1])["reason"] == "approval_pending"
        assert third.status == 403 and third.ms < 1000, result.describe()
        document = json.loads(third.body.splitlines()[1])
        assert document["reason"] == "approval_queue_full" and document["approval_id"] is None
        # Nothing went anywhere: no request, no upstream query for any of the names.
        assert fakenet.requests_seen() == []
        assert not set(names) & set(fakenet.dns_queries_seen())
        (full,) = service.events(kind="request", reason="approval_queue_full")
        assert full["name"] == "api.allowed.test" and full["verdict"] == "deny"
        asked = service.events(kind="approval", reason="approval_requested")
        assert [e["name"] for e in asked] == ["allowed.test", "www.allowed.test"]
        assert sorted(a["name"] for a in _pending(service)) == ["allowed.test", "www.allowed.test"]
    finally:
        service.stop()


def test_a_widened_approval_lets_a_sibling_through_and_a_plain_one_does_not(fakenet, tmp_path):
    """`*.allowed.test` is asked about. www approved `--for 1m`: api (a sibling) is
    still asked. api approved `--for 1m --widen '*.allowed.test'` (after a refused
    `*.test`, a public suffix): ssh, another sibling, goes through without asking."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        RULES.replace("HOLD", "25s").replace("ask: allowed.test", 'ask: "*.allowed.test"')
    )
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    try:
        task = Task(
            service,
            tmp_path,
            {
                "www": curl("http://www.allowed.test/", timeout=40),
                "wait1": "until [ -e go1 ]; do sleep 0.1; done",
                "api": curl("http://api.allowed.test/", timeout=40),
                "wait2": "until [ -e go2 ]; do sleep 0.1; done",
                "ssh": curl("http://ssh.allowed.test/", timeout=40),
            },
        )
        try:
            www = task.held()
            assert www["name"] == "www.allowed.test"
            plain = service.ask("approvals", "approve", www["id"], "--for", "1m")
            assert plain.returncode == 0 and "widened" not in plain.stdout, plain.stderr
            (task.steps_dir / "go1").touch()
            api = task.held(seen={www["id"]})  # the plain approval did not cover it
            assert api["name"] == "api.allowed.test"
            bad = service.ask("approvals", "approve", api["id"], "--for", "1m", "--widen", "*.test")
            assert bad.returncode == 125 and "public suffix 'test'" in bad.stderr, bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
            wide = service.ask(
                "approvals", "approve", api["id"], "--for", "1m", "--widen", "*.Allowed.test"
            )
            assert wide.returncode == 0, wide.stderr
            assert "widened to *.allowed.test" in wide.stdout
            (task.steps_dir / "go2").touch()
        finally:
            result = task.finish()
        for step in ("www", "api", "ssh"):
            assert result[step].status == 200, result.describe()
        assert result["ssh"].ms < 5000, result.describe()  # not held
        assert [r["host"] for r in fakenet.requests_seen()] == [
            "www.allowed.test",
            "api.allowed.test",
            "ssh.allowed.test",
        ]
        asked = service.events(kind="approval", reason="approval_requested")
        assert [e["name"] for e in asked] == ["www.allowed.test", "api.allowed.test"]
        granted = {
            e["approval_id"]: e for e in service.events(kind="approval", reason="approval_granted")
        }
        assert granted[www["id"]].get("widened") is None
        assert granted[api["id"]]["widened"] == "*.allowed.test"
        (ssh,) = service.events(kind="request", name="ssh.allowed.test")
        assert (ssh["reason"], ssh["approval_id"], ssh["widened"]) == (
            "approval_granted",
            api["id"],
            "*.allowed.test",
        )
    finally:
        service.stop()


@pytest.mark.parametrize(
    ("rules", "name", "address"),
    [
        pytest.param(
            "      - ask: allowed.test\n      - deny: 203.0.113.10\n",
            "allowed.test",
            "203.0.113.10",
            id="an-ip-deny-rule",
        ),
        pytest.param(
            "      - ask: internal.test\n      - allow: 10.99.0.0/16\n        ports: [8080]\n",
            "internal.test",
            "10.99.0.10",
            id="a-private-range-opened-on-another-port",
        ),
    ],
)
def test_an_approved_name_is_decided_again_on_the_address_it_resolves_to(
    fakenet, tmp_path, rules, name, address
):
    """A placeholder is decided by its name alone; after approval the gateway resolves
    the name itself. The address it finds must still pass the rules a direct connect
    to it would meet: an IP deny rule, a private range opened only on another port.
    Before the fix the request reached the server at `address` (its nginx log)."""
    fakenet.clear_logs()
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  default:\n    approval: {hold: 25s}\n    rules:\n" + rules
    )
    service = GatewayProcess(fakenet, tmp_path, path).start()
    try:
        task = Task(service, tmp_path, {"held": curl(f"http://{name}/x", timeout=40)})
        try:
            asked = task.held()
            assert service.ask("approvals", "approve", asked["id"]).returncode == 0
        finally:
            result = task.finish()
        step = result["held"]
        assert fakenet.dns_queries_seen().count(name) == 1  # resolved, after approval
        assert fakenet.requests_seen(address) == [], result.describe()
        (refused,) = service.events(kind="dns", name=name, verdict="deny")
        assert address in refused["detail"], refused
        # The task and the request event are told the refusal (a 403 with its rule),
        # not that the name had no address.
        assert step.status == 403, result.describe()
        assert f"Blocked by sandgate: {refused['reason']}, rule {refused['rule_id']}" in step.body
        assert f"{name} resolved to {address}" in step.body, step.body
        (event,) = service.events(kind="request", name=name)
        assert (event["verdict"], event["reason"], event["rule_id"]) == (
            "deny",
            refused["reason"],
            refused["rule_id"],
        ), event
        assert event["approval_id"] == asked["id"]
    finally:
        service.stop()
