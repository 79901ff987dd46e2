"""The audit trail and the gateway's limits against a hostile task, end to end:
fields a task fills are bounded in the log, the firewall's counts are honest, an
audit log that cannot be written stops new connections instead of losing their
evidence, and a task that exhausts the gateway's descriptors cannot silence it."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from support import sandbox
from support.sandbox import curl, dig

pytestmark = pytest.mark.e2e


def test_a_task_that_sends_nothing_has_no_firewall_drops(net, tmp_path):
    """The sandbox kernel's own IPv6 multicast listener reports are not the task's."""
    # MLD reports go out within a second or two of eth0 coming up: a task as short as
    # `true` may end before them, so this one waits.
    r = sandbox.run(net, tmp_path, command=["sleep", "2.5"])
    assert r.returncode == 0, r.describe()
    assert r.summary["firewall_drops"] == {}, r.summary["firewall_drops"]
    assert r.events(kind="task", reason="dropped_by_firewall") == []


# --- fields a task fills are bounded ------------------------------------------------------

BOUNDS = {"method": 32, "name": 300, "path": 2048, "detail": 1024}
MARKER = 20  # "...[+N chars]"


def test_hostile_long_values_are_cut_in_every_event_and_the_chain_holds(net, tmp_path):
    long_label = "\\255" * 63  # 63 bytes 0xff (dig's escape); dnspython prints each as \\255
    r = sandbox.run(net, tmp_path, {
        "host": curl("http://allowed.test/", "-H", "Host: " + "h" * 6000 + ".test"),
        "path": curl("http://allowed.test/" + "p" * 12000),
        "method": curl("-X", "M" * 3000, "http://allowed.test/"),
        "dns": dig(f"{long_label}.{long_label}.{long_label}.test"),
    })  # fmt: skip
    assert r.returncode == 0, r.describe()
    for record in r.audit:
        for field, limit in BOUNDS.items():
            assert len(record.get(field) or "") <= limit + MARKER, (field, len(record[field]))
    assert any(e["path"].endswith(" chars]") for e in r.events(kind="request") if "path" in e)
    # A 3,000-byte method is decided as HTTP (a server may take a method of any
    # length, request_head.starts_like_http) and refused there, cut in its event.
    (long,) = [e for e in r.events(kind="request") if (e.get("method") or "").startswith("MMM")]
    assert (long["verdict"], long["reason"]) == ("deny", "malformed_request"), long
    assert long["method"].endswith(" chars]"), long
    assert any(" chars]" in e.get("detail", "") for e in r.events(kind="request"))
    dns = [e for e in r.events(kind="dns") if "\\255" in (e.get("name") or "")]
    assert dns and all(e["verdict"] == "deny" for e in dns), r.describe()
    # Nothing a hostile request named reached a server, and the log is one intact chain.
    assert all(len(seen["uri"]) < 12000 for seen in net.requests_seen())
    check = subprocess.run(
        [sandbox.SANDGATE, "audit", "verify", str(r.steps_dir.parent / "audit.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout


# --- a full disk: refused, not undocumented -------------------------------------------------

ALLOWED_IP = "203.0.113.10"  # allowed.test

# In the sandbox: one request, then (the test fills the audit log's disk) requests until
# one is refused, then (the test frees the disk) requests until one passes again.
OUTAGE_TASK = """
c() { curl -s -o /dev/null --max-time 3 -w '%{http_code}' "https://allowed.test/$1"; }
wait_for() { n=0; while [ ! -e "$1" ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done; }
c before > before.txt; touch phase1; wait_for go2
for i in $(seq 1 40); do r=$(c during$i); echo "$r" >> during.txt; [ "$r" = 000 ] && break; sleep 0.1; done
touch phase2; wait_for go3
for i in $(seq 1 40); do r=$(c after$i); echo "$r" >> after.txt; [ "$r" = 200 ] && break; sleep 0.2; done
"""


def _wait_file(path, timeout=30.0):
    assert sandbox.eventually(path.exists, timeout=timeout), f"{path} never appeared"


def test_a_full_audit_disk_refuses_new_connections_and_loses_no_event(net, tmp_path):
    """The audit log on a small tmpfs of the gateway's own mount namespace (`ip netns
    exec` gives it one; it goes with the process): filled up mid-run, then freed."""
    workdir = tmp_path / "outage"
    steps, logdir, kept = workdir / "steps", workdir / "auditfs", workdir / "kept"
    for d in (steps, logdir, kept):
        d.mkdir(parents=True)
    argv = sandbox._argv(net, workdir, ["sh", "-c", f"cd {steps} && {OUTAGE_TASK}"],
                         sandbox.DEMO_RULES, ())  # fmt: skip
    argv[argv.index("--audit-log") + 1] = str(logdir / "audit.jsonl")
    script = (
        'mount -t tmpfs -o size=256k sandgate-test-audit "$0" && "$@"; rc=$?; '
        'cp -a "$0"/audit.jsonl* "$KEPT"/; exit $rc'
    )
    popen = net.popen_in_host(
        ["env", f"KEPT={kept}", "sh", "-c", script, str(logdir), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_file(steps / "phase1")
        # Fill the tmpfs, as the gateway's process sees it.
        filler = f"/proc/{popen.pid}/root{logdir}/filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        (steps / "go2").touch()
        _wait_file(steps / "phase2")
        os.unlink(filler)
        (steps / "go3").touch()
        stdout, stderr = popen.communicate(timeout=60)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    assert popen.returncode == 0, stderr
    during = (steps / "during.txt").read_text().split()
    after = (steps / "after.txt").read_text().split()
    assert (steps / "before.txt").read_text() == "200"
    assert during[-1] == "000", during  # refused while the log could not be written
    assert after[-1] == "200", after  # and served again once it could
    # Every event was kept, and written once the disk had room: one intact chain.
    files = sorted(kept.iterdir())
    check = subprocess.run(
        [sandbox.SANDGATE, "audit", "verify", str(kept / "audit.jsonl")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, (check.stdout, files)
    events = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    refused = [e for e in events if e.get("reason") == "audit_unavailable"]
    assert refused and all(e["verdict"] == "deny" for e in refused)
    assert {e["rule_id"] for e in refused} == {"builtin:audit-unavailable"}
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["audit_lost"] == 0, summary
    # No allowed connection without its event: each request the server saw has one.
    allowed = [e for e in events
               if e["kind"] == "connection" and e["verdict"] == "allow" and e.get("name") == "allowed.test"]  # fmt: skip
    seen = sandbox.eventually(lambda: net.requests_seen(ALLOWED_IP), timeout=2.0)
    assert len(seen) == len(allowed), (len(seen), len(allowed))
    assert not any(s["uri"] == f"/during{len(during)}" for s in seen)
