"""mitmproxy only when a connection needs it, also when the rules inspect, end to end:
a `sandgate run` whose profile checks methods and paths makes the gateway CA at its
start (without mitmproxy), serves inspected HTTPS/1.1 in the front door with
mitmproxy never imported (its Rust extension is absent from the gateway's
/proc/<pid>/maps), and an h2-only client later in the same run starts mitmproxy,
which signs with the CA the task was given at its start: the client's handshake
verifies. A profile with an `ask` rule still starts mitmproxy at the start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl, eventually
from test_http_hardening import copy_h2, h2_request, settled_requests
from test_inspected_frontdoor import API_IP, versioned

pytestmark = pytest.mark.e2e

MITMPROXY_EXTENSION = "mitmproxy_rs"  # mapped once mitmproxy's proxy server is imported


def test_inspected_https_1_1_needs_no_mitmproxy_and_an_h2_client_starts_it_later(net, tmp_path):
    state = tmp_path / "state"  # a CA of its own, made by this run's start
    run = sandbox.start(net, tmp_path, steps={
        "get": versioned("https://api.allowed.test/public/x"),
        "private": curl("https://api.allowed.test/private"),
        "wait": "touch h1done; until [ -e go ]; do sleep 0.1; done",
        "h2": h2_request(path=b"/public/h2"),
    }, env={**os.environ, "SANDGATE_STATE_DIR": str(state)}, setup=copy_h2, extra=("-v",))  # fmt: skip
    steps = run.workdir / "steps"
    try:
        eventually(lambda: (steps / "h1done").exists() or run.popen.poll() is not None, 60)
        maps = Path(f"/proc/{run.pid}/maps").read_text()
        ca_before_mitmproxy = (state / "ca" / "mitmproxy-ca-cert.pem").read_bytes()
    finally:
        (steps / "go").touch()
        r = run.finish()

    assert r.returncode == 0, r.describe()
    # HTTP/1.1, allowed and refused as before, with mitmproxy nowhere in the gateway.
    assert r["get"].out.split("\n")[-2:] == ["1.1", "200"], r.describe()
    assert r["private"].status == 403 and "path_not_allowed" in r["private"].body
    assert "mitmproxy" not in maps, "mitmproxy was loaded before any connection needed it"
    assert "/python3" in maps  # the maps read were the gateway interpreter's
    # The h2-only client started it, verified its certificate and got its answer.
    assert r["h2"].out.strip() == "200", r.describe()
    assert "starting mitmproxy for the first connection handed to it" in r.stderr, r.describe()
    assert r.stderr.count("starting mitmproxy") == 1
    seen = settled_requests(net, API_IP)
    assert sorted((e["uri"], e["protocol"]) for e in seen) == [
        ("/public/h2", "HTTP/2.0"),
        ("/public/x", "HTTP/1.1"),
    ], seen
    assert not [e for e in r.audit if e.get("reason") == "tls_rejected_by_client"], r.describe()
    assert (state / "ca" / "mitmproxy-ca-cert.pem").read_bytes() == ca_before_mitmproxy


def test_a_profile_that_asks_starts_mitmproxy_at_the_start(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        "      - allow: allowed.test\n      - ask: api.allowed.test\n"
    )
    r = sandbox.run(net, tmp_path, {"ok": "true"}, rules=rules, extra=("-v",))
    assert r["ok"].rc == 0, r.describe()
    assert "starting mitmproxy for the policy, which asks or allows websockets" in r.stderr
    assert "mitmproxy started" in r.stderr, r.describe()
