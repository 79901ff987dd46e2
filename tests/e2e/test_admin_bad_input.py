"""An admin's odd inputs, through the real CLI and a real service: each is one clear
line (naming FILE:LINE:COL for a rule file) or a refusal, never a traceback, and a
broken policy never replaces the one in force. Found by the badinput red team
(session 48); each case has its control, the same mistake one step less odd.

- `expires: 9999-12-31` ("never"): the day after it overflowed datetime (lint, show,
  check, a reload's `FILE:1:1: OverflowError`, an `always` approval's `--expires`).
- A number past int()'s 4300 digits (sys.get_int_max_str_digits) in a rule file.
- Two rules without ids on one flow-style line, refused as a YAML alias.
- An audit log, a control-socket line or an admin-page body of deeply nested JSON
  (json.loads raises RecursionError, no ValueError).
- A control client's `duration` no CLI sends (1e400 is inf in JSON).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox
from support.service import GatewayProcess

pytestmark = pytest.mark.e2e

SG = sandbox.SANDGATE
BIG = "1" * 4400
RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"


def _sg(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([SG, *argv], capture_output=True, text=True, timeout=60)


def _rules(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the CLI on rule files -----------------------------------------------------------------


def test_expires_9999_12_31_is_the_last_day_like_any_other(tmp_path):
    never = _rules(tmp_path, "never.yaml", RULES + "        expires: 9999-12-31\n")
    for argv in (
        ("rules", "lint", str(never)),
        ("rules", "show", str(never)),
        ("check", "--rules", str(never), "allowed.test"),
    ):
        result = _sg(*argv)
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.returncode == 0, (argv, result.stderr)
    assert "expires 9999-12-31" in _sg("rules", "show", str(never)).stdout


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(RULES + f"        ports: [{BIG}]\n", id="port"),
        pytest.param(RULES.replace("allowed.test", BIG), id="ip-as-number"),
        pytest.param(
            RULES.replace("    rules:", f"    limits: {{connections: {BIG}}}\n    rules:"),
            id="limit",
        ),
        pytest.param(
            RULES.replace(
                "    rules:", f"    approval: {{max_pending_per_sandbox: {BIG}}}\n    rules:"
            ),
            id="max-pending",
        ),
    ],
)
def test_a_number_of_4400_digits_in_a_rule_file_is_one_line(tmp_path, text):
    small = _rules(tmp_path, "small.yaml", text.replace(BIG, "99999999999"))
    control = _sg("rules", "lint", str(small))
    assert control.returncode == 2 and "small.yaml:" in control.stderr, control.stderr
    result = _sg("rules", "lint", str(_rules(tmp_path, "big.yaml", text)))
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2 and f"{tmp_path}/big.yaml:" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == len(control.stderr.splitlines())


def test_check_of_a_4400_digit_target_is_one_line():
    control = _sg("check", "1" * 40)
    result = _sg("check", BIG)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == control.returncode == 2, result.stderr[-300:]


def test_two_rules_on_one_flow_line_are_no_yaml_alias(tmp_path):
    flow = _rules(
        tmp_path,
        "flow.yaml",
        "version: 1\nprofiles: {default: {rules: [{allow: allowed.test}, {allow: api.allowed.test}]}}\n",
    )
    result = _sg("rules", "lint", str(flow))
    assert result.returncode == 0, result.stderr
    alias = _rules(
        tmp_path,
        "alias.yaml",
        "version: 1\nprofiles:\n  a: {rules: &r [{allow: allowed.test}]}\n  b: {rules: *r}\n",
    )
    result = _sg("rules", "lint", str(alias))
    assert result.returncode == 2 and "alias.yaml:3:" in result.stderr, result.stderr
    assert "used a second time (a YAML alias?)" in result.stderr


def test_an_audit_log_whose_last_line_is_deep_json_is_refused_in_one_line(fakenet, tmp_path):
    rules = _rules(tmp_path, "rules.yaml", RULES)
    for name, content in (("flat", "[1]\n"), ("deep", "[" * 60000 + "\n")):
        log = tmp_path / f"{name}.jsonl"
        log.write_text(content)
        argv = [
            SG, "run", "--rules", str(rules), "--dns-upstream", fakenet.dns_ip,
            "--audit-log", str(log), "--metrics-listen", "off", "--admin-listen", "off",
            "--no-workspace", "--", "true",
        ]  # fmt: skip
        result = fakenet.run_in_host(argv, timeout=60)
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "is not a sandgate audit log" in result.stderr, (name, result.stderr)
        assert log.read_text() == content  # not appended to


# --- a service: reload, control socket, admin page ----------------------------------------


@pytest.fixture
def service(fakenet, tmp_path):
    rules = tmp_path / "rules" / "rules.yaml"
    rules.parent.mkdir()
    rules.write_text(RULES)
    old = time.time() - 60
    os.utime(rules, (old, old))
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--workers", "1").start()
    try:
        yield gateway
    finally:
        gateway.stop()
    assert "Traceback" not in gateway.log.read_text(), gateway.log.read_text()[-3000:]


def _reload_with(service, text: str) -> subprocess.CompletedProcess:
    service.rules.write_text(text)
    time.sleep(0.7)  # the reloader's settle time
    return service.ask("reload")


def _control(service, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(service.control))
        s.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            piece = s.recv(65536)
            if not piece:
                break
            got += piece
        return got


def test_a_reload_of_expires_9999_12_31_takes_it(service):
    before = service.status()["policy"]
    control = _reload_with(service, RULES + "        expires: tomorrow\n")
    assert control.returncode != 0 and "rules.yaml:6:" in control.stderr, control.stderr
    assert service.status()["policy"] == before
    reply = _reload_with(service, RULES + "        expires: 9999-12-31\n")
    assert reply.returncode == 0, reply.stderr
    assert service.status()["policy"] != before


def test_an_always_approval_expiring_9999_12_31_is_no_internal_error(service):
    control = service.ask("approvals", "approve", "nope", "--always", "--expires", "tomorrow")
    assert "is not a date" in control.stderr, control.stderr
    result = service.ask("approvals", "approve", "nope", "--always", "--expires", "9999-12-31")
    raw = json.loads(
        _control(
            service,
            b'{"cmd": "approve", "id": "nope", "scope": "always", "expires": "9999-12-31"}\n',
        )
    )
    for error in (result.stderr, raw["error"]):
        assert "internal error" not in error and "nope" in error, error


def test_a_control_line_of_nested_json_is_not_a_json_object(service):
    assert b"not a JSON object" in _control(service, b"[1]\n")
    assert b"not a JSON object" in _control(service, b"[" * 5000 + b"\n")
    assert service.ask("status").returncode == 0


@pytest.mark.parametrize(
    "duration",
    [
        pytest.param(b"1e400", id="inf"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b"1" * 400, id="400-digits"),
    ],
)
def test_a_control_duration_no_cli_sends_is_refused(service, duration):
    line = b'{"cmd": "approve", "id": "nope", "scope": "duration", "duration": %s}\n' % duration
    reply = json.loads(_control(service, line))
    assert not reply["ok"] and "duration must be a number of seconds" in reply["error"], reply


def test_the_admin_login_with_a_nested_body_is_a_bad_request(service, fakenet):
    def post(body: str) -> str:
        return fakenet.run_in_host(
            ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST",
             "-H", "Content-Type: application/json", "--data-binary", body,
             "http://127.0.0.1:9465/login"],
            timeout=20,
        ).stdout  # fmt: skip

    assert post("[1]").endswith("400")  # the control: {"token": ...} expected
    assert post("[" * 5000).endswith("400")
