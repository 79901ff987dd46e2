"""What a refused HTTP request is answered with: status and a short plain-text page.

Pure (no mitmproxy, no I/O), so that both HTTP paths answer alike: mitmproxy's
(proxy/addon.py: inspected TLS, and plain HTTP a rule needs it for) and the front
door's own HTTP/1 path (proxy/frontdoor/http1.py). git prints each line of a
text/plain error body as `remote: ...`, curl and pip show it as it is.
"""

from __future__ import annotations

import json

from sandgate.proxy.policy import Decision, Reason

CONTENT_TYPE = "text/plain; charset=utf-8"
# The hint of a 431 for a head that never ended within its limit.
UNFINISHED_HEAD_HINT = "A request head must end within its size limit."

# The status of a refused request, by reason; 403 for the others.
_STATUS = {
    Reason.MALFORMED_REQUEST: 400,
    Reason.AMBIGUOUS_PATH: 400,
    Reason.AMBIGUOUS_METHOD: 400,
    Reason.HEADERS_TOO_LARGE: 431,
    # An approved placeholder's name with no public address upstream: a gateway error.
    Reason.DNS_UPSTREAM_FAILURE: 502,
}

_APPROVAL_REASONS = frozenset(
    {
        Reason.APPROVAL_PENDING,
        Reason.APPROVAL_DENIED,
        Reason.APPROVAL_EXPIRED,
        Reason.APPROVAL_QUEUE_FULL,
    }
)


def refusal_status(decision: Decision) -> int:
    return _STATUS.get(decision.reason, 403)


def blocked_page(decision: Decision, method: str, url: str) -> str:
    """The page of a refused request `method url` (url as the client meant it)."""
    if decision.reason in _APPROVAL_REASONS:
        return approval_page(decision, method, url)
    return refusal_text(
        decision,
        f"Ask the network admins; they can check: sandgate check --method "
        f"{printable(method[:32])} {printable(url[:300])}",
    )


def refusal_text(decision: Decision, hint: str) -> str:
    rule = decision.rule
    return (
        f"Blocked by sandgate: {decision.reason}, rule {rule.id} ({rule.origin})\n"
        f"{printable(decision.detail[:300])}\n"
        f"{hint}\n"
    )


def approval_page(decision: Decision, method: str, url: str) -> str:
    """A held request's 403: one line of text, then JSON naming the destination, the
    pending approval and how to ask for it (docs/approvals.md)."""
    approval_id = (
        decision.detail.split(" ", 2)[1].rstrip(":")
        if decision.detail.startswith("approval ")
        else None
    )
    pending = decision.reason is Reason.APPROVAL_PENDING
    # Only a pending approval can still be approved; a decided one is final for the task.
    ask = f"sandgate approvals approve {approval_id}" if approval_id and pending else None
    body = {
        "error": "approval_required" if pending else str(decision.reason),
        "reason": str(decision.reason),
        "destination": f"{method} {url[:300]}",
        "approval_id": approval_id,
        "rule": decision.rule.id,
        "detail": decision.detail,
        "ask_an_admin": ask,
        "retry": pending,
    }
    line = (
        f"sandgate: {method} {url[:300]} needs a human's approval "
        f"({decision.reason}); approval {approval_id}: ask an admin to run `{ask}`, then retry"
        if pending
        else f"sandgate: {method} {url[:300]}: {decision.reason} ({decision.detail})"
    )
    return line + "\n" + json.dumps(body) + "\n"


def printable(text: str) -> str:
    """One line of ASCII: whatever the client sent in the URL stays on its line."""
    return text.encode("ascii", "backslashreplace").decode().encode("unicode_escape").decode()
