"""Honest uploads whose bodies the gateway reads for method overrides pass whole and
promptly (a red team, session 53, checked these while it looked for overrides the
gateway missed; they held, and are kept as cover).

curl -F file uploads past 1 MiB (curl then sends Expect: 100-continue) and under it,
the same with Expect suppressed, a forced Expect on a small form, urlencoded and
chunked forms of 3 MB, a chunked multipart upload, a twine-like multipart POST and an
OAuth token POST, over plain HTTP and HTTPS (curl's HTTP/2 to mitmproxy), both
gateway paths. Forms up to WHOLE_FORM are kept until read, longer ones stream but for
their last byte; either way the server (Rack on WEBrick) runs each as the POST it is,
each within 2 s.
"""

from __future__ import annotations

import pytest
from support import sandbox
from test_form_method_overrides import RULES, URLS, rack_origin  # noqa: E402

pytestmark = pytest.mark.e2e

SETUP = (
    "head -c 3000000 /dev/urandom > big.bin && head -c 900000 /dev/urandom > mid.bin && "
    "python3 -c \"print('x=' + 'a' * 3_000_000, end='')\" > big.txt && "
)


def timed(*args: str) -> str:
    return sandbox.curl("-w", " t=%{time_total}", *args, timeout=20)


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_honest_uploads_pass_promptly(net, tmp_path, profile):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {"resolve": sandbox.dig("allowed.test"), "setup": SETUP + "true"}
    for via, url in URLS.items():
        steps[f"file_3m_{via}"] = timed("-F", "file=@big.bin", "-F", "name=x", url)
        steps[f"file_900k_{via}"] = timed("-F", "file=@mid.bin", url)
        steps[f"file_3m_no_expect_{via}"] = timed("-H", "Expect:", "-F", "file=@big.bin", url)
        steps[f"expect_small_{via}"] = timed("-H", "Expect: 100-continue", "-d", "a=1", url)
        steps[f"urlenc_3m_{via}"] = timed("--data-binary", "@big.txt", url)
        steps[f"chunked_3m_{via}"] = timed(
            "-H", "Transfer-Encoding: chunked", "--data-binary", "@big.txt", url
        )
        steps[f"chunked_file_{via}"] = timed(
            "-H", "Transfer-Encoding: chunked", "-F", "file=@big.bin", url
        )
        steps[f"twine_{via}"] = timed(
            "-F", ":action=file_upload", "-F", "protocol_version=1", "-F", "name=pkg",
            "-F", "version=1.0", "-F", "content=@big.bin;filename=pkg-1.0.tar.gz", url,
        )  # fmt: skip
        steps[f"oauth_{via}"] = timed(
            "-d", "grant_type=client_credentials&client_id=a&client_secret=b&scope=read", url
        )
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    why = f"{result.describe()}\nserver:\n{log.read_text()}"
    slow = {}
    for label in steps:
        if label in ("resolve", "setup"):
            continue
        out = result[label].out
        assert "ran POST /items/1" in out, (label, why)
        took = float(out.rsplit("t=", 1)[1].split()[0])
        if took > 2:
            slow[label] = took
    assert not slow, (slow, why)
