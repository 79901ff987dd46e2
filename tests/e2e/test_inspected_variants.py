"""Hostile clients of inspected TLS (a rule with methods or paths), end to end with
`sandgate run` in the fake internet: HTTP/2 shapes mitmproxy serves (streams with
other :authority values on one connection, :path forms, CONNECT and extended
CONNECT, pseudo-header games, header-name case, rapid reset, CONTINUATION and HPACK
abuse), method spellings and ALPN/TLS-version games on the front door's HTTP/1.1,
and upstreams the gateway must not trust (another name, expired, self-signed,
signed by the gateway's own CA). Every probe checks what the client got,
and nginx's access log (or the probe server's own log) proves that only the
requests the rules allow reached a server.

Not repeated here: the Host/SNI/absolute-form/pipelining differential
(test_inspected_differential.py), control bytes and ambiguous paths
(test_http_hardening.py)."""

from __future__ import annotations

import datetime
import json
import subprocess

import pytest
from sandgate.enforcer.run import STATE_DIR
from sandgate.proxy.gateway_ca import ca_key_file, ensure_ec_ca
from support import sandbox
from support.sandbox import PYTHON, curl, python
from test_http_hardening import copy_h2, settled_requests

pytestmark = pytest.mark.e2e


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

# HTTP/2 with the h2 package's own checks off. argv[1]: a JSON file of
# {label: {"alpn": [...], "streams": [[[name, value], ...], ...], "raw": hex}} where
# "raw" is written after the preface instead of streams. Prints, one line per label,
# the :status of each stream in order ("-": none; "reset"; "closed": the connection
# ended) or "closed".
H2_PROBE = """
import json, socket, ssl, sys
sys.path.insert(0, "h2lib")
import h2.config, h2.connection, h2.events
probes = json.load(open(sys.argv[1]))
for label, probe in probes.items():
    result = {}
    try:
        context = ssl.create_default_context()
        context.set_alpn_protocols(probe.get("alpn", ["h2"]))
        host, port = probe.get("host", "api.allowed.test"), probe.get("port", 443)
        s = context.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=host)
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False, validate_inbound_headers=False)
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        streams = [1 + 2 * i for i in range(len(probe.get("streams", [])))]
        if "raw" in probe:
            s.settimeout(2)
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


HEADERS, RST_STREAM, CONTINUATION = 0x1, 0x3, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
    return head + payload


def block(method: str, path: str) -> bytes:
    """An HPACK header block of literal fields (no indexing), the request's pseudo-headers."""
    fields = [(":method", method), (":path", path), (":scheme", "https")]
    fields.append((":authority", "api.allowed.test"))
    out = b""
    for name, value in fields:
        out += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return out


def rapid_reset(count: int) -> str:
    """`count` requests for a refused path, each reset at once (CVE-2023-44487's shape)."""
    out = b""
    for stream in range(1, 2 * count, 2):
        out += frame(HEADERS, END_HEADERS, stream, block("GET", "/private/rr"))
        out += frame(RST_STREAM, 0, stream, (8).to_bytes(4, "big"))  # CANCEL
    return out.hex()


def continuation_flood(count: int) -> str:
    """One header block that never ends: `count` CONTINUATIONs of 1 KiB fields each."""
    field = b"\x00\x03x-a\x7f\x81\x07" + b"a" * 1024  # a literal of 1024 bytes
    out = frame(HEADERS, 0, 1, block("GET", "/public/cf"))
    return (out + b"".join(frame(CONTINUATION, 0, 1, field) for _ in range(count))).hex()


# An HPACK dynamic table size update to 2^31 - 1, past the 4096 the server allows.
HUGE_TABLE = frame(
    HEADERS, END_HEADERS | END_STREAM, 1, b"\x3f\xe1\xff\xff\xff\x07" + block("GET", "/public/ht")
).hex()


def with_h2_probes(probes: dict):
    """The workspace setup for H2_PROBE: the h2 package and the probes' file."""

    def setup(workspace) -> None:
        copy_h2(workspace)
        (workspace / "h2-probes.json").write_text(json.dumps(probes))

    return setup


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
    "mixed_get": {"streams": [req(method="Get", path="/public/mg")]},
    "trailing_space": {"streams": [req(method="GET ", path="/public/ts")]},
    "unknown": {"streams": [req(method="FOO", path="/public/um")]},
    "head": {"streams": [req(method="HEAD", path="/public/hd")]},
    "override": {"streams": [req("GET", "/public/ov", "api.allowed.test", ("x-http-method-override", "DELETE"))]},
    # floods: nothing refused reaches the server, and the gateway serves on
    "rapid_reset": {"raw": rapid_reset(500)},
    "continuation_flood": {"raw": continuation_flood(2000)},
    "huge_hpack_table": {"raw": HUGE_TABLE},
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


def test_inspected_http1_methods_alpn_and_tls_versions(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(GET_ONLY)
    r = sandbox.run(net, tmp_path, HTTP1, rules=rules)
    got = {label: r[label].out.strip() for label in HTTP1}

    # `get` and `Get` are not GET (methods are case-sensitive): refused by the
    # gateway, not forwarded for the server to read one way or the other.
    for label in (
        "lower_get",
        "mixed_get",
        "double_space",
        "trailing_space",
        "hello_inside",
        "star",
    ):
        assert got[label] == "400 http/1.1", (label, r.describe())
    for label in ("unknown", "head", "expect_denied", "expect_denied_path", "tls12"):
        assert got[label] == "403 http/1.1", (label, r.describe())
    # An override naming another method is refused: servers that honour it (Flask's
    # method-override pattern) would run a DELETE no rule allowed (test_path_differential).
    assert got["override"] == "400 http/1.1", r.describe()
    assert got["tls12_ok"] == "200 http/1.1", r.describe()
    # ALPN: a client offering only h2 gets h2 from mitmproxy, and HTTP/1 bytes there
    # are no request; unknown protocols only or none: HTTP/1.1, decided alike.
    assert got["h2_then_http1"] == "closed h2", r.describe()
    assert got["unknown_alpn"] == got["no_alpn"] == "403 None", r.describe()
    # Known: mitmproxy offers the upstream the client's ALPN list; nginx refuses `foo`.
    assert got["unknown_alpn_ok"] in ("200 None", "502 None"), r.describe()
    seen = settled_requests(net)
    assert sorted((e["method"], e["uri"]) for e in seen) == [
        ("GET", "/public/a6"),
    ] + ([("GET", "/public/a3")] if got["unknown_alpn_ok"] == "200 None" else []), seen
    assert {e["path"] for e in r.events(kind="request", verdict="allow")} <= {
        "/public/a3",
        "/public/a6",
    }, r.describe()
    assert r.verdicts(kind="request", reason="malformed_request") == {
        ("deny", "malformed_request", "builtin:malformed-request")
    }


def test_http2_streams_are_each_held_to_the_rules(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(GET_ONLY)
    steps = {"h2": python(H2_PROBE, "h2-probes.json")}
    r = sandbox.run(net, tmp_path, steps, rules=rules, setup=with_h2_probes(H2))
    got = lines(r["h2"])

    assert got.pop("ok") == "200", r.describe()
    # Every stream is decided against the SNI: other names on one connection are 403.
    assert got.pop("coalesce") == "200 403 403 403", r.describe()
    # Allowed, and recorded: `:scheme: http` inside TLS goes out as https. An override
    # naming another method is refused (servers may honour it: test_path_differential).
    assert got.pop("http_scheme") == "200", r.describe()
    assert got.pop("override") == "400", r.describe()
    assert got.pop("head") == got.pop("unknown") == "403", r.describe()
    # Everything else is refused (400) or breaks the stream or connection.
    assert all(status in ("400", "closed", "reset") for status in got.values()), got
    assert got["lower_get"] == got["mixed_get"] == "400", r.describe()
    seen = settled_requests(net)
    assert sorted((e["method"], e["uri"], e["host"]) for e in seen) == [
        ("GET", uri, "api.allowed.test") for uri in ("/public/c1", "/public/hs", "/public/ok")
    ], seen
    allowed = r.events(kind="request", verdict="allow")
    assert sorted(e["method"] for e in allowed) == ["GET"] * 3, r.describe()


# --- upstreams the gateway must not trust --------------------------------------------

# A TLS server per port (argv: log, then port:cert:key...) on evil.test's address:
# logs each request's first line, answers 200.
TLS_SERVER = r"""
import socket, ssl, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def serve(port, cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("203.0.113.66", int(port)))
    while True:
        conn, _ = listener.accept()
        try:
            tls = context.wrap_socket(conn, server_side=True)
            data = tls.recv(65536)
            line = data.split(b"\r\n")[0].decode(errors="replace")
            log.write(port + " " + line + "\n")
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            tls.close()
        except (OSError, ssl.SSLError):
            conn.close()
for spec in sys.argv[2:]:
    threading.Thread(target=serve, args=spec.split(":"), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

UPSTREAM_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: evil.test
        ports: [8441, 8442, 8443, 8444, 8445]
        methods: [GET, POST]
        id: probe-upstreams
"""


def certificate(directory, label, name, issuer=None, expired=False):
    """(cert, key) files for `name`, signed by `issuer` (key, cert), else self-signed
    as a CA (the probe's own CA when `label` is "ca")."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    start, end = (
        (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
        if expired
        else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    )
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=label == "ca", path_length=None), critical=True)
    )  # fmt: skip
    cert = builder.sign(signer_key, hashes.SHA256())
    cert_file, key_file = directory / f"{label}.pem", directory / f"{label}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, (key, cert)


def gateway_ca() -> tuple:
    """The gateway's own CA (key, certificate), made as a run would make it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    confdir = STATE_DIR / "ca"
    ensure_ec_ca(confdir)
    pem = ca_key_file(confdir).read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    return key, x509.load_pem_x509_certificate(pem)


def test_an_upstream_the_gateway_cannot_verify_never_gets_the_request(net, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca_cert, _, ca = certificate(certs, "ca", "sandgate probe CA")
    servers = {
        8441: certificate(certs, "other-name", "other.test", ca),
        8442: certificate(certs, "expired", "evil.test", ca, expired=True),
        8443: certificate(certs, "self-signed", "evil.test"),
        8444: certificate(certs, "gateway-ca", "evil.test", gateway_ca()),
        8445: certificate(certs, "good", "evil.test", ca),  # the control
    }
    log = tmp_path / "tls-server.log"
    log.touch()
    argv = ["ip", "netns", "exec", net.internet_ns, PYTHON, "-I", "-S", "-c", TLS_SERVER, log]
    argv += [f"{port}:{cert}:{key}" for port, (cert, key, _) in servers.items()]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        rules = tmp_path / "rules.yaml"
        rules.write_text(UPSTREAM_RULES)
        steps = {}
        for port in servers:
            url = f"https://evil.test:{port}/public/x"
            steps[f"h1_{port}"] = curl("-X", "POST", "-d", "secret=1", url)  # the front door
        h2 = {f"h2_{port}": {"host": "evil.test", "port": port, "streams": [req(path="/public/y", authority=f"evil.test:{port}")]} for port in servers}  # fmt: skip
        steps["h2"] = python(H2_PROBE, "h2-probes.json")  # h2 only: mitmproxy
        r = sandbox.run(
            net, tmp_path, steps, rules=rules, setup=with_h2_probes(h2),
            extra=("--extra-ca", str(ca_cert)),
        )  # fmt: skip
    finally:
        server.kill()
        server.wait()
    got = lines(r["h2"])
    for port in (8441, 8442, 8443, 8444):
        assert r[f"h1_{port}"].status == 502, (port, r.describe())
        assert got[f"h2_{port}"] in ("502", "closed"), (port, got, r.describe())
    assert r["h1_8445"].status == 200 and got["h2_8445"] == "200", (got, r.describe())
    # Only the server the gateway could verify got a request.
    assert sorted(log.read_text().splitlines()) == [
        "8445 GET /public/y HTTP/1.1",
        "8445 POST /public/x HTTP/1.1",
    ]
