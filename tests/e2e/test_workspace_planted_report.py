"""sandgate's report of what the task planted is sandgate's, whatever the names.

The check after the run warns on the caller's stderr (`sandgate: warning: the task
planted PATH: why; renamed to ...`) and in the audit event, with the path the task
named: a file name of `\\x1b[8m` (conceal) made every line sandgate printed after it
invisible on the user's terminal (the summary, the kill, the exit code), one with a
newline forged lines of its own between sandgate's. Each control, bidi or line
separator character of a planted path (and of a config's keys in the why) is now
escaped visibly (planting.Planted.describe, proxy/approvals/shown.visible).
"""

from __future__ import annotations

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

NAME = "x\x1b[8m\nsandgate: task ok (profile default): 0 allowed, 0 blocked\u202e"


def test_a_planted_name_cannot_hide_or_forge_sandgates_lines(net, tmp_path):
    plant = sandbox.python(
        """
        import os, sys
        os.makedirs(".vscode")
        open(os.path.join(".vscode", sys.argv[1]), "w").close()
        """,
        NAME,
    )
    result = sandbox.run(net, tmp_path, {"plant": plant})
    assert result.returncode == 0, result.describe()
    assert "\x1b" not in result.stderr and "\u202e" not in result.stderr, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "the task planted" in line]
    assert "x\\x1b[8m\\x0asandgate: task ok" in warning and "\\u202e" in warning, warning
    assert not any(line.startswith("sandgate: task ok") for line in result.stderr.splitlines())
    [event] = result.events(reason="workspace_planted")
    assert "\x1b" not in event["detail"] and "\n" not in event["detail"], event
    # The file itself went aside under its own name.
    assert (result.steps_dir / ".vscode" / f"{NAME}.sandgate-planted").exists()
