"""`sandgate selftest`: a probe task in a real sandbox tries what a hostile task would
(direct egress, UDP/QUIC, IPv6, the metadata address, another resolver, writing the
host, reading sandgate's state, host capabilities) and reports what it saw."""

from __future__ import annotations

from sandgate.enforcer.cli.common import load_rules, setup_errors
from sandgate.proxy.policy import DEFAULT_RULES


def register(sub) -> None:
    parser = sub.add_parser(
        "selftest", help="probe the sandbox from inside: what a hostile task would try"
    )
    parser.add_argument(
        "--rules", default=str(DEFAULT_RULES), help="rule file (default: the shipped default)"
    )
    parser.add_argument(
        "--profile", default="default", help="profile of the rules to probe (default: default)"
    )
    parser.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="IP",
        help="resolver the DNS filter forwards to (default: the host's resolv.conf)",
    )
    parser.add_argument("-j", "--json", action="store_true", help="print the probes as JSON")
    parser.set_defaults(func=cmd_selftest)


def cmd_selftest(args) -> int:
    import json

    from sandgate.enforcer.run import RunOptions, selftest
    from sandgate.enforcer.sandbox.spec import SandboxOptions

    policy = load_rules(args.rules, "nothing was probed")
    with setup_errors():
        code, probes = selftest(
            RunOptions(
                command=[],
                policy=policy,
                profile=args.profile,
                dns_upstreams=args.dns_upstream,
                metrics_listen=None,
                sandbox=SandboxOptions(workspace=None),
            )
        )
    leaks = [p for p in probes if not p["ok"]]
    if args.json:
        print(json.dumps({"ok": bool(probes) and not leaks, "probes": probes}, indent=2))
    else:
        width = max((len(p["probe"]) for p in probes), default=5)
        print(f"{'probe':{width}}  {'expected':16}  seen")
        for p in probes:
            mark = "" if p["ok"] else "   <-- LEAK"
            print(f"{p['probe']:{width}}  {p['expected']:16}  {p['seen']}{mark}")
        print(
            f"sandgate selftest: {len(probes) - len(leaks)}/{len(probes)} held"
            + (f"; {len(leaks)} LEAKED" if leaks else "")
        )
    return 0 if probes and not leaks and code == 0 else (1 if probes else code or 125)
