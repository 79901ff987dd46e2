r"""A form body's multipart parts as Rack reads them, and honest forms the reader
must not refuse. A red team found each (session 53).

Against Rack 2.2 (Rack::MethodOverride on WEBrick), each of these ran DELETE under a
rule allowing GET and POST, and is now read or refused (400 `ambiguous_method` or
`malformed_request`):
- `x_content_id`: Rack's MULTIPART_CONTENT_ID, `/Content-ID:\s*([^\r\n]*)/ni`, is not
  anchored at a line's start: a part whose only header is `X-Content-ID: _method` is
  named `_method`;
- `escaped_letter`: `name="_m\ethod"`: Rack unescapes any `\x` in a quoted name;
- `skipped_rest`: `--XyZ--` and 9,000 bytes, then the `_method` part, in one read;
- `lf_head_split`: a part head ended by a bare-LF blank line, the body written in two
  pieces, the first ending right after it (Rack reads on to the CRLF CRLF): a header
  section not ended by CRLF CRLF is refused.
And honest forms pass: browsers' boundaries, which hold the word `Boundary`, and
forms over 64 KiB in charsets that hold ASCII as ASCII (windows-1251, Shift_JIS...).
"""

from __future__ import annotations

import base64

import pytest
from support import sandbox
from test_form_method_overrides import PLAIN, RULES, URLS, rack_origin  # noqa: E402

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import socket, sys, time, base64
port = int(sys.argv[1]); pieces = [base64.b64decode(p) for p in sys.argv[2:]]
body = b"".join(pieces)
head = (b"POST /items/1 HTTP/1.1\r\nHost: allowed.test:%d\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=XyZ\r\n"
        b"Content-Length: %d\r\n\r\n" % (port, len(body)))
s = socket.create_connection(("allowed.test", port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(head + pieces[0])
for p in pieces[1:]:
    time.sleep(0.5)
    s.sendall(p)
got = b""
try:
    while (d := s.recv(65536)):
        got += d
except socket.timeout:
    pass
print(got.split(b"\r\n", 1)[0].decode(), got.rsplit(b"\r\n\r\n", 1)[-1].decode().strip())
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, body: bytes) -> str:
    return f"echo {b64(body)} | base64 -d > body.bin && " + sandbox.curl(
        "-H", "Content-Type: multipart/form-data; boundary=XyZ", "--data-binary", "@body.bin", url
    )


SKIP = (
    b"--XyZ--" + b"a" * 9000
    + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XyZ--\r\n'
)  # fmt: skip
PART = b'Content-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XyZ--\r\n'


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_rack_reads_of_multipart_parts_are_read_or_refused(net, tmp_path, profile):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "write": f"echo {b64(SCRIPT.encode())} | base64 -d > split.py",
        "control_content_id": post(
            URLS["plain"], b"--XyZ\r\nContent-ID: _method\r\n\r\nDELETE\r\n--XyZ--\r\n"
        ),
        "control_lf_head": f"timeout 15 python3 split.py {PLAIN} "
        + b64(b"--XyZ\r\nX-A: b\n\n" + PART),
    }
    for via, url in URLS.items():
        steps[f"x_content_id_{via}"] = post(
            url, b"--XyZ\r\nX-Content-ID: _method\r\n\r\nDELETE\r\n--XyZ--\r\n"
        )
        # Rack dequotes a quoted name with `gsub(/\\(.)/, '\1')`: "_m\ethod" is _method;
        # form_body's `_part` skips a head with no `method` in it before unescaping.
        steps[f"escaped_letter_{via}"] = post(
            url,
            b'--XyZ\r\nContent-Disposition: form-data; name="_m\\ethod"\r\n\r\n'
            b"DELETE\r\n--XyZ--\r\n",
        )
        # `--XyZ--` then 9000 bytes with no blank line: form_body's HEAD state keeps
        # _MOST_PART_HEAD + 1 bytes, sees it starts with `--` (an epilogue), goes to
        # CONTENT and RETURNS, dropping the rest of the chunk: the next delimiter and
        # its `_method` part are never searched. Rack skips the unmatched line.
        steps[f"skipped_rest_{via}"] = post(url, SKIP)
    steps["lf_head_split"] = (
        f"timeout 15 python3 split.py {PLAIN} {b64(b'--XyZ' + chr(13).encode() + chr(10).encode() + b'X-A: b' + bytes([10, 10]))} {b64(PART)}"
    )
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    print(why)
    assert result["control_content_id"].status == 400, why
    assert "400" in result["control_lf_head"].out, why
    for via in URLS:
        assert result[f"x_content_id_{via}"].status == 400, why
        assert result[f"escaped_letter_{via}"].status == 400, why
        assert result[f"skipped_rest_{via}"].status == 400, why
    assert "400" in result["lf_head_split"].out, why
    assert "DELETE" not in ran, why


# Honest multipart boundaries of real clients: Chrome/Safari (WebKit), Firefox
# (geckoformboundary), Dart's http package (dart-http-boundary-), curl. 641b378 refuses
# a Content-Type in which "boundary" occurs twice (`count("boundary") > 1`), which the
# browsers' own boundary values do.
HONEST_BOUNDARIES = {
    "webkit": "----WebKitFormBoundary7MA4YWxkTrZu0gW",
    "gecko": "----geckoformboundary5a1c0b1f2e3d4c5b",
    "dart": "dart-http-boundary-Zq3Kx.9o_Lw5Ve2Hn4",
    "curl": "------------------------abcdef0123456789",
}


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_browser_boundaries_are_not_refused(net, tmp_path, profile):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {"resolve": sandbox.dig("allowed.test")}
    for label, boundary in HONEST_BOUNDARIES.items():
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="title"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\nabc\r\n--{boundary}--\r\n"
        ).encode()
        for via, url in URLS.items():
            steps[f"{label}_{via}"] = f"echo {b64(body)} | base64 -d > body.bin && " + sandbox.curl(
                "-H", f"Content-Type: multipart/form-data; boundary={boundary}",
                "--data-binary", "@body.bin", url,
            )  # fmt: skip
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    why = f"{result.describe()}\nserver:\n{log.read_text()}"
    refused = {k: result[k].status for k in steps if k != "resolve" and result[k].status != 200}
    assert not refused, (refused, why)


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_legacy_charset_forms_over_64k_are_not_refused(net, tmp_path, profile):
    """An honest urlencoded form of 100 KB in an ASCII-superset legacy charset
    (windows-1251, Shift_JIS, GBK): 641b378 reads any charset outside its short
    _ASCII_CHARSETS list whole and refuses it past _MOST_DECODED (64 KiB)."""
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = URLS["plain"]
    steps = {
        "resolve": sandbox.dig("allowed.test"),
        "make": "python3 -c \"print('text=' + 'a' * 100_000 + '&b=1', end='')\" > big.txt",
    }
    for cs in ("windows-1251", "Shift_JIS", "GBK", "UTF-8"):
        steps[cs.lower().replace("-", "_")] = sandbox.curl(
            "-H", f"Content-Type: application/x-www-form-urlencoded; charset={cs}",
            "--data-binary", "@big.txt", url,
        )  # fmt: skip
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    why = f"{result.describe()}\nserver:\n{log.read_text()}"
    statuses = {cs: result[cs].status for cs in ("windows_1251", "shift_jis", "gbk", "utf_8")}
    assert statuses == dict.fromkeys(statuses, 200), (statuses, why)
