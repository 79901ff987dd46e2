"""What one task leaves for the next, or for one beside it, on a `sandgate gateway`
service (two workers, warm runners): a hostile task A ends or runs next to task B.

Covered elsewhere and not repeated here: approvals bound to their task, approved after
it ended, `--for` as the profile's (test_approvals_e2e.py, test_approval_binding.py);
a flood's counters (test_service_abuse.py); a runner's descriptors and signal
dispositions (test_service.py); host processes and IPC (test_sandbox_escapes.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from support import sandbox
from support.service import TWO_PROFILES, GatewayProcess, attach, attach_argv

# A resolver in the fake internet that relays every query to dnsmasq a while after it
# came: the service's upstream, so that a task can end while its query is upstream.
SLOW_DNS_IP = "198.51.100.199"
SLOW_DNS_DELAY = 1.2  # under the gateway's 2 s upstream timeout
_SLOW_DNS = r"""
import socket, sys, threading, time
listen, upstream, delay, log = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind((listen, 53))
def relay(query, client):
    time.sleep(delay)
    ask = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ask.settimeout(2)
    ask.sendto(query, (upstream, 53))
    server.sendto(ask.recv(4096), client)
    with open(log, "a") as f:
        f.write("answered\n")
while True:
    query, client = server.recvfrom(4096)
    threading.Thread(target=relay, args=(query, client), daemon=True).start()
"""

# An A query for allowed.test to the sandbox's resolver, sent and not waited for.
_ASK_AND_LEAVE = r"""
import socket, struct
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
query = struct.pack(">6H", 0x5151, 0x0100, 1, 0, 0, 0) + b"\x07allowed\x04test\x00\x00\x01\x00\x01"
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(query, (ns, 53))
print("sent")
"""


# B's listener by its text ([A]: not the probe's own text).
_B_PROCESS = "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c 'SO_REUSE[A]DDR'"


@pytest.fixture
def slow_dns(fakenet, tmp_path):
    log = tmp_path / "slow-dns.log"
    log.touch()
    fakenet.run_in_internet(["ip", "addr", "add", f"{SLOW_DNS_IP}/32", "dev", "lo"], check=True)
    argv = [sys.executable, "-I", "-S", "-c", _SLOW_DNS, SLOW_DNS_IP, fakenet.dns_ip]
    relay = subprocess.Popen(
        ["ip", "netns", "exec", fakenet.internet_ns, *argv, str(SLOW_DNS_DELAY), str(log)],
        stdin=subprocess.DEVNULL,
        stderr=(tmp_path / "slow-dns.err").open("w"),
    )
    try:
        yield log
    finally:
        relay.kill()
        relay.wait()
        fakenet.run_in_internet(["ip", "addr", "del", f"{SLOW_DNS_IP}/32", "dev", "lo"])


@pytest.fixture
def service(fakenet, tmp_path, slow_dns):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(TWO_PROFILES)
    # The service's one upstream is the slow relay (GatewayProcess names fakenet's dns_ip).
    upstream = SimpleNamespace(dns_ip=SLOW_DNS_IP, ca_cert=fakenet.ca_cert, host_ns=fakenet.host_ns)
    gateway = GatewayProcess(upstream, tmp_path, rules, "--workers", "2").start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _line_of(service: GatewayProcess, predicate) -> int | None:
    """The index in the audit log of the first record `predicate` takes, or None."""
    for index, record in enumerate(service.events()):
        if predicate(record):
            return index
    return None


def test_a_dns_answer_that_comes_after_its_task_ended_is_that_tasks_not_nobodys(
    service, slow_dns, tmp_path
):
    """Task A sends a query and ends while it is upstream. The answer comes when A's
    address is no task's (or, once reused, another's): its event must still be A's,
    in the audit log after A's end, and it must bind nothing (unit: test_dns.py)."""
    a = attach(service, tmp_path, {"ask": f"python3 -c '{_ASK_AND_LEAVE}'"})
    assert a.returncode == 0, a.stderr
    assert a["ask"].out.strip() == "sent"
    address = a.summary["sandbox"]

    def answered(record: dict) -> bool:
        return (
            record.get("kind") == "dns"
            and record.get("name") == "allowed.test"
            and record.get("sandbox") == address
        )

    sandbox.eventually(lambda: _line_of(service, answered) is not None, timeout=6)
    ended = _line_of(
        service,
        lambda r: r.get("task_id") == a.run_id and (r.get("detail") or "").startswith("task ended"),
    )
    late = _line_of(service, answered)
    assert late is not None, "the upstream's late answer made no event"
    # The race happened: the answer came after the task had ended...
    assert ended is not None and late > ended, (ended, late)
    assert slow_dns.read_text().count("answered") == 1
    # ... and is still the asking task's (it was nobody's: task_id null).
    record = service.events()[late]
    assert record.get("task_id") == a.run_id, record
    assert record["verdict"] == "allow" and record["profile"] == "default"


def test_a_task_next_to_another_neither_reaches_nor_becomes_it(service, tmp_path):
    """A and B at once: A knows B's address and listening port. Connecting to it is a
    denied private destination, taking B's address on its own eth0 or opening a raw
    socket to forge B's source is refused, B's abstract unix socket is not A's to
    reach, A sees only its own few processes, and B's listeners accept nothing."""
    b_dir = sandbox._workdir(tmp_path)
    b_steps = b_dir / "steps"
    listener = r"""
import os, socket, subprocess, time
addr = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True,
                      text=True).stdout.split()[3].split("/")[0]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(8); s.settimeout(0.05)
u = socket.socket(socket.AF_UNIX); u.bind("\0sgreuse-b"); u.listen(8); u.settimeout(0.05)
open("addr.tmp", "w").write(addr); os.rename("addr.tmp", "addr")
deadline = time.monotonic() + 40
while not os.path.exists("done") and time.monotonic() < deadline:
    for listener in (s, u):
        try:
            peer = listener.accept()[1]
            open("accepted", "a").write(f"{peer!r}\n")
        except socket.timeout:
            pass
"""
    b = subprocess.Popen(
        attach_argv(service, b_dir, ["python3", "-c", listener], profile="api"),
        cwd=b_steps,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sandbox.eventually(lambda: (b_steps / "addr").exists(), timeout=20), (
            b.poll(),
            b.stderr.read() if b.poll() is not None else "",
        )
        b_ip = (b_steps / "addr").read_text()
        # The process probe below finds B's listener where it can be seen: on the host.
        seen = subprocess.run(["sh", "-c", _B_PROCESS], capture_output=True, text=True)
        assert int(seen.stdout) >= 1, seen
        steps = {
            # The gateway's front door takes every connection: the decision is its close.
            "connect": f'python3 -c \'import socket; c = socket.create_connection(("{b_ip}", 7777), 3);'
            ' c.sendall(b"hello"); print(c.recv(10))\' 2>&1; echo rc=$?',
            "take_address": f"ip addr add {b_ip}/32 dev eth0 2>&1; echo rc=$?",
            "raw": "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)'"
            " 2>&1; echo rc=$?",
            "addresses": "ip -4 -o addr show dev eth0",
            "abstract": "python3 -c 'import socket; socket.socket(socket.AF_UNIX)"
            '.connect("\\0sgreuse-b")\' 2>&1; echo rc=$?',
            "processes": _B_PROCESS,
        }
        a = attach(service, tmp_path, steps)
    finally:
        (b_steps / "done").touch()
        try:
            b.wait(timeout=30)
        except subprocess.TimeoutExpired:
            b.kill()
            b.wait()
    assert a.returncode == 0, a.stderr
    for label in ("take_address", "raw", "abstract"):
        assert a[label].out.strip().splitlines()[-1] != "rc=0", (label, a[label].out)
    assert "rc=0" not in a["connect"].out or "b''" in a["connect"].out, a["connect"].out
    assert b_ip not in a["addresses"].out, a["addresses"].out
    assert a["processes"].out.strip() == "0", a["processes"].out
    assert not (b_steps / "accepted").exists(), (b_steps / "accepted").read_text()
    denied = [e for e in a.audit if e.get("kind") == "connection" and e.get("dst_ip") == b_ip]
    assert all(e["verdict"] == "deny" for e in denied), denied
    # B's address routes out of a sandbox interface: A's table drops the SYN before the
    # gateway could connect there (test_sandbox_to_sandbox.py)
    assert a.summary["firewall_drops"].get("dropped_forward", 0) >= 1, a.summary
    assert b.returncode == 0, b.stderr.read()


def test_what_a_task_leaves_in_its_sandbox_is_gone_for_the_next_on_a_warm_runner(service, tmp_path):
    """A plants files in /tmp, /dev/shm and $HOME, a SysV shared-memory segment, and a
    process that left its session (setsid, double fork); the next task, on another
    warm runner of the same service, sees none of them, and A's process is gone."""
    marker = f"sgreuse{time.monotonic_ns()}"
    planted = {
        "plant": f"for d in /tmp /dev/shm $HOME; do echo x > $d/{marker}; done; "
        "python3 -c 'import ctypes; l=ctypes.CDLL(None); print(l.shmget(0x5157, 4096, 0o1666))'; "
        "python3 -c 'import os, sys; os.fork() and sys.exit(); os.setsid(); os.fork() and sys.exit();"
        f' os.execvp("sleep", ["{marker}", "300"])\' </dev/null >/dev/null 2>&1; sleep 0.2; '
        f"pgrep -f ^{marker} >/dev/null && echo alive",  # argv[0]: not this shell's text
    }
    a = attach(service, tmp_path, planted)
    assert a.returncode == 0, a.stderr
    lines = a["plant"].out.split()
    assert lines[-1] == "alive" and int(lines[0]) >= 0, a["plant"].out  # all of it happened
    b = attach(
        service,
        tmp_path,
        {
            "files": f"ls -a /tmp /dev/shm $HOME | grep -c {marker}",
            "shm": "cat /proc/sysvipc/shm | grep -ci 5157",
            "procs": f"pgrep -f ^{marker} || echo none",
        },
    )
    assert b.returncode == 0, b.stderr
    assert b["files"].out.strip() == "0", b["files"].out
    assert b["shm"].out.strip() == "0", b["shm"].out
    assert b["procs"].out.strip() == "none", b["procs"].out
    # On the host: no process of A left anywhere.
    host = subprocess.run(["pgrep", "-f", f"^{marker}"], capture_output=True, text=True)
    assert host.stdout == "", host.stdout
