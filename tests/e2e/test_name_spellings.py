"""What tests/unit/test_policy_differential.py found, through the real gateway.

- An `ask` rule for an address vouched for an allowed name at that address: SNI (or
  Host) `allowed.test` sent to an address the gateway's DNS never gave for it, and
  that only an ask rule names, was allowed outright, unasked (a spoof). Now it is
  `spoofed_destination`, and the server at that address gets nothing.
- Spellings of a name no rule allows, in a plain-HTTP Host to an allowed address
  (case, trailing dot, Unicode dots, fullwidth letters, percent-encoding): every
  layer reads them as that name or as no name, so each is refused and no server
  sees the request.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import curl, dig

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"  # allowed.test
EVIL_IP = "203.0.113.66"  # evil.test

SPOOFED = ("deny", "spoofed_destination", "builtin:spoofed-destination")

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        id: names-allowed
      - ask: {EVIL_IP}
        id: names-ask-evil-address
"""

# Host spellings of evil.test (no rule allows it), each sent to allowed.test's address.
EVIL_HOSTS = {
    "upper_dot": "EVIL.TEST.",
    "ideographic_dot": "evil\u3002test",
    "fullwidth_dot": "evil\uff0etest",
    "halfwidth_dot": "evil\uff61test",
    "fullwidth_letters": "\uff25\uff36\uff29\uff2c.test",
    "percent_dot": "evil%2etest",
    "escaped_dot_label": "evil\\.test.allowed.test",
}


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


def test_ask_rule_for_an_address_does_not_vouch_for_an_allowed_name(net, tmp_path):
    rules = tmp_path / "names.yaml"
    rules.write_text(RULES)
    steps = {
        "resolve": dig("allowed.test"),
        "https": curl("--resolve", f"allowed.test:443:{EVIL_IP}", "https://allowed.test/"),
        "http": curl("--resolve", f"allowed.test:80:{EVIL_IP}", "http://allowed.test/"),
    }
    for label, host in EVIL_HOSTS.items():
        steps[f"host_{label}"] = curl("-H", f"Host: {host}", "http://allowed.test/")
    r = sandbox.run(net, tmp_path, steps, rules=rules)

    assert r["resolve"].dns_answers == [ALLOWED_IP], r.describe()
    # Before the fix both were allowed by names-allowed and reached EVIL_IP.
    assert (r["https"].rc, r["https"].status) == (35, 0), r.describe()
    assert r["http"].status == 403 and "spoofed_destination" in r["http"].body, r.describe()
    assert r.verdicts(kind="connection", name="allowed.test", dst_ip=EVIL_IP) == {SPOOFED}
    for label in EVIL_HOSTS:
        assert r[f"host_{label}"].status == 403, (label, r.describe())
    # No server saw any request: not the spoofed address, not allowed.test's.
    assert net.requests_seen() == []
