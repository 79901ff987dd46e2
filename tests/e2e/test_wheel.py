"""The package an admin installs: a wheel built from the tree, installed with
plain pip into a fresh venv, run from a directory outside the checkout.

The fresh venv gets the declared dependencies from this test's venv through a
plain path line in a .pth file: that directory's own .pth files are not run, so
the editable install's import finder (which maps `sandgate` onto the checkout)
is not active there, and only the wheel's files can answer `import sandgate`.
Needs python3-venv (ensurepip) and pip's usual index for the build backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "proxy", "enforcer", "rules")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def _install(tmp, env: dict | None = None):
    """A wheel built from a copy of the tree (with `env`), installed with plain pip into
    a fresh venv: (venv dir, environment, working directory outside the checkout)."""
    src = tmp / "src"  # a copy: the build's scratch files stay out of the checkout
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        env=env,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("sandgate-*.whl")
    # A compiled program inside: for this platform only, never py3-none-any.
    assert not wheel.name.endswith("-any.whl"), wheel.name

    venv = tmp / "fresh"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, (
        f"python3 -m venv failed (apt-get install python3-venv?):\n{made.stderr}"
    )
    python = venv / "bin" / "python"
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    (Path(site) / "test-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    assert installed.returncode == 0, installed.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, env, elsewhere


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    return _install(tmp_path_factory.mktemp("wheel"))


def _python_command(path: Path, venv: Path) -> None:
    """enforcer/cli/sandgate-python, its first line the venv's python: not pip's
    entry-point script, which imports `re` before main (~4 ms of every run)."""
    first, script = path.read_text().split("\n", 1)
    assert first.startswith(f"#!{venv}/bin/python"), first
    assert "import re" not in script and "from sandgate.enforcer.cli import main" in script


def test_the_wheel_answers_sandgate_and_nothing_else(fresh):
    venv, env, cwd = fresh
    found = _run(
        [venv / "bin" / "python", "-c", "import sandgate.enforcer.cli as m; print(m.__file__)"],
        env=env,
        cwd=cwd,
    )
    assert found.stdout.startswith(str(venv)), found  # the wheel's copy, not the checkout
    for name in ("proxy", "enforcer", "rules"):
        imported = _run([venv / "bin" / "python", "-c", f"import {name}"], env=env, cwd=cwd)
        assert imported.returncode == 1 and "ModuleNotFoundError" in imported.stderr, imported


def test_installed_sandgate_works_outside_the_checkout(fresh):
    venv, env, cwd = fresh
    sandgate = str(venv / "bin" / "sandgate")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert Path(sandgate).read_bytes()[:4] == b"\x7fELF"  # the native front (setup.py)
    _python_command(venv / "bin" / "sandgate-python", venv)

    version = _run([sandgate, "--version"], env=env, cwd=cwd)
    assert (version.returncode, version.stdout) == (
        0,
        f"sandgate {pyproject['project']['version']}\n",
    )

    allowed = _run([sandgate, "check", "pypi.org"], env=env, cwd=cwd)
    assert allowed.returncode == 0 and allowed.stdout.startswith("ALLOW  pypi.org"), allowed
    assert "rule:    preset:pypi  (presets/package-registries.yaml:" in allowed.stdout
    denied = _run([sandgate, "check", "github.com"], env=env, cwd=cwd)
    assert denied.returncode == 1 and denied.stdout.startswith("DENY  github.com"), denied

    shown = _run([sandgate, "rules", "show"], env=env, cwd=cwd)
    assert shown.returncode == 0, shown
    assert (
        shown.stdout.startswith("profile default  (fallback: deny, default.yaml:")
        and "[preset:pypi]" in shown.stdout
    )

    default = _run(
        [
            venv / "bin" / "python",
            "-c",
            "from importlib.resources import files; print(files('sandgate.rules') / 'default.yaml')",
        ],
        env=env,
        cwd=cwd,
    ).stdout.strip()
    assert default.startswith(str(venv)), default
    linted = _run([sandgate, "rules", "lint", default], env=env, cwd=cwd)
    assert (linted.returncode, linted.stdout, linted.stderr) == (0, f"ok: {default}\n", "")


def test_without_a_compiler_sandgate_is_the_python_command(tmp_path):
    """setup.py's fallback: the build goes on, and `sandgate` is sandgate-python."""
    venv, env, cwd = _install(tmp_path, dict(os.environ, CC="/bin/false"))
    _python_command(venv / "bin" / "sandgate", venv)
    _python_command(venv / "bin" / "sandgate-python", venv)
    version = _run([venv / "bin" / "sandgate", "--version"], env=env, cwd=cwd)
    assert version.returncode == 0 and version.stdout.startswith("sandgate "), version


def test_declared_dependencies_are_installed(fresh):
    venv, env, cwd = fresh
    checked = _run([venv / "bin" / "python", "-m", "pip", "check"], env=env, cwd=cwd)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_third_party_import_is_declared():
    """`pip check` sees only what is declared; this sees what the code imports
    (cryptography was imported for a release without being declared)."""
    import ast
    import re
    from importlib.metadata import packages_distributions

    declared = {
        re.split(r"[<>=!~ \[;]", req)[0].lower().replace("_", "-")
        for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    distributions = packages_distributions()
    imported: dict[str, str] = {}
    for path in [*(ROOT / "proxy").rglob("*.py"), *(ROOT / "enforcer").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "sandgate":
                    imported.setdefault(top, str(path.relative_to(ROOT)))
    undeclared = {
        top: where
        for top, where in imported.items()
        if not {d.lower().replace("_", "-") for d in distributions.get(top, [top])} & declared
    }
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
