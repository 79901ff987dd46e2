"""Import prometheus_client's modules one by one, not its whole package.

`prometheus_client/__init__.py` imports its exposition module, which imports
wsgiref, http.server, http.client, ssl and urllib.request: ~15-20 ms of every
`sandgate run`'s start, for a server that only has to answer a scrape later. With
the package registered without its __init__ (proxy/lean_import.py), the metric
classes load from their own modules, and metrics.py imports the exposition side
where it serves and renders. Import this before anything that imports
prometheus_client.
"""

from sandgate.proxy.lean_import import skip_init

skip_init("prometheus_client")
