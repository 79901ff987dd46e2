"""The task's CA bundle as a Java truststore. A JVM trusts only its own store
(`$JAVA_HOME/lib/security/cacerts`; Debian's is /etc/ssl/certs/java/cacerts), never
the PEM bundle that SSL_CERT_FILE and the system path name, so under inspection
mvn, Gradle and every other JVM client refused the gateway's certificate ("PKIX path
building failed"). `sandgate run` gives the task this store, holding the same
certificates as its PEM bundle, and names it in JAVA_TOOL_OPTIONS.

The store is JKS, written here without Java: every JDK reads it, whatever its default
keystore type (9+: `keystore.type.compat`). Not PKCS12 as the `cryptography` package
writes it: that lacks Java's trusted-certificate attribute, and Java ignores those
certificates. Making one costs ~4 ms (150 certificates), so it is kept in the state
cache, once per system bundle and extra certificates (`cached`)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from sandgate.enforcer import private_cache

JKS_MAGIC = 0xFEEDFEED
JKS_VERSION = 2
TRUSTED_CERT_TAG = 2
# keytool's and the JDK's default password; a JVM given a truststore with no password
# (javax.net.ssl.trustStorePassword unset) reads it without checking the digest.
PASSWORD = "changeit"
# The JKS digest's salt, in the JDK's sun.security.provider.JavaKeyStore.
DIGEST_SALT = b"Mighty Aphrodite"
PEM_BEGIN, PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
CACHE_PATTERN = "java-cacerts-*.jks"
# Where a JVM in the sandbox finds the store: over Debian's, which its JDKs read with
# no option at all, else at a path in the sandbox's own /run.
JAVA_CACERTS = Path("/etc/ssl/certs/java/cacerts")
JAVA_CACERTS_IN_SANDBOX = Path("/run/sandgate-java/cacerts")
KEEP_CACHED = 4  # a new one follows each update of the system bundle or of --extra-ca


def pem_certificates(text: str) -> list[bytes]:
    """The DER of each `CERTIFICATE` block of a PEM text, in order; a block that is
    not base64 is left out (the system bundle and --extra-ca, checked when read, have none)."""
    ders = []
    start = text.find(PEM_BEGIN)
    while start >= 0:
        end = text.find(PEM_END, start)
        if end < 0:
            break
        with contextlib.suppress(binascii.Error):
            # Not validated: the line breaks between are skipped.
            ders.append(base64.b64decode(text[start + len(PEM_BEGIN) : end]))
        start = text.find(PEM_BEGIN, end)
    return ders


def _java_utf(text: str) -> bytes:
    """DataOutputStream.writeUTF for ASCII (the aliases and type named here)."""
    data = text.encode("ascii")
    return struct.pack(">H", len(data)) + data


def jks_truststore(certificates: list[bytes], password: str = PASSWORD) -> bytes:
    """A JKS keystore of trusted-certificate entries, one per DER certificate, aliased
    `cert<index>`, dated 1970 (the same bytes for the same certificates). The layout
    (sun.security.provider.JavaKeyStore): magic, version 2, the entry count; each
    entry a tag, its alias, its date in milliseconds, the type "X.509" and the
    certificate's length and DER; then SHA-1 over the password (UTF-16BE), the salt
    and all that precedes."""
    parts = [struct.pack(">III", JKS_MAGIC, JKS_VERSION, len(certificates))]
    for index, der in enumerate(certificates):
        parts += [
            struct.pack(">I", TRUSTED_CERT_TAG),
            _java_utf(f"cert{index}"),
            struct.pack(">Q", 0),
            _java_utf("X.509"),
            struct.pack(">I", len(der)),
            der,
        ]
    body = b"".join(parts)
    return body + hashlib.sha1(password.encode("utf-16-be") + DIGEST_SALT + body).digest()


def cache_key(system_bundle: Path, extra: list[str]) -> str:
    """Names the store of `system_bundle` plus the `extra` PEM texts: by the bundle's
    identity (device, inode, size, mtime), not its bytes, which would cost more to hash
    than the rest of a run's CA setup; update-ca-certificates writes a new file."""
    try:
        info = system_bundle.stat()
        identity = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        identity = "none"
    digest = hashlib.sha256(identity.encode())
    for text in extra:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()[:24]


def cached(cache_dir: Path, key: str, bundle_text: Callable[[], str], fallback: Path) -> Path:
    """The truststore of `bundle_text()` (the PEM bundle the task gets): the cache's
    file for `key` when there is one that only this user can write, else made now and
    kept there. Readable by all (the task's uid reads it through its bind); in a
    directory only this user can enter. A cache that cannot be written costs time:
    the store is then written at `fallback` (the run's own directory)."""
    path = cache_dir / f"java-cacerts-{key}.jks"
    with contextlib.suppress(OSError):
        if private_cache.owned_by_me_and_private(cache_dir.stat()):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and private_cache.owned_by_me_and_private(info):
                return path
    data = jks_truststore(pem_certificates(bundle_text()))
    if _write_public(path, data):
        private_cache.keep_newest(cache_dir, CACHE_PATTERN, KEEP_CACHED)
        return path
    fallback.write_bytes(data)
    return fallback


def _write_public(path: Path, data: bytes) -> bool:
    """`data` as the file at `path` (mode 0644), whole or not at all, in a directory
    made private (0700) if missing; False if it could not be."""
    directory = path.parent
    temporary = directory / f".{path.name}.{os.getpid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not private_cache.owned_by_me_and_private(directory.stat()):
            return False
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)  # whatever the umask
        os.replace(temporary, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return False


def sandbox_setup(store: Path) -> tuple[tuple[Path, Path], dict[str, str]]:
    """The bind of the task's truststore `store` and the variable that names it:
    JAVA_TOOL_OPTIONS, which every JVM reads (one given with --env is added after it,
    spec.task_environment). The type is said, so a JVM whose default is another reads it."""
    target = JAVA_CACERTS.resolve() if JAVA_CACERTS.exists() else JAVA_CACERTS_IN_SANDBOX
    options = f"-Djavax.net.ssl.trustStore={target} -Djavax.net.ssl.trustStoreType=JKS"
    return (store, target), {"JAVA_TOOL_OPTIONS": options}
