"""The audit trail and the run's files when the disk misbehaves, end to end with
`sandgate run`: the log's file system full from the start, the log cut short under
the gateway (logrotate's copytruncate) and then a full disk, a FIFO or device given
as the log, a summary that cannot be written. What the task gets, what the admin
sees, what `sandgate audit verify` says. (A disk that fills up mid-run and is freed:
test_audit_hardening.py; faults injected in process: tests/unit/test_disk_faults.py.)

Each file system is a small tmpfs mounted in the gateway's own mount namespace (`ip
netns exec` gives the process one): it goes when the process ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from support import sandbox
from support.service import GatewayProcess

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test
# Mounts the tmpfs at $0, runs the rest; FILL=1 fills it first; copies the log out.
ON_TMPFS = (
    'mount -t tmpfs -o size=256k sandgate-test-audit "$0" || exit 99; '
    '[ -n "$FILL" ] && { dd if=/dev/zero of="$0/filler" bs=4k 2>/dev/null; true; }; '
    '"$@"; rc=$?; cp -a "$0"/audit.jsonl* "$KEPT"/ 2>/dev/null; exit $rc'
)


def _dirs(tmp_path, name: str):
    workdir = tmp_path / name
    steps, logdir, kept = workdir / "steps", workdir / "auditfs", workdir / "kept"
    for d in (steps, logdir, kept):
        d.mkdir(parents=True)
    return workdir, steps, logdir, kept


def _start_on_tmpfs(net, workdir, logdir, kept, task: str, fill: bool = False):
    argv = sandbox._argv(net, workdir, ["sh", "-c", task], sandbox.DEMO_RULES, ())
    argv[argv.index("--audit-log") + 1] = str(logdir / "audit.jsonl")
    env = ["env", f"KEPT={kept}"] + (["FILL=1"] if fill else [])
    return net.popen_in_host(
        [*env, "sh", "-c", ON_TMPFS, str(logdir), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(popen, timeout: float = 60):
    try:
        return popen.communicate(timeout=timeout)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def _verify(*paths) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sandbox.SANDGATE, "audit", "verify", *map(str, paths)], capture_output=True, text=True
    )


def _wait_file(path, timeout: float = 30.0) -> None:
    assert sandbox.eventually(path.exists, timeout=timeout), f"{path} never appeared"


CURL = "curl -s -o /dev/null --max-time 3 -w '%{http_code}' https://allowed.test/$1"


def test_a_log_on_a_full_disk_from_the_start_refuses_and_says_what_it_lost(net, tmp_path):
    """Nothing can be written from the first event on: the task's connection is
    refused (the server gets nothing), stderr names the disk and the events given up
    at the end, the summary counts them, and what is on disk still verifies."""
    workdir, steps, logdir, kept = _dirs(tmp_path, "full")
    task = f"cd {steps} && {CURL.replace('$1', 'first')} > first.txt"
    popen = _start_on_tmpfs(net, workdir, logdir, kept, task, fill=True)
    stdout, stderr = _finish(popen)
    assert (steps / "first.txt").read_text() == "000", stderr
    assert not net.requests_seen(ALLOWED_IP)
    assert "No space left on device" in stderr and "gave up on" in stderr, stderr
    assert "Traceback" not in stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["audit_lost"] > 0, summary
    files = list(kept.iterdir())
    assert all(_verify(f).returncode == 0 for f in files), files


COPYTRUNCATE_TASK = """
c() { curl -s -o /dev/null --max-time 3 -w '%{http_code}' "https://allowed.test/$1"; }
wait_for() { n=0; while [ ! -e "$1" ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done; }
for i in 1 2 3 4 5 6; do c before$i >> before.txt; done; touch phase1; wait_for go2
for i in $(seq 1 40); do r=$(c during$i); echo "$r" >> during.txt; [ "$r" = 000 ] && break; sleep 0.1; done
touch phase2; wait_for go3
for i in $(seq 1 40); do r=$(c after$i); echo "$r" >> after.txt; [ "$r" = 200 ] && break; sleep 0.2; done
"""


def test_copytruncate_then_a_full_disk_leaves_one_chain_without_a_hole(net, tmp_path):
    """logrotate's copytruncate under the running gateway (the log copied away, then
    cut to 0), then the disk fills up and is freed. The writer used to undo its failed
    write by truncating back to its old idea of the size: a hole of NUL bytes up to
    it, the next line glued to them, and `verify` could not tell that line's event."""
    workdir, steps, logdir, kept = _dirs(tmp_path, "copytruncate")
    popen = _start_on_tmpfs(net, workdir, logdir, kept, f"cd {steps} && {COPYTRUNCATE_TASK}")
    try:
        _wait_file(steps / "phase1")
        live = f"/proc/{popen.pid}/root{logdir}/audit.jsonl"
        copy = kept / "audit.jsonl.copy"
        sandbox.eventually(lambda: os.path.getsize(live) > 2000, timeout=5)
        shutil.copyfile(live, copy)
        os.truncate(live, 0)  # what copytruncate does, with the same race it has
        filler = f"/proc/{popen.pid}/root{logdir}/filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        (steps / "go2").touch()
        _wait_file(steps / "phase2")
        os.unlink(filler)
        (steps / "go3").touch()
        stdout, stderr = _finish(popen)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert popen.returncode == 0, stderr
    assert (steps / "during.txt").read_text().split()[-1] == "000"
    assert (steps / "after.txt").read_text().split()[-1] == "200"
    live_kept = kept / "audit.jsonl"
    check = _verify(copy, live_kept)
    assert check.returncode == 0, check.stdout
    assert b"\0" not in live_kept.read_bytes()
    assert "truncated from" in stderr and "Traceback" not in stderr, stderr
    # Every request the server answered has its allowed event, in the copy or the file.
    events = [json.loads(line) for f in (copy, live_kept) for line in f.read_text().splitlines()]
    allowed = [e for e in events if e["kind"] == "connection" and e["verdict"] == "allow"
               and e.get("name") == "allowed.test"]  # fmt: skip
    seen = sandbox.eventually(lambda: net.requests_seen(ALLOWED_IP), timeout=2.0)
    assert len(seen) == len(allowed), (len(seen), len(allowed))


@pytest.mark.parametrize("kind", ["fifo", "/dev/null"])
def test_a_fifo_or_device_as_the_log_stops_the_run_before_the_task(net, tmp_path, kind):
    """A FIFO nobody reads used to take 64 KiB of lines, then block the writer for
    good while the gateway let connections through, and hang the run at its end;
    /dev/null kept nothing. Both are refused in one line, before the task runs."""
    workdir = tmp_path / "notafile"
    (workdir / "steps").mkdir(parents=True)
    target = workdir / "audit.fifo" if kind == "fifo" else kind
    if kind == "fifo":
        os.mkfifo(target)
    marker = workdir / "steps" / "ran"
    argv = sandbox._argv(net, workdir, ["sh", "-c", f"touch {marker}; {CURL}"],
                         sandbox.DEMO_RULES, ())  # fmt: skip
    argv[argv.index("--audit-log") + 1] = str(target)
    proc = net.run_in_host(argv, timeout=30)
    assert proc.returncode == 125, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("sandgate: ") and "not a regular file" in line, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not net.requests_seen(ALLOWED_IP)
    if kind == "fifo":
        reader = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert os.read(reader, 1) == b""  # nothing was written into it
        finally:
            os.close(reader)


def test_the_service_with_workers_refuses_a_fifo_as_its_log(net, tmp_path):
    """`sandgate gateway --workers 2`, whose workers' events all go to the service's
    one writer: a FIFO as that log stops the service at start, in one line."""
    fifo = tmp_path / "gateway-audit.fifo"
    os.mkfifo(fifo)
    gateway = GatewayProcess(net, tmp_path, sandbox.DEMO_RULES, "--workers", "2")
    gateway.audit = fifo
    try:
        with pytest.raises(AssertionError, match="exited with 125"):
            gateway.start()
    finally:
        if gateway.popen is not None and gateway.popen.poll() is None:
            gateway.popen.kill()
            gateway.popen.wait()
    log = gateway.log.read_text()
    assert "not a regular file" in log and "Traceback" not in log, log


def test_a_summary_that_cannot_be_written_is_one_line_and_keeps_the_audit(net, tmp_path):
    """--summary-json on a full device: the run says so in one line (no traceback),
    and the audit log of the run is complete."""
    workdir = tmp_path / "nosummary"
    (workdir / "steps").mkdir(parents=True)
    argv = sandbox._argv(net, workdir, ["sh", "-c", CURL.replace("$1", "x")],
                         sandbox.DEMO_RULES, ())  # fmt: skip
    argv[argv.index("--summary-json") + 1] = "/dev/full"
    proc = net.run_in_host(argv, timeout=60)
    assert proc.stdout == "200", (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "/dev/full" in proc.stderr and "No space left" in proc.stderr, proc.stderr
    assert proc.returncode == 125, proc.stderr
    assert _verify(workdir / "audit.jsonl").returncode == 0
    events = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
    assert [e["detail"] for e in events if e["kind"] == "task"][-1].startswith("task ended")
