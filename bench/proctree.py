"""The processes that make up one sandgate gateway, for the benches' CPU and memory.

Since session 29 the audit log's chain and writes run, under load, in a process the
gateway starts (proxy/telemetry/audit_process.py, named `sandgate-audit`): its CPU
and memory are the gateway's, so the benches that read a gateway's /proc/PID add
them."""

from __future__ import annotations

import os
from pathlib import Path

AUDIT_WRITER = "sandgate-audit"


def audit_writers(pid: int) -> list[int]:
    """The audit writer processes `pid` started (none while it writes in a thread)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == AUDIT_WRITER:
                    found.append(child)
            except OSError:
                continue
    return found


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of `pid`, all its threads; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def gateway_cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of the gateway `pid` and its audit writer."""
    user, system = cpu_ticks(pid)
    for writer in audit_writers(pid):
        more = cpu_ticks(writer)
        user, system = user + more[0], system + more[1]
    return user, system


def rss_bytes(pid: int) -> int:
    """The resident memory of `pid` (VmRSS); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return sum(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
    )
