"""The descriptor reserve (proxy/descriptors.py), in a child process with a low
RLIMIT_NOFILE, so that running out of descriptors touches nothing else."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import os, resource
    from sandgate.proxy.descriptors import DescriptorReserve
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    reserve = DescriptorReserve(count=8)
    assert reserve.hold() is None
    taken = []
    try:
        while True:
            taken.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    reserve.exhausted("test")
    decision = reserve.hold()
    print(decision.reason, decision.rule.id)
    # released: the audit log and control socket get the reserve's eight
    extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
    print(reserve.hold() is not None)  # still none to spare: refused
    for fd in extra + taken[:20]:
        os.close(fd)
    print(reserve.hold() is None)  # room again: the reserve is taken back whole
    print(len(reserve._fds))
    """
)


def test_out_of_descriptors_the_reserve_is_released_and_new_connections_refused_until_room():
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [
        "descriptors_exhausted builtin:descriptors-exhausted",
        "True",
        "True",
        "8",
    ], result.stdout
