"""Compiled lookup tables: which rules name a destination, without scanning rules.

Names: one dict for exact names, one for wildcards keyed by their base, walked up
the name's parents (`a.b.c` looks up exact `a.b.c`, then wildcards under `b.c` and
`c`; never `a.b.c` itself, so `*.example.com` cannot match `example.com`): O(labels).

Addresses: per IP version, the rules' networks flattened into disjoint intervals,
each with the rules that cover all of it, found by bisecting the interval starts:
O(log networks), however many prefix lengths the rules use. Two levels, because in
a big table every bisect step is a cache miss: networks of /16 or longer (IPv6: /48)
sit in a dict by their /16 (/48) block, each block a small interval map; shorter
ones, few in any real policy, in one interval map of their own.

Lookups return tuples that belong to the index (callers must not change them), so a
hit costs no copy.
"""

from __future__ import annotations

import datetime
import math
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .model import DEFAULT_APPROVAL, DEFAULT_LIMITS, ApprovalSettings, Limits, Rule
from .names import IPAddress, IPNetwork, special_range_of
from .reasons import Verdict

_NO_RULES: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class _IntervalMap:
    """Disjoint address intervals: `starts[i]` begins interval i (up to the next
    start), which the rules `rules[i]` cover; () for a gap."""

    starts: list[int]
    rules: list[tuple[Rule, ...]]

    @classmethod
    def build(cls, items: list[tuple[int, int, Rule]]) -> _IntervalMap:
        """`items`: (first, last, rule) per network, in rule order."""
        starts = sorted({first for first, _, _ in items} | {last + 1 for _, last, _ in items})
        covering: list[list[Rule]] = [[] for _ in starts]
        for first, last, rule in items:
            # Nested networks (a /24 inside an allowed /16) split the outer one;
            # each piece lists every rule that covers it, in rule order.
            for i in range(bisect_right(starts, first) - 1, bisect_right(starts, last)):
                if not covering[i] or covering[i][-1] is not rule:
                    covering[i].append(rule)
        return cls(starts, [tuple(c) if c else _NO_RULES for c in covering])

    def lookup(self, number: int) -> tuple[Rule, ...]:
        i = bisect_right(self.starts, number) - 1
        return self.rules[i] if i >= 0 else _NO_RULES


@dataclass(frozen=True, slots=True)
class _AddressIndex:
    """Rules by address for one IP version (see the module docstring)."""

    shift: int  # a block is `number >> shift`
    wide: _IntervalMap  # networks shorter than a block
    # Per block: its one network as (first, last, rules), the usual case and the
    # fewest objects to touch; or an _IntervalMap when networks share the block.
    blocks: dict[int, tuple[int, int, tuple[Rule, ...]] | _IntervalMap]

    @classmethod
    def build(
        cls, bits: int, block_prefix: int, items: list[tuple[int, int, Rule]]
    ) -> _AddressIndex:
        shift = bits - block_prefix
        wide, by_block = [], defaultdict(list)
        for item in items:
            first, last, _ = item
            if first >> shift == last >> shift:
                by_block[first >> shift].append(item)
            else:
                wide.append(item)
        blocks = {
            block: (inside[0][0], inside[0][1], (inside[0][2],))
            if len(inside) == 1
            else _IntervalMap.build(inside)
            for block, inside in by_block.items()
        }
        return cls(shift, _IntervalMap.build(wide), blocks)

    def lookup(self, number: int) -> tuple[Rule, ...]:
        found = self.wide.lookup(number) if self.wide.starts else _NO_RULES
        block = self.blocks.get(number >> self.shift)
        if block is None:
            return found
        if block.__class__ is tuple:
            first, last, rules = block
            return found + rules if first <= number <= last else found
        return found + block.lookup(number)


def _bounds(network: IPNetwork) -> tuple[int, int]:
    """The first and last address of `network`, as numbers (ipaddress's own
    properties build objects: too slow for 100k rules)."""
    first = int(network.network_address)
    return first, first | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)


def _names_special_range(network: IPNetwork) -> bool:
    """A CIDR rule opens private/link-local/... space only if the whole network lies
    inside such a range: `10.0.0.0/8` names it, `0.0.0.0/0` does not."""
    first, last = _bounds(network)
    kind = special_range_of(first, network.version)
    return kind is not None and kind == special_range_of(last, network.version)


@dataclass
class CompiledProfile:
    name: str
    fallback: Rule
    rules: tuple[Rule, ...]  # active rules, in file order (for `rules show`)
    expired: tuple[Rule, ...] = ()
    limits: Limits = DEFAULT_LIMITS  # per-sandbox caps (`limits:`), inherited through extends
    approval: ApprovalSettings = DEFAULT_APPROVAL  # `approval:`, inherited through extends
    exact: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    wildcard: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    wildcard_depths: tuple[int, int] = (0, 0)  # fewest and most labels of a wildcard's base
    v4: _AddressIndex = field(default_factory=lambda: _AddressIndex.build(32, 16, []))
    v6: _AddressIndex = field(default_factory=lambda: _AddressIndex.build(128, 48, []))
    # Rule networks that lie wholly inside a private/loopback/... range.
    special_networks: frozenset = frozenset()
    # The first instant (epoch seconds) at which one of `rules` expires: from then
    # on decide() drops expired rules from what a lookup found (inf: none expires).
    first_expiry: float = math.inf
    # decide()'s memo of Decisions that name no destination and depend on more than
    # one rule (a private address of some kind, a rule that came near): shared,
    # because a frozen Decision costs more to build than to look up.
    decisions: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        name: str,
        rules: list[Rule],
        fallback: Rule,
        expired: list[Rule],
        limits: Limits = DEFAULT_LIMITS,
        approval: ApprovalSettings = DEFAULT_APPROVAL,
    ) -> CompiledProfile:
        exact: dict[str, list[Rule]] = defaultdict(list)
        wildcard: dict[str, list[Rule]] = defaultdict(list)
        networks: dict[int, list[tuple[int, int, Rule]]] = {4: [], 6: []}
        special_networks = set()
        for rule in rules:
            for pattern in rule.domains:
                (wildcard if pattern.wildcard else exact)[pattern.domain].append(rule)
            for network in rule.networks:
                networks[network.version].append((*_bounds(network), rule))
                if _names_special_range(network):
                    special_networks.add(network)
        return cls(
            name=name,
            fallback=fallback,
            rules=tuple(rules),
            expired=tuple(expired),
            limits=limits,
            approval=approval,
            exact={k: tuple(v) for k, v in exact.items()},
            wildcard={k: tuple(v) for k, v in wildcard.items()},
            wildcard_depths=(min(depths), max(depths))
            if (depths := {k.count(".") + 1 for k in wildcard})
            else (0, 0),
            v4=_AddressIndex.build(32, 16, networks[4]),
            v6=_AddressIndex.build(128, 48, networks[6]),
            special_networks=frozenset(special_networks),
            first_expiry=min((r.expires_at for r in rules if r.expires_at), default=math.inf),
        )

    def rules_for_name(self, name: str) -> tuple[Rule, ...]:
        """Rules whose domain matches the canonical `name`."""
        found = self.exact.get(name, _NO_RULES)
        if self.wildcard:
            # The proper parents of the name, nearest first (names.parent_domains,
            # inlined: this is the hot path), looked up only at the depths (label
            # counts) some wildcard's base has: each lookup in a big dict is a
            # cache miss, and `com` or `co.uk` never is a base.
            wildcard, shallowest, deepest = (
                self.wildcard,
                self.wildcard_depths[0],
                self.wildcard_depths[-1],
            )
            depth = name.count(".")  # of the nearest parent
            dot = name.find(".") if depth >= shallowest else -1
            while depth >= shallowest:
                if depth <= deepest:
                    hit = wildcard.get(name[dot + 1 :])
                    if hit:
                        found += hit
                dot = name.find(".", dot + 1)
                depth -= 1
        return found

    def rules_for_ip(self, ip: IPAddress) -> tuple[Rule, ...]:
        """Rules whose network contains the canonical address `ip`."""
        return self.rules_for_address(int(ip), ip.version)

    def rules_for_address(self, number: int, version: int) -> tuple[Rule, ...]:
        """rules_for_ip() of an address given as its number (decide() has it already)."""
        return (self.v4 if version == 4 else self.v6).lookup(number)

    def opens_special(self, rule: Rule, ip: IPAddress) -> bool:
        """Whether `rule` names `ip` with a network inside a special range. Per network,
        not per rule: `allow: [10.0.0.0/8, 0.0.0.0/0]` opens 10/8, not the metadata
        address that only `0.0.0.0/0` covers."""
        return any(
            network.version == ip.version and ip in network and network in self.special_networks
            for network in rule.networks
        )

    def opens_special_address(self, ip: IPAddress, now: float | None = None) -> bool:
        """Whether an allow rule live at `now` (epoch seconds; None: any rule loaded)
        opens the private/loopback/... address `ip`: then a DNS answer with `ip` is
        intended, not rebinding. An expired rule opens nothing, as in decide()."""
        return any(
            r.action is Verdict.ALLOW
            and (now is None or r.live_at(now))
            and self.opens_special(r, ip)
            for r in self.rules_for_ip(ip)
        )


@dataclass(frozen=True)
class CompiledPolicy:
    profiles: dict[str, CompiledProfile]
    files: tuple[str, ...]
    hash: str  # of the rule files' bytes: names the policy in every event
    rule_count: int
    loaded_on: datetime.date
    # The real path of every file it was built from (top files, includes, presets):
    # what a reloader watches for changes.
    paths: tuple[Path, ...] = ()
    # What was at each of `paths` when it was built: (path, "-> REAL" for a name that
    # led to another file, "sha256:HEX" of the bytes parsed, None for no file).
    inputs: tuple[tuple[str, str | None], ...] = ()
    # Each included preset's `description`, by its file (as Rule.file names it).
    preset_descriptions: dict[str, str] = field(default_factory=dict)

    def presets_of(self, profile: str) -> list[tuple[str, str]]:
        """(file, description) of each preset whose rules `profile` has, in rule order:
        what `rules show` reports as in effect (e.g. download-only or pass-through)."""
        compiled = self.profiles[profile]
        files = dict.fromkeys(r.file for r in (*compiled.rules, *compiled.expired))
        return [(f, self.preset_descriptions[f]) for f in files if f in self.preset_descriptions]

    def limits_for(self, profile: str) -> Limits:
        """The caps of `profile`; the defaults for a profile the policy lacks (its
        connections are denied as `unknown_profile` anyway)."""
        compiled = self.profiles.get(profile)
        return compiled.limits if compiled is not None else DEFAULT_LIMITS

    def approval_for(self, profile: str) -> ApprovalSettings:
        """The `approval:` settings of `profile` (the defaults for an unknown one)."""
        compiled = self.profiles.get(profile)
        return compiled.approval if compiled is not None else DEFAULT_APPROVAL

    @property
    def expired(self) -> list:
        seen: dict[str, Rule] = {}
        for profile in self.profiles.values():
            for rule in profile.expired:
                seen.setdefault(rule.id, rule)
        return list(seen.values())

    def forget_decisions(self) -> None:
        """Drop the decisions memoised on its rules (decide.py's `_shared`). Each refers
        back to its rule: a cycle, and load_policy freezes a policy's objects, so the
        cyclic GC would never free a replaced policy that has one. A reload calls this
        on the policy it replaced; decisions already handed out stay valid."""
        for profile in self.profiles.values():
            for rule in (profile.fallback, *profile.rules):
                object.__setattr__(rule, "decision", None)
                object.__setattr__(rule, "inspected_decision", None)

    @property
    def next_expiry_at(self) -> float | None:
        """The first instant (epoch seconds) at which an active rule stops matching;
        decide() drops it from then on, given facts with `now`."""
        first = min((p.first_expiry for p in self.profiles.values()), default=math.inf)
        return None if first == math.inf else first

    def expiring(self, after: float, until: float) -> list[Rule]:
        """The active rules whose `expires` instant falls in (after, until], once each
        (a profile that extends another shares its rules), earliest first."""
        found = {
            id(rule): rule
            for profile in self.profiles.values()
            for rule in profile.rules
            if rule.expires_at is not None and after < rule.expires_at <= until
        }
        return sorted(found.values(), key=lambda rule: rule.expires_at)

    def next_expiry_after(self, now: float) -> float | None:
        """The first instant after `now` at which an active rule stops matching."""
        return min(
            (
                rule.expires_at
                for profile in self.profiles.values()
                for rule in profile.rules
                if rule.expires_at is not None and rule.expires_at > now
            ),
            default=None,
        )

    @property
    def next_expiry(self) -> datetime.date | None:
        """The (local) day of `next_expiry_at`: a load from then on reports the rule as expired."""
        first = self.next_expiry_at
        return None if first is None else datetime.date.fromtimestamp(first)
