"""The gateway CA that mitmproxy signs intercepted certificates with: EC P-256, made
once, an existing CA kept."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from mitmproxy.certs import CertStore
from sandgate.proxy.gateway_ca import ensure_ec_ca


def test_new_ca_is_ec_p256_and_mitmproxy_issues_ec_leaves(tmp_path):
    confdir = tmp_path / "ca"
    assert ensure_ec_ca(confdir) is True
    ca = x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0  # the key is private

    store = CertStore.from_store(confdir, "mitmproxy", 2048)
    leaf = store.get_cert("allowed.test", [x509.DNSName("allowed.test")])
    assert isinstance(leaf.privatekey, ec.EllipticCurvePrivateKey)
    # The leaf is signed by the CA (verify raises if not).
    ca.public_key().verify(
        leaf.cert._cert.signature,
        leaf.cert._cert.tbs_certificate_bytes,
        ec.ECDSA(hashes.SHA256()),
    )


def test_existing_ca_is_kept(tmp_path):
    """A CA made earlier (RSA, by mitmproxy itself) stays: sandboxes may trust it."""
    confdir = tmp_path / "ca"
    CertStore.create_store(confdir, "mitmproxy", 2048)
    before = (confdir / "mitmproxy-ca.pem").read_bytes()
    assert ensure_ec_ca(confdir) is False
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == before
