"""The gateway's admin side for humans: the approvals page and JSON API (server.py,
auth.py) and the approval webhooks (proxy/approvals/webhook.py), started together
by `Admin.start` for a service or an embedded run. The page's modules load when an
`Admin` is made: an embedded run whose rules never ask makes none (enforcer/run.py)."""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sandgate.enforcer.admin.keys import DEFAULT_KEYS
from sandgate.proxy.policy.names import format_host_port

if TYPE_CHECKING:
    from sandgate.enforcer.admin.server import AdminServer
    from sandgate.proxy.approvals.holder import Approvals
    from sandgate.proxy.approvals.webhook import Webhooks

ADMIN_DEFAULT = "127.0.0.1:9465"


@dataclass
class AdminOptions:
    listen: tuple[str, int] | None = ("127.0.0.1", 9465)  # None: no page, no API
    webhooks: list[str] = field(default_factory=list)
    webhook_format: str = "json"
    webhook_secret: bytes = b""
    # `listen`'s port in use: take any free port on its address instead (and print it).
    # Embedded runs without --admin-listen: a developer's second concurrent run gets
    # its page too. A service, or an address given explicitly, does not start instead
    # (`Admin.start`): whoever has the port would get the approvers' tokens.
    any_port_if_taken: bool = False
    # The named keys (keys.py), besides the generated admin token; re-read on change.
    keys_file: Path = DEFAULT_KEYS


def listen_refusal(option: str, host: str, port: int, e: OSError) -> str:
    """Why a listener could not be had, and what to do: one line for a RunError."""
    where = format_host_port(host, port)
    taken = e.errno == errno.EADDRINUSE
    why = os.strerror(e.errno) if e.errno else str(e)  # asyncio's text names no errno
    return (
        f"{option} {where}: cannot listen: {why}"
        + (f" (who has it: ss -ltnp 'sport = :{port}')" if taken else "")
        + f"; nothing was started: free it, or pass {option} HOST:PORT for another "
        f"address, or {option} off"
    )


def write_token(path: Path, token: str) -> None:
    """Root-only (0600) from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


class Admin:
    def __init__(
        self,
        opts: AdminOptions,
        approvals: Approvals,
        on_webhook_failure=lambda: None,
        on_auth_failure=lambda: None,
    ):
        from sandgate.enforcer.admin.auth import Sessions
        from sandgate.enforcer.admin.keys import KeyFile

        self.opts = opts
        self.on_auth_failure = on_auth_failure
        self.approvals = approvals
        self.sessions = Sessions(keys=KeyFile(opts.keys_file).keys)
        self.server: AdminServer | None = None
        self.url: str | None = None
        self.webhooks: Webhooks | None = None
        self.on_webhook_failure = on_webhook_failure

    async def start(self, token_path: Path, who: str, quiet: bool = False) -> None:
        """The page, then the webhooks. `who`: the stderr prefix (`sandgate`, `sandgate
        gateway`). An address that cannot be listened on stops the start (RunError:
        the service, or a run given --admin-listen): another local user may hold the
        port, and approvers would log in to their page, token and all. Only an embedded
        run on the default address moves to a free port (`any_port_if_taken`), printed;
        if even that fails, it runs without a page (a warning)."""
        from sandgate.enforcer.admin.server import AdminServer, with_wall_time

        if self.opts.listen is not None:
            host, port = self.opts.listen
            try:
                self.server = AdminServer(self.approvals, self.sessions, self.on_auth_failure)
                try:
                    host, port = await self.server.start(host, port)
                except OSError as e:
                    if not (self.opts.any_port_if_taken and e.errno == errno.EADDRINUSE):
                        raise
                    host, port = await self.server.start(host, 0)
            except OSError as e:
                self.server = None
                if not self.opts.any_port_if_taken:
                    from sandgate.enforcer.run import RunError

                    raise RunError(listen_refusal("--admin-listen", host, port, e)) from None
                print(
                    f"{who}: warning: no approvals page: cannot listen on "
                    f"{format_host_port(host, port)}: {e.strerror or e} (--admin-listen)",
                    file=sys.stderr,
                )
            else:
                self.sessions.keys()  # read now: an unusable keys file is a warning at start
                write_token(token_path, self.sessions.token)
                self.url = f"http://{format_host_port(host, port)}/"
                if not quiet:
                    print(
                        f"{who}: approvals page on {self.url} (token in {token_path})",
                        file=sys.stderr,
                        flush=True,
                    )
        if self.opts.webhooks:
            # Here, not with this module: webhook.py imports h11 (~10 ms of every run's
            # start), which only webhooks need.
            from sandgate.proxy.approvals.webhook import Webhooks

            self.webhooks = Webhooks(
                self.opts.webhooks,
                self.opts.webhook_secret,
                self.opts.webhook_format,
                self.url,
                self.on_webhook_failure,
            )
            self.webhooks.start(
                self.approvals, lambda record: with_wall_time(record, self.approvals.clock())
            )

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.server is not None:
            await self.server.stop()
