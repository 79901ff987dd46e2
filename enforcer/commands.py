"""Subcommands that need the gateway (run, gc, demo, audit): registered with the
CLI here and imported lazily, so `sandgate rules` stays quick."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sandgate.enforcer.cli import EXIT_DENIED, EXIT_OK, UsageError
from sandgate.enforcer.sandbox import options as sandbox_options
from sandgate.proxy.policy import DEFAULT_RULES, PolicyError, load_policy


def register(sub) -> None:
    run = sub.add_parser("run", help="run a command in a sandbox whose only way out is the gateway")
    run.add_argument("--rules", default=str(DEFAULT_RULES))
    run.add_argument("--profile", default="default")
    run.add_argument("--dns-upstream", action="append", default=[], metavar="IP",
                     help="resolver the DNS filter forwards to (default: the host's resolv.conf)")
    run.add_argument("--audit-log", type=Path, metavar="FILE",
                     help="append the run's events as hash-chained JSON lines to FILE "
                          "(default: $SANDGATE_STATE_DIR/audit/<run id>.jsonl, /var/lib/sandgate/audit/...)")
    run.add_argument("--metrics-listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                     help="serve Prometheus /metrics here while the task runs (default 127.0.0.1:9464; "
                          "'off' for none). A port in use is a warning, not an error")
    run.add_argument("--summary-json", type=Path, help="write the task summary as JSON to FILE")
    run.add_argument("--extra-ca", type=Path, action="append", default=[],
                     help="also trust this CA (PEM) in the sandbox and for upstreams, e.g. a corporate CA")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary table on stderr")
    run.add_argument("-v", "--verbose", action="store_true")
    sandbox_options.add_arguments(run)
    run.add_argument("command", nargs="+", metavar="CMD", help="the command to run in the sandbox, after --")
    run.set_defaults(func=cmd_run)

    selftest = sub.add_parser("selftest", help="probe the sandbox from inside: what a hostile task would try")
    selftest.add_argument("--rules", default=str(DEFAULT_RULES), help="rule file (default: the shipped default)")
    selftest.add_argument("--profile", default="default", help="profile of the rules to probe")
    selftest.add_argument("--dns-upstream", action="append", default=[], metavar="IP",
                          help="resolver the DNS filter forwards to (default: the host's resolv.conf)")
    selftest.add_argument("-j", "--json", action="store_true", help="print the probes as JSON")
    selftest.set_defaults(func=cmd_selftest)

    demo = sub.add_parser("demo", help="build a fake internet in namespaces and run a scripted agent through the gateway")
    demo.set_defaults(func=cmd_demo)

    audit = sub.add_parser("audit", help="audit-log tools").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check an audit log's hash chain; exit 1 at the first broken line")
    verify.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="one log, or a rotated series oldest first (FILE.2 FILE.1 FILE)")
    verify.set_defaults(func=cmd_audit_verify)

    gc = sub.add_parser("gc", help="remove what SIGKILLed runs left behind (netns, veth, nft tables)")
    gc.set_defaults(func=cmd_gc)


def cmd_run(args) -> int:
    import logging

    from sandgate.enforcer.run import RUN_DIR, STATE_DIR, RunOptions, run
    from sandgate.enforcer.sandbox.spec import SandboxError
    from sandgate.proxy.telemetry.metrics import parse_listen

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="sandgate: %(levelname)s %(name)s: %(message)s")
    try:
        policy = load_policy([Path(args.rules)])
    except PolicyError as e:
        raise UsageError(f"invalid rules, nothing was run:\n{e}") from None
    for ca in args.extra_ca:
        if not ca.is_file():
            raise UsageError(f"--extra-ca {ca}: no such file")
    metrics_listen = None
    if args.metrics_listen.lower() not in ("off", "none", ""):
        try:
            metrics_listen = parse_listen(args.metrics_listen)
        except ValueError as e:
            raise UsageError(f"--metrics-listen: {e}") from None
    try:
        sandbox, limits = sandbox_options.from_arguments(args, [STATE_DIR, RUN_DIR])
    except SandboxError as e:
        raise UsageError(str(e)) from None
    code = run(RunOptions(command=args.command, policy=policy, profile=args.profile, sandbox=sandbox, limits=limits,
                          dns_upstreams=args.dns_upstream, audit_log=args.audit_log,
                          metrics_listen=metrics_listen,
                          summary_json=args.summary_json, extra_ca=args.extra_ca, quiet=args.quiet))
    # Everything is torn down, written and closed by now. Skip the interpreter's
    # finalisation (~300 ms freeing mitmproxy's modules) at the end of every task.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_selftest(args) -> int:
    import json

    from sandgate.enforcer.run import RunOptions, selftest
    from sandgate.enforcer.sandbox.spec import SandboxOptions

    try:
        policy = load_policy([Path(args.rules)])
    except PolicyError as e:
        raise UsageError(f"invalid rules, nothing was probed:\n{e}") from None
    code, probes = selftest(RunOptions(command=[], policy=policy, profile=args.profile,
                                       dns_upstreams=args.dns_upstream, metrics_listen=None,
                                       sandbox=SandboxOptions(workspace=None)))
    leaks = [p for p in probes if not p["ok"]]
    if args.json:
        print(json.dumps({"ok": bool(probes) and not leaks, "probes": probes}, indent=2))
    else:
        width = max((len(p["probe"]) for p in probes), default=5)
        print(f"{'probe':{width}}  {'expected':16}  seen")
        for p in probes:
            mark = "" if p["ok"] else "   <-- LEAK"
            print(f"{p['probe']:{width}}  {p['expected']:16}  {p['seen']}{mark}")
        print(f"sandgate selftest: {len(probes) - len(leaks)}/{len(probes)} held" + (
            f"; {len(leaks)} LEAKED" if leaks else ""))
    return 0 if probes and not leaks and code == 0 else (1 if probes else code or 125)


def cmd_audit_verify(args) -> int:
    """Exit 0 when the chain is intact, 1 at the first broken line (FILE:LINE: problem)."""
    from sandgate.proxy.telemetry.audit import verify

    for path in args.files:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    result = verify(*args.files)
    if not result.ok:
        print(f"{result.file}:{result.line}: {result.problem}")
        print(f"sandgate audit verify: BROKEN at line {result.line} of {result.file} "
              f"({result.lines - 1} lines before it are intact)")
        return EXIT_DENIED
    if not result.lines:
        print("sandgate audit verify: ok, but empty: no records")
        return EXIT_OK
    where = "a fresh log (seq 1)" if result.starts_fresh else (
        f"seq {result.first_seq}: earlier lines are in older rotated files, or were removed")
    print(f"sandgate audit verify: ok: {result.lines} lines, seq {result.first_seq}..{result.last_seq}, "
          f"chain intact; starts at {where}; last hash {result.last_hash}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from sandgate.enforcer.demo import demo
    from sandgate.enforcer.run import RunError, check_prerequisites

    try:
        check_prerequisites()
    except RunError as e:
        raise UsageError(str(e)) from None
    return demo()


def cmd_gc(args) -> int:
    from sandgate.enforcer.run import RunError, check_prerequisites, gc

    try:
        check_prerequisites()
    except RunError as e:
        raise UsageError(str(e)) from None
    for line in gc():
        print(f"removed {line}")
    return EXIT_OK

