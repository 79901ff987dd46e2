"""Plain HTTP/1 decided by sandgate itself: one connection's requests and responses,
sans-io (h11 and the gate; no sockets), request by request.

The front door hands a connection the gate decided as plain HTTP to an
`Http1Session` (through http1_relay.py, which owns the sockets) unless a rule of
the sandbox's profile needs what only mitmproxy's path does (`needs_engine`).
Bytes come in with `client_data` / `upstream_data`; what to send leaves in
`to_client` / `to_upstream`; flags say what else the adapter must do.

The common exchange (a bodiless HTTP/1.1 request, a response with a Content-Length,
a chunked body or no body) is read and written by the fast path (http1_fast.py: a strict reader
of that shape, h11's bytes out); the first input it does not take makes the h11
connections it stood for, fed every byte it holds (`_leave_fast`), and h11 reads
on from there for the rest of the connection. tests/unit/test_http1_fast.py checks
that both ways give the same bytes, flags and events.

Per request, on a keep-alive connection as on its first:
 1. h11 (server side) reads the head, strictly: one framing, no obs-fold smuggling
    past it, at most MAX_HEAD_BYTES buffered (an unfinished head past it: 431,
    `gate.on_unfinished_head`); the fast path reads only heads h11 reads alike.
 2. `gate.on_request` checks it (request_head.check_head) and decides it, one event
    each. A head h11 refuses is read as mitmproxy's lenient parser would
    (`read_head_leniently`) and refused with check_head's reason, else
    malformed_request (`gate.on_unparsed_request`); one that does not even read so
    gets a 400 and no request event (its connection event says so at close), as
    mitmproxy's parser answered.
 3. Allowed: what goes upstream is the checked head re-serialised by h11 (client
    side), origin-form, without an Upgrade no rule allowed; never the raw bytes.
    Refused: the same status and page as mitmproxy's path (proxy/refusal.py), then
    close. A `close` in Connection is not forwarded (hop by hop: the client's own
    connection closes after its response; the upstream one may serve the task's
    next connection, see http1_relay.UpstreamPool).
 4. The response is read by h11 too, its head bounded as a request head is
    (MAX_FIELDS, MAX_HEAD_BYTES: else cut, 502, an event); a 101 is never passed on
    (no upgrade is allowed on this path: websocket rules go to mitmproxy). h11 frames
    it again for the client (chunked, or close-delimited for HTTP/1.0).
 5. Bodies stream: each Data event goes on as it comes; the adapter reads a side
    only while what it owes the other side is small (`wants_client_data`,
    `wants_upstream_data`).
All requests go to one upstream address, the connection's (the original
destination, or a placeholder's resolved address), as mitmproxy's transparent mode
connects: the Host was decided against that address.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from sandgate.proxy import refusal
from sandgate.proxy.frontdoor import http1_fast
from sandgate.proxy.gate import ConnectionGate, ConnState
from sandgate.proxy.policy import Decision, Reason, Verdict
from sandgate.proxy.policy.form_body import WHOLE_FORM, FormOverrides
from sandgate.proxy.policy.index import CompiledPolicy
from sandgate.proxy.policy.request_head import (
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    CheckedHead,
    RequestHead,
    connection_without_upgrade,
    declared_length,
)

# What one side may owe the other before that other side is read again.
MAX_OWED = 256 * 1024
# h11's own cap on an unfinished event; the head limits here are checked first.
_H11_BUFFER = MAX_HEAD_BYTES + MAX_OWED
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_OBS_FOLD = re.compile(rb"\n[ \t]")  # a continuation line, which h11 unfolds silently
_UPGRADE_FIELDS = (b"upgrade", b"http2-settings")
# How h11 refuses a 101 that the request did not propose: every 101 here, since no
# request forwarded on this path proposes an upgrade (they are removed; websocket
# rules send the profile to mitmproxy). Without this, the switch was only "a response
# that could not be parsed", with no event of its own.
_UNASKED_SWITCH = "_SWITCH_UPGRADE event without a pending proposal"

# h11 is imported by the first connection the fast path does not serve whole
# (`_load_h11`), not with this module: a gateway whose plain HTTP is all of the fast
# shape, or that has none, never pays its ~5 ms of import nor its memory.
h11 = None
_ENDED = _BOTH_DONE = _BOTH_IDLE = None


def _load_h11() -> None:
    global h11, _ENDED, _BOTH_DONE, _BOTH_IDLE
    if h11 is not None:
        return
    import h11 as module

    _ENDED = (module.DONE, module.MUST_CLOSE, module.CLOSED)
    _BOTH_DONE = {module.CLIENT: module.DONE, module.SERVER: module.DONE}
    _BOTH_IDLE = {module.CLIENT: module.IDLE, module.SERVER: module.IDLE}
    h11 = module


def needs_engine(policy: CompiledPolicy, profile: str) -> bool:
    """Whether plain HTTP of `profile` goes to mitmproxy: a rule (or the fallback)
    asks a human, whose answer holds a request (mitmproxy's addon does that), or a
    rule allows WebSocket upgrades, which become tunnels (mitmproxy relays them)."""
    compiled = policy.profiles.get(profile)
    if compiled is None:
        return True
    rules = (compiled.fallback, *compiled.rules)
    return any(rule.action is Verdict.ASK or rule.websocket for rule in rules)


def read_head_leniently(raw: bytes) -> RequestHead | None:
    """A request head (without its blank line) as mitmproxy's HTTP/1 reader reads it:
    the request line split at any whitespace, fields split at their first colon,
    values stripped, continuation lines joined with CRLF (so check_head refuses
    them). None where that reader answers 400 without a request."""
    lines = [line.rstrip(b"\r") for line in raw.split(b"\n")]
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return None
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n " + line.strip())
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name:
            return None
        fields.append((name, value.strip()))
    return RequestHead(parts[0], parts[1], tuple(fields))


def origin_form(target: bytes) -> bytes:
    """The target to forward: absolute-form (`http://host/p?q`, checked to name the
    decided authority) becomes its path and query."""
    if target.startswith(b"/"):
        return target
    rest = target.split(b"://", 1)[1]
    slash = rest.find(b"/")
    query = rest.find(b"?")
    if slash < 0 or 0 <= query < slash:
        return b"/" + rest[query:] if query >= 0 else b"/"
    return rest[slash:]


def forwarded_target(target: bytes, checked: CheckedHead) -> bytes:
    """The target to send upstream: the one the gate decided where the client spelled
    it otherwise (`forward_target`), else the target in origin form."""
    if checked.forward_target is not None:
        return checked.forward_target.encode("ascii")
    return origin_form(target)


def forwarded_fields(
    fields: tuple[tuple[bytes, bytes], ...], checked: CheckedHead
) -> list[tuple[bytes, bytes]]:
    """The fields to send upstream: as sent, without an upgrade (h2c, or any other)
    that would turn the connection into something no request decision sees, without
    a `close` in Connection: that word is about the client's connection (hop by hop),
    and the upstream one may serve the sandbox's next connection (UpstreamPool in
    http1_relay.py), as Squid keeps its server connections; and with the Host the
    gate decided where the client spelled it otherwise (`forward_host`)."""
    strip = checked.strip_upgrade or checked.websocket
    kept = []
    for name, value in fields:
        lower = name.lower()
        if strip and lower in _UPGRADE_FIELDS:
            continue
        if lower == b"host" and checked.forward_host is not None:
            value = checked.forward_host.encode("ascii")
        if lower == b"connection":
            text = value.decode("latin-1")
            if strip:
                text = connection_without_upgrade(text)
            text = ", ".join(
                t for t in map(str.strip, text.split(",")) if t and t.lower() != "close"
            )
            if not text:
                continue
            value = text.encode("latin-1")
        kept.append((name, value))
    return kept


def _connection_tokens(fields: tuple[tuple[bytes, bytes], ...]) -> list[bytes] | None:
    """The tokens of the Connection fields, lower case; None without such a field."""
    tokens = None
    for name, value in fields:
        if name.lower() == b"connection":
            tokens = (tokens or []) + [t.strip().lower() for t in value.split(b",")]
    return tokens


def plain_response(status: int, text: str) -> bytes:
    """A whole short text/plain response that closes the connection."""
    body = text.encode()
    phrase = HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {refusal.CONTENT_TYPE}\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def _past_exchange(conn: h11.Connection, method: bytes) -> None:
    """Take a new `conn` through one exchange of `method` and on to the next: what
    h11 keeps of the fast path's past exchanges is their HTTP version (1.1) and the
    last method (which frames a response sent before a request, as h11 allows)."""
    if conn.our_role is h11.CLIENT:
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(b"HTTP/1.1 204 \r\n\r\n")
        conn.next_event()  # the Response
        conn.next_event()  # its EndOfMessage
    else:
        conn.receive_data(b"%s / HTTP/1.1\r\nHost: x\r\n\r\n" % method)
        conn.next_event()  # the Request
        conn.next_event()  # its EndOfMessage
        conn.send(h11.Response(status_code=204, headers=[]))
        conn.send(h11.EndOfMessage())
    conn.start_next_cycle()


class Http1Session:
    """One plain-HTTP connection's protocol state. After each input the adapter
    sends `to_client` / `to_upstream` (the latter once connected), then:
    - `need_upstream`: connect to the connection's upstream, then `upstream_connected`;
    - `drop_upstream`: close the upstream socket (set back to False by the adapter),
      with a reset where `reset_upstream` says so;
    - `closing`: send what is left in `to_client`, then close (`problem`: what
      ended it, for the connection's end event; `reset`: close with a reset)."""

    def __init__(
        self, gate: ConnectionGate, state: ConnState, fast: bool = True, tls: bool = False
    ):
        # `tls`: inside TLS the front door terminated (frontdoor/tls_relay.py): the
        # gate decides and reports it as https, as it does mitmproxy's.
        self.gate, self.state, self.tls = gate, state, tls
        # The fast path (http1_fast.py) reads and writes the common exchanges itself;
        # the first input it does not take makes the h11 connections from what it
        # holds (`_leave_fast`), and h11 reads on from there, as if it had read all.
        self.fast = fast
        self.client: h11.Connection | None = None  # made by _leave_fast, or now
        if not fast:
            _load_h11()
            self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=_H11_BUFFER)
        self.server: h11.Connection | None = None  # one per upstream connection
        self.to_client = bytearray()
        self.to_upstream = bytearray()
        self.need_upstream = False
        self.connected = False
        self.drop_upstream = False
        self.reset_upstream = False  # drop it with a reset (a form body cut short)
        self.closing = False
        self.reset = False
        self.problem: str | None = None
        self.head = bytearray()  # the bytes of the head being read, for refusals
        self.head_seen = 0  # their count (the head may be longer than is kept)
        self.response_seen = 0  # bytes of the response head being read
        self.request: RequestHead | None = None  # being forwarded; None: refused or none
        self.responding = False  # a response to the client has begun
        self.response_done = False  # the upstream's response to `request` has ended
        # The upstream connection served an earlier connection (the adapter's pool):
        # it may have been closed by the server just as `request` was sent.
        self.reused = False
        # `request` as sent upstream, while it can be sent again on a new upstream
        # connection (it has no body): see _replay.
        self.replayable: h11.Request | None = None
        self.may_reuse = True  # False: the next upstream connection must be a new one
        self.client_closes = False  # its latest request said close (or was HTTP/1.0)
        # The fast path's own state: there is an upstream connection (h11's
        # `server`); the request head forwarded and its forwarded form; the client's
        # bytes after that head, and the upstream's not yet read; the body bytes of
        # the response still to come; the upstream connection may serve again.
        self.fast_upstream = False
        self.fast_request = b""
        self.fast_forwarded: tuple[bytes, bytes, tuple] | None = None
        self.fast_pending = bytearray()
        self.fast_response = bytearray()
        self.fast_length = self.fast_remaining = 0
        self.fast_chunks: http1_fast.ChunkedBody | None = None  # a chunked response's body
        self.fast_head = b""  # a chunked response's head, for h11 should it read on
        self.fast_close = False  # the response said close
        self.fast_idle = False
        self.fast_method: bytes | None = None  # the method of its last exchange
        self.fast_client_closed = False  # the client's EOF, read during a fast response
        # A form body being read for method overrides (form_body.py), with the
        # head and checked head it is decided for; its last byte read, not yet sent.
        self.form: FormOverrides | None = None
        self.form_request: tuple[RequestHead, CheckedHead] | None = None
        self.form_held = b""
        # Its request's events, kept until all of it is read (at most WHOLE_FORM).
        self.form_unsent: list | None = None

    # --- inputs ---------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes from the client; b"": it closed its side."""
        if self.closing:
            return
        if self.fast:
            if data and self.request is None:
                self.head += data
                self.head_seen += len(data)
                self._fast_read_client(len(self.head) - len(data))
                return
            if self.responding:  # (the fast path ends its own responses)
                self._fast_client_while_responding(data)
                return
            if data and not self.client_closes:  # h11 would buffer them (pipelined)
                self.fast_pending += data
                return
            self._leave_fast()  # an EOF, or bytes after a close: h11 says what they are
        if self.client.their_state is h11.IDLE and self.head_seen <= MAX_HEAD_BYTES:
            self.head += data
            self.head_seen += len(data)
        self.client.receive_data(data)
        self._read_client()

    def upstream_data(self, data: bytes | bytearray) -> None:
        """Bytes from the upstream; b"": it closed its side. A bytearray is the
        caller's to give: the session may keep it as what it owes (`_fast_body`)."""
        if self.closing:
            return
        if self.fast:
            if not self.fast_upstream:
                return
            if data:
                if self.request is not None and not self.responding:
                    self.response_seen += len(data)
                if self.responding and not self.fast_response and self.fast_chunks is None:
                    # The body's bytes go on as they came, not through a buffer: for a
                    # 256 KiB read, ~2.5 us against ~450 us with the buffer's copies.
                    data = self._fast_body(data)
                    if self.fast_remaining:
                        return
                    self.fast_response += data  # after the body: the next response, or h11's
                    self._fast_exchange_done()
                else:
                    self.fast_response += data
                if not self._fast_read_upstream():
                    self._leave_fast()  # h11 reads them, from the response's start
                return
            if self.responding and not (self.fast_chunks and self.fast_chunks.at_chunk_start):
                self._fast_cut_body()
                return
            self._leave_fast()  # (at a chunk's start: h11 says what an EOF there is)
        if self.server is None:
            return
        if self.server.their_state is h11.SEND_RESPONSE:
            self.response_seen += len(data)
        self.server.receive_data(data)
        self._read_upstream()

    def upstream_connected(self, reused: bool = False) -> None:
        self.need_upstream, self.connected, self.reused = False, True, reused

    def upstream_lost(self, why: str) -> None:
        """The upstream socket failed (a reset): a request sent on a reused connection
        that got no answer goes again on a new one, else the connection ends with a
        reset, the upstream's."""
        if self.fast and not self.responding:
            self._leave_fast()
        if not self._replay():
            self._close(why, reset=True)

    @property
    def upstream_idle(self) -> bool:
        """The upstream connection is between exchanges, with nothing unread or owed:
        another connection of the sandbox may send its next request on it."""
        if self.fast:
            return self.fast_upstream and self.connected and self.fast_idle and not self.to_upstream
        server = self.server
        if server is None or not self.connected or self.to_upstream:
            return False
        if server.states not in (_BOTH_DONE, _BOTH_IDLE):
            return False
        unread, closed = server.trailing_data
        return not unread and not closed

    def upstream_failed(self, why: str) -> None:
        """The upstream could not be reached: 502, as mitmproxy answers."""
        self.need_upstream = False
        self._fail_exchange(502, f"upstream connect failed: {why}")

    @property
    def client_said_all(self) -> bool:
        """The client said it sends nothing more (a FIN, or a request with `Connection:
        close` or of HTTP/1.0, read to its end): a byte after that would break its
        own framing. (h11's MUST_CLOSE alone may be the server's close.)"""
        if self.fast:  # its bodiless request read, as h11's MUST_CLOSE
            closed = self.fast_client_closed and not self.fast_pending
            return closed or (self.request is not None and self.client_closes)
        state = self.client.their_state
        return state is h11.CLOSED or (state is h11.MUST_CLOSE and self.client_closes)

    @property
    def wants_client_data(self) -> bool:
        if self.closing or len(self.to_upstream) >= MAX_OWED:
            return False
        if self.fast:  # a fast request has no body; where h11 must close, it reads on (EOF)
            return not self.fast_client_closed and (self.request is None or self._fast_must_close)
        return self.client.their_state not in (h11.DONE, h11.CLOSED)

    @property
    def wants_upstream_data(self) -> bool:
        upstream = self.fast_upstream if self.fast else self.server is not None
        return not self.closing and upstream and len(self.to_client) < MAX_OWED

    # --- the client's side ------------------------------------------------------------

    def _read_client(self) -> None:
        while not self.closing:
            try:
                event = self.client.next_event()
            except h11.RemoteProtocolError as e:
                self._client_error(e)
                return
            if event is h11.NEED_DATA:
                if self.client.their_state is h11.IDLE and self.head_seen > MAX_HEAD_BYTES:
                    self._unfinished_head()
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                if self.request is not None and self.server is not None:
                    self.replayable = None  # a body is not kept to be sent again
                    if self.form is None:
                        self._to_upstream(event)
                    elif self._form_goes_on(event.data):
                        return  # refused
            elif isinstance(event, h11.EndOfMessage):
                if self.request is not None and self.server is not None:
                    if self.form is not None and self._form_goes_on(None):
                        return  # refused
                    self._to_upstream(h11.EndOfMessage())
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                if not self.responding and self.request is None:
                    self._close(None)  # between requests: the client is done
                return

    def _on_request(self, event: h11.Request) -> None:
        raw = bytes(self.head)
        end = _HEAD_END.search(raw)
        self.head.clear()
        if end is not None and _OBS_FOLD.search(raw, 0, end.start()):
            self._refuse_unparsed(raw[: end.start()], "a folded header line (obs-fold)")
            return
        head = RequestHead(event.method, event.target, tuple(event.headers.raw_items()))
        checked = self._decide(head)
        if checked is None:
            return
        if self.server is None:
            self.server = h11.Connection(h11.CLIENT, max_incomplete_event_size=_H11_BUFFER)
            self.need_upstream, self.connected = True, False
        target = forwarded_target(event.target, checked)
        connection_field = _connection_tokens(head.fields)
        self.client_closes = event.http_version != b"1.1" or b"close" in (connection_field or ())
        changed = (
            checked.strip_upgrade
            or checked.websocket
            or connection_field is not None
            or checked.forward_host is not None
        )
        if changed or checked.close_upstream:
            # h11's own parse less some fields (and tokens of a valid Connection value):
            # valid already, so h11 is told not to check each field again
            # (`_parsed`); it still checks the method and the target.
            fields = forwarded_fields(head.fields, checked)
            if checked.close_upstream:
                # A body the server may leave unread, then read as a request: its
                # connection ends with this exchange (request_head.leaves_body_unread).
                # One Connection field saying only `close`: Python's http.server reads
                # the first field's value, whole.
                fields = [f for f in fields if f[0].lower() != b"connection"]
                fields.append((b"Connection", b"close"))
            forwarded = h11.Request(
                method=event.method, target=target, headers=fields, _parsed=True
            )
        elif target is event.target and event.http_version == b"1.1":
            forwarded = event  # unchanged: the parsed event goes on as it is
        else:
            # h11 takes a parsed Headers object as it is (validated when read).
            forwarded = h11.Request(method=event.method, target=target, headers=event.headers)
        self.replayable = forwarded
        if checked.form_body is not None:
            self.form = FormOverrides(checked.form_body, checked.method)
            self.form_request, self.form_held = (head, checked), b""
            length = declared_length(head.fields)
            if length is not None and length <= WHOLE_FORM:
                self.form_unsent = [forwarded]  # nothing goes upstream until it is read
                if self.client.client_is_waiting_for_100_continue:
                    # The server cannot say it: the client is told to send its body now.
                    self._to_client(h11.InformationalResponse(status_code=100, headers=[]))
                return
        self._to_upstream(forwarded)

    def _form_goes_on(self, data: bytes | None) -> bool:
        """A form body's next bytes (None: its end) read for method overrides
        (form_body.py) and sent on: the request whole once read if it declared at
        most WHOLE_FORM bytes, else as it comes, but for its last byte once it may
        name one (`FormOverrides.suspect`); True: an override was refused, the
        request answered, its upstream connection cut."""
        form = self.form
        if data is None:
            form.end()
        else:
            form.feed(data)
        head, checked = self.form_request
        decision = self.gate.on_form_body(self.state, head, checked, form, self.tls)
        if decision is not None:
            if self.form_unsent is None:
                # The upstream has the head and part of the body: never its end, and
                # a reset, not a FIN, which a lenient server reads as the body's end.
                self.to_upstream.clear()
                self.drop_upstream = self.reset_upstream = True
                self.may_reuse = False
            # (else nothing was sent: the upstream connection stays idle, to be pooled)
            self.form, self.form_unsent = None, None
            self._refuse(decision, head)
            return True
        if self.form_unsent is not None:
            if data:
                self.form_unsent.append(h11.Data(data=data))
            if data is None:
                for event in self.form_unsent:
                    self._to_upstream(event)
                self.form, self.form_unsent = None, None
            return False
        if data is None:
            held, self.form = self.form_held, None
        elif form.suspect:  # it may name an override: its last byte waits for its end
            held, self.form_held = self.form_held + data[:-1], data[-1:]
        else:  # nothing in it can name one yet (form_body.py: `suspect`)
            held, self.form_held = self.form_held + data, b""
        if held:
            self._to_upstream(h11.Data(data=held))
        return False

    def _decide(self, head: RequestHead) -> CheckedHead | None:
        """Check and decide `head` (one event); refused, answer it and close (None).
        Allowed, it is the exchange's request from here on."""
        decision, checked = self.gate.on_request(self.state, head, self.tls)
        if decision.verdict is Verdict.ASK:
            # Profiles that ask go to mitmproxy (needs_engine); one that asks now got
            # an ask rule from a reload after this connection began.
            unheld = Decision(
                Verdict.DENY,
                Reason.APPROVAL_UNAVAILABLE,
                decision.rule,
                detail=f"{decision.detail}; this connection cannot be held for approval",
            )
            decision = self.gate.on_refused_request(self.state, head, unheld, self.tls)
            checked = None
        if checked is None:
            self._refuse(decision, head)
            return None
        self.request = head
        self.response_seen, self.response_done = 0, False
        return checked

    def _client_error(self, error: h11.RemoteProtocolError) -> None:
        if self.request is None:  # reading a head (a refused one closed the connection)
            if self.head_seen > MAX_HEAD_BYTES:
                self._unfinished_head()
                return
            raw = bytes(self.head)
            end = _HEAD_END.search(raw)
            if end is not None:
                self._refuse_unparsed(raw[: end.start()], str(error))
                return
            self._fail_exchange(400, f"the request head could not be parsed: {error}")
            return
        # A body that broke its framing: the upstream got part of it; end both.
        self._close(f"the client broke its request's framing: {error}", reset=True)

    def _refuse_unparsed(self, raw: bytes, problem: str) -> None:
        head = read_head_leniently(raw)
        if head is None:
            self._fail_exchange(400, f"the request head could not be parsed: {problem}")
            return
        self._refuse(self.gate.on_unparsed_request(self.state, head, problem, self.tls), head)

    def _unfinished_head(self) -> None:
        decision = self.gate.on_unfinished_head(
            self.state, bytes(self.head[:4096]), self.head_seen, self.tls
        )
        self._answer(
            refusal.refusal_status(decision),
            refusal.refusal_text(decision, refusal.UNFINISHED_HEAD_HINT),
        )

    def _refuse(self, decision: Decision, head: RequestHead) -> None:
        url = head.text(head.target, 2048)
        if url.startswith("/"):
            host = dict((n.lower(), v) for n, v in head.fields).get(b"host", b"")
            scheme = "https" if self.tls else "http"
            url = f"{scheme}://{head.text(host, 300)}{url}"
        method = head.text(head.method, 32)
        self._answer(refusal.refusal_status(decision), refusal.blocked_page(decision, method, url))

    def _answer(self, status: int, text: str) -> None:
        """Answer this request with a short page and close (its body, if any, may be
        framed wrongly: nothing after it is read as a request)."""
        self.to_client += plain_response(status, text)
        self._close(None)

    def _fail_exchange(self, status: int, why: str) -> None:
        """The exchange failed: `status` with `why` if no response has begun, else cut."""
        if self.responding:
            self._close(why, reset=True)
            return
        self.to_client += plain_response(status, f"sandgate: {why}\n")
        self._close(why)

    # --- the upstream's side ------------------------------------------------------------

    def _read_upstream(self) -> None:
        server = self.server
        while not self.closing and server is self.server:
            try:
                event = server.next_event()
            except h11.RemoteProtocolError as e:
                if _UNASKED_SWITCH in str(e) and self.request is not None:
                    self._refuse_switch()
                    return
                # A reused connection closed without a byte (_replay), else a bad answer.
                if not self._replay():
                    self._fail_exchange(502, f"the upstream's response could not be parsed: {e}")
                return
            if event is h11.NEED_DATA:
                if server.their_state is h11.SEND_RESPONSE and self.response_seen > MAX_HEAD_BYTES:
                    self._cut_response(f"has not ended after {self.response_seen} bytes")
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse | h11.Response):
                if self.request is None:
                    # h11 frames it as the answer to a request not yet made (the
                    # client would take it as its next request's), then fails on
                    # that request: the upstream broke the exchange, end it here.
                    self._close("the upstream sent a response no request asked for")
                    return
                self._on_response(event)
            elif isinstance(event, h11.Data):
                self._to_client(event)
            elif isinstance(event, h11.EndOfMessage):
                self.response_done = True
                self._to_client(h11.EndOfMessage())
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._forget_upstream()
                return

    def _on_response(self, event: h11.InformationalResponse | h11.Response) -> None:
        if len(event.headers) > MAX_FIELDS:
            self._cut_response(f"has {len(event.headers)} header fields")
            return
        if event.status_code == 101:
            self._refuse_switch()
            return
        self.response_seen = 0
        self.responding = True
        if event.http_version != b"1.1":  # h11 sends HTTP/1.1 only: the same response as 1.1
            event = type(event)(
                status_code=event.status_code, headers=event.headers, reason=event.reason
            )
        self._to_client(event)

    def _refuse_switch(self) -> None:
        """The upstream answered 101: never passed on (no upgrade is allowed on this
        path), its own event, and a 502 to the client, whose next request must not
        ride what the server now takes for a tunnel."""
        self.gate.on_refused_switch(self.state, self.request, self.tls)
        self._fail_exchange(502, "the upstream switched protocols; no rule allowed it")

    def _cut_response(self, why: str) -> None:
        decision = self.gate.on_response_head_too_large(self.state, self.request, why, self.tls)
        self._fail_exchange(502, f"{decision.reason}: {decision.detail}")

    # --- the fast path (http1_fast.py) -------------------------------------------------

    def _fast_read_client(self, searched: int) -> None:
        """Read the request head in `self.head` (its first `searched` bytes looked at
        before) if it has the fast shape; else h11 reads it."""
        head = self.head
        end = http1_fast.head_end(head, searched)
        if len(head) <= MAX_HEAD_BYTES:
            if end == 0 and head[0] > 0x20:  # h11 refuses a head starting so at once
                return
            request = http1_fast.scan_request(bytes(head[: end - 4])) if end > 0 else None
            if request is not None:
                self.fast_request = bytes(head[:end])
                self.fast_pending[:] = head[end:]
                head.clear()
                self._on_fast_request(request)
                if self.client_closes and self.fast_pending and not self.closing:
                    self._leave_fast()  # bytes after a close: h11 says what they are
                return
        self._leave_fast()

    def _on_fast_request(self, request: http1_fast.SimpleRequest) -> None:
        """As _on_request, for a head of the fast shape (no body, no upgrade)."""
        head = RequestHead(request.method, request.target, request.fields)
        checked = self._decide(head)
        if checked is None:
            return
        if not self.fast_upstream:
            self.fast_upstream, self.need_upstream, self.connected = True, True, False
        self.fast_idle = False
        self.client_closes = b"close" in (request.connection or ())
        target = forwarded_target(request.target, checked)
        fields = head.fields
        if (
            request.connection is not None
            or checked.strip_upgrade
            or checked.websocket
            or checked.forward_host is not None
        ):
            fields = tuple(forwarded_fields(fields, checked))
        self.fast_forwarded = (request.method, target, fields)
        self.to_upstream += http1_fast.write_request(request.method, target, fields)

    def _fast_read_upstream(self) -> bool:
        """Read the response in `fast_response` (head, then its body) and pass it on;
        False when h11 is to read it: it is not of the fast shape (before a byte of it
        went on), or its chunked body has what the fast path does not take (at the
        start of a chunk)."""
        buffer = self.fast_response
        while buffer and self.fast and not self.closing:
            if self.request is None:
                return False  # bytes no request asked for
            if not self.responding:
                end = http1_fast.head_end(buffer)
                if end == 0:
                    return buffer[0] > 0x20 and self.response_seen <= MAX_HEAD_BYTES
                response = (
                    http1_fast.scan_response(bytes(buffer[: end - 4]), self.request.method)
                    if end > 0
                    else None
                )
                if response is None or len(response.fields) > MAX_FIELDS:
                    return False
                if response.chunked:
                    self.fast_head = bytes(buffer[:end])
                    self.fast_chunks = http1_fast.ChunkedBody()
                del buffer[:end]
                self.response_seen, self.responding = 0, True
                self.fast_close = response.close
                self.fast_length = self.fast_remaining = response.length
                self.to_client += http1_fast.write_response(response, self.client_closes)
            if self.fast_chunks is not None:
                status, read = self.fast_chunks.read(buffer, self.to_client)
                del buffer[:read]
                if status is http1_fast.WAIT:
                    return True
                if status is http1_fast.ASK_H11:
                    return False
                self.fast_chunks = None
                self._fast_exchange_done()
                continue
            if buffer:
                buffer[:] = self._fast_body(bytes(buffer))
            if self.fast_remaining:
                return True
            self._fast_exchange_done()
        return True

    def _fast_body(self, data: bytes | bytearray) -> bytes | bytearray:
        """Pass on what of `data` belongs to the response's body; the rest, if any
        (the body ended), is returned."""
        remaining = self.fast_remaining
        if len(data) <= remaining:
            if not self.to_client and type(data) is bytearray:
                self.to_client = data  # the relay's read, given: owed as it is, not copied
            else:
                self.to_client += data
            self.fast_remaining = remaining - len(data)
            return b""
        self.to_client += data[:remaining]
        self.fast_remaining = 0
        return data[remaining:]

    def _fast_exchange_done(self) -> None:
        """As _next_cycle after a fast exchange: close where a side said so, else read
        the client's next request (the bytes after the upstream's response stay in
        `fast_response`: the next request's response, or h11's error)."""
        self.response_done = True
        self.fast_method = self.request.method
        idle = not self.fast_close and not self.fast_response
        if (
            self.client_closes
            or self.fast_close
            or (self.fast_client_closed and not self.fast_pending)
        ):
            self.fast_idle = idle
            self._close(None)
            return
        self.request, self.responding, self.fast_idle = None, False, idle
        self.head[:] = self.fast_pending
        self.head_seen = len(self.head)
        self.fast_pending.clear()
        if self.fast_client_closed:  # pipelined bytes, then the client's EOF: h11's
            self._leave_fast()
            self.client_data(b"")
        elif self.head:
            self._fast_read_client(0)

    @property
    def _fast_must_close(self) -> bool:
        """h11's MUST_CLOSE for the client: its request, or the response sent, said close."""
        return self.client_closes or (self.responding and self.fast_close)

    def _fast_client_while_responding(self, data: bytes) -> None:
        """The client's bytes or EOF while a fast response goes to it: as h11 takes them."""
        if self._fast_must_close and (data or self.fast_pending):
            self._close("the client broke its request's framing: Got data when expecting EOF", True)
        elif data:
            self.fast_pending += data  # pipelined: h11 reads them after this exchange
        else:
            self.fast_client_closed = True  # h11: after the pipelined bytes, if any

    def _fast_cut_body(self) -> None:
        """The upstream closed within a fast response's body: cut, as h11 says it."""
        if self.fast_chunks is not None:
            what = "(incomplete chunked read)"
        else:
            got = self.fast_length - self.fast_remaining
            what = f"(received {got} bytes, expected {self.fast_length})"
        self._fail_exchange(
            502,
            "the upstream's response could not be parsed: peer closed connection without "
            f"sending complete message body {what}",
        )

    def _leave_fast(self) -> None:
        """Make the h11 connections the fast path stands for, give them every byte it
        holds, as they would have had them, and let h11 read on from there. Before a
        response to the client has begun, or at the start of a chunk of a chunked
        one (the fast path ends its other responses itself)."""
        self.fast = False
        _load_h11()
        client = self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=_H11_BUFFER)
        if self.fast_method is not None:  # what h11 keeps of past exchanges
            _past_exchange(client, self.fast_method)
        # (receive_data(b"") would say the peer closed: empty buffers are not given)
        if self.request is None:
            if self.head:
                client.receive_data(bytes(self.head))
        else:  # its request was read: a bodiless one, h11 reads the same
            client.receive_data(self.fast_request + bytes(self.fast_pending))
            client.next_event()
            client.next_event()
            if self.responding and self.fast_client_closed:
                client.receive_data(b"")  # its EOF came during the response
        self.fast_pending.clear()
        if self.fast_upstream:
            server = self.server = h11.Connection(h11.CLIENT, max_incomplete_event_size=_H11_BUFFER)
            if self.fast_method is not None:
                _past_exchange(server, self.fast_method)
            if self.request is not None and not self.response_done:
                method, target, fields = self.fast_forwarded
                self.replayable = h11.Request(
                    method=method, target=target, headers=list(fields), _parsed=True
                )
                server.send(self.replayable)
                server.send(h11.EndOfMessage())
                if self.responding:  # a chunked body: h11 reads on from a chunk's start
                    server.receive_data(self.fast_head)
                    client.send(server.next_event())  # its head went to the client already
                    self.fast_chunks = None
            if self.fast_response:
                server.receive_data(bytes(self.fast_response))
                self.fast_response.clear()
        # Mid-response h11 alone last read the client when its bytes came (before the
        # response said close, or it would have closed): reading the pipelined bytes
        # now, after a close, would be its "Got data when expecting EOF" too early.
        if not self.responding:
            self._read_client()
        if self.server is not None and not self.closing:
            self._read_upstream()

    # --- both ---------------------------------------------------------------------------

    def _to_upstream(self, event) -> None:
        self.to_upstream += self.server.send(event)

    def _to_client(self, event) -> None:
        self.to_client += self.client.send(event)

    def _next_cycle(self) -> None:
        """After an EndOfMessage: once request and response are both done, start the
        next request, or close where either side said so."""
        client = self.client
        if not (client.our_state in _ENDED and client.their_state in _ENDED):
            return  # a side is still sending
        if client.states != _BOTH_DONE:
            self._close(None)  # a side said close (Connection: close, HTTP/1.0, EOF)
            return
        server = self.server
        if server is not None:
            if server.states == _BOTH_DONE:
                server.start_next_cycle()
            else:
                self._forget_upstream()
        client.start_next_cycle()
        self.request, self.responding = None, False
        leftover, _ = client.trailing_data
        self.head[:] = leftover[: MAX_HEAD_BYTES + 1]
        self.head_seen = len(leftover)
        self._read_client()

    def _forget_upstream(self) -> None:
        """The upstream connection is done (closed, or will be): the next request
        opens a new one. Mid-response, the client's response is cut."""
        if self.request is not None and not self.response_done:
            if not self._replay():
                self._fail_exchange(502, "the upstream closed before its response ended")
            return
        self.server, self.connected, self.need_upstream = None, False, False
        self.to_upstream.clear()
        self.drop_upstream = True

    def _replay(self) -> bool:
        """Send the request again on a new upstream connection, if the one it went on
        was reused and closed before a byte of the answer (an idle connection the
        server closed as it was taken): as a browser or Squid retries then. Only a
        request without a body, of an idempotent method (RFC 9110 9.2.2: a POST may have
        had its effect), and once."""
        if not (
            self.reused
            and self.request is not None
            and self.replayable is not None
            and self.replayable.method in _IDEMPOTENT
            and not self.responding
            and self.response_seen == 0
        ):
            return False
        self.server = h11.Connection(h11.CLIENT, max_incomplete_event_size=_H11_BUFFER)
        self.to_upstream.clear()
        self.reused, self.may_reuse = False, False
        self.connected, self.need_upstream, self.drop_upstream = False, True, True
        self._to_upstream(self.replayable)
        if self.client.their_state in _ENDED:
            self._to_upstream(h11.EndOfMessage())
        return True

    def _close(self, problem: str | None, reset: bool = False) -> None:
        if not self.closing:
            self.closing, self.problem, self.reset = True, problem, reset
