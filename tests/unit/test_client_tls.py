"""What a client's failed TLS handshake under inspection was (proxy/policy/client_tls.py):
the reason and rule from the failure's text, as the front door's TLS core and
mitmproxy's tls_failed_client give it."""

from __future__ import annotations

import pytest
from sandgate.proxy.policy.client_tls import client_tls_failure

HANDSHAKE = "builtin:tls-handshake-failed"
REJECTED = "builtin:tls-rejected-by-client"


@pytest.mark.parametrize(
    "error, reason, rule, says",
    [
        pytest.param(
            "unsupported protocol", "protocol_not_allowed", HANDSHAKE, "no TLS version",
            id="door-tls-1.0-client",
        ),
        pytest.param(
            "Client TLS handshake failed. [('SSL routines', '', 'no shared cipher')]",
            "protocol_not_allowed", HANDSHAKE, "no TLS version or cipher", id="mitmproxy-cipher",
        ),
        pytest.param(
            "tlsv1 alert protocol version", "protocol_not_allowed", HANDSHAKE, "in common",
            id="client-alert-version",
        ),
        pytest.param(
            "wrong version number", "malformed_tls", HANDSHAKE, "is not TLS", id="plain-http-after",
        ),
        pytest.param(
            "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "malformed_tls", HANDSHAKE, "is not TLS",
            id="garbage-record-raw-reason",
        ),
        pytest.param(
            "the handshake stalled: not finished within 30 s", "tls_rejected_by_client",
            REJECTED, "did not finish", id="stall",
        ),
        pytest.param(
            "the client closed the connection during the handshake", "tls_rejected_by_client",
            REJECTED, "without an alert", id="closed",
        ),
        pytest.param(
            "tlsv1 alert unknown ca", "tls_rejected_by_client", REJECTED,
            "refused the gateway's certificate", id="door-unknown-ca",
        ),
        pytest.param(
            "Client TLS handshake failed. The client does not trust the proxy's certificate "
            "for api.allowed.test (tlsv1 alert unknown ca)", "tls_rejected_by_client", REJECTED,
            "refused the gateway's certificate", id="mitmproxy-unknown-ca",
        ),
        pytest.param(
            "handshake failed", "tls_rejected_by_client", REJECTED,
            "refused the gateway's certificate", id="unknown-stays-a-refusal",
        ),
    ],
)  # fmt: skip
def test_a_failed_client_handshake_is_named_for_what_happened(error, reason, rule, says):
    decision = client_tls_failure("api.allowed.test", error)
    assert (decision.verdict.value, decision.reason.value, decision.rule_id) == (
        "deny",
        reason,
        rule,
    )
    assert says in decision.detail and "api.allowed.test" in decision.detail
    assert error in decision.detail  # what OpenSSL or mitmproxy said stays


def test_the_error_in_the_detail_is_cut_to_300_characters():
    decision = client_tls_failure("a.test", "tlsv1 alert unknown ca " + "x" * 1000)
    assert decision.detail.endswith("x" * 277) and "x" * 278 not in decision.detail
