"""A red team (session 50): a request body still streaming when the rule that
allowed the request expires. An expiry (or reload) decided a plain-HTTP connection
again only as at connect ("each request is, and the next meets the new policy"), so
the request in flight went on: its body kept leaving after the rule was gone. Now
the latest request allowed on a connection is decided again too
(gate._exchange_denial), and the connection is closed (`policy_changed`)."""

from __future__ import annotations

import time

import pytest
from support import sandbox
from support.sandbox import python
from support.servers import script_server

pytestmark = pytest.mark.e2e

IP = "203.0.113.10"  # allowed.test

# Logs every byte it receives to argv[1], flushed, and answers once the body ends.
SERVER = r"""
import socket, sys
log = open(sys.argv[1], "ab", buffering=0)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.10", 8091)); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while True:
        got = c.recv(65536)
        if not got:
            break
        log.write(got)
        data += got
        if data.endswith(b"0\r\n\r\n"):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            break
    c.close()
"""

UPLOAD = r"""
import socket, sys, time
expires = float(sys.argv[1])
s = socket.create_connection(("allowed.test", 8091), timeout=30)
# (A Content-Type that is no form's: a POST without one is read as a form, whose
# last byte waits for the next, form_body.py.)
s.sendall(b"POST /upload HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n"
          b"Content-Type: application/octet-stream\r\n\r\n")
s.sendall(b"6\r\nBEFORE\r\n")
time.sleep(max(0, expires - time.time()) + 2.5)
try:
    s.sendall(b"13\r\nAFTER-EXPIRY-SECRET\r\n0\r\n\r\n")
    print("sent", s.recv(100))
except OSError as e:
    print("error", type(e).__name__)
"""


def test_a_body_in_flight_stops_when_its_rule_expires(net, tmp_path):
    expires = float(int(time.time() + 8))
    instant = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        id: public\n        ports: [8091]\n"
        '        methods: [GET]\n        paths: ["/public/**"]\n'
        "      - allow: allowed.test\n        id: upload-window\n        ports: [8091]\n"
        f'        methods: [POST]\n        paths: ["/upload"]\n        expires: {instant}\n'
    )
    got = tmp_path / "received.bin"
    with script_server(net, SERVER, str(got)):
        r = sandbox.run(net, tmp_path, {"upload": python(UPLOAD, str(expires))}, rules=rules)
    received = got.read_bytes() if got.exists() else b""
    why = f"{r.describe()}\nserver received: {received!r}"
    assert b"BEFORE" in received, why
    # The effect: bytes left after the only rule allowing them had expired.
    assert b"AFTER-EXPIRY-SECRET" not in received, why
