"""Ways a task might get around the gateway that the other e2e modules do not try,
end to end: `sandgate run` in the fake internet, ordinary clients (python3 sockets,
curl, dig) as the task.

Each test runs several probes in one sandbox and asserts, for each, what the
client got, the audit event that says why, and that the forbidden server got
nothing (nginx's access log, dnsmasq's query log, a sink's connection log).
Rules: rules/examples/demo.yaml (allowed.test on 203.0.113.10, plain and
pass-through; ssh.allowed.test, the same address, port 22 only; evil.test and
forbidden.test on 203.0.113.66) unless a test writes its own.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import python

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test, www.allowed.test, ssh.allowed.test
API_IP = "203.0.113.11"  # api.allowed.test
EVIL_IP = "203.0.113.66"

# A ClientHello as a client's TLS library writes it (Python's ssl, SNI argv[1]),
# changed as argv[4] says, sent to argv[2]:argv[3] after resolving the SNI through
# the gateway (which binds the name to its address). Prints "server spoke" if a
# TLS record came back (the hello reached a server), else "closed".
# - ech: with an encrypted_client_hello extension (0xfe0d) added, as a client
#   that has an ECH config for another name behind the same server would send it;
# - bytes: the hello one byte a TCP segment.
TLS_HELLO = """
import socket, ssl, sys, time
sni, ip, port, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
socket.gethostbyname(sni.rstrip(".").lower())
context = ssl.create_default_context()
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = bytearray(outgoing.read())
if how == "ech":
    # An ECH outer extension: type 0 (outer), a cipher suite, config id, enc, payload.
    ech = bytes([0, 0, 1, 0, 1, 7]) + b"\\x00\\x20" + bytes(32) + b"\\x00\\x40" + bytes(64)
    extension = b"\\xfe\\x0d" + len(ech).to_bytes(2, "big") + ech
    body = hello[9:]  # after the record header (5) and the handshake header (4)
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at : at + 2], "big")
    at += 1 + body[at]  # the extensions block's length
    size = int.from_bytes(body[at : at + 2], "big") + len(extension)
    body[at : at + 2] = size.to_bytes(2, "big")
    body += extension
    hello = bytearray(b"\\x16\\x03\\x01") + (len(body) + 4).to_bytes(2, "big")
    hello += b"\\x01" + len(body).to_bytes(3, "big") + body
with socket.create_connection((ip, port), timeout=3) as s:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if how == "bytes":
            for i in range(len(hello)):
                s.send(hello[i : i + 1])
                time.sleep(0.0005)
        else:
            s.sendall(hello)
        data = s.recv(5)
    except OSError:
        data = b""
print("server spoke" if data[:1] == b"\\x16" else "closed")
"""


def tls_hello(sni: str, ip: str, port: int, how: str = "plain") -> str:
    return python(TLS_HELLO, sni, ip, str(port), how)


def test_a_client_hello_with_encrypted_client_hello_never_passes_through(net, tmp_path):
    """ECH hides the name the server routes by (the inner hello's) behind the one
    the gateway reads (the outer's): a server that fronts many names (a CDN) would
    serve the hidden one. Pass-through can check only what it reads, so a hello
    carrying ECH is refused before anything reaches the server; an inspected name
    is served by the gateway's own TLS, which ignores the extension (as a server
    without ECH does a browser's GREASE ECH)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        ports: [443, 8443]\n        id: web\n"
        "      - allow: api.allowed.test\n        methods: [GET]\n        id: inspected\n"
    )
    with sandbox.sink(net, ALLOWED_IP, 8443, tmp_path / "sink.log") as seen:
        r = sandbox.run(net, tmp_path, {
            "ech": tls_hello("allowed.test", ALLOWED_IP, 8443, "ech"),
            "ech_443": tls_hello("allowed.test", ALLOWED_IP, 443, "ech"),
            "plain": tls_hello("allowed.test", ALLOWED_IP, 443),
            "inspected": tls_hello("api.allowed.test", API_IP, 443, "ech"),
        }, rules=rules)  # fmt: skip
        connections = seen()

    assert r["ech"].out.strip() == r["ech_443"].out.strip() == "closed", r.describe()
    assert r["plain"].out.strip() == "server spoke", r.describe()  # the control
    assert r["inspected"].out.strip() == "server spoke", r.describe()
    assert connections == [], connections
    assert r.verdicts(kind="connection", protocol="tls", dst_port=8443) == {
        ("deny", "protocol_not_allowed", "builtin:encrypted-client-hello")
    }, r.describe()
    assert r.verdicts(kind="connection", protocol="tls", dst_ip=ALLOWED_IP, dst_port=443) == {
        ("deny", "protocol_not_allowed", "builtin:encrypted-client-hello"),
        ("allow", "rule_allow", "web"),
    }, r.describe()
    # (then tls_rejected_by_client: the probe hangs up after the ServerHello)
    inspected = r.events(kind="connection", protocol="tls", dst_ip=API_IP)[0]
    assert (inspected["verdict"], inspected["rule_id"]) == ("allow", "inspected"), r.describe()
