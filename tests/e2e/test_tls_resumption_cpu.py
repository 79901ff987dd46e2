"""A red team (session 49): a server at an allowed name (run by the task's accomplice under an
allowed rule) answers with a TLS 1.2 full handshake's first flight, then handshake
records full of empty messages (4 bytes each), without end and without a
ChangeCipherSpec. The front door's watch reads them one by one in Python
(hello_watch.py `_server_handshake`, ~3.4 MB/s sans-io against ~6 GB/s for 16 KB
messages), on the worker's one loop: every other sandbox on that worker stalls.
One worker (`sandgate gateway --workers 1`), an honest sandbox's requests timed alone
and beside the attacker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import crowd, sandbox
from support.servers import listening
from support.service import beside_a_crowd, running

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
FLOOD = HERE / "tls_resumption" / "nst_flood_server.py"
IP, PORT = "203.0.113.10", 8443
BOUND = 2.0  # seconds: loose; a bulk transfer (mode big) at line rate stays under it

RULES = f"""\
version: 1
profiles:
  honest:
    rules:
      - allow: allowed.test
        id: web
  attacker:
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        id: accomplice
"""

ATTACK = """
import os, socket, ssl, sys, threading, time
shared, me, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ip = socket.gethostbyname("allowed.test")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
end = time.monotonic() + 80
got = [0]
def one():
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(i, o, server_hostname="allowed.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s = socket.create_connection((ip, PORT))
    s.sendall(o.read())
    while not os.path.exists(f"{shared}/stop") and time.monotonic() < end:
        d = s.recv(1 << 20)
        if not d:
            break
        got[0] += len(d)
for _ in range(count):
    threading.Thread(target=one, daemon=True).start()
while got[0] < 1 << 20 and time.monotonic() < end:
    time.sleep(0.05)
open(f"{shared}/up-{me}", "w").write("up")
while not os.path.exists(f"{shared}/stop") and time.monotonic() < end:
    time.sleep(0.2)
open(f"{shared}/done-{me}", "w").write(repr(got[0]))
""".replace("PORT", str(PORT))


@pytest.mark.parametrize("mode", ["big", "tiny"])  # big: the control (passes)
def test_tiny_handshake_messages_do_not_stall_other_sandboxes(net, tmp_path, mode):
    log = tmp_path / "flood.log"
    log.touch()
    inside = ["ip", "netns", "exec", net.internet_ns]
    server = subprocess.Popen(
        [*inside, sandbox.SANDBOX_PYTHON, str(FLOOD), IP, str(PORT), "60", str(log), mode],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shared, _ = sandbox.shared_dir(tmp_path)
    try:
        assert sandbox.eventually(lambda: listening(net, [f"{IP}:{PORT}"]), timeout=10)
        with running(net, tmp_path, RULES, "--workers", "1", "--warm", "0") as service:
            alone = beside_a_crowd(
                service, tmp_path, [], (crowd.HONEST, (str(shared), "10"), "honest")
            )
            before = crowd.honest_times(shared)
            (shared / "honest-times").unlink()
            (shared / "stop").unlink()
            ran = beside_a_crowd(
                service, tmp_path,
                [(ATTACK, (str(shared), "0", "4"), "attacker")],
                (crowd.HONEST, (str(shared), "10"), "honest"),
            )  # fmt: skip
            during = crowd.honest_times(shared) if (shared / "honest-times").exists() else []
    finally:
        server.terminate()
        server.wait(5)
    why = (
        f"alone: {before}\nbeside the attacker: {during}\nattacker read: "
        f"{(shared / 'done-0').read_text() if (shared / 'done-0').exists() else '?'}\n"
        f"flood: {log.read_text()}\n{alone.honest_err[-1500:]}\n{ran.honest_err[-3000:]}"
    )
    print(why)
    assert before and max(t for _, t, _ in before) < BOUND, why  # the control
    assert during, why  # the honest sandbox finished its requests
    assert all(s.startswith("HTTP/1.1") for _, _, s in during), why
    assert max(t for _, t, _ in during) < BOUND, why
