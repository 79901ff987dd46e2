"""The approvals commands of the control protocol (enforcer/control.py), for the
gateway service's socket and for an embedded run's own socket (RUN_DIR/<id>/control.sock):

    {"cmd": "approvals"}                                  pending approvals (and recent decisions)
    {"cmd": "approval", "id": ID}                         one approval
    {"cmd": "approve", "id": ID, "scope": "once|task|duration|always",
     "duration": SECONDS, "ticket": T, "expires": "YYYY-MM-DD|INSTANT|DURATION",
     "widen": "*.DOMAIN", "seen": REVISION}               (widen: with duration or always;
                                                          seen: refused if more joined since)
    {"cmd": "deny", "id": ID}
    {"cmd": "watch"}                                      then one line per change, until closed

Who decided is the socket's peer (SO_PEERCRED): `uid 1000 (alice)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import pwd
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import yaml
from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.approvals.overlay import append_approved, restore, rule_expiry
from sandgate.proxy.approvals.pending import ApprovalError, Pending, Scope

log = logging.getLogger("sandgate.approvals")

COMMANDS = ("approvals", "approval", "approve", "deny", "watch")
LONGEST_DURATION = 9_999_999 * 86_400  # seconds: parse_duration's longest, 9999999d


def peer_user(writer: asyncio.StreamWriter) -> str:
    """`uid 1000 (alice)`: who is at the other end of a Unix socket."""
    sock = writer.get_extra_info("socket")
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):
        return "an unknown peer"
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


async def handle(approvals: Approvals, request: dict, approver: str) -> dict:
    """One approvals command (not `watch`): the reply. A refusal is one line."""
    cmd = request.get("cmd")
    try:
        if cmd == "approvals":
            return {"ok": True, "approvals": approvals.list(), "recent": approvals.recent()[:50]}
        pending_id = request.get("id")
        if not isinstance(pending_id, str) or not pending_id:
            return {
                "ok": False,
                "error": f"{cmd}: which approval? (an id from: sandgate approvals list)",
            }
        if cmd == "approval":
            return {"ok": True, "approval": approvals.get(pending_id)}
        if cmd == "deny":
            return {"ok": True, "approval": await approvals.deny(pending_id, approver)}
        if cmd == "approve":
            try:
                scope = Scope(request.get("scope", "once"))
            except ValueError:
                return {
                    "ok": False,
                    "error": "approve: scope must be once, task, duration or always",
                }
            duration = request.get("duration")
            # Up to the CLI's longest (parse_duration): a raw client's 1e400 (inf) never
            # ended, NaN never matched, and a 400-digit int overflowed the grant's end.
            if duration is not None and not (
                isinstance(duration, int | float)
                and not isinstance(duration, bool)
                and 0 < duration <= LONGEST_DURATION
            ):
                return {
                    "ok": False,
                    "error": "approve: duration must be a number of seconds > 0 "
                    f"and at most {LONGEST_DURATION} (9999999d)",
                }
            ticket = request.get("ticket")
            if ticket is not None and not isinstance(ticket, str):
                return {"ok": False, "error": "approve: ticket must be a string"}
            ticket = ticket[:100] if ticket else None
            expires = request.get("expires")
            if expires is not None:
                try:
                    expires = rule_expiry(str(expires), datetime.datetime.now().astimezone())
                except ValueError as e:
                    return {"ok": False, "error": f"approve: {e}"}
            widen = request.get("widen")
            seen = request.get("seen")
            if seen is not None and (not isinstance(seen, int) or isinstance(seen, bool)):
                return {"ok": False, "error": "approve: seen must be the revision shown (a number)"}
            record = await approvals.approve(
                pending_id,
                approver,
                scope,
                duration=duration,
                ticket=ticket,
                expires=expires,
                widen=str(widen)[:300] if widen else None,
                **({"seen": seen} if seen is not None else {}),
            )
            return {"ok": True, "approval": record}
    except ApprovalError as e:
        return {"ok": False, "error": f"{cmd}: {e}"}
    return {"ok": False, "error": f"unknown approvals command {str(cmd)[:40]!r}"}


async def changes(
    approvals: Approvals, reader: asyncio.StreamReader, ping: float | None = None
) -> AsyncIterator[tuple[str, dict] | None]:
    """Every change, `(what, approval)`, until the client at `reader` goes away (EOF or
    anything it sends). Yields None first, once subscribed (nothing is missed after it:
    the time to send the current list), then after every `ping` seconds without a
    change. Shared by `watch` and the admin page's Server-Sent Events."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)

    def enqueue(what: str, record: dict) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait((what, record))

    unsubscribe = approvals.subscribe(enqueue)
    closed = asyncio.ensure_future(reader.read())
    try:
        yield None
        while True:
            got = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {got, closed}, timeout=ping, return_when=asyncio.FIRST_COMPLETED
            )
            if got not in done:
                got.cancel()
                if closed in done:
                    return
            yield got.result() if got in done else None
    finally:
        unsubscribe()
        closed.cancel()


async def watch(
    approvals: Approvals, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Stream every change as a JSON line until the client goes away."""
    try:
        async for change in changes(approvals, reader):
            if change is None:
                reply = {"ok": True, "watching": True, "approvals": approvals.list()}
            else:
                reply = {"ok": True, "change": change[0], "approval": change[1]}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


def always_writer(
    overlay: Path | None,
    reload: Callable[[str], Awaitable[list[str]]],
    intents: Path | None = None,
) -> Callable[[Pending, str, str | None], Awaitable[None]]:
    """`Approvals.on_always` for a gateway whose rules are at `overlay`'s side:
    append the rule, reload (`reload(actor)` returns the errors), and put the file
    back (and reload again) if the reload fails, so that an `always` is either in force
    or not at all. One at a time: a second approver's rule appended while the first
    one's reload runs would be taken out again when that reload fails and the file is
    put back; and so across processes (two embedded runs, or a run and the service, on
    one rule file), whose read-modify-writes lost each other's rules: `overlay_lock`.

    While a rule is written and loaded a record of it (`intents`, default
    STATE_DIR/approvals: root's, out of the rules' git checkout) says which; a gateway
    killed meanwhile leaves it, and the next start (this call) reports what came of it
    (`report_interrupted`): the rule in force, or not. The approval's grant is in the
    audit either way (holder.py records it before the rule is written)."""
    one_at_a_time = asyncio.Lock()
    if overlay is not None:
        report_interrupted(overlay, intents)

    async def persist(found: Pending, approver: str, expires: str | None = None) -> None:
        if overlay is None:
            raise ApprovalError(
                "--always needs a rule file of your own (--rules FILE): approved.yaml goes next to it"
            )
        async with one_at_a_time, overlay_lock(overlay, intents=intents):
            intent = _write_intent(overlay, intents, found, approver)
            try:
                previous = append_approved(overlay, found, approver, expires=expires)
            except (OSError, yaml.YAMLError, ValueError) as e:  # disk full; edited by hand
                _drop(intent)  # (ValueError: not UTF-8)
                why = (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[0]
                raise ApprovalError(
                    f"{overlay} cannot be updated ({why}): fix or remove it; nothing was approved"
                ) from None
            except BaseException:  # nothing was written: no record of a rule being written
                _drop(intent)
                raise
            try:
                errors = await reload(f"approval {found.id} (always)")
            except Exception as e:  # noqa: BLE001 - whatever it was, the rule must not stay
                errors = [f"{type(e).__name__}: {e}"]
            if not errors:
                _drop(intent)
                return
            try:
                restore(overlay, previous)
            except OSError as e:
                raise ApprovalError(
                    f"the approved rule did not load ({'; '.join(errors)[:300]}) and "
                    f"{overlay} could not be put back ({e.strerror or e}): fix it by hand"
                ) from None
            # Loaded in part (a worker that did not take it): out of every part again.
            try:
                again = await reload(f"approval {found.id} (always) taken back")
            except Exception as e:  # noqa: BLE001
                again = [f"{type(e).__name__}: {e}"]
            if again:
                log.error("approval %s: reload after taking its rule out: %s", found.id, again)
            _drop(intent)
            raise ApprovalError(f"the approved rule did not load: {'; '.join(errors)[:300]}")

    return persist


def _intent_path(overlay: Path, intents: Path | None) -> Path:
    if intents is None:
        from sandgate.enforcer.run import STATE_DIR

        intents = STATE_DIR / "approvals"
    digest = hashlib.sha256(str(overlay.absolute()).encode()).hexdigest()[:16]
    return intents / f"always-{digest}.json"


def _write_intent(
    overlay: Path, intents: Path | None, found: Pending, approver: str
) -> Path | None:
    """The record of an `always` being written (under the overlay's lock); None if it
    cannot be written (said: the grant is in the audit anyway)."""
    path = _intent_path(overlay, intents)
    record = {
        "overlay": str(overlay.absolute()),
        "approval": found.id,
        "rule": f"approved:{found.id}",
        "approver": approver,
        "destination": found.key.describe(),
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        log.warning(
            "approval %s: cannot record the always being written in %s: %s", found.id, path, e
        )
        return None
    return path


def _drop(intent: Path | None) -> None:
    if intent is not None:
        with contextlib.suppress(OSError):
            intent.unlink()


def report_interrupted(overlay: Path, intents: Path | None = None) -> str | None:
    """A gateway stopped (killed) while an `always` rule was written to `overlay` and
    loaded: say on stderr what came of it, remove the record, and return the line
    (None: nothing to report, or another process is writing `overlay` right now)."""
    path = _intent_path(overlay, intents)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    try:  # one being written now is a live process's, not a leftover
        lock = _open_lock(overlay, intents)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    try:
        rule = str(record.get("rule", "approved:?"))
        try:
            text = overlay.read_text(encoding="utf-8") if not overlay.is_symlink() else ""
        except (OSError, UnicodeDecodeError):
            text = ""
        in_force = rule in text
        what = (
            f"its rule {rule} is in {overlay} and in force; the audit holds its approval_granted"
            if in_force
            else f"its rule {rule} is not in {overlay}: nothing of it is in force (the "
            "approval_granted the audit holds for it did not take effect; the task may ask again)"
        )
        line = (
            f"sandgate: approval {record.get('approval', '?')} ({record.get('destination', '?')}, "
            f"always, by {record.get('approver', '?')} at {record.get('at', '?')}) was being "
            f"written when the gateway stopped: {what}"
        )
        print(line, file=sys.stderr, flush=True)
        log.warning("%s", line)
        _drop(path)
        return line
    finally:
        os.close(lock)


OVERLAY_LOCK_WAIT_S = 30.0  # a reload takes well under a second; a holder stuck longer is a fault


def _open_lock(overlay: Path, intents: Path | None) -> int:
    """The lock file of every process that writes `overlay`: root's, beside the intent
    records (STATE_DIR/approvals-locks, out of the rules' git checkout), named after the
    overlay's real path (one lock whatever the spelling). Not the overlay's directory:
    flock needs only a descriptor, and a task reads the rules' directory like the
    rest of the host (/etc/sandgate, read-only in every sandbox): one that opened it
    and held LOCK_EX made every `always` of every task on the gateway wait 30 s and
    be refused, for as long as it ran."""
    real = os.path.realpath(overlay)
    name = f"always-{hashlib.sha256(real.encode()).hexdigest()[:16]}.lock"
    records = _intent_path(overlay, intents).parent
    directory = records.with_name(f"{records.name}-locks")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(directory / name, flags, 0o600)


@contextlib.asynccontextmanager
async def overlay_lock(
    overlay: Path, wait: float = OVERLAY_LOCK_WAIT_S, intents: Path | None = None
) -> AsyncIterator[None]:
    """`overlay` locked (flock of `_open_lock`'s file) for every process that writes
    it. Tried without blocking every 20 ms, so that the loop keeps running and a
    cancelled wait leaves no thread behind to take the lock later. A holder that dies
    releases it. ApprovalError when it cannot be had."""
    try:
        lock = _open_lock(overlay, intents)
    except OSError as e:
        raise ApprovalError(
            f"the lock of {overlay} cannot be opened ({e.strerror or e}): nothing was approved"
        ) from None
    try:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if asyncio.get_running_loop().time() > deadline:
                    raise ApprovalError(
                        f"{overlay} is being updated by another gateway for over {wait:g} s: "
                        "nothing was approved; try again"
                    ) from None
                await asyncio.sleep(0.02)
        yield
    finally:
        os.close(lock)  # closing releases the lock


async def serve(path: Path, approvals: Approvals) -> asyncio.AbstractServer:
    """An embedded run's control socket: the approvals commands only, root-only."""
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(
            lambda r, w: _serve_client(approvals, r, w), str(path)
        )
    finally:
        os.umask(old_umask)


async def _serve_client(approvals: Approvals, reader, writer) -> None:
    approver = peer_user(writer)
    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError
            except (ValueError, RecursionError):  # RecursionError: [[[[... too deep
                reply = {"ok": False, "error": "not a JSON object"}
            else:
                cmd = request.get("cmd")
                if cmd == "watch":
                    await watch(approvals, reader, writer)
                    return
                try:
                    if cmd == "status":
                        reply = {"ok": True, "embedded": True, "approvals": len(approvals.list())}
                    elif cmd in COMMANDS:
                        reply = await handle(approvals, request, approver)
                    else:
                        reply = {
                            "ok": False,
                            "error": "an embedded run's socket answers the approvals commands only",
                        }
                except Exception as e:  # noqa: BLE001 - a request never takes the socket down
                    # As the service's socket (service.py): logged once, said, served on;
                    # not asyncio's "Unhandled exception in client_connected_cb".
                    log.exception("approvals request %r failed", cmd)
                    what = str(cmd)[:40]
                    reply = {
                        "ok": False,
                        "error": f"{what}: internal error ({type(e).__name__}); see the run's log",
                    }
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()
