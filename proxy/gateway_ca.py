"""The gateway CA: the certificate authority inspected TLS is intercepted with, by
the front door (frontdoor/tls_contexts.py) and by mitmproxy alike, and that a task
whose rules inspect is given to trust.

It is made here with cryptography alone, so that a task can be given it without
mitmproxy being imported: mitmproxy starts later, if ever (engine.py), and loads
the same files from confdir, under the names its `CertStore.from_store` reads.

Several makers may race for one confdir (the service's workers, a `sandgate run`
next to them, threads of one process): a lock file serialises them, and the CA
file appears last, whole (a rename), so whoever sees it sees a CA that is complete."""

from __future__ import annotations

import datetime
import fcntl
import os
from pathlib import Path

CA_BASENAME = "mitmproxy"  # mitmproxy's file names in confdir: mitmproxy-ca.pem, ...
CA_EXPIRY = datetime.timedelta(days=10 * 365)  # mitmproxy's certs.CA_EXPIRY


def ca_key_file(confdir: Path) -> Path:
    """The CA's key and certificate (PEM, 0600): what signs the leaves."""
    return confdir / f"{CA_BASENAME}-ca.pem"


def ca_cert_file(confdir: Path) -> Path:
    """The CA's certificate alone (PEM): what the sandboxes trust."""
    return confdir / f"{CA_BASENAME}-ca-cert.pem"


def ensure_ec_ca(confdir: Path) -> bool:
    """Make the gateway's CA with an EC P-256 key, unless confdir has a CA already
    (an older RSA one is kept: sandboxes and admins may trust it). True if made.
    Blocking (a lock, a key generation): call it off the event loop.

    mitmproxy signs every leaf certificate with the CA's key and serves it as the
    leaf's key too (as the front door does), so the key type is what each
    intercepted handshake signs with: ECDSA P-256 takes ~0.05 ms where mitmproxy's
    default RSA-2048 takes ~1 ms, and its certificates are smaller."""
    if ca_key_file(confdir).exists():
        return False  # the common case: no lock, no cryptography import
    confdir.mkdir(parents=True, exist_ok=True)
    lock = os.open(confdir / ".ca.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ca_key_file(confdir).exists():
            return False  # made by whoever held the lock before
        _write_ca(confdir)
    finally:
        os.close(lock)  # closing releases the lock
    return True


def _write_ca(confdir: Path) -> None:
    """mitmproxy's `certs.create_ca` with an EC key, written as its
    `CertStore.create_store` writes the two files sandgate uses."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_BASENAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_BASENAME),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(name)
        .issuer_name(name)
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + CA_EXPIRY)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    ca_cert_file(confdir).write_bytes(pem_cert)
    partial = ca_key_file(confdir).with_suffix(".pem.partial")
    # 0600 from its creation (not a umask: that is the whole process's, threads too).
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # a partial file left by a crash may have been made otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(pem_key + pem_cert)
    partial.rename(ca_key_file(confdir))  # last: a half-written CA is never taken for one
