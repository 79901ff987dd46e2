"""Real clients in the sandbox against a private registry (issue 8, "CA variables only
where they help").

A pass-through rule leaves TLS between the task and the server: sandgate has no CA to
add, so it must not set SSL_CERT_FILE, REQUESTS_CA_BUNDLE, GIT_SSL_CAINFO, ... either.
Set, they would win over a tool's own CA option (requests prefers REQUESTS_CA_BUNDLE
to pip's --cert, git prefers GIT_SSL_CAINFO to http.sslCAInfo), and pip and git would
refuse a registry signed by a private CA. Here pip installs a wheel from a PEP 503 index
and git clones over the dumb HTTP protocol, both from an HTTPS server with a CA of the
test's own, in the fake internet; the server's log shows they really got there.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import signal
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sandgate.enforcer.demo.fakenet import _make_certs
from support import sandbox
from support.servers import start_https_server

pytestmark = pytest.mark.e2e

HOST, IP, PORT = "allowed.test", "203.0.113.10", 8443  # nginx has 443 on that address
BASE = f"https://{HOST}:{PORT}"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_ENV_VARS = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
)
PROJECT, VERSION, MARK = "sg-probe", "1.0", "installed from the private index"
WHEEL = f"sg_probe-{VERSION}-py3-none-any.whl"

RULES = f"""\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: {HOST}
        ports: [{PORT}]
        id: private-registry
        comment: pass-through, no methods or paths
"""


@pytest.fixture
def net(fakenet):
    fakenet.clear_logs()
    return fakenet


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(path: Path) -> None:
    """A pure-Python wheel with one module, by hand: no build backend needed."""
    info = f"sg_probe-{VERSION}.dist-info"
    files = {
        "sg_probe.py": f"MARK = {MARK!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROJECT}\nVersion: {VERSION}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: sandgate-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},{_record_hash(text.encode())},{len(text.encode())}" for name, text in files.items()
    ]
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def _git(*args: str, cwd: Path) -> None:
    identity = ["-c", "user.name=sandgate test", "-c", "user.email=test@sandgate.invalid"]
    subprocess.run(["git", *identity, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _serve_root(root: Path) -> None:
    """The index, the wheel, and a bare repository ready for dumb HTTP."""
    (root / "files").mkdir(parents=True)
    _write_wheel(root / "files" / WHEEL)
    digest = hashlib.sha256((root / "files" / WHEEL).read_bytes()).hexdigest()
    index = root / "simple" / PROJECT
    index.mkdir(parents=True)
    (index / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../files/{WHEEL}#sha256={digest}">{WHEEL}</a></body></html>\n'
    )
    work = root.parent / "repo-work"
    work.mkdir()
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "README.txt").write_text(f"{MARK}\n")
    _git("add", "README.txt", cwd=work)
    _git("commit", "-q", "-m", "first", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(root / "repo.git"), cwd=root)
    _git("update-server-info", cwd=root / "repo.git")


@pytest.fixture
def registry(net, tmp_path) -> Iterator[tuple[Path, Callable[[], list[str]]]]:
    """An HTTPS server for HOST:PORT in the fake internet with a private CA; yields
    the CA's file and a function returning the server's log lines."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = _make_certs(certs)  # a fresh CA, not the fake internet's
    root, log = tmp_path / "www", tmp_path / "server.log"
    _serve_root(root)
    log.touch()
    proc = start_https_server(net, root, IP, PORT, cert, key, log)
    try:
        yield ca, lambda: log.read_text().splitlines()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _environment(step: sandbox.Step) -> dict[str, str]:
    return dict(line.split("=", 1) for line in step.out.splitlines() if "=" in line)


def _rules(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return rules


def test_pass_through_pip_and_git_trust_their_own_ca_option_and_no_ca_variable_is_set(
    net, registry, tmp_path
):
    ca, server_log = registry
    pip = (
        "PIP_CONFIG_FILE=/dev/null venv/bin/pip install --disable-pip-version-check --no-cache-dir "
        f'--retries 0 --timeout 10 --cert "$PWD/ca.pem" --index-url {BASE}/simple/ {PROJECT}'
    )
    r = sandbox.run(
        net,
        tmp_path,
        {
            "env": "env",
            "bundle": f"sha256sum {SYSTEM_BUNDLE}",
            "venv": f"{sandbox.SANDBOX_PYTHON} -m venv venv",
            "pip": pip,
            "imported": "venv/bin/python -c 'import sg_probe; print(sg_probe.MARK)'",
            # The control: git without the option does not trust the private CA.
            "git_untrusted": f"git clone -q {BASE}/repo.git untrusted",
            "git": f'git -c http.sslCAInfo="$PWD/ca.pem" clone -q {BASE}/repo.git cloned && cat cloned/README.txt',
        },
        rules=_rules(tmp_path),
        fakenet_ca=False,
        setup=lambda ws: shutil.copy(ca, ws / "ca.pem"),
    )

    assert r.returncode == 0, r.describe()
    task_env = _environment(r["env"])
    assert not set(CA_ENV_VARS) & task_env.keys(), r["env"].out
    host_bundle = hashlib.sha256(SYSTEM_BUNDLE.read_bytes()).hexdigest()
    assert r["bundle"].out.split()[0] == host_bundle, "the system bundle was replaced"

    assert r["venv"].rc == 0, r.describe()
    assert r["pip"].rc == 0, r.describe()
    assert r["imported"].out.strip() == MARK, r.describe()
    assert r["git_untrusted"].rc != 0 and "certificate" in r["git_untrusted"].err.lower(), (
        r.describe()
    )
    assert r["git"].rc == 0 and r["git"].out.strip() == MARK, r.describe()

    seen = server_log()
    assert f"GET /simple/{PROJECT}/ 200" in seen, seen
    assert f"GET /files/{WHEEL} 200" in seen, seen
    assert any(
        line.startswith("GET /repo.git/info/refs") and line.endswith(" 200") for line in seen
    ), seen
    assert any(line.startswith("GET /repo.git/objects/") for line in seen), seen
    assert {(v, rule) for v, _, rule in r.verdicts(dst_port=PORT)} == {
        ("allow", "private-registry")
    }, r.describe()


def test_extra_ca_sets_the_ca_variables_and_the_bundle_and_env_wins(net, tmp_path):
    steps = {"env": "env", "bundle": f"cat {SYSTEM_BUNDLE}"}
    target = str(SYSTEM_BUNDLE.resolve())
    fakenet_ca = net.ca_cert.read_text().strip()

    plain = sandbox.run(net, tmp_path, steps, rules=_rules(tmp_path))  # with --extra-ca
    assert plain.returncode == 0, plain.describe()
    assert {name: _environment(plain["env"]).get(name) for name in CA_ENV_VARS} == dict.fromkeys(
        CA_ENV_VARS, target
    )
    assert fakenet_ca in plain["bundle"].out, "the bundle over the system's lacks the --extra-ca"

    mine = "/some/path/ca.pem"
    overridden = sandbox.run(
        net, tmp_path, steps, rules=_rules(tmp_path), extra=("--env", f"PIP_CERT={mine}")
    )
    assert overridden.returncode == 0, overridden.describe()
    task_env = _environment(overridden["env"])
    assert task_env.get("PIP_CERT") == mine, overridden["env"].out
    assert {
        name: task_env.get(name) for name in CA_ENV_VARS if name != "PIP_CERT"
    } == dict.fromkeys(set(CA_ENV_VARS) - {"PIP_CERT"}, target)
