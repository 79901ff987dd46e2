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
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sandgate.enforcer.admin.keys import ADMIN, digest, find

SESSION_HEADER = "x-sandgate-session"
MAX_SESSIONS = 100  # the oldest go first: a login loop cannot grow memory


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
