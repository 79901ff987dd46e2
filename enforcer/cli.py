"""The `sandgate` command. Subcommands parse their arguments here and call into
the modules that do the work; exit codes: 0 ok/allowed, 1 denied, 2 bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

from sandgate.proxy.policy import (
    DEFAULT_RULES,
    ConnectFacts,
    InvalidName,
    PolicyError,
    RequestFacts,
    decide,
    load_policy,
    parse_domain,
    parse_ip,
)
from sandgate.proxy.policy.model import HTTP_METHODS

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the person at the terminal: printed, exit 2."""


# --- rules lint / show ----------------------------------------------------------------


def cmd_rules_lint(args) -> int:
    problems, expired = [], []
    for path in args.files:
        try:
            policy = load_policy([Path(path)])
            expired += policy.expired
        except PolicyError as e:
            problems += e.problems
    if args.json:
        print(json.dumps({
            "valid": not problems,
            "errors": [{"file": p.file, "line": p.line, "column": p.column, "message": p.message} for p in problems],
            "expired": [{"rule": r.id, "origin": r.origin, "expires": str(r.expires)} for r in expired],
        }, indent=2))
    else:
        for problem in problems:
            print(problem, file=sys.stderr)
        for rule in expired:
            print(f"{rule.origin}: warning: rule {rule.id} expired on {rule.expires} and no longer matches", file=sys.stderr)
        if not problems:
            print(f"ok: {', '.join(args.files)}")
    return EXIT_USAGE if problems else EXIT_OK


def cmd_rules_show(args) -> int:
    policy = _load(args.file)
    names = [args.profile] if args.profile else list(policy.profiles)
    for name in names:
        profile = policy.profiles.get(name)
        if profile is None:
            raise UsageError(f"no profile {name!r} in {args.file} (profiles: {', '.join(policy.profiles)})")
        if args.json:
            print(json.dumps({"profile": name, "fallback": str(profile.fallback.action),
                              "rules": [_rule_dict(r) for r in profile.rules],
                              "expired": [_rule_dict(r) for r in profile.expired]}, indent=2))
            continue
        print(f"profile {name}  (fallback: {profile.fallback.action}, {profile.fallback.origin})")
        for rule in profile.rules:
            print(f"  {_rule_line(rule)}")
        for rule in profile.expired:
            print(f"  EXPIRED {rule.expires}: {_rule_line(rule)}")
    return EXIT_OK


def _rule_dict(rule) -> dict:
    return {
        "id": rule.id, "action": str(rule.action), "targets": rule.targets(), "ports": sorted(rule.ports),
        "methods": sorted(rule.methods) if rule.methods else None, "paths": list(rule.paths) if rule.paths else None,
        "origin": rule.origin, "expires": str(rule.expires) if rule.expires else None,
        "owner": rule.owner, "ticket": rule.ticket, "comment": rule.comment,
    }


def _rule_line(rule) -> str:
    extra = f" ports {','.join(map(str, sorted(rule.ports)))}"
    if rule.methods:
        extra += f" methods {','.join(sorted(rule.methods))}"
    if rule.paths:
        extra += f" paths {','.join(rule.paths)}"
    label = "" if rule.id == rule.origin else f" [{rule.id}]"
    return f"{rule.action:5} {', '.join(rule.targets())}{extra}{label}  ({rule.origin})"


# --- check ------------------------------------------------------------------------------


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
        host, port = _split_host_port(text)
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
        return RequestFacts(profile=profile, port=port, method=(method or "GET").upper(), path=path or "/", ip=ip, name=name)
    return ConnectFacts(profile=profile, port=port, ip=ip, name=name)


def _url_port(url) -> int:
    try:
        return url.port or (443 if url.scheme == "https" else 80)
    except ValueError as e:
        raise UsageError(f"bad port in URL: {e}") from None


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # bare host, or a bare IPv6 address
        host, port_text = text, ""
    if not port_text:
        return host, 443
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"bad port {port_text!r} (1 to 65535)")
    return host, int(port_text)


def cmd_check(args) -> int:
    policy = _load(args.rules)
    if args.profile not in policy.profiles:
        # A typo at the terminal is bad input, not a denied destination.
        raise UsageError(f"no profile {args.profile!r} in {args.rules} (profiles: {', '.join(policy.profiles)})")
    facts = parse_target(args.target, args.method, args.profile)
    decision = decide(policy, facts)
    if args.json:
        print(json.dumps({**decision.to_dict(), "policy": policy.hash}))
    else:
        rule = decision.rule
        print(f"{decision.verdict.upper()}  {args.target}")
        print(f"  reason:  {decision.reason}")
        builtin = rule.file == "<builtin>"  # a protection of the gateway, not a line in a file
        print(f"  rule:    {rule.id}" + ("" if rule.id == rule.origin or builtin else f"  ({rule.origin})"))
        if decision.inspect:
            print("  inspect: yes (a rule checks HTTP methods or paths; TLS to it is intercepted)")
        if decision.detail:
            print(f"  detail:  {decision.detail}")
    return EXIT_OK if decision.allowed else EXIT_DENIED


def _load(path):
    try:
        return load_policy([Path(path)])
    except PolicyError as e:
        raise UsageError(f"invalid rules, nothing checked:\n{e}") from None


# --- main --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandgate", description="Egress gateway for sandboxed coding agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    rules = sub.add_parser("rules", help="lint and show rule files").add_subparsers(dest="rules_command", required=True)
    lint = rules.add_parser("lint", help="validate rule files; exit 2 with FILE:LINE:COL errors")
    lint.add_argument("files", nargs="+")
    lint.add_argument("--json", action="store_true")
    lint.set_defaults(func=cmd_rules_lint)
    show = rules.add_parser("show", help="the effective profiles after includes and extends")
    show.add_argument("file")
    show.add_argument("--profile")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_rules_show)

    check = sub.add_parser("check", help="would this destination be allowed, and why")
    check.add_argument("target", help="URL, host:port, host (port 443), or IP literal")
    check.add_argument("--rules", default=str(DEFAULT_RULES))
    check.add_argument("--profile", default="default")
    check.add_argument("--method", help="HTTP method (asks about a request, not just the connection)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_check)

    from sandgate.enforcer import commands  # run, gc, demo, audit: they import the gateway lazily

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
