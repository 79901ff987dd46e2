"""The pure policy core: rule files in, decisions out. No mitmproxy, no sockets.

The names below load their module on first use (PEP 562): `sandgate run --gateway`
needs DEFAULT_RULES, not the compiler behind it, and is timed in milliseconds."""

from __future__ import annotations

import importlib

_HOMES = {
    "decide": "decide",
    "CompiledPolicy": "index",
    "CompiledProfile": "index",
    "DEFAULT_RULES": "files",
    "PolicyError": "problems",
    "Problem": "problems",
    "load_policy": "load",
    "ConnectFacts": "model",
    "Decision": "model",
    "NameFacts": "model",
    "RequestFacts": "model",
    "Rule": "model",
    "InvalidName": "names",
    "parse_domain": "names",
    "parse_ip": "names",
    "Reason": "reasons",
    "Verdict": "reasons",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
