"""Bad input and bad environments for `sandgate gateway` and `sandgate run`, found by
probing (h-pcli2): each is one clear line and an exit code, never a traceback, and
nothing the operator owns is touched.

Found and closed here: --extra-ca took an empty file, garbage or a private key (which
would be copied into every sandbox); --dns-upstream took any word (every query of every
task then failed); `--control` on an existing regular file deleted it (connect() to a
non-socket is refused, which read as a stale socket); a state or run directory that
is a file or read-only was a traceback (`run`) or a bare `[Errno N]` (`gateway`)."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sandgate.enforcer.cli import main
from sandgate.enforcer.cli.common import UsageError, check_dns_upstream, read_extra_cas
from sandgate.enforcer.run import RunError, make_dir
from sandgate.enforcer.service import _refuse_if_served


def _key_and_cert() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pcli2 test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


KEY_PEM, CERT_PEM = _key_and_cert()


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(b"", "no PEM certificate in it", id="empty"),
        pytest.param(b"not a certificate\n", "no PEM certificate in it", id="garbage"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "no PEM certificate in it",
            id="garbled-pem",
        ),
        pytest.param(KEY_PEM, "holds a private key", id="a-key"),
        pytest.param(CERT_PEM + KEY_PEM, "holds a private key", id="cert-and-key"),
    ],
)
def test_extra_ca_must_be_certificates_only(tmp_path, content, message):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    with pytest.raises(UsageError, match=message) as raised:
        read_extra_cas([ca])
    assert str(ca) in str(raised.value) and "\n" not in str(raised.value)
    assert b"PRIVATE" not in str(raised.value).encode()  # the key's text is not echoed


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_extra_ca_that_is_no_regular_file_is_refused_without_blocking(tmp_path, kind):
    ca = tmp_path / "ca.pem"
    ca.mkdir() if kind == "directory" else os.mkfifo(ca)  # a FIFO's open would wait
    with pytest.raises(UsageError, match=f"--extra-ca {ca}: "):
        read_extra_cas([ca])


def test_extra_ca_of_certificates_is_taken(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CERT_PEM + CERT_PEM)
    assert read_extra_cas([ca]) == [(CERT_PEM + CERT_PEM).decode()]


@pytest.mark.parametrize("upstream", ["garbage", "999.1.1.1", "1.1.1.1:53", "dns.google", ""])
def test_dns_upstream_must_be_an_ip(upstream):
    with pytest.raises(UsageError, match="not an IP address"):
        check_dns_upstream(upstream)


@pytest.mark.parametrize("upstream", ["192.0.2.53", "2001:db8::53"])
def test_dns_upstream_ip_is_taken(upstream):
    check_dns_upstream(upstream)


@pytest.mark.parametrize(
    "command, argv, message",
    [
        pytest.param(
            "gateway", ["--dns-upstream", "garbage"], "--dns-upstream 'garbage'", id="g-dns"
        ),
        pytest.param(
            "run", ["--dns-upstream", "1.2.3.4:53"], "--dns-upstream '1.2.3.4:53'", id="r-dns"
        ),
        pytest.param("gateway", ["--extra-ca", "KEY"], "holds a private key", id="g-key-as-ca"),
        pytest.param("gateway", ["--extra-ca", "EMPTY"], "no PEM certificate", id="g-empty-ca"),
    ],
)
def test_cli_refuses_bad_gateway_input_with_one_line(tmp_path, capsys, command, argv, message):
    """Refused before anything is set up (no root, namespace or nft needed): exit 2."""
    (tmp_path / "KEY").write_bytes(KEY_PEM)
    (tmp_path / "EMPTY").write_bytes(b"")
    argv = [str(tmp_path / a) if a in ("KEY", "EMPTY") else a for a in argv]
    tail = ["--", "true"] if command == "run" else ["--control", str(tmp_path / "c.sock")]
    assert main([command, "--metrics-listen", "off", "--admin-listen", "off", *argv, *tail]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_control_on_a_regular_file_is_refused_and_the_file_kept(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    with pytest.raises(RunError, match="exists and is not a socket"):
        _refuse_if_served(precious)
    assert precious.read_text() == "keep me\n"


def test_control_stale_socket_is_removed_live_one_refused(tmp_path):
    path = tmp_path / "c.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(RunError, match="another gateway service is running"):
            _refuse_if_served(path)
        assert path.is_socket()
    finally:
        live.close()
    _refuse_if_served(path)  # closed: nobody answers, a stale socket
    assert not path.exists()


@pytest.mark.parametrize("layout", ["file-in-place", "under-a-file"])
def test_make_dir_names_the_directory_and_its_variable(tmp_path, layout):
    blocker = tmp_path / "state"
    blocker.write_text("")
    target = blocker if layout == "file-in-place" else blocker / "run"
    with pytest.raises(RunError) as raised:
        make_dir(target, "SANDGATE_STATE_DIR")
    text = str(raised.value)
    assert text.startswith(f"cannot make the directory {target} (SANDGATE_STATE_DIR): ")
    assert "[Errno" not in text and "\n" not in text
    assert blocker.is_file()


@pytest.mark.parametrize(
    "options, message",
    [("ro", "Read-only file system"), ("nr_inodes=1", "No space left on device")],
    ids=["read-only", "full"],
)
def test_make_dir_on_a_full_or_read_only_file_system(tmp_path, options, message):
    """A small tmpfs of the test's own (no inode left: full), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    assert os.system(f"mount -t tmpfs -o {options},size=64k pcli2-test {mount}") == 0
    try:
        with pytest.raises(RunError, match=message) as raised:
            make_dir(mount / "run", "SANDGATE_RUN_DIR")
        assert "SANDGATE_RUN_DIR" in str(raised.value)
        assert not (mount / "run").exists()
    finally:
        assert os.system(f"umount {mount}") == 0
