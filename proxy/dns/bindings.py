"""Which names each sandbox resolved through the gateway to which IPs, with TTLs:
what the connection checks read to tell a real destination from a spoofed SNI.
Pure: the clock is injected."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from sandgate.proxy.policy.names import IPAddress, canonical_ip

Binding = tuple[str, "str | IPAddress", int]
"""(canonical name, canonical IP (text, or the address itself), TTL seconds): the
gateway answered name with IP."""


def canonical_address(text: str | IPAddress) -> IPAddress:
    """`text` as an address, IPv4-mapped IPv6 as IPv4; ValueError if it is none."""
    if isinstance(text, str):
        text = ipaddress.ip_address(text)
    return canonical_ip(text)


class _SandboxBindings:
    __slots__ = ("expiry", "by_ip")

    def __init__(self) -> None:
        # (name, ip) -> expiry, oldest recorded first: the eviction order.
        self.expiry: OrderedDict[tuple[str, IPAddress], float] = OrderedDict()
        # ip -> names answered with it, oldest first (a dict as an ordered set).
        self.by_ip: dict[IPAddress, dict[str, None]] = {}


class DnsBindings:
    """Which names the gateway answered with which IPs, per sandbox.

    The connection checks ask `resolved(sandbox, sni, dst_ip)` (was this
    destination really what the name resolved to, or is the SNI spoofed?) and, for
    protocols without a name (ssh), `names_for(sandbox, dst_ip)`.

    A binding lives at least `grace` seconds, longer if its TTL is longer
    (`expiry = now + max(ttl, grace)`), because clients do not honour short TTLs:
    JVMs, nscd, happy-eyeballs retries and connection pools reuse addresses for
    minutes, and a CDN's 20 s TTL would otherwise turn a legitimate reconnect into a
    "spoofed destination" block. The grace costs little: the IP was a real answer
    for that name moments ago.

    Memory is bounded: at most `max_per_sandbox` (name, IP) pairs per sandbox, the
    oldest recorded evicted first; `forget(sandbox)` when the task ends. All
    lookups are dict operations. Not thread-safe: the gateway's one event loop owns it.
    """

    def __init__(
        self,
        *,
        grace: float = 300.0,
        max_per_sandbox: int = 10_000,
        max_ttl: float = 7 * 86400,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.grace = grace
        self.max_per_sandbox = max_per_sandbox
        self.max_ttl = max_ttl  # upstream TTLs go up to 68 years
        self.clock = clock
        self._sandboxes: dict[str, _SandboxBindings] = {}

    def record(self, sandbox: str, name: str, ip: str | IPAddress, ttl: float) -> None:
        """Remember that `name` (canonical) was answered with `ip` for `sandbox`."""
        table = self._sandboxes.setdefault(sandbox, _SandboxBindings())
        ip = canonical_address(ip)
        key = (name, ip)
        expiry = self.clock() + max(min(ttl, self.max_ttl), self.grace)
        # An earlier answer with a longer TTL may still be cached by the client.
        expiry = max(expiry, table.expiry.pop(key, 0.0))
        table.expiry[key] = expiry
        names = table.by_ip.setdefault(ip, {})
        names.pop(name, None)
        names[name] = None  # newest last
        while len(table.expiry) > self.max_per_sandbox:
            (old_name, old_ip), _ = table.expiry.popitem(last=False)
            old_names = table.by_ip[old_ip]
            del old_names[old_name]
            if not old_names:
                del table.by_ip[old_ip]

    def resolved(self, sandbox: str, name: str, ip: str | IPAddress) -> bool:
        """Whether `name` was answered with `ip` for `sandbox` and the binding (TTL
        plus grace) has not expired."""
        table = self._sandboxes.get(sandbox)
        if table is None:
            return False
        try:
            expiry = table.expiry.get((name, canonical_address(ip)))
        except ValueError:
            return False
        return expiry is not None and expiry >= self.clock()

    def names_for(self, sandbox: str, ip: str | IPAddress) -> list[str]:
        """The unexpired names `sandbox` resolved to `ip`, most recently answered first."""
        table = self._sandboxes.get(sandbox)
        if table is None:
            return []
        try:
            ip = canonical_address(ip)
        except ValueError:
            return []
        now = self.clock()
        names = table.by_ip.get(ip, {})
        return [name for name in reversed(names) if table.expiry[(name, ip)] >= now]

    def drop(self, unwanted: Callable[[str, str], bool]) -> int:
        """Remove every binding whose (sandbox, name) is `unwanted`; how many went.
        (A reload drops the names its new policy no longer allows.)"""
        dropped = 0
        for sandbox, table in list(self._sandboxes.items()):
            for name, ip in [key for key in table.expiry if unwanted(sandbox, key[0])]:
                del table.expiry[(name, ip)]
                names = table.by_ip[ip]
                del names[name]
                if not names:
                    del table.by_ip[ip]
                dropped += 1
            if not table.expiry:
                del self._sandboxes[sandbox]
        return dropped

    def forget(self, sandbox: str) -> None:
        self._sandboxes.pop(sandbox, None)

    def count(self, sandbox: str) -> int:
        table = self._sandboxes.get(sandbox)
        return len(table.expiry) if table else 0
