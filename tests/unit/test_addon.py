"""The addon's hooks on mitmproxy's own test objects: decisions applied, one event
each, and every failure closed (mitmproxy would log an addon exception and go on)."""

from __future__ import annotations

import pytest
from mitmproxy import options
from mitmproxy.net.http import http1
from mitmproxy.proxy import context
from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.layers import TCPLayer
from mitmproxy.proxy.layers.modes import TransparentProxy
from mitmproxy.test import taddons, tflow
from sandgate.proxy.addon import CountingTCPLayer, RejectLayer, SandgateAddon
from support.fakes import SANDBOX, client_hello, make_gate


@pytest.fixture
def addon(tmp_path):
    gate = make_gate(tmp_path)
    a = SandgateAddon(gate)
    a.events = gate.events
    with taddons.context(a):
        yield a


def client(dst: tuple[str, int], src: str = SANDBOX):
    c = tflow.tclient_conn()
    c.peername = (src, 40000)
    c.sockname = dst
    return c


def next_layer_for(c, data: bytes) -> NextLayer:
    ctx = context.Context(c, options.Options())
    ctx.server.address = c.sockname
    ctx.layers = [TransparentProxy(ctx)]
    nl = NextLayer(ctx)
    nl.data_client = lambda: data
    return nl


def test_unknown_sandbox_is_closed_at_connect(addon):
    c = client(("203.0.113.10", 443), src="10.213.9.9")
    addon.client_connected(c)
    assert c.error
    assert addon.events[-1].reason == "unknown_sandbox"


def test_private_destination_is_closed_at_connect(addon):
    c = client(("169.254.169.254", 80))
    addon.client_connected(c)
    assert c.error
    assert (addon.events[-1].reason, addon.events[-1].rule_id) == (
        "private_address",
        "builtin:private-address",
    )


@pytest.mark.parametrize(
    "sni, dst, layer, reason",
    [
        pytest.param(
            "allowed.test", "203.0.113.10", TCPLayer, "rule_allow", id="allowed-passthrough"
        ),
        pytest.param(
            "allowed.test", "203.0.113.66", RejectLayer, "spoofed_destination", id="spoofed-sni"
        ),
        pytest.param("evil.test", "203.0.113.66", RejectLayer, "no_rule", id="unknown-name"),
    ],
)
def test_tls_decided_on_client_hello(addon, sni, dst, layer, reason):
    c = client((dst, 443))
    addon.client_connected(c)
    nl = next_layer_for(c, client_hello(sni))
    addon.next_layer(nl)
    assert isinstance(nl.layer, layer)
    assert addon.events[-1].reason == reason


def test_inspected_rule_intercepts(addon):
    c = client(("203.0.113.11", 443))
    addon.client_connected(c)
    nl = next_layer_for(c, client_hello("api.allowed.test"))
    addon.next_layer(nl)
    assert type(nl.layer).__name__ == "ServerTLSLayer"


def test_half_a_client_hello_waits(addon):
    c = client(("203.0.113.10", 443))
    addon.client_connected(c)
    nl = next_layer_for(c, client_hello("allowed.test")[:40])
    addon.next_layer(nl)
    assert nl.layer is None and not addon.events


def test_malformed_client_hello_is_denied(addon):
    c = client(("203.0.113.10", 443))
    addon.client_connected(c)
    body = b"\x03\x03" + b"\xff" * 10  # a version, then no valid random/session/ciphers
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    nl = next_layer_for(c, b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake)
    addon.next_layer(nl)
    assert isinstance(nl.layer, RejectLayer)
    assert addon.events[-1].reason == "malformed_tls"


def test_raw_tcp_named_by_dns_binding(addon):
    c = client(("203.0.113.10", 22))
    addon.client_connected(c)
    nl = next_layer_for(c, b"SSH-2.0-OpenSSH_9.2\r\n")
    addon.next_layer(nl)
    assert isinstance(nl.layer, TCPLayer)
    assert (addon.events[-1].name, addon.events[-1].rule_id) == ("ssh.allowed.test", "ssh")
    assert isinstance(nl.layer, CountingTCPLayer)


def test_non_http_on_port_80_is_denied(addon):
    c = client(("203.0.113.10", 80))
    addon.client_connected(c)
    nl = next_layer_for(c, b"\x00\x01\x02binary tunnel")
    addon.next_layer(nl)
    assert isinstance(nl.layer, RejectLayer)
    assert addon.events[-1].reason == "not_http"


def request_flow(c, host: str, method: str = "GET", path: str = "/"):
    f = tflow.tflow()
    f.client_conn = c
    f.request.method, f.request.path = method, path
    f.request.headers["host"] = host
    return f


@pytest.mark.parametrize(
    "host, method, status, reason",
    [
        pytest.param("allowed.test", "GET", None, "rule_allow", id="allowed"),
        pytest.param(
            "api.allowed.test", "GET", 403, "spoofed_destination", id="host-resolved-elsewhere"
        ),
        pytest.param("evil.test", "GET", 403, "no_rule", id="unknown-host"),
        pytest.param("203.0.113.66", "GET", 403, "host_mismatch", id="host-ip-differs"),
        pytest.param('a"b', "GET", 403, "invalid_name", id="forged-host"),
        pytest.param("a\nb", "GET", 400, "malformed_request", id="control-in-host"),
        pytest.param("allowed.test", "G T", 400, "malformed_request", id="method-not-a-token"),
    ],
)
def test_plain_http_request(addon, host, method, status, reason):
    c = client(("203.0.113.10", 80))
    addon.client_connected(c)
    addon.next_layer(next_layer_for(c, b"GET / HTTP/1.1\r\n"))
    f = request_flow(c, host, method)
    addon.requestheaders(f)
    assert (f.response.status_code if f.response else None) == status
    assert addon.events[-1].reason == reason
    if status:
        assert reason in f.response.get_text()


@pytest.mark.parametrize(
    "host, forwarded",
    [
        pytest.param("allowed.test", "allowed.test", id="as-decided"),
        pytest.param("ALLOWED.Test.", "allowed.test", id="case-and-dot"),
        pytest.param("allowed.test.:80", "allowed.test", id="dot-and-default-port"),
    ],
)
def test_an_allowed_host_goes_on_as_decided(addon, host, forwarded):
    """A Host router (HAProxy's `hdr(host) -i allowed.test`) does not match
    `allowed.test.`: the request goes on with the name decided (gate._as_decided).
    An absolute-form target goes on in origin form: its authority, as written, is not
    the name decided (Go's net/http routes by it, case-sensitive)."""
    c = client(("203.0.113.10", 80))
    addon.client_connected(c)
    addon.next_layer(next_layer_for(c, b"GET / HTTP/1.1\r\n"))
    f = request_flow(c, host)
    addon.requestheaders(f)
    assert f.response is None and addon.events[-1].reason == "rule_allow"
    assert f.request.headers["host"] == forwarded
    f = request_flow(c, host.lower())
    f.request.data.authority = host.encode()  # GET http://HOST/ HTTP/1.1, Host in lower case
    addon.requestheaders(f)
    assert f.response is None
    assert (f.request.headers["host"], f.request.data.authority) == (forwarded, b"")
    assert bytes(http1.assemble_request_head(f.request)).startswith(b"GET / HTTP/1.1\r\n")


def test_every_hook_fails_closed(addon, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(addon.gate, "_decide_connect", boom)
    monkeypatch.setattr(addon.gate, "_decide_request", boom)
    c = client(("203.0.113.10", 443))
    addon.client_connected(c)
    assert c.error and addon.events[-1].reason == "internal_error"

    monkeypatch.undo()
    c = client(("203.0.113.10", 443))
    addon.client_connected(c)
    monkeypatch.setattr(addon.gate, "_decide_connect", boom)
    nl = next_layer_for(c, client_hello("allowed.test"))
    addon.next_layer(nl)
    assert isinstance(nl.layer, RejectLayer) and addon.events[-1].reason == "internal_error"

    monkeypatch.setattr(addon.gate, "_decide_request", boom)
    f = request_flow(c, "allowed.test")
    addon.requestheaders(f)
    assert f.response.status_code == 403 and addon.events[-1].reason == "internal_error"


def test_connection_closed_before_any_byte_still_has_its_event(addon):
    c = client(("203.0.113.66", 25))
    addon.client_connected(c)
    addon.next_layer(next_layer_for(c, b""))
    addon.client_disconnected(c)
    assert [(e.reason, e.dst_port) for e in addon.events] == [("no_data", 25)]


def test_allowed_connection_end_reports_bytes_and_duration(addon):
    c = client(("203.0.113.10", 443))
    addon.client_connected(c)
    hello = client_hello("allowed.test")
    nl = next_layer_for(c, hello)
    addon.next_layer(nl)
    state = addon.connections[c.id]
    state.bytes_up, state.bytes_down = len(hello), 5000  # as the relay would count them
    addon.client_disconnected(c)
    end = addon.events[-1]
    assert (end.kind, end.verdict, end.rule_id, end.name) == (
        "connection_end",
        "allow",
        "allowed",
        "allowed.test",
    )
    assert (end.bytes_up, end.bytes_down) == (len(hello), 5000) and end.duration >= 0


@pytest.mark.parametrize(
    "dst, first_bytes, layer",
    [
        pytest.param(
            ("203.0.113.11", 443),
            client_hello("api.allowed.test"),
            "ServerTLSLayer",
            id="inspected-tls",
        ),
        pytest.param(
            ("203.0.113.10", 80), b"GET / HTTP/1.1\r\n", "HeadLimitedHttpLayer", id="plain-http"
        ),
    ],
)
def test_a_connection_the_front_door_decided_is_adopted_not_decided_again(
    addon, dst, first_bytes, layer
):
    gate = addon.gate
    state = gate.on_connect((SANDBOX, 40000), SANDBOX, 40000, *dst)
    gate.on_first_bytes(state, first_bytes)
    decided = list(addon.events)
    gate.hand_off(state)
    c = client(dst)  # what mitmproxy sees of the same socket
    addon.client_connected(c)
    assert not c.error and addon.connections == {c.id: state}
    nl = next_layer_for(c, first_bytes)
    addon.next_layer(nl)
    assert type(nl.layer).__name__ == layer
    assert addon.events == decided  # no second decision, no second event


def plain_http_flow(addon, host="allowed.test", **headers):
    c = client(("203.0.113.10", 80))
    addon.client_connected(c)
    addon.next_layer(next_layer_for(c, b"GET / HTTP/1.1\r\n"))
    f = request_flow(c, host)
    for name, value in headers.items():
        f.request.headers[name.replace("_", "-")] = value
    return f


def test_an_upgrade_no_rule_allows_is_removed_with_its_connection_tokens(addon):
    f = plain_http_flow(addon, upgrade="h2c, foo", connection="keep-alive, Upgrade, HTTP2-Settings")
    f.request.headers["http2-settings"] = "AAMAAABkAARAAAAAAAIAAAAA"
    addon.requestheaders(f)
    assert f.response is None and addon.events[-1].reason == "rule_allow"
    assert "upgrade" not in f.request.headers and "http2-settings" not in f.request.headers
    assert f.request.headers["connection"] == "keep-alive"


def test_a_101_nobody_allowed_is_cut_and_reported(addon):
    f = plain_http_flow(addon)
    addon.requestheaders(f)
    f.response = tflow.tresp(status_code=101)
    addon.responseheaders(f)
    assert f.error is not None and "killed" in f.error.msg.lower()  # no tunnel follows
    assert [(str(e.kind), str(e.reason)) for e in addon.events[-2:]] == [
        ("request", "rule_allow"),
        ("request", "protocol_not_allowed"),
    ]


def test_a_client_refusing_the_gateways_certificate_has_its_own_event(addon):
    from mitmproxy import tls

    c = client(("203.0.113.11", 443))
    addon.client_connected(c)
    addon.next_layer(next_layer_for(c, client_hello("api.allowed.test")))
    c.error = "Client TLS handshake failed. The client does not trust the proxy's certificate"
    addon.tls_failed_client(tls.TlsData(c, context.Context(c, options.Options())))
    assert (str(addon.events[-1].reason), addon.events[-1].name) == (
        "tls_rejected_by_client",
        "api.allowed.test",
    )


# --- interim responses from the upstream (FinalResponseBuffer) ---------------------------


def test_the_upstream_reader_gets_only_final_response_heads():
    """mitmproxy's Http1Client took a 103 or an unasked 100 for the response (its
    client then waited for a final one forever): those heads are dropped, a 101 and
    final heads are read as they are, and a head still arriving is waited for."""
    from sandgate.proxy.addon import FinalResponseBuffer

    buf = FinalResponseBuffer()
    buf += b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 3
    buf += b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert [bytes(line) for line in buf.maybe_extract_lines()] == [
        b"HTTP/1.1 200 OK",
        b"Content-Length: 2",
    ]
    assert bytes(buf) == b"ok"

    switching = FinalResponseBuffer()
    switching += b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"
    assert bytes(switching.maybe_extract_lines()[0]) == b"HTTP/1.1 101 Switching Protocols"

    partial = FinalResponseBuffer()
    partial += b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\n"
    assert partial.maybe_extract_lines() is None
    partial += b"\r\n"
    assert [bytes(line) for line in partial.maybe_extract_lines()] == [b"HTTP/1.1 200 OK"]
