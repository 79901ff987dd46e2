"""The dependency rules of docs/architecture.md, read from the source with `ast`
(nothing is imported): `proxy` never imports `enforcer`, and the pure modules
reach no socket, event loop, thread, subprocess, mitmproxy or netlink, not even
through another sandgate module they import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# The pure core. "pkg.*" is the package and every module under it. Extend the
# list as pure modules appear: the connection gate (the proxy/ split names it),
# and the pure DNS modules (query checks, answer filtering, bindings).
PURE_MODULES = [
    "sandgate.proxy.policy.*",
    "sandgate.proxy.clienthello",
    "sandgate.proxy.refusal",
    "sandgate.proxy.frontdoor.http1",
    "sandgate.proxy.gate",
    "sandgate.proxy.lifecycle",
    "sandgate.proxy.dns.query",
    "sandgate.proxy.dns.answer",
    "sandgate.proxy.dns.bindings",
    "sandgate.proxy.dns.placeholders",
    "sandgate.proxy.approvals.pending",
    "sandgate.proxy.dns.wire",
    "sandgate.enforcer.sandbox.spec",
    "sandgate.enforcer.sandbox.gitconfig",
]
IMPURE_IMPORTS = {"socket", "asyncio", "mitmproxy", "pyroute2", "subprocess", "threading"}

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {
    "sandgate.proxy": ROOT / "proxy",
    "sandgate.enforcer": ROOT / "enforcer",
    "sandgate.rules": ROOT / "rules",
}  # as [tool.setuptools] package-dir


def module_index(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py under each package folder."""
    index = {}
    for package, folder in package_dirs.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            index[".".join((package, *parts))] = path
    return index


def imports_of(name: str, path: Path, index: dict[str, Path]) -> set[str]:
    """Absolute names this module imports, anywhere in it (also inside functions),
    apart from `if TYPE_CHECKING:` blocks, which never run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # `from pkg import mod` imports the module pkg.mod
            found.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in index
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and then c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def impure_imports(start: str, index: dict[str, Path]) -> dict[str, str]:
    """Each impure import reachable from `start` through sandgate modules -> the
    chain of modules that leads to it."""
    chains = {start: start}
    todo, bad = [start], {}
    while todo:
        name = todo.pop()
        for imported in sorted(imports_of(name, index[name], index)):
            top = imported.split(".")[0]
            if top in IMPURE_IMPORTS:
                bad.setdefault(imported, f"{chains[name]} -> {imported}")
            for module in _with_parents(imported):
                if module in index and module not in chains:
                    chains[module] = f"{chains[name]} -> {module}"
                    todo.append(module)
    return bad


def expand(patterns: list[str], index: dict[str, Path]) -> list[str]:
    names = []
    for pattern in patterns:
        prefix = pattern.removesuffix(".*")
        matched = [
            n
            for n in index
            if n == prefix or (pattern.endswith(".*") and n.startswith(prefix + "."))
        ]
        assert matched, f"PURE_MODULES names {pattern}, which does not exist"
        names += matched
    return sorted(names)


INDEX = module_index(PACKAGE_DIRS)


@pytest.mark.parametrize("name", sorted(n for n in INDEX if n.startswith("sandgate.proxy")))
def test_proxy_never_imports_enforcer(name):
    enforcer = {
        i
        for i in imports_of(name, INDEX[name], INDEX)
        if i == "sandgate.enforcer" or i.startswith("sandgate.enforcer.")
    }
    assert not enforcer, f"{name} imports {enforcer}: proxy must not depend on enforcer"


@pytest.mark.parametrize("name", expand(PURE_MODULES, INDEX))
def test_pure_modules_import_no_io(name):
    assert not (bad := impure_imports(name, INDEX)), "\n".join(bad.values())


def test_the_checks_see_relative_transitive_and_lazy_imports(tmp_path):
    """The rules above on a made-up tree, so they are known to be able to fail."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("from .calc import add\n")
    (tmp_path / "core" / "calc.py").write_text("from . import helper\ndef add(): return 1\n")
    (tmp_path / "core" / "helper.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n"
        "def f():\n    from sandgate.edge import io\n"
    )
    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "__init__.py").write_text("")
    (tmp_path / "edge" / "io.py").write_text("import socket\n")
    index = module_index({"sandgate.core": tmp_path / "core", "sandgate.edge": tmp_path / "edge"})

    assert impure_imports("sandgate.edge.io", index) == {"socket": "sandgate.edge.io -> socket"}
    assert impure_imports("sandgate.core", index) == {
        "socket": (
            "sandgate.core -> sandgate.core.calc -> sandgate.core.helper -> sandgate.edge.io -> socket"
        )
    }
    assert "sandgate.edge.io" in imports_of(
        "sandgate.core.helper", index["sandgate.core.helper"], index
    )
    assert expand(["sandgate.core.*"], index) == [
        "sandgate.core",
        "sandgate.core.calc",
        "sandgate.core.helper",
    ]
