"""Relaying an allowed pass-through connection: bytes moved between two
non-blocking sockets as their epoll events say they can, with back-pressure (the
other side is not read while bytes wait to be written), half-close (a FIN goes on
as a write shutdown), a reset passed on as a reset, and the bytes counted for the
connection's end event. One read buffer, the door's, serves every relay: handlers
run one at a time, and what a reader cannot take at once is copied out of it.

Fairness: a relay moves at most `WAKEUP_BUDGET` bytes per wakeup. Reading on while
reads come back full would let one fast connection (both its ends keeping up) hold
the event loop for as long as it likes; past the budget the relay stops with the
socket still marked readable and asks its owner (`defer`) to pump again on a later
loop iteration, behind whatever else became ready meanwhile. Edge-triggered epoll
would not report those unread bytes again, so the deferred pump is what resumes
them.

Until its handshake is past the plaintext phase, a relay may carry a `HelloWatch`
(hello_watch.py): the client's bytes then go through it (held, or decided by the
gate through `judge`, before the upstream gets them) and the server's are shown to
it; once it is done the relay drops it and moves bytes as above."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable

from sandgate.proxy.frontdoor.hello_watch import (
    FIRST,
    HOLD,
    MAX_HELD,
    Decide,
    HelloWatch,
    Issued,
    Refuse,
    Resumed,
    lone_hello,
)
from sandgate.proxy.frontdoor.poller import CLOSED, IN, OUT
from sandgate.proxy.gate import ConnState

RELAY_CHUNK = 256 * 1024  # bytes per recv, as asyncio's transports read
# Bytes one relay moves per wakeup, both directions together: about a ms of copying,
# so a bulk transfer takes turns with every other connection instead of a loop.
WAKEUP_BUDGET = 4 * RELAY_CHUNK
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class End:
    """One socket of a relayed connection, with what its last events said. The
    bytes in `pending` were read from the other end and wait for this socket to
    take them; until it has, the other end is not read (back-pressure)."""

    __slots__ = ("sock", "fd", "readable", "writable", "closing", "eof", "pending")

    def __init__(self, sock: socket.socket, readable: bool, writable: bool, closing: bool = False):
        self.sock, self.fd = sock, sock.fileno()
        self.readable, self.writable = readable, writable
        self.closing = closing  # its peer shut down or reset: read on until the end
        self.eof = False  # read to its end (FIN)
        self.pending: bytes | None = None


def note(end: End, events: int) -> None:
    """What an event says about a socket: readable, writable, its peer gone."""
    if events & CLOSED:
        end.readable = end.writable = end.closing = True
        return
    if events & IN:
        end.readable = True
    if events & OUT:
        end.writable = True


class Relay:
    """Both directions between `client` and `upstream`. `finish(problem, reset=...)`
    ends the connection (its owner's); `clock` stamps `last_active` for the idle
    timeout; `defer()` asks the owner to call `pump` again soon (a later loop
    iteration): the relay stopped on its `WAKEUP_BUDGET` with bytes left to read."""

    __slots__ = (
        "client",
        "upstream",
        "state",
        "buffer",
        "view",
        "clock",
        "finish",
        "defer",
        "last_active",
        "budget",
        "deferred",
        "watch",
        "judge",
    )

    def __init__(
        self,
        client: End,
        upstream: End,
        state: ConnState,
        buffer: bytearray,
        clock: Callable[[], float],
        finish: Callable[..., None],
        defer: Callable[[], None],
    ):
        self.client, self.upstream, self.state = client, upstream, state
        self.buffer, self.view = buffer, memoryview(buffer)
        self.clock, self.finish, self.defer = clock, finish, defer
        self.last_active = clock()
        self.budget = WAKEUP_BUDGET  # bytes left to read in this wakeup
        self.deferred = False  # a pump is asked for already
        # The plaintext phase's watch (hello_watch.py), None once past it or never; and
        # `judge(step)`, the owner's: asks the gate about a Decide or a Resumed (True: it
        # may go on), tells it an Issued, or reports a Refuse (the relay then resets).
        self.watch: HelloWatch | None = None
        self.judge: Callable[[Decide | Resumed | Issued | Refuse], bool] | None = None

    def pump(self) -> None:
        """Move what either side has, up to the budget; finish once both directions
        ended cleanly."""
        watch = self.watch
        if watch is not None and not watch.reads_server_only:
            self.pump_watched()
            return
        self.budget, self.deferred = WAKEUP_BUDGET, False
        c, u = self.client, self.upstream
        if not (self.move(c, u, up=True) and self.move(u, c, up=False)):
            return
        if watch is not None:  # a TLS 1.2 server's handshake, read on (`move` shows it)
            if isinstance(step := watch.step(), Issued):
                self.judge(step)
            if watch.done:
                self.watch = None
        if c.eof and u.eof and c.pending is None and u.pending is None:
            self.finish(None)

    def move(self, src: End, dst: End, up: bool) -> bool:
        """Move what src has to dst until one of them would block. False when the
        connection ended (a reset, passed on to the other end)."""
        while True:
            if dst.pending is not None:
                if not self.flush(dst):
                    return False
                if dst.pending is not None:
                    return True
                if src.eof:
                    return self.shut(dst)
            if not src.readable or src.eof:
                return True
            if self.budget <= 0:  # this wakeup's share is used: later, after the others
                if not self.deferred:
                    self.deferred = True
                    self.defer()
                return True
            try:
                n = src.sock.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                src.readable = False
                return True
            except OSError:  # reset: pass it on
                self.finish(None, reset=True)
                return False
            if n == 0:
                src.eof, src.readable = True, False
                return self.shut(dst)
            self.budget -= n
            if up:
                self.state.bytes_up += n
            else:
                self.state.bytes_down += n
                if self.watch is not None:  # the server's answer to a hello: shown to the watch
                    self.watch.feed_server(self.view[:n])
            self.last_active = self.clock()
            try:
                sent = dst.sock.send(self.view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.finish(None, reset=True)
                return False
            if sent < n:
                dst.pending, dst.writable = bytes(self.view[sent:n]), False
                return True
            if n < RELAY_CHUNK and not src.closing:
                # Read less than asked: drained. Bytes arriving later raise a new
                # event (edge-triggered epoll reports every arrival). A FIN that
                # came with the last event raises none: `closing` reads on to it.
                src.readable = False
                return True

    def pump_watched(self) -> None:
        """`pump` while the watch is on: the server's bytes move as ever (the watch
        reads them), the client's go through the watch, and upstream only as it
        releases them; a hello it finds is decided (`judge`) before it goes."""
        self.budget, self.deferred = WAKEUP_BUDGET, False
        c, u, watch = self.client, self.upstream, self.watch
        if not self.move(u, c, up=False):
            return
        # The usual TLS handshake, without the watch's general steps: its first hello
        # whole in one read, then the server's ServerHello (read in `move`).
        state = watch.client
        if state is FIRST:
            if c.readable and not watch.held and u.pending is None:
                if not self.first_hello(c, u, watch):
                    return
                if watch.client is HOLD and not (watch.held or c.readable) and u.pending is None:
                    return
        elif state is HOLD and not (watch.held or c.readable) and u.pending is None:
            return  # the server is to answer; the client sent nothing since
        elif watch.done:
            self.unwatch()
            return
        while True:
            if u.pending is not None:
                if not self.flush(u):
                    return
                if u.pending is not None:
                    break  # the upstream takes no more now: its OUT event resumes
            step = watch.step()
            if step is None:
                if c.eof and not (watch.waits_for_server and watch.held):
                    # Nothing more will come: an undecided hello's start never goes.
                    watch.abandon()
                if watch.done:
                    self.unwatch()
                    return
                if watch.reads_server_only:
                    self.pump()  # the client's bytes move plainly from here
                    return
                if not (c.readable and watch.wants_client) or c.eof:
                    break
                if not self.take(c, watch):
                    return
                continue
            if isinstance(step, bytes):
                u.pending = step
                continue
            if isinstance(step, Issued):
                self.judge(step)
                continue
            if isinstance(step, (Decide, Resumed)) and self.judge(step):
                watch.allowed()
                continue
            if isinstance(step, Refuse):
                self.judge(step)
            self.finish(None, reset=True)  # the gate denied it and said why
            return
        if c.eof and u.eof and c.pending is None and u.pending is None:
            self.finish(None)

    def unwatch(self) -> None:
        """The watch is done: a plain relay from here. After the server's bytes moved,
        the client's move (a FIN that came goes on); the connection finishes once
        both directions ended."""
        self.watch = None
        c, u = self.client, self.upstream
        if c.eof and u.pending is None and not self.shut(u):
            return
        if self.move(c, u, up=True) and c.eof and u.eof and c.pending is None and u.pending is None:
            self.finish(None)

    def first_hello(self, c: End, u: End, watch: HelloWatch) -> bool:
        """Read the client's first bytes: the decided hello, whole in one record and
        alone, goes on from the read buffer (the watch then waits for the server);
        anything else goes to the watch. False when the connection ended."""
        n = self.read_client(c, RELAY_CHUNK)
        if not n:
            return n is not None
        if not lone_hello(self.buffer, n):
            watch.feed_client(bytes(self.view[:n]))
            return True
        watch.client = HOLD
        u.pending = bytes(self.view[:n])
        return self.flush(u)

    def take(self, c: End, watch: HelloWatch) -> bool:
        """Read what the client has into the watch. False when the connection ended."""
        n = self.read_client(c, MAX_HELD - len(watch.held))  # what is held stays bounded
        if n:
            watch.feed_client(bytes(self.view[:n]))
        return n is not None

    def read_client(self, c: End, size: int) -> int | None:
        """One read of at most `size` bytes from the client into the read buffer (the
        watched path's; `move` reads inline): how many (0: none now, or its end,
        `c.eof`), None when the connection ended (a reset, passed on)."""
        try:
            n = c.sock.recv_into(self.buffer, size)
        except (BlockingIOError, InterruptedError):
            c.readable = False
            return 0
        except OSError:  # reset: pass it on
            self.finish(None, reset=True)
            return None
        if n == 0:
            c.eof, c.readable = True, False
            return 0
        self.state.bytes_up += n
        self.last_active = self.clock()
        if n < size and not c.closing:
            c.readable = False
        return n

    def flush(self, dst: End) -> bool:
        """Send what waits for `dst`. False when the connection ended."""
        if not dst.writable:
            return True
        try:
            sent = dst.sock.send(dst.pending)
        except (BlockingIOError, InterruptedError):
            dst.writable = False
            return True
        except OSError:
            self.finish(None, reset=True)
            return False
        if sent < len(dst.pending):
            dst.pending, dst.writable = dst.pending[sent:], False
        else:
            dst.pending = None
        return True

    def shut(self, dst: End) -> bool:
        # Half-close: the FIN goes on; the other direction stays open until it ends too.
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish(None, reset=True)
            return False
        return True


class Lingering:
    """Sockets closed the way a client still reads what it was sent (nginx's
    lingering close): a refusal answered while the client is still sending (a 431 for
    a 1 MB head, a 403 for a denied upload) and then closed with its bytes unread
    sends a reset, and the client's send fails before it reads the answer. So the
    write side is shut (the answer ends with a FIN), what arrives is read and dropped
    until the client ends, LINGER_S pass or LINGER_BYTES were dropped, then closed.
    At most MAX_LINGERING at once (descriptors are a budget): beyond, `close_read`."""

    LINGER_S = 2.0
    LINGER_BYTES = 4 << 20
    MAX_LINGERING = 256

    def __init__(self, poller, loop) -> None:
        self.poller, self.loop = poller, loop
        self.socks: dict[int, list] = {}  # fd -> [socket, bytes still to drop, timer]

    def close(self, sock: socket.socket) -> None:
        if len(self.socks) >= self.MAX_LINGERING:
            close_read(sock)
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # already reset or gone
            sock.close()
            return
        fd = sock.fileno()
        try:
            self.poller.take_over(fd, lambda _events: self._readable(fd))
        except OSError:  # not in the poller's set (any more): no event would come
            close_read(sock)
            return
        timer = self.loop.call_later(self.LINGER_S, self._end, fd)
        self.socks[fd] = [sock, self.LINGER_BYTES, timer]

    def _readable(self, fd: int) -> None:
        entry = self.socks.get(fd)
        if entry is None:
            return
        while True:  # edge-triggered: until the socket is empty
            try:
                data = socket.socket.recv(entry[0], RELAY_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            entry[1] -= len(data)
            if not data or entry[1] <= 0:
                break
        self._end(fd)

    def _end(self, fd: int) -> None:
        entry = self.socks.pop(fd, None)
        if entry is not None:
            entry[2].cancel()
            self.poller.forget(fd)
            entry[0].close()

    def close_all(self) -> None:
        for fd in list(self.socks):
            self._end(fd)


def close_read(sock: socket.socket) -> None:
    """Read what the client sent so far, then close: with unread bytes in its
    buffer (the peeked ones) closing would send a reset, where a proxy that had
    read them, as mitmproxy did, sends a FIN."""
    with contextlib.suppress(OSError):
        for _ in range(16):  # what arrived, not a stream the client keeps up
            if not sock.recv(65536):
                break
    sock.close()
