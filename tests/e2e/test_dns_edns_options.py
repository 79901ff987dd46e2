"""A query whose EDNS option dnspython cannot read (a red team, session 48): a client
subnet with a 64-bit IPv4 prefix, a 1-byte cookie. The filter's fast path walked the
options by their lengths alone and forwarded the query; when the answer needed the
full filter (a private address to remove), the query was read again by dnspython,
which raised: SERVFAIL, an `internal_error` event in place of `dns_rebinding` without
the address, and a traceback in the gateway's log for every such query (35 lines
each, at the sandbox's whole query rate). Now such a query is answered FORMERR
(`dns_malformed`) and nothing is forwarded; a well-formed option changes nothing.
"""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import dig

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: internal.test
        id: edns-internal
"""
BAD_SUBNET = "+ednsopt=8:00014000"  # family 1 (IPv4), source prefix 64
BAD_COOKIE = "+ednsopt=10:00"  # 1 byte: a client cookie is 8
GOOD_SUBNET = "+subnet=10.0.0.0/8"


def test_a_malformed_edns_option_is_refused_not_a_traceback(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = sandbox.run(net, tmp_path, {
        "plain": dig("internal.test"),
        "good_subnet": dig(GOOD_SUBNET, "internal.test"),
        "bad_subnet": dig(BAD_SUBNET, "internal.test"),
        "bad_cookie": dig("+nocookie", BAD_COOKIE, "internal.test"),
        "bad_subnet_tcp": dig("+tcp", BAD_SUBNET, "internal.test"),
    }, rules=rules)  # fmt: skip
    why = r.describe()
    for label in ("plain", "good_subnet"):
        assert r[label].dns_status == "NOERROR" and r[label].dns_answers == [], (label, why)
    for label in ("bad_subnet", "bad_cookie", "bad_subnet_tcp"):
        assert r[label].dns_status == "FORMERR", (label, why)
    events = r.events(kind="dns", name="internal.test")
    rebinding = [e for e in events if e["reason"] == "dns_rebinding"]
    assert len(rebinding) == 2 and all("10.99.0.10" in e["detail"] for e in rebinding), why
    malformed = r.events(kind="dns", reason="dns_malformed")
    assert len(malformed) == 3, why
    assert not r.events(reason="internal_error"), why
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert net.dns_queries_seen().count("internal.test") == 2, net.dns_queries_seen()
