"""The approvals page, API and webhook (issue 10) end to end in the fake internet.
The service and every client of its admin address (curl-like helpers, the webhook
receiver, a real headless Chromium driven by Selenium) run in the fake internet's
host netns, where the service's loopback is: nothing leaves the test's namespaces.

- the webhook reaches a receiver with a valid signature, a decision through
  `POST /api/approvals/ID` releases the held request;
- the API answers 401 without (or with a wrong) token and 403 to a cross-site POST,
  and neither decided anything;
- a sandbox cannot reach the admin port even when it listens on every address (the
  nftables table drops packets to the gateway's own addresses), and the server saw
  no connection from it;
- the page, in Chromium: log in, see the pending request, click approve, the task's
  request completes (screenshots go to docs/img/).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl, eventually
from support.service import (
    WEBHOOK_SECRET,
    GatewayProcess,
    WebhookReceiver,
    attach_argv,
    browser_env,
)

pytestmark = pytest.mark.e2e

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 60s}
    rules:
      - ask: allowed.test
        id: ask-allowed
"""

# An HTTP client for the admin API, run in the host netns: prints {"status", "body"}.
CLIENT = r"""
import json, sys, urllib.request, urllib.error
method, url, headers, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        status, data = r.status, r.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
print(json.dumps({"status": status, "body": json.loads(data or b"null")}))
"""

# The page in headless Chromium: log in, see the request, approve it, see the decision.
BROWSER = r"""
import sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

url, token, name, shots = sys.argv[1:5]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,700"):
    options.add_argument(flag)
driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
try:
    wait = WebDriverWait(driver, 20)
    driver.get(url)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.save_screenshot(f"{shots}/approvals-login.png")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pending tbody tr[data-id]")))
    assert name in row.text, row.text
    # A refresh (each pushed change causes one) keeps the row and its buttons: an admin
    # about to click never has the button replaced under the pointer.
    driver.execute_async_script("refresh().then(arguments[0])")
    assert name in row.text, row.text
    driver.save_screenshot(f"{shots}/approvals-page.png")
    print("seen", row.get_attribute("data-id"), flush=True)
    row.find_element(By.CSS_SELECTOR, "button[data-scope=once]").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "recent"), "approved"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "approved"))
    driver.save_screenshot(f"{shots}/approvals-decided.png")
    print("approved", flush=True)
finally:
    driver.quit()
"""


def _token(service: GatewayProcess) -> tuple[str, str]:
    """The page's URL and the token, from the path the service printed."""
    match = eventually(
        lambda: re.search(r"approvals page on (\S+) \(token in (\S+)\)", service.log.read_text()),
        timeout=10,
    )
    token_file = Path(match[2])
    assert token_file.stat().st_mode & 0o777 == 0o600
    return match[1], token_file.read_text().strip()


def _api(fakenet, method: str, url: str, headers: dict | None = None, body: dict | None = None):
    result = fakenet.run_in_host(
        [
            sys.executable,
            "-c",
            CLIENT,
            method,
            url,
            json.dumps(headers or {}),
            json.dumps(body) if body is not None else "",
        ],
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _held_task(service: GatewayProcess, tmp_path: Path, steps: dict[str, str]):
    workdir = sandbox._workdir(tmp_path)
    steps_dir = workdir / "steps"
    task = subprocess.Popen(
        attach_argv(service, workdir, ["sh", "-c", sandbox._script(steps, steps_dir)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return task, lambda out, err: sandbox._result(task.returncode, out, err, workdir, steps_dir)


def test_webhook_then_api_decision_releases_the_request_and_bad_callers_are_refused(
    fakenet, tmp_path
):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    receiver = WebhookReceiver(fakenet, tmp_path, 8099)
    service = GatewayProcess(
        fakenet,
        tmp_path,
        rules,
        "-v",
        "--admin-listen",
        "0.0.0.0:9465",
        *receiver.options,
    ).start()
    task = None
    try:
        url, token = _token(service)
        url = "http://127.0.0.1:9465/"
        gateway_ip = "$(awk '/^nameserver/{print $2; exit}' /etc/resolv.conf)"
        task, result_of = _held_task(
            service,
            tmp_path,
            {
                "admin": f"curl -sS --max-time 3 -w '\\n%{{http_code}}' http://{gateway_ip}:9465/api/approvals",
                "held": curl("http://allowed.test/", timeout=60),
            },
        )
        bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        listed = eventually(
            lambda: _api(fakenet, "GET", url + "api/approvals", bearer)["body"]["approvals"],
            timeout=30,
        )
        (asked,) = listed
        assert (asked["name"], asked["port"], asked["method"]) == ("allowed.test", 80, None)
        assert {"task_id", "sandbox", "profile", "first_seen", "waiting_s", "held"} <= asked.keys()
        path = url + f"api/approvals/{asked['id']}"

        # The webhook: signed with the secret over the exact body.
        (hook,) = receiver.posts()
        expected = hmac.new(WEBHOOK_SECRET.encode(), hook["body"].encode(), hashlib.sha256)
        assert hook["signature"] == "sha256=" + expected.hexdigest()
        assert json.loads(hook["body"])["approval"]["id"] == asked["id"]

        # Refused callers decide nothing.
        approve = {"decision": "approve", "scope": "once"}
        assert _api(fakenet, "GET", url + "api/approvals")["status"] == 401
        assert (
            _api(fakenet, "GET", url + "api/approvals", {"Authorization": "Bearer x"})["status"]
            == 401
        )
        assert (
            _api(fakenet, "POST", path, {"Content-Type": "application/json"}, approve)["status"]
            == 401
        )
        cross = _api(fakenet, "POST", path, {**bearer, "Origin": "https://evil.test"}, approve)
        assert cross["status"] == 403 and "cross-site" in cross["body"]["error"]
        assert _api(fakenet, "GET", path, bearer)["body"]["approval"]["state"] == "pending"
        assert fakenet.requests_seen() == []
        unknown = _api(fakenet, "POST", url + "api/approvals/nosuchid", bearer, approve)
        assert unknown["status"] == 404 and "no approval" in unknown["body"]["error"]

        decided = _api(fakenet, "POST", path, bearer, approve)
        assert decided["status"] == 200, decided
        assert decided["body"]["approval"]["approver"] == "admin (api key)"
        again = _api(fakenet, "POST", path, bearer, {"decision": "deny"})
        assert again["status"] == 409 and "first decision stands" in again["body"]["error"]
        out, err = task.communicate(timeout=90)
        result = result_of(out, err)
        assert result["held"].out.strip().splitlines()[-1] == "200", result.describe()
        # The sandbox never reached the admin port, though it listens on every address.
        assert result["admin"].out.strip().splitlines()[-1] == "000", result.describe()
        sandbox_ip = asked["sandbox"]
        assert "admin connection from" in service.log.read_text()  # the test's own calls
        assert f"admin connection from ('{sandbox_ip}'" not in service.log.read_text()
        # (the audit writer writes within its flush interval: the line may come after the 200)
        events = eventually(
            lambda: service.events(kind="approval", reason="approval_granted"), timeout=10
        )
        assert events and events[0]["approver"] == "admin (api key)"
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()
        receiver.stop()


def test_the_page_in_a_real_browser_approves_a_held_request(fakenet, tmp_path):
    """Screenshots go to tmp_path, or to docs/img with SANDGATE_SCREENSHOTS=1 (how the
    ones in docs/approvals.md were taken): a test run leaves the checkout as it was."""
    shots = DOCS_IMG if os.environ.get("SANDGATE_SCREENSHOTS") == "1" else tmp_path / "img"
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(fakenet, tmp_path, rules).start()
    task = None
    try:
        url, token = _token(service)
        task, result_of = _held_task(
            service, tmp_path, {"held": curl("http://allowed.test/", timeout=60)}
        )
        shots.mkdir(exist_ok=True)
        started = time.monotonic()
        browser = fakenet.run_in_host(
            [sys.executable, "-c", BROWSER, url, token, "allowed.test", str(shots)],
            timeout=90,
            env=browser_env(tmp_path),
        )
        assert browser.returncode == 0, browser.stderr[-3000:]
        assert "approved" in browser.stdout.split()
        out, err = task.communicate(timeout=60)
        result = result_of(out, err)
        assert result["held"].out.strip().splitlines()[-1] == "200", result.describe()
        assert time.monotonic() - started < 60  # released by the click, not by the hold
        events = service.events(kind="approval", reason="approval_granted")
        assert events[0]["approver"] == "admin (web)" and events[0]["scope"] == "once"
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()


def test_a_named_key_decides_as_its_name_and_is_refused_once_revoked(fakenet, tmp_path):
    """`sandgate approvals keys add chatbot` (the webhook's bot, say): its token
    approves through the API, the approval event and `approvals show` name it;
    revoked, the same token is refused (401) at the next request."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    keys = tmp_path / "admin-keys"

    def keys_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sandbox.SANDGATE, "approvals", "keys", *args, "--file", str(keys)],
            capture_output=True,
            text=True,
        )

    added = keys_cli("add", "chatbot")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    service = GatewayProcess(fakenet, tmp_path, rules, "--admin-keys", str(keys)).start()
    task = None
    try:
        url, _ = _token(service)
        task, result_of = _held_task(
            service, tmp_path, {"held": curl("http://allowed.test/", timeout=60)}
        )
        bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        listed = eventually(
            lambda: _api(fakenet, "GET", url + "api/approvals", bearer)["body"]["approvals"],
            timeout=30,
        )
        (asked,) = listed
        decided = _api(
            fakenet, "POST", url + f"api/approvals/{asked['id']}", bearer, {"decision": "approve"}
        )
        assert decided["status"] == 200, decided
        assert decided["body"]["approval"]["approver"] == "chatbot (api key)"
        out, err = task.communicate(timeout=90)
        result = result_of(out, err)
        assert result["held"].status == 200, result.describe()
        assert [r["host"] for r in fakenet.requests_seen()] == ["allowed.test"]
        (granted,) = eventually(
            lambda: service.events(kind="approval", reason="approval_granted"), timeout=10
        )
        assert granted["approver"] == "chatbot (api key)" and granted["approval_id"] == asked["id"]
        shown = service.ask("approvals", "show", asked["id"])
        assert re.search(r"^approver:\s+chatbot \(api key\)$", shown.stdout, re.M), shown.stdout
        # Revoked: the next request with the same token is refused.
        assert keys_cli("revoke", "chatbot").returncode == 0
        refused = _api(fakenet, "GET", url + "api/approvals", bearer)
        assert refused["status"] == 401, refused
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()
