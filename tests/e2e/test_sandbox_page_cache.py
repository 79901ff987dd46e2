"""A task neither evicts a host file's page cache nor probes it (red team kernel, finding 2).

The host is read-only in the sandbox, but two calls on a read-only descriptor acted on
the host's page cache, which is one for everybody:
- posix_fadvise(POSIX_FADV_DONTNEED) dropped every clean, unmapped cached page of any
  file the task may open, whoever read it (the host, the gateway, other tasks): 256 of
  256 pages of a root-owned 0644 host file, whose next reads then went to the disk;
- preadv2(RWF_NOWAIT) answered EAGAIN for a page not cached, without reading it, so
  after an eviction the task learned exactly which page of a host file the host read
  since: the page-cache attack of Gruss et al. (2019), for which the kernel only
  closed mincore and cachestat.
Now the seccomp filter makes fadvise64 with DONTNEED or NOREUSE succeed without doing
anything, and refuses preadv2/pwritev2 with RWF_NOWAIT (EOPNOTSUPP, which callers take
as "not supported here" and read the usual way). tests/unit/test_seccomp.py has the
variants (junk above 32 bits, pwritev2, the advice and flags that stay allowed).

The test's file is root's (0644) outside the sandbox's fresh mounts; the host reads
one page of it while the task watches.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e

PROBE = (Path(__file__).parent / "page_cache" / "probe.py").read_text()
PAGES = 256


def _cached_pages(path: Path) -> int:
    """The host's count of cached pages of `path` (util-linux fincore: mincore)."""
    out = subprocess.run(
        ["fincore", "--noheadings", "--raw", "--output", "PAGES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def _wait_for(path: Path, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return False


def test_a_task_neither_evicts_a_host_files_cache_nor_sees_which_page_the_host_read(
    fakenet, tmp_path
):
    # Outside every fresh mount of the sandbox (/tmp, /var/tmp, /run, /root are its own).
    directory = Path("/srv") / f"rt-kernel-{os.getpid()}-{secrets.token_hex(3)}"
    directory.mkdir(mode=0o755)
    host_file = directory / "table.bin"
    try:
        host_file.write_bytes(os.urandom(PAGES * 4096))
        host_file.chmod(0o644)
        with open(host_file, "rb") as f:
            os.fsync(f.fileno())
            f.read()  # all of it cached, as a file the host uses often
        assert _cached_pages(host_file) == PAGES
        secret_page = 17 + secrets.randbelow(PAGES - 34)

        started = sandbox.start(
            fakenet,
            tmp_path,
            f"/usr/bin/python3 -c {shlex.quote(PROBE)} {host_file} {PAGES}",
        )
        workspace = started.workdir / "steps"
        try:
            assert _wait_for(workspace / "evicted"), started.finish(timeout=5).describe()
            left_after_eviction = _cached_pages(host_file)
            # The host reads one page (a lookup), without readahead.
            fd = os.open(host_file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                os.pread(fd, 64, secret_page * 4096)
            finally:
                os.close(fd)
            (workspace / "host-read").touch()
            assert _wait_for(workspace / "probed"), started.finish(timeout=5).describe()
            probed = json.loads((workspace / "probed").read_text())
        finally:
            (workspace / "host-read").touch()
            result = started.finish()
        assert result.returncode == 0, result.describe()
        print(
            f"cached before {PAGES}, after the task's eviction {left_after_eviction}; "
            f"host read page {secret_page}; the task saw {probed['cached']}"
        )
        problems = []
        if left_after_eviction < PAGES // 2:
            problems.append(
                f"the task dropped {PAGES - left_after_eviction} of {PAGES} cached pages of a "
                "root-owned host file (posix_fadvise DONTNEED on a read-only descriptor)"
            )
        if probed["refused"] != [errno.EOPNOTSUPP]:
            problems.append(f"preadv2 RWF_NOWAIT was not refused: {probed['refused']}")
        if secret_page in probed["cached"] and len(probed["cached"]) <= 4:
            problems.append(
                f"the task learned which page the host read: {probed['cached']} "
                f"(the host read page {secret_page}; preadv2 RWF_NOWAIT)"
            )
        assert not problems, "; ".join(problems)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
