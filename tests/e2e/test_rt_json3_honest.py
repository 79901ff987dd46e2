"""Red team json3 (session 53): honest JSON POSTs refused by the JSON override reader.

Under `methods: [GET, POST]`, form_body._Json treats a JSON body over 64 KiB in which
`"method":` occurs anywhere (JSON-RPC's and MCP's `method`, nested `"method": "GET"` in
a HAR or Postman collection) as one that "may name any method", and any compressed
JSON body too (not even looked into): each is refused 400 `ambiguous_method`, though
no server reads an override from it. `method` is an override only where its value is
an HTTP method (request_head.method_override), and a parsed body's nested members are
never read; only the unparsed path counts a bare `method` anywhere.

Real server: Express 4 + body-parser.json (limit 100 kB) + method-override's README
getter; each request is an honest POST that it runs as POST. Controls: the same
requests under 64 KiB, uncompressed, pass.
"""

from __future__ import annotations

import gzip
import json

import pytest
from support.servers import internet_servers
from test_form_method_overrides import IP, NODE_PATH
from test_form_override_compressed import node
from test_json_method_overrides import EXPRESS_APP
from test_rt_json3_spellings import EXPRESS, EXPRESS_TLS, RULES
from support import sandbox

pytestmark = pytest.mark.e2e

PAD = 70_000  # past _MOST_JSON (64 KiB), under body-parser's 100 kB


def mcp_call(size: int) -> bytes:  # MCP's Streamable HTTP: a JSON-RPC 2.0 tools/call
    arguments = {"path": "notes.txt", "content": "a" * size}
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "write_file", "arguments": arguments}}).encode()  # fmt: skip


def rpc_batch(calls: int) -> bytes:  # an Ethereum JSON-RPC batch
    return json.dumps([
        {"jsonrpc": "2.0", "id": i, "method": "eth_getBalance",
         "params": ["0x" + f"{i:040x}", "latest"]} for i in range(calls)
    ]).encode()  # fmt: skip


def har(entries: int) -> bytes:  # a HAR upload: nested `"method": "GET"`
    return json.dumps({"log": {"version": "1.2", "entries": [
        {"request": {"method": "GET", "url": f"https://example.test/page/{i}" + "x" * 100,
                     "headers": []}} for i in range(entries)
    ]}}).encode()  # fmt: skip


BODIES = {
    "mcp_small": mcp_call(1000),
    "batch_small": rpc_batch(50),
    "mcp_big": mcp_call(PAD),
    "batch_big": rpc_batch(600),
    "har_big": har(400),
    "otlp_gz": gzip.compress(b'{"resourceLogs": []}'),
}


def write_bodies(steps_dir) -> None:
    for name, body in BODIES.items():
        (steps_dir / f"{name}.json").write_bytes(body)


def post(url: str, name: str, *headers: str) -> str:
    args = [a for h in ("Content-Type: application/json", *headers) for a in ("-H", h)]
    return sandbox.curl(*args, "--data-binary", f"@{name}.json", url)


def steps() -> tuple[dict[str, str], list[str]]:
    steps = {"resolve": sandbox.dig("allowed.test")}
    for via, url in (
        ("plain", f"http://allowed.test:{EXPRESS}/items/1"),
        ("tls", f"https://allowed.test:{EXPRESS_TLS}/items/1"),
    ):
        steps[f"control_mcp_small_{via}"] = post(url, "mcp_small")
        steps[f"control_batch_small_{via}"] = post(url, "batch_small")
        steps[f"honest_mcp_big_{via}"] = post(url, "mcp_big")
        steps[f"honest_batch_big_{via}"] = post(url, "batch_big")
        steps[f"honest_har_big_{via}"] = post(url, "har_big")
        steps[f"honest_gzip_otlp_{via}"] = post(url, "otlp_gz", "Content-Encoding: gzip")  # OTLP/HTTP JSON, compressed as its exporters may
    return steps, [label for label in steps if label != "resolve"]


def check(net, tmp_path, profile, kind):
    log = tmp_path / "express.log"
    log.write_text("")
    (tmp_path / "app.js").write_text(EXPRESS_APP)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    server = ["env", f"NODE_PATH={NODE_PATH}", node(), str(tmp_path / "app.js"), IP,
              str(EXPRESS), str(EXPRESS_TLS), str(log), str(net.workdir / "server.pem"),
              str(net.workdir / "server.key")]  # fmt: skip
    commands, labels = steps()
    labels = [label for label in labels if label.startswith("control_") or kind in label]
    with internet_servers(net, [server], [f"{IP}:{EXPRESS}", f"{IP}:{EXPRESS_TLS}"]):
        result = sandbox.run(net, tmp_path, commands, rules=rules, extra=("--profile", profile),
                             setup=write_bodies)
    why = f"{result.describe()}\nserver:\n{log.read_text()}"
    for label in labels:
        if label.startswith("control_"):
            assert result[label].status == 200, (label, why)
    statuses = {label: result[label].status for label in labels}
    assert statuses == dict.fromkeys(labels, 200), why
    assert "DELETE" not in log.read_text(), why


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_rt_json3_honest_json_over_64k_with_method_member_passes(net, tmp_path, profile):
    """MCP tools/call, a JSON-RPC batch, a HAR upload: each 70-76 KB."""
    check(net, tmp_path, profile, "_big_")


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_rt_json3_honest_gzip_json_passes(net, tmp_path, profile):
    """A gzip JSON POST (OTLP/HTTP JSON) that holds no `method` at all."""
    check(net, tmp_path, profile, "_gzip_")
