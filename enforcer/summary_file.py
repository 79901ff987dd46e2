"""`--summary-json FILE`: the task summary written for a caller (CI) to read, or one
line saying why it could not be (a full or read-only disk, no such directory); the
run then exits 125, so that a missing or cut-short summary is not taken for a
finished run's."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_summary_json(path: Path, summary: dict, task_exit: int | None) -> bool:
    """Write `summary` to `path`; False (and the reason on stderr) if it failed."""
    try:
        path.write_text(json.dumps(summary, indent=2))
    except OSError as e:
        print(
            f"sandgate: cannot write the summary to {path}: {e.strerror or e} "
            f"(the task exited {task_exit if task_exit is not None else 'without a code'})",
            file=sys.stderr,
        )
        return False
    return True
