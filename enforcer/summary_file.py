"""`--summary-json FILE`: the task summary written for a caller (CI) to read, or one
line saying why it could not be (a full or read-only disk, no such directory); the
run then exits 125, so that a missing or cut-short summary is not taken for a
finished run's.

The file is opened (made, if missing) before the task runs and written through that
descriptor at the end: a path that cannot be written refuses the run before it
starts, and a task that used up its file system's inodes (as far as the disk reserve
let it) cannot take the one the summary needs. An existing file is left as it was
until the end (an earlier run's summary is not this run's: exit 125 says which)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from sandgate.proxy.file_systems import kernel_interface


class SummaryFileError(Exception):
    """The summary file cannot be opened: one line for the admin, nothing ran."""


class SummaryFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            # 0644 whatever the umask (a CI's may be 0): a local user who could write it
            # would change the exit code and the planted paths the caller reads.
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o022:
                os.fchmod(self._fd, stat.S_IMODE(st.st_mode) & ~0o022)
        except OSError as e:
            raise SummaryFileError(
                f"cannot write the summary to {path}: {e.strerror or e} (nothing ran)"
            ) from None
        if (kind := kernel_interface(self._fd)) is not None:
            self.close()
            raise SummaryFileError(
                f"cannot write the summary to {path}: it is on {kind}, the kernel's "
                "settings, not a file (nothing ran)"
            )

    def write(self, summary: dict, task_exit: int | None) -> bool:
        """Write `summary` in place of what the file held; False (and the reason on
        stderr) if it failed. Closes the file."""
        data = json.dumps(summary, indent=2).encode()
        try:
            if stat.S_ISREG(os.fstat(self._fd).st_mode):  # (not /dev/full, a pipe)
                os.ftruncate(self._fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            print(
                f"sandgate: cannot write the summary to {self.path}: {e.strerror or e} "
                f"(the task exited {task_exit if task_exit is not None else 'without a code'})",
                file=sys.stderr,
            )
            return False
        finally:
            self.close()
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
