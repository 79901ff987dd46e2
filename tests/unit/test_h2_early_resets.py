"""HTTP/2 rapid reset and MadeYouReset bounded per connection
(lean_mitmproxy.bound_h2_early_resets), and control frames and header blocks
(bound_h2_control_frames): mitmproxy's Http2Server, fed a client's frames, closes the
connection with GOAWAY ENHANCE_YOUR_CALM past each budget."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import pytest
from sandgate.proxy.lean_mitmproxy import (
    ENHANCE_YOUR_CALM,
    H2_CLOSED,
    MAX_H2_CONTROL_BURST,
    MAX_H2_EARLY_RESETS,
    MAX_H2_HEADER_BLOCK,
    bound_h2_control_frames,
    bound_h2_early_resets,
)

REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a.test")]


@pytest.fixture
def server():
    """An Http2Server layer (patched by bound_h2_early_resets and
    bound_h2_control_frames), its client and a function feeding it bytes, returning its
    commands."""
    bound_h2_early_resets()
    bound_h2_control_frames()
    from mitmproxy import connection, options
    from mitmproxy.addons import proxyserver
    from mitmproxy.proxy import context, events
    from mitmproxy.proxy.layers.http._http2 import Http2Server
    from mitmproxy.test import taddons

    with taddons.context(proxyserver.Proxyserver(), options=options.Options()) as tctx:
        client = connection.Client(
            peername=("10.0.0.2", 5000), sockname=("203.0.113.10", 443), timestamp_start=0
        )
        layer = Http2Server(context.Context(client, tctx.options))
        list(layer.handle_event(events.Start()))
        yield (
            layer,
            client,
            lambda data: list(layer.handle_event(events.DataReceived(client, data))),
        )


def peer() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def sent_frames(commands) -> list:
    """The frames the layer sent, parsed one by one (no h2 state machine: a RST_STREAM
    for a stream the reader never opened is still read)."""
    from hyperframe.frame import Frame
    from mitmproxy.proxy.commands import SendData

    sent = b"".join(c.data for c in commands if isinstance(c, SendData))
    found = []
    while len(sent) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(sent[:9]))
        frame.parse_body(memoryview(sent[9 : 9 + length]))
        found.append(frame)
        sent = sent[9 + length :]
    return found


def goaways(commands) -> list[int]:
    return [f.error_code for f in sent_frames(commands) if type(f).__name__ == "GoAwayFrame"]


def requests_and_resets(conn, streams: int, reset: bool) -> bytes:
    for i in range(streams):
        stream = 2 * i + 1
        conn.send_headers(stream, REQUEST, end_stream=True)
        if reset:
            conn.reset_stream(stream, 8)  # CANCEL
    return conn.data_to_send()


def test_rapid_reset_past_the_budget_gets_goaway_enhance_your_calm(server):
    layer, client, feed = server
    commands = feed(requests_and_resets(peer(), 3 * MAX_H2_EARLY_RESETS, reset=True))
    assert goaways(commands) == [ENHANCE_YOUR_CALM]
    assert getattr(client, H2_CLOSED).rule == "rapid-reset"
    assert layer.sandgate_resets == MAX_H2_EARLY_RESETS + 1
    # The layer stopped at the budget: the rest of the streams never became requests.
    assert layer.sandgate_opened == MAX_H2_EARLY_RESETS + 1


def test_resets_within_the_budget_keep_the_connection(server):
    _, client, feed = server
    commands = feed(requests_and_resets(peer(), MAX_H2_EARLY_RESETS, reset=True))
    assert goaways(commands) == []
    assert getattr(client, H2_CLOSED, None) is None


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags, *struct.pack(">I", stream)])
        + payload
    )


def data_after_end(stream: int) -> bytes:
    return frame(0, 1, stream, b"x")  # DATA, END_STREAM, on a stream half-closed (remote)


def headers_after_end(stream: int) -> bytes:
    return frame(1, 5, stream, b"\x82")  # HEADERS again after END_STREAM


def window_overflow(stream: int) -> bytes:
    return frame(8, 0, stream, struct.pack(">I", 2**31 - 1))  # WINDOW_UPDATE past 2^31-1


@pytest.mark.parametrize(
    "provoke",
    [
        pytest.param(data_after_end, id="data-after-end-stream"),
        pytest.param(headers_after_end, id="headers-after-end-stream"),
        pytest.param(window_overflow, id="window-update-overflow"),
    ],
)
def test_resets_the_gateway_makes_for_the_client_count_as_its_resets(server, provoke):
    """MadeYouReset (CVE-2025-8671): the client never sends RST_STREAM, h2 resets each
    stream after its request was decided; past the budget the connection goes."""
    layer, client, feed = server
    conn = peer()
    sent = conn.data_to_send()
    for i in range(3 * MAX_H2_EARLY_RESETS):
        conn.send_headers(2 * i + 1, REQUEST, end_stream=True)
        sent += conn.data_to_send() + provoke(2 * i + 1)
    commands = feed(sent)
    assert goaways(commands) == [ENHANCE_YOUR_CALM]
    flood = getattr(client, H2_CLOSED)
    assert flood.rule == "rapid-reset" and "MadeYouReset" in flood.detail
    assert layer.sandgate_made_resets == MAX_H2_EARLY_RESETS + 1
    assert layer.sandgate_opened == MAX_H2_EARLY_RESETS + 1


@pytest.mark.parametrize(
    "control",
    [
        pytest.param(frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64"), id="settings"),
        pytest.param(frame(6, 0, 0, b"12345678"), id="ping"),
        pytest.param(frame(2, 0, 3, struct.pack(">I", 1) + b"\x10"), id="priority"),
        pytest.param(frame(0, 0, 1, b""), id="empty-data"),
    ],
)
def test_control_frames_past_the_burst_get_goaway_and_the_rest_unread(server, control):
    _, client, feed = server
    conn = peer()
    conn.send_headers(1, REQUEST, end_stream=False)  # empty DATA needs an open stream
    commands = feed(conn.data_to_send() + control * (20 * MAX_H2_CONTROL_BURST))
    assert goaways(commands)[0] == ENHANCE_YOUR_CALM
    assert getattr(client, H2_CLOSED).rule == "control-frame-flood"
    # At most the burst was answered: the ACKs of the rest were never made.
    acks = sum(_acks(commands))
    assert acks <= MAX_H2_CONTROL_BURST + 2 * 10, acks


def test_control_frames_within_the_burst_keep_the_connection(server):
    _, client, feed = server
    commands = feed(
        peer().data_to_send() + frame(6, 0, 0, b"12345678") * (MAX_H2_CONTROL_BURST // 2)
    )
    assert goaways(commands) == []
    assert getattr(client, H2_CLOSED, None) is None


@pytest.mark.parametrize(
    ("fragment", "frames"),
    [
        pytest.param(b"", 10_000, id="empty-continuations"),
        pytest.param(b"\x40\x01x\x10" + b"v" * 16000, 60, id="big-continuations"),
    ],
)
def test_a_header_block_past_the_head_limit_closes_the_connection(server, fragment, frames):
    layer, client, feed = server
    head = frame(1, 0, 1, b"\x82\x87\x84\x01\x06a.test")  # HEADERS without END_HEADERS
    commands = feed(peer().data_to_send() + head + frame(9, 0, 1, fragment) * frames)
    assert goaways(commands)[0] in (ENHANCE_YOUR_CALM, 1)  # h2's own backlog: PROTOCOL_ERROR
    assert getattr(layer, "sandgate_opened", 0) == 0
    if fragment:
        assert getattr(client, H2_CLOSED).rule == "headers-too-large"
        assert len(fragment) * frames > MAX_H2_HEADER_BLOCK


def test_a_header_block_within_the_head_limit_is_a_request(server):
    layer, client, feed = server
    conn = peer()
    conn.send_headers(1, [*REQUEST, ("x-big", "v" * 30_000)], end_stream=True)
    commands = feed(conn.data_to_send())
    assert goaways(commands) == []
    assert layer.sandgate_opened == 1


def _acks(commands):
    for f in sent_frames(commands):
        yield type(f).__name__ in ("PingFrame", "SettingsFrame") and "ACK" in f.flags
