"""WebDAV's Destination names the path a COPY or MOVE writes to: the gateway decides
it too, with the request's method (proxy/policy/request_head.py, `_overrides`).
Found by a red team: with a rule allowing COPY and MOVE under /public/**, nginx's dav
module wrote anywhere on the site (a COPY out of /public, a MOVE over its page)."""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import python
from support.servers import nginx_server

pytestmark = pytest.mark.e2e

IP, PORT = "203.0.113.10", 8093

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        methods: [GET, PUT, COPY, MOVE]
        paths: ["/public/**"]
        id: uploads
"""

NGINX_HTTP = """\
    access_log {w}/access.log;
    server {{
        listen {ip}:{port};
        server_name allowed.test;
        root {w}/www;
        dav_methods PUT DELETE MKCOL COPY MOVE;
        create_full_put_path on;
    }}
"""

# argv: method, target, extra header lines as "Name: value|Name: value". Prints the status line.
CLIENT = r"""
import socket, sys
method, target, extra = sys.argv[1], sys.argv[2], sys.argv[3]
socket.gethostbyname("allowed.test")
s = socket.create_connection(("203.0.113.10", 8093), timeout=5)
fields = "".join(f"{f}\r\n" for f in extra.split("|") if f)
body = b"task wrote this\n" if method == "PUT" else b""
s.sendall(f"{method} {target} HTTP/1.1\r\nHost: allowed.test:8093\r\n{fields}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except OSError:
    pass
print(data.split(b"\r\n", 1)[0].decode() or "closed")
"""


@pytest.fixture
def dav(fakenet, tmp_path):
    w = tmp_path / "nginx"
    (w / "www" / "public").mkdir(parents=True)
    (w / "www" / "private").mkdir()
    (w / "www" / "public" / "a.txt").write_text("public a\n")
    (w / "www" / "public" / "b.txt").write_text("public b\n")
    (w / "www" / "private" / "index.html").write_text("the site's own page\n")
    with nginx_server(fakenet, w, NGINX_HTTP.format(w=w, ip=IP, port=PORT), [f"{IP}:{PORT}"]):
        yield w / "www"


def client(method, target, *fields):
    return python(CLIENT, method, target, "|".join(fields))


def test_a_copy_or_move_writes_only_where_the_rules_allow(fakenet, tmp_path, dav):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = sandbox.run(fakenet, tmp_path, {
        "put_public": client("PUT", "/public/new.txt"),
        "copy_public": client("COPY", "/public/a.txt", "Destination: /public/a2.txt"),
        "put_private": client("PUT", "/private/direct.txt"),
        "copy_out": client("COPY", "/public/new.txt", "Destination: /private/pwned.txt"),
        "move_over": client("MOVE", "/public/b.txt",
                            "Destination: http://allowed.test:8093/private/index.html",
                            "Overwrite: T"),
    }, rules=rules)  # fmt: skip
    private = {p.name: p.read_text() for p in (dav / "private").iterdir()}
    assert " 201 " in r["put_public"].out and " 20" in r["copy_public"].out, r.describe()
    assert " 403 " in r["put_private"].out, r.describe()
    assert private == {"index.html": "the site's own page\n"}, (
        f"COPY/MOVE wrote outside /public, which no rule allows: {private}"
    )
    assert " 400 " in r["copy_out"].out and " 400 " in r["move_over"].out, r.describe()
    refused = {e["method"] for e in r.events(kind="request", reason="ambiguous_path")}
    assert refused == {"COPY", "MOVE"}, r.describe()
