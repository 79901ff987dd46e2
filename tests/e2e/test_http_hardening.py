"""HTTP requests that would mean one thing to sandgate and another to the server
(issue 12), end to end: `sandgate run` in the fake internet.

Each test sends hostile request heads over plain HTTP/1, inspected HTTP/1.1 and
inspected HTTP/2 (curl) and asserts what the client got, the audit-log decision,
and — from nginx's access log or the raw TCP server's log — that the server never
received the request. Rules: rules/examples/demo.yaml (allowed.test plain and
pass-through; api.allowed.test inspected, GET/HEAD on /public/**; ssh.allowed.test
raw TCP on port 22) unless a test writes its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl, eventually, python

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"
API_IP = "203.0.113.11"


def raw(host: str, port: int, payload: bytes, tls: bool = False, resolve: str = "") -> str:
    """Send `payload` as is (`@FILE`: the workspace file's bytes), over TLS with the
    system bundle if `tls`; print the status line of the answer ("closed" if none).
    `resolve` looks a name up first, so that the gateway's DNS binds it (raw TCP is
    named by those bindings)."""
    return python(
        """
        import socket, ssl, sys
        host, port, tls, payload, resolve = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
        payload = open(payload[1:], "rb").read() if payload.startswith("@") else bytes.fromhex(payload)
        if resolve:
            socket.gethostbyname(resolve)
        try:
            s = socket.create_connection((host, port), timeout=5)
            if tls:
                context = ssl.create_default_context()
                context.set_alpn_protocols(["http/1.1"])
                s = context.wrap_socket(s, server_hostname=host)
            s.sendall(payload)
            data = b""
            while b"\\r\\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            data = b""
        print(data.split(b"\\r\\n")[0].decode(errors="replace") or "closed")
        """,
        host,
        str(port),
        "1" if tls else "0",
        payload.decode() if payload.startswith(b"@") else payload.hex(),
        resolve,
    )


def status(step) -> int:
    """The status code of a `raw` step (0: no answer)."""
    parts = step.out.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def request_events(r, reason: str) -> list[dict]:
    return [e for e in r.events(kind="request") if e["reason"] == reason]


def settled_requests(net, ip: str | None = None) -> list[dict]:
    """What nginx logged, once a late log line had a moment to arrive."""
    eventually(lambda: False, timeout=0.3)
    return net.requests_seen(ip)


# --- control bytes, methods: smuggling a second request ------------------------------

H = b"Host: allowed.test\r\n"
API = b"Host: api.allowed.test\r\n"


def test_control_bytes_and_non_token_methods_are_refused_on_every_http_path(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        # plain HTTP/1
        "nul_value": raw("allowed.test", 80, b"GET /a HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n"),
        "folded": raw("allowed.test", 80, b"GET /b HTTP/1.1\r\n" + H + b"X: a\r\n GET /smuggled HTTP/1.1\r\n\r\n"),
        "method": raw("allowed.test", 80, b"G\x00ET /c HTTP/1.1\r\n" + H + b"\r\n"),
        "method_sep": raw("allowed.test", 80, b"GET(x) /d HTTP/1.1\r\n" + H + b"\r\n"),
        # inspected HTTP/1.1
        "tls_nul_value": raw("api.allowed.test", 443, b"GET /public/a HTTP/1.1\r\n" + API + b"X: a\x01b\r\n\r\n", tls=True),
        "tls_folded": raw("api.allowed.test", 443, b"GET /public/b HTTP/1.1\r\n" + API + b"X: a\r\n\tPOST /private\r\n\r\n", tls=True),
        # curl --http2 offers h2 and http/1.1: the front door serves it as HTTP/1.1
        # (tls_relay.py), so these are inspected HTTP/1.1 with CR/LF in a header
        # value, the target, the method; mitmproxy's h2 path gets the same from the
        # h2-only client of test_control_bytes_in_http2_fields_never_reach_the_server
        "h2_value": curl("--http2", "-H", "X-A: a\r\nGET /private HTTP/1.1", "https://api.allowed.test/public/c"),
        "h2_path": curl("--http2", "--request-target", "/public/d HTTP/1.1\r\nHost: evil.test\r\n\r\nGET /private", "https://api.allowed.test/"),
        "h2_method": curl("--http2", "-X", "GET /private HTTP/1.1\r\nX:", "https://api.allowed.test/public/e"),
        # the control run: a well-formed request still goes through
        "h2_ok": curl("--http2", "https://api.allowed.test/public/ok"),
    })  # fmt: skip

    for label in ("nul_value", "folded", "tls_nul_value", "tls_folded"):
        assert status(r[label]) in (400, 403), (label, r.describe())
    # A NUL or a separator inside the method: not a request line, so not HTTP on port 80.
    assert status(r["method"]) == status(r["method_sep"]) == 0
    assert r.verdicts(kind="connection", reason="not_http") == {
        ("deny", "not_http", "builtin:not-http")
    }
    for label in ("h2_value", "h2_path", "h2_method"):
        # curl refuses CR/LF in fields itself, or sends what it parsed them into;
        # either way nothing undecided is allowed
        assert r[label].status in (0, 400, 403), (label, r.describe())
    assert r["h2_ok"].status == 200, r.describe()
    seen = settled_requests(net)
    assert [(e["method"], e["uri"]) for e in seen] == [("GET", "/public/ok")], seen
    assert not [e for e in r.events(kind="request", verdict="allow") if e["path"] != "/public/ok"]
    assert len(request_events(r, "malformed_request")) >= 4, r.describe()


# HTTP/2 with fields curl will not send: the h2 package (pure Python, copied into the
# workspace for the sandbox's /usr/bin/python3) with its own validation off.
H2_CLIENT = """
import socket, ssl, sys
sys.path.insert(0, "h2lib")
import h2.config, h2.connection
method, path, authority, name, value = (bytes.fromhex(a) for a in sys.argv[1:6])
context = ssl.create_default_context()
context.set_alpn_protocols(["h2"])
s = context.wrap_socket(socket.create_connection(("api.allowed.test", 443), timeout=5), server_hostname="api.allowed.test")
config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False, validate_inbound_headers=False)
conn = h2.connection.H2Connection(config=config)
conn.initiate_connection()
headers = [(b":method", method), (b":path", path), (b":scheme", b"https"), (b":authority", authority)]
if name:
    headers.append((name, value))
conn.send_headers(1, headers, end_stream=True)
s.sendall(conn.data_to_send())
status = "closed"
try:
    while status == "closed":
        data = s.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if hasattr(event, "headers") and event.headers:
                status = dict(event.headers).get(b":status", b"?").decode()
        s.sendall(conn.data_to_send())
except OSError:
    pass
print(status)
"""


def h2_request(
    method=b"GET", path=b"/public/x", authority=b"api.allowed.test", name=b"", value=b""
):
    return python(H2_CLIENT, *(x.hex() for x in (method, path, authority, name, value)))


def copy_h2(workspace) -> None:
    import h2
    import hpack
    import hyperframe

    for package in (h2, hpack, hyperframe):
        source = Path(package.__file__).parent
        shutil.copytree(source, workspace / "h2lib" / source.name)


def test_control_bytes_in_http2_fields_never_reach_the_server(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "value": h2_request(name=b"x-a", value=b"1\r\nGET /private HTTP/1.1\r\nx: y"),
        "nul_value": h2_request(name=b"x-a", value=b"1\x00b"),
        "path": h2_request(path=b"/public/x HTTP/1.1\r\nHost: evil.test\r\n\r\nGET /private"),
        "method": h2_request(method=b"GET /private HTTP/1.1\r\nX:"),
        "authority": h2_request(authority=b"api.allowed.test\r\nX: y"),
        "host_differs": h2_request(name=b"host", value=b"evil.test"),
        "ok": h2_request(path=b"/public/ok"),
    }, setup=copy_h2)  # fmt: skip

    assert r["ok"].out.strip() == "200", r.describe()
    for label in ("value", "nul_value", "path", "method", "authority", "host_differs"):
        assert r[label].out.strip() in ("400", "403", "closed"), (label, r.describe())
    assert [(e["method"], e["uri"]) for e in settled_requests(net)] == [("GET", "/public/ok")]
    allowed = r.events(kind="request", verdict="allow")
    assert [e["path"] for e in allowed] == ["/public/ok"], r.describe()


# --- paths: what is forwarded is what was decided ------------------------------------

PATHS = [
    "/public/..%2fprivate",
    "/public/%2e%2e/private",
    "/public/.%2E/private",
    "/public/../private",
    "/public/./x",
    "/public//x",
    "/public/x;/../../private",
    "/public/x%5c..%5cprivate",
    "/public\\..\\private",
    "/public/x#/../../private",
    "/public/%c0%af..%c0%afprivate",
    "/public/%00",
]


def test_ambiguous_paths_are_refused_not_forwarded(net, tmp_path):
    steps = {}
    for i, path in enumerate(PATHS):
        steps[f"plain{i}"] = raw(
            "allowed.test", 80, f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode()
        )
        steps[f"tls{i}"] = raw(
            "api.allowed.test",
            443,
            f"GET {path} HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n".encode(),
            tls=True,
        )
    # HTTP/2 (only h2 offered: mitmproxy's path)
    steps["h2"] = h2_request(path=b"/public/../private")
    r = sandbox.run(net, tmp_path, steps, setup=copy_h2)

    for label in steps:
        got = int(r[label].out.strip()) if label == "h2" else status(r[label])
        assert got == 400, (label, r.describe())
    assert settled_requests(net) == []
    reasons = {e["reason"] for e in r.events(kind="request")}
    assert reasons == {"ambiguous_path"}, r.describe()


def test_deny_path_rules_are_not_defeated_by_case(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: api.allowed.test\n        paths: ['/public/**']\n        id: api\n"
        "      - deny: api.allowed.test\n        paths: ['/public/admin/**']\n        id: no-admin\n"
    )
    r = sandbox.run(net, tmp_path, {
        "lower": curl("https://api.allowed.test/public/admin/keys"),
        "upper": curl("https://api.allowed.test/public/ADMIN/keys"),
        "mixed": h2_request(path=b"/public/Admin"),  # HTTP/2: mitmproxy's path
        "ok": curl("https://api.allowed.test/public/x"),
    }, rules=rules, setup=copy_h2)  # fmt: skip

    assert [r[s].status for s in ("lower", "upper", "ok")] == [403, 403, 200], r.describe()
    assert r["mixed"].out.strip() == "403", r.describe()
    assert "no-admin" in r["upper"].body
    assert [e["uri"] for e in settled_requests(net)] == ["/public/x"]


# --- authority: never a name that was not decided ------------------------------------


def test_the_request_reaches_only_the_authority_that_was_decided(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "absolute": raw("allowed.test", 80, b"GET http://evil.test/ HTTP/1.1\r\n" + H + b"\r\n"),
        "two_hosts": raw("allowed.test", 80, b"GET / HTTP/1.1\r\n" + H + b"Host: evil.test\r\n\r\n"),
        "other_port": raw("allowed.test", 80, b"GET / HTTP/1.1\r\nHost: allowed.test:8080\r\n\r\n"),
        "odd_ip": raw("allowed.test", 80, b"GET / HTTP/1.1\r\nHost: 0xcb.0.113.10\r\n\r\n"),
        "no_host": raw("api.allowed.test", 443, b"GET /public/x HTTP/1.1\r\n\r\n", tls=True),
        "tls_ip_host": raw("api.allowed.test", 443, b"GET /public/x HTTP/1.1\r\nHost: 203.0.113.11\r\n\r\n", tls=True),
        "ok": raw("allowed.test", 80, b"GET /fine HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"),
    })  # fmt: skip

    for label in ("absolute", "two_hosts", "other_port", "odd_ip", "no_host", "tls_ip_host"):
        assert status(r[label]) == 403, (label, r.describe())
    assert status(r["ok"]) == 200, r.describe()
    assert [(e["host"], e["uri"]) for e in settled_requests(net)] == [("allowed.test", "/fine")]
    assert {e["reason"] for e in r.events(kind="request", verdict="deny")} == {"host_mismatch"}


# --- upgrades --------------------------------------------------------------------------


def test_upgrades_never_make_an_undecided_tunnel(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n        id: web\n"
        "      - allow: www.allowed.test\n        websocket: true\n        id: ws\n"
    )
    ws = (
        "-H",
        "Connection: Upgrade",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    r = sandbox.run(net, tmp_path, {
        "h2c_foo": curl("-H", "Upgrade: h2c, foo", "-H", "Connection: Upgrade, HTTP2-Settings", "-H", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA", "http://allowed.test/h2c"),
        "ws_denied": curl("-H", "Upgrade: websocket", *ws, "http://allowed.test/ws"),
        "ws_allowed": curl("-H", "Upgrade: websocket", *ws, "http://www.allowed.test/ws"),
        "ws_mixed": curl("-H", "Upgrade: websocket, h2c", *ws, "http://www.allowed.test/mixed"),
    }, rules=rules)  # fmt: skip

    assert r["h2c_foo"].status == 200 and r["ws_denied"].status == 403, r.describe()
    assert "protocol_not_allowed" in r["ws_denied"].body
    # nginx serves no WebSocket: the allowed upgrade reaches it and gets a plain answer.
    assert r["ws_allowed"].status == 200 and r["ws_mixed"].status == 200, r.describe()
    seen = {e["uri"]: e["upgrade"] for e in settled_requests(net)}
    assert seen == {"/h2c": "", "/ws": "websocket", "/mixed": ""}, seen
    assert r.verdicts(kind="request", path="/ws", name="allowed.test") == {
        ("deny", "protocol_not_allowed", "default:fallback")
    }


# --- non-web ports ---------------------------------------------------------------------

TLS13_RECORD_HELLO = """
import socket, ssl, sys
socket.gethostbyname("ssh.allowed.test")  # binds 203.0.113.10 to a name port 22 allows
context = ssl.create_default_context()
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = context.wrap_bio(incoming, outgoing, server_hostname="evil.test")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = bytearray(outgoing.read())
hello[1:3] = bytes.fromhex(sys.argv[1])  # the record version
with socket.create_connection(("203.0.113.10", 22), timeout=3) as s:
    s.sendall(hello)
    try:
        print(s.recv(100))
    except OSError as e:
        print("error", e)
"""


def test_tls_and_http_on_a_raw_tcp_port_still_meet_the_name_checks(net, tmp_path):
    lower = b"get / HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    tabs = b"GET\t\t/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    r = sandbox.run(net, tmp_path, {
        "lower": raw(ALLOWED_IP, 22, lower, resolve="ssh.allowed.test"),
        "tabs": raw(ALLOWED_IP, 22, tabs, resolve="ssh.allowed.test"),
        "tls_0304": python(TLS13_RECORD_HELLO, "0304"),
        "tls_03ff": python(TLS13_RECORD_HELLO, "03ff"),
    })  # fmt: skip

    assert "SSH-2.0" not in r.stdout + "".join(s.out for s in r.steps.values()), r.describe()
    # The raw TCP server (port 22) never got a connection: each was decided by its name.
    assert net.tcp_connections_seen(ALLOWED_IP, 22) == 0, r.describe()
    tls = r.events(kind="connection", protocol="tls", dst_port=22)
    assert len(tls) == 2 and all(e["verdict"] == "deny" for e in tls), r.describe()
    # 0x0304 is a record version clients send: decided by its name; 0x03ff is TLS to
    # some servers and no name to an SNI router: refused (clienthello.RECORD_VERSIONS).
    assert {(e.get("name"), e["reason"]) for e in tls} == {
        ("evil.test", "no_rule"),
        (None, "malformed_tls"),
    }, r.describe()
    http = r.events(kind="request", dst_port=22)
    assert len(http) == 2 and all(e["verdict"] == "deny" for e in http), r.describe()


# What some HTTP server reads as a request although it does not start `METHOD /`: were
# the gateway to take it for raw TCP, port 22 (allowed for ssh.allowed.test) would relay
# it, and a server with virtual hosts there would serve evil.test's.
LENIENT_REQUEST_LINES = {
    "crlf_first": b"\r\nPOST /admin HTTP/1.1\r\n",  # RFC 9112 2.2: servers skip blank lines
    "lf_first": b"\n\nPOST /admin HTTP/1.1\r\n",
    "space_first": b" GET /admin HTTP/1.1\r\n",  # http.server's str.split()
    "long_method": b"DELETE" + b"X" * 40 + b" /admin HTTP/1.1\r\n",  # nginx takes any length
    "nel_between": b"GET\x85/admin HTTP/1.1\r\n",  # str.split() splits at U+0085 too
    "bare_target": b"POST admin HTTP/1.1\r\n",  # http.server takes any target
}


def test_request_lines_a_lenient_server_reads_meet_the_name_checks_on_a_raw_tcp_port(net, tmp_path):
    head = b"Host: evil.test\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret"
    r = sandbox.run(net, tmp_path, {
        label: raw(ALLOWED_IP, 22, line + head, resolve="ssh.allowed.test")
        for label, line in LENIENT_REQUEST_LINES.items()
    })  # fmt: skip

    # The raw TCP server never got a connection: each was decided as HTTP, by its Host.
    assert net.tcp_connections_seen(ALLOWED_IP, 22) == 0, r.describe()
    assert "SSH-2.0" not in "".join(s.out for s in r.steps.values()), r.describe()
    assert not r.events(dst_port=22, verdict="allow"), r.describe()
    assert not r.events(kind="connection", protocol="tcp", dst_port=22), r.describe()
    denied = r.events(dst_port=22, verdict="deny")
    assert len(denied) >= len(LENIENT_REQUEST_LINES), r.describe()


# --- limits, events, byte counts ----------------------------------------------------------


def test_a_1_mb_header_is_refused_with_431(net, tmp_path):
    big = b"GET /big-header HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    r = sandbox.run(
        net,
        tmp_path,
        {"big": raw("allowed.test", 80, b"@big.bin")},
        setup=lambda workspace: (workspace / "big.bin").write_bytes(big),
    )
    assert status(r["big"]) == 431, r.describe()
    assert settled_requests(net) == []
    assert r.verdicts(kind="request", path="/big-header") == {
        ("deny", "headers_too_large", "builtin:headers-too-large")
    }


def test_every_http_connection_leaves_an_event_and_a_400_is_never_an_allow(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        # refused by the HTTP parser before any request hook
        "no_colon": raw("allowed.test", 80, b"GET / HTTP/1.1\r\n" + H + b"no colon here\r\n\r\n"),
        # a Content-Length the parser cannot read
        "bad_length": raw("allowed.test", 80, b"POST /len HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n"),
        "ok": curl("http://allowed.test/counted"),
        "tls_ok": curl("https://api.allowed.test/public/counted"),
    })  # fmt: skip

    assert status(r["no_colon"]) == 400 and status(r["bad_length"]) == 400, r.describe()
    assert r.events(kind="request", path="/len") and not r.events(
        kind="request", path="/len", verdict="allow"
    )
    refused = r.events(
        kind="connection", dst_ip=ALLOWED_IP, dst_port=80, reason="malformed_request"
    )
    assert len(refused) == 1 and refused[0]["verdict"] == "deny", r.describe()
    assert [e["uri"] for e in settled_requests(net)] == ["/counted", "/public/counted"] or sorted(
        e["uri"] for e in settled_requests(net)
    ) == ["/counted", "/public/counted"]
    for ip in (ALLOWED_IP, API_IP):
        ends = [e for e in r.events(kind="connection_end", dst_ip=ip) if e.get("bytes_up")]
        assert ends and ends[0]["bytes_up"] > 0 and ends[0]["bytes_down"] > 0, r.describe()


def test_a_client_that_rejects_the_gateways_certificate_gets_its_own_event_and_a_hint(
    net, tmp_path
):
    r = sandbox.run(net, tmp_path, {
        # trusts only the fake internet's CA, as a client with a private bundle would
        "pinned": "curl -sS --max-time 5 --cacert fake-ca.pem https://api.allowed.test/public/x",
    }, setup=lambda workspace: shutil.copy(net.ca_cert, workspace / "fake-ca.pem"))  # fmt: skip
    assert r["pinned"].rc != 0, r.describe()
    assert r.verdicts(kind="connection", reason="tls_rejected_by_client") == {
        ("deny", "tls_rejected_by_client", "builtin:tls-rejected-by-client")
    }
    assert "hint: a client refused the gateway's certificate" in r.stderr
    assert settled_requests(net) == []


def test_a_blocked_request_answers_short_plain_text_naming_reason_and_rule(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "post": curl("-i", "-X", "POST", "-d", "x=1", "https://api.allowed.test/public/x"),
    })  # fmt: skip
    head, _, body = r["post"].out.partition("\n\n")
    assert "content-type: text/plain" in head.lower()
    lines = body.rsplit("\n", 1)[0].strip().splitlines()
    assert len(lines) <= 4, body
    assert lines[0].startswith("Blocked by sandgate: method_not_allowed, rule default:fallback")
