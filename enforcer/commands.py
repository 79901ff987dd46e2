"""Subcommands that need the gateway (run, gc, demo, audit): registered with the
CLI here and imported lazily, so `sandgate rules` stays quick."""

from __future__ import annotations

from pathlib import Path

from enforcer.cli import EXIT_OK, UsageError
from proxy.policy import DEFAULT_RULES, PolicyError, load_policy


def register(sub) -> None:
    run = sub.add_parser("run", help="run a command in a sandbox whose only way out is the gateway")
    run.add_argument("--rules", default=str(DEFAULT_RULES))
    run.add_argument("--profile", default="default")
    run.add_argument("--dns-upstream", action="append", default=[], metavar="IP",
                     help="resolver the DNS filter forwards to (default: the host's resolv.conf)")
    run.add_argument("--audit-log", type=Path, help="append the run's events as JSON lines to FILE")
    run.add_argument("--summary-json", type=Path, help="write the task summary as JSON to FILE")
    run.add_argument("--extra-ca", type=Path, action="append", default=[],
                     help="also trust this CA (PEM) in the sandbox and for upstreams, e.g. a corporate CA")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary table on stderr")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("command", nargs="+", metavar="-- CMD")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="build a fake internet in namespaces and run a scripted agent through the gateway")
    demo.set_defaults(func=cmd_demo)

    gc = sub.add_parser("gc", help="remove what SIGKILLed runs left behind (netns, veth, nft tables)")
    gc.set_defaults(func=cmd_gc)


def cmd_run(args) -> int:
    import logging

    from enforcer.run import RunOptions, run

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="sandgate: %(levelname)s %(name)s: %(message)s")
    try:
        policy = load_policy([Path(args.rules)])
    except PolicyError as e:
        raise UsageError(f"invalid rules, nothing was run:\n{e}") from None
    for ca in args.extra_ca:
        if not ca.is_file():
            raise UsageError(f"--extra-ca {ca}: no such file")
    return run(RunOptions(command=args.command, policy=policy, profile=args.profile,
                          dns_upstreams=args.dns_upstream, audit_log=args.audit_log,
                          summary_json=args.summary_json, extra_ca=args.extra_ca, quiet=args.quiet))


def cmd_demo(args) -> int:
    from enforcer.demo import demo
    from enforcer.run import RunError, check_prerequisites

    try:
        check_prerequisites()
    except RunError as e:
        raise UsageError(str(e)) from None
    return demo()


def cmd_gc(args) -> int:
    from enforcer.run import RunError, check_prerequisites, gc

    try:
        check_prerequisites()
    except RunError as e:
        raise UsageError(str(e)) from None
    for line in gc():
        print(f"removed {line}")
    return EXIT_OK

