"""An inspected HTTP/2 request sent on to a server that speaks only HTTP/1.1 (most
origin servers; mitmproxy converts the request: proxy/lean_mitmproxy.py
`frame_downgraded_requests`).

HTTP/2 needs no content-length: the frames end the body. mitmproxy wrote the converted
head, then the DATA as it came, framed only by the request's own headers. A request
with a body and no content-length reached the server as a bodiless request, and the
body as the next request on the connection: curl's `--http2 -H 'Transfer-Encoding:
chunked' --data-binary 'DELETE /admin ...'` (curl drops the field for HTTP/2) got a
DELETE of a path and Host no rule allows to the server, never decided nor recorded.
Now such a body goes with its length, or chunked when mitmproxy streams it (past
stream_large_bodies, 64 KiB); the server reads one request, the body as its body.
"""

from __future__ import annotations

import json

import pytest
from support import sandbox
from support.servers import script_server

pytestmark = pytest.mark.e2e

SERVER_IP, PORT = "203.0.113.10", 4443  # allowed.test
# Inspected (methods, paths); the WebSocket rule sends the profile's inspected TLS to
# mitmproxy (the front door's own inspection speaks HTTP/1.1 to the client).
RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: public-reads
        ports: [{PORT}]
        methods: [GET, POST]
        paths: ["/public/**"]
      - allow: www.allowed.test
        paths: ["/ws"]
        websocket: true
"""

# An HTTPS server that speaks HTTP/1.1 only (its TLS offers no ALPN), reading each
# request on a keep-alive connection by its own framing, as a server does; it logs
# every request it reads: method, target, Host, framing and the body's length.
SERVER = r"""
import json, socket, ssl, sys, threading
ip, port, cert, key, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
out = open(log, "a", buffering=1)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)

def serve(conn):
    f = conn.makefile("rb")
    try:
        while True:
            line = f.readline(65536)
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            fields = {}
            while (h := f.readline(65536)) not in (b"\r\n", b"\n", b""):
                name, _, value = h.decode("latin-1").partition(":")
                fields[name.strip().lower()] = value.strip()
            body = b""
            if "chunked" in fields.get("transfer-encoding", ""):
                while (size := int(f.readline().split(b";")[0], 16)):
                    body += f.read(size); f.readline()
                f.readline()
            elif "content-length" in fields:
                body = f.read(int(fields["content-length"]))
            out.write(json.dumps({
                "method": method, "target": target, "host": fields.get("host"),
                "framing": "chunked" if "transfer-encoding" in fields
                else "length" if "content-length" in fields else "none",
                "body": len(body), "tail": body[-60:].decode("latin-1"),
            }) + "\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    except (OSError, ValueError):
        pass
    finally:
        conn.close()

listener = socket.create_server((ip, port))
print("ready", flush=True)
while True:
    raw, _ = listener.accept()
    try:
        conn = context.wrap_socket(raw, server_side=True)
    except OSError:
        raw.close()
        continue
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

SMUGGLED = "DELETE /admin/smuggled HTTP/1.1\r\nHost: forbidden.test\r\n\r\n"
BIG = 3 << 19  # 1.5 MiB: past stream_large_bodies, so mitmproxy streams it


def _send(path: str, body: str) -> str:
    """curl over HTTP/2 with `body` (a file in the workspace) and no content-length:
    curl drops Transfer-Encoding for HTTP/2 and sends the DATA frames alone."""
    url = f"https://allowed.test:{PORT}{path}"
    return sandbox.curl(
        "--http2", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{body}", url
    )


def test_an_http2_body_reaches_an_http1_server_as_the_body_of_its_own_request(net, tmp_path):
    log = tmp_path / "server.jsonl"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def bodies(workspace):
        (workspace / "small").write_text(SMUGGLED)
        (workspace / "big").write_text("x" * (BIG - len(SMUGGLED)) + SMUGGLED)

    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    with script_server(net, SERVER, SERVER_IP, str(PORT), cert, key, str(log)):
        result = sandbox.run(
            net,
            tmp_path,
            {"small": _send("/public/small", "small"), "big": _send("/public/big", "big")},
            rules=rules,
            setup=bodies,
        )
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    # What the server read: the two requests the gateway decided, each with its body
    # whole (the DELETE only as the bytes at its end), and nothing else.
    assert sorted((s["method"], s["target"], s["body"]) for s in seen) == [
        ("POST", "/public/big", BIG),
        ("POST", "/public/small", len(SMUGGLED)),
    ], seen
    assert {s["target"]: s["framing"] for s in seen} == {
        "/public/small": "length",  # held whole by mitmproxy: its length
        "/public/big": "chunked",  # streamed
    }
    assert all(s["tail"].endswith(SMUGGLED[-30:]) for s in seen), seen
    assert result["small"].status == 200, result.describe()
    assert result["big"].status == 200, result.describe()
    decided = [(e["verdict"], e["method"], e["path"]) for e in result.events(kind="request")]
    assert sorted(decided) == [
        ("allow", "POST", "/public/big"),
        ("allow", "POST", "/public/small"),
    ], result.describe()
