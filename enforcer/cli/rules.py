"""`sandgate rules lint|show`: validate rule files, and show the effective profiles."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from sandgate.enforcer.cli.common import EXIT_OK, EXIT_USAGE, UsageError, load_rules
from sandgate.proxy.policy import DEFAULT_RULES, PolicyError, load_policy
from sandgate.proxy.policy.model import DEFAULT_PORTS
from sandgate.proxy.policy.reasons import Verdict


def register(sub) -> None:
    rules = sub.add_parser("rules", help="lint and show rule files").add_subparsers(
        dest="rules_command", required=True, metavar="{lint,show}"
    )
    lint = rules.add_parser("lint", help="validate rule files; exit 2 with FILE:LINE:COL errors")
    lint.add_argument(
        "files", nargs="+", metavar="FILE", help="rule files, each checked on its own"
    )
    lint.add_argument(
        "-j",
        "--json",
        action="store_true",
        help="one JSON report: valid, errors (file, line, column, message), expired rules",
    )
    lint.set_defaults(func=cmd_rules_lint)

    show = rules.add_parser("show", help="the effective profiles after includes and extends")
    show.add_argument(
        "file",
        nargs="?",
        default=str(DEFAULT_RULES),
        metavar="FILE",
        help="rule file (default: the shipped default rules)",
    )
    show.add_argument("--profile", help="show only this profile (default: all)")
    show.add_argument("-j", "--json", action="store_true", help="one JSON object per profile")
    show.set_defaults(func=cmd_rules_show)


# An allow (or ask) of a network this wide is the public internet, by address: its
# addresses pass whatever name a connection presents (an IP rule vouches for the
# address, so no SNI or Host is checked against the gateway's DNS answers). Valid, but
# rarely meant (`0.0.0.0/0` for "any port 22", a `/0` typed for a `/32`): lint says so.
WIDE_PREFIX = {4: 8, 6: 16}


def wide_networks(policy) -> list[str]:
    """One warning per allow or ask rule naming a network of WIDE_PREFIX or wider."""
    warnings: dict[str, str] = {}
    for profile in policy.profiles.values():
        for rule in profile.rules:
            if rule.action is Verdict.DENY or rule.id in warnings:
                continue
            wide = [
                n
                for n in rule.networks
                if n.prefixlen <= WIDE_PREFIX[n.version] and not n.is_private  # 10/8: meant
            ]
            if wide:
                ports = ",".join(map(str, sorted(rule.ports)))
                warnings[rule.id] = (
                    f"{rule.origin}: warning: rule {rule.id} {rule.action}s "
                    f"{', '.join(map(str, wide))} on ports {ports}: that much of the internet, "
                    "by address, whatever name a connection presents"
                )
    return list(warnings.values())


def narrow_denies(policy) -> list[str]:
    """One warning per deny rule that a rule opening the same host (an allow or ask of
    its profile) outruns in ports: a deny's `ports` default to 80 and 443 as an
    allow's do, so `deny: example.com, paths: [/admin/**]` beside an allow of
    example.com on 8443 does not hold on 8443 (a red team's first deny missed so).
    A deny of whole connections on ports it names (`deny: 0.0.0.0/0, ports: [25]`)
    means those ports: no warning."""
    warnings: dict[str, str] = {}
    for profile in policy.profiles.values():
        opening = [r for r in profile.rules if r.action is not Verdict.DENY]
        for deny in profile.rules:
            if deny.action is not Verdict.DENY or deny.id in warnings:
                continue
            if not deny.inspects and deny.ports != DEFAULT_PORTS:
                continue
            for rule in opening:
                ports = sorted(rule.ports - deny.ports)
                if ports and _same_host(deny, rule):
                    warnings[deny.id] = (
                        f"{deny.origin}: warning: rule {deny.id} denies on ports "
                        f"{','.join(map(str, sorted(deny.ports)))} only; rule {rule.id} "
                        f"({rule.origin}) {rule.action}s the same host on "
                        f"{','.join(map(str, ports))} too, where the deny does not hold"
                    )
                    break
    return list(warnings.values())


def _same_host(deny, rule) -> bool:
    """Whether `deny` names a host `rule` names: the same name or network, or a name
    under a deny's wildcard."""
    if set(deny.networks) & set(rule.networks):
        return True
    return any(
        d == r or (d.wildcard and r.domain.endswith("." + d.domain))
        for d in deny.domains
        for r in rule.domains
    )


def cmd_rules_lint(args) -> int:
    problems, expired, wide = [], [], []
    for path in args.files:
        try:
            policy = load_policy([Path(path)])
            expired += policy.expired
            wide += wide_networks(policy) + narrow_denies(policy)
        except PolicyError as e:
            problems += e.problems
    if args.json:
        print(
            json.dumps(
                {
                    "valid": not problems,
                    "errors": [
                        {"file": p.file, "line": p.line, "column": p.column, "message": p.message}
                        for p in problems
                    ],
                    "expired": [
                        {"rule": r.id, "origin": r.origin, "expires": str(r.expires)}
                        for r in expired
                    ],
                }
                # Only when there are some: the report's shape stays what readers know.
                | ({"warnings": wide} if wide else {}),
                indent=2,
            )
        )
    else:
        for problem in problems:
            print(problem, file=sys.stderr)
        for rule in expired:
            print(
                f"{rule.origin}: warning: rule {rule.id} expired on {rule.expires} and no longer matches",
                file=sys.stderr,
            )
        for warning in wide:
            print(warning, file=sys.stderr)
        if not problems:
            print(f"ok: {', '.join(args.files)}")
    return EXIT_USAGE if problems else EXIT_OK


def cmd_rules_show(args) -> int:
    policy = load_rules(args.file, "nothing shown")
    names = [args.profile] if args.profile else list(policy.profiles)
    for name in names:
        profile = policy.profiles.get(name)
        if profile is None:
            raise UsageError(
                f"no profile {name!r} in {args.file} (profiles: {', '.join(policy.profiles)})"
            )
        limits = dataclasses.asdict(profile.limits)
        presets = policy.presets_of(name)
        inspected = sum(r.inspects for r in profile.rules)
        if args.json:
            print(
                json.dumps(
                    {
                        "profile": name,
                        "fallback": str(profile.fallback.action),
                        "limits": limits,
                        "presets": [
                            {"name": _preset_name(f), "file": f, "description": d}
                            for f, d in presets
                        ],
                        "inspects": inspected > 0,
                        "rules": [_rule_dict(r) for r in profile.rules],
                        "expired": [_rule_dict(r) for r in profile.expired],
                    },
                    indent=2,
                )
            )
            continue
        print(f"profile {name}  (fallback: {profile.fallback.action}, {profile.fallback.origin})")
        print("  limits per sandbox: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
        for file, description in presets:
            print(f"  preset {_preset_name(file)}: {description or '(no description)'}")
        print(
            f"  inspection: {inspected} rule(s) check HTTP methods or paths: TLS to their hosts "
            "is intercepted with the gateway's CA, which `sandgate run` installs in the sandbox"
            if inspected
            else "  inspection: none (allowed TLS passes through untouched; no CA needed)"
        )
        for rule in profile.rules:
            print(f"  {_rule_line(rule, until=True)}")
        for rule in profile.expired:
            print(f"  EXPIRED {rule.expires}: {_rule_line(rule)}")
    return EXIT_OK


def _preset_name(file: str) -> str:
    """`presets/github.yaml` -> `github`: the name an `include:` gives."""
    return Path(file).stem if file.startswith("presets/") else file


def _rule_dict(rule) -> dict:
    return {
        "id": rule.id,
        "action": str(rule.action),
        "targets": rule.targets(),
        "ports": sorted(rule.ports),
        "methods": sorted(rule.methods) if rule.methods else None,
        "paths": list(rule.paths) if rule.paths else None,
        "origin": rule.origin,
        "expires": str(rule.expires) if rule.expires else None,
        "owner": rule.owner,
        "ticket": rule.ticket,
        "comment": rule.comment,
    }


def _rule_line(rule, until: bool = False) -> str:
    """One rule; `until`: with its expiry, if it has one (an expired rule's line
    starts with it instead)."""
    extra = f" ports {','.join(map(str, sorted(rule.ports)))}"
    if rule.methods:
        extra += f" methods {','.join(sorted(rule.methods))}"
    if rule.paths:
        extra += f" paths {','.join(rule.paths)}"
    if until and rule.expires:
        extra += f" expires {rule.expires}"
    label = "" if rule.id == rule.origin else f" [{rule.id}]"
    return f"{rule.action:5} {', '.join(rule.targets())}{extra}{label}  ({rule.origin})"
