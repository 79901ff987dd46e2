"""The front door's TLS I/O core: one TCP socket and its TLS state (an `ssl.SSLObject`
over two `MemoryBIO`s), read and written with plain socket calls.

Why not the stdlib's non-blocking `SSLSocket` (session 7's first version): OpenSSL
reading a socket itself takes two recv calls per record (its header, then the rest)
and one more that fails with EAGAIN, which the stdlib raises as `SSLWantReadError`
(a Python exception per drained read); a write is one send per 16 KiB record. Here a
read is one `recv_into` of up to RELAY_CHUNK bytes of ciphertext, decrypted from
memory, and stopped before OpenSSL would have to say "want read" (the incoming BIO is
empty); a write encrypts into memory and sends the whole flight with one `send`. It
also takes away OpenSSL's cross-wants: a read never waits for the socket to be
writable, a write never for it to be readable (the BIOs always take the bytes).

Contract with the relay (http1_relay.py's `_receive` / `_transmit` seams):
- `read_into(view)`: plaintext bytes put into `view`; fewer than it holds only once
  the socket was drained (a short read or EAGAIN: edge-triggered epoll reports the
  next arrival), so a full answer means "call again". A FIN raises no edge of its
  own after the data it came with: once an event said the peer is closing (RDHUP,
  `peer_closing`, set by the relay) reads go on to EAGAIN or the end. `-1`: nothing yet. `ENDED`
  (0): the peer's end (FIN, close_notify) with nothing before it; on a socket
  wrapped with `truncation_is_reset` (the upstream's), a FIN without close_notify is
  not an end but a cut: `truncated` says why and the read after the data raises
  ConnectionResetError, or a close-delimited body would look complete to the
  client. A client's FIN without close_notify is its end (request bodies are always
  framed: a cut one is never completed upstream). A TLS error
  (`ssl.SSLError`, an OSError) propagates: the relay treats it as a reset.
- `write_from(data)`: plaintext taken from the start of `data`, counted only once its
  ciphertext is all in the socket; ciphertext the socket did not take is kept
  (`unsent`) and goes first with the next call, whose `data` must start with the same
  plaintext (the relay only deletes what was counted), which is then skipped.
- `notify_close()`: the clean end, close_notify sent best effort (the door's
  `finish` when it is not a reset, the upstream pool when it drops an idle one, the
  TLS relay when it drops an upstream); the socket is closed by the caller.

The socket is a `socket.socket` (the same descriptor, so its epoll entry stays): the
door closes it, the upstream pool peeks at it and keeps it with its TLS state."""

from __future__ import annotations

import contextlib
import socket
import ssl

from sandgate.proxy.frontdoor.relay import RELAY_CHUNK

WRITE_MAX = 64 * 1024  # plaintext encrypted per send: four 16 KiB records
ENDED = 0
# Ciphertext is read here first, then decrypted into the relay's buffer. Handlers
# run one at a time on the door's loop, so one buffer serves every TLS socket.
_RAW = bytearray(RELAY_CHUNK)
_RAW_VIEW = memoryview(_RAW)


class TlsSocket(socket.socket):
    """A non-blocking TCP socket that carries its TLS connection (`tls`)."""

    __slots__ = (
        "tls",
        "incoming",
        "outgoing",
        "unsent",
        "ahead",
        "eof",
        "peer_closing",
        "handshaken",
        "session_kept",
        "truncation_is_reset",
        "notified",
        "notify_sent",
        "truncated",
    )

    @classmethod
    def wrap(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        truncation_is_reset: bool = False,
    ) -> TlsSocket:
        """Take over `sock` (it is detached: its descriptor is this socket's now)."""
        family, proto = sock.family, sock.proto
        tls_sock = cls(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, proto, sock.detach())
        tls_sock.incoming, tls_sock.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_sock.tls = context.wrap_bio(
            tls_sock.incoming,
            tls_sock.outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        tls_sock.unsent = b""  # ciphertext the socket has not taken yet
        tls_sock.ahead = 0  # plaintext bytes whose ciphertext is in `unsent`
        tls_sock.eof = False  # the peer's FIN was read
        tls_sock.peer_closing = False  # an event said its FIN (or reset) came: read to it
        tls_sock.handshaken = False
        tls_sock.session_kept = False  # its session was given to be resumed (tls_relay.py)
        tls_sock.truncation_is_reset = truncation_is_reset
        tls_sock.notified = False  # its close_notify was read
        tls_sock.notify_sent = False  # ours was written (`notify_close`)
        tls_sock.truncated = ""  # why its end is a cut (a FIN without close_notify)
        return tls_sock

    # --- the handshake ---------------------------------------------------------------

    def handshake(self) -> bool:
        """Move the handshake on with what arrived; True once done. ssl.SSLError (a
        verification failure above all) or OSError: it failed."""
        if self.unsent and not self._flush():
            return False
        self._fill()
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            if self.eof:
                raise ConnectionAbortedError(0, "the peer closed the connection") from None
            self._flush()
            return False
        self.handshaken = True
        self._flush()  # its last flight (a TLS 1.3 server's session tickets)
        return True

    # --- reads --------------------------------------------------------------------------

    def read_into(self, view: memoryview) -> int:
        """Plaintext into `view` (see the module docstring for the answers)."""
        size, got = len(view), 0
        drained = False
        while True:
            got += self._decrypt(view, got)
            if got >= size or drained or self.eof:
                break
            drained = self._read_socket()
        if self.outgoing.pending:  # what reading made OpenSSL say (a KeyUpdate's answer)
            self._flush()
        if got:
            return got
        if not self.eof:
            return -1
        if self.truncated:
            raise ConnectionResetError(self.truncated)
        return ENDED

    def _decrypt(self, view: memoryview, got: int) -> int:
        """Decrypt what the incoming BIO holds into view[got:]; stops while the BIO is
        empty, before OpenSSL would raise SSLWantReadError for it."""
        tls, incoming, size, start = self.tls, self.incoming, len(view), got
        while got < size and (incoming.pending or tls.pending()):
            try:
                n = tls.read(size - got, view[got:])
            except ssl.SSLWantReadError:
                break  # a part of a record: the rest comes with a later read
            except ssl.SSLZeroReturnError:  # close_notify: the end of its data
                self.eof = self.notified = True
                break
            if n == 0:
                self.eof = self.notified = True
                break
            got += n
        if incoming.eof and not incoming.pending:  # the TCP end, everything before it read
            self.eof = True
            if self.truncation_is_reset and not self.notified:
                self.truncated = "the upstream closed without close_notify"
        return got - start

    def _read_socket(self) -> bool:
        """One recv of ciphertext into the incoming BIO; True: the socket is drained
        (a short read, EAGAIN, or its end). OSError: a reset."""
        try:
            n = self.recv_into(_RAW)
        except (BlockingIOError, InterruptedError):
            return True
        if n == 0:
            self.incoming.write_eof()
            self.eof = True
            return True
        self.incoming.write(_RAW_VIEW[:n])
        return n < RELAY_CHUNK and not self.peer_closing

    def _fill(self) -> None:
        """Everything the socket holds into the incoming BIO (handshakes: small)."""
        while not self.eof and not self._read_socket():
            pass

    # --- the clean end -------------------------------------------------------------------

    def notify_close(self) -> None:
        """Send close_notify, best effort and without waiting: the peer can tell this
        clean end from a cut (a close-delimited body ends only so). Call it only on a
        clean end, never before a reset: a cut must stay a cut. `SSLObject.unwrap`
        writes the alert into the outgoing BIO and, the peer's close_notify not read
        yet, raises SSLWantReadError; what it wrote goes out with what is unsent, in
        one send if the socket takes it. Nothing before the handshake is done (OpenSSL
        refuses a shutdown in its middle), and once."""
        if not self.handshaken or self.notify_sent:
            return
        self.notify_sent = True
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's is unread
            self.tls.unwrap()
        with contextlib.suppress(OSError):  # the peer is gone: nobody to tell
            self._flush()

    # --- writes -------------------------------------------------------------------------

    def write_from(self, data: bytearray) -> int:
        """Plaintext taken from the start of `data` (see the module docstring)."""
        done = 0
        if self.unsent:
            if not self._flush():
                return 0
            done, self.ahead = self.ahead, 0
        size = len(data)
        # Pieces are views, not slices: a slice of `data` is a copy, and each copy of a
        # relayed byte costs ~2.5 % of the inspected relay's CPU (docs/performance.md,
        # "Session 23"). The views are released before the caller trims `data`.
        with memoryview(data) as view:
            while done < size:
                with view[done : done + WRITE_MAX] as piece:
                    self.tls.write(piece)
                    taken = len(piece)
                if not self._flush():
                    self.ahead = taken
                    break
                done += taken
        return done

    def _flush(self) -> bool:
        """Send the ciphertext waiting, in one send; True if the socket took it all.
        OSError: a reset."""
        if self.outgoing.pending:
            self.unsent = (
                self.unsent + self.outgoing.read() if self.unsent else self.outgoing.read()
            )
        if not self.unsent:
            return True
        try:
            sent = self.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return False
        self.unsent = self.unsent[sent:]
        return not self.unsent
