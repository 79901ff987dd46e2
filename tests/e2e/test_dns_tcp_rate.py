"""Every new TCP connection of a sandbox meets its table's connection rate, DNS over
TCP's too.

The sandbox's nftables table drops a SYN past its profile's `connection_rate`
(enforcer/nft.py, chain `early`). Its `tcp dport 53 accept` came before that limit,
so a task's connects to port 53 never met it: 3,000 non-blocking connects to the
nameserver all connected (~7,300 a second into the worker's DNS listener, each an
accept, a fair-share check, a close and an event), against 242 of 3,000 to port 80.

Here one task of a profile at `connection_rate: RATE` floods TRIED connects at the
nameserver's port 53, then (the bucket refilled) resolves over TCP with dig, then
floods as many at port 80. Asserted: about as many connected to port 53 as to port
80, each no more than the rate lets through (a burst of RATE, then RATE a second);
the dig over TCP answered; the task's firewall event counts the dropped SYNs.
"""

from __future__ import annotations

import json

import pytest
from support import sandbox
from support.service import finish_attached, running, start_attached

pytestmark = pytest.mark.e2e

RATE = 50  # the profile's connection_rate
TRIED = 400

RULES = f"""\
version: 1
profiles:
  flooder:
    limits: {{connection_rate: {RATE}}}
    rules:
      - allow: allowed.test
        id: web
"""

# Floods: TRIED non-blocking connects in batches of 100, each batch given 50 ms to
# complete its handshakes (a SYN the table dropped is retried only after 1 s), then
# counted (getpeername) and closed. Writes `result`: each flood's connected count and
# seconds, and dig +tcp's answer between them.
FLOOD = """
import json, socket, subprocess, sys, time
shared, tried = sys.argv[1], int(sys.argv[2])
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]

def flood(address):
    started, connected, batch = time.monotonic(), 0, []
    for i in range(tried):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        batch.append(s)
        if len(batch) == 100 or i == tried - 1:
            time.sleep(0.05)
            for s in batch:
                try:
                    s.getpeername()
                    connected += 1
                except OSError:
                    pass
                s.close()
            batch = []
    return connected, time.monotonic() - started

result = {"dns": flood((ns, 53))}
time.sleep(1.5)
dig = subprocess.run(["dig", "+tcp", "+time=3", "+tries=1", "+short", "allowed.test"],
                     capture_output=True, text=True)
result["dig"] = [dig.returncode, dig.stdout.strip()]
time.sleep(1.5)
result["http"] = flood(("203.0.113.10", 80))
open(f"{shared}/result", "w").write(json.dumps(result))
"""


@pytest.fixture
def service(net, tmp_path):
    with running(net, tmp_path, RULES, "--workers", "1", "--warm", "0") as gateway:
        yield gateway


def test_a_flood_of_dns_over_tcp_connects_is_held_to_the_connection_rate(service, tmp_path):
    shared, _ = sandbox.shared_dir(tmp_path)
    popen, workdir = start_attached(
        service, tmp_path, FLOOD, str(shared), str(TRIED), profile="flooder"
    )
    err = finish_attached(popen, timeout=90)
    assert (shared / "result").exists(), err[-2000:]
    result = json.loads((shared / "result").read_text())
    print(f"\nconnected of {TRIED}: {result}")
    # Ordinary DNS over TCP, the bucket refilled: answered.
    assert result["dig"][0] == 0 and result["dig"][1], result
    for kind in ("dns", "http"):
        connected, seconds = result[kind]
        # A burst of RATE, then RATE a second (and a little for the clock's edges).
        assert 0 < connected <= RATE * (1 + seconds) + 5, (kind, result)
    # The task's end reports the SYNs its table dropped: both floods' excess.
    task = json.loads((workdir / "summary.json").read_text())["task_id"]
    service.wait_task_ended(task)
    firewall = [
        e
        for e in service.events(task_id=task)
        if e["reason"] == "dropped_by_firewall" and "dropped_connect_flood" in e["detail"]
    ]
    assert firewall, [e for e in service.events(task_id=task) if e["kind"] == "task"]
    service.verify_audit()
