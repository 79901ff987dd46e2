"""Named admin keys: who decides through the approvals page and API, by name.

A key is a bearer token for the API and a login for the page; the approver recorded
is `NAME (api key)` or `NAME (web)`. The token generated at each start (the
`admin-token` file) is the key named `admin`; the others live in a keys file,
root-only (0600) next to it (`STATE_DIR/admin-keys`, `--admin-keys FILE`), one key
a line:

    # comments and blank lines are ignored
    alice sha256:9f86d08...        written by `sandgate approvals keys add alice`
    chatbot s3cr3t-token-of-24+-characters   a token written by hand

`keys add` stores only the token's SHA-256 (the token is printed once), so the file
does not hold usable secrets. Tokens are compared in constant time against every
key. The gateway re-reads the file whenever it changes (`KeyFile`), so a revoked
key is refused at the very next request, its page sessions too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

log = logging.getLogger("sandgate.admin")

DEFAULT_KEYS = Path(os.environ.get("SANDGATE_STATE_DIR") or "/var/lib/sandgate") / "admin-keys"
ADMIN = "admin"  # the generated token's name: reserved in the file
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_TOKEN = 24  # characters of a hand-written token
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")

HEADER = (
    "# sandgate admin keys: NAME sha256:HEX (or NAME TOKEN), one a line; root-only.\n"
    "# Managed with: sandgate approvals keys add NAME | list | revoke NAME\n"
)


class KeyFileError(ValueError):
    """A keys file that cannot be used, or a key that cannot be added: one line."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise KeyFileError(
            f"key name {name[:70]!r}: letters, digits and . _ @ - (up to 64, starting "
            "with a letter or digit)"
        )
    if name == ADMIN:
        raise KeyFileError(f"the key name {ADMIN!r} is the generated admin token's")
    return name


def parse_keys(text: str, source: str) -> dict[str, str]:
    """name -> the token's SHA-256 (hex), in file order. KeyFileError `SOURCE:LINE: ...`."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise KeyFileError("expected NAME TOKEN (or NAME sha256:HEX)")
            name, value = check_name(parts[0]), parts[1]
            if name in keys:
                raise KeyFileError(f"key {name!r} appears twice")
            stored = _DIGEST.fullmatch(value)
            if stored is None and len(value) < MIN_TOKEN:
                raise KeyFileError(f"key {name!r}: a token needs at least {MIN_TOKEN} characters")
        except KeyFileError as e:
            raise KeyFileError(f"{source}:{number}: {e}") from None
        keys[name] = stored[1] if stored else digest(value)
    return keys


def format_keys(keys: dict[str, str]) -> str:
    return HEADER + "".join(f"{name} sha256:{hexdigest}\n" for name, hexdigest in keys.items())


def find(keys: dict[str, str], token: str) -> str | None:
    """The name of the key whose token `token` is, or None. Every key is compared
    (in constant time), so the answer's timing says nothing about which matched."""
    given = digest(token)
    found = None
    for name, known in keys.items():
        if hmac.compare_digest(given, known):
            found = name
    return found


def read_keys(path: Path) -> dict[str, str]:
    """The keys in `path` ({} if it does not exist). KeyFileError if it is malformed,
    or writable by anyone but its owner, or owned by another user than this one (who
    could then add keys)."""
    try:
        # O_NONBLOCK: a FIFO in its place would block the open (and the gateway's start).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise KeyFileError(f"{path}: not a regular file")
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        if st.st_mode & 0o022 or st.st_uid != os.geteuid():
            raise KeyFileError(
                f"{path}: must be owned by uid {os.geteuid()} and writable by it only (chmod 600)"
            )
        return parse_keys(f.read(), str(path))


def write_keys(path: Path, keys: dict[str, str]) -> None:
    """Atomically, root-only (0600) from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(format_keys(keys))
    os.replace(temporary, path)


class KeyFile:
    """The keys file as the gateway sees it: `keys()` re-reads it whenever it changed
    (inode, size, times), so a key added or revoked counts at the next request. A
    file that cannot be used gives no named keys (fail closed) and one warning."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple | None = None
        self._keys: dict[str, str] = {}

    def keys(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)
        except OSError:
            seen = None
        if seen != self._seen:
            self._seen = seen
            try:
                self._keys = read_keys(self.path) if seen is not None else {}
            except KeyFileError as e:
                log.warning("no named admin keys: %s", e)
                self._keys = {}
        return self._keys
