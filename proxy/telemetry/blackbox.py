"""A gateway worker's black box: the events it made, in shared memory, for the
service to read after the worker died.

A worker (proxy/worker.py) sends its events to the service in batches on a 100 ms
tick; one killed (SIGKILL, the OOM killer, a crash in C) took the events it had not
sent with it: connections that reached an upstream with no audit event. So the
worker also writes each event's audit members, the bytes it will send, into a ring
in memory the service made (a memfd, passed like its sockets), as it emits the event:
before the decision takes effect (the gate emits, then returns the outcome that opens
the upstream connection). A write is a checksum and a copy into the mapping, no
system call. When the worker dies, the service reads the records past the last
event it received over the link (`recover`), and ingests them as recovered.

Layout (little-endian): a HEADER_SIZE header, then records back to back.

    header:  magic u32 | 0 u32 | mark u64 | mark_seq u64 | last_seq u64
             | written u64 | origin u64   (an audit journal's: see below)
             | taken u64 | taken_pos u64  (a worker's box, by the service: below)
    record:  length u32 | crc32 u32 | seq u64 | payload (length bytes)

- `seq` numbers the records 1, 2, ...; the crc covers seq and payload, so a record
  the worker was killed in the middle of writing (a torn write) fails it and ends
  the walk. `last_seq` is written after each record.
- `mark`, `mark_seq`: where the first record the service may not have yet starts,
  and its seq. The worker moves them after a flush that left nothing in its own
  buffer (everything sent is in the socket, which the service reads to its end
  before it reads the black box): what lies before the mark is the service's.
- A record that does not fit before the end starts again after the header (WRAP
  where the room allows a length). Writing over the mark's record (a burst of more
  than the ring holds between two flushes: the service has stopped reading) moves
  the mark to the new record: the older unsent records are gone from the black
  box, and `recover` counts them `lost` (seq = the gap), as the audit writer's
  `lost` counts what it could not write.
- Ordering: the service reads only after the worker has exited and been reaped
  (waitpid); a process's exit is a full barrier, so every store the worker made is
  visible to the reader whatever the CPU's memory model. No lock, no atomics.

The same ring is the audit log's **journal** (proxy/telemetry/audit.py): a file
under the state dir that outlives a SIGKILLed process. There the loop writes each
event as the audit log takes it in, and the audit writer thread, another thread,
says what is on disk: `confirm(seq, ...)` after the `write` of the line of record
`seq` returned (its bytes are in the page cache: they survive the process) stores
`written` = seq, and publishes where the next record starts; the loop moves the mark
there at its next `write` (one thread moves the mark: the writer's confirmation and
an overrun never race for it). So the mark may lag `written`, never pass it, and the
next start recovers the records past `written` (`recover(buffer, written(buffer))`).
`origin` is the audit seq the writing process started at, for the next start to
know which lines of the log were that process's. Ordering: a store a process made
is in the shared page when it is killed (the kill is a full barrier as an exit is);
the writer stores `written` only after the line's `write` returned.

A worker's box is a file next to the journal, too (`sandgate gateway --workers N`):
the workers die with a killed service, and what they had sent that the service had
not yet read died in their sockets. So the service, after it put a batch into its
journal (the same loop, the stores in that order), stores in the worker's box the
batch's last seq and where the record after it starts (`take`: the worker sends its
`pos` with each batch). The next start reads each box from there (`recover(...,
start=taken(buffer))`): what the service never took, whatever the worker's own mark
says. Only the service writes `taken`; only the worker the rest of the header.

Pure: it works on any writable buffer (an mmap, a bytearray in the tests).
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

MAGIC = 0x5342_4258  # "SBBX"
HEADER = struct.Struct("<IIQQQ")
HEADER_SIZE = 64  # one cache line: the records start aligned
RECORD = struct.Struct("<IIQ")
SEQ = struct.Struct("<Q")
WRAP = 0xFFFF_FFFF  # a length: the next record is after the header
_MARK = struct.Struct("<QQ")
_MARK_AT = 8
_LAST_AT = 24
_WRITTEN_AT = 32
_ORIGIN_AT = 40
_TAKEN = struct.Struct("<QQ")
_TAKEN_AT = 48
# The memory the service gives each worker: unsent events are at most FLUSH_COUNT
# (256) between two flushes, each under ~5 KB (bounded fields): ~1.3 MB at worst.
DEFAULT_SIZE = 4 << 20


class Recovered(NamedTuple):
    payloads: list[bytes]  # the records past `after`, oldest first
    lost: int  # records made past `after` that the black box no longer holds
    last_seq: int  # the last seq the worker wrote (0: none)


def blank(buffer) -> None:
    """Make `buffer` an empty black box (the service, before it passes it on)."""
    HEADER.pack_into(buffer, 0, MAGIC, 0, HEADER_SIZE, 1, 0)
    buffer[HEADER.size : HEADER_SIZE] = bytes(HEADER_SIZE - HEADER.size)  # written, origin


class BlackBox:
    """The writing end: `write` each event's payload; a worker calls `mark_sent` after
    a flush that left nothing unsent, the audit writer thread `confirm` after a
    line is on disk. One thread writes records (the event loop)."""

    def __init__(self, buffer):
        if len(buffer) < HEADER_SIZE + 4096:
            raise ValueError(f"a black box of {len(buffer)} bytes is too small")
        magic, _, mark, mark_seq, last_seq = HEADER.unpack_from(buffer, 0)
        if magic != MAGIC:
            raise ValueError("not a black box (bad magic)")
        self.buffer = buffer
        self.size = len(buffer)
        self.pos = mark
        self.seq = last_seq
        # Bytes taken so far (records and the gaps wraps left): what lies between the
        # mark and `pos` is `stream - mark_stream`, wraps included.
        self.stream = self.mark_stream = 0
        # The audit writer's last `confirm`: (pos, seq, stream) of the first record
        # not yet on disk; the loop moves the mark there (`write`).
        self.confirmed: tuple[int, int, int] | None = None
        # A longer payload is kept as an empty record: the service counts it lost.
        self.largest = (self.size - HEADER_SIZE) // 4 - RECORD.size

    def write(self, payload: bytes) -> int:
        """Append `payload` as the next record; its seq."""
        self.seq = seq = self.seq + 1
        if len(payload) > self.largest:
            payload = b""
        length, buffer = len(payload), self.buffer
        confirmed = self.confirmed
        if confirmed is not None and confirmed[2] > self.mark_stream:
            _MARK.pack_into(buffer, _MARK_AT, confirmed[0], confirmed[1])
            self.mark_stream = confirmed[2]
        pos, need = self.pos, RECORD.size + length
        if pos + need > self.size:
            if pos + 4 <= self.size:
                struct.pack_into("<I", buffer, pos, WRAP)
            self.stream += self.size - pos
            pos = HEADER_SIZE
        if self.stream + need - self.mark_stream > self.size - HEADER_SIZE:
            # The mark's record would be written over: drop the unsent before it.
            _MARK.pack_into(buffer, _MARK_AT, pos, seq)
            self.mark_stream = self.stream
        RECORD.pack_into(buffer, pos, length, zlib.crc32(payload, zlib.crc32(SEQ.pack(seq))), seq)
        buffer[pos + RECORD.size : pos + need] = payload
        self.pos = pos + need
        self.stream += need
        SEQ.pack_into(buffer, _LAST_AT, seq)
        return seq

    def mark_sent(self) -> None:
        """Everything written so far has been sent (is in the socket)."""
        if self.stream != self.mark_stream:
            _MARK.pack_into(self.buffer, _MARK_AT, self.pos, self.seq + 1)
            self.mark_stream = self.stream

    def confirm(self, seq: int, pos: int, stream: int) -> None:
        """Record `seq` (which ended at `pos`, `stream`, as `write` left them) and all
        before it are on disk: from the audit writer thread, after its `write`
        returned. `written` moves now (forward only); the mark at the loop's next
        `write`."""
        confirmed = self.confirmed
        if confirmed is not None and seq < confirmed[1]:
            return
        SEQ.pack_into(self.buffer, _WRITTEN_AT, seq)
        self.confirmed = (pos, seq + 1, stream)

    def set_origin(self, audit_seq: int) -> None:
        """The audit seq this process's first line has (`origin`)."""
        SEQ.pack_into(self.buffer, _ORIGIN_AT, audit_seq)


def written(buffer) -> int:
    """The last seq the audit writer said is on disk (0: none, or not a journal)."""
    return SEQ.unpack_from(buffer, _WRITTEN_AT)[0]


def origin(buffer) -> int:
    """The audit seq the process that wrote the journal started at (0: unknown)."""
    return SEQ.unpack_from(buffer, _ORIGIN_AT)[0]


def take(buffer, seq: int, pos: int) -> None:
    """The service has record `seq` of this worker's box in its journal; the next
    record starts at `pos`."""
    _TAKEN.pack_into(buffer, _TAKEN_AT, seq, pos)


def taken(buffer) -> tuple[int, int]:
    """(pos, seq) of the first record the service did not take: where `recover`
    starts a killed service's worker box (the ring's start if it took none)."""
    seq, pos = _TAKEN.unpack_from(buffer, _TAKEN_AT)
    return (pos if seq else HEADER_SIZE), seq + 1


def is_black_box(buffer) -> bool:
    return len(buffer) >= HEADER_SIZE + 4096 and HEADER.unpack_from(buffer, 0)[0] == MAGIC


def recover(buffer, after: int, start: tuple[int, int] | None = None) -> Recovered:
    """The records of the black box in `buffer` whose seq is past `after` (the last
    the service received), read from the mark (or `start`: (pos, seq)) while each is
    whole (its crc) and in sequence. Only after the writer died (the module's
    docstring)."""
    size = len(buffer)
    magic, _, pos, expected, last_seq = HEADER.unpack_from(buffer, 0)
    if start is not None:
        pos, expected = start
    if magic != MAGIC or not HEADER_SIZE <= pos <= size:
        return Recovered([], max(0, last_seq - after) if magic == MAGIC else 0, 0)
    payloads: list[bytes] = []
    walked, first, newest = 0, True, after
    view = memoryview(buffer)
    while walked <= size:
        if pos + RECORD.size > size:
            walked += size - pos
            pos = HEADER_SIZE
            continue
        length, crc, seq = RECORD.unpack_from(buffer, pos)
        if length == WRAP:
            walked += size - pos
            pos = HEADER_SIZE
            continue
        end = pos + RECORD.size + length
        # The mark's own seq may lag the mark (a kill between the two stores): the
        # first record may be newer, never older (an older one is a past lap's).
        if end > size or (seq < expected if first else seq != expected):
            break
        if zlib.crc32(view[pos + RECORD.size : end], zlib.crc32(SEQ.pack(seq))) != crc:
            break  # torn: the worker died writing it
        if seq > after and length:  # empty: one too long to keep, counted lost
            payloads.append(bytes(view[pos + RECORD.size : end]))
        newest = max(newest, seq)
        first, expected = False, seq + 1
        walked += end - pos
        pos = end
    view.release()
    last_seq = max(last_seq, newest)
    return Recovered(payloads, max(0, last_seq - after - len(payloads)), last_seq)
