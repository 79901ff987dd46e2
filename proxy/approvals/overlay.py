"""`always` approvals as rules: appended to approved.yaml next to the (first) rule
file, a normal rule file (`approved: {PROFILE: [rules]}`) that the loader reads with
the rules, `sandgate rules show` lists, and git reviews. One rule per approval, for
exactly what was approved (name, port; method and path for a request ask): never a
wildcard, unless the approver chose one (`--widen '*.example.com'`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
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
    previous = path.read_text(encoding="utf-8") if path.exists() else None
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


def restore(path: Path, previous: str | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        _write(path, previous)


def _write(path: Path, text: str) -> None:
    """Replace `path` by `text`, durably: flushed to disk (fsync) before the rename, so
    a crash leaves the old file or the new one, never an empty one. An OSError (disk
    full, read-only, I/O error; also at fsync) leaves `path` as it was and no
    temporary file behind."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
