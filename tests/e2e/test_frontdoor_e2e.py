"""What the front door adds to the gateway, end to end (`sandgate run` in the fake
internet): server-speaks-first protocols on non-web ports, and an allowed
destination that refuses the connection."""

from __future__ import annotations

import pytest
from support import sandbox
from support.sandbox import tcp_hello

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"
EVIL_IP = "203.0.113.66"

RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: ssh.allowed.test
        ports: [22, 2222]
        id: ssh
      - allow: allowed.test
        id: web
"""


def read_first(host: str, port: int) -> str:
    """Connect and only read, as an SMTP or MySQL client (or ssh waiting for the
    banner) does: print the first line the server sends. Exit 1 if none comes."""
    return tcp_hello(host, port, hello="")


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


def test_a_client_that_waits_for_the_server_gets_its_banner_if_allowed(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = sandbox.run(net, tmp_path, {
        "banner": read_first("ssh.allowed.test", 22),
        "unknown_address": read_first(EVIL_IP, 22),
        "web_port": read_first("allowed.test", 443),  # web ports wait for bytes: no decision on silence
    }, rules=rules)  # fmt: skip

    assert (r["banner"].rc, r["banner"].out.strip()) == (0, "SSH-2.0-fake"), r.describe()
    assert r["unknown_address"].rc == 1 and "closed without a byte" in r["unknown_address"].err, (
        r.describe()
    )
    assert r["web_port"].rc == 1 and "timed out" in r["web_port"].err, r.describe()
    assert net.tcp_connections_seen(ALLOWED_IP, 22) == 1
    assert net.tcp_connections_seen(EVIL_IP, 22) == 0
    assert r.verdicts(kind="connection", name="ssh.allowed.test") == {
        ("allow", "rule_allow", "ssh")
    }
    assert r.verdicts(kind="connection", dst_ip=EVIL_IP) == {
        ("deny", "no_rule", "default:fallback")
    }
    assert r.verdicts(kind="connection", dst_port=443) == {("deny", "no_data", "builtin:no-data")}


def test_an_allowed_destination_that_refuses_resets_the_client(net, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = sandbox.run(net, tmp_path, {"refused": tcp_hello("ssh.allowed.test", 2222)}, rules=rules)

    assert r["refused"].rc == 1 and "reset" in r["refused"].err.lower(), r.describe()
    assert r.verdicts(kind="connection", dst_port=2222) == {("allow", "rule_allow", "ssh")}
    (end,) = r.events(kind="connection_end", dst_port=2222)
    assert (end.get("bytes_up", 0), end.get("bytes_down", 0)) == (0, 0)
    assert end["detail"].endswith("; upstream connect failed: Connection refused")
