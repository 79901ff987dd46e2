"""The `sandgate` command: the parser, and one module per command group.

Each module here (rules, check, run, audit, gc, demo) adds its subcommand with
`register(sub)` and imports what is heavy (mitmproxy, pyroute2, the gateway)
only inside the function that runs it, so `sandgate rules`, `sandgate check`
and `sandgate --version` stay quick.

Exit codes: 0 ok/allowed, 1 denied, 2 bad input, 125 the machine could not
do it (not root, `nft` missing, ...); `sandgate run` returns the task's own.
Errors go to stderr as one line `sandgate: ...`, never a traceback.
"""

import os
import sys

# typing.TYPE_CHECKING without importing typing (~2 ms of `run --gateway`); no
# `from __future__ import annotations` either (one import more): argparse's names
# in annotations are quoted.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

# Each command → the module that registers it, in the order `sandgate --help` lists them.
# Only the module of the command being run is imported: `run --gateway` is timed in ms.
COMMANDS = {
    "rules": "rules",
    "check": "check",
    "run": "run",
    "gateway": "gateway",
    "runners": "runners",
    "status": "status",
    "sandboxes": "status",
    "reload": "status",
    "approvals": "approvals",
    "selftest": "selftest",
    "audit": "audit",
    "gc": "gc",
    "demo": "demo",
}
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command killed by SIGPIPE
EXIT_INTERRUPTED = 128 + 2  # as a shell reports a command killed by SIGINT


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("sandgate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> "argparse.ArgumentParser":
    """The parser for every command, or for `command` alone when it is one of ours."""
    import argparse
    import importlib

    class _VersionAction(argparse.Action):
        """`--version`, reading the distribution's metadata only when asked."""

        def __init__(
            self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
        ):
            super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"sandgate {version()}")
            parser.exit()

    parser = argparse.ArgumentParser(
        prog="sandgate", description="Egress gateway for sandboxed coding agents."
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print sandgate's version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for group in groups:
        importlib.import_module(f"{__name__}.{group}").register(sub)
    return parser


class DroppingStream:
    """A text stream (stderr) that drops what it cannot write. sandgate's messages
    there are for a person who may be gone by then: `sandgate run ... 2>&1 | head`,
    a caller killed while its warm runner tears the run down (enforcer/zygote.py),
    a service's log pipe whose reader died, a full disk. A failed write must not
    stop what comes after it: the task's cgroup and id slot removed, its summary
    file written, the service serving on. What was decided is in the audit log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:  # EPIPE, ENOSPC, EIO (a terminal hung up): said to nobody
            return len(text)

    def flush(self) -> None:
        try:  # noqa: SIM105 - no contextlib on `run --gateway`'s lean path (enforcer/handoff.py)
            self.stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def drop_what_stderr_cannot_take() -> None:
    """sys.stderr a DroppingStream (once): for this process and what it forks."""
    if not isinstance(sys.stderr, DroppingStream):
        sys.stderr = DroppingStream(sys.stderr)


def open_closed_standard_streams() -> None:
    """A standard stream Python found closed at its start (`>&-`), which it makes None
    (every print would fail), on /dev/null. The native front (cli/sandgate.c) puts
    /dev/null on such descriptors before Python starts, so that nothing else takes
    their numbers; this is for `sandgate-python` started directly."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 - for the process's life


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    open_closed_standard_streams()
    drop_what_stderr_cannot_take()
    if argv[:1] == ["run"]:  # before argparse: a warm runner of the service may take it
        from sandgate.enforcer import handoff

        handoff.hand_off(argv)
        # Not taken: this process starts the run, and its imports make ~80 dataclasses
        # (cli/run.py's cmd_run ends this once they are made).
        from sandgate.enforcer import dataclass_cache

        dataclass_cache.start()
        try:
            return run_command(_parse_and_run, argv)
        finally:  # also when the arguments refuse the run before cmd_run could end it
            dataclass_cache.finish()
    return run_command(_parse_and_run, argv)


def _parse_and_run(argv: list[str]) -> int:
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return args.func(args)


def run_command(func, args: "argparse.Namespace") -> int:
    """`func(args)`, its errors as one line on stderr and an exit code (also for a
    run a warm runner took over: enforcer/zygote.py)."""
    from sandgate.enforcer.cli.common import EXIT_SETUP, EXIT_USAGE, SetupError, UsageError

    try:
        return func(args)
    except UsageError as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SetupError as e:
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    except BrokenPipeError:  # `sandgate rules show | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    except OSError as e:  # the machine refused (a file unreadable, stdout's disk full)
        print(f"sandgate: {e}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:  # Ctrl-C: what was started is undone on the way out
        return EXIT_INTERRUPTED
