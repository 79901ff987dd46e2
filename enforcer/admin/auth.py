"""Who may use the admin page and API, pure: the keys (the generated admin token and
the named keys, keys.py), login sessions and the same-origin check. No sockets, no
files (the server writes the token; `keys` is a callable).

- The API takes `Authorization: Bearer TOKEN`; the page logs in with the same token
  once and then sends its session id in the `X-Sandgate-Session` header, kept in the
  page's sessionStorage. No cookie: a browser attaches a cookie of 127.0.0.1:9465 to
  every port of 127.0.0.1 (cookies ignore ports, and SameSite counts another port as
  the same site), so another web server on the admin's host would get the session.
  Storage is the origin's own (scheme, host and port), a header is never attached by
  the browser itself, and with no credential the browser sends on its own there is
  nothing a cross-site request could ride on. No secret is ever in a URL. The
  approver recorded is the key's name: `alice (api key)` for a bearer token,
  `alice (web)` for the page; the generated token is the key `admin`. A key revoked
  (gone from `keys()`) is refused at once, its sessions too.
- Every POST is refused (403) when its Origin (or, without one, its Referer) is not
  the admin address itself: a cross-site form or fetch is turned away before its
  body is read (and the page's own POSTs always send one).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sandgate.enforcer.admin.keys import ADMIN, digest, find

SESSION_HEADER = "x-sandgate-session"
MAX_SESSIONS = 100  # the oldest go first: a login loop cannot grow memory
MAX_FAILING_PEERS = 1024  # addresses whose wrong credentials are being tallied


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: who (recorded as the approver) and how."""

    approver: str
    session: str | None  # the page's session id; None for a bearer token


@dataclass(frozen=True, slots=True)
class _Session:
    key: str  # the name of the key it logged in with
    key_digest: str  # that key's digest then: a key revoked or replaced ends the session


@dataclass
class Sessions:
    """The generated admin token (the key `admin`), the named keys (`keys()`: name ->
    the token's SHA-256, re-read by the caller as it likes) and the logged-in sessions."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    keys: Callable[[], dict[str, str]] = dict
    _sessions: dict[str, _Session] = field(default_factory=dict)  # by session id

    def all_keys(self) -> dict[str, str]:
        return {**self.keys(), ADMIN: digest(self.token)}

    def key_for(self, given: str) -> str | None:
        """The name of the key `given` is (compared in constant time), or None."""
        return find(self.all_keys(), given)

    def login(self, given: str) -> str | None:
        """A new session id for a valid key, else None."""
        name = self.key_for(given)
        if name is None:
            return None
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session = secrets.token_urlsafe(32)
        self._sessions[session] = _Session(name, digest(given))
        return session

    def logout(self, session: str) -> None:
        self._sessions.pop(session, None)

    def caller(self, headers: dict[str, str]) -> Caller | None:
        """The caller of a request (header names lower-case), or None: 401."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            name = self.key_for(value)
            return Caller(f"{name} (api key)", None) if name is not None else None
        given = headers.get(SESSION_HEADER)
        if not given:
            return None
        for session_id, session in list(self._sessions.items()):
            if hmac.compare_digest(session_id.encode(), given.encode()):
                if self.all_keys().get(session.key) != session.key_digest:
                    del self._sessions[session_id]  # its key was revoked
                    return None
                return Caller(f"{session.key} (web)", session_id)
        return None


def same_origin(headers: dict[str, str], allowed: set[str]) -> bool | None:
    """True: the Origin (else the Referer) is one of `allowed` (`http://host:port`);
    False: it names another site; None: neither header was sent."""
    origin = headers.get("origin")
    if origin is None and "referer" in headers:
        parts = urlsplit(headers["referer"])
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin is None:
        return None
    return origin.lower() in allowed


def post_refusal(headers: dict[str, str], allowed: set[str]) -> str | None:
    """Why a POST must be refused (403), or None."""
    if same_origin(headers, allowed) is False:
        return "cross-site request refused (Origin/Referer is not this admin address)"
    return None


def presents_credentials(headers: dict[str, str]) -> bool:
    """Whether a request carries a token or session at all: one refused with neither
    is a page not logged in yet, not a wrong credential."""
    return bool(headers.get("authorization") or headers.get(SESSION_HEADER))


@dataclass
class FailedCredentials:
    """Wrong tokens and sessions per client address, for the admin's log: the first
    failure from an address is said at once, later ones within `window` seconds are
    counted and said together with the first one after it. A guessing loop makes a
    line a minute, not a line a try; an admin who mistyped sees it at once."""

    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _peers: dict[str, tuple[float, int]] = field(default_factory=dict)  # last said, held back

    def note(self, peer: str) -> int | None:
        """One failure from `peer`: the number to report now (it and those held back
        since the last report), or None (held back)."""
        now = self.clock()
        said, held = self._peers.pop(peer, (None, 0))
        if said is not None and now - said < self.window:
            self._peers[peer] = (said, held + 1)
            return None
        while len(self._peers) >= MAX_FAILING_PEERS:  # the longest unreported goes first
            del self._peers[next(iter(self._peers))]
        self._peers[peer] = (now, 0)
        return held + 1
