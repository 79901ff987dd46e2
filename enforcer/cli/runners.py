"""`sandgate runners`: warm runners for `sandgate run --gateway`, as a process of their own.

The gateway service forks its warm runners itself (enforcer/zygote.py), unless its
systemd unit restricts it so that a runner could not build a sandbox (the shipped
sandgate-gateway.service does). This command is that pool apart from the service,
e.g. as containers/systemd/sandgate-runners.service, with the privileges a task
sandbox needs and none of the gateway's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sandgate.enforcer.cli.common import EXIT_OK, SetupError
from sandgate.enforcer.control import DEFAULT_SOCKET


def register(sub) -> None:
    runners = sub.add_parser(
        "runners",
        help="keep warm runners for `sandgate run --gateway` (a process apart from the service)",
    )
    runners.add_argument(
        "--control",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="SOCKET",
        help=f"the gateway service's control socket the runs attach to (default {DEFAULT_SOCKET}); "
        "the runners listen next to it",
    )
    runners.add_argument(
        "--warm",
        type=_runner_count,
        default=2,
        metavar="N",
        help="runners kept waiting (default 2)",
    )
    runners.set_defaults(func=cmd_runners)


def _runner_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 64")
    return int(text)


def cmd_runners(args) -> int:
    if os.geteuid() != 0:
        raise SetupError("sandgate runners must run as root: its runners build task sandboxes")
    from sandgate.enforcer import zygote

    control = os.path.abspath(args.control)
    print(f"sandgate runners: {args.warm} warm runners for {control}", file=sys.stderr, flush=True)
    try:
        zygote.serve(control, args.warm)
    except (zygote.PoolError, OSError) as e:
        raise SetupError(str(e)) from None
    return EXIT_OK
