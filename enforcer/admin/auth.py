"""Who may use the admin page and API, pure: the admin token, login sessions, CSRF
tokens and the same-origin check. No sockets, no files (the server writes the token).

- The API takes `Authorization: Bearer TOKEN`; the page logs in with the same token
  once and then carries a session cookie (HttpOnly, SameSite=Strict). No secret is
  ever in a URL.
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
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "sandgate_session"
MAX_SESSIONS = 100  # the oldest go first: a login loop cannot grow memory


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: who (recorded as the approver) and how."""

    approver: str
    session: str | None  # the cookie's session id; None for a bearer token
    csrf: str | None


@dataclass
class Sessions:
    """The admin token (named `name`: the approver recorded) and the logged-in sessions."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    name: str = "admin"
    _csrf: dict[str, str] = field(default_factory=dict)  # session id -> its CSRF token

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def login(self, given: str) -> str | None:
        """A new session id for the right token, else None."""
        if not self.token_ok(given):
            return None
        while len(self._csrf) >= MAX_SESSIONS:
            del self._csrf[next(iter(self._csrf))]
        session = secrets.token_urlsafe(32)
        self._csrf[session] = secrets.token_urlsafe(24)
        return session

    def logout(self, session: str) -> None:
        self._csrf.pop(session, None)

    def caller(self, headers: dict[str, str]) -> Caller | None:
        """The caller of a request (header names lower-case), or None: 401."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return Caller(f"{self.name} (api token)", None, None) if self.token_ok(value) else None
        session = cookies(headers.get("cookie", "")).get(COOKIE)
        if session:
            for known, csrf in self._csrf.items():
                if hmac.compare_digest(known.encode(), session.encode()):
                    return Caller(f"{self.name} (web)", known, csrf)
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
