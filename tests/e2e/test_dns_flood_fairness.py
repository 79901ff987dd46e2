"""Many sandboxes flooding UDP DNS on one gateway worker, and an honest one beside them.

Each flooder stays within its caps as the kernel sees them: it sends about
`FLOOD_QPS` queries a second for fresh names (the table passes twice its profile's
`dns_qps`, nft.dns_packet_rate, and counts the rest in `dropped_dns_flood`); the
gateway REFUSES what is over its profile's `dns_qps`. All of them share the one
worker's DNS socket (`--workers 1`). The honest sandbox times `LOOKUPS` lookups of
an allowed name, one datagram each and no retry (a resolver retries after 5 s, so a
lookup that takes more than a second is one the flood cost a retry or more).

The test asserts that every honest lookup answered within a second, and that the
flood is accounted for: each flooder's queries are either in the audit log (a line
each, or counted in an aggregate record) or in its table's drop counter, none lost
in between (a full socket queue drops silently).

`SANDGATE_FLOOD_N` sets the number of flooders for an experiment (default 16: on a
2-core machine, 8 did not yet delay the honest lookups before the filter refused
over-rate queries at intake; 16 made them take up to 2 s). The honest lookups' times
are printed (`pytest -s`).
"""

from __future__ import annotations

import ast
import json
import os
import statistics

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import TWO_PROFILES, beside_a_crowd, counted, running

pytestmark = pytest.mark.e2e

FLOODERS = int(os.environ.get("SANDGATE_FLOOD_N", "16"))
FLOOD_QPS = 1200  # over the table's cap (at most nft.DNS_PACKETS_PER_S): the kernel caps
LOOKUPS = 20

FLOODER_PROFILE = "api"  # TWO_PROFILES': the honest sandbox's is `default`

# Until the file `stop` appears (or 60 s): about FLOOD_QPS UDP queries a second for
# fresh names, in bursts of a hundredth of a second. Writes `up-I` when it starts and
# `sent-I` (queries sent) at the end.
FLOOD = """
import os, random, socket, sys, time
shared, me, qps = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
sent, tick, end = 0, time.monotonic(), time.monotonic() + 60
open(f"{shared}/up-{me}", "w").write("up")
while time.monotonic() < end and not os.path.exists(f"{shared}/stop"):
    for _ in range(qps // 100):
        name = f"n{random.getrandbits(40):x}.evil.test".encode()
        q = os.urandom(2) + b"\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
        q += b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\\x00\\x00\\x01\\x00\\x01"
        try:
            s.sendto(q, (ns, 53)); sent += 1
        except BlockingIOError:
            pass
    try:
        while s.recv(4096): pass
    except BlockingIOError:
        pass
    tick += 0.01
    time.sleep(max(0.0, tick - time.monotonic()))
open(f"{shared}/sent-{me}", "w").write(str(sent))
"""

# `n` lookups of allowed.test, one datagram each, 5 s to answer; writes each one's
# (seconds, rcode) or (seconds, "timeout") to `honest-times`.
HONEST = """
import os, socket, sys, time
shared, n = sys.argv[1], int(sys.argv[2])
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
q = b"\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x07allowed\\x04test\\x00\\x00\\x01\\x00\\x01"
times = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    ident = os.urandom(2)
    t = time.monotonic()
    s.sendto(ident + q, (ns, 53))
    try:
        while True:
            reply = s.recv(4096)
            if reply[:2] == ident:
                break
        times.append((round(time.monotonic() - t, 3), reply[3] & 0x0F))
    except TimeoutError:
        times.append((round(time.monotonic() - t, 3), "timeout"))
    s.close()
    time.sleep(0.1)
open(f"{shared}/honest-times", "w").write(repr(times))
"""


@pytest.fixture
def service(net, tmp_path):
    with running(net, tmp_path, TWO_PROFILES, "--workers", "1", "--warm", "0") as gateway:
        yield gateway


def _dns_events(service, task_id: str, *, until: int) -> list[dict]:
    """The task's DNS events in the audit log, once they count `until` (or 10 s on)."""

    def dns() -> list[dict]:
        return [e for e in service.events(task_id=task_id) if e["kind"] == "dns"]

    eventually(lambda: counted(dns()) >= until, timeout=10)
    return dns()


def test_an_honest_sandbox_resolves_fast_beside_many_flooders_and_the_flood_is_counted(
    service, tmp_path
):
    shared, _ = sandbox.shared_dir(tmp_path)
    run = beside_a_crowd(
        service,
        tmp_path,
        [(FLOOD, (str(shared), str(i), str(FLOOD_QPS)), FLOODER_PROFILE) for i in range(FLOODERS)],
        (HONEST, (str(shared), str(LOOKUPS)), "default"),
    )
    flooders, honest_err, errs = run.crowd, run.honest_err, run.crowd_errs
    path = shared / "honest-times"
    assert path.exists(), honest_err[-2000:]
    times = ast.literal_eval(path.read_text())
    seconds = [t for t, _ in times]
    print(f"\nflooders {FLOODERS}: honest p50 {statistics.median(seconds):.3f} s, "
          f"max {max(seconds):.3f} s, failures {sum(r != 0 for _, r in times)}: {times}")  # fmt: skip
    # Every honest lookup answered (NOERROR), each within a second.
    assert [rcode for _, rcode in times] == [0] * LOOKUPS, times
    assert max(seconds) < 1.0, times
    # The flood is accounted for: per flooder, what it sent is what the audit log counts
    # plus what its table dropped; nothing vanished in a full queue.
    for i, (_, workdir) in enumerate(flooders):
        sent = int((shared / f"sent-{i}").read_text())
        summary = json.loads((workdir / "summary.json").read_text())
        service.wait_task_ended(summary["task_id"])
        dropped = summary.get("firewall_drops", {}).get("dropped_dns_flood", 0)
        dns = _dns_events(service, summary["task_id"], until=sent - dropped)
        assert counted(dns) + dropped == sent, (i, sent, counted(dns), dropped, errs[i][-1000:])
        assert [e for e in dns if e["reason"] == "sandbox_limit"], (i, sent, dropped)
    service.verify_audit()
