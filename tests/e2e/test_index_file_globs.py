"""A file glob of a denied PyPI project (`/packages/evil_pkg-*`, the deny of
tests/e2e/test_index_name_redirects.py) takes that project's files and not those of a
project whose name starts the same: pip fetches `evil-pkg-extras`.

A deny glob's ASCII punctuation stands for any (`admin-panel` also takes
`admin_panel`: CherryPy, PEP 503 and crates.io read them as one name). Applied in a
segment with `*`, it made the `-` that ends the project's name in a wheel's file
name (PEP 427: `{name}-{version}-...`) match the `_` inside another project's escaped
name: pip read `/simple/evil-pkg-extras/` and was refused
`/packages/evil_pkg_extras-1.0-py3-none-any.whl`. A segment with `*` is a file-name
pattern and is now matched as written. Found by a red team (session 52).

Controls: evil-pkg is refused, good-pkg is fetched. pypiserver from its own venv,
pip in the sandbox (the harness of test_index_name_redirects.py); both gateway paths.
"""

from __future__ import annotations

import pytest
import test_index_name_redirects as index
from support.servers import run_beside

pytestmark = pytest.mark.e2e

IP, PORT, BASE, PIP = index.IP, index.PORT, index.BASE, index.PIP


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_project_named_after_a_denied_one_is_fetched(net, tmp_path, profile):
    if not index.PYPISERVER.exists():
        pytest.skip("needs pypiserver in .venv/pypiserver (scripts/install.sh --test)")
    packages = tmp_path / "packages"
    packages.mkdir()
    index.wheel(packages, "good-pkg", "GOOD")
    index.wheel(packages, "evil-pkg", "EVIL-PACKAGE-CONTENT")
    index.wheel(packages, "evil-pkg-extras", "AN-UNRELATED-PROJECT")
    log = tmp_path / "pypiserver.log"
    rules = tmp_path / "rules.yaml"
    rules.write_text(index.RULES)
    steps = {
        "venv": f"{index.sandbox.SANDBOX_PYTHON} -m venv venv",
        "honest": f"{PIP} --index-url {BASE}/simple/ good-pkg",
        "control": f"{PIP} --index-url {BASE}/simple/ evil-pkg",
        "neighbour": f"{PIP} --index-url {BASE}/simple/ evil-pkg-extras",
        "listed": "ls dl",
    }
    argv = [str(index.PYPISERVER), "run", "-v", "--log-file", str(log), "-p", str(PORT), "-i", IP]
    argv += ["--disable-fallback", "--hash-algo", "sha256", str(packages)]
    result = run_beside(net, tmp_path, [argv], [f"{IP}:{PORT}"], steps, rules, profile)
    served = log.read_text()
    why = f"{result.describe()}\npypiserver:\n{served[-4000:]}"
    assert "good_pkg-1.0-py3-none-any.whl" in result["listed"].out, why
    assert result["control"].rc != 0, why
    assert "evil_pkg-1.0" not in result["listed"].out, why
    assert "evil_pkg_extras-1.0-py3-none-any.whl" in result["listed"].out, why
