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

One limit is lowered (`core_limited`): on a host whose kernel.core_pattern pipes a
crash's core to a helper (`|/usr/lib/systemd/systemd-coredump ...`, apport) or sends it
to a socket's server (`@`, Linux 6.16), a crashing task would have that helper run as
root in the host's namespaces on bytes the task chose, and store its core outside the
disk reserve (apport reads the whole core whatever the limit: its memory limit's
worth, into the host's memory). The kernel runs no helper for a process whose
RLIMIT_CORE is exactly 1 (fs/coredump.c: its guard against a helper's own crash), so
the task gets 1, soft and hard, and the seccomp filter makes its setrlimit/prlimit64
of RLIMIT_CORE succeed without effect (seccomp.py: 0 would start the helper again).
With a core_pattern of a plain file (`core`), the limits stay the caller's (a core
lands in the task's own cwd), fixed the same way.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

CORE_PATTERN = "/proc/sys/kernel/core_pattern"
CORE_HELPER_PREFIXES = ("|", "@")  # a pipe to a helper program; a socket (Linux 6.16)
CORE_NO_HELPER = 1  # the RLIMIT_CORE for which the kernel starts no helper

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
        rlimits = core_limited(self.rlimits, core_pattern())
        return {"umask": self.umask, "rlimits": [list(limit) for limit in rlimits]}


def core_pattern() -> str | None:
    """The host's kernel.core_pattern; None when it cannot be read."""
    try:
        with open(CORE_PATTERN) as f:
            return f.read().strip()
    except OSError:
        return None


def core_limited(
    rlimits: tuple[tuple[int, int, int], ...], pattern: str | None
) -> tuple[tuple[int, int, int], ...]:
    """`rlimits` with RLIMIT_CORE CORE_NO_HELPER (soft and hard) when `pattern` hands
    cores to a helper, or cannot be read (None: taken as one)."""
    if pattern is not None and not pattern.startswith(CORE_HELPER_PREFIXES):
        return rlimits
    core = (CORE_NO_HELPER, CORE_NO_HELPER)
    return tuple(
        (number, *(core if number == resource.RLIMIT_CORE else (soft, hard)))
        for number, soft, hard in rlimits
    )
