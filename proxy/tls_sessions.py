"""The TLS 1.2 sessions each sandbox's pass-through connections were issued, by the
name, address and port each was decided for: what a resumed session must be.

A TLS 1.2 (or older) server that resumes a session serves the server name the
session was made for, not the SNI of the hello that resumes it: OpenSSL's
`SSL_get_servername()` returns the session's name, and SNI routers that terminate
TLS (HAProxy's `ssl_fc_sni`, nginx's `$ssl_server_name`, stunnel's `sni =`) pick the
tenant by it. A task given a session made elsewhere for a tenant no rule allows
(a ticket and master secret are a file) would resume it under an allowed name and
reach that tenant (a red team, session 49). So a pass-through connection allowed by
name may resume only a session the gateway saw issued, in plaintext, on a connection
of the same sandbox decided for the same name, address and port: the session id of a
full handshake's ServerHello, or a NewSessionTicket's ticket
(proxy/frontdoor/hello_watch.py reads both). Anything else resumed is reset before
the client's next bytes go (`builtin:resumed-session`). TLS 1.3 servers take the
name from the hello, and its tickets are encrypted: not concerned.

Per sandbox, at most MAX_PER_SANDBOX entries, the least recently issued or resumed
forgotten first: a task that floods its own store only loses its own resumptions (a
reset, then a full handshake on the client's next try), never another sandbox's.
Kept as digests.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable

MAX_PER_SANDBOX = 4096  # ~200 bytes each: 0.8 MiB a sandbox at most

Where = Hashable
"""What a connection was decided for: (name, address, port)."""


def _digest(kind: str, identifier: bytes) -> bytes:
    return hashlib.blake2b(identifier, digest_size=16, person=kind.encode()).digest()


class IssuedSessions:
    """Sandbox address -> the sessions issued to it, and where each was issued."""

    def __init__(self, per_sandbox: int = MAX_PER_SANDBOX):
        self.per_sandbox = per_sandbox
        self._by_sandbox: dict[str, OrderedDict[bytes, Where]] = {}

    def add(self, sandbox: str, sessions: Iterable[tuple[str, bytes]], where: Where) -> None:
        """`sessions` ((kind, identifier): "id" or "ticket") were issued to `sandbox`
        on a connection decided for `where`."""
        store = self._by_sandbox.setdefault(sandbox, OrderedDict())
        for kind, identifier in sessions:
            key = _digest(kind, identifier)
            store[key] = where
            store.move_to_end(key)
        while len(store) > self.per_sandbox:
            store.popitem(last=False)

    def issued_where(self, sandbox: str, kind: str, identifier: bytes) -> Where | None:
        """Where the session (kind, identifier) was issued to `sandbox`, None if never."""
        store = self._by_sandbox.get(sandbox)
        if store is None:
            return None
        key = _digest(kind, identifier)
        where = store.get(key)
        if where is not None:
            store.move_to_end(key)  # in use: the last to be forgotten
        return where

    def forget(self, sandbox: str) -> None:
        """The sandbox's task ended: the next task at its address starts with none."""
        self._by_sandbox.pop(sandbox, None)
