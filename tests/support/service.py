"""A `sandgate gateway` service in the fake internet's host netns, and tasks attached to it.

`GatewayProcess` starts the service with a rule file and a control socket of the
test's own (its sandboxes' state under /run/sandgate sits beside other services', as
on a host with several), waits until it answers, and stops it (or SIGKILLs it) by its pid. `attach` runs labelled steps in
a sandbox of that service, like `sandbox.run` does for an embedded gateway, and
returns the same RunResult, with the service's audit-log lines of that task.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from support import sandbox

# Two profiles for the service tests: `default` may reach allowed.test and below it,
# `api` only www.allowed.test.
TWO_PROFILES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: web-allowed
  api:
    rules:
      - allow: www.allowed.test
        id: api-www
"""


class GatewayProcess:
    def __init__(self, fakenet, workdir: Path, rules: Path, *extra: str, wrap: tuple = ()):
        """`wrap`: a command the service runs under, e.g. ("setpriv", "--no-new-privs")."""
        self.fakenet, self.workdir, self.rules, self.wrap = fakenet, workdir, rules, wrap
        self.control = workdir / "control" / "gateway.sock"
        self.control.parent.mkdir(mode=0o755, exist_ok=True)
        self.audit = workdir / "gateway-audit.jsonl"
        self.log = workdir / "gateway.log"
        self.extra = extra
        self.popen: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        argv = [
            *self.wrap,
            sandbox.SANDGATE,
            "gateway",
            "--rules",
            str(self.rules),
            "--dns-upstream",
            self.fakenet.dns_ip,
            "--extra-ca",
            str(self.fakenet.ca_cert),
            "--control",
            str(self.control),
            "--audit-log",
            str(self.audit),
            "--metrics-listen",
            "off",
            *self.extra,
        ]
        # nsenter, not `ip netns exec`: in the test's mount namespace, as a service on a
        # real host, so that the sandboxes' netns mounts outlive a killed service.
        enter = ["nsenter", f"--net={sandbox.NETNS_DIR / self.fakenet.host_ns}", "--"]
        self.popen = subprocess.Popen(
            enter + argv,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"sandgate gateway exited with {self.popen.returncode}:\n{self.log.read_text()}"
                )
            if self.ask("status").returncode == 0:
                return self
            time.sleep(0.05)
        raise AssertionError(
            f"sandgate gateway did not answer within {timeout} s:\n{self.log.read_text()}"
        )

    def ask(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sandbox.SANDGATE, *argv, "--control", str(self.control)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def status(self) -> dict:
        result = self.ask("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def events(self, **fields) -> list[dict]:
        """The audit log's records so far; a last line without its newline is being
        written by the audit thread at this moment (a batch is one write, which a
        reader can see half done): it is left for the next look."""
        text = self.audit.read_text() if self.audit.exists() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()
        records = [json.loads(line) for line in lines if line]
        return [e for e in records if all(e.get(k) == v for k, v in fields.items())]

    def first_task_id(self) -> str:
        """The task id of the first task's start event. The writer thread writes lines
        within its flush interval (50 ms), which a task's first answer can beat under
        load: wait for the line."""
        started = sandbox.eventually(
            lambda: self.events(reason="rule_allow", kind="task"), timeout=10
        )
        assert started, "no task start event in the audit log"
        return started[0]["task_id"]

    def verify_audit(self) -> None:
        """`sandgate audit verify` of the service's audit log passes (its hash chain)."""
        verify = subprocess.run(
            [sandbox.SANDGATE, "audit", "verify", str(self.audit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr

    def wait_task_ended(self, task_id: str) -> None:
        """The service answers a detach before its audit writer (a thread) has written
        the task's last lines: wait for the task's end event."""
        sandbox.eventually(
            lambda: any(
                (e.get("detail") or "").startswith("task ended")
                for e in self.events(task_id=task_id, kind="task")
            ),
            timeout=10,
        )

    def stop(self, timeout: float = 30.0) -> int:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else 0
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@contextlib.contextmanager
def running(fakenet, tmp_path: Path, rules_text: str, *extra: str):
    """A started `GatewayProcess` with the rule file `rules_text`, stopped after."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    gateway = GatewayProcess(fakenet, tmp_path, rules, *extra).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def browser_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a test's headless Chromium (the admin page's browser tests):
    its profile and its temporary files in the test's own directory (Chromium left an
    org.chromium.Chromium.* directory in /tmp at every run)."""
    return {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}


def counted(events: list[dict]) -> int:
    """Events the audit records stand for: an aggregate stands for `suppressed` of them."""
    return sum(e.get("suppressed") or 1 for e in events)


def attach_argv(
    service: GatewayProcess,
    workdir: Path,
    command: list[str],
    *,
    profile: str = "default",
    extra: tuple[str, ...] = (),
) -> list[str]:
    return [
        sandbox.SANDGATE,
        "run",
        "--gateway",
        str(service.control),
        "--profile",
        profile,
        "--summary-json",
        str(workdir / "summary.json"),
        "--workspace",
        str(workdir / "steps"),
        *extra,
        "--",
        *command,
    ]


def start_attached(
    service: GatewayProcess, tmp_path: Path, code: str, *args: str, profile: str
) -> tuple[subprocess.Popen, Path]:
    """`sandgate run --gateway` of the sandbox's python running `code` with `args`, in
    the background, the shared directory (sandbox.shared_dir) writable: its Popen
    (stderr piped) and its work directory (summary.json)."""
    _, rw = sandbox.shared_dir(tmp_path)
    workdir = sandbox._workdir(tmp_path)
    command = [sandbox.SANDBOX_PYTHON, "-c", code, *args]
    popen = subprocess.Popen(
        attach_argv(service, workdir, command, profile=profile, extra=rw),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return popen, workdir


def finish_attached(popen: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for a start_attached run (killed past `timeout`); its stderr."""
    try:
        _, err = popen.communicate(timeout=timeout)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    return err


class BesideACrowd(NamedTuple):
    crowd: list[tuple[subprocess.Popen, Path]]  # start_attached's runs, ended
    honest: tuple[subprocess.Popen, Path]
    honest_err: str
    crowd_errs: list[str]


def beside_a_crowd(
    service: GatewayProcess,
    tmp_path: Path,
    crowd: list[tuple[str, tuple[str, ...], str]],
    honest: tuple[str, tuple[str, ...], str],
    up_timeout: float = 40,
) -> BesideACrowd:
    """Start each of `crowd` ((code, args, profile) for start_attached), wait until
    each has written `up-I` (I its index) in the shared directory, run `honest` (the
    same form) to its end, then write `stop` there and wait for the crowd. Every run
    is ended, also on a failure."""
    shared, _ = sandbox.shared_dir(tmp_path)
    started = [start_attached(service, tmp_path, code, *args, profile=p) for code, args, p in crowd]
    ran = None
    try:
        up = sandbox.eventually(
            lambda: all((shared / f"up-{i}").exists() for i in range(len(crowd))),
            timeout=up_timeout,
        )
        assert up, [p.stderr.read() if p.poll() is not None else "running" for p, _ in started]
        code, args, profile = honest
        ran = start_attached(service, tmp_path, code, *args, profile=profile)
        honest_err = finish_attached(ran[0])
        (shared / "stop").write_text("stop")
        errs = [finish_attached(p) for p, _ in started]
    finally:
        (shared / "stop").write_text("stop")
        for popen, _ in [*started, *([ran] if ran else [])]:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
    return BesideACrowd(started, ran, honest_err, errs)


def attach(
    service: GatewayProcess,
    tmp_path: Path,
    steps: dict[str, str],
    *,
    profile: str = "default",
    extra: tuple[str, ...] = (),
    timeout: float = 90.0,
) -> sandbox.RunResult:
    """`sandgate run --gateway` of labelled steps; the result's audit is the service's
    lines for this task."""
    workdir = sandbox._workdir(tmp_path)
    steps_dir = workdir / "steps"
    command = ["sh", "-c", sandbox._script(steps, steps_dir)]
    proc = subprocess.run(
        attach_argv(service, workdir, command, profile=profile, extra=extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = sandbox._result(proc.returncode, proc.stdout, proc.stderr, workdir, steps_dir)
    if result.summary:
        service.wait_task_ended(result.run_id)
        result.audit = service.events(task_id=result.run_id)
    return result


# The approval webhook's receiver: each POST's signature header and body as one JSON line.
_RECEIVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
log = open(sys.argv[2], "a")
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        log.write(json.dumps({"signature": self.headers.get("x-sandgate-signature"),
                              "body": body.decode()}) + "\n")
        log.flush()
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
WEBHOOK_SECRET = "s3cret-key-for-the-webhook-test"


class WebhookReceiver:
    """An approval webhook's receiver on 127.0.0.1:`port` of the fake internet's host
    netns (where the service runs); `options` are the service's flags for it."""

    def __init__(self, fakenet, tmp_path: Path, port: int):
        secret = tmp_path / "webhook.key"
        secret.write_text(WEBHOOK_SECRET + "\n")
        self.received = tmp_path / "webhook.jsonl"
        self.proc = fakenet.popen_in_host(
            [sys.executable, "-c", _RECEIVER, str(port), str(self.received)]
        )
        self.options = (
            "--approval-webhook", f"http://127.0.0.1:{port}/hook",
            "--approval-webhook-secret", str(secret),
        )  # fmt: skip

    def posts(self, timeout: float = 10.0) -> list[dict]:
        """What it got once it got something: each POST's signature and body."""
        lines = sandbox.eventually(
            lambda: self.received.exists() and self.received.read_text().splitlines(),
            timeout=timeout,
        )
        return [json.loads(line) for line in lines]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
