"""Rule reloads of a running `sandgate gateway --workers 2`, probed by an admin who
edits in place and a task that keeps trying what both the old and the new rules deny
(docs/operations.md, "Stop, reload, restart"). Each test proves, from the fake
internet's nginx log, that the forbidden server got nothing.

Covered elsewhere, not repeated here: a broken edit keeps the old policy and a good
one applies (test_service.py), each worker closes its own connections on a reload
(test_workers_e2e.py), held approvals across a reload (test_approval_binding.py),
expiry (test_rule_expiry.py), the reloader's own contract (unit/test_reload.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

FORBIDDEN_IP = "203.0.113.11"  # api.allowed.test: under the wildcard, denied by name
HEAD = "version: 1\nprofiles:\n  default:\n    rules:\n"
WILDCARD = '      - allow: "*.allowed.test"\n        id: wildcard\n'
DENY_API = "      - deny: api.allowed.test\n        id: no-api\n"
OLD_RULES = HEAD + WILDCARD + DENY_API
# The edit adds a rule at the end; its first half is a valid file without the deny.
NEW_RULES = OLD_RULES + "      - deny: evil.test\n        id: no-evil\n"
HALF = HEAD + WILDCARD

# Fetches https://api.allowed.test/ every 50 ms until `stop` appears in the shared
# directory: one line per attempt in `probes` (the HTTP status, or the error's name).
PROBE = """
import os, sys, time, urllib.request
shared = sys.argv[1]
with open(f"{shared}/probes", "a") as out:
    while not os.path.exists(f"{shared}/stop"):
        try:
            status = str(urllib.request.urlopen("https://api.allowed.test/", timeout=2).status)
        except Exception as e:
            status = type(e).__name__
        out.write(status + "\\n")
        out.flush()
        time.sleep(0.05)
"""


@pytest.fixture
def service(fakenet, tmp_path):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(OLD_RULES)
    old = time.time() - 60  # an edit long ago: the first reload has nothing to wait for
    os.utime(rules, (old, old))
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--workers", "2").start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _probe(service, tmp_path) -> tuple[subprocess.Popen, os.PathLike]:
    shared, rw = sandbox.shared_dir(tmp_path)
    command = [sandbox.SANDBOX_PYTHON, "-c", PROBE, str(shared)]
    task = subprocess.Popen(
        attach_argv(service, sandbox._workdir(tmp_path), command, extra=rw),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    probes = shared / "probes"
    assert eventually(lambda: probes.exists() and probes.read_text().count("\n") >= 2, 30), (
        task.stderr
    )
    return task, shared


def _stop_probe(task, shared) -> list[str]:
    (shared / "stop").touch()
    task.communicate(timeout=30)
    return (shared / "probes").read_text().split()


def _one_policy_everywhere(service) -> str:
    """The policy every worker reports, which is the service's; no worker restarted."""
    status = service.status()
    workers = status["workers"]
    assert [w["restarts"] for w in workers] == [0, 0], workers
    assert {w["policy"] for w in workers} == {status["policy"]}, (status["policy"], workers)
    return status["policy"]


def test_a_rule_file_written_in_place_is_never_in_force_half_written(service, tmp_path):
    """The admin rewrites rules.yaml in place (`cat > rules.yaml`): truncated, the first
    half written, a pause, the rest. A SIGHUP in the pause, and the file watcher, must
    not put the half in force, in which api.allowed.test (denied before and after) is
    allowed by the wildcard. Then a broken edit: `sandgate reload` exits 2 with
    FILE:LINE:COL and the rules stay."""
    before = _one_policy_everywhere(service)
    task, shared = _probe(service, tmp_path)
    try:
        with service.rules.open("w") as writer:
            writer.write(HALF)
            writer.flush()
            os.kill(service.status()["pid"], signal.SIGHUP)
            time.sleep(0.3)  # less than the reloader's settle time
            writer.write(NEW_RULES[len(HALF) :])
        assert eventually(lambda: service.status()["policy"] != before, timeout=10)
        time.sleep(1.5)  # the watcher's next look, and more probes
        after = _one_policy_everywhere(service)
        loaded = service.events(kind="policy", reason="policy_loaded")
        # The start and the reload(s) of the whole file: never a third policy.
        assert {e["policy_hash"] for e in loaded} == {before, after}, loaded

        service.rules.write_text(NEW_RULES + "      - allow: [\n")
        reload = service.ask("reload")
        assert reload.returncode == 2, reload.stdout + reload.stderr
        assert f"{service.rules}:12:1: YAML syntax error" in reload.stderr
        assert "Traceback" not in reload.stderr
        assert _one_policy_everywhere(service) == after
    finally:
        probes = _stop_probe(task, shared)
    assert len(probes) >= 10 and "200" not in probes, probes
    assert service.fakenet.requests_seen(FORBIDDEN_IP) == []
    assert service.stop() == 0
    service.verify_audit()


def test_a_reload_storm_over_two_workers_ends_on_one_policy_and_loses_no_event(service, tmp_path):
    """A hundred SIGHUPs and four `sandgate reload`s at once, with a rule edit in the
    middle, while a task probes the denied name: every reload answers, both workers end
    on the service's policy without a restart, the audit log's chain verifies, and
    every probe that the gateway answered is in it."""
    task, shared = _probe(service, tmp_path)
    pid = service.status()["pid"]
    try:
        reloads = [
            subprocess.Popen(
                [sandbox.SANDGATE, "reload", "--json", "--control", str(service.control)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        for i in range(100):
            os.kill(pid, signal.SIGHUP)
            if i == 50:
                service.rules.write_text(NEW_RULES)
        for proc in reloads:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, out + err
        assert eventually(
            lambda: (
                service.events(kind="policy", reason="policy_loaded")
                and _one_policy_everywhere(service) != ""
            ),
            timeout=10,
        )
        # The file change is in force everywhere once the storm is over.
        time.sleep(2)
        final = _one_policy_everywhere(service)
        assert service.events(kind="policy", reason="policy_loaded")[-1]["policy_hash"] == final
        assert not service.events(reason="policy_invalid")
    finally:
        probes = _stop_probe(task, shared)
    assert "200" not in probes and len(probes) >= 5, probes
    assert service.fakenet.requests_seen(FORBIDDEN_IP) == []
    # Every probe the gateway answered (a DNS refusal for the denied name) is an event.
    denied = service.events(kind="dns", name="api.allowed.test", verdict="deny")
    assert len(denied) >= len(probes), (len(denied), len(probes))
    assert service.stop() == 0
    service.verify_audit()
