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

import time
from urllib.parse import urlsplit

import pytest
from support import sandbox
from support.sandbox import curl, dig, python, udp_send

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test, www.allowed.test, ssh.allowed.test
API_IP = "203.0.113.11"  # api.allowed.test
EVIL_IP = "203.0.113.66"

# A ClientHello as a client's TLS library writes it (Python's ssl, SNI argv[1]),
# changed as argv[4] says, sent to argv[2]:argv[3] after resolving the SNI through
# the gateway (which binds the name to its address; argv[2] "dns": to that address).
# Prints "server spoke" if a TLS record came back (the hello reached a server), else
# "closed".
# - ech: with an encrypted_client_hello extension (0xfe0d) added, as a client
#   that has an ECH config for another name behind the same server would send it;
# - bytes: the hello one byte a TCP segment.
TLS_HELLO = """
import socket, ssl, sys, time
sni, ip, port, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    resolved = socket.gethostbyname(sni.rstrip(".").lower())
except OSError:
    resolved = None
if ip == "dns":  # the address the gateway answered (under an ask: a placeholder)
    ip = resolved
context = ssl.create_default_context()
if not sni:
    context.check_hostname, sni = False, None
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
if how == "early":
    hello += b"\\x17\\x03\\x03\\x00\\x26GET / HTTP/1.1\\r\\nHost: ssh.allowed.test\\r\\n\\r\\n"
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


@pytest.mark.parametrize("fallback", ["ask", "audit"])
def test_a_fallback_that_asks_or_audits_refuses_encrypted_client_hello_too(net, tmp_path, fallback):
    """A fallback answers for the name the hello shows: the approver is shown it, the
    audit log records it, and a deny rule for the hidden name would never be seen. It
    passed such a hello through as an allow by address did (after an approval, or
    under audit at once); it is refused before anyone is asked, and the server gets
    nothing."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\nprofiles:\n  default:\n    fallback: {fallback}\n"
        "    approval: {hold: 20s}\n    rules:\n      - deny: evil.test\n"
    )
    with sandbox.sink(net, ALLOWED_IP, 8443, tmp_path / "sink.log") as seen:
        r = sandbox.run(
            net, tmp_path, {"ech": tls_hello("allowed.test", "dns", 8443, "ech")}, rules=rules
        )
        connections = seen()
    assert r["ech"].out.strip() == "closed", r.describe()
    assert r["ech"].ms < 10_000, r.describe()  # refused, not held for an approver
    assert connections == [], connections
    assert r.verdicts(kind="connection", protocol="tls") == {
        ("deny", "protocol_not_allowed", "builtin:encrypted-client-hello")
    }, r.describe()
    assert not r.events(kind="approval"), r.describe()


# --- plain HTTP/1 on the front door's lean path -----------------------------------------

# Sends argv[3] (hex) to argv[1]:argv[2] as one write (argv[4] seconds later, the
# rest after a "|" in it: a body after an Expect), after resolving the names in
# argv[5] (comma-separated) through the gateway; prints each status line received
# until the server closes or is quiet for a second.
EXCHANGE = """
import socket, sys, time
host, port, payload, wait = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
for name in filter(None, sys.argv[5].split(",")):
    socket.gethostbyname(name)
first, _, later = payload.partition(b"|LATER|")
data = b""
try:
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(first)
        if later:
            time.sleep(wait)
            s.sendall(later)
        while chunk := s.recv(65536):
            data += chunk
except OSError:
    pass
lines = [l for l in data.split(b"\\n") if l.startswith(b"HTTP/1.")]
print(" ".join(l.split()[1].decode() for l in lines) or "closed")
"""


def exchange(
    payload: bytes,
    resolve: str = "allowed.test",
    host: str = ALLOWED_IP,
    port: int = 80,
    wait: float = 0.3,
) -> str:
    return python(EXCHANGE, host, str(port), payload.hex(), str(wait), resolve)


def get(target: str, *fields: str, version: str = "1.1", method: str = "GET") -> bytes:
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f + "\r\n" for f in fields)
    return head.encode() + b"\r\n"


H = "Host: allowed.test"
CLOSE = "Connection: close"


def statuses(step) -> str:
    return step.out.strip()


def test_plain_http_reaches_only_the_requests_that_were_decided(net, tmp_path):
    """Authority tricks, CONNECT and `*` targets, the HTTP/2 preface, pipelining and
    smuggling shapes (a request in a body, in a chunk, behind h11 0.14's lax chunk
    CRLF), Expect: each request is decided alone, and nginx gets exactly the
    allowed ones, never the one hidden behind them."""
    smuggled = get("/smuggled", "Host: evil.test")
    chunked = ("Transfer-Encoding: chunked",)
    r = sandbox.run(net, tmp_path, {
        "host_userinfo": exchange(get("/userinfo", "Host: evil.test@allowed.test", CLOSE)),
        "host_percent": exchange(get("/percent", "Host: allowed%2etest", CLOSE)),
        "host_unicode": exchange(get("/unicode", "Host: \u0430llowed.test", CLOSE)),
        "host_upper_dot": exchange(get("/upper", "Host: ALLOWED.TEST.", CLOSE)),
        "abs_userinfo": exchange(get("http://allowed.test@evil.test/abs1", H, CLOSE)),
        "abs_other": exchange(get("http://evil.test/abs2", "Host: evil.test", CLOSE)),
        "connect_evil": exchange(get("evil.test:443", "Host: evil.test:443", method="CONNECT")),
        "connect_self": exchange(get("allowed.test:80", H, method="CONNECT") + smuggled),
        "options_star": exchange(get("*", H, CLOSE, method="OPTIONS")),
        "h2_preface": exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")),
        "pipelined_port": exchange(get("/p1", H) + get("/p2", "Host: ssh.allowed.test", CLOSE), resolve="allowed.test,ssh.allowed.test"),
        "pipelined_evil": exchange(get("/p3", H) + get("/p4", "Host: evil.test", CLOSE)),
        "body_holds_request": exchange(get("/s1", H, f"Content-Length: {len(smuggled)}", method="POST") + smuggled + get("/s1b", H, CLOSE)),
        "te_and_cl": exchange(get("/s2", H, *chunked, "Content-Length: 5", method="POST") + b"0\r\n\r\n" + smuggled),
        "te_list": exchange(get("/s3", H, "Transfer-Encoding: chunked, identity", method="POST") + b"0\r\n\r\n" + smuggled),
        "te_space": exchange(get("/s4", H, "Transfer-Encoding : chunked", method="POST") + b"0\r\n\r\n" + smuggled),
        "te_xchunked": exchange(get("/s5", H, "Transfer-Encoding: xchunked", method="POST") + b"0\r\n\r\n" + smuggled),
        "chunk_ext": exchange(get("/s6", H, *chunked, method="POST") + b'5;x="GET /e HTTP/1.1"\r\nhello\r\n0\r\n\r\n' + smuggled),
        "chunk_bad_crlf": exchange(get("/s7", H, *chunked, method="POST") + b"5\r\nhelloXX0\r\n\r\n" + smuggled),
        "chunk_huge": exchange(get("/s8", H, *chunked, method="POST") + b"10000000000000005\r\nhello\r\n0\r\n\r\n" + smuggled),
        "expect_denied": exchange(get("/e1", "Host: ssh.allowed.test", "Expect: 100-continue", "Content-Length: 5", method="POST") + b"|LATER|hello", resolve="allowed.test,ssh.allowed.test"),
        "http10_no_host": exchange(get("/h10", version="1.0")),
        "space_before_colon": exchange(get("/sp", H, "Host : evil.test", CLOSE)),
        "bare_lf": exchange(b"GET /lf HTTP/1.1\nHost: allowed.test\nConnection: close\n\n"),
        "ok": exchange(get("/ok", H, CLOSE)),
    })  # fmt: skip

    expected = {
        "host_userinfo": "403", "host_percent": "403", "host_unicode": "403",
        "host_upper_dot": "200", "abs_userinfo": "403", "abs_other": "403",
        "connect_evil": "400", "connect_self": "400", "options_star": "400",
        "h2_preface": "403", "pipelined_port": "200 403", "pipelined_evil": "200 403",
        "body_holds_request": "200 200", "te_and_cl": "400", "te_list": "400",
        "te_space": "400", "te_xchunked": "400", "chunk_ext": "200 403",
        "chunk_bad_crlf": "200 403", "chunk_huge": "200", "expect_denied": "403",
        "http10_no_host": "403", "space_before_colon": "400", "bare_lf": "200", "ok": "200",
    }  # fmt: skip
    assert {label: statuses(r[label]) for label in expected} == expected, r.describe()
    # What nginx served: the allowed requests, each once, never a hidden one.
    seen = sorted((e["host"], e["method"], e["uri"]) for e in settled_requests(net))
    assert seen == sorted(
        [("allowed.test", "GET", uri) for uri in ("/upper", "/p1", "/p3", "/s1b", "/lf", "/ok")]
        + [("allowed.test", "POST", uri) for uri in ("/s1", "/s6", "/s7", "/s8")]
    ), seen
    assert net.requests_seen(EVIL_IP) == []
    # Why each was refused, in the audit log.
    # (an absolute-form target is recorded whole: its path is what is compared)
    denied = {
        (urlsplit(e["path"]).path or e["path"], e["reason"])
        for e in r.events(kind="request", verdict="deny")
    }
    assert {
        ("/userinfo", "invalid_name"),
        ("/percent", "invalid_name"),
        ("/unicode", "invalid_name"),
        ("/abs1", "host_mismatch"),
        ("/abs2", "no_rule"),
        ("/p2", "port_not_allowed"),
        ("/p4", "no_rule"),
        ("/smuggled", "no_rule"),
        ("/e1", "port_not_allowed"),
        ("/h10", "host_mismatch"),
    } <= denied, sorted(denied, key=str)
    reasons = {e["reason"] for e in r.events(kind="request", verdict="deny")}
    assert {"ambiguous_path", "malformed_request"} <= reasons, r.describe()
    assert r.verdicts(kind="request", verdict="allow") == {("allow", "rule_allow", "demo-allowed")}


def settled_requests(net) -> list[dict]:
    """What nginx logged, once a late log line had a moment to arrive."""
    time.sleep(0.3)
    return net.requests_seen()


SOCKET_OF = """
import socket, sys
try:
    socket.socket(*map(int, sys.argv[1:]))
    print("opened")
except OSError as e:
    print("refused", e.errno)
"""


def test_tls_dns_and_address_tricks_reach_nothing_they_should_not(net, tmp_path):
    """TLS names against addresses, hellos in pieces, with early data or in SSLv2
    form; DNS types, spellings and transports for a denied name; DoT and DoH to
    addresses; IP literals in every spelling; protocols other than TCP and UDP."""
    r = sandbox.run(net, tmp_path, {
        "sni_evil_at_allowed": tls_hello("evil.test", ALLOWED_IP, 443),
        "sni_port": tls_hello("ssh.allowed.test", ALLOWED_IP, 443),
        "sni_upper_dot": tls_hello("ALLOWED.TEST.", ALLOWED_IP, 443),
        "sni_allowed_at_evil": tls_hello("allowed.test", EVIL_IP, 443),
        "no_sni": tls_hello("", ALLOWED_IP, 443),
        "bytes_denied": tls_hello("ssh.allowed.test", ALLOWED_IP, 443, "bytes"),
        "bytes_ok": tls_hello("allowed.test", ALLOWED_IP, 443, "bytes"),
        "early_data": tls_hello("ssh.allowed.test", ALLOWED_IP, 443, "early"),
        "sslv2": exchange(bytes.fromhex("802e0100020015000000100300800700c0030080060040020080040080") + bytes(16), port=443),
        "dot": tls_hello("allowed.test", ALLOWED_IP, 853),
        "doh_ip": curl("-k", f"https://{EVIL_IP}/dns-query?dns=AAAB"),
        "dns_txt": dig("TXT", "evil.test"),
        "dns_any": dig("ANY", "evil.test"),
        "dns_srv": dig("SRV", "_x._tcp.evil.test"),
        "dns_ptr": dig("-x", EVIL_IP),
        "dns_0x20": dig("eViL.TeSt"),
        "dns_tcp": dig("+tcp", "evil.test"),
        "dns_long": dig(".".join(["a" * 63] * 3) + ".evil.test"),
        "dns_edns": dig("+nsid", "+subnet=203.0.113.0/24", "+cookie", "evil.test"),
        "hex_ip": curl("http://0xcb007142/"),
        "decimal_ip": curl("http://3405803842/"),
        "octal_ip": curl("http://0313.0.0161.0102/"),
        "mapped_v6": curl("-g", "http://[::ffff:203.0.113.66]/"),
        "zero": curl("http://0.0.0.0/"),
        "loopback": curl("http://127.0.0.2/"),
        "multicast": udp_send("224.0.0.1", 9999),
        "sctp": python(SOCKET_OF, "2", "1", "132"),
        "dccp": python(SOCKET_OF, "2", "6", "33"),
        "raw_tcp": python(SOCKET_OF, "2", "3", "6"),
        "packet": python(SOCKET_OF, "17", "3", "0"),
    })  # fmt: skip

    spoke = {label for label, step in r.steps.items() if step.out.strip() == "server spoke"}
    assert spoke == {"bytes_ok"}, r.describe()
    for label in (
        "sni_upper_dot",  # passed through as sent: an SNI router reads it as written
        "sni_evil_at_allowed",
        "sni_port",
        "sni_allowed_at_evil",
        "no_sni",
        "bytes_denied",
        "early_data",
        "dot",
    ):
        assert r[label].out.strip() == "closed", (label, r.describe())
    assert statuses(r["sslv2"]) == "closed" and r["doh_ip"].rc == 35, r.describe()

    def tls(name, ip, port=443):
        return r.verdicts(kind="connection", name=name, dst_ip=ip, dst_port=port)

    assert tls("evil.test", ALLOWED_IP) == {("deny", "no_rule", "default:fallback")}
    assert tls("ssh.allowed.test", ALLOWED_IP) == {("deny", "port_not_allowed", "default:fallback")}
    assert tls("allowed.test", ALLOWED_IP, 853) == {
        ("deny", "port_not_allowed", "default:fallback")
    }
    assert tls("allowed.test", EVIL_IP) == {
        ("deny", "spoofed_destination", "builtin:spoofed-destination")
    }
    assert tls(None, ALLOWED_IP) == {
        ("deny", "missing_sni", "builtin:missing-sni"),
        ("deny", "not_http", "builtin:not-http"),  # the SSLv2 hello
    }
    assert tls(None, EVIL_IP) == {("deny", "missing_sni", "builtin:missing-sni")}
    assert tls("allowed.test", ALLOWED_IP) == {
        ("allow", "rule_allow", "demo-allowed"),
        ("deny", "invalid_name", "builtin:malformed-tls"),  # ALLOWED.TEST.
    }

    for label in ("dns_txt", "dns_any", "dns_srv", "dns_ptr"):
        assert r[label].dns_status == "REFUSED", (label, r.describe())
    for label in ("dns_0x20", "dns_tcp", "dns_long", "dns_edns"):
        assert r[label].dns_status == "NXDOMAIN", (label, r.describe())
    asked = net.dns_queries_seen()
    assert not [q for q in asked if "evil" in q or q.endswith(".arpa")], asked

    for label in ("hex_ip", "decimal_ip", "octal_ip", "mapped_v6"):
        assert r[label].status == 403, (label, r.describe())
    assert r.verdicts(kind="request", dst_ip=EVIL_IP) == {
        ("deny", "no_rule", "default:fallback"),
        ("deny", "host_mismatch", "builtin:host-mismatch"),  # Host [::ffff:203.0.113.66]
    }
    # 0.0.0.0 and 127/8 are the sandbox's own loopback: nothing listens, nothing leaves.
    assert r["zero"].rc == r["loopback"].rc == 7, r.describe()
    assert r["multicast"].out.strip() == "sent", r.describe()
    assert net.udp_datagrams_seen() == 0
    assert r.summary["firewall_drops"].get("dropped_udp", 0) >= 1, r.summary
    for label in ("sctp", "dccp", "raw_tcp", "packet"):
        assert r[label].out.startswith("refused"), (label, r.describe())
    assert settled_requests(net) == []


# Fifty connections that hold the gateway without ever being decided, for 3 s: 20
# slowloris request heads (a byte every 100 ms), 10 ClientHellos cut by a RST, 10
# half ClientHellos then a FIN (half-open), 10 that never send a byte.
HOG = """
import socket, struct, time
socket.gethostbyname("allowed.test")
half_hello = bytes.fromhex("160301020001") + bytes(100)
held = []
def connect(port):
    s = socket.create_connection(("203.0.113.10", port), timeout=2)
    held.append(s)
    return s
slow = [connect(80) for _ in range(20)]
for s in slow:
    s.sendall(b"GET /slowloris HTTP/1.1\\r\\nHost: allowed.test\\r\\nX-Slow: ")
for _ in range(10):
    s = connect(443)
    s.sendall(half_hello)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
for _ in range(10):
    connect(443).sendall(half_hello)
    held[-1].shutdown(socket.SHUT_WR)
for _ in range(10):
    connect(443)
print("holding", flush=True)
for _ in range(30):
    for s in slow:
        s.send(b"a")
    time.sleep(0.1)
"""


def test_connections_that_never_decide_do_not_delay_an_allowed_one(net, tmp_path):
    schemes = ["https", "http"] * 3
    gets = {
        f"get{i}": curl(f"{scheme}://allowed.test/after{i}") for i, scheme in enumerate(schemes)
    }
    r = sandbox.run(net, tmp_path, {
        "hog": f"( {python(HOG)} >hog.log 2>&1 & ) ; sleep 0.5; cat hog.log",
        **gets,
        "wait": "sleep 3",
    })  # fmt: skip

    assert r["hog"].out.strip() == "holding", r.describe()
    for label in gets:
        assert r[label].status == 200 and r[label].ms < 1000, (label, r.describe())
    seen = {e["uri"] for e in settled_requests(net)}
    assert seen == {f"/after{i}" for i in range(6)}, seen  # and no /slowloris
    assert not r.events(reason="sandbox_limit"), r.describe()
