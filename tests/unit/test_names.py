"""The one canonicaliser (proxy/policy/names.py): every spelling of a name or an
address must come out as one canonical value, and nothing that is not a host name
may pass as one."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from sandgate.proxy.policy.names import (
    DomainPattern,
    InvalidAddress,
    InvalidName,
    format_host_port,
    parse_domain,
    parse_domain_pattern,
    parse_host_port,
    parse_ip,
    parse_network,
    parse_path,
    special_range,
)

IP = ipaddress.ip_address

# --- parse_domain: normalisation -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("example.com", "example.com", id="plain"),
        pytest.param("GitHub.COM", "github.com", id="upper-case"),
        pytest.param("github.com.", "github.com", id="trailing-dot"),
        pytest.param("API.GitHub.com.", "api.github.com", id="case-and-trailing-dot"),
        pytest.param("Bücher.example", "xn--bcher-kva.example", id="idna-to-punycode"),
        pytest.param("xn--bcher-kva.example", "xn--bcher-kva.example", id="punycode-stays"),
        pytest.param("XN--BCHER-KVA.Example", "xn--bcher-kva.example", id="punycode-upper-case"),
        pytest.param("BÜCHER.example.", "xn--bcher-kva.example", id="idna-upper-case-trailing-dot"),
        pytest.param(
            "g\u0456thub.com", "xn--gthub-n2e.com", id="cyrillic-i-lookalike-is-not-github"
        ),
        pytest.param(
            "\uff27\uff29\uff34\uff28\uff35\uff22.com", "github.com", id="fullwidth-maps-to-ascii"
        ),
        pytest.param("github\u3002com", "github.com", id="ideographic-full-stop-is-a-dot"),
        pytest.param("github\uff0ecom", "github.com", id="fullwidth-full-stop-is-a-dot"),
        pytest.param("_dmarc.example.com", "_dmarc.example.com", id="underscore-label"),
        pytest.param("a-b.example", "a-b.example", id="hyphen-inside"),
        pytest.param("1.2.3.4.example", "1.2.3.4.example", id="numeric-labels-then-a-name"),
        pytest.param("localhost", "localhost", id="single-label"),
        pytest.param("a" * 63 + ".example", "a" * 63 + ".example", id="63-char-label"),
        pytest.param(".".join(["a" * 61] * 4), ".".join(["a" * 61] * 4), id="247-char-name"),
    ],
)
def test_parse_domain_normalises(text, expected):
    assert parse_domain(text) == expected


def test_idna_both_spellings_are_one_name():
    assert parse_domain("Bücher.example") == parse_domain("xn--bcher-kva.example")


# --- parse_domain: rejection -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="only-a-dot"),
        pytest.param("..", id="two-dots"),
        pytest.param("example..com", id="empty-label"),
        pytest.param(".example.com", id="leading-dot"),
        pytest.param("example.com..", id="two-trailing-dots"),
        pytest.param("exa\x00mple.com", id="nul"),
        pytest.param("example.com\x00.evil.test", id="nul-then-suffix"),
        pytest.param("exa mple.com", id="space"),
        pytest.param("example.com\n", id="newline"),
        pytest.param("exa\x7fmple.com", id="del"),
        pytest.param("a" * 64 + ".example", id="64-char-label"),
        pytest.param(".".join(["a" * 63] * 4), id="255-char-name"),
        pytest.param(".".join(["a" * 50] * 5), id="254-char-name"),
        pytest.param("-example.com", id="leading-hyphen"),
        pytest.param("example-.com", id="trailing-hyphen"),
        pytest.param("exa/mple.com", id="slash"),
        pytest.param("example.com:443", id="with-port"),
        pytest.param("user@example.com", id="userinfo"),
        pytest.param("*.example.com", id="wildcard-is-a-pattern-not-a-name"),
        pytest.param("xn--.example", id="empty-punycode"),
        pytest.param("xn--abc-.example", id="non-canonical-punycode"),
        # IP literals in every spelling are not domains
        pytest.param("127.0.0.1", id="dotted-quad"),
        pytest.param("127.1", id="short-two-parts"),
        pytest.param("127.0.1", id="short-three-parts"),
        pytest.param("2130706433", id="decimal"),
        pytest.param("0x7f000001", id="hex"),
        pytest.param("0X7F000001", id="hex-upper"),
        pytest.param("0x7f.1", id="hex-short"),
        pytest.param("0177.0.0.1", id="octal"),
        pytest.param("017700000001", id="octal-number"),
        pytest.param("127.0.0.1.", id="dotted-quad-trailing-dot"),
        pytest.param("[::1]", id="bracketed-v6"),
        pytest.param("::1", id="bare-v6"),
        pytest.param("::ffff:127.0.0.1", id="v4-mapped-v6"),
        pytest.param("[::ffff:169.254.169.254]", id="bracketed-mapped-metadata"),
        pytest.param("fe80::1%eth0", id="zoned-v6"),
        # names ending in a number: a client would read them as IPv4
        pytest.param("example.123", id="numeric-tld"),
        pytest.param("1.2.3.4.5", id="five-numbers"),
        pytest.param("08.1.1.1", id="bad-octal-still-numeric"),
        pytest.param("999.1.1.1", id="out-of-range-quad"),
        pytest.param("example.0x1f", id="hex-tld"),
    ],
)
def test_parse_domain_rejects(text):
    with pytest.raises(InvalidName):
        parse_domain(text)


def test_a_name_of_4400_digits_is_an_invalid_name():
    # int() past 4300 digits raised a plain ValueError from the IP test inside
    with pytest.raises(InvalidName):
        parse_domain("1" * 4400)
    with pytest.raises(InvalidName):
        parse_domain_pattern("1" * 4400)


def test_parse_domain_rejects_non_strings():
    with pytest.raises(InvalidName):
        parse_domain(None)  # type: ignore[arg-type]


# --- parse_ip: every spelling --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", id="dotted-quad"),
        pytest.param("127.1", "127.0.0.1", id="a.b"),
        pytest.param("127.0.1", "127.0.0.1", id="a.b.c"),
        pytest.param("1.2.65535", "1.2.255.255", id="a.b.c-last-fills-16-bits"),
        pytest.param("1.16777215", "1.255.255.255", id="a.b-last-fills-24-bits"),
        pytest.param("2130706433", "127.0.0.1", id="decimal"),
        pytest.param("4294967295", "255.255.255.255", id="decimal-max"),
        pytest.param("0", "0.0.0.0", id="zero"),
        pytest.param("0x7f000001", "127.0.0.1", id="hex"),
        pytest.param("0X7F000001", "127.0.0.1", id="hex-upper"),
        pytest.param("0x7f.0.0.1", "127.0.0.1", id="hex-part"),
        pytest.param("0x7f.1", "127.0.0.1", id="hex-short"),
        pytest.param("0177.0.0.1", "127.0.0.1", id="octal-part"),
        pytest.param("0177.1", "127.0.0.1", id="octal-short"),
        pytest.param("017700000001", "127.0.0.1", id="octal-number"),
        pytest.param("0251.0376.0251.0376", "169.254.169.254", id="octal-metadata"),
        pytest.param("0xa9.0xfe.0xa9.0xfe", "169.254.169.254", id="hex-metadata"),
        pytest.param("2852039166", "169.254.169.254", id="decimal-metadata"),
        pytest.param("1.2.3.4.", "1.2.3.4", id="trailing-dot"),
        pytest.param(" 1.2.3.4 ", "1.2.3.4", id="surrounding-space"),
        pytest.param("::1", "::1", id="v6-loopback"),
        pytest.param("[::1]", "::1", id="v6-bracketed"),
        pytest.param("2001:DB8::1", "2001:db8::1", id="v6-upper-case"),
        pytest.param("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1", id="v6-long-form"),
        pytest.param("::ffff:127.0.0.1", "127.0.0.1", id="v4-mapped"),
        pytest.param("::FFFF:7f00:1", "127.0.0.1", id="v4-mapped-hex"),
        pytest.param("[::ffff:169.254.169.254]", "169.254.169.254", id="v4-mapped-bracketed"),
        pytest.param("0:0:0:0:0:ffff:a9fe:a9fe", "169.254.169.254", id="v4-mapped-long"),
        # inet_aton takes any number of leading zeros (no int() digit limit in base 8 or 16)
        pytest.param("0" * 5000 + "177.1", "127.0.0.1", id="octal-5000-zeros"),
        pytest.param("0x" + "0" * 5000 + "7f.1", "127.0.0.1", id="hex-5000-zeros"),
    ],
)
def test_parse_ip_spellings(text, expected):
    assert parse_ip(text) == IP(expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("example.com", id="name"),
        pytest.param("256.1.1.1", id="byte-over-255"),
        pytest.param("1.2.3.256", id="last-over-255"),
        pytest.param("1.2.65536", id="last-over-16-bits"),
        pytest.param("4294967296", id="decimal-over-32-bits"),
        pytest.param("1.2.3.4.5", id="five-parts"),
        pytest.param("1..2.3", id="empty-part"),
        pytest.param("08.1.1.1", id="bad-octal"),
        pytest.param("0xg.1", id="bad-hex"),
        pytest.param("-1.2.3.4", id="negative"),
        pytest.param("1.2.3.4/32", id="cidr"),
        pytest.param("fe80::1%eth0", id="zone"),
        pytest.param("[::1", id="unclosed-bracket"),
        pytest.param("[10.0.0.1]", id="v4-in-brackets"),
        pytest.param(":::1", id="bad-v6"),
        # Past int()'s 4300 decimal digits: a ValueError, that was a task's Host header
        # denied as internal_error with a traceback (and a traceback in `rules lint`).
        pytest.param("1" * 4400, id="4400-digits"),
        pytest.param("1.2.3." + "1" * 4400, id="4400-digit-part"),
        pytest.param("10000000000", id="11-digits"),
    ],
)
def test_parse_ip_rejects(text):
    assert parse_ip(text) is None


def test_parse_ip_returns_ipv4_for_mapped_addresses():
    assert isinstance(parse_ip("::ffff:10.0.0.1"), ipaddress.IPv4Address)


# --- special ranges -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        pytest.param("10.1.2.3", "private", id="10/8"),
        pytest.param("172.16.0.1", "private", id="172.16/12"),
        pytest.param("172.31.255.255", "private", id="172.16/12-top"),
        pytest.param("192.168.1.1", "private", id="192.168/16"),
        pytest.param("127.0.0.1", "loopback", id="loopback"),
        pytest.param("127.255.255.254", "loopback", id="loopback-top"),
        pytest.param("169.254.169.254", "link-local", id="metadata"),
        pytest.param("100.64.0.1", "cgnat", id="cgnat-bottom"),
        pytest.param("100.127.255.255", "cgnat", id="cgnat-top"),
        pytest.param("224.0.0.1", "multicast", id="multicast"),
        pytest.param("0.0.0.0", "unspecified", id="unspecified"),
        pytest.param("0.1.2.3", "unspecified", id="this-network"),
        pytest.param("255.255.255.255", "reserved", id="broadcast"),
        pytest.param("::1", "loopback", id="v6-loopback"),
        pytest.param("::", "unspecified", id="v6-unspecified"),
        pytest.param("fe80::1", "link-local", id="v6-link-local"),
        pytest.param("fd00::1", "private", id="v6-ula"),
        pytest.param("ff02::1", "multicast", id="v6-multicast"),
        pytest.param("::ffff:169.254.169.254", "link-local", id="mapped-metadata"),
        pytest.param("::ffff:127.0.0.1", "loopback", id="mapped-loopback"),
        pytest.param("::169.254.169.254", "link-local", id="compatible-metadata"),
        pytest.param("2002:a9fe:a9fe::1", "link-local", id="6to4-metadata"),
        pytest.param("2002:0a00:0001::", "private", id="6to4-private"),
        pytest.param("64:ff9b::a9fe:a9fe", "link-local", id="nat64-metadata"),
        pytest.param("64:ff9b::127.0.0.1", "loopback", id="nat64-loopback"),
        pytest.param("64:ff9b::10.0.0.1", "private", id="nat64-private"),
        pytest.param("2001:0:0:0:0:0:f5ff:fffe", "private", id="teredo-client-10.0.0.1"),
        pytest.param("168.63.129.16", "cloud-internal", id="azure-wireserver"),
        pytest.param("::ffff:168.63.129.16", "cloud-internal", id="mapped-azure-wireserver"),
        pytest.param("64:ff9b::a83f:8110", "cloud-internal", id="nat64-azure-wireserver"),
        pytest.param("161.26.0.10", "cloud-internal", id="ibm-service-network"),
        pytest.param("166.11.255.255", "cloud-internal", id="ibm-service-endpoints-top"),
        pytest.param("fd00:ec2::254", "private", id="aws-metadata-v6"),
        pytest.param("100.100.100.200", "cgnat", id="alibaba-metadata"),
        pytest.param("192.0.0.192", "private", id="oracle-metadata"),
    ],
)
def test_special_range(address, kind):
    assert special_range(IP(address)) == kind


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("8.8.8.8", id="public-v4"),
        pytest.param("100.63.255.255", id="below-cgnat"),
        pytest.param("100.128.0.0", id="above-cgnat"),
        pytest.param("168.63.129.15", id="below-azure-wireserver"),
        pytest.param("168.63.129.17", id="above-azure-wireserver"),
        pytest.param("166.7.255.255", id="below-ibm-endpoints"),
        pytest.param("166.12.0.0", id="above-ibm-endpoints"),
        pytest.param("172.32.0.1", id="above-172.16/12"),
        pytest.param("169.255.0.1", id="above-link-local"),
        pytest.param("2606:4700::1111", id="public-v6"),
        pytest.param("64:ff9b::8.8.8.8", id="nat64-public"),
        pytest.param("2002:0808:0808::", id="6to4-public"),
        pytest.param("::ffff:8.8.8.8", id="mapped-public"),
    ],
)
def test_public_addresses_are_not_special(address):
    assert special_range(IP(address)) is None


# --- networks and patterns ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("10.0.0.0/8", "10.0.0.0/8", id="v4"),
        pytest.param("203.0.113.7", "203.0.113.7/32", id="single-v4"),
        pytest.param("2001:DB8::/32", "2001:db8::/32", id="v6"),
        pytest.param("::ffff:10.0.0.0/104", "10.0.0.0/8", id="mapped-v6-network-is-v4"),
        pytest.param("::ffff:169.254.169.254", "169.254.169.254/32", id="mapped-v6-address-is-v4"),
    ],
)
def test_parse_network(text, expected):
    assert parse_network(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10.0.0.1/8", id="host-bits"),
        pytest.param("10.0.0.0/33", id="v4-prefix-too-long"),
        pytest.param("2001:db8::/129", id="v6-prefix-too-long"),
        pytest.param("0x7f.1", id="short-form"),
        pytest.param("10.0.0.0/x", id="prefix-not-a-number"),
        pytest.param("example.com/8", id="name"),
    ],
)
def test_parse_network_rejects(text):
    with pytest.raises(InvalidAddress):
        parse_network(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("example.com", DomainPattern("example.com", False), id="exact"),
        pytest.param(
            "*.Example.COM.", DomainPattern("example.com", True), id="wildcard-normalised"
        ),
        pytest.param(
            "*.Bücher.example", DomainPattern("xn--bcher-kva.example", True), id="wildcard-idna"
        ),
    ],
)
def test_parse_domain_pattern(text, expected):
    assert parse_domain_pattern(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("*", "would allow everything", id="bare-star"),
        pytest.param("*.com", "public suffix", id="tld"),
        pytest.param("*.co.uk", "public suffix", id="multi-label-public-suffix"),
        pytest.param("*.github.io", "public suffix", id="hosting-suffix"),
        pytest.param("*.com.pl", "public suffix 'com.pl'", id="psl-icann"),
        pytest.param("*.co.th", "public suffix 'co.th'", id="psl-icann-2"),
        pytest.param("a.*.example.com", "whole leftmost label", id="middle"),
        pytest.param("*example.com", "whole leftmost label", id="glued"),
        pytest.param("api*.example.com", "whole leftmost label", id="partial-label"),
        pytest.param("*.*.example.com", "only one leading", id="double"),
        pytest.param("example.*", "whole leftmost label", id="trailing"),
    ],
)
def test_parse_domain_pattern_rejects(text, message):
    with pytest.raises(InvalidName, match=message.replace(".", r"\.")):
        parse_domain_pattern(text)


@pytest.mark.parametrize(
    "base", ["ngrok-free.app", "s3.amazonaws.com", "trycloudflare.com", "fly.dev", "eu.org"]
)
def test_every_public_suffix_refuses_where_anyone_can_register(base):
    """The Public Suffix List's private section: a rule may name `*.fly.dev` (an admin's
    choice, as `*.githubusercontent.com`), an approver's --widen may not."""
    assert parse_domain_pattern(f"*.{base}") == DomainPattern(base, True)
    with pytest.raises(InvalidName, match="anyone can register a name there"):
        parse_domain_pattern(f"*.{base}", every_public_suffix=True)
    assert parse_domain_pattern(f"*.team.{base}", every_public_suffix=True).domain == f"team.{base}"


# --- request paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("/repos/x", "/repos/x", id="plain"),
        pytest.param("/", "/", id="root"),
        pytest.param("/repos/../user/keys", "/user/keys", id="dot-dot"),
        pytest.param("/repos/./x", "/repos/x", id="dot"),
        pytest.param("/repos/x/..", "/repos/", id="trailing-dot-dot"),
        pytest.param("/../../etc", "/etc", id="above-root"),
        pytest.param("/repos/%2e%2e/user", "/user", id="encoded-dot-dot"),
        pytest.param("/%61dmin", "/admin", id="encoded-unreserved"),
        pytest.param("//admin///x", "/admin/x", id="repeated-slashes"),
        pytest.param("/a%2fb", "/a%2Fb", id="encoded-slash-stays-encoded"),
        pytest.param("/caf%c3%a9", "/caf%C3%A9", id="other-escapes-upper-case"),
    ],
)
def test_parse_path(text, expected):
    assert parse_path(text) == expected


# --- properties -------------------------------------------------------------------------

_label = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,20}[A-Za-z0-9_])?", fullmatch=True)
_unicode_label = st.text(
    st.characters(min_codepoint=0xA1, max_codepoint=0x2FFF), min_size=1, max_size=10
)
_names = st.lists(st.one_of(_label, _unicode_label), min_size=1, max_size=5).map(".".join)


@given(_names, st.booleans())
def test_parse_domain_is_idempotent(text, trailing_dot):
    try:
        once = parse_domain(text + ("." if trailing_dot else ""))
    except InvalidName:
        return
    assert parse_domain(once) == once
    assert parse_domain(once.upper()) == once
    assert parse_domain(once + ".") == once


@given(_names)
def test_parse_domain_output_is_ascii_lower_case(text):
    try:
        name = parse_domain(text)
    except InvalidName:
        return
    assert name.isascii() and name == name.lower() and not name.endswith(".")
    assert len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


def _ipv4_spellings(number: int) -> st.SearchStrategy[str]:
    """Strings inet_aton reads as `number`: dotted, short, decimal, hex, octal, mixed."""
    b = number.to_bytes(4, "big")

    def part(value: int) -> st.SearchStrategy[str]:
        return st.sampled_from(
            [str(value), hex(value), hex(value).upper().replace("X", "x"), "0" + oct(value)[2:]]
        )

    forms = [
        st.tuples(*(part(x) for x in b)).map(".".join),
        st.tuples(part(b[0]), part(b[1]), part(int.from_bytes(b[2:], "big"))).map(".".join),
        st.tuples(part(b[0]), part(int.from_bytes(b[1:], "big"))).map(".".join),
        part(number),
    ]
    return st.one_of(forms)


@given(st.integers(0, 2**32 - 1).flatmap(lambda n: st.tuples(st.just(n), _ipv4_spellings(n))))
def test_every_ipv4_spelling_is_an_ip_and_never_a_domain(case):
    number, text = case
    assert parse_ip(text) == ipaddress.IPv4Address(number)
    assert parse_ip(f"::ffff:{ipaddress.IPv4Address(number)}") == ipaddress.IPv4Address(number)
    with pytest.raises(InvalidName):
        parse_domain(text)
    with pytest.raises(InvalidName):
        parse_domain(text + ".")


@given(st.ip_addresses())
def test_ip_addresses_are_never_domains(ip):
    for text in (str(ip), f"[{ip}]" if ip.version == 6 else str(ip), ip.exploded):
        with pytest.raises(InvalidName):
            parse_domain(text)


@given(st.ip_addresses(v=6))
def test_special_range_sees_through_ipv4_mapped(ip):
    mapped = ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)}")
    assert special_range(mapped) == special_range(mapped.ipv4_mapped)


@given(st.lists(_label, min_size=2, max_size=4).map(".".join))
def test_a_wildcard_never_matches_its_apex(text):
    from sandgate.proxy.policy.names import parent_domains

    try:
        pattern = parse_domain_pattern("*." + text)
        apex = parse_domain(text)
    except InvalidName:
        assume(False)
        return
    # The index looks up wildcards only under proper parents of a name.
    assert pattern.domain not in set(parent_domains(apex))
    assert pattern.domain in set(parent_domains("x." + apex))


# special_range() runs on integer tables built from this list: check it against the
# list itself, read the slow and obvious way.
_REFERENCE_RANGES = [
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "private"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "private"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "private"),
    ("ff00::/8", "multicast"),
]


def _reference_special_range(ip):
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6:
        n = int(ip)
        inner = (
            ip.sixtofour
            or (ip.teredo[1] if ip.teredo else None)
            or (ipaddress.IPv4Address(n & 0xFFFFFFFF) if (n >> 32 == 0 and n > 1) else None)
            or (ipaddress.IPv4Address(n & 0xFFFFFFFF) if n >> 32 == 0x64FF9B << 64 else None)
        )
        if inner is not None and _reference_special_range(inner):
            return _reference_special_range(inner)
    for net, kind in _REFERENCE_RANGES:
        network = ipaddress.ip_network(net)
        if network.version == ip.version and ip in network:
            return kind
    return None


_special_addresses = st.sampled_from(
    [ipaddress.ip_network(n) for n, _ in _REFERENCE_RANGES]
).flatmap(lambda net: st.integers(0, net.num_addresses - 1).map(lambda i: net.network_address + i))
_v4_in_v6 = st.tuples(
    st.sampled_from([0xFFFF << 32, 0x2002 << 112, 0x20010000 << 96, 0, 0x64FF9B << 96]),
    st.ip_addresses(v=4),
).map(
    lambda t: ipaddress.IPv6Address(
        t[0]
        | (
            int(t[1]) << 80
            if t[0] == 0x2002 << 112
            else (~int(t[1]) & 0xFFFFFFFF)
            if t[0] == 0x20010000 << 96
            else int(t[1])
        )
    )
)


@given(st.one_of(st.ip_addresses(), _special_addresses, _v4_in_v6))
def test_special_range_agrees_with_the_reference(ip):
    assert special_range(ip) == _reference_special_range(ip)


@given(st.text(st.sampled_from("abcXYZ019_-.x"), min_size=1, max_size=30))
def test_parse_domain_fast_path_agrees_with_the_full_checks(text):
    """Plain ASCII names take a fast path; the same name spelled with an ideographic
    full stop takes the full checks. Both must agree."""

    def outcome(t):
        try:
            return parse_domain(t)
        except InvalidName:
            return InvalidName

    assert outcome(text) == outcome(text.replace(".", "\u3002"))


# --- host:port --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, default_port, expected",
    [
        pytest.param("example.com:8080", None, ("example.com", 8080), id="name"),
        pytest.param("127.0.0.1:9464", None, ("127.0.0.1", 9464), id="v4"),
        pytest.param("[::1]:9464", None, ("::1", 9464), id="v6-bracketed"),
        pytest.param("example.com", 443, ("example.com", 443), id="default-port"),
        pytest.param("[2001:db8::1]", 443, ("2001:db8::1", 443), id="v6-bracketed-default"),
        pytest.param("2001:db8::1", 443, ("2001:db8::1", 443), id="v6-bare-is-an-address"),
        pytest.param("h:65535", None, ("h", 65535), id="highest-port"),
    ],
)
def test_parse_host_port(text, default_port, expected):
    assert parse_host_port(text, default_port) == expected
    host, port = expected
    assert (
        parse_host_port(format_host_port(host, port)) == expected
    )  # the formatter's output reads back


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("example.com", "has no port", id="no-port"),
        pytest.param(":80", "names no host", id="no-host"),
        pytest.param("[]:80", "names no host", id="empty-brackets"),
        pytest.param("host:", "from 1 to 65535", id="empty-port"),
        pytest.param("host:http", "from 1 to 65535", id="named-port"),
        pytest.param("host:0", "from 1 to 65535", id="zero"),
        pytest.param("host:65536", "from 1 to 65535", id="too-big"),
        pytest.param("host:\u00b2", "from 1 to 65535", id="unicode-digit"),
        pytest.param("host:-1", "from 1 to 65535", id="negative"),
        pytest.param("host:" + "1" * 4400, "from 1 to 65535", id="4400-digits"),
        pytest.param("[::1", "expected \\[IPV6\\]:PORT", id="unclosed-bracket"),
        pytest.param("[::1]x80", "expected \\[IPV6\\]:PORT", id="junk-after-bracket"),
        # nginx keeps the brackets of `[allowed.test]` and serves its default server
        pytest.param("[allowed.test]:80", "only an IPv6 address", id="name-in-brackets"),
        pytest.param("[allowed.test]", "only an IPv6 address", id="name-in-brackets-no-port"),
        pytest.param("[10.0.0.1]:80", "only an IPv6 address", id="v4-in-brackets"),
    ],
)
def test_parse_host_port_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_host_port(text)


def test_port_zero_only_when_allowed():
    assert parse_host_port("localhost:0", allow_zero=True) == ("localhost", 0)
    assert (
        format_host_port("::1", 80) == "[::1]:80"
        and format_host_port("10.0.0.1", 80) == "10.0.0.1:80"
    )
