"""Which process a pid in a state file meant: the pid and the process's start time.

State files outlive their writers (a SIGKILLed run, a crashed service), and the
kernel gives a dead process's pid to the next one that needs it. `os.kill(pid, 0)`
then answers for that unrelated process: `sandgate gc` would keep a dead run's
leftovers for as long as it lives, a restarted service would re-adopt a dead
runner's sandbox and, stopping, SIGKILL whoever has the pid now. So an owner is
recorded as its pid and its start time (clock ticks since boot, field 22 of
/proc/PID/stat: unlike a wall-clock time, no clock step moves it), and a pid
counts as that owner only while both match. A zombie is dead: it has ended, only
its parent has not read its status yet.
"""

from __future__ import annotations


def start_time(pid: int) -> int | None:
    """The start time of live process `pid` (clock ticks since boot), None if there
    is none (or only its zombie)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return None if fields[0] == b"Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int | None) -> bool:
    """Whether `pid` still names the process that started at `start`; without a
    recorded start (a state file of an older sandgate), whether any process has it."""
    now = start_time(pid)
    return now is not None and (start is None or now == start)


def stamp(pid: int) -> str:
    """`PID START` for a pid file, `PID` alone if the process is already gone."""
    start = start_time(pid)
    return str(pid) if start is None else f"{pid} {start}"


def read_stamp(text: str) -> tuple[int, int | None]:
    """(pid, start) of a pid file's text (`PID START`, or `PID` from an older
    sandgate); ValueError when it is neither (half written, or someone else's)."""
    parts = text.split()
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a pid stamp: {text[:40]!r}")
    return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)
