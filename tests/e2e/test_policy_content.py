"""The shipped policy content, with real clients (issue 12, "Policy content and honesty").

- The default `package-registries` preset is download-only: pip installs from PyPI's
  names, a publish (POST, PUT) to those very hosts gets a 403 and the server never
  sees it; the `-passthrough` form lets it through (the control).
- The `github` preset is fetch-only: `git clone` over smart HTTP works (GET
  info/refs, POST git-upload-pack), `git push` is refused and the server never sees
  git-receive-pack; `github-passthrough` pushes (the control).
- A rule that expires a few seconds into a run stops matching then, without a reload.

The registry is a test server in the fake internet answering as pypi.org,
files.pythonhosted.org, registry.npmjs.org and github.com (a PEP 503 index, a wheel,
and `git http-backend` behind a tiny CGI bridge), with a CA of the test's own, and a
dnsmasq of the test's own that gives those names its address.
"""

from __future__ import annotations

import datetime
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sandgate.enforcer.demo import fakenet as fakenet_module
from support import sandbox
from support.sandbox import eventually
from support.servers import start_https_server
from test_sandbox_clients import MARK, PROJECT, WHEEL, _git  # its private registry, served here
from test_sandbox_clients import _serve_root as serve_private_registry

pytestmark = pytest.mark.e2e

SERVER_IP = "203.0.113.80"  # not one of the fake internet's own: nginx does not bind it
DNS_IP = "198.51.100.54"
NAMES = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "github.com")
SHIPPED_RULES = sandbox.REPO / "rules" / "default.yaml"
REPO_PATH = "/octo/repo.git"
SECRET = "the-task-would-like-to-publish-this"

PASSTHROUGH_RULES = """\
version: 1
profiles:
  default:
    include: [package-registries-passthrough, github-passthrough]
"""


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of this test's own and a certificate for NAMES, made as the fake internet
    makes its own (fakenet._make_certs), with these names."""
    original = fakenet_module.HOSTS, fakenet_module.SERVER_IPS_V4, fakenet_module.SERVER_IPS_V6
    fakenet_module.HOSTS = dict.fromkeys(NAMES, SERVER_IP)
    fakenet_module.SERVER_IPS_V4, fakenet_module.SERVER_IPS_V6 = (SERVER_IP,), ()
    try:
        return fakenet_module._make_certs(directory)
    finally:
        fakenet_module.HOSTS, fakenet_module.SERVER_IPS_V4, fakenet_module.SERVER_IPS_V6 = original


def _serve_root(root: Path) -> None:
    """The private registry of test_sandbox_clients (a PEP 503 index, its wheel, a bare
    repository), laid out as PyPI and GitHub have them: the index links to
    files.pythonhosted.org, the repository is OWNER/REPO.git and accepts pushes (so
    that only sandgate can refuse one)."""
    serve_private_registry(root)
    index = root / "simple" / PROJECT / "index.html"
    index.write_text(
        index.read_text().replace("../../files/", "https://files.pythonhosted.org/files/")
    )
    (root / "octo").mkdir()
    (root / "repo.git").rename(root / REPO_PATH.lstrip("/"))
    _git("config", "http.receivepack", "true", cwd=root / REPO_PATH.lstrip("/"))


@pytest.fixture
def registry(net, tmp_path) -> Iterator[tuple[Path, Callable[[], list[str]]]]:
    """The registry server and its DNS in the fake internet; yields the CA file and
    a function returning the server's log lines."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = _make_certs(certs)
    root, log = tmp_path / "www", tmp_path / "server.log"
    _serve_root(root)
    log.touch()
    added = []
    procs: list[subprocess.Popen] = []
    try:
        for address in (SERVER_IP, DNS_IP):
            net.run_in_internet(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
            added.append(address)
        procs.append(start_https_server(net, root, SERVER_IP, 443, cert, key, log))
        dnsmasq = [
            "ip", "netns", "exec", net.internet_ns, shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
            "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", f"--listen-address={DNS_IP}", "--bind-interfaces", "--port=53",
            "--user=root", "--group=root",
            *(f"--host-record={name},{SERVER_IP}" for name in NAMES),
        ]  # fmt: skip
        procs.append(subprocess.Popen(dnsmasq, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        eventually(lambda: (DNS_IP, 53) in fakenet_module._proc_sockets(procs[1].pid, "udp"))
        yield ca, lambda: log.read_text().splitlines()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for address in added:
            net.run_in_internet(["ip", "addr", "del", f"{address}/32", "dev", "lo"])


def _run(net, tmp_path, ca: Path, steps: dict[str, str], rules: Path, *extra: str):
    return sandbox.run(
        net,
        tmp_path,
        steps,
        rules=rules,
        fakenet_ca=False,
        dns_upstream=DNS_IP,
        extra=("--extra-ca", str(ca), *extra),
        timeout=180,
    )


PIP = (
    "PIP_CONFIG_FILE=/dev/null venv/bin/pip install --disable-pip-version-check --no-cache-dir "
    f"--retries 0 --timeout 20 --index-url https://pypi.org/simple/ {PROJECT}"
)
UPLOAD = sandbox.curl("-X", "POST", "--data-binary", SECRET, "https://pypi.org/legacy/")
PUBLISH = sandbox.curl(
    "-X", "PUT", "--data-binary", SECRET, f"https://registry.npmjs.org/{PROJECT}"
)
CLONE = f"git clone -q https://github.com{REPO_PATH} cloned && cat cloned/README.txt"
PUSH = (
    "cd cloned && echo change > change.txt && git add change.txt && "
    "git -c user.name=t -c user.email=t@t.invalid commit -q -m change && git push -q origin main"
)


def test_default_presets_download_and_fetch_but_never_publish_or_push(net, registry, tmp_path):
    ca, server_log = registry
    r = _run(
        net,
        tmp_path,
        ca,
        {
            "venv": f"{sandbox.SANDBOX_PYTHON} -m venv venv",
            "pip": PIP,
            "imported": "venv/bin/python -c 'import sg_probe; print(sg_probe.MARK)'",
            "upload": UPLOAD,
            "publish": PUBLISH,
            "clone": CLONE,
            "push": PUSH,
        },
        SHIPPED_RULES,
        "--profile",
        "github",
    )
    assert r["pip"].rc == 0, r.describe()
    assert r["imported"].out.strip() == MARK, r.describe()
    assert r["clone"].rc == 0 and r["clone"].out.strip() == MARK, r.describe()
    assert r["upload"].status == 403 and r["publish"].status == 403, r.describe()
    assert r["push"].rc != 0 and "403" in r["push"].err, r.describe()

    seen = server_log()
    assert f"GET /simple/{PROJECT}/ 200" in seen and f"GET /files/{WHEEL} 200" in seen, seen
    assert any(line.startswith(f"POST {REPO_PATH}/git-upload-pack 200") for line in seen), seen
    # The forbidden requests never reached the server.
    assert not [line for line in seen if line.startswith(("POST /legacy", "PUT "))], seen
    # (The push's first step, GET info/refs?service=git-receive-pack, is a GET: it
    # lists refs, as a fetch does; the pack itself is what is refused.)
    assert not [line for line in seen if line.startswith(f"POST {REPO_PATH}/git-receive-pack")], (
        seen
    )

    assert r.verdicts(kind="request", method="POST", path="/legacy/") == {
        ("deny", "method_not_allowed", "default:fallback")
    }, r.describe()
    assert r.verdicts(kind="request", method="PUT") == {
        ("deny", "method_not_allowed", "default:fallback")
    }, r.describe()
    assert r.verdicts(kind="request", path=f"{REPO_PATH}/git-receive-pack") == {
        ("deny", "rule_deny", "preset:github-no-push")
    }, r.describe()
    assert ("allow", "rule_allow", "preset:github-upload-pack") in r.verdicts(
        kind="request", path=f"{REPO_PATH}/git-upload-pack"
    ), r.describe()


def test_pass_through_presets_let_publish_and_push_through(net, registry, tmp_path):
    """The control: the same requests with the `-passthrough` forms reach the server."""
    ca, server_log = registry
    rules = tmp_path / "passthrough.yaml"
    rules.write_text(PASSTHROUGH_RULES)
    r = _run(net, tmp_path, ca, {"upload": UPLOAD, "clone": CLONE, "push": PUSH}, rules)
    assert r["clone"].rc == 0 and r["push"].rc == 0, r.describe()
    assert r["upload"].status == 405, r.describe()  # the server's answer: it got the POST
    seen = server_log()
    assert "POST /legacy/ 405" in seen, seen
    assert any(line.startswith(f"POST {REPO_PATH}/git-receive-pack 200") for line in seen), seen


def test_a_rule_that_expires_during_the_run_stops_matching_without_a_reload(net, tmp_path):
    expiry = int(time.time()) + 12
    instant = datetime.datetime.fromtimestamp(expiry, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rules = tmp_path / "expiring.yaml"
    rules.write_text(
        "version: 1\nprofiles:\n  default:\n    rules:\n"
        f"      - allow: allowed.test\n        id: until-soon\n        expires: {instant}\n"
    )
    wait = f"while [ $(date +%s) -lt {expiry} ]; do sleep 0.2; done; date +%s"
    r = sandbox.run(
        net,
        tmp_path,
        {
            "before": "date +%s; " + sandbox.curl("https://allowed.test/"),
            "wait": wait,
            "after_dns": sandbox.curl("https://allowed.test/"),
            "after_tls": sandbox.curl(
                "--resolve", "allowed.test:443:203.0.113.10", "https://allowed.test/"
            ),
        },
        rules=rules,
    )
    started = int(r["before"].out.split("\n", 1)[0])
    if started >= expiry:
        pytest.skip("the sandbox started after the rule's expiry (a slow machine): nothing to tell")
    assert r["before"].status == 200, r.describe()
    assert r["after_dns"].status == 0 and r["after_tls"].status == 0, r.describe()
    assert eventually(lambda: len(net.requests_seen("203.0.113.10")) == 1), net.requests_seen()
    events = [
        e for e in r.audit if e.get("name") == "allowed.test" and e["kind"] in ("dns", "connection")
    ]
    verdicts = [(e["kind"], e["verdict"], e.get("rule_id")) for e in events]
    assert ("connection", "allow", "until-soon") in verdicts, r.describe()
    assert ("dns", "deny", "default:fallback") in verdicts, r.describe()
    assert verdicts[-1] == ("connection", "deny", "default:fallback"), r.describe()
