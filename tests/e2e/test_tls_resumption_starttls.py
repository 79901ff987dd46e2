"""A red team (session 49): a resumed TLS 1.2 session is checked against the FIRST ClientHello
of the connection, not the one the server resumed from.

gate.on_resumed() reads the ticket / session id from `state.client_hello`; a hello
decided as a second one (`_second_hello`: after a server answer that was not TLS, a
STARTTLS dialogue) leaves `state.client_hello` as the first hello. So a task sends as
its first bytes a ClientHello (SNI allowed.test) offering its OWN ticket, issued
through the gateway for allowed.test at this address and port; the STARTTLS server
answers it with SMTP text (500), the task says STARTTLS and sends a second hello, same
SNI, resuming the forbidden tenant's session (a ticket got elsewhere). The server
resumes that one and serves the session's name; the gate checks the first hello's
ticket, finds it issued for (allowed.test, ip, port), and lets it go.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import sandbox
from support.servers import internet_servers

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
DISPATCH = HERE / "sni_router" / "sni_dispatch.py"
RELAY = HERE / "tls_resumption" / "prefix_relay.py"
PY = sandbox.SANDBOX_PYTHON
IP = "203.0.113.10"
PORT = 2525
FORBIDDEN = "www.allowed.test"
REQ = "GET {path} HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n"

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: allowed.test
        ports: [{PORT}]
        id: tenant-allowed
"""


def s_client(path: str, connect: str, *options: str) -> str:
    return (
        f"printf '{REQ.format(path=path)}' | timeout 10 openssl s_client -quiet -tls1_2 "
        f"-connect {connect} {' '.join(options)}"
    )


def test_second_hello_after_starttls_resumes_the_forbidden_session(net, tmp_path):
    cert, key = str(net.workdir / "server.pem"), str(net.workdir / "server.key")
    log = tmp_path / "tenants.log"
    log.touch()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    inside = ["ip", "netns", "exec", net.internet_ns]
    tenants = ["allowed.test=ALLOWED-TENANT", f"{FORBIDDEN}=FORBIDDEN-TENANT"]
    dispatch = [PY, str(DISPATCH), "--starttls", IP, str(PORT), cert, key, str(log), *tenants]
    with internet_servers(net, [dispatch], [f"{IP}:{PORT}"]):
        forbidden = tmp_path / "forbidden.sess"
        got = subprocess.run(
            [*inside, "sh", "-c", s_client("/accomplice", f"{IP}:{PORT}", "-starttls smtp",
             f"-servername {FORBIDDEN}", f"-sess_out {forbidden}")],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert "SECRET of FORBIDDEN" in got.stdout, got.stdout + got.stderr
        relay = f"{PY} prefix_relay.py"
        steps = {
            "resolve": sandbox.dig("allowed.test"),
            # Honest: STARTTLS to the allowed tenant; its ticket is issued through the gateway.
            "honest": s_client("/honest", f"{IP}:{PORT}", "-starttls smtp",
                               "-servername allowed.test", "-sess_out honest.sess"),
            # Control: the forbidden session resumed plainly after STARTTLS is refused.
            "direct": s_client("/direct", f"{IP}:{PORT}", "-starttls smtp",
                               "-servername allowed.test", "-sess_in forbidden.sess"),
            # The task's own ticket, in a ClientHello kept in a file (not sent anywhere).
            "capture": f"{relay} capture 5001 hello1.bin & sleep 0.5; "
            "timeout 5 openssl s_client -tls1_2 -connect 127.0.0.1:5001 "
            "-servername allowed.test -sess_in honest.sess </dev/null >/dev/null 2>&1; "
            "wait; od -An -tx1 -N6 hello1.bin",
            # The attack: hello #1 (own ticket) first, SMTP 500, STARTTLS, hello #2
            # resuming the forbidden session, same SNI.
            "attack": f"{relay} relay 5002 {IP} {PORT} hello1.bin & sleep 0.5; "
            + s_client("/attack", "127.0.0.1:5002", "-servername allowed.test",
                       "-sess_in forbidden.sess") + "; wait",
        }  # fmt: skip

        def setup(d):
            shutil.copy(forbidden, d / "forbidden.sess")
            shutil.copy(RELAY, d / "prefix_relay.py")

        result = sandbox.run(net, tmp_path, steps, rules=rules, setup=setup)
    tenants = log.read_text()
    why = f"{result.describe()}\ntenants:\n{tenants}"
    # Controls: the honest STARTTLS reaches the allowed tenant; the plain resumption of
    # the forbidden session after STARTTLS is refused (the fix works for one hello).
    assert "SECRET of ALLOWED" in result["honest"].out, why
    assert "SECRET of FORBIDDEN" not in result["direct"].out, why
    assert "/direct" not in tenants, why
    assert "16 03" in result["capture"].out, why
    # The secure behaviour: the second hello's resumption of the forbidden session is
    # refused too; the forbidden tenant never serves the task.
    assert "SECRET of FORBIDDEN" not in result["attack"].out, why
    assert not [
        line for line in tenants.splitlines() if "FORBIDDEN" in line and "/attack" in line
    ], why
