"""The TLS contexts of inspected HTTPS/1.1 the front door terminates itself
(tls_relay.py): one server-side context per leaf certificate, signed by the gateway
CA in confdir (the CA mitmproxy uses), and the context that verifies upstreams.

Leaves are made as mitmproxy's `certs.dummy_cert` makes them: the CA's own key is
the leaf's key (so the key type, EC P-256 for a CA of gateway_ca.ensure_ec_ca, is what
each handshake signs with), the names are the SNI (else the address the client
reached the gateway at) and the original destination's address, valid two days back
and a year on. A leaf context issues one TLS 1.3 session ticket per connection, not
OpenSSL's two (each costs ~15 us of the handshake; one lets a client resume). The
upstream is verified as mitmproxy's `tls_start_server` does: the configured upstream CA bundle (else certifi's, mitmproxy's default), the
hostname (the client's SNI, else the destination's address) checked against the
subjectAltName only, no partial wildcards.

Upstream sessions are kept for resumption (`upstream_session`): only a session of a
handshake that was verified, and only offered to the same upstream again (the key
carries the task, the address, the name verified and the context): a resumed
handshake skips the certificate, so what it relies on is that this exact name at
this exact address was verified when the session was made.

cryptography and certifi are imported by the first such connection, not with this
module, and the gateway CA made (gateway_ca.py) if confdir has none yet."""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from sandgate.proxy.gateway_ca import ca_key_file, ensure_ec_ca
from sandgate.proxy.registry import Sandbox

# Server-side contexts kept, least recently used out first: one per task and leaf's
# names (a sandbox reaches few names; a context with its leaf is a few KB).
MAX_LEAF_CONTEXTS = 512
MAX_UPSTREAM_SESSIONS = 1024  # resumable upstream sessions kept, least recently made out first
LEAF_TICKETS = 1
LEAF_DAYS_BEFORE, LEAF_DAYS_AFTER = 2, 365  # mitmproxy's dummy_cert, CERT_EXPIRY
HTTP1 = "http/1.1"


class TlsContexts:
    """Contexts for the front door's inspected TLS; `confdir` holds the gateway CA
    (mitmproxy-ca.pem: key and certificate), `upstream_ca` the bundle upstreams are
    verified with (None: certifi's, as mitmproxy)."""

    def __init__(self, confdir: Path, upstream_ca: Path | None = None):
        self.confdir, self.upstream_ca = confdir, upstream_ca
        self._ca = None  # (key, certificate, its PEM), loaded by the first leaf
        self._leaves: OrderedDict[tuple, ssl.SSLContext] = OrderedDict()
        self._upstream: dict[bool, ssl.SSLContext] = {}
        self._sessions: OrderedDict[tuple, ssl.SSLSession] = OrderedDict()

    def for_client(self, names: tuple[str, ...], owner: Hashable) -> ssl.SSLContext:
        """The server-side context whose leaf names `names` (the first is its CN), for
        `owner` (the task's sandbox) alone: a leaf cached for every task would answer
        a name another task visited ~1 ms faster, which tells a task, by timing its
        own handshakes, which names the others visited."""
        key = (owner, names)
        context = self._leaves.get(key)
        if context is not None:
            self._leaves.move_to_end(key)
            return context
        context = self._leaves[key] = self._leaf_context(names)
        if len(self._leaves) > MAX_LEAF_CONTEXTS:
            self._leaves.popitem(last=False)
        return context

    def forget(self, owner: Sandbox) -> None:
        """`owner`'s task ended: its leaves and its upstream sessions go (no other task
        may be served them; the sessions' keys start with the task and its address)."""
        for key in [k for k in self._leaves if k[0] == owner]:
            del self._leaves[key]
        for key in [k for k in self._sessions if k[:2] == (owner.task_id, owner.address)]:
            del self._sessions[key]

    def for_upstream(self, alpn: bool) -> ssl.SSLContext:
        """The verifying client context; `alpn`: offer http/1.1 (the client offered
        ALPN: mitmproxy mirrors the client's offers, of which HTTP/1.1 is spoken here)."""
        context = self._upstream.get(alpn)
        if context is None:
            if self.upstream_ca is not None:
                bundle = str(self.upstream_ca)
            else:
                import certifi

                bundle = certifi.where()
            context = ssl.create_default_context(cafile=bundle)
            # mitmproxy's DEFAULT_HOSTFLAGS: the subject's CN is never a hostname.
            context.hostname_checks_common_name = False
            context.minimum_version = ssl.TLSVersion.TLSv1_2  # tls_version_server_min
            if alpn:
                context.set_alpn_protocols([HTTP1])
            self._upstream[alpn] = context
        return context

    def upstream_session(self, key: tuple) -> ssl.SSLSession | None:
        """The session kept for `key` (see `keep_upstream_session`), or None."""
        return self._sessions.get(key)

    def keep_upstream_session(self, key: tuple, session: ssl.SSLSession | None) -> None:
        """Keep `session` of a verified upstream handshake for resumption by the next
        connection with the same `key`, which must name everything the verification
        covered: the context (`alpn`), the name, the address (tls_relay.py builds it)."""
        if session is None or not session.has_ticket:
            return
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        if len(self._sessions) > MAX_UPSTREAM_SESSIONS:
            self._sessions.popitem(last=False)

    def _leaf_context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        key, ca_cert, ca_pem = self._load_ca()
        leaf = _leaf_certificate(key, ca_cert, names)
        from cryptography.hazmat.primitives.serialization import Encoding

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # tls_version_client_min
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
        context.set_alpn_protocols([HTTP1])  # chosen only where the client offers it
        context.num_tickets = LEAF_TICKETS
        # load_cert_chain reads files only: the chain from a memfd, the key from the
        # CA's own file (0600 in confdir), never written anywhere else.
        fd = os.memfd_create("sandgate-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, leaf.public_bytes(Encoding.PEM) + ca_pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}", ca_key_file(self.confdir))
        finally:
            os.close(fd)
        return context

    def _load_ca(self):
        if self._ca is None:
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            ensure_ec_ca(self.confdir)  # made already, as a rule: then a stat, nothing more
            pem = ca_key_file(self.confdir).read_bytes()
            key = serialization.load_pem_private_key(pem, None)
            cert = x509.load_pem_x509_certificate(pem)
            self._ca = key, cert, cert.public_bytes(serialization.Encoding.PEM)
        return self._ca


def _leaf_certificate(key, ca_cert, names: tuple[str, ...]):
    """mitmproxy's `certs.dummy_cert` for `names`, without an organization."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sans = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name.encode("idna").decode()))
    common_name = names[0] if names and len(names[0]) < 64 else None
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .issuer_name(ca_cert.subject)
        .subject_name(x509.Name(subject))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .public_key(ca_cert.public_key())
        .not_valid_before(now - datetime.timedelta(days=LEAF_DAYS_BEFORE))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS_AFTER))
        .serial_number(x509.random_serial_number())
        # RFC 5280 4.2.1.6: critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName(sans), critical=common_name is None)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
    )
    return builder.sign(private_key=key, algorithm=hashes.SHA256())
