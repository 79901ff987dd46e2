"""The audit log's writer in a process of its own (`AuditLog(..., writer_process=True)`).

Why: the writer thread chains (sha256) and writes each line holding the GIL, and on
a saturated gateway that is GIL time the event loop waits for. Here a process the
writer thread starts at the first full batch (`AuditLog._start_process`) chains and
writes; the thread passes each batch on (one `write`) and waits for the answer (one
`read`), the GIL released meanwhile (bench_http1, new connections: 1.03x-1.09x
requests/s at the same CPU; docs/performance.md "Session 29").

The process is a new interpreter (`python -I -m sandgate.proxy.telemetry.audit_process`),
not a fork: a forked copy of the gateway keeps as its own every page the gateway
writes afterwards (a busy service's whole heap: +110 MiB in
tests/e2e/test_gateway_fairness_more.py). It gets the log's descriptor (and with it
the log's lock), the journal's and a page for the close's deadline, and nothing else.

The exchange, one frame (length, `marshal`) each way, on its stdin and stdout:
- to the process: first the writer's state and settings; then each batch as the
  loop took it in, [(members, journal record)], or CLOSE;
- back, after each failed write attempt and after each batch: (lines of the batch
  on disk, or None for an attempt; events it counted failed; the writer's state,
  `STATE`), which the thread copies into the `AuditLog` (`writable`, `problem`,
  `written`, the chain's head are read there as before).
The journal's `written` mark is stored by the process itself once its `write`
returned, so a gateway killed meanwhile leaves no line both on disk and in the
journal for the next open to append again; the thread moves the loop's mark
(`AuditLog._confirm_taken`).

The process runs in a process group of its own and holds the terminal's signals
(the gateway's close ends it once everything is written), and watches the gateway
by a pidfd: when the gateway is gone (killed), it writes the whole batches it had
received, without retrying a failed write (the journal keeps them for the next
open), and exits. If the process dies (killed, the OOM killer), the thread reads
where the chain stands on disk (opening FILE again if the process had rotated it),
confirms what of the batch is there, writes the rest itself and goes on as the
writer thread, and says so: nothing is lost or written twice.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import marshal
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
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
# And what it needs besides, from the gateway's `AuditLog`, once.
SETTINGS = (
    "_head_seq",
    "_head",
    "failed",
    "max_bytes",
    "max_total_bytes",
    "stall_timeout",
    "close_timeout",
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
        batches_r, self.batches = os.pipe()
        self.replies, replies_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.batches, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        # The close's deadline (`AuditLog._give_up_at`) moves to memory the process
        # maps too: the gateway's close must reach a process that is retrying a write.
        deadline_fd = os.memfd_create("sandgate-audit-deadline", os.MFD_CLOEXEC)
        journal_fd = -1
        try:
            os.ftruncate(deadline_fd, mmap.PAGESIZE)
            deadline = mmap.mmap(deadline_fd, mmap.PAGESIZE)
            deadline[: len(audit._deadline)] = audit._deadline[:]
            if audit._box is not None:
                journal_fd = os.open(audit.journal, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            fds = [fd for fd in (audit._fd, deadline_fd, journal_fd) if fd >= 0]
            # A new interpreter, not a fork: a forked copy of the gateway keeps every
            # page the gateway writes afterwards as its own (the whole heap, ~100 MiB
            # of a busy service: tests/e2e/test_gateway_fairness_more.py saw it).
            # Its own process group: a terminal's ^C is the gateway's to act on.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-m", __name__],
                stdin=batches_r,
                stdout=replies_w,
                pass_fds=fds,
                process_group=0,
            )
        except BaseException:
            for fd in (self.batches, self.replies):
                os.close(fd)
            raise
        finally:
            for fd in (batches_r, replies_w, deadline_fd, journal_fd):
                if fd >= 0:
                    os.close(fd)
        audit._deadline = deadline
        self.pid = self.process.pid
        root = logging.getLogger()
        handler = root.handlers[0] if root.handlers else None
        _send(
            self.batches,
            {
                "parent": os.getpid(),
                "log": audit._fd,
                "deadline": deadline_fd,
                "journal": journal_fd,
                "state": {name: getattr(audit, name) for name in STATE + SETTINGS},
                "path": str(audit.path),
                "log_level": log.getEffectiveLevel(),
                "log_format": handler.formatter._fmt if handler and handler.formatter else None,
            },
        )

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
            self.process.kill()

    def _end(self) -> int:
        for fd in (self.batches, self.replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        return self.process.wait()

    def _taken_over(self, batch: list, seq: int, written: int, error: Exception) -> None:
        """The process died: what of `batch` is on disk is read from the log (the
        chain's head there); the rest, and what follows, the writer thread writes."""
        audit = self.audit
        self.kill()
        status = self._end()
        audit._process = None
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        audit._chain_from_disk()
        on_disk = min(max(audit.seq - seq, 0), len(batch))
        log.error(
            "audit log %s: the audit writer process (pid %d) ended (%s: %s); %d lines of "
            "its last batch of %d are on disk, the gateway's own thread writes the rest "
            "and everything after (the chain goes on from seq %d)",
            audit.path,
            self.pid,
            how,
            error,
            on_disk,
            len(batch),
            audit.seq,
        )
        audit.written = written + on_disk
        audit._confirm_taken(batch, on_disk)
        audit._head_seq, audit._head = audit.seq, audit.prev
        audit._write_lines([audit._link(*member) for member in batch[on_disk:]])


# --- the writer process ----------------------------------------------------------


def main() -> None:
    """`python -m sandgate.proxy.telemetry.audit_process`: batches on stdin, answers on
    stdout, the rest in the first frame (`WriterProcess.__init__`)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)  # the gateway's close ends it
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(NAME)  # in ps and top; what bench/proctree.py looks for
    from pathlib import Path

    from sandgate.proxy.telemetry import blackbox
    from sandgate.proxy.telemetry.audit import AuditLog

    init = _receive(0)
    logging.basicConfig(level=init["log_level"], format=init["log_format"], stream=sys.stderr)
    audit = AuditLog.__new__(AuditLog)
    audit.__dict__.update(init["state"])
    audit.path, audit._fd = Path(init["path"]), init["log"]
    audit._deadline = mmap.mmap(init["deadline"], 0)
    audit._box = None
    if init["journal"] >= 0:
        audit._box = blackbox.BlackBox(mmap.mmap(init["journal"], 0))
    audit._taken, audit._process, audit._write_started = collections.deque(), None, None
    _serve(audit, init["parent"], 0, 1)


def _serve(audit, parent: int, batches: int, replies: int) -> None:
    """Write each batch that comes, until CLOSE or the gateway's end."""
    try:
        gateway = os.pidfd_open(parent)
        if os.getppid() != parent:  # gone before the pidfd: that pid may be another's
            os.close(gateway)
            gateway = None
    except OSError:
        gateway = None
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


if __name__ == "__main__":
    main()
