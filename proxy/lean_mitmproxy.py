"""A leaner mitmproxy: its addon package without its __init__, per-request costs that
buy sandgate nothing taken out, and hooks dispatched only to the addons that have them.

Import this before any mitmproxy module. `mitmproxy/addons/__init__.py` imports all
~30 default addons (a Flask app for onboarding, ldap3 for proxy auth, ...): about
270 ms of the ~740 ms that importing the gateway takes, for addons sandgate never
loads. With the package registered without its __init__ (proxy/lean_import.py),
`import mitmproxy.addons.core` loads just that module.

`drop_per_request_checks()` (called by the engine once mitmproxy is imported) takes
out what py-spy showed on the gateway's event loop under bench_gateway.py's
inspected rows, ~10-15 % of its Python time per keep-alive request (on-CPU profile;
docs/performance.md has the numbers):

- `MessageData.__post_init__` (mitmproxy/http.py, defined only `if __debug__`)
  type-checks every field of every Request and Response with `typing`
  introspection. They come from mitmproxy's own HTTP/1 parser, whose types are
  right; the check catches addon authors' mistakes, and sandgate's addon builds no
  message. (`python -O` drops it too, but with every assert in every package.)
- `asyncio_utils.set_task_debug_info` looks up PYTEST_CURRENT_TEST in os.environ
  for every task mitmproxy starts (a failed lookup, so a KeyError raised and
  caught inside `Mapping.get`), to put a test's name into the task's name.
- `Hook.args` calls `dataclasses.fields()` for every hook it dispatches; a hook
  class's fields never change, so their names are cached per class.

`dispatch_hooks_directly()` replaces `AddonManager.handle_lifecycle`, through which
every hook of every connection goes (about 20 per inspected connection, 4 per
request): mitmproxy walks the whole addon chain for each (a generator per addon, a
`safecall` context manager, a coroutine, `getattr`), then does it all again with an
`update` hook for every flow hook, which none of the gateway's addons has. The
replacement keeps, per hook name, the addons that have it (until the chain
changes), calls each in chain order with the same error handling (an exception
logged and the next addon called, AddonHalt stops), and skips `update` when no
addon has it.

`unblock_unhandled_hooks(addons)` (called by the engine once its addons are added):
a layer that yields a hook (`StartHook`, blocking) pauses until the hook has run:
the connection handler starts a task for it, dispatches it, and sends a
`HookCompleted` event back down the layer stack, which resumes the layer. For hooks
none of the gateway's addons has (`response`, `tls_established_client`/`_server`,
`error`, ...) all of that is for nothing: made non-blocking, the layer goes on at
once (the task still runs and finds no addon).

Sixth session (docs/performance.md, "Inspected HTTPS, sixth session"):
`run_hooks_inline()` runs the hooks a layer yields in `server_event` itself, with
no task per hook; `lighter_lookups()` takes the KeyError out of header lookups and
the deep copies out of option reads; `reuse_leaf_objects()` converts the leaf
certificate and key to pyOpenSSL once, not per connection; `parse_client_hellos_lean()`
reads mitmproxy's ClientHello with sandgate's parser. Each says why in its docstring.
Its second pass: `run_hooks_inline`'s command loop also writes each event's data
once per connection (`write_pending`); `lighter_forks()` forks a layer's Context
without making a Server it throws away.

docs/mitmproxy-internals.md lists these for the upgrade checklist.
"""

from __future__ import annotations

import inspect
import time
import types
from collections import deque
from typing import NamedTuple

from sandgate.proxy.lean_import import skip_init

skip_init("mitmproxy.addons")

_HOOK_FIELDS: dict[type, tuple[str, ...]] = {}


def drop_per_request_checks() -> None:
    """Patch the three costs above out of the imported mitmproxy (idempotent)."""
    from mitmproxy import hooks, http
    from mitmproxy.utils import asyncio_utils

    http.MessageData.__post_init__ = _no_type_check
    asyncio_utils.set_task_debug_info = _set_task_name
    hooks.Hook.args = _hook_args


def _no_type_check(self) -> None:
    """The dataclass __init__ of Request/ResponseData calls this: nothing to check."""


def _set_task_name(task, *, name: str, client: tuple | None = None) -> None:
    """`asyncio_utils.set_task_debug_info` without the environment lookup."""
    task.created = time.time()
    task.set_name(name)
    if client:
        task.client = client


def _hook_args(self) -> list:
    """`Hook.args`: the hook's field values in order, field names cached per class."""
    names = _HOOK_FIELDS.get(type(self))
    if names is None:
        import dataclasses

        names = _HOOK_FIELDS[type(self)] = tuple(f.name for f in dataclasses.fields(self))
    return [getattr(self, name) for name in names]


def dispatch_hooks_directly() -> None:
    """Replace `AddonManager.handle_lifecycle` (see the module docstring; idempotent)."""
    from mitmproxy import addonmanager, flow

    async def handle_lifecycle(self, event) -> None:
        args = event.args()
        await _trigger(hook_handlers(self, event.name), event.name, args)
        if isinstance(args[0], flow.Flow) and hook_handlers(self, "update"):
            await _trigger(hook_handlers(self, "update"), "update", [[args[0]]])

    addonmanager.AddonManager.handle_lifecycle = handle_lifecycle


async def _trigger(addons, name: str, args: list, pending=None) -> None:
    """Call hook `name` on `addons` in order, awaiting what they return, with
    mitmproxy's error handling (`safecall`): an exception is logged and the next addon
    called, AddonHalt stops, OptionsError is raised. `pending`: an awaitable the
    addon before `addons` returned, awaited first (`run_hooks_inline`)."""
    from mitmproxy import addonmanager, exceptions

    for addon in addons if pending is None else (None, *addons):
        try:
            result = pending if addon is None else getattr(addon, name)(*args)
            if result is not None and inspect.isawaitable(result):
                await result
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception as e:  # noqa: BLE001 - as mitmproxy's safecall: log, go on
            addonmanager.logger.error(f"Addon error: {e}", exc_info=True)


def hook_handlers(manager, name: str) -> tuple:
    """The addons of an AddonManager (children included, in mitmproxy's order) with a
    callable hook `name`, cached until the chain changes (`add` appends to the list,
    `remove` and `clear` replace it)."""
    cache = manager.__dict__.get("_sandgate_hook_handlers")
    if cache is None or cache[0] is not manager.chain or cache[1] != len(manager.chain):
        cache = manager._sandgate_hook_handlers = (manager.chain, len(manager.chain), {})
    found = cache[2].get(name)
    if found is None:
        from mitmproxy.addonmanager import traverse

        found = cache[2][name] = tuple(
            addon
            for addon in traverse(manager.chain)
            if callable(hook := getattr(addon, name, None))
            and not isinstance(hook, types.ModuleType)
        )
    return found


def unblock_unhandled_hooks(manager) -> list[str]:
    """Make each layer hook that no addon of `manager` (the AddonManager, its addon
    set final) has non-blocking; returns their names (see the module docstring)."""
    from mitmproxy import hooks
    from mitmproxy.proxy import commands

    unblocked = []
    for name, hook_class in hooks.all_hooks.items():
        if issubclass(hook_class, commands.StartHook) and not hook_handlers(manager, name):
            hook_class.blocking = False
            unblocked.append(name)
    return unblocked


def lighter_lookups() -> None:
    """Header lookups and option reads without their detours (idempotent; see
    docs/mitmproxy-internals.md 7f). Same results:

    - `Headers.get` and `in` went through `Mapping.get`/`__contains__`, which call
      `headers[key]`, which raises KeyError for a missing header (most lookups:
      `expect`, `transfer-encoding`, `connection` on every message), and `get_all`
      lowered the key once per field through two method calls;
    - `ctx.options.X` deep-copied the option's value twice per read; the HTTP layer
      reads a few per message. A deep copy of str, bytes, int, float, bool or None
      is the value itself, so those are returned as they are."""
    from mitmproxy import http, optmanager

    native, always_bytes = http._native, http._always_bytes

    def get_all(self, name) -> list[str]:
        key = always_bytes(name).lower()
        return [native(value) for field, value in self.fields if field.lower() == key]

    def get(self, name, default=None):
        values = get_all(self, name)
        return ", ".join(values) if values else default

    def contains(self, name) -> bool:
        key = always_bytes(name).lower()
        return any(field.lower() == key for field, _ in self.fields)

    http.Headers.get_all, http.Headers.get, http.Headers.__contains__ = get_all, get, contains

    unset, copy = optmanager.unset, optmanager.copy
    immutable = (str, bytes, int, float, bool, type(None))

    def current(self):
        value = self._default if self.value is unset else self.value
        return value if type(value) in immutable else copy.deepcopy(value)

    optmanager._Option.current = current


# mitmproxy's leaf cache, per task (`leaves_per_task`): leaves kept for each (more
# than limits.FREE_LEAVES, which the gate lets a task reuse free of its leaf_rate), and
# tasks kept, least recently served out first.
LEAVES_PER_TASK = 40
MAX_LEAF_TASKS = 128


def leaves_per_task(tls, owner_of) -> None:
    """Give each task its own leaf cache in `tls` (the TlsConfig addon): `owner_of(
    context)` names the task of a connection (its Sandbox).

    `TlsConfig.get_cert` looks leaves up in one CertStore for every client, so a
    name one task visited is served from the cache to the next, ~1 ms faster than a
    new leaf: timing its own handshakes, a task learns which names others visited.
    `get_cert` is synchronous on the loop: the store's cache (`certs`,
    `expire_queue`) is swapped for the task's around it. sandgate adds no
    certificates of its own to the store (the `certs` option), so nothing else
    lives in that cache."""
    from collections import OrderedDict

    get_cert = tls.get_cert
    caches: OrderedDict = OrderedDict()  # owner -> (certs, expire_queue)

    def get_cert_of_task(conn_context):
        owner = owner_of(conn_context)
        cache = caches.get(owner)
        if cache is None:
            cache = caches[owner] = ({}, [])
            if len(caches) > MAX_LEAF_TASKS:
                caches.popitem(last=False)
        caches.move_to_end(owner)
        store = tls.certstore  # made by its `configure`
        store.STORE_CAP = LEAVES_PER_TASK
        shared = store.certs, store.expire_queue
        store.certs, store.expire_queue = cache
        try:
            return get_cert(conn_context)
        finally:
            # expire() rebinds `certs` to a new dict: keep what it left.
            caches[owner] = store.certs, store.expire_queue
            store.certs, store.expire_queue = shared

    tls.get_cert = get_cert_of_task


# What mitmproxy's HTTP/2 layer may hold for one client connection that does not
# open its flow-control window (`bound_h2_send_buffers`).
MAX_H2_BUFFERED = 8 * 1024 * 1024
ENHANCE_YOUR_CALM = 0xB  # RFC 9113 7: the peer may be generating excessive load


def bound_h2_send_buffers() -> None:
    """Reset the HTTP/2 stream that would take what mitmproxy holds for one
    connection past MAX_H2_BUFFERED (idempotent; docs/mitmproxy-internals.md 7l).

    `BufferedH2Connection.send_data` queues what the peer's flow-control window does
    not take (`stream_buffers`), without a bound, while the other side is read on:
    mitmproxy acknowledges what it receives at once (the upstream's h2 window never
    closes) and its TCP back-pressure (`drain_writers`) only waits for the kernel
    to take what was written. A client that reads its socket but never sends
    WINDOW_UPDATE (or sets SETTINGS_INITIAL_WINDOW_SIZE 0) and downloads a large
    file had the worker buffer all of it. Past the bound the stream is reset
    (ENHANCE_YOUR_CALM) and its queue let go; the layer sends nothing more on a
    closed stream (`is_open_for_us`). The stream's own layer is then told, as when
    the client resets a stream itself (`StreamReset`): its upstream connection is
    closed. Without that, mitmproxy read the upstream's body on and dropped it: a
    task whose window stayed shut had the worker download without end (5 GB in 40
    s, tests/e2e/test_slow_peers.py)."""
    from mitmproxy.proxy.layers.http._base import ReceiveHttp
    from mitmproxy.proxy.layers.http._http2 import Http2Connection
    from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

    send_data = BufferedH2Connection.send_data
    if getattr(send_data, "_sandgate", False):
        return
    handle_event = Http2Connection._handle_event

    def telling_handle_event(self, event):
        yield from handle_event(self, event)
        yield from tell(self)

    def tell(self):
        calmed = getattr(self.h2_conn, "sandgate_calmed", None)
        while calmed:
            stream_id = calmed.pop()
            if self.streams.pop(stream_id, None) is not None:
                why = "flow-control window kept shut: over the gateway's queue (ENHANCE_YOUR_CALM)"
                yield ReceiveHttp(self.ReceiveProtocolError(stream_id, why))

    def bounded_send_data(self, stream_id, data, end_stream=False, pad_length=None):
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            return  # reset here, in the middle of a write split into frames
        send_data(self, stream_id, data, end_stream, pad_length)
        if not self.stream_buffers.get(stream_id):
            return
        held = sum(len(chunk.data) for queue in self.stream_buffers.values() for chunk in queue)
        if held > MAX_H2_BUFFERED:
            self.reset_stream(stream_id, ENHANCE_YOUR_CALM)
            if not hasattr(self, "sandgate_calmed"):
                self.sandgate_calmed = set()
            self.sandgate_calmed.add(stream_id)  # for its layer (telling_handle_event)

    bounded_send_data._sandgate = True
    BufferedH2Connection.send_data = bounded_send_data
    telling_handle_event.tell = tell  # the part a unit test runs alone
    Http2Connection._handle_event = telling_handle_event


def frame_downgraded_requests() -> None:
    """An HTTP/2 request with a body and no content-length, sent on to an HTTP/1
    server, gets a framing of its own (idempotent; docs/mitmproxy-internals.md 7p).

    `Http1Client.send` converts the head of an HTTP/2 request and writes its DATA as
    it comes, framed only by what the request's headers say. HTTP/2 needs no
    content-length (the frames end the body), so the server read a request without
    a body, then the body as the next request on the connection: any method, path
    and Host, never decided nor recorded. Now such a request goes with the length of
    its body where mitmproxy holds it whole (it buffers bodies up to
    stream_large_bodies, 64 KiB), else chunked. One with a content-length keeps it (h2
    refuses DATA that does not add up to it); one without a body keeps its head.

    Any request (HTTP/1 or 2) with a body on a method whose content has no meaning
    (GET, HEAD, DELETE, OPTIONS, TRACE) goes with `Connection: close` (one field, only
    that word), and its upstream connection closes after it: a server may leave such
    a body unread and read it as the next request (request_head.leaves_body_unread).
    The copy is the upstream's request alone: the client's connection stays open."""
    import dataclasses

    from mitmproxy.proxy.layers.http._events import RequestHeaders
    from mitmproxy.proxy.layers.http._http1 import Http1Client
    from sandgate.proxy.policy.request_head import leaves_body_unread

    send = Http1Client.send
    if getattr(send, "_sandgate", False):
        return

    def framed_send(self, event):
        if isinstance(event, RequestHeaders) and not event.end_stream:
            request = event.request
            unframed = (
                request.is_http2 or request.is_http3
            ) and "content-length" not in request.headers
            close = leaves_body_unread(request.data.method)  # (a body: not end_stream)
            if unframed or close:
                request = request.copy()
                if unframed:
                    content = None if request.stream else request.raw_content
                    if content is not None:
                        request.headers["content-length"] = str(len(content))
                    else:
                        request.headers["transfer-encoding"] = "chunked"
                if close:
                    request.headers["connection"] = "close"  # replaces every Connection field
                event = dataclasses.replace(event, request=request)
        return (yield from send(self, event))

    framed_send._sandgate = True
    Http1Client.send = framed_send


# Streams an HTTP/2 client may have reset before their response ended, on one
# connection, before the gateway closes it (`bound_h2_early_resets`); and only while
# they are at least half of the streams it opened there. Resets the gateway's h2 made
# for the client's frames count too (MadeYouReset).
MAX_H2_EARLY_RESETS = 100
# Frames a client sends that ask for no stream and are worth nothing in bulk
# (`bound_h2_control_frames`): SETTINGS and PING (each makes the gateway write an ACK),
# PRIORITY, and DATA with no data that does not end its stream. A connection may send
# a burst of MAX_H2_CONTROL_BURST, then H2_CONTROL_RATE a second (with
# H2_CONTROL_PER_STREAM more for each stream it opens); past that it is closed.
MAX_H2_CONTROL_BURST = 200
H2_CONTROL_RATE = 20
H2_CONTROL_PER_STREAM = 10
# An HTTP/2 header block (HEADERS and its CONTINUATIONs), compressed, at most the
# bytes a request head may have decoded (policy/request_head.MAX_HEAD_BYTES: one limit
# for both): each field decodes to at least its encoded bytes (HPACK counts 32 bytes
# of overhead per field), so a bigger block is a bigger head, or no head at all.
MAX_H2_HEADER_BLOCK = 64 * 1024


class H2Closed(NamedTuple):
    """Set on mitmproxy's `Client` (attribute H2_CLOSED) whose HTTP/2 connection the
    gateway closed with a GOAWAY: ENHANCE_YOUR_CALM for a flood, or PROTOCOL_ERROR
    for what h2 or mitmproxy refused (`mark_h2_protocol_errors`): the built-in rule's
    name and what happened (the addon's event reads it when the client disconnects)."""

    rule: str
    detail: str


H2_CLOSED = "sandgate_h2_closed"


def bound_h2_early_resets() -> None:
    """Close with GOAWAY ENHANCE_YOUR_CALM the client HTTP/2 connection that has more
    than MAX_H2_EARLY_RESETS streams reset before their response ended, when those are
    at least half of its streams: rapid reset, CVE-2023-44487, and MadeYouReset,
    CVE-2025-8671 (idempotent; docs/mitmproxy-internals.md 7n).

    Each stream costs the worker its request's decision, event and upstream stream;
    a client that resets it at once is free to open the next, without limit
    (SETTINGS_MAX_CONCURRENT_STREAMS counts only open ones). Envoy's
    premature-reset limit and hyper's pending-accept-reset budget are the model: a
    budget per connection, past which the connection goes; the per-sandbox
    connection_rate then bounds how fast new ones come. Browsers cancel streams
    too, but not most of them by the hundred.

    The client need not send RST_STREAM itself: DATA or HEADERS after its request's
    END_STREAM, or a WINDOW_UPDATE that overflows a stream's window, make h2 reset the
    stream (StreamReset, remote_reset False) after the request was decided and sent
    upstream. Those count alike. Relies on: `Http2Server.streams` holding a stream
    until its response ended, `StreamReset` reaching `handle_h2_event`,
    `protocol_error` sending GOAWAY with the given code."""
    import h2.events
    import h2.exceptions
    from mitmproxy.proxy.layers.http._http2 import Http2Server

    handle_h2_event = Http2Server.handle_h2_event
    if getattr(handle_h2_event, "_sandgate", False):
        return

    def counting_handle_h2_event(self, event):
        if isinstance(event, h2.events.RequestReceived):
            self.sandgate_opened = getattr(self, "sandgate_opened", 0) + 1
        elif isinstance(event, h2.events.StreamReset):
            # h2 raises StreamReset only for a stream not yet closed both ways: its
            # response had not ended. Not `stream_id in self.streams`: a reset read
            # with its request's END_STREAM closes the stream in h2 before mitmproxy
            # sees StreamEnded, which drops it from `streams` (the request still goes
            # upstream in full, and the reset is ignored).
            resets = getattr(self, "sandgate_resets", 0) + 1
            self.sandgate_resets = resets
            made = getattr(self, "sandgate_made_resets", 0) + (not event.remote_reset)
            self.sandgate_made_resets = made
            if resets > MAX_H2_EARLY_RESETS and 2 * resets >= self.sandgate_opened:
                return (
                    yield from _calm(
                        self,
                        H2Closed(
                            "rapid-reset",
                            f"{resets} of {self.sandgate_opened} HTTP/2 streams reset before "
                            f"their response ended, {made} of them by the gateway for the "
                            "client's frames (rapid reset, MadeYouReset)",
                        ),
                    )
                )
        elif isinstance(event, h2.exceptions.DenialOfServiceError):
            # Ours carry an H2Closed; h2's own is a header list past its 64 KiB decoded.
            flood = getattr(event, "sandgate_flood", None) or H2Closed(
                "headers-too-large", f"an HTTP/2 header list past 64 KiB decoded ({event})"
            )
            return (yield from _calm(self, flood))
        return (yield from handle_h2_event(self, event))

    counting_handle_h2_event._sandgate = True
    Http2Server.handle_h2_event = counting_handle_h2_event


def stream_websocket_messages() -> None:
    """Relay an allowed WebSocket's messages piece by piece as they arrive, keeping
    none (idempotent; docs/mitmproxy-internals.md 7q).

    mitmproxy's `WebsocketLayer.relay_messages` gathers each message whole before it
    sends it on (`frame_buf`), and appends every message to the flow
    (`flow.websocket.messages`) for as long as the connection lives: a task's
    message that never ends (fragments without FIN, or one frame announcing 2^63
    bytes), or just a long-lived WebSocket's traffic, grew the worker's memory
    without bound (300 MB sent, 240-270 MB kept). Here each piece of a message that
    wsproto yields (it yields data frames' payload as it is read) goes on at once as
    a fragment of the same message: an intermediary may split frames (RFC 6455 5.4)
    when no extension is in use, and the addon sees to that (it removes
    Sec-WebSocket-Extensions both ways: permessage-deflate had the worker inflate
    a message whole, 300 KB sent became 500 MB held). Frames are re-masked by
    wsproto as mitmproxy's were: the bytes the server reads are never the task's
    own. No `websocket_message` hook is run (no addon of the gateway has one).
    Relies on: `relay_messages` being what `WebsocketLayer.start` makes the
    layer's `_handle_event`, `client_ws`/`server_ws` (wsproto connections with
    `send2` and `conn`), and wsproto's `Message.message_finished`."""
    import time

    import wsproto
    import wsproto.events
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.websocket import WebsocketEndHook, WebsocketLayer

    relay = WebsocketLayer.relay_messages
    if getattr(relay, "_sandgate", False):
        return

    def streaming_relay(self, event):
        if not isinstance(event, events.DataReceived | events.ConnectionClosed):
            return (yield from relay(self, event))  # an injected message: mitmproxy's API
        from_client = event.connection == self.context.client
        src, dst = (
            (self.client_ws, self.server_ws) if from_client else (self.server_ws, self.client_ws)
        )
        src.receive_data(event.data if isinstance(event, events.DataReceived) else None)
        for ws_event in src.events():
            if isinstance(
                ws_event, wsproto.events.Message | wsproto.events.Ping | wsproto.events.Pong
            ):
                if dst.state is wsproto.ConnectionState.OPEN:  # else closing: dropped
                    yield dst.send2(ws_event)
            elif isinstance(ws_event, wsproto.events.CloseConnection):
                flow = self.flow
                flow.websocket.timestamp_end = time.time()
                flow.websocket.closed_by_client = from_client
                flow.websocket.close_code = ws_event.code
                flow.websocket.close_reason = ws_event.reason
                for ws in (self.server_ws, self.client_ws):
                    if ws.state in (
                        wsproto.ConnectionState.OPEN,
                        wsproto.ConnectionState.REMOTE_CLOSING,
                    ):
                        yield ws.send2(ws_event)
                    yield commands.CloseConnection(ws.conn)
                yield WebsocketEndHook(flow)
                flow.live = False
                self._handle_event = self.done
                return

    streaming_relay._sandgate = True
    WebsocketLayer.relay_messages = streaming_relay


def drop_http1_trailers() -> None:
    """Read an HTTP/1 chunked body's trailer section and drop it, as the front door
    does (idempotent; docs/mitmproxy-internals.md 7r).

    mitmproxy's `Http1Connection.read_body` raises NotImplementedError when h11's
    ChunkedReader ends a body with trailer fields: the connection handler logged
    "mitmproxy has crashed!" with its traceback, ~40 lines for each such request or
    response, and left the connection hanging (a task could flood the gateway's log;
    a server that sends trailers broke every download through mitmproxy). The
    front door's h11 reads them and passes none on (http1_fast.ChunkedBody, h11's
    EndOfMessage sent without them); now mitmproxy does the same: the body's end is
    forwarded, `0 CRLF CRLF`, without the fields. Relies on: `make_body_reader` being
    the module global `read_headers` calls, and `ChunkedReader.__call__` returning
    h11's EndOfMessage with the trailer fields as `headers`."""
    import h11
    from h11._readers import ChunkedReader
    from mitmproxy.proxy.layers.http import _http1

    make = _http1.make_body_reader
    if getattr(make, "_sandgate", False):
        return

    class TrailerlessChunkedReader(ChunkedReader):
        def __call__(self, buf):
            event = super().__call__(buf)
            if isinstance(event, h11.EndOfMessage) and event.headers:
                return h11.EndOfMessage()
            return event

    def trailerless_body_reader(expected_size):
        return TrailerlessChunkedReader() if expected_size is None else make(expected_size)

    trailerless_body_reader._sandgate = True
    _http1.make_body_reader = trailerless_body_reader


def answer_before_streaming() -> None:
    """Answer a request whose body streams, when the requestheaders hook gave it a
    response (a refusal, or a held request's answer), at once; the rest of its body
    is dropped as it comes (idempotent; docs/mitmproxy-internals.md 7s).

    mitmproxy streams a request body declared larger than `stream_large_bodies`
    (64 KiB), and `HttpStream.start_request_stream` raises NotImplementedError ("Can't
    set a response and enable streaming at the same time") when the hook set a
    response: the connection handler logged "mitmproxy has crashed!" and the client
    waited for an answer that never came (a held POST of 100 kB, refused when its
    hold ran out, left curl hanging until its timeout). An HTTP/1 client's connection
    is closed after the answer (the refusal says `Connection: close`): its body is
    not read to its end. Relies on: the hook's response set on `flow.response`, and
    `state_errored` consuming every later event of the stream."""
    from mitmproxy.proxy import commands as proxy_commands
    from mitmproxy.proxy.layers.http import HttpStream

    original = HttpStream.start_request_stream
    if getattr(original, "_sandgate", False):
        return

    def start_request_stream(self):
        if self.flow.response is None:
            return (yield from original(self))
        self.client_state = self.state_errored  # what is left of the body: dropped
        self.flow.response.timestamp_start = time.time()
        yield from self.send_response()
        if not self.flow.request.is_http2:
            yield proxy_commands.CloseConnection(self.context.client)

    start_request_stream._sandgate = True
    HttpStream.start_request_stream = start_request_stream


def mark_h2_protocol_errors() -> None:
    """Mark the client connection that mitmproxy's HTTP/2 server closes for a
    protocol error (idempotent): h2 refuses a request whose `host` differs from its
    `:authority` (an attempt at another tenant), userinfo, no authority, CONNECT;
    mitmproxy closes the connection before any request hook, so without the mark
    the audit log held only the connection's allow and end (a red team, session
    49). The addon's event (`malformed-request`, the GOAWAY's text) comes when the
    client disconnects; a flood's mark, set before, stays."""
    from mitmproxy.proxy.layers.http._http2 import Http2Connection, Http2Server

    if getattr(Http2Server.protocol_error, "_sandgate", False):
        return
    protocol_error = Http2Connection.protocol_error

    def marking_protocol_error(self, message, *args, **kwargs):
        client = self.context.client
        if getattr(client, H2_CLOSED, None) is None:
            detail = f"the client's HTTP/2 connection closed (GOAWAY): {message}"
            setattr(client, H2_CLOSED, H2Closed("malformed-request", detail[:500]))
        return (yield from protocol_error(self, message, *args, **kwargs))

    marking_protocol_error._sandgate = True
    Http2Server.protocol_error = marking_protocol_error


def _calm(layer, flood: H2Closed):
    """GOAWAY ENHANCE_YOUR_CALM and close `layer`'s client connection, marked with
    `flood` for the addon's event; True: the layer handles no more of this read."""
    setattr(layer.context.client, H2_CLOSED, flood)
    yield from layer.protocol_error(flood.detail, error_code=ENHANCE_YOUR_CALM)
    return True


def bound_h2_control_frames() -> None:
    """Close the client HTTP/2 connection that sends control frames past its budget
    (MAX_H2_CONTROL_BURST, then H2_CONTROL_RATE a second), or a header block past
    MAX_H2_HEADER_BLOCK, with GOAWAY ENHANCE_YOUR_CALM (idempotent;
    docs/mitmproxy-internals.md 7o).

    h2 answers every SETTINGS and PING with an ACK and handles each PRIORITY and empty
    DATA frame; a client that sends them by the thousand and never reads makes the
    worker parse all that its socket buffers hold, one 64 KiB read (~4,000 frames)
    per loop turn, and queue the ACKs (CVE-2019-9512/9515/9516/9518: an honest
    sandbox's request waited 1.4-2.5 s behind four such clients). Go's net/http2 and
    Envoy close a connection with too many control frames queued; here the frames are
    counted as h2 reads them (`H2Connection._receive_frame`, server side only), so
    that the rest of the read is not parsed. A header block was buffered up to 64
    CONTINUATIONs of 128 KiB (8 MiB) before its size was looked at; now past
    MAX_H2_HEADER_BLOCK (`FrameBuffer._update_header_buffer`). Either raises h2's
    DenialOfServiceError carrying an H2Closed (`_flood_error`), which
    `bound_h2_early_resets`'s handler turns into GOAWAY and the addon's event."""
    import h2.frame_buffer
    from hyperframe import frame as frames
    from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

    receive_frame = BufferedH2Connection._receive_frame
    if getattr(receive_frame, "_sandgate", False):
        return
    clock = time.monotonic

    def budgeted_receive_frame(self, frame):
        if not self.config.client_side and _is_control(frame, frames):
            now = clock()
            budget, then = getattr(self, "sandgate_control", (MAX_H2_CONTROL_BURST, now))
            budget = min(MAX_H2_CONTROL_BURST, budget + (now - then) * H2_CONTROL_RATE) - 1
            self.sandgate_control = budget, now
            if budget < 0:
                raise _flood_error(
                    H2Closed(
                        "control-frame-flood",
                        f"more than {MAX_H2_CONTROL_BURST} HTTP/2 control frames (SETTINGS, "
                        f"PING, PRIORITY, empty DATA) at once, or {H2_CONTROL_RATE} a second",
                    )
                )
        elif not self.config.client_side and isinstance(frame, frames.HeadersFrame):
            budget, then = getattr(self, "sandgate_control", (MAX_H2_CONTROL_BURST, clock()))
            self.sandgate_control = min(MAX_H2_CONTROL_BURST, budget + H2_CONTROL_PER_STREAM), then
        return receive_frame(self, frame)

    update_header_buffer = h2.frame_buffer.FrameBuffer._update_header_buffer
    blocks = (frames.HeadersFrame, frames.PushPromiseFrame)

    def bounded_update_header_buffer(self, f):
        f = update_header_buffer(self, f)
        held = f.data if isinstance(f, blocks) else b""
        size = max(len(held), sum(len(x.data) for x in self._headers_buffer))
        if size > MAX_H2_HEADER_BLOCK:
            raise _flood_error(
                H2Closed(
                    "headers-too-large",
                    f"an HTTP/2 header block of more than {MAX_H2_HEADER_BLOCK} bytes "
                    "(HEADERS and CONTINUATION frames)",
                )
            )
        return f

    budgeted_receive_frame._sandgate = True
    BufferedH2Connection._receive_frame = budgeted_receive_frame
    h2.frame_buffer.FrameBuffer._update_header_buffer = bounded_update_header_buffer


def _flood_error(flood: H2Closed):
    """h2's DenialOfServiceError (a ProtocolError: h2 sends GOAWAY and raises it to
    the layer) carrying `flood`."""
    import h2.exceptions

    error = h2.exceptions.DenialOfServiceError(flood.detail)
    error.sandgate_flood = flood
    return error


def _is_control(frame, frames) -> bool:
    """A frame of the client's that counts against its control-frame budget."""
    kind = type(frame)
    if kind is frames.SettingsFrame or kind is frames.PingFrame:
        return "ACK" not in frame.flags
    if kind is frames.PriorityFrame:
        return True
    return kind is frames.DataFrame and not frame.data and "END_STREAM" not in frame.flags


def reuse_leaf_objects() -> None:
    """Convert each leaf certificate and key to pyOpenSSL once, not per connection
    (idempotent; docs/mitmproxy-internals.md 7g).

    `TlsConfig.tls_start_client` gets the leaf from mitmproxy's CertStore cache (as
    `cryptography` objects) and converts both to pyOpenSSL for every inspected
    connection, each a serialisation and a parse: `Cert.to_pyopenssl` and
    `PKey.from_cryptography_key`. The certificate's is kept on the Cert object (the
    CertStore keeps those), the key's per key object (mitmproxy signs every leaf
    with the CA's key and serves that key with it: one entry). OpenSSL only reads
    them (`SSL_use_certificate` and `SSL_use_PrivateKey` take a reference)."""
    from mitmproxy import certs
    from OpenSSL import crypto

    if getattr(certs.Cert.to_pyopenssl, "_sandgate", False):
        return
    to_pyopenssl = certs.Cert.to_pyopenssl
    from_key = crypto.PKey.from_cryptography_key.__func__

    def cert_to_pyopenssl(self):
        cached = self.__dict__.get("_sandgate_pyopenssl")
        if cached is None:
            cached = self._sandgate_pyopenssl = to_pyopenssl(self)
        return cached

    keys: dict[int, tuple] = {}  # id(key) -> (key, PKey): the key kept, so the id stays its

    def key_from_cryptography(cls, key):
        cached = keys.get(id(key))
        if cached is None or cached[0] is not key or cls is not crypto.PKey:
            pkey = from_key(cls, key)
            if cls is not crypto.PKey or not hasattr(key, "private_bytes"):
                return pkey  # a subclass's, or a public key: as before
            if len(keys) >= MAX_CACHED_KEYS:
                keys.clear()
            cached = keys[id(key)] = (key, pkey)
        return cached[1]

    cert_to_pyopenssl._sandgate = True
    certs.Cert.to_pyopenssl = cert_to_pyopenssl
    crypto.PKey.from_cryptography_key = classmethod(key_from_cryptography)


def lighter_forks() -> bool:
    """`Context.fork` without a Server it throws away (idempotent; docs/mitmproxy-internals.md
    7j). False, and mitmproxy's kept, when a Context holds anything else.

    mitmproxy's `fork` calls `Context(client, options)`, whose `__init__` makes a new
    `connection.Server` (a uuid4, a dataclass `__init__` of ~25 fields, each through
    `Server.__setattr__`'s guard), and then replaces it with the parent's server. The
    HTTP layer forks three times per inspected connection (its start, each request's
    stream, the upstream connection) and once per keep-alive request. Here the copy
    is made without `__init__`: the same four attributes, the server shared, the
    layer list copied."""
    from mitmproxy import options
    from mitmproxy.proxy import context

    if getattr(context.Context.fork, "_sandgate", False):
        return True
    probe = context.Context(_probe_client(), options.Options())
    if set(vars(probe)) != {"client", "options", "server", "layers"}:
        return False
    new = object.__new__
    Context = context.Context

    def fork(self):
        forked = new(Context)
        forked.client, forked.options, forked.server = self.client, self.options, self.server
        forked.layers = self.layers.copy()
        return forked

    fork._sandgate = True
    context.Context.fork = fork
    return True


def _probe_client():
    from mitmproxy import connection

    return connection.Client(
        peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0
    )


MAX_CACHED_KEYS = 16  # private keys converted to pyOpenSSL kept (mitmproxy uses one)


# sha256 of the source of what `run_hooks_inline` replaces or relies on, as in
# mitmproxy 11.0.2; another source leaves mitmproxy's own in place (and says so).
HOOK_PATH_SOURCES = {
    "server.ConnectionHandler.server_event": (
        "11ba8b6ed84f07444dfd1a50e5c375f3905c514242a073471d220faa18be3ff6"
    ),
    "server.ConnectionHandler.hook_task": (
        "9ac79701605262685df6bc57fdba46bc84894961665e5b32d90defebd0780092"
    ),
    "mode_servers.ProxyConnectionHandler.handle_hook": (
        "9f8b52fd798203c9d2401c3e5d8c7f9976c490ac124b17cd55d8afce73b66acf"
    ),
}


def _source_digest(obj) -> str:
    import hashlib

    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def hook_path_changes() -> list[str]:
    """The names in HOOK_PATH_SOURCES whose source is not the one recorded there."""
    from mitmproxy.proxy import mode_servers, server

    modules = {"server": server, "mode_servers": mode_servers}
    changed = []
    for name, digest in HOOK_PATH_SOURCES.items():
        module, *path = name.split(".")
        obj = modules[module]
        for part in path:
            obj = getattr(obj, part)
        if _source_digest(obj) != digest:
            changed.append(name)
    return changed


def run_hooks_inline() -> bool:
    """Run the hooks a layer yields in `server_event` itself, no task per hook
    (docs/mitmproxy-internals.md 7h). False, and mitmproxy's own path kept, when
    its source is not the one this was written against.

    mitmproxy's `ConnectionHandler.server_event` feeds an event to the layer stack
    and carries out the commands it yields; for each hook (`StartHook`) it starts a
    task, which dispatches the hook to the addons and then, for a blocking hook, feeds
    `HookCompleted` back through `server_event`: ~16 tasks per new inspected
    connection, 4 per request. The gateway's addons answer every hook at once (a
    coroutine only for a request held for approval), so here the hooks of one event
    run after its commands, in the order yielded, each followed at once by its
    `HookCompleted`, as the tasks would have run them. A hook an addon answers with
    an awaitable, a flow hook when an addon has `update` or the flow is intercepted,
    and any other connection handler, go on in a task as before. A hook no addon
    has and that does not block is dropped: its task would have found no addon."""
    from mitmproxy import flow
    from mitmproxy.proxy import commands, events, mode_servers, server
    from mitmproxy.utils import asyncio_utils

    if server.ConnectionHandler.server_event.__name__ == "server_event_inline":
        return True
    changed = hook_path_changes()
    if changed:
        import logging

        logging.getLogger("sandgate.engine").warning(
            "mitmproxy's %s changed: hooks keep a task each", ", ".join(changed)
        )
        return False
    log_error = server.logging.ERROR

    def carry_out(self, event, hooks: deque) -> None:
        """mitmproxy's command loop (server_event), hooks queued instead of tasks, and
        what the layers send to each connection written once, after the commands
        (before a close of that connection): see write_pending."""
        pending: dict = {}  # connection -> (writer, [data, ...]) not written yet
        try:
            try:
                for command in self.layer.handle_event(event):
                    if isinstance(command, commands.OpenConnection):
                        assert command.connection not in self.transports
                        handler = asyncio_utils.create_task(
                            self.open_connection(command),
                            name=f"server connection handler {command.connection.address}",
                            client=self.client.peername,
                        )
                        self.transports[command.connection] = server.ConnectionIO(handler=handler)
                    elif isinstance(command, commands.RequestWakeup):
                        task = asyncio_utils.create_task(
                            self.wakeup(command),
                            name=f"wakeup timer ({command.delay:.1f}s)",
                            client=self.client.peername,
                        )
                        assert task is not None
                        self.wakeup_timer.add(task)
                    elif (
                        isinstance(command, commands.ConnectionCommand)
                        and command.connection not in self.transports
                    ):
                        pass  # The connection has already been closed.
                    elif isinstance(command, commands.SendData):
                        writer = self.transports[command.connection].writer
                        assert writer
                        if (queued := pending.get(command.connection)) is None:
                            pending[command.connection] = (writer, [command.data])
                        else:
                            queued[1].append(command.data)
                    elif isinstance(command, commands.CloseTcpConnection):
                        write_pending(pending, command.connection)
                        self.close_connection(command.connection, command.half_close)
                    elif isinstance(command, commands.CloseConnection):
                        write_pending(pending, command.connection)
                        self.close_connection(command.connection, False)
                    elif isinstance(command, commands.StartHook):
                        hooks.append(command)
                    elif isinstance(command, commands.Log):
                        self.log(command.message, command.level)
                    else:
                        raise RuntimeError(f"Unexpected command: {command}")
            finally:
                write_pending(pending)
        except Exception:
            self.log("mitmproxy has crashed!", log_error, exc_info=True)

    def in_task(self, hook, coroutine) -> None:
        task = asyncio_utils.create_task(
            coroutine, name=f"handle_hook({hook.name})", client=self.client.peername
        )
        self.hook_tasks.add(task)
        task.add_done_callback(self.hook_tasks.remove)

    async def finish(self, hook, data, pending, rest: tuple) -> None:
        """The rest of a hook an addon answered with `pending`, then as hook_task."""
        with self.timeout_watchdog.disarm():
            await _trigger(rest, hook.name, [data], pending)
            if isinstance(data, flow.Flow):
                await data.wait_for_resume()
        if hook.blocking:
            await self.server_event(events.HookCompleted(hook))

    def run_hook(self, hook) -> bool:
        """Dispatch `hook` now; True if done, False if it goes on in a task."""
        if not isinstance(self, mode_servers.ProxyConnectionHandler):
            in_task(self, hook, self.hook_task(hook))
            return False
        manager = self.master.addons
        (data,) = hook.args()
        if isinstance(data, flow.Flow) and (hook_handlers(manager, "update") or data.intercepted):
            in_task(self, hook, self.hook_task(hook))
            return False
        addons = hook_handlers(manager, hook.name)
        for i, addon in enumerate(addons):
            result = _call_now(addon, hook.name, data)
            if result is _HALT:
                break
            if result is not None and inspect.isawaitable(result):
                in_task(self, hook, finish(self, hook, data, result, addons[i + 1 :]))
                return False
        return True

    async def server_event_inline(self, event) -> None:
        async with self._server_event_lock:
            # No `await` beyond this point (as in mitmproxy's).
            self.timeout_watchdog.register_activity()
            hooks: deque = deque()
            carry_out(self, event, hooks)
            while hooks:
                hook = hooks.popleft()
                try:
                    done = run_hook(self, hook)
                except Exception:
                    self.log("mitmproxy has crashed!", log_error, exc_info=True)
                    continue
                if done and hook.blocking:
                    carry_out(self, events.HookCompleted(hook), hooks)

    server.ConnectionHandler.server_event = server_event_inline
    return True


def write_pending(pending: dict, connection=None) -> None:
    """Write what `carry_out` queued, for `connection` or for all: one write per
    connection, the pieces in the order the layers sent them.

    mitmproxy wrote each `SendData` at once: one send(2) per TLS record, so the
    upstream handshake's Finished and the request went out in two, as did a
    response's head and body (every keep-alive request). One write per connection
    and event is one send per flight: 5 instead of 7 per new inspected connection,
    and a client whose socket lacks TCP_NODELAY no longer waits out its delayed
    ACK (~40 ms) between a head and its body. Nothing waits: the data goes when the
    event's commands are done, before any hook of the event runs."""
    for conn in list(pending) if connection is None else (connection,):
        queued = pending.pop(conn, None)
        if queued is not None and not queued[0].is_closing():
            chunks = queued[1]
            queued[0].write(chunks[0] if len(chunks) == 1 else b"".join(chunks))


_HALT = object()  # _call_now: the addon raised AddonHalt


def _call_now(addon, name: str, data):
    """One addon's hook, with mitmproxy's error handling (see _trigger): its result,
    None after a logged exception, _HALT for AddonHalt."""
    from mitmproxy import addonmanager, exceptions

    try:
        return getattr(addon, name)(data)
    except exceptions.AddonHalt:
        return _HALT
    except exceptions.OptionsError:
        raise
    except Exception as e:  # noqa: BLE001 - as mitmproxy's safecall: log, go on
        addonmanager.logger.error(f"Addon error: {e}", exc_info=True)
        return None


def parse_client_hellos_lean() -> None:
    """mitmproxy's ClientHello read by sandgate's parser (idempotent;
    docs/mitmproxy-internals.md 7i).

    `ClientTLSLayer` parses each intercepted ClientHello with a Kaitai Struct parser
    (`tls.ClientHello.__init__`), ~7 % of the gateway's CPU per new inspected
    connection, to read two things: the SNI and the ALPN offers. The front door has
    read that same ClientHello with proxy/clienthello.py already (its decision);
    here `layers.tls.parse_client_hello` gives a ClientHello whose `sni` and
    `alpn_protocols` come from that parser, with mitmproxy's rules (the SNI only if
    it is one valid host name, else None), and that runs the Kaitai parser only
    when something else is asked for (`cipher_suites`, `extensions`: no gateway
    addon does). Bytes sandgate's parser refuses go to mitmproxy's own, as before."""
    from mitmproxy import tls
    from mitmproxy.net import check
    from mitmproxy.proxy.layers import tls as tls_layer
    from sandgate.proxy.clienthello import server_name_and_alpn

    if getattr(tls_layer.parse_client_hello, "_sandgate", False):
        return
    kaitai_init = tls.ClientHello.__init__

    class LeanClientHello(tls.ClientHello):
        def __init__(self, raw: bytes, sni: str | None, alpn: list[bytes]):
            self._raw_bytes = raw
            self._sni = sni if sni is not None and check.is_valid_host(sni.encode()) else None
            self._alpn = alpn

        def __getattr__(self, name):
            if name != "_client_hello":
                raise AttributeError(name)
            kaitai_init(self, self._raw_bytes)  # sets _client_hello
            return self._client_hello

        @property
        def sni(self) -> str | None:
            return self._sni

        @property
        def alpn_protocols(self) -> list[bytes]:
            return list(self._alpn)

    original = tls_layer.parse_client_hello

    def parse_client_hello(data: bytes):
        message = tls_layer.get_client_hello(data)
        if not message:
            return None
        try:
            sni, alpn = server_name_and_alpn(message[4:])
        except ValueError:
            return original(data)
        return LeanClientHello(message[4:], sni, alpn)

    parse_client_hello._sandgate = True
    tls_layer.parse_client_hello = parse_client_hello
