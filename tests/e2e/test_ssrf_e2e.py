"""A task aiming the gateway at the inside (the host's, the network's) under rules an
admin wrote broadly: `0.0.0.0/0` opens the public internet, never the metadata address
or a private range (docs/rules.md, "Private ranges"), whatever the task puts in the
Host header or the request target. The fake internet's nginx on 169.254.169.254 and
10.99.0.10 records whether anything reached them."""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import curl

pytestmark = pytest.mark.e2e

METADATA_IP = "169.254.169.254"
INTERNAL_IP = "10.99.0.10"
PUBLIC_IP = "203.0.113.10"

BROAD_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: [0.0.0.0/0]
        id: everything
"""


def test_a_broad_cidr_rule_opens_no_private_address_in_any_spelling_or_header(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(BROAD_RULES)
    r = sandbox.run(net, tmp_path, {
        "metadata": curl(f"http://{METADATA_IP}/latest/meta-data/"),
        "metadata_decimal": curl("http://2852039166/latest/meta-data/"),
        "metadata_https": curl("-k", f"https://{METADATA_IP}/"),
        "internal": curl(f"http://{INTERNAL_IP}/"),
        # A public destination, naming the inside in Host or an absolute-form target:
        # the gateway connects to the original destination, and refuses the mismatch.
        "host_header": curl("-H", f"Host: {METADATA_IP}", f"http://{PUBLIC_IP}/latest/"),
        "absolute_form": curl(
            "--request-target", f"http://{METADATA_IP}/latest/", f"http://{PUBLIC_IP}/"
        ),
        "public": curl(f"http://{PUBLIC_IP}/ok"),
    }, rules=rules)  # fmt: skip

    assert r["public"].status == 200, r.describe()  # the rule does open the internet
    for label in ("metadata", "metadata_decimal", "metadata_https", "internal"):
        assert r[label].status in (0, 403), r.describe()
    for label in ("host_header", "absolute_form"):
        assert r[label].status in (400, 403), r.describe()
    assert net.requests_seen(METADATA_IP) == [] and net.requests_seen(INTERNAL_IP) == []
    # Only the plain request reached the public server: nothing naming the inside.
    assert [(e["host"], e["uri"]) for e in net.requests_seen(PUBLIC_IP)] == [(PUBLIC_IP, "/ok")]
    assert r.verdicts(kind="connection", dst_ip=METADATA_IP) == {
        ("deny", "private_address", "builtin:private-address")
    }
    assert r.verdicts(kind="connection", dst_ip=INTERNAL_IP) == {
        ("deny", "private_address", "builtin:private-address")
    }
