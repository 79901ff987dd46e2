"""Import mitmproxy's addon modules one by one, not its whole addon package.

`mitmproxy/addons/__init__.py` imports all ~30 default addons (a Flask app for
onboarding, ldap3 for proxy auth, ...): about 270 ms of the ~740 ms that importing
the gateway takes, for addons sandgate never loads. With the package registered
without its __init__ (proxy/lean_import.py), `import mitmproxy.addons.core` loads
just that module. Import this before anything that imports `mitmproxy.addons`.
"""

from sandgate.proxy.lean_import import skip_init

skip_init("mitmproxy.addons")
