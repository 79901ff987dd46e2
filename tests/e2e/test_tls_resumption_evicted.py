"""A red team (session 49) (LOW): the sandbox's store of issued sessions forgets the oldest
ISSUED first (tls_sessions.py: move_to_end on add only, not on a successful
resumption), so a session the task keeps resuming is forgotten once 1024 newer
entries came (a full handshake with a ticket adds two: its id and its ticket), and
its next resumption is reset although the gateway saw it issued to this task."""

from __future__ import annotations

import subprocess

import pytest
from support import sandbox
from support.servers import listening
from test_tls_resumption_honest import IP, NGINX, RULES, C, T

pytestmark = pytest.mark.e2e

CLIENT = """
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
ip = socket.gethostbyname('allowed.test')
def get(session=None):
    with socket.create_connection((ip, %d)) as s:
        with ctx.wrap_socket(s, server_hostname='allowed.test', session=session) as t:
            t.sendall(b'GET /a.txt HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n')
            while t.recv(4096):
                pass
            return t.session, t.session_reused
kept, _ = get()
print('kept', get(kept)[1])            # resumed: fine
for i in range(int(sys.argv[1])):      # other connections, each a full handshake
    get()
for i in range(3):
    try:
        print('again', get(kept)[1])   # the kept session, resumed again
    except OSError as e:
        print('again error', e)
"""


def test_a_kept_session_still_resumes_after_many_others(net, tmp_path):
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    w = tmp_path / "nginx"
    (w / "www").mkdir(parents=True)
    (w / "www" / "a.txt").write_text("hello\n")
    (w / "nginx.conf").write_text(NGINX.format(w=w, ip=IP, t=T, c=C, cert=cert, key=key))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    inside = ["ip", "netns", "exec", net.internet_ns]
    nginx = subprocess.Popen(
        [*inside, "nginx", "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "err.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert sandbox.eventually(lambda: listening(net, [f"{IP}:{T}"]), timeout=10)
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "client": f"{sandbox.SANDBOX_PYTHON} client.py 1100",
        }
        result = sandbox.run(
            net, tmp_path, steps, rules=rules, timeout=240,
            setup=lambda d: (d / "client.py").write_text(CLIENT % T),
        )  # fmt: skip
    finally:
        nginx.terminate()
        nginx.wait(5)
    out = result["client"].out
    why = f"{out}\n{result['client'].err[-2000:]}\n" + "\n".join(
        str(e.get("detail")) for e in result.events(rule_id="builtin:resumed-session")
    )
    assert "kept True" in out, why
    assert "again True" in out and "again error" not in out, why
    assert not result.events(rule_id="builtin:resumed-session"), why
