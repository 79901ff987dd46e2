"""What the fairness modules' sandboxes run (tests/e2e/test_connection_fairness.py,
test_gateway_fairness_more.py) beside a crowd (service.beside_a_crowd), and what the
tests read of the gateway afterwards: the honest sandbox's times, the service's memory
and CPU from /proc."""

from __future__ import annotations

import ast
import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path

# The HTTP/2 abuse modules' profiles (test_h2_abuse, test_h2_control_floods): the honest
# sandbox and the attackers both inspected, on one worker.
H2_RULES = """\
version: 1
profiles:
  honest:
    rules:
      - allow: allowed.test
        methods: [GET]
        id: web
  h2:
    limits: {connection_rate: 50}
    rules:
      - allow: allowed.test
        methods: [GET]
        id: inspected
"""

# mode shared me count: run the attack until the file `stop` appears (or 80 s); write
# `up-I` once it is under way, then `done-I` with a dict of what it saw.
ATTACK = """
import os, socket, ssl, sys, time
mode, shared, me, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ip = socket.gethostbyname("allowed.test")
end = time.monotonic() + 80
stopped = lambda: os.path.exists(f"{shared}/stop") or time.monotonic() > end
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
seen = {"ok": 0, "refused": 0}
held = []

def hello():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="allowed.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()

if mode == "hold":
    for _ in range(count):
        try:
            s = socket.create_connection((ip, 443), timeout=5)
            held.append(context.wrap_socket(s, server_hostname="allowed.test"))
            seen["ok"] += 1
        except OSError:
            seen["refused"] += 1
    open(f"{shared}/up-{me}", "w").write("up")
    while not stopped():
        time.sleep(0.2)
elif mode == "slowloris":
    for _ in range(count):
        try:
            s = socket.create_connection((ip, 443), timeout=5)
            s.sendall(b"\\x16\\x03\\x01\\x02\\x00")
            held.append(s)
            seen["ok"] += 1
        except OSError:
            seen["refused"] += 1
    open(f"{shared}/up-{me}", "w").write("up")
    while not stopped():
        for s in list(held):
            try:
                s.send(b"\\x01")
            except OSError:
                held.remove(s)
        time.sleep(2)
elif mode == "names":
    # Inspected handshakes, each for a name of its own (the gateway makes a leaf
    # certificate for every new name), then close.
    names = 0
    open(f"{shared}/up-{me}", "w").write("up")
    while not stopped():
        try:
            s = socket.create_connection((ip, 443), timeout=5)
            names += 1
            context.wrap_socket(s, server_hostname=f"n{names}-{me}.allowed.test").close()
            seen["ok"] += 1
        except OSError:
            seen["refused"] += 1
elif mode == "churn":
    data = hello()
    open(f"{shared}/up-{me}", "w").write("up")
    while not stopped():
        try:
            s = socket.create_connection((ip, 443), timeout=5)
            s.sendall(data)
            s.close()
            seen["ok"] += 1
        except OSError:
            seen["refused"] += 1
seen["held"] = len(held)
open(f"{shared}/done-{me}", "w").write(repr(seen))
"""

# shared rounds: `rounds` HTTPS requests (a new connection each) and `rounds` plain
# HTTP ones, alternating; writes [(kind, seconds, status or error)] to `honest-times`.
HONEST = """
import socket, ssl, sys, time
shared, rounds = sys.argv[1], int(sys.argv[2])
context = ssl.create_default_context()
request = b"GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n"

def get(tls):
    s = socket.create_connection(("allowed.test", 443 if tls else 80), timeout=5)
    if tls:
        s = context.wrap_socket(s, server_hostname="allowed.test")
    with s:
        s.sendall(request)
        answer = b""
        while b"\\r\\n" not in answer:
            data = s.recv(4096)
            if not data:
                break
            answer += data
    return answer.split(b"\\r\\n")[0].decode(errors="replace")

times = []
for i in range(2 * rounds):
    tls = i % 2 == 0
    t = time.monotonic()
    try:
        status = get(tls)
    except Exception as e:
        status = f"{type(e).__name__}: {e}"
    times.append(("https" if tls else "http", round(time.monotonic() - t, 3), status))
    time.sleep(0.05)
open(f"{shared}/honest-times", "w").write(repr(times))
"""


def honest_times(shared: Path) -> list[tuple[str, float, str]]:
    """The honest sandbox's (kind, seconds, status or error) per request."""
    return ast.literal_eval((shared / "honest-times").read_text())


def spread(times: list[tuple[str, float, str]], kind: str) -> tuple[float, float]:
    """p50 and max seconds of the honest requests of `kind` ("https", "http")."""
    seconds = [t for k, t, _ in times if k == kind]
    return statistics.median(seconds), max(seconds)


def listen_overflows(netns: str) -> int:
    """How often a listener in `netns` dropped a SYN or handshake for a full accept
    queue, since the namespace was made (TcpExt ListenOverflows)."""
    lines = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", "/proc/net/netstat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.splitlines()
    ext = dict(zip(lines[0].split(), lines[1].split(), strict=True))  # TcpExt:
    return int(ext["ListenOverflows"])


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the service and its workers)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        # a process may end while it is walked: its /proc directory is then gone
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{p}/task/{task}/children").read_text()
                    todo += [int(c) for c in children.split()]
    return tree


def rss_kb(pid: int) -> int:
    """The resident memory of `pid`'s tree, KiB (VmRSS of each)."""
    total = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += sum(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid`'s tree so far (its children's that ended not
    counted), seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def run_attack(
    service,
    tmp_path: Path,
    attack: str,
    profile: str,
    n: int,
    bound: float,
    rss_growth_kb: int,
    rounds: int = 10,
    code: str = ATTACK,
):
    """Run N `attack`ers (`code`'s modes, ATTACK's unless given) of `profile` beside the honest sandbox
    (HONEST, `rounds`, profile "honest") on `service`; print the honest times and the
    service's CPU and memory; assert the honest requests all answered 200 within
    `bound` s and the service's RSS grew by less than `rss_growth_kb`; return (each
    attacker's workdir and what it saw, seconds the crowd ran, service CPU s)."""
    from support import sandbox
    from support.service import beside_a_crowd

    shared, _ = sandbox.shared_dir(tmp_path)
    pid = service.popen.pid
    rss_before, cpu_before, start = rss_kb(pid), cpu_seconds(pid), time.monotonic()
    hostile, _, honest_err, errs = beside_a_crowd(
        service,
        tmp_path,
        [(code, (attack, str(shared), str(i), "0"), profile) for i in range(n)],
        (HONEST, (str(shared), str(rounds)), "honest"),
        up_timeout=60,
    )
    ran, cpu = time.monotonic() - start, cpu_seconds(pid) - cpu_before
    growth = rss_kb(pid) - rss_before
    assert (shared / "honest-times").exists(), honest_err[-2000:]
    times = honest_times(shared)
    seen = [ast.literal_eval((shared / f"done-{i}").read_text()) for i in range(n)]
    for kind in ("https", "http"):
        p50, most = spread(times, kind)
        print(f"\n{attack} x{n}: honest {kind} p50 {p50:.3f} s, max {most:.3f} s")
    print(
        f"{attack} x{n}: {sum(s['ok'] for s in seen)} attacker connections, "
        f"{sum(s['refused'] for s in seen)} refused in {ran:.1f} s, "
        f"service CPU {cpu:.1f} s, RSS +{growth} KiB"
    )
    failed = [t for t in times if t[2] != "HTTP/1.1 200 OK"]
    assert not failed, (failed, errs[0][-1000:])
    assert max(t for _, t, _ in times) < bound, times
    assert growth < rss_growth_kb, growth
    return [(workdir, saw) for (_, workdir), saw in zip(hostile, seen, strict=True)], ran, cpu


def run_and_grow(started, timeout: float = 90, warmup: str = "warmup"):
    """`started` (sandbox.start) run to its end, the resident memory of its process tree
    sampled every 50 ms from the end of its step `warmup` (mitmproxy started and warm:
    the baseline): (its result, the baseline KiB, the peak KiB)."""
    deadline = time.monotonic() + timeout
    while (
        not (started.steps_dir / f"{warmup}.rc").exists()
        and started.popen.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    base = peak = rss_kb(started.pid)
    while started.popen.poll() is None and time.monotonic() < deadline:
        peak = max(peak, rss_kb(started.pid))
        time.sleep(0.05)
    return started.finish(), base, peak
