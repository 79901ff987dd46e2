"""What a client's failed TLS handshake with the gateway was, under inspection: a
deny whose reason and detail say what happened, from the failure's text (OpenSSL's
reason as the front door's TLS core gives it, `tls_relay._why`, or mitmproxy's
`tls_failed_client` message, which carries OpenSSL's text too). Pure.

Three outcomes, checked in this order:
1. no TLS version or cipher in common (a TLS 1.0 client: the gateway speaks 1.2 and
   1.3): `protocol_not_allowed`, `builtin:tls-handshake-failed`;
2. what followed the ClientHello is not TLS the gateway can read (garbage, plain
   HTTP, a record that fails to decrypt): `malformed_tls`, the same rule;
3. anything else is the client refusing the gateway's certificate
   (`tls_rejected_by_client`): an alert naming it, or a client that stopped (a
   stall, a close without an alert), which is how some refuse it silently; the
   detail says which."""

from __future__ import annotations

from .builtin import deny
from .model import Decision
from .reasons import Reason

# OpenSSL's reasons, lower case, "_" as " " (SSLError.reason is UNSUPPORTED_PROTOCOL,
# its message "unsupported protocol").
_NO_COMMON_VERSION = (
    "unsupported protocol",
    "protocol version",  # the client's alert: tlsv1 alert protocol version
    "version too low",
    "no protocols available",
    "inappropriate fallback",
    "no shared cipher",
)
_NOT_TLS = (
    "wrong version number",
    "http request",
    "https proxy request",
    "record layer failure",
    "packet length too long",
    "record length mismatch",
    "bad packet length",
    "bad record type",
    "unexpected record",
    "unexpected message",
    "decryption failed",
    "bad record mac",
    "excessive message size",
)
# A client that stopped rather than refused with an alert.
_STOPPED = ("stalled", "closed", "disconnected", "reset", "eof")


# The failures that are not about the certificate: (markers, reason, what happened).
_HANDSHAKE_FAILURES = (
    (
        _NO_COMMON_VERSION,
        Reason.PROTOCOL_NOT_ALLOWED,
        "no TLS version or cipher in common with the gateway's (TLS 1.2 and 1.3)",
    ),
    (
        _NOT_TLS,
        Reason.MALFORMED_TLS,
        "what followed its ClientHello is not TLS the gateway can read",
    ),
)


def client_tls_failure(name: str, error: str) -> Decision:
    """The deny for a client's failed handshake for `name`, `error` saying how it
    failed (cut to 300 characters in the detail)."""
    error = error[:300]
    text = error.lower().replace("_", " ")
    for markers, reason, what in _HANDSHAKE_FAILURES:
        if any(marker in text for marker in markers):
            detail = f"the client's TLS handshake for {name} failed: {what}: {error}"
            return deny("tls-handshake-failed", detail=detail, reason=reason)
    if any(marker in text for marker in _STOPPED):
        return deny(
            "tls-rejected-by-client",
            detail=f"the client did not finish its TLS handshake for {name} ({error}): "
            "a client refusing the gateway's certificate without an alert stops so",
        )
    return deny(
        "tls-rejected-by-client",
        detail=f"the client refused the gateway's certificate for {name}: {error}",
    )
