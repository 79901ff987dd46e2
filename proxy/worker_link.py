"""The control connection between the gateway service and one of its workers.

One stream socket (a socketpair the service makes), JSON objects one per line, both
ways, three shapes:

- a request: `{"id": N, "op": OP, ...}`; the other side answers it once;
- a reply: `{"re": N, "ok": true|false, "error": "...", ...}`;
- a notification: `{"op": OP, ...}` without an id; nobody answers it.

A request or a notification may carry raw bytes: `"payload": N` in the line, then N
bytes (a worker's audit lines, which as a JSON string would be escaped and unescaped
again; the policy the service gives a worker, `policy_payload`); the handler finds
them in the message's `payload`.

Notifications are handled inline, in the order they arrive (a worker's `events`
batches must reach the audit log in order); requests each run as a task (an
`add_sandbox` may wait for mitmproxy to start, a `reload` for the rules to load),
so one slow request never holds up events.

The service reads its end on a clock of its own (`read_every`): once a read has
emptied the socket it stops reading until the next tick, unless it waits for a
reply. A read per batch woke the service for each, and at half load a wake-up cost
more than the events it brought (bench/bench_workers.py); the workers now send once
per tick of this clock, just before it (proxy/ticks.py). What was sent waits in the socket, in order, and a dead
worker's last batches are read after it died as before.

The ops themselves are the worker's (proxy/worker.py) and the service's
(enforcer/workers.py). Nothing here imports mitmproxy or anything of enforcer/.

The policy a worker serves is the service's, never the files': the service's
compiled policy, pickled (`policy_payload`), is the payload of the worker's `start`
and of every `reload`, and the worker takes it as it is (`policy_of`). A worker that
compiled the rule files itself, when it was restarted, could not start while they
were broken (its sandboxes had no egress until they were fixed, though the service
kept its last good policy), and took an edit not yet reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import pickle
from collections.abc import Awaitable, Callable

from sandgate.proxy.policy import CompiledPolicy
from sandgate.proxy.ticks import next_tick

log = logging.getLogger("sandgate.worker")

# One line holds at most one batch of events (MAX_BATCH of them, each under ~5 KB
# with its bounded fields): far below this.
MAX_LINE = 64 << 20
# A payload: a batch's audit lines (far below MAX_LINE), or a pickled policy (100k
# rules: 10.5 MB; a rule file may hold 64 MiB).
MAX_PAYLOAD = 1 << 30

Handler = Callable[[dict], Awaitable[dict] | None]
"""Takes a request or a notification. For a request it returns an awaitable of the
reply's fields (`ok` defaults to true; an exception becomes `ok: false` with its
text); for a notification its result is ignored."""


class LinkClosed(ConnectionError):
    """The other side went away before it answered."""


class Link(asyncio.Protocol):
    """One end of the link. Messages are read and dispatched as their bytes arrive
    (`data_received`), not by a reading task: an `events` batch comes every few
    milliseconds, and a stream reader's wake-ups per line cost the service about as
    much again as handling the batch."""

    def __init__(self, handle: Handler, read_every: float | None = None):
        self.handle = handle
        self.read_every = read_every
        self._resume: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._buffer = bytearray()
        self._head: dict | None = None  # a notification whose payload has not all come
        self._ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False

    @classmethod
    async def over(cls, sock, handle: Handler, read_every: float | None = None) -> Link:
        """A link over `sock`, a connected stream socket (one end of a socketpair);
        with `read_every` (seconds), read on that clock (the module's docstring)."""
        _, link = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: cls(handle, read_every), sock
        )
        return link

    def send(self, message: dict, payload: bytes = b"") -> None:
        """Queue one message (a notification: with `payload`, if any); the transport
        writes it as soon as the socket takes it."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise LinkClosed("the link is closed")
        if payload:
            message = {**message, "payload": len(payload)}
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self.transport.write(line + payload if payload else line)

    def buffered(self) -> int:
        """Bytes sent but still in this process (asyncio's buffer), not yet in the socket."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def request(
        self, op: str, timeout: float | None = 60.0, payload: bytes = b"", **fields
    ) -> dict:
        """Send a request (with `payload`, if any) and wait for its reply (`ok` false
        raises RuntimeError with the error text). Raises LinkClosed when the other side
        goes away first."""
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self.wake()  # the reply is read as it comes
        try:
            self.send({"id": request_id, "op": op, **fields}, payload)
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(request_id, None)
        if not reply.get("ok", False):
            raise RuntimeError(str(reply.get("error", "failed"))[:2000])
        return reply

    async def run(self) -> None:
        """Wait until the other side closes (or `close`); then every request still
        waiting fails with LinkClosed. Everything the other side sent before it closed
        has been handled by then: nothing it flushed is lost."""
        await asyncio.shield(self._ended)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def wake(self) -> None:
        """Read now, not at the next tick: a request waits for its reply, or the other
        side died and what it sent last should be handled at once."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _rest(self) -> None:
        """With `read_every`: read again at the next tick of that clock."""
        if self.read_every is None or self._resume is not None or self._waiting or self.closed:
            return
        self.transport.pause_reading()
        loop = asyncio.get_running_loop()
        self._resume = loop.call_at(next_tick(loop.time(), self.read_every), self.wake)

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._take(data)
        # A full read (asyncio's recv size) may have left more in the socket: go on
        # reading until a short one, so a tick takes everything sent since the last.
        if len(data) < getattr(self.transport, "max_size", 256 * 1024):
            self._rest()

    def _take(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        try:
            while True:
                if self._head is None:
                    end = buffer.find(b"\n")
                    if end < 0:
                        if len(buffer) > MAX_LINE:
                            raise ValueError(f"a line of more than {MAX_LINE} bytes")
                        return
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    try:
                        message = json.loads(line)
                    except ValueError:
                        log.error("worker link: not JSON: %r", line[:200])
                        continue
                    if not isinstance(message, dict):
                        log.error("worker link: not an object: %r", line[:200])
                        continue
                    size = message.get("payload")
                    if size is not None and (
                        not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD
                    ):
                        raise ValueError(f"a payload of {size!r} bytes")  # out of step: end
                    self._head = message
                size = self._head.get("payload")
                if size is not None:
                    if len(buffer) < size:
                        return
                    self._head["payload"] = bytes(buffer[:size])
                    del buffer[:size]
                message, self._head = self._head, None
                self._dispatch(message)
        except ValueError as e:
            log.warning("worker link: %s", e)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.warning("worker link: %s", exc)
        self.closed = True
        self.wake()  # no tick left pending (the transport is closed: nothing resumes)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LinkClosed("the other side went away"))
        if not self._ended.done():
            self._ended.set_result(None)

    def _dispatch(self, message: dict) -> None:
        reply_to = message.get("re")
        if reply_to is not None:
            future = self._waiting.get(reply_to)
            if future is not None and not future.done():
                future.set_result(message)
            return
        request_id = message.get("id")
        if request_id is None:
            try:
                self.handle(message)
            except Exception:  # noqa: BLE001 - one bad notification must not end the link
                log.exception("worker link: handling %r failed", message.get("op"))
            return
        task = asyncio.get_running_loop().create_task(self._answer(request_id, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request_id: int, message: dict) -> None:
        try:
            reply = {"ok": True, **(await self.handle(message) or {})}
        except Exception as e:  # noqa: BLE001 - the requester gets the error, not a hang
            if not isinstance(e, ValueError | RuntimeError | OSError):
                log.exception("worker link: %r failed", message.get("op"))
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        with contextlib.suppress(LinkClosed):
            self.send({"re": request_id, **reply})


def policy_payload(policy: CompiledPolicy) -> bytes:
    """The service's `policy` as the payload of a worker's `start` or `reload` (100k
    rules: 0.64 s, 10.5 MB; the worker's `policy_of` 1.1 s, where compiling the files
    took 1.65). A pickle, from the service to the worker it spawned over their
    private socketpair: the worker trusts it as it trusts its own arguments."""
    data = pickle.dumps(policy, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"the policy is {len(data)} bytes pickled, more than a link takes")
    return data


def policy_of(payload: bytes, expect: str) -> CompiledPolicy:
    """The policy `policy_payload` made, which must have the hash `expect` (ValueError
    if not). Its objects are frozen, as load_policy freezes a policy it compiles: no
    GC pass scans them (the garbage cycles alive now are collected first, or the
    freeze would keep them for good). Off the event loop: 100k rules take a second."""
    collecting = gc.isenabled()
    if collecting:
        gc.collect()
    gc.disable()
    try:
        policy = pickle.loads(payload)
        gc.freeze()
    finally:
        if collecting:
            gc.enable()
    if not isinstance(policy, CompiledPolicy):
        raise ValueError(f"the payload is a {type(policy).__name__}, not a policy")
    if policy.hash != expect:
        raise ValueError(f"the payload is policy {policy.hash}, not {expect}")
    return policy
