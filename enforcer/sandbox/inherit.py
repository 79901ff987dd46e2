"""What a task inherits from the process that ran `sandgate run`: its umask and its
resource limits (every RLIMIT_*, soft and hard), as a shell's `umask` and `ulimit`
left them.

They are read when the run starts (`of_this_process`, before an embedded gateway
raises its own descriptor limit), or by a warm runner from its caller (`of_process`:
the kernel's record of that process, not a claim of the caller's, read by the pid of
the caller's pidfd and kept only if it is still there after: zygote.of_peer), and go into the
sandbox's spec; the sandbox init applies them (enforcer/sandbox/init.py): the limits
to itself before anything else, so that the task gets exactly these, never more than
its caller had; the umask to the task alone, right before it starts (the init builds
the sandbox's files with 022, whatever the caller's umask).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

# Every limit the kernel has, once (RLIMIT_OFILE is RLIMIT_NOFILE's other name).
RLIMITS = tuple(sorted({getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")}))


@dataclass(frozen=True)
class Inherited:
    umask: int
    rlimits: tuple[tuple[int, int, int], ...]  # (RLIMIT_* number, soft, hard); -1 is unlimited

    @classmethod
    def of_this_process(cls) -> Inherited:
        mask = os.umask(0)  # the only way to read it in-process; set back at once
        os.umask(mask)
        return cls(mask, tuple((r, *resource.getrlimit(r)) for r in RLIMITS))

    @classmethod
    def of_process(cls, pid: int) -> Inherited:
        """Another process's (prlimit(2) and /proc/PID/status; root may read any);
        OSError if it is gone, ValueError if the kernel has no Umask line (< 4.7)."""
        mask = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
        if mask is None:
            raise ValueError(f"/proc/{pid}/status has no Umask")
        return cls(mask, tuple((r, *resource.prlimit(pid, r)) for r in RLIMITS))

    def apply(self) -> None:
        """Make them this process's own (a warm runner becoming its caller). OSError
        (EPERM) where a hard limit would have to rise and this process may not."""
        for number, soft, hard in self.rlimits:
            resource.setrlimit(number, (soft, hard))
        os.umask(self.umask)

    def to_spec(self) -> dict:
        """The spec's keys `umask` and `rlimits` (enforcer/sandbox/init.py reads them)."""
        return {"umask": self.umask, "rlimits": [list(limit) for limit in self.rlimits]}
