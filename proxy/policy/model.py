"""The values the policy core passes around: rules, facts, decisions.

All frozen: a Decision, once made, is what every event, metric and 403 page reports.
One facts type per decision point:

- `NameFacts`    — a DNS question: may this profile reach this name at all?
- `ConnectFacts` — a TCP connection (destination IP and port; the name from SNI or
                   the sandbox's DNS bindings when one is known);
- `RequestFacts` — an HTTP request (adds method and path).

Each carries `now`, the wall-clock time of the question (seconds since the epoch):
a rule whose `expires` has passed by then does not match, so a rule expires during
a run without a reload, and decide() stays a pure function of its arguments. The
gate, the DNS filter and `sandgate check` pass the wall clock; None means "as of the
policy's load" (rules already expired then are gone; none expire later).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

from .names import DomainPattern, IPAddress, IPNetwork
from .reasons import Reason, Verdict

DEFAULT_PORTS = frozenset({80, 443})
HTTP_METHODS = frozenset(
    [
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
        "TRACE",
        "CONNECT",
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
    ]
)


@dataclass(frozen=True, slots=True)
class Limits:
    """A profile's per-sandbox caps (`limits:` in a rule file): each sandbox running
    under the profile may hold at most `connections` open TCP connections, of which
    at most `pending` are not yet decided, open `connection_rate` new ones a second
    (bursts of as many), send `dns_qps` DNS queries a second (bursts of as many) and
    make the gateway sign `leaf_rate` new leaf certificates a second for inspected
    TLS (bursts of as many; a name the sandbox was given a leaf for lately is free).
    Over a cap the gateway denies with `sandbox_limit`; over `connection_rate` the
    sandbox's nftables table drops the connection's SYN (`dropped_connect_flood`)."""

    connections: int = 512
    pending: int = 64
    dns_qps: int = 50
    connection_rate: int = 200
    leaf_rate: int = 10


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    """A profile's `approval:` settings, for destinations an `ask` rule (or `fallback:
    ask`) sends to a human: a connection or request is held up to `hold` seconds
    for a decision; the pending approval stays open `expire_pending` seconds (so a
    retry after the decision succeeds); a sandbox may have at most
    `max_pending_per_sandbox` approvals pending at once (`approval_queue_full`)."""

    hold: float = 30.0
    expire_pending: float = 24 * 3600.0
    max_pending_per_sandbox: int = 20


DEFAULT_APPROVAL = ApprovalSettings()
# Bounds: a hold longer than a client's patience is a hang; more pending than a
# human can read is a flood.
MAX_APPROVAL = ApprovalSettings(
    hold=600.0, expire_pending=30 * 24 * 3600.0, max_pending_per_sandbox=1000
)

_DURATION = re.compile(r"([0-9]{1,7})(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """`30s`, `5m`, `24h`, `7d`, `500ms` -> seconds; ValueError naming the form."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (write e.g. 30s, 5m, 24h or 7d)")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def format_duration(seconds: float) -> str:
    """The shortest exact form parse_duration reads back: 86400 -> `1d`."""
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


# The largest value each cap takes: above these a typo (an extra zero) would turn
# the cap off in practice; a sandbox that needs more is a case for two sandboxes.
# dns_qps: a sandbox's table drops its DNS past twice its dns_qps, at most
# enforcer/nft.py DNS_PACKETS_PER_S.
MAX_LIMITS = Limits(
    connections=65536, pending=65536, dns_qps=1000, connection_rate=10000, leaf_rate=1000
)


class PathPattern:
    """A rule's path globs as one anchored regex (load._compile_paths), matched by
    Python's `re`, or, where the globs hold two or more wildcards (`/**/x/**/y`,
    `*a*b`), by RE2, whose time is linear in the path: `re` backtracks, and on a
    task's path that nearly matches (`/x/x/x/...`) its time grew with the path's
    square or cube (`/**/x/**/y/**`: 4 KB 0.4 s, 60 KB 72 s of the gateway's loop; a
    red team, session 51). One wildcard cannot backtrack so (the tail a deny adds
    never fails); those stay with `re`, ~2x faster on the short paths most requests
    have. RE2 is compiled at the load (so that a pattern it cannot take is the load's
    error, not every request's), and again after a kept policy is unpickled."""

    __slots__ = ("regex", "linear", "_re2")

    def __init__(self, regex: re.Pattern[str], linear: bool, *, compiled: bool = True):
        self.regex, self.linear, self._re2 = regex, linear, None
        if linear and compiled:
            self._re2 = self._linear()

    def __reduce__(self):
        return _unpickled_path_pattern, (self.regex, self.linear)

    def _linear(self):
        import re2  # google-re2

        flags = "s" * bool(self.regex.flags & re.DOTALL) + "i" * bool(
            self.regex.flags & re.IGNORECASE
        )
        # 8 MiB (RE2's default) held the DFA of ~100 `/**/` globs in one rule only
        # until it ran out, wrote a line to stderr each match and fell back to its NFA,
        # slower than `re` (a red team, session 52). The memory is taken as states are
        # met, not at the compile.
        options = re2.Options()
        options.max_mem, options.log_errors, options.never_capture = 64 << 20, False, True
        return re2.compile(f"(?{flags}){self.regex.pattern}", options)

    def fullmatch(self, path: str) -> bool:
        if not self.linear:
            return self.regex.fullmatch(path) is not None
        if self._re2 is None:
            self._re2 = self._linear()
        return self._re2.fullmatch(path) is not None


def _unpickled_path_pattern(regex: re.Pattern[str], linear: bool) -> PathPattern:
    """A kept policy's pattern: RE2 compiled at its first match (the start pays no
    import of it), as it compiled at the load."""
    return PathPattern(regex, linear, compiled=False)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. `action` is ALLOW, DENY or ASK for rules from files; the
    profile's fallback and the gateway's built-in protections are Rules too, so a
    Decision always names one (with `file`/`line` of where it was written, or
    `file="<builtin>"`)."""

    id: str
    action: Verdict
    file: str
    line: int
    domains: tuple[DomainPattern, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = DEFAULT_PORTS
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    # `expires:` as written (a date: the last day it applies; or an instant), and the
    # instant (seconds since the epoch) from which it no longer matches.
    expires: datetime.date | datetime.datetime | None = None
    expires_at: float | None = None
    websocket: bool = False  # allows WebSocket upgrades (HTTP requests with Upgrade: websocket)
    comment: str | None = None
    owner: str | None = None
    ticket: str | None = None
    path_pattern: PathPattern | None = field(default=None, compare=False, repr=False)
    # True when the rule looks inside HTTP (methods or paths), so a TLS connection
    # it applies to must be intercepted to enforce it. Computed, and kept as a
    # plain attribute: decide() reads it for every candidate rule.
    inspects: bool = field(init=False, compare=False, repr=False)
    # The methods a request is matched on (None: any) and those it is not: `methods`,
    # but a deny of GET takes every method that is not a write it leaves out: every
    # server framework a red team tried (session 51: Spring, Rails, Express, Fastify,
    # Go, Django, Sinatra, Tomcat) runs the GET handler for a HEAD, and CherryPy's
    # handlers and Pyramid's views without a method predicate run for any method,
    # OPTIONS, TRACE, PROPFIND or one of the task's own (session 52).
    matched_methods: frozenset[str] | None = field(init=False, compare=False, repr=False)
    passed_methods: frozenset[str] = field(init=False, compare=False, repr=False)
    # decide()'s memo, filled on first use: the Decision this rule gives when it
    # answers alone (allowed or denied by it; for a fallback, no rule matched), and
    # the one when it allows with inspection. Next to what decide() just read.
    decision: Decision | None = field(default=None, init=False, compare=False, repr=False)
    inspected_decision: Decision | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inspects", self.methods is not None or self.paths is not None)
        methods, passed = self.methods, frozenset()
        if methods is not None and self.action is Verdict.DENY and "GET" in methods:
            methods, passed = None, WRITE_METHODS - methods
        object.__setattr__(self, "matched_methods", methods)
        object.__setattr__(self, "passed_methods", passed)

    @property
    def origin(self) -> str:
        return f"{self.file}:{self.line}"

    def targets(self) -> list[str]:
        return [str(d) for d in self.domains] + [str(n) for n in self.networks]

    def live_at(self, now: float) -> bool:
        """Whether the rule still matches at `now` (seconds since the epoch)."""
        return self.expires_at is None or now < self.expires_at

    def matches_request(self, method: str, path: str) -> bool:
        if self.matched_methods is not None and method not in self.matched_methods:
            return False
        if method in self.passed_methods:
            return False
        return self.path_pattern is None or self.path_pattern.fullmatch(path)


# The methods that write (RFC 9110's and WebDAV's): a deny of GET does not take them
# unless it names them too.
WRITE_METHODS = frozenset(
    {"POST", "PUT", "PATCH", "DELETE", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK"}
)


@dataclass(frozen=True, slots=True)
class NameFacts:
    """A DNS question from a sandbox. `name` is canonical (names.parse_domain)."""

    profile: str
    name: str
    now: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectFacts:
    """A connection from a sandbox.

    `ip` is the original destination; `name` (canonical) comes from the TLS SNI, the
    HTTP Host, or the sandbox's DNS bindings. `name_resolved_to_ip` says whether the
    gateway's DNS filter answered `name` with `ip` for this sandbox: False makes a
    name-based allow a spoof; None means "not checked" (e.g. `sandgate check`).
    """

    profile: str
    port: int
    ip: IPAddress | None = None
    name: str | None = None
    name_resolved_to_ip: bool | None = None
    protocol: str = "tcp"
    now: float | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """An HTTP request inside an allowed connection. `path` excludes the query."""

    profile: str
    port: int
    method: str
    path: str
    ip: IPAddress | None = None
    name: str | None = None
    name_resolved_to_ip: bool | None = None
    protocol: str = "http"
    now: float | None = None
    websocket: bool = False  # asks for a WebSocket upgrade: only websocket rules allow it


Facts = NameFacts | ConnectFacts | RequestFacts


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one question. `rule` is never None: the matching rule, the
    profile's fallback, or a built-in protection. `inspect` is meaningful for
    allowed connections: the gateway must look inside HTTP to enforce some rule."""

    verdict: Verdict
    reason: Reason
    rule: Rule
    inspect: bool = False
    detail: str = ""

    @property
    def allowed(self) -> bool:
        """Whether traffic may pass now (ALLOW, or AUDIT: allowed and recorded)."""
        return self.verdict in (Verdict.ALLOW, Verdict.AUDIT)

    @property
    def rule_id(self) -> str:
        return self.rule.id

    def to_dict(self) -> dict:
        return {
            "verdict": str(self.verdict),
            "reason": str(self.reason),
            "rule": self.rule.id,
            "rule_origin": self.rule.origin,
            "inspect": self.inspect,
            "detail": self.detail,
        }
