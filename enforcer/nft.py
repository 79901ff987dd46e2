"""The kernel half of enforcement: one nftables table of sandgate's own.

`render_ruleset` is pure and golden-file tested: the definition of a sandbox's table.
`load_table` loads it as nf_tables netlink messages of our own (enforcer/nft_wire.py
says why; tests/unit/test_nft_wire.py holds it to the text), and a table's deletion
is one such message. The other helpers are thin wrappers around libnftables (the
library behind the `nft` command, through ctypes: ~0.3 ms a call instead of ~5 ms for
starting `nft`), or the `nft` command where the library cannot be loaded. Nothing
outside the configured table is ever read or changed.

What the ruleset does to packets that arrive on a sandbox interface (the host's
own traffic is not matched by any rule):

1. chain `early` (prerouting, before NAT), in order:
   the sandbox kernel's own multicast listener reports (MLD) -> drop uncounted;
   IPv6 -> drop; a source address that is not routed back through the interface
   it came in on (a sandbox posing as another) -> drop; DNS over UDP past the
   sandbox's DNS rate -> drop, the rest (53/udp, to any address) -> on to NAT; a
   TCP SYN past the sandbox's connection rate -> drop (every new TCP connection,
   DNS over TCP's too: only UDP's accept comes before it); DNS over TCP (53/tcp,
   to any address) -> on to NAT; a TCP SYN to an address routed out of a sandbox
   interface (another sandbox) -> drop; any address of the gateway itself -> drop
   (its metrics and control ports, and the proxy port, which would make mitmproxy
   connect to itself in a loop); UDP (QUIC too), ICMP, anything else not TCP ->
   drop.
2. chain `nat_prerouting`: DNS -> the DNS filter's port; other TCP -> the proxy's
   transparent port (SO_ORIGINAL_DST keeps the real destination).
3. chain `input`: only packets redirected by (2) to those two ports get through.
4. chain `forward`: nothing is routed to or from a sandbox (and what a sandbox
   would have the gateway connect to in another is dropped in (1)).
5. chain `output`: the host sends a sandbox only answers: a new flow from the host
   into it (the gateway connecting to an address a name it resolved itself led to,
   anything on the host dialling the task's listeners) -> drop, uncounted (the task
   sent nothing).

Each drop counts in a named counter (`read_counters`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sandgate.enforcer import nft_wire

NFT = "nft"
_TIMEOUT_S = 30

# Named counters, one per reason a sandbox's packet is dropped.
COUNTERS = (
    "dropped_ipv6",
    "dropped_spoofed",
    "dropped_to_gateway",
    "dropped_udp",
    "dropped_dns_flood",
    "dropped_connect_flood",
    "dropped_icmp",
    "dropped_other",
    "dropped_input",
    "dropped_forward",
)

# DNS over UDP a sandbox may send, packets a second (bursts of as many): at most this,
# which no profile's dns_qps may exceed (policy.model.MAX_LIMITS.dns_qps), and for a
# profile twice its dns_qps (`dns_packet_rate`). The gateway checks a sandbox's rate
# only once it has read its queries, and every sandbox of a gateway worker shares its
# one DNS socket: a task sending 100,000 a second filled its receive queue, and the
# kernel dropped the other sandboxes' queries there (their lookups took 5-10 s, the
# resolver's retries). Counted here, apart from the other drops.
DNS_PACKETS_PER_S = 1000


def table_rates(limits) -> dict[str, int]:
    """A sandbox table's rates for its profile's `limits` (policy.model.Limits):
    RulesetConfig's `connection_rate` and `dns_rate`."""
    return {"connection_rate": limits.connection_rate, "dns_rate": dns_packet_rate(limits.dns_qps)}


def dns_packet_rate(dns_qps: int) -> int:
    """The UDP DNS packets a second (bursts of as many) a sandbox's table lets through
    for its profile's `dns_qps`: twice it, at most DNS_PACKETS_PER_S. The gateway
    answers dns_qps a second, REFUSES as many more, and drops the rest unanswered
    (docs/rules.md, dns_qps): each of those it had to read first. 16 sandboxes
    flooding at 1,000 a second each kept a worker of this project's 2-core machine
    busy refusing (an honest sandbox's lookups timed out); dropped here, what the
    gateway would not answer costs it nothing."""
    return max(1, min(DNS_PACKETS_PER_S, 2 * dns_qps))


# New TCP connections (SYNs) a sandbox may open a second, bursts of as many, unless its
# profile says otherwise (`limits: connection_rate`, policy.model.Limits, read when the
# sandbox's table is made). The worker accepts on one listening socket for all its
# sandboxes: 16 tasks churning (connect, ClientHello, close, each 100-200 a second)
# queued ahead of every other sandbox's connection and cost the worker a handshake
# parse and an upstream connect each (an honest sandbox's requests then took up to
# 0.9 s). A dropped SYN costs the gateway nothing; the task's kernel retries it a
# second later. Every new TCP connection counts, to any port, DNS over TCP's too
# (when its accept came first, a task opened ~7,000 a second into the worker's DNS
# listener). Counted apart from the other drops.
CONNECTIONS_PER_S = 200

# ICMPv6 the sandbox's kernel sends by itself when eth0 comes up (joining the
# solicited-node groups of its link-local address): dropped like all IPv6, but not
# counted, because the task sent nothing. The task cannot send these itself: it
# has no raw sockets in the sandbox's netns (owned by the initial user namespace).
_KERNEL_MLD = "mld-listener-report, mld-listener-done, mld2-listener-report"

# Every sandbox's host-end interface (netns.HOST_IF_PREFIX + its id). A sandbox's SYN
# to an address routed out of one is dropped (`dropped_forward`): the gateway would
# connect to that other sandbox for it, from the host, whatever rule opened the
# address (`allow: 10.0.0.0/8` holds the pool 10.213.0.0/16), and the other task's
# kernel would see the SYN (its own table drops the answer: a channel of ports).
# Only a SYN: no other packet makes the gateway connect anywhere.
ALL_SANDBOX_IFACES = nft_wire.ALL_SANDBOX_IFACES

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# An interface name (at most 15 characters), or a prefix of one followed by "*".
_IFACES = re.compile(r"[A-Za-z0-9_.-]{1,15}|[A-Za-z0-9_.-]{1,14}\*")


class NftError(RuntimeError):
    """`nft` failed or is missing; the message carries nft's own error text."""


@dataclass(frozen=True)
class RulesetConfig:
    table: str
    sandbox_ifaces: str
    proxy_port: int
    dns_port: int
    connection_rate: int = CONNECTIONS_PER_S
    dns_rate: int = DNS_PACKETS_PER_S  # dns_packet_rate of the sandbox's profile

    def __post_init__(self) -> None:
        if not _TABLE.fullmatch(self.table):
            raise ValueError(f"bad nft table name {self.table!r}")
        if not _IFACES.fullmatch(self.sandbox_ifaces):
            raise ValueError(
                f"bad interface pattern {self.sandbox_ifaces!r}: a name of at most 15 "
                'characters, or a prefix followed by "*"'
            )
        for name in ("proxy_port", "dns_port"):
            port = getattr(self, name)
            if type(port) is not int or not 1 <= port <= 65535:
                raise ValueError(f"bad {name} {port!r}")
        if self.proxy_port == self.dns_port:
            raise ValueError("proxy_port and dns_port must differ")
        for name in ("connection_rate", "dns_rate"):
            rate = getattr(self, name)
            if type(rate) is not int or rate < 1:
                raise ValueError(f"bad {name} {rate!r}")


def render_ruleset(cfg: RulesetConfig, *, new: bool = False) -> str:
    """Text for `nft -f -` that atomically replaces table `inet <cfg.table>`, or with
    `new`, creates it (the load fails if a table of that name exists: never a merge
    into a table that is not this sandbox's).

    The leading `table` + `delete table` pair makes the load work whether or not
    the table exists, in one transaction (nft 1.0.6 has no `destroy`). A table made
    for a fresh sandbox id does without it: a transaction that deletes anything
    leaves work for the kernel's destroy worker, and closing a netlink socket waits
    for that worker, an RCU grace period (10-15 ms of every `sandgate run` when the
    table went through libnftables, whose socket closes after each call).

    The definition of the table `load_table` loads (as netlink messages that make
    the same table: tests/unit/test_nft_wire.py).
    """
    t, sbx = cfg.table, f'iifname "{cfg.sandbox_ifaces}"'
    counters = "\n".join(f"\tcounter {name} {{\n\t}}" for name in COUNTERS)
    head = f"create table inet {t}\n" if new else f"table inet {t}\ndelete table inet {t}\n"
    return f"""\
{head}table inet {t} {{
{counters}

\tchain early {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\t{sbx} icmpv6 type {{ {_KERNEL_MLD} }} drop
\t\t{sbx} meta nfproto ipv6 counter name "dropped_ipv6" drop
\t\t{sbx} fib saddr . iif oif missing counter name "dropped_spoofed" drop
\t\t{sbx} udp dport 53 limit rate over {cfg.dns_rate}/second burst {cfg.dns_rate} packets counter name "dropped_dns_flood" drop
\t\t{sbx} udp dport 53 accept
\t\t{sbx} tcp flags & (syn | ack) == syn limit rate over {cfg.connection_rate}/second burst {cfg.connection_rate} packets counter name "dropped_connect_flood" drop
\t\t{sbx} tcp dport 53 accept
\t\t{sbx} tcp flags & (syn | ack) == syn fib daddr oifname "{ALL_SANDBOX_IFACES}" counter name "dropped_forward" drop
\t\t{sbx} fib daddr type local counter name "dropped_to_gateway" drop
\t\t{sbx} meta l4proto udp counter name "dropped_udp" drop
\t\t{sbx} meta l4proto icmp counter name "dropped_icmp" drop
\t\t{sbx} meta l4proto != tcp counter name "dropped_other" drop
\t}}

\tchain nat_prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\t{sbx} udp dport 53 redirect to :{cfg.dns_port}
\t\t{sbx} tcp dport 53 redirect to :{cfg.dns_port}
\t\t{sbx} meta nfproto ipv4 meta l4proto tcp redirect to :{cfg.proxy_port}
\t}}

\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\t{sbx} ct status dnat tcp dport {{ {cfg.proxy_port}, {cfg.dns_port} }} accept
\t\t{sbx} ct status dnat udp dport {cfg.dns_port} accept
\t\t{sbx} counter name "dropped_input" drop
\t}}

\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\t{sbx} counter name "dropped_forward" drop
\t\toifname "{cfg.sandbox_ifaces}" counter name "dropped_forward" drop
\t}}

\tchain output {{
\t\ttype filter hook output priority filter; policy accept;
\t\toifname "{cfg.sandbox_ifaces}" ct state new drop
\t}}
}}
"""


def render_guard(
    table: str,
    proxy_port: int | Sequence[int],
    dns_port: int | Sequence[int],
    sandbox_ifaces: str = "sgh-*",
) -> str:
    """The gateway service's own table: its listeners bind every address of the
    namespace (one front door for all sandboxes), so whatever reaches their ports
    from anywhere but a sandbox interface (the LAN, the host itself) is dropped
    here. The sandboxes' own tables decide their traffic. With workers, each has
    its own two ports: pass every worker's."""
    proxy_ports = [proxy_port] if isinstance(proxy_port, int) else list(proxy_port)
    dns_ports = [dns_port] if isinstance(dns_port, int) else list(dns_port)
    for proxy, dns in zip(proxy_ports, dns_ports, strict=True):
        RulesetConfig(table=table, sandbox_ifaces=sandbox_ifaces, proxy_port=proxy, dns_port=dns)
    tcp = ", ".join(map(str, [*proxy_ports, *dns_ports]))
    udp = ", ".join(map(str, dns_ports))
    udp = f"{{ {udp} }}" if len(dns_ports) > 1 else udp
    return f"""\
table inet {table}
delete table inet {table}
table inet {table} {{
\tchain input {{
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tiifname "{sandbox_ifaces}" accept
\t\ttcp dport {{ {tcp} }} counter drop
\t\tudp dport {udp} counter drop
\t}}
}}
"""


def apply_ruleset(text: str) -> None:
    """Load `text` with one `nft -f -` (one transaction: all of it or none)."""
    _run_nft(["-f", "-"], stdin=text)


def load_table(cfg: RulesetConfig, *, new: bool = False) -> None:
    """Load the table `render_ruleset(cfg, new=new)` says, in one transaction: with
    `new` created (refused if a table of that name exists), else replaced (made first
    if missing, as the text's leading `table` does). Netlink messages of our own, not
    libnftables: beside 256 other sandboxes' tables its load took 52-73 ms, this
    ~2 ms (nft_wire says why)."""
    messages = nft_wire.sandbox_table(cfg, COUNTERS)
    if not new:
        messages[:0] = [nft_wire.table_message(cfg.table), nft_wire.delete_table_message(cfg.table)]
    what = f"{'create' if new else 'replace'} table inet {cfg.table}"
    try:
        nft_wire.commit(messages, _TIMEOUT_S)
    except nft_wire.WireError as e:
        raise NftError(f"{what} failed: {e.strerror}") from e


def delete_table(table: str) -> bool:
    """Delete table `inet <table>`: True, or False when there is no such table. Once
    it returns, the table filters nothing.

    One NFT_MSG_DELTABLE in a batch of its own (nft_wire), not libnftables, whose
    delete took 22 ms beside 16 other sandboxes' tables and 62 beside 256
    (bench/bench_nft.py); this one message is answered in ~1 ms whatever is beside
    it, on a socket that stays open (closing it would wait 10-15 ms for the kernel to
    free the table: nft_wire.commit)."""
    if not _TABLE.fullmatch(table):
        raise ValueError(f"bad nft table name {table!r}")
    try:
        nft_wire.commit([nft_wire.delete_table_message(table)], _TIMEOUT_S)
    except nft_wire.WireError as e:
        if e.errno == errno.ENOENT:
            return False
        raise NftError(f"delete table inet {table} failed: {e.strerror}") from e
    return True


def list_tables(prefix: str = "sandgate") -> list[str]:
    """Names of the `inet` tables whose name starts with `prefix`."""
    return sorted(
        obj["table"]["name"]
        for obj in _nft_json(["list", "tables", "inet"])
        if "table" in obj
        and obj["table"].get("family") == "inet"
        and obj["table"]["name"].startswith(prefix)
    )


def read_counters(table: str) -> dict[str, int]:
    """Packets per named counter of table `inet <table>`, on every task's end.

    One netlink dump of the table's counters (nft_wire.counters), not libnftables:
    its `list counters table` read every table's objects and rules, then more per
    table (11.7 s beside 256 other sandboxes' tables, under the lock every nft call
    takes), and its `list table` built a cache of the table each time (1.7 ms, 3.4 ms
    beside 256; libnftables' caches were most of a service's heap growth under a
    crowd, session 30). NftError when there is no such table."""
    if not _TABLE.fullmatch(table):
        raise ValueError(f"bad nft table name {table!r}")
    try:
        found = nft_wire.counters(table, _TIMEOUT_S)
    except nft_wire.WireError as e:
        raise NftError(f"list counters of table inet {table} failed: {e.strerror}") from e
    if not found:
        raise NftError(f"list counters of table inet {table}: no such table")
    return found


def _nft_json(args: list[str]) -> list[dict]:
    out = _run_nft(["-j", *args])
    try:
        return json.loads(out)["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise NftError(f"nft -j {' '.join(args)}: unexpected output: {e}") from e


def _run_nft(args: list[str], stdin: str | None = None) -> str:
    library = _libnftables()
    if library is not None and _low_descriptor_free():
        return _run_library(library, args, stdin)
    try:
        proc = subprocess.run(
            [NFT, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as e:
        raise NftError(f"{NFT!r} not found: install the nftables package") from e
    except subprocess.TimeoutExpired as e:
        raise NftError(f"nft {' '.join(args)}: no answer after {_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


# --- libnftables ---------------------------------------------------------------------

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4
_library_lock = threading.Lock()  # one command at a time, as `nft` processes would be
_library: ctypes.CDLL | None | bool = False  # False: not tried yet


# libnftables waits on its netlink socket with select(), whose fd_set holds only
# descriptors below FD_SETSIZE: given a higher one, glibc aborts the whole process
# ("bit out of range 0 - FD_SETSIZE on fd_set"). A gateway service whose sandboxes hold
# a thousand connections has no lower one free, and the next attach killed it (every
# sandbox's egress with it): then the `nft` command runs it, in a process of its own.
FD_SETSIZE = 1024
_FD_MARGIN = 32  # descriptors other threads may take between the look and the library's socket


def _low_descriptor_free() -> bool:
    """Whether the descriptor the library's socket would get (the lowest free) is
    well below FD_SETSIZE."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # none at all: `nft` says so in its own words
    os.close(fd)
    return fd < FD_SETSIZE - _FD_MARGIN


def _libnftables() -> ctypes.CDLL | None:
    global _library  # noqa: PLW0603 - loaded once, on first use
    if _library is False:
        try:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        except OSError:
            _library = None
        else:
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, name).argtypes = [ctypes.c_void_p]
            for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
                getattr(lib, name).restype = ctypes.c_char_p
                getattr(lib, name).argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _library = lib
    return _library


def _run_library(lib: ctypes.CDLL, args: list[str], stdin: str | None) -> str:
    """What `nft ARGS` would print, for the two forms used here: `-f -` with the
    commands on stdin, and `[-j] COMMAND...`."""
    as_json = args[:1] == ["-j"]
    command = stdin if args[-2:] == ["-f", "-"] else " ".join(args[1:] if as_json else args)
    ctx = None
    try:
        with _library_lock:
            ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
            if not ctx:
                raise NftError("libnftables: cannot create a context")
            if as_json:
                lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            failed = lib.nft_run_cmd_from_buffer(ctx, command.encode())
            output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        if failed:
            raise NftError(f"nft {' '.join(args)} failed: {error.strip()}")
    finally:
        if ctx:
            with _library_lock:
                lib.nft_ctx_free(ctx)  # closes its socket: waits for the kernel's freeing
    return output
