"""A red team (session 49): honest clients (curl, wget, Python requests as pip vendors it, git,
pip) through the gateway to the Host router of tests/e2e/test_host_router.py
(HAProxy, `req.hdr(host) -m str`): each reaches the allowed tenant, none is refused,
with the Host forwarded as decided (`allowed.test.` goes on as allowed.test)."""

from __future__ import annotations

import shlex

import pytest
from test_host_router import RULES_DOOR, RULES_MITM, allowed_got, forbidden_got, routed

pytestmark = pytest.mark.e2e

REQ = "import sys; from pip._vendor import requests; print(requests.get(sys.argv[1], timeout=8).status_code)"


def py(url: str) -> str:
    return f"/usr/bin/python3 -c {shlex.quote(REQ)} {url}"


@pytest.mark.parametrize("rules", [RULES_MITM, RULES_DOOR], ids=["mitmproxy", "frontdoor"])
def test_honest_clients_reach_the_allowed_tenant(net, tmp_path, rules):
    steps = {
        "curl_plain": "curl -sS http://allowed.test:8088/curl_plain",
        "curl_dot": "curl -sS http://allowed.test.:8088/curl_dot",
        "curl_h2": "curl -sS --http2 https://allowed.test:8443/curl_h2",
        "curl_h1": "curl -sS --http1.1 https://allowed.test:8444/curl_h1",
        "wget": "wget -q -O - https://allowed.test:8444/wget",
        "requests_plain": py("http://allowed.test:8088/requests_plain"),
        "requests_tls": py("https://allowed.test:8443/requests_tls"),
        "git_plain": "git ls-remote http://allowed.test:8088/git_plain.git; true",
        "git_tls": "git ls-remote https://allowed.test:8444/git_tls.git; true",
        "pip_tls": "/usr/bin/python3 -m pip download -q --no-deps -d /tmp/p "
        "--index-url https://allowed.test:8444/pip_tls/ nothing; true",
    }
    result, tenants = routed(net, tmp_path, rules, steps)
    why = f"{result.describe()}\ntenants:\n{tenants}"
    assert forbidden_got(tenants) == [], why
    got = allowed_got(tenants) | {
        line.split("request='")[1].split()[1].split("?")[0]
        for line in tenants.splitlines()
        if line.startswith("ALLOWED-HTTP-TENANT got") and "request='GET " not in line
    }
    for path in ("/curl_plain", "/curl_dot", "/curl_h2", "/curl_h1", "/wget",
                 "/requests_plain", "/requests_tls"):  # fmt: skip
        assert path in got, (path, why)
    assert any(p.startswith("/git_plain.git") for p in got), why
    assert any(p.startswith("/git_tls.git") for p in got), why
    assert any(p.startswith("/pip_tls/") for p in got), why
    assert [e for e in result.events(kind="request") if e["verdict"] != "allow"] == [], why
