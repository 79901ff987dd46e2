"""A project denied on a package index by its normalised name (`/simple/evil-pkg/**`)
is not fetched by another spelling of that name.

PEP 503 makes `Evil_Pkg`, `evil.pkg` and `EVIL--pkg` one project, `evil-pkg`. A
deny's glob reads `-`, `_` and `.` alike, one for one (load._PUNCTUATION), so it takes
`Evil_Pkg`, `evil.pkg` and `/evil_pkg/json` itself. `EVIL--pkg` it does not take:
there what holds is that a real index does not serve a spelling but redirects it to
the normalised name (pypiserver, devpi-server and PyPI's warehouse alike), and pip
and `curl -L` follow the redirect through the gateway, which decides the redirected
request again and refuses it. pypiserver serves a file (`/packages/...whl`) only by
its exact stored name. A red team checked this against pypiserver 2.4.2 (session 52)
and found that it held; this test keeps it so. An index that served a spelling
itself would need the deny to name that spelling.

pypiserver runs from a venv of its own (scripts/install.sh --test) in
the fake internet, and logs each request and its status; pip runs in the sandbox.
Both gateway paths: `door` (the front door) and `engine` (mitmproxy; a `websocket:
true` rule sends the profile's plain HTTP there).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
from support import sandbox
from support.servers import run_beside

pytestmark = pytest.mark.e2e

IP, PORT = "203.0.113.10", 8091
BASE = f"http://allowed.test:{PORT}"
# In a venv of its own (scripts/install.sh --test): pypiserver needs a newer pip than
# the test venv's, whose packages test_wheel's fresh venv sees.
PYPISERVER = Path(__file__).parents[2] / ".venv" / "pypiserver" / "bin" / "pypi-server"

RULES = f"""\
version: 1
profiles:
  door:
    fallback: deny
    rules:
      - allow: allowed.test
        id: door-index
        ports: [{PORT}]
        methods: [GET, HEAD]
      - deny: allowed.test
        id: door-no-evil-pkg
        ports: [{PORT}]
        paths: ["/simple/evil-pkg/**", "/evil-pkg/**", "/packages/evil_pkg-*"]
  engine:
    fallback: deny
    rules:
      - allow: allowed.test
        id: engine-index
        ports: [{PORT}]
        methods: [GET, HEAD]
        websocket: true
      - deny: allowed.test
        id: engine-no-evil-pkg
        ports: [{PORT}]
        paths: ["/simple/evil-pkg/**", "/evil-pkg/**", "/packages/evil_pkg-*"]
"""


def wheel(directory: Path, name: str, mark: str) -> None:
    module = name.replace("-", "_")
    files = {
        f"{module}/__init__.py": f"MARK = {mark!r}\n",
        f"{module}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{module}-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    with zipfile.ZipFile(directory / f"{module}-1.0-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
            record.append(f"{path},sha256={digest.rstrip(b'=').decode()},{len(text)}")
        record.append(f"{module}-1.0.dist-info/RECORD,,")
        z.writestr(f"{module}-1.0.dist-info/RECORD", "\n".join(record) + "\n")


PIP = (
    "PIP_CONFIG_FILE=/dev/null venv/bin/pip download --disable-pip-version-check "
    "--no-cache-dir --retries 0 --timeout 10 --no-deps --trusted-host allowed.test -d dl"
)


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_denied_project_is_not_fetched_by_another_spelling_of_its_name(net, tmp_path, profile):
    if not PYPISERVER.exists():
        pytest.skip("needs pypiserver in .venv/pypiserver (scripts/install.sh --test)")
    packages = tmp_path / "packages"
    packages.mkdir()
    wheel(packages, "good-pkg", "GOOD")
    wheel(packages, "evil-pkg", "EVIL-PACKAGE-CONTENT")
    log = tmp_path / "pypiserver.log"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    steps = {
        "venv": f"{sandbox.SANDBOX_PYTHON} -m venv venv",
        "honest": f"{PIP} --index-url {BASE}/simple/ good-pkg",
        "control": f"{PIP} --index-url {BASE}/simple/ evil-pkg",
        "find_links_underscore": f"{PIP} --no-index --find-links {BASE}/simple/Evil_Pkg/ evil-pkg",
        "find_links_dot": f"{PIP} --no-index --find-links {BASE}/simple/evil.pkg/ evil-pkg",
        "curl_dashes": sandbox.curl("-L", f"{BASE}/simple/EVIL--pkg/"),
        "curl_json": sandbox.curl("-L", f"{BASE}/evil_pkg/json"),
        "file_upper": sandbox.curl(f"{BASE}/packages/EVIL_PKG-1.0-py3-none-any.whl"),
        "listed": "ls dl",
    }
    argv = [str(PYPISERVER), "run", "-v", "--log-file", str(log), "-p", str(PORT), "-i", IP]
    argv += ["--disable-fallback", "--hash-algo", "sha256", str(packages)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    served = log.read_text()
    why = f"{result.describe()}\npypiserver:\n{served[-4000:]}"
    assert "good_pkg-1.0-py3-none-any.whl" in result["listed"].out, why
    assert "evil_pkg" not in result["listed"].out, why
    for label in ("control", "find_links_underscore", "find_links_dot"):
        assert result[label].rc != 0, (label, why)
    for label in ("curl_dashes", "curl_json", "file_upper"):
        assert result[label].status == 403, (label, why)
    assert result.verdicts(reason="rule_deny") == {
        ("deny", "rule_deny", f"{profile}-no-evil-pkg")
    }, why
    # `EVIL--pkg`: the index redirected it, and the gateway refused where it led.
    assert '"GET /simple/EVIL--pkg/ HTTP/1.1" 301' in served, why
    assert result.events(reason="rule_deny", path="/simple/evil-pkg/"), why
    # The index served nothing of the denied project in any spelling.
    requests = [line for line in served.splitlines() if '"GET ' in line]
    assert any('good_pkg-1.0-py3-none-any.whl HTTP/1.1" 200' in line for line in requests), why
    assert [line for line in requests if "evil" in line.lower() and '" 200 ' in line] == [], why
