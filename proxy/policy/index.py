"""Compiled lookup tables: which rules name a destination, in O(labels + prefix lengths).

No rule is ever scanned on the hot path. Names: one dict for exact names, one for
wildcards keyed by their base, walked up the name's parents (`a.b.c` looks up
exact `a.b.c`, then wildcards under `b.c` and `c`; never `a.b.c` itself, so
`*.example.com` cannot match `example.com`). Addresses: per IP version, one dict
per prefix length present in the rules, keyed by the masked address.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass, field

from .model import Rule
from .names import IPAddress, parent_domains, special_range
from .reasons import Verdict


@dataclass(frozen=True, slots=True)
class _PrefixTable:
    prefixlen: int
    mask: int
    rules: dict[int, tuple[Rule, ...]]


def _names_special_range(network) -> bool:
    """A CIDR rule opens private/link-local/... space only if the whole network lies
    inside such a range: `10.0.0.0/8` names it, `0.0.0.0/0` does not."""
    first = special_range(network.network_address)
    return first is not None and first == special_range(network.broadcast_address)


@dataclass
class CompiledProfile:
    name: str
    fallback: Rule
    rules: tuple[Rule, ...]  # active rules, in file order (for `rules show`)
    expired: tuple[Rule, ...] = ()
    exact: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    wildcard: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    v4: tuple[_PrefixTable, ...] = ()
    v6: tuple[_PrefixTable, ...] = ()
    # Rule networks that lie wholly inside a private/loopback/... range.
    special_networks: frozenset = frozenset()

    @classmethod
    def build(cls, name: str, rules: list[Rule], fallback: Rule, expired: list[Rule]) -> CompiledProfile:
        exact: dict[str, list[Rule]] = defaultdict(list)
        wildcard: dict[str, list[Rule]] = defaultdict(list)
        by_prefix: dict[tuple[int, int], dict[int, list[Rule]]] = defaultdict(lambda: defaultdict(list))
        special_networks = set()
        for rule in rules:
            for pattern in rule.domains:
                (wildcard if pattern.wildcard else exact)[pattern.domain].append(rule)
            for network in rule.networks:
                by_prefix[network.version, network.prefixlen][int(network.network_address)].append(rule)
                if _names_special_range(network):
                    special_networks.add(network)

        def tables(version: int, bits: int) -> tuple[_PrefixTable, ...]:
            # Longest prefix first: the most specific rules are found first.
            return tuple(
                _PrefixTable(length, ((1 << length) - 1) << (bits - length), {k: tuple(v) for k, v in table.items()})
                for (v, length), table in sorted(by_prefix.items(), key=lambda kv: -kv[0][1])
                if v == version
            )

        return cls(
            name=name,
            fallback=fallback,
            rules=tuple(rules),
            expired=tuple(expired),
            exact={k: tuple(v) for k, v in exact.items()},
            wildcard={k: tuple(v) for k, v in wildcard.items()},
            v4=tables(4, 32),
            v6=tables(6, 128),
            special_networks=frozenset(special_networks),
        )

    def rules_for_name(self, name: str) -> list[Rule]:
        """Rules whose domain matches the canonical `name`."""
        found = list(self.exact.get(name, ()))
        wildcard = self.wildcard
        if wildcard:
            for parent in parent_domains(name):
                hit = wildcard.get(parent)
                if hit:
                    found.extend(hit)
        return found

    def rules_for_ip(self, ip: IPAddress) -> list[Rule]:
        """Rules whose network contains the canonical address `ip`."""
        number = int(ip)
        found: list[Rule] = []
        for table in self.v4 if ip.version == 4 else self.v6:
            hit = table.rules.get(number & table.mask)
            if hit:
                found.extend(hit)
        return found

    def opens_special(self, rule: Rule, ip: IPAddress) -> bool:
        """Whether `rule` names `ip` with a network inside a special range. Per network,
        not per rule: `allow: [10.0.0.0/8, 0.0.0.0/0]` opens 10/8, not the metadata
        address that only `0.0.0.0/0` covers."""
        return any(
            network.version == ip.version and ip in network and network in self.special_networks
            for network in rule.networks
        )

    def opens_special_address(self, ip: IPAddress) -> bool:
        """Whether an allow rule opens the private/loopback/... address `ip`: then a
        DNS answer with `ip` is intended, not rebinding."""
        return any(r.action is Verdict.ALLOW and self.opens_special(r, ip) for r in self.rules_for_ip(ip))


@dataclass(frozen=True)
class CompiledPolicy:
    profiles: dict[str, CompiledProfile]
    files: tuple[str, ...]
    hash: str  # of the rule files' bytes: names the policy in every event
    rule_count: int
    loaded_on: datetime.date

    @property
    def expired(self) -> list:
        seen: dict[str, Rule] = {}
        for profile in self.profiles.values():
            for rule in profile.expired:
                seen.setdefault(rule.id, rule)
        return list(seen.values())

    @property
    def next_expiry(self) -> datetime.date | None:
        """The first day on which an active rule will have expired (reload then)."""
        dates = [r.expires for p in self.profiles.values() for r in p.rules if r.expires]
        return min(dates) + datetime.timedelta(days=1) if dates else None

    @property
    def needs_inspection(self) -> bool:
        return any(r.inspects for p in self.profiles.values() for r in p.rules)
