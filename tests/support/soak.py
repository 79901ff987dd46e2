"""What the service soak (tests/e2e/test_service_soak.py, bench/soak_service.py) runs
and reads: its rules, its task, and the service's tables that must be empty once
every task has ended (`status --json`: the service's `tables`, each worker's)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `default`: pass-through TLS, plain HTTP and inspected HTTPS (paths) to the fake
# internet; `asker`: anything else is held for a human (2 s), open for 10 s.
RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: soak-allowed
      - allow: api.allowed.test
        methods: [GET]
        paths: ["/public/**"]
        id: soak-inspected
  asker:
    fallback: ask
    approval: {hold: 2s, expire_pending: 10s}
    rules:
      - allow: allowed.test
        id: soak-asker-allowed
"""
BROKEN = RULES + "      - allow: '*'\n"

# The task (the sandbox's python, argv[1]: seconds to sleep at the end): a DNS query,
# pass-through HTTPS, plain HTTP, inspected HTTPS, a name refused at DNS and an
# address refused at connect.
TASK = (
    "import socket, subprocess, sys, time\n"
    "socket.getaddrinfo('allowed.test', 443)\n"
    "for url in ('https://allowed.test/', 'http://allowed.test/',"
    " 'https://api.allowed.test/public/x', 'https://forbidden.test/'):\n"
    "    subprocess.run(['curl', '-s', '-o', '/dev/null', '--max-time', '5', url])\n"
    "try:\n"
    "    socket.create_connection(('203.0.113.66', 443), timeout=2).close()\n"
    "except OSError:\n"
    "    pass\n"
    "time.sleep(float(sys.argv[1]))\n"
)
# The `asker` profile's task: one request held for a human.
ASK_TASK = (
    "import subprocess\n"
    "subprocess.run(['curl', '-s', '-o', '/dev/null', '--max-time', '8',"
    " 'https://api.allowed.test/'])\n"
)

# Tables that hold something only while a task runs (or, for `approvals_pending`,
# until its approval expires); the rest (memos by profile, asyncio tasks, spares,
# warm runners) are the service's own.
SERVICE_TASK_TABLES = ("sandboxes", "pool_sandboxes", "worker_sandboxes",
                       "worker_open_connections", "unwiring")  # fmt: skip
WORKER_TASK_TABLES = (
    "registry", "connections", "connection_counts", "request_memos", "leaf_buckets",
    "dns_bindings", "placeholders", "dns_rates", "dns_refusals", "dns_pending",
    "approval_grants", "approval_waiters", "grant_timers", "door_live", "door_waiting",
    "door_handed_off", "tls_leaves", "tls_sessions", "upstream_pool",
)  # fmt: skip


def left_in_tables(status: dict) -> dict[str, int]:
    """The per-task tables of `status` (`status --json`) that are not empty."""
    tables = status.get("tables", {})
    left = {k: tables.get(k, 0) for k in SERVICE_TASK_TABLES if tables.get(k, 0)}
    for worker in status["workers"]:
        own = worker.get("tables", {})
        left |= {f"worker{worker['index']} {k}": own[k] for k in WORKER_TASK_TABLES if own.get(k)}
    return left


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def proc_figures(pid: int) -> dict[str, int]:
    """RSS (KiB), open descriptors and threads of `pid` (zeros if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"rss_kib": 0, "fds": 0, "threads": 0}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": open_fds(pid),
        "threads": int(fields["Threads"]),
    }


def metrics_series(fakenet, port: int) -> int:
    """The series (sample lines) of the service's /metrics on 127.0.0.1:`port` of the
    fake internet's host netns."""
    probe = (
        "import urllib.request;print(urllib.request.urlopen("
        f"'http://127.0.0.1:{port}/metrics').read().decode())"
    )
    out = fakenet.run_in_host([sys.executable, "-c", probe], check=True).stdout
    return sum(1 for line in out.splitlines() if line and not line.startswith("#"))
