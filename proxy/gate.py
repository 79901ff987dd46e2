"""Every sandbox connection meets `decide` here: the gate, without mitmproxy or sockets.

`ConnectionGate` holds the policy, the sandbox registry, the DNS bindings, `emit`
and a clock. Its methods take plain values and say what to do; the front door
(proxy/frontdoor/) and the mitmproxy addon (proxy/addon.py) apply the answer. Each
connection moves through the phases of proxy/lifecycle.py, whose one table says
which call may come when.
Decision points, earliest first (see docs/architecture.md):

 1. `on_connect`: sandbox known? new connections not held (`hold_new`: the audit
    log cannot be written)? within its profile's caps on open and pending
    connections (`sandbox_limit`)? original destination IP:port hard-denied (private
    range, IP deny rule, unknown profile)? -> None: close before any upstream work.
 2. `on_first_bytes`, until it stops saying WAIT: TLS -> ClientHello SNI, which
    must be a name the gateway resolved to this address; plain HTTP -> HTTP,
    decided per request; anything else -> raw TCP (`not_http` on web ports, else
    named by the sandbox's DNS bindings). Allowed TLS passes through untouched
    unless a rule needs HTTP inspection (INTERCEPT).
    `on_silence`: a client that sends nothing to a non-web port (SMTP, MySQL, an
    ssh client waiting for the banner) is decided as raw TCP without bytes; should
    it speak first after all, a ClientHello or request line still gets its own
    decision (`on_first_bytes`).
    `on_server_spoke`: a server allowed to speak first did; the relay is plain.
    `hand_off` / `adopt`: a decided connection moves from the front door to
    mitmproxy with its decision; the addon does not decide it again.
 3. `on_request`: Host must agree with SNI and destination; method and path rules.
 4. `on_close`: an allowed connection's end (bytes, duration); a connection that
    closed before any decision gets its `no_data` denial.

`counts` (proxy/limits.py) holds each task's open connections (admitted by
`on_connect`, until `on_close`; keyed by its Sandbox, address and task id, so that a
task given a freed address never inherits the last one's connections still closing)
and pending ones (still in phase OPEN): the phase table lets a connection leave OPEN
once and close once, so each count is released exactly once, whichever adapter holds
the connection and however it ends.

Each decision emits exactly one Event. Each public method fails closed: an
unexpected exception, or a call its connection's phase does not take (an
IllegalTransition), is a denial with `internal_error`, emitted like any other;
no exception leaves the gate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from sandgate.proxy.approvals.pending import AskKey, Grant, Pending, PendingStore, Scope
from sandgate.proxy.clienthello import ClientHello, parse_client_hello, starts_like_tls_record
from sandgate.proxy.dns.placeholders import Placeholders, in_pool
from sandgate.proxy.lifecycle import IllegalTransition, Phase, Step, advance
from sandgate.proxy.limits import ConnectionCounts, LeafBudget
from sandgate.proxy.policy import ConnectFacts, Decision, RequestFacts, decide, parse_ip
from sandgate.proxy.policy.builtin import deny
from sandgate.proxy.policy.client_tls import client_tls_failure
from sandgate.proxy.policy.decide import depends_on_request
from sandgate.proxy.policy.form_body import FormOverrides
from sandgate.proxy.policy.index import CompiledPolicy
from sandgate.proxy.policy.names import (
    InvalidName,
    IPAddress,
    format_host_port,
    parse_domain,
    parse_host_port,
    parse_path,
)
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.policy.request_head import (
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    CheckedHead,
    RequestHead,
    check_head,
    not_one_method,
    refuse_unfinished,
    refused_override,
    starts_like_http,
    with_overrides,
)
from sandgate.proxy.registry import Sandbox, SandboxRegistry
from sandgate.proxy.telemetry.event import Event, EventKind
from sandgate.proxy.tls_sessions import IssuedSessions

log = logging.getLogger("sandgate.connection")

# Ports whose traffic must be TLS or HTTP: anything else there is a tunnel attempt.
WEB_PORTS = frozenset({80, 443, 8080, 8443})
# A ClientHello that has not ended within this many bytes is refused, so a client
# cannot make the gateway buffer without bound. Real ones are under 2 KiB (a few
# KiB with several post-quantum key shares).
MAX_FIRST_BYTES = 16 * 1024


# Destinations repeat (a task talks to a few hosts): parse each address once. parse_ip
# is pure and its results immutable.
_parse_destination = functools.lru_cache(maxsize=4096)(parse_ip)
# Host headers repeat too (every request of a task names the same few): read each
# short one once. Longer ones (a Host may be up to a head's 64 KiB) are read every
# time, so that the cache stays small.
_HOST_CACHED_LENGTH = 300

# Without a name only these denials are final at connect: a later SNI, Host or DNS
# binding may still find a rule, so "no rule matched" waits for the bytes.
_FINAL_AT_CONNECT = frozenset({Reason.PRIVATE_ADDRESS, Reason.RULE_DENY, Reason.UNKNOWN_PROFILE})


class Outcome(Enum):
    """What to do with a connection after its first bytes."""

    WAIT = "wait"  # not enough bytes to tell yet: ask again when more arrived
    REJECT = "reject"  # denied (the event is out): close, nothing goes upstream
    PASSTHROUGH = "passthrough"  # allowed by `state.allowed`: relay bytes untouched
    INTERCEPT = "intercept"  # allowed TLS whose rules need HTTP: terminate with the gateway CA
    HTTP = "http"  # plain HTTP: each request is decided by `on_request`
    ASK = "ask"  # a human decides: hold it (`state.ask_key`), then `on_answer`


class DnsBindingsView:
    """What the gate needs from the DNS filter's bindings (proxy/dns/bindings.py)."""

    def resolved(self, sandbox: str, name: str, ip: str | IPAddress) -> bool: ...
    def names_for(self, sandbox: str, ip: str) -> list[str]: ...


@dataclass(slots=True)
class ConnState:
    """One connection the gate let past connect: what later decisions and events need."""

    key: Hashable  # the adapter's handle for it (its key in `ConnectionGate.connections`)
    sandbox: Sandbox
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # original destination
    port: int
    fields: dict  # the event fields every event of this connection carries
    started: float  # the gate's clock when the bytes being decided on arrived: decision latency
    opened: float  # the gate's clock at connect, for the connection's duration
    name: str | None = None  # SNI (TLS) or the DNS-bound name (raw TCP)
    phase: Phase = Phase.NEW  # where in its lifecycle (proxy/lifecycle.py)
    outcome: Outcome | None = None  # what was decided, set once (kept through a hand-off)
    allowed: Decision | None = None  # the decision that let the connection through
    # Plain HTTP: the Host of the request `allowed` is (the connection end's name: an
    # address is shared by many sites, and an end without a name hid where bytes went)
    allowed_name: str | None = None
    protocol: str = "tcp"
    bytes_up: int = 0  # from the client, by whichever adapter carries the connection
    bytes_down: int = 0
    requests: int = 0  # HTTP requests decided on it (none at close: its own event)
    facts: ConnectFacts | None = None  # of its latest connect decision: what a reload decides again
    # How its adapter closes it, `abort(why)`; set by the adapter that owns it. A
    # policy reload closes with it the connections the new policy denies.
    abort: Callable[[str], None] | None = None
    # A placeholder destination (proxy/dns/placeholders.py): the name it stands for.
    # Decided by name alone; the adapter resolves it for real before connecting.
    placeholder: str | None = None
    upstream_ip: str | None = None  # the real address a placeholder's name resolved to
    asking: Decision | None = None  # the ASK decision a held connection waits on
    ask_key: AskKey | None = None
    # The earlier human decision that answered its latest ask without a hold (_consult):
    # the event of what it decided names that approval.
    answered: Grant | None = None
    # The approval of its destination (shown as "any connection to NAME:PORT (tls)")
    # that let an inspected TLS connection through: its requests, which a rule of
    # some methods or paths may still deny, are not asked again (_consult).
    destination_grant: object | None = None
    # The last request decision, for the next request on this keep-alive connection:
    # a _RequestMemo, or None (see ConnectionGate._decide_request).
    request_memo: _RequestMemo | None = None
    client_hello: ClientHello | None = None  # TLS: what its first bytes said (the door reads ALPN)
    # The request whose allowed WebSocket upgrade the server accepted (101): the
    # connection is a tunnel since, with no more requests to decide, so a reload or
    # a rule's expiry decides this one again (on_tunnel).
    tunnel: CheckedHead | None = None
    # The approval that let the connection through (its latest connect decision's;
    # None: a rule did), whatever its scope: while the policy asks about it, it goes
    # on only as long as that approval is in force (_approval_ended: a `--for` until
    # its end, an `always` while its rule is), even after a reload in between that
    # allowed it by a rule. One with an end is watched (_rests_on).
    grant: Pending | None = None
    # The approval that let its latest allowed request through (None: a rule did),
    # and the one that let its WebSocket upgrade through (`tunnel`): a tunnel the
    # policy asks about goes on only while that one is in force, as a connection does.
    request_grant: Pending | None = None
    tunnel_grant: Pending | None = None
    # The latest request allowed on it, whose exchange may still be going on (a body
    # uploading, a response streaming): a reload or an expiry that denies it now ends
    # the connection, as for a tunnel (a red team, session 50: an upload went on past
    # the expiry of the rule that allowed it). Its approval is `request_grant`.
    request: CheckedHead | None = None
    # Its body was not read for method overrides: no rule for its destination read the
    # method or path (gate._reads_method). A reload that makes one read them ends the
    # exchange (_exchange_denial): the rest of the body would go on unread.
    request_body_unread: bool = False

    @property
    def silent(self) -> bool:
        """Allowed on silence; the client has not spoken yet (see on_silence)."""
        return self.phase is Phase.SILENT


class _RequestMemo(NamedTuple):
    """A request decision that the next request on the same connection gets again
    when every fact it depended on is the same. Sound because decide() is pure and
    each of its inputs is either constant on a connection (profile, port, address,
    placeholder, the TLS name) or checked here: the policy object (a reload swaps
    it), the Host as sent (hence the name), WebSocket or not, whether the DNS
    binding still holds (asked again each request: an expired or evicted binding
    ends the reuse), the time before the profile's first rule expiry, and the
    method and path, which `depends_on_request` says the decision does not read.
    When it says they are read (`decision` None), the memo only saves asking that
    again for the next request to the same Host under the same policy: the answer
    depends on the profile, the name and the address, nothing a request changes.
    The gate keeps the latest memo per _memo_key (those constant facts and the Host)
    for the first request of the sandbox's next connection, under the same checks."""

    policy: CompiledPolicy
    host: str
    websocket: bool
    resolved: bool | None
    until: float  # wall clock: the profile's first rule expiry (inf: none expires)
    decision: Decision | None  # None: each request's method and path must be decided
    name: str | None


# Request memos kept for later connections (ConnectionGate._request_memos): a task
# talks to a few hosts; past this many the dict starts again.
_REQUEST_MEMOS = 4096


def _connect_fields(src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> dict:
    """A connection event's fields known at accept."""
    return {"source": format_host_port(src_ip, src_port), "dst_ip": dst_ip, "dst_port": dst_port}


def _memo_key(state: ConnState, host: str) -> tuple:
    """What a request memo rests on that is constant on a connection (see
    _RequestMemo), with the Host as sent: two connections with the same key decide
    a request alike under the same policy, when the memo's own checks (WebSocket,
    the DNS binding asked again, the rule expiry) hold. The sandbox is in it so that
    tasks never share one; the destination by its text (`dst_ip`, which `ip` is
    parsed from), whose hash is cached where an address object's is a Python call."""
    sandbox = state.sandbox
    return (
        sandbox.address,
        sandbox.profile,
        state.fields["dst_ip"],
        state.port,
        state.placeholder,
        state.name,
        host,
    )


def _keep(memos: dict, key: tuple, value) -> None:
    """`memos[key] = value`, the dict started again past _REQUEST_MEMOS entries."""
    if len(memos) >= _REQUEST_MEMOS:
        memos.clear()
    memos[key] = value


# Where `revoke_denied` moves a connection (others: REJECTED). A handed-off one is in
# transit: mitmproxy adopts it as it was handed off, then sees it closed from below.
_REVOKED_PHASE = {Phase.HANDED_OFF: Phase.HANDED_OFF}

# The phase a decided outcome puts a connection in.
_PHASE_OF = {
    Outcome.ASK: Phase.ASKING,
    Outcome.PASSTHROUGH: Phase.PASSING,
    Outcome.INTERCEPT: Phase.INTERCEPTING,
    Outcome.HTTP: Phase.HTTP,
    Outcome.REJECT: Phase.REJECTED,
}


class ConnectionGate:
    """`clock` (seconds, monotonic) times decisions and connections: inject one to
    make latencies and durations deterministic in tests. `wall_clock` (epoch seconds)
    is the `now` of every decision's facts: a rule whose `expires` has passed stops
    matching then, without a reload."""

    def __init__(
        self,
        policy: CompiledPolicy,
        registry: SandboxRegistry,
        bindings: DnsBindingsView,
        emit: Callable[[Event], None],
        clock: Callable[[], float] = time.monotonic,
        approvals: PendingStore | None = None,
        placeholders: Placeholders | None = None,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.policy = policy
        # Earlier human decisions (proxy/approvals/); None: `ask` is denied.
        self.approvals = approvals
        if approvals is not None:
            # An `always` grants only while its rule is in this gate's policy (pending.py).
            approvals.in_force = self._in_force
        self.placeholders = placeholders
        self.registry = registry
        self.bindings = bindings
        self.emit = emit
        self.clock = clock
        self.wall_clock = wall_clock
        # Every connection past connect and not yet closed, by its adapter's key.
        self.connections: dict[Hashable, ConnState] = {}
        # What each task's sandbox holds, against its profile's limits (see the docstring).
        self.counts = ConnectionCounts()
        # New leaf certificates per sandbox, against its profile's leaf_rate.
        self.leaves = LeafBudget(clock)
        self.sessions = IssuedSessions()  # TLS 1.2 sessions issued, for resumptions
        # The sandbox connections the process's descriptors allow (limits.connection_budget),
        # shared fairly (ConnectionCounts.full); None: no cap but the profiles'.
        self.connection_budget: int | None = None
        # A denial for every new connection while the gateway cannot take one on (its
        # audit log cannot be written: Gateway.guard_audit), else None.
        self.hold_new: Callable[[], Decision | None] = _no_hold
        # The same for each request on a connection already open (the audit log's only:
        # a request takes no descriptor): what it would let out could not be recorded.
        self.hold_requests: Callable[[], Decision | None] = _no_hold
        # `on_grant(approval)`: a connection now rests on an approval that ends (`--for`);
        # the gateway closes what it let through at its end (Gateway._watch_grant).
        self.on_grant: Callable[[Pending], None] | None = None
        # The latest request memo (_RequestMemo) by _memo_key, for the next connection's
        # first request; emptied by revoke_denied (a reload) and when full.
        self._request_memos: dict[tuple, _RequestMemo] = {}
        # Decisions by address at connect (_decide_at_connect), emptied as those.
        self._connect_memos: dict[tuple, tuple[CompiledPolicy, float, Decision]] = {}

    # --- 1. TCP connect -------------------------------------------------------------

    def on_connect(
        self, key: Hashable, src_ip: str, src_port: int, dst_ip: str, dst_port: int
    ) -> ConnState | None:
        """The state of an admitted connection, or None: denied, its event emitted."""
        started = self.clock()
        fields = _connect_fields(src_ip, src_port, dst_ip, dst_port)
        try:
            sandbox = self.registry.get(src_ip)
            ip = _parse_destination(dst_ip)
            if sandbox is None or ip is None:
                self._emit_connection(
                    deny("unknown-sandbox", detail=f"no task owns source address {src_ip}"),
                    fields,
                    None,
                    "tcp",
                    started,
                )
                return None
            self._stamp(fields, sandbox)
            limited = self.hold_new() or self._over_sandbox_limit(sandbox)
            if limited is not None:
                self._emit_connection(limited, fields, None, "tcp", started)
                return None
            state = ConnState(key, sandbox, ip, dst_port, fields, started, started)
            if self.placeholders is not None and in_pool(ip):
                # A name the DNS filter answered with a placeholder: decided by name.
                state.placeholder = self.placeholders.name_for(sandbox.address, str(ip))
                if state.placeholder is None:
                    self._emit_connection(
                        deny(
                            "spoofed-destination",
                            detail=f"{ip} is a placeholder the gateway never gave this sandbox",
                        ),
                        fields,
                        None,
                        "tcp",
                        started,
                    )
                    return None
                decision = None
            else:
                decision = self._decide_at_connect(state)
            if decision is not None and decision.reason in _FINAL_AT_CONNECT:
                self._emit_connection(decision, fields, None, "tcp", started)
                return None
            self._step(state, Step.CONNECT, Phase.OPEN)
        except Exception as e:  # noqa: BLE001 - deny, say why, keep serving others
            self._internal_error(e, fields, started, None)
            return None
        self.connections[key] = state
        self.counts.admit(sandbox)
        return state

    def on_refused(
        self, src_ip: str, src_port: int, dst_ip: str, dst_port: int, detail: str
    ) -> None:
        """Emit the denial of a connection the front door accepted and closed before
        `on_connect`: its intake had no room for it (frontdoor/intake.py)."""
        started = self.clock()
        fields = _connect_fields(src_ip, src_port, dst_ip, dst_port)
        sandbox = self.registry.get(src_ip)
        if sandbox is not None:
            self._stamp(fields, sandbox)
        self._emit_connection(deny("sandbox-intake", detail=detail), fields, None, "tcp", started)

    def _stamp(self, fields: dict, sandbox: Sandbox) -> None:
        """Stamped as Gateway.emit would stamp them: the policy that decides, the task."""
        fields.update(
            sandbox=sandbox.address,
            profile=sandbox.profile,
            policy_hash=self.policy.hash,
            task_id=sandbox.task_id,
        )

    def _decide_at_connect(self, state: ConnState) -> Decision:
        """The decision by address alone (no name yet). It rests on the profile, the
        address and the port only, so it is kept per those for later connections
        under the same policy until the profile's first rule expiry (1.45 -> ~0.4 us
        a connection). A kept one leaves `state.facts` None: a reload decides it
        again from the state (_denial_under_new_policy), as from facts without a name."""
        profile, policy = state.sandbox.profile, self.policy
        key = (profile, state.fields["dst_ip"], state.port)
        kept = self._connect_memos.get(key)
        if kept is not None and kept[0] is policy and self.wall_clock() < kept[1]:
            return kept[2]
        decision = self._decide_connect(state, name=None)
        compiled = policy.profiles.get(profile)
        # (an unknown profile is denied without a clock)
        until = compiled.first_expiry if compiled else math.inf
        _keep(self._connect_memos, key, (policy, until, decision))
        return decision

    def _over_sandbox_limit(self, sandbox: Sandbox) -> Decision | None:
        """A `sandbox_limit` denial if `sandbox` holds as many open (or undecided)
        connections as its profile allows, or its fair share of the worker's
        `connection_budget` (`descriptors_exhausted` when all of it is held), else None."""
        limits = self.policy.limits_for(sandbox.profile)
        budget = self.connection_budget
        full = self.counts.full(sandbox, limits, budget)
        if full is None:
            return None
        if full == "connections":
            return deny(
                "sandbox-connections",
                detail=f"the sandbox holds {limits.connections} open connections, its limit",
            )
        if full == "pending":
            return deny(
                "sandbox-pending",
                detail=f"the sandbox holds {limits.pending} connections not yet decided, its limit",
            )
        if full == "share":
            return deny(
                "sandbox-fair-share",
                detail=f"the sandbox holds {self.counts.of(sandbox).open} connections, and the "
                f"gateway worker has no more than that free of the {budget} its "
                "descriptors allow",
            )
        return deny(
            "descriptors-exhausted",
            detail=f"the gateway worker holds the {budget} connections its descriptors "
            "allow; new connections are refused until open ones close",
        )

    def _over_leaf_rate(self, state: ConnState) -> Decision | None:
        """A `sandbox_limit` denial if intercepting `state` would have the gateway sign
        a new leaf certificate past the profile's `leaf_rate` (limits.LeafBudget), else
        None. The leaf's names as both engines pick them: the SNI (else the address the
        client reached, the same for every connection of the sandbox), the destination."""
        rate = self.policy.limits_for(state.sandbox.profile).leaf_rate
        if self.leaves.take(state.sandbox, (state.name, state.fields["dst_ip"]), rate):
            return None
        return deny(
            "sandbox-leaf-rate",
            detail=f"a new leaf certificate for {state.name or state.ip} would be past the "
            f"sandbox's leaf_rate of {rate} a second",
        )

    def hand_off(self, state: ConnState) -> bool:
        """Mark a decided connection as given to another adapter, which `adopt`s it.
        False if it may not be (not HTTP or intercepted TLS): denied, the caller closes it."""
        try:
            self._step(state, Step.HAND_OFF, Phase.HANDED_OFF)
        except IllegalTransition as e:
            self.fail(state, e)
            return False
        return True

    def adopt(self, old_key: Hashable, new_key: Hashable) -> ConnState | None:
        """The handed-off connection filed under `old_key`, now under `new_key`; None
        if there is none. Its decision stands: the new adapter only applies it."""
        state = self.connections.get(old_key)
        if state is None or state.phase is not Phase.HANDED_OFF:
            return None
        del self.connections[old_key]
        state.key = new_key
        self.connections[new_key] = state
        self._step(state, Step.ADOPT, _PHASE_OF[state.outcome])
        return state

    # --- 2. first bytes ---------------------------------------------------------------

    def on_first_bytes(self, state: ConnState, data: bytes) -> Outcome:
        """Decide on the client's first bytes (all that arrived so far, none consumed).
        Once decided, the outcome is returned again without a second decision, with
        one exception: see `on_silence`."""
        try:
            if state.phase is Phase.OPEN:
                state.started = self.clock()
                outcome = self._decide_bytes(state, data)
            elif state.phase is Phase.SILENT:
                outcome = self._spoke_after_silence(state, data)
            else:  # decided before (or an illegal call: the table says which)
                self._step(state, Step.FIRST_BYTES, state.phase)
                return state.outcome
            self._settle(state, Step.FIRST_BYTES, outcome)
        except Exception as e:  # noqa: BLE001 - deny, say why, keep serving others
            self._fail(state, e, state.started)
            return Outcome.REJECT
        return outcome

    def _decide_bytes(self, state: ConnState, data: bytes) -> Outcome:
        if (held := self.hold_new()) is not None:
            # Admitted at its SYN, but decided, and connected upstream, only now: as new
            # (a task opened connections while the log worked, spoke once it failed).
            return self._reject(state, held, "tcp")
        if starts_like_tls_record(data):
            return self._tls(state, data)
        http = starts_like_http(data)
        if http:
            if state.placeholder is not None:
                return self._placeholder_http(state)
            return Outcome.HTTP
        if http is None or _too_few_to_tell(data):
            return Outcome.WAIT
        return self._raw_tcp(state)

    def _placeholder_http(self, state: ConnState) -> Outcome:
        """Plain HTTP to a placeholder: its name is known, so a denial is final now;
        an ask is asked per request (held in the addon, then a 403 or allowed). A
        human's denial is answered per request too: the task's retry gets the same
        403 naming the approval as the held request did, not a bare close."""
        state.name = state.placeholder
        asked = self._decide_connect(state, state.name)
        decision = self._consult(state, asked, "http")
        if decision.allowed:
            return Outcome.HTTP
        if decision.verdict is Verdict.ASK or decision.reason is Reason.APPROVAL_DENIED:
            # Asked per request (held in the addon), or answered per request from the
            # human's denial; either way the name is not resolved upstream.
            state.asking = asked
            return Outcome.HTTP
        return self._reject(state, decision, "http")

    def _spoke_after_silence(self, state: ConnState, data: bytes) -> Outcome:
        http = starts_like_http(data)
        if not (starts_like_tls_record(data) or http):
            if http is None or _too_few_to_tell(data):
                return Outcome.WAIT  # could still become a ClientHello or a request line
            return Outcome.PASSTHROUGH  # raw bytes: what the silence decision allowed
        # A name the silence decision could not see: the bytes get their own decision.
        silence = state.allowed, state.name, state.protocol
        state.allowed, state.name, state.protocol = None, None, "tcp"
        state.started = self.clock()
        outcome = self._decide_bytes(state, data)
        if outcome is Outcome.WAIT:  # half a ClientHello: the silence decision holds meanwhile
            state.allowed, state.name, state.protocol = silence
        return outcome

    def on_silence(self, state: ConnState) -> Outcome:
        """The client has sent nothing for a while. On a non-web port it may be
        waiting for the server to speak first (SMTP, MySQL, an ssh banner): decide
        as raw TCP, by address and DNS bindings. On web ports keep waiting: there
        the name must come from the bytes.

        An allow here is for the server's first bytes. Should the client speak
        first after all (a slow client, or one that waited on purpose), its bytes
        go to `on_first_bytes` before any reaches the server: raw bytes are what
        this decision allowed, but a ClientHello or an HTTP request carries a name,
        and gets a decision of its own (with its event), as if it had come in time.
        Otherwise waiting 300 ms would skip the SNI and Host checks."""
        try:
            outcome = Outcome.WAIT
            if state.phase is Phase.OPEN and state.port not in WEB_PORTS:
                state.started = self.clock()
                held = self.hold_new()  # as in _decide_bytes
                outcome = self._reject(state, held, "tcp") if held else self._raw_tcp(state)
            target = {Outcome.WAIT: state.phase, Outcome.PASSTHROUGH: Phase.SILENT}.get(
                outcome, Phase.REJECTED
            )
            self._step(state, Step.SILENCE, target)
            if outcome is not Outcome.WAIT:
                state.outcome = outcome
        except Exception as e:  # noqa: BLE001
            self._fail(state, e, state.started)
            return Outcome.REJECT
        return outcome

    def on_server_spoke(self, state: ConnState) -> Outcome:
        """The server of a connection allowed on silence sent its first bytes: from
        now on a plain relay (PASSTHROUGH), or REJECT (denied) if the call was illegal."""
        try:
            self._step(state, Step.SERVER_SPOKE, Phase.PASSING)
        except IllegalTransition as e:
            self._fail(state, e, self.clock())
            return Outcome.REJECT
        return Outcome.PASSTHROUGH

    def _tls(self, state: ConnState, data: bytes) -> Outcome:
        try:
            hello = parse_client_hello(data)
        except ValueError as e:
            return self._reject(
                state, deny("malformed-tls", detail=f"unparseable ClientHello: {e}"), "tls"
            )
        if hello is None:
            if len(data) < MAX_FIRST_BYTES:
                return Outcome.WAIT
            return self._reject(
                state,
                deny("malformed-tls", detail=f"ClientHello longer than {MAX_FIRST_BYTES} bytes"),
                "tls",
            )
        state.client_hello = hello
        if not hello.sni:
            decision = self._decide_connect(state, name=None)
            if not decision.allowed:
                decision = deny(
                    "missing-sni",
                    detail=f"TLS to {state.ip}:{state.port} without SNI and no IP rule allows it",
                )
        else:
            try:
                state.name = parse_domain(hello.sni)
            except InvalidName as e:
                return self._reject(
                    state,
                    deny("malformed-tls", reason=Reason.INVALID_NAME, detail=f"SNI: {e}"),
                    "tls",
                )
            if state.placeholder is not None and state.name != state.placeholder:
                return self._reject(
                    state,
                    _mismatch(f"SNI {state.name} to the placeholder of {state.placeholder}"),
                    "tls",
                )
            decision = self._decide_connect(state, name=state.name)
        decision = _hello_checked(hello, state, decision)
        decision = self._consult(state, decision, "tls")
        if decision.verdict is Verdict.ASK:
            return self._ask(state, decision, "tls")
        if decision.allowed and decision.inspect:
            decision = self._over_leaf_rate(state) or decision
        self._emit_connection(
            decision, state.fields, state.name, "tls", state.started, state.answered
        )
        if not decision.allowed:
            return Outcome.REJECT
        state.allowed, state.protocol = decision, "tls"
        return Outcome.INTERCEPT if decision.inspect else Outcome.PASSTHROUGH

    def on_later_hello(self, state: ConnState, hello: ClientHello, second: bool) -> bool:
        """A plaintext ClientHello later in a pass-through connection than its first
        bytes, found by the front door's watch (frontdoor/hello_watch.py) before the
        upstream got it. `second`: the answer to a HelloRetryRequest, which must name
        the server the first hello named (the same canonical SNI, or none for none)
        and hide none (ECH) where the first's allow was by name. Otherwise it is the
        first hello of a raw-TCP connection, after a preamble (PostgreSQL's
        SSLRequest, STARTTLS): decided as `_tls` decides one (the SNI bound to this
        address or allowed by an IP rule, no ECH), with its own event. True: it may go
        on; False: denied (the event is out), the caller resets the connection."""
        try:
            state.started = self.clock()
            if second:
                decision = self._second_hello(state, hello)
            else:
                decision = self._hello_after_preamble(state, hello)
            if decision is None:
                return True
            # Named as the hello named it (a denied second one: not the name the
            # connection was allowed for, which its end event keeps).
            name = _sni_name(hello) if not decision.allowed else state.name
            self._emit_connection(
                decision, state.fields, name or state.name, "tls", state.started, state.answered
            )
            return decision.allowed
        except Exception as e:  # noqa: BLE001 - deny, say why, keep serving others
            self._fail(state, e, state.started)
            return False

    def on_resumed(self, state: ConnState, session_id: bytes) -> bool:
        """A TLS 1.2 (or older) server resumed a session on this pass-through
        connection (the front door's watch told an abbreviated handshake, before the
        client's next bytes went): it serves the name the session was made for, which
        need not be the SNI (proxy/tls_sessions.py). `session_id`: its ServerHello's.
        True when the session was issued to this sandbox on a connection decided for
        the same name, address and port, or when any name at the address was allowed
        (an IP rule); otherwise the deny event is out and the caller resets."""
        try:
            allowed, hello = state.allowed, state.client_hello
            if allowed is not None and _by_address(allowed):
                return True
            session = None
            if hello is not None and hello.ticket:
                session = ("ticket", hello.ticket)  # a server tries a ticket first (RFC 5077)
            elif hello is not None and hello.session_id and session_id == hello.session_id:
                session = ("id", session_id)
            where = (state.name, state.ip, state.port)
            issued = session and self.sessions.issued_where(state.sandbox.address, *session)
            if issued == where:
                return True
            target = f"{state.name or state.ip}:{state.port}"
            seen = (
                f"issued on a connection to {issued[0] or issued[1]}:{issued[2]}"
                if issued
                else "the gateway did not see issued to this sandbox"
            )
            decision = deny(
                "resumed-session",
                detail=f"the TLS 1.2 server at {state.ip}:{state.port} resumed "
                f"{_SESSION_KINDS[session[0] if session else '']} {seen}, on a connection decided for "
                f"{target}: it serves the name a session was made for, not the SNI; reset "
                "before the client's next bytes",
            )
            self._emit_connection(decision, state.fields, state.name, "tls", self.clock())
            return False
        except Exception as e:  # noqa: BLE001 - deny, say why, keep serving others
            self._fail(state, e, self.clock())
            return False

    def on_sessions_issued(self, state: ConnState, sessions: tuple[tuple[str, bytes], ...]) -> None:
        """A TLS 1.2 server issued `sessions` (its session id, its tickets) on this
        allowed pass-through connection: they may be resumed on a connection decided
        as this one (on_resumed)."""
        self.sessions.add(state.sandbox.address, sessions, (state.name, state.ip, state.port))

    def on_hello_refused(self, state: ConnState, detail: str) -> None:
        """Where a server reads a ClientHello the front door's watch found bytes it
        cannot decide (`detail` says what): its event; the caller resets."""
        decision = deny("malformed-tls", detail=f"{detail}; reset before the upstream got it")
        self._emit_connection(decision, state.fields, state.name, "tls", self.clock())

    def _second_hello(self, state: ConnState, hello: ClientHello) -> Decision | None:
        first = state.client_hello
        before = parse_domain(first.sni) if first is not None and first.sni else None
        try:
            name = parse_domain(hello.sni) if hello.sni else None
        except InvalidName as e:
            return deny(
                "malformed-tls",
                reason=Reason.INVALID_NAME,
                detail=f"the second ClientHello's SNI: {e}",
            )
        if name != before or hello.sni != (first.sni if first is not None else None):
            return deny(
                "client-hello-changed",
                detail=f"a later ClientHello on this connection (after a HelloRetryRequest, "
                f"or after the server answered) names {name or 'no server'}, the first "
                f"(decided) {before or 'none'}: reset before the server got it",
            )
        if hello.hidden_name and not (first is not None and first.hidden_name):
            allowed = state.allowed
            if allowed is not None and not _by_address(allowed):
                return deny(
                    "encrypted-client-hello",
                    detail=f"a later ClientHello to {name or state.ip} on this connection "
                    "hides its server name (ECH): reset before the server got it",
                )
        # The hello the server answers now: what it offers to resume is this one's
        # (on_resumed), not the first's (a red team, session 49: a STARTTLS second hello
        # resumed another tenant's ticket behind a first hello's known one).
        state.client_hello = hello
        return None  # the hello decided before, again

    def _hello_after_preamble(self, state: ConnState, hello: ClientHello) -> Decision | None:
        if not hello.sni:
            # It names no server: the raw-TCP decision stands, unless that was by name
            # and the hello hides one.
            if hello.hidden_name and state.allowed is not None and not _by_address(state.allowed):
                return deny(
                    "encrypted-client-hello",
                    detail=f"a ClientHello after raw-TCP bytes to {state.ip}:{state.port} "
                    "hides its server name (ECH)",
                )
            state.client_hello = hello
            return None
        try:
            name = parse_domain(hello.sni)
        except InvalidName as e:
            return deny(
                "malformed-tls",
                reason=Reason.INVALID_NAME,
                detail=f"SNI of a ClientHello after raw-TCP bytes: {e}",
            )
        before, state.name = state.name, name  # what an ask's key names
        if state.placeholder is not None and name != state.placeholder:
            state.name = before
            return _mismatch(f"SNI {name} to the placeholder of {state.placeholder}")
        decision = self._decide_connect(state, name=name)
        if hello.hidden_name and decision.verdict is not Verdict.DENY and not _by_address(decision):
            decision = deny(
                "encrypted-client-hello",
                detail=f"ClientHello to {name} after raw-TCP bytes hides its server name (ECH)",
            )
        decision = _spelled_otherwise(hello, name, decision) or decision
        decision = self._consult(state, decision, "tls")
        if decision.verdict is Verdict.ASK:
            decision = Decision(
                Verdict.DENY,
                Reason.APPROVAL_PENDING,
                decision.rule,
                detail=f"{decision.detail}; a ClientHello after raw-TCP bytes is not held "
                f"for a human: approve {name} first",
            )
        elif decision.allowed and decision.inspect:
            decision = deny(
                "not-http",
                detail=f"a rule for {name}:{state.port} checks HTTP methods or paths, and "
                "this TLS after raw-TCP bytes passes through uninspected",
            )
        if decision.allowed:
            state.allowed, state.protocol, state.client_hello = decision, "tls", hello
        else:
            state.name = before  # its end event names what the connection was allowed for
        return decision

    def _raw_tcp(self, state: ConnState) -> Outcome:
        if state.port in WEB_PORTS:
            decision = deny(
                "not-http", detail=f"bytes to {state.ip}:{state.port} are neither TLS nor HTTP"
            )
        else:
            # No name in the protocol: try the names this sandbox resolved to the address.
            if state.placeholder is not None:
                state.name = state.placeholder
                decision = self._decide_connect(state, name=state.name)
            else:
                decision = self._decide_connect(state, name=None)
                for name in self.bindings.names_for(state.sandbox.address, str(state.ip)):
                    candidate = self._decide_connect(state, name=name)
                    if (
                        candidate.allowed
                        or candidate.verdict is Verdict.ASK
                        or candidate.reason is Reason.RULE_DENY
                    ):
                        state.name, decision = name, candidate
                        break
            refused = _not_http(state, decision)
            if refused is not None:
                decision = refused  # not asked about: an approval would pass it all
            else:
                decision = self._consult(state, decision, "tcp")
                if decision.verdict is Verdict.ASK:
                    return self._ask(state, decision, "tcp")
        self._emit_connection(
            decision, state.fields, state.name, "tcp", state.started, state.answered
        )
        if not decision.allowed:
            return Outcome.REJECT
        state.allowed = decision
        return Outcome.PASSTHROUGH

    # --- 3. HTTP requests -------------------------------------------------------------

    def on_request(
        self, state: ConnState, head: RequestHead, tls: bool
    ) -> tuple[Decision, CheckedHead | None]:
        """Check (request_head.check_head) and decide one HTTP request (plain, or
        inside intercepted TLS), and emit it. The CheckedHead is None when refused."""
        started = self.clock()
        name = checked = state.answered = None
        try:
            self._step(state, Step.REQUEST, state.phase)
            refused = check_head(head, state.port)
            if isinstance(refused, Decision):
                decision = refused
            elif (held := self.hold_requests()) is not None:
                decision, name = held, self._request_name(state, refused.host)
            else:
                checked = refused
                decision, name = self._decide_request(state, checked)
                unread = checked.form_body is not None and not self._reads_method(state, checked)
                if unread:
                    checked = checked._replace(form_body=None)  # no override can matter
                state.request_body_unread = unread
                protocol = "https" if tls else "http"
                decision = self._consult(
                    state, decision, protocol, name, checked.method, checked.path, checked
                )
                if decision.verdict is Verdict.ASK:
                    # The adapter holds the request, then calls `on_request_answer`.
                    return decision, checked
        except Exception as e:  # noqa: BLE001
            log.exception("request decision failed; denying")
            decision = deny("internal-error", detail=f"{type(e).__name__}: {e}")
        return self._settle_request(
            state, decision, head, checked, tls, name, started, state.answered
        )

    def on_unfinished_head(self, state: ConnState, start: bytes, size: int, tls: bool) -> Decision:
        """An HTTP/1 request head still unfinished after `size` (> MAX_HEAD_BYTES)
        bytes, `start` its first bytes: refused (431, headers_too_large) and emitted
        as a request, before it ends; the adapter answers and closes."""
        head, decision = refuse_unfinished(start, size)
        return self.on_refused_request(state, head, decision, tls)

    def request_ask_key(
        self, state: ConnState, decision: Decision, checked: CheckedHead, tls: bool
    ) -> AskKey:
        """What a held request (on_request said ASK) waits on."""
        name = self._request_name(state, checked.host)
        protocol = "https" if tls else "http"
        return self._ask_key(state, decision, protocol, name, checked.method, checked.path, checked)

    def on_request_answer(
        self,
        state: ConnState,
        asked: Decision,
        answer,
        head: RequestHead,
        checked: CheckedHead,
        tls: bool,
        unresolved: Decision | None = None,
        revoked: Decision | None = None,
    ) -> tuple[Decision, CheckedHead | None]:
        """A held request's end (`answer`: proxy/approvals/holder.HoldResult): the
        final decision, emitted, as on_request returns it. `unresolved`: approved, but
        the placeholder's name then had no address it may reach (the resolver's denial:
        no public address, dns_upstream_failure, or one a rule refuses; the adapter
        answers and connects nowhere). `revoked`: approved, but
        `held_request_revoked` found the policy denies it now."""
        started = self.clock()
        decision = _unless_held(_answered(asked, answer), self.hold_requests)
        if decision.allowed and revoked is not None:
            decision = revoked
        elif decision.allowed and unresolved is not None:
            decision = dataclasses.replace(
                unresolved,
                detail=f"{decision.detail}, but {unresolved.detail}; nothing was sent "
                f"(its placeholder {state.ip} is not a server)",
            )
        name = self._request_name(state, checked.host)
        # What a WebSocket tunnel it opens rests on (on_tunnel).
        state.request_grant = answer.pending if decision.allowed else None
        return self._settle_request(state, decision, head, checked, tls, name, started, answer)

    def held_request_revoked(self, state: ConnState, checked: CheckedHead) -> Decision | None:
        """A held request a human approved, decided again under the current policy: a
        reload while it was held may deny it now, and a deny wins over any approval.
        None if the approval stands (the policy still asks, or allows), else the
        denial (policy_changed) for `on_request_answer`. The adapter asks before it
        resolves a placeholder's name, so a name denied meanwhile is not resolved."""
        denial = self._request_decision_now(state, checked)
        if denial.verdict is Verdict.ASK and self.approvals is not None:
            return None  # the human's answer, just given, answers it
        denial = _without_approver(denial)
        if denial.allowed:
            return None
        return Decision(
            Verdict.DENY,
            Reason.POLICY_CHANGED,
            denial.rule,
            detail=f"approved, but a policy reload while it was held denies it "
            f"({denial.reason}): {denial.detail}",
        )

    def _settle_request(
        self, state, decision, head, checked, tls, name, started, answer=None
    ) -> tuple[Decision, CheckedHead | None]:
        state.requests += 1
        if decision.allowed and state.allowed_name is not None and name != state.allowed_name:
            # Its upstream connection is the first request's, made for that name: a
            # router that picks a backend per connection (or the door's pool, keyed by
            # it) would serve this one as the first's (a red team, session 49). Clients
            # keep a connection per host.
            decision = _mismatch(
                f"Host {name} on a keep-alive connection whose requests went to "
                f"{state.allowed_name}: its upstream connection is that name's; a new "
                "connection for another host"
            )
        if decision.allowed and state.allowed is None:
            # Plain HTTP: the connection's end reports bytes under its first allowed request.
            state.allowed, state.protocol, state.allowed_name = decision, "http", name
        if checked is not None:
            state.request = checked if decision.allowed else None
        self._emit_request(state, decision, head, tls, name, started, answer)
        return decision, _as_decided(checked, state.port, tls) if decision.allowed else None

    def _request_name(self, state: ConnState, host: str) -> str | None:
        return _read_host(host).name or state.name

    def _emit_request(
        self,
        state: ConnState,
        decision: Decision,
        head: RequestHead,
        tls: bool,
        name: str | None,
        started: float,
        answer=None,
    ) -> None:
        self.emit(
            Event.from_decision(
                EventKind.REQUEST,
                decision,
                **state.fields,
                protocol="https" if tls else "http",
                name=name,
                # Whole (a head is at most 64 KiB): Event bounds them, saying how much it cut.
                method=head.text(head.method, MAX_HEAD_BYTES),
                path=head.text(head.target, MAX_HEAD_BYTES),
                latency=self.clock() - started,
                **_answer_fields(answer),
            )
        )

    def _decide_request(self, state: ConnState, head: CheckedHead) -> tuple[Decision, str | None]:
        decision, name = self._decide_method(state, head)
        return with_overrides(decision, head, lambda h: self._decide_method(state, h)[0]), name

    def _reads_method(self, state: ConnState, head: CheckedHead) -> bool:
        """Whether a rule for `head`'s destination reads the method or path, so that an
        override in its body may be refused (form_body.py): False only where the
        request memo `_decide_method` left says one decision holds for any request
        there. Where none does, its body is not read (nor kept, nor held back)."""
        memo = state.request_memo
        return memo is None or memo.host != head.host or memo.decision is None

    def _decide_method(self, state: ConnState, head: CheckedHead) -> tuple[Decision, str | None]:
        memo = state.request_memo
        key = None
        if memo is None or memo.host != head.host:
            # The first request on a connection (most plain-HTTP connections have only
            # one) takes the memo of an earlier connection with the same facts that are
            # constant on a connection (_memo_key): 15.4 -> 10.8 us an on_request.
            key = _memo_key(state, head.host)
            memo = self._request_memos.get(key)
        if memo is not None and memo.policy is self.policy:  # its Host is head's (the key's)
            state.request_memo = memo
            if memo.decision is None:  # its rules read the method or path: decide each
                decision, name, _ = self._decide_request_anew(state, head)
                return decision, name
            if (
                memo.websocket is head.websocket
                and self.wall_clock() < memo.until
                and self._resolved(state, memo.name) == memo.resolved
            ):
                return memo.decision, memo.name
        state.request_memo = None
        decision, name, facts = self._decide_request_anew(state, head)
        if facts is not None:
            reusable = not depends_on_request(self.policy, facts)
            memo = state.request_memo = _RequestMemo(
                self.policy,
                head.host,
                head.websocket,
                facts.name_resolved_to_ip,
                self.policy.profiles[facts.profile].first_expiry if reusable else 0.0,
                decision if reusable else None,
                name,
            )
            _keep(self._request_memos, key or _memo_key(state, head.host), memo)
        return decision, name

    def _decide_request_anew(
        self, state: ConnState, head: CheckedHead
    ) -> tuple[Decision, str | None, RequestFacts | None]:
        """The request's decision, its name and the facts decided on (None: refused
        before the policy was asked, by the Host alone)."""
        host = head.host
        read = _read_host(host)
        name = read.name
        if read.ip is not None:
            if read.ip != state.ip or read.host != str(read.ip):
                return _mismatch(f"Host {host!r} is not the destination {state.ip}"), None, None
            if state.name is not None:
                named = "TLS named" if state.protocol == "tls" else "the connection is for"
                return _mismatch(f"Host {host!r} is an address; {named} {state.name}"), None, None
        elif read.host:
            if read.invalid is not None:
                invalid = f"Host header: {read.invalid}"
                return deny("host-mismatch", reason=Reason.INVALID_NAME, detail=invalid), None, None
            if state.name is not None and name != state.name:
                named = "TLS SNI" if state.protocol == "tls" else "the connection's name"
                return _mismatch(f"Host {name} differs from {named} {state.name}"), name, None
        elif state.name is None:
            return _mismatch("request without a Host header"), None, None
        name = name or state.name
        facts = RequestFacts(
            profile=state.sandbox.profile,
            port=state.port,
            method=head.method,
            path=head.path,
            ip=None if state.placeholder is not None else state.ip,
            name=name,
            name_resolved_to_ip=self._resolved(state, name),
            now=self.wall_clock(),
            websocket=head.websocket,
        )
        return decide(self.policy, facts), name, facts

    # --- 4. close ---------------------------------------------------------------------

    def on_close(self, state: ConnState, problem: str | None = None) -> None:
        """The connection is gone. An allowed one reports its bytes and duration; one
        that never got a decision (a port scan, a client that waited for a banner on
        a web port) still gets its event. `problem`, if any, says what ended it
        (the upstream refused, a timeout): added to an allowed connection's detail,
        the whole detail of an undecided one.
        Reported once: a second close of the same connection does nothing."""
        phase = state.phase
        try:
            self._step(state, Step.CLOSE, Phase.CLOSED)
        except IllegalTransition as e:  # never admitted: nothing to report but the bug
            log.error("sandgate: %s", e)
            return
        if phase is Phase.CLOSED:
            return  # closed before: its end is reported
        if self.connections.get(state.key) is state:
            del self.connections[state.key]
        self.counts.closed(state.sandbox)
        if state.allowed is not None:
            event = Event.from_decision(
                EventKind.CONNECTION_END,
                state.allowed,
                **state.fields,
                protocol=state.protocol,
                name=state.name or state.allowed_name,
                bytes_up=state.bytes_up,
                bytes_down=state.bytes_down,
                duration=self.clock() - state.opened,
            )
            self.emit(event.with_fields(detail=f"{event.detail}; {problem}") if problem else event)
        elif phase is Phase.OPEN:
            state.outcome = Outcome.REJECT
            self._emit_connection(
                deny("no-data", detail=problem or "closed before sending enough bytes to decide"),
                state.fields,
                state.name,
                "tcp",
                state.started,
            )
        elif state.outcome is Outcome.HTTP and state.requests == 0:
            # Plain HTTP whose head never reached a decision: the HTTP parser refused
            # it (400) or it was cut short. Still one event, and never an allow.
            self._emit_connection(
                self._undecided_http(state, problem), state.fields, None, "http", state.started
            )

    @staticmethod
    def _undecided_http(state: ConnState, problem: str | None) -> Decision:
        sent = f"{state.bytes_up} bytes sent, no request decided"
        if state.bytes_up:
            return deny(
                "malformed-request",
                detail=f"{sent}: the gateway's HTTP parser refused the request head (400), "
                "or it never ended" + (f"; {problem}" if problem else ""),
            )
        return deny("no-data", detail=problem or sent)

    def on_tunnel(self, state: ConnState, upgrade: CheckedHead) -> None:
        """The server accepted an allowed WebSocket `upgrade` (101): the connection is
        a tunnel now, which a reload or an expiry closes once that request is denied,
        and the end of the approval that let it through (`--for`) once it is asked
        about. The upgrade is the latest request on its HTTP/1 connection: the
        approval of that one (`request_grant`) is the tunnel's."""
        state.tunnel, state.tunnel_grant = upgrade, state.request_grant
        self._watch(state.tunnel_grant)

    def on_refused_switch(self, state: ConnState, head: RequestHead, tls: bool) -> None:
        """The server answered 101 to a request whose upgrade no rule allowed: the
        adapter kills the exchange; this is its event."""
        decision = deny(
            "protocol-not-allowed",
            detail="the server switched protocols (101), and no websocket rule allowed an upgrade",
        )
        self.on_refused_response(state, head, decision, tls)

    def on_refused_response(
        self, state: ConnState, head: RequestHead, decision: Decision, tls: bool
    ) -> None:
        """The adapter cut the response to the allowed request `head` (`decision`
        says why: a switch no rule allowed, a head over its limits); this is its event."""
        self._emit_request(state, decision, head, tls, None, self.clock())

    def on_unparsed_request(
        self, state: ConnState, head: RequestHead, problem: str, tls: bool
    ) -> Decision:
        """An HTTP/1 request head that the adapter's strict parser refused (`problem`),
        read leniently as `head`: refused and emitted as a request, with check_head's
        reason if it has one (the one the lenient parser's path gives), else
        malformed_request naming the problem. The adapter answers and closes."""
        refused = check_head(head, state.port)
        if not isinstance(refused, Decision):
            refused = deny(
                "malformed-request",
                detail=f"the gateway's HTTP/1 parser refused the request head: {problem}",
            )
        return self.on_refused_request(state, head, refused, tls)

    def on_refused_request(
        self, state: ConnState, head: RequestHead, decision: Decision, tls: bool
    ) -> Decision:
        """A request the adapter refuses with `decision` (a denial): emitted as a
        request and returned; the adapter answers and closes."""
        started = self.clock()
        try:
            self._step(state, Step.REQUEST, state.phase)
        except IllegalTransition as e:  # the denial stands; the bug is logged
            log.error("sandgate: %s", e)
        return self._settle_request(state, decision, head, None, tls, state.name, started)[0]

    def on_form_body(
        self,
        state: ConnState,
        head: RequestHead,
        checked: CheckedHead,
        form: FormOverrides,
        tls: bool,
    ) -> Decision | None:
        """What an allowed request's form body has said so far (`form`, which the adapter
        feeds; form_body.py): None where each method override it names is allowed
        here too, as an override in the query or a header must be (`with_overrides`);
        else the denial (ambiguous_method; malformed_request where the body cannot be
        read as servers would), emitted as the request's second event, its head's
        having allowed it. The adapter then cuts the upstream connection before the
        body's end, so no server runs the request, and answers the client 400."""
        found, form.found = tuple(form.found), []
        if form.problem is not None:
            decision = deny("malformed-request", detail=f"the form body: {form.problem}")
        else:
            decision = None
            for override in found:
                decision = not_one_method(override[0], override[2]) or refused_override(
                    checked, (override,), lambda h: self._decide_method(state, h)[0]
                )
                if decision is not None:
                    break
            else:
                return None
        name = self._decide_method(state, checked)[1]  # the name its head was decided for
        self._emit_request(state, decision, head, tls, name, self.clock())
        return decision

    def on_held_body_too_large(
        self, state: ConnState, head: RequestHead, size: int, limit: int, tls: bool
    ) -> Decision:
        """`size` (> `limit`) bytes of a request's body arrived while the request was
        held for a human's decision: the adapter refuses it (413) instead of buffering
        more; this is its event (body_too_large)."""
        decision = deny(
            "body-too-large",
            detail=f"{size} bytes of body arrived while the request was held for approval; "
            f"at most {limit} are buffered meanwhile",
        )
        state.requests += 1  # decided: the connection's end is not `malformed_request`
        self._emit_request(state, decision, head, tls, state.name, self.clock())
        return decision

    def on_response_head_too_large(
        self, state: ConnState, head: RequestHead, problem: str, tls: bool
    ) -> Decision:
        """The upstream's HTTP/1 response head to `head` is over its limits (`problem`
        says how): the adapter cuts it and answers 502; this is its event
        (headers_too_large, like a request head's)."""
        decision = deny(
            "headers-too-large",
            detail=f"the upstream's response head {problem}; at most {MAX_FIELDS} fields "
            f"and {MAX_HEAD_BYTES} bytes: cut, 502 to the client",
        )
        self.on_refused_response(state, head, decision, tls)
        return decision

    def on_h2_closed(self, state: ConnState, rule: str, detail: str) -> None:
        """The adapter closed the client's HTTP/2 connection with a GOAWAY: for frames
        past a bound (ENHANCE_YOUR_CALM; built-in `rule` rapid-reset,
        control-frame-flood, headers-too-large), or for a protocol error, a request
        head h2 refused (malformed-request); `detail` what it sent. This is its event,
        before the connection's end."""
        decision = deny(rule, detail=detail)
        self._emit_connection(decision, state.fields, state.name, state.protocol, state.started)

    def on_tls_rejected(self, state: ConnState, error: str) -> None:
        """Under inspection the client's TLS handshake with the gateway failed: its own
        event, saying what happened where `error` tells (policy/client_tls.py): the
        client refused the certificate (pinned, or a private CA: the summary says so),
        stopped, or has no TLS version in common, or sent what is not TLS."""
        decision = client_tls_failure(state.name, error)
        self._emit_connection(decision, state.fields, state.name, "tls", state.started)

    def fail(
        self, state: ConnState | None, error: Exception, fields: dict | None = None
    ) -> Decision:
        """An adapter failed around a decision: deny with `internal_error`, emit it, and
        return it. An undecided connection counts as rejected; the caller closes it.
        `fields` (source, dst_ip, dst_port) describe a connection that has no state."""
        return self._fail(state, error, self.clock(), fields)

    # --- 5. a new policy ----------------------------------------------------------------

    def forget_sandbox(self, sandbox: Sandbox) -> None:
        """`sandbox`'s task ended: what the gate kept for it goes with it, its request
        memos (the next task at its address must not inherit them), its leaf budget and
        the TLS sessions it was issued."""
        for key in [k for k in self._request_memos if k[0] == sandbox.address]:
            del self._request_memos[key]
        self.leaves.forget(sandbox)
        self.sessions.forget(sandbox.address)

    def revoke_denied(self, why: str = "a policy reload") -> list[ConnState]:
        """Decide every open connection again under `self.policy` (just swapped in,
        or with a rule just expired: the facts get the current time), on the facts it
        was decided on, and revoke those it denies: each gets a deny event (reason
        policy_changed, naming the rule that denies it now; the detail says `why`) and
        moves to REJECTED; they are returned for their adapters to close
        (`state.abort`). Connections still allowed carry on under the policy's hash
        and decision."""
        revoked = []
        self._request_memos.clear()  # made under the old policy: they would keep that alive
        self._connect_memos.clear()
        for state in list(self.connections.values()):
            started = self.clock()
            state.request_memo = None  # made under the old policy: it would keep that alive
            try:
                denial = self._denial_under_new_policy(state)
                if denial is None:
                    state.fields["policy_hash"] = self.policy.hash
                    continue
                self._step(state, Step.REVOKE, _REVOKED_PHASE.get(state.phase, Phase.REJECTED))
                state.fields["policy_hash"] = self.policy.hash
            except Exception as e:  # noqa: BLE001 - fail closed: revoke it, and say why
                log.error("sandgate: deciding an open connection again failed", exc_info=e)
                denial = deny("internal-error", detail=f"{type(e).__name__}: {e}")
                with contextlib.suppress(IllegalTransition):
                    self._step(state, Step.REVOKE, _REVOKED_PHASE.get(state.phase, Phase.REJECTED))
            revoked_by = Decision(
                Verdict.DENY,
                Reason.POLICY_CHANGED,
                denial.rule,
                detail=f"closed by {why} ({denial.reason}): {denial.detail}",
            )
            self._emit_connection(revoked_by, state.fields, state.name, state.protocol, started)
            revoked.append(state)
        return revoked

    def _denial_under_new_policy(self, state: ConnState) -> Decision | None:
        """What the current policy says about an open connection, asked as it was
        asked before: None if it may go on, else the denying decision. One a human
        approved gets the checks one a rule allowed gets (a deny, a rule that now
        checks methods or paths where it is relayed, its tunnel's upgrade); its
        approval only answers the question the policy still asks, and only while
        that approval is in force (_approval_ended)."""
        if state.phase in (Phase.NEW, Phase.REJECTED, Phase.CLOSED):
            return None
        if state.phase is Phase.OPEN or state.outcome is Outcome.HTTP:
            # Nothing decided past connect (plain HTTP: each request is, and the next
            # meets the new policy): only a denial final at connect ends it.
            decision = self._decide_connect(state, name=None)
            if decision.reason in _FINAL_AT_CONNECT:
                return decision
            return self._exchange_denial(state)
        decision = self._decided_again(state)
        if decision.verdict is Verdict.ASK and self.approvals is not None:
            if state.phase is Phase.ASKING:
                return None  # held: on_answer decides it under the policy in force then
            ended = self._approval_ended(state.grant, decision)
            if ended is not None:
                return ended
            decision = _answered(decision, Grant(True, state.grant))
        decision = _without_approver(decision)
        if not decision.allowed:
            return decision
        if decision.inspect and state.outcome is Outcome.PASSTHROUGH:
            return deny(
                "policy-changed",
                detail="a rule now checks HTTP methods or paths here, which a relayed "
                "connection cannot be held to",
            )
        state.allowed = decision
        return self._exchange_denial(state)

    def _decided_again(self, state: ConnState) -> Decision:
        """A connection's connect decision under the current policy, on the facts it
        was decided on (the time now), with the checks its protocol adds where it is
        relayed: a TLS hello's (_hello_checked); raw TCP that a rule of methods or
        paths covers is `not_http` (as in `_raw_tcp`)."""
        facts = state.facts
        if facts is None or facts.name != state.name:
            self._decide_connect(state, state.name)  # records the facts
            facts = state.facts
        decision = decide(self.policy, dataclasses.replace(facts, now=self.wall_clock()))
        relayed = state.outcome is not Outcome.INTERCEPT
        if relayed and state.protocol == "tls" and state.client_hello is not None:
            return _hello_checked(state.client_hello, state, decision)
        if relayed and state.protocol == "tcp":
            return _not_http(state, decision) or decision
        return decision

    def _approval_ended(self, approval: Pending | None, asked: Decision) -> Decision | None:
        """For what the policy asks about now (`asked`) and `approval` let through: None
        while that approval is in force, else the denial that closes it (none: the
        policy asks, and no human answered; an approval that has ended)."""
        if approval is None:
            return asked
        ended = self._approval_end(approval)
        if ended is None:
            return None
        return Decision(
            Verdict.DENY,
            Reason.APPROVAL_EXPIRED,
            asked.rule,
            detail=f"approval {approval.id} ({approval.scope}) {ended}",
        )

    def _approval_end(self, approval: Pending) -> str | None:
        """None while an approval is in force, else how it ended: a `--for` at its
        `until`; an `always` when its rule approved:ID is no longer in the policy
        (removed from approved.yaml and reloaded) or past its `expires`. Once and
        task end with what they let through (the task)."""
        if approval.until is not None and approval.until <= self.approvals.clock():
            return "has ended"
        if approval.scope is Scope.ALWAYS and not self._rule_in_force(approval):
            return (
                f"has ended: its rule approved:{approval.id} is no longer in force "
                "(removed, or past its expires)"
            )
        return None

    def _rule_in_force(self, approval: Pending) -> bool:
        rule_id = f"approved:{approval.id}"
        compiled = self.policy.profiles.get(approval.key.profile)
        if compiled is None:
            return False
        now = self.wall_clock()
        return any(rule.id == rule_id and rule.live_at(now) for rule in compiled.rules)

    def _in_force(self, approval: Pending) -> bool:
        """PendingStore.in_force: whether `approval` still grants (_approval_end)."""
        return self._approval_end(approval) is None

    def _rests_on(self, state: ConnState, approval: Pending | None) -> None:
        """`state` was let through by `approval`: kept (the policy may ask about it
        again), and watched if it has an end."""
        state.grant = approval
        self._watch(approval)

    def _watch(self, approval: Pending | None) -> None:
        """An approval with an end (`--for`): the gateway decides again at its end."""
        if approval is not None and approval.until is not None and self.on_grant is not None:
            self.on_grant(approval)

    def _exchange_denial(self, state: ConnState) -> Decision | None:
        """A WebSocket tunnel lives only while its upgrade request is allowed, and an
        exchange (the latest request, its body or response maybe still moving) while
        that request is: decided again, None if it still is (the policy allows it, or
        asks and the approval that let it through is in force), else the denial."""
        if state.tunnel is not None:
            checked, approval = state.tunnel, state.tunnel_grant
        else:
            checked, approval = state.request, state.request_grant
        if checked is None:
            return None
        decision = self._request_decision_now(state, checked)
        if decision.verdict is Verdict.ASK and self.approvals is not None:
            return self._approval_ended(approval, decision)
        decision = _without_approver(decision)
        if not decision.allowed:
            return decision
        if state.tunnel is None and state.request_body_unread:
            _, _, facts = self._decide_request_anew(state, checked)
            if facts is None or depends_on_request(self.policy, facts):
                # (a red team, session 54: a reload added `methods:` while a POST's
                # body streamed, and its `_method` ran DELETE)
                return deny(
                    "ambiguous-method",
                    detail="its body was not read for method overrides (no rule for its "
                    "destination read the method or path when it began), and a rule does "
                    "now: an override in the rest of it would go undecided",
                )
        return None

    def _request_decision_now(self, state: ConnState, checked: CheckedHead) -> Decision:
        """A request decided again under the current policy."""
        decision, _, _ = self._decide_request_anew(state, checked)
        return with_overrides(decision, checked, lambda h: self._decide_request_anew(state, h)[0])

    # --- helpers ------------------------------------------------------------------------

    # --- approvals ---------------------------------------------------------------------

    def _consult(
        self,
        state: ConnState,
        decision: Decision,
        protocol: str,
        name: str | None = None,
        method: str | None = None,
        path: str | None = None,
        request: CheckedHead | None = None,
    ) -> Decision:
        """An ASK decision, answered by an earlier human decision when there is one
        (a grant: allowed, approval_granted; a denial: approval_denied), else left
        ASK for the adapter to hold. Without approvals: approval_unavailable. A
        grant answers only while it is in force (_approval_end; the store's in_force)."""
        state.answered = None
        if request is not None:
            state.request_grant = None
        else:
            state.grant = None  # a connection decided anew: only its new approval counts
        if decision.verdict is not Verdict.ASK:
            return decision
        if self.approvals is None:
            return _without_approver(decision)
        key = self._ask_key(
            state, decision, protocol, name if request else state.name, method, path, request
        )
        if (
            request is not None
            and state.destination_grant is not None
            and not decision.rule.inspects
            and self._approval_end(state.destination_grant.pending) is None
        ):
            # asked about the destination, whose approval let this connection through
            state.answered = state.destination_grant
            state.request_grant = state.destination_grant.pending
            return _answered(decision, state.destination_grant)
        grant = state.answered = self.approvals.grant_for(key)
        if grant is None:
            return decision
        if grant.approved and request is not None:
            state.request_grant = grant.pending
        elif grant.approved:
            self._rests_on(state, grant.pending)
            if protocol != "http":
                state.destination_grant = grant
        return _answered(decision, grant)

    def _ask_key(self, state, decision, protocol, name, method, path, request=None) -> AskKey:
        """The ask's key: a request ask (a rule with methods or paths) includes
        method and path; any other ask is about the destination. A held HTTP request
        (`request`, its checked head) is in it exactly, query included: what the
        approver is shown and what `once` lets through (proxy/approvals/pending.py)."""
        inspects = decision.rule.inspects
        held = None
        if request is not None:
            query = "" if request.query is None else "?" + request.query
            held = f"{request.method} {request.path}{query}"
        return AskKey.make(
            task_id=state.sandbox.task_id or state.sandbox.address,
            sandbox=state.sandbox.address,
            profile=state.sandbox.profile,
            name=name or str(state.ip),
            port=state.port,
            protocol=protocol,
            method=method if inspects else None,
            path=path if inspects else None,
            request=held,
        )

    def _ask(self, state: ConnState, decision: Decision, protocol: str) -> Outcome:
        state.asking, state.protocol = decision, protocol
        state.ask_key = self._ask_key(state, decision, protocol, state.name, None, None)
        return Outcome.ASK

    def on_answer(self, state: ConnState, answer) -> Outcome:
        """A held connection's hold ended (`answer`: proxy/approvals/holder.HoldResult):
        emit its decision and say what to do with it. An approved one is decided again
        under the policy in force now (_answered_now): a reload while it was held
        counts, as for one a rule allowed."""
        started = self.clock()
        try:
            decision = _answered(state.asking, answer)
            if decision.allowed:
                decision = self._answered_now(state, answer)
            decision = _unless_held(decision, self.hold_new)
            if decision.allowed:
                state.allowed = decision
                self._rests_on(state, answer.pending)
                if state.protocol == "http":
                    outcome = Outcome.HTTP
                else:
                    outcome = Outcome.INTERCEPT if decision.inspect else Outcome.PASSTHROUGH
                    state.destination_grant = answer
            else:
                outcome = Outcome.REJECT
            self._step(state, Step.ANSWER, _PHASE_OF[outcome])
            state.outcome = outcome
        except Exception as e:  # noqa: BLE001
            self._fail(state, e, started)
            return Outcome.REJECT
        self.emit(
            Event.from_decision(
                EventKind.CONNECTION,
                decision,
                **state.fields,
                protocol=state.protocol,
                name=state.name,
                latency=self.clock() - started,
                **_answer_fields(answer),
            )
        )
        return outcome

    def _answered_now(self, state: ConnState, answer) -> Decision:
        """The decision a human's approval (`answer`) makes of a held connection
        under the policy in force at the answer, which a reload may have changed
        since it was asked (`state.asking`): decided again on its facts, with the
        checks of its protocol (_decided_again). Still asked: the approval answers it,
        inspected if a rule now checks methods or paths (never relayed past one);
        allowed by a rule now: as approved, inspected as that rule says; denied: the
        deny wins (policy_changed). An inspected one within the sandbox's leaf_rate."""
        now = self._decided_again(state)
        if now.verdict is Verdict.ASK or now.allowed:
            decision = _answered(now if now.verdict is Verdict.ASK else state.asking, answer)
            decision = dataclasses.replace(decision, inspect=now.inspect)
            if decision.inspect:
                decision = self._over_leaf_rate(state) or decision
            return decision
        return Decision(
            Verdict.DENY,
            Reason.POLICY_CHANGED,
            now.rule,
            detail=f"approved, but the policy in force at the answer denies it "
            f"({now.reason}): {now.detail}",
        )

    def _decide_connect(self, state: ConnState, name: str | None) -> Decision:
        state.facts = ConnectFacts(
            profile=state.sandbox.profile,
            port=state.port,
            ip=None if state.placeholder is not None else state.ip,
            name=name,
            name_resolved_to_ip=self._resolved(state, name),
            now=self.wall_clock(),
        )
        return decide(self.policy, state.facts)

    def _resolved(self, state: ConnState, name: str | None) -> bool | None:
        if name is None or state.placeholder is not None:
            return None  # a placeholder's name: the gateway resolves it itself
        # The parsed address, not its text: the bindings would parse that again.
        return self.bindings.resolved(state.sandbox.address, name, state.ip)

    def _reject(self, state: ConnState, decision: Decision, protocol: str) -> Outcome:
        self._emit_connection(
            decision, state.fields, state.name, protocol, state.started, state.answered
        )
        return Outcome.REJECT

    def _settle(self, state: ConnState, step: Step, outcome: Outcome) -> None:
        """Move `state` to where `outcome` puts it (WAIT: where it is)."""
        self._step(state, step, state.phase if outcome is Outcome.WAIT else _PHASE_OF[outcome])
        if outcome is not Outcome.WAIT:
            state.outcome = outcome

    def _step(self, state: ConnState, step: Step, target: Phase) -> None:
        was = state.phase
        state.phase = advance(was, step, target)
        if was is Phase.OPEN and target is not Phase.OPEN:
            self.counts.decided(state.sandbox)  # no longer pending: once, OPEN is never re-entered

    def _fail(
        self, state: ConnState | None, error: Exception, started: float, fields: dict | None = None
    ) -> Decision:
        """Deny with `internal_error` and emit it; reject the connection if its phase
        allows (an undecided one), else leave the phase as it is."""
        if state is not None:
            fields = state.fields
            target = Phase.REJECTED if state.phase in (Phase.OPEN, Phase.SILENT) else state.phase
            try:
                self._step(state, Step.FAIL, target)
            except IllegalTransition as e:
                log.error("sandgate: %s", e)
            else:
                if target is Phase.REJECTED:
                    state.outcome = Outcome.REJECT
        return self._internal_error(error, fields or {}, started, state)

    def _internal_error(
        self, error: Exception, fields: dict, started: float, state: ConnState | None
    ) -> Decision:
        log.error("sandgate connection decision failed; denying", exc_info=error)
        decision = deny("internal-error", detail=f"{type(error).__name__}: {error}")
        self._emit_connection(decision, fields, state.name if state else None, "tcp", started)
        return decision

    def _emit_connection(
        self,
        decision: Decision,
        fields: dict,
        name: str | None,
        protocol: str,
        started: float,
        answer=None,
    ) -> None:
        # The gateway stamps policy hash and task id on every event.
        self.emit(
            Event.from_decision(
                EventKind.CONNECTION,
                decision,
                **fields,
                protocol=protocol,
                name=name,
                latency=self.clock() - started,
                **_answer_fields(answer),
            )
        )


def _no_hold() -> None:
    return None


def _without_approver(decision: Decision) -> Decision:
    # `ask` needs a human; until an approver is connected, asking is denying.
    if decision.verdict is Verdict.ASK:
        return Decision(
            Verdict.DENY,
            Reason.APPROVAL_UNAVAILABLE,
            decision.rule,
            detail=f"{decision.detail}; the profile asks a human, and no approver is connected",
        )
    return decision


_ANSWER_REASONS = {
    "denied": (Reason.APPROVAL_DENIED, "a human denied it"),
    "pending": (Reason.APPROVAL_PENDING, "no decision within the hold; still pending"),
    "expired": (Reason.APPROVAL_EXPIRED, "nobody decided in time"),
    "queue_full": (
        Reason.APPROVAL_QUEUE_FULL,
        "the sandbox has as many approvals pending as its profile allows, or the gateway "
        "as many as it holds (10,000)",
    ),
}


def _not_http(state: ConnState, decision: Decision) -> Decision | None:
    """The denial of raw TCP relayed on `state` where a rule there checks HTTP methods
    or paths (bytes that are not HTTP cannot be held to it, so they may not pass at all,
    nor be asked about), else None. For `_raw_tcp`, and for a raw TCP connection
    decided again at a reload (`_decided_again`)."""
    if decision.verdict is Verdict.DENY or not decision.inspect:
        return None
    return deny(
        "not-http",
        detail=f"a rule for {state.name or state.ip}:{state.port} checks HTTP methods or "
        "paths, and these bytes are not HTTP",
    )


def _hello_checked(hello: ClientHello, state: ConnState, decision: Decision) -> Decision:
    """`decision` for a pass-through of `hello` on `state` (named `state.name`, the SNI
    decided), or the denial of what passing it through would hide: a name (ECH), or
    a spelling (_spelled_otherwise). The checks of `_tls`, and of a TLS connection
    decided again: a held one at its answer (on_answer), a relayed one at a reload."""
    if (
        hello.hidden_name
        and decision.verdict is not Verdict.DENY
        and not decision.inspect
        and not _by_address(decision)
    ):
        # Passed through, the hello would reach a server that may serve the name it
        # hides, where the decision rested on the name it shows (an allow or ask by
        # name, or a fallback that asks or audits: a deny of the hidden name would
        # never be seen). Inspected, the gateway's own TLS ignores it; allowed by an
        # IP rule, any name at that address was allowed anyway.
        return deny(
            "encrypted-client-hello",
            detail=f"ClientHello to {state.name or state.ip} hides its server name (ECH)",
        )
    return _spelled_otherwise(hello, state.name, decision) or decision


def _spelled_otherwise(hello: ClientHello, name: str | None, decision: Decision) -> Decision | None:
    """The denial of a ClientHello passed through by its name, where its SNI is not
    that name as decided (parse_domain's: lower case, no trailing dot): the server
    reads the bytes as sent, and an SNI router matches them as written (HAProxy's
    `req.ssl_sni -i allowed.test` does not match `allowed.test.`, nginx's map
    without `hostnames` neither; `use_backend` without `-i` is case-sensitive) and
    sends the connection to its default backend, another tenant. Inspected, the
    gateway's own hello names the decided name; allowed by an IP rule, any name was."""
    if (
        hello.sni is None
        or hello.sni == name
        or decision.verdict is Verdict.DENY
        or decision.inspect
        or _by_address(decision)
    ):
        return None
    return deny(
        "malformed-tls",
        reason=Reason.INVALID_NAME,
        detail=f"SNI {hello.sni!r} is not written as {name}, the name decided: passed through, "
        "a server or SNI router reads it as written",
    )


_SESSION_KINDS = {"ticket": "a ticket", "id": "a session id", "": "a session"}


def _by_address(decision: Decision) -> bool:
    """Whether `decision` came from an IP rule alone: any name at the address was
    allowed then, a hidden one (ECH) included. Any other (a rule naming domains, a
    fallback) rests on the name the client shows."""
    return bool(decision.rule.networks) and not decision.rule.domains


def _unless_held(decision: Decision, hold: Callable[[], Decision | None]) -> Decision:
    """An approved hold's `decision`, or `hold`'s denial if the gateway now refuses what
    it would let out (the audit log cannot be written: Gateway.guard_audit): the hold
    began before, and a human's approval does not make the traffic recordable."""
    if not decision.allowed or (held := hold()) is None:
        return decision
    return dataclasses.replace(held, detail=f"{decision.detail}, but {held.detail}")


def _answered(asked: Decision, answer) -> Decision:
    """The decision a human's answer (a Grant, or a HoldResult) makes of an ASK."""
    if isinstance(answer, Grant):
        word = "granted" if answer.approved else "denied"
        found = answer.pending
    else:
        word, found = answer.answer.value, answer.pending
    where = f"approval {found.id}" if found is not None else "no approval"
    if word == "granted":
        scope = found.scope or "once"
        return Decision(
            Verdict.ALLOW,
            Reason.APPROVAL_GRANTED,
            asked.rule,
            inspect=asked.inspect,
            detail=f"{where} granted ({scope}) by {found.approver}",
        )
    reason, why = _ANSWER_REASONS[word]
    hint = (
        f"; ask an admin: sandgate approvals approve {found.id}"
        if word == "pending" and found is not None
        else ""
    )
    return Decision(Verdict.DENY, reason, asked.rule, detail=f"{where}: {why}{hint}")


def _answer_fields(answer) -> dict:
    found = getattr(answer, "pending", None)
    if found is None:
        return {}
    return {
        "approval_id": found.id,
        "approver": found.approver,
        "scope": str(found.scope) if found.scope else None,
        "widened": found.widened,
        "wait": getattr(answer, "waited", None),
    }


def _mismatch(detail: str) -> Decision:
    return deny("host-mismatch", detail=detail)


def _sni_name(hello: ClientHello) -> str | None:
    """A hello's SNI, canonical if it is a valid name, else as sent; None for none."""
    if not hello.sni:
        return None
    try:
        return parse_domain(hello.sni)
    except InvalidName:
        return hello.sni


def _too_few_to_tell(data: bytes) -> bool:
    """Too few bytes to tell raw TCP from a ClientHello (request lines: starts_like_http)."""
    return len(data) < 3 and b"\n" not in data


class HostRead(NamedTuple):
    """A Host header's authority, read: `host` without the port; `ip` if it is an
    address, else `name` (canonical) if it is a name, else `invalid` says why not."""

    host: str
    ip: IPAddress | None
    name: str | None
    invalid: str | None


def _as_decided(checked: CheckedHead, port: int, tls: bool) -> CheckedHead:
    """`checked`, with the Host (`forward_host`) and the target (`forward_target`) to
    forward where they are spelled otherwise than decided. A router that matches the
    Host or the path as written (HAProxy's `hdr(host)` and `path_beg`, Varnish's
    `req.http.host ==` and `req.url ~`) reads `ALLOWED.TEST`, `allowed.test.`,
    `allowed.test:08443`, `allowed.test:80` or `/%70ublic/` as something else than
    what was decided, and serves another backend (red teams, sessions 48-50).

    The Host: the name as parse_domain gives it (lower case, no trailing dot), an
    address as written (in brackets for IPv6), then the connection's port unless it
    is the scheme's default (80, 443): what clients send. The path: in
    names.parse_path's form (escapes of unreserved characters decoded, hex
    upper-cased; check_head let through no other difference), the query as sent."""
    host = checked.host
    read = _read_host(host)
    if read.name is not None:
        written = read.name
    elif read.ip is not None:
        written = host[: host.index("]") + 1] if host.startswith("[") else read.host
    else:
        return checked
    if port != (443 if tls else 80):
        written = f"{written}:{port}"
    target = None
    if "%" in checked.path and (path := parse_path(checked.path)) != checked.path:
        target = path if checked.query is None else f"{path}?{checked.query}"
    if host == written and target is None:
        return checked  # the usual head, spelled as decided
    return checked._replace(
        forward_host=written if host != written else None, forward_target=target
    )


def _read_host(host_header: str) -> HostRead:
    if len(host_header) <= _HOST_CACHED_LENGTH:
        return _read_short_host(host_header)
    return _read_host_uncached(host_header)


def _read_host_uncached(host_header: str) -> HostRead:
    host = _host_of(host_header)
    if not host:
        return HostRead(host, None, None, None)
    ip = parse_ip(host)
    if ip is not None:
        return HostRead(host, ip, None, None)
    try:
        return HostRead(host, None, parse_domain(host), None)
    except InvalidName as e:
        return HostRead(host, None, None, str(e))


# Pure, its results immutable (an InvalidName is kept as its text).
_read_short_host = functools.lru_cache(maxsize=4096)(_read_host_uncached)


def _host_of(host_header: str) -> str:
    """Host without port: `example.com:8080` -> `example.com`, `[::1]:80` -> `::1`. A
    Host that does not parse stays whole, and fails the name check after."""
    try:
        return parse_host_port(host_header, default_port=0)[0]
    except ValueError:
        return host_header
