"""HTTP/2 rapid reset bounded per connection (lean_mitmproxy.bound_h2_early_resets):
mitmproxy's Http2Server, fed a client's frames, closes the connection with GOAWAY
ENHANCE_YOUR_CALM past the budget of streams reset before their response ended."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from sandgate.proxy.lean_mitmproxy import (
    ENHANCE_YOUR_CALM,
    H2_RESET_FLOOD,
    MAX_H2_EARLY_RESETS,
    bound_h2_early_resets,
)

REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a.test")]


@pytest.fixture
def server():
    """An Http2Server layer (patched by bound_h2_early_resets alone), its client and a
    function feeding it bytes, returning its commands."""
    bound_h2_early_resets()
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


def goaways(commands) -> list[int]:
    from mitmproxy.proxy.commands import SendData

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    sent = b"".join(c.data for c in commands if isinstance(c, SendData))
    return [
        e.error_code
        for e in client.receive_data(sent)
        if isinstance(e, h2.events.ConnectionTerminated)
    ]


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
    assert getattr(client, H2_RESET_FLOOD) == MAX_H2_EARLY_RESETS + 1
    # The layer stopped at the budget: the rest of the streams never became requests.
    assert layer.sandgate_opened == MAX_H2_EARLY_RESETS + 1


def test_resets_within_the_budget_keep_the_connection(server):
    _, client, feed = server
    commands = feed(requests_and_resets(peer(), MAX_H2_EARLY_RESETS, reset=True))
    assert goaways(commands) == []
    assert getattr(client, H2_RESET_FLOOD, None) is None
