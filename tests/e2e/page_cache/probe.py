"""In the sandbox (tests/e2e/test_sandbox_page_cache.py): try to evict a host file's page cache, then tell which page the host read.

argv: HOST_FILE PAGES. Talks to the test through files in the workspace (cwd)."""

import json
import os
import sys
import time

path, pages = sys.argv[1], int(sys.argv[2])


def wait(name):
    deadline = time.monotonic() + 60
    while not os.path.exists(name):
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for " + name)
        time.sleep(0.02)


def publish(name, data):
    with open(name + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(name + ".tmp", name)


fd = os.open(path, os.O_RDONLY)  # read-only: the host is read-only in the sandbox
# 1. Evict: the kernel drops every clean, unmapped page of the file, whoever cached it.
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
publish("evicted", {"ok": True})
wait("host-read")
# 2. Probe: RWF_NOWAIT reads only what is cached (EAGAIN otherwise); RANDOM: no readahead.
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
cached, refused = [], []
buf = bytearray(1)
for page in range(pages):
    try:
        os.preadv(fd, [buf], page * 4096, os.RWF_NOWAIT)
        cached.append(page)
    except BlockingIOError:
        pass
    except OSError as e:  # EOPNOTSUPP: the sandbox's filter
        refused.append(e.errno)
publish("probed", {"cached": cached, "refused": sorted(set(refused))})
