"""mitmproxy embedded in the gateway's event loop, with only the addons sandgate needs,
imported and started only when something needs it.

mitmproxy listens on no port: the front door (proxy/frontdoor/) accepts every
sandbox connection and hands `serve` the sockets that need HTTP (plain HTTP, and
TLS that a rule inspects). `serve` runs them through a transparent-mode server
instance that is never started, so mitmproxy still reads the original destination
from the socket (SO_ORIGINAL_DST) and builds the same layers as when it listened.

Most tasks only ever pass TLS through, which the front door relays itself, and
most that inspect only speak HTTP/1.1, which it terminates itself too: for them
mitmproxy is dead weight, about half of a task's start (importing it) and most of
the gateway's memory. So nothing here imports mitmproxy at module level; `started`
does, in a worker thread (the loop keeps relaying while the import runs), either up
front, when a profile needs it for whole connections (the gateway decides), or on
the first connection handed over. The CA it loads is made without it
(gateway_ca.py), so a task can trust it before mitmproxy exists.

The default addon set dispatches every hook to ~30 addons; trimmed to what the
transparent data path uses, the connection rate roughly doubles. Options exist only
once the addon that declares them is added, so options are set after `add`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Protocol

from sandgate.proxy.gateway_ca import ca_cert_file, ensure_ec_ca
from sandgate.proxy.turns import Turns

log = logging.getLogger("sandgate.engine")


class ByteCounts(Protocol):
    bytes_up: int  # read from the client
    bytes_down: int  # written to the client
    sandbox: Hashable  # whose connection: its reads take their turns (proxy/turns.py)
    key: Hashable  # its key in the gate's connections (mitmproxy's client id, once adopted)
    # Ends the connection from below (the front door's; a reload's revoke, the
    # sandbox's end, the gateway's stop), or None.
    abort: Callable[[str], None] | None


# What holds a client's next read, by its connection's key: set by the addon's HTTP
# layer (addon.HeadLimitedHttpLayer.read_hold), a callable that returns an awaitable
# while the layer holds too much of the client's body for an upstream connection
# still being made, else None. mitmproxy reads a client on whatever its layers hold.
READ_HOLDS: dict[Hashable, Callable[[], Awaitable[None] | None]] = {}


# What mitmproxy reads from a client at once is sized so that handling it takes about
# READ_SLICE of the worker's time: the loop serves its connections a read each in
# turn, so one whose bytes are dear to handle (HTTP/2 frames by the thousand: rapid
# reset, floods; ~50 us a stream) gets turns as short as everyone's instead of 64 KiB
# at once (~80 ms), and what a budget (lean_mitmproxy.bound_h2_*) closes the
# connection for is not parsed past it. Cheap bytes (a body) grow it back to what
# mitmproxy asks, doubling a read.
READ_SLICE = 0.001  # seconds
READ_MIN = 2048
READ_FIRST = 4096


def next_read_size(size: int, asked: int, got: int, spent: float) -> int:
    """The size of a client's next read: `size` was the last one's, `asked` is what
    mitmproxy asks for, `got` bytes of the last read took `spent` seconds to handle."""
    if spent > READ_SLICE:
        return max(READ_MIN, min(asked, int(got * READ_SLICE / spent)))
    return min(asked, 2 * size)


def _count(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: ByteCounts, turns: Turns
) -> None:
    """Make what mitmproxy reads from the client add to `counts.bytes_up`, what it
    writes to `counts.bytes_down`, size its reads (`next_read_size`) and have each
    wait its sandbox's turn when the loop's turn is full (`turns`). The stream
    objects stay what they are (mitmproxy checks their type): only these two methods
    of these two instances change."""
    read, write, clock, owner = reader.read, writer.write, time.perf_counter, counts.sandbox
    size, got, returned = READ_FIRST, 0, 0.0
    # A read held (READ_HOLDS) waits for an upstream that may never answer, and would
    # not see its connection ended from below meanwhile (the socket shut down, its
    # reader paused on a full buffer): its handler outlived the gateway's stop by the
    # 5 s it waits, and its end event came after the audit log had closed (lost).
    # So ending it from below lets the read go on, to the end it then finds.
    ended = asyncio.get_running_loop().create_future()
    shut_down = getattr(counts, "abort", None)

    def abort(why: str = "") -> None:
        if not ended.done():
            ended.set_result(None)
        if shut_down is not None:
            shut_down(why)

    counts.abort = abort

    async def counted_read(n: int = -1) -> bytes:
        nonlocal size, got, returned
        if n > 0:  # (-1: until the end, as asked)
            if got:  # handled since `returned` (mitmproxy reads again once it has)
                spent = clock() - returned
                size = next_read_size(size, n, got, spent)
                turns.charge(owner, spent)
                turn = turns.wait(owner)
                if turn is not None:
                    await turn
            hold = (
                READ_HOLDS.get(getattr(counts, "key", None))
                if READ_HOLDS and not ended.done()
                else None
            )
            waiter = hold() if hold is not None else None
            if waiter is not None:  # back-pressure: the client's socket fills, as the door's do
                await asyncio.wait((waiter, ended), return_when=asyncio.FIRST_COMPLETED)
            n = min(n, size)
        data = await read(n)
        got, returned = len(data), clock()
        counts.bytes_up += got
        return data

    def counted_write(data: bytes) -> None:
        counts.bytes_down += len(data)
        write(data)

    reader.read, writer.write = counted_read, counted_write


def _import_mitmproxy():
    """The mitmproxy pieces the engine uses, and sandgate's addon class (which
    imports mitmproxy too)."""
    import sandgate.proxy.lean_mitmproxy  # noqa: F401 - must come before any mitmproxy import
    from mitmproxy import options
    from mitmproxy.addons import core, disable_h2c, proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.proxy.mode_servers import ServerInstance

    from sandgate.proxy.addon import SandgateAddon
    from sandgate.proxy.lean_mitmproxy import (
        answer_before_streaming,
        bound_h2_control_frames,
        mark_h2_protocol_errors,
        bound_h2_early_resets,
        bound_h2_send_buffers,
        dispatch_hooks_directly,
        drop_http1_trailers,
        drop_per_request_checks,
        frame_downgraded_requests,
        lighter_forks,
        lighter_lookups,
        parse_client_hellos_lean,
        reuse_leaf_objects,
        run_hooks_inline,
        stream_websocket_messages,
        unblock_unhandled_hooks,
    )
    from sandgate.proxy.upstream_sessions import UpstreamSessionResumption

    drop_per_request_checks()
    dispatch_hooks_directly()
    lighter_lookups()
    reuse_leaf_objects()
    run_hooks_inline()
    parse_client_hellos_lean()
    lighter_forks()
    bound_h2_send_buffers()
    bound_h2_early_resets()
    bound_h2_control_frames()
    mark_h2_protocol_errors()
    frame_downgraded_requests()
    stream_websocket_messages()
    drop_http1_trailers()
    answer_before_streaming()
    return (
        options,
        (core, disable_h2c, proxyserver, tlsconfig),
        Master,
        ServerInstance,
        (SandgateAddon, UpstreamSessionResumption),
        unblock_unhandled_hooks,
    )


def settle_gc() -> None:
    """Once mitmproxy is imported and started, everything alive (its ~200k import-time
    objects above all) is moved out of the generations the cyclic GC collects.

    Every inspected connection leaves its layers, flows and generators behind as
    cycles (a layer and its context point at each other), so the collector runs
    every few connections, and each full collection walked all of mitmproxy's
    objects again (in-process: 30-60 us per connection, ~10 after). Frozen objects
    are never collected; these live as long as the process. policy/load.py freezes
    a loaded policy alike. (A higher threshold for the young generation was measured
    too and gave nothing: most of the GC's time is freeing the connections' cycles.)"""
    import gc

    gc.freeze()


class ProxyEngine:
    """One mitmproxy instance in transparent mode, serving the sockets it is handed.

    `gate` is what the addon applies (proxy/gate.py); `started()` imports and starts
    mitmproxy once, whoever asks first; `serve` asks."""

    def __init__(
        self, gate, confdir: Path, upstream_ca: Path | None = None, addon_args: tuple = ()
    ):
        self.gate = gate
        self.addon_args = addon_args  # SandgateAddon's after the gate: approvals, resolve
        self.confdir = confdir
        self.upstream_ca = upstream_ca
        self.addon = None  # the SandgateAddon, once started
        self.master = None
        self._server = None
        self._task: asyncio.Task | None = None
        self._starting: asyncio.Future | None = None
        self._turns: Turns | None = None  # the clients' reads' turns, on the serving loop

    async def started(self, why: str = "the first connection handed to it") -> None:
        """Import and start mitmproxy unless done already; raises what made it fail
        (every later caller gets the same failure: it is not retried). `why`: what
        asks for it, logged by the first caller."""
        if self._starting is None:
            log.info("starting mitmproxy for %s", why)
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        (
            options,
            (core, disable_h2c, proxyserver, tlsconfig),
            Master,
            ServerInstance,
            (Addon, UpstreamSessions),
            unblock_unhandled_hooks,
        ) = await asyncio.to_thread(_import_mitmproxy)
        await asyncio.to_thread(ensure_ec_ca, self.confdir)
        self.addon = Addon(self.gate, *self.addon_args)
        opts = options.Options()
        master = Master(opts)
        # No NextLayer addon: sandgate's addon is the only one that picks a layer, so
        # a connection it has not decided on yet (half a ClientHello) waits, and
        # cannot be given a layer by anyone else.
        from sandgate.proxy.lean_mitmproxy import leaves_per_task  # imported by now

        tls = tlsconfig.TlsConfig()
        registry = self.gate.registry

        # Leaves cached per task (a shared cache is a timing side channel between tasks).
        def owner_of(context):
            return registry.get(context.client.peername[0])

        leaves_per_task(tls, owner_of)
        master.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            self.addon,
            tls,
            # After TlsConfig: it offers a cached session to the upstream connection
            # TlsConfig has just made (proxy/upstream_sessions.py).
            UpstreamSessions(owner_of=owner_of),  # per task, as the leaves
            disable_h2c.DisableH2C(),
        )
        unblock_unhandled_hooks(master.addons)  # the addon set is final
        update = {
            # No listener: connections come from the front door, through `serve`.
            "mode": [],
            # Lazy: never open an upstream connection before the policy allowed it.
            "connection_strategy": "lazy",
            "confdir": str(self.confdir),
            # Bodies of inspected requests stream through instead of being buffered
            # whole: past 64 KiB (an HTTP/2 connection's 100 streams held 1 MiB of
            # unended body each before they streamed, 100 MiB a connection).
            "stream_large_bodies": "64k",
            # A 101 to a request no websocket rule allowed is cut by the addon; were
            # it not, it must never become a raw TCP tunnel.
            "rawtcp": False,
        }
        if self.upstream_ca is not None:
            update["ssl_verify_upstream_trusted_ca"] = str(self.upstream_ca)
        opts.update(**update)
        self.master = master
        ps = master.addons.get("proxyserver")
        self._server = ServerInstance.make("transparent", ps)
        self._task = asyncio.create_task(master.run(), name="mitmproxy")
        # run() sets up (no) servers, then fires `running`; wait for that, or a failure.
        while not ps.is_running and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done():
            await self._shut_down()
            raise RuntimeError("mitmproxy did not start (see the log above)")
        settle_gc()
        log.info("mitmproxy started")

    async def serve(self, sock: socket.socket, counts: ByteCounts | None = None) -> None:
        """Serve one accepted, redirected client socket to its end; takes it over.
        The client's bytes are added to `counts` (its ConnState), as the front
        door's relay counts pass-through ones."""
        try:
            await self.started()
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        if counts is not None:
            if self._turns is None:
                loop = asyncio.get_running_loop()
                self._turns = Turns(loop.call_soon, loop.create_future)
            _count(reader, writer, counts, self._turns)
        await self._server.handle_stream(reader, writer)

    @property
    def ca_cert(self) -> Path:
        """The gateway CA's certificate (PEM) in confdir (gateway_ca.py makes it), which
        mitmproxy loads when it starts, whenever that is."""
        return ca_cert_file(self.confdir)

    @property
    def requested(self) -> bool:
        """Whether mitmproxy was asked to start (it may still be importing)."""
        return self._starting is not None

    async def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            # An import cannot be interrupted; let it finish, then shut down.
            await asyncio.wait([self._starting])
        await self._shut_down()

    async def _shut_down(self) -> None:
        if self.master is None:
            return
        self.master.shutdown()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        self.master = None
