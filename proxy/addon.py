"""The mitmproxy addon: applies the gate's decisions (proxy/gate.py) to mitmproxy.

mitmproxy sees only what the front door (proxy/frontdoor/) hands it: plain HTTP
and TLS that a rule needs to inspect. Those connections arrive decided; the addon
adopts their state and picks the layer the decision asks for. A connection that
reaches mitmproxy any other way is decided here from scratch, the same way.

 1. `client_connected`: adopt the front door's decision, or `gate.on_connect`.
 2. `next_layer`: the outcome -> a layer: pass-through (`TCPLayer(ignore=True)`, bytes
    counted), TLS interception with the gateway's CA, HTTP, or a layer that closes.
 3. `requestheaders`: `gate.on_request`; a denial is a 403 that says why, before any
    upstream connection (connection_strategy is lazy).
 4. `client_disconnected`: `gate.on_close`.
The gate emits every event; hooks stay short: values in, gate, apply.
"""

from __future__ import annotations

import sandgate.proxy.lean_mitmproxy  # noqa: F401 - must come before any mitmproxy import
import contextlib
import json
import logging

from mitmproxy import connection, http
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

from sandgate.proxy.gate import ConnectionGate, ConnState, Outcome
from sandgate.proxy.policy import Decision, Reason, Verdict
from sandgate.proxy.policy.names import format_host_port

log = logging.getLogger("sandgate.addon")


class CountingTCPLayer(layers.TCPLayer):
    """Pass-through relay (no flow object, nothing stored) that counts the bytes of
    each direction for the connection's end event."""

    def __init__(self, context, state: ConnState):
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


class SandgateAddon:
    """Hooks fail closed: mitmproxy logs an addon's exception and carries on, so
    each hook catches everything itself and denies with `internal_error` (the gate's
    own methods already do, for failures inside a decision)."""

    # mitmproxy's proxyserver looks for an addon named "nextlayer"; this is it.
    name = "nextlayer"

    def __init__(self, gate: ConnectionGate, approvals=None, resolve=None):
        self.gate = gate
        self.resolve = resolve  # a placeholder's name -> its real address (proxy/gateway.py)
        self.approvals = approvals  # proxy/approvals/holder.Approvals: holds asked requests

    @property
    def connections(self) -> dict:
        """Every open connection the gateway decided on (front door's and mitmproxy's),
        by key; mitmproxy's are keyed by client id. The metrics count these."""
        return self.gate.connections

    def client_connected(self, client: connection.Client) -> None:
        with self._fail_closed(client, None):
            (src_ip, src_port, *_), (dst_ip, dst_port, *_) = client.peername, client.sockname
            state = self.gate.adopt((src_ip, src_port), client.id)
            if state is None:
                state = self.gate.on_connect(client.id, src_ip, src_port, str(dst_ip), dst_port)
            if state is None:
                client.error = "denied by sandgate at connect (see the audit log)"

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        with self._fail_closed(nextlayer.context.client, nextlayer):
            nextlayer.layer = self._next_layer(nextlayer)

    def requestheaders(self, flow: http.HTTPFlow):
        """Decides at once; a request a human must approve returns a coroutine that
        holds it (mitmproxy awaits what a hook returns)."""
        with self._fail_closed(flow.client_conn, flow):
            return self._requestheaders(flow)

    async def _held_request(self, flow: http.HTTPFlow, state, decision, asked, tls) -> None:
        with self._fail_closed(flow.client_conn, flow):
            key = self.gate.request_ask_key(state, decision, *asked[1:], tls)
            answer = await self.approvals.hold(key, decision.rule.id, state.fields)
            decision = self.gate.on_request_answer(state, decision, answer, *asked[1:], tls)
            if decision.allowed and state.placeholder is not None and state.upstream_ip is None:
                state.upstream_ip = await self.resolve(state, state.placeholder)
            self._apply(flow, state, decision)

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.gate.connections.get(client.id)
        if state is not None:
            self.gate.on_close(state)

    def _next_layer(self, nextlayer: layer.NextLayer) -> layer.Layer | None:
        context = nextlayer.context
        state = self.gate.connections.get(context.client.id)
        if state is None:
            # Denied at connect, or never registered: nothing else may pick a layer.
            return RejectLayer(context)
        if len(context.layers) > 1:
            # Inside a TLS connection we chose to intercept: HTTP, checked per request.
            return layers.HttpLayer(context, HTTPMode.transparent)
        outcome = self.gate.on_first_bytes(state, nextlayer.data_client())
        if outcome is Outcome.WAIT:
            return None  # mitmproxy asks again when more bytes arrive
        if outcome is Outcome.HTTP:
            return layers.HttpLayer(context, HTTPMode.transparent)
        if outcome is Outcome.PASSTHROUGH:
            return CountingTCPLayer(context, state)
        if outcome is Outcome.INTERCEPT:
            context.client.sni = state.name
            if state.upstream_ip is not None:  # a placeholder: the real address, resolved
                context.server.address = (state.upstream_ip, state.port)
            server_tls = layers.ServerTLSLayer(context)
            server_tls.child_layer = layers.ClientTLSLayer(context)
            return server_tls
        return RejectLayer(context)

    def _requestheaders(self, flow: http.HTTPFlow):
        state = self.gate.connections.get(flow.client_conn.id)
        if state is None:
            flow.kill()
            return None
        request = flow.request
        asked = (state, request.host_header or "", request.method, request.path)
        tls = bool(flow.client_conn.tls)
        decision = self.gate.on_request(*asked, tls=tls)
        if decision.verdict is Verdict.ASK:  # a human decides: held up to the profile's hold
            return self._held_request(flow, state, decision, asked, tls)
        self._apply(flow, state, decision)
        return None

    def _apply(self, flow: http.HTTPFlow, state, decision: Decision) -> None:
        request = flow.request
        if state.upstream_ip is not None:  # a placeholder: connect to the real address
            request.data.host = state.upstream_ip
        if not decision.allowed:
            flow.response = http.Response.make(
                403, _blocked_page(decision, flow), {"content-type": "text/plain"}
            )
        elif request.headers.get("upgrade", "").lower() == "h2c":
            # h2c would turn the connection into frames this hook no longer sees.
            del request.headers["upgrade"]

    @contextlib.contextmanager
    def _fail_closed(self, client: connection.Client, target):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - deny, say why, keep serving others
            log.exception("sandgate addon failed; denying")
            state = self.gate.connections.get(client.id)
            decision = self.gate.fail(
                state,
                e,
                fields={
                    "source": format_host_port(*client.peername[:2]),
                    "dst_ip": str(client.sockname[0]),
                    "dst_port": client.sockname[1],
                },
            )
            if isinstance(target, http.HTTPFlow):
                target.response = http.Response.make(403, _blocked_page(decision, target))
            elif isinstance(target, layer.NextLayer):
                target.layer = RejectLayer(target.context)
            else:
                client.error = "sandgate internal error"


def _blocked_page(decision: Decision, flow: http.HTTPFlow) -> str:
    if decision.reason in _APPROVAL_REASONS:
        return _approval_page(decision, flow)
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


_APPROVAL_REASONS = frozenset(
    {
        Reason.APPROVAL_PENDING,
        Reason.APPROVAL_DENIED,
        Reason.APPROVAL_EXPIRED,
        Reason.APPROVAL_QUEUE_FULL,
    }
)


def _approval_page(decision: Decision, flow: http.HTTPFlow) -> str:
    """A held request's 403: one line of text, then JSON naming the destination, the
    pending approval and how to ask for it (docs/approvals.md)."""
    request = flow.request
    approval_id = (
        decision.detail.split(" ", 2)[1].rstrip(":")
        if decision.detail.startswith("approval ")
        else None
    )
    ask = f"sandgate approvals approve {approval_id}" if approval_id else None
    body = {
        "error": "approval_required"
        if decision.reason is Reason.APPROVAL_PENDING
        else str(decision.reason),
        "reason": str(decision.reason),
        "destination": f"{request.method} {request.pretty_url[:300]}",
        "approval_id": approval_id,
        "rule": decision.rule.id,
        "detail": decision.detail,
        "ask_an_admin": ask,
        "retry": decision.reason is Reason.APPROVAL_PENDING,
    }
    line = (
        f"sandgate: {request.method} {request.pretty_url[:300]} needs a human's approval "
        f"({decision.reason}); approval {approval_id}: ask an admin to run `{ask}`, then retry"
        if decision.reason is Reason.APPROVAL_PENDING
        else f"sandgate: {request.method} {request.pretty_url[:300]}: {decision.reason} ({decision.detail})"
    )
    return line + "\n" + json.dumps(body) + "\n"
