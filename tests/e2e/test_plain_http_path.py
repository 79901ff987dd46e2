"""Plain HTTP decided in the front door (proxy/frontdoor/http1.py), end to end: a
task whose rules neither inspect TLS nor ask nor allow websockets never starts
mitmproxy, and still gets every request decided, refused and answered as before.
A profile that allows websockets still goes to mitmproxy."""

from __future__ import annotations

import shlex

import pytest
from support import sandbox
from support.sandbox import SYSTEM_BUNDLE_ONLY, curl, eventually, python
from support.servers import script_server

pytestmark = pytest.mark.e2e

PLAIN_RULES = (
    "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n        id: web\n"
)


def keep_alive(*urls: str, host: str | None = None) -> str:
    """curl: each URL on one connection if the gateway keeps it open; prints
    `STATUS CONNECTS` for each (CONNECTS 0: reused). `host`: the last one's Host."""
    common = ["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"]
    argv = ["curl"]
    for i, url in enumerate(urls):
        extra = ["-H", f"Host: {host}"] if host and i == len(urls) - 1 else []
        argv += [*(["--next"] if i else []), *common, *extra, url]
    return f"{SYSTEM_BUNDLE_ONLY} " + " ".join(shlex.quote(a) for a in argv)


def test_plain_http_is_decided_without_mitmproxy_request_by_request(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(PLAIN_RULES)
    r = sandbox.run(net, tmp_path, {
        "three": keep_alive("http://allowed.test/k1", "http://allowed.test/k2", "http://allowed.test/k3"),
        # the third request on the connection names a host no rule allows
        "spoofed": keep_alive("http://allowed.test/s1", "http://allowed.test/s2", host="evil.test"),
        "post": curl("--data-binary", "@body.bin", "http://allowed.test/upload"),
    }, rules=rules, extra=("-v",),
       setup=lambda ws: (ws / "body.bin").write_bytes(b"b" * 300_000))  # fmt: skip

    assert "mitmproxy started" not in r.stderr, r.describe()
    assert r["three"].out.split() == ["200", "1", "200", "0", "200", "0"], r.describe()
    assert r["spoofed"].out.split()[:3] == ["200", "1", "403"], r.describe()
    assert r["post"].status in (200, 405), r.describe()  # nginx's static server may refuse POST
    eventually(lambda: len(net.requests_seen()) >= 6, timeout=3)
    uris = [e["uri"] for e in net.requests_seen()]
    assert sorted(uris) == ["/k1", "/k2", "/k3", "/s1", "/upload"], uris
    allowed = {e["path"] for e in r.events(kind="request", verdict="allow")}
    assert allowed == {"/k1", "/k2", "/k3", "/s1", "/upload"}
    assert {(e["path"], e["name"]) for e in r.events(kind="request", verdict="deny")} == {
        ("/s2", "evil.test")
    }


def test_a_profile_with_a_websocket_rule_still_goes_to_mitmproxy(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(PLAIN_RULES + "      - allow: www.allowed.test\n        websocket: true\n")
    r = sandbox.run(net, tmp_path, {"get": curl("http://allowed.test/ws-profile")},
                    rules=rules, extra=("-v",))  # fmt: skip
    assert r["get"].status == 200, r.describe()
    assert "mitmproxy started" in r.stderr, r.describe()


# A server that answers a request for /twice with its response and, in the same
# write, a second response no request asked for; every other request plainly. Logs
# "CONNECTION PATH" for every request it reads (connections numbered from 1).
TWICE_SERVER = r"""
import itertools, socket, sys, threading
ip, port, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(log_path, "a", buffering=1)
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((ip, port)); listener.listen(16)

def answer(body):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

def serve(c, number):
    data = b""
    try:
        while True:
            while b"\r\n\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            path = head.split(b" ")[1]
            log.write(f"{number} {path.decode()}\n")
            extra = answer(b"forged") if path == b"/twice" else b""
            c.sendall(answer(b"answer:" + path) + extra)
    except OSError:
        pass
    finally:
        c.close()

print("ready", flush=True)
for number in itertools.count(1):
    threading.Thread(target=serve, args=(listener.accept()[0], number), daemon=True).start()
"""
TWICE_PORT = 8082


def test_a_response_no_request_asked_for_closes_the_client_connection(net, tmp_path):
    """The upstream answers a request twice: the second answer is never passed on (the
    client would take it as its next request's), the client's connection is closed
    with a reason in its end event, and the next request gets its own decision and
    its own answer, on a new upstream connection."""
    log = tmp_path / "twice.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        f"      - allow: evil.test\n        ports: [{TWICE_PORT}]\n        id: twice\n"
    )
    # the client reads the first answer, gives the forged one time to arrive, then asks
    # again on the same connection: it must find the connection closed, not "forged"
    same_connection = python(
        """
        import socket, sys, time
        s = socket.create_connection(("evil.test", int(sys.argv[1])), timeout=5)
        s.sendall(b"GET /twice HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n")
        data = b""
        while not data.endswith(b"answer:/twice"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print(data.split(b"\\r\\n\\r\\n")[-1].decode())
        time.sleep(0.5)
        rest = b""
        try:
            s.sendall(b"GET /next HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n")
            while chunk := s.recv(4096):
                rest += chunk
        except OSError:
            pass
        print(rest.decode(errors="replace").replace("\\r\\n", " ") or "closed")
        """,
        str(TWICE_PORT),
    )
    with script_server(net, TWICE_SERVER, "203.0.113.66", str(TWICE_PORT), str(log)):
        r = sandbox.run(net, tmp_path, {
            "same_connection": same_connection,
            "next": curl(f"http://evil.test:{TWICE_PORT}/next"),
        }, rules=rules)  # fmt: skip

    # the forged answer was never taken for the next request's: the connection closed
    assert r["same_connection"].out.splitlines() == ["answer:/twice", "closed"], r.describe()
    assert r["next"].out.split() == ["answer:/next", "200"], r.describe()
    # /next went on a new upstream connection: the one with the forged bytes was not kept
    seen = eventually(lambda: (lines := log.read_text().split()) and len(lines) >= 4 and lines)
    assert seen == ["1", "/twice", "2", "/next"], seen
    decided = r.events(kind="request", verdict="allow", rule_id="twice")
    assert [e["path"] for e in decided] == ["/twice", "/next"], r.describe()
    ended = [e for e in r.events(kind="connection_end") if e.get("dst_port") == TWICE_PORT]
    assert len(ended) == 2, ended
    cut = [e for e in ended if "a response no request asked for" in (e.get("detail") or "")]
    assert len(cut) == 1, ended
