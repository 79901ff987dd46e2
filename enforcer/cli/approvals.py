"""`sandgate approvals list|show ID|approve ID|deny ID|watch`: decide what a task asked
for, over a control socket (the service's, or an embedded run's: docs/approvals.md);
`sandgate approvals keys add NAME|list|revoke NAME`: the named keys of the page and API."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from sandgate.enforcer.cli.common import EXIT_OK, SetupError, UsageError
from sandgate.enforcer.control import DEFAULT_SOCKET, ControlClient, ControlError

SCOPE_WORDS = {
    "once": "once (this connection or request)",
    "task": "for this task",
    "duration": "for a duration",
    "always": "always (a rule in approved.yaml)",
}


def register(sub) -> None:
    parser = sub.add_parser("approvals", help="list and decide pending approvals (ask rules)")
    parser.add_argument(
        "--control",
        type=Path,
        default=None,
        metavar="SOCKET",
        help=f"the control socket (default {DEFAULT_SOCKET}, else the one running "
        "`sandgate run`'s, when there is exactly one)",
    )
    parser.add_argument("-j", "--json", action="store_true", help="print JSON")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="pending approvals, oldest first")
    show = actions.add_parser("show", help="one approval")
    show.add_argument("id", help="the approval's id (from: sandgate approvals list)")
    approve = actions.add_parser("approve", help="approve: once (default), --task, --for, --always")
    approve.add_argument("id", help="the approval's id (from: sandgate approvals list)")
    scope = approve.add_mutually_exclusive_group()
    scope.add_argument(
        "--once",
        dest="scope",
        action="store_const",
        const="once",
        help="this connection or request only (the default)",
    )
    scope.add_argument(
        "--task",
        dest="scope",
        action="store_const",
        const="task",
        help="this destination for the rest of this task",
    )
    scope.add_argument(
        "--for",
        dest="duration",
        metavar="DURATION",
        help="this destination for every task of the profile, for DURATION (30m, 1h, 7d)",
    )
    scope.add_argument(
        "--always",
        dest="scope",
        action="store_const",
        const="always",
        help="append an allow rule to approved.yaml next to the rules",
    )
    approve.add_argument(
        "--seen",
        type=int,
        metavar="REVISION",
        help="the revision `show` or `list` printed: refused if a request or connection "
        "joined the approval since (so you approve only what you were shown)",
    )
    approve.add_argument("--ticket", help="a ticket to record with the approval")
    approve.add_argument(
        "--expires",
        metavar="DATE|DURATION",
        help="with --always: the rule's last day (2026-06-30), an instant with its zone "
        "(2026-06-30T18:00:00Z), or a time from now (30d, 12h)",
    )
    approve.add_argument(
        "--widen",
        metavar="'*.DOMAIN'",
        help="with --for or --always: approve every name under DOMAIN, not just the asked "
        "one (a wildcard that covers it; never '*' or a public suffix)",
    )
    deny = actions.add_parser("deny", help="deny (the task's retries are denied at once)")
    deny.add_argument("id", help="the approval's id (from: sandgate approvals list)")
    actions.add_parser("watch", help="print each new, decided or expired approval as it happens")
    keys = actions.add_parser(
        "keys", help="named keys for the approvals page and API (who decided, by name)"
    )
    key_actions = keys.add_subparsers(dest="keys_action", required=True, metavar="KEYS_ACTION")
    add = key_actions.add_parser("add", help="add a key; its token is printed once")
    add.add_argument("name", help="who holds it: recorded as `NAME (api key)` / `NAME (web)`")
    key_actions.add_parser("list", help="the keys' names")
    revoke = key_actions.add_parser("revoke", help="remove a key: refused at once (401)")
    revoke.add_argument("name", help="the key to revoke (from: sandgate approvals keys list)")
    for action in key_actions.choices.values():
        action.add_argument(
            "--file",
            type=Path,
            default=None,
            metavar="FILE",
            help="the keys file (default $SANDGATE_STATE_DIR/admin-keys: the gateway's "
            "--admin-keys)",
        )
    for action in actions.choices.values():
        # Also after the action (`approvals list --control S`); SUPPRESS keeps the
        # group's value when not given here.
        action.add_argument(
            "--control",
            type=Path,
            default=argparse.SUPPRESS,
            metavar="SOCKET",
            help="the control socket (as before the action)",
        )
        action.add_argument(
            "-j", "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
        )
    parser.set_defaults(func=cmd_approvals)


def control_socket(given: Path | None) -> Path:
    """The socket to use: the one given; else the service's, if one runs; else the
    single embedded run's (RUN_DIR/<id>/control.sock)."""
    if given is not None:
        return given
    if DEFAULT_SOCKET.exists():
        return DEFAULT_SOCKET
    run_dir = Path(os.environ.get("SANDGATE_RUN_DIR", "/run/sandgate"))
    found = sorted(run_dir.glob("*/control.sock"))
    if len(found) == 1:
        return found[0]
    if found:
        raise SetupError(
            f"{len(found)} runs have a control socket; pick one with --control "
            + " ".join(str(f) for f in found)
        )
    raise SetupError(f"no gateway service at {DEFAULT_SOCKET} and no running `sandgate run`")


def cmd_approvals(args) -> int:
    from sandgate.proxy.approvals.overlay import rule_expiry
    from sandgate.proxy.policy.model import parse_duration

    if args.action == "keys":
        return _keys(args)
    request: dict = {}
    if args.action == "list":
        request = {"cmd": "approvals"}
    elif args.action == "show":
        request = {"cmd": "approval", "id": args.id}
    elif args.action == "deny":
        request = {"cmd": "deny", "id": args.id}
    elif args.action == "approve":
        request = {"cmd": "approve", "id": args.id, "scope": args.scope or "once"}
        if args.seen is not None:
            request["seen"] = args.seen
        if args.duration is not None:
            try:
                request.update(scope="duration", duration=parse_duration(args.duration))
            except ValueError as e:
                raise UsageError(f"--for: {e}") from None
        for option, value in (("ticket", args.ticket), ("expires", args.expires)):
            if value is None:
                continue
            if request["scope"] != "always":
                raise UsageError(f"--{option} goes with --always (it is written into the rule)")
            request[option] = value
        if args.widen is not None:
            if request["scope"] not in ("duration", "always"):
                raise UsageError(
                    "--widen goes with --for or --always (a wider grant for the profile)"
                )
            request["widen"] = args.widen
        if args.expires is not None:
            try:  # checked here too, so that a typo needs no gateway to be told
                rule_expiry(args.expires, datetime.datetime.now().astimezone())
            except ValueError as e:
                raise UsageError(f"--{e}") from None
    path = control_socket(args.control)
    try:
        client = ControlClient.connect(path)
    except ControlError as e:
        raise SetupError(str(e)) from None
    try:
        if args.action == "watch":
            return _watch(client, args.json)
        reply = client.request(request.pop("cmd"), **request)
    except ControlError as e:
        raise SetupError(str(e)) from None
    finally:
        client.close()
    if args.action == "list":
        if args.json:
            print(json.dumps(reply["approvals"], indent=2))
        else:
            for approval in reply["approvals"]:
                print(_line(approval))
            if not reply["approvals"]:
                print("no approvals pending")
        return EXIT_OK
    approval = reply["approval"]
    if args.json:
        print(json.dumps(approval, indent=2))
    elif args.action == "show":
        _show(approval)
    else:
        scope = SCOPE_WORDS.get(approval.get("scope") or "", "")
        if approval.get("widened"):
            scope += f", widened to {approval['widened']}"
        print(f"{approval['state']}: {approval['id']} {_destination(approval)} {scope}".rstrip())
        shown = approval.get("shown") or {}
        if approval.get("scope") == "once" and shown:
            print(f"  let through: {shown['once']} ({shown['held']})")
        elif approval.get("state") == "approved" and shown:
            print(f"  let through: {shown['wider']}")
    return EXIT_OK


def _keys(args) -> int:
    """`keys add|list|revoke`: the keys file itself (the gateway re-reads it on change)."""
    from sandgate.enforcer.admin.keys import (
        ADMIN,
        DEFAULT_KEYS,
        KeyFileError,
        check_name,
        digest,
        new_token,
        read_keys,
        write_keys,
    )

    path = args.file or DEFAULT_KEYS
    try:
        keys = read_keys(path)
        if args.keys_action == "list":
            names = [ADMIN, *keys]
            if args.json:
                print(json.dumps(names))
            else:
                print(f"{ADMIN}  (the token generated at each start: the admin-token file)")
                for name in keys:
                    print(name)
            return EXIT_OK
        name = check_name(args.name)
        if args.keys_action == "add":
            if name in keys:
                raise KeyFileError(f"a key named {name!r} exists: revoke it first")
            token = new_token()
            write_keys(path, {**keys, name: digest(token)})
            print(token)
            print(
                f"sandgate: key {name!r} added to {path}; its token, printed above, is not "
                f"stored (only its hash): give it to {name} now",
                file=sys.stderr,
            )
            return EXIT_OK
        if name not in keys:
            raise KeyFileError(
                f"no key named {name!r} in {path} (see: sandgate approvals keys list)"
            )
        del keys[name]
        write_keys(path, keys)
        print(f"revoked: {name}")
        return EXIT_OK
    except KeyFileError as e:
        raise SetupError(str(e)) from None
    except OSError as e:
        raise SetupError(f"{path}: {e.strerror or e}") from None


def _watch(client: ControlClient, as_json: bool) -> int:
    client.sock.settimeout(None)
    client.send("watch")
    try:
        while (reply := client.receive()) is not None:
            if not reply.get("ok"):
                raise SetupError(reply.get("error") or "refused")
            if as_json:
                print(json.dumps(reply), flush=True)
            elif "change" in reply:
                print(f"{reply['change']:9} {_line(reply['approval'])}", flush=True)
            else:
                for approval in reply.get("approvals", []):
                    print(f"{'pending':9} {_line(approval)}", flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _destination(a: dict) -> str:
    """What the task asks for, as every view shows it (`shown`: query included, hiding
    characters escaped, a long value cut with '... (N more bytes)')."""
    return a["shown"]["request"]


def _line(a: dict) -> str:
    ended = " (task ended)" if a.get("task_ended") else ""
    shown = a["shown"]
    bodies = f"; bodies: {shown['bodies']}" if shown.get("bodies") else ""
    return (
        f"{a['id']}  {a['state']:8} task {a['task_id']}{ended}  {a['profile']:10} "
        f"{_destination(a)}  waiting {a['waiting_s']:g} s, {shown['held']}{bodies}, "
        f"revision {a.get('revision', 0)}"
    )


# What `show` prints first, from the record's `shown` (the request whole, not cut).
SHOWN_LINES = (
    ("request", "asks for"),
    ("held", "held"),
    ("bodies", "bodies"),
    ("once", "once grants"),
    ("wider", "task/for/always grant"),
)


def _show(a: dict) -> None:
    from sandgate.proxy.approvals.shown import WHOLE_CHARS, shown_fields, visible

    shown = shown_fields(a, WHOLE_CHARS)
    for key, words in SHOWN_LINES:
        if shown.get(key) is not None:
            print(f"{words + ':':22} {shown[key]}")
    for key, value in a.items():
        if value is not None and key not in ("shown", "request", "bodies"):
            text = visible(str(value), WHOLE_CHARS) if isinstance(value, str) else value
            print(f"{key + ':':22} {text}")
