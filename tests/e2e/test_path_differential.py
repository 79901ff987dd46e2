"""Path rules against what real upstream servers serve: a differential, end to end.

A rule decides on the path the gateway reads; the server serves the resource it
reads. Four real servers in the fake internet, all on api.allowed.test, each
logging the resource it actually served (not the target it was sent):

    nginx   80 / 443 (h2)   the fake internet's; `$uri` is its resolved path
    files   8081 / 8441     python's http.server (SimpleHTTPRequestHandler: unquotes,
                            then resolves dot segments with posixpath)
    flask   8082 / 8442     a Flask app on Werkzeug (WSGI: PATH_INFO decoded, %2F too),
                            with the X-HTTP-Method-Override middleware of Flask's docs
    node    8083 / 8443     node's http (and http2 with HTTP/1.1, on TLS) with the WHATWG URL parser, decodeURIComponent,
                            routes matched as Express does by default (case-insensitive,
                            optional trailing '/'), express method-override (POST only:
                            the X-HTTP-Method-Override header and the `_method` query)

The rules allow GET, HEAD and POST under /public/** and deny /public/secret
(exactly: a deny names what the admin wrote, the gateway must hold it for every
spelling). Denied resources: /public/secret, /private/key (outside the allowed
prefix), and DELETE of /public/ok (a method no rule allows). Every variant of
those is sent over plain HTTP/1.1, inspected HTTP/1.1 (the front door's own TLS)
and inspected HTTP/2 (mitmproxy); the test asserts that no server served a denied
resource, and that the legitimate request still works everywhere.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import PYTHON, eventually, python
from test_http_hardening import copy_h2

pytestmark = pytest.mark.e2e

SERVERS = {  # name -> (plain port, TLS port)
    "nginx": (80, 443),
    "files": (8081, 8441),
    "flask": (8082, 8442),
    "node": (8083, 8443),
}
DENIED = {"GET /public/secret", "GET /private/key", "DELETE /public/ok"}
# HEAD and POST of a denied path are the same resource to the question asked here.
_SAME = {"HEAD": "GET", "POST": "GET"}

RULES = f"""\
version: 1
profiles:
  default:
    rules:
      - allow: api.allowed.test
        ports: [{", ".join(str(p) for pair in SERVERS.values() for p in pair)}]
        methods: [GET, HEAD, POST]
        paths: ["/public/**"]
        id: public
      - deny: api.allowed.test
        ports: [{", ".join(str(p) for pair in SERVERS.values() for p in pair)}]
        paths: ["/public/secret"]
        id: no-secret
      - allow: www.allowed.test  # every method, yet inspected: see PASS_THROUGH
        methods: [GET, HEAD, POST, PUT, PATCH, DELETE]
        id: www
      - allow: allowed.test
        paths: ["/public/**"]
        id: apex-public
      - deny: allowed.test
        paths: ["/public/secret"]
        id: apex-no-secret
"""

# --- the servers -------------------------------------------------------------------

_PYTHON_SERVERS = r"""
import http.server, json, logging, os, ssl, sys, threading
from flask import Flask, request
from werkzeug.serving import make_server

cert, key, log_path, root = sys.argv[1:5]
log = open(log_path, "a", buffering=1)
logging.getLogger("werkzeug").disabled = True
lock = threading.Lock()

def served(server, variant, method, resource):
    with lock:
        log.write(json.dumps({"server": server, "variant": variant, "resource": f"{method} {resource}"}) + "\n")

class Files(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=root, **kw)
    def send_head(self):
        f = super().send_head()
        if f is not None:
            resource = "/" + os.path.relpath(self.translate_path(self.path), root)
            served("files", self.headers.get("X-Variant", ""), self.command, resource)
        return f
    def log_message(self, *a):
        pass

app = Flask("differential")

class MethodOverride:  # https://flask.palletsprojects.com/en/stable/patterns/methodoverrides/
    def __init__(self, app):
        self.app = app
    def __call__(self, environ, start_response):
        method = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE", "").upper()
        if method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            environ["REQUEST_METHOD"] = method
        return self.app(environ, start_response)

@app.route("/public/secret", methods=["GET", "POST"])
@app.route("/private/key", methods=["GET", "POST"])
@app.route("/public/ok", methods=["GET", "POST", "DELETE"])
def resource():
    served("flask", request.headers.get("X-Variant", ""), request.method, request.url_rule.rule)
    return "served\n"

app.wsgi_app = MethodOverride(app.wsgi_app)

def tls():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context

servers = []
for port, secure in ((8081, False), (8441, True)):
    s = http.server.ThreadingHTTPServer(("203.0.113.11", port), Files)
    if secure:
        s.socket = tls().wrap_socket(s.socket, server_side=True)
    servers.append(s)
for port, secure in ((8082, False), (8442, True)):
    servers.append(make_server("203.0.113.11", port, app, threaded=True, ssl_context=tls() if secure else None))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

_NODE_SERVER = r"""
const fs = require("fs"), http = require("http"), http2 = require("http2");
const [cert, key, logPath] = process.argv.slice(1);
const routes = ["/public/secret", "/private/key", "/public/ok"];
// path-to-regexp with Express's defaults: sensitive false, strict false
const matchers = routes.map((r) => [r, new RegExp("^" + r.replace(/[.*+?^${}()|[\]\\\/]/g, "\\$&") + "\\/?$", "i")]);
function handle(req, res) {
  let method = req.method;
  let url;
  try { url = new URL(req.url, "http://api.allowed.test"); } catch (e) { res.writeHead(400); return res.end(); }
  if (method === "POST") {  // express method-override: header, then the _method query
    const o = req.headers["x-http-method-override"] || url.searchParams.get("_method");
    if (o) method = o.toUpperCase();
  }
  let path;
  try { path = decodeURIComponent(url.pathname); } catch (e) { res.writeHead(400); return res.end(); }
  for (const [route, re] of matchers) {
    if (re.test(path)) {
      const line = JSON.stringify({server: "node", variant: req.headers["x-variant"] || "", resource: method + " " + route});
      fs.appendFileSync(logPath, line + "\n");
      res.writeHead(200, {"content-type": "text/plain"});
      return res.end("served\n");
    }
  }
  res.writeHead(404); res.end();
}
http.createServer(handle).listen(8083, "203.0.113.11");
const tls = {cert: fs.readFileSync(cert), key: fs.readFileSync(key), allowHTTP1: true};
http2.createSecureServer(tls, handle).listen(8443, "203.0.113.11", () => console.log("ready"));
"""


@pytest.fixture(scope="module")
def servers(fakenet, tmp_path_factory):
    """The python and node servers in the fake internet; yields the served-log path."""
    work = tmp_path_factory.mktemp("pathdiff")
    root = work / "www"
    for name in ("public/secret", "public/ok", "private/key"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("served\n")
    log = work / "served.log"
    log.touch()
    pem, key = fakenet.workdir / "server.pem", fakenet.workdir / "server.key"
    inet = ["ip", "netns", "exec", fakenet.internet_ns]
    procs = [
        subprocess.Popen(
            [*inet, PYTHON, "-c", _PYTHON_SERVERS, pem, key, log, root],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        ),
        subprocess.Popen(
            [*inet, shutil.which("node"), "-e", _NODE_SERVER, pem, key, log],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        ),
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", "a differential server did not start"
        yield log
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


# --- the variants ------------------------------------------------------------------


def variants() -> list[tuple[str, str, str, str, tuple[tuple[str, str], ...]]]:
    """(family, label, method, target, extra header fields): spellings of the denied
    resources. Targets are sent byte for byte (`{auth}` becomes the authority)."""
    out = []

    def add(family, method, target, *fields):
        out.append((family, f"{family}-{len(out)}", method, target, tuple(fields)))

    add("control", "GET", "/public/ok")
    for t in (
        "/public/%73ecret",
        "/public/%53ECRET",
        "/public/secre%74",
        "/public%2Fsecret",
        "/public%2fsecret",
        "/public/%2e%2e/private/key",
        "/public/%2E%2e/private/key",
        "/public/%252e%252e/private/key",
        "/public%252Fsecret",
        "/public/%2573ecret",
    ):
        add("percent", "GET", t)
    for t in (
        "/public/%c0%ae%c0%ae/private/key",
        "/public%c0%afsecret",
        "/public/%e0%80%ae%e0%80%ae/private/key",
    ):
        add("overlong-utf8", "GET", t)
    for t in (
        "/public/./secret",
        "/public/x/../secret",
        "/public/../private/key",
        "/public/..%2fprivate/key",
        "/public/a/..%2f..%2fprivate/key",
        "/public/%2e/secret",
        "/public/.%2e/private/key",
        "/public/x/..",
        "/public/..",
    ):
        add("dot-segments", "GET", t)
    for t in ("//public/secret", "/public//secret", "///private/key", "/public/secret//"):
        add("slashes", "GET", t)
    for t in (
        "/public\\secret",
        "/public/..\\private/key",
        "/public/%5csecret",
        "/public\\..\\private\\key",
    ):
        add("backslash", "GET", t)
    for t in ("/public/secret;x", "/public;x/secret", "/public/..;/private/key", "/public/secret;"):
        add("params", "GET", t)
    for t in (
        "/public/secret.",
        "/public/secret/",
        "/public/secret%20",
        "/public/secret#",
        "/public/secret?",
        "/public/secret?x=1",
        "/public/secret%00",
        "/public/secret%09",
        "/public/secret ",
        "/public/secret%2F",
    ):
        add("trailing", "GET", t)
    for t in (
        "http://{auth}/public/secret",
        "https://{auth}/public/secret",
        "http://{auth}/public/../private/key",
        "HTTP://{auth}/public/secret",
        "http://{auth}//public/secret",
        "http://evil.test/public/ok",
    ):
        add("absolute-form", "GET", t)
    for t in (
        "/public/x#/../../private/key",
        "/public/ok#/../secret",
        "/public/ok%23/../../private/key",
    ):
        add("fragment", "GET", t)
    for t in ("/Public/Secret", "/PUBLIC/SECRET", "/public/SECRET", "/Private/Key"):
        add("case", "GET", t)
    for t in (
        "/public/%C5%BFecret",
        "/public/s%C3%A9cret",
        "/public/sécret",
        "/public/\uff53ecret",
        "/public/%EF%BC%B3ecret",
        "/public/secre%E2%84%AA",
    ):
        add("unicode", "GET", t)
    add("options-star", "OPTIONS", "*")
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        add("method-override", "POST", "/public/ok", (name, "DELETE"))
        add("method-override", "GET", "/public/ok", (name, "DELETE"))
    add("method-override", "POST", "/public/ok?_method=DELETE")
    add("method-override", "POST", "/public/ok?x=1&_method=delete")
    # Another allowed name's requests on this connection (HTTP/2 connection coalescing
    # reuses one for every name its certificate covers): www.allowed.test has no path rules.
    add("coalescing", "GET", "/public/secret", (":authority", "www.allowed.test"))
    add("coalescing", "GET", "/private/key", (":authority", "www.allowed.test"))
    # HTTP/2 pseudo-header tricks (sent as fields over HTTP/1: malformed there)
    add("h2-pseudo", "GET", "/public/ok", (":path", "/public/secret"))
    add("h2-pseudo", "GET", "/public/ok", ("host", "www.allowed.test"))
    add("h2-pseudo", "GET", "", (":path", "/public/secret"))
    add("h2-pseudo", "GET", "/public/ok", (":method", "DELETE"))
    return out


# The other direction of coalescing: a connection to www.allowed.test carrying a
# request for allowed.test, whose rules deny /public/secret; nginx at 203.0.113.10
# serves any name. Were www.allowed.test passed through (a rule without methods or
# paths), the gateway would never see that request, and nginx served it (domain
# fronting, docs/threat-model.md "What pass-through TLS cannot see"): the documented
# remedy, a rule with every method for it, makes it inspected, and the Host decided.
PASS_THROUGH = [
    {"family": "coalescing-pass-through", "label": f"{t}-nginx-coalescing-pass-through-{i}",
     "server": "nginx", "port": port, "method": "GET", "target": "/public/secret",
     "fields": [(":authority", "allowed.test")], "via": "www.allowed.test", "transport": t}
    for i, (t, port) in enumerate((("h2", 443), ("h1", 443), ("plain", 80)))
]  # fmt: skip


def requests(transport: str) -> list[dict]:
    """Every variant to every server over `transport` (plain, h1 or h2)."""
    out = []
    for family, label, method, target, fields in variants():
        for server, (plain, secure) in SERVERS.items():
            port = plain if transport == "plain" else secure
            out.append({
                "family": family, "label": f"{transport}-{server}-{label}", "server": server,
                "port": port, "method": method, "target": target, "fields": fields,
            })  # fmt: skip
    return out + [r for r in PASS_THROUGH if r["transport"] == transport]


# Sends each request on its own connection; prints {label: status} (0: no answer).
_CLIENT = r"""
import json, socket, ssl, sys
sys.path.insert(0, "h2lib")
transport, wanted = sys.argv[1], json.load(open(sys.argv[2]))
host = "api.allowed.test"
result = {}
addresses = {}  # one lookup a name: the sandbox's DNS queries a second are capped

def connect(port, alpn, sni=host):
    if sni not in addresses:
        addresses[sni] = socket.gethostbyname(sni)
    s = socket.create_connection((addresses[sni], port), timeout=5)
    if alpn:
        context = ssl.create_default_context()
        context.set_alpn_protocols([alpn])
        s = context.wrap_socket(s, server_hostname=sni)
    return s

def authority(r):
    named = [v for n, v in r["fields"] if n == ":authority"]
    return named[0] if named else f"{host}:{r['port']}" if r["port"] not in (80, 443) else host

def h1(r):
    # (on HTTP/1, :authority is the Host field; other pseudo-headers go as they are)
    auth = authority(r)
    target = r["target"].replace("{auth}", auth)
    head = f"{r['method']} {target} HTTP/1.1\r\nHost: {auth}\r\nX-Variant: {r['label']}\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in r["fields"] if n != ":authority")
    head += "Content-Length: 0\r\nConnection: close\r\n\r\n"
    s = connect(r["port"], None if transport == "plain" else "http/1.1", r.get("via", host))
    s.sendall(head.encode("utf-8", "surrogateescape"))
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    parts = data.split(b"\r\n")[0].split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

def h2(r):
    import h2.config, h2.connection
    auth = authority(r)
    target = r["target"].replace("{auth}", auth)
    s = connect(r["port"], "h2", r.get("via", host))
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    pseudo = [(n, v) for n, v in r["fields"] if n.startswith(":") and n != ":authority"]
    headers = [(":method", r["method"]), (":path", target), (":scheme", "https"), (":authority", auth),
               *pseudo, ("x-variant", r["label"])]
    headers += [(n.lower(), v) for n, v in r["fields"] if not n.startswith(":")]
    conn.send_headers(1, [(n.encode(), v.encode()) for n, v in headers], end_stream=True)
    s.sendall(conn.data_to_send())
    status = 0
    try:
        while not status:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if getattr(event, "headers", None):
                    status = int(dict(event.headers).get(b":status", b"0"))
            s.sendall(conn.data_to_send())
    except OSError:
        pass
    s.close()
    return status

for r in wanted:
    try:
        result[r["label"]] = (h2 if transport == "h2" else h1)(r)
    except OSError:
        result[r["label"]] = 0
print(json.dumps(result))
"""


def client(transport: str, name: str) -> str:
    return python(_CLIENT, transport, name)


def write_requests(workspace: Path) -> None:
    copy_h2(workspace)
    for transport in ("plain", "h1", "h2"):
        (workspace / f"{transport}.json").write_text(json.dumps(requests(transport)))


def served_denied(net, log: Path) -> dict[str, str]:
    """label -> the denied resource a server served for it ({} when none was)."""
    eventually(lambda: False, timeout=0.3)  # nginx and the servers log after answering
    served = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        served[entry["variant"]] = entry["resource"]
    for entry in net.requests_seen():
        if entry["status"] == 200:
            served[entry["variant"]] = f"{entry['method']} {entry['resolved']}"
    return {label: resource for label, resource in served.items() if _canonical(resource) in DENIED}


def _canonical(resource: str) -> str:
    method, _, path = resource.partition(" ")
    return f"{_SAME.get(method, method)} {path}"


def test_no_spelling_of_a_denied_path_reaches_a_denied_resource(net, servers, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {t: client(t, f"{t}.json") for t in ("plain", "h1", "h2")}
    r = sandbox.run(net, tmp_path, steps, rules=rules, setup=write_requests)

    answers = {}
    for transport in steps:
        assert r[transport].rc == 0, r.describe()
        answers.update(json.loads(r[transport].out))
    leaked = served_denied(net, servers)
    table = _table(leaked)
    print(table)
    assert not leaked, table + "\n" + json.dumps(answers)
    # The legitimate request works on every server over every transport.
    assert answered(answers, "control") == {200}
    # What servers did serve before the fixes is refused, with its reason.
    assert answered(answers, "method-override") == {400}
    assert answered(answers, "trailing", "/public/secret/") == {403}
    assert answered(answers, "coalescing") | answered(answers, "coalescing-pass-through") <= {
        421,
        403,
    }
    assert {"ambiguous_method", "ambiguous_path", "rule_deny", "host_mismatch"} <= {
        e["reason"] for e in r.events(kind="request", verdict="deny")
    }


def answered(answers: dict[str, int], family: str, target: str | None = None) -> set[int]:
    """The statuses the variants of `family` (only `target`'s, if given) got, on
    every server and transport."""
    labels = {
        label for fam, label, _, t, _ in variants() if fam == family and target in (None, t)
    } | {r["label"].split("-", 2)[2] for r in PASS_THROUGH if r["family"] == family}
    got = {code for label, code in answers.items() if label.split("-", 2)[2] in labels}
    assert got, f"no variant of {family} {target or ''} was sent"
    return got


def _table(leaked: dict[str, str]) -> str:
    """family -> the servers that served a denied resource (for the failure message)."""
    rows: dict[str, set[str]] = {}
    for label in leaked:
        transport, server, family = label.split("-", 2)
        rows.setdefault(family.rsplit("-", 1)[0], set()).add(f"{server}/{transport}")
    return "\n".join(f"{family:16} {' '.join(sorted(s))}" for family, s in sorted(rows.items()))
