"""mitmproxy's HTTP/2 send buffers bounded per connection
(lean_mitmproxy.bound_h2_send_buffers): a client that never opens its flow-control
window cannot make the worker hold the whole download."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
from sandgate.proxy.lean_mitmproxy import (
    ENHANCE_YOUR_CALM,
    MAX_H2_BUFFERED,
    bound_h2_send_buffers,
)

PIECE = b"x" * 65536


def connected(client_window: int):
    """A mitmproxy server-side connection and an h2 client whose streams' initial
    window is `client_window`, with one request (stream 1) open."""
    from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

    server = BufferedH2Connection(h2.config.H2Configuration(client_side=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window}
    )
    client.initiate_connection()
    client.send_headers(
        1,
        [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a.test")],
        end_stream=True,
    )
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    return server, client


def buffered(server) -> int:
    return sum(len(c.data) for queue in server.stream_buffers.values() for c in queue)


def test_a_client_that_never_opens_its_window_gets_a_reset_not_a_buffer():
    bound_h2_send_buffers()
    server, client = connected(client_window=0)
    for _ in range(3 * MAX_H2_BUFFERED // len(PIECE)):
        if not server.streams[1].closed:  # as the layer checks (is_open_for_us)
            server.send_data(1, PIECE)
    assert buffered(server) <= MAX_H2_BUFFERED
    events = client.receive_data(server.data_to_send())
    resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(1, ENHANCE_YOUR_CALM)]
    # ... and its layer is told, as of a client's reset, so the upstream is closed
    # (the wrapped Http2Connection._handle_event reads and empties this set).
    assert server.sandgate_calmed == {1}


def test_a_big_write_split_into_frames_stops_at_the_reset():
    bound_h2_send_buffers()
    server, _ = connected(client_window=0)
    server.send_data(1, b"y" * (MAX_H2_BUFFERED + 5 * 65536))  # no StreamClosedError
    assert server.streams[1].closed
    assert buffered(server) == 0


def test_a_client_that_reads_gets_everything():
    bound_h2_send_buffers()
    server, client = connected(client_window=65535)
    got = 0

    def read():
        nonlocal got
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                got += len(event.data)
                client.acknowledge_received_data(event.flow_controlled_length, 1)

    for _ in range(2 * MAX_H2_BUFFERED // len(PIECE)):
        server.send_data(1, PIECE)
        for _ in range(100):  # the client reads and opens its window until all is sent
            read()
            server.receive_data(client.data_to_send())
            if not buffered(server):
                break
    read()
    assert not server.streams[1].closed
    assert got == 2 * MAX_H2_BUFFERED


def test_the_layer_is_told_of_the_reset_as_of_a_clients_own():
    from mitmproxy.proxy.layers.http._base import ReceiveHttp
    from mitmproxy.proxy.layers.http._events import RequestProtocolError
    from mitmproxy.proxy.layers.http._http2 import Http2Connection

    bound_h2_send_buffers()
    server, _ = connected(client_window=0)
    server.send_data(1, b"y" * (MAX_H2_BUFFERED + 65536))

    class Layer:  # what the wrapper reads of Http2Server, after mitmproxy's own handling
        h2_conn, streams, ReceiveProtocolError = server, {1: "stream"}, RequestProtocolError

    told = list(Http2Connection._handle_event.tell(Layer()))
    assert [type(c) for c in told] == [ReceiveHttp]
    assert told[0].event.stream_id == 1 and isinstance(told[0].event, RequestProtocolError)
    assert Layer.streams == {} and not server.sandgate_calmed
    assert list(Http2Connection._handle_event.tell(Layer())) == []  # once
