"""A TLS 1.2 server's resumption, told by the front door's watch
(proxy/frontdoor/hello_watch.py) from the server's plaintext handshake, and decided by
the gate against the sessions it saw issued (proxy/tls_sessions.py). End to end,
against real routers: tests/e2e/test_tls_resumption.py."""

from __future__ import annotations

import pytest
from sandgate.proxy.clienthello import read_server_hello
from sandgate.proxy.frontdoor.hello_watch import Decide, HelloWatch, Issued, Refuse, Resumed
from sandgate.proxy.gate import Outcome
from sandgate.proxy.registry import Sandbox
from sandgate.proxy.tls_sessions import IssuedSessions
from support.fakes import (
    GATE_RULES,
    SANDBOX,
    extension,
    hello_with_extensions,
    make_gate,
    record,
    server_name,
)

SESSION_ID, TICKET = bytes(range(1, 33)), b"T" * 150
CCS = record(b"\x01", kind=20, version=b"\x03\x03")
FINISHED = record(bytes(40), version=b"\x03\x03")  # encrypted: read by nobody here
CLIENT_FINISH = CCS + FINISHED  # what a client sends after the server's Finished


def message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def server_hello(session_id: bytes = b"", tls13: bool = False) -> bytes:
    extensions = extension(43, b"\x03\x04") if tls13 else extension(0xFF01, b"\x00")
    body = b"\x03\x03" + bytes(32) + bytes([len(session_id)]) + session_id + b"\xc0\x2f\x00"
    return message(2, body + len(extensions).to_bytes(2, "big") + extensions)


def new_session_ticket(ticket: bytes) -> bytes:
    return message(4, b"\x00\x00\x1c\x20" + len(ticket).to_bytes(2, "big") + ticket)


def handshake(*messages: bytes) -> bytes:
    return record(b"".join(messages), version=b"\x03\x03")


FULL_FIRST_FLIGHT = handshake(server_hello(SESSION_ID), message(11, bytes(3000)), message(14, b""))
# As servers send it: a record a message (the watch then skips the flight whole).
FULL_FIRST_FLIGHT_RECORDS = (
    handshake(server_hello(SESSION_ID))
    + handshake(message(11, bytes(3000)))
    + handshake(message(14, b""))
)
FULL_LAST_FLIGHT = handshake(new_session_ticket(TICKET)) + CCS + FINISHED
RESUMED_BY_ID = handshake(server_hello(SESSION_ID)) + CCS + FINISHED
RESUMED_RENEWED = handshake(server_hello(SESSION_ID), new_session_ticket(b"N" * 90)) + CCS


def client_hello(
    session_id: bytes = b"", ticket: bytes | None = None, name: bytes = b"allowed.test"
) -> bytes:
    extensions = server_name((0, name))
    if ticket is not None:
        extensions += extension(0x23, ticket)
    data = hello_with_extensions(extensions)
    # hello_with_extensions sends an empty session id: put this one in its place.
    at = 5 + 4 + 2 + 32
    body = data[9:at] + bytes([len(session_id)]) + session_id + data[at + 1 :]
    return record(message(1, body))


def steps(watch: HelloWatch, allow: bool = True) -> tuple[bytes, list]:
    """Step until nothing is to do: what went upstream, and what the gate was asked."""
    sent, said = b"", []
    while (step := watch.step()) is not None:
        if isinstance(step, bytes):
            sent += step
            continue
        said.append(step)
        if isinstance(step, Refuse) or (isinstance(step, Resumed) and not allow):
            break
        if not isinstance(step, Issued):
            watch.allowed()
    return sent, said


def feed_server(watch: HelloWatch, data: bytes, piece: int | None) -> None:
    piece = piece or len(data)
    for at in range(0, len(data), piece):
        watch.feed_server(data[at : at + piece])


def started(hello: bytes | None = None) -> HelloWatch:
    watch = HelloWatch("tls")
    hello = hello or client_hello()
    watch.feed_client(hello)
    assert steps(watch) == (hello, [])
    return watch


# --- the watch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flight", [FULL_FIRST_FLIGHT, FULL_FIRST_FLIGHT_RECORDS], ids=["one-record", "records"]
)
@pytest.mark.parametrize("piece", [None, 1, 7, 100], ids=["whole", "1", "7", "100"])
def test_a_full_tls12_handshake_goes_on_and_says_what_was_issued(flight, piece):
    watch = started()
    feed_server(watch, flight, piece)
    watch.feed_client(b"client key exchange")
    assert steps(watch) == (b"client key exchange", [])  # a new session: the client goes on
    assert not watch.done  # read on to the server's ChangeCipherSpec, for its tickets
    feed_server(watch, FULL_LAST_FLIGHT, piece)
    assert steps(watch) == (b"", [Issued((("ticket", TICKET), ("id", SESSION_ID)))])
    assert watch.done


@pytest.mark.parametrize("piece", [None, 1, 5])
@pytest.mark.parametrize("allow", [True, False])
def test_a_resumed_tls12_session_holds_the_client_until_the_gate_says(piece, allow):
    watch = started(client_hello(SESSION_ID))
    watch.feed_client(b"early")  # nothing may pass before the server's first flight
    assert steps(watch) == (b"", [])
    feed_server(watch, RESUMED_BY_ID, piece)
    watch.feed_client(CLIENT_FINISH)
    sent, said = steps(watch, allow)
    assert said == [Resumed(SESSION_ID)]
    assert sent == (b"early" + CLIENT_FINISH if allow else b"")


def test_a_ticket_renewed_on_resumption_is_issued_once_the_resumption_is_allowed():
    watch = started(client_hello(SESSION_ID, ticket=TICKET))
    watch.feed_server(RESUMED_RENEWED)
    assert steps(watch)[1] == [Resumed(SESSION_ID), Issued((("ticket", b"N" * 90),))]
    assert watch.done


def test_a_tls13_server_hello_ends_the_watch_however_it_comes():
    watch = started()
    feed_server(watch, handshake(server_hello(SESSION_ID, tls13=True)) + CCS, 3)
    assert watch.done and steps(watch) == (b"", [])


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(handshake(message(8, bytes(10))), id="encrypted-extensions"),
        pytest.param(record(bytes(30), kind=23, version=b"\x03\x03"), id="application-data"),
        pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", id="not-tls"),
    ],
)
def test_what_no_tls12_server_sends_after_its_hello_is_refused(after):
    watch = started(client_hello(SESSION_ID))
    watch.feed_server(handshake(server_hello(SESSION_ID)) + after)
    watch.feed_client(CLIENT_FINISH)
    sent, said = steps(watch)
    assert sent == b"" and [type(s) for s in said] == [Refuse], said


def test_an_unparseable_server_hello_is_refused():
    watch = started()
    broken = server_hello()[:-3] + b"\x00\x09\x00"  # its extensions overrun it
    watch.feed_server(handshake(broken))
    watch.feed_client(CLIENT_FINISH)
    sent, said = steps(watch)
    assert sent == b"" and "cannot be parsed" in said[0].detail


def test_read_server_hello():
    assert read_server_hello(server_hello(SESSION_ID)) == (False, SESSION_ID)
    assert read_server_hello(server_hello(tls13=True)) == (True, b"")
    with pytest.raises(ValueError):
        read_server_hello(server_hello()[:-1])


# --- the store and the gate ---------------------------------------------------------------------


def test_the_store_is_per_sandbox_bounded_and_forgotten():
    store = IssuedSessions(per_sandbox=2)
    where = ("allowed.test", "203.0.113.10", 443)
    store.add("10.0.0.2", [("id", b"a"), ("ticket", b"b")], where)
    assert store.issued_where("10.0.0.2", "id", b"a") == where
    assert store.issued_where("10.0.0.2", "ticket", b"a") is None  # kinds apart
    assert store.issued_where("10.0.0.3", "id", b"a") is None  # sandboxes apart
    store.add("10.0.0.3", [("id", b"c")], where)  # another's flood evicts nothing here
    store.add("10.0.0.2", [("id", b"c")], where)
    # Its own least recently used went: `a` was resumed (looked up) after `b` came.
    assert store.issued_where("10.0.0.2", "ticket", b"b") is None
    assert store.issued_where("10.0.0.2", "id", b"a") == where
    store.forget("10.0.0.2")
    assert store.issued_where("10.0.0.2", "id", b"a") is None


IP_RULES = GATE_RULES.replace(
    "    rules:\n", "    rules:\n      - allow: 198.51.100.0/24\n        id: by-address\n", 1
)


@pytest.fixture
def gate(tmp_path):
    return make_gate(tmp_path, rules=IP_RULES)


def passed_through(gate, dst: str, port: int, hello: bytes):
    state = gate.on_connect(("k", port), SANDBOX, 40000, dst, port)
    assert gate.on_first_bytes(state, hello) is Outcome.PASSTHROUGH
    gate.events.clear()
    return state


def test_the_gate_lets_resume_only_what_it_saw_issued_where_it_was_issued(gate):
    first = passed_through(gate, "203.0.113.10", 443, client_hello())
    gate.on_sessions_issued(first, (("ticket", TICKET), ("id", SESSION_ID)))
    by_ticket = passed_through(gate, "203.0.113.10", 443, client_hello(bytes(32), TICKET))
    assert gate.on_resumed(by_ticket, bytes(32))
    by_id = passed_through(gate, "203.0.113.10", 443, client_hello(SESSION_ID, b""))
    assert gate.on_resumed(by_id, SESSION_ID)
    assert gate.events == []

    def refused(state, session_id: bytes) -> tuple:
        assert not gate.on_resumed(state, session_id)
        [event] = gate.events
        return event.rule_id, str(event.reason), event.name, event.detail

    # Another ticket (one got elsewhere) is tried first, whatever the session id says.
    other = passed_through(gate, "203.0.113.10", 443, client_hello(SESSION_ID, b"elsewhere"))
    said = refused(other, SESSION_ID)
    assert said[:3] == ("builtin:resumed-session", "spoofed_destination", "allowed.test")
    assert "resumed a ticket the gateway did not see issued to this sandbox" in said[3]
    # The same session under another name, at the same address (another port).
    ssh = client_hello(SESSION_ID, name=b"ssh.allowed.test")
    said = refused(passed_through(gate, "203.0.113.10", 22, ssh), SESSION_ID)
    assert said[2] == "ssh.allowed.test"
    assert "resumed a session id issued on a connection to allowed.test:443" in said[3]
    # A resumption the client did not offer (no ticket, the server's id not its own).
    unasked = passed_through(gate, "203.0.113.10", 443, client_hello())
    assert "resumed a session the gateway did not see" in refused(unasked, SESSION_ID)[3]
    gate.forget_sandbox(Sandbox(SANDBOX, "t", "default"))
    again = passed_through(gate, "203.0.113.10", 443, client_hello(SESSION_ID))
    assert not gate.on_resumed(again, SESSION_ID)  # the next task at the address has none


def test_an_address_an_ip_rule_allows_resumes_anything(gate):
    state = passed_through(gate, "198.51.100.7", 443, client_hello(SESSION_ID))
    assert gate.on_resumed(state, SESSION_ID) and gate.events == []


OWN, FORBIDDEN = b"O" * 150, b"F" * 150


def starttls_hello(ticket: bytes) -> bytes:
    return client_hello(bytes(range(32)), ticket, name=b"ssh.allowed.test")


def resumed_flight_of_a_second_hello() -> bytes:
    body = b"\x03\x03" + bytes(32) + bytes([32]) + bytes(range(32)) + b"\xc0\x2f\x00"
    return (
        record(message(2, body + b"\x00\x05" + extension(0xFF01, b"\x00")), version=b"\x03\x03")
        + CCS
    )


def test_a_second_hellos_resumption_is_checked_against_its_own_ticket(tmp_path):
    """After an answer that is not TLS (STARTTLS), a second hello with the first's SNI
    offers another ticket: the server resumes that one, so it is the one checked (a
    red team, session 49: the first hello's, known, let the forbidden one through)."""
    gate = make_gate(tmp_path)
    port = 22  # ssh.allowed.test: port 22 (support.fakes.GATE_RULES), a non-web port
    honest = gate.on_connect(("k", 1), SANDBOX, 40000, "203.0.113.10", port)
    assert gate.on_first_bytes(honest, starttls_hello(b"")) is Outcome.PASSTHROUGH
    gate.on_sessions_issued(honest, (("ticket", OWN),))  # the task's own, through the gateway

    state = gate.on_connect(("k", 2), SANDBOX, 40001, "203.0.113.10", port)
    first = starttls_hello(OWN)
    assert gate.on_first_bytes(state, first) is Outcome.PASSTHROUGH
    watch = HelloWatch("tls")
    watch.feed_client(first)
    assert watch.step() == first
    watch.feed_server(b"220 ready\r\n500 unrecognized command\r\n")  # SMTP, not TLS
    watch.feed_client(b"STARTTLS\r\n" + starttls_hello(FORBIDDEN))
    asked = []
    while (step := watch.step()) is not None:
        if isinstance(step, Decide):
            assert step.second and gate.on_later_hello(state, step.hello, step.second)
            watch.allowed()
        elif isinstance(step, Resumed):
            asked.append(gate.on_resumed(state, step.session_id))
            break
        elif not isinstance(step, bytes):
            raise AssertionError(step)
        if not asked and watch.client == "hold":
            watch.feed_server(resumed_flight_of_a_second_hello())
    # The server resumed FORBIDDEN (offered by the hello it answered), never issued here.
    assert asked == [False], "the gate allowed a resumption of a ticket it never saw issued"


def test_a_tls12_handshake_is_read_within_its_budget():
    """A server that sends handshake messages by the thousand (4,096 empty ones fill a
    record), or tickets without end, is read no further than MAX_SERVER_MESSAGES:
    what it issued is forgotten, the client it released goes on."""
    from sandgate.proxy.frontdoor.hello_watch import MAX_SERVER_MESSAGES, MAX_TICKETS

    watch = started()
    watch.feed_server(FULL_FIRST_FLIGHT)
    watch.feed_client(b"client key exchange")
    assert steps(watch) == (b"client key exchange", [])
    tickets = handshake(*[new_session_ticket(bytes([i]) * 40) for i in range(MAX_TICKETS + 3)])
    watch.feed_server(tickets + handshake(message(0, b"") * 4000) + CCS)
    assert watch.done and steps(watch) == (b"", [])  # nothing issued: the reading stopped
    assert MAX_SERVER_MESSAGES < 4000


def test_tickets_past_the_few_a_server_sends_are_not_kept():
    from sandgate.proxy.frontdoor.hello_watch import MAX_TICKETS

    watch = started()
    watch.feed_server(FULL_FIRST_FLIGHT)
    many = [new_session_ticket(bytes([i]) * 40) for i in range(MAX_TICKETS + 2)]
    watch.feed_server(handshake(*many) + CCS)
    [issued] = steps(watch)[1]
    assert [kind for kind, _ in issued.sessions] == ["ticket"] * MAX_TICKETS + ["id"]


def test_a_server_past_its_budget_before_telling_a_resumption_is_refused():
    from sandgate.proxy.frontdoor.hello_watch import MAX_SERVER_BYTES

    watch = started(client_hello(SESSION_ID))
    watch.feed_server(handshake(server_hello(SESSION_ID)))
    watch.feed_server(b"\x16\x03\x03" + bytes(MAX_SERVER_BYTES + 10))
    watch.feed_client(CLIENT_FINISH)
    sent, said = steps(watch)
    assert sent == b"" and "more than" in said[0].detail
