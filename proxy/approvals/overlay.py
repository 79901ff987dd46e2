"""`always` approvals as rules: appended to approved.yaml next to the (first) rule
file, a normal rule file (`approved: {PROFILE: [rules]}`) that the loader reads with
the rules, `sandgate rules show` lists, and git reviews. One rule per approval, for
exactly what was approved (name, port; method and path for a request ask): never a
wildcard, unless the approver chose one (`--widen '*.example.com'`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

import yaml
from sandgate.proxy.approvals.pending import Pending
from sandgate.proxy.policy.load import parse_expires
from sandgate.proxy.policy.model import parse_duration

# A duration, not a date: digits and a unit (parse_duration says what is valid).
_DURATION_LIKE = re.compile(r"[0-9]+[a-z]+")

HEADER = (
    "# Rules a human approved 'always' (sandgate approvals approve ID --always).\n"
    "# Written by sandgate; loaded with the rules next to it. Review it like any rule file.\n"
)


def rule_expiry(text: str, now: datetime.datetime) -> str:
    """What an `always` approval's `--expires` writes as the rule's `expires:`: a date
    (the last day the rule applies) or an instant with its zone (ISO 8601); a duration
    (`30d`, `12h`) from `now` (aware), as a UTC instant. ValueError, one line, for
    anything else or a time already past."""
    text = text.strip()
    if _DURATION_LIKE.fullmatch(text):
        try:
            seconds = parse_duration(text)
            ends = now.astimezone(datetime.UTC) + datetime.timedelta(seconds=seconds)
        except ValueError as e:
            raise ValueError(f"expires: {e}") from None
        except OverflowError:
            raise ValueError(f"expires {text[:40]} is too far off") from None
        if seconds <= 0:
            raise ValueError(f"expires {text} is no time at all")
        return ends.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        written, ends_at = parse_expires(text)
    except ValueError as e:
        raise ValueError(f"{e}; or a time from now (30d, 12h)") from None
    if ends_at <= now.timestamp():
        raise ValueError(f"expires {text[:40]} has already passed")
    return written.isoformat()


def approved_rule(found: Pending, approver: str, today: datetime.date, expires: str | None) -> dict:
    key = found.key
    rule: dict = {"allow": found.widened or key.name, "ports": [key.port]}
    if key.method is not None:
        rule["methods"] = [key.method]
    if key.path is not None:
        rule["paths"] = [key.path]
    rule["id"] = f"approved:{found.id}"
    rule["owner"] = approver
    if found.ticket:
        rule["ticket"] = found.ticket
    if expires:
        rule["expires"] = expires
    rule["comment"] = (
        f"approved {today.isoformat()} from approval {found.id} "
        f"(task {key.task_id}, asked by rule {found.rule_id or '?'})"
    )
    return rule


def append_approved(
    path: Path, found: Pending, approver: str, *, expires: str | None = None
) -> str | None:
    """Append the rule for `found` to the overlay file `path` (created if missing),
    atomically; returns the file's previous text (None: it did not exist), so that a
    caller whose reload then fails can put it back with `restore`."""
    previous = _read(path)
    data = yaml.safe_load(previous) if previous else None
    if not isinstance(data, dict):
        data = {"version": 1}
    sections = data.setdefault("approved", {}) or {}
    data["approved"] = sections
    rules = sections.setdefault(found.key.profile, []) or []
    sections[found.key.profile] = rules
    rules.append(approved_rule(found, approver, datetime.date.today(), expires))
    _write(path, HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=False))
    return previous


def _read(path: Path) -> str | None:
    """`path`'s text, None if there is none. Never through a link (ELOOP: an OSError
    the caller reports): a link planted as approved.yaml would have root copy the
    file it points to into the rules' directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read().decode("utf-8")


def restore(path: Path, previous: str | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        _write(path, previous)


def _write(path: Path, text: str) -> None:
    """Replace `path` by `text`, durably: flushed to disk (fsync) before the rename, so
    a crash leaves the old file or the new one, never an empty one. An OSError (disk
    full, read-only, I/O error; also at fsync) leaves `path` as it was and no
    temporary file behind.

    The temporary file has a random name, created new (O_CREAT|O_EXCL|O_NOFOLLOW,
    `tempfile.mkstemp`) in `path`'s directory: whoever may write the rules' directory
    (a deploy user's checkout) cannot plant a link under a name we are about to open,
    which would have root write (or truncate) the file it points to."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # a rule file, readable as the rules are
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        with contextlib.suppress(OSError):  # the rename itself, durably
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
