"""`sandgate gateway`: the long-lived gateway service; `sandgate gateway stop` drains it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandgate.enforcer.cli.common import (
    EXIT_OK,
    add_gateway_options,
    admin_settings,
    audit_limits,
    gateway_settings,
    load_rules,
    read_extra_cas,
    setup_errors,
)
from sandgate.enforcer.control import DEFAULT_SOCKET


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
    add_gateway_options(
        gateway,
        audit_help="hash-chained JSON lines of every decision "
        "(default /var/lib/sandgate/audit/gateway.jsonl)",
    )
    gateway.add_argument(
        "--control",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="SOCKET",
        help=f"the control socket (default {DEFAULT_SOCKET}; mode 0660, root and group sandgate)",
    )
    gateway.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on stop: how long running tasks may finish before they are stopped (default 30; "
        "`gateway stop` without it: the running service's own)",
    )
    gateway.add_argument(
        "--warm",
        type=_spares,
        default=2,
        metavar="N",
        help="sandbox networks kept ready, so that `run --gateway` does not wait for one "
        "(default 2; 0: make each on attach)",
    )
    gateway.add_argument(
        "--runners",
        choices=("service", "external"),
        default="service",
        help="who keeps the warm runners `run --gateway` hands its run to: service (default: "
        "this process forks --warm of them, unless its unit restricts it or a `sandgate "
        "runners` already serves the socket) or external (a `sandgate runners` process: "
        "start none here)",
    )
    gateway.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="data path processes, each serving whole sandboxes (default: one per usable "
        "core; 1: in the service process)",
    )
    gateway.set_defaults(func=cmd_gateway)


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 256")
    return int(text)


def _spares(text: str) -> int:
    if not text.isdigit() or int(text) > 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 64")
    return int(text)


def cmd_gateway(args) -> int:
    if args.action == "stop":
        from sandgate.enforcer.cli.status import ask

        # Without --grace the service drains with its own (--grace, SANDGATE_GRACE), not 30 s.
        given = {} if args.grace is None else {"grace": args.grace}
        reply = ask(args.control, "stop", **given)
        grace = reply.get("grace", args.grace)
        print(
            f"sandgate gateway: stopping ({reply.get('sandboxes', 0)} sandboxes, grace {grace:g} s)"
        )
        return EXIT_OK
    metrics_listen = gateway_settings(args, "sandgate gateway")
    extra_ca = read_extra_cas(args.extra_ca)
    admin = admin_settings(args)
    load_rules(args.rules, "the service was not started")  # a clear error before anything is set up
    with setup_errors():
        from sandgate.enforcer.run import check_prerequisites
        from sandgate.enforcer.service import SERVICE_AUDIT_LOG, ServiceOptions, serve
        from sandgate.enforcer.workers import usable_cores

        check_prerequisites("gateway")
        code = serve(
            ServiceOptions(
                rules=Path(args.rules),
                dns_upstreams=args.dns_upstream,
                extra_ca=extra_ca,
                metrics_listen=metrics_listen,
                admin=admin,
                control=args.control,
                audit_log=args.audit_log or SERVICE_AUDIT_LOG,
                audit_budget=args.audit_budget,
                on_audit_failure=args.on_audit_failure,
                audit_limits=audit_limits(args),
                grace=ServiceOptions.grace if args.grace is None else args.grace,
                warm=args.warm,
                runners=args.runners,
                workers=args.workers or usable_cores(),
            )
        )
    sys.stderr.flush()
    return code
