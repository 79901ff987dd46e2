"""A plaintext ClientHello that is not the connection's first bytes is decided before
the upstream gets it (proxy/frontdoor/hello_watch.py), from the red-team report
rt45/network, findings 1 and 2:

- after a TLS 1.3 HelloRetryRequest the client's second ClientHello must name the
  server its first named and hide none (ECH); OpenSSL servers (the fake internet's
  nginx) route by the second one. Pipelined before the retry arrives, it is held;
- on a raw-TCP port, a ClientHello after a client-first preamble (PostgreSQL's
  SSLRequest) is decided as a first one: an SNI-routing server never serves a tenant
  the gateway refuses.

And from its second round: a hello in any record version Go's crypto/tls takes
(`16 00 01 ...`) is TLS to the gate and to the watch; after a server's answer that
is not TLS, a later hello is looked for in a window of its own (not what is left of
the connection's first 16 KiB).

Each attack asserts that the forbidden server got nothing (its log) and that the
audit log has the denial; the honest variants still work end to end. The client
scripts (hello_later/) run inside the sandbox with /usr/bin/python3."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent / "hello_later"
PY = sandbox.SANDBOX_PYTHON
RESOLVE = f"{PY} -c \"import socket; print(socket.gethostbyname('allowed.test'))\""


def _copy_clients(steps: Path) -> None:
    for name in ("hrr_client.py", "pg_client.py", "hello_sender.py"):
        shutil.copy(HERE / name, steps / name)


def _hrr(first: str, second: str, path: str, mode: str = "") -> str:
    return f"{PY} hrr_client.py 203.0.113.10 443 {first} {second} {second} {path} {mode}"


def _denials(result, **fields) -> list[tuple]:
    return [
        (e.get("reason"), e.get("rule_id"), e.get("name"))
        for e in result.events(kind="connection", verdict="deny", **fields)
    ]


def test_a_second_client_hello_after_a_retry_is_decided(net, tmp_path):
    steps = {
        "resolve": RESOLVE,
        # honest: the retry's hello names the same server, the handshake completes
        "honest": _hrr("allowed.test", "allowed.test", "/later-honest"),
        "honest_pipelined": _hrr("allowed.test", "allowed.test", "/later-honest-pl", "pipelined"),
        # the attacks: another name, or ECH, in the second hello
        "changed": _hrr("allowed.test", "evil.test", "/later-changed"),
        "pipelined": _hrr("allowed.test", "evil.test", "/later-pipelined", "pipelined"),
        "ech": _hrr("allowed.test", "allowed.test", "/later-ech", "ech"),
        # ordinary HTTPS pass-through is as it was
        "curl": sandbox.curl("https://allowed.test/"),
    }
    result = sandbox.run(net, tmp_path, steps, setup=_copy_clients)
    seen = {e["uri"]: e for e in net.requests_seen("203.0.113.10")}
    why = f"{result.describe()}\nnginx saw: {sorted(seen)}"
    assert result["honest"].rc == 0 and "/later-honest" in seen, why
    assert seen["/later-honest"]["sni"] == "allowed.test"
    assert result["honest_pipelined"].rc == 0 and "/later-honest-pl" in seen, why
    assert result["curl"].status == 200, why
    for label in ("changed", "pipelined", "ech"):
        assert result[label].rc != 0, why
        assert f"/later-{label}" not in seen, why  # the server served nothing
    assert not any(e.get("sni") == "evil.test" for e in seen.values()), why
    denials = _denials(result)
    assert (
        denials.count(("spoofed_destination", "builtin:client-hello-changed", "evil.test")) == 2
    ), why
    assert ("protocol_not_allowed", "builtin:encrypted-client-hello", "allowed.test") in denials
    changed = result.events(kind="connection", rule_id="builtin:client-hello-changed")
    assert all("HelloRetryRequest" in e["detail"] for e in changed), changed
    assert not result.events(name="evil.test", verdict="allow"), why


PG_RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [5432]
        id: team-database
"""


def test_a_client_hello_after_a_postgres_preamble_is_decided(net, tmp_path):
    log = tmp_path / "pg.log"
    rules = tmp_path / "rules.yaml"
    rules.write_text(PG_RULES)
    server = subprocess.Popen(
        [
            "ip", "netns", "exec", net.internet_ns, PY, str(HERE / "pg_sni_server.py"),
            "203.0.113.10", "5432", str(net.workdir / "server.pem"),
            str(net.workdir / "server.key"), str(log),
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and "ready" in log.read_text()):
            assert time.monotonic() < deadline, "the Postgres stand-in did not start"
            time.sleep(0.05)
        steps = {
            "resolve": RESOLVE,
            "honest": f"{PY} pg_client.py 203.0.113.10 5432 allowed.test preamble",
            "direct": f"{PY} pg_client.py 203.0.113.10 5432 evil.test direct",
            "preamble": f"{PY} pg_client.py 203.0.113.10 5432 evil.test preamble",
        }
        result = sandbox.run(net, tmp_path, steps, rules=rules, setup=_copy_clients)
    finally:
        server.terminate()
        server.wait(5)
    text = log.read_text()
    why = f"{result.describe()}\nserver log:\n{text}"
    assert result["honest"].rc == 0, why
    assert "tenant=allowed.test data=b'SECRET-allowed.test-preamble'" in text, why
    assert result["direct"].rc != 0 and result["preamble"].rc != 0, why
    assert "evil.test" not in text, why  # the forbidden tenant never saw a hello
    assert ("no_rule", "default:fallback", "evil.test") in _denials(result, protocol="tls"), why
    assert len(_denials(result, name="evil.test")) == 2, why  # direct, and after the preamble
    # The honest hello got its own decision, naming the server it asked for.
    assert result.events(kind="connection", verdict="allow", name="allowed.test", protocol="tls")
    assert not result.events(name="evil.test", verdict="allow"), why


SNI_RULES = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [7011]
        id: team-router
"""


def test_a_hello_in_any_record_version_or_after_a_non_tls_answer_is_decided(net, tmp_path):
    """An SNI router on Go's crypto/tls at a raw-TCP port, allowed by allowed.test's
    DNS binding; it answers each hello with a line that is not TLS. A hello in a
    record version no client sends (Go takes any below 0x1000) is TLS, not raw TCP,
    and refused whatever it names (HAProxy's and nginx's SNI readers find no name
    in it: clienthello.RECORD_VERSIONS)."""
    log = tmp_path / "router.log"
    rules = tmp_path / "rules.yaml"
    rules.write_text(SNI_RULES)
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.internet_ns, PY, str(HERE / "sni_logger.py"),
         "203.0.113.10", "7011", str(log)]
    )  # fmt: skip
    send = f"{PY} hello_sender.py 203.0.113.10 7011"
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and "ready" in log.read_text()):
            assert time.monotonic() < deadline, "the SNI router stand-in did not start"
            time.sleep(0.05)
        steps = {
            "resolve": RESOLVE,
            "honest": f"{send} 0301 0 allowed.test",
            # the connection's first bytes, a hello in record version 0x0001
            "honest_odd": f"{send} 0001 0 allowed.test",
            "odd_first": f"{send} 0001 0 evil-odd.test",
            # after raw-TCP lines, a hello in record version 0x0200
            "odd_later": f"{send} 0200 300 evil-later.test",
            # a first hello ending past the first 16 KiB, the server's 220, another
            "window": f"{send} 0301 16300 allowed.test evil-window.test",
        }
        result = sandbox.run(net, tmp_path, steps, rules=rules, setup=_copy_clients)
    finally:
        server.terminate()
        server.wait(5)
    text = log.read_text()
    why = f"{result.describe()}\nrouter log:\n{text}"
    assert result["honest"].rc == 0, why
    assert text.count("hello for tenant=allowed.test") == 2, why  # honest, window
    for label in ("honest_odd", "odd_first", "odd_later", "window"):
        assert result[label].rc != 0, why
    assert "evil" not in text, why  # no forbidden tenant saw a hello
    versions = result.events(kind="connection", verdict="deny", reason="malformed_tls")
    assert len(versions) == 3 and all("record of version" in e["detail"] for e in versions), why
    denials = _denials(result, protocol="tls")
    assert (
        "spoofed_destination",
        "builtin:client-hello-changed",
        "evil-window.test",
    ) in denials, why
    assert not result.events(verdict="allow", name="evil-odd.test"), why
