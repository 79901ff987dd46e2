"""`sandgate status | sandboxes | reload`: ask a running gateway service."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sandgate.enforcer.cli.common import EXIT_OK, SetupError, UsageError
from sandgate.enforcer.control import DEFAULT_SOCKET, ControlClient, ControlError
from sandgate.proxy.approvals.shown import visible


def register(sub) -> None:
    for name, help_text in (
        ("status", "the gateway service's policy, sandboxes, connections and uptime"),
        ("sandboxes", "the sandboxes attached to the gateway service"),
        ("reload", "reload the gateway service's rules (a broken file changes nothing)"),
    ):
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--control",
            type=Path,
            default=DEFAULT_SOCKET,
            metavar="SOCKET",
            help=f"the service's control socket (default {DEFAULT_SOCKET})",
        )
        parser.add_argument(
            "-j", "--json", action="store_true", help="print the service's reply as JSON"
        )
        parser.set_defaults(func=cmd_query, query=name)


def ask(path: Path, cmd: str, **args) -> dict:
    """One request to the service; a SetupError (exit 125) when none answers or it refuses."""
    reply = _exchange(path, cmd, **args)
    if not reply.get("ok"):
        raise SetupError(reply.get("error") or "the gateway service refused the request")
    return reply


def _exchange(path: Path, cmd: str, **args) -> dict:
    """One request to the service and its reply, a refusal too; a SetupError when
    none answers."""
    try:
        client = ControlClient.connect(path)
        try:
            client.send(cmd, **args)
            reply = client.receive()
        finally:
            client.close()
    except ControlError as e:
        raise SetupError(str(e)) from None
    if reply is None:
        raise SetupError(f"the gateway service at {path} closed the connection")
    return reply


def cmd_query(args) -> int:
    if args.query == "reload":
        return cmd_reload(args)
    reply = ask(args.control, args.query)
    if args.json:
        print(json.dumps(reply, indent=2))
        return EXIT_OK
    if args.query == "status":
        print(
            f"gateway service pid {reply['pid']}: policy {reply['policy']} ({reply['rules']} rules from "
            f"{', '.join(reply['rule_files'])}), {reply['sandboxes']} sandboxes, {reply['connections']} "
            f"connections, up {reply['uptime_s']:g} s"
            + (f", {len(reply['workers'])} workers" if len(reply.get("workers", ())) > 1 else "")
            # docs/operations.md points admins here for the spares and the warm runners
            + f", spares {reply.get('spares', 0)}, warm_runners {reply.get('warm_runners', 0)}"
            + (f" (runners_pid {reply['runners_pid']})" if reply.get("runners_pid") else "")
            + (", DRAINING" if reply["draining"] else "")
        )
    elif args.query == "sandboxes":
        for s in reply["sandboxes"]:
            age = time.time() - s["started"]
            state = "" if s["connected"] else "  (runner reconnecting)"
            # The command is the caller's to choose (`sudo sandgate run --gateway`):
            # escaped, so no control or escape sequence of it reaches the admin's terminal.
            command = visible(" ".join(s["command"]), limit=60)
            print(
                f"{s['task_id']}  {s['profile']:12} {s['address']:15} up {age:7.1f} s  runner {s['runner_pid']}  "
                f"{command}{state}"
            )
        if not reply["sandboxes"]:
            print("no sandboxes attached")
    return EXIT_OK


def cmd_reload(args) -> int:
    """As the other queries, but a reload refused for its rule files (FILE:LINE:COL on
    stderr) is a UsageError (exit 2), as `sandgate rules lint` and `sandgate run` do on the same file; a
    service that cannot apply good rules (a worker that did not take them) stays 125."""
    reply = _exchange(args.control, "reload")
    if args.json:
        print(json.dumps(reply, indent=2))
    if reply.get("ok"):
        if not args.json:
            print(f"reloaded: policy {reply['policy']} ({reply['rules']} rules, {reply['ms']} ms)")
        return EXIT_OK
    error = reply.get("error") or "the gateway service refused the request"
    if reply.get("errors") and not reply.get("swap"):
        raise UsageError(error)
    raise SetupError(error)
