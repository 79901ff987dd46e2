"""The front door's own plain-HTTP/1 path (proxy/frontdoor/http1.py): the sans-io
session against the real gate, byte transcripts in and out, then the whole path on
loopback (http1_relay.py in the front door, mitmproxy never asked)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from sandgate.proxy.frontdoor import http1
from sandgate.proxy.frontdoor.http1 import (
    Http1Session,
    needs_engine,
    origin_form,
    read_head_leniently,
)
from sandgate.proxy.frontdoor.http1_relay import Http1Relay
from sandgate.proxy.frontdoor.relay import RELAY_CHUNK, WAKEUP_BUDGET
from sandgate.proxy.policy import load_policy
from support.fakes import make_gate
from test_frontdoor import LOOPBACK, Upstream, read_all, run, started, until

ALLOWED = ("203.0.113.10", 80)
H = b"Host: allowed.test\r\n"


@pytest.fixture
def gate(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK)
    yield gate
    assert (gate.counts.open, gate.counts.pending) == (0, 0)


def session_for(gate, dst=ALLOWED, fast=True) -> Http1Session:
    state = gate.on_connect("c1", LOOPBACK, 40000, *dst)
    assert state is not None
    outcome = gate.on_first_bytes(state, b"GET / HTTP/1.1\r\n")
    assert outcome.value == "http"
    return Http1Session(gate, state, fast=fast)


def requests(gate) -> list[tuple]:
    return [
        (e.verdict.value, e.reason.value, e.name, e.path)
        for e in gate.events
        if e.kind.value == "request"
    ]


def close(gate, session):
    gate.on_close(session.state, session.problem)


def answer(session) -> bytes:
    out = bytes(session.to_client)
    session.to_client.clear()
    return out


# --- sans-io: requests --------------------------------------------------------------------


def test_an_allowed_request_goes_upstream_re_serialised_and_the_response_back(gate):
    s = session_for(gate)
    s.client_data(b"GET http://allowed.test/a?b=1 HTTP/1.1\r\n" + H + b"X-One:  1 \r\n\r\n")
    assert s.need_upstream and not s.to_client
    s.upstream_connected()
    # origin-form, h11's serialisation, the fields as sent (values without padding)
    assert bytes(s.to_upstream) == b"GET /a?b=1 HTTP/1.1\r\nHost: allowed.test\r\nX-One: 1\r\n\r\n"
    s.to_upstream.clear()
    s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert answer(s) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert requests(gate) == [("allow", "rule_allow", "allowed.test", "http://allowed.test/a?b=1")]
    assert not s.closing
    close(gate, s)


def test_every_request_on_a_keep_alive_connection_is_decided_and_a_forbidden_one_never_sent(gate):
    s = session_for(gate)
    s.client_data(b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    s.upstream_connected()
    first = bytes(s.to_upstream)
    s.to_upstream.clear()
    assert first.startswith(b"GET /1 ") and b"/2" not in first  # the second waits (h11 pauses)
    s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    out = answer(s)
    assert out.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 403 Forbidden" in out
    assert b"Blocked by sandgate: spoofed_destination" in out or b"no_rule" in out
    assert not s.to_upstream and s.closing
    assert [r[:2] for r in requests(gate)][0] == ("allow", "rule_allow")
    assert requests(gate)[1][0] == "deny" and requests(gate)[1][3] == "/2"
    close(gate, s)


def test_connection_close_is_the_clients_alone_and_the_idle_upstream_can_serve_again(gate):
    s = session_for(gate)
    s.client_data(b"GET /a HTTP/1.1\r\n" + H + b"Connection: close, X-Trace\r\nX-Trace: 1\r\n\r\n")
    s.upstream_connected()
    # hop by hop: the client's `close` stays on its own connection
    assert bytes(s.to_upstream) == (
        b"GET /a HTTP/1.1\r\nHost: allowed.test\r\nConnection: X-Trace\r\nX-Trace: 1\r\n\r\n"
    )
    s.to_upstream.clear()
    assert not s.upstream_idle  # waiting for the response
    s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert answer(s).startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n")
    assert s.closing and s.problem is None and s.upstream_idle
    close(gate, s)


@pytest.mark.parametrize(
    ("request_head", "response", "said_all"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", b"", True, id="client-close"),
        pytest.param(b"GET / HTTP/1.0\r\n" + H + b"\r\n", b"", True, id="http-1.0"),
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"\r\n", b"Connection: close\r\n", False, id="server-close"),
    ],
)  # fmt: skip
def test_a_client_that_said_all_it_sends_is_closed_without_draining(
    gate, request_head, response, said_all
):
    """The relay spares the drain (a recv) only where the client itself said it sends
    nothing more; a keep-alive client whose server closed may have sent more, and a
    close with unread bytes would reset the response it has not read yet."""
    s = session_for(gate)
    s.client_data(request_head)
    s.upstream_connected()
    s.upstream_data(b"HTTP/1.1 200 OK\r\n" + response + b"Content-Length: 2\r\n\r\nok")
    assert s.closing and s.problem is None
    assert s.client_said_all is said_all
    close(gate, s)


def test_a_client_refused_mid_body_is_drained(gate):
    s = session_for(gate)
    s.client_data(
        b"POST / HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\nContent-Length: 9\r\n\r\nbo"
    )
    assert s.closing and answer(s).startswith(b"HTTP/1.1 403")
    assert not s.client_said_all  # the rest of its body may be on its way
    close(gate, s)


@pytest.mark.parametrize(
    "upstream_says",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", id="close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK", id="bytes-after"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\nbody until EOF", id="close-delimited"),
    ],
)  # fmt: skip
def test_an_upstream_that_closes_or_says_more_is_not_kept(gate, upstream_says):
    s = session_for(gate)
    s.client_data(b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    s.upstream_connected()
    s.upstream_data(upstream_says)
    assert not s.upstream_idle
    close(gate, s)


def test_a_reused_upstream_that_closes_unanswered_gets_the_request_again_on_a_new_one(gate):
    s = session_for(gate)
    s.client_data(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
    s.upstream_connected(reused=True)
    sent = bytes(s.to_upstream)
    s.to_upstream.clear()
    s.upstream_data(b"")  # the server had closed it as it was taken
    assert s.drop_upstream and s.need_upstream and not s.may_reuse and not s.closing
    s.drop_upstream = False
    s.upstream_connected()
    assert bytes(s.to_upstream) == sent  # the same request, once more
    s.to_upstream.clear()
    s.upstream_data(b"")  # a new connection that fails too: no second try
    assert s.closing and answer(s).startswith(b"HTTP/1.1 502 ")
    assert [r[0] for r in requests(gate)] == ["allow"]  # one request, one decision
    close(gate, s)


@pytest.mark.parametrize(
    "why",
    [
        pytest.param("body", id="a-body-is-not-kept"),
        pytest.param("answered", id="after-a-byte-of-the-answer"),
        pytest.param("new", id="a-new-connection"),
        pytest.param("post", id="not-idempotent"),
    ],
)
def test_requests_are_not_sent_again_unless_safe(gate, why):
    s = session_for(gate)
    body = why == "body"
    method = b"POST" if why in ("body", "post") else b"GET"
    s.client_data(
        method + b" /a HTTP/1.1\r\n" + H + (b"Content-Length: 2\r\n\r\nab" if body else b"\r\n")
    )
    s.upstream_connected(reused=why != "new")
    if why == "answered":
        s.upstream_data(b"HTTP/1.1 200")
    s.upstream_data(b"")
    assert s.closing and not s.need_upstream
    assert answer(s).startswith(b"HTTP/1.1 502 ")
    close(gate, s)


def test_a_reset_of_a_reused_upstream_before_any_answer_is_retried_and_otherwise_passed_on(gate):
    s = session_for(gate)
    s.client_data(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    s.upstream_connected(reused=True)
    s.upstream_lost("the upstream reset the connection")
    assert s.need_upstream and not s.closing
    s.upstream_connected()
    s.upstream_lost("the upstream reset the connection")
    assert s.closing and s.reset and s.problem == "the upstream reset the connection"
    close(gate, s)


@pytest.mark.parametrize(
    "head, status, reason",
    [
        pytest.param(b"GET /a HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400, "malformed_request", id="nul"),
        pytest.param(b"GET /b HTTP/1.1\r\n" + H + b"X: a\r\n GET /s HTTP/1.1\r\n\r\n", 400, "malformed_request", id="obs-fold"),
        pytest.param(b"POST /len HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n", 400, "malformed_request", id="bad-length"),
        pytest.param(b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400, "malformed_request", id="tab-in-line"),
        pytest.param(b"GET /public/../x HTTP/1.1\r\n" + H + b"\r\n", 400, "ambiguous_path", id="dots"),
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"Host: evil.test\r\n\r\n", 403, "host_mismatch", id="two-hosts"),
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "malformed_request", id="cl-and-te"),
        pytest.param(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431, "headers_too_large", id="fields"),
    ],
)  # fmt: skip
def test_refused_heads_get_their_status_and_event_and_nothing_goes_upstream(
    gate, head, status, reason
):
    s = session_for(gate)
    s.client_data(head)
    out = answer(s)
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert b"Blocked by sandgate: " + reason.encode() in out
    assert s.closing and not s.need_upstream and not s.to_upstream
    assert [(r[0], r[1]) for r in requests(gate)] == [("deny", reason)]
    close(gate, s)


def test_a_head_that_does_not_read_as_a_request_gets_400_and_a_connection_event(gate):
    s = session_for(gate)
    s.client_data(b"GET / HTTP/1.1\r\n" + H + b"no colon here\r\n\r\n")
    assert answer(s).startswith(b"HTTP/1.1 400 ")
    assert requests(gate) == [] and s.closing
    s.state.bytes_up = 10
    close(gate, s)
    assert [(e.kind.value, e.reason.value) for e in gate.events] == [
        ("connection", "malformed_request")
    ]


def test_an_unfinished_head_past_64_kib_is_cut_with_431_before_it_ends(gate):
    s = session_for(gate)
    s.client_data(b"GET /big HTTP/1.1\r\n" + H + b"X-Big: ")
    for _ in range(5):
        s.client_data(b"a" * 16384)
    assert answer(s).startswith(b"HTTP/1.1 431 ")
    assert requests(gate) == [("deny", "headers_too_large", None, "/big")]
    assert s.closing and not s.need_upstream
    close(gate, s)


def test_h2c_upgrades_are_removed_before_forwarding(gate):
    s = session_for(gate)
    s.client_data(
        b"GET / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings, x\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    s.upstream_connected()
    sent = bytes(s.to_upstream).lower()
    assert b"upgrade" not in sent.replace(b"connection: x", b"") and b"http2-settings" not in sent
    assert b"connection: x\r\n" in sent
    close(gate, s)


# --- sans-io: responses and bodies -------------------------------------------------------


def test_bodies_stream_in_pieces_and_chunked_responses_reach_http_1_0_clients_close_delimited(gate):
    s = session_for(gate)
    octets = b"Content-Type: application/octet-stream\r\n"  # (a form's end is held: below)
    s.client_data(b"POST /up HTTP/1.0\r\n" + H + octets + b"Content-Length: 6\r\n\r\nabc")
    s.upstream_connected()
    assert bytes(s.to_upstream).endswith(b"\r\n\r\nabc")
    s.to_upstream.clear()
    s.client_data(b"def")
    assert bytes(s.to_upstream) == b"def"
    s.upstream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n")
    out = answer(s)
    assert out.endswith(b"\r\n\r\nxyz") and b"chunked" not in out.lower()
    s.upstream_data(b"0\r\n\r\n")
    assert s.closing and s.problem is None  # HTTP/1.0: the end is the close
    close(gate, s)


FORM_RULES = """\
version: 1
profiles:
  default:
    rules:
      - allow: allowed.test
        methods: [GET, POST]
        id: get-and-post
"""
FORM = H + b"Content-Type: application/x-www-form-urlencoded\r\n"


def test_a_form_body_of_a_declared_length_goes_upstream_with_its_request_once_read(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK, rules=FORM_RULES)
    s = session_for(gate)
    s.client_data(b"POST /items/1 HTTP/1.1\r\n" + FORM + b"Content-Length: 20\r\n\r\na=1&_met")
    s.upstream_connected()
    assert s.need_upstream is False and not s.to_upstream  # connected, nothing sent yet
    s.client_data(b"hod=GET&")  # GET is allowed here: the override passes
    assert not s.to_upstream
    s.client_data(b"b=22")  # the end: the request goes on, whole
    assert bytes(s.to_upstream).endswith(b"\r\n\r\na=1&_method=GET&b=22")
    assert [r[:2] for r in requests(gate)] == [("allow", "rule_allow")]
    close(gate, s)


def test_a_form_body_overriding_a_method_not_allowed_is_refused_and_never_sent(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK, rules=FORM_RULES)
    s = session_for(gate)
    body = b"a=1&_method=DELETE"
    head = b"POST /items/1 HTTP/1.1\r\n" + FORM + b"Content-Length: %d\r\n\r\n" % len(body)
    s.client_data(head + body[:10])
    s.upstream_connected()
    s.client_data(body[10:])
    assert not s.to_upstream and not s.drop_upstream and s.closing
    assert s.upstream_idle  # nothing was sent on it: it may serve another connection
    assert answer(s).startswith(b"HTTP/1.1 400 ")
    assert requests(gate) == [
        ("allow", "rule_allow", "allowed.test", "/items/1"),
        ("deny", "ambiguous_method", "allowed.test", "/items/1"),
    ]
    close(gate, s)


def test_a_client_that_waits_to_send_a_kept_form_is_told_to_go_on(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK, rules=FORM_RULES)
    s = session_for(gate)
    expect = b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    s.client_data(b"POST /items/1 HTTP/1.1\r\n" + FORM + expect)
    assert answer(s) == b"HTTP/1.1 100 \r\n\r\n"  # the server has nothing yet to say it
    s.upstream_connected()
    s.client_data(b"a=1")
    assert bytes(s.to_upstream).endswith(b"\r\n\r\na=1")
    s.upstream_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert answer(s).endswith(b"\r\n\r\nok")
    close(gate, s)


def test_a_long_form_body_goes_on_but_its_last_byte_and_is_cut_with_a_reset(tmp_path, monkeypatch):
    monkeypatch.setattr(http1, "WHOLE_FORM", 8)
    gate = make_gate(tmp_path, sandbox=LOOPBACK, rules=FORM_RULES)
    s = session_for(gate)
    s.client_data(b"POST /items/1 HTTP/1.1\r\n" + FORM + b"Content-Length: 24\r\n\r\nx=1&_met")
    s.upstream_connected()
    # No `method` in it yet: nothing in it can name an override, and all of it goes on.
    assert bytes(s.to_upstream).endswith(b"\r\n\r\nx=1&_met")
    s.to_upstream.clear()
    s.client_data(b"hod=DELETE")  # (its value may go on: not read to its end yet)
    assert bytes(s.to_upstream) == b"hod=DELET"  # it may name one: its last byte held
    s.to_upstream.clear()
    s.client_data(b"&y=22")  # read: refused before the body's end went on
    assert not s.to_upstream and s.drop_upstream and s.reset_upstream and s.closing
    assert answer(s).startswith(b"HTTP/1.1 400 ")
    close(gate, s)


def test_a_chunked_form_body_ends_only_once_it_is_read(tmp_path):
    gate = make_gate(tmp_path, sandbox=LOOPBACK, rules=FORM_RULES)
    s = session_for(gate)
    chunked = b"Transfer-Encoding: chunked\r\n\r\n"
    s.client_data(b"POST /items/1 HTTP/1.1\r\n" + FORM + chunked + b"9\r\n_method=P\r\n")
    s.upstream_connected()
    assert bytes(s.to_upstream).endswith(b"\r\n\r\n8\r\n_method=\r\n")
    s.to_upstream.clear()
    s.client_data(b"3\r\nOST\r\n0\r\n\r\n")  # POST: no override
    assert bytes(s.to_upstream) == b"3\r\nPOS\r\n1\r\nT\r\n0\r\n\r\n"
    close(gate, s)


def test_a_body_read_is_owed_as_it_is_only_where_nothing_is_owed_before_it(gate):
    """The relay hands each read over as a bytearray of its own (Http1Relay._read);
    the session keeps it as what it owes the client only when it owes nothing yet,
    and otherwise adds it after what it owes: bytes the client has not had yet are
    never dropped or reordered, and a read the session keeps is not copied."""
    s = session_for(gate)
    s.client_data(b"GET /big HTTP/1.1\r\n" + H + b"\r\n")
    s.upstream_connected()
    s.to_upstream.clear()
    s.upstream_data(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nab"))
    assert answer(s) == b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nab"
    first = bytearray(b"cde")
    s.upstream_data(first)
    assert s.to_client is first  # nothing owed before it: kept, not copied
    s.upstream_data(bytearray(b"fgh"))  # the client has not taken "cde" yet
    assert bytes(s.to_client) == b"cdefgh" and bytes(first) == b"cdefgh"
    del s.to_client[:4]  # what a short send takes
    s.upstream_data(bytearray(b"ijkl"))
    assert answer(s) == b"ghijkl" and s.response_done
    close(gate, s)


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", id="fields"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, id="unfinished"),
    ],
)  # fmt: skip
def test_a_response_head_over_the_limits_is_cut_with_502_and_an_event(gate, response):
    s = session_for(gate)
    s.client_data(b"GET /r HTTP/1.1\r\n" + H + b"\r\n")
    s.upstream_connected()
    s.upstream_data(response)
    out = answer(s)
    assert out.startswith(b"HTTP/1.1 502 ") and b"X-1" not in out
    assert [(r[0], r[1]) for r in requests(gate)] == [
        ("allow", "rule_allow"),
        ("deny", "headers_too_large"),
    ]
    close(gate, s)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "upgrade", [b"", b"Upgrade: h2c\r\nConnection: upgrade\r\n"], ids=["unasked", "stripped"]
)
def test_a_101_is_never_passed_on_and_has_its_own_event(gate, fast, upgrade):
    """No request forwarded here proposes an upgrade, so h11 refuses every 101; that
    refusal is the switch's own event (protocol_not_allowed), not a parse failure."""
    s = session_for(gate, fast=fast)
    s.client_data(b"GET /ws HTTP/1.1\r\n" + H + upgrade + b"\r\n")
    s.upstream_connected()
    assert b"upgrade" not in bytes(s.to_upstream).lower()
    s.upstream_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    out = answer(s)
    assert out.startswith(b"HTTP/1.1 502 ") and b"switched protocols" in out, out
    assert b"101" not in out and s.closing
    assert [(r[0], r[1]) for r in requests(gate)] == [
        ("allow", "rule_allow"),
        ("deny", "protocol_not_allowed"),
    ]
    close(gate, s)


def test_an_unreachable_upstream_answers_502(gate):
    s = session_for(gate)
    s.client_data(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    s.upstream_failed("Connection refused")
    assert answer(s).startswith(b"HTTP/1.1 502 ") and s.closing
    close(gate, s)
    end = [e for e in gate.events if e.kind.value == "connection_end"]
    assert end and "upstream connect failed: Connection refused" in end[0].detail


# --- pure helpers --------------------------------------------------------------------------


def test_lenient_reading_and_origin_form():
    head = read_head_leniently(b"GET\t\t/ HTTP/1.1\r\nX: a\r\n b\r\nHost:  h ")
    assert head.method == b"GET" and head.target == b"/"
    assert head.fields == ((b"X", b"a\r\n b"), (b"Host", b"h"))
    assert read_head_leniently(b"GET / HTTP/1.1\r\nno colon") is None
    assert read_head_leniently(b"GET /\r\n") is None
    assert origin_form(b"/a?b") == b"/a?b"
    assert origin_form(b"http://h/a?b") == b"/a?b"
    assert origin_form(b"http://h?q") == b"/?q"
    assert origin_form(b"http://h") == b"/"


def test_profiles_that_ask_or_allow_websockets_need_the_engine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "version: 1\nprofiles:\n  plain:\n    rules:\n      - allow: a.test\n"
        "  ws:\n    rules:\n      - allow: a.test\n        websocket: true\n"
        "  asks:\n    fallback: ask\n    rules:\n      - allow: a.test\n"
    )
    policy = load_policy(path)
    assert [needs_engine(policy, p) for p in ("plain", "ws", "asks", "nope")] == [
        False,
        True,
        True,
        True,
    ]


# --- on loopback: the front door serves it, mitmproxy never asked -------------------------


async def never(sock, state):
    raise AssertionError("plain HTTP was handed to mitmproxy")


def test_plain_http_is_served_by_the_front_door_request_by_request(gate):
    seen = []

    async def server(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            body = b"x" * 100000
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await started(
                gate, ALLOWED, upstream.port, hand_off=never, plain_http=lambda state: True
            )
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(b"GET /1 HTTP/1.1\r\n" + H + b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(100000) == b"x" * 100000
            writer.write(
                b"GET /2 HTTP/1.1\r\n" + H + b"\r\nGET /3 HTTP/1.1\r\nHost: evil.test\r\n\r\n"
            )
            rest = await read_all(reader)
            assert rest.count(b"HTTP/1.1 200 OK") == 1 and b"HTTP/1.1 403 " in rest
            writer.close()
            await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
            await door.stop()
            assert upstream.connections == 1

    run(scenario())
    assert [h.split(b"\r\n")[0] for h in seen] == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1"]
    assert [(r[0], r[3]) for r in requests(gate)] == [
        ("allow", "/1"),
        ("allow", "/2"),
        ("deny", "/3"),
    ]
    end = [e for e in gate.events if e.kind.value == "connection_end"][0]
    assert end.bytes_up > 0 and end.bytes_down > 200000


async def plain_http_door(gate, upstream):
    return await started(
        gate, ALLOWED, upstream.port, hand_off=never, plain_http=lambda state: True
    )


async def exchange(port, host=b"allowed.test") -> bytes:
    """One request on a new connection that the client closes after it."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    answer = await read_all(reader)
    writer.close()
    return answer


def test_a_refused_upstream_answers_502_naming_the_refusal(gate):
    """A connect that failed is told from one that succeeded by its epoll events
    (SO_ERROR is read only for a failed one): the refusal still says why."""
    with socket.socket() as closed:
        closed.bind((LOOPBACK, 0))  # bound, never listening: connections are refused

        async def scenario():
            door = await started(
                gate, ALLOWED, closed.getsockname()[1], hand_off=never, plain_http=lambda s: True
            )
            answers.append(await exchange(door.port))
            await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
            await door.stop()

        answers: list[bytes] = []
        run(scenario())
    [answer] = answers
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert answer.endswith(b"sandgate: upstream connect failed: Connection refused\n")
    end = [e for e in gate.events if e.kind.value == "connection_end"][0]
    assert end.bytes_down == len(answer)
    assert end.detail.endswith("; upstream connect failed: Connection refused")


def test_an_upstream_that_never_completes_the_connect_is_a_502_at_the_connect_deadline(gate):
    """The upstream's accept queue is full, so the kernel drops the gateway's SYN: the
    connect stays pending until the door's deadline, then the client gets a 502 naming
    it and the end event says so (not a reset, not a hang); the request never went."""
    with socket.create_server((LOOPBACK, 0), backlog=0) as full:
        fillers = []
        for _ in range(2):  # a backlog of 0 holds one: the second fills it
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)

        async def scenario():
            door = await started(
                gate, ALLOWED, full.getsockname()[1], hand_off=never,
                plain_http=lambda s: True, connect_timeout=0.3,
            )  # fmt: skip
            began = asyncio.get_running_loop().time()
            answers.append((await exchange(door.port), asyncio.get_running_loop().time() - began))
            await until(lambda: any(e.kind.value == "connection_end" for e in gate.events))
            await door.stop()

        answers: list[tuple[bytes, float]] = []
        run(scenario())
        full.setblocking(False)
        queued = []
        with contextlib.suppress(BlockingIOError):
            while True:
                queued.append(full.accept()[0])
        received = b"".join(_drain(sock) for sock in queued)
        for sock in [*queued, *fillers]:
            sock.close()
    [(answer, waited)] = answers
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
    assert answer.endswith(b"sandgate: upstream connect failed: timed out\n")
    assert 0.25 < waited < 3
    end = [e for e in gate.events if e.kind.value == "connection_end"][0]
    assert end.detail.endswith("; upstream connect failed: timed out")
    assert b"GET" not in received and len(queued) <= len(fillers)  # nothing of ours got in


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


def test_the_next_connection_of_the_sandbox_reuses_the_idle_upstream_and_is_decided_anew(gate):
    async def server(reader, writer):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await plain_http_door(gate, upstream)
            for _ in range(3):
                assert (await exchange(door.port)).startswith(b"HTTP/1.1 200 OK")
            assert (await exchange(door.port, b"evil.test")).startswith(b"HTTP/1.1 403 ")
            await until(
                lambda: len([e for e in gate.events if e.kind.value == "connection_end"]) == 3
            )
            assert upstream.connections == 1 and door.upstream_pool.count == 1
            await door.stop()
            assert door.upstream_pool.count == 0

    run(scenario())
    assert [r[0] for r in requests(gate)] == ["allow", "allow", "allow", "deny"]


def test_an_idle_upstream_the_server_closed_is_not_reused_and_a_dropped_request_goes_again(gate):
    """The server closes the first connection at once after its answer (seen while
    idle: dropped), and the second without answering its second request (the race
    a pool has: the request goes again on a new connection)."""
    answered = []

    async def server(reader, writer):
        n = len(answered)
        await reader.readuntil(b"\r\n\r\n")
        answered.append(n)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")  # then closes, unanswered

    async def scenario():
        async with Upstream(server) as upstream:
            door = await plain_http_door(gate, upstream)
            assert (await exchange(door.port)).startswith(b"HTTP/1.1 200 OK")
            await until(lambda: door.upstream_pool.count == 0)  # its FIN dropped it
            for _ in range(2):
                assert (await exchange(door.port)).startswith(b"HTTP/1.1 200 OK")
            assert upstream.connections == 3 and answered == [0, 1, 2]
            await door.stop()

    run(scenario())
    assert [r[0] for r in requests(gate)] == ["allow", "allow", "allow"]


def test_the_pool_drops_an_idle_connection_its_server_closes_and_keeps_tasks_apart():
    from sandgate.proxy.frontdoor.http1_relay import UpstreamPool
    from sandgate.proxy.frontdoor.poller import Poller

    async def scenario():
        loop = asyncio.get_running_loop()
        poller = Poller(loop)
        pool = UpstreamPool(poller, loop)
        pairs = [socket.socketpair() for _ in range(3)]
        for ours, _ in pairs:
            ours.setblocking(False)
            poller.watch(ours.fileno(), lambda events: None)
        a, b = ("task-a", LOOPBACK, LOOPBACK, 80), ("task-b", LOOPBACK, LOOPBACK, 80)
        pool.give(a, pairs[0][0])
        pool.give(a, pairs[1][0])
        pool.give(b, pairs[2][0])
        pairs[1][1].close()  # its server closes the newest of task a's: dropped at its event
        await until(lambda: pool.count == 2)
        assert pairs[1][0].fileno() == -1
        assert pool.take(a) is pairs[0][0] and pool.take(a) is None  # never task b's
        pairs[2][1].send(b"HTTP/1.1 200 OK")  # an idle server that speaks: unusable
        await until(lambda: pool.count == 0)
        assert pool.take(b) is None
        pool.close()
        poller.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()

    run(scenario())


def test_a_plain_http_download_takes_turns_at_the_wakeup_budget(gate, monkeypatch):
    """As relay.py's pass-through: one step of the plain-HTTP path reads at most about
    WAKEUP_BUDGET, then resumes on a later loop iteration; the body arrives whole."""
    body = b"x" * (16 << 20)
    most = []
    step = Http1Relay._step

    def counted(self):
        step(self)
        most.append(self.read_now)

    monkeypatch.setattr(Http1Relay, "_step", counted)

    async def server(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async def scenario():
        async with Upstream(server) as upstream:
            door = await plain_http_door(gate, upstream)
            reader, writer = await asyncio.open_connection(LOOPBACK, door.port)
            writer.write(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(body)) == body
            writer.close()
            await door.stop()

    run(scenario())
    assert max(most) <= WAKEUP_BUDGET + RELAY_CHUNK
