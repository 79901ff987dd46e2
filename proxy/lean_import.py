"""Import a package's submodules without running the package's own __init__ first.

Some packages' __init__ imports everything they have (mitmproxy.addons: ~30 addons,
a Flask app, ldap3; pyroute2: ipdb, ndb, wireguard, nl80211, ...), tens to hundreds
of milliseconds on every `sandgate run`, for the two or three modules sandgate uses.
`skip_init("pkg")` registers the package as an empty module with the right search
path, so `import pkg.sub` (and `from pkg import sub`) loads just that submodule. The first time anyone asks the
package for a name it does not have yet (`from pkg import Thing`, `pkg.Thing`), the
real __init__ runs then, into the same module, and answers: code that expects the
whole package still gets it, only later.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def skip_init(name: str) -> None:
    """Register package `name` without running its __init__ (see the module docstring).
    Does nothing if it is imported already. Call before anything imports it."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__loader__ = spec.loader
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(importlib.import_module(parent), child, package)

    def complete(attribute: str):
        if attribute.startswith("__"):  # dunder probes (copy, pickle, inspect): not ours
            raise AttributeError(attribute)
        if importlib.util.find_spec(f"{name}.{attribute}") is not None:
            return importlib.import_module(f"{name}.{attribute}")  # `from pkg import sub`
        del package.__getattr__  # the real __init__ may itself probe for missing names
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = complete
    sys.modules[name] = package
