"""`sandgate audit verify FILE...`: check an audit log's hash chain."""

from __future__ import annotations

from pathlib import Path

from sandgate.enforcer.cli.common import EXIT_DENIED, EXIT_OK, UsageError

MAX_BREAKS_SHOWN = 20  # a log broken everywhere (the wrong file) needs no 10^6 lines of it


def register(sub) -> None:
    audit = sub.add_parser("audit", help="audit-log tools").add_subparsers(
        dest="audit_command", required=True, metavar="{verify}"
    )
    verify = audit.add_parser(
        "verify", help="check an audit log's hash chain; exit 1 if a line is broken (each is named)"
    )
    verify.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="a log: with its rotated files (FILE.<seq>) if there are any; or the files "
        "of a series, oldest first",
    )
    verify.set_defaults(func=cmd_audit_verify)


def cmd_audit_verify(args) -> int:
    """Exit 0 when the chain is intact, else 1, naming each broken line (FILE:LINE: problem)."""
    from sandgate.proxy.telemetry.audit import log_files, verify

    for path in args.files:
        if not path.is_file():  # a directory or a FIFO too: verify would fail or wait
            raise UsageError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    files = args.files
    if len(files) == 1 and len(whole := log_files(files[0])) > 1:
        files = whole  # FILE and its rotated files, one chain
        print(f"sandgate audit verify: {len(files)} files: {', '.join(map(str, files))}")
    result = verify(*files)
    if not result.ok:
        for place in result.breaks[:MAX_BREAKS_SHOWN]:
            print(f"{place.file}:{place.line}: {place.problem}")
        more = len(result.breaks) - MAX_BREAKS_SHOWN
        print(
            f"sandgate audit verify: BROKEN at line {result.line} of {result.file} "
            f"({result.intact_lines} lines before it are intact); "
            f"{len(result.breaks)} broken place(s) in {result.lines} lines"
            + (f" ({more} more not shown)" if more > 0 else "")
        )
        return EXIT_DENIED
    if not result.lines:
        print("sandgate audit verify: ok, but empty: no records")
        return EXIT_OK
    where = (
        "a fresh log (seq 1)"
        if result.starts_fresh
        else (f"seq {result.first_seq}: earlier lines are in older rotated files, or were removed")
    )
    print(
        f"sandgate audit verify: ok: {result.lines} lines, seq {result.first_seq}..{result.last_seq}, "
        f"chain intact; starts at {where}; last hash {result.last_hash}"
    )
    return EXIT_OK
