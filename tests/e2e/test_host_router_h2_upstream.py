"""A red team (session 49): an HTTP/2 upstream's protocol errors must not be put on the
client (lean_mitmproxy.mark_h2_protocol_errors marks the client connection that
mitmproxy's Http2Server closes with a GOAWAY: a `malformed_request` event; the
header-block bound is patched into every h2 FrameBuffer, client side too).

The upstream (host_router/h2_bad_upstream.py) answers with a header block h2 refuses,
one past 64 KiB, or a GOAWAY; the sandbox's client is honest (python3-h2). The
audit log must not say the client sent a malformed request or a flood."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
PORT = 8445

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: tenant-allowed
        ports: [{PORT}]
        methods: [GET]
        paths: ["/**"]
      - allow: api.allowed.test
        id: ws-elsewhere
        paths: ["/ws"]
        websocket: true
"""


def h2(path: str) -> str:
    fields = [
        [":method", "GET"],
        [":scheme", "https"],
        [":path", path],
        [":authority", "allowed.test"],
    ]
    return f"{PY} h2client.py {IP} {PORT} allowed.test h2 {shlex.quote(json.dumps(fields))}"


def bad_upstream(net, log: Path) -> list[str]:
    certificate, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    return [
        PY,
        str(HERE / "host_router" / "h2_bad_upstream.py"),
        IP,
        str(PORT),
        certificate,
        key,
        str(log),
    ]


def test_upstream_h2_errors_are_not_the_clients(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "upstream.log"
    log.write_text("")
    with internet_servers(net, [bad_upstream(net, log)], [f"{IP}:{PORT}"]):
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            **{p: h2(f"/{p}") for p in ("honest", "bad_headers", "big_headers", "goaway")},
        }
        result = sandbox.run(
            net, tmp_path, steps, rules=rules,
            setup=lambda d: shutil.copy(HERE / "host_router" / "h2client.py", d / "h2client.py"),
        )  # fmt: skip
    upstream_log = log.read_text()
    why = f"{result.describe()}\nupstream:\n{upstream_log}"
    assert "STATUS 200" in result["honest"].out and "ok" in result["honest"].out, why
    for p in ("bad_headers", "big_headers", "goaway"):
        assert f"UPSTREAM got /{p}" in upstream_log, why
    blamed = [
        e for e in result.events(kind="connection")
        if e["verdict"] == "deny"
        and e["reason"] in ("malformed_request", "headers_too_large", "rate_limited", "sandbox_limit")
    ]  # fmt: skip
    assert blamed == [], why


_BURST = r"""
import socket, ssl, sys
import h2.config, h2.connection
ip, port, streams, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2"])
for c in range(conns):
    s = ctx.wrap_socket(socket.create_connection((ip, port), timeout=5), server_hostname="allowed.test")
    h = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    h.initiate_connection()
    for i in range(streams):  # each a head h2 refuses: host other than :authority
        h.send_headers(1 + 2 * i, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/b%d" % i),
                                   (b":authority", b"allowed.test"), (b"host", b"www.allowed.test")],
                       end_stream=True)
    s.sendall(h.data_to_send())
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()
print("sent")
"""


def test_h2_refusal_events_one_a_connection(net, tmp_path):
    """Many refused heads in one write, on several connections: one malformed_request
    event a connection, none more."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "upstream.log"
    log.write_text("")
    with internet_servers(net, [bad_upstream(net, log)], [f"{IP}:{PORT}"]):
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            "burst": f"{PY} -c {shlex.quote(_BURST)} {IP} {PORT} 50 6",
            "honest": h2("/honest"),
        }
        result = sandbox.run(
            net, tmp_path, steps, rules=rules,
            setup=lambda d: shutil.copy(HERE / "host_router" / "h2client.py", d / "h2client.py"),
        )  # fmt: skip
    why = f"{result.describe()}\nupstream:\n{log.read_text()}"
    refused = result.events(reason="malformed_request")
    assert len(refused) == 6, why
    assert all(len(e["detail"]) <= 600 for e in refused), why
    assert "UPSTREAM got /b" not in log.read_text(), why
    assert "STATUS 200" in result["honest"].out, why
