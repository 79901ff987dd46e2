"""One sandbox holding DNS-over-TCP connections open, and another resolving over TCP.

The DNS filter of a gateway worker serves 256 TCP connections at once. A sandbox
that opens connections and keeps each alive (a query now and then, inside its
`dns_qps`) once took all 256, and every other sandbox of that worker had its DNS
over TCP closed unanswered until the hog let go (`dig +tcp`, and every stub that
falls back to TCP for a truncated answer). Now a sandbox holds no more than are
still free (`limits.fair_share`: a lone hog half of them), each refused connection
has its event (`sandbox_limit`, `builtin:sandbox-dns-tcp-share`), and the other
sandbox's `dig +tcp` lookups are answered while the hog holds its share.
"""

from __future__ import annotations

import ast
import json

import pytest
from support import sandbox
from support.service import TWO_PROFILES, beside_a_crowd, counted, running

pytestmark = pytest.mark.e2e

TCP_PLACES = 256  # DnsFilter's max_tcp_connections
TRIED = 300
LOOKUPS = 5

# Opens TRIED connections to the resolver, 100 a second (its profile's
# connection_rate is 200), one query each: `held` those answered and still open,
# `refused` those closed unanswered. Every 2 s (the filter's idle timer is 10 s, so
# a slow host cannot close them meanwhile) it asks one query on every held
# connection: while opening, then until `stop`. Writes `up-0` with held and
# refused once all are tried, and `alive-0` at the end: how many were still
# answered in the last round.
HOG = """
import os, socket, sys, time
shared = sys.argv[1]
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
def query(i):
    name = b"".join(bytes([len(p)]) + p for p in f"h{i}.evil.test".encode().split(b"."))
    q = os.urandom(2) + b"\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00" + name + b"\\x00\\x00\\x01\\x00\\x01"
    return len(q).to_bytes(2, "big") + q
def answered(s):
    try:
        head = s.recv(2)
        return len(head) == 2 and len(s.recv(65535)) > 0
    except OSError:
        return False
held, refused, last = [], 0, time.monotonic()
def keep_alive():
    global last
    for s in held:
        s.sendall(query(0))
    last = time.monotonic()
    return sum(answered(s) for s in held)
for i in range(int(sys.argv[2])):
    s = socket.create_connection((ns, 53), timeout=5)
    s.sendall(query(i))
    if answered(s):
        held.append(s)
    else:
        refused += 1
        s.close()
    if time.monotonic() - last > 2:
        keep_alive()
    time.sleep(0.01)
open(f"{shared}/up-0", "w").write(f"{len(held)} {refused}")
alive, end = len(held), time.monotonic() + 60
while not os.path.exists(f"{shared}/stop") and time.monotonic() < end:
    time.sleep(max(0.0, last + 2 - time.monotonic()))
    alive = keep_alive()
open(f"{shared}/alive-0", "w").write(str(alive))
"""

# `n` lookups of allowed.test with dig over TCP, one try each; writes dig's status
# lines to `honest`.
HONEST = """
import subprocess, sys
shared, n = sys.argv[1], int(sys.argv[2])
lines = []
for _ in range(n):
    out = subprocess.run(["dig", "+tcp", "+time=3", "+tries=1", "allowed.test"],
                         capture_output=True, text=True).stdout
    status = [l for l in out.splitlines() if "status:" in l or l.startswith(";;") and "error" in l]
    answer = [l for l in out.splitlines() if l.split()[:1] == ["allowed.test."] and "A" in l.split()[2:4]]
    lines.append((status[0].strip() if status else out.strip()[-200:], len(answer)))
open(f"{shared}/honest", "w").write(repr(lines))
"""


@pytest.fixture
def service(net, tmp_path):
    with running(net, tmp_path, TWO_PROFILES, "--workers", "1", "--warm", "0") as gateway:
        yield gateway


def test_a_sandbox_holding_dns_tcp_connections_leaves_room_for_another(service, tmp_path):
    shared, _ = sandbox.shared_dir(tmp_path)
    run = beside_a_crowd(
        service,
        tmp_path,
        [(HOG, (str(shared), str(TRIED)), "api")],
        (HONEST, (str(shared), str(LOOKUPS)), "default"),
    )
    up = shared / "up-0"
    assert up.exists(), run.crowd_errs[0][-2000:]
    held, refused = map(int, up.read_text().split())
    honest = (shared / "honest").read_text() if (shared / "honest").exists() else None
    assert honest is not None, run.honest_err[-2000:]
    # The other sandbox's lookups over TCP, made while the hog held its share: answered.
    lookups = ast.literal_eval(honest)
    assert len(lookups) == LOOKUPS, honest
    assert all("status: NOERROR" in status and answers >= 1 for status, answers in lookups), honest
    # The hog held half of the places (a lone greedy sandbox: fair_share) and kept
    # them through the lookups; every connection past them was refused.
    assert held == TCP_PLACES // 2, (held, refused)
    assert held + refused == TRIED
    assert int((shared / "alive-0").read_text()) == held, run.crowd_errs[0][-1000:]
    # Each refused connection has its event in the hog's task, none in the other's.
    (_, hog_dir), (_, honest_dir) = run.crowd[0], run.honest
    hog_task = json.loads((hog_dir / "summary.json").read_text())["task_id"]
    honest_task = json.loads((honest_dir / "summary.json").read_text())["task_id"]
    service.wait_task_ended(hog_task)

    def share_refusals(task_id: str) -> list[dict]:
        return [
            e
            for e in service.events(task_id=task_id)
            if e.get("rule_id") == "builtin:sandbox-dns-tcp-share"
        ]

    assert sandbox.eventually(lambda: counted(share_refusals(hog_task)) == refused, timeout=10), (
        counted(share_refusals(hog_task)),
        refused,
    )
    assert {(e["kind"], e["verdict"], e["reason"]) for e in share_refusals(hog_task)} == {
        ("dns", "deny", "sandbox_limit")
    }
    assert share_refusals(honest_task) == []
    service.verify_audit()
