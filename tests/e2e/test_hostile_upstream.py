"""Hostile upstreams against the gateway (h-pupstream): a task points the gateway at
an allowed server it controls, or the admin's resolver misbehaves. None of them may
crash or stall the gateway, make it print a traceback, bind a name to an address
nobody resolved it to, or turn a connection into one the gateway stops deciding.

Each test proves the effect did not happen: the hostile server's own log shows what
it got (never the refused request), and the audit log says what was decided.
Variants covered elsewhere are listed in the h-pupstream report (oversized DNS answers
and 64 KiB TCP answers: test_gateway_bounds.py; two responses to one request:
test_plain_http_path.py; an endless response head: test_gateway_bounds.py; an upstream
the gateway cannot verify: test_inspected_frontdoor.py).
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import curl, dig, eventually, python
from support.servers import resolver_server, script_server

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"
EVIL_IP = "203.0.113.66"


def assert_no_traceback(r) -> None:
    assert "Traceback" not in r.stderr, r.describe()


# --- a hostile resolver ---------------------------------------------------------------

# A resolver in the fake internet, raw bytes (the sandbox's python has no dnspython).
# By question name:
#   poison.test  first a reply with another id, then one with the right id but another
#                question (both offering victim.test -> EVIL_IP), then the right reply
#                with an extra answer record and an ADDITIONAL record for victim.test
#                -> EVIL_IP (cache poisoning of another allowed name);
#   chain.test   chain.test CNAME victim.test, victim.test CNAME evil.host, evil.host A
#                EVIL_IP: the chain names another allowed name as an alias;
#   loop.test    an answer whose owner is a compression pointer to itself;
#   slow.test    never answered (the upstream timeout) while fast.test is;
#   anything else: A ALLOWED_IP.
# Logs "NAME" for every query it gets.
HOSTILE_RESOLVER = r"""

def wire(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"

def a(owner, address):
    return owner + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)

def cname(owner, target):
    data = wire(target)
    return owner + struct.pack("!HHIH", 5, 1, 60, len(data)) + data

def reply(qid, question, answers, additional=(), flags=0x8180):
    head = struct.pack("!HHHHHH", qid, flags, 1, len(answers), 0, len(additional))
    return head + question + b"".join(answers) + b"".join(additional)

def serve(u):
    while True:
        q, peer = u.recvfrom(4096)
        name, end = name_of(q)
        log.write(name + "\n")
        qid, question = int.from_bytes(q[:2], "big"), q[12:end]
        if name == "slow.test":
            continue
        if name == "poison.test":
            evil = [a(b"\xc0\x0c", "203.0.113.66")]
            u.sendto(reply(qid ^ 0x5555, question, evil), peer)
            other = wire("victim.test") + b"\0\x01\0\x01"
            u.sendto(reply(qid, other, evil), peer)
            answers = [a(b"\xc0\x0c", "203.0.113.10"), a(wire("victim.test"), "203.0.113.66")]
            u.sendto(reply(qid, question, answers, [a(wire("victim.test"), "203.0.113.66")]), peer)
        elif name == "chain.test":
            answers = [cname(b"\xc0\x0c", "victim.test"), cname(wire("victim.test"), "evil.host"),
                       a(wire("evil.host"), "203.0.113.66")]
            u.sendto(reply(qid, question, answers), peer)
        elif name == "loop.test":
            at = 12 + len(question)
            looped = struct.pack("!H", 0xC000 | at) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(4)
            u.sendto(reply(qid, question, [looped]), peer)
        else:
            u.sendto(reply(qid, question, [a(b"\xc0\x0c", "203.0.113.10")]), peer)

u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 53))
threading.Thread(target=serve, args=(u,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""
HOSTILE_RESOLVER_IP = "203.0.113.154"

# Two queries at once: slow.test (never answered) first, then fast.test; prints how
# long fast.test's answer took, in ms, and its rcode.
SLOW_AND_FAST = """
import re, socket, struct, time
server = re.search(r"nameserver\\s+(\\S+)", open("/etc/resolv.conf").read()).group(1)
def query(qid, name):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0\\0\\1\\0\\1"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(query(1, "slow.test"), (server, 53))
started = time.monotonic()
s.sendto(query(2, "fast.test"), (server, 53))
while True:
    data = s.recv(4096)
    if data[:2] == b"\\0\\2":
        break
print(int((time.monotonic() - started) * 1000), data[3] & 0x0F)
"""


@pytest.fixture
def hostile_resolver(net, tmp_path):
    """HOSTILE_RESOLVER on an address of its own in the fake internet; yields its log."""
    with resolver_server(net, HOSTILE_RESOLVER, HOSTILE_RESOLVER_IP, tmp_path / "r.log") as lines:
        yield lines


def test_a_hostile_resolver_binds_no_other_name_and_stalls_no_other_query(
    net, tmp_path, hostile_resolver
):
    """Forged replies (another id, another question), extra answer and additional
    records for another allowed name, a chain through it, a pointer loop and a name
    never answered: the sandbox gets only the chain of its question, no name is bound
    to the address the forgeries offered, and one silent name stalls no other."""
    names = ("poison.test", "victim.test", "chain.test", "loop.test", "slow.test", "fast.test")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        + "".join(f"      - allow: {name}\n        id: {name.split('.')[0]}\n" for name in names)
    )
    r = sandbox.run(net, tmp_path, {
        "poison": dig("poison.test"),
        # victim.test was never asked for: no binding, whatever the forgeries said
        "victim_forged": curl("--resolve", f"victim.test:80:{EVIL_IP}", "http://victim.test/forged"),
        "chain": dig("chain.test"),
        "chain_direct": curl("--resolve", f"chain.test:80:{EVIL_IP}", "http://chain.test/"),
        "loop": dig("loop.test"),
        "slow_and_fast": python(SLOW_AND_FAST),
    }, rules=rules, dns_upstream=HOSTILE_RESOLVER_IP)  # fmt: skip
    assert_no_traceback(r)

    # only the question's own record; the forged replies were not taken
    assert r["poison"].dns_answers == [ALLOWED_IP], r.describe()
    (poison,) = r.events(kind="dns", name="poison.test")
    assert poison["verdict"] == "allow" and EVIL_IP not in poison["detail"], poison
    # victim.test was bound to nothing: the request was refused, the server got nothing
    forged = r.events(kind="request", name="victim.test") + r.events(
        kind="connect", name="victim.test"
    )
    assert forged and all(e["verdict"] == "deny" for e in forged), r.describe()
    assert r["victim_forged"].status != 200, r.describe()
    # a chain: the client gets it (its question's), the question's name is bound
    assert r["chain"].dns_answers == ["victim.test.", "evil.host.", EVIL_IP], r.describe()
    assert r["chain_direct"].status == 200, r.describe()
    # a pointer loop is an unparsable answer: SERVFAIL and an event, not a traceback
    assert r["loop"].dns_status == "SERVFAIL", r.describe()
    (loop,) = r.events(kind="dns", name="loop.test")
    assert (loop["verdict"], loop["reason"]) == ("deny", "dns_upstream_failure"), loop
    # the silent name did not hold up the other one
    ms, rcode = map(int, r["slow_and_fast"].out.split())
    assert rcode == 0 and ms < 1000, r.describe()
    seen = hostile_resolver()
    assert "slow.test" in seen and "fast.test" in seen, seen
    assert not [e for e in net.requests_seen(EVIL_IP) if e["host"] == "victim.test"], (
        net.requests_seen(EVIL_IP)
    )


# --- a hostile HTTP server -------------------------------------------------------------

# Answers by path, logs every request line it reads, on any connection:
#   /switch  101 Switching Protocols (no upgrade was asked for), then reads on: what
#            the client sends next would be a raw tunnel's bytes;
#   /flood   2,000 interim responses (103 Early Hints), then 200 "flooded";
#   else     200 with the path.
HOSTILE_HTTP = r"""
import socket, sys, threading
ip, port, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((ip, port)); listener.listen(16)

def serve(c):
    data = b""
    try:
        while True:
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, data = data.split(b"\r\n\r\n", 1)
            line = head.split(b"\r\n")[0].decode(errors="replace")
            log.write(line + "\n")
            path = line.split(" ")[1] if " " in line else ""
            if path == "/switch":
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: upgrade\r\n\r\n")
                while chunk := c.recv(65536):  # the "tunnel": log what comes through it
                    for l in chunk.split(b"\r\n"):
                        if l.startswith((b"GET", b"POST")):
                            log.write("tunnel " + l.decode(errors="replace") + "\n")
                return
            if path == "/flood":
                c.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 2000)
                body = b"flooded"
            else:
                body = path.encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()

print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""
HOSTILE_HTTP_PORT = 8084

# On one connection: GET /switch, read the answer (or the close), then GET /denied;
# prints the first answer's status line and what came after the second ("closed").
SWITCH_THEN_DENIED = """
import socket, sys, time
s = socket.create_connection(("evil.test", int(sys.argv[1])), timeout=5)
s.sendall(b"GET /switch HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n")
try:
    first = s.recv(4096)
except OSError:
    first = b""
print(first.split(b"\\r\\n")[0].decode(errors="replace") or "closed")
time.sleep(0.3)
rest = b""
try:
    s.sendall(b"GET /denied HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n")
    while chunk := s.recv(4096):
        rest += chunk
except OSError:
    pass
print(rest.split(b"\\r\\n")[0].decode(errors="replace") or "closed")
"""


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("frontdoor", id="lean-path"),
        # a websocket rule (for another name) sends the profile's plain HTTP to mitmproxy
        pytest.param("mitmproxy", id="mitmproxy"),
    ],
)
def test_an_unasked_101_and_a_1xx_flood_leave_every_request_decided(net, tmp_path, engine):
    """A server that switches protocols nobody asked to switch: the exchange is cut, so
    the client's next request never rides an undecided tunnel to the server; a server
    that sends 2,000 interim responses first: the final one still arrives."""
    log = tmp_path / "hostile_http.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    websocket = (
        "      - allow: allowed.test\n        websocket: true\n" if engine == "mitmproxy" else ""
    )
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        f"      - allow: evil.test\n        ports: [{HOSTILE_HTTP_PORT}]\n"
        "        paths: ['/switch', '/flood', '/fine']\n        id: hostile\n" + websocket
    )
    base = f"http://evil.test:{HOSTILE_HTTP_PORT}"
    with script_server(net, HOSTILE_HTTP, EVIL_IP, str(HOSTILE_HTTP_PORT), str(log)):
        r = sandbox.run(net, tmp_path, {
            "switch": python(SWITCH_THEN_DENIED, str(HOSTILE_HTTP_PORT)),
            "flood": curl(f"{base}/flood"),
            "after": curl(f"{base}/fine"),
        }, rules=rules)  # fmt: skip
        seen = eventually(
            lambda: (lines := log.read_text().splitlines()) and len(lines) >= 3 and lines
        )
    assert_no_traceback(r)

    # the switch was never passed on, and /denied never reached the server: not as a
    # request, not as bytes through a tunnel
    first, second = r["switch"].out.splitlines()
    assert "101" not in first and "101" not in second, r.describe()
    assert not [line for line in log.read_text().splitlines() if "/denied" in line], seen
    assert second == "closed", r.describe()
    # the switch is named as such in its own event, on either engine (the front door
    # called it an unparsable response, with no event of its own, before)
    switched = r.events(kind="request", path="/switch")
    assert [(e["verdict"], e["reason"]) for e in switched] == [
        ("allow", "rule_allow"),
        ("deny", "protocol_not_allowed"),
    ], r.describe()
    denied = r.events(kind="request", path="/denied")
    assert all(e["verdict"] == "deny" for e in denied), r.describe()
    # the interim flood: the final response came through, and the gateway went on
    assert r["flood"].out.split() == ["flooded", "200"], r.describe()
    assert r["after"].out.split() == ["/fine", "200"], r.describe()
    assert "GET /flood HTTP/1.1" in seen and "GET /fine HTTP/1.1" in seen, seen


# --- hostile TLS servers on the inspected path ------------------------------------------

# A TLS server with the fake internet's certificate (valid for evil.test) that
#   on port 9443 speaks only TLS 1.0;
#   on port 9444 reads the ClientHello and resets the connection.
# Logs "PORT what" for each connection.
HOSTILE_TLS = r"""
import socket, ssl, struct, sys, threading
ip, cert, key, log = sys.argv[1], sys.argv[2], sys.argv[3], open(sys.argv[4], "a", buffering=1)

def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); s.listen(8)
    return s

def old_tls(c):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    except (ValueError, ssl.SSLError):
        pass
    context.load_cert_chain(cert, key)
    try:
        t = context.wrap_socket(c, server_side=True)
        log.write("9443 handshake-done " + (t.recv(4096).split(b"\r\n")[0].decode() or "-") + "\n")
    except (OSError, ssl.SSLError) as e:
        log.write("9443 handshake-failed\n")
    c.close()

def reset(c):
    c.recv(16384)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    log.write("9444 reset\n")
    c.close()

def accept(listener, serve):
    while True:
        threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()

for port, serve in ((9443, old_tls), (9444, reset)):
    threading.Thread(target=accept, args=(listen(port), serve), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def test_an_upstream_tls_that_fails_is_a_502_and_an_event_never_the_request(net, tmp_path):
    """Inspected TLS to an upstream that speaks only TLS 1.0, or resets during the
    handshake: the client gets a 502 naming the failure, the connection's events say
    so, the gateway prints no traceback, and the request never reached the server."""
    log = tmp_path / "hostile_tls.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: evil.test\n        ports: [9443, 9444]\n        paths: ['/**']\n"
        "        id: hostile-tls\n"
        "      - allow: allowed.test\n        paths: ['/**']\n        id: fine\n"
    )
    workdir = net.workdir
    with script_server(
        net,
        HOSTILE_TLS,
        EVIL_IP,
        str(workdir / "server.pem"),
        str(workdir / "server.key"),
        str(log),
    ):
        r = sandbox.run(net, tmp_path, {
            "old": curl("https://evil.test:9443/old"),
            "reset": curl("https://evil.test:9444/reset"),
            "fine": curl("-o", "/dev/null", "https://allowed.test/"),
        }, rules=rules)  # fmt: skip
        seen = eventually(
            lambda: (lines := log.read_text().splitlines()) and len(lines) >= 2 and lines
        )
    assert_no_traceback(r)

    for step in ("old", "reset"):
        assert r[step].status == 502, r.describe()
        assert "sandgate" in r[step].body, r.describe()
    # the upstream never completed a handshake, so it never got the request
    assert not [line for line in seen if "handshake-done" in line], seen
    assert "9444 reset" in seen, seen
    # each connection's end says what went wrong with the upstream
    for port in (9443, 9444):
        ended = [e for e in r.events(kind="connection_end") if e.get("dst_port") == port]
        assert len(ended) == 1 and ended[0].get("detail"), r.describe()
    assert r["fine"].status == 200, r.describe()
