"""A rule that expires during a run (issue 12, "Policy content"), end to end in the
fake internet: at its `expires` instant the open connection it allowed is closed
with a `policy_changed` event, without a reload, and nothing more reaches the server
through it; before the instant it worked."""

from __future__ import annotations

import time

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

# One TLS connection to allowed.test: a request before the instant, then (after it)
# a second request on the same connection, then a new connection. Prints one line
# per attempt: the status line, or the error.
KEEP_ALIVE_ACROSS_EXPIRY = """
import socket, ssl, sys, time
expires = float(sys.argv[1])
context = ssl.create_default_context()
context.set_alpn_protocols(["http/1.1"])

def get(s, path):
    s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n".encode())
    answer = b""
    while b"\\r\\n\\r\\n" not in answer:
        data = s.recv(65536)
        if not data:
            return "closed"
        answer += data
    head, _, body = answer.partition(b"\\r\\n\\r\\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b"\\r\\n")[0].decode()

def attempt(what):
    try:
        return what()
    except (OSError, ValueError) as e:
        return type(e).__name__

s = context.wrap_socket(socket.create_connection(("allowed.test", 443), timeout=10), server_hostname="allowed.test")
print("before", time.time() < expires, attempt(lambda: get(s, "/before-expiry")))
time.sleep(max(0, expires - time.time()) + 1.5)
print("same", attempt(lambda: get(s, "/after-expiry-same-connection")))
def new():
    t = context.wrap_socket(socket.create_connection(("allowed.test", 443), timeout=5), server_hostname="allowed.test")
    return get(t, "/after-expiry-new-connection")
print("new", attempt(new))
"""


def test_an_expiring_rule_closes_the_connection_it_allowed_at_its_instant(net, tmp_path):
    expires = time.time() + 6
    instant = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires + 1))  # whole seconds
    expires = float(int(expires + 1))
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        f"      - allow: allowed.test\n        id: temporary\n        expires: {instant}\n"
    )
    r = sandbox.run(
        net, tmp_path, {"kept": python(KEEP_ALIVE_ACROSS_EXPIRY, str(expires))}, rules=rules
    )
    before, same, new = (line.split(" ", 1) for line in r["kept"].out.splitlines())
    assert before == ["before", "True HTTP/1.1 200 OK"], r.describe()
    assert same[1] in ("closed", "ConnectionResetError", "SSLEOFError", "SSLError"), r.describe()
    assert new[1] != "HTTP/1.1 200 OK", r.describe()
    (closed,) = r.events(kind="connection", reason="policy_changed")
    assert (closed["rule_id"], closed["name"]) == ("default:fallback", "allowed.test"), closed
    assert closed["time"] >= expires, closed  # at its instant, not before
    assert "closed by the expiry of temporary (no_rule)" in closed["detail"], closed
    # the server saw the request before the instant, and nothing after it
    uris = [e["uri"] for e in net.requests_seen()]
    assert "/before-expiry" in uris and not [u for u in uris if "after-expiry" in u], uris
