"""Who may use the admin page and API, pure: the keys (the generated admin token and
the named keys, keys.py), login sessions, CSRF tokens and the same-origin check. No
sockets, no files (the server writes the token; `keys` is a callable).

- The API takes `Authorization: Bearer TOKEN`; the page logs in with the same token
  once and then carries a session cookie (HttpOnly, SameSite=Strict). No secret is
  ever in a URL. The approver recorded is the key's name: `alice (api key)` for a
  bearer token, `alice (web)` for the page; the generated token is the key `admin`.
  A key revoked (gone from `keys()`) is refused at once, its sessions too.
- Every POST is refused (403) when its Origin (or, without one, its Referer) is not
  the admin address itself: a cross-site form or fetch cannot decide anything.
  A POST authenticated by the cookie must also carry the session's CSRF token (the
  page's hidden field / `X-CSRF-Token` header) and an Origin or Referer; a bearer
  POST may come without either (a script, curl), since browsers never attach a
  bearer token on their own.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sandgate.enforcer.admin.keys import ADMIN, digest, find

COOKIE = "sandgate_session"
MAX_SESSIONS = 100  # the oldest go first: a login loop cannot grow memory


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: who (recorded as the approver) and how."""

    approver: str
    session: str | None  # the cookie's session id; None for a bearer token
    csrf: str | None


@dataclass(frozen=True, slots=True)
class _Session:
    key: str  # the name of the key it logged in with
    key_digest: str  # that key's digest then: a key revoked or replaced ends the session
    csrf: str


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
        self._sessions[session] = _Session(name, digest(given), secrets.token_urlsafe(24))
        return session

    def logout(self, session: str) -> None:
        self._sessions.pop(session, None)

    def caller(self, headers: dict[str, str]) -> Caller | None:
        """The caller of a request (header names lower-case), or None: 401."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            name = self.key_for(value)
            return Caller(f"{name} (api key)", None, None) if name is not None else None
        given = cookies(headers.get("cookie", "")).get(COOKIE)
        if not given:
            return None
        for session_id, session in list(self._sessions.items()):
            if hmac.compare_digest(session_id.encode(), given.encode()):
                if self.all_keys().get(session.key) != session.key_digest:
                    del self._sessions[session_id]  # its key was revoked
                    return None
                return Caller(f"{session.key} (web)", session_id, session.csrf)
        return None


def cookies(header: str) -> dict[str, str]:
    found = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            found.setdefault(name, value)
    return found


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


def post_refusal(
    caller: Caller | None, headers: dict[str, str], allowed: set[str], csrf: str | None
) -> str | None:
    """Why a POST must be refused (403), or None. `csrf`: the token the request
    carried (form field or header)."""
    origin = same_origin(headers, allowed)
    if origin is False:
        return "cross-site request refused (Origin/Referer is not this admin address)"
    if caller is not None and caller.session is not None:
        if origin is None:
            return "a request from the page must carry an Origin or Referer header"
        if not csrf or not hmac.compare_digest(csrf.encode(), (caller.csrf or "").encode()):
            return "missing or wrong CSRF token"
    return None
