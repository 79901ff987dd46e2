"""A request refused while its body is still coming, on mitmproxy's path, is answered.

mitmproxy streams a request body declared larger than `stream_large_bodies` (64
KiB), and a response set by the requestheaders hook then made it raise ("Can't set a
response and enable streaming at the same time"): "mitmproxy has crashed!" in the
log, and the client waited for an answer that never came. That was a held POST of
100 kB refused when its hold ran out, and any refusal of a body over the threshold
(lean_mitmproxy.answer_before_streaming). Plain HTTP of a profile with an ask rule,
and HTTP/2 of an inspected rule, go through mitmproxy.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import curl

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 1s}
    rules:
      - ask: allowed.test
        methods: [POST]
        paths: ["/up"]
        id: ask-upload
      - allow: allowed.test
        methods: [GET]
        id: read-only
"""


@pytest.mark.parametrize(
    "url, http2, kilobytes",
    [
        ("http://allowed.test/up", False, 100),  # held, then refused: nobody approved
        ("http://allowed.test/other", False, 300),  # refused at once: POST is not allowed
        ("https://allowed.test/other", True, 300),
    ],
    ids=["held-then-refused", "refused", "refused-http2"],
)
def test_a_refused_request_is_answered_while_its_body_comes(net, tmp_path, url, http2, kilobytes):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    post = curl(
        *(["--http2"] if http2 else []),
        "-o",
        "/dev/null",
        "-H",
        "Expect:",
        "--data-binary",
        "@/tmp/body",
        url,
        timeout=10,
    )
    result = sandbox.run(
        net,
        tmp_path,
        {"body": f"head -c {kilobytes * 1024} /dev/zero > /tmp/body", "post": post},
        rules=rules,
    )
    assert result["post"].out.strip() == "403", result.describe()
    assert "crashed" not in result.stderr, result.stderr
    assert net.requests_seen() == []  # no byte of it went upstream
    refused = [e for e in result.audit if e.get("kind") == "request"]
    assert refused and all(e["verdict"] == "deny" for e in refused), result.describe()
