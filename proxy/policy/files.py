"""Where the shipped rule files are: package data (sandgate.rules), the same place in a
checkout, an editable install and a wheel; and how a rule file is found and read.
Its own module so that a command that only needs the default path (`sandgate run
--gateway`), or a kept policy's check against its files (enforcer/policy_cache.py),
does not load the rule compiler and PyYAML."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

# find_spec, not importlib.resources.files: the same directory for an installed package,
# without importing importlib.resources (~10 ms of a warm attach).
SHIPPED_RULES_DIR = Path(find_spec("sandgate.rules").submodule_search_locations[0]).resolve()
RULES_DIR = Path(os.environ.get("SANDGATE_RULES_DIR", SHIPPED_RULES_DIR))
PRESETS_DIR = RULES_DIR / "presets"
DEFAULT_RULES = RULES_DIR / "default.yaml"


def display_path(path: Path) -> str:
    """Paths as an admin would type them: relative to the working directory if below it.
    The only part of a compiled policy that depends on the working directory (its
    `files`; a rule's identity is relative to the rules root)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve(path: Path) -> Path:
    """`path` made absolute, its symlinks resolved where they can be: a symlink loop
    stays as given, and reading it reports the loop (Path.resolve raises RuntimeError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def anyone_may_read(path: Path) -> str | None:
    """Why not every user may read `path` (None: they may): a directory on its way
    they may not search, or the file itself not readable by others."""
    if not os.stat(path).st_mode & stat.S_IROTH:
        return f"not readable by others (mode {stat.S_IMODE(os.stat(path).st_mode):04o})"
    for directory in path.parents:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return f"{directory} is not searchable by others"
    return None


def only_root_writes(path: Path) -> bool:
    """Whether only root may change the file at `path` (root's, not writable by its
    group or others)."""
    st = os.stat(path)
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


# Rule files, --env-file, --extra-ca: 200,000 rules are ~10 MB. A larger file is a
# mistake, and was read whole into memory before it was refused.
MAX_FILE_BYTES = 64 << 20


def read_regular_file(path: Path, opened: Callable[[int], None] | None = None) -> bytes:
    """The bytes of a regular file. A FIFO or a device would block or never end: it
    is refused after opening without blocking, checked on the opened file (no race).
    `opened(fd)`: a check of the opened file of the caller's own, before anything
    is read (it raises to refuse)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if opened is not None:
            opened(fd)
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory")
        if not stat.S_ISREG(mode):
            raise OSError(0, "not a regular file")
        data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES >> 20} MiB")
        return data


def input_now(path: Path) -> str | None:
    """What a rule compiler would find at `path` now, as `CompiledPolicy.inputs` records
    what it found: "-> REAL" for a name that leads to another file (a symlink),
    "sha256:HEX" of a file's bytes, None where there is no file. A file it could not
    read is named so that it equals nothing recorded."""
    real = resolve(path)
    if real != path:
        return f"-> {real}"
    try:
        return content_input(read_regular_file(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable: {e.errno}"


def content_input(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
