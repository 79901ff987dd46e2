"""The one canonicaliser: every name and address sandgate compares goes through here.

Rules, DNS questions, SNI, Host headers and `sandgate check` targets are all
normalised by these functions, so that a spelling trick (case, trailing dot,
Unicode lookalike, `0x7f.1`, `::ffff:169.254.169.254`) cannot make two views of the
same destination disagree. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_PLAIN_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # up to 63 characters
_PLAIN_NAME = re.compile(rf"(?:{_PLAIN_LABEL}\.)*{_PLAIN_LABEL}")
_HEX = re.compile(r"0x[0-9a-f]*")
_PREFIX = re.compile(r"0|[1-9][0-9]{0,2}")
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")

# Multi-label public suffixes common enough that `*.co.uk` is surely a mistake.
# Single-label suffixes (`*.com`) are caught by the two-label minimum.
_PUBLIC_SUFFIXES = frozenset(
    [
        "co.uk",
        "org.uk",
        "ac.uk",
        "gov.uk",
        "me.uk",
        "ltd.uk",
        "plc.uk",
        "net.uk",
        "com.au",
        "net.au",
        "org.au",
        "edu.au",
        "gov.au",
        "co.nz",
        "org.nz",
        "co.jp",
        "ne.jp",
        "or.jp",
        "ac.jp",
        "go.jp",
        "com.br",
        "net.br",
        "org.br",
        "com.cn",
        "net.cn",
        "org.cn",
        "gov.cn",
        "com.tw",
        "com.hk",
        "co.in",
        "net.in",
        "org.in",
        "co.za",
        "co.kr",
        "or.kr",
        "com.mx",
        "com.ar",
        "com.tr",
        "com.sg",
        "com.my",
        "co.id",
        "co.il",
        "com.ua",
        "github.io",
        "gitlab.io",
        "herokuapp.com",
        "appspot.com",
        "cloudfront.net",
        "amazonaws.com",
        "azurewebsites.net",
        "blogspot.com",
        "vercel.app",
        "netlify.app",
        "pages.dev",
        "workers.dev",
        "web.app",
        "firebaseapp.com",
    ]
)


_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


class InvalidName(ValueError):
    """The text is not a domain name (or not a valid domain pattern)."""


class InvalidAddress(ValueError):
    """The text is not an IP address or network."""


# --- addresses -----------------------------------------------------------------


def parse_ip(text: str) -> IPAddress | None:
    """The address `text` spells, in canonical form, or None if it spells none.

    Accepts every spelling a client library might resolve without DNS: dotted
    quad, the inet_aton short and numeric forms (`127.1`, `2130706433`,
    `0x7f.0.0.1`, `0177.0.0.1`), bracketed or zoned IPv6 (the zone is refused),
    and a trailing dot. IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes the IPv4 address.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        if ":" not in text:  # only IPv6 goes in brackets (`[10.0.0.1]` is no address)
            return None
        text = text[1:-1]
    if text.endswith(".") and ":" not in text:
        text = text[:-1]
    if not text or "%" in text:
        return None
    if ":" in text:
        try:
            return canonical_ip(ipaddress.IPv6Address(text))
        except ValueError:
            return None
    return _parse_ipv4_any(text)


def _parse_ipv4_any(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part[0] == "0":
            values.append(int(part, 8))
        elif len(part) > 10:
            # Over 4294967295, no part of an address; and int() raises past 4300
            # decimal digits (a Host header's). Bases 8 and 16 have no such limit.
            return None
        else:
            values.append(int(part))
    # inet_aton: every part but the last is one byte; the last fills the rest.
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for v in head:
        number = (number << 8) | v
    number = (number << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(number)


def canonical_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses become IPv4; everything else is returned as is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_network(text: str) -> IPNetwork:
    """An address or CIDR in canonical form (`::ffff:10.0.0.0/104` -> `10.0.0.0/8`).

    Raises InvalidAddress. Host bits must be zero (`10.0.0.1/8` is a typo, not a
    network) and the address part must be written plainly (no `0x`, no short form):
    a rule is for people to read.
    """
    address, _, prefix = text.strip().partition("/")
    # ipaddress takes zone ids (`fe80::1%eth0`, which no traffic address carries:
    # parse_ip refuses them), netmasks and host masks (`/255.0.0.0`, `/0.255.255.255`)
    # and `/08`. One spelling per network, as `rules show` prints it.
    if "%" in address:
        raise InvalidAddress(f"{text!r}: an address in a rule has no zone id ('%...')")
    if prefix and not _PREFIX.fullmatch(prefix):
        raise InvalidAddress(f"{text!r}: write the prefix length as a plain number, e.g. /8")
    try:
        network = ipaddress.ip_network(f"{address}/{prefix}" if prefix else address, strict=True)
    except ValueError as e:
        raise InvalidAddress(f"{text!r} is not an IP address or CIDR network: {e}") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


# Well-known addresses of clouds' own services (instance metadata, the host's agent,
# DNS, NTP): reachable only from inside that cloud, and a credential store or control
# channel when reached. Most lie in a range below (link-local, private, CGNAT); the
# ones in public address space are special ranges of their own ("cloud-internal").
# docs/rules.md lists each (a test checks).
CLOUD_INTERNAL_ADDRESSES: tuple[tuple[str, str], ...] = (
    (
        "169.254.169.254",
        "instance metadata: AWS, Azure, GCP, Oracle, IBM, DigitalOcean, OpenStack ...",
    ),
    ("169.254.169.253", "AWS VPC DNS resolver"),
    ("169.254.169.123", "AWS Time Sync"),
    ("169.254.170.2", "AWS ECS task metadata and credentials"),
    ("169.254.170.23", "AWS EKS Pod Identity agent"),
    ("fd00:ec2::254", "AWS instance metadata over IPv6"),
    ("fd00:ec2::253", "AWS VPC DNS resolver over IPv6"),
    ("fd00:ec2::23", "AWS EKS Pod Identity agent over IPv6"),
    ("fd20:ce::254", "GCP metadata over IPv6 (metadata.google.internal is 169.254.169.254)"),
    ("168.63.129.16", "Azure WireServer: host agent, DNS, health probes"),
    ("100.100.100.200", "Alibaba Cloud instance metadata"),
    ("192.0.0.192", "Oracle Cloud instance metadata (legacy address)"),
    ("169.254.0.23", "Tencent Cloud instance metadata"),
    ("169.254.42.42", "Scaleway instance metadata"),
    # IBM: both ranges are reserved in IBM's VPC API ("161.26.0.0/16 (IBM services)",
    # "166.8.0.0/14 (Cloud Service Endpoints)": the VPN server client_ip_pool text in
    # github.com/IBM-Cloud/terraform-provider-ibm, ibm/service/vpc/resource_ibm_is_vpn_server.go),
    # and IBM's docs list 161.26.0.0/16 in the "infrastructure services network" (DNS,
    # NTP, mirrors, storage) and 166.8.0.0/14 as the "endpoint service network"
    # (cloud.ibm.com/docs/vmwaresolutions, ports for deployment; cloud.ibm.com/docs/
    # security-groups?topic=security-groups-ibm-cloud-ip-ranges). Checked 2026-11.
    ("161.26.0.0/16", "IBM Cloud infrastructure service network (DNS, NTP, mirrors, storage)"),
    ("166.8.0.0/14", "IBM Cloud private service endpoints"),
)

_SPECIAL_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), kind)
    for net, kind in [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "private"),  # IETF protocol assignments
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "private"),  # benchmarking, used inside data centres
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
        # Cloud-internal addresses in public space (CLOUD_INTERNAL_ADDRESSES).
        ("161.26.0.0/16", "cloud-internal"),
        ("166.8.0.0/14", "cloud-internal"),
        ("168.63.129.16/32", "cloud-internal"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # deprecated site-local
        ("ff00::/8", "multicast"),
    ]
)


def _v4_table() -> tuple:
    """Per first octet: the kind of a wholly special /8 (`10`, `127`, `224`-`255`),
    None for a wholly public one, or the (mask, network, kind) ranges inside it.
    Integer tests (a range of /8 or wider holds whole blocks, a narrower one lies in
    its first octet's): built at import, where ipaddress objects cost ~7 ms."""
    v4 = [
        (int(net.netmask), int(net.network_address), net.prefixlen, kind)
        for net, kind in _SPECIAL_RANGES
        if net.version == 4
    ]
    table = []
    for octet in range(256):
        block = octet << 24
        ranges = [r for r in v4 if block & r[0] & 0xFF000000 == r[1] & 0xFF000000]
        whole = next((kind for _, _, prefix, kind in ranges if prefix <= 8), None)
        parts = tuple((mask, network, kind) for mask, network, _, kind in ranges)
        table.append(whole if whole is not None else parts or None)
    return tuple(table)


# special_range runs on every connection: integer tests on tables built once.
_V4_BY_OCTET = _v4_table()
_V6_RANGES = tuple(
    (int(net.netmask), int(net.network_address), kind)
    for net, kind in _SPECIAL_RANGES
    if net.version == 6
)


def _special_v4(number: int) -> str | None:
    entry = _V4_BY_OCTET[number >> 24]
    if entry is None or isinstance(entry, str):
        return entry
    for mask, network, kind in entry:
        if number & mask == network:
            return kind
    return None


def _embedded_ipv4(number: int) -> int | None:
    """The IPv4 address (as a number) an IPv6 address carries: 6to4, Teredo (the
    client), deprecated IPv4-compatible (`::a.b.c.d`) or NAT64 (64:ff9b::/96)."""
    if number >> 112 == 0x2002:
        return (number >> 80) & 0xFFFFFFFF
    if number >> 96 == 0x20010000:
        return ~number & 0xFFFFFFFF
    if number >> 32 == 0 and number > 1 or number >> 32 == 0x0064FF9B << 64:
        return number & 0xFFFFFFFF
    return None


def special_range(ip: IPAddress) -> str | None:
    """The kind of non-public range `ip` is in ("private", "loopback", "link-local",
    "cgnat", "multicast", "unspecified", "reserved", "cloud-internal"), or None for a
    public address.

    IPv4 carried inside IPv6 (mapped, compatible, 6to4, NAT64, Teredo) is checked as
    the IPv4 address it reaches.
    """
    return special_range_of(int(ip), ip.version)


def special_range_of(number: int, version: int) -> str | None:
    """special_range() of the address `number` of IP version `version`."""
    if version == 4:
        return _special_v4(number)
    if number >> 32 == 0xFFFF:  # IPv4-mapped: it is the IPv4 address
        return _special_v4(number & 0xFFFFFFFF)
    inner = _embedded_ipv4(number)
    if inner is not None:
        kind = _special_v4(inner)
        if kind is not None:
            return kind
    for mask, network, kind in _V6_RANGES:
        if number & mask == network:
            return kind
    return None


# --- names ---------------------------------------------------------------------


def parse_domain(text: str) -> str:
    """The canonical form of a domain name: lower case, no trailing dot, IDNA labels
    as punycode (`Bücher.Example.` -> `xn--bcher-kva.example`).

    Raises InvalidName for anything that is not a host name: IP literals in any
    spelling, NUL and other control bytes, empty or over-long labels, an all-numeric
    last label (clients would read it as an IPv4 address).
    """
    if not isinstance(text, str) or not text:
        raise InvalidName("empty name")
    # Fast path for the usual plain ASCII name; it accepts exactly what the checks
    # below accept for such a name (a name whose last label is not a number is not
    # an IP literal either), and sends everything else to them.
    name = text[:-1] if text[-1] == "." else text
    if len(name) <= MAX_NAME_LENGTH and _PLAIN_NAME.fullmatch(name):
        name = name.lower()
        if "xn--" not in name and not _ends_in_a_number(name[name.rfind(".") + 1 :]):
            return name
    if parse_ip(text) is not None:
        raise InvalidName(f"{text!r} is an IP address, not a domain name")
    # IDNA reads these as dots too (RFC 3490 3.1): `github。com` is github.com to a
    # browser, so it must be to us.
    text = text.translate(_IDNA_DOTS)
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise InvalidName("empty name")
    labels = [_canonical_label(label, text) for label in name.split(".")]
    name = ".".join(labels)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{text[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if _ends_in_a_number(labels[-1]):
        raise InvalidName(f"{text!r} ends in a number; clients would read it as an IPv4 address")
    return name


def _ends_in_a_number(last_label: str) -> bool:
    return last_label.isdigit() or _HEX.fullmatch(last_label) is not None


def _canonical_label(label: str, whole: str) -> str:
    if not label:
        raise InvalidName(f"{whole!r} has an empty label")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in label):
        raise InvalidName(f"{whole!r} contains a control character or space")
    if not label.isascii():
        deviation = next((c for c in label if c in _IDNA_DEVIATIONS), None)
        if deviation is not None:
            read_as = (
                repr(_IDNA_DEVIATIONS[deviation]) if _IDNA_DEVIATIONS[deviation] else "nothing"
            )
            raise InvalidName(
                f"{whole!r}: {deviation!r} is {read_as} to some clients "
                "(IDNA 2003) and kept by others (IDNA 2008), so the name is two names; "
                f"write the punycode of the one you mean ('xn--{_punycode(label)}')"
            )
        try:
            label = label.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise InvalidName(f"{whole!r}: label {label!r} is not valid IDNA ({e})") from None
    label = label.lower()
    if label.startswith("xn--") and not _valid_punycode(label):
        raise InvalidName(f"{whole!r}: label {label!r} is not valid punycode")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidName(f"{whole!r}: label {label[:20]!r}... is longer than 63 characters")
    if not _LABEL.fullmatch(label):
        raise InvalidName(f"{whole!r}: label {label!r} has characters a host name cannot have")
    return label


# IDNA 2003 (Python's "idna" codec, so Python clients) maps these away; IDNA 2008 /
# UTS 46 non-transitional (browsers, curl, the `idna` package) keeps them: `faß.de`
# is `fass.de` to one client and `xn--fa-hia.de` to another, two registrable names.
# In Unicode form such a name is refused; its punycode is one name and is accepted.
_IDNA_DEVIATIONS = {"\u00df": "ss", "\u03c2": "\u03c3", "\u200c": "", "\u200d": ""}


def _punycode(label: str) -> str:
    try:
        return label.lower().encode("punycode").decode("ascii")
    except UnicodeError:
        return "..."


def _valid_punycode(label: str) -> bool:
    """Whether an `xn--` label is the punycode of a valid IDNA label: one IDNA 2003
    reads back unchanged, or one that differs from that only by a deviation
    character (`xn--fa-hia` is `faß`), which IDNA 2008 clients send as is."""
    try:
        label.encode("ascii").decode("idna")
        return True
    except UnicodeError:
        pass
    try:
        text = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return False
    if text.isascii() or not any(c in _IDNA_DEVIATIONS for c in text):
        return False
    try:
        "".join(_IDNA_DEVIATIONS.get(c, c) for c in text).encode("idna")
    except UnicodeError:
        return False
    return True


class DomainPattern(NamedTuple):
    """A rule's domain: `example.com` (exact) or `*.example.com` (wildcard: any name
    strictly below `example.com`, never `example.com` itself)."""

    domain: str
    wildcard: bool

    def __str__(self) -> str:
        return f"*.{self.domain}" if self.wildcard else self.domain


_SUFFIX_LISTS: dict[bool, object] = {}


def is_public_suffix(domain: str, private: bool) -> bool:
    """Whether `domain` is a public suffix of the Public Suffix List (the publicsuffixlist
    package's copy): one of its ICANN section (`co.uk`, `com.pl`), or with `private`
    also one under which anyone can register a name of their own (`github.io`,
    `ngrok-free.app`, `s3.amazonaws.com`). Read on first use (~25 ms)."""
    found = _SUFFIX_LISTS.get(private)
    if found is None:
        from publicsuffixlist import PublicSuffixList

        found = _SUFFIX_LISTS[private] = PublicSuffixList(only_icann=not private)
    return found.is_public(domain)


def parse_domain_pattern(text: str, every_public_suffix: bool = False) -> DomainPattern:
    """Parse a rule's domain or `*.` wildcard. Raises InvalidName with a fix.

    A wildcard whose domain is a public suffix is refused: the Public Suffix List's
    ICANN section and _PUBLIC_SUFFIXES (hosting suffixes common in rules), or with
    `every_public_suffix` (an approver's `--widen`) the whole list, private section
    included: a wildcard there matches names anyone can register."""
    if text.startswith("*."):
        if "*" in text[2:]:  # before parse_domain, which would blame the label '*'
            raise InvalidName(f"{text!r}: only one leading '*.' is allowed")
        base = parse_domain(text[2:])
        if (
            "." not in base
            or base in _PUBLIC_SUFFIXES
            or is_public_suffix(base, private=every_public_suffix)
        ):
            raise InvalidName(
                f"{text!r} would match every name under the public suffix {base!r}"
                + (" (anyone can register a name there)" if every_public_suffix else "")
                + "; name the registered domain, e.g. '*.example.com'"
            )
        return DomainPattern(base, True)
    if text.strip() == "*":
        raise InvalidName("'*' would allow everything; use the profile's 'fallback' instead")
    if "*" in text:
        raise InvalidName(
            f"{text!r}: a wildcard may only be a whole leftmost label ('*.example.com')"
        )
    return DomainPattern(parse_domain(text), False)


def parent_domains(name: str):
    """Yield the proper parent domains of a canonical name, nearest first:
    `a.b.example.com` -> `b.example.com`, `example.com`, `com`."""
    index = name.find(".")
    while index != -1:
        yield name[index + 1 :]
        index = name.find(".", index + 1)


# --- request paths ---------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def parse_path(path: str) -> str:
    """The canonical form of a request path (no query), as a server would resolve it.

    Path rules are checked on this form, so that `/repos/../user/keys`,
    `/repos/%2e%2e/user` or `//admin` cannot slip past `paths: ["/repos/**"]` or a
    deny on `/admin/**`: escaped unreserved characters are decoded (RFC 3986 6.2.2.2),
    other escapes upper-cased (`%2f` stays an escape: it is not a segment break),
    repeated slashes merged, and `.`/`..` segments removed (RFC 3986 5.2.4).
    """

    def unescape(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    parts = _ESCAPE.sub(unescape, path).split("/")
    segments: list[str] = []
    for segment in parts:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    # `/a/` and `/a/b/..` name a directory: keep the trailing slash.
    trailing = "/" if segments and parts[-1] in ("", ".", "..") else ""
    return "/" + "/".join(segments) + trailing


class PathReadings(NamedTuple):
    """A request path as the rules read it (path_readings): `canonical` (parse_path's,
    what is forwarded), `denied` (the readings a deny is matched against: any that
    matches denies) and `allowed` (those an allow or ask must all match). `too_many`:
    the readings passed MOST_READING_CHARS and were not all made; a path rule refuses
    such a path (decide)."""

    canonical: str
    denied: tuple[str, ...]
    allowed: tuple[str, ...]
    too_many: bool = False


# What the readings of one path may hold in all. Each kind of reading multiplies them
# (a number's, a script's, a view's, a cut, a split), and a task's 64 KiB path of each
# kind made 144 readings, 9 MB to match every deny against (a red team, session 52).
# 1 MiB holds every reading of a 7 KiB path.
MOST_READING_CHARS = 1 << 20


# Decoded in a deny's reading: a printable ASCII character that servers decode before
# they route though RFC 3986 keeps it apart (`%40` is `@` to nginx, Werkzeug and
# http.server). Not `%` (refused where it makes an escape: request_head), `/ \ . ;`
# (refused), `? #` (the cut reading's).
_KEPT_ESCAPED = frozenset("%/\\.;?#")
_CUT = re.compile(r"%(?:23|3F)|[?#]")  # `？` (U+FF1F) folds to `?`


def decoded_printable(path: str) -> str:
    """`path` with its escapes of printable ASCII characters decoded, but for those
    kept escaped (_KEPT_ESCAPED): how a server that decodes before routing reads it;
    also a deny glob written escaped (`/c%2B%2B/**` denies `/c++/x` too: load.py)."""

    def decoded(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if " " <= char <= "~" and char not in _KEPT_ESCAPED else match.group()

    return _ESCAPE.sub(decoded, path) if "%" in path else path


_NON_ASCII_ESCAPES = re.compile(r"(?:%[89A-Fa-f][0-9A-Fa-f])+")


def folded(path: str) -> str:
    """`path` with each escaped character outside ASCII that has an ASCII reading
    (ascii_folds: by its case, `ı` is `i` to Django's `(?i)`, the Kelvin sign `k` to
    Fastify's case-insensitive routes; or by NFKC, fullwidth `ａ` is `a`) put as that,
    and the others lower-cased (escaped again, hex upper case): how a server that
    folds case or compatibility forms reads it. A deny matches this reading too, and
    its globs written so (load._compile_paths), so `/adm%C4%B1n/` is `/admin/` and
    `/CAF%C3%89` `/caf%C3%A9`."""
    if "%" not in path:
        return path
    from .ascii_folds import FOLDS  # only for paths with such escapes (its import ~1 ms)

    def fold(match: re.Match[str]) -> str:
        try:
            text = bytes.fromhex(match.group().replace("%", "")).decode()
        except UnicodeDecodeError:
            return match.group()
        if FOLDS.keys().isdisjoint(text) and text.lower() == text:
            return match.group()  # most text: CJK, lower-case letters
        return "".join(FOLDS.get(c) or _escaped(c.lower()) for c in text)

    return _NON_ASCII_ESCAPES.sub(fold, path)


def _escaped(text: str) -> str:
    return "".join(f"%{byte:02X}" for byte in text.encode())


def path_readings(path: str) -> PathReadings:
    """The readings of a request path (no query) a server may act on, for the rules
    (a red team, session 50): the canonical form (parse_path); that form with every
    escape of a printable ASCII character decoded, which nginx or Werkzeug route by
    (`/%40internal` past a deny of `/@internal/**`); and each cut at its first `%23` or
    `%3F`, where a proxy that decodes the path once and passes it on (nginx's
    `proxy_pass http://app$uri`, HAProxy's `url_dec`, Apache's `[P,NE]`) makes it end
    (`/admin/secret.txt%23.tar.gz` under an allow of `/**/*.tar.gz`); and each with an
    escaped '/' read as one. A deny's readings also read the path as a case-folding
    server (folded), a decimal parser (_as_numbers), a front controller
    (_behind_scripts), traversal (_as_views) and Go's module proxy (_as_module_paths)
    do. A deny takes the request if it
    matches any; an allow (or ask) only if it matches the canonical form, its cut, and
    those with '/' read: the decoded form would refuse a glob written escaped
    (`/c%2B%2B/**`). Past MOST_READING_CHARS the readings are not all made
    (`too_many`)."""
    canonical = parse_path(path)
    if "%" not in canonical:
        denied = (canonical,)
        if _POINT_OR_EXPONENT.search(canonical):
            denied = _as_numbers(denied)
        if "." in canonical and _SCRIPT.search(canonical):
            denied = _behind_scripts(denied)
        if "/@@" in canonical:
            denied = _as_views(denied)
        if "!" in canonical:
            denied = _as_module_paths(denied)
        return PathReadings(canonical, denied, (canonical,))
    plain = decoded_printable(canonical)
    denied = (canonical, plain)
    if _NON_ASCII_ESCAPES.search(plain):  # and as a server folding case reads it
        denied += (folded(plain),)
    # A number's, a script's and a view's reading each change a segment, or cut what
    # comes before one, and commute with the cuts and splits below: read first, each
    # on as few readings as it can be. Read in every one, a task's 64 KiB path of
    # 21,000 decimals held the loop 3.5 s (a red team, session 52).
    denied = tuple(dict.fromkeys(denied))
    stages = [
        (reading_of, more)
        for reading_of, more, needed in (
            (_as_numbers, 2, any(map(_POINT_OR_EXPONENT.search, denied))),
            (_behind_scripts, 3, any(map(_SCRIPT.search, denied))),
            (_as_views, 2, any("@@" in reading for reading in denied)),
            (_as_module_paths, 2, any("!" in reading for reading in denied)),
            (_with_cuts, 2, any(map(_CUT.search, denied))),
            (_with_splits, 2, "%2F" in canonical),
        )
        if needed
    ]
    # At most this many readings: refused before any is made (a number's reading may
    # be longer, `1e15`: summed after each too).
    if len(denied) * math.prod(more for _, more in stages) * len(canonical) > MOST_READING_CHARS:
        return PathReadings(canonical, denied, (canonical,), too_many=True)
    for reading_of, _ in stages:
        denied = reading_of(denied)
        if sum(map(len, denied)) > MOST_READING_CHARS:
            return PathReadings(canonical, denied, (canonical,), too_many=True)
    allowed = _with_splits(_with_cuts((canonical,)))
    return PathReadings(canonical, denied, allowed)


# A script's name followed by more path: PHP, CGI and the like run the script with the
# rest as its PATH_INFO, and a front controller (Symfony, Laravel, Drupal, CodeIgniter,
# WordPress) routes by it: `/index.php/admin` runs the route `/admin` (a red team,
# session 51).
_SCRIPT = re.compile(
    r"(?i)\.(?:php[0-9]?|phtml|pht|phar|cgi|fcgi|pl|py|wsgi|rb|aspx?|asmx|ashx|svc|cfm|dll|exe)"
    r"(?=/|%2F)"
)


def _behind_scripts(readings: tuple[str, ...]) -> tuple[str, ...]:
    """`readings`, and each with what a script before the rest of it is cut off: the
    path a front controller routes by. A deny matches them all. Behind the first
    script's name and the last's only (a server runs the first that is a file; the
    last is what a path of many names would route by): one reading per script was a
    task's 64 KiB path of them held 11 s of the loop (a red team, session 51)."""
    behind = []
    for reading in readings:
        if "." in reading:
            ends = [match.end() for match in _SCRIPT.finditer(reading)]
            if ends:
                behind += (reading[ends[0] :], reading[ends[-1] :])
    return tuple(dict.fromkeys((*readings, *behind)))


def _with_splits(readings: tuple[str, ...]) -> tuple[str, ...]:
    """`readings`, and each with an escaped '/' read as one: it is part of a name to
    some servers (npm's `/@scope%2fname`, GitLab's `/projects/group%2Fname`) and a
    segment break to those that decode before they route (nginx). request_head refuses
    the paths where that makes an empty or dot segment."""
    more = tuple(reading.replace("%2F", "/") for reading in readings if "%2F" in reading)
    return tuple(dict.fromkeys((*readings, *more))) if more else readings


def _with_cuts(readings: tuple[str, ...]) -> tuple[str, ...]:
    """`readings`, and each cut at its first `%23` or `%3F` (or `#`, `?` in a folded
    reading): where a proxy that decodes the path once makes it end."""
    return tuple(dict.fromkeys((*readings, *(_CUT.split(r, 1)[0] or "/" for r in readings))))


_MODULE_CASE = re.compile(r"!([a-z])")


def _as_module_paths(readings: tuple[str, ...]) -> tuple[str, ...]:
    """`readings`, and each with Go's module path escape of a capital (`!o` for `O`)
    read as the letter: the module proxy fetches `/github.com/!evil!corp/x/@v/list`
    from `github.com/EvilCorp/x`, which GitHub serves as `evilcorp/x`, and a deny
    ignores case."""
    more = tuple(module_path(reading) for reading in readings if "!" in reading)
    return tuple(dict.fromkeys((*readings, *more))) if more else readings


def module_path(path: str) -> str:
    """`path` with Go's module path escapes of capitals read as the letters (a deny
    ignores case; also a deny glob written escaped, load._compile_paths)."""
    return _MODULE_CASE.sub(r"\1", path) if "!" in path else path


def _as_views(readings: tuple[str, ...]) -> tuple[str, ...]:
    """`readings`, and each with the `@@` that starts a segment taken off: Pyramid's
    traversal (and Zope's) reads `/@@admin` as the view `admin`, which a deny of
    `/admin/**` names (a red team, session 52)."""
    more = tuple(
        reading.replace("/@@", "/").replace("%2F@@", "%2F")
        for reading in readings
        if "@@" in reading
    )
    return tuple(dict.fromkeys((*readings, *more))) if more else readings


# A segment that begins with a decimal number written with a point or an exponent:
# JavaScript's Number() and parseFloat(), MySQL comparing a string with an integer
# column and Python's float() read `4.2e1`, `420e-1`, `.42e2` and `41.99999999999999999`
# (rounded) as 42, and PHP's (int) and int(float()) truncate `4.25e1` to 42, where an
# integer's reading (load._number) stops at the point. After a `/`, an escaped one
# (`%2F`, read as one later) or a view's `@@` (kept); any blanks or `+` before it (the
# folded reading has a space for other blanks and the byte order mark); `_` between
# digits (float()).
_POINT_OR_EXPONENT = re.compile(r"[0-9]\.|\.[0-9]|[0-9][eE]")
_SEGMENT_BREAK = re.compile(r"(/|%2F)")  # kept by split(): the pieces between are segments
_DECIMAL = re.compile(
    r"((?:@@)?)[ +]*(-?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?)"
)
_EXACT_IN_A_DOUBLE = 2**53


def _as_numbers(readings: tuple[str, ...]) -> tuple[str, ...]:
    """`readings`, and each with its segments that a decimal parser reads as a number
    written as that number, truncated (`/projects/4.2e1` and `/projects/4.25e1` as
    `/projects/42`), for a deny's number segment to take (a red team's "left alone",
    session 51, closed in 52). A segment's text is read once (`_as_number`)."""
    known: dict[str, str] = {}
    more = []
    for reading in readings:
        if not _POINT_OR_EXPONENT.search(reading):
            continue
        pieces = _SEGMENT_BREAK.split(reading)
        for at, piece in enumerate(pieces):
            if (number := known.get(piece)) is None:
                number = known[piece] = _as_number(piece)
            pieces[at] = number
        more.append("".join(pieces))
    return tuple(dict.fromkeys((*readings, *more))) if more else readings


def _as_number(segment: str) -> str:
    """`segment` with the decimal it starts with (after a view's `@@`, blanks or `+`)
    written as the integer a decimal parser truncates it to; as it is where it starts
    with none, with an integer (the deny's number segment reads those), or with one
    past what a double holds."""
    match = _DECIMAL.match(segment)
    literal = match.group(2) if match else ""
    if not literal or "." not in literal and "e" not in literal and "E" not in literal:
        return segment
    try:
        value = float(literal.replace("_", ""))  # linear in its length, rounded as Number()
    except ValueError:
        return segment
    if not -_EXACT_IN_A_DOUBLE <= value <= _EXACT_IN_A_DOUBLE:  # and not inf, nan
        return segment
    return match.group(1) + str(math.trunc(value)) + segment[match.end() :]


# --- host:port -----------------------------------------------------------------


def parse_host_port(
    text: str, default_port: int | None = None, *, allow_zero: bool = False
) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, or a bare host or IPv6 address (then `default_port`,
    if given) -> (host, port), the host without brackets and otherwise as written.

    Raises ValueError with a one-line message: no host, no port where one is
    needed, a port that is not a number from 1 (0 with `allow_zero`: "any free
    port") to 65535. A bare IPv6 address with a port is ambiguous (`::1:80`): it is
    read as an address, so write `[::1]:80`."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        # Brackets hold an IPv6 address only (RFC 3986's IP-literal). `[allowed.test]`
        # read as allowed.test was a name no server reads so: nginx keeps the
        # brackets, matches no server_name and serves its default virtual host.
        if host and not _is_ipv6(host):
            raise ValueError(f"{text!r}: only an IPv6 address goes in brackets")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a bare host, or a bare IPv6 address
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r} names no host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port")
        return host, default_port
    lowest = 0 if allow_zero else 1
    digits = port_text.lstrip("0") or "0"  # int() raises past 4300 digits, zeros too
    if not (
        port_text.isascii()
        and port_text.isdigit()
        and len(digits) <= 5
        and lowest <= int(digits) <= 65535
    ):
        raise ValueError(f"{text!r}: the port must be a number from {lowest} to 65535")
    return host, int(digits)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def format_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets: what parse_host_port reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
