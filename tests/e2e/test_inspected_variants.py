"""Hostile clients of inspected TLS (a rule with methods or paths), end to end with
`sandgate run` in the fake internet: HTTP/2 shapes mitmproxy serves (streams with
other :authority values on one connection, :path forms, CONNECT and extended
CONNECT, pseudo-header games, header-name case, rapid reset, CONTINUATION and HPACK
abuse), method spellings and ALPN/TLS-version games on the front door's HTTP/1.1,
and upstreams the gateway must not trust. Every probe checks what the client got,
and nginx's access log (or the probe server's own log) proves that only the
requests the rules allow reached a server.

Not repeated here: the Host/SNI/absolute-form/pipelining differential
(test_inspected_differential.py), control bytes and ambiguous paths
(test_http_hardening.py)."""

from __future__ import annotations

import json

import pytest
from support import sandbox
from support.sandbox import python
from test_http_hardening import copy_h2, settled_requests

pytestmark = pytest.mark.e2e

API_IP = "203.0.113.11"  # api.allowed.test
EVIL_IP = "203.0.113.66"

# api.allowed.test inspected, GET only (not HEAD), on /public/** only.
GET_ONLY = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: web
      - allow: api.allowed.test
        methods: [GET]
        paths: ['/public/**']
        id: api-get
"""

# HTTP/2 with the h2 package's own checks off. argv[1]: JSON (hex) of
# {label: {"alpn": [...], "streams": [[[name, value], ...], ...], "raw": hex}} where
# "raw" is written after the preface instead of streams. Prints, one line per label,
# the :status of each stream in order ("-": none; "reset"; "closed": the connection
# ended) or "closed".
H2_PROBE = """
import json, socket, ssl, sys
sys.path.insert(0, "h2lib")
import h2.config, h2.connection, h2.events
probes = json.loads(bytes.fromhex(sys.argv[1]))
for label, probe in probes.items():
    result = {}
    try:
        context = ssl.create_default_context()
        context.set_alpn_protocols(probe.get("alpn", ["h2"]))
        s = context.wrap_socket(socket.create_connection(("api.allowed.test", 443), timeout=5), server_hostname="api.allowed.test")
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False, validate_inbound_headers=False)
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        streams = [1 + 2 * i for i in range(len(probe.get("streams", [])))]
        if "raw" in probe:
            s.sendall(bytes.fromhex(probe["raw"]))
        for sid, headers in zip(streams, probe.get("streams", [])):
            conn.send_headers(sid, [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers], end_stream=True)
            s.sendall(conn.data_to_send())
        while len(result) < len(streams) or "raw" in probe:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    result[event.stream_id] = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.StreamReset):
                    result.setdefault(event.stream_id, "reset")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ConnectionError
            s.sendall(conn.data_to_send())
    except Exception:
        pass
    print(label, " ".join(result.get(sid, "closed") for sid in streams) or "closed", flush=True)
"""


def h2_probes(probes: dict) -> str:
    return python(H2_PROBE, json.dumps(probes).encode().hex())


def req(method="GET", path="/public/x", authority="api.allowed.test", *extra, scheme="https"):
    """The header list of one stream: the pseudo-headers, then `extra` pairs."""
    headers = [[":method", method], [":path", path], [":scheme", scheme]]
    return [*headers, [":authority", authority], *[list(pair) for pair in extra]]


def lines(step) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in step.out.strip().splitlines() if " " in line)


H2 = {
    # one connection, streams naming other names: each decided against the SNI
    "coalesce": {"streams": [req(path="/public/c1"), req(path="/public/c2", authority="allowed.test"), req(path="/public/c3", authority="evil.test"), req(path="/public/c4", authority="api.allowed.test:8443")]},
    # :path forms
    "star": {"streams": [req(method="OPTIONS", path="*")]},
    "absolute_other": {"streams": [req(path="https://evil.test/public/abs")]},
    "absolute_same": {"streams": [req(path="https://api.allowed.test/private")]},
    "empty_path": {"streams": [req(path="")]},
    "fragment": {"streams": [req(path="/public/f#/../../private")]},
    "pct_slash": {"streams": [req(path="/public/..%2Fprivate")]},
    "pct_dots": {"streams": [req(path="/public/%2E%2E/private")]},
    # CONNECT: a tunnel to a name the rules never decided
    "connect": {"streams": [[[":method", "CONNECT"], [":authority", "evil.test:443"]]]},
    "extended_connect": {"streams": [[[":method", "CONNECT"], [":protocol", "websocket"], [":scheme", "https"], [":path", "/public/ws"], [":authority", "api.allowed.test"], ["sec-websocket-version", "13"]]]},
    # pseudo-header games
    "two_paths": {"streams": [[[":method", "GET"], [":path", "/public/tp"], [":path", "/private"], [":scheme", "https"], [":authority", "api.allowed.test"]]]},
    "two_methods": {"streams": [[[":method", "GET"], [":method", "POST"], [":path", "/public/tm"], [":scheme", "https"], [":authority", "api.allowed.test"]]]},
    "pseudo_late": {"streams": [[[":method", "GET"], [":scheme", "https"], [":authority", "api.allowed.test"], ["x-a", "1"], [":path", "/private"]]]},
    "two_authorities": {"streams": [[[":method", "GET"], [":path", "/public/ta"], [":scheme", "https"], [":authority", "api.allowed.test"], [":authority", "evil.test"]]]},
    "upper_name": {"streams": [req("GET", "/public/un", "api.allowed.test", ("X-Upper", "1"))]},
    "space_name": {"streams": [req("GET", "/public/sn", "api.allowed.test", ("x a", "1"))]},
    "upper_host": {"streams": [req("GET", "/public/uh", "api.allowed.test", ("Host", "evil.test"))]},
    "http_scheme": {"streams": [req(path="/public/hs", scheme="http")]},
    # methods
    "lower_get": {"streams": [req(method="get", path="/public/lg")]},
    "trailing_space": {"streams": [req(method="GET ", path="/public/ts")]},
    "unknown": {"streams": [req(method="FOO", path="/public/um")]},
    "head": {"streams": [req(method="HEAD", path="/public/hd")]},
    "override": {"streams": [req("GET", "/public/ov", "api.allowed.test", ("x-http-method-override", "DELETE"))]},
    # the control: a well-formed request still goes through
    "ok": {"streams": [req(path="/public/ok")]},
}  # fmt: skip


# TLS to api.allowed.test with the ALPN offers given ("-": none) and the TLS version
# ("1.2" or "any"), the payload as is; prints the status codes of every answer, then
# the ALPN chosen ("closed" if no answer).
TLS_PROBE = """
import re, socket, ssl, sys
alpn, version, payload = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
data, chosen = b"", None
try:
    context = ssl.create_default_context()
    if alpn != "-":
        context.set_alpn_protocols(alpn.split(","))
    if version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    s = context.wrap_socket(socket.create_connection(("api.allowed.test", 443), timeout=5), server_hostname="api.allowed.test")
    chosen = s.selected_alpn_protocol()
    s.sendall(payload)
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError:
    pass
codes = re.findall(rb"HTTP/1\\.[01] (\\d\\d\\d) ", data)
print(" ".join(c.decode() for c in codes) or "closed", chosen)
"""


def tls_probe(payload: bytes, alpn: str = "http/1.1", version: str = "any") -> str:
    return python(TLS_PROBE, alpn, version, payload.hex())


def get(target: bytes, *fields: bytes, method: bytes = b"GET") -> bytes:
    line = method + b" " + target + b" HTTP/1.1\r\nHost: api.allowed.test\r\n"
    return line + b"".join(fields) + b"Connection: close\r\n\r\n"


HTTP1 = {
    "lower_get": tls_probe(get(b"/public/lg", method=b"get")),
    "mixed_get": tls_probe(get(b"/public/mg", method=b"Get")),
    "double_space": tls_probe(b"GET  /public/ds HTTP/1.1\r\nHost: api.allowed.test\r\nConnection: close\r\n\r\n"),
    "trailing_space": tls_probe(b"GET /public/ts  HTTP/1.1\r\nHost: api.allowed.test\r\nConnection: close\r\n\r\n"),
    "unknown": tls_probe(get(b"/public/um", method=b"FOO")),
    "head": tls_probe(get(b"/public/hd", method=b"HEAD")),
    "override": tls_probe(get(b"/public/ov", b"X-HTTP-Method-Override: DELETE\r\n")),
    "expect_denied": tls_probe(b"POST /private/ex HTTP/1.1\r\nHost: api.allowed.test\r\nExpect: 100-continue\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret"),
    "expect_denied_path": tls_probe(b"GET /private/ex2 HTTP/1.1\r\nHost: api.allowed.test\r\nExpect: 100-continue\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecret"),
    "hello_inside": tls_probe(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00" + get(b"/private/hi")),
    "star": tls_probe(get(b"*", method=b"OPTIONS")),
    # ALPN: h2 offered, HTTP/1 spoken; only unknown protocols; none; TLS 1.2
    "h2_then_http1": tls_probe(get(b"/private/a1"), alpn="h2"),
    "unknown_alpn": tls_probe(get(b"/private/a2"), alpn="foo,bar"),
    "unknown_alpn_ok": tls_probe(get(b"/public/a3"), alpn="foo"),
    "no_alpn": tls_probe(get(b"/private/a4"), alpn="-"),
    "tls12": tls_probe(get(b"/private/a5"), version="1.2"),
    "tls12_ok": tls_probe(get(b"/public/a6"), version="1.2"),
}  # fmt: skip


def test_http1_probes(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(GET_ONLY)
    r = sandbox.run(net, tmp_path, HTTP1, rules=rules)
    print(json.dumps({k: r[k].out.strip() for k in HTTP1}, indent=1))
    seen = settled_requests(net)
    print([(e["method"], e["uri"], e["host"], e["protocol"], e["status"]) for e in seen])
    print(r.describe())
    assert False


def test_http2_streams_are_each_held_to_the_rules(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(GET_ONLY)
    r = sandbox.run(net, tmp_path, {"h2": h2_probes(H2)}, rules=rules, setup=copy_h2)
    got = lines(r["h2"])
    print(json.dumps(got, indent=1))
    seen = settled_requests(net)
    print([(e["method"], e["uri"], e["host"], e["protocol"]) for e in seen])
    print(r.describe())
    assert False
