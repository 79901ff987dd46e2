"""What the approver is shown vs what an approval lets through, end to end (h-pappq).

One service (page, API, webhook), one sandboxed task whose held requests try to get
more past an approval than the approver saw:

- requests to one asked path with different queries (a shown one, two carrying
  "secrets", one 600 characters long with its secret at the tail, one with a
  percent-encoded right-to-left override) each get an approval of their own: none
  coalesces under another's;
- the CLI's `list`, the page in a real headless Chromium, and the webhook's body each
  show every one with its query (the long one cut with "... (N more bytes)", its tail
  hidden but announced; `show` prints it whole), the POST's held count and body size;
- a second POST of the same request, held after the first was shown, makes an
  approval with the shown revision refused (409) and nothing released; approved on
  what it holds now, both go;
- "Approve once" clicked on the page releases exactly that request; the others are
  denied: the upstream's access log holds exactly the approved requests, with the
  approved queries, and no secret; the decision's audit event carries the query.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, WebhookReceiver, browser_env
from test_approvals_web import _api, _held_task, _token

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
profiles:
  default:
    approval: {hold: 45s}
    rules:
      - ask: allowed.test
        id: ask-docs
        methods: [GET, POST]
        paths: ["/docs", "/up"]
"""

LONG = "/docs?q=" + "a" * 600 + "&tail=TAILSECRET"
SHOWN = "/docs?q=shown"
GETS = {
    "shown": SHOWN,
    "secret_a": "/docs?payload=SECRETA",
    "secret_b": "/docs?payload=SECRETB",
    "long": LONG,
    "rlo": "/docs?f=%E2%80%AEgpj.exe",
}
POST = "/up?x=1"
FIRST_BODY, LATE_BODY = 5000, 200_000
WHERE = "allowed.test:80 (http)"


def _burst() -> str:
    """The task: every GET and one POST at once, a second POST of the same request 6 s
    later; each prints `LABEL STATUS`."""
    base = "http://allowed.test"
    lines = [
        f"head -c {FIRST_BODY} /dev/zero | tr '\\0' a > /tmp/first",
        f"head -c {LATE_BODY} /dev/zero | tr '\\0' b > /tmp/late",
    ]
    get = "curl -s -o /dev/null --max-time 60 -w '{label} %{{http_code}}\\n' '{url}' &"
    lines += [get.format(label=label, url=base + target) for label, target in GETS.items()]
    post = (
        "curl -s -o /dev/null --max-time 60 -H 'Expect:' --data-binary @/tmp/{file} "
        "-w '{label} %{{http_code}}\\n' '" + base + POST + "'"
    )
    lines.append(post.format(file="first", label="post_first") + " &")
    lines.append("(sleep 6; " + post.format(file="late", label="post_late") + ") &")
    lines.append("wait")
    return "\n".join(lines)


# The page in headless Chromium: log in, read the pending rows, click "Approve once" on
# one (argv[3]: its id), wait for the decision; prints the rows seen before the click.
BROWSER = r"""
import json, sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

url, token, approve, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
    options.add_argument(flag)
driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
try:
    wait = WebDriverWait(driver, 20)
    driver.get(url)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending tbody tr[data-id]")) >= rows)
    driver.execute_async_script("refresh().then(arguments[0])")
    seen = driver.execute_script('''
        return [...document.querySelectorAll("#pending tbody tr[data-id]")].map(
            r => ({id: r.dataset.id, cells: [...r.cells].map(c => c.textContent)}));''')
    row = driver.find_element(By.CSS_SELECTOR, f'#pending tbody tr[data-id="{approve}"]')
    row.find_element(By.CSS_SELECTOR, "button[data-scope=once]").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "approved"))
    print(json.dumps(seen))
finally:
    driver.quit()
"""


def _cli(service: GatewayProcess, *argv: str) -> str:
    result = service.ask("approvals", *argv)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_approver_is_shown_each_query_and_once_lets_through_only_that(fakenet, tmp_path):
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    receiver = WebhookReceiver(fakenet, tmp_path, 8098)
    service = GatewayProcess(fakenet, tmp_path, rules, *receiver.options).start()
    task = None
    try:
        url, token = _token(service)
        bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        task, result_of = _held_task(service, tmp_path, {"burst": _burst()})
        listed = eventually(
            lambda: (
                len(got := _api(fakenet, "GET", url + "api/approvals", bearer)["body"]["approvals"])
                == len(GETS) + 1
                and got
            ),
            timeout=30,
        )
        assert listed, _api(fakenet, "GET", url + "api/approvals", bearer)
        by_request = {a["request"]: a for a in listed}
        # No coalescing across queries: one approval per distinct request.
        assert set(by_request) == {f"GET {t}" for t in GETS.values()} | {f"POST {POST}"}
        shown = by_request[f"GET {SHOWN}"]
        post = by_request[f"POST {POST}"]
        long_one = by_request[f"GET {LONG}"]
        rlo = by_request[f"GET {GETS['rlo']}"]
        assert shown["shown"]["request"] == f"GET {WHERE}{SHOWN}"
        cut = long_one["shown"]["request"]
        assert "TAILSECRET" not in cut and re.search(r"\.\.\. \(\d+ more bytes\)$", cut), cut
        assert rlo["shown"]["request"] == f"GET {WHERE}/docs?f=%E2%80%AEgpj.exe"
        assert post["shown"]["held"] == "1 request held"
        assert post["shown"]["bodies"] == f"{FIRST_BODY} bytes"
        assert post["shown"]["wider"] == f"POST {WHERE}/up with any query"

        # The CLI: the list shows each query (the long one cut), show prints it whole.
        lines = _cli(service, "list").splitlines()
        for a in listed:
            (line,) = [line for line in lines if line.startswith(a["id"])]
            assert a["shown"]["request"] in line and a["shown"]["held"] in line, line
        assert "TAILSECRET" not in "\n".join(lines)
        assert f"bodies: {FIRST_BODY} bytes" in next(x for x in lines if x.startswith(post["id"]))
        assert f"{WHERE}{LONG}" in _cli(service, "show", long_one["id"])

        # The webhook: one per approval, each naming its request with the query.
        posts = eventually(lambda: len(got := receiver.posts()) == len(listed) and got, timeout=10)
        assert posts, receiver.posts()
        hooked = {
            json.loads(p["body"])["approval"]["request"]: json.loads(p["body"]) for p in posts
        }
        assert set(hooked) == set(by_request)
        assert hooked[f"GET {SHOWN}"]["destination"] == f"GET {WHERE}{SHOWN}"
        assert "TAILSECRET" not in hooked[f"GET {LONG}"]["destination"]
        assert "more bytes)" in hooked[f"GET {LONG}"]["destination"]

        # A POST of the same request, held after the first was shown: the revision the
        # approver saw no longer stands, and nothing is released.
        seen = post["revision"]
        eventually(
            lambda: (
                _api(fakenet, "GET", url + f"api/approvals/{post['id']}", bearer)["body"][
                    "approval"
                ]["held"]
                == 2
            ),
            timeout=20,
        )
        stale = _api(
            fakenet,
            "POST",
            url + f"api/approvals/{post['id']}",
            bearer,
            {"decision": "approve", "scope": "once", "seen": seen},
        )
        assert stale["status"] == 409 and "changed since it was shown" in stale["body"]["error"]
        now = _api(fakenet, "GET", url + f"api/approvals/{post['id']}", bearer)["body"]["approval"]
        assert now["state"] == "pending" and now["shown"]["held"] == "2 requests held"
        assert now["shown"]["bodies"] == f"{FIRST_BODY} bytes; {LATE_BODY} bytes"
        assert [r for r in fakenet.requests_seen() if r["method"] == "POST"] == []
        approved = _cli(service, "approve", post["id"], "--seen", str(now["revision"]))
        assert "let through: only the requests held now" in approved, approved

        # The page shows what the API does, and "Approve once" there releases only it.
        browser = fakenet.run_in_host(
            [sys.executable, "-c", BROWSER, url, token, shown["id"], str(len(GETS))],
            timeout=90,
            env=browser_env(tmp_path),
        )
        assert browser.returncode == 0, browser.stderr[-3000:]
        rows = {r["id"]: r["cells"] for r in json.loads(browser.stdout.strip().splitlines()[-1])}
        for a in by_request.values():
            if a["id"] in rows:
                cells = rows[a["id"]]
                assert cells[4] == a["shown"]["request"], cells
                assert cells[5].startswith("1 request held"), cells
                assert "with any query" in cells[6], cells
        assert set(rows) == {a["id"] for a in listed if a["id"] != post["id"]}
        for a in listed:
            if a["id"] not in (shown["id"], post["id"]):
                _cli(service, "deny", a["id"])

        out, err = task.communicate(timeout=90)
        result = result_of(out, err)
        codes = dict(line.split() for line in result["burst"].out.splitlines())
        assert codes == {
            "shown": "200",
            "secret_a": "403",
            "secret_b": "403",
            "long": "403",
            "rlo": "403",
            "post_first": "200",
            "post_late": "200",
        }, result.describe()
        # The upstream got exactly what was approved, with the shown queries.
        uris = sorted((r["method"], r["uri"]) for r in fakenet.requests_seen())
        assert uris == [("GET", SHOWN), ("POST", POST), ("POST", POST)], uris
        granted = eventually(
            lambda: service.events(kind="approval", reason="approval_granted"), timeout=10
        )
        paths = {e["path"]: e for e in granted}
        assert set(paths) == {SHOWN, POST}, granted
        assert "(1 request held)" in paths[SHOWN]["detail"]
        assert f"bodies: {FIRST_BODY} bytes; {LATE_BODY} bytes" in paths[POST]["detail"]
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()
        receiver.stop()


def test_the_cli_refuses_a_stale_revision_in_one_line(fakenet, tmp_path):
    """`approve --seen` with a revision that is not the approval's: one line, exit 125."""
    fakenet.clear_logs()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    service = GatewayProcess(fakenet, tmp_path, rules, "--admin-listen", "off").start()
    task = None
    try:
        task, result_of = _held_task(
            service, tmp_path, {"held": sandbox.curl("http://allowed.test" + SHOWN, timeout=60)}
        )
        (asked,) = eventually(lambda: json.loads(_cli(service, "list", "--json")), timeout=30)
        stale = service.ask("approvals", "approve", asked["id"], "--seen", "0")
        assert stale.returncode == 125, stale
        assert stale.stderr.count("\n") == 1 and "changed since it was shown" in stale.stderr
        _cli(service, "deny", asked["id"])
        out, err = task.communicate(timeout=60)
        assert result_of(out, err)["held"].out.strip().splitlines()[-1] == "403"
        assert fakenet.requests_seen() == []
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()
