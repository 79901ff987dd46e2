"""Plain HTTP decided in the front door (proxy/frontdoor/http1.py), end to end: a
task whose rules neither inspect TLS nor ask nor allow websockets never starts
mitmproxy, and still gets every request decided, refused and answered as before.
A profile that allows websockets still goes to mitmproxy."""

from __future__ import annotations

import shlex

import pytest
from support import sandbox
from support.sandbox import SYSTEM_BUNDLE_ONLY, curl, eventually

pytestmark = pytest.mark.e2e

PLAIN_RULES = (
    "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n        id: web\n"
)


def keep_alive(*urls: str, host: str | None = None) -> str:
    """curl: each URL on one connection if the gateway keeps it open; prints
    `STATUS CONNECTS` for each (CONNECTS 0: reused). `host`: the last one's Host."""
    common = ["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"]
    argv = ["curl"]
    for i, url in enumerate(urls):
        extra = ["-H", f"Host: {host}"] if host and i == len(urls) - 1 else []
        argv += [*(["--next"] if i else []), *common, *extra, url]
    return f"{SYSTEM_BUNDLE_ONLY} " + " ".join(shlex.quote(a) for a in argv)


def test_plain_http_is_decided_without_mitmproxy_request_by_request(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(PLAIN_RULES)
    r = sandbox.run(net, tmp_path, {
        "three": keep_alive("http://allowed.test/k1", "http://allowed.test/k2", "http://allowed.test/k3"),
        # the third request on the connection names a host no rule allows
        "spoofed": keep_alive("http://allowed.test/s1", "http://allowed.test/s2", host="evil.test"),
        "post": curl("--data-binary", "@body.bin", "http://allowed.test/upload"),
    }, rules=rules, extra=("-v",),
       setup=lambda ws: (ws / "body.bin").write_bytes(b"b" * 300_000))  # fmt: skip

    assert "mitmproxy started" not in r.stderr, r.describe()
    assert r["three"].out.split() == ["200", "1", "200", "0", "200", "0"], r.describe()
    assert r["spoofed"].out.split()[:3] == ["200", "1", "403"], r.describe()
    assert r["post"].status in (200, 405), r.describe()  # nginx's static server may refuse POST
    eventually(lambda: len(net.requests_seen()) >= 6, timeout=3)
    uris = [e["uri"] for e in net.requests_seen()]
    assert sorted(uris) == ["/k1", "/k2", "/k3", "/s1", "/upload"], uris
    allowed = {e["path"] for e in r.events(kind="request", verdict="allow")}
    assert allowed == {"/k1", "/k2", "/k3", "/s1", "/upload"}
    assert {(e["path"], e["name"]) for e in r.events(kind="request", verdict="deny")} == {
        ("/s2", "evil.test")
    }


def test_a_profile_with_a_websocket_rule_still_goes_to_mitmproxy(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(PLAIN_RULES + "      - allow: www.allowed.test\n        websocket: true\n")
    r = sandbox.run(net, tmp_path, {"get": curl("http://allowed.test/ws-profile")},
                    rules=rules, extra=("-v",))  # fmt: skip
    assert r["get"].status == 200, r.describe()
    assert "mitmproxy started" in r.stderr, r.describe()
