"""The placeholder pool, pure: addresses the DNS filter answers for names that need
a human's approval, so that such a name never reaches the upstream resolver before
a human approves it (the answer would already leak the name: DNS is an
exfiltration channel).

The pool is 198.18.0.0/15 (RFC 2544, benchmarking): reserved, never routed on the
internet, and in nobody's LAN, unlike 10/8 or 100.64/10 (CGNAT, which some
hosts' own networks use). The sandbox's nftables table redirects TCP to every
address to the gateway, these too; the gateway knows which name each placeholder
stands for *for that sandbox*, holds the connection until a human decides, then
resolves the name for real and connects to the real address. Each sandbox has its
own map: the same placeholder means different names in two sandboxes, and a
sandbox cannot reach a name another sandbox asked for through its placeholder.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable

POOL = ipaddress.IPv4Network("198.18.0.0/15")
TTL = 5  # seconds: an approved name resolves for real soon after
MAX_PER_SANDBOX = 4096  # names; the least recently used goes first beyond


class Placeholders:
    """Per sandbox: name <-> placeholder address, bounded (LRU)."""

    def __init__(
        self,
        max_per_sandbox: int = MAX_PER_SANDBOX,
        taken: Callable[[str], bool] = lambda address: False,
    ):
        self.max_per_sandbox = max_per_sandbox
        # Addresses of the pool the gateway's host uses itself (its table drops what a
        # sandbox sends to them): never handed out. Some networks do use this range.
        self.taken = taken
        self._names: dict[str, OrderedDict[str, str]] = {}  # sandbox -> name -> address
        self._addresses: dict[str, dict[str, str]] = {}  # sandbox -> address -> name
        self._next: dict[str, int] = {}

    def address_for(self, sandbox: str, name: str) -> str:
        """The placeholder standing for canonical `name` in `sandbox` (allocated on first use)."""
        names = self._names.setdefault(sandbox, OrderedDict())
        found = names.get(name)
        if found is not None:
            names.move_to_end(name)
            return found
        addresses = self._addresses.setdefault(sandbox, {})
        if len(names) >= self.max_per_sandbox:
            _, oldest = names.popitem(last=False)
            del addresses[oldest]
        index = self._next.get(sandbox, 1)
        while str(POOL[index]) in addresses or self.taken(str(POOL[index])):
            index = index % (POOL.num_addresses - 2) + 1
        self._next[sandbox] = index % (POOL.num_addresses - 2) + 1
        address = str(POOL[index])
        names[name], addresses[address] = address, name
        return address

    def name_for(self, sandbox: str, address: str) -> str | None:
        """The name `address` stands for in `sandbox`, or None."""
        return self._addresses.get(sandbox, {}).get(address)

    def forget(self, sandbox: str) -> None:
        self._names.pop(sandbox, None)
        self._addresses.pop(sandbox, None)
        self._next.pop(sandbox, None)


def in_pool(address) -> bool:
    """Whether `address` (an ipaddress object) is a placeholder."""
    return address.version == 4 and address in POOL
