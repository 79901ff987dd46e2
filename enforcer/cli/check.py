"""`sandgate check TARGET`: would this destination be allowed, and why."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from sandgate.enforcer.cli.common import EXIT_DENIED, EXIT_OK, UsageError, load_rules
from sandgate.proxy.policy import (
    DEFAULT_RULES,
    ConnectFacts,
    InvalidName,
    RequestFacts,
    decide,
    parse_domain,
    parse_ip,
)
from sandgate.proxy.policy.model import HTTP_METHODS
from sandgate.proxy.policy.names import parse_host_port
from sandgate.proxy.policy.request_head import ambiguous_target
from sandgate.proxy.refusal import printable


def register(sub) -> None:
    check = sub.add_parser("check", help="would this destination be allowed, and why")
    check.add_argument("target", help="URL, host:port, host (port 443), or IP literal")
    check.add_argument(
        "--rules",
        default=str(DEFAULT_RULES),
        metavar="FILE",
        help="rule file (default: the shipped default rules)",
    )
    check.add_argument(
        "--profile", default="default", help="profile to decide by (default: default)"
    )
    check.add_argument(
        "--method", help="HTTP method (asks about a request, not just the connection)"
    )
    check.add_argument(
        "-j",
        "--json",
        action="store_true",
        help="the decision as one JSON object (verdict, reason, rule, policy hash, ...)",
    )
    check.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    policy = load_rules(args.rules, "nothing checked")
    if args.profile not in policy.profiles:
        # A typo at the terminal is bad input, not a denied destination.
        raise UsageError(
            f"no profile {args.profile!r} in {args.rules} (profiles: {', '.join(policy.profiles)})"
        )
    facts = parse_target(args.target, args.method, args.profile)
    # As the gateway refuses a request whose path servers may read otherwise, first.
    decision = _ambiguous_url(args.target) or decide(policy, facts)
    if args.json:
        print(json.dumps({**decision.to_dict(), "policy": policy.hash}))
    else:
        rule = decision.rule
        shown = args.target if args.target.isprintable() else printable(args.target)
        print(f"{decision.verdict.upper()}  {shown}")
        print(f"  reason:  {decision.reason}")
        builtin = rule.file == "<builtin>"  # a protection of the gateway, not a line in a file
        print(
            f"  rule:    {rule.id}"
            + ("" if rule.id == rule.origin or builtin else f"  ({rule.origin})")
        )
        if decision.inspect:
            print("  inspect: yes (a rule checks HTTP methods or paths; TLS to it is intercepted)")
        if decision.detail:
            print(f"  detail:  {decision.detail}")
    return EXIT_OK if decision.allowed else EXIT_DENIED


def parse_target(text: str, method: str | None, profile: str = "default"):
    """`sandgate check` TARGET -> facts. URL, host:port, bare host (443), or an IP
    literal in any spelling. A URL with a path, or --method, asks about a request."""
    path = None
    if "://" in text:
        try:
            url = urlsplit(text)
        except ValueError as e:  # e.g. an unclosed '[' around an IPv6 address
            raise UsageError(f"not a URL: {text!r} ({e})") from None
        if url.scheme not in ("http", "https"):
            raise UsageError(f"unsupported URL scheme {url.scheme!r} (use http or https)")
        host, port = url.hostname or "", _url_port(url)
        path = url.path or "/"
    else:
        try:
            host, port = parse_host_port(text, default_port=443)
        except ValueError as e:
            raise UsageError(f"bad port or host: {e}") from None
    ip = parse_ip(host)
    name = None
    if ip is None:
        try:
            name = parse_domain(host)
        except InvalidName as e:
            raise UsageError(f"not a host name or IP address: {e}") from None
    if method is not None and method.upper() not in HTTP_METHODS:
        raise UsageError(f"unknown HTTP method {method!r}")
    if method or path not in (None, "/"):
        return RequestFacts(
            profile=profile,
            port=port,
            method=(method or "GET").upper(),
            path=path or "/",
            ip=ip,
            name=name,
            now=time.time(),
        )
    return ConnectFacts(profile=profile, port=port, ip=ip, name=name, now=time.time())


def _ambiguous_url(text: str):
    """The gateway's ambiguous_path denial of a URL's path and query, if it has one."""
    if "://" not in text:
        return None
    sent = text.partition("#")[0]  # the fragment stays out: clients do not send it
    url = urlsplit(sent)
    return ambiguous_target(url.path or "/", url.query if "?" in sent else None)


def _url_port(url) -> int:
    try:
        return url.port or (443 if url.scheme == "https" else 80)
    except ValueError as e:
        raise UsageError(f"bad port in URL: {e}") from None
