"""An address the gateway cannot listen on stops its start (rt45 F7, docs/operations.md
"Listening addresses"): another local user who took the admin port first would get the
approvers' tokens, and on the metrics port answer Prometheus (`sandgate_audit_writable
1`: alerts silenced). The service (its defaults included) and a run given the address
explicitly exit 125 naming the option and what to do; an embedded run on the default
admin address moves to a free port and prints it, as before."""

from __future__ import annotations

import pwd
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import curl
from support.service import GatewayProcess

pytestmark = pytest.mark.e2e

RULES = (
    "version: 1\nprofiles:\n  default:\n    fallback: ask\n    rules:\n      - deny: evil.test\n"
)

SQUATTER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"squatter")
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"session":"x"}')
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

ADMIN_PORT, METRICS_PORT = 9475, 9474  # not the defaults: other tests' services use those


@pytest.fixture
def squatted(net):
    """`nobody`'s HTTP servers on the two ports, in the fake internet's host netns."""
    nobody = pwd.getpwnam("nobody")
    enter = ["nsenter", f"--net={sandbox.NETNS_DIR / net.host_ns}", "--",
             "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]  # fmt: skip
    squatters = [
        subprocess.Popen(enter + ["/usr/bin/python3", "-c", SQUATTER, str(port)])
        for port in (ADMIN_PORT, METRICS_PORT)
    ]
    probe = ["nsenter", f"--net={sandbox.NETNS_DIR / net.host_ns}", "--", "curl", "-s"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answers = [
            subprocess.run(probe + [f"http://127.0.0.1:{p}/"], capture_output=True, text=True)
            for p in (ADMIN_PORT, METRICS_PORT)
        ]
        if all(a.stdout == "squatter" for a in answers):
            break
        time.sleep(0.05)
    try:
        yield
    finally:
        for squatter in squatters:
            squatter.kill()
            squatter.wait()


@pytest.mark.parametrize(
    "option, port",
    [("--admin-listen", ADMIN_PORT), ("--metrics-listen", METRICS_PORT)],
)
def test_the_service_does_not_start_on_a_squatted_port(net, tmp_path, squatted, option, port):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    other = "--metrics-listen" if option == "--admin-listen" else "--admin-listen"
    service = GatewayProcess(
        net, tmp_path, rules, "--workers", "1", "--warm", "0", other, "off",
        option, f"127.0.0.1:{port}",
    )  # fmt: skip
    try:
        with pytest.raises(AssertionError, match="exited with 125"):
            service.start()
        log = service.log.read_text()
        assert f"sandgate: {option} 127.0.0.1:{port}: cannot listen: Address already in use" in log
        assert f"ss -ltnp 'sport = :{port}'" in log and f"{option} off" in log
        assert not service.control.exists()
    finally:
        service.stop()


def test_a_run_given_a_squatted_address_stops_before_its_task(net, tmp_path, squatted):
    rules = tmp_path / "rules.yaml"
    for option, port in (("--metrics-listen", METRICS_PORT), ("--admin-listen", ADMIN_PORT)):
        # the page only for rules that ask
        rules.write_text(RULES if option == "--admin-listen" else RULES.replace("ask", "deny"))
        marker = tmp_path / f"ran{option}"
        workdir = sandbox._workdir(tmp_path)
        command = ["sh", "-c", f"touch {marker}; {curl('http://allowed.test/')}"]
        argv = sandbox._argv(net, workdir, command, rules, (option, f"127.0.0.1:{port}"))
        proc = net.run_in_host(argv, timeout=90)
        assert proc.returncode == 125, (proc.stdout, proc.stderr)
        assert f"{option} 127.0.0.1:{port}: cannot listen" in proc.stderr, proc.stderr
        assert not marker.exists()


def test_a_run_on_the_default_admin_address_moves_to_a_free_port(net, tmp_path):
    """Two developers' runs at once: the second's page on another port, printed."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    blocker = sandbox.start(net, tmp_path, "sleep 30", rules=rules)
    try:
        time.sleep(1.0)
        workdir = sandbox._workdir(tmp_path)
        argv = sandbox._argv(net, workdir, ["true"], rules, ())
        proc = net.run_in_host(argv, timeout=90)
        assert proc.returncode == 0, proc.stderr
        assert "sandgate: approvals page on http://127.0.0.1:" in proc.stderr, proc.stderr
    finally:
        blocker.popen.terminate()  # forwarded to the task: the run ends and cleans up
        blocker.popen.communicate(timeout=60)
