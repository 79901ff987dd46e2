"""proxy.clienthello against its contract and against mitmproxy's parser, which it
replaces on the front door: hello / None (need more) / ValueError, the same SNI,
stricter only where a lenient reading could name another server."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import parse_client_hello as mitmproxy_parse
from sandgate.proxy.clienthello import (
    MAX_RECORD_MAJOR,
    ClientHello,
    parse_client_hello,
    starts_like_tls_record,
)
from support.fakes import extension, hello_with_extensions, record, server_name


def client_hello(sni: str | None, version: ssl.TLSVersion | None = None) -> bytes:
    """A real ClientHello record, from Python's own TLS stack."""
    context = ssl.create_default_context()
    if sni is None:
        context.check_hostname = False
    if version is not None:
        context.minimum_version = context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_of(record: bytes) -> bytes:
    assert record[0] == 0x16 and int.from_bytes(record[3:5], "big") == len(record) - 5
    return record[5:]


def rechunked(hello: bytes, size: int) -> bytes:
    """The same handshake message split into records of `size` bytes."""
    message = handshake_of(hello)
    return b"".join(record(message[i : i + size]) for i in range(0, len(message), size))


HELLOS = [
    pytest.param("allowed.test", None, id="tls-default"),
    pytest.param("allowed.test", ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(
        "a" * 63 + "." + "b" * 63 + ".test", ssl.TLSVersion.TLSv1_3, id="tls1.3-long-name"
    ),
    pytest.param(None, None, id="no-sni"),
]


@pytest.mark.parametrize("sni, version", HELLOS)
def test_real_hellos_read_as_mitmproxy_reads_them(sni, version):
    hello = client_hello(sni, version)
    parsed, theirs = parse_client_hello(hello), mitmproxy_parse(hello)
    assert parsed.sni == theirs.sni == sni and not parsed.alpn and not parsed.hidden_name
    # What it offers to resume: its session id (OpenSSL's 32 random bytes offering TLS
    # 1.3, none for TLS 1.2 alone) and an empty ticket.
    message = handshake_of(hello)
    assert parsed.session_id == message[39 : 39 + message[38]]
    assert len(parsed.session_id) == (0 if version == ssl.TLSVersion.TLSv1_2 else 32)
    assert parsed.ticket == dict(theirs.extensions)[0x23] == b""
    # Extra bytes after the hello (an eager client's next record) change nothing.
    assert parse_client_hello(hello + b"\x17\x03\x03\x00\x05hello") == parsed


@pytest.mark.parametrize("sni, version", HELLOS)
def test_every_prefix_needs_more_where_mitmproxy_does(sni, version):
    hello = client_hello(sni, version)
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None, cut
        assert mitmproxy_parse(hello[:cut]) is None, cut


def test_a_hello_in_one_whole_record_is_read():
    hello = rechunked(client_hello("allowed.test"), 16384)
    assert parse_client_hello(hello).sni == "allowed.test"
    assert mitmproxy_parse(hello).sni == "allowed.test"


@pytest.mark.parametrize("size", [1, 3, 7, 49, 100])
def test_a_hello_split_across_records_is_refused(size):
    """mitmproxy and OpenSSL join the records; an SNI router reading the first record
    as the whole hello does not (clienthello.py's docstring): refused, whatever the
    name, before its first record's bytes could be read as the routers read them."""
    hello = rechunked(client_hello("allowed.test"), size)
    assert mitmproxy_parse(hello).sni == "allowed.test"
    with pytest.raises(ValueError, match="split over TLS records"):
        parse_client_hello(hello)
    first_record = hello[: 5 + size]
    with pytest.raises(ValueError, match="split over TLS records"):
        parse_client_hello(first_record)


def test_without_extensions_there_is_no_sni():
    body = b"\x03\x01" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    assert parse_client_hello(record(b"\x01" + len(body).to_bytes(3, "big") + body)) == ClientHello(
        sni=None
    )


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param(
            hello_with_extensions(server_name((0, b"a.test")) + server_name((0, b"b.test"))),
            "appears twice",
            id="two-sni-extensions",
        ),
        pytest.param(
            hello_with_extensions(server_name((0, b"a.test"), (0, b"b.test"))),
            "more than one name",
            id="two-names",
        ),
        pytest.param(
            hello_with_extensions(server_name((1, b"a.test"))),
            "not host_name",
            id="other-name-type",
        ),
        pytest.param(
            hello_with_extensions(server_name((0, b""))), "empty host_name", id="empty-name"
        ),
        pytest.param(
            hello_with_extensions(server_name((0, "ä.test".encode()))), "not ASCII", id="non-ascii"
        ),
        pytest.param(
            hello_with_extensions(server_name((0, b"a.test")), trailing=b"\x00"),
            "does not end",
            id="bytes-after-extensions",
        ),
        pytest.param(
            hello_with_extensions(extension(0, b"\x00")), "not one name list", id="cut-sni"
        ),
        pytest.param(
            hello_with_extensions(b"\x00\x00\x00\x09"), "overruns", id="extension-overruns"
        ),
        pytest.param(record(b""), "record of 0 bytes", id="empty-record"),
        pytest.param(
            b"\x16\x03\x01\x40\x01" + b"\x00" * 16385, "record of 16385", id="record-too-long"
        ),
        pytest.param(
            record(b"\x01\x00\x00\x04abcd", kind=0x17),
            "expected a TLS handshake",
            id="not-handshake",
        ),
        pytest.param(record(b"\x02\x00\x00\x04abcd"), "not ClientHello", id="server-hello"),
        pytest.param(
            record(b"\x01\x00\x00\x23" + b"\x03\x03" + b"\x00" * 32 + b"\x21"),
            "longer than 32",
            id="long-session-id",
        ),
        pytest.param(
            record(b"\x01\x00\x00\x26" + b"\x03\x03" + b"\x00" * 32 + b"\x00\x00\x01\x13"),
            "odd length",
            id="odd-cipher-list",
        ),
        pytest.param(
            record(b"\x01\x00\x00\x28" + b"\x03\x03" + b"\x00" * 32 + b"\x00\x00\x02\x13\x01\x00"),
            "no compression",
            id="no-compression",
        ),
        pytest.param(
            record(b"\x01\x00\x00\x05" + b"\x03\x03\x00\x00\x00"), "cut short", id="cut-random"
        ),
    ],
)
def test_malformed_hellos_are_errors(data, message):
    with pytest.raises(ValueError, match=message):
        parse_client_hello(data)


def test_starts_like_tls_record_takes_all_mitmproxy_does_and_every_version_a_server_takes():
    from mitmproxy.net.tls import starts_like_tls_record as theirs

    for data in (b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x10\x01", b"GET "):
        assert starts_like_tls_record(data) == theirs(data), data
    for minor in range(256):  # 0x0304 and odder: still TLS, still decided by SNI
        assert starts_like_tls_record(bytes([0x16, 0x03, minor]))
    # Go's crypto/tls takes any version below 0x1000 in a first record (16 00 01 ...).
    for major in range(256):
        assert starts_like_tls_record(bytes([0x16, major, 0x01])) is (major <= MAX_RECORD_MAJOR)


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0302, 0x0303, 0x0304])
def test_a_hello_in_a_record_version_clients_send_names_its_server(version):
    hello = bytearray(client_hello("allowed.test"))
    hello[1:3] = version.to_bytes(2, "big")
    assert parse_client_hello(bytes(hello)).sni == "allowed.test"


@pytest.mark.parametrize("version", [0x0001, 0x0100, 0x0200, 0x0305, 0x0FFF])
def test_a_hello_in_another_record_version_is_tls_but_refused(version):
    """Go's crypto/tls takes it (so it is no raw TCP), HAProxy's and nginx's SNI
    readers find no name in it and route to their default backend: refused."""
    hello = bytearray(client_hello("allowed.test"))
    hello[1:3] = version.to_bytes(2, "big")
    assert starts_like_tls_record(bytes(hello))
    with pytest.raises(ValueError, match="record of version"):
        parse_client_hello(bytes(hello))


@pytest.mark.parametrize(
    "version, named", [(0x0301, True), (0x0302, True), (0x0303, True), (0x0300, False),
                       (0x0304, False), (0x0400, False), (0x0203, False)]
)  # fmt: skip
def test_only_the_legacy_versions_clients_send_are_read(version, named):
    """OpenSSL takes a legacy_version of 0x0400 beside supported_versions; HAProxy's
    req.ssl_sni finds no name in it and routes to its default backend."""
    hello = bytearray(client_hello("allowed.test"))
    hello[9:11] = version.to_bytes(2, "big")  # record header 5, handshake header 4
    if named:
        assert parse_client_hello(bytes(hello)).sni == "allowed.test"
    else:
        with pytest.raises(ValueError, match="legacy_version"):
            parse_client_hello(bytes(hello))


HELLO = client_hello("allowed.test")


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=600)
    | st.builds(
        lambda at, junk: HELLO[:at] + junk + HELLO[at + len(junk) :],
        st.integers(0, len(HELLO)),
        st.binary(min_size=1, max_size=4),
    )
)
def test_any_bytes_give_a_hello_none_or_value_error_and_never_another_name(data):
    try:
        ours = parse_client_hello(data)
    except ValueError:
        return
    assert ours is None or isinstance(ours, ClientHello)
    try:
        theirs = mitmproxy_parse(data)
    except Exception:  # noqa: BLE001 - mitmproxy's parser may refuse more, in its own ways
        return
    if ours is not None and ours.sni is not None and theirs is not None and theirs.sni is not None:
        assert ours.sni == theirs.sni


def test_alpn_is_read_with_the_name():
    from sandgate.proxy.clienthello import server_name_and_alpn

    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="allowed.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    body = handshake_of(outgoing.read())[4:]
    assert server_name_and_alpn(body) == ("allowed.test", [b"h2", b"http/1.1"])
    hello = client_hello("allowed.test")
    assert server_name_and_alpn(handshake_of(hello)[4:]) == ("allowed.test", [])


@pytest.mark.parametrize(
    "alpn",
    [
        pytest.param(b"\x00\x04\x02h2", id="list-length-wrong"),
        pytest.param(b"\x00\x03\x00h2", id="empty-protocol"),
        pytest.param(b"\x00\x03\x05h2", id="protocol-overruns"),
        pytest.param(b"\x00", id="cut-short"),
    ],
)
def test_a_malformed_alpn_is_an_error(alpn):
    from sandgate.proxy.clienthello import server_name_and_alpn

    hello = hello_with_extensions(server_name((0, b"allowed.test")) + extension(0x10, alpn))
    with pytest.raises(ValueError):
        server_name_and_alpn(handshake_of(hello)[4:])


@pytest.mark.parametrize(
    "kind, hidden",
    [
        pytest.param(0xFE0D, True, id="ech"),
        pytest.param(0xFE0A, True, id="ech-draft-10"),
        pytest.param(0xFFCE, True, id="esni"),
        pytest.param(0xFE0E, False, id="unrelated-neighbour"),
        pytest.param(0x0A0A, False, id="grease-value"),
    ],
)
def test_a_hello_carrying_an_encrypted_client_hello_says_it_hides_a_name(kind, hidden):
    ech = extension(kind, b"\x00\x00\x01\x00\x01\x07" + bytes(40))
    hello = parse_client_hello(hello_with_extensions(server_name((0, b"allowed.test")) + ech))
    assert hello == ClientHello("allowed.test", hidden_name=hidden)
    assert parse_client_hello(client_hello("allowed.test")).hidden_name is False
