"""A task that opens connections fast, to more than one port, never waits for a SYN's retry.

Every TCP connection a task opens ends at the gateway's one listening port (the
sandbox's table redirects it there), so the gateway's kernel sees all of them in
one space of 4-tuples, where the task's kernel sees one per destination. Two
connections from the same task port to two destinations clash in conntrack, and
netfilter's NAT moves the second to another source port: often one whose earlier
connection the gateway closed first and still holds in TIME_WAIT. A SYN on a
TIME_WAIT socket is taken only if its TCP timestamp is newer (PAWS). With the
kernel's default, a random timestamp offset per 4-tuple, half of these are older:
the SYN gets the old connection's ACK, the task's kernel resets and sends it again
(38-52 of this test's 12,000 plain-HTTP connections after its 3,200 HTTPS ones;
1-2 % of bench_gateway's plain-HTTP row after its HTTPS one, up to a second each). The
sandbox's netns stamps every connection from one clock (enforcer/netns.py,
SANDBOX_TCP_TIMESTAMPS), so a SYN is newer than any TIME_WAIT, except one of the
same millisecond, for which the kernel compares sequence numbers (half pass): the
test allows one such retry, not the dozens a random offset gives.
"""

from __future__ import annotations

import json

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test
TLS, PLAIN, THREADS = 3200, 12000, 16  # each a multiple of THREADS
# The fake internet's rules, with a connection rate the clients stay below (200 a
# second by default: its SYN drops would be retries of their own).
RULES = """version: 1
profiles:
  default:
    fallback: deny
    limits: {connection_rate: 10000}
    rules:
      - allow: allowed.test
"""

_CONNECTIONS = r"""
import json, socket, ssl, sys, threading

TLS, PLAIN, THREADS = map(int, sys.argv[1:4])

def counters():
    lines = open("/proc/net/netstat").read().splitlines()  # the sandbox's netns
    ext = dict(zip(lines[0].split(), lines[1].split()))  # TcpExt:
    snmp = [line.split() for line in open("/proc/net/snmp") if line.startswith("Tcp:")]
    tcp = dict(zip(snmp[0], snmp[1]))
    return {"syn_retrans": int(ext["TCPSynRetrans"]), "resets_sent": int(tcp["OutRsts"])}

ip = socket.gethostbyname("allowed.test")  # through the gateway's DNS: its binding
context = ssl.create_default_context()
answered = []

def get(port, tls):
    s = socket.create_connection((ip, port), timeout=10)
    if tls:
        s = context.wrap_socket(s, server_hostname="allowed.test")
    # Connection: close: the upstream ends the response, so the gateway closes first.
    s.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    answered.append(data.startswith(b"HTTP/1.1 200"))

before = counters()
for port, tls, count in ((443, True, TLS), (80, False, PLAIN)):
    def work():
        for _ in range(count // THREADS):
            get(port, tls)
    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
after = counters()
print(json.dumps({"answered": sum(answered), **{k: after[k] - before[k] for k in after}}))
"""


def test_a_task_connecting_fast_to_two_ports_never_waits_for_a_syn_retry(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = sandbox.run(
        net,
        tmp_path,
        {
            "connections": sandbox.python(_CONNECTIONS, str(TLS), str(PLAIN), str(THREADS)),
            "timestamps": "cat /proc/sys/net/ipv4/tcp_timestamps",
        },
        rules=rules,
        timeout=180,
    )
    assert r["connections"].rc == 0, r.describe()
    seen = json.loads(r["connections"].out)
    assert seen["answered"] == TLS + PLAIN, seen
    # Not a SYN answered with a TIME_WAIT's ACK, reset and sent again (but for one of
    # the same millisecond, the docstring says why). Such a clash always ends in a SYN
    # sent again, so that is what is counted. The task's resets alone are not: on a
    # slow host 2 of 15,200 came with no SYN retry, in 5 runs of 23 (session 24), and a
    # reset not followed by a retry costs no wait. The likely cause, not proven: the
    # task's kernel took 575-734 duplicate segments a run (TcpExt DelayedACKLost: the
    # gateway's tail-loss probes beating the task's delayed ACKs), and a segment sent
    # again to a connection the task has closed is answered with a reset.
    assert seen["syn_retrans"] <= 1, seen
    assert r["timestamps"].out.strip() == "2"
    # All through the gateway (nginx logs a request just after its answer).
    assert sandbox.eventually(lambda: len(net.requests_seen(ALLOWED_IP)) == TLS + PLAIN)
