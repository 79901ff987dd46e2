"""Watching a pass-through connection's plaintext phase for a ClientHello the gate has
not decided: sans-io, no sockets (fed the bytes of each direction, it says what may
pass). A pass-through `Relay` carries one until the handshake is past its plaintext
phase, then drops it and costs what it did before.

The invariant: every ClientHello the upstream can receive in plaintext has been
decided by the gate, by the rules of a first one (the SNI bound to the address or
allowed by an IP rule, no ECH), and a second one on a TLS connection names the same
server as the first. A server routes by a later hello's SNI as by the first: OpenSSL
takes the second ClientHello's SNI after a HelloRetryRequest, and a client-first
preamble (PostgreSQL's SSLRequest, SMTP or IMAP STARTTLS, MySQL's SSL request) puts
the hello after bytes the gate decided on as raw TCP.

Two modes, chosen by what the gate decided:

- `tls` (a TLS pass-through: the connection's first bytes were the decided
  ClientHello #1). Its records are released; then the client's bytes are held until
  the server's first handshake message is seen (ordinary clients send nothing then;
  0-RTT early data waits one round trip). A TLS 1.3 ServerHello ends the watch:
  what was held goes on, and so does the rest, encrypted from there on. A TLS 1.2
  one is read on to the server's ChangeCipherSpec: a full handshake (Certificate
  and the rest after the ServerHello) lets the client's bytes go, and what it
  issues to resume by (its session id, its tickets) goes to the gate, `Issued`; an
  abbreviated one (NewSessionTicket or ChangeCipherSpec next) resumed a session,
  whose name, not the SNI's, the server serves: the client stays held until the
  gate knows the session as issued for what it decided (`Resumed`,
  proxy/tls_sessions.py). A HelloRetryRequest makes the next handshake message
  the client sent, pipelined or not, a second ClientHello, held whole and decided
  (`Decide(second=True)`); ChangeCipherSpec, alert and (skipped) early-data records
  before it pass.
- `raw` (raw TCP on a non-web port). The client's bytes are scanned for a TLS
  handshake record that starts a ClientHello (`_CANDIDATE_START`: 0x16, a record
  version a server takes (`clienthello.MAX_RECORD_MAJOR`: Go's crypto/tls takes
  `16 00 01 ...`), a length the record layer takes, handshake type 1, a length a
  server takes), in the scan's window: a hello must start within the client's first
  MAX_FIRST_BYTES. From there the bytes are held, the hello assembled and decided
  (`Decide(second=False)`); once allowed the watch goes on as in `tls` mode. Up to 6
  bytes (a record header and the handshake type) may have reached the upstream
  before the bytes that tell a hello came (a scan that held every possible prefix
  could stall a protocol whose message ends in 0x16): never the hello's body, where
  its SNI is.

What cannot be read where a server would read a hello (a record header that is not
TLS's, a hello that cannot be parsed or is longer than MAX_FIRST_BYTES, handshake
bytes after a hello in its record, a hello split over records or in a record version
no client sends, another handshake message where the second hello goes) is
`Refuse`d: the caller resets the connection; nothing fails open.

A server whose answer to a hello is not TLS (no ServerHello, so no retry to tell)
does not end the watch: the client's bytes from there are scanned as in `raw` mode,
in a window of their own (what the client sent before the answer, and
MAX_FIRST_BYTES after it), and a hello among them is decided as a second one (it
must name the first one's server). Once allowed, it is watched as a first one: held
behind until the server's first handshake message, and a HelloRetryRequest makes
the next hello a second one; another answer that is not TLS, another scan. After a
server's alert the client stays held.

Bounds: held bytes stay under MAX_HELD (past it the client is not read:
back-pressure), and a scan ends with its window: a hello that starts further on (a
long SMTP dialogue before STARTTLS, padded on purpose) is not looked for.
docs/threat-model.md (a ClientHello after a client-first preamble) says why the
window is not longer.

`step()` returns what to do next: `bytes` to send upstream now, a `Decide` or a
`Resumed` (the caller asks the gate and calls `allowed()`, or resets), an `Issued`
(the caller tells the gate), a `Refuse`, or None (more bytes needed, of either
side). `done` once nothing more is watched: the caller
sends what `step()` still returns and then relays plainly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sandgate.proxy.clienthello import (
    MAX_RECORD,
    MAX_RECORD_MAJOR,
    RECORD_VERSIONS,
    SPLIT_HELLO,
    ClientHello,
    client_hello_of,
    is_hello_retry_request,
    read_server_hello,
)
from sandgate.proxy.gate import MAX_FIRST_BYTES

# Client bytes held at most while a hello is undecided or the server is to answer:
# a hello of MAX_FIRST_BYTES and a whole record beside it. Past it the client is not
# read (back-pressure), nothing is refused for it.
MAX_HELD = 2 * MAX_FIRST_BYTES + 2048
# A record's payload: 2^14 bytes plaintext, 2^14 + 256 protected (RFC 8446 5.2).
_MAX_PAYLOAD = MAX_RECORD + 256
_CCS, _ALERT, _HANDSHAKE, _APPLICATION_DATA = 20, 21, 22, 23
_CLIENT_HELLO, _SERVER_HELLO, _NEW_SESSION_TICKET = 1, 2, 4
# What follows a TLS 1.2 server's ServerHello in a full handshake (RFC 5246 7.3):
# Certificate, ServerKeyExchange (anonymous and PSK suites), CertificateRequest,
# ServerHelloDone. A resumed (abbreviated) one has NewSessionTicket or ChangeCipherSpec.
_FULL_HANDSHAKE = frozenset({11, 12, 13, 14})
# The server's handshake messages kept whole to be read (ServerHello; a ticket, at
# most 2^16 - 1 bytes and its lifetime): every other is skipped by its length.
_MAX_KEPT = 4 + 6 + 0xFFFF
# How far a TLS 1.2 server's handshake is read after its ServerHello: the messages
# (a full one's Certificate, CertificateStatus, ServerKeyExchange, CertificateRequest,
# ServerHelloDone, NewSessionTicket: six) and the bytes (a certificate chain) a server
# sends, with room. Past either the reading stops, with what it issued forgotten (its
# resumption is reset later): a server that sent messages by the thousand, empty ones
# 4,096 to a record, or tickets without end held a worker's CPU and memory (a red
# team, session 49). Before the message that tells a resumption, stopping refuses.
MAX_SERVER_MESSAGES = 16
MAX_SERVER_BYTES = 256 * 1024
MAX_TICKETS = 4  # NewSessionTickets kept of one handshake: a server sends one
# A ServerHello's first bytes that tell a HelloRetryRequest: header, version, random.
_SERVER_HELLO_PREFIX = 4 + 2 + 32
# A scan looks at a candidate's first 7 bytes: record header, handshake type and the
# top byte of the hello's length. No server reads a hello over 2^17 bytes (OpenSSL's
# CLIENT_HELLO_MAX_LENGTH is 131396): a top byte over 2 is no hello, which keeps
# random bytes (an ssh session's) from passing for one about 85 times as often.
_CANDIDATE = 7
_MAX_HELLO_TOP = 2
# A candidate, matched at C speed: 0x16; a major version up to MAX_RECORD_MAJOR, any
# minor; a record length of 1 to MAX_RECORD; handshake type 1; then the top byte of
# the hello's length up to _MAX_HELLO_TOP, unless the record holds the type alone
# (the length is in the next record). tests/unit/test_hello_watch.py checks it
# against these constants.
_CANDIDATE_START = re.compile(
    rb"\x16[\x00-\x0f][\x00-\xff]"  # the record's type and version
    rb"(?:\x00\x01\x01[\x00-\xff]"  # 1 byte: the handshake type alone
    rb"|(?!\x00[\x00\x01])(?:[\x00-\x3f][\x00-\xff]|\x40\x00)"  # 2 to 2^14 bytes
    rb"\x01[\x00-\x02])"  # a ClientHello, its length's top byte
)

# The client's side: where its stream stands.
SCAN = "scan"  # looking for a ClientHello within the scan's window
FIRST = "first"  # a first ClientHello's records (tls: decided already; raw: to decide)
DECIDING = "deciding"  # a Decide is out: the gate answers (allowed(), or a reset)
HOLD = "hold"  # after the first hello: held until the server's first message
SECOND = "second"  # after a HelloRetryRequest: the second ClientHello's records
RESUMING = "resuming"  # a TLS 1.2 server resumed a session: a Resumed goes out
REFUSED = "refused"  # a Refuse is out: the caller resets
DONE = "done"  # past the plaintext phase: relay plainly
# The server's side.
IGNORED = "ignored"  # raw, before a hello went upstream: its bytes are its protocol's
READING = "reading"  # its answer to the hello: a ServerHello, or a HelloRetryRequest
TLS12 = "tls12"  # after a TLS 1.2 ServerHello: the next message tells a resumption
FULL = "full"  # a full TLS 1.2 handshake: read to its ChangeCipherSpec for tickets
RESUMED = "resumed"  # an abbreviated one: the same
SEEN = "seen"
_READ_ON = frozenset({TLS12, FULL, RESUMED})  # a TLS 1.2 handshake read to its end
_READING = _READ_ON | {READING}  # the server's bytes are read


@dataclass(frozen=True, slots=True)
class Decide:
    """A ClientHello the gate must decide before the upstream gets it."""

    hello: ClientHello
    second: bool  # after a HelloRetryRequest: it must name the first hello's server


@dataclass(frozen=True, slots=True)
class Resumed:
    """A TLS 1.2 (or older) server resumed a session (an abbreviated handshake). It
    serves the name that session was made for, which the SNI need not be: the gate
    must know the session as issued on a connection decided as this one before the
    client's next bytes go (proxy/tls_sessions.py)."""

    session_id: bytes  # the ServerHello's: it echoes the client's on a resumption


@dataclass(frozen=True, slots=True)
class Issued:
    """What a TLS 1.2 server gave this connection to resume its session by: the
    session id of a full handshake ("id") and the tickets it sent ("ticket"), for the
    gate to record. Said once the server's handshake reached its ChangeCipherSpec."""

    sessions: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Refuse:
    """What stands where a server reads a ClientHello cannot be decided: reset."""

    detail: str


class HelloWatch:
    """See the module docstring. `mode`: "tls" or "raw"."""

    __slots__ = (
        "client",
        "server",
        "held",
        "sent",
        "at",
        "hello_at",
        "offset",
        "decided_first",
        "retried",
        "window",
        "refusal",
        "go",
        "ready",
        "server_header",
        "server_left",
        "server_hs",
        "server_skip",
        "server_session",
        "resuming",
        "issued",
        "server_budget",
    )

    def __init__(self, mode: str):
        if mode not in ("tls", "raw"):
            raise ValueError(f"unknown watch mode {mode!r}")
        tls = mode == "tls"
        self.client = FIRST if tls else SCAN
        self.server = READING if tls else IGNORED
        self.decided_first = tls  # the gate decided the connection's first hello
        self.ready: bytes | None = None  # a first hello that came whole, to go on as it is
        self.held = bytearray()  # the client's bytes not yet sent on, but the first `sent`
        self.sent = 0  # at the head of `held`: bytes that went upstream already (a scan's)
        self.at = 0  # where in `held` the record parse stands
        self.hello_at = 0  # where in `held` its first record starts
        self.offset = 0  # the stream offset of held[0]
        self.window = MAX_FIRST_BYTES  # a scan's hello must start before this offset
        self.retried = False  # the hello out for a Decide answers a HelloRetryRequest
        self.refusal = ""
        self.go = 0  # held bytes before this are decided: they go on
        self.server_header = b""  # a server record header not yet whole
        self.server_left = 0  # bytes of the server's current record still to come
        self.server_hs = bytearray()  # a server handshake message kept (or its header)
        self.server_skip = 0  # bytes of a server handshake message still to skip
        self.server_session = b""  # a TLS 1.2 ServerHello's session id
        self.resuming = False  # the Decide out is a Resumed
        self.issued: list[tuple[str, bytes]] = []  # for an Issued, once the server's CCS came
        # After a TLS 1.2 ServerHello: (messages, bytes) the reading may still take
        self.server_budget = (MAX_SERVER_MESSAGES, MAX_SERVER_BYTES)

    @property
    def done(self) -> bool:
        return (
            self.client == DONE
            and not self.held
            and self.ready is None
            and self.server not in _READ_ON
            and not self.issued
        )

    @property
    def reads_server_only(self) -> bool:
        """The client's bytes are past the watch (nothing of theirs held); the server's
        are still read (a TLS 1.2 handshake, to its ChangeCipherSpec): the caller
        relays plainly, shows the watch what the server sends, and takes its `step()`
        (an Issued) until it is `done`."""
        return self.client == DONE and not self.held and self.ready is None

    @property
    def wants_client(self) -> bool:
        """Whether the client may be read now: held bytes under MAX_HELD, no answer out."""
        return len(self.held) < MAX_HELD and self.client not in (DECIDING, REFUSED)

    @property
    def waits_for_server(self) -> bool:
        return self.client == HOLD

    def feed_client(self, data: bytes) -> None:
        # FIRST with nothing held is a `tls` watch's start (a scan's hello is held).
        if self.client == FIRST and not self.held and lone_hello(data, len(data)):
            self.ready, self.client = data, HOLD  # the decided hello, as clients send it
            return
        self.held += data

    def feed_server(self, data) -> None:
        """Bytes the server sent (any bytes-like), read for its first handshake message
        and, after a TLS 1.2 ServerHello, on to its ChangeCipherSpec."""
        if self.server not in _READING:
            return
        if (
            self.server == READING
            and self.server_left == 0
            and not self.server_header
            and len(data) >= 5 + _SERVER_HELLO_PREFIX
            and data[0] == _HANDSHAKE
            and data[1] == 3
            and data[5] == _SERVER_HELLO
            and self.client is HOLD
        ):
            # The usual answer: a TLS 1.3 ServerHello, or a HelloRetryRequest, whole
            # in the first record. The rest (TLS 1.2) is read message by message below.
            record_end = 5 + ((data[3] << 8) | data[4])
            end = 9 + ((data[6] << 16) | (data[7] << 8) | data[8])
            if end <= record_end and end <= len(data) and end >= 5 + _SERVER_HELLO_PREFIX:
                if is_hello_retry_request(data, 5):
                    self.server = SEEN
                    self.client, self.hello_at = SECOND, self.at
                    return
                try:
                    tls13, session = read_server_hello(data[5:end])
                except ValueError:
                    tls13, session = False, None  # read again below, and refused there
                if tls13:
                    self.server, self.client = SEEN, DONE
                    return
                if session is not None:  # TLS 1.2: the rest of its record read on below
                    self.server, self.server_session = TLS12, session
                    if _whole_first_flight(data, end, record_end):
                        # A full handshake (a new session, for the name sent), its flight
                        # to ServerHelloDone in this read: nothing in it to read. The
                        # next read starts a record: the tickets, the ChangeCipherSpec.
                        self.server, self.client = FULL, DONE
                        return
                    self.server_left = record_end - end
                    data = memoryview(data)[end:]
        if self.server in _READ_ON:
            messages, left = self.server_budget
            self.server_budget = (messages, left - len(data))
            if left < len(data):
                self._server_past_budget(f"{MAX_SERVER_BYTES} bytes")
                return
        view = memoryview(data)
        while view and self.server in _READING:
            if self.server_left == 0:
                if self.server_header or len(view) < 5:
                    need = 5 - len(self.server_header)
                    header = self.server_header + bytes(view[:need])
                else:
                    need, header = 5, view[:5]  # the usual: a whole header, not copied
                view = view[need:]
                kind = header[0]
                if (len(header) > 1 and header[1] != 3) or not (
                    kind in (_HANDSHAKE, _ALERT) or (kind == _CCS and self.server != READING)
                ):
                    # Told by its first bytes (PostgreSQL's one-byte 'N'): no TLS.
                    self._server_not_tls(f"a record header {header.hex()}")
                    return
                if len(header) < 5:
                    self.server_header = header
                    return
                self.server_header = b""
                self.server_left = (header[3] << 8) | header[4]
                if not 0 < self.server_left <= _MAX_PAYLOAD:
                    self._server_not_tls(f"a record header {header.hex()}")
                    return
                if kind == _ALERT:
                    # The server refuses the hello: it ends; what the client holds stays.
                    self.server = SEEN
                    return
                if kind == _CCS:
                    self._server_changed_cipher()
                    return
                size = self.server_left
                if (
                    size <= len(view)
                    and size >= 4
                    and not self.server_skip
                    and not self.server_hs
                    and ((view[1] << 16) | (view[2] << 8) | view[3]) == size - 4
                ):
                    # The usual record: one whole message (servers send each of a
                    # TLS 1.2 flight so), read without gathering it.
                    self.server_left = 0
                    if self._server_message(view[0], size - 4):
                        self._server_kept(bytes(view[:size]))
                    self.server_skip = 0
                    self.server_hs.clear()
                    view = view[size:]
                    continue
            take = view[: self.server_left]
            view = view[len(take) :]
            self.server_left -= len(take)
            self._server_handshake(take)

    def _server_handshake(self, data: memoryview) -> None:
        """The server's handshake bytes, message by message: the ServerHello and
        tickets kept whole and read, the rest skipped by their length."""
        hs = self.server_hs
        while data and self.server in _READING:
            if self.server_skip:
                n = min(self.server_skip, len(data))
                self.server_skip -= n
                data = data[n:]
                continue
            if len(hs) < 4:
                n = 4 - len(hs)
                hs += data[:n]
                data = data[n:]
                if len(hs) < 4 or not self._server_message(hs[0], int.from_bytes(hs[1:4], "big")):
                    continue
            end = 4 + int.from_bytes(hs[1:4], "big")
            n = end - len(hs)
            hs += data[:n]
            data = data[n:]
            if len(hs) == end:
                self._server_kept(bytes(hs))
                hs.clear()

    def _server_message(self, kind: int, size: int) -> bool:
        """A server handshake message starts (its header read): True to keep it whole
        (`_server_kept` reads it), False when it is skipped, or its kind ended the
        watch's reading."""
        if self.server == READING:
            if kind != _SERVER_HELLO:
                self._server_refused(f"a handshake message of type {kind}")
            elif size < _SERVER_HELLO_PREFIX - 4:
                self._server_refused("a ServerHello too short for its random")
            elif self.client != HOLD:
                self._server_refused("a ServerHello before the ClientHello had gone")
            elif 4 + size > _MAX_KEPT:
                self._refuse_server(f"a ServerHello of {size} bytes")
            else:
                return True
            return False
        messages, left = self.server_budget
        if messages == 0:
            self._server_past_budget(f"{MAX_SERVER_MESSAGES} handshake messages")
            return False
        self.server_budget = (messages - 1, left)
        if self.server == TLS12:
            if kind in _FULL_HANDSHAKE:
                self.server = FULL  # a new session, for the name the client sent
                if self.client == HOLD:
                    self.client = DONE
            elif kind == _NEW_SESSION_TICKET:
                self._server_resumed()
            else:
                self._refuse_server(
                    f"a handshake message of type {kind} after a TLS 1.2 ServerHello"
                )
                return False
        if kind == _NEW_SESSION_TICKET and 4 + size <= _MAX_KEPT and len(self.issued) < MAX_TICKETS:
            return True
        self.server_hs.clear()
        self.server_skip = size
        return False

    def _server_kept(self, message: bytes) -> None:
        """A kept server handshake message, whole."""
        if message[0] == _NEW_SESSION_TICKET:
            # lifetime_hint (4), then the ticket<0..2^16-1> (RFC 5077 3.3)
            if len(message) > 10 and 10 + ((message[8] << 8) | message[9]) == len(message):
                self.issued.append(("ticket", message[10:]))
            return
        if is_hello_retry_request(message):
            self.server = SEEN
            self.client, self.hello_at = SECOND, self.at
            return
        try:
            tls13, self.server_session = read_server_hello(message)
        except ValueError as e:
            self._refuse_server(f"a ServerHello that cannot be parsed: {e}")
            return
        if tls13:
            self.server, self.client = SEEN, DONE
        else:
            self.server = TLS12  # held on: a resumption is told by the next message

    def _server_changed_cipher(self) -> None:
        """The server's ChangeCipherSpec: what follows is encrypted; the reading ends."""
        if self.server == TLS12:
            self._server_resumed()  # nothing but a ChangeCipherSpec after its ServerHello
        elif self.server == FULL and self.server_session:
            self.issued.append(("id", self.server_session))
        self.server = SEEN

    def _server_past_budget(self, what: str) -> None:
        """A TLS 1.2 server's handshake went on past MAX_SERVER_MESSAGES or
        MAX_SERVER_BYTES after its ServerHello: no longer read, what it issued
        forgotten; a client still held (no resumption told yet) is refused."""
        self.issued.clear()
        self._refuse_server(f"a TLS 1.2 handshake of more than {what} after its ServerHello")

    def _server_resumed(self) -> None:
        self.server = RESUMED
        if self.client == HOLD:
            self.client = RESUMING

    def _refuse_server(self, detail: str) -> None:
        """What the server answered cannot be told safe: the client's bytes never go."""
        self.server = SEEN
        if self.client != DONE:
            self._refuse(detail)

    def _server_not_tls(self, what: str) -> None:
        """A server record that is not TLS's: an answer that is no TLS at all, or,
        after a TLS 1.2 ServerHello, one no resumption can be told from."""
        if self.server == READING:
            self._server_refused(what)
        else:
            self._refuse_server(f"{what} after a TLS 1.2 ServerHello")

    def _server_refused(self, what: str) -> None:
        """The server's answer to the hello is not TLS (`what` it is): no retry is
        told, so the client's bytes from here are scanned as raw TCP's are, in a
        window of their own (what is held, and MAX_FIRST_BYTES after it), and a hello
        among them is decided as a second one. A hello being assembled is looked for
        again from its start."""
        self.server = SEEN
        if self.client in (FIRST, HOLD):
            self.client, self.at, self.hello_at = SCAN, 0, 0
            self.window = self.offset + len(self.held) + MAX_FIRST_BYTES

    def allowed(self) -> None:
        """The gate allowed the hello `step()` returned: it goes on."""
        if self.client != DECIDING:
            raise RuntimeError(f"allowed() in state {self.client}, not after a Decide")
        if self.resuming:  # the gate knows the session resumed: the client's bytes go
            self.resuming, self.client = False, DONE
            return
        self.go = self.at
        if self.retried:  # the answer to a HelloRetryRequest: the plaintext phase is over
            self.client = DONE
            return
        # A first hello, or one a scan found after an answer that was not TLS: held
        # behind until the server's answer to it, read afresh.
        self.client, self.decided_first, self.server = HOLD, True, READING
        self.server_header, self.server_left, self.server_skip = b"", 0, 0
        self.server_hs.clear()

    def abandon(self) -> None:
        """The client's stream ended: what is held and undecided never goes upstream."""
        self.held.clear()
        self.ready, self.sent, self.at, self.hello_at = None, 0, 0, 0
        self.client = DONE

    def step(self) -> bytes | Decide | Resumed | Issued | Refuse | None:
        """What to do next; see the module docstring."""
        if self.ready is not None:
            data, self.ready = self.ready, None
            return data
        if self.go:
            end, self.go = self.go, 0
            if data := self._release(end):
                return data
        client = self.client
        if client in (FIRST, SECOND):
            return self._assemble()
        if client == SCAN:
            return self._scan()
        if client == DONE:
            if self.held:
                return self._release(len(self.held))
            if self.issued and self.server == SEEN:
                issued, self.issued = tuple(self.issued), []
                return Issued(issued)
            return None
        if client == RESUMING:
            self.client, self.resuming = DECIDING, True
            return Resumed(self.server_session)
        if client == REFUSED:
            return Refuse(self.refusal)
        return None  # HOLD, DECIDING: the server, or the gate, is to answer

    # --- the client's bytes ---------------------------------------------------------------

    def _release(self, end: int) -> bytes | None:
        """The bytes of `held` before `end` not sent yet, taken out of `held`."""
        held = self.held
        data = bytes(held[self.sent : end]) if end > self.sent else b""
        del held[:end]
        self.offset += end
        self.sent = max(0, self.sent - end)
        self.at = max(0, self.at - end)
        self.hello_at = max(0, self.hello_at - end)
        return data or None

    def _scan(self) -> bytes | None:
        held = self.held
        limit = self.window - self.offset  # a hello must start before the window ends
        found = _CANDIDATE_START.search(held, 0, limit + _CANDIDATE - 1)
        if found is not None:
            data = self._release(found.start())
            self.client, self.at, self.hello_at = FIRST, 0, 0
            return data or self._assemble()
        if len(held) >= limit + _CANDIDATE - 1:
            self.client = DONE  # no hello starts within the window
            return self._release(len(held))
        # Nothing yet. All goes on, so that no protocol stalls on a held byte; the last
        # bytes are kept (as sent) to be looked at again with what comes next.
        keep = max(0, len(held) - (_CANDIDATE - 1))
        data = bytes(held[self.sent :])
        del held[:keep]
        self.offset += keep
        self.sent = len(held)
        return data or None

    def _assemble(self) -> bytes | Decide | Refuse | None:
        """Records from `at`: a ClientHello's, whole in one record; in SECOND, the
        ChangeCipherSpec, alert and early-data records before it go on."""
        held = self.held
        at = self.at
        if len(held) < at + 5:
            return self._too_long()
        kind, size = held[at], (held[at + 3] << 8) | held[at + 4]
        if held[at + 1] > MAX_RECORD_MAJOR or not 0 < size <= _MAX_PAYLOAD:
            return self._refuse(
                f"a record header {bytes(held[at : at + 5]).hex()} where the server reads "
                "a ClientHello"
            )
        if kind != _HANDSHAKE:
            if self.client == FIRST or kind not in (_CCS, _ALERT, _APPLICATION_DATA):
                return self._refuse(f"a record of type {kind} where the server reads a ClientHello")
            if len(held) < at + 5 + size:
                return None
            self.at = self.hello_at = at + 5 + size
            return self._release(self.at)  # before the second hello: it goes on
        if size > MAX_RECORD:
            return self._refuse(f"a handshake record of {size} bytes")
        if (held[at + 1] << 8 | held[at + 2]) not in RECORD_VERSIONS:
            return self._refuse(
                f"a ClientHello in a record of version {bytes(held[at + 1 : at + 3]).hex()}"
            )
        if len(held) < at + 5 + size:
            return self._too_long()
        hs = held[at + 5 : at + 5 + size]  # the whole hello, as clienthello.py reads one
        self.at = at + 5 + size
        if hs[0] != _CLIENT_HELLO:
            return self._refuse(
                f"a handshake message of type {hs[0]} where the server reads a ClientHello"
            )
        end = 4 + int.from_bytes(hs[1:4], "big") if len(hs) >= 4 else None
        if end is not None and end > MAX_FIRST_BYTES:
            return self._refuse(f"a ClientHello of {end} bytes, over {MAX_FIRST_BYTES}")
        if end is None or len(hs) < end:
            return self._refuse(SPLIT_HELLO)
        if len(hs) > end:
            return self._refuse("handshake bytes after the ClientHello in its record")
        return self._whole(bytes(hs[4:end]))

    def _whole(self, body: bytes) -> bytes | Decide | Refuse | None:
        if self.client == FIRST and self.decided_first and self.server == READING:
            self.client = HOLD  # tls: the first hello, which the gate decided: it goes on
            return self._release(self.at)
        try:
            hello = client_hello_of(body)
        except ValueError as e:
            return self._refuse(f"an unparseable ClientHello: {e}")
        self.retried = self.client == SECOND
        self.client = DECIDING
        return Decide(hello, second=self.decided_first)

    def _too_long(self) -> Refuse | None:
        if len(self.held) - self.hello_at > MAX_FIRST_BYTES + 64:
            return self._refuse(f"no whole ClientHello within {MAX_FIRST_BYTES} bytes")
        return None

    def _refuse(self, detail: str) -> Refuse:
        self.client, self.refusal = REFUSED, detail
        return Refuse(detail)


def _whole_first_flight(data, end: int, record_end: int) -> bool:
    """Whether `data`, a TLS 1.2 ServerHello's read (the hello ends at `end`, its
    record at `record_end`), holds a full handshake's first flight whole: the next
    message is one only a full handshake sends (Certificate...), and the read ends
    with a ServerHelloDone record, as servers send it. Were those last bytes not a
    record of their own, the reading after loses its place: what the server issues
    is not recorded, and its resumption is refused (it fails closed)."""
    n = len(data)
    if n < record_end + 6 + 9:
        return False
    after = data[end] if end < record_end else data[record_end + 5]
    return (
        after in _FULL_HANDSHAKE
        and (end < record_end or data[record_end] == _HANDSHAKE)
        and data[n - 9] == _HANDSHAKE
        and data[n - 8] == 3
        and data[n - 6 : n] == _SERVER_HELLO_DONE_RECORD_END
    )


_SERVER_HELLO_DONE_RECORD_END = b"\x00\x04\x0e\x00\x00\x00"  # length 4: type 14, length 0


def lone_hello(data, n: int) -> bool:
    """Whether the first `n` bytes of `data` (any bytes-like) are one handshake record
    holding one whole ClientHello and nothing else: a decided first hello as clients
    send it, which goes on as it is."""
    return (
        n > 9
        and data[0] == _HANDSHAKE
        and data[5] == _CLIENT_HELLO
        and n == 5 + ((data[3] << 8) | data[4]) == 9 + ((data[6] << 16) | (data[7] << 8) | data[8])
    )
