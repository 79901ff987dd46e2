"""What is wrong with rule files: each problem at its file, line and column, and the
error a load raises with all of them. Its own module so that a caller that only
catches the error (`sandgate run` given a kept policy: enforcer/policy_cache.py)
does not load the rule compiler and PyYAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sandgate.proxy.approvals.shown import WHOLE_CHARS, visible


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        # Escaped (control, bidi and line-separator characters as \x1b, \u202e): a
        # path or value from a rule file reaches logs, the audit log and terminals,
        # and a newline in an include's name forged a line of the service's log.
        return visible(f"{self.file}:{self.line}:{self.column}: {self.message}", WHOLE_CHARS)


class PolicyError(Exception):
    """One or more problems in the rule files; the running policy (if any) stays.
    `paths`: every file the failed load tried to read (a reloader watches them too,
    so that fixing a newly included file is noticed)."""

    def __init__(self, problems: list[Problem], paths: tuple[Path, ...] = ()):
        self.problems = sorted(problems)
        self.paths = paths
        super().__init__("\n".join(map(str, self.problems)))
