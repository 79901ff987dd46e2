"""The mitmproxy addon: every sandbox connection and HTTP request meets `decide` here.

Decision points, earliest first (see docs/architecture.md):
 1. `client_connected`: sandbox known? original destination IP:port hard-denied
    (private range, IP deny rule)? -> close before any upstream work.
 2. `next_layer`, on the first bytes: TLS -> ClientHello SNI; plain HTTP -> later,
    per request; anything else -> raw TCP, named by the sandbox's DNS bindings.
    Allowed TLS passes through untouched (`TCPLayer(ignore=True)`) unless a rule
    needs HTTP inspection, then it is intercepted with the gateway's CA.
 3. `requestheaders`: Host must agree with SNI and destination; method and path
    rules; a denial is a 403 that says why, before any upstream connection
    (connection_strategy is lazy).
Each decision emits exactly one Event. Hooks stay short: facts in, decide, apply, emit.
"""

from __future__ import annotations

import proxy.lean_mitmproxy  # noqa: F401 - must come before any mitmproxy import
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello

from proxy.policy import ConnectFacts, Decision, RequestFacts, decide, parse_ip
from proxy.policy.index import CompiledPolicy
from proxy.policy.model import builtin_rule
from proxy.policy.names import InvalidName, parse_domain
from proxy.policy.reasons import Reason, Verdict
from proxy.registry import Sandbox, SandboxRegistry
from proxy.telemetry.event import Event, EventKind

log = logging.getLogger("sandgate.addon")

# Ports whose traffic must be TLS or HTTP: anything else there is a tunnel attempt.
WEB_PORTS = frozenset({80, 443, 8080, 8443})

UNKNOWN_SANDBOX_RULE = builtin_rule("unknown-sandbox")
MALFORMED_TLS_RULE = builtin_rule("malformed-tls")
MISSING_SNI_RULE = builtin_rule("missing-sni")
NOT_HTTP_RULE = builtin_rule("not-http")
HOST_MISMATCH_RULE = builtin_rule("host-mismatch")
NO_DATA_RULE = builtin_rule("no-data")
NO_APPROVER_RULE = builtin_rule("approval-unavailable")


class DnsBindingsView:
    """What the addon needs from the DNS filter's bindings (proxy.dnsfilter.DnsBindings)."""

    def resolved(self, sandbox: str, name: str, ip: str) -> bool: ...
    def names_for(self, sandbox: str, ip: str) -> list[str]: ...


@dataclass(slots=True)
class _ConnState:
    """Per-connection facts the later hooks need, keyed by client connection id."""

    sandbox: Sandbox
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    started: float  # perf_counter at connect: decision latency runs from here
    name: str | None = None  # SNI (TLS) or the DNS-bound name (raw TCP)
    decided: bool = False  # a layer was chosen: the connection has (or will have) its events
    allowed: Decision | None = None  # the decision that let the connection through
    protocol: str = "tcp"
    opened: float = 0.0  # wall clock at connect, for the connection's duration
    bytes_up: int = 0  # counted on pass-through connections only
    bytes_down: int = 0


class CountingTCPLayer(layers.TCPLayer):
    """Pass-through relay (no flow object, nothing stored) that counts the bytes of
    each direction for the connection's end event."""

    def __init__(self, context, state: _ConnState):
        super().__init__(context, ignore=True)
        self.state = state

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.state.bytes_up += len(event.data)
            else:
                self.state.bytes_down += len(event.data)
        yield from super().relay_messages(event)


class RejectLayer(layer.Layer):
    """Closes the client connection; nothing goes upstream."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start | events.DataReceived):
            yield commands.CloseConnection(self.context.client)


INTERNAL_ERROR_RULE = builtin_rule("internal-error")


class SandgateAddon:
    """Hooks fail closed: mitmproxy logs an addon's exception and carries on, so
    each hook catches everything itself and denies with `internal_error`."""

    # mitmproxy's proxyserver looks for an addon named "nextlayer"; this is it.
    name = "nextlayer"

    def __init__(self, policy: CompiledPolicy, registry: SandboxRegistry, bindings: DnsBindingsView,
                 emit: Callable[[Event], None]):
        self.policy = policy
        self.registry = registry
        self.bindings = bindings
        self.emit = emit
        self.connections: dict[str, _ConnState] = {}

    def client_connected(self, client: connection.Client) -> None:
        with self._fail_closed(client, None):
            self._client_connected(client)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        with self._fail_closed(nextlayer.context.client, nextlayer):
            self._next_layer(nextlayer)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        with self._fail_closed(flow.client_conn, flow):
            self._requestheaders(flow)

    @contextlib.contextmanager
    def _fail_closed(self, client: connection.Client, target):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - deny, say why, keep serving others
            log.exception("sandgate addon failed; denying")
            decision = Decision(Verdict.DENY, Reason.INTERNAL_ERROR, INTERNAL_ERROR_RULE,
                                detail=f"{type(e).__name__}: {e}")
            if isinstance(target, http.HTTPFlow):
                target.response = http.Response.make(403, _blocked_page(decision, target))
            elif isinstance(target, layer.NextLayer):
                target.layer = RejectLayer(target.context)
            else:
                client.error = "sandgate internal error"
            state = self.connections.get(client.id)
            if state is not None:
                state.decided = True
            self._emit_connection(decision, client, state, "tcp", time.perf_counter())

    # --- 1. TCP connect -------------------------------------------------------------

    def _client_connected(self, client: connection.Client) -> None:
        started = time.perf_counter()
        sandbox = self.registry.get(client.peername[0])
        dst_ip = parse_ip(client.sockname[0])
        port = client.sockname[1]
        if sandbox is None or dst_ip is None:
            client.error = "unknown sandbox"
            self._emit_connection(Decision(Verdict.DENY, Reason.UNKNOWN_SANDBOX, UNKNOWN_SANDBOX_RULE,
                                           detail=f"no task owns source address {client.peername[0]}"),
                                  client, None, "tcp", started)
            return
        state = _ConnState(sandbox, dst_ip, port, started, opened=time.time())
        decision = self._decide_connect(state, name=None)
        # Without a name only the hard denials are final: a later SNI, Host or DNS
        # binding may still find a rule, so "no rule matched" waits for the bytes.
        if decision.reason in (Reason.PRIVATE_ADDRESS, Reason.RULE_DENY, Reason.UNKNOWN_PROFILE):
            client.error = decision.detail
            self._emit_connection(decision, client, state, "tcp", started)
            return
        self.connections[client.id] = state

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.connections.pop(client.id, None)
        if state is not None and state.allowed is not None:
            self.emit(Event.from_decision(
                EventKind.CONNECTION_END, state.allowed, **self._fields(client, state), protocol=state.protocol,
                name=state.name, bytes_up=state.bytes_up, bytes_down=state.bytes_down,
                duration=time.time() - state.opened))
        elif state is not None and not state.decided:
            # A connect() with no bytes (a port scan, a client waiting for a server
            # banner) got no decision; it still gets its event.
            self._emit_connection(Decision(Verdict.DENY, Reason.NO_DATA, NO_DATA_RULE,
                                           detail="closed before sending enough bytes to decide"),
                                  client, state, "tcp")

    # --- 2. first bytes ---------------------------------------------------------------

    def _next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        state = self.connections.get(context.client.id)
        if state is None:
            # Denied at connect, or never registered: nothing else may pick a layer.
            nextlayer.layer = RejectLayer(context)
            return
        if len(context.layers) > 1:
            # Inside a TLS connection we chose to intercept: HTTP, checked per request.
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)
            return
        data = nextlayer.data_client()
        state.started = time.perf_counter()
        if starts_like_tls_record(data):
            nextlayer.layer = self._tls_layer(context, state, data)
        elif _looks_like_http(data):
            nextlayer.layer = layers.HttpLayer(context, HTTPMode.transparent)
        elif len(data) >= 3 or b"\n" in data:
            nextlayer.layer = self._raw_tcp_layer(context, state)
        # else: too few bytes to tell; mitmproxy asks again when more arrive.
        state.decided = nextlayer.layer is not None

    def _tls_layer(self, context, state: _ConnState, data: bytes) -> layer.Layer | None:
        try:
            hello = parse_client_hello(data)
        except ValueError as e:
            return self._reject(context, state, Decision(Verdict.DENY, Reason.MALFORMED_TLS, MALFORMED_TLS_RULE,
                                                         detail=f"unparseable ClientHello: {e}"), "tls")
        if hello is None:
            return None  # incomplete: wait for more bytes
        if not hello.sni:
            decision = self._decide_connect(state, name=None)
            if not decision.allowed:
                decision = Decision(Verdict.DENY, Reason.MISSING_SNI, MISSING_SNI_RULE,
                                    detail=f"TLS to {state.ip}:{state.port} without SNI and no IP rule allows it")
        else:
            try:
                state.name = parse_domain(hello.sni)
            except InvalidName as e:
                return self._reject(context, state, Decision(Verdict.DENY, Reason.INVALID_NAME, MALFORMED_TLS_RULE,
                                                             detail=f"SNI: {e}"), "tls")
            context.client.sni = state.name
            decision = self._decide_connect(state, name=state.name)
        decision = self._without_approver(decision)
        self._emit_connection(decision, context.client, state, "tls")
        if not decision.allowed:
            return RejectLayer(context)
        state.allowed, state.protocol = decision, "tls"
        if decision.inspect:
            server_tls = layers.ServerTLSLayer(context)
            server_tls.child_layer = layers.ClientTLSLayer(context)
            return server_tls
        return CountingTCPLayer(context, state)

    def _raw_tcp_layer(self, context, state: _ConnState) -> layer.Layer:
        if state.port in WEB_PORTS:
            decision = Decision(Verdict.DENY, Reason.NOT_HTTP, NOT_HTTP_RULE,
                                detail=f"bytes to {state.ip}:{state.port} are neither TLS nor HTTP")
        else:
            # No name in the protocol: try the names this sandbox resolved to the address.
            decision = self._decide_connect(state, name=None)
            for name in self.bindings.names_for(state.sandbox.address, str(state.ip)):
                candidate = self._decide_connect(state, name=name)
                if candidate.allowed or candidate.reason is Reason.RULE_DENY:
                    state.name, decision = name, candidate
                    break
            decision = self._without_approver(decision)
        self._emit_connection(decision, context.client, state, "tcp")
        if not decision.allowed:
            return RejectLayer(context)
        state.allowed = decision
        return CountingTCPLayer(context, state)

    # --- 3. HTTP requests -------------------------------------------------------------

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        started = time.perf_counter()
        state = self.connections.get(flow.client_conn.id)
        if state is None:
            flow.kill()
            return
        decision, name = self._decide_request(flow, state)
        decision = self._without_approver(decision)
        self.emit(Event.from_decision(
            EventKind.REQUEST, decision, **self._fields(flow.client_conn, state),
            protocol="https" if flow.client_conn.tls else "http",
            name=name, method=flow.request.method, path=flow.request.path[:2048],
            latency=time.perf_counter() - started))
        if not decision.allowed:
            flow.response = http.Response.make(403, _blocked_page(decision, flow), {"content-type": "text/plain"})
        elif flow.request.headers.get("upgrade", "").lower() == "h2c":
            # h2c would turn the connection into frames this hook no longer sees.
            del flow.request.headers["upgrade"]

    def _decide_request(self, flow: http.HTTPFlow, state: _ConnState) -> tuple[Decision, str | None]:
        host = flow.request.host_header or ""
        host_only = _host_of(host)
        host_ip = parse_ip(host_only) if host_only else None
        name: str | None = None
        if host_ip is not None:
            if host_ip != state.ip:
                return self._mismatch(f"Host {host!r} is not the destination {state.ip}"), None
        elif host_only:
            try:
                name = parse_domain(host_only)
            except InvalidName as e:
                return Decision(Verdict.DENY, Reason.INVALID_NAME, HOST_MISMATCH_RULE, detail=f"Host header: {e}"), None
            if state.name is not None and name != state.name:
                return self._mismatch(f"Host {name} differs from TLS SNI {state.name}"), name
        elif state.name is None:
            return self._mismatch("request without a Host header"), None
        name = name or state.name
        path = flow.request.path.split("?", 1)[0]
        facts = RequestFacts(profile=state.sandbox.profile, port=state.port, method=flow.request.method, path=path,
                             ip=state.ip, name=name, name_resolved_to_ip=self._resolved(state, name))
        return decide(self.policy, facts), name

    # --- helpers ------------------------------------------------------------------------

    def _decide_connect(self, state: _ConnState, name: str | None) -> Decision:
        return decide(self.policy, ConnectFacts(profile=state.sandbox.profile, port=state.port, ip=state.ip,
                                                name=name, name_resolved_to_ip=self._resolved(state, name)))

    def _resolved(self, state: _ConnState, name: str | None) -> bool | None:
        if name is None:
            return None
        return self.bindings.resolved(state.sandbox.address, name, str(state.ip))

    @staticmethod
    def _mismatch(detail: str) -> Decision:
        return Decision(Verdict.DENY, Reason.HOST_MISMATCH, HOST_MISMATCH_RULE, detail=detail)

    @staticmethod
    def _without_approver(decision: Decision) -> Decision:
        # `ask` needs a human; until an approver is connected, asking is denying.
        if decision.verdict is Verdict.ASK:
            return Decision(Verdict.DENY, Reason.APPROVAL_UNAVAILABLE, decision.rule,
                            detail=f"{decision.detail}; the profile asks a human, and no approver is connected")
        return decision

    def _reject(self, context, state: _ConnState, decision: Decision, protocol: str) -> layer.Layer:
        self._emit_connection(decision, context.client, state, protocol)
        return RejectLayer(context)

    def _fields(self, client: connection.Client, state: _ConnState | None) -> dict:
        # The gateway stamps policy hash and task id on every event.
        fields = {
            "source": f"{client.peername[0]}:{client.peername[1]}",
            "dst_ip": str(client.sockname[0]),
            "dst_port": client.sockname[1],
        }
        if state is not None:
            fields.update(sandbox=state.sandbox.address, profile=state.sandbox.profile)
        return fields

    def _emit_connection(self, decision: Decision, client, state: _ConnState | None, protocol: str,
                         started: float | None = None) -> None:
        started = started if started is not None else state.started
        self.emit(Event.from_decision(EventKind.CONNECTION, decision, **self._fields(client, state),
                                      protocol=protocol, name=state.name if state else None,
                                      latency=time.perf_counter() - started))


def _looks_like_http(data: bytes) -> bool:
    """An HTTP/1 request line starts with a method token and a space."""
    method, space, _ = data[:16].partition(b" ")
    return bool(space) and method.isalpha() and method.isupper()


def _host_of(host_header: str) -> str:
    """Host without port: `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _blocked_page(decision: Decision, flow: http.HTTPFlow) -> str:
    rule = decision.rule
    return (
        "Blocked by sandgate, the sandbox's egress gateway.\n\n"
        f"request: {flow.request.method} {flow.request.pretty_url[:300]}\n"
        f"verdict: {decision.verdict}\n"
        f"reason:  {decision.reason}\n"
        f"rule:    {rule.id} ({rule.origin})\n"
        f"detail:  {decision.detail}\n\n"
        "To ask for access, send this page to the network admins who keep the rule files;\n"
        "they can check it with: sandgate check --method "
        f"{flow.request.method} {flow.request.pretty_url[:300]}\n"
    )
