"""The audit trail and the gateway's limits against a hostile task, end to end:
fields a task fills are bounded in the log, the firewall's counts are honest, an
audit log that cannot be written stops new connections instead of losing their
evidence, and a task that exhausts the gateway's descriptors cannot silence it."""

from __future__ import annotations

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
    # A method longer than a request line's first 16 bytes is not HTTP at all.
    assert r.verdicts(kind="connection", reason="not_http") == {
        ("deny", "not_http", "builtin:not-http")
    }
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
