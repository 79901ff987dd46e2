"""Import pyroute2's modules one by one, not its whole package.

`pyroute2/__init__.py` imports every part of pyroute2 (IPDB, NDB, wireguard,
nl80211, ipvs, ...): about 50 ms of every `sandgate run`'s start, for the two
modules sandgate uses (`iproute`, `netns`). With the package registered without
its __init__ (proxy/lean_import.py), those load alone; `from pyroute2 import X`
elsewhere still works (it runs the real __init__ then). Import this before
anything that imports pyroute2.

`unittest` likewise: pyroute2.netlink.rtnl.iprsocket does `from unittest import
mock` for one `mock.Mock()` at import (the sync IPRSocket's stand-in queue), and
unittest's __init__ loads its test runner, loader and case machinery (~6 ms) that
no run uses. `unittest.mock` and the real Mock still load; `unittest.TestCase`
asked for later runs the __init__ then.
"""

from sandgate.proxy.lean_import import skip_init

skip_init("pyroute2")
skip_init("unittest")
