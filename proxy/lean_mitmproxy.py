"""Import mitmproxy's addon modules one by one, not its whole addon package.

`mitmproxy/addons/__init__.py` imports all ~30 default addons (a Flask app for
onboarding, ldap3 for proxy auth, ...): about 270 ms of the ~740 ms that importing
the gateway takes, for addons sandgate never loads, on every `sandgate run`.
Registering the package without running its __init__ lets `import
mitmproxy.addons.core` load just that module. Import this before anything that
imports `mitmproxy.addons`; `mitmproxy.addons.default_addons` is then absent,
which only mitmproxy's own tools use.
"""

import importlib.util
import sys
import types

if "mitmproxy.addons" not in sys.modules:
    _spec = importlib.util.find_spec("mitmproxy.addons")
    _package = types.ModuleType("mitmproxy.addons")
    _package.__path__ = list(_spec.submodule_search_locations)
    _package.__spec__ = _spec
    _package.__file__ = _spec.origin
    sys.modules["mitmproxy.addons"] = _package
