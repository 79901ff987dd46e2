"""Inspected HTTPS/1.1 served by the front door itself (proxy/frontdoor/tls_relay.py),
end to end with `sandgate run` in the fake internet; clients offering only h2 still
go to mitmproxy.

Which path served a connection shows in the HTTP version a client that offers h2
and http/1.1 gets: the front door speaks HTTP/1.1, mitmproxy would choose h2 (the
`mitmproxy` case runs the same client with SANDGATE_INSPECT_ENGINE=mitmproxy)."""

from __future__ import annotations

import os

import pytest
from support import sandbox
from support.sandbox import curl, py_get
from test_http_hardening import copy_h2, h2_request, raw, settled_requests, status

pytestmark = pytest.mark.e2e

API_IP = "203.0.113.11"  # api.allowed.test: inspected, GET/HEAD on /public/** only
API = b"Host: api.allowed.test\r\n"


def versioned(url: str, *args: str) -> str:
    """curl offering h2 and http/1.1; prints the body, the HTTP version, the status."""
    return curl("--http2", "-w", "\\n%{http_version}\\n%{http_code}", *args, url)


def test_inspected_requests_are_decided_in_the_front_door_speaking_http_1_1(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "get": versioned("https://api.allowed.test/public/x"),
        "keep_alive": curl("https://api.allowed.test/public/a", "https://api.allowed.test/private"),
        "python_get": py_get("https://api.allowed.test/public/y"),
        "private": versioned("https://api.allowed.test/private"),
        "post": curl("-X", "POST", "-d", "secret=1", "https://api.allowed.test/public/x"),
    })  # fmt: skip

    assert r["get"].out.split("\n")[-2:] == ["1.1", "200"], r.describe()
    assert r["python_get"].status == 200, r.describe()
    assert r["private"].out.split("\n")[-2:] == ["1.1", "403"], r.describe()
    assert "path_not_allowed" in r["private"].out
    assert r["post"].status == 403 and "method_not_allowed" in r["post"].body
    # One connection, two requests, each decided: the second refused.
    assert r["keep_alive"].out.count("Blocked by sandgate") == 1, r.describe()
    seen = settled_requests(net, API_IP)
    assert sorted((e["method"], e["uri"], e["sni"]) for e in seen) == [
        ("GET", "/public/a", "api.allowed.test"),
        ("GET", "/public/x", "api.allowed.test"),
        ("GET", "/public/y", "api.allowed.test"),
    ]
    api = {"kind": "request", "name": "api.allowed.test", "protocol": "https"}
    assert r.verdicts(**api, path="/public/x", method="GET") == {
        ("allow", "rule_allow", "demo-api-read-only")
    }
    assert r.verdicts(**api, path="/private") == {("deny", "path_not_allowed", "default:fallback")}
    assert r.verdicts(**api, method="POST") == {("deny", "method_not_allowed", "default:fallback")}


def test_the_switch_hands_inspection_back_to_mitmproxy(net, tmp_path):
    r = sandbox.run(
        net,
        tmp_path,
        {"get": versioned("https://api.allowed.test/public/x")},
        env={**os.environ, "SANDGATE_INSPECT_ENGINE": "mitmproxy"},
    )
    assert r["get"].out.split("\n")[-2:] == ["2", "200"], r.describe()


def test_an_upstream_the_gateway_cannot_verify_gets_nothing_and_the_client_a_502(net, tmp_path):
    # Without --extra-ca the gateway does not trust the fake internet's CA.
    r = sandbox.run(
        net,
        tmp_path,
        {"get": curl("https://api.allowed.test/public/secret")},
        fakenet_ca=False,
    )
    assert r["get"].status == 502, r.describe()
    assert "certificate verify failed" in r["get"].body
    assert settled_requests(net, API_IP) == []
    ends = [e for e in r.events(kind="connection_end") if e.get("name") == "api.allowed.test"]
    assert any("certificate verify failed" in e["detail"] for e in ends), r.describe()


def test_a_client_offering_only_h2_is_served_by_mitmproxy(net, tmp_path):
    r = sandbox.run(net, tmp_path, {
        "ok": h2_request(path=b"/public/ok"),
        "private": h2_request(path=b"/private"),
    }, setup=copy_h2)  # fmt: skip
    assert (r["ok"].out.strip(), r["private"].out.strip()) == ("200", "403"), r.describe()
    seen = settled_requests(net, API_IP)
    assert [(e["uri"], e["protocol"]) for e in seen] == [("/public/ok", "HTTP/2.0")], seen


def test_smuggling_shaped_requests_over_tls_are_refused_as_in_plain_http(net, tmp_path):
    te_cl = (
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private HTTP/1.1\r\n"
    )
    r = sandbox.run(net, tmp_path, {
        "te_cl": raw("api.allowed.test", 443, b"GET /public/a HTTP/1.1\r\n" + API + te_cl, tls=True),
        "two_lengths": raw("api.allowed.test", 443, b"GET /public/b HTTP/1.1\r\n" + API + b"Content-Length: 0\r\nContent-Length: 5\r\n\r\n", tls=True),
        "bare_lf": raw("api.allowed.test", 443, b"GET /public/c HTTP/1.1\n" + API + b"X: a\rGET /private\r\n\r\n", tls=True),
        "second_host": raw("api.allowed.test", 443, b"GET /public/d HTTP/1.1\r\n" + API + b"Host: evil.test\r\n\r\n", tls=True),
    })  # fmt: skip
    for label in ("te_cl", "two_lengths", "bare_lf", "second_host"):
        assert status(r[label]) in (400, 403), (label, r.describe())
    assert [e["uri"] for e in settled_requests(net, API_IP)] == []
    assert not r.events(kind="request", verdict="allow"), r.describe()
