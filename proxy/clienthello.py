"""The TLS ClientHello, read for its SNI: pure, no mitmproxy, no I/O.

`parse_client_hello(data)` has mitmproxy's three-way contract
(`mitmproxy.proxy.layers.tls.parse_client_hello`):

- a `ClientHello` when `data` holds the whole first handshake message,
- None when more bytes are needed,
- ValueError when the bytes cannot be a ClientHello.

It reads only what sandgate decides on (the server name) and checks the framing
around it, about 15x faster than mitmproxy's kaitai parser. It is stricter where a
lenient reading could name a different server than the one the upstream sees: a
server_name extension that appears twice, lists more than one name, a name type
other than host_name, or bytes after the extensions are errors, as they are to
OpenSSL. So is a ClientHello split over several records: TLS allows it, no client
library does it for a hello that fits one record (2^14 bytes; a longer one is
past MAX_FIRST_BYTES anyway), and SNI routers read the first record as if it held
the whole hello (HAProxy's `req.ssl_sni` reads on over the next record's header as
extension bytes and finds a name hidden in another extension; it needs 50 bytes of
the hello in the first record to find any). tests/unit/test_clienthello.py checks
it against mitmproxy's parser.
"""

from __future__ import annotations

from dataclasses import dataclass

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_ALPN = 0x0010
_SESSION_TICKET = 0x0023
_SUPPORTED_VERSIONS = 0x002B
_HOST_NAME = 0x00
# Extensions that carry a server name the gateway cannot read: encrypted_client_hello
# (0xfe0d, RFC 9849; 0xfe08-0xfe0c and 0xff02 its drafts) and encrypted_server_name
# (0xffce, the ESNI drafts). A server that decrypts one routes by the hidden name.
_HIDDEN_NAME = frozenset({0xFE0D, 0xFE0C, 0xFE0B, 0xFE0A, 0xFE09, 0xFE08, 0xFF02, 0xFFCE})
MAX_RECORD = 1 << 14  # RFC 8446 5.1: a plaintext record carries at most 2^14 bytes
# The highest record-layer major version a server takes in a ClientHello's records.
# Clients send 0x0300 to 0x0304; OpenSSL checks the major only (3), and Go's
# crypto/tls takes any version below 0x1000 in a connection's first records
# (`16 00 01 ...`) and routes by the SNI in them. A hello in a record that a check
# here took for raw TCP would skip the SNI decision.
MAX_RECORD_MAJOR = 0x0F
# What a hello is decided in, though: the record versions clients send (0x0300 to
# 0x0304; TLS 1.3 clients send 0x0301 or 0x0303) and the ClientHello legacy_versions
# (TLS 1.0 to 1.2; TLS 1.3 sends 0x0303).
# The rest is TLS to some server and no TLS to an SNI router: HAProxy's `req.ssl_sni`
# and nginx's `ssl_preread` find no name in a `16 00 01` record, HAProxy none in a
# legacy_version of 0x0400 (OpenSSL takes both), and route to their default backend.
# Refused (malformed_tls), not taken for raw TCP.
RECORD_VERSIONS = range(0x0300, 0x0305)
LEGACY_VERSIONS = range(0x0301, 0x0304)
SPLIT_HELLO = (
    "a ClientHello split over TLS records (SNI routers read the first record as the whole "
    "hello; no client library splits one that fits a record)"
)
# A ServerHello whose random is this is a HelloRetryRequest (RFC 8446 4.1.3): the
# client answers it with a second ClientHello, in plaintext too.
HELLO_RETRY_RANDOM = bytes.fromhex(
    "CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C"
)


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None  # the host_name the client asked for, as sent (not yet normalised)
    # The ALPN extension's data as sent (None: none), read by `alpn_protocols` only
    # where the protocols matter (the front door's inspected TLS), not per connection.
    alpn: bytes | None = None
    # It carries an encrypted ClientHello (ECH, or the ESNI drafts): the SNI above is
    # then the outer, public name, and the server may serve the hidden one.
    hidden_name: bool = False
    # What it offers to resume (RFC 5246 7.4.1.2, RFC 5077 3.1): its legacy_session_id,
    # and its session_ticket extension's data (b"": the extension, empty; None: none).
    # A TLS 1.2 server that resumes takes the session's server name, not the SNI
    # (proxy/tls_sessions.py).
    session_id: bytes = b""
    ticket: bytes | None = None


def starts_like_tls_record(data: bytes) -> bool:
    """Whether `data` may start a TLS handshake record: type 22, then a record version
    some server takes in a ClientHello: a major up to MAX_RECORD_MAJOR, any minor.
    Fewer than 3 bytes are not taken for TLS. mitmproxy takes 0x0300 to 0x0303 only:
    this is a superset."""
    return len(data) > 2 and data[0] == _HANDSHAKE and data[1] <= MAX_RECORD_MAJOR


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data`, None if incomplete; ValueError if malformed."""
    body = _first_handshake_message(data)
    if body is None:
        return None
    return ClientHello(*_extensions(body))


def client_hello_of(body: bytes) -> ClientHello:
    """The ClientHello of a handshake message's body (after its 4-byte header), read
    as `parse_client_hello` reads a first one; ValueError if malformed. For a hello
    later in a stream (proxy/frontdoor/hello_watch.py)."""
    return ClientHello(*_extensions(body))


def is_hello_retry_request(message, at: int = 0) -> bool:
    """Whether the ServerHello handshake message at `at` in `message` (any bytes-like
    holding its 4-byte header, version and random) is a HelloRetryRequest."""
    return message[at] == 2 and message[at + 6 : at + 38] == HELLO_RETRY_RANDOM


def read_server_hello(message) -> tuple[bool, bytes]:
    """A whole ServerHello handshake message (any bytes-like, its 4-byte header
    first): whether it chose TLS 1.3 (a supported_versions extension of 0x0304, RFC
    8446 4.2.1; a TLS 1.2 server sends none), and its session id. ValueError if it
    cannot be one."""
    try:
        end = 4 + int.from_bytes(message[1:4], "big")
        at = 4 + 2 + 32  # header, legacy_version, random
        size = message[at]
        if size > 32 or len(message) != end:
            raise ValueError("a session id over 32 bytes, or a length not its own")
        session_id = bytes(message[at + 1 : at + 1 + size])
        at += 1 + size + 2 + 1  # the session id, cipher suite, compression method
        if at == end:
            return False, session_id  # no extensions: TLS 1.2 or older
        if at + 2 + ((message[at] << 8) | message[at + 1]) != end:
            raise ValueError("extensions block does not end with the ServerHello")
        at += 2
        tls13 = False
        while at < end:
            kind, size = (
                (message[at] << 8) | message[at + 1],
                (message[at + 2] << 8) | message[at + 3],
            )
            at += 4 + size
            if at > end:
                raise ValueError("extension overruns the extensions block")
            if kind == _SUPPORTED_VERSIONS:
                tls13 = size == 2 and message[at - 2] == 3 and message[at - 1] == 4
        return tls13, session_id
    except IndexError:
        raise ValueError("ServerHello cut short") from None


def server_name_and_alpn(body: bytes) -> tuple[str | None, list[bytes]]:
    """The SNI and the ALPN protocols offered (RFC 7301 3.1) of a ClientHello's body
    (the handshake message after its 4-byte header); ValueError if malformed. For
    mitmproxy's ClientHello (proxy/lean_mitmproxy.py: `parse_client_hellos_lean`)."""
    sni, alpn, *_ = _extensions(body)
    return sni, alpn_protocols(alpn)


def alpn_protocols(alpn: bytes | None) -> list[bytes]:
    """The protocols of an ALPN extension's data (RFC 7301 3.1), [] for none;
    ValueError if malformed."""
    if alpn is None:
        return []
    if len(alpn) < 2 or ((alpn[0] << 8) | alpn[1]) != len(alpn) - 2:
        raise ValueError("ALPN extension is not one protocol list")
    protocols, at = [], 2
    while at < len(alpn):
        end = at + 1 + alpn[at]
        if end > len(alpn) or end == at + 1:
            raise ValueError("ALPN protocol empty or overrunning its list")
        protocols.append(alpn[at + 1 : end])
        at = end
    return protocols


def _first_handshake_message(data: bytes) -> bytes | None:
    """The first handshake message's body, whole in the first record (module
    docstring), or None until all of that record arrived."""
    header = data[:5]
    if len(header) < 5:
        return None
    if not starts_like_tls_record(header):
        raise ValueError(f"expected a TLS handshake record, got {header!r}")
    size = (header[3] << 8) | header[4]
    if size == 0 or size > MAX_RECORD:
        raise ValueError(f"TLS record of {size} bytes")
    if (header[1] << 8 | header[2]) not in RECORD_VERSIONS:
        raise ValueError(f"a ClientHello in a record of version {header[1:3].hex()}")
    if len(data) < 5 + size:
        return None
    message = data[5 : 5 + size]
    if message[0] != _CLIENT_HELLO:
        raise ValueError(f"first handshake message has type {message[0]}, not ClientHello")
    end = 4 + int.from_bytes(message[1:4], "big") if size >= 4 else None
    if end is None or end > size:
        raise ValueError(SPLIT_HELLO)
    return message[4:end]


def _extensions(
    body: bytes,
) -> tuple[str | None, bytes | None, bool, bytes, bytes | None]:
    """The SNI of a ClientHello body (RFC 8446 4.1.2), checking the framing on the way,
    the ALPN extension's bytes if there is one, whether it hides a name (ECH), its
    session id and its session ticket (None: no such extension). Indexing past the end
    raises IndexError: the body was cut short."""
    try:
        if (body[0] << 8 | body[1]) not in LEGACY_VERSIONS:
            raise ValueError(f"ClientHello legacy_version {body[:2].hex()}")
        at = 2 + 32  # legacy_version, random
        size = body[at]
        if size > 32:
            raise ValueError("session id longer than 32 bytes")
        session_id = body[at + 1 : at + 1 + size]
        at += 1 + size
        size = (body[at] << 8) | body[at + 1]
        if size == 0 or size & 1:
            raise ValueError("cipher suites list empty or of odd length")
        at += 2 + size
        size = body[at]
        if size == 0:
            raise ValueError("no compression method")
        at += 1 + size
        if at == len(body):
            return None, None, False, session_id, None  # no extensions (before TLS 1.3)
        end = at + 2 + ((body[at] << 8) | body[at + 1])
        if end != len(body):
            raise ValueError("extensions block does not end with the ClientHello")
        at += 2
        seen: set[int] = set()
        sni = alpn = ticket = None
        hidden = False
        while at < end:
            kind = (body[at] << 8) | body[at + 1]
            start = at + 4
            at = start + ((body[at + 2] << 8) | body[at + 3])
            if at > end:
                raise ValueError("extension overruns the extensions block")
            if kind in seen:  # RFC 8446 4.2: at most one extension of each type
                raise ValueError(f"extension {kind} appears twice")
            seen.add(kind)
            if kind == _SERVER_NAME:
                sni = _host_name(body[start:at])
            elif kind == _ALPN:
                alpn = body[start:at]
            elif kind == _SESSION_TICKET:
                ticket = body[start:at]
            elif kind in _HIDDEN_NAME:
                hidden = True
        return sni, alpn, hidden, session_id, ticket
    except IndexError:
        raise ValueError("ClientHello cut short") from None


def _host_name(extension: bytes) -> str:
    """The one host_name of a server_name extension (RFC 6066 3): a list of one
    (type 0, length, name), filling the extension exactly."""
    if len(extension) < 5 or ((extension[0] << 8) | extension[1]) != len(extension) - 2:
        raise ValueError("server_name extension is not one name list")
    if extension[2] != _HOST_NAME:
        raise ValueError(f"server name of type {extension[2]}, not host_name")
    size = (extension[3] << 8) | extension[4]
    if size != len(extension) - 5:
        raise ValueError("server_name lists more than one name, or is cut short")
    if size == 0:
        raise ValueError("empty host_name")
    try:
        return extension[5:].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("host_name is not ASCII") from None
