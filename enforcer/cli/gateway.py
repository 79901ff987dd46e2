"""`sandgate gateway`: the long-lived gateway service; `sandgate gateway stop` drains it."""

from __future__ import annotations

import sys
from pathlib import Path

from sandgate.enforcer.cli.common import EXIT_OK, UsageError, load_rules, setup_errors
from sandgate.enforcer.control import DEFAULT_SOCKET
from sandgate.proxy.policy import DEFAULT_RULES


def register(sub) -> None:
    gateway = sub.add_parser(
        "gateway", help="run the gateway as a service that many sandboxes attach to"
    )
    gateway.add_argument(
        "action",
        nargs="?",
        choices=("serve", "stop"),
        default="serve",
        help="serve (default): run the service here; stop: drain a running one",
    )
    gateway.add_argument(
        "--rules",
        default=str(DEFAULT_RULES),
        metavar="FILE",
        help="rule file (default: the shipped default rules); reloaded on change and SIGHUP",
    )
    gateway.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="IP",
        help="resolver the DNS filter forwards to (default: the host's resolv.conf)",
    )
    gateway.add_argument(
        "--extra-ca",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="also trust this CA (PEM) in the sandboxes and for upstreams",
    )
    gateway.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default 127.0.0.1:9464; 'off' for none)",
    )
    gateway.add_argument(
        "--control",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="SOCKET",
        help=f"the control socket (default {DEFAULT_SOCKET}; mode 0660, root and group sandgate)",
    )
    gateway.add_argument(
        "--audit-log",
        type=Path,
        metavar="FILE",
        help="hash-chained JSON lines of every decision (default /var/lib/sandgate/audit/gateway.jsonl)",
    )
    gateway.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on stop: how long running tasks may finish before they are stopped (default 30)",
    )
    gateway.add_argument(
        "-v", "--verbose", action="store_true", help="log the gateway's steps on stderr"
    )
    gateway.set_defaults(func=cmd_gateway)


def cmd_gateway(args) -> int:
    if args.action == "stop":
        from sandgate.enforcer.cli.status import ask

        reply = ask(args.control, "stop", grace=args.grace)
        print(
            f"sandgate gateway: stopping ({reply.get('sandboxes', 0)} sandboxes, grace {args.grace:g} s)"
        )
        return EXIT_OK
    import logging

    from sandgate.proxy.telemetry.metrics import parse_listen

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="sandgate gateway: %(levelname)s %(name)s: %(message)s",
    )
    load_rules(args.rules, "the service was not started")  # a clear error before anything is set up
    metrics_listen = None
    if args.metrics_listen.lower() not in ("off", "none", ""):
        try:
            metrics_listen = parse_listen(args.metrics_listen)
        except ValueError as e:
            raise UsageError(f"--metrics-listen: {e}") from None
    for ca in args.extra_ca:
        if not ca.is_file():
            raise UsageError(f"--extra-ca {ca}: no such file")
    with setup_errors():
        from sandgate.enforcer.run import check_prerequisites
        from sandgate.enforcer.service import SERVICE_AUDIT_LOG, ServiceOptions, serve

        check_prerequisites()
        code = serve(
            ServiceOptions(
                rules=Path(args.rules),
                dns_upstreams=args.dns_upstream,
                extra_ca=args.extra_ca,
                metrics_listen=metrics_listen,
                control=args.control,
                audit_log=args.audit_log or SERVICE_AUDIT_LOG,
                grace=args.grace,
            )
        )
    sys.stderr.flush()
    return code
