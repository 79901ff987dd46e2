"""The mitmproxy addon: applies the gate's decisions (proxy/gate.py) to mitmproxy.

mitmproxy sees only what the front door (proxy/frontdoor/) hands it: plain HTTP
and TLS that a rule needs to inspect. Those connections arrive decided; the addon
adopts their state and picks the layer the decision asks for. A connection that
reaches mitmproxy any other way is decided here from scratch, the same way.

 1. `client_connected`: adopt the front door's decision, or `gate.on_connect`.
 2. `next_layer`: the outcome -> a layer: pass-through (`TCPLayer(ignore=True)`, bytes
    counted), TLS interception with the gateway's CA, HTTP, or a layer that closes.
 3. `requestheaders`: `gate.on_request` (the head checked by
    policy/request_head.py, then decided); a refusal is a short plain-text answer
    (400, 403 or 431) that says why, before any upstream connection
    (connection_strategy is lazy). An Upgrade that no rule allows is removed.
 4. `responseheaders`: a 101 the gateway did not allow is refused (no tunnel).
 5. `tls_failed_client`: the client refused the gateway's certificate: its own event.
 6. `client_disconnected`: `gate.on_close`.
The gate emits every event; hooks stay short: values in, gate, apply.
"""

from __future__ import annotations

import sandgate.proxy.lean_mitmproxy  # noqa: F401 - must come before any mitmproxy import
import asyncio
import contextlib
import dataclasses
import logging

from h11._receivebuffer import ReceiveBuffer  # mitmproxy's Http1Client.buf
from mitmproxy import connection, http, tls
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy.layers.http import (
    HttpStream,
    HTTPMode,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client, Http1Server

from sandgate.proxy import refusal
from sandgate.proxy.approvals.holder import Answer
from sandgate.proxy.engine import READ_HOLDS
from sandgate.proxy.gate import ConnectionGate, ConnState, Outcome
from sandgate.proxy.lean_mitmproxy import H2_CLOSED
from sandgate.proxy.policy import Decision, Verdict
from sandgate.proxy.policy.form_body import WHOLE_FORM, FormOverrides
from sandgate.proxy.policy.names import format_host_port
from sandgate.proxy.policy.request_head import (
    MAX_HEAD_BYTES,
    CheckedHead,
    RequestHead,
    connection_without_upgrade,
    declared_length,
    form_body,
)

log = logging.getLogger("sandgate.addon")

_REFUSAL_HEADERS = {"content-type": refusal.CONTENT_TYPE, "connection": "close"}
_WEBSOCKET_ALLOWED = "sandgate.websocket"  # flow.metadata key: the request's upgrade was allowed
_HELD = "sandgate.held"  # flow.metadata key: held for a human's decision
_WEBSOCKET_EXTENSIONS = "sec-websocket-extensions"
_HELD_BODY_REFUSED = "sandgate.held_body_refused"  # flow.metadata key: refused while held (413)
_FORM = "sandgate.form"  # flow.metadata key: a form body read for method overrides (_FormBody)
_BODY_EVENTS = (RequestData, RequestTrailers, RequestEndOfMessage)
# Body bytes buffered for a request held for approval (mitmproxy reads on meanwhile).
MAX_HELD_BODY = 1 << 20
# Body bytes queued for streams whose upstream connection is being made, before the
# client is not read until it is (HeadLimitedHttpLayer.read_hold).
MAX_QUEUED_BODY = 1 << 20
# Form bodies' bytes a connection keeps until each is read (_FormBody), in all: as
# much as one form, and as the front door's connection keeps (a sandbox's connections
# together: their cap times this).
MAX_KEPT_FORMS = 256 << 10


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


class FinalResponseBuffer(ReceiveBuffer):
    """An upstream connection's receive buffer (`Http1Client.buf`) that hands its
    reader only final response heads: interim ones (1xx other than 101) are read
    and dropped, as an intermediary may drop them (RFC 8297, section 2).

    mitmproxy's `Http1Client` takes the first head it reads for the response
    (mitmproxy issue 2229): after a `103 Early Hints` or an unasked `100 Continue`
    the client got the interim head as its answer, waited for a final one that never
    came, and the real response was dropped as unexpected data. `maybe_extract_lines`
    is what that reader reads a head with, and only a head."""

    def maybe_extract_lines(self):
        while True:
            lines = super().maybe_extract_lines()
            if not lines or not _interim(lines[0]):
                return lines


def _interim(status_line: bytes | bytearray) -> bool:
    """Whether an HTTP/1 status line is a 1xx's other than 101 (which the addon
    refuses in `responseheaders`)."""
    parts = bytes(status_line).split(None, 2)
    if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit():
        return False
    return parts[1][:1] == b"1" and parts[1] != b"101"


# The lingering close after a 431 (HeadLimitedHttpLayer): how long, and how much of
# what the client still sends is read and dropped, before the connection is closed.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20


class HeadLimitedHttpLayer(layers.HttpLayer):
    """mitmproxy's HTTP layer, with a bound on an unfinished HTTP/1 head, the
    request's and the upstream response's.

    mitmproxy's HTTP/1 reader (`Http1Server`) buffers a request head until its
    blank line, with no limit (its own FIXME in layers/http/_http1.py): a task that
    sends `GET / HTTP/1.1\r\nX: ` and then megabytes without an end grows the
    gateway's memory for as long as it likes, and the hooks, which run only on a
    whole head, never see it. So after each event the reader's unparsed buffer is
    looked at while it reads a head (or waits for a response, holding the next
    one): more than MAX_HEAD_BYTES there is a head that check_head would refuse
    anyway, refused now (431, `gate.on_unfinished_head`) and the connection closed.
    A body being read (`read_body`) is consumed as it comes, all but the lines that
    frame a chunked one: h11's ChunkedReader, which mitmproxy calls without h11's
    own bound (`max_incomplete_event_size`), waits for the end of a chunk-size line
    or of the trailer section however long it grows (`1` then gigabytes of `0`, or
    trailer fields without end: 400 MB sent, 400 MB held). Past MAX_HEAD_BYTES
    unended there, the body's framing is broken, as h11 reads it in the front door
    (http1.py: the connection reset; an upstream's body, a 502): the connection is
    closed and its stream told, as mitmproxy's reader does for a chunk it cannot
    parse (`_cut_body`). A keep-alive follow-up starts from what is left after the
    previous request. The layer sees plaintext, so inspected TLS is bounded alike;
    HTTP/2 has h2's limits.

    The upstream's response head (`Http1Client`, the same FIXME) is bounded alike:
    past MAX_HEAD_BYTES unfinished, the server connection is closed and the stream
    gets a ResponseProtocolError, which mitmproxy answers with a 502 to the client
    (`refuse_response(flow, size)` emits the event and gives the 502's text).
    Its reader reads heads from a `FinalResponseBuffer`: interim responses dropped."""

    def __init__(
        self, context, refuse, refuse_response, refuse_held_body, refuse_form, hold_key=None
    ):
        super().__init__(context, HTTPMode.transparent)
        # A stream waiting for its upstream connection (lazy: made once the request is
        # allowed) is paused, and mitmproxy queues the client's body for it meanwhile
        # (`_paused_event_queue`) while it reads the client on: to an upstream that
        # never answers the SYN, 300 MB sent were 300 MB held. Past MAX_QUEUED_BODY
        # queued so, the client's next read waits (engine.READ_HOLDS) until the
        # connection is made or failed: its socket fills, as the front door's do. (A
        # client that closes meanwhile is seen then, or when its connection is ended
        # from below: until the connect's SYN retries run out, ~2 min, it keeps its
        # connection slot.)
        self._queue_waiter: asyncio.Future | None = None
        self._hold_key = hold_key
        if hold_key is not None:
            READ_HOLDS[hold_key] = self.read_hold
        self.refuse = refuse  # (first bytes, size) -> the 431's bytes, after the event
        self.linger: commands.RequestWakeup | None = None  # set once the 431 is out
        self.linger_left = 0
        self.refuse_response = refuse_response  # (flow, size) -> the 502's message
        self.refuse_held_body = refuse_held_body  # (flow, size) -> the 413's message
        self.refuse_form = refuse_form  # (flow, _FormBody) -> a 400's message, or None
        self._held_bytes: dict[int, int] = {}  # body bytes queued per held stream

    def event_to_child(self, child, event: events.Event) -> layer.CommandGenerator[None]:
        if not isinstance(child, HttpStream):
            yield from self._to_child(child, event)
            return
        if isinstance(event, RequestHeaders):
            yield from self._to_child(child, event)
            # A body servers may read as a form: read for method overrides
            # (form_body.py) from its first byte, which may come before the head is
            # decided (the stream waits in its requestheaders hook meanwhile).
            if (flow := getattr(child, "flow", None)) is not None:
                head = _head_of(flow.request)
                form = form_body(head)
                if form is not None:
                    length = declared_length(head.fields)
                    whole = length is not None and length <= WHOLE_FORM
                    reader = FormOverrides(form, head.method.decode("latin-1"))
                    flow.metadata[_FORM] = _FormBody(reader, child, [] if whole else None)
            return
        flow = getattr(child, "flow", None)  # (a stream has one once its head came)
        form = flow.metadata.get(_FORM) if flow is not None else None
        if form is None or not isinstance(event, _BODY_EVENTS):
            yield from self._to_child(child, event)
            return
        if form.refused:
            return  # what was in flight before the close is dropped
        if isinstance(event, RequestData):
            form.reader.feed(event.data)
        elif isinstance(event, RequestEndOfMessage):
            form.reader.end()
        if form.checked is None and form.unsent is None:
            # Not yet decided, and too long to keep: the stream queues it, and its
            # hook decides what was read (Addon._requestheaders), before any of it can
            # go upstream.
            yield from self._to_child(child, event)
            return
        message = self.refuse_form(flow, form) if form.checked is not None else None
        if message is not None:
            form.refused = True
            # The client gets the 400 (HTTP/1: then its connection closes; HTTP/2: on
            # its stream), the stream its end: an upstream request already begun is cut
            # (HTTP/1: its connection closed; HTTP/2: its stream reset).
            client = self.connections[self.context.client]
            yield from self._to_child(client, ResponseProtocolError(event.stream_id, message, 400))
            yield from self._to_child(child, RequestProtocolError(event.stream_id, message, 400))
            return
        if form.unsent is not None:
            # Kept until all of it is read and decided: the stream then gets it in one
            # go, and only then is anything of the request sent upstream. Past
            # MAX_KEPT_FORMS kept on the connection (HTTP/2's streams each keep one),
            # this one goes on as a longer one does: what is kept is passed on now.
            form.unsent.append(event)
            ended = form.checked is not None and form.reader.ended
            if ended or self._kept_forms() > MAX_KEPT_FORMS:
                kept, form.unsent = form.unsent, None
                if ended:
                    del flow.metadata[_FORM]
                for event in kept:
                    yield from self._to_child(child, event)
            return
        # Passed on but for its last byte and its end, until all of it is read, once
        # it may name an override (FormOverrides.suspect); before, as it comes.
        if isinstance(event, RequestData):
            data = form.held + event.data
            form.held = data[-1:] if form.reader.suspect else b""
            if len(data) > len(form.held):
                yield from self._to_child(
                    child, RequestData(event.stream_id, data[: len(data) - len(form.held)])
                )
            return
        if isinstance(event, RequestEndOfMessage):
            del flow.metadata[_FORM]
            if form.held:
                yield from self._to_child(child, RequestData(event.stream_id, form.held))
        yield from self._to_child(child, event)

    def _kept_forms(self) -> int:
        """The body bytes of the connection's form bodies kept until read (_FormBody)."""
        kept = 0
        for stream in self.streams.values():
            flow = getattr(stream, "flow", None)  # (a stream has one once its head came)
            if flow is not None and (form := flow.metadata.get(_FORM)) is not None:
                kept += form.kept
        return kept

    def _to_child(self, child, event: events.Event) -> layer.CommandGenerator[None]:
        # A request held for approval is a stream paused in its requestheaders hook:
        # mitmproxy goes on reading the client and queues the body's events in the
        # stream (`_paused_event_queue`) until the hook returns. Past MAX_HELD_BODY
        # bytes the request is refused (413) and the queue let go: bytes of all the
        # connection's held streams, since an HTTP/2 connection holds up to 100 (each
        # just under the bound held 100 MiB a connection).
        if (
            isinstance(event, RequestData)
            and isinstance(child, HttpStream)
            and child._paused
            and child.flow.metadata.get(_HELD)
        ):
            if child.flow.metadata.get(_HELD_BODY_REFUSED):
                return  # refused already: what was in flight before the close is dropped
            self._held_bytes[event.stream_id] = self._held_bytes.get(event.stream_id, 0) + len(
                event.data
            )
            # (only streams still open: one refused or answered leaves no later event)
            held = sum(n for sid, n in self._held_bytes.items() if sid in self.streams)
            if held > MAX_HELD_BODY:
                yield from self._refuse_held_body(child, held)
                return
        elif isinstance(child, HttpStream) and not child._paused:
            self._held_bytes.pop(getattr(child, "stream_id", None), None)
        yield from super().event_to_child(child, event)

    def _refuse_held_body(self, stream: HttpStream, size: int) -> layer.CommandGenerator[None]:
        stream._paused_event_queue.clear()  # the body so far: memory back
        self._held_bytes.pop(stream.stream_id, None)
        stream.flow.metadata[_HELD_BODY_REFUSED] = True  # the hook must not forward it
        message = self.refuse_held_body(stream.flow, size)
        client = self.connections[self.context.client]
        error = ResponseProtocolError(stream.stream_id, message, 413)
        yield from super().event_to_child(client, error)  # 413, then the client is closed

    def read_hold(self) -> asyncio.Future | None:
        """What the client's next read awaits (None: nothing): see __init__."""
        if self._queued_body() <= MAX_QUEUED_BODY:
            return None
        if self._queue_waiter is None or self._queue_waiter.done():
            self._queue_waiter = asyncio.get_running_loop().create_future()
        return self._queue_waiter

    def _queued_body(self) -> int:
        """The body bytes queued in paused streams, but those held for approval (which
        MAX_HELD_BODY bounds, with a 413)."""
        queued = 0
        for stream in self.streams.values():
            if stream._paused and not (stream.flow and stream.flow.metadata.get(_HELD)):
                for event in stream._paused_event_queue:
                    if isinstance(event, RequestData):
                        queued += len(event.data)
        return queued

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.linger is not None:
            yield from self._lingering(event)
            return
        yield from super()._handle_event(event)
        waiter = self._queue_waiter
        if waiter is not None and not waiter.done() and self._queued_body() <= MAX_QUEUED_BODY:
            waiter.set_result(None)  # the client is read again
        for top in list(self.connections.values()):
            upstream = _http1_client(top)
            if upstream is not None and type(upstream.buf) is ReceiveBuffer:
                # (made with its connection, before any response byte can arrive)
                buffered, upstream.buf = upstream.buf, FinalResponseBuffer()
                if buffered:
                    upstream.buf += bytes(buffered)
            if (
                upstream is not None
                and len(upstream.buf) > MAX_HEAD_BYTES
                and upstream.state == upstream.read_body
                and upstream.stream_id is not None
            ):
                yield from self._cut_body(upstream, ResponseProtocolError)
            elif (
                upstream is not None
                and len(upstream.buf) > MAX_HEAD_BYTES
                and upstream.state == upstream.read_headers
                and upstream.stream_id is not None
            ):
                size, stream = len(upstream.buf), self.streams.get(upstream.stream_id)
                upstream.buf, upstream.state = type(upstream.buf)(), upstream.done
                yield commands.CloseConnection(upstream.conn)
                if stream is not None:
                    message = self.refuse_response(stream.flow, size)
                    error = ResponseProtocolError(upstream.stream_id, message)
                    yield from self.event_to_child(stream, error)
        reader = self.connections.get(self.context.client)
        if (
            isinstance(reader, Http1Server)
            and len(reader.buf) > MAX_HEAD_BYTES
            and reader.state == reader.read_body
        ):
            yield from self._cut_body(reader, RequestProtocolError)
        elif (
            isinstance(reader, Http1Server)
            and len(reader.buf) > MAX_HEAD_BYTES
            and reader.state in (reader.read_headers, reader.wait)
        ):
            buffered, size = bytes(reader.buf)[:4096], len(reader.buf)
            reader.buf, reader.state = type(reader.buf)(), reader.done  # memory back, no parse
            yield commands.SendData(self.context.client, self.refuse(buffered, size))
            # A lingering close, as nginx's: the 431 and a FIN first, then what the
            # client is still sending is read and dropped for a moment. Closing at
            # once would reset a client that is mid-send, which often loses the 431
            # (a TLS client whose write failed cannot read any more).
            yield commands.CloseTcpConnection(self.context.client, half_close=True)
            self.linger, self.linger_left = commands.RequestWakeup(LINGER_S), LINGER_BYTES
            yield self.linger

    def _cut_body(self, reader, error) -> layer.CommandGenerator[None]:
        """A chunked body whose chunk-size line or trailer section has not ended
        after MAX_HEAD_BYTES (`reader`: the client's Http1Server or an upstream's
        Http1Client, reading it): its buffer let go, its connection closed, and its
        stream told (`error`: RequestProtocolError or ResponseProtocolError), as
        mitmproxy's reader does for a chunk it cannot parse: the client's body cuts the
        upstream connection too, the upstream's is a 502 (or the response cut)."""
        size, stream_id = len(reader.buf), reader.stream_id
        reader.buf, reader.state = type(reader.buf)(), reader.done
        yield commands.CloseConnection(reader.conn)
        stream = self.streams.get(stream_id)
        if stream is not None:
            message = (
                f"HTTP/1 protocol error: a chunk-size line or trailer section of the "
                f"{'request' if error is RequestProtocolError else 'response'} body has "
                f"not ended after {size} bytes (at most {MAX_HEAD_BYTES})"
            )
            yield from self.event_to_child(stream, error(stream_id, message))

    def _lingering(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Drop what the client still sends; close after LINGER_BYTES, LINGER_S, or
        the client's own close."""
        client = self.context.client
        if isinstance(event, events.DataReceived) and event.connection == client:
            self.linger_left -= len(event.data)
            done = self.linger_left <= 0
        elif isinstance(event, events.Wakeup):
            done = event.command is self.linger
        else:
            done = isinstance(event, events.ConnectionClosed) and event.connection == client
        if done and client.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(client)


@dataclasses.dataclass
class _FormBody:
    """A request's form body being read for method overrides (form_body.py), for its
    `stream`, with the head it is decided for (None until its requestheaders hook has
    decided it). One that declared at most WHOLE_FORM bytes is kept (`unsent`: its
    events) until all of it is read and decided; a longer one goes on but for its
    last byte (`held`)."""

    reader: FormOverrides
    stream: HttpStream
    unsent: list[events.Event] | None
    head: RequestHead | None = None
    checked: CheckedHead | None = None
    tls: bool = False
    held: bytes = b""
    refused: bool = False

    def release(self) -> None:
        """What is kept, into the stream's queue: it waits in its requestheaders hook
        (the hook calls this), and takes the queue once the hook returns."""
        self.stream._paused_event_queue.extend(self.unsent or ())
        self.unsent = None

    @property
    def kept(self) -> int:
        return sum(len(e.data) for e in self.unsent or () if isinstance(e, RequestData))


def _http1_client(top: layer.Layer) -> Http1Client | None:
    """The Http1Client under `top`, an upstream connection's stack in
    `HttpLayer.connections` (`HttpClient`, maybe under TLS layers), once it has one."""
    while top is not None and not isinstance(top, Http1Client):
        top = getattr(top, "child_layer", None)
    return top


def _declared_body(request: http.Request) -> int | None:
    """A held request's body size as the approver is shown it: its Content-Length (0:
    no body), None when it has or may have a body of undeclared size (chunked, or
    HTTP/2 without a content-length). check_head refused conflicting or malformed
    framing headers before any request was held."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit():
        return int(length)
    if "transfer-encoding" in request.headers or request.http_version.startswith("HTTP/2"):
        return None
    return 0


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

    async def _held_request(self, flow: http.HTTPFlow, state, decision, head, checked, tls) -> None:
        with self._fail_closed(flow.client_conn, flow):
            flow.metadata[_HELD] = True  # its body is bounded meanwhile (HeadLimitedHttpLayer)
            key = self.gate.request_ask_key(state, decision, checked, tls)
            body = _declared_body(flow.request)
            answer = await self.approvals.hold(key, decision.rule.id, state.fields, body)
            if flow.metadata.get(_HELD_BODY_REFUSED):  # refused meanwhile (413): never forwarded
                flow.kill()
                return
            granted = answer.answer is Answer.GRANTED
            revoked = self.gate.held_request_revoked(state, checked) if granted else None
            unresolved = None
            if (
                granted
                and revoked is None
                and state.placeholder is not None
                and state.upstream_ip is None
            ):
                # Resolved only now, after the approval; without an address it may reach
                # the request is answered here, never sent on to the placeholder.
                resolved = await self.resolve(state, state.placeholder)
                if isinstance(resolved, Decision):
                    unresolved = resolved
                else:
                    state.upstream_ip = resolved
            decision, checked = self.gate.on_request_answer(
                state, decision, answer, head, checked, tls, unresolved=unresolved, revoked=revoked
            )
            self._apply(flow, state, decision, checked)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        with self._fail_closed(flow.client_conn, flow):
            if flow.response.status_code != 101:
                return
            state = self.gate.connections.get(flow.client_conn.id)
            upgrade = flow.metadata.get(_WEBSOCKET_ALLOWED)
            if upgrade is not None and state is not None:
                self.gate.on_tunnel(state, upgrade)  # what a reload decides again
                # None was asked for (`_apply`); one a server names anyway is not used.
                flow.response.headers.pop(_WEBSOCKET_EXTENSIONS, None)
                return
            # Switching protocols would make the connection a tunnel nobody decided.
            if state is not None:
                self.gate.on_refused_switch(state, _head_of(flow.request), _tls(flow))
            flow.kill()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """The name mitmproxy's own hello to the upstream carries is the client's SNI
        as sent (`ALLOWED.TEST`), set after `_next_layer` set the decided one: a
        case-sensitive SNI router reads the spelling, and served its default backend
        (a red team, session 49). It goes on as decided."""
        client = data.context.client
        state = self.gate.connections.get(client.id)
        if state is not None and state.name is not None:
            client.sni = state.name

    def tls_failed_client(self, data: tls.TlsData) -> None:
        state = self.gate.connections.get(data.conn.id)
        if state is not None:
            self.gate.on_tls_rejected(state, data.conn.error or "handshake failed")

    def client_disconnected(self, client: connection.Client) -> None:
        READ_HOLDS.pop(client.id, None)
        state = self.gate.connections.get(client.id)
        if state is not None:
            closed = getattr(client, H2_CLOSED, None)
            if closed is not None:
                self.gate.on_h2_closed(state, closed.rule, closed.detail)
            self.gate.on_close(state)

    def _next_layer(self, nextlayer: layer.NextLayer) -> layer.Layer | None:
        context = nextlayer.context
        state = self.gate.connections.get(context.client.id)
        if state is None:
            # Denied at connect, or never registered: nothing else may pick a layer.
            return RejectLayer(context)
        if len(context.layers) > 1:
            # Inside a TLS connection we chose to intercept: HTTP, checked per request.
            return self._http_layer(context, state)
        outcome = self.gate.on_first_bytes(state, nextlayer.data_client())
        if outcome is Outcome.WAIT:
            return None  # mitmproxy asks again when more bytes arrive
        if outcome is Outcome.HTTP:
            return self._http_layer(context, state)
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

    def _http_layer(self, context, state: ConnState) -> HeadLimitedHttpLayer:
        def refuse(start: bytes, size: int) -> bytes:
            tls = bool(context.client.tls)
            decision = self.gate.on_unfinished_head(state, start, size, tls)
            page = refusal.refusal_text(decision, refusal.UNFINISHED_HEAD_HINT)
            return assemble_response(http.Response.make(431, page, _REFUSAL_HEADERS))

        def refuse_response(flow: http.HTTPFlow, size: int) -> str:
            tls = bool(context.client.tls)
            head = _head_of(flow.request)
            problem = f"has not ended after {size} bytes"
            decision = self.gate.on_response_head_too_large(state, head, problem, tls)
            return f"sandgate: {decision.reason.value}: {decision.detail}"

        def refuse_held_body(flow: http.HTTPFlow, size: int) -> str:
            tls = bool(context.client.tls)
            head = _head_of(flow.request)
            decision = self.gate.on_held_body_too_large(state, head, size, MAX_HELD_BODY, tls)
            return f"sandgate: {decision.reason.value}: {decision.detail}"

        def refuse_form(flow: http.HTTPFlow, form: _FormBody) -> str | None:
            decision = self.gate.on_form_body(state, form.head, form.checked, form.reader, form.tls)
            if decision is None:
                return None
            flow.metadata[_HELD_BODY_REFUSED] = True  # a held request must not go on
            return f"sandgate: {decision.reason.value}: {decision.detail}"

        return HeadLimitedHttpLayer(
            context,
            refuse,
            refuse_response,
            refuse_held_body,
            refuse_form,
            hold_key=context.client.id,
        )

    def _requestheaders(self, flow: http.HTTPFlow):
        state = self.gate.connections.get(flow.client_conn.id)
        if state is None:
            flow.kill()
            return None
        request = flow.request
        head, tls = _head_of(request), _tls(flow)
        decision, checked = self.gate.on_request(state, head, tls)
        form = flow.metadata.get(_FORM)
        if form is not None:  # a form body, read since it began to come (event_to_child)
            refused = None
            read = checked is not None and checked.form_body is not None  # (gate: it may matter)
            if read:
                refused = self.gate.on_form_body(state, head, checked, form.reader, tls)
                form.head, form.checked, form.tls = head, checked, tls
            if not read or refused is not None or form.reader.ended:
                # Nothing more to read: the stream takes what was kept and the rest.
                del flow.metadata[_FORM]
                form.release()
            elif form.unsent is not None:
                flow.request.stream = False  # kept whole: nothing goes upstream before
            if refused is not None:  # never sent: the stream reads the body and drops it
                flow.response = _blocked(refused, flow)
                return None
        if decision.verdict is Verdict.ASK:  # a human decides: held up to the profile's hold
            # Marked now, not when the coroutine starts: the body that arrives meanwhile
            # is a held one's (MAX_HELD_BODY), not a connecting one's (read_hold).
            flow.metadata[_HELD] = True
            return self._held_request(flow, state, decision, head, checked, tls)
        self._apply(flow, state, decision, checked)
        return None

    def _apply(self, flow: http.HTTPFlow, state, decision: Decision, checked) -> None:
        request = flow.request
        if state.upstream_ip is not None:  # a placeholder: connect to the real address
            request.data.host = state.upstream_ip
        if checked is None:
            flow.response = _blocked(decision, flow)
            return
        if checked.forward_host is not None:  # the decided spelling (gate._as_decided)
            request.host_header = checked.forward_host
        if checked.forward_target is not None:  # likewise
            request.path = checked.forward_target
        if request.data.authority and not (request.is_http2 or request.is_http3):
            # An HTTP/1 absolute-form target goes on in origin form, as the door's own
            # path sends it (http1.origin_form): its authority was checked against the
            # Host, not spelled as decided (`https://ALLOWED.TEST/`), and a server that
            # routes by it (Go's net/http, case-sensitive) served another tenant.
            request.data.authority = b""
        if checked.websocket:
            flow.metadata[_WEBSOCKET_ALLOWED] = checked  # a websocket rule allowed it
            # No extension: permessage-deflate had the gateway inflate each message
            # whole (a bomb), and the relay splits messages, which only an
            # extension-free WebSocket allows (lean_mitmproxy.stream_websocket_messages).
            request.headers.pop(_WEBSOCKET_EXTENSIONS, None)
        elif checked.strip_upgrade:
            # h2c (or any other switch) would turn the connection into something this
            # hook no longer sees: the request goes on as plain HTTP/1.1.
            headers = request.headers
            for name in ("upgrade", "http2-settings"):
                headers.pop(name, None)
            if "connection" in headers:
                headers["connection"] = connection_without_upgrade(headers["connection"])

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
                target.response = _blocked(decision, target)
            elif isinstance(target, layer.NextLayer):
                target.layer = RejectLayer(target.context)
            else:
                client.error = "sandgate internal error"


def _tls(flow: http.HTTPFlow) -> bool:
    return bool(flow.client_conn.tls)


def _head_of(request: http.Request) -> RequestHead:
    """The request head as sent, for request_head.check_head: mitmproxy keeps an
    HTTP/1 absolute-form target apart (scheme, authority, path)."""
    data = request.data
    if request.is_http2 or request.is_http3:
        return RequestHead(
            data.method, data.path, tuple(data.headers.fields), data.authority or None, True
        )
    target = data.path
    if data.authority:
        target = data.scheme + b"://" + data.authority + data.path
    return RequestHead(data.method, target, tuple(data.headers.fields))


def _blocked(decision: Decision, flow: http.HTTPFlow) -> http.Response:
    """A short plain-text answer (proxy/refusal.py)."""
    headers = {"content-type": refusal.CONTENT_TYPE}
    if not (flow.request.is_http2 or flow.request.is_http3):
        headers["connection"] = "close"  # a refused head may have framed its body wrongly
    request = flow.request
    method = request.data.method.decode("latin-1")
    page = refusal.blocked_page(decision, method, request.pretty_url)
    return http.Response.make(refusal.refusal_status(decision), page, headers)
