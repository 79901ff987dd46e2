"""Files that sandgate keeps to skip work at a later start, and then trusts: the
task's seccomp program (sandbox/seccomp.py), the compiled dataclass methods
(dataclass_cache.py), the compiled policy (policy_cache.py), a workspace's last walk
(sandbox/planting.py). Those kept per key (a set of rule files, a workspace) are
bounded by `keep_newest`, so that a host whose runs each name other files does not
fill its state directory. A file is read only when it and its directory belong to
this user and nobody else can write them, and is written whole or not at all (a
temporary file renamed over it). Best effort both ways: a cache that cannot be read
or written costs time, never safety."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat


def owned_by_me_and_private(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def read(path: str) -> bytes | None:
    """The file's bytes, or None: missing, unreadable, or not private to this user."""
    try:
        if not owned_by_me_and_private(os.stat(os.path.dirname(path))):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as cached:
        info = os.fstat(cached.fileno())
        if not stat.S_ISREG(info.st_mode) or not owned_by_me_and_private(info):
            return None
        return cached.read()


def write(path: str, data: bytes) -> None:
    """`data` as the file at `path`, in a directory made private (0700) if missing."""
    directory, name = os.path.split(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not owned_by_me_and_private(os.stat(directory)):
            return
        temporary = os.path.join(directory, f".{name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as cached:
            cached.write(data)
        os.replace(temporary, path)
    except OSError:  # a full disk: no half-written file left behind
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def keep_newest(directory: str | os.PathLike, pattern: str, count: int) -> None:
    """Remove all but the `count` newest (by mtime) files matching `pattern` in
    `directory`. Best effort, as the rest: a file it cannot remove stays."""
    with contextlib.suppress(OSError):
        files = []
        for entry in os.scandir(directory):
            if fnmatch.fnmatchcase(entry.name, pattern):
                with contextlib.suppress(OSError):
                    files.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
        for _, old in sorted(files)[: max(len(files) - count, 0)]:
            with contextlib.suppress(OSError):
                os.unlink(old)
