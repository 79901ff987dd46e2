"""Request bodies read for method overrides (form_body.py) as they stream: a
full-duplex stream is answered, and a reload that starts reading them ends a body
that was not read (two red teams' findings, session 54).

A body that is not kept (chunked, or longer than 256 KiB) went on but for the last
byte of every piece, until its end: a client that streams NDJSON or JSON messages on
a chunked POST and waits for the answer to each before the next (a full-duplex
stream) never got one, since the server lacked each message's newline. Now a body
goes on as it comes until `method` occurs in it in any spelling
(`FormOverrides.suspect`: no server can run an override it has not got), and only
then does its last byte wait for its end. The stream below holds no `method`:
answered message by message on the front door's path, as with no reading at all
(`open`). (mitmproxy's path buffers an inspected HTTP/2 body of unknown length up to
64 KiB before it streams it, as it did before any body was read: no full duplex
there, with or without the reader.)

A body is read only where some rule for the destination reads the method or path
(gate._reads_method). A POST whose head was decided under rules that read neither,
and whose body still streamed when a reload added `methods: [GET, POST]`, went on
unread: its `"_method": "DELETE"`, sent after the reload, ran DELETE. Now the reload
ends such an exchange (policy_changed, `builtin:ambiguous-method`), and the server
runs nothing; with the method rule from the start, the request is refused (400).

Origins in the fake internet: Node's http server answering each NDJSON line as it
arrives; Express with body-parser's JSON parser and method-override's README getter
(test_json_method_overrides), behind the gateway service for the reload.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import python
from support.servers import internet_servers
from support.service import attach, running
from test_form_method_overrides import IP, NODE_PATH
from test_form_override_compressed import node
from test_json_method_overrides import EXPRESS_APP, rules_and_open

pytestmark = pytest.mark.e2e

PORT = 8092
RULES = rules_and_open(f"[{PORT}]")

SERVER = r"""
const http = require("node:http");
const fs = require("node:fs");
const [ip, port, log] = process.argv.slice(2);
function answer(req, res) {
  res.writeHead(200, { "Content-Type": "application/x-ndjson" });
  let buffered = "";
  req.setEncoding("utf8");
  req.on("data", (chunk) => {
    buffered += chunk;
    let at;
    while ((at = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, at); buffered = buffered.slice(at + 1);
      const message = JSON.parse(line);
      fs.appendFileSync(log, `got ${req.method} ${line}\n`);
      res.write(JSON.stringify({ answer: message.n * 2 }) + "\n");
    }
  });
  req.on("end", () => res.end());
}
http.createServer(answer).listen(Number(port), ip);
"""

# A full-duplex client: each message on the chunked POST, then its answer awaited
# (at most 4 s) before the next; prints what it got.
CLIENT = r"""
import socket, sys, time
port, ctype = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("allowed.test", port), timeout=10)
s.sendall((f"POST /stream HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
           f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
got = b""
for n in (1, 2, 3):
    line = b'{"n": %d}\n' % n
    s.sendall(b"%x\r\n%s\r\n" % (len(line), line))
    want = b'{"answer":%d}' % (2 * n)
    deadline = time.monotonic() + 4
    s.settimeout(0.2)
    while want not in got and time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        got += data
    print(f"message {n}:", "answered" if want in got else "NO ANSWER", flush=True)
    if want not in got:
        break
s.sendall(b"0\r\n\r\n")
"""


@pytest.mark.parametrize("profile", ["door", "open"])
def test_a_full_duplex_json_stream_is_answered_message_by_message(net, tmp_path, profile):
    node_ = shutil.which("node")
    if not node_:
        pytest.fail("needs node (scripts/install.sh --test)")
    log = tmp_path / "server.log"
    log.write_text("")
    (tmp_path / "server.js").write_text(SERVER)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    client = f"{sandbox.SYSTEM_BUNDLE_ONLY} {sandbox.SANDBOX_PYTHON} stream.py {PORT}"
    commands = {
        "resolve": sandbox.dig("allowed.test"),
        "ndjson": f"{client} application/x-ndjson",
        "json": f"{client} application/json",
        "text_plain": f"{client} 'text/plain; charset=utf-8'",
    }

    def setup(workspace: Path) -> None:
        (workspace / "stream.py").write_text(CLIENT)

    server = [node_, str(tmp_path / "server.js"), IP, str(PORT), str(log)]
    with internet_servers(net, [server], [f"{IP}:{PORT}"]):
        result = sandbox.run(
            net, tmp_path, commands, rules=rules, extra=("--profile", profile), setup=setup
        )
    why = f"server:\n{log.read_text()}\n{result.describe()[-3000:]}"
    for label in ("ndjson", "json", "text_plain"):
        out = result[label].out
        assert all(f"message {n}: answered" in out for n in (1, 2, 3)), (label, why)


RELOAD_PORT = 8094


def _rules(methods: bool) -> str:
    return (
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        f"      - allow: allowed.test\n        ports: [{RELOAD_PORT}]\n"
        + ("        id: read-and-create\n        methods: [GET, POST]\n" if methods
           else "        id: any-method\n")
    )  # fmt: skip


# A JSON body in two chunks: the second (with `_method`) sent at `until`.
RELOAD_CLIENT = r"""
import socket, sys, time
until = float(sys.argv[1])
s = socket.create_connection(("allowed.test", PORT), timeout=30)
s.sendall(b"POST /items/1 HTTP/1.1\r\nHost: allowed.test:PORT\r\n"
          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
first = b'{"note": "x", '
s.sendall(b"%x\r\n%s\r\n" % (len(first), first))
time.sleep(max(0.0, until - time.time()))
rest = b'"_method": "DELETE"}'
try:
    s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
    s.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        got = s.recv(65536)
        if not got:
            break
        answer += got
    print("answer", answer.split(b"\r\n")[0].decode(errors="replace") or "closed", flush=True)
    print(answer.decode(errors="replace")[-200:])
except OSError as e:
    print("answer", type(e).__name__)
""".replace("PORT", str(RELOAD_PORT))


@pytest.mark.parametrize("case", ["reload", "control"])
def test_a_reload_that_reads_the_method_ends_a_body_streaming_unread(net, tmp_path, case):
    log = tmp_path / "express.log"
    log.write_text("")
    (tmp_path / "app.js").write_text(EXPRESS_APP)
    argv = ["env", f"NODE_PATH={NODE_PATH}", node(), str(tmp_path / "app.js"), IP,
            str(RELOAD_PORT), str(RELOAD_PORT + 1), str(log),
            str(net.workdir / "server.pem"), str(net.workdir / "server.key")]  # fmt: skip
    with (
        internet_servers(net, [argv], [f"{IP}:{RELOAD_PORT}"]),
        running(net, tmp_path, _rules(methods=(case == "control"))) as service,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        until = time.time() + 12
        task = pool.submit(attach, service, tmp_path, {"post": python(RELOAD_CLIENT, str(until))})
        time.sleep(8)  # the attach, and the head decided under the first rules
        reloaded = time.time()
        service.rules.write_text(_rules(methods=True))
        result = task.result(timeout=60)
    ran = log.read_text()
    why = (
        f"{result['post'].out}\nserver:\n{ran}\nreloaded at {reloaded}\n{result.describe()[-3000:]}"
    )
    assert "DELETE" not in ran, why  # the server never ran one
    requests = result.events(kind="request")
    if case == "control":
        assert "answer HTTP/1.1 400" in result["post"].out, why
        assert requests[-1]["reason"] == "ambiguous_method", why
        return
    # the head was allowed by the first rules, before the reload; the reload ended it
    assert requests[0]["rule_id"] == "any-method" and requests[0]["time"] < reloaded, why
    ended = result.events(kind="connection", reason="policy_changed")
    assert [e["rule_id"] for e in ended] == ["builtin:ambiguous-method"], why
    assert "answer HTTP/1.1 200" not in result["post"].out, why
