"""Many runs at once, as a CI fan-out starts them: N embedded `sandgate run`s on a
fresh host (an empty state dir: no gateway CA, no seccomp cache yet) with `sandgate
gc` run beside them, and N runs attached to one service at once.

Each run is held to what a run alone gets: the task's exit code, its own audit events
(its own task id, its own requests), a summary, and nothing left behind (netns, veth,
table, cgroup, state dir, process). Every run inspects TLS with the gateway's CA, so
all of them have to trust the one CA their gateways sign with; each also tries a
forbidden name, which the fake internet never hears of.

State is this test's own (SANDGATE_RUN_DIR, SANDGATE_STATE_DIR): other runs on the
machine are not touched. Shared still: the host's address-pick lock
(/run/sandgate-addresses.lock) and the fake internet's host netns."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import cgroup
from support import sandbox
from support.service import GatewayProcess, attach_argv

RUNS = 24
FORBIDDEN_IP = "203.0.113.66"  # forbidden.test, in the fake internet


def task(i: int, workspace: Path) -> list[str]:
    """An inspected request (the gateway's CA), a forbidden one, then exit 3+i."""
    fetch = "curl -sS --max-time 20 -o /dev/null -w '%{http_code}'"
    script = (
        f"cd {workspace}\n"
        f"{fetch} https://api.allowed.test/public/storm-{i} >api.out 2>api.err\n"
        f"{fetch} --max-time 5 https://forbidden.test/storm-{i} >no.out 2>no.err\n"
        f"exit {3 + i}\n"
    )
    return ["sh", "-c", script]


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A run dir and a state dir of this test's own, empty: a fresh host's."""
    run_dir, state_dir = tmp_path / "run", tmp_path / "state"
    monkeypatch.setenv("SANDGATE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("SANDGATE_STATE_DIR", str(state_dir))
    return run_dir, state_dir


def check_run(i: int, code: int, err: str, workdir: Path, events: list[dict]) -> str:
    """The run's task id, after asserting what run `i` must have got."""
    summary = sandbox._result(code, "", err, workdir, None).summary
    assert code == 3 + i, f"run {i}: exit {code}\n{err[-2000:]}"
    assert summary.get("exit_code") == 3 + i, f"run {i}: {summary}"
    run_id = summary["task_id"]
    workspace = workdir / "steps"
    api = (workspace / "api.out").read_text()
    assert api not in ("", "000"), f"run {i}: {(workspace / 'api.err').read_text()}\n{err[-2000:]}"
    assert (workspace / "no.out").read_text() == "000"
    ours = [e for e in events if e.get("task_id") is not None]
    assert {e["task_id"] for e in ours} == {run_id}, f"run {i}: events of other tasks"
    paths = {e["path"] for e in ours if e.get("path")}
    assert paths == {f"/public/storm-{i}"}, f"run {i}: {paths}"
    assert {(e["verdict"], e.get("name")) for e in ours if e["kind"] == "request"} == {
        ("allow", "api.allowed.test")
    }
    assert any(e["verdict"] == "deny" and e.get("name") == "forbidden.test" for e in ours), (
        f"run {i}: no deny for forbidden.test"
    )
    return run_id


def assert_nothing_left(fakenet, run_dir: Path, run_ids: list[str]) -> None:
    def veths_gone() -> bool:
        links = fakenet.run_in_host(["ip", "-o", "link", "show"], check=True).stdout
        return not any(f"sgh-{run_id}" in links for run_id in run_ids)

    # A released netns and its veth are the kernel's to delete, in its cleanup worker:
    # after a burst of runs, moments after the last (as sandbox.leftovers waits).
    sandbox.eventually(veths_gone, timeout=20)
    links = fakenet.run_in_host(["ip", "-o", "link", "show"], check=True).stdout
    tables = set(fakenet.run_in_host(["nft", "list", "tables"], check=True).stdout.split())
    cgroups = {Path(p).name for p in cgroup.leftovers()}
    left = []
    for run_id in run_ids:
        left += [f"netns sg-{run_id}"] if (sandbox.NETNS_DIR / f"sg-{run_id}").exists() else []
        left += [f"veth sgh-{run_id}"] if f"sgh-{run_id}" in links else []
        left += [f"table sandgate_{run_id}"] if f"sandgate_{run_id}" in tables else []
        left += [f"cgroup {run_id}"] if f"{cgroup.PREFIX}{run_id}" in cgroups else []
        left += [f"process {p}" for p in sandbox.processes_of(run_id)]
    left += [f"state {d}" for d in run_dir.iterdir()] if run_dir.exists() else []
    assert not left, left


def assert_first_use_made_once(state_dir: Path, workspaces: int) -> None:
    """One gateway CA (every task trusted the CA its gateway signed with: the api
    requests passed), one seccomp program, one file of dataclass methods
    (enforcer/dataclass_cache.py), one compiled policy (enforcer/policy_cache.py:
    every run had the same rules) and one Java truststore of the CA bundle
    (enforcer/java_truststore.py) in the cache, and one kept walk of each run's
    workspace (planting.keep); no half-written files."""
    ca = sorted(p.name for p in (state_dir / "ca").iterdir())
    assert "mitmproxy-ca.pem" in ca and not [n for n in ca if n.endswith(".partial")], ca
    cache = sorted(p.name for p in (state_dir / "cache").iterdir())
    walks = [n for n in cache if n.startswith("walk-") and n.endswith(".json")]
    assert len(walks) == workspaces, cache
    made = [n for n in cache if n not in walks]
    assert len(made) == 4, cache  # none of the writers' temporaries (.NAME.PID) left
    assert [n.split("-")[0] for n in made] == ["dataclass", "java", "policy", "seccomp"], cache


@pytest.mark.parametrize("host", ["fresh", "warm"])
def test_a_burst_of_embedded_runs_beside_gc(net, tmp_path, state, host):
    """`fresh`: the state dir empty (every run races to make the CA and the seccomp
    cache); `warm`: one run made them before."""
    run_dir, state_dir = state
    if host == "warm":
        first = sandbox.run(
            net, tmp_path, {"api": "curl -sS -o /dev/null https://api.allowed.test/public/x"}
        )
        assert first.returncode == 0 and first["api"].rc == 0, first.describe()
        made = (state_dir / "ca" / "mitmproxy-ca.pem").read_bytes()
    started = []
    for i in range(RUNS):
        workdir = sandbox._workdir(tmp_path)
        argv = sandbox._argv(net, workdir, task(i, workdir / "steps"), sandbox.DEMO_RULES, ())
        pipes = {
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.PIPE,
            "stdin": subprocess.DEVNULL,
        }
        started.append((net.popen_in_host(argv, text=True, **pipes), workdir))
    try:
        # `sandgate gc` while they start and run: it takes nothing of a live run.
        gcs = 0
        while any(p.poll() is None for p, _ in started) and gcs < 20:
            collected = sandbox.gc(net)
            assert collected.returncode == 0, collected.stderr
            if "removed" in collected.stdout:  # whose? the runs that ended, and how
                ended = [(p.pid, p.returncode, p.communicate()[1][-1500:])
                         for p, _ in started if p.poll() is not None]  # fmt: skip
                raise AssertionError(f"gc: {collected.stdout}; runs ended so far: {ended}")
            gcs += 1
        errs = [p.communicate(timeout=120)[1] for p, _ in started]
    finally:
        killed = [popen for popen, _ in started if popen.poll() is None]
        for popen in killed:
            popen.kill()
            popen.wait()
        if killed:  # their netns, cgroups and state dirs: this test's RUN_DIR's gc
            sandbox.gc(net)
    run_ids = []
    for i, ((popen, workdir), err) in enumerate(zip(started, errs, strict=True)):
        events = sandbox._result(0, "", "", workdir, None).audit
        run_ids.append(check_run(i, popen.returncode, err, workdir, events))
    assert len(set(run_ids)) == RUNS
    assert gcs >= 1
    assert_first_use_made_once(state_dir, workspaces=RUNS + (host == "warm"))
    if host == "warm":
        assert (state_dir / "ca" / "mitmproxy-ca.pem").read_bytes() == made
    assert not [r for r in net.requests_seen(FORBIDDEN_IP) if "storm" in r["uri"]]
    assert "forbidden.test" not in " ".join(net.dns_queries_seen())
    assert_nothing_left(net, run_dir, run_ids)


def test_a_burst_of_runs_attached_to_one_service(net, tmp_path, state):
    run_dir, state_dir = state
    service = GatewayProcess(net, tmp_path, sandbox.DEMO_RULES).start()
    started = []
    try:
        for i in range(RUNS):
            workdir = sandbox._workdir(tmp_path)
            argv = attach_argv(service, workdir, task(i, workdir / "steps"))
            pipes = {
                "stdout": subprocess.DEVNULL,
                "stderr": subprocess.PIPE,
                "stdin": subprocess.DEVNULL,
            }
            started.append((subprocess.Popen(argv, text=True, **pipes), workdir))
        errs = [p.communicate(timeout=120)[1] for p, _ in started]
        run_ids = []
        for i, ((popen, workdir), err) in enumerate(zip(started, errs, strict=True)):
            summary = sandbox._result(0, "", "", workdir, None).summary
            assert summary, f"run {i}: no summary; exit {popen.returncode}\n{err[-2000:]}"
            service.wait_task_ended(summary["task_id"])
            events = service.events(task_id=summary["task_id"])
            run_ids.append(check_run(i, popen.returncode, err, workdir, events))
        assert len(set(run_ids)) == RUNS
        assert sandbox.eventually(lambda: service.status()["sandboxes"] == 0, timeout=20)
        service.verify_audit()
    finally:
        for popen, _ in started:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        assert service.stop() == 0
    assert not [r for r in net.requests_seen(FORBIDDEN_IP) if "storm" in r["uri"]]
    assert "forbidden.test" not in " ".join(net.dns_queries_seen())
    assert sandbox.eventually(lambda: not any(sandbox.processes_of(r) for r in run_ids), timeout=10)
    assert_nothing_left(net, run_dir, run_ids)
    assert (state_dir / "cache").is_dir()
