"""A task's locks on what it can read of the host do not stop the gateway.

The host is read-only in the sandbox, but flock needs only a descriptor: a task can
open any directory or file it may read and hold LOCK_EX on it for as long as it runs.
Every writer of approved.yaml (the service, embedded runs) took its lock on the rules'
own directory (/etc/sandgate: readable by everyone, so by every task), so one task
holding it made every `approve --always` of every task on that gateway wait 30 s and
be refused ("being updated by another gateway"). The lock is now a root-only file
under the state directory, which no task can open (approvals_control._open_lock).

The rules live outside /tmp here (the sandbox's /tmp is a tmpfs of its own), in a
directory readable by everyone, as /etc/sandgate is.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

import pytest
from support.sandbox import curl, python
from support.service import GatewayProcess
from test_always_atomic import RULES, Task, _pending

pytestmark = pytest.mark.e2e

LOCKER = """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    while not os.path.exists("go"):
        time.sleep(0.05)
"""


@pytest.fixture
def rules_dir():
    base = Path("/srv") if Path("/srv").is_dir() else Path("/opt")
    directory = base / f"sandgate-test-rules-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_task_holding_a_lock_on_the_rules_directory_does_not_stop_always(
    net, tmp_path, rules_dir
):
    rules = rules_dir / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        locker = Task(
            service,
            tmp_path,
            {"lock": f"touch locking; {python(LOCKER, str(rules_dir))}"},
        )
        asker = Task(service, tmp_path, {"ask": curl("http://allowed.test/", timeout=60)})
        try:
            # The locker holds the lock (its step is still running: no rc file yet).
            out = locker.steps_dir / "lock.out"
            deadline = time.monotonic() + 60
            while not out.exists() or "locked" not in out.read_text():
                assert time.monotonic() < deadline and locker.popen.poll() is None, out
                time.sleep(0.05)
            asked = asker.held()
            started = time.monotonic()
            always = service.ask("approvals", "approve", asked["id"], "--always")
            took = time.monotonic() - started
            assert always.returncode == 0, (always.stdout, always.stderr, took)
            assert took < 10, took
            assert locker.popen.poll() is None  # the lock was held all along
            asked_result = asker.finish()
        finally:
            locker.go("go")
            for task in (asker, locker):
                if task.popen.poll() is None:
                    task.popen.kill()
                task.popen.wait()
        assert asked_result["ask"].status == 200, asked_result.describe()
        assert f"approved:{asked['id']}" in (rules_dir / "approved.yaml").read_text()
        assert not _pending(service)
    finally:
        service.stop()
