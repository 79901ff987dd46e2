"""The audit log's writer in a process of its own (`AuditLog(..., writer_process=True)`).

Why: the writer thread chains (sha256) and writes each line holding the GIL, and on
a saturated gateway that is GIL time the event loop waits for. Here a process forked
by the writer thread at the first full batch (`AuditLog._start_process`) chains and
writes; the thread passes each batch on (one `write`) and waits for the answer (one
`read`), the GIL released meanwhile (bench_http1, new connections: 1.03x-1.09x
requests/s at the same CPU; docs/performance.md "Session 29").

The exchange, one frame (length, `marshal`) each way:
- to the process: a batch as the loop took it in, [(members, journal record)], or
  CLOSE;
- back, after each failed write attempt and after the batch: (lines of the batch on
  disk or None for an attempt, events it counted failed, the writer's state:
  `STATE`), which the thread copies into the `AuditLog` (`writable`, `problem`,
  `written`, the chain's head are read there as before).
The journal's `written` is stored by the process itself once its `write` returned
(the journal is a shared file mapping), so a gateway killed meanwhile leaves no line
both on disk and in the journal for the next open to append again; the thread moves
the loop's mark (`AuditLog._confirm_taken`).

The process ignores the terminal's signals (the gateway's stop ends it), closes every
descriptor but the log, its two pipes and the log handlers' (a forked copy of a
socket or a pipe end would keep a connection open or a reader from its EOF), freezes
the garbage collector (a collection would copy the whole forked heap), and watches
the gateway by a pidfd: when the gateway is gone (killed), it writes the whole
batches it had received, without retrying a failed write (the journal keeps them
for the next open), and exits.

If the process dies (killed, the OOM killer), the thread reads where the chain stands
on disk (reopening FILE if the process had rotated it), confirms what of the batch
is there, writes the rest itself and goes on as the writer thread, and says so:
nothing is lost or written twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import marshal
import os
import select
import signal
import struct
import time

log = logging.getLogger("sandgate.audit")

# The writer's state the process sends back after each attempt, as attribute names
# of `AuditLog`.
STATE = (
    "seq",
    "prev",
    "size",
    "total",
    "file_first_seq",
    "written",
    "write_errors",
    "failing_since",
    "_problem",
)
CLOSE = "close"
NAME = "sandgate-audit"
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_LENGTH = struct.Struct("<I")
# A batch is at most `batch_size` lines of a few hundred bytes (bounded fields: a few
# kB at most): one pipe holds it, so the thread's `write` rarely waits.
PIPE_SIZE = 1 << 20


class WriterProcess:
    """The gateway's end: `write(batch)` from the writer thread; `close()` at the end."""

    def __init__(self, audit):
        self.audit = audit
        parent = os.getpid()
        batches_r, self.batches = os.pipe()
        self.replies, replies_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.batches, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        # Held, never delivered, from before the fork on (a ^C in the process's first
        # moment too): the terminal's ^C and the service's stop are the gateway's,
        # whose close ends the process once it wrote everything. The writer thread
        # keeps them held as well: they go to the gateway's main thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
        self.pid = os.fork()
        if self.pid == 0:  # the writer process: never returns
            status = 1
            try:
                _serve(audit, parent, batches_r, replies_w)
                status = 0
            finally:
                os._exit(status)
        os.close(batches_r)
        os.close(replies_w)

    def write(self, batch: list) -> None:
        """Have the process chain and write `batch`; back when it is on disk (or
        counted failed). If the process died, write it here (`_taken_over`)."""
        audit = self.audit
        seq, written = audit.seq, audit.written
        audit._write_started = time.monotonic()
        try:
            _send(self.batches, batch)
            while True:
                reply = _receive(self.replies)
                if reply is None:
                    raise EOFError("the audit writer process closed its pipe")
                done, failed, state = reply
                # A reply is a write that returned: a blocked one sends none.
                audit._write_started = time.monotonic()
                audit.__dict__.update(zip(STATE, state, strict=True))
                if done is not None:
                    break
        except (OSError, EOFError, ValueError, TypeError) as e:
            audit._write_started = None
            self._taken_over(batch, seq, written, e)
            return
        audit._write_started = None
        audit.failed += failed
        audit._confirm_taken(batch, done)

    def close(self) -> None:
        """Ask the process to end once it wrote what it has; wait for it."""
        with contextlib.suppress(OSError):
            _send(self.batches, CLOSE)
        self._end()
        # The process may have rotated FILE: its lock went with it. Hold FILE again
        # (and know the chain's head from disk) before the journal goes (`close`).
        try:
            self.audit._chain_from_disk()
        except Exception as e:  # noqa: BLE001 - said; the lines are on disk
            log.error("audit log %s: after its writer process ended: %s", self.audit.path, e)

    def kill(self) -> None:
        """A write blocked for good at close: the process cannot finish."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)

    def _end(self) -> int:
        for fd in (self.batches, self.replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            return os.waitpid(self.pid, 0)[1]
        except ChildProcessError:
            return 0

    def _taken_over(self, batch: list, seq: int, written: int, error: Exception) -> None:
        """The process died: what of `batch` is on disk is read from the log (the
        chain's head there); the rest, and what follows, the writer thread writes."""
        audit = self.audit
        self.kill()
        status = self._end()
        audit._process = None
        how = (
            f"killed by signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exit status {os.waitstatus_to_exitcode(status)}"
            if status
            else str(error)
        )
        audit._chain_from_disk()
        on_disk = min(max(audit.seq - seq, 0), len(batch))
        log.error(
            "audit log %s: the audit writer process (pid %d) ended (%s); %d lines of its "
            "last batch of %d are on disk, the gateway's own thread writes the rest and "
            "everything after (the chain goes on from seq %d)",
            audit.path,
            self.pid,
            how,
            on_disk,
            len(batch),
            audit.seq,
        )
        audit.written = written + on_disk
        audit._confirm_taken(batch, on_disk)
        audit._head_seq, audit._head = audit.seq, audit.prev
        audit._write_lines([audit._link(*member) for member in batch[on_disk:]])


# --- the writer process ----------------------------------------------------------


def _serve(audit, parent: int, batches: int, replies: int) -> None:
    """The forked process: write each batch that comes, until CLOSE or the gateway's
    end."""
    gc.freeze()
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(NAME)  # in ps and top; bench/ adds its CPU to the gateway's
    _close_all_but({audit._fd, batches, replies, *_log_descriptors()})
    audit._taken.clear()  # the gateway's; this process gets its batches by pipe
    audit._process = None
    try:
        gateway = os.pidfd_open(parent)
    except OSError:
        gateway = None  # gone already
    audit._on_failed_attempt = lambda: _send(replies, (None, 0, _state(audit)))
    poller = select.poll()
    poller.register(batches, select.POLLIN)
    if gateway is not None:
        poller.register(gateway, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()} if gateway is not None else set()
        if gateway is None or gateway in ready:
            _write_what_is_left(audit, batches)
            return
        batch = _receive(batches)
        if batch is None or batch == CLOSE:
            return
        written, failed = audit.written, audit.failed
        try:
            audit._write_lines([audit._link(*member) for member in batch])
        except Exception:  # noqa: BLE001 - as the writer thread: count, log, go on
            audit.failed += len(batch)
            log.exception("audit log %s: could not write %d events", audit.path, len(batch))
        _send(replies, (audit.written - written, audit.failed - failed, _state(audit)))


def _write_what_is_left(audit, batches: int) -> None:
    """The gateway is gone: write the whole batches it sent, one attempt each (what
    fails stays in the journal for the next open), no answers."""
    audit._on_failed_attempt = None
    audit._give_up_at = 0.0
    os.set_blocking(batches, False)
    while True:
        try:
            batch = _receive(batches)
        except (OSError, ValueError, EOFError):  # nothing more, or a frame cut short
            return
        if batch is None or batch == CLOSE:
            return
        with contextlib.suppress(Exception):
            audit._write_lines([audit._link(*member) for member in batch])


def _state(audit) -> tuple:
    return tuple(getattr(audit, name) for name in STATE)


def _log_descriptors() -> set[int]:
    """The descriptors the process's log handlers write to (stderr, a log file)."""
    found = {2}
    for logger in (logging.getLogger(), log):
        for handler in logger.handlers:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                found.add(handler.stream.fileno())
    return found


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


# --- frames -----------------------------------------------------------------------


def _send(fd: int, value) -> None:
    data = marshal.dumps(value)
    view, done = memoryview(_LENGTH.pack(len(data)) + data), 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _receive(fd: int):
    """The next frame's value; None at EOF before a frame. EOFError for a frame cut
    short, ValueError for one that does not decode; BlockingIOError when a
    non-blocking pipe is empty."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    data = _read_exactly(fd, _LENGTH.unpack(head)[0])
    if data is None:
        raise EOFError("a frame cut short")
    return marshal.loads(data)


def _read_exactly(fd: int, count: int) -> bytes | None:
    """`count` bytes; None at EOF before the first. In a non-blocking pipe, a frame
    whose rest is not there is cut short: only a gateway killed mid-`write` leaves one."""
    parts, left = [], count
    while left:
        try:
            part = os.read(fd, left)
        except BlockingIOError:
            if not parts:
                raise
            part = b""
        if not part:
            if parts:
                raise EOFError("a frame cut short")
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)
