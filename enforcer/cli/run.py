"""`sandgate run -- CMD...`: one command in a sandbox whose only way out is the gateway.

The gateway (mitmproxy, pyroute2) is imported inside `cmd_run`, so that the
other commands stay quick."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from sandgate.enforcer import dataclass_cache
from sandgate.enforcer.cli.common import (
    SetupError,
    UsageError,
    add_gateway_options,
    admin_settings,
    audit_limits,
    gateway_settings,
    load_rules,
    path_option,
    read_extra_cas,
    setup_errors,
)
from sandgate.enforcer.control import DEFAULT_SOCKET
from sandgate.enforcer.sandbox import options as sandbox_options
from sandgate.proxy.policy import DEFAULT_RULES
from sandgate.proxy.telemetry.flood import DEFAULT_BURST, DEFAULT_RATE


def register(sub) -> None:
    run = sub.add_parser("run", help="run a command in a sandbox whose only way out is the gateway")
    run.add_argument(
        "--profile", default="default", help="profile the sandbox is held to (default: default)"
    )
    add_gateway_options(
        run,
        audit_help="append the run's events as hash-chained JSON lines to FILE "
        "(default: $SANDGATE_STATE_DIR/audit/<run id>.jsonl, /var/lib/sandgate/audit/...)",
    )
    run.add_argument(
        "--summary-json",
        type=path_option,
        metavar="FILE",
        help="write the task summary as JSON to FILE",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no summary table on stderr")
    run.add_argument(
        "--stop-grace",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="after a SIGTERM, SIGINT, SIGHUP or SIGQUIT is passed on to the task, how long it may take "
        "to end before it is killed; a second signal kills it at once (default 10)",
    )
    run.add_argument(
        "--gateway",
        nargs="?",
        const=str(DEFAULT_SOCKET),
        metavar="SOCKET",
        help=f"attach to a running gateway service (default socket {DEFAULT_SOCKET}) instead of "
        "embedding a gateway; put -- before CMD",
    )
    sandbox_options.add_arguments(run)
    run.add_argument(
        "command", nargs="+", metavar="CMD", help="the command to run in the sandbox, after --"
    )
    run.set_defaults(func=cmd_run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 86400")
    return value


def cmd_run(args) -> int:
    if args.gateway is not None:
        dataclass_cache.finish()
        _exit_now(_run_attached(args))
    seed = _spawn_seed(args)
    # The cyclic GC paused while the settings and rules load and the gateway's modules
    # import: they make some 50k objects that live as long as the process (next to no
    # garbage), which the collector would scan again and again (~20 ms of a run's
    # start). Then they are frozen (never scanned; policy/load.py and engine.py do the
    # same) and it runs again for what the gateway makes while it serves.
    gc.disable()
    try:
        metrics_listen = gateway_settings(args, "sandgate")
        admin = admin_settings(args)
        if admin.listen is not None and args.admin_listen is None:
            # The default port taken (most often by another run): any free one, printed.
            admin.any_port_if_taken = True
        policy = load_rules(args.rules, "nothing was run", kept=True)
        from sandgate.enforcer.run import RUN_DIR, STATE_DIR, RunOptions, check_prerequisites, run
        from sandgate.enforcer.sandbox.spec import SandboxError
    finally:
        dataclass_cache.finish()
        gc.freeze()
        gc.enable()
    with setup_errors():
        check_prerequisites()
        try:
            sandbox, limits = sandbox_options.from_arguments(
                args, [STATE_DIR, RUN_DIR], policy.paths
            )
        except SandboxError as e:
            raise UsageError(str(e)) from None
        extra_ca = read_extra_cas(args.extra_ca, sandbox.writable)
        code = run(
            RunOptions(
                command=args.command,
                policy=policy,
                profile=args.profile,
                sandbox=sandbox,
                limits=limits,
                dns_upstreams=args.dns_upstream,
                audit_log=args.audit_log,
                audit_budget=args.audit_budget,
                on_audit_failure=args.on_audit_failure,
                audit_limits=audit_limits(args),
                metrics_listen=metrics_listen,
                metrics_listen_given=args.metrics_listen is not None,
                admin=admin,
                summary_json=args.summary_json,
                extra_ca=extra_ca,
                quiet=args.quiet,
                **({} if args.stop_grace is None else {"stop_grace": args.stop_grace}),
                seed=seed,
            )
        )
    _exit_now(code)


def _spawn_seed(args):
    """The task's init started now (attach.InitSeed.spawn), beside the imports still
    to come, where its limits will need a cgroup; None where they will not, or it
    cannot start (the run then forks one: run._init_seed). Should the run not get
    that far, it dies with this process (PR_SET_PDEATHSIG)."""
    if args.memory.lower() == "none" and args.pids.lower() == "none" and not args.cpus:
        return None
    from sandgate.enforcer.attach import InitSeed

    try:
        return InitSeed.spawn()
    except OSError:
        return None


def _exit_now(code: int) -> None:
    """Everything is torn down, written and closed by now. Skip the interpreter's
    finalisation (~300 ms freeing mitmproxy's modules, ~10 ms even for an attached run)
    at the end of every task."""
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Options that belong to the gateway, which a service already has.
SERVICE_OWNED = {
    "rules": str(DEFAULT_RULES),
    "dns_upstream": [],
    "audit_log": None,
    "audit_budget": None,
    "on_audit_failure": "block",
    "audit_rate": DEFAULT_RATE,
    "audit_burst": DEFAULT_BURST,
    "metrics_listen": None,
    "extra_ca": [],
    "admin_listen": None,
    "approval_webhook": [],
    "approval_webhook_format": "json",
    "approval_webhook_secret": None,
}


def _run_attached(args, caller=None, seed=None) -> int:
    """The task in a sandbox of a running service: no gateway (nor mitmproxy) here.
    `caller`: the `sandgate` process that handed this run to a warm runner
    (enforcer/zygote.py), whose signals are forwarded and whose end kills the task;
    `seed`: that runner's init, forked ahead in a task cgroup (attach.InitSeed)."""
    given = [name for name, default in SERVICE_OWNED.items() if getattr(args, name) != default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(
            f"{flags}: set on the gateway service (sandgate gateway), not with --gateway"
        )
    if os.geteuid() != 0:
        raise SetupError(
            "sandgate run needs root (it builds the task's namespaces and cgroups); try: sudo sandgate run ..."
        )
    from sandgate.enforcer.attach import STATE_DIRS, AttachOptions, run_attached
    from sandgate.enforcer.sandbox.spec import SandboxError

    try:
        sandbox, limits = sandbox_options.from_arguments(args, list(STATE_DIRS))
    except SandboxError as e:
        raise UsageError(str(e)) from None
    return run_attached(
        AttachOptions(
            command=args.command,
            control=Path(args.gateway),
            profile=args.profile,
            sandbox=sandbox,
            limits=limits,
            summary_json=args.summary_json,
            quiet=args.quiet,
            caller=caller,
            seed=seed,
            **({} if args.stop_grace is None else {"stop_grace": args.stop_grace}),
        )
    )
