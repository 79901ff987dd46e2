"""TLS session resumption toward upstream servers, for inspected connections.

Every inspected client connection makes mitmproxy open its own upstream TLS
connection (connection_strategy is lazy, and nothing is pooled across clients),
each with a full handshake: key exchange, the server's signature, the chain
verified against the CA bundle. Resuming a session the gateway made with the same
server earlier skips the signature and the chain, on both sides.

`UpstreamSessionResumption` is a mitmproxy addon, added after mitmproxy's TlsConfig:
in `tls_start_server` TlsConfig has just made the pyOpenSSL connection (context,
SNI, hostname check, ALPN), and the addon offers it a cached session; when the
upstream connection ends, the session it ended with is cached. TLS 1.3 sends its
tickets after the handshake, in the first records read with the response, so the
session is taken at the end, not at `tls_established_server`.

What a resumed session must never do is stand in for a verification that was not
made, so a session is only offered to a connection exactly like the one that
verified it:
- the key is (the task, the SSL context, the upstream address and port, the SNI):
  sessions are never shared between tasks (a resumed handshake is shorter: timing
  its own, a task would learn which servers another task reached, as the leaves are
  kept per task for; the front door's own sessions are per task too). mitmproxy
  caches one context per set of TLS settings (verify mode, CA bundle or directory,
  client certificate, versions, ciphers: `net.tls.create_proxy_server_context`), so
  another CA bundle or `ssl_insecure` is another context, another key; the SNI is
  what the hostname was checked against (the check is not repeated on resumption);
- only a session whose handshake completed with OpenSSL's verification result OK is
  cached; a failed handshake caches nothing and its offered session is spent;
- a session is cached for MAX_AGE_S after the full handshake that verified it,
  also when resumed connections renew it (TLS 1.3 gives every connection a new
  ticket): at least that often the server's chain is verified again;
- sessions are used once (TLS 1.3 asks clients not to reuse a ticket) and bounded:
  PER_KEY per key, MAX_KEYS keys, least recently used out first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, NamedTuple

from OpenSSL import SSL

MAX_AGE_S = 300.0  # after the full handshake that verified the server's chain
PER_KEY = 8  # sessions kept per (context, address, SNI): about the concurrent connections
MAX_KEYS = 1024  # upstream (context, address, SNI) combinations remembered

_X509_V_OK = 0


class _Cached(NamedTuple):
    session: SSL.Session
    verified_at: float  # time.monotonic() of the full handshake that verified the chain


class UpstreamSessionCache:
    """Resumable sessions by key, each used once, bounded in count and age."""

    def __init__(
        self,
        max_keys: int = MAX_KEYS,
        per_key: int = PER_KEY,
        max_age_s: float = MAX_AGE_S,
        clock=time.monotonic,
    ):
        self.max_keys, self.per_key, self.max_age_s, self.clock = (
            max_keys,
            per_key,
            max_age_s,
            clock,
        )
        self._sessions: OrderedDict[Any, deque[_Cached]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(cached) for cached in self._sessions.values())

    def take(self, key) -> _Cached | None:
        """The newest session for `key` still within its age, removed from the cache."""
        cached = self._sessions.get(key)
        if cached is None:
            return None
        oldest_allowed = self.clock() - self.max_age_s
        found = None
        while cached:
            entry = cached.pop()
            if entry.verified_at > oldest_allowed:
                found = entry
                break
        if cached:
            self._sessions.move_to_end(key)
        else:
            del self._sessions[key]
        return found

    def put(self, key, session: SSL.Session, verified_at: float) -> None:
        if verified_at <= self.clock() - self.max_age_s:
            return
        cached = self._sessions.get(key)
        if cached is None:
            cached = self._sessions[key] = deque(maxlen=self.per_key)
        cached.append(_Cached(session, verified_at))
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.max_keys:
            self._sessions.popitem(last=False)


class _Upstream(NamedTuple):
    key: tuple
    ssl_conn: SSL.Connection
    offered: _Cached | None  # the session offered to this connection, if any


class UpstreamSessionResumption:
    """The mitmproxy addon (see the module docstring); add it after TlsConfig.

    Counts for tests and the bench: `resumed` (upstream handshakes that resumed),
    `full` (those that did not)."""

    name = "sandgate_upstream_sessions"

    def __init__(self, cache: UpstreamSessionCache | None = None, owner_of=None):
        """`owner_of(context)`: the task of a connection (its Sandbox), for the key."""
        self.cache = cache if cache is not None else UpstreamSessionCache()
        self.owner_of = owner_of if owner_of is not None else (lambda context: None)
        self._open: dict[str, _Upstream] = {}  # by mitmproxy's server connection id
        self.resumed = 0
        self.full = 0

    def tls_start_server(self, tls_start) -> None:
        ssl_conn = tls_start.ssl_conn
        server = tls_start.conn
        if ssl_conn is None or server.address is None:
            return  # nobody made a connection: mitmproxy fails it
        owner = self.owner_of(tls_start.context)
        task = None if owner is None else (owner.task_id, owner.address)
        key = (task, ssl_conn.get_context(), tuple(server.address), server.sni)
        offered = self.cache.take(key)
        if offered is not None:
            ssl_conn.set_session(offered.session)
        self._open[server.id] = _Upstream(key, ssl_conn, offered)

    def tls_failed_server(self, data) -> None:
        self._open.pop(data.conn.id, None)  # its offered session is spent; nothing cached

    def server_disconnected(self, data) -> None:
        upstream = self._open.pop(data.server.id, None)
        if upstream is None or data.server.timestamp_tls_setup is None:
            return  # no TLS, or a handshake that never completed
        ssl = upstream.ssl_conn._ssl
        if SSL._lib.SSL_get_verify_result(ssl) != _X509_V_OK:
            return
        if upstream.offered is not None and SSL._lib.SSL_session_reused(ssl):
            self.resumed += 1
            verified_at = upstream.offered.verified_at  # renewed, not verified again
        else:
            self.full += 1
            # When the handshake verified the chain (a wall-clock stamp), on our clock.
            verified_at = self.cache.clock() - (time.time() - data.server.timestamp_tls_setup)
        # OpenSSL marks a session not resumable when its connection is freed without
        # having sent close_notify (`ssl_clear_bad_session`); mitmproxy closes TCP
        # without one, and frees the connection later. The connection is over: say
        # the close was sent, so that the session cached here stays usable.
        upstream.ssl_conn.set_shutdown(upstream.ssl_conn.get_shutdown() | SSL.SENT_SHUTDOWN)
        session = upstream.ssl_conn.get_session()
        if session is not None:
            self.cache.put(upstream.key, session, verified_at)
