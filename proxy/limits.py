"""Per-sandbox fairness: what each sandbox holds at the gateway, against its
profile's caps (`limits:` in the rule file, `policy.model.Limits`).

Two pure bookkeepers, no sockets, no asyncio, a clock only where one is injected:

- `ConnectionCounts`: open and pending (admitted, not yet decided) connections per
  sandbox (the gate's key is its `Sandbox`, address and task: a task that is given
  an address another task left holds none of the connections of that one still
  closing), kept by the connection gate (proxy/gate.py), which admits, decides and
  closes every connection whichever adapter holds it;
- `TokenBuckets`: DNS queries per second per sandbox, kept by the DNS filter
  (proxy/dns/server.py);
- `LeafBudget`: new leaf certificates per second per sandbox, kept by the gate for
  inspected TLS (each a signature, ~1 ms of the worker's CPU, whichever engine
  terminates it).

A sandbox over a cap is denied with reason `sandbox_limit`; other sandboxes are not
touched. The one thing they share is the worker's descriptors: `connection_budget`
turns those into a number of connections, of which a sandbox may hold no more than
are free (`ConnectionCounts.full`), so that N sandboxes each within its profile's
cap cannot together leave the worker none for the next sandbox's connection. Memory
is bounded by the sandboxes in use: an entry goes when its sandbox holds nothing
(counts) or has been idle long enough to be full (buckets).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from sandgate.proxy.policy.model import Limits


@dataclass(slots=True)
class Held:
    """What one sandbox holds: open connections, and those of them not yet decided."""

    open: int = 0
    pending: int = 0


# Descriptors a gateway worker needs besides its sandboxes' connections: the reserve
# (proxy/descriptors.py), its listeners, the DNS filter's sockets (up to 256 TCP
# connections), plain HTTP's idle upstream connections (256), the audit log, the
# control and admin connections, mitmproxy's own, and the new connections the front
# door's intake holds before their turn (frontdoor/door.py QUEUED_IN_ALL, 64).
OTHER_DESCRIPTORS = 640


def connection_budget(descriptors: int) -> int:
    """How many sandbox connections a worker whose RLIMIT_NOFILE is `descriptors`
    holds at most: two descriptors each (the client's and the upstream's) after
    OTHER_DESCRIPTORS, at least 64. With a limit of 2048: 704; of 1,048,576: 523,968."""
    return max(64, (descriptors - OTHER_DESCRIPTORS) // 2)


def fair_share(held: int, in_use: int, budget: int) -> str | None:
    """Whether one more of a pool of `budget` (of which `in_use` are taken) may go to a
    sandbox that holds `held` of them: None if it may, "worker" when none are free,
    "share" when the sandbox holds as many as are still free. k greedy sandboxes
    settle at budget / (k + 1) each, as many left free, so that one holding few, a
    newcomer above all, still finds room (the gate's connections, the DNS filter's
    TCP connections)."""
    free = budget - in_use
    if free <= 0:
        return "worker"
    if held >= free:
        return "share"
    return None


class ConnectionCounts:
    """Open and pending connections per sandbox (any hashable key), and their totals.

    The gate calls `admit` when it lets a connection past connect, `decided` once
    when it leaves the undecided phase, and `closed` once when it ends: the phases
    (proxy/lifecycle.py) make each happen at most once per connection."""

    def __init__(self) -> None:
        self._by_sandbox: dict[Hashable, Held] = {}
        self.open = 0  # over all sandboxes: the metrics' gauge
        self.pending = 0

    def of(self, sandbox: Hashable) -> Held:
        """A copy of what `sandbox` holds (zeros for one that holds nothing)."""
        held = self._by_sandbox.get(sandbox)
        return Held(held.open, held.pending) if held else Held()

    def full(self, sandbox: Hashable, limits: Limits, budget: int | None = None) -> str | None:
        """Which cap a new connection of `sandbox` would exceed, or None if it may be
        admitted: its profile's ("connections", "pending"), else the worker's
        `budget` (connection_budget; None: no worker cap): "worker" when all of it is
        held, "share" when `sandbox` holds as many as are still free.

        Each profile's cap may be fair alone while N of them add up to more
        descriptors than the worker has (they did: the first to run out refused every
        sandbox's next connection, descriptors_exhausted). A sandbox may hold no more
        than the worker has free (`fair_share`): only a sandbox holding none can take
        the last one."""
        held = self._by_sandbox.get(sandbox)
        if held is not None:
            if held.open >= limits.connections:
                return "connections"
            if held.pending >= limits.pending:
                return "pending"
        if budget is None:
            return None
        return fair_share(held.open if held is not None else 0, self.open, budget)

    def admit(self, sandbox: Hashable) -> None:
        held = self._by_sandbox.get(sandbox)
        if held is None:
            held = self._by_sandbox[sandbox] = Held()
        held.open += 1
        held.pending += 1
        self.open += 1
        self.pending += 1

    def decided(self, sandbox: Hashable) -> None:
        self._by_sandbox[sandbox].pending -= 1
        self.pending -= 1

    def closed(self, sandbox: Hashable) -> None:
        held = self._by_sandbox[sandbox]
        held.open -= 1
        self.open -= 1
        if held.open == 0:
            del self._by_sandbox[sandbox]

    def __len__(self) -> int:
        """Sandboxes that hold at least one connection."""
        return len(self._by_sandbox)


class TokenBuckets:
    """One token bucket per key (a sandbox address): `rate` tokens a second, at most
    `rate` saved, so a sandbox may burst a second's worth after a quiet second.

    `clock` (seconds, monotonic) is injectable for tests. Buckets idle for a second
    or more are full, the same as no bucket: `take` drops them once there are more
    than `max_keys`, so the table stays as small as the sandboxes in use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024):
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: Hashable, rate: int) -> bool:
        """Take one token from `key`'s bucket: False if it is empty (over the rate)."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (rate, now))
        tokens = min(rate, tokens + (now - at) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._forget_idle(now)
        self._buckets[key] = (tokens, now)
        return allowed

    def forget(self, key: Hashable) -> None:
        """`key`'s sandbox is gone: its bucket with it (the next task at its address
        starts full, as on a new address)."""
        self._buckets.pop(key, None)

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= 1.0]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


# Leaves a sandbox reuses free of charge: the names of its latest inspected
# connections. Fewer than either engine's cache keeps for it (the front door's
# tls_contexts.MAX_LEAF_CONTEXTS, mitmproxy's CertStore.STORE_CAP per sandbox), so a
# name counted free here still has its leaf there unless other sandboxes' charged
# leaves pushed it out.
FREE_LEAVES = 32
MAX_LEAF_SANDBOXES = 1024  # sandboxes whose free leaves are remembered, least recent out


class LeafBudget:
    """New leaf certificates per sandbox for inspected TLS: a connection to names the
    sandbox's last FREE_LEAVES inspected connections named is free (its leaf is
    cached), a new one takes a token of a `TokenBuckets` at the profile's
    `leaf_rate`. Without it, a task handshaking for ever-new names under a wildcard
    or IP rule had the worker sign a leaf for each, ~1 ms of its CPU apiece, and 16
    such tasks took another sandbox's requests to 0.4-0.7 s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.buckets = TokenBuckets(clock)
        self._free: OrderedDict[Hashable, OrderedDict[Hashable, None]] = OrderedDict()

    def take(self, sandbox: Hashable, names: Hashable, rate: int) -> bool:
        """May `sandbox` have a leaf for `names` now? False: a new one, over `rate`."""
        free = self._free.get(sandbox)
        if free is not None:
            self._free.move_to_end(sandbox)
            if names in free:
                free.move_to_end(names)
                return True
        if not self.buckets.take(sandbox, rate):
            return False
        if free is None:
            free = self._free[sandbox] = OrderedDict()
            if len(self._free) > MAX_LEAF_SANDBOXES:
                self._free.popitem(last=False)
        free[names] = None
        if len(free) > FREE_LEAVES:
            free.popitem(last=False)
        return True

    def forget(self, sandbox: Hashable) -> None:
        """`sandbox`'s task ended: its free names and its bucket go."""
        self._free.pop(sandbox, None)
        self.buckets.forget(sandbox)
