"""The front door's watch over a pass-through connection's plaintext phase
(proxy/frontdoor/hello_watch.py), fed bytes with no sockets; and the gate's
decision on the hellos it finds (`on_later_hello`, `on_hello_refused`)."""

from __future__ import annotations

import random

import pytest
from sandgate.proxy.clienthello import (
    HELLO_RETRY_RANDOM,
    MAX_RECORD,
    MAX_RECORD_MAJOR,
    is_hello_retry_request,
)
from sandgate.proxy.frontdoor import hello_watch
from sandgate.proxy.frontdoor.hello_watch import MAX_HELD, Decide, HelloWatch, Refuse, lone_hello
from sandgate.proxy.gate import MAX_FIRST_BYTES, Outcome
from support.fakes import (
    GATE_RULES,
    SANDBOX,
    client_hello,
    extension,
    hello_with_extensions,
    make_gate,
    record,
    server_name,
)

PG_SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
CCS = record(b"\x01", kind=20, version=b"\x03\x03")
EARLY_DATA = record(b"\x17" * 300, kind=23, version=b"\x03\x03")


def hello(sni: str | None, ech: bool = False, version: bytes = b"\x03\x01") -> bytes:
    """A ClientHello record naming `sni` (none: None), with an ECH extension if asked,
    in a record of `version`."""
    extensions = server_name((0, sni.encode())) if sni else b""
    if ech:
        extensions += extension(0xFE0D, b"\x00" + bytes(40))
    data = hello_with_extensions(extensions)
    return data[:1] + version + data[3:]


def server_hello(retry: bool) -> bytes:
    """A ServerHello record, or a HelloRetryRequest if `retry`."""
    random_ = HELLO_RETRY_RANDOM if retry else bytes(range(32))
    body = b"\x03\x03" + random_ + b"\x00\x13\x01\x00" + b"\x00\x06" + extension(43, b"\x03\x04")
    return record(b"\x02" + len(body).to_bytes(3, "big") + body, version=b"\x03\x03")


def run(watch: HelloWatch, allow: bool = True) -> tuple[bytes, list]:
    """Step until nothing is to do: what went upstream, and the Decides and Refuses."""
    sent, said = b"", []
    while (step := watch.step()) is not None:
        if isinstance(step, bytes):
            sent += step
            continue
        said.append(step)
        if isinstance(step, Refuse) or not allow:
            break
        watch.allowed()
    return sent, said


def split_feed(watch: HelloWatch, data: bytes, sizes, allow: bool = True) -> tuple[bytes, list]:
    sent, said, at = b"", [], 0
    for size in sizes:
        watch.feed_client(data[at : at + size])
        at += size
        more, steps = run(watch, allow)
        sent, said = sent + more, said + steps
    return sent, said


def snis(said: list) -> list:
    return [(s.hello.sni, s.hello.hidden_name, s.second) for s in said if isinstance(s, Decide)]


# --- tls mode: the connection's first bytes were the decided hello --------------------------


def test_an_ordinary_handshake_passes_and_the_watch_ends_at_the_server_hello():
    watch = HelloWatch("tls")
    first = client_hello("allowed.test")
    watch.feed_client(first)
    assert run(watch) == (first, [])
    assert not watch.done and watch.waits_for_server
    watch.feed_server(server_hello(retry=False))
    assert watch.done and run(watch) == (b"", [])


def test_bytes_after_the_first_hello_wait_for_the_servers_first_message():
    watch = HelloWatch("tls")
    first = client_hello("allowed.test")
    watch.feed_client(first + EARLY_DATA)  # 0-RTT: it waits one round trip
    assert run(watch) == (first, [])
    watch.feed_server(server_hello(retry=False)[:7])
    assert run(watch) == (b"", [])
    watch.feed_server(server_hello(retry=False)[7:])
    assert run(watch) == (EARLY_DATA, []) and watch.done


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "after-the-retry"])
@pytest.mark.parametrize(
    "second, expected",
    [
        pytest.param(hello("evil.test"), ("evil.test", False, True), id="changed-sni"),
        pytest.param(hello("allowed.test", ech=True), ("allowed.test", True, True), id="ech"),
        pytest.param(hello("allowed.test"), ("allowed.test", False, True), id="same"),
    ],
)
def test_the_second_hello_after_a_retry_is_held_whole_and_decided(pipelined, second, expected):
    watch = HelloWatch("tls")
    first = hello("allowed.test")
    watch.feed_client(first + (CCS + second if pipelined else b""))
    assert run(watch, allow=False) == (first, [])
    watch.feed_server(server_hello(retry=True) + CCS)
    if not pipelined:
        assert run(watch, allow=False) == (b"", [])
        watch.feed_client(CCS + second)
    sent, said = run(watch, allow=False)
    assert sent == CCS  # the compatibility record goes on; the hello waits for its decision
    assert snis(said) == [expected]
    watch.allowed()
    assert run(watch) == (second, []) and watch.done


def test_the_second_hello_split_anyhow_is_decided_once_and_whole():
    first, second = hello("allowed.test"), hello("evil.test")
    stream = first + CCS + EARLY_DATA + second + b"encrypted after it"
    for seed in range(100):
        rng = random.Random(seed)
        watch = HelloWatch("tls")
        cuts = sorted(rng.sample(range(1, len(stream)), 6))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        sent, said, retried = b"", [], False
        for at, size in zip([0, *cuts], sizes, strict=True):
            more, steps = split_feed(watch, stream[at : at + size], [size], allow=False)
            sent, said = sent + more, said + steps
            if not retried and len(sent) >= len(first):  # the server answers what it got
                watch.feed_server(server_hello(retry=True))
                retried = True
                more, steps = run(watch, allow=False)
                sent, said = sent + more, said + steps
        assert snis(said) == [("evil.test", False, True)], seed
        # Nothing of the second hello went before its decision.
        assert sent == first + CCS + EARLY_DATA, seed


@pytest.mark.parametrize(
    "after_retry, detail",
    [
        pytest.param(record(b"\x14\x00\x00\x00"), "handshake message of type 20", id="not-a-hello"),
        pytest.param(
            hello_with_extensions(b"", trailing=b"\x00"), "unparseable ClientHello", id="malformed"
        ),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "record header", id="not-tls"),
        pytest.param(record(b"\x00", kind=24), "record of type 24", id="heartbeat"),
        pytest.param(
            record(b"\x01" + (MAX_FIRST_BYTES).to_bytes(3, "big") + bytes(100)),
            "over 16384",
            id="too-long",
        ),
    ],
)
def test_what_a_server_would_read_as_the_second_hello_and_cannot_be_decided_is_refused(
    after_retry, detail
):
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test"))
    run(watch)
    watch.feed_server(server_hello(retry=True))
    watch.feed_client(after_retry)
    sent, said = run(watch)
    assert sent == b"" and len(said) == 1 and isinstance(said[0], Refuse)
    assert detail in said[0].detail


def test_handshake_bytes_after_the_first_hello_in_its_record_are_refused():
    first = hello("allowed.test")
    body = first[5:] + hello("evil.test")[5:]
    watch = HelloWatch("tls")
    watch.feed_client(record(body))
    sent, (refused,) = run(watch)
    assert sent == b"" and "after the ClientHello in its record" in refused.detail


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 400 Bad Request\r\n", id="plain-http"),
        pytest.param(record(b"\x0b\x00\x00\x00", version=b"\x03\x03"), id="not-hello"),
        pytest.param(record(b"\x01", kind=23, version=b"\x03\x03"), id="app-data"),
        pytest.param(hello("allowed.test"), id="echoed"),
    ],
)
def test_after_an_answer_that_is_not_a_server_hello_a_later_hello_is_still_decided(answer):
    # No retry can be told: the client's bytes are scanned as raw TCP's, and a hello
    # among them must name the first one's server.
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test") + CCS + hello("evil.test"))
    run(watch)
    watch.feed_server(answer)
    sent, said = run(watch, allow=False)
    assert sent == CCS and snis(said) == [("evil.test", False, True)]
    watch.allowed()
    # Allowed, it is watched as a first one: held behind until the server's answer.
    watch.feed_client(CCS)
    assert run(watch) == (hello("evil.test"), []) and watch.waits_for_server
    watch.feed_server(server_hello(retry=False))
    assert run(watch) == (CCS, []) and watch.done


def test_a_hello_after_an_answer_that_is_not_tls_is_watched_as_a_first_one():
    # SSLRequest and a hello; the server answers with no TLS; the client sends a
    # second hello, then a third after the server's HelloRetryRequest to the second.
    watch = HelloWatch("raw")
    watch.feed_client(PG_SSL_REQUEST + hello("allowed.test"))
    sent, said = run(watch)
    assert sent == PG_SSL_REQUEST + hello("allowed.test")
    assert snis(said) == [("allowed.test", False, False)]
    watch.feed_server(b"N")
    watch.feed_client(hello("allowed.test"))
    sent, said = run(watch)
    assert sent == hello("allowed.test") and snis(said) == [("allowed.test", False, True)]
    watch.feed_server(server_hello(retry=True))
    watch.feed_client(CCS + hello("evil.test"))
    sent, said = run(watch, allow=False)
    assert sent == CCS and snis(said) == [("evil.test", False, True)]


@pytest.mark.parametrize(
    "before, between",
    [
        # the first hello ends past the connection's first 16 KiB
        pytest.param(b"x" * (MAX_FIRST_BYTES - 20), b"", id="first-hello-late"),
        # the later hello is held behind the first, 16 KiB and more after it
        pytest.param(b"", b"x" * (MAX_FIRST_BYTES + 600), id="held-long"),
    ],
)
def test_an_answer_that_is_not_tls_gives_the_scan_a_window_of_its_own(before, between):
    # A first hello of some size (a padding extension), as real ones are.
    first = hello_with_extensions(server_name((0, b"allowed.test")) + extension(21, bytes(600)))
    watch = HelloWatch("raw")
    watch.feed_client(before + first)
    sent, said = run(watch)
    assert sent == before + first and len(said) == 1
    watch.feed_client(between + hello("evil.test"))
    assert run(watch) == (b"", [])  # held behind the first hello
    watch.feed_server(b"220 Ready\r\n")
    sent, said = run(watch, allow=False)
    assert sent == between and snis(said) == [("evil.test", False, True)]
    # And 16 KiB after the answer, still.
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test"))
    run(watch)
    watch.feed_server(b"220 Ready\r\n")
    watch.feed_client(b"y" * (MAX_FIRST_BYTES - 10) + hello("evil.test"))
    assert snis(run(watch, allow=False)[1]) == [("evil.test", False, True)]


@pytest.mark.parametrize("cut", [2, 20, 60])
def test_a_later_hello_split_over_records_is_refused_before_any_of_it_goes(cut):
    """As clienthello.py reads a first hello: an SNI router reads a hello's first
    record as all of it. After a HelloRetryRequest, and after a raw-TCP preamble."""
    body = hello("allowed.test")[5:]
    split = record(body[:cut]) + record(body[cut:])
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test"))
    run(watch)
    watch.feed_server(server_hello(retry=True))
    watch.feed_client(CCS + split)
    sent, said = run(watch, allow=False)
    assert sent == CCS and [type(s) for s in said] == [Refuse], said
    assert "split over TLS records" in said[0].detail
    watch = HelloWatch("raw")
    watch.feed_client(PG_SSL_REQUEST)
    run(watch)
    watch.feed_client(split)
    sent, said = run(watch, allow=False)
    assert len(sent) <= 6 and [type(s) for s in said] == [Refuse], said


def test_after_a_server_alert_the_client_stays_held():
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test") + CCS + hello("evil.test"))
    run(watch)
    watch.feed_server(record(b"\x02\x28", kind=21, version=b"\x03\x03"))
    assert run(watch) == (b"", []) and not watch.done


def test_held_bytes_are_bounded_by_not_reading_the_client():
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test"))
    run(watch)
    watch.feed_client(bytes(MAX_HELD))
    assert not watch.wants_client


def test_a_client_that_ends_abandons_what_is_held():
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test") + CCS + hello("evil.test"))
    run(watch)
    watch.abandon()
    assert run(watch) == (b"", []) and watch.done


# --- raw mode: a hello after a preamble ------------------------------------------------------


def test_a_hello_after_the_postgres_preamble_is_decided_before_it_goes():
    watch = HelloWatch("raw")
    first = client_hello("evil.test")
    watch.feed_client(PG_SSL_REQUEST)
    assert run(watch, allow=False) == (PG_SSL_REQUEST, [])
    watch.feed_server(b"S")  # the server's own protocol: not read
    watch.feed_client(first)
    sent, said = run(watch, allow=False)
    assert sent == b"" and snis(said) == [("evil.test", False, False)]
    watch.allowed()
    assert run(watch) == (first, [])
    # The first hello decided, the watch goes on as over a TLS connection.
    watch.feed_client(CCS + hello("other.test"))
    assert run(watch) == (b"", [])
    watch.feed_server(server_hello(retry=True))
    assert snis(run(watch, allow=False)[1]) == [("other.test", False, True)]


def test_a_preamble_and_hello_split_anyhow_send_at_most_a_record_header_and_type_before_the_decision():
    first = hello("evil.test")
    stream = b"EHLO x\r\nSTARTTLS\r\n" + first
    at = len(stream) - len(first)
    for seed in range(100):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(stream)), 5))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        watch = HelloWatch("raw")
        sent, said = split_feed(watch, stream, sizes, allow=False)
        assert snis(said) == [("evil.test", False, False)], seed
        assert len(sent) <= at + 6 and sent[:at] == stream[:at], seed


def test_a_byte_that_might_start_a_record_is_not_held():
    watch = HelloWatch("raw")
    watch.feed_client(b"query\x16")
    assert run(watch) == (b"query\x16", [])
    watch.feed_client(b"\x03 more")  # no handshake record after all
    assert run(watch) == (b"\x03 more", [])


def test_no_hello_within_the_first_bytes_ends_the_watch():
    watch = HelloWatch("raw")
    data = b"x" * (MAX_FIRST_BYTES + 10)
    watch.feed_client(data)
    assert run(watch) == (data, []) and watch.done


def test_a_hello_past_the_window_is_not_looked_for():
    watch = HelloWatch("raw")
    data = b"x" * MAX_FIRST_BYTES + hello("evil.test")
    watch.feed_client(data)
    assert run(watch) == (data, []) and watch.done


@pytest.mark.parametrize(
    "candidate",
    [
        pytest.param(b"\x16\x03\x01\x00\x00\x01", id="empty-record"),
        pytest.param(b"\x16\x03\x01\x41\x00\x01", id="record-too-long"),
        pytest.param(b"\x16\x03\x01\x00\x10\x02", id="not-a-hello"),
        pytest.param(b"\x16\x10\x01\x00\x10\x01", id="major-version-16"),
        pytest.param(b"\x16\x03\x01\x00\x10\x01\x03", id="hello-over-128-kib"),
    ],
)
def test_what_no_server_reads_as_a_hello_is_not_one(candidate):
    watch = HelloWatch("raw")
    data = candidate + b"y" * 40
    watch.feed_client(data)
    assert run(watch) == (data, [])


def test_a_hello_in_a_record_version_clients_send_is_decided():
    watch = HelloWatch("raw")
    watch.feed_client(PG_SSL_REQUEST + hello("evil.test", version=b"\x03\x03"))
    sent, said = run(watch, allow=False)
    assert sent == PG_SSL_REQUEST and snis(said) == [("evil.test", False, False)]


@pytest.mark.parametrize("version", [b"\x00\x01", b"\x01\x00", b"\x02\x00", b"\x0f\xff"])
def test_a_hello_in_any_other_record_version_a_server_takes_is_refused(version):
    # Go's crypto/tls takes any version below 0x1000 in a connection's first record;
    # SNI routers find no name in it (clienthello.RECORD_VERSIONS).
    watch = HelloWatch("raw")
    watch.feed_client(PG_SSL_REQUEST + hello("evil.test", version=version))
    sent, said = run(watch, allow=False)
    assert len(sent) <= len(PG_SSL_REQUEST) + 6 and [type(s) for s in said] == [Refuse]
    assert "record of version" in said[0].detail


def test_the_scans_pattern_is_a_hello_start_as_the_constants_say():
    def candidate(data: bytes) -> bool:
        size = (data[3] << 8) | data[4]
        return (
            data[0] == 0x16
            and data[1] <= MAX_RECORD_MAJOR
            and 0 < size <= MAX_RECORD
            and data[5] == 1
            and (size == 1 or data[6] <= hello_watch._MAX_HELLO_TOP)
        )

    rng = random.Random(7)
    cases = [
        bytes([0x16, major, 1, size >> 8, size & 255, kind, top])
        for major in (0, 3, 15, 16, 255)
        for size in (0, 1, 2, 255, 256, MAX_RECORD, MAX_RECORD + 1, 0xFFFF)
        for kind in (0, 1, 2)
        for top in (0, 2, 3, 255)
    ]
    cases += [bytes([0x16, rng.randrange(17), *rng.randbytes(5)]) for _ in range(20000)]
    for data in cases:
        found = hello_watch._CANDIDATE_START.match(data) is not None
        assert found == candidate(data), data.hex()


def test_a_malformed_hello_after_a_preamble_is_refused():
    watch = HelloWatch("raw")
    watch.feed_client(PG_SSL_REQUEST + hello_with_extensions(b"", trailing=b"\x00\x01"))
    sent, (refused,) = run(watch)
    assert sent == PG_SSL_REQUEST and "unparseable" in refused.detail


def test_a_hello_in_pieces_waits_whole_then_is_decided():
    watch = HelloWatch("raw")
    first = client_hello("evil.test")
    watch.feed_client(PG_SSL_REQUEST + first[:-10])
    assert run(watch, allow=False) == (PG_SSL_REQUEST, [])
    watch.feed_client(first[-10:])
    sent, said = run(watch, allow=False)
    assert sent == b"" and snis(said) == [("evil.test", False, False)]


def test_hello_retry_request_is_told_by_its_random():
    assert is_hello_retry_request(server_hello(retry=True)[5:])
    assert not is_hello_retry_request(server_hello(retry=False)[5:])
    assert is_hello_retry_request(memoryview(server_hello(retry=True)), 5)
    assert not is_hello_retry_request(memoryview(server_hello(retry=False)), 5)


def test_a_lone_hello_is_one_record_holding_one_whole_hello():
    first = client_hello("allowed.test")
    assert lone_hello(first, len(first))
    assert lone_hello(first + b"unread", len(first))  # the relay's buffer: n counts
    assert not lone_hello(first + CCS, len(first) + len(CCS))
    assert not lone_hello(first[:-1], len(first) - 1)
    body = first[5:]
    assert not lone_hello(record(body[:20]) + record(body[20:]), len(first) + 5)


# --- the gate's decision on them ---------------------------------------------------------------


@pytest.fixture
def gate(tmp_path):
    return make_gate(tmp_path)


def events(gate) -> list:
    return [(str(e.verdict), str(e.reason), e.rule_id, e.name, e.protocol) for e in gate.events]


def passed_through(gate, dst: str, port: int, data: bytes):
    state = gate.on_connect(("k", 1), SANDBOX, 40000, dst, port)
    assert gate.on_first_bytes(state, data) is Outcome.PASSTHROUGH
    gate.events.clear()
    return state


@pytest.mark.parametrize(
    "second, allowed, event",
    [
        pytest.param(hello("allowed.test"), True, None, id="same-name"),
        pytest.param(
            hello("ALLOWED.test."),
            False,
            ("deny", "spoofed_destination", "builtin:client-hello-changed", "allowed.test", "tls"),
            id="same-name-spelled-otherwise",
        ),
        pytest.param(
            hello("evil.test"),
            False,
            ("deny", "spoofed_destination", "builtin:client-hello-changed", "evil.test", "tls"),
            id="changed",
        ),
        pytest.param(
            hello(None),
            False,
            ("deny", "spoofed_destination", "builtin:client-hello-changed", "allowed.test", "tls"),
            id="sni-dropped",
        ),
        pytest.param(
            hello("allowed.test", ech=True),
            False,
            (
                "deny",
                "protocol_not_allowed",
                "builtin:encrypted-client-hello",
                "allowed.test",
                "tls",
            ),
            id="ech",
        ),
    ],
)
def test_a_second_hello_must_name_the_first_ones_server(gate, second, allowed, event):
    state = passed_through(gate, "203.0.113.10", 443, hello("allowed.test"))
    (decide,) = [s for s in run_hello(second) if isinstance(s, Decide)]
    assert gate.on_later_hello(state, decide.hello, decide.second) is allowed
    assert events(gate) == ([event] if event else [])


def run_hello(second: bytes) -> list:
    watch = HelloWatch("tls")
    watch.feed_client(hello("allowed.test") + second)
    run(watch)
    watch.feed_server(server_hello(retry=True))
    return run(watch, allow=False)[1]


@pytest.mark.parametrize(
    "sni, allowed, event",
    [
        pytest.param(
            "ssh.allowed.test",
            True,
            ("allow", "rule_allow", "ssh", "ssh.allowed.test", "tls"),
            id="bound-name",
        ),
        pytest.param(
            "evil.test",
            False,
            ("deny", "no_rule", "default:fallback", "evil.test", "tls"),
            id="other",
        ),
        pytest.param(
            "ssh2.allowed.test",
            False,
            (
                "deny",
                "spoofed_destination",
                "builtin:spoofed-destination",
                "ssh2.allowed.test",
                "tls",
            ),
            id="not-bound-here",
        ),
        pytest.param(None, True, None, id="no-sni"),
    ],
)
def test_a_hello_after_raw_bytes_is_decided_as_a_first_one(tmp_path, sni, allowed, event):
    rules = GATE_RULES + "      - allow: ssh2.allowed.test\n        ports: [22]\n        id: ssh2\n"
    gate = make_gate(tmp_path, rules=rules)
    state = passed_through(gate, "203.0.113.10", 22, b"SSH-2.0-x\r\n")
    watch = HelloWatch("raw")
    watch.feed_client(PG_SSL_REQUEST + hello(sni))
    (decide,) = run(watch, allow=False)[1]
    assert gate.on_later_hello(state, decide.hello, decide.second) is allowed
    assert events(gate) == ([event] if event else [])


def test_an_ech_hello_after_raw_bytes_allowed_by_name_is_refused(gate):
    state = passed_through(gate, "203.0.113.10", 22, b"SSH-2.0-x\r\n")
    assert not gate.on_later_hello(state, run_raw(hello("ssh.allowed.test", ech=True)), False)
    assert events(gate) == [
        (
            "deny",
            "protocol_not_allowed",
            "builtin:encrypted-client-hello",
            "ssh.allowed.test",
            "tls",
        )
    ]


def run_raw(data: bytes):
    watch = HelloWatch("raw")
    watch.feed_client(data)
    (decide,) = run(watch, allow=False)[1]
    return decide.hello


@pytest.mark.parametrize("version", [0x0001, 0x0100, 0x0200, 0x0F00])
@pytest.mark.parametrize(
    "port, sni, outcome",
    [
        pytest.param(22, "evil.test", Outcome.REJECT, id="raw-port"),
        pytest.param(443, "allowed.test", Outcome.PASSTHROUGH, id="web-port"),
    ],
)
def test_first_bytes_in_any_record_version_a_server_takes_are_a_hello(
    gate, version, port, sni, outcome
):
    """TLS, not raw TCP (Go's crypto/tls takes the hello), and refused: SNI routers
    find no name in it (clienthello.RECORD_VERSIONS)."""
    state = gate.on_connect(("k", 1), SANDBOX, 40000, "203.0.113.10", port)
    data = hello(sni, version=version.to_bytes(2, "big"))
    assert gate.on_first_bytes(state, data) is Outcome.REJECT
    assert events(gate) == [("deny", "malformed_tls", "builtin:malformed-tls", None, "tls")]
    state = gate.on_connect(("k", 1), SANDBOX, 40001, "203.0.113.10", port)
    gate.events.clear()
    assert gate.on_first_bytes(state, hello(sni, version=b"\x03\x01")) is outcome
    assert [e[3:] for e in events(gate)] == [(sni, "tls")]


def test_a_refusal_is_a_malformed_tls_event(gate):
    state = passed_through(gate, "203.0.113.10", 443, hello("allowed.test"))
    gate.on_hello_refused(state, "a record of type 24 where the server reads a ClientHello")
    ((verdict, reason, rule, name, protocol),) = events(gate)
    assert (verdict, reason, rule, name) == (
        "deny",
        "malformed_tls",
        "builtin:malformed-tls",
        "allowed.test",
    )
    assert "type 24" in gate.events[0].detail
