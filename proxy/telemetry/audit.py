"""The audit log: JSON lines a SIEM ingests as is, hash-chained, written off the loop.

Format (docs/telemetry.md): one event per line, the `Event` fields in schema order
(None fields left out), then `seq` (1, 2, ... across rotations), `prev` (the
previous line's hash; 64 zeros on the first line of a fresh log) and `hash` =
sha256(prev + the line's text without its `,"hash":"..."` member). The JSON is
ASCII-only (`ensure_ascii`): every control character, quote, backslash and
non-ASCII character inside a value is escaped, so no value — a Host header with
quotes and newlines, say — can end a line or forge another one.

`verify` checks a log (or a rotated series, oldest first) line by line from the
bytes on disk: an edited line fails its own hash, a removed, inserted or reordered
line breaks the link to its neighbour; it names every broken line, going on after
each. What a hash chain cannot show on its own is a log cut short at the end, or one
rewritten wholesale from some line on by someone who recomputes every later hash:
ship the lines to the SIEM as they are written (they carry their hashes) to anchor
the chain off the machine.

Writing: `emit` runs on the gateway's event loop: it encodes the event (an
`EncodedEvent` of a gateway worker comes encoded), journals it at once and appends
it to a bounded deque; a writer thread chains (seq, prev, hash) and writes them,
a batch at a time with one `write` each, so a slow or failing disk never blocks
the proxy.
Lines reach the file within `flush_interval` (50 ms). An event is lost
only if the queue is full (the writer is far behind) or the event cannot be
encoded; `lost` counts both, and the events lost before they reached the log that
the service learns of (`count_lost`: a killed gateway worker's black box overrun),
and is exported as `sandgate_audit_events_lost_total`.
A failed write (disk full, I/O error) is undone (truncated back), counted in
`write_errors`, and retried with backoff: nothing is dropped while the queue has
room. The file is locked (`flock`) so two writers never interleave their chains.
FILE moved away or deleted under the writer (logrotate without copytruncate, `rm`)
is seen at the next batch: the chain goes on in a new FILE, never in a file that no
reader of FILE sees (a batch written into a file deleted meanwhile is written again).
The log's directory is opened once; every name in it (FILE, FILE.new, the rotated
files) is opened, made, linked and renamed relative to it, never through a symbolic
link: someone else who may write it (a log shipper) cannot have this process, root,
write elsewhere. A link where FILE or a rotated file should be is an error naming it
(at start; while writing, a failed write, retried until it is removed); a directory
anyone may write without the sticky bit is refused, one another user may write is said.

The journal (`journal=`, proxy/telemetry/blackbox.py): a file ring each event is
written into by `emit`, on the loop, before its decision takes effect; the writer
marks in it what is on disk. The next open of the log (a restarted service, a run
with the same log, `sandgate gc`) appends what a killed process had not written,
and its gateway workers' boxes (`worker_journal`), marked recovered, a
`connection_end` for each connection it had open, and an `audit_recovered` event;
what was torn or written over is counted in `lost` and said. A clean close removes
the journal only if everything taken in is on disk: events the writer gave up on
(the log unwritable for `close_timeout`) stay in it, after a note saying so, for the
next open as after a kill; an open that cannot write what a journal holds either
fails (AuditLogError) and keeps it, rather than start afresh over it.

Retention: nothing the log holds is ever deleted by sandgate. At `max_bytes` the
file is rotated to `FILE.<seq of its first line>` (FILE.1, FILE.48213, ...: a
name never reused, never renamed again, that says where in the chain the file
starts), and every rotated file is kept. `max_total_bytes`, if set, is a budget
over FILE and its rotated files: when the next write would exceed it the writer
fails as on a full disk and retries, until an admin ships rotated files away.
While the writer fails (`writable` False) the gateway refuses new connections
(`--on-audit-failure block`); the events meanwhile wait in the queue.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from json.encoder import c_make_encoder, encode_basestring_ascii
from pathlib import Path

from orjson import dumps as _dumps
from sandgate.proxy.file_systems import kernel_interface
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry import blackbox
from sandgate.proxy.telemetry.event import (
    FIELDS,
    EncodedEvent,
    Event,
    EventKind,
    decode_members,
    field_values,
)
from sandgate.proxy.telemetry.open_connections import OpenConnections

log = logging.getLogger("sandgate.audit")

GENESIS = "0" * 64
_ENCODER = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False, check_circular=False
)


def _not_serializable(value):
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


if c_make_encoder is not None:
    # The C encoder, built once: `JSONEncoder.encode` builds it anew on every call,
    # which is more than half of its cost for a record this size. Same output:
    # ASCII only, no spaces, no NaN, no circular check (records are flat).
    _c_encode = c_make_encoder(
        None, _not_serializable, encode_basestring_ascii, None, ":", ",", False, False, False
    )

    def _encode(value) -> str:
        return "".join(_c_encode(value, 0))
else:  # pragma: no cover - CPython always has the accelerator
    _encode = _ENCODER.encode
# The journal's ring: ~30,000 events (~0.5 KB each) the writer has not yet written
# before the oldest is written over (a writer that far behind a flood: counted lost
# if the process is then killed). A file under the state dir: /run's tmpfs is fine,
# the journal is for a killed process, not a power cut.
JOURNAL_SIZE = 16 << 20
# The lines a killed process wrote are read back (for its open connections) from at
# most this much of the log's end: a start older than that is said, not followed.
MAX_FOLLOW_BYTES = 256 << 20
_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}\n?\Z')
# Who left a journal's unwritten records, as the recovered events and the
# `audit_recovered` event say: a process that was killed, or one that stopped while it
# could not write its log (it gave up on them, and journaled a note saying so last).
KILLED = "a killed sandgate process"
STOPPED = "a sandgate process that stopped while it could not write this log"
STOP_NOTE = "this sandgate process stopped while its audit log could not be written"


class AuditLogError(Exception):
    """The audit log cannot be opened for writing; the message says why."""


class AuditJournalError(AuditLogError):
    """Its journal (under the state directory, wherever the log is) cannot be made."""


def chain_hash(prev: str, body: str | bytes) -> str:
    """The hash of one line: sha256 over the previous hash and the line's body."""
    if isinstance(body, str):
        body = body.encode("ascii")
    return hashlib.sha256(prev.encode("ascii") + body).hexdigest()


_KEYS = tuple(_encode(name) + ":" for name in FIELDS)


def audit_members(event: Event) -> bytes:
    """The event's members as ASCII JSON (`"kind":"dns","verdict":...`), None fields
    left out, in field order: what `_encode(event.to_dict())` gives, up to how floats
    are spelled. orjson encodes them (~4 us an event against ~10 for the C JSON
    encoder or the loop below, which the gateway pays on its loop for each event it
    journals); the rare event orjson cannot write as this log must is written by
    `_escaped_members`: text that is not ASCII or holds a DEL (orjson writes UTF-8
    and leaves DEL as it is; this log escapes both), and what orjson refuses or
    writes as null (a lone surrogate, an int past 64 bits, NaN), which that one
    escapes, or raises for, as the JSON module does."""
    # An Event's __dict__ holds its fields, in field order (event.py fills it so).
    try:
        text = _dumps({k: v for k, v in event.__dict__.items() if v is not None})
    except TypeError:  # orjson.JSONEncodeError is one
        text = None
    # A `:null` can only be a float orjson could not write (None fields are left
    # out) or text that looks like one: either way the escaper decides. `find`, not
    # `in`: bytes' `in` first tries its operand as an int and raises and clears a
    # TypeError for the bytes (~1.5k instructions, twice an event: bench_callgrind).
    if text is None or not text.isascii() or text.find(b"\x7f") >= 0 or text.find(b":null") >= 0:
        return _escaped_members(event).encode("ascii")
    return text[1:-1]


def _escaped_members(event: Event) -> str:
    """`audit_members` by the JSON module's escaper: strings through the C escaper;
    ints and finite floats are their repr; anything else through the full encoder,
    which raises for what JSON cannot hold (NaN, objects) instead of writing it."""
    parts = []
    for key, value in zip(_KEYS, field_values(event), strict=True):
        if value is None:
            continue
        cls = value.__class__
        if cls is str or isinstance(value, str):
            parts.append(key + encode_basestring_ascii(value))
        elif cls is int:
            parts.append(key + int.__repr__(value))
        elif cls is float and math.isfinite(value):
            parts.append(key + float.__repr__(value))
        else:
            parts.append(key + _encode(value))
    return ",".join(parts)


def encode_line(event: Event | EncodedEvent | bytes, seq: int, prev: str) -> tuple[bytes, str]:
    """One audit line for `event` (with its newline) and its hash. An `EncodedEvent`
    brings its members encoded, as do bytes (members the journal holds): only the
    chain is added here."""
    cls = event.__class__
    if cls is bytes:
        members = event
    elif cls is EncodedEvent:
        members = event.members
    else:
        members = audit_members(event)
    ((line, _, digest, _),), _, _ = chain_lines([(members, None)], seq - 1, prev)
    return line, digest


def chain_lines(
    taken: list[tuple[bytes, tuple | None]], seq: int, prev: str
) -> tuple[list[tuple[bytes, int, str, tuple | None]], int, str]:
    """The lines of `taken` ((members, journal record) each), chained on from line
    `seq` whose hash is `prev`: ([(line, its seq, its hash, its journal record)],
    the last seq, the last hash). One loop for a whole batch, since the writer thread
    holds the GIL while it chains: 3.0 us a line warm, against 3.9 for a call a line."""
    sha256, lines = hashlib.sha256, []
    append, head = lines.append, prev.encode("ascii")
    for members, journaled in taken:
        seq += 1
        body = b'{%b,"seq":%d,"prev":"%b"}' % (members, seq, head)
        prev = sha256(head + body).hexdigest()
        head = prev.encode("ascii")
        append((b'%b,"hash":"%b"}\n' % (body[:-1], head), seq, prev, journaled))
    return lines, seq, prev


class AuditLog:
    """An `EventSink` appending to `path`; call `close()` to write what is queued."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 100 * 2**20,
        max_total_bytes: int | None = None,
        queue_size: int = 100_000,
        batch_size: int = 128,
        flush_interval: float = 0.05,
        close_timeout: float = 5.0,
        stall_timeout: float = 5.0,
        journal: Path | None = None,
        journal_size: int = JOURNAL_SIZE,
    ):
        self.path = Path(path)
        self.max_bytes, self.max_total_bytes = max_bytes, max_total_bytes
        self.queue_size, self.batch_size = queue_size, batch_size
        self.flush_interval = flush_interval  # an idle writer looks at the queue this often
        self.close_timeout = close_timeout  # how long close() retries a failing disk
        # A write blocked this long (a hung disk or network file system) counts as
        # failing: nothing says the lines will ever land, so new connections wait.
        self.stall_timeout = stall_timeout
        self._write_started: float | None = None  # when the write under way began
        self._give_up_at = float("inf")
        self.written = 0  # events on disk
        self.dropped = 0  # events refused because the queue was full (loop thread)
        self.failed = 0  # events that could not be encoded (loop) or, at close, written (writer)
        # Of `failed`, those the writer gave up on when time ran out (at close, or while
        # appending a journal at open): still in the journal, which is then kept.
        self.given_up = 0
        self.unreached = 0  # events lost on their way here (`count_lost`; loop thread)
        self.write_errors = 0  # failed write attempts (each retried)
        # Since when (time.monotonic) the writer has failed, and why; None: it writes.
        self.failing_since: float | None = None
        self._problem: str | None = None
        # The log's directory, opened once: every name in it (FILE, FILE.new, the
        # rotated files) is opened, made, linked and renamed relative to it, and never
        # through a symbolic link (`_open_locked`, `_rotate`): whoever else may write
        # the directory (a log shipper) cannot have this process write elsewhere.
        self._dir = self._fd = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._dir = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            _check_directory(self._dir, self.path.parent)
            self._fd = _open_locked(self.path, self._dir)
        except BaseException as e:
            if self._dir >= 0:
                os.close(self._dir)
            if isinstance(e, OSError):
                raise AuditLogError(
                    f"cannot open audit log {self.path}: {e.strerror or e}"
                ) from None
            raise
        try:
            self.seq, self.prev, self.size = _continue_chain(self._fd, self.path)
            self.file_first_seq = _first_seq(self._fd) if self.size else None
            if not self.size and os.fstat(self._fd).st_nlink > 1:
                # An empty file with another name too: a hard link to a file elsewhere
                # (fs.protected_hardlinks off) that the lines would be appended to.
                raise AuditLogError(
                    f"audit log {self.path} is empty and has other hard links: not a log "
                    "this writer made; move it away"
                )
            rotated = self._rotated()
            if not self.size and rotated:
                # A fresh FILE next to rotated ones (FILE was shipped away): the chain
                # goes on from the newest, so seq numbers, and the names, stay unique.
                self.seq, self.prev = _last_record(rotated[-1], self._dir)
            self.total = self.size + sum(_size(p, self._dir) for p in rotated)  # the budget's
        except BaseException:
            os.close(self._fd)
            os.close(self._dir)
            raise
        # The journal (blackbox.py): each event as it is taken in, for the next start
        # to append what a killed process had not written. None: no journal.
        self.journal = None if journal is None else Path(journal)
        self._box: blackbox.BlackBox | None = None
        self._journal_map: mmap.mmap | None = None
        self.recovered: tuple[int, int, int] | None = None  # (events, lost, cut) at open
        # The loop emits; a stop of the audit rate limit from another thread may too:
        # an event's journal record and its place in the queue are one thread's at a
        # time, so the queue's order is the journal's.
        self._lock = threading.Lock()
        # Taken in, not written yet: (members, journal record), in the order taken in;
        # the writer thread chains and writes them (`_run`).
        self._taken: collections.deque[tuple[bytes, tuple | None]] = collections.deque()
        if self.journal is not None:
            try:
                self._open_journal(journal_size)
            except BaseException:
                os.close(self._fd)
                os.close(self._dir)
                raise
        # The chain's head: the last line chained (`_link` links the next to it), from
        # what is on disk (recovered lines that could not be written are not).
        self._head_seq, self._head = self.seq, self.prev
        self._wake = threading.Event()
        self._idle = False
        self._draining = 0  # drains under way
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sandgate-audit", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> int:
        return self.dropped + self.failed + self.unreached

    def count_lost(self, count: int) -> None:
        """`count` events were made and will never reach this log (a gateway worker
        killed with more unsent events than its black box held): lost all the same."""
        self.unreached += max(0, count)

    @property
    def queued(self) -> int:
        return len(self._taken)

    @property
    def writable(self) -> bool:
        """False while writes fail (or the budget is reached), until one succeeds, and
        while a write has been blocked for `stall_timeout`."""
        return self.failing_since is None and self._stalled_for() is None

    @property
    def problem(self) -> str | None:
        """Why the log is not writable; None while it is."""
        stalled = self._stalled_for()
        if stalled is not None:
            return f"a write has been blocked for {stalled:.0f} s (a hung disk?)"
        return self._problem

    def _stalled_for(self) -> float | None:
        started = self._write_started
        if started is None or time.monotonic() - started < self.stall_timeout:
            return None
        return time.monotonic() - started

    def emit(self, event: Event | EncodedEvent) -> None:
        taken = self._taken
        if len(taken) >= self.queue_size or self._stopping:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error(
                    "audit log %s: %d events LOST so far (%s)",
                    self.path,
                    self.dropped,
                    "the log is closed" if self._stopping else "the writer's queue is full",
                )
            return
        with self._lock:
            member = self._take(event)
            if member is not None:
                taken.append(member)
        self._wake_for_batch()

    def emit_batch(self, events: list[Event | EncodedEvent]) -> None:
        """`emit` for each of `events`, with one check of the queue's room."""
        taken = self._taken
        if len(taken) + len(events) > self.queue_size or self._stopping:
            for event in events:  # the queue's edge (or a closed log): count each loss
                self.emit(event)
            return
        with self._lock:
            for event in events:
                member = self._take(event)
                if member is not None:
                    taken.append(member)
        self._wake_for_batch()

    def _wake_for_batch(self) -> None:
        # Wake an idle writer only for a full batch: waking it per event costs more
        # than writing (a lock, a thread switch, a GIL hand-over). Otherwise it
        # looks every `flush_interval`.
        if self._idle and len(self._taken) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def drain(self, timeout: float = 10.0, *, while_writable: bool = False) -> bool:
        """Wait until everything queued so far is written (or given up); True if so.
        `while_writable`: give up (False) as soon as a write fails, rather than wait
        through the writer's retries."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._draining += 1  # the writer goes on past part of a batch meanwhile
        try:
            self._wake.set()
            while self._taken or self._busy:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    return False
                if while_writable and not self.writable:
                    return False
                time.sleep(0.001)
            return True
        finally:
            with self._lock:
                self._draining -= 1

    def close(self) -> None:
        """Write everything queued, then close. Idempotent."""
        if self._fd < 0:
            return
        self._give_up_at = time.monotonic() + self.close_timeout
        self._stopping = True
        self._wake.set()
        self._thread.join(self.close_timeout + self.stall_timeout)
        if self._thread.is_alive():
            # Blocked in a write that does not return: the queued events cannot be
            # written; say so rather than hang the run's exit. The descriptor stays
            # open (the thread still uses it); the process is about to end. So does the
            # journal, which holds them: the next open of the log appends them.
            lost = len(self._taken)
            self._taken.clear()
            self.failed += lost
            self.given_up += lost
            self._journal_stop_note()
            log.error(
                "audit log %s: gave up at close: a write has been blocked for %.0f s; "
                "%d queued events and the batch being written are not in the log%s",
                self.path,
                self._stalled_for() or 0.0,
                lost,
                f" (they stay in its audit journal {self.journal})" if self.journal else "",
            )
            return
        if self._journal_map is not None:
            self._journal_stop_note()
            # [the mark, where the next record would go): the records not on disk
            kept = (blackbox.HEADER.unpack_from(self._journal_map, 0)[2], self._box.pos)
            self._box = None
            self._journal_map.close()
            self._journal_map = None
            self._close_journal(kept)
        os.close(self._fd)
        os.close(self._dir)
        self._fd = self._dir = -1

    def _journal_stop_note(self) -> None:
        """After the events given up on at close, journal a note that says so: the
        next open appends it with them, and says that this process stopped (not that
        it was killed, `_whose`)."""
        if not self.given_up or self._box is None:
            return
        note = Event(
            kind=EventKind.POLICY,
            verdict=Verdict.DENY,
            reason=Reason.AUDIT_UNAVAILABLE,
            detail=f"{STOP_NOTE} ({self.problem or 'a write failed'}): it gave up on the "
            f"{self.given_up} events before this one, which its audit journal kept for the "
            "next open of the log (or `sandgate gc`) to append",
        )
        with self._lock:
            self._box.write(audit_members(note))

    def _close_journal(self, kept: tuple[int, int]) -> None:
        """Remove the journal if everything taken in is on disk (or could not be
        encoded: never in it). Else keep it and its `.log`: the events the writer gave
        up on are past its `written` mark, and the next open of the log, or `sandgate
        gc`, appends them as after a kill; removed, a clean stop during an outage (a
        full disk, the budget reached, which a task can bring about and then end the
        run) would lose what a SIGKILL keeps. Removed while the log is still locked
        (the close after this): `sandgate gc` takes a journal whose log nobody holds
        for one left to append."""
        if self.given_up:
            log.error(
                "audit log %s: the %d events given up on are kept in its audit journal %s: "
                "the next open of the log, or `sandgate gc`, appends them",
                self.path,
                self.given_up,
                self.journal,
            )
            _free_but(self.journal, *kept)
            return
        for done in (self.journal, self.journal.with_suffix(".log")):
            with contextlib.suppress(OSError):
                done.unlink()

    # --- the journal (proxy/telemetry/blackbox.py) ---------------------------------

    def _take(self, event: Event | EncodedEvent) -> tuple[bytes, tuple | None] | None:
        """(`event`'s members, its journal record (seq, pos, stream) or None without a
        journal). The members are written into the journal here, on the loop, before
        the decision the event records takes effect. None: it does not encode (counted
        in `failed`, said). Under `_lock`.

        Encoding on the loop rather than in the writer thread: the journal needs
        the members now, and sharing the encoding with the loop made the two
        threads hand the GIL over at each of the loop's system calls while the
        writer worked (~10 us more an event, bench_telemetry). The chain is short
        work on a batch: the writer does it (`_run`)."""
        cls = event.__class__
        try:
            members = event.members if cls is EncodedEvent else audit_members(event)
        except Exception:  # noqa: BLE001 - one bad event must not stop the log
            self.failed += 1
            log.exception("audit log: could not encode an event")
            return None
        box = self._box
        return members, None if box is None else (box.write(members), box.pos, box.stream)

    def _link(self, taken: list[tuple[bytes, tuple | None]]) -> list[tuple]:
        """The lines of `taken` (`_take`'s), chained on from the last one (`chain_lines`).
        The writer thread's (or the open's, before it starts)."""
        lines, self._head_seq, self._head = chain_lines(taken, self._head_seq, self._head)
        return lines

    def _confirm(self, lines: list, start: int, end: int) -> None:
        """Lines `start`..`end` are on disk: the journal's written mark moves past the
        last journaled one (the writer thread, after its `write` returned)."""
        box = self._box
        if box is None:
            return
        for k in range(end - 1, start - 1, -1):
            journaled = lines[k][3]
            if journaled is not None:
                box.confirm(*journaled)
                return

    def _open_journal(self, size: int) -> None:
        """Open the journal: first append what a killed process left in it and in its
        workers' boxes (the records past what it wrote, then a `connection_end` for
        each connection it had open, then an `audit_recovered` event), then start it
        afresh."""
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.journal, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise AuditJournalError(
                f"cannot open the audit journal {self.journal}: {e.strerror or e}"
            ) from None
        try:
            events, lost, origin, whose = [], 0, 0, KILLED
            if os.fstat(fd).st_size >= blackbox.HEADER_SIZE + 4096:
                with mmap.mmap(fd, 0) as left:
                    if blackbox.is_black_box(left):
                        origin = blackbox.origin(left)
                        found = blackbox.recover(left, blackbox.written(left))
                        whose = _whose(found)
                        lost += self._decode_into(
                            events, found, f"the audit journal {self.journal}", whose
                        )
                    else:
                        log.error("audit journal %s is no journal: started afresh", self.journal)
            boxes = sorted(self.journal.parent.glob(f"{self.journal.stem}.worker-*.ring"))
            for box in boxes:
                lost += self._recover_worker_box(box, events)
            if events or lost or origin:
                # Raises if they could not be written: the journal and boxes stay.
                self._append_recovered(events, lost, origin, whose)
            for box in boxes:
                with contextlib.suppress(OSError):
                    box.unlink()
            try:
                os.ftruncate(fd, size)  # (a larger journal left: this size)
                self._journal_map = map_backed(fd, size)
            except OSError as e:  # a full disk: said, as for the log itself
                with contextlib.suppress(OSError):  # what it held is in the log by now
                    self.journal.unlink()
                raise AuditJournalError(
                    f"cannot make the audit journal {self.journal}: {e.strerror or e}"
                ) from None
        finally:
            os.close(fd)  # the mapping stays
        with contextlib.suppress(OSError):  # whose journal it is: for `sandgate gc`
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            with open(os.open(self.journal.with_suffix(".log"), flags, 0o600), "w") as f:
                f.write(os.path.abspath(self.path))
        blackbox.blank(self._journal_map)
        self._box = blackbox.BlackBox(self._journal_map)
        self._box.set_origin(self.seq + 1)

    def _recover_worker_box(self, path: Path, events: list[Event]) -> int:
        """The records of a gateway worker's box (`worker_journal`) that the killed
        service never took into its journal, into `events` (the box is removed once
        they are in the log). Returns how many were lost."""
        try:
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            with open(os.open(path, flags), "r+b") as f, mmap.mmap(f.fileno(), 0) as box:
                lost = 0
                if blackbox.is_black_box(box):
                    start = blackbox.taken(box)
                    found = blackbox.recover(box, start[1] - 1, start)
                    lost = self._decode_into(events, found, f"gateway worker black box {path}")
        except (OSError, ValueError) as e:
            log.error("audit journal: cannot read gateway worker black box %s: %s", path, e)
            lost = 0
        return lost

    def _decode_into(
        self, events: list[Event], found: blackbox.Recovered, where: str, whose: str = KILLED
    ) -> int:
        """The events of `found`'s payloads, marked recovered from `where` of `whose`,
        appended to `events`; returns how many were lost (found.lost and those that do
        not decode)."""
        mark = f"recovered from {where} of {whose}"
        lost = found.lost
        for payload in found.payloads:
            try:
                event = decode_members(payload)
            except (ValueError, RecursionError) as e:  # RecursionError: [[[[... too deep
                log.error("audit journal: a bad record in %s: %s", where, e)
                lost += 1
                continue
            events.append(
                event.with_fields(detail=f"{event.detail}; {mark}" if event.detail else mark)
            )
        return lost

    def _append_recovered(
        self, events: list[Event], lost: int, origin: int, whose: str = KILLED
    ) -> None:
        """Write what a killed process (or one that stopped while it could not write:
        `whose`) left (`events`, `lost`: read from its journal and its workers' boxes;
        `origin`: the seq its lines start at), a `connection_end` for each connection
        it had open, and an `audit_recovered` event saying so. AuditLogError if they
        cannot be written either: the caller keeps the journal for a later open."""
        connections = OpenConnections()
        unfollowed = self._follow_lines(connections, origin)
        connections.follow(events)
        if whose == KILLED:
            ended = "the death of the sandgate process that wrote this audit log before"
            ended += " (killed: it left its audit journal unclosed)"
            how = "was killed (its audit journal {} was left unclosed)"
        else:
            ended = "the stop of the sandgate process that wrote this audit log before"
            ended += " (it could not write the log)"
            how = (
                "stopped while it could not write it (its journal {} kept the events it gave up on)"
            )
        cut = connections.cut(ended)
        if not events and not lost and not cut:
            return  # it died with everything written and no connection open
        detail = (
            f"the sandgate process that wrote this audit log before {how.format(self.journal)}"
            f": {len(events)} events it had "
            f"made but not written were read back from the journal (and its gateway "
            f"workers' black boxes) and appended before this line (each marked recovered), {lost} lost (torn or written over in the "
            f"journal; counted in sandgate_audit_events_lost_total); {len(cut)} connections "
            f"it had open were given a connection_end" + (f" ({unfollowed})" if unfollowed else "")
        )
        summary = Event(
            kind=EventKind.POLICY,
            verdict=Verdict.DENY if lost else Verdict.ALLOW,
            reason=Reason.AUDIT_RECOVERED,
            detail=detail,
        )
        self._give_up_at = time.monotonic() + self.close_timeout
        self._head_seq, self._head = self.seq, self.prev  # chained from the log's last line
        self._write_lines(self._link([t for e in (*events, *cut, summary) if (t := self._take(e))]))
        self._give_up_at = float("inf")
        if self.given_up:
            # Not written (a full disk, the budget): starting afresh would blank the
            # journal that holds them. A batch is written whole or not at all.
            raise AuditLogError(
                f"cannot append to audit log {self.path} the {len(events)} events "
                f"{whose} left unwritten ({self._problem}); they stay in its audit journal "
                f"{self.journal}: make room (or raise --audit-budget) and open the log "
                "again, or run `sandgate gc`"
            )
        self.unreached += lost
        self.recovered = (len(events), lost, len(cut))
        (log.error if lost else log.warning)("audit log %s: %s", self.path, detail)

    def _follow_lines(self, connections: OpenConnections, origin: int) -> str:
        """Have `connections` follow the connection events of this log's lines from
        seq `origin` on (the killed process's: its journal says where it started),
        oldest first, from at most MAX_FOLLOW_BYTES of the log's end. Returns what
        could not be followed, said for the event ("" when all was)."""
        if not origin or origin > self.seq:
            return ""
        chosen, budget, covered = [], MAX_FOLLOW_BYTES, False
        for path in reversed(log_files(self.path)):
            first = self.file_first_seq if path == self.path else int(path.name.rpartition(".")[2])
            size = _size(path, self._dir)
            chosen.append((path, max(0, size - budget)))
            budget -= size
            if first is not None and first <= origin:
                covered = budget >= 0
                break
            if budget <= 0:
                break
        starts = (b'{"kind":"connection', b'{"kind":"request"')
        followed_from = None
        for path, skip in reversed(chosen):
            with (
                contextlib.suppress(OSError, AuditLogError),
                open(_open_to_read(path, self._dir), "rb") as f,
            ):
                f.seek(skip)
                if skip:
                    f.readline()  # the rest of a line cut by the budget
                for raw in f:
                    if not raw.startswith(starts):
                        continue
                    try:
                        record = json.loads(raw)
                        if record["seq"] < origin:
                            continue
                        event = Event.from_values([record.get(name) for name in FIELDS])
                    except (ValueError, KeyError, TypeError, RecursionError):  # [[[[... too deep
                        continue
                    followed_from = followed_from or record["seq"]
                    connections.follow([event])
        if covered:
            return ""
        return (
            f"of its lines from seq {origin} on, only the last {MAX_FOLLOW_BYTES >> 20} MiB "
            "were looked at: a connection opened before them and open still has no end"
        )

    # --- the writer thread -----------------------------------------------------------

    _busy = False

    def _run(self) -> None:
        taken, batch_size = self._taken, self.batch_size
        while True:
            if taken:
                # Chained here, a batch at a time, not on the loop as each event is
                # taken in: the loop's emit is then the encoding and the journal
                # record. In the gateway the chain cost the loop ~7 us a line (its
                # code and data cold between two events); here, a batch warm, ~3.
                # Only this thread pops: `_busy` is set first, so `drain` never sees
                # an empty queue and an idle writer while a batch is on its way.
                self._busy = True
                batch = [taken.popleft() for _ in range(min(len(taken), batch_size))]
                try:
                    self._write_lines(self._link(batch))
                except Exception:  # noqa: BLE001 - a bug must not stop the writer: count, log, go on
                    self.failed += len(batch)
                    log.exception("audit log %s: could not write %d events", self.path, len(batch))
                self._busy = False
                # What came meanwhile waits for a full batch (or a drain, the close,
                # `flush_interval`): under load, going on at once with the few events
                # a write took made batches of ~50 lines, each with its write, its
                # checks of the file and its GIL hand-overs (docs/performance.md,
                # "Session 33").
                if len(taken) >= batch_size or self._stopping or self._draining:
                    continue
            elif self._stopping:
                return
            self._wake.clear()
            self._idle = True
            if len(taken) < batch_size and not (taken and (self._stopping or self._draining)):
                self._wake.wait(self.flush_interval)
            self._idle = False

    def _write_lines(self, lines: list[tuple[bytes, int, str, tuple | None]]) -> None:
        """Append `lines`, rotating at `max_bytes`; the chain state moves only
        past lines that are on disk. A failed write is retried (with backoff)."""
        i, attempts = 0, 0
        while i < len(lines):
            try:
                self._follow_file()
                if self.size > 0 and self.size + len(lines[i][0]) > self.max_bytes:
                    self._rotate()
                j, room = i, self.max_bytes - self.size
                while j < len(lines) and (j == i or len(lines[j][0]) <= room):
                    room -= len(lines[j][0])
                    j += 1
                self._write_started = time.monotonic()
                try:
                    self._write_all(b"".join(line[0] for line in lines[i:j]))
                finally:
                    took, self._write_started = time.monotonic() - self._write_started, None
                if took >= self.stall_timeout:
                    log.error(
                        "audit log %s: a write was blocked for %.1f s (new connections "
                        "were refused meanwhile)",
                        self.path,
                        took,
                    )
                if os.fstat(self._fd).st_nlink == 0:
                    # Deleted before this write: these lines went nowhere. Not
                    # counted as written; the retry reopens FILE and writes them there.
                    raise OSError(errno.ENOENT, f"{self.path} was deleted while being written")
            except Exception as e:  # noqa: BLE001 - a bug too: the lines wait, connections are refused
                # OSError, AuditLogError (FILE.new taken, at rotation), or a bug (a
                # stray name in the directory once made the budget's count raise):
                # counted as a failed write, never as written or dropped.
                self.write_errors += 1
                attempts += 1
                if not isinstance(e, OSError | AuditLogError) and attempts == 1:
                    log.exception("audit log %s: a write failed unexpectedly", self.path)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self._problem = str(getattr(e, "strerror", None) or e)
                if attempts == 1 or attempts % 100 == 0:
                    log.error(
                        "audit log %s: write failed (%s); retrying, %d events waiting; "
                        "new connections are refused meanwhile unless --on-audit-failure continue",
                        self.path,
                        self._problem,
                        len(lines) - i + len(self._taken),
                    )
                if time.monotonic() >= self._give_up_at:
                    lost = len(lines) - i + len(self._taken)
                    self.failed += lost
                    self.given_up += lost
                    self._taken.clear()
                    log.error("audit log %s: gave up on %d events at close", self.path, lost)
                    return
                time.sleep(
                    min(0.05 * 2**attempts, 2.0, max(0.0, self._give_up_at - time.monotonic()))
                )
                continue
            _, self.seq, self.prev, _ = lines[j - 1]
            self._confirm(lines, i, j)
            if self.file_first_seq is None:
                self.file_first_seq = lines[i][1]
            self.written += j - i
            i, attempts = j, 0
            if self.failing_since is not None:
                log.warning(
                    "audit log %s: writable again after %.1f s (%s); the events held meanwhile "
                    "are being written",
                    self.path,
                    time.monotonic() - self.failing_since,
                    self._problem,
                )
                self.failing_since, self._problem = None, None

    def _follow_file(self) -> None:
        """Before a write, make the writer's idea of FILE the one on disk: FILE moved
        away or deleted goes on in a new FILE (`_reopen`); FILE cut short under the
        writer (logrotate's `copytruncate`, `: > FILE`) or appended to by someone else
        has its size taken again, so that rotation, the budget and the undo of a
        failed write start from the real end (an undo from the old size would fill
        the file with a hole of NUL bytes up to it and glue the next line to them)."""
        if not self._path_names_our_file():
            self._reopen()
            return
        size = os.fstat(self._fd).st_size
        if size == self.size:
            return
        if size < self.size:
            log.error(
                "audit log %s was truncated from %d to %d bytes while being written "
                "(copytruncate?); lines of seq %s..%d are only where it was copied to, "
                "if anywhere; the chain goes on from seq %d",
                self.path,
                self.size,
                size,
                self.file_first_seq,
                self.seq,
                self.seq + 1,
            )
        else:
            log.error(
                "audit log %s: %d bytes were appended by another process; "
                "`sandgate audit verify` will name them",
                self.path,
                size - self.size,
            )
        self.total += size - self.size
        self.size = size
        self.file_first_seq = _first_seq(self._fd) if size else None

    def _path_names_our_file(self) -> bool:
        """Whether FILE is still the file this writer appends to: an operator's
        `mv` (logrotate without copytruncate) or `rm` leaves the descriptor writing
        to a file no reader of FILE sees, or to none at all."""
        try:
            here = os.stat(self.path.name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return os.path.samestat(here, os.fstat(self._fd))

    def _reopen(self) -> None:
        """FILE was moved away or deleted under the writer: continue the chain in a
        new, empty FILE (its first line says the seq it goes on from). A FILE that
        someone else put there with lines in it is not appended to: that is a
        failure, retried until it is moved away, and new connections are refused."""
        deleted = os.fstat(self._fd).st_nlink == 0
        # A symbolic link put there is refused (AuditLogError, said, retried until it
        # is removed): opened through it, a dangling one made its target, anywhere.
        fd = _open_locked(self.path, self._dir)
        found = os.fstat(fd)
        if found.st_size or found.st_nlink > 1:
            # With lines, or a hard link to a file elsewhere: not ours to append to.
            os.close(fd)
            raise OSError(
                errno.EEXIST,
                f"{self.path} was replaced by another file while being written; move it away",
            )
        log.error(
            "audit log %s was %s while being written; lines of seq %s..%d %s; the chain "
            "goes on in a new %s from seq %d",
            self.path,
            "deleted" if deleted else "moved away",
            self.file_first_seq,
            self.seq,
            "are lost with it" if deleted else "are in the moved file",
            self.path.name,
            self.seq + 1,
        )
        os.close(self._fd)
        self._fd, self.size, self.file_first_seq = fd, 0, None

    def _write_all(self, data: bytes) -> None:
        if self.max_total_bytes is not None and self.total + len(data) > self.max_total_bytes:
            # Count again: an admin may have shipped rotated files away meanwhile.
            self.total = self.size + sum(_size(p, self._dir) for p in self._rotated())
            if self.total + len(data) > self.max_total_bytes:
                raise OSError(
                    errno.ENOSPC,
                    f"the audit budget of {self.max_total_bytes} bytes is reached "
                    f"({self.path} and its rotated files); move rotated files away",
                )
        start = self.size
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError:
            # Undo a partial line, so a retry (or the next event) starts clean.
            with contextlib.suppress(OSError):  # never past the end: that would be a hole
                os.ftruncate(self._fd, min(start, os.fstat(self._fd).st_size))
            raise
        self.size = start + len(data)
        self.total += len(data)

    def _rotate(self) -> None:
        """FILE -> FILE.<its first seq>; the chain continues in a new FILE. Nothing is
        overwritten or deleted: a rotated name that exists already is an error (retried,
        and said). The new file is opened first, so a failed open (no descriptor left)
        changes nothing on disk and is retried like a failed write."""
        rotated = self.path.with_name(f"{self.path.name}.{self.file_first_seq}")
        fresh = self.path.with_name(f"{self.path.name}.new")
        directory = self._dir
        # Every name below is relative to the log's directory and never followed: a
        # link planted as FILE.new had root truncate its target and write the log there.
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.stat(fresh.name, dir_fd=directory, follow_symlinks=False).st_mode):
                log.error(
                    "audit log %s: removing a symbolic link put there as %s (to %r), not "
                    "followed: sandgate makes no links; who may write %s?",
                    self.path,
                    fresh,
                    os.readlink(fresh.name, dir_fd=directory),
                    self.path.parent,
                )
            os.unlink(fresh.name, dir_fd=directory)  # a stale one (a crash mid-rotation)
        fd = _open_locked(fresh, directory, fresh=True)  # made here (O_EXCL), only ever empty
        try:
            try:
                # never replaces an existing file
                _link_fd(self._fd, self.path.name, rotated, directory)
            except FileExistsError:
                there = os.stat(rotated.name, dir_fd=directory, follow_symlinks=False)
                if not os.path.samestat(there, os.fstat(self._fd)):
                    raise OSError(
                        errno.EEXIST,
                        f"cannot rotate: {rotated} exists"
                        + (" (a symbolic link)" if stat.S_ISLNK(there.st_mode) else "")
                        + "; move it away",
                    ) from None
            os.replace(fresh.name, self.path.name, src_dir_fd=directory, dst_dir_fd=directory)
            here = os.stat(self.path.name, dir_fd=directory, follow_symlinks=False)
            if not os.path.samestat(here, os.fstat(fd)):
                # FILE.new swapped between its open and the rename: FILE is not the file
                # made here. The lines wait; the next try takes FILE as moved (`_reopen`).
                raise OSError(
                    errno.EEXIST,
                    f"{fresh} was replaced by another file while rotating {self.path}; "
                    "who may write its directory?",
                )
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd, self.size, self.file_first_seq = fd, 0, None

    def _rotated(self) -> list[Path]:
        """`rotated_files` of this log, from its directory; a symbolic link of such a
        name is refused (AuditLogError naming it): the writer never makes one."""
        found = rotated_files(self.path, self._dir)
        for path in found:
            _refuse_link(path, self._dir)
        return found


_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _free_but(journal: Path, start: int, end: int) -> None:
    """Give back the blocks of a kept journal but those of [start, end), its records
    not on disk (wrapping past the ring's end when start > end): each run that ended
    in an outage kept all JOURNAL_SIZE (16 MiB) of it, whatever it held. The file
    keeps its size and layout (a hole reads as zeros: no record), so the next open
    recovers it as it is; best effort (a file system without holes keeps it whole)."""
    try:
        fd = os.open(journal, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        keep = [(start, end)] if start <= end else [(start, size), (blackbox.HEADER_SIZE, end)]
        edges = sorted(keep)
        holes, at = [], blackbox.HEADER_SIZE
        for begin, stop in edges:
            holes.append((at, begin))
            at = max(at, stop)
        holes.append((at, size))
        for begin, stop in holes:
            if stop > begin:
                _libc.fallocate(
                    fd,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    ctypes.c_int64(begin),
                    ctypes.c_int64(stop - begin),
                )
    finally:
        os.close(fd)


def map_backed(fd: int, size: int) -> mmap.mmap:
    """A shared mapping of the first `size` bytes of the file `fd`, every block of it
    allocated first. A sparse file (ftruncate) has its blocks allocated as the mapping
    is written: on a full disk that write is a SIGBUS, which kills the gateway with
    its audit trail; allocated here, a full disk is an OSError (ENOSPC) now."""
    os.posix_fallocate(fd, 0, size)
    return mapped_ring(fd, size)


def mapped_ring(fd: int, size: int = 0) -> mmap.mmap:
    """A shared mapping of the ring file `fd` (a journal, a black box; size 0: all of
    it), without readahead (MADV_RANDOM): its first fault read ahead megabytes of the
    file, zeroing each page of it, ~4 ms of every run's start here and 1.5 ms more to
    drop them at its end (docs/performance.md, "Session 40"); a ring is written a page
    at a time, and a page it reaches is one fault then."""
    mapping = mmap.mmap(fd, size)
    mapping.madvise(mmap.MADV_RANDOM)
    return mapping


def worker_journal(journal: Path, index: int) -> Path:
    """The file gateway worker `index`'s black box is, next to the audit `journal`: the
    next open of the log reads it if the service was killed (`_recover_worker_box`)."""
    return journal.with_name(f"{journal.stem}.worker-{index}.ring")


def _whose(found: blackbox.Recovered) -> str:
    """Who left a journal's records `found`: STOPPED if the last is the note a process
    journals after the events it gave up on at close (`_journal_stop_note`), else
    KILLED. The note is a policy event, which only sandgate itself makes."""
    try:
        last = decode_members(found.payloads[-1]) if found.payloads else None
    except (ValueError, RecursionError):  # RecursionError: [[[[... too deep
        return KILLED
    if last is None or last.kind is not EventKind.POLICY:
        return KILLED
    stopped = last.reason is Reason.AUDIT_UNAVAILABLE and last.detail.startswith(STOP_NOTE)
    return STOPPED if stopped else KILLED


def journal_log(journal: Path) -> Path:
    """The audit log `journal` is the journal of (ValueError, OSError if unknown)."""
    # A link there is not followed (ELOOP), a FIFO not waited on.
    with open(os.open(journal.with_suffix(".log"), _READ_FLAGS), encoding="utf-8") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{journal.with_suffix('.log')} is not a regular file")
        return Path(f.read())


def rotated_files(path: Path | str, directory: int | None = None) -> list[Path]:
    """The rotated files of the log at `path` (`FILE.<first seq>`), oldest first; read
    from the descriptor `directory` of its directory if given. A symbolic link of such
    a name is listed too, never followed: the writer refuses it (`AuditLog._rotated`),
    `verify` reports it."""
    path = Path(path)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent if directory is None else directory):
            head, dot, number = entry.name.rpartition(".")
            # isascii: str.isdigit() also takes "²", which int() refuses; a FIFO or a
            # directory of that name is not a log file (reading one would hang or fail)
            if (
                dot
                and head == path.name
                and number.isascii()
                and number.isdigit()
                and (entry.is_file(follow_symlinks=False) or entry.is_symlink())
            ):
                found.append((int(number), path.with_name(entry.name)))
    return [p for _, p in sorted(found)]


def log_files(path: Path | str) -> list[Path]:
    """The whole log at `path`, oldest first: its rotated files, then FILE if it exists
    (a symbolic link there too: `verify` reports it, never follows it)."""
    path = Path(path)
    return rotated_files(path) + ([path] if os.path.lexists(path) else [])


def _size(path: Path, directory: int) -> int:
    """The size of the file `path` (its name in `directory`), a link's own if it is one."""
    try:
        return os.stat(path.name, dir_fd=directory, follow_symlinks=False).st_size
    except OSError:
        return 0


_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _open_to_read(path: Path | str, directory: int | None = None) -> int:
    """`path` (its name in `directory` if given) opened to read, never through a
    symbolic link (AuditLogError naming it) and only a regular file (not a FIFO that
    would block the reader)."""
    name = Path(path).name if directory is not None else path
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=directory)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _refuse_link(Path(path), directory)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AuditLogError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _refuse_link(path: Path, directory: int | None) -> None:
    """AuditLogError if `path` (its name in `directory` if given) is a symbolic link:
    this process (root) never follows one there. The audit writer makes none, so a link
    is the work of someone else who may write that directory (a log shipper), and
    followed it had root write, truncate or make the file it points to, anywhere."""
    try:
        if directory is None:
            target = os.readlink(path)
        else:
            target = os.readlink(path.name, dir_fd=directory)
    except OSError:
        return  # not a link (or gone): the caller's own error stands
    raise AuditLogError(
        f"{path} is a symbolic link (to {target!r}): refused, not followed; sandgate makes "
        f"no links there, so whoever may write {path.parent} put it there: remove it"
    )


def _link_fd(fd: int, name: str, path: Path, directory: int) -> None:
    """Give the open file `fd`, named `name` in `directory`, the name `path` (in
    `directory`) too; FileExistsError if that is taken (nothing is replaced). Linked
    from the descriptor (/proc/self/fd), not from `name`, which someone may have
    swapped for another file or a link meanwhile; without /proc, from `name`, never
    following it, and checked."""
    if os.path.isdir("/proc/self/fd"):
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory, follow_symlinks=True)
        return
    os.link(name, path.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
    if not os.path.samestat(
        os.stat(path.name, dir_fd=directory, follow_symlinks=False), os.fstat(fd)
    ):
        os.unlink(path.name, dir_fd=directory)  # the name just made: not the log's file
        raise OSError(errno.EAGAIN, f"{name} was replaced while {path} was made; retried")


def _check_directory(directory: int, path: Path) -> None:
    """Refuse a log directory (`directory`, a descriptor of `path`) that anyone may
    write, or that sits in one, without the sticky bit: anyone on the host could delete
    or replace the evidence (logrotate, sshd's StrictModes and sudo refuse such places
    too). A directory some other user or a group other than root's may write (a log
    shipper's: shipping rotated files away needs it) is said at start: that user can
    remove or replace the log's files, which the chain and the SIEM show, but cannot
    make this process write anywhere else (no link is followed there)."""
    found = os.fstat(directory)
    real = Path(os.path.realpath(path))
    for place, mode in ((path, found.st_mode), *((p, os.stat(p).st_mode) for p in real.parents)):
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise AuditLogError(
                f"the audit log's directory {path}"
                + ("" if place == path else f" is in {place}, which")
                + f" is writable by anyone (mode {stat.filemode(mode)}, no sticky bit): anyone "
                "on this host could delete or replace the log; "
                f"chmod o-w {place} (or +t), or choose another --audit-log"
            )
    writers = []
    if found.st_uid not in (0, os.geteuid()):
        writers.append(f"its owner (uid {found.st_uid})")
    if found.st_mode & stat.S_IWGRP and found.st_gid != 0:
        writers.append(f"group {found.st_gid}")
    if writers:
        log.warning(
            "audit log directory %s (mode %s) may be written by %s: they can remove or "
            "replace the log's files (ship lines to the SIEM as written: docs/telemetry.md), "
            "though not make sandgate write elsewhere (it follows no symbolic link there)",
            path,
            stat.filemode(found.st_mode),
            " and ".join(writers),
        )


def _first_seq(fd: int) -> int | None:
    head = os.pread(fd, 65536, 0).split(b"\n", 1)[0]
    try:
        seq = json.loads(head)["seq"]
    except (ValueError, KeyError, TypeError, RecursionError):  # [[[[... too deep
        return None
    return seq if isinstance(seq, int) else None


def _last_record(path: Path, directory: int) -> tuple[int, str]:
    """(seq, hash) of the last line of a rotated file, to continue its chain."""
    fd = _open_to_read(path, directory)
    try:
        seq, digest, _ = _continue_chain(fd, path, repair=False)
    finally:
        os.close(fd)
    return seq, digest


def _open_locked(path: Path, directory: int, fresh: bool = False) -> int:
    """The log file `path` (its name in the directory `directory`, a descriptor), opened
    to append and locked; made if missing. `fresh`: made here, never an existing file
    (O_EXCL). A symbolic link there is refused, never followed (`_refuse_link`)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path.name, flags | (os.O_EXCL if fresh else 0), 0o640, dir_fd=directory)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EEXIST):
            _refuse_link(path, directory)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        # A FIFO nobody reads blocks the writer for good while the gateway counts
        # the log as writable (and `close` waits forever); /dev/null keeps nothing.
        os.close(fd)
        raise AuditLogError(f"audit log {path} is not a regular file (a FIFO, device or socket)")
    if (kind := kernel_interface(fd)) is not None:
        os.close(fd)
        raise AuditLogError(f"audit log {path} is on {kind}, the kernel's settings, not a file")
    os.set_blocking(fd, True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogError(
            f"audit log {path} is in use by another sandgate process; "
            "give each run its own --audit-log"
        ) from None
    return fd


def _continue_chain(fd: int, path: Path, repair: bool = True) -> tuple[int, str, int]:
    """(seq, hash, size) to continue an existing log with. A torn last line (a
    crash mid-write: no newline) is cut off (`repair`; else it is ignored); a file
    that is not a sandgate audit log is refused rather than appended to."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS, 0
    tail_start = max(0, size - 65536)
    tail = os.pread(fd, size - tail_start, tail_start)
    if not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n") + 1
        if cut == 0 and tail_start > 0:
            raise AuditLogError(
                f"{path}: the last 64 KiB hold no complete line; not a sandgate audit log?"
            )
        log.warning(
            "audit log %s: removing a torn last line (%d bytes) left by a crash",
            path,
            len(tail) - cut,
        )
        if repair:
            os.ftruncate(fd, tail_start + cut)
        size, tail = tail_start + cut, tail[:cut]
        if size == 0:
            return 0, GENESIS, 0
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
        seq, digest = record["seq"], record["hash"]
        if not isinstance(seq, int) or not _HASH_SUFFIX.search(last):
            raise ValueError(seq)
    except (ValueError, KeyError, TypeError, RecursionError):  # [[[[... too deep
        raise AuditLogError(
            f"{path} exists and is not a sandgate audit log (its last line is no audit "
            "record); choose another --audit-log"
        ) from None
    return seq, digest, size


# --- verification -----------------------------------------------------------------------


@dataclass(frozen=True)
class Break:
    """One broken place in a log: `line` (1-based) of `file`, and what is wrong."""

    file: str
    line: int
    problem: str


@dataclass(frozen=True)
class Verification:
    """What `verify` found. `ok` is False if any line is broken: `file`, `line` and
    `problem` say where the first break is and what; `breaks` lists every break
    (the check goes on after each, so one bad line does not hide the rest)."""

    ok: bool
    lines: int  # lines checked, over all files
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    file: str | None = None
    line: int | None = None
    problem: str | None = None
    breaks: tuple[Break, ...] = ()
    intact_lines: int = 0  # lines before the first break (all of them when ok)

    @property
    def starts_fresh(self) -> bool:
        """The chain starts at a fresh log (seq 1), not in the middle of a rotated series."""
        return self.first_seq == 1


# Far above any event the gateway writes (a record is a few hundred bytes; a long URL
# a few kB): a longer line is damage, and verify does not hold it in memory whole.
MAX_RECORD_BYTES = 16 * 2**20


def verify(*paths: Path | str) -> Verification:
    """Check the hash chain over `paths`, taken as one log in the given order
    (rotated files oldest first: FILE.2 FILE.1 FILE). After a broken line the check
    goes on: from that line's own hash and seq when it has them (an edited line, a
    removed one before it), else from the next line as a new start."""
    prev: str | None = None
    seq: int | None = None
    first_seq: int | None = None
    last: tuple[str | None, int | None] = (None, None)  # the last line with a hash and seq
    total, intact = 0, 0
    breaks: list[Break] = []
    previous_file: Path | str | None = None
    for path in paths:
        try:
            fd = _open_to_read(path)
        except AuditLogError as e:  # a symbolic link (or no regular file): not followed
            breaks.append(Break(str(path), 0, str(e)))
            prev, seq, previous_file = None, None, path
            continue
        with open(fd, "rb") as f:
            # Read in bounded pieces: a damaged or hostile file may have one 1 GB "line".
            pieces = iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b"")
            for number, raw in enumerate(pieces, start=1):
                total += 1
                if len(raw) > MAX_RECORD_BYTES:  # the rest of that line: skipped, not held
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(MAX_RECORD_BYTES + 1)
                    problem = f"not an audit record (longer than {MAX_RECORD_BYTES} bytes)"
                    breaks.append(Break(str(path), number, problem))
                    prev, seq = None, None
                    continue
                chain = None if prev is None or seq is None else (prev, seq)
                here, problem = _check_line(raw, number, chain, path, previous_file)
                if problem:
                    breaks.append(Break(str(path), number, problem))
                elif not breaks:
                    intact += 1
                if here is not None:
                    first_seq = here[1] if first_seq is None else first_seq
                    last = here
                prev, seq = here if here is not None else (None, None)
        previous_file = path
    first = breaks[0] if breaks else None
    return Verification(
        not breaks,
        total,
        first_seq,
        last[1],
        last[0],
        first and first.file,
        first and first.line,
        first and first.problem,
        tuple(breaks),
        intact,
    )


def _check_line(
    raw: bytes,
    number: int,
    chain: tuple[str, int] | None,
    path: Path | str,
    previous_file: Path | str | None,
) -> tuple[tuple[str, int] | None, str | None]:
    """Line `number` of `path` against the chain so far (`chain`: the last good
    line's (hash, seq); None at a start): (this line's (hash, seq), or None if it
    has none to go on from; the problem, or None)."""
    if not raw.endswith(b"\n"):
        return None, "incomplete last line (no newline): torn write or truncated file"
    try:
        raw.decode("ascii")
        record = json.loads(raw)
        claimed, line_prev, line_seq = record["hash"], record["prev"], record["seq"]
    except (ValueError, KeyError, TypeError, RecursionError):  # [[[[... too deep
        return None, "not an audit record (not ASCII JSON with seq, prev and hash)"
    suffix = _HASH_SUFFIX.search(raw)
    if suffix is None or suffix.group(1).decode() != claimed or not isinstance(line_seq, int):
        return None, "not an audit record (hash is not the line's last member)"
    here = (claimed, line_seq)
    if chain_hash(str(line_prev), raw[: suffix.start()] + b"}") != claimed:
        return here, "hash mismatch: the line was edited"
    if chain is None:
        if (line_seq == 1) != (line_prev == GENESIS):
            return here, "chain start forged: seq 1 must follow the genesis hash"
        return here, None
    prev, seq = chain
    if number == 1 and line_seq > seq + 1:
        return here, (
            f"missing: seq {seq + 1}..{line_seq - 1} are in no file between "
            f"{previous_file} and this one (a rotated file, "
            f"{_rotated_name(path, seq + 1)}, was removed or not given)"
        )
    if line_prev != prev:
        return here, (
            "chain broken: 'prev' is not the previous line's hash "
            "(a line before this one was removed, inserted or reordered)"
        )
    if line_seq != seq + 1:
        return here, f"sequence gap: seq {line_seq} follows {seq}"
    return here, None


def _rotated_name(path: Path | str, seq: int) -> str:
    """The name a rotated file starting at `seq` has, next to `path` (a log or one of
    its rotated files)."""
    path = Path(path)
    head, dot, number = path.name.rpartition(".")
    base = head if dot and number.isascii() and number.isdigit() else path.name
    return f"{base}.{seq}"
