"""decide(policy, facts): decision tables asserting verdict, reason and rule id, and
properties (hypothesis) for the semantics in DESIGN.md "Policy semantics"."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandgate.proxy.policy import (
    DEFAULT_RULES,
    ConnectFacts,
    NameFacts,
    PolicyError,
    Reason,
    RequestFacts,
    Verdict,
    decide,
    load_policy,
    parse_domain,
    parse_ip,
)
from sandgate.proxy.policy.builtin import BUILTINS, builtin_rule
from sandgate.proxy.policy.builtin import deny as deny_by
from sandgate.proxy.policy.names import (
    _PUBLIC_SUFFIXES,
    CLOUD_INTERNAL_ADDRESSES,
    is_public_suffix,
    parse_network,
    special_range,
)

ALLOW, DENY, ASK, AUDIT = Verdict.ALLOW, Verdict.DENY, Verdict.ASK, Verdict.AUDIT
ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "rules.md"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


POLICY = """\
version: 1
profiles:
  default:
    fallback: deny
    rules:
      - allow: github.com
        id: github
        ports: [443, 22]
      - allow: "*.githubusercontent.com"
        id: gh-content
      - allow: api.github.com
        id: gh-api
        methods: [GET, HEAD]
        paths: ["/repos/**", "/users/*"]
      - deny: gist.github.com
        id: no-gists
      - allow: "*.example.org"
        id: example-org-below
      - deny: secret.example.org
        id: no-secret
      - allow: Bücher.Example.
        id: idn
      - allow: pypi.org
        id: pypi
      - allow: internal.example.com
        id: internal-name
      - allow: example.net
        id: example-net
      - deny: example.net
        id: example-net-no-admin
        paths: ["/admin/**"]
      - deny: example.net
        id: example-net-no-delete
        methods: [DELETE]
      - allow: 203.0.113.0/24
        id: doc-net
        ports: [443]
      - deny: 203.0.113.66
        id: bad-host
      - allow: 2001:db8:1::/48
        id: doc-net6
      - allow: 10.20.0.0/16
        id: lab
        ports: [8080]
      - allow: fd00:20::/32
        id: lab6
  open-world:
    rules:
      - allow: [0.0.0.0/0, "::/0"]
        id: everything
  mixed:
    rules:
      - allow: [10.0.0.0/8, 0.0.0.0/0]
        id: ten-and-world
  metadata:
    rules:
      - allow: 169.254.169.254
        id: metadata
        ports: [80]
  ask:
    fallback: ask
    rules:
      - allow: pypi.org
        id: ask-pypi
  audit:
    fallback: audit
    rules:
      - deny: evil.test
        id: audit-no-evil
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    return load_policy(path, today=datetime.date(2026, 1, 1))


def connect(
    target: str,
    port: int = 443,
    *,
    ip: str | None = None,
    resolved: bool | None = None,
    profile: str = "default",
) -> ConnectFacts:
    """Facts as the gateway builds them: every spelling through the canonicaliser."""
    address = parse_ip(target)
    name = None if address is not None else parse_domain(target)
    if ip is not None:
        address = parse_ip(ip)
    return ConnectFacts(
        profile=profile, port=port, ip=address, name=name, name_resolved_to_ip=resolved
    )


def request(
    target: str, method: str, path: str, port: int = 443, profile: str = "default", **kw
) -> RequestFacts:
    c = connect(target, port, profile=profile, **kw)
    return RequestFacts(
        profile=c.profile,
        port=c.port,
        method=method,
        path=path,
        ip=c.ip,
        name=c.name,
        name_resolved_to_ip=c.name_resolved_to_ip,
    )


FALLBACK = "default:fallback"
PRIVATE = "builtin:private-address"
SPOOFED = "builtin:spoofed-destination"

CASES = [
    # --- names: exact, wildcard, apex, suffix confusion
    pytest.param(connect("github.com"), ALLOW, Reason.RULE_ALLOW, "github", id="exact"),
    pytest.param(
        connect("GitHub.COM."), ALLOW, Reason.RULE_ALLOW, "github", id="case-and-trailing-dot"
    ),
    pytest.param(
        connect("evilgithub.com"), DENY, Reason.NO_RULE, FALLBACK, id="prefix-glued-is-another-name"
    ),
    pytest.param(
        connect("github.com.evil.test"),
        DENY,
        Reason.NO_RULE,
        FALLBACK,
        id="name-as-a-subdomain-elsewhere",
    ),
    pytest.param(
        connect("www.github.com"),
        DENY,
        Reason.NO_RULE,
        FALLBACK,
        id="exact-does-not-cover-subdomains",
    ),
    pytest.param(
        connect("g\u0456thub.com"), DENY, Reason.NO_RULE, FALLBACK, id="cyrillic-i-lookalike"
    ),
    pytest.param(
        connect("xn--gthub-n2e.com"), DENY, Reason.NO_RULE, FALLBACK, id="lookalike-as-punycode"
    ),
    pytest.param(
        connect("\uff47\uff49\uff54\uff48\uff55\uff42.com"),
        ALLOW,
        Reason.RULE_ALLOW,
        "github",
        id="fullwidth-is-the-same-name",
    ),
    pytest.param(
        connect("raw.githubusercontent.com"), ALLOW, Reason.RULE_ALLOW, "gh-content", id="wildcard"
    ),
    pytest.param(
        connect("a.b.githubusercontent.com"),
        ALLOW,
        Reason.RULE_ALLOW,
        "gh-content",
        id="wildcard-deep",
    ),
    pytest.param(
        connect("githubusercontent.com"), DENY, Reason.NO_RULE, FALLBACK, id="wildcard-not-apex"
    ),
    pytest.param(
        connect("evilgithubusercontent.com"),
        DENY,
        Reason.NO_RULE,
        FALLBACK,
        id="wildcard-not-glued",
    ),
    pytest.param(
        connect("githubusercontent.com.evil.test"),
        DENY,
        Reason.NO_RULE,
        FALLBACK,
        id="wildcard-base-as-a-subdomain-elsewhere",
    ),
    pytest.param(
        connect("xn--bcher-kva.example"),
        ALLOW,
        Reason.RULE_ALLOW,
        "idn",
        id="idn-rule-punycode-name",
    ),
    pytest.param(
        connect("BÜCHER.example"), ALLOW, Reason.RULE_ALLOW, "idn", id="idn-rule-unicode-name"
    ),
    # --- deny wins
    pytest.param(connect("gist.github.com"), DENY, Reason.RULE_DENY, "no-gists", id="deny-exact"),
    pytest.param(
        connect("www.example.org"),
        ALLOW,
        Reason.RULE_ALLOW,
        "example-org-below",
        id="wildcard-allow",
    ),
    pytest.param(
        connect("secret.example.org"),
        DENY,
        Reason.RULE_DENY,
        "no-secret",
        id="deny-inside-wildcard",
    ),
    pytest.param(
        connect("203.0.113.66"),
        DENY,
        Reason.RULE_DENY,
        "bad-host",
        id="deny-ip-inside-allowed-cidr",
    ),
    pytest.param(
        connect("pypi.org", ip="203.0.113.66"),
        DENY,
        Reason.RULE_DENY,
        "bad-host",
        id="deny-ip-beats-allowed-name",
    ),
    pytest.param(
        connect("gist.github.com", ip="203.0.113.5", resolved=False),
        DENY,
        Reason.RULE_DENY,
        "no-gists",
        id="deny-name-beats-allowed-ip",
    ),
    # --- ports
    pytest.param(connect("pypi.org", 80), ALLOW, Reason.RULE_ALLOW, "pypi", id="default-port-80"),
    pytest.param(connect("pypi.org", 443), ALLOW, Reason.RULE_ALLOW, "pypi", id="default-port-443"),
    pytest.param(
        connect("pypi.org", 8443), DENY, Reason.PORT_NOT_ALLOWED, FALLBACK, id="default-ports-only"
    ),
    pytest.param(connect("github.com", 22), ALLOW, Reason.RULE_ALLOW, "github", id="explicit-port"),
    pytest.param(
        connect("github.com", 80),
        DENY,
        Reason.PORT_NOT_ALLOWED,
        FALLBACK,
        id="explicit-ports-replace-defaults",
    ),
    # --- CIDR, IPv4 and IPv6, every spelling
    pytest.param(connect("203.0.113.5"), ALLOW, Reason.RULE_ALLOW, "doc-net", id="cidr-v4"),
    pytest.param(
        connect("3405803781"), ALLOW, Reason.RULE_ALLOW, "doc-net", id="cidr-v4-decimal-spelling"
    ),
    pytest.param(
        connect("0xcb.0.0x71.5"), ALLOW, Reason.RULE_ALLOW, "doc-net", id="cidr-v4-hex-spelling"
    ),
    pytest.param(
        connect("::ffff:203.0.113.5"), ALLOW, Reason.RULE_ALLOW, "doc-net", id="cidr-v4-mapped-v6"
    ),
    pytest.param(
        connect("203.0.113.5", 80), DENY, Reason.PORT_NOT_ALLOWED, FALLBACK, id="cidr-port"
    ),
    pytest.param(connect("203.0.114.1"), DENY, Reason.NO_RULE, FALLBACK, id="outside-cidr-v4"),
    pytest.param(connect("2001:db8:1:ffff::1"), ALLOW, Reason.RULE_ALLOW, "doc-net6", id="cidr-v6"),
    pytest.param(
        connect("[2001:DB8:1::]"), ALLOW, Reason.RULE_ALLOW, "doc-net6", id="cidr-v6-spelling"
    ),
    pytest.param(connect("2001:db8:2::1"), DENY, Reason.NO_RULE, FALLBACK, id="outside-cidr-v6"),
    # --- private ranges: a name rule never opens them, a CIDR inside them does
    pytest.param(
        connect("internal.example.com", ip="10.1.2.3"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-private",
    ),
    pytest.param(
        connect("internal.example.com", ip="169.254.169.254"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-metadata",
    ),
    pytest.param(
        connect("internal.example.com", ip="::ffff:169.254.169.254"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-mapped-metadata",
    ),
    pytest.param(
        connect("internal.example.com", ip="2002:a9fe:a9fe::1"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-6to4-metadata",
    ),
    pytest.param(
        connect("internal.example.com", ip="64:ff9b::a9fe:a9fe"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-nat64-metadata",
    ),
    pytest.param(
        connect("internal.example.com", ip="100.64.0.1"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-cgnat",
    ),
    pytest.param(
        connect("internal.example.com", ip="127.0.0.1"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-loopback",
    ),
    pytest.param(
        connect("internal.example.com", ip="::1"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="allowed-name-resolving-to-v6-loopback",
    ),
    pytest.param(
        connect("internal.example.com", ip="8.8.8.8"),
        ALLOW,
        Reason.RULE_ALLOW,
        "internal-name",
        id="allowed-name-resolving-to-public",
    ),
    pytest.param(
        connect("0251.0376.0251.0376"), DENY, Reason.PRIVATE_ADDRESS, PRIVATE, id="metadata-octal"
    ),
    pytest.param(connect("0x7f.1"), DENY, Reason.PRIVATE_ADDRESS, PRIVATE, id="loopback-hex-short"),
    pytest.param(connect("0.0.0.0"), DENY, Reason.PRIVATE_ADDRESS, PRIVATE, id="unspecified"),
    pytest.param(connect("224.0.0.1"), DENY, Reason.PRIVATE_ADDRESS, PRIVATE, id="multicast"),
    pytest.param(
        connect("10.20.1.1", 8080), ALLOW, Reason.RULE_ALLOW, "lab", id="cidr-inside-10/8-opens-it"
    ),
    pytest.param(
        connect("::ffff:10.20.1.1", 8080), ALLOW, Reason.RULE_ALLOW, "lab", id="opened-range-mapped"
    ),
    pytest.param(
        connect("10.20.1.1", 443),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="opened-range-other-port",
    ),
    pytest.param(
        connect("10.21.0.1", 8080), DENY, Reason.PRIVATE_ADDRESS, PRIVATE, id="outside-opened-range"
    ),
    pytest.param(
        connect("fd00:20::1"), ALLOW, Reason.RULE_ALLOW, "lab6", id="cidr-inside-ula-opens-it"
    ),
    pytest.param(
        connect("fd00:21::1"), DENY, Reason.PRIVATE_ADDRESS, PRIVATE, id="outside-opened-ula"
    ),
    pytest.param(
        connect("169.254.169.254", profile="open-world"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="0.0.0.0/0-does-not-open-metadata",
    ),
    pytest.param(
        connect("10.0.0.1", profile="open-world"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="0.0.0.0/0-does-not-open-10/8",
    ),
    pytest.param(
        connect("::1", profile="open-world"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="::/0-does-not-open-loopback",
    ),
    pytest.param(
        connect("::ffff:169.254.169.254", profile="open-world"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="::/0-does-not-open-mapped-metadata",
    ),
    pytest.param(
        connect("fe80::1", profile="open-world"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="::/0-does-not-open-link-local",
    ),
    pytest.param(
        connect("8.8.8.8", profile="open-world"),
        ALLOW,
        Reason.RULE_ALLOW,
        "everything",
        id="0.0.0.0/0-opens-public",
    ),
    pytest.param(
        connect("10.1.1.1", profile="mixed"),
        ALLOW,
        Reason.RULE_ALLOW,
        "ten-and-world",
        id="multi-network-rule-opens-its-private-network",
    ),
    pytest.param(
        connect("169.254.169.254", profile="mixed"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="multi-network-rule-does-not-open-metadata-through-0/0",
    ),
    pytest.param(
        connect("169.254.169.254", 80, profile="metadata"),
        ALLOW,
        Reason.RULE_ALLOW,
        "metadata",
        id="metadata-opened-explicitly",
    ),
    pytest.param(
        connect("::ffff:169.254.169.254", 80, profile="metadata"),
        ALLOW,
        Reason.RULE_ALLOW,
        "metadata",
        id="metadata-opened-explicitly-mapped-spelling",
    ),
    # --- spoofed destination: the name never resolved to this address
    pytest.param(
        connect("github.com", ip="140.82.112.3", resolved=False),
        DENY,
        Reason.SPOOFED_DESTINATION,
        SPOOFED,
        id="spoofed",
    ),
    pytest.param(
        connect("github.com", ip="140.82.112.3", resolved=True),
        ALLOW,
        Reason.RULE_ALLOW,
        "github",
        id="resolved",
    ),
    pytest.param(
        connect("github.com", ip="140.82.112.3", resolved=None),
        ALLOW,
        Reason.RULE_ALLOW,
        "github",
        id="not-checked",
    ),
    pytest.param(
        connect("github.com", ip="203.0.113.5", resolved=False),
        ALLOW,
        Reason.RULE_ALLOW,
        "doc-net",
        id="unresolved-but-ip-rule-allows",
    ),
    pytest.param(
        connect("unknown.test", ip="140.82.112.3", resolved=False),
        DENY,
        Reason.NO_RULE,
        FALLBACK,
        id="unresolved-and-no-rule",
    ),
    # --- fallbacks
    pytest.param(
        connect("unknown.test", profile="ask"),
        ASK,
        Reason.NO_RULE,
        "ask:fallback",
        id="fallback-ask",
    ),
    pytest.param(
        connect("pypi.org", 8443, profile="ask"),
        ASK,
        Reason.PORT_NOT_ALLOWED,
        "ask:fallback",
        id="fallback-ask-port",
    ),
    pytest.param(
        connect("pypi.org", profile="ask"),
        ALLOW,
        Reason.RULE_ALLOW,
        "ask-pypi",
        id="ask-profile-allow",
    ),
    pytest.param(
        connect("unknown.test", profile="audit"),
        AUDIT,
        Reason.NO_RULE,
        "audit:fallback",
        id="fallback-audit",
    ),
    pytest.param(
        connect("evil.test", profile="audit"),
        DENY,
        Reason.RULE_DENY,
        "audit-no-evil",
        id="audit-still-denies-deny-rules",
    ),
    pytest.param(
        connect("169.254.169.254", profile="audit"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="audit-never-opens-private",
    ),
    pytest.param(
        connect("10.0.0.1", profile="ask"),
        DENY,
        Reason.PRIVATE_ADDRESS,
        PRIVATE,
        id="ask-never-asks-for-private",
    ),
    # --- unknown profile
    pytest.param(
        connect("pypi.org", profile="nope"),
        DENY,
        Reason.UNKNOWN_PROFILE,
        "builtin:unknown-profile",
        id="unknown-profile",
    ),
]


@pytest.mark.parametrize(("facts", "verdict", "reason", "rule"), CASES)
def test_connection_decisions(policy, facts, verdict, reason, rule):
    decision = decide(policy, facts)
    assert (decision.verdict, decision.reason, decision.rule_id) == (verdict, reason, rule), (
        decision.detail
    )


# --- methods and paths: inspection at connection time, the rule at request time ----------


@pytest.mark.parametrize(
    ("facts", "verdict", "reason", "rule", "inspect"),
    [
        pytest.param(
            connect("api.github.com"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            True,
            id="connection-allowed-with-inspection",
        ),
        pytest.param(
            connect("api.github.com", 80),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            True,
            id="connection-allowed-with-inspection-port-80",
        ),
        pytest.param(
            connect("example.net"),
            ALLOW,
            Reason.RULE_ALLOW,
            "example-net",
            True,
            id="deny-with-paths-needs-inspection",
        ),
        pytest.param(
            connect("pypi.org"), ALLOW, Reason.RULE_ALLOW, "pypi", False, id="no-inspection"
        ),
        pytest.param(
            connect("github.com"),
            ALLOW,
            Reason.RULE_ALLOW,
            "github",
            False,
            id="no-inspection-for-sibling-of-inspected-name",
        ),
    ],
)
def test_connection_inspection(policy, facts, verdict, reason, rule, inspect):
    decision = decide(policy, facts)
    assert (decision.verdict, decision.reason, decision.rule_id, decision.inspect) == (
        verdict,
        reason,
        rule,
        inspect,
    ), decision.detail


@pytest.mark.parametrize(
    ("facts", "verdict", "reason", "rule"),
    [
        pytest.param(
            request("api.github.com", "GET", "/repos/x/y"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="double-star-crosses-slash",
        ),
        pytest.param(
            request("api.github.com", "GET", "/repos/x/y/z/pulls"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="double-star-deep",
        ),
        pytest.param(
            request("api.github.com", "GET", "/repos/"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="double-star-matches-the-directory",
        ),
        pytest.param(
            request("api.github.com", "GET", "/repos"),
            DENY,
            Reason.PATH_NOT_ALLOWED,
            "default:fallback",
            id="double-star-not-the-bare-prefix",
        ),
        pytest.param(
            request("api.github.com", "HEAD", "/repos/x"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="second-method",
        ),
        pytest.param(
            request("api.github.com", "head", "/repos/x"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="method-case",
        ),
        pytest.param(
            request("api.github.com", "GET", "/users/octocat"),
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="single-star-one-segment",
        ),
        pytest.param(
            request("api.github.com", "GET", "/users/octocat/keys"),
            DENY,
            Reason.PATH_NOT_ALLOWED,
            FALLBACK,
            id="single-star-does-not-cross-slash",
        ),
        pytest.param(
            request("api.github.com", "GET", "/reposx"),
            DENY,
            Reason.PATH_NOT_ALLOWED,
            FALLBACK,
            id="double-star-needs-a-segment-break",
        ),
        pytest.param(
            request("api.github.com", "GET", "/user/keys"),
            DENY,
            Reason.PATH_NOT_ALLOWED,
            FALLBACK,
            id="other-path",
        ),
        pytest.param(
            request("api.github.com", "GET", "/repos/../user/keys"),
            DENY,
            Reason.PATH_NOT_ALLOWED,
            FALLBACK,
            id="dot-dot-escapes-the-glob",
        ),
        pytest.param(
            request("api.github.com", "GET", "/repos/%2e%2e/user/keys"),
            DENY,
            Reason.PATH_NOT_ALLOWED,
            FALLBACK,
            id="encoded-dot-dot-escapes-the-glob",
        ),
        pytest.param(
            request("api.github.com", "POST", "/repos/x/y"),
            DENY,
            Reason.METHOD_NOT_ALLOWED,
            FALLBACK,
            id="method-not-allowed",
        ),
        pytest.param(
            request("example.net", "GET", "/index.html"),
            ALLOW,
            Reason.RULE_ALLOW,
            "example-net",
            id="allow-around-a-path-deny",
        ),
        pytest.param(
            request("example.net", "GET", "/admin/users"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-admin",
            id="path-deny",
        ),
        pytest.param(
            request("example.net", "GET", "/admin"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-admin",
            id="path-deny-directory",
        ),
        pytest.param(
            request("example.net", "GET", "//admin/users"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-admin",
            id="path-deny-double-slash",
        ),
        pytest.param(
            request("example.net", "GET", "/%61dmin/users"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-admin",
            id="path-deny-escaped-letter",
        ),
        pytest.param(
            request("example.net", "GET", "/public/../admin"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-admin",
            id="path-deny-dot-dot",
        ),
        pytest.param(
            request("example.net", "DELETE", "/x"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-delete",
            id="method-deny",
        ),
        pytest.param(
            request("example.net", "delete", "/x"),
            DENY,
            Reason.RULE_DENY,
            "example-net-no-delete",
            id="method-deny-lower-case",
        ),
        pytest.param(
            request("pypi.org", "POST", "/anything"),
            ALLOW,
            Reason.RULE_ALLOW,
            "pypi",
            id="rule-without-methods-allows-every-request",
        ),
        pytest.param(
            request("gist.github.com", "GET", "/"),
            DENY,
            Reason.RULE_DENY,
            "no-gists",
            id="plain-deny-at-request-time",
        ),
        pytest.param(
            request("internal.example.com", "GET", "/", ip="10.0.0.1"),
            DENY,
            Reason.PRIVATE_ADDRESS,
            PRIVATE,
            id="private-at-request-time",
        ),
        pytest.param(
            request("github.com", "GET", "/", ip="140.82.112.3", resolved=False),
            DENY,
            Reason.SPOOFED_DESTINATION,
            SPOOFED,
            id="spoofed-at-request-time",
        ),
    ],
)
def test_request_decisions(policy, facts, verdict, reason, rule):
    decision = decide(policy, facts)
    assert (decision.verdict, decision.reason, decision.rule_id) == (verdict, reason, rule), (
        decision.detail
    )
    assert decision.inspect is False  # the request is the inspection


# --- DNS questions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "profile", "verdict", "reason", "rule"),
    [
        pytest.param("github.com", "default", ALLOW, Reason.RULE_ALLOW, "github", id="allowed"),
        pytest.param(
            "api.github.com",
            "default",
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-api",
            id="inspected-rule-resolves",
        ),
        pytest.param(
            "raw.githubusercontent.com",
            "default",
            ALLOW,
            Reason.RULE_ALLOW,
            "gh-content",
            id="wildcard",
        ),
        pytest.param(
            "githubusercontent.com", "default", DENY, Reason.NO_RULE, FALLBACK, id="wildcard-apex"
        ),
        pytest.param("gist.github.com", "default", DENY, Reason.RULE_DENY, "no-gists", id="denied"),
        pytest.param(
            "secret.example.org",
            "default",
            DENY,
            Reason.RULE_DENY,
            "no-secret",
            id="deny-under-wildcard",
        ),
        pytest.param(
            "example.net",
            "default",
            ALLOW,
            Reason.RULE_ALLOW,
            "example-net",
            id="inspected-deny-does-not-block-the-name",
        ),
        pytest.param("unknown.test", "ask", ASK, Reason.NO_RULE, "ask:fallback", id="fallback-ask"),
        pytest.param(
            "unknown.test",
            "nope",
            DENY,
            Reason.UNKNOWN_PROFILE,
            "builtin:unknown-profile",
            id="unknown-profile",
        ),
    ],
)
def test_dns_question_decisions(policy, name, profile, verdict, reason, rule):
    decision = decide(policy, NameFacts(profile, parse_domain(name)))
    assert (decision.verdict, decision.reason, decision.rule_id) == (verdict, reason, rule), (
        decision.detail
    )


def test_decision_names_the_rule_origin(policy):
    decision = decide(policy, connect("gist.github.com"))
    line = POLICY.splitlines().index("      - deny: gist.github.com") + 1
    assert decision.rule.origin.endswith(f"policy.yaml:{line}")
    assert decision.to_dict()["rule_origin"] == decision.rule.origin


def test_fallback_detail_does_not_repeat_a_default_id(tmp_path):
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        profiles:
          default:
            rules:
              - allow: pypi.org
    """,
    )
    decision = decide(load_policy(path), connect("pypi.org", 8443))
    assert decision.reason is Reason.PORT_NOT_ALLOWED
    origin = decision.detail.split("rule ", 1)[1].split(" ", 1)[0]
    assert origin.endswith("p.yaml:5") and decision.detail.count("p.yaml:5") == 1, decision.detail


def test_unknown_profile_is_denied_and_explained(policy):
    decision = decide(policy, connect("pypi.org", profile="nope"))
    assert not decision.allowed and "nope" in decision.detail


def test_internal_error_fails_closed(policy):
    broken = ConnectFacts(profile="default", port=443, ip="not-an-address", name=None)  # type: ignore[arg-type]
    decision = decide(policy, broken)
    assert (decision.verdict, decision.reason, decision.rule_id) == (
        DENY,
        Reason.INTERNAL_ERROR,
        "builtin:internal-error",
    )


# --- expiry ----------------------------------------------------------------------------------

EXPIRY = """
    version: 1
    profiles:
      default:
        rules:
          - allow: "*.github.com"
            id: github-below
          - deny: gist.github.com
            id: no-gists
            expires: 2027-01-01
          - allow: temp.example
            id: temporary
            expires: 2026-06-30
"""


@pytest.mark.parametrize(
    ("today", "name", "verdict", "reason", "rule"),
    [
        pytest.param(
            datetime.date(2026, 6, 30),
            "temp.example",
            ALLOW,
            Reason.RULE_ALLOW,
            "temporary",
            id="allow-on-its-last-day",
        ),
        pytest.param(
            datetime.date(2026, 7, 1),
            "temp.example",
            DENY,
            Reason.NO_RULE,
            FALLBACK,
            id="allow-expired",
        ),
        pytest.param(
            datetime.date(2027, 1, 1),
            "gist.github.com",
            DENY,
            Reason.RULE_DENY,
            "no-gists",
            id="deny-on-its-last-day",
        ),
        pytest.param(
            datetime.date(2027, 1, 2),
            "gist.github.com",
            ALLOW,
            Reason.RULE_ALLOW,
            "github-below",
            id="deny-expired",
        ),
    ],
)
def test_expired_rules_do_not_match(tmp_path, today, name, verdict, reason, rule):
    policy = load_policy(write(tmp_path, "p.yaml", EXPIRY), today=today)
    decision = decide(policy, connect(name))
    assert (decision.verdict, decision.reason, decision.rule_id) == (verdict, reason, rule)


def test_expired_rules_are_reported(tmp_path):
    path = write(tmp_path, "p.yaml", EXPIRY)
    assert load_policy(path, today=datetime.date(2026, 1, 1)).expired == []
    assert [r.id for r in load_policy(path, today=datetime.date(2026, 7, 1)).expired] == [
        "temporary"
    ]
    later = load_policy(path, today=datetime.date(2027, 1, 2))
    assert sorted(r.id for r in later.expired) == ["no-gists", "temporary"]
    assert [r.id for r in later.profiles["default"].rules] == ["github-below"]
    assert load_policy(path, today=datetime.date(2026, 1, 1)).next_expiry == datetime.date(
        2026, 7, 1
    )
    assert later.next_expiry is None


# A rule that expires during a run: `now` in the facts, no reload.
T0 = datetime.datetime(2026, 6, 30, 12, 0, tzinfo=datetime.UTC).timestamp()
EXPIRING = """
    version: 1
    profiles:
      default:
        rules:
          - allow: "*.github.com"
            id: github-below
          - deny: gist.github.com
            id: no-gists-for-now
            expires: 2026-06-30T12:00:10Z
          - allow: temp.example
            id: temporary
            expires: 2026-06-30T14:00:05+02:00
          - allow: 203.0.113.0/24
            id: temp-net
            expires: "2026-06-30 12:00:05Z"
"""


@pytest.mark.parametrize(
    ("offset", "facts", "verdict", "reason", "rule"),
    [
        pytest.param(
            4.999, connect("temp.example"), ALLOW, Reason.RULE_ALLOW, "temporary", id="allow-before"
        ),
        pytest.param(
            5, connect("temp.example"), DENY, Reason.NO_RULE, FALLBACK, id="allow-at-its-instant"
        ),
        pytest.param(
            3600, connect("temp.example"), DENY, Reason.NO_RULE, FALLBACK, id="allow-after"
        ),
        pytest.param(
            5,
            request("temp.example", "GET", "/"),
            DENY,
            Reason.NO_RULE,
            FALLBACK,
            id="request-after",
        ),
        pytest.param(
            5, NameFacts("default", "temp.example"), DENY, Reason.NO_RULE, FALLBACK, id="dns-after"
        ),
        pytest.param(
            4,
            NameFacts("default", "temp.example"),
            ALLOW,
            Reason.RULE_ALLOW,
            "temporary",
            id="dns-before",
        ),
        pytest.param(
            4, connect("203.0.113.7"), ALLOW, Reason.RULE_ALLOW, "temp-net", id="cidr-before"
        ),
        pytest.param(6, connect("203.0.113.7"), DENY, Reason.NO_RULE, FALLBACK, id="cidr-after"),
        pytest.param(
            9,
            connect("gist.github.com"),
            DENY,
            Reason.RULE_DENY,
            "no-gists-for-now",
            id="deny-before",
        ),
        pytest.param(
            10,
            connect("gist.github.com"),
            ALLOW,
            Reason.RULE_ALLOW,
            "github-below",
            id="deny-after",
        ),
    ],
)
def test_a_rule_stops_matching_at_its_instant_without_a_reload(
    tmp_path, offset, facts, verdict, reason, rule
):
    policy = load_policy(write(tmp_path, "p.yaml", EXPIRING), now=T0)
    assert [r.id for r in policy.expired] == []
    decision = decide(policy, dataclasses.replace(facts, now=T0 + offset))
    assert (decision.verdict, decision.reason, decision.rule_id) == (verdict, reason, rule)


def test_an_expiring_cidr_rule_stops_keeping_special_dns_answers_at_its_instant(tmp_path):
    """The DNS filter keeps a private address in an answer only while an allow rule
    opens it (rebinding otherwise): an expired rule opens nothing, as in decide()."""
    text = """
    version: 1
    profiles:
      default:
        rules:
          - allow: 10.20.0.0/16
            id: temp-internal
            expires: 2026-06-30T12:00:05Z
    """
    profile = load_policy(write(tmp_path, "p.yaml", text), now=T0).profiles["default"]
    inside = ipaddress.ip_address("10.20.1.2")
    assert profile.opens_special_address(inside, T0 + 4.999)
    assert not profile.opens_special_address(inside, T0 + 5)
    assert not profile.opens_special_address(inside, T0 + 3600)


def test_without_a_clock_the_policy_answers_as_loaded(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", EXPIRING), now=T0)
    assert decide(policy, connect("temp.example")).rule_id == "temporary"
    assert decide(policy, connect("gist.github.com")).rule_id == "no-gists-for-now"


def test_the_policy_records_its_first_expiry(tmp_path):
    path = write(tmp_path, "p.yaml", EXPIRING)
    policy = load_policy(path, now=T0)
    assert policy.next_expiry_at == T0 + 5
    assert policy.profiles["default"].first_expiry == T0 + 5
    later = load_policy(path, now=T0 + 10)  # a load after them reports them as expired
    assert sorted(r.id for r in later.expired) == ["no-gists-for-now", "temp-net", "temporary"]
    assert later.next_expiry_at is None
    assert [str(r.expires) for r in later.expired if r.id == "temporary"] == [
        "2026-06-30 14:00:05+02:00"
    ]


def test_a_date_expires_at_the_end_of_that_local_day(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", EXPIRY), today=datetime.date(2026, 6, 30))
    end = datetime.datetime(2026, 7, 1).timestamp()  # local midnight after the last day
    assert policy.next_expiry_at == end
    temp = connect("temp.example")
    assert decide(policy, dataclasses.replace(temp, now=end - 1)).rule_id == "temporary"
    assert decide(policy, dataclasses.replace(temp, now=end)).reason is Reason.NO_RULE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("2026-06-30T12:00:00", "has no time zone; add one", id="naive-instant"),
        pytest.param("2026-06-30T25:00:00Z", "is not a date or an instant", id="bad-hour"),
        pytest.param("tomorrow", "is not a date or an instant", id="word"),
    ],
)
def test_expires_must_be_a_date_or_an_instant_with_its_zone(tmp_path, value, message):
    text = f"version: 1\nprofiles:\n  default:\n    rules:\n      - allow: a.example\n        expires: {value}\n"
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, "p.yaml", text))
    [problem] = caught.value.problems
    assert (problem.line, message in problem.message) == (6, True), problem


def test_expires_on_the_last_day_a_date_can_name_reads_as_any_other_day(tmp_path):
    # 9999-12-31 ("never"): the day after it overflowed datetime, a traceback in lint
    # and `FILE:1:1: OverflowError` on a reload.
    text = "version: 1\nprofiles:\n  default:\n    rules:\n      - allow: a.example\n        expires: 9999-12-31\n"
    policy = load_policy(write(tmp_path, "p.yaml", text))
    end = datetime.datetime(9999, 12, 31).timestamp() + 86400  # its local end
    assert policy.next_expiry_at == end and not policy.expired
    assert decide(policy, connect("a.example")).reason is Reason.RULE_ALLOW


BIG = "1" * 4400  # past int()'s 4300 digits (sys.get_int_max_str_digits): a ValueError


@pytest.mark.parametrize(
    ("rule", "profile", "line", "message"),
    [
        pytest.param(f"ports: [{BIG}]", "", 6, "is not a number from 1 to 65535", id="port"),
        pytest.param(f"ports: [0{BIG}]", "", 6, "is not a number from 1 to 65535", id="port-0"),
        pytest.param("", f"limits: {{connections: {BIG}}}", 4, "connections", id="limit"),
        pytest.param(
            "", f"approval: {{max_pending_per_sandbox: {BIG}}}", 4, "max_pending", id="pending"
        ),
    ],
)
def test_a_number_of_4400_digits_is_out_of_range(tmp_path, rule, profile, line, message):
    text = (
        f"version: 1\nprofiles:\n  default:\n    {profile or 'fallback: deny'}\n"
        f"    rules:\n      - {{allow: a.example, {rule or 'id: a'}}}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, "p.yaml", text))
    [problem] = caught.value.problems
    assert (problem.line, message in problem.message) == (line, True), problem


def test_an_address_of_4400_digits_is_an_invalid_name(tmp_path):
    text = f"version: 1\nprofiles:\n  default:\n    rules:\n      - allow: '{BIG}'\n"
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, "p.yaml", text))
    [problem] = caught.value.problems
    assert (problem.line, "longer than 63 characters" in problem.message) == (5, True), problem


def test_rules_without_ids_on_one_line_are_told_apart_by_their_column(tmp_path):
    # Valid YAML and no alias: refused as "used a second time (a YAML alias?)"
    text = "version: 1\nprofiles: {default: {rules: [{allow: a.example}, {allow: b.example}, {deny: c.example}]}}\n"
    policy = load_policy(write(tmp_path, "p.yaml", text))
    assert [r.id for r in policy.profiles["default"].rules] == [
        "p.yaml:2",
        "p.yaml:2:50",
        "p.yaml:2:70",
    ]
    assert decide(policy, connect("b.example")).rule_id == "p.yaml:2:50"


# --- profiles: extends and include -----------------------------------------------------------


def test_extends_and_include(tmp_path):
    write(
        tmp_path,
        "shared/internal.yaml",
        """
        version: 1
        description: an included file, relative to the including file
        rules:
          - allow: internal.example.com
            id: internal
    """,
    )
    path = write(
        tmp_path,
        "team.yaml",
        """
        version: 1
        profiles:
          base:
            fallback: ask
            include: [shared/internal.yaml]
            rules:
              - allow: pypi.org
                id: base-pypi
          child:
            extends: base
            include: [github-passthrough]
            rules:
              - deny: pypi.org
                id: child-no-pypi
          strict:
            extends: child
            fallback: deny
          grandchild:
            extends: child
            include: [shared/internal.yaml, github-passthrough]
    """,
    )
    policy = load_policy(path)
    ids = {name: [r.id for r in p.rules] for name, p in policy.profiles.items()}
    assert ids["base"] == ["internal", "base-pypi"]
    assert ids["child"] == [
        "internal",
        "base-pypi",
        "preset:github-git",
        "preset:github-content-passthrough",
        "child-no-pypi",
    ]
    assert ids["grandchild"] == ids["child"]  # an include seen twice counts once
    assert ids["strict"] == ids["child"]
    # the fallback is inherited through extends, and a child may override it
    assert policy.profiles["child"].fallback.action is ASK
    assert policy.profiles["strict"].fallback.action is DENY
    # a preset's rules name their own file
    github = next(r for r in policy.profiles["child"].rules if r.id == "preset:github-git")
    assert Path(github.file).name == "github-passthrough.yaml"

    def verdict(profile, name):
        d = decide(policy, connect(name, profile=profile))
        return d.verdict, d.rule_id

    assert verdict("base", "pypi.org") == (ALLOW, "base-pypi")
    assert verdict("child", "pypi.org") == (
        DENY,
        "child-no-pypi",
    )  # deny wins over the inherited allow
    assert verdict("base", "github.com") == (ASK, "base:fallback")
    assert verdict("child", "github.com") == (ALLOW, "preset:github-git")
    assert verdict("child", "internal.example.com") == (ALLOW, "internal")
    assert verdict("strict", "unknown.test") == (DENY, "strict:fallback")


def test_shipped_default_rules():
    policy = load_policy(DEFAULT_RULES)
    default = policy.profiles["default"]
    assert default.fallback.action is DENY
    assert decide(policy, connect("pypi.org")).verdict is ALLOW
    assert decide(policy, connect("files.pythonhosted.org")).verdict is ALLOW
    assert decide(policy, connect("registry.npmjs.org")).verdict is ALLOW
    assert decide(policy, connect("github.com")).verdict is DENY
    assert decide(policy, connect("169.254.169.254")).reason is Reason.PRIVATE_ADDRESS


def _outcome(decision) -> tuple:
    return decision.verdict, decision.reason, decision.rule_id, decision.inspect


@pytest.mark.parametrize(
    ("facts", "outcome"),
    [
        # package-registries: download-only, hence inspected
        pytest.param(
            connect("pypi.org"), (ALLOW, Reason.RULE_ALLOW, "preset:pypi", True), id="pypi-connect"
        ),
        pytest.param(
            request("files.pythonhosted.org", "GET", "/packages/x.whl"),
            (ALLOW, Reason.RULE_ALLOW, "preset:pypi", False),
            id="pypi-download",
        ),
        pytest.param(
            request("pypi.org", "POST", "/legacy/"),
            (DENY, Reason.METHOD_NOT_ALLOWED, FALLBACK, False),
            id="pypi-upload",
        ),
        pytest.param(
            request("storage.googleapis.com", "GET", "/proxy-golang-org-prod/1a-x:y-v1.0.0.zip"),
            (ALLOW, Reason.RULE_ALLOW, "preset:go-downloads", False),
            id="go-zip-download",
        ),
        pytest.param(
            request("storage.googleapis.com", "GET", "/attacker-bucket/data"),
            (DENY, Reason.PATH_NOT_ALLOWED, FALLBACK, False),
            id="another-cloud-storage-bucket",
        ),
        pytest.param(
            request("registry.npmjs.org", "PUT", "/sg-probe"),
            (DENY, Reason.METHOD_NOT_ALLOWED, FALLBACK, False),
            id="npm-publish",
        ),
        pytest.param(
            request("crates.io", "PUT", "/api/v1/crates/new"),
            (DENY, Reason.METHOD_NOT_ALLOWED, FALLBACK, False),
            id="cargo-publish",
        ),
        pytest.param(
            request("rubygems.org", "POST", "/api/v1/gems"),
            (DENY, Reason.METHOD_NOT_ALLOWED, FALLBACK, False),
            id="gem-push",
        ),
        pytest.param(
            request("deb.debian.org", "GET", "/debian/dists/stable/InRelease", port=80),
            (ALLOW, Reason.RULE_ALLOW, "preset:apt", False),
            id="apt-over-http",
        ),
        # github: fetch-only
        pytest.param(
            connect("github.com", profile="github"),
            (ALLOW, Reason.RULE_ALLOW, "preset:github-fetch", True),
            id="github-connect",
        ),
        pytest.param(
            request("github.com", "GET", "/octo/hello.git/info/refs", profile="github"),
            (ALLOW, Reason.RULE_ALLOW, "preset:github-fetch", False),
            id="git-fetch-refs",
        ),
        pytest.param(
            request("github.com", "POST", "/octo/hello.git/git-upload-pack", profile="github"),
            (ALLOW, Reason.RULE_ALLOW, "preset:github-upload-pack", False),
            id="git-fetch-pack",
        ),
        pytest.param(
            request("github.com", "POST", "/octo/hello/git-upload-pack", profile="github"),
            (ALLOW, Reason.RULE_ALLOW, "preset:github-upload-pack", False),
            id="git-fetch-pack-without-dot-git",
        ),
        pytest.param(
            request("github.com", "POST", "/octo/hello.git/git-receive-pack", profile="github"),
            (DENY, Reason.RULE_DENY, "preset:github-no-push", False),
            id="git-push",
        ),
        pytest.param(
            request("github.com", "post", "/octo/hello.git/%67it-receive-pack", profile="github"),
            (DENY, Reason.RULE_DENY, "preset:github-no-push", False),
            id="git-push-spelled-otherwise",
        ),
        pytest.param(
            request(
                "github.com", "POST", "/octo/hello.git/info/lfs/objects/batch", profile="github"
            ),
            (DENY, Reason.METHOD_NOT_ALLOWED, FALLBACK, False),
            id="other-post",
        ),
        pytest.param(
            connect("github.com", 22, profile="github"),
            (DENY, Reason.PORT_NOT_ALLOWED, FALLBACK, False),
            id="no-ssh",
        ),
    ],
)
def test_shipped_presets_download_and_fetch_only(facts, outcome):
    assert _outcome(decide(_SHIPPED, facts)) == outcome


def test_shipped_pass_through_presets_allow_any_method_uninspected(tmp_path):
    policy = _load_text(
        "version: 1\nprofiles:\n  default:\n"
        "    include: [package-registries-passthrough, github-passthrough]\n"
    )
    assert _outcome(decide(policy, connect("pypi.org"))) == (
        ALLOW,
        Reason.RULE_ALLOW,
        "preset:pypi-passthrough",
        False,
    )
    assert _outcome(decide(policy, request("pypi.org", "POST", "/legacy/"))) == (
        ALLOW,
        Reason.RULE_ALLOW,
        "preset:pypi-passthrough",
        False,
    )
    assert _outcome(decide(policy, connect("github.com", 22))) == (
        ALLOW,
        Reason.RULE_ALLOW,
        "preset:github-git",
        False,
    )
    assert [d for _, d in policy.presets_of("default")][0].startswith("pass-through, any method")


def test_the_policy_knows_which_preset_form_each_profile_has():
    presets = _SHIPPED.presets_of("github")
    assert [f for f, _ in presets] == ["presets/package-registries.yaml", "presets/github.yaml"]
    assert presets[0][1].startswith("download-only (GET, HEAD)")
    assert presets[1][1].startswith("fetch-only")


_SHIPPED = load_policy(DEFAULT_RULES)


def test_shipped_example_rules_load():
    policy = load_policy(ROOT / "rules" / "examples" / "team.yaml", today=datetime.date(2026, 1, 1))
    assert set(policy.profiles) == {"default", "ci"}
    assert decide(policy, connect("gist.github.com", profile="ci")).rule_id == "no-gists"


# --- properties -------------------------------------------------------------------------------

_label = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
_domain = (
    st.lists(_label, min_size=2, max_size=4)
    .map(".".join)
    # Not a public suffix: the loader refuses `*.<suffix>` (the List's wildcards too:
    # `a.jm` under `*.jm`).
    .filter(lambda d: d not in _PUBLIC_SUFFIXES and not is_public_suffix(d, private=True))
)


def _load_text(text: str, today: datetime.date | None = None):
    with tempfile.TemporaryDirectory() as tmp:
        return load_policy(write(Path(tmp), "p.yaml", text), today=today)


@settings(max_examples=60, deadline=None)
@given(
    name=_domain,
    deny_first=st.booleans(),
    allow_wildcard=st.booleans(),
    deny_ports=st.sampled_from([None, [443], [80, 443], [443, 22]]),
    subdomain=_label,
)
def test_deny_wins_in_any_order(name, deny_first, allow_wildcard, deny_ports, subdomain):
    target = f"{subdomain}.{name}" if allow_wildcard else name
    allow = f'      - allow: "{"*." + name if allow_wildcard else name}"\n        id: the-allow\n'
    deny = f"      - deny: {target}\n        id: the-deny\n"
    if deny_ports:
        deny += f"        ports: {deny_ports}\n"
    rules = deny + allow if deny_first else allow + deny
    policy = _load_text(f"version: 1\nprofiles:\n  default:\n    rules:\n{rules}")
    for facts in (connect(target, 443), request(target, "GET", "/"), NameFacts("default", target)):
        if isinstance(facts, NameFacts) and deny_ports and set(deny_ports) != {80, 443}:
            continue  # the name stays resolvable for the ports the deny leaves open
        decision = decide(policy, facts)
        assert (decision.verdict, decision.reason, decision.rule_id) == (
            DENY,
            Reason.RULE_DENY,
            "the-deny",
        )


@settings(max_examples=60, deadline=None)
@given(base=_domain, below=st.lists(_label, min_size=1, max_size=3).map(".".join))
def test_wildcard_never_matches_its_apex(base, below):
    policy = _load_text(
        f'version: 1\nprofiles:\n  default:\n    rules:\n      - allow: "*.{base}"\n        id: w\n'
    )
    assert decide(policy, connect(base)).reason is Reason.NO_RULE
    assert decide(policy, NameFacts("default", base)).reason is Reason.NO_RULE
    assert decide(policy, connect(f"{below}.{base}")).rule_id == "w"
    assert decide(policy, connect(f"{below}{base}")).reason is Reason.NO_RULE


@settings(max_examples=100, deadline=None)
@given(st.ip_addresses())
def test_special_addresses_never_open_to_names_or_world_cidrs(address):
    ip = parse_ip(str(address))
    policy = _WORLD_POLICY
    decision = decide(policy, ConnectFacts("default", 443, ip=ip, name="allowed.example"))
    if special_range(ip) is not None:
        assert decision.reason is Reason.PRIVATE_ADDRESS
    else:
        assert decision.verdict is ALLOW


_WORLD_POLICY = _load_text("""
version: 1
profiles:
  default:
    rules:
      - allow: [0.0.0.0/0, "::/0", allowed.example]
""")


@pytest.mark.parametrize(("target", "who"), CLOUD_INTERNAL_ADDRESSES)
def test_cloud_internal_addresses_are_closed_unless_a_cidr_rule_names_them(tmp_path, target, who):
    address = target.split("/")[0]
    ip = parse_ip(address)
    named = ConnectFacts("default", 80, ip=ip, name="allowed.example", name_resolved_to_ip=True)
    decision = decide(_WORLD_POLICY, named)
    assert (decision.reason, decision.rule_id) == (Reason.PRIVATE_ADDRESS, PRIVATE), who
    opened = _load_text(
        f"version: 1\nprofiles:\n  default:\n    rules:\n      - allow: {target}\n        id: mine\n"
    )
    assert decide(opened, ConnectFacts("default", 80, ip=ip)).rule_id == "mine"


def test_every_cloud_internal_address_is_documented():
    section = DOCS.read_text(encoding="utf-8").split("**Cloud-internal addresses**", 1)[1]
    listed = re.findall(r"^\|\s*`([0-9a-f.:/]+)`", section.split("\n\n", 2)[1], re.MULTILINE)
    assert listed == [target for target, _ in CLOUD_INTERNAL_ADDRESSES]


# --- docs --------------------------------------------------------------------------------------


def _documented_reasons() -> list[str]:
    """The first column of the table under '## Reasons' in docs/rules.md."""
    section = DOCS.read_text(encoding="utf-8").split("\n## Reasons\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*`([a-z_]+)`\s*\|", section, re.MULTILINE)


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_every_reason_is_documented(reason):
    assert str(reason) in _documented_reasons(), (
        f"docs/rules.md has no table row for reason {reason}"
    )


def test_the_docs_list_no_reason_that_does_not_exist():
    documented = _documented_reasons()
    assert sorted(documented) == sorted(set(documented)), "a reason is listed twice"
    assert set(documented) <= {str(r) for r in Reason}


def _documented_builtins() -> dict[str, tuple[list[str], str]]:
    """rule id -> (reasons, meaning), from the table under '## Built-in rules' in docs/rules.md."""
    section = (
        DOCS.read_text(encoding="utf-8").split("\n## Built-in rules\n", 1)[1].split("\n## ", 1)[0]
    )
    rows = re.findall(
        r"^\|\s*`(builtin:[a-z-]+)`\s*\|([^|]*)\|([^|]*)\|\s*$", section, re.MULTILINE
    )
    assert len(rows) == len({rule for rule, _, _ in rows}), "a built-in rule is listed twice"
    return {
        rule: (re.findall(r"`([a-z_]+)`", reasons), meaning.strip())
        for rule, reasons, meaning in rows
    }


@pytest.mark.parametrize("name", list(BUILTINS))
def test_every_builtin_rule_is_documented_with_its_reasons_and_meaning(name):
    entry = BUILTINS[name]
    documented = _documented_builtins()
    assert entry.rule.id in documented, f"docs/rules.md has no row for {entry.rule.id}"
    assert documented[entry.rule.id] == ([str(r) for r in entry.reasons], entry.meaning)


def test_the_docs_list_no_builtin_rule_that_does_not_exist():
    assert set(_documented_builtins()) == {entry.rule.id for entry in BUILTINS.values()}


def test_an_unknown_builtin_rule_is_an_error():
    with pytest.raises(ValueError, match="no built-in rule 'privat-address'"):
        builtin_rule("privat-address")
    with pytest.raises(ValueError, match="does not give reason rule_allow"):
        deny_by("malformed-tls", "x", reason=Reason.RULE_ALLOW)
    decision = deny_by("malformed-tls", "SNI: bad", reason=Reason.INVALID_NAME)
    assert (decision.verdict, decision.reason, decision.rule_id) == (
        Verdict.DENY,
        Reason.INVALID_NAME,
        "builtin:malformed-tls",
    )


def test_ipv4_spellings_decide_alike(policy):
    spellings = [
        "203.0.113.5",
        "3405803781",
        "0xcb007105",
        "0313.0.0161.05",
        "203.0.28933",
        "::ffff:203.0.113.5",
    ]
    decisions = {(d.verdict, d.rule_id) for d in (decide(policy, connect(s)) for s in spellings)}
    assert decisions == {(ALLOW, "doc-net")}
    assert all(parse_ip(s) == ipaddress.IPv4Address("203.0.113.5") for s in spellings)


# --- the compiled index against a naive matcher -------------------------------------------

_bases = st.lists(_label, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "test"]))


@settings(max_examples=40, deadline=None)
@given(
    exact=st.lists(_bases, max_size=6),
    wildcards=st.lists(_bases.filter(lambda b: b.count(".") >= 1), max_size=6),
    networks=st.lists(
        st.one_of(
            st.ip_addresses(v=4).flatmap(
                lambda a: st.integers(8, 32).map(
                    lambda p: ipaddress.ip_network((int(a) >> (32 - p) << (32 - p), p))
                )
            ),
            st.ip_addresses(v=6).flatmap(
                lambda a: st.integers(16, 128).map(
                    lambda p: ipaddress.ip_network((int(a) >> (128 - p) << (128 - p), p))
                )
            ),
        ),
        max_size=8,
    ),
    probes=st.lists(st.one_of(_bases, st.ip_addresses()), max_size=12),
)
def test_index_finds_what_a_naive_scan_finds(exact, wildcards, networks, probes):
    targets = [*exact, *(f"*.{w}" for w in wildcards), *map(str, networks)]
    rules = (
        "".join(f'\n      - allow: "{t}"\n        id: r{i}' for i, t in enumerate(targets)) or " []"
    )
    policy = _load_text(f"version: 1\nprofiles:\n  default:\n    rules:{rules}\n")
    profile = policy.profiles["default"]
    # probe the rules' own names and addresses, their neighbours and random ones
    for net in networks:
        probes += [net.network_address, net.broadcast_address]
        if int(net.network_address) > 0:
            probes.append(net.network_address - 1)
        if int(net.broadcast_address) < (1 << net.max_prefixlen) - 1:
            probes.append(net.broadcast_address + 1)
    probes += [f"x.{w}" for w in wildcards] + wildcards + exact
    for probe in probes:
        if isinstance(probe, str):
            found = {r.id for r in profile.rules_for_name(probe)}
            naive = {
                f"r{i}"
                for i, t in enumerate(targets)
                if t == probe or (t.startswith("*.") and probe.endswith("." + t[2:]))
            }
        else:
            ip = parse_ip(str(probe))
            found = {r.id for r in profile.rules_for_ip(ip)}
            naive = {
                f"r{i}"
                for i, t in enumerate(targets)
                if "/" in t and parse_network(t).version == ip.version and ip in parse_network(t)
            }
        assert found == naive, probe


def test_policy_hash_names_the_bytes_loaded(tmp_path):
    path = write(tmp_path, "p.yaml", "version: 1\nprofiles:\n  default: {}\n")
    first = load_policy(path).hash
    assert load_policy(path).hash == first
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))  # the same YAML, other bytes
    assert load_policy(path).hash != first


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        # Not /repos itself: a router written for /repos/ serves it from elsewhere.
        pytest.param("/repos/**", "/repos", False, id="double-star-not-the-dir-itself"),
        pytest.param("/**", "/", True, id="double-star-everything"),
        pytest.param("/repos/**", "/repos/", True, id="double-star-trailing-slash"),
        pytest.param("/repos/**", "/repos/a/b/c", True, id="double-star-deep"),
        pytest.param("/repos/**", "/reposx", False, id="double-star-not-glued"),
        pytest.param("/a/**/b", "/a/b", True, id="double-star-middle-zero-segments"),
        pytest.param("/a/**/b", "/a/x/y/b", True, id="double-star-middle-many"),
        pytest.param("/a/**/b", "/a/xb", False, id="double-star-middle-needs-slash"),
        pytest.param("/a/**/b", "/a/x/b/c", False, id="double-star-middle-anchored-end"),
        pytest.param("/users/*", "/users/octocat", True, id="star-one-segment"),
        pytest.param("/users/*", "/users/octo/keys", False, id="star-not-across-slash"),
        pytest.param("/users/*/keys", "/users/octo/keys", True, id="star-middle"),
        pytest.param("/v1/*.json", "/v1/a.json", True, id="star-in-segment"),
        pytest.param("/v1/*.json", "/v1/a/b.json", False, id="star-in-segment-not-across"),
        pytest.param("/a+b(c)", "/a+b(c)", True, id="regex-characters-are-literal"),
        pytest.param("/a+b(c)", "/aab(c)", False, id="plus-is-not-a-quantifier"),
        pytest.param("/exact", "/exact/", False, id="exact-is-exact"),
    ],
)
def test_path_globs(tmp_path, glob, path, matches):
    rules = write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        profiles:
          default:
            rules:
              - allow: example.com
                id: globbed
                paths: ["{glob}"]
    """,
    )
    decision = decide(load_policy(rules), request("example.com", "GET", path))
    assert (decision.rule_id == "globbed") is matches, decision.detail
