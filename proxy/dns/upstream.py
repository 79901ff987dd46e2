"""Asking an upstream resolver over UDP through a few shared sockets.

`dns.asyncquery.udp` opens a socket and an asyncio endpoint for every query: about
a sixth of an allowed query's time. `UdpUpstream` keeps a few connected sockets
open instead and matches replies to queries by id, without giving up what makes
a forwarder hard to poison (RFC 5452):

- every query gets a random id (`secrets`), unique among those in flight on its
  socket, on one of `size` sockets picked at random;
- a socket is retired after `max_uses` queries or `max_age` seconds, so a source
  port (the kernel picks it at random) is never used for long; a retired socket
  closes once its last query is answered or has timed out;
- a socket is connected, so the kernel drops datagrams from any other address;
  a reply is taken only with the id of a query in flight, QR set and the same
  question (name compared case-insensitively, type and class exactly); anything
  else is ignored and the query keeps waiting, as `ignore_unexpected` does.

`tcp_ask` asks over TCP (after a truncated UDP answer) with the same checks.

An answer is size-checked before anything parses it (`MAX_ANSWER_BYTES`): the
answers the filter passes on (address records, CNAME chains, HTTPS) fit in a few
hundred bytes, but a hostile resolver's 64 KiB of pointer-chained names costs
dnspython tens of ms of the event loop to parse. A bigger answer fails the query
with `AnswerTooLarge` (the filter answers SERVFAIL and says why in the event);
over TCP the length prefix is enough, the body is never read.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable

from sandgate.proxy.dns.wire import end_of_question

# The largest upstream answer parsed, UDP or TCP (we advertise 1232 bytes over UDP;
# a resolver that sends more is tolerated up to here). The same bound as a query's
# (query.MAX_QUERY_BYTES): about 8 ms of dnspython for the worst-shaped message.
MAX_ANSWER_BYTES = 4096
MAX_DATAGRAM = 65535
ID_BATCH = 256  # random query ids drawn at once (`UdpUpstream._random_id`)

OnReply = Callable[["bytes | Exception"], None]
"""`on_reply(reply or the exception that ended the wait)` (`UdpUpstream.send`)."""

log = logging.getLogger("sandgate.dns")


class AnswerTooLarge(Exception):
    """The upstream's answer to a query in flight is over MAX_ANSWER_BYTES; the
    message says how big it was (or announced itself, over TCP)."""

    def __init__(self, size: int):
        super().__init__(f"an answer of {size} bytes; at most {MAX_ANSWER_BYTES} are taken")
        self.size = size


class _Socket:
    __slots__ = ("sock", "pending", "uses", "born", "retired")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        # id (2 bytes) -> (the query's `on_reply`, its question section as sent, its
        # number: an id is reused once its query is over)
        self.pending: dict[bytes, tuple[OnReply, bytes, int]] = {}
        self.uses = 0
        self.born = time.monotonic()
        self.retired = False


class UdpUpstream:
    """Connected UDP sockets to one resolver at (`host`, `port`), for one event loop.

    `send` takes a callback, not a future: the filter answers the common query in it,
    without a task of its own (proxy/dns/server.py, `_forward_soon`); `ask` is the
    same for a coroutine. Deadlines are kept in one heap with one loop timer, not a
    timer handle per query."""

    def __init__(
        self,
        host: str,
        port: int = 53,
        *,
        size: int = 4,
        max_uses: int = 64,
        max_age: float = 1.0,
        around_read: Callable[..., None] | None = None,
    ):
        self.address = (host, port)
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.size, self.max_uses, self.max_age = size, max_uses, max_age
        self._sockets: list[_Socket | None] = [None] * size
        self._draining: set[_Socket] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = b""  # unused random query ids (`_random_id`)
        self._buffer = bytearray(MAX_DATAGRAM)  # every reply is read into it (`_readable`)
        # (deadline, number, socket, id) of every query sent; answered ones stay until
        # their deadline and are passed over then (`_expire`).
        self._deadlines: list[tuple[float, int, _Socket, bytes]] = []
        self._numbers = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        # A socket's pass of replies (`_readable`) is run as `around_read(_readable,
        # socket)`: the filter answers what the pass made at its end.
        self._around_read = around_read

    def send(self, wire: bytes, timeout: float, on_reply: OnReply) -> tuple[_Socket, bytes, int]:
        """Send the query `wire` (its id replaced). `on_reply` is called once, from the
        loop, with the reply or with what ended the wait: TimeoutError after `timeout`
        seconds, OSError when the socket fails (e.g. ICMP unreachable), AnswerTooLarge,
        ConnectionAbortedError at `close`. Returns a token for `forget`. Raises
        OSError only when no socket can be opened."""
        entry = self._pick()
        qid = self._random_id()
        while qid in entry.pending:
            qid = self._random_id()
        number = next(self._numbers)
        entry.pending[qid] = (on_reply, wire[12 : end_of_question(wire)], number)
        entry.uses += 1
        deadline = self._loop.time() + timeout
        heapq.heappush(self._deadlines, (deadline, number, entry, qid))
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)
        try:
            entry.sock.send(qid + wire[2:])
        except OSError as e:
            self._loop.call_soon(self._end, entry, qid, number, e)
        return entry, qid, number

    async def ask(self, wire: bytes, timeout: float) -> bytes:
        """`send`, awaited: the reply, or the exception `send` would give `on_reply`."""
        future = asyncio.get_running_loop().create_future()

        def settle(result: bytes | Exception) -> None:
            if future.done():
                return
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

        token = self.send(wire, timeout, settle)
        try:
            return await future
        except asyncio.CancelledError:
            self.forget(token)
            raise

    def forget(self, token: tuple[_Socket, bytes, int]) -> None:
        """The query `send` returned `token` for is no longer awaited."""
        entry, qid, number = token
        waiting = entry.pending.get(qid)
        if waiting is not None and waiting[2] == number:
            self._settle(entry, qid)

    def _random_id(self) -> bytes:
        """Two bytes of the kernel's CSPRNG (RFC 5452), ID_BATCH ids drawn at once: one
        getrandom(2) per query was a syscall per query."""
        if not self._ids:
            self._ids = secrets.token_bytes(2 * ID_BATCH)
        qid, self._ids = self._ids[:2], self._ids[2:]
        return qid

    def close(self) -> None:
        """Close every socket; queries still waiting get ConnectionAbortedError."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        for entry in [*filter(None, self._sockets), *self._draining]:
            for qid, (_, _, number) in list(entry.pending.items()):
                self._end(entry, qid, number, ConnectionAbortedError("upstream closed"))
            self._close(entry)
        self._sockets = [None] * self.size

    def _end(self, entry: _Socket, qid: bytes, number: int, result) -> None:
        """The query `number` (id `qid` on `entry`) is over with `result`, unless it was
        over already."""
        waiting = entry.pending.get(qid)
        if waiting is None or waiting[2] != number:
            return
        self._settle(entry, qid)
        try:
            waiting[0](result)
        except Exception:  # noqa: BLE001 - one query's failure must not stop the others'
            log.exception("DNS upstream reply handling failed")

    def _settle(self, entry: _Socket, qid: bytes) -> None:
        del entry.pending[qid]
        if entry.retired and not entry.pending:
            self._close(entry)

    def _expire(self) -> None:
        """Fail each query past its deadline with TimeoutError; the timer for the next.
        Nearly every deadline is an answered query's: passed over here, without an
        exception made for it or a call (`_end` would pass it over too)."""
        self._timer = None
        now, deadlines = self._loop.time(), self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, number, entry, qid = heapq.heappop(deadlines)
            waiting = entry.pending.get(qid)
            if waiting is not None and waiting[2] == number:
                self._end(entry, qid, number, TimeoutError("no answer from the upstream"))
        if deadlines and self._timer is None:
            self._timer = self._loop.call_at(deadlines[0][0], self._expire)

    def _pick(self) -> _Socket:
        # Not a secret (the query id and the source port are): `random.random` is one C
        # call, `randrange` four Python ones.
        slot = int(random.random() * self.size)
        entry = self._sockets[slot]
        if entry is not None and (
            entry.uses >= self.max_uses or time.monotonic() - entry.born > self.max_age
        ):
            entry.retired = True
            if entry.pending:
                self._draining.add(entry)
            else:
                self._close(entry)
            entry = None
        if entry is None:
            entry = self._sockets[slot] = self._open()
        return entry

    def _open(self) -> _Socket:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.address)  # an ephemeral port the kernel picks at random
        except OSError:
            sock.close()
            raise
        entry = _Socket(sock)
        self._loop = asyncio.get_running_loop()
        if self._around_read is None:
            self._loop.add_reader(sock.fileno(), self._readable, entry)
        else:
            self._loop.add_reader(sock.fileno(), self._around_read, self._readable, entry)
        return entry

    def _close(self, entry: _Socket) -> None:
        self._draining.discard(entry)
        if entry.sock.fileno() >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(entry.sock.fileno())
            entry.sock.close()

    def _readable(self, entry: _Socket) -> None:
        # Into one buffer, copied out at its size: `recv(65535)` allocated 64 KiB a
        # reply and gave most of it back, three syscalls (mmap, mremap, munmap) a query.
        view = memoryview(self._buffer)
        while entry.sock.fileno() >= 0:  # a reply's handling may retire and close it
            try:
                size = entry.sock.recv_into(view)
                reply = bytes(view[:size])
            except BlockingIOError:
                return
            except OSError as e:  # ICMP port unreachable and the like: fail fast
                for qid, (_, _, number) in list(entry.pending.items()):
                    self._end(entry, qid, number, e)
                return
            waiting = entry.pending.get(reply[:2])
            if waiting is None or not answers(reply, waiting[1]):
                continue
            result = AnswerTooLarge(len(reply)) if len(reply) > MAX_ANSWER_BYTES else reply
            self._end(entry, reply[:2], waiting[2], result)


def answers(reply: bytes, question: bytes) -> bool:
    """Whether `reply` (its id already matched) is a response with one question,
    the question section `question` as sent (name compared case-insensitively,
    type and class exactly). Reads only the header and the question."""
    if len(reply) < 12 + len(question) or not reply[2] & 0x80 or reply[4:6] != b"\0\x01":
        return False
    asked = reply[12 : 12 + len(question)]
    if asked == question:  # as sent: what nearly every resolver echoes
        return True
    return asked[:-4].lower() == question[:-4].lower() and asked[-4:] == question[-4:]


async def tcp_ask(wire: bytes, host: str, port: int, timeout: float) -> bytes:
    """Send the query `wire` (its id replaced by a random one) over a new TCP
    connection and return the answer. Raises TimeoutError, OSError, EOFError
    (the connection ended early), AnswerTooLarge (announced by the length prefix:
    the body is not read), or ValueError (a reply to another id or question)."""
    qid = secrets.randbits(16).to_bytes(2, "big")
    question = wire[12 : end_of_question(wire)]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(wire).to_bytes(2, "big") + qid + wire[2:])
            await writer.drain()
            try:
                size = int.from_bytes(await reader.readexactly(2), "big")
                if size > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(size)
                reply = await reader.readexactly(size)
            except asyncio.IncompleteReadError as e:
                raise EOFError("the upstream closed the connection mid-answer") from e
        finally:
            writer.close()
    if reply[:2] != qid or not answers(reply, question):
        raise ValueError("the upstream answered another query over TCP")
    return reply
