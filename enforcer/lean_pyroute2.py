"""Import pyroute2's modules one by one, not its whole package.

`pyroute2/__init__.py` imports every part of pyroute2 (IPDB, NDB, wireguard,
nl80211, ipvs, ...): about 50 ms of every `sandgate run`'s start, for the two
modules sandgate uses (`iproute`, `netns`). With the package registered without
its __init__ (proxy/lean_import.py), those load alone; `from pyroute2 import X`
elsewhere still works (it runs the real __init__ then). Import this before
anything that imports pyroute2.
"""

from sandgate.proxy.lean_import import skip_init

skip_init("pyroute2")
