"""Whose a second service's state directory is, and what gc does with it
(enforcer/service_state.py): `fate` is pure; `claim`, `release` and `collect` on a
directory of the test's own, with no nftables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sandgate.enforcer import nft, process_stamp, service_state
from sandgate.enforcer.run import RunError
from sandgate.enforcer.service_state import OWNER_FILE, UNATTRIBUTED, Fate, fate, guard_table

CONTROL = Path("/run/sg-test/gateway.sock")
NAME = service_state._digest(CONTROL)
HERE, ELSEWHERE = 4026531840, 4026532999


def _record(control: Path = CONTROL, pid: int = 4242, start: int | None = 77, netns: int = HERE):
    return json.dumps({"control": str(control), "pid": pid, "start": start, "netns": netns})


def _fate(record: str | None, *, alive: bool = False, netns_exists: bool = True) -> Fate:
    return fate(
        NAME,
        record,
        alive=lambda pid, start: alive,
        netns_here=HERE,
        netns_exists=lambda inode: netns_exists,
    )


@pytest.mark.parametrize(
    "record, alive, netns_exists, expected",
    [
        pytest.param(_record(), True, True, Fate(False), id="live-owner-kept-silently"),
        pytest.param(
            _record(),
            False,
            True,
            Fate(True, guard_table(CONTROL)),
            id="dead-owner-removed-with-its-table",
        ),
        pytest.param(
            _record(netns=ELSEWHERE), False, False, Fate(True), id="dead-owner-whose-netns-is-gone"
        ),
        pytest.param(None, False, True, Fate(False, why=UNATTRIBUTED), id="no-record-kept"),
    ],
)
def test_fate(record, alive, netns_exists, expected):
    assert _fate(record, alive=alive, netns_exists=netns_exists) == expected


@pytest.mark.parametrize(
    "record, says",
    [
        pytest.param("", "not an owner record", id="empty"),
        pytest.param("{half", "not an owner record", id="half-written"),
        pytest.param(json.dumps({"pid": 1}), "not an owner record", id="no-control"),
        pytest.param(_record(pid=-1), "wrong kind", id="negative-pid"),
        pytest.param(_record(control=Path("rel/gateway.sock")), "wrong kind", id="relative-socket"),
        pytest.param(
            _record(control=Path("/run/other.sock")),
            "whose directory is another",
            id="another-dirs",
        ),
    ],
)
def test_a_record_that_names_no_owner_of_this_dir_keeps_it(record, says):
    decided = _fate(record)
    assert not decided.remove and decided.why.startswith(UNATTRIBUTED) and says in decided.why


def test_a_dead_owner_of_another_live_netns_is_kept_with_why():
    decided = _fate(_record(netns=ELSEWHERE), netns_exists=True)
    assert not decided.remove
    assert f"net:[{ELSEWHERE}]" in decided.why and "run sandgate gc there" in decided.why


@pytest.fixture
def state(tmp_path, monkeypatch):
    """STATE_DIR in tmp_path; nft lists no guard table and deletes none."""
    monkeypatch.setattr(service_state, "STATE_DIR", tmp_path)
    monkeypatch.setattr(service_state, "SERVICES_DIR", tmp_path / "services")
    monkeypatch.setattr(nft, "list_tables", lambda prefix: [])
    return tmp_path / "services"


def _gc(dry_run: bool = False) -> tuple[list[str], list[str]]:
    removed, kept = [], []

    def drop(what, action):
        if not dry_run:
            action()
        removed.append(what)

    service_state.collect(drop, kept.append)
    return removed, kept


def test_claim_records_this_process_and_gc_keeps_it(state, tmp_path):
    own = service_state.claim(tmp_path / "b.sock")
    record = json.loads((own / OWNER_FILE).read_text())
    assert record["pid"] == os.getpid()
    assert record["start"] == process_stamp.start_time(os.getpid())
    assert _gc() == ([], [])
    assert own.is_dir()
    service_state.release(own)
    assert not own.exists()


def test_claim_refuses_a_dir_of_another_live_service_and_release_leaves_it(state, tmp_path):
    own = service_state.claim(tmp_path / "b.sock")
    with pytest.raises(RunError, match="another gateway service is running"):
        _claim_as_another(tmp_path / "b.sock", own)
    service_state.release(own)  # not ours any more (a service that started since)
    assert own.is_dir()


def _claim_as_another(control: Path, own: Path) -> None:
    """`claim` by a process that is not the recorded owner (the record's pid is
    made someone else's: a live pid, ours, is checked as another's)."""
    record = json.loads((own / OWNER_FILE).read_text())
    (own / OWNER_FILE).write_text(json.dumps({**record, "pid": os.getppid(), "start": None}))
    service_state.claim(control)


def test_gc_removes_a_dir_whose_owner_is_gone_and_keeps_an_unattributed_one(state, tmp_path):
    dead = service_state.claim(tmp_path / "dead.sock")
    record = json.loads((dead / OWNER_FILE).read_text())
    # the pid is a live process's now (ours), with another start time: reused
    (dead / OWNER_FILE).write_text(json.dumps({**record, "start": record["start"] + 1}))
    (dead / "admin-token").write_text("t\n")
    older = state / service_state._digest(tmp_path / "older.sock")
    older.mkdir()  # an older sandgate's: no record

    assert _gc(dry_run=True)[0] == [f"service state {dead}"]
    assert dead.exists()
    removed, kept = _gc()
    assert removed == [f"service state {dead}"]
    assert kept == [f"service state {older}: {UNATTRIBUTED}"]
    assert not dead.exists() and older.exists()
    # A stopping service removes only its own directory: this one is nobody's now.
    service_state.release(older)
    assert older.exists()


def test_a_dead_owner_on_a_socket_spelled_with_dotdot_gets_its_own_guard_table(
    state, tmp_path, monkeypatch
):
    """The guard table's name hashes the socket's path as `absolute()` spells it (a
    `..` kept), the directory's as `abspath` (resolved): gc names the table the
    service loaded, not one of the resolved path."""
    control = tmp_path / "x" / ".." / "gateway.sock"
    own = service_state.claim(control)
    record = json.loads((own / OWNER_FILE).read_text())
    (own / OWNER_FILE).write_text(json.dumps({**record, "start": record["start"] + 1}))
    monkeypatch.setattr(nft, "list_tables", lambda prefix: [guard_table(control)])
    assert guard_table(control) != guard_table(tmp_path / "gateway.sock")
    assert _gc(dry_run=True)[0] == [f"nft table {guard_table(control)}", f"service state {own}"]
