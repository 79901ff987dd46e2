"""A task's strings against the approvals page and /metrics, for real (h-pweb).

- the page, in a real headless Chromium: a sandboxed task opens pending approvals
  whose paths carry XSS payloads (quotes, `javascript:`, `</title>`, percent-encoded
  markup, an RTL override, `&lt` without its `;`) that would set `window.__pwned` or
  POST an approval if they ran. None ran, nothing was approved, no element was
  injected, and each cell shows the path as the task sent it. Raw markup or non-ASCII
  in a path, and markup in a DNS name, never become an approval: the gate refuses
  them first (ambiguous_path, invalid_name). The user agent is on no page. Every
  admin endpoint answers with CSP (frame-ancestors 'none'), nosniff and DENY
  framing; the JSON API is application/json (not sniffable).
- /metrics, parsed by prometheus_client's own parser after a task sent 20,000
  requests with distinct paths, user agents and (one a connection) methods and Host
  names, hostile ones included: the exposition parses, counts every answered
  request, adds only a few series, and the gateway's RSS stays bounded (100,000
  measured once: 28 s, series 80 -> 86, RSS +1.9 MiB).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import sandbox
from support.sandbox import eventually
from support.service import GatewayProcess, browser_env
from test_approvals_web import _api, _held_task, _token

pytestmark = pytest.mark.e2e

ALLOWED_IP = "203.0.113.10"
METRICS_PORT = 29474

RULES = """\
version: 1
profiles:
  default:
    fallback: ask
    approval: {hold: 60s}
    rules:
      - ask: allowed.test
        id: ask-allowed
        methods: [GET]
"""

# Would mark the page or approve through the API if the page ever ran them.
APPROVE_JS = (
    "fetch('/api/approvals/'+document.querySelector('tr[data-id]').dataset.id,"
    "{method:'POST',headers:{'X-Sandgate-Session':sessionStorage.getItem('sandgate-session')},"
    'body:\'{"decision":"approve"}\'})'
)
# Paths the gate lets through to an ask (RFC 3986 characters: quotes, parentheses and
# `=` as they are, `<>"` and non-ASCII percent-encoded): the page must show them as sent.
HOSTILE_PATHS = [
    "/a'onmouseover='window.__pwned=1'x=",
    "/javascript:window.__pwned=2",
    "/c%22%3E%3Cscript%3Ewindow.__pwned=3%3C/script%3E",
    "/d%3C/title%3E%3Cimg%20src=x%20onerror=" + quote(APPROVE_JS, safe="()'=+,:/."),
    "/e%E2%80%AEgnp.exe%E2%80%8B",
    # &lt without its ";" is still "<" to an HTML parser: shows up if a cell is ever innerHTML.
    "/i&ltscript&gtwindow.__pwned=7&lt/script&gt",
]
# Raw markup and non-ASCII in a path: denied at the gate (ambiguous_path), never asked.
REFUSED_PATHS = [
    '/f"><script>window.__pwned=4</script>',
    "/g<img/src=x/onerror=window.__pwned=5>",
    "/h\u202egnp.exe",
]
HOSTILE_UA = "<img src=x onerror=window.__pwned=6>"
# A DNS label may carry any byte on the wire: refused (invalid_name), never a placeholder.
HOSTILE_NAME = "<img src=x onerror=window__pwned>.test"

# In the sandbox: one held request per hostile path (ask rule: the path is shown), one
# plain HTTP request to the placeholder of a hostile DNS name; all in parallel.
TASK = r"""
import json, socket, struct, sys, threading
paths, refused = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ua, name = sys.argv[3], sys.argv[4]
gw = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]

def resolve(name):
    labels = b"".join(bytes([len(l)]) + l for l in name.encode().split(b".") if l)
    query = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(query, (gw, 53))
    answer = s.recv(4096)
    rcode, ancount = answer[3] & 15, struct.unpack(">H", answer[6:8])[0]
    return socket.inet_ntoa(answer[-4:]) if rcode == 0 and ancount else f"rcode {rcode}"

def get(ip, host, path):
    s = socket.create_connection((ip, 80), timeout=90)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(path, data.split(b"\r\n", 1)[0].decode(), flush=True)

placeholder = resolve(name)
print("placeholder", placeholder, flush=True)
jobs = [("allowed.test", "allowed.test", p) for p in paths + refused]
if placeholder[0].isdigit():
    jobs.append((placeholder, name, "/dns"))
threads = [threading.Thread(target=get, args=job) for job in jobs]
for t in threads: t.start()
for t in threads: t.join()
"""

# The page in headless Chromium: log in, wait for every row, give payloads time to
# fire, report what the DOM holds.
BROWSER = r"""
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, token, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
    options.add_argument(flag)
driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
try:
    driver.get(url)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 20).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending tbody tr[data-id]")) >= rows
    )
    driver.execute_async_script("refresh().then(arguments[0])")  # the update path too
    time.sleep(1.5)  # an onerror or a fetch would have run by now
    print(json.dumps(driver.execute_script('''
        return {
          pwned: window.__pwned === undefined ? null : window.__pwned,
          title: document.title,
          injected: document.querySelectorAll("main img, main script, main iframe, main a").length,
          rows: [...document.querySelectorAll("#pending tbody tr[data-id]")].map(
            r => [...r.cells].map(c => c.textContent)),
          recent: document.querySelectorAll("#recent tbody tr").length,
        };''')))
finally:
    driver.quit()
"""

# Every admin endpoint's status and headers (and the first bytes of the SSE stream).
HEADERS = r"""
import http.client, json, sys
host, port, token, approval = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
bearer = {"Authorization": "Bearer " + token}
calls = [
    ("GET", "/", {}, None), ("GET", "/", {"Cookie": "x=y"}, None),
    ("POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, "token=wrong"),
    ("POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, "token=" + token),
    ("GET", "/static/app.js", {}, None), ("GET", "/static/app.css", {}, None),
    ("GET", "/static/nope", {}, None), ("GET", "/nope<script>", {}, None),
    ("GET", "/api/approvals", {}, None), ("GET", "/api/approvals", bearer, None),
    ("GET", "/api/approvals/recent", bearer, None), ("GET", "/api/approvals/" + approval, bearer, None),
    ("POST", "/api/approvals/" + approval, {**bearer, "Origin": "https://evil.test"}, "{}"),
    ("PUT", "/api/approvals", bearer, None), ("GET", "/api/events", bearer, None),
]
out = []
for method, path, headers, body in calls:
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    out.append({"call": f"{method} {path}", "status": r.status,
                "headers": {k.lower(): v for k, v in r.getheaders()}})
    c.close()
print(json.dumps(out))
"""


def _deny_all(fakenet, url: str, bearer: dict) -> None:
    for a in _api(fakenet, "GET", url + "api/approvals", bearer)["body"]["approvals"]:
        _api(fakenet, "POST", url + f"api/approvals/{a['id']}", bearer, {"decision": "deny"})


def _service(fakenet, tmp_path: Path, rules: str, *extra: str) -> GatewayProcess:
    fakenet.clear_logs()
    (tmp_path / "rules.yaml").write_text(rules)
    return GatewayProcess(fakenet, tmp_path, tmp_path / "rules.yaml", *extra).start()


def test_hostile_task_strings_stay_inert_text_on_the_page(fakenet, tmp_path):
    service = _service(fakenet, tmp_path, RULES)
    task = None
    try:
        url, token = _token(service)
        bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        args = [json.dumps(HOSTILE_PATHS), json.dumps(REFUSED_PATHS), HOSTILE_UA, HOSTILE_NAME]
        task, result_of = _held_task(service, tmp_path, {"task": sandbox.python(TASK, *args)})
        expected = len(HOSTILE_PATHS)
        pending = eventually(
            lambda: (
                (got := _api(fakenet, "GET", url + "api/approvals", bearer)["body"]["approvals"])
                and len(got) >= expected
                and got
            ),
            timeout=30,
        )
        if not pending:
            listed = _api(fakenet, "GET", url + "api/approvals", bearer)["body"]["approvals"]
            task.kill()
            out, err = task.communicate(timeout=30)
            pytest.fail(f"{listed}\n{result_of(out, err).describe()}\n{service.events()[-15:]}")
        assert sorted(a["path"] for a in pending) == sorted(HOSTILE_PATHS), pending
        assert {a["name"] for a in pending} == {"allowed.test"}, pending
        # The raw markup never became an approval: the gate refused it first.
        refused = eventually(
            lambda: len(got := service.events(reason="ambiguous_path")) >= 3 and got, timeout=10
        )
        assert sorted(e["path"] for e in refused) == sorted(REFUSED_PATHS), refused
        (bad_name,) = eventually(lambda: service.events(reason="invalid_name"), timeout=10)
        assert bad_name["kind"] == "dns" and bad_name["verdict"] == "deny", bad_name

        browser = fakenet.run_in_host(
            [sys.executable, "-c", BROWSER, url, token, str(expected)],
            timeout=90,
            env=browser_env(tmp_path),
        )
        assert browser.returncode == 0, browser.stderr[-3000:]
        dom = json.loads(browser.stdout.strip().splitlines()[-1])
        assert dom["pwned"] is None and dom["injected"] == 0, dom
        assert dom["title"] == "sandgate approvals" and dom["recent"] == 0, dom
        # Each cell shows the string as the task sent it (the "Asks for" column).
        shown = {row[4] for row in dom["rows"]}
        assert {f"GET allowed.test:80 (http){p}" for p in HOSTILE_PATHS} <= shown, shown
        # Nothing was approved: every approval is still pending.
        states = [
            _api(fakenet, "GET", url + f"api/approvals/{a['id']}", bearer)["body"]["approval"]
            for a in pending
        ]
        assert {s["state"] for s in states} == {"pending"}, states

        headers = fakenet.run_in_host(
            [sys.executable, "-c", HEADERS, *url.split("/")[2].rsplit(":", 1), token,
             pending[0]["id"]],
            timeout=60,
        )  # fmt: skip
        assert headers.returncode == 0, headers.stderr
        for answer in json.loads(headers.stdout):
            h = answer["headers"]
            assert "frame-ancestors 'none'" in h.get("content-security-policy", ""), answer
            assert "default-src 'self'" in h["content-security-policy"], answer
            assert h.get("x-content-type-options") == "nosniff", answer
            assert h.get("x-frame-options") == "DENY", answer
            if answer["call"].startswith(("GET /api/approvals", "POST /api", "PUT")):
                assert h["content-type"] == "application/json", answer
        _deny_all(fakenet, url, bearer)
        out, err = task.communicate(timeout=90)
        result = result_of(out, err)
        assert "placeholder rcode" in result["task"].out, result.describe()
        assert result["task"].out.count(" 403 ") == len(HOSTILE_PATHS), result.describe()
        assert result["task"].out.count(" 400 ") == len(REFUSED_PATHS), result.describe()
        assert fakenet.requests_seen() == []  # nothing approved, nothing forwarded
        assert not [q for q in fakenet.dns_queries_seen() if "img" in q]
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        service.stop()


METRICS_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        id: get-allowed
        methods: [GET]
"""
FLOOD_REQUESTS = 20_000

# In the sandbox: FLOOD_REQUESTS requests, pipelined in batches on keep-alive
# connections, each with its own method, path, Host and user agent (hostile ones: quotes,
# markup, braces, newlines as text, a very long value); prints how many got an answer.
FLOOD = r"""
import socket, sys
total, batch, answered, i = int(sys.argv[1]), 100, 0, 0
ip = socket.gethostbyname("allowed.test")  # once: past dns_qps a lookup is refused
evil = '"}\\n# HELP x\\n<img src=x>{a="b"} 1\\n'.replace(" ", "_")
while i < total:
    s = socket.create_connection((ip, 80), timeout=30)
    n = min(batch, total - i)
    reqs = []
    for k in range(i, i + n):  # allowed GETs keep the connection; the last one, a deny, ends it
        method, host = "GET", "allowed.test"
        path = f"/p{k}/%22%7D%3Cimg%3E?q=%22%7D%3C{'x' * (k % 7 * 300)}"
        if k == i + n - 1:
            method, host, path = [(f"M{k}", host, path), (method, f"h{k}.allowed.test", path),
                                  (method, host, f"/p{k}/{evil}")][k // batch % 3]
        reqs.append(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
                    f"User-Agent: ua{k}<script>\r\n\r\n")
    s.sendall("".join(reqs).encode())
    data = b""
    while data.count(b"HTTP/1.1 ") < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    answered += data.count(b"HTTP/1.1 ")
    s.close()
    i += n
print("answered", answered, flush=True)
"""


def _flood(service: GatewayProcess, tmp_path: Path, requests: int) -> int:
    """A task of the service sends `requests` requests; how many were answered."""
    task, result_of = _held_task(service, tmp_path, {"flood": sandbox.python(FLOOD, str(requests))})
    out, err = task.communicate(timeout=300)
    result = result_of(out, err)
    assert "answered" in result["flood"].out, result.describe()
    return int(result["flood"].out.split()[-1])


def _scrape(fakenet) -> tuple[int, dict[str, int], float]:
    """The number of samples in /metrics, per family, and the HTTP requests counted,
    by the real parser."""
    text = fakenet.run_in_host(
        ["curl", "-s", "--max-time", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"]
    ).stdout
    parsed = list(text_string_to_metric_families(text))
    families = {f.name: len(f.samples) for f in parsed}
    requests = sum(s.value for f in parsed if f.name == "sandgate_http_requests" for s in f.samples)
    return sum(families.values()), families, requests


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def test_metrics_parse_and_stay_bounded_after_a_flood_of_hostile_distinct_values(fakenet, tmp_path):
    service = _service(
        fakenet, tmp_path, METRICS_RULES, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"
    )
    try:
        warm = _flood(service, tmp_path, 200)
        series_warm, _, counted_warm = _scrape(fakenet)
        rss_warm = _rss_kib(service.popen.pid)
        started = time.monotonic()
        flooded = _flood(service, tmp_path, FLOOD_REQUESTS)
        took = time.monotonic() - started
        series, families, counted = _scrape(fakenet)
        rss = _rss_kib(service.popen.pid)
        print(
            f"flood of {FLOOD_REQUESTS} in {took:.1f} s; series {series_warm} -> {series}; "
            f"RSS {rss_warm} -> {rss} KiB"
        )
        assert warm > 0 and flooded >= FLOOD_REQUESTS * 0.9, (warm, flooded)
        # Counted: the scrape saw every request the flood had answered.
        assert counted - counted_warm >= flooded, (counted_warm, counted, flooded)
        # Bounded: the flood added only the series of its few label combinations.
        assert series - series_warm < 60, (series_warm, series, families)
        assert rss - rss_warm < 64 * 1024, (rss_warm, rss)
    finally:
        service.stop()
