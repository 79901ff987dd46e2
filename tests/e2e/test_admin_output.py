"""What a rule-file writer or a task's caller makes the service print for the admin:
nothing of a root-only file, no forged log line, no terminal escape (found by a red
team; proxy/policy/problems.py, proxy/policy/load.py `read`, enforcer/cli/status.py).

A deploy user who may edit a rule file, not root, had the root service quote a file
only root may read (an `include:` of /etc/shadow, here a 0600 stand-in) in the audit
log's `policy_invalid`, its log and `sandgate reload`'s reply; an include's name with
a newline and ESC forged a line of the service's log and reached the admin's terminal;
and whoever may `sudo sandgate run --gateway -- CMD` put escapes and a forged row in
`sandgate sandboxes`."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, attach_argv

pytestmark = pytest.mark.e2e

RULES = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: allowed.test\n"
SECRET_HASH = "$6$rt47salt$SECRETHASHnotforthelogs"


@pytest.fixture
def service(fakenet, tmp_path):
    rules = tmp_path / "rules" / "rules.yaml"
    rules.parent.mkdir()
    rules.write_text(RULES)
    rules.chmod(0o666)  # a deploy user's to edit, not root's alone
    old = time.time() - 60  # the watcher sees the next write as a change
    os.utime(rules, (old, old))
    gateway = GatewayProcess(fakenet, tmp_path, rules, "--workers", "1").start()
    try:
        yield gateway
    finally:
        gateway.stop()


def _reloaded_with(service, text: str) -> tuple[str, str, str]:
    """The rule file rewritten to `text` (the service reloads by itself, and refuses
    it): the audit log's policy_invalid details, the service's log, the reply of an
    admin's `sandgate reload`."""
    service.rules.write_text(text)
    assert eventually(lambda: service.events(reason="policy_invalid"), timeout=10)
    reply = service.ask("reload")
    details = " ".join(e.get("detail") or "" for e in service.events(reason="policy_invalid"))
    return details, service.log.read_text(), reply.stderr


def test_an_include_of_a_root_only_file_is_not_quoted(service, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text(f"root:*:20228:0:99999:7:::\nalice:{SECRET_HASH}:20000:0:99999:7:::\n")
    secret.chmod(0o600)
    outputs = _reloaded_with(
        service, RULES.replace("    rules:", f"    include: [{secret}]\n    rules:")
    )
    assert all("SECRETHASH" not in text for text in outputs), outputs
    assert "may be written by others than root" in outputs[0]


def test_a_rule_file_forges_no_log_line_and_sends_no_escape(service):
    forged = "sandgate gateway: INFO sandgate.reload: sandgate: policy 0000 in force (FORGED)"
    outputs = _reloaded_with(
        service,
        RULES.replace(
            "    rules:", f'    include: ["./x\\e]0;pwned\\a\\e[2J\\n{forged}"]\n    rules:'
        ),
    )
    details, log, reply = outputs
    assert "\x1b" not in log and "\x1b" not in reply and "\x1b" not in details
    assert not [line for line in log.splitlines() if line.startswith(forged)], log[-2000:]


def test_the_sandboxes_listing_escapes_a_callers_command(service, tmp_path):
    workdir = sandbox._workdir(tmp_path)
    command = ["sh", "-c", "sleep 4", "\x1b]0;owned\x07\x1b[2J", "\nfa11ed  default  10.213.0.99"]
    task = subprocess.Popen(
        attach_argv(service, workdir, command),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        listed = eventually(lambda: (out := service.ask("sandboxes").stdout) * ("sleep" in out), 15)
    finally:
        task.wait(30)
    assert listed and "\x1b" not in listed, repr(listed)
    assert len(listed.strip().splitlines()) == 1, repr(listed)
    assert "\\x1b]0;owned\\x07" in listed
