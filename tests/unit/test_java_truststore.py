"""java_truststore: the task's PEM bundle as a JKS truststore, read back by a reader
of the format written here from the JDK's (sun.security.provider.JavaKeyStore), and
by keytool when the host has one; the cache; the task's JAVA_TOOL_OPTIONS."""

from __future__ import annotations

import datetime
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sandgate.enforcer import java_truststore
from sandgate.enforcer.sandbox import spec

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def make_ca(name: str) -> str:
    """A self-signed CA certificate, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def read_jks(data: bytes, password: str) -> list[tuple[str, int, str, bytes]]:
    """The entries (alias, date, type, DER) of a JKS file of trusted certificates;
    AssertionError unless its header and digest are the JDK's."""
    body, digest = data[:-20], data[-20:]
    expected = hashlib.sha1(password.encode("utf-16-be") + b"Mighty Aphrodite" + body).digest()
    assert digest == expected, "the digest is not the JDK's"
    magic, version, count = struct.unpack_from(">III", body, 0)
    assert (magic, version) == (0xFEEDFEED, 2)
    at = 12

    def utf() -> str:
        nonlocal at
        (length,) = struct.unpack_from(">H", body, at)
        text = body[at + 2 : at + 2 + length].decode()
        at += 2 + length
        return text

    entries = []
    for _ in range(count):
        (tag,) = struct.unpack_from(">I", body, at)
        assert tag == 2, "not a trusted-certificate entry"
        at += 4
        alias = utf()
        (date,) = struct.unpack_from(">Q", body, at)
        at += 8
        kind = utf()
        (length,) = struct.unpack_from(">I", body, at)
        entries.append((alias, date, kind, body[at + 4 : at + 4 + length]))
        at += 4 + length
    assert at == len(body), "bytes after the last entry"
    return entries


def der_of(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def test_the_store_holds_each_certificate_of_the_bundle_in_order():
    cas = [make_ca("first"), make_ca("second")]
    bundle = "# a comment\n" + "\n".join(cas) + "\ntrailing text\n"
    data = java_truststore.jks_truststore(java_truststore.pem_certificates(bundle))
    entries = read_jks(data, "changeit")
    assert [(alias, date, kind) for alias, date, kind, _ in entries] == [
        ("cert0", 0, "X.509"),
        ("cert1", 0, "X.509"),
    ]
    assert [der for *_, der in entries] == [der_of(pem) for pem in cas]
    with pytest.raises(AssertionError, match="digest"):
        read_jks(data, "another")


def test_the_system_bundle_gives_as_many_entries_as_it_has_certificates():
    if not SYSTEM_BUNDLE.exists():
        pytest.skip("no system CA bundle (Debian: ca-certificates)")
    text = SYSTEM_BUNDLE.read_text()
    ders = java_truststore.pem_certificates(text)
    assert len(ders) == text.count("-----BEGIN CERTIFICATE-----")
    assert [der for *_, der in read_jks(java_truststore.jks_truststore(ders), "changeit")] == ders
    assert all(x509.load_der_x509_certificate(der) for der in ders)


def test_a_block_that_is_not_base64_is_left_out():
    good = make_ca("good")
    broken = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"
    unended = "-----BEGIN CERTIFICATE-----\nMIIB"
    assert java_truststore.pem_certificates(broken + good + unended) == [der_of(good)]


def test_keytool_reads_the_store(tmp_path):
    keytool = shutil.which("keytool")
    if keytool is None:
        pytest.skip("needs keytool (Debian: default-jdk-headless, scripts/install.sh --test)")
    store = tmp_path / "cacerts"
    store.write_bytes(java_truststore.jks_truststore([der_of(make_ca("sandgate gateway CA"))]))
    listed = subprocess.run(
        [keytool, "-list", "-v", "-keystore", str(store), "-storepass", "changeit"],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    assert "Your keystore contains 1 entry" in listed.stdout
    assert "trustedCertEntry" in listed.stdout and "CN=sandgate gateway CA" in listed.stdout


def test_the_cache_makes_the_store_once_per_key_readable_by_the_task(tmp_path):
    cache, fallback = tmp_path / "cache", tmp_path / "run" / "java-cacerts.jks"
    made = []

    def bundle() -> str:
        made.append(1)
        return make_ca("gateway")

    first = java_truststore.cached(cache, "k1", bundle, fallback)
    again = java_truststore.cached(cache, "k1", bundle, fallback)
    assert first == again == cache / "java-cacerts-k1.jks" and len(made) == 1
    assert first.stat().st_mode & 0o777 == 0o644 and cache.stat().st_mode & 0o777 == 0o700
    assert len(read_jks(first.read_bytes(), "changeit")) == 1
    for n in range(2, 8):
        java_truststore.cached(cache, f"k{n}", bundle, fallback)
    assert len(list(cache.glob("java-cacerts-*.jks"))) == java_truststore.KEEP_CACHED


def test_a_cache_file_others_can_write_is_not_used(tmp_path):
    cache, fallback = tmp_path / "cache", tmp_path / "java-cacerts.jks"
    cache.mkdir(mode=0o700)
    planted = cache / "java-cacerts-k.jks"
    planted.write_bytes(b"planted")
    planted.chmod(0o666)
    path = java_truststore.cached(cache, "k", lambda: make_ca("gateway"), fallback)
    assert path == planted and len(read_jks(path.read_bytes(), "changeit")) == 1


def test_an_unwritable_cache_writes_the_store_in_the_run(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    fallback = tmp_path / "java-cacerts.jks"
    path = java_truststore.cached(blocked / "cache", "k", lambda: make_ca("gateway"), fallback)
    assert path == fallback and len(read_jks(fallback.read_bytes(), "changeit")) == 1


def test_the_key_changes_with_the_system_bundle_and_the_extra_certificates(tmp_path):
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text(make_ca("system"))
    key = java_truststore.cache_key(bundle, ["A"])
    assert java_truststore.cache_key(bundle, ["A"]) == key
    assert java_truststore.cache_key(bundle, ["B"]) != key
    assert java_truststore.cache_key(bundle, ["A", ""]) != key
    replaced = tmp_path / "new"
    replaced.write_text(make_ca("system"))
    replaced.replace(bundle)  # update-ca-certificates: a new file
    assert java_truststore.cache_key(bundle, ["A"]) != key
    assert java_truststore.cache_key(tmp_path / "missing", ["A"]) != key


def test_sandbox_setup_names_the_store_where_a_jvm_reads_it(tmp_path, monkeypatch):
    store = tmp_path / "java-cacerts.jks"
    debian = tmp_path / "cacerts"
    debian.write_bytes(b"")
    monkeypatch.setattr(java_truststore, "JAVA_CACERTS", debian)
    bind, env = java_truststore.sandbox_setup(store)
    assert bind == (store, debian)
    assert env == {
        "JAVA_TOOL_OPTIONS": f"-Djavax.net.ssl.trustStore={debian} "
        "-Djavax.net.ssl.trustStoreType=JKS"
    }
    monkeypatch.setattr(java_truststore, "JAVA_CACERTS", tmp_path / "no-java")
    bind, env = java_truststore.sandbox_setup(store)
    assert bind == (store, java_truststore.JAVA_CACERTS_IN_SANDBOX)
    assert str(java_truststore.JAVA_CACERTS_IN_SANDBOX) in env["JAVA_TOOL_OPTIONS"]


@pytest.mark.parametrize(
    ("passed", "expected"),
    [
        pytest.param({}, "-Dours", id="sandgate's alone"),
        pytest.param({"JAVA_TOOL_OPTIONS": "-Xmx1g"}, "-Dours -Xmx1g", id="--env's after it"),
        pytest.param({"JAVA_TOOL_OPTIONS": ""}, "", id="--env's empty wins"),
    ],
)
def test_java_tool_options_given_with_env_are_added_after_sandgates(passed, expected):
    env = spec.task_environment({}, passed, {"JAVA_TOOL_OPTIONS": "-Dours"}, uid=0, home="/root")
    assert env["JAVA_TOOL_OPTIONS"] == expected


def test_java_tool_options_given_with_env_stand_alone_without_a_truststore():
    env = spec.task_environment({}, {"JAVA_TOOL_OPTIONS": "-Xmx1g"}, {}, uid=0, home="/root")
    assert env["JAVA_TOOL_OPTIONS"] == "-Xmx1g"
