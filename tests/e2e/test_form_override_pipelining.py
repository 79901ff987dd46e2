"""Forms pipelined on one keep-alive connection are each read and decided on their
own (a red team, session 53, tried these; they held, and are kept as cover).

Several requests written at once on one connection (plain HTTP, both gateway paths):
two forms, the second with `_method=DELETE`; the same after a 1.5 MB form (streamed
but for its last byte, longer than WHOLE_FORM); after an `Expect: 100-continue` form;
and three forms, the third with the override. The gateway refuses each override and
the server (Rack's MethodOverride) never runs DELETE, while the forms before it run
as POSTs (the control).
"""

from __future__ import annotations

import base64

import pytest
from support import sandbox
from test_form_method_overrides import PLAIN, RULES, rack_origin  # noqa: E402

pytestmark = pytest.mark.e2e

SCRIPT = r"""
import socket, sys, time
def req(body, extra=b""):
    return (b"POST /items/1 HTTP/1.1\r\nHost: allowed.test:%d\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n" % PORT
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)
PORT = int(sys.argv[1]); case = sys.argv[2]
big = b"x=" + b"a" * 1_500_000
cases = {
  "two": req(b"a=1") + req(b"_method=DELETE"),
  "after_big": req(big) + req(b"_method=DELETE"),
  "expect_then": req(b"a=1", b"Expect: 100-continue\r\n") + req(b"_method=DELETE"),
  "three": req(b"a=1") + req(b"b=2") + req(b"c=3&_method=DELETE"),
}
s = socket.create_connection(("allowed.test", PORT), timeout=10)
s.sendall(cases[case])
got = b""
try:
    while True:
        d = s.recv(65536)
        if not d: break
        got += d
except socket.timeout:
    pass
print(case, got.count(b"HTTP/1.1 200"), got.count(b"HTTP/1.1 400"), got.count(b"ran DELETE"))
"""


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_pipelined_forms_are_decided_each(net, tmp_path, profile):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    code = base64.b64encode(SCRIPT.encode()).decode()
    steps = {"resolve": sandbox.dig("allowed.test"), "write": f"echo {code} | base64 -d > pipe.py"}
    forms_before = {"two": 1, "after_big": 1, "expect_then": 1, "three": 2}  # the override's
    for case in forms_before:
        steps[case] = f"timeout 20 python3 pipe.py {PLAIN} {case}"
    with servers:
        result = sandbox.run(net, tmp_path, steps, rules=rules, extra=("--profile", profile))
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    # each case's client saw: its forms before the override answered 200, the override 400
    seen = {case: tuple(map(int, result[case].out.split()[1:])) for case in forms_before}
    assert seen == {case: (n, 1, 0) for case, n in forms_before.items()}, why
    assert ran.count("ran POST /items/1") == sum(forms_before.values()), why  # the controls
    assert "DELETE" not in ran, why
