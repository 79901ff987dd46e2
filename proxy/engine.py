"""mitmproxy embedded in the gateway's event loop, with only the addons sandgate needs.

The default addon set dispatches every hook to ~30 addons; trimmed to what the
transparent data path uses, the connection rate roughly doubles. Options exist only
once the addon that declares them is added, so options are set after `add`.
"""

from __future__ import annotations

import proxy.lean_mitmproxy  # noqa: F401 - must come before any mitmproxy import
import asyncio
import logging
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, proxyserver, tlsconfig
from mitmproxy.master import Master

log = logging.getLogger("sandgate.engine")


class ProxyEngine:
    """One mitmproxy instance in transparent mode, listening on `host:port`."""

    def __init__(self, addon, host: str, port: int, confdir: Path, upstream_ca: Path | None = None):
        self.addon = addon
        self.host, self.port = host, port
        self.confdir = confdir
        self.upstream_ca = upstream_ca
        self.master: Master | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.confdir.mkdir(parents=True, exist_ok=True)
        opts = options.Options()
        master = Master(opts)
        # No NextLayer addon: sandgate's addon is the only one that picks a layer, so
        # a connection it has not decided on yet (half a ClientHello) waits, and
        # cannot be given a layer by anyone else.
        master.addons.add(core.Core(), proxyserver.Proxyserver(), self.addon, tlsconfig.TlsConfig(),
                          disable_h2c.DisableH2C())
        update = {
            "mode": [f"transparent@{self.host}:{self.port}"],
            # Lazy: never open an upstream connection before the policy allowed it.
            "connection_strategy": "lazy",
            "confdir": str(self.confdir),
            # Bodies of inspected requests stream through instead of being buffered.
            "stream_large_bodies": "1m",
        }
        if self.upstream_ca is not None:
            update["ssl_verify_upstream_trusted_ca"] = str(self.upstream_ca)
        opts.update(**update)
        self.master = master
        ps = master.addons.get("proxyserver")
        self._task = asyncio.create_task(master.run(), name="mitmproxy")
        # run() binds the listeners, then fires `running`; wait for that, or a failure.
        while not ps.is_running and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done() or not ps.listen_addrs():
            await self.stop()
            raise RuntimeError(f"mitmproxy could not listen on {self.host}:{self.port} (see the log above)")

    @property
    def ca_cert(self) -> Path:
        """The gateway CA's certificate (PEM), generated in confdir on first start."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    async def stop(self) -> None:
        if self.master is None:
            return
        self.master.shutdown()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        self.master = None
