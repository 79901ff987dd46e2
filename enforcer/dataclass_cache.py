"""The methods `@dataclass` writes, compiled once and kept, for the embedded start.

`dataclasses` makes every class's `__init__`, `__repr__`, `__eq__`, ... by writing
their source and `exec`-ing it. `sandgate run` imports about 80 dataclasses before
its task starts: ~390 such `exec`s, each a parse and a compile of a few lines, ~35 ms
of the start's ~200 ms of imports (docs/performance.md, "Session 17"). The source a
class gets is the same at every start, and so is its code object: `start()` gives
the `dataclasses` module an `exec` of its own (a module global, found before the
builtin) that takes the code compiled for that exact text from a file kept in the
state directory and compiles only what it has not seen; `finish()` takes it away
and writes the file again when something was compiled. Nothing else changes: the
code is what `exec` itself would have compiled (the same text, file name and flags),
and it runs with the same globals and locals.

The file holds code that runs as root, so it is trusted as the seccomp program's
cache is (private_cache.py: read only when it and its directory belong to root and
nobody else can write them); its name carries the interpreter's version and bytecode
magic, and one that does not load is compiled around. What was kept and what this
start compiled are written back together (a start that imports less, such as an
attached run's fallback, does not drop the rest), until the file holds more than
MAX_ENTRIES: then this start's alone, so that it does not grow with every upgrade.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib.util
import marshal
import os
import sys
import types

from sandgate.enforcer import private_cache

# As enforcer/run.py's STATE_DIR: that module is what this start is about to import.
CACHE_DIR = os.path.join(os.environ.get("SANDGATE_STATE_DIR") or "/var/lib/sandgate", "cache")


class _Compiled:
    """`exec` for the dataclasses module: source text -> code object, from `known`."""

    def __init__(self, known: dict[str, object]):
        self.known = known
        self.used: dict[str, object] = {}
        self.missed = 0

    def __call__(self, source, globals=None, locals=None, /):
        if isinstance(source, str):
            code = self.known.get(source)
            if code is None:
                # What exec(source) compiles: file "<string>", and no __future__
                # flags from this module (dont_inherit; dataclasses has none either).
                code = compile(source, "<string>", "exec", dont_inherit=True)
                self.missed += 1
            self.used[source] = code
            source = code
        if globals is None:  # as exec: the caller's namespaces, not this frame's
            caller = sys._getframe(1)
            globals = caller.f_globals
            locals = caller.f_locals if locals is None else locals
        return builtins.exec(source, globals, locals)


def cache_path(directory: str = CACHE_DIR) -> str:
    """Named for the interpreter (its version, and its bytecode's magic number): code
    objects and marshal's format are its own."""
    magic = importlib.util.MAGIC_NUMBER.hex()
    return os.path.join(directory, f"dataclass-methods-{sys.hexversion:x}-{magic}.marshal")


def _load(path: str) -> dict[str, object]:
    data = private_cache.read(path)
    if not data:
        return {}
    try:
        known = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(k, str) and type(v) is types.CodeType}


MAX_ENTRIES = 4096  # an embedded start uses ~400
_active: tuple[_Compiled, str] | None = None


def start(directory: str = CACHE_DIR) -> None:
    """From here until `finish()`, dataclasses compile through the kept file. Only as
    root (the state directory is root's); a second call does nothing."""
    global _active  # noqa: PLW0603 - one per process, like the patch it guards
    if _active is not None or os.geteuid() != 0 or "exec" in vars(dataclasses):
        return
    path = cache_path(directory)
    compiled = _Compiled(_load(path))
    dataclasses.exec = compiled
    _active = (compiled, path)


def finish() -> None:
    """`dataclasses` back to the builtin `exec`; the file written again if this start
    compiled anything it did not hold."""
    global _active  # noqa: PLW0603
    if _active is None:
        return
    compiled, path = _active
    _active = None
    if vars(dataclasses).get("exec") is compiled:
        del dataclasses.exec
    if compiled.missed:
        kept = compiled.known | compiled.used
        if len(kept) > MAX_ENTRIES:
            kept = compiled.used
        private_cache.write(path, marshal.dumps(kept))
