"""`sandgate gc [--dry-run]`: remove what SIGKILLed runs left behind."""

from __future__ import annotations

from sandgate.enforcer.cli.common import EXIT_OK, setup_errors


def register(sub) -> None:
    gc = sub.add_parser(
        "gc",
        help="remove what SIGKILLed runs and services left behind "
        "(netns, veth, nft tables, cgroups, id slots, service state)",
    )
    gc.add_argument("-n", "--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(func=cmd_gc)


def cmd_gc(args) -> int:
    with setup_errors():
        from sandgate.enforcer.run import check_prerequisites, gc

        check_prerequisites("gc")
        leftovers = gc(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for line in leftovers.removed:
        print(f"{verb} {line}")
    for line in leftovers.kept:
        print(f"kept {line}")
    if args.dry_run and not leftovers.removed:
        print("nothing to remove")
    return EXIT_OK
