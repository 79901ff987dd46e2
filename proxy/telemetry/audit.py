"""The audit log: JSON lines a SIEM ingests as is, hash-chained, written off the loop.

One event per line. `json.dumps(ensure_ascii=True)` escapes every control
character and non-ASCII byte, so no field value (a Host header with quotes and
newlines, say) can end a line or forge another. Each line carries `seq`, the
previous line's hash `prev` and its own `hash` = sha256(prev + the line's JSON
without `hash`): editing, removing or reordering lines breaks the chain, which
`sandgate audit verify` reports by line number. The chain continues across
rotation (a rotated file's first `prev` is the last hash of the one before).

`emit` never blocks the event loop: events go into a bounded queue that a writer
thread drains. If the queue is full the event is counted in `lost` (exported as
a metric) — the writer is sized so that a test under load holds it at 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from pathlib import Path

from proxy.telemetry.event import Event

log = logging.getLogger("sandgate.audit")

GENESIS = "0" * 64
_STOP = object()


def chain_hash(prev: str, body: str) -> str:
    return hashlib.sha256((prev + body).encode()).hexdigest()


def _last_link(path: Path) -> tuple[int, str]:
    """(seq, hash) of the last line of an existing log, to continue its chain."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
        last = json.loads(lines[-1]) if lines else None
        return (last["seq"], last["hash"]) if last else (0, GENESIS)
    except (OSError, ValueError, KeyError, IndexError):
        return 0, GENESIS


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = 100 * 2**20, backups: int = 5, queue_size: int = 100_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups = max_bytes, backups
        self.seq, self.prev = _last_link(self.path)
        self.lost = 0  # events that could not be queued or written
        self.written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._file = self.path.open("a", encoding="ascii")
        self._thread = threading.Thread(target=self._drain, name="sandgate-audit", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.lost += 1

    def close(self) -> None:
        """Write everything queued, then close."""
        self._queue.put(_STOP)
        self._thread.join()
        self._file.close()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._file.flush()
                return
            try:
                self._write(item)
                # Flush when the queue is idle: batches under load, prompt when quiet.
                if self._queue.empty():
                    self._file.flush()
            except Exception:  # noqa: BLE001 - count, log, keep writing the rest
                self.lost += 1
                log.exception("audit log: could not write an event to %s", self.path)

    def _write(self, event: Event) -> None:
        self.seq += 1
        record = {**event.to_dict(), "seq": self.seq, "prev": self.prev}
        body = json.dumps(record, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
        self.prev = chain_hash(self.prev, body)
        line = body[:-1] + f',"hash":"{self.prev}"}}\n'
        if self._file.tell() + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self.written += 1

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("a", encoding="ascii")


def verify(path: Path) -> tuple[int, str | None]:
    """Check the chain of one log file: (lines checked, None) if intact, else
    (line number, what is wrong) for the first broken line."""
    prev = None
    count = 0
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            count = number
            try:
                record = json.loads(raw)
                claimed = record.pop("hash")
            except (ValueError, KeyError, AttributeError):
                return number, "not a sandgate audit record (unparsable JSON or no hash)"
            if prev is not None and record.get("prev") != prev:
                return number, "chain broken: 'prev' is not the previous line's hash (a line was removed or reordered)"
            body = json.dumps(record, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
            if chain_hash(record.get("prev", ""), body) != claimed:
                return number, "hash mismatch: the line was edited"
            prev = claimed
    return count, None
