"""Whose a second gateway service's state directory is, and `sandgate gc` of dead ones'.

A service on the default control socket keeps its state in STATE_DIR itself; one on
another socket (a second service on the host) in STATE_DIR/services/<digest of the
socket's path>/: its upstream CA bundle and its admin token. A clean stop removes
that directory; a SIGKILLed service left it, and its guard table, for ever.

So the service records itself there at its start (OWNER_FILE: the socket's path,
its pid and start time, `process_stamp`, and its network namespace, where its guard
table is), and gc removes a directory whose recorded service is gone, with its
guard table. Both hold the lock of STATE_DIR/services (flock on the directory)
while they look and change: a service makes its directory and records itself in
one step, so gc never sees a service's directory before its owner, never removes
one that a service on the same socket is setting up again, and never deletes the
guard table of a service that has just taken the socket over (a service loads its
table after recording itself). A directory that names no owner (an older
sandgate's, whose service may be running) is left, and gc says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from sandgate.enforcer import control, nft, process_stamp
from sandgate.enforcer.run import STATE_DIR, RunError, make_dir

# Not run.TABLE_PREFIX: gc must never take a guard table for a run's.
GUARD_TABLE_PREFIX = "sandgatesvc_"
SERVICES_DIR = STATE_DIR / "services"
OWNER_FILE = "owner.json"


def guard_table(control_socket: Path) -> str:
    """The guard table of the service on `control_socket`. One per service: services
    with their own control sockets may share a host, and one replacing (or, stopping,
    deleting) the other's table would open the other's ports to the LAN."""
    digest = hashlib.sha256(str(control_socket.absolute()).encode()).hexdigest()
    return GUARD_TABLE_PREFIX + digest[:12]


def service_state_dir(control_socket: Path) -> Path:
    """The state of the service on `control_socket` that no other service may share:
    its upstream CA bundle (its own --extra-ca) and its admin token. The default
    socket's is STATE_DIR itself (the documented /var/lib/sandgate/admin-token);
    another socket's (a second service on the host) is STATE_DIR/services/<digest of
    the socket's path>: a second service wrote over the first's bundle, whose
    upstream certificate checks then failed (every inspected request a 502), and
    over its token."""
    if os.path.abspath(control_socket) == os.path.abspath(control.DEFAULT_SOCKET):
        return STATE_DIR
    return SERVICES_DIR / _digest(control_socket)


def _digest(control_socket: Path | str) -> str:
    return hashlib.sha256(os.path.abspath(control_socket).encode()).hexdigest()[:16]


class Owner(NamedTuple):
    """The service a state directory is of, as it recorded itself (OWNER_FILE)."""

    control: Path
    pid: int
    start: int | None
    netns: int  # the inode of its network namespace, which holds its guard table


def parse_owner(text: str, dir_name: str) -> Owner:
    """The owner an OWNER_FILE's text names; ValueError when it names none, or one
    whose directory is not `dir_name` (not this directory's: someone else's file)."""
    try:
        record = json.loads(text)
        owner = Owner(Path(record["control"]), record["pid"], record.get("start"), record["netns"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not an owner record: {e}") from None
    fields = (owner.pid, owner.netns) + (() if owner.start is None else (owner.start,))
    if not all(type(v) is int and v > 0 for v in fields) or not owner.control.is_absolute():
        raise ValueError("not an owner record: a field of the wrong kind")
    if _digest(owner.control) != dir_name:
        raise ValueError(f"names {owner.control}, whose directory is another")
    return owner


class Fate(NamedTuple):
    """What gc does with one service state directory: `remove` it (and `table`, its
    service's guard table in gc's namespace, if any), or keep it, saying `why` (empty:
    a live service's, nothing to say)."""

    remove: bool
    table: str | None = None
    why: str = ""


UNATTRIBUTED = (
    "names no service (made by an older sandgate, whose service may still run: "
    "remove it by hand once none started before the upgrade runs)"
)


def fate(
    dir_name: str,
    record: str | None,
    *,
    alive: Callable[[int, int | None], bool],
    netns_here: int,
    netns_exists: Callable[[int], bool],
) -> Fate:
    """gc's decision on STATE_DIR/services/`dir_name`, whose OWNER_FILE holds `record`
    (None: there is none). In order:

    1. No owner named (no record, or not one of this directory): kept, unattributed.
    2. Its owner lives (`alive(pid, start)`: a pid the kernel has given to another
       process since does not count): kept, silently.
    3. Its owner ran in another network namespace that still exists: kept, since its
       guard table may be there (gc lists and deletes tables only in its own).
    4. Otherwise removed, with its guard table when that is in gc's namespace (in a
       namespace that is gone, the table went with it)."""
    if record is None:
        return Fate(False, why=UNATTRIBUTED)
    try:
        owner = parse_owner(record, dir_name)
    except ValueError as e:
        return Fate(False, why=f"{UNATTRIBUTED}: {OWNER_FILE} {e}")
    if alive(owner.pid, owner.start):
        return Fate(False)
    if owner.netns != netns_here:
        if netns_exists(owner.netns):
            return Fate(
                False,
                why=f"its service (pid {owner.pid}, gone) ran in network namespace "
                f"net:[{owner.netns}], which holds its guard table: run sandgate gc there",
            )
        return Fate(True)
    return Fate(True, table=guard_table(owner.control))


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    fd = os.open(SERVICES_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _netns_inode(where: str = "/proc/thread-self/ns/net") -> int:
    return os.stat(where).st_ino


def _read_owner_text(state_dir: Path) -> str | None:
    try:
        return (state_dir / OWNER_FILE).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""  # unreadable: names no one


def claim(control_socket: Path) -> Path:
    """The state directory of the service on `control_socket`, made if need be, with
    this process recorded as its owner; RunError if another live process is. The
    default socket's (STATE_DIR) records no one: nothing removes it."""
    own = service_state_dir(control_socket)
    if own == STATE_DIR:
        make_dir(own, "SANDGATE_STATE_DIR")
        return own
    make_dir(SERVICES_DIR, "SANDGATE_STATE_DIR")
    with _locked():
        text = _read_owner_text(own)
        with contextlib.suppress(ValueError):
            other = parse_owner(text or "", own.name)
            if other.pid != os.getpid() and process_stamp.alive(other.pid, other.start):
                raise RunError(
                    f"another gateway service is running at {control_socket} (pid {other.pid})"
                )
        make_dir(own, "SANDGATE_STATE_DIR")
        record = {
            # as guard_table spells it (absolute(), which keeps a "..": abspath does not)
            "control": str(control_socket.absolute()),
            "pid": os.getpid(),
            "start": process_stamp.start_time(os.getpid()),
            "netns": _netns_inode(),
        }
        partial = own / f"{OWNER_FILE}.new"
        partial.write_text(json.dumps(record) + "\n")
        partial.replace(own / OWNER_FILE)
    return own


def release(state_dir: Path) -> None:
    """Remove the state directory of a stopping service if it is still this
    process's (not that of a service on the same socket that started since)."""
    if state_dir == STATE_DIR:
        return
    with _locked():
        try:
            owner = parse_owner(_read_owner_text(state_dir) or "", state_dir.name)
        except ValueError:
            return
        if owner.pid == os.getpid():
            shutil.rmtree(state_dir, ignore_errors=True)


def _netns_exists(inode: int) -> bool:
    """Whether a network namespace of `inode` is still held: mounted under /run/netns
    or entered by some process (one held only by an open fd is missed)."""
    places = [*Path("/run/netns").glob("*"), *Path("/proc").glob("[0-9]*/ns/net")]
    for place in places:
        with contextlib.suppress(OSError):
            if os.stat(place).st_ino == inode:
                return True
    return False


def collect(drop: Callable[[str, Callable[[], object]], None], keep: Callable[[str], None]) -> None:
    """gc's pass over STATE_DIR/services: `drop(what, action)` each dead service's
    guard table and directory, `keep(what)` each directory left with a reason."""
    if not SERVICES_DIR.is_dir():
        return
    with _locked():
        tables = set(nft.list_tables(GUARD_TABLE_PREFIX))
        here = _netns_inode()
        for state_dir in sorted(p for p in SERVICES_DIR.iterdir() if p.is_dir()):
            decided = fate(
                state_dir.name,
                _read_owner_text(state_dir),
                alive=process_stamp.alive,
                netns_here=here,
                netns_exists=_netns_exists,
            )
            if not decided.remove:
                if decided.why:
                    keep(f"service state {state_dir}: {decided.why}")
                continue
            if decided.table in tables:
                drop(f"nft table {decided.table}", lambda t=decided.table: nft.delete_table(t))
            drop(
                f"service state {state_dir}",
                lambda d=state_dir: shutil.rmtree(d, ignore_errors=True),
            )
