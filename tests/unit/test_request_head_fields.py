"""check_head's one-pass field check (request_head._read_fields: known names, one
search over all values) refuses exactly what the field-by-field check refused, with
the same first failure, and its memo of names stays bounded."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.proxy.gate import _as_decided
from sandgate.proxy.policy import request_head
from sandgate.proxy.policy.model import Rule
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.policy.request_head import Decision, RequestHead, check_head, with_overrides

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def field_by_field(fields) -> str | None:
    """The detail of the first field a strict field-by-field check refuses, or None."""
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return "is not an HTTP token"
        if _CONTROL.search(value):
            return f"control characters in header {name.decode('utf-8', 'backslashreplace')}"
    return None


_names = st.sampled_from([b"Host", b"Accept", b"X-A", b"", b"Bad Name", b"a:b", b"\xff", b"x\r"])
_values = st.sampled_from([b"allowed.test", b"*/*", b"", b"a\rb", b"\x00", b"tab\tok", b"\x7f"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=6))
def test_the_first_bad_field_is_the_one_refused(fields):
    fields = ((b"Host", b"allowed.test"), *fields)
    result = check_head(RequestHead(b"GET", b"/", tuple(fields)), 80)
    expected = field_by_field(fields)
    if expected is None:
        assert not (isinstance(result, Decision) and str(result.reason) == "malformed_request")
    else:
        assert isinstance(result, Decision) and str(result.reason) == "malformed_request"
        assert expected in result.detail


def test_a_control_byte_split_over_two_values_is_not_one():
    # The values are searched as one string: a CR ending one and an LF starting the
    # next are each a control byte; and two harmless values never join into one.
    head = RequestHead(b"GET", b"/", ((b"Host", b"allowed.test"), (b"A", b"x\r"), (b"B", b"\ny")))
    refused = check_head(head, 80)
    assert isinstance(refused, Decision) and refused.detail.startswith(
        "control characters in header A"
    )
    ok = RequestHead(b"GET", b"/", ((b"Host", b"allowed.test"), (b"A", b"x"), (b"B", b"y")))
    assert not isinstance(check_head(ok, 80), Decision)


def test_known_names_are_remembered_and_bounded(monkeypatch):
    monkeypatch.setattr(request_head, "_KNOWN_NAMES", {})
    monkeypatch.setattr(request_head, "_MAX_KNOWN_NAMES", 3)
    fields = [(b"Host", b"allowed.test")] + [(b"X-%d" % i, b"v") for i in range(5)]
    assert not isinstance(check_head(RequestHead(b"GET", b"/", tuple(fields)), 80), Decision)
    assert request_head._KNOWN_NAMES == {b"Host": b"host", b"X-0": b"x-0", b"X-1": b"x-1"}
    # A name that is not a token is never remembered, and is refused every time.
    bad = RequestHead(b"GET", b"/", ((b"Host", b"allowed.test"), (b"Bad Name", b"v")))
    for _ in range(2):
        assert str(check_head(bad, 80).reason) == "malformed_request"
    assert b"Bad Name" not in request_head._KNOWN_NAMES


@pytest.mark.parametrize(
    "fields, detail",
    [
        pytest.param(
            ((b"Host", b"a.test"), (b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")),
            "Transfer-Encoding with Content-Length",
            id="te-and-cl",
        ),
        pytest.param(
            ((b"Host", b"a.test"), (b"content-length", b"1"), (b"Content-Length", b"2")),
            "several different Content-Length values",
            id="two-lengths",
        ),
        pytest.param(((b"Host", b"a.test"), (b"Upgrade", b"h2c")), None, id="upgrade-alone"),
    ],
)
def test_framing_is_still_checked_when_more_than_host_is_read(fields, detail):
    result = check_head(RequestHead(b"GET", b"/", fields), 80)
    if detail is None:
        assert result.strip_upgrade
    else:
        assert isinstance(result, Decision) and result.detail == detail


@pytest.mark.parametrize(
    "host, port, tls, forwarded",
    [
        ("allowed.test:8443", 8443, True, None),
        ("allowed.test", 80, False, None),
        ("allowed.test", 443, True, None),
        ("ALLOWED.TEST.", 80, False, "allowed.test"),
        ("allowed.test:08443", 8443, True, "allowed.test:8443"),
        ("Allowed.Test.:0008443", 8443, True, "allowed.test:8443"),
        # The scheme's default port written out, or another left out: as clients send
        # it (a router matching `allowed.test` exactly reads `allowed.test:80` as
        # another host, one matching `allowed.test:8443` the bare name).
        ("allowed.test:80", 80, False, "allowed.test"),
        ("allowed.test:443", 443, True, "allowed.test"),
        ("allowed.test", 8443, True, "allowed.test:8443"),
        ("allowed.test:443", 443, False, None),  # plain HTTP on 443: not its default
        ("203.0.113.10:8443", 8443, True, None),
        ("203.0.113.10:08443", 8443, True, "203.0.113.10:8443"),
        ("203.0.113.10:80", 80, False, "203.0.113.10"),
        ("[2001:db8::1]:8443", 8443, True, None),
        ("[2001:db8::1]:008443", 8443, True, "[2001:db8::1]:8443"),
        ("[2001:db8::1]", 443, True, None),
        ("[2001:db8::1]", 8443, True, "[2001:db8::1]:8443"),
    ],
)
def test_a_host_goes_on_spelled_as_decided(host, port, tls, forwarded):
    """gate._as_decided: the name as decided, the port without leading zeros (an exact
    host:port router, HAProxy's, reads `allowed.test:08443` as another host), and
    only where it is not the scheme's default."""
    checked = check_head(RequestHead(b"GET", b"/", ((b"Host", host.encode()),)), port)
    assert _as_decided(checked, port, tls).forward_host == forwarded


@pytest.mark.parametrize(
    "target, forwarded",
    [
        ("/public/x", None),
        ("/public/x?q=%70", None),  # the query goes on as sent
        ("/%70ublic/x", "/public/x"),
        ("/pub%6Cic/x?q=%70", "/public/x?q=%70"),
        ("/public/%c3%a4", "/public/%C3%A4"),
        ("/public/%C3%A4", None),
    ],
)
def test_a_path_goes_on_spelled_as_decided(target, forwarded):
    """A router that matches the path as sent (HAProxy's `path_beg /public/`) sends
    `/%70ublic/x` to another backend: the path goes on in the form decided."""
    head = RequestHead(b"GET", target.encode(), ((b"Host", b"allowed.test"),))
    assert _as_decided(check_head(head, 80), 80, False).forward_target == forwarded


@pytest.mark.parametrize(
    "override, refused",
    [
        ("other.test", False),  # decided as its own host, not refused for its spelling
        ("allowed.test:0443", True),
        ("ALLOWED.TEST", True),
        ("allowed.test", False),  # the request's own, as decided: no override
        ("other.test.", True),
        ("[::1]:0443", True),
        ("[::1]:443", True),  # a default port: clients leave it out
        ("allowed.test:443", True),
    ],
)
def test_a_host_override_must_be_spelled_as_a_decided_host(override, refused):
    """An override goes on as sent: a spelling the gateway would forward otherwise is
    refused (host_mismatch) before it is decided."""
    head = RequestHead(
        b"GET", b"/", ((b"Host", b"allowed.test"), (b"X-Forwarded-Host", override.encode()))
    )
    checked = check_head(head, 443)
    rule = Rule(id="allowed", action=Verdict.ALLOW, file="rules.yaml", line=1)
    allowed = Decision(Verdict.ALLOW, Reason.RULE_ALLOW, rule)
    decision = with_overrides(allowed, checked, lambda h: allowed)
    assert (decision.reason == Reason.HOST_MISMATCH) is refused, decision
