"""A form body's method override is decided for a request held for a human's
approval too (an `ask` rule, mitmproxy's path): the body comes while the request is
held, and an approval does not let a refused override through.

Rules: POST to allowed.test is asked for, GET allowed, nothing else. Steps, one after
another: an honest form POST, held and approved, runs as POST; a form whose
`_method=DELETE` came with its head is refused at once (no approval is asked); a form
of 300 KB whose `_method=DELETE` comes at its end is held, and refused (400) when its
end is read, with no one's approval. The origin is Rack's
MethodOverride on WEBrick (test_form_method_overrides.py): it never runs DELETE.
"""

from __future__ import annotations

import pytest
from support.sandbox import curl
from support.service import GatewayProcess
from test_approvals_e2e import Task
from test_form_method_overrides import URLS, rack_origin

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 40s}
    rules:
      - ask: allowed.test
        id: ask-post
        ports: [8088]
        methods: [POST]
      - allow: allowed.test
        id: get
        ports: [8088]
        methods: [GET]
"""


def test_a_held_form_cannot_run_as_a_method_the_rules_refuse(net, tmp_path):
    servers, log = rack_origin(net, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    url = URLS["plain"]
    steps = {
        "honest": curl("-d", "a=1", url, timeout=45),
        "override_with_head": curl("-d", "_method=DELETE", url, timeout=45),
        "override_at_end": (
            "python3 -c \"print('x=' + 'a' * 300_000 + '&_method=DELETE', end='')\" > big.txt"
            " && " + curl("--data-binary", "@big.txt", url, timeout=45)
        ),
    }
    service = GatewayProcess(net, tmp_path, rules).start()
    try:
        with servers:
            task = Task(service, tmp_path, steps)
            try:
                asked = task.held()  # the honest one; the others are refused while held
                approved = service.ask("approvals", "approve", asked["id"])
                assert approved.returncode == 0, approved.stdout + approved.stderr
            finally:
                result = task.finish()
    finally:
        service.stop()
    ran = log.read_text()
    why = f"{result.describe()}\nserver:\n{ran}"
    assert "ran POST /items/1" in result["honest"].out, why
    assert result["override_with_head"].status == 400, why
    assert result["override_at_end"].status == 400, why
    assert ran.splitlines() == ["ran POST /items/1"], why
