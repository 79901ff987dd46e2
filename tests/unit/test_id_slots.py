"""The host id pool and its slots (enforcer/sandbox/id_slots.py): where the pool comes
from, and that a slot is one holder's until it is released or the holder dies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sandgate.enforcer.sandbox import id_slots
from sandgate.enforcer.sandbox.spec import ID_BASE, ID_COUNT, SandboxError


def write(path, text):
    path.write_text(text)
    return path


def test_the_built_in_pool_is_slots_of_a_range_from_the_base(tmp_path):
    pool = id_slots.host_id_pool(tmp_path / "none", tmp_path / "none")
    assert (pool.base, pool.slots) == (ID_BASE, id_slots.ID_SLOTS)
    assert pool.slot(3).base == ID_BASE + 3 * ID_COUNT and pool.slot(3).count == ID_COUNT
    assert pool.slot(pool.slots - 1).base + ID_COUNT - 1 < 2**31  # no id a tool reads as negative


@pytest.mark.parametrize(
    "count, gid_count, slots",
    [
        pytest.param(ID_COUNT, ID_COUNT, 1, id="one-range"),
        pytest.param(8 * ID_COUNT, 8 * ID_COUNT, 8, id="eight"),
        pytest.param(8 * ID_COUNT + 100, 8 * ID_COUNT, 8, id="remainder-unused"),
        pytest.param(8 * ID_COUNT, 2 * ID_COUNT, 2, id="fewer-gids"),
    ],
)
def test_a_subuid_entry_gives_one_slot_per_range_of_ids(tmp_path, count, gid_count, slots):
    subuid = write(tmp_path / "subuid", f"alice:100000:65536\nsandgate:500000000:{count}\n")
    subgid = write(tmp_path / "subgid", f"sandgate:500000000:{gid_count}\n")
    pool = id_slots.host_id_pool(subuid, subgid)
    assert (pool.base, pool.slots) == (500000000, slots)
    assert "subuid" in pool.source


def test_a_subuid_entry_without_its_subgid_twin_is_refused_naming_the_line(tmp_path):
    subuid = write(tmp_path / "subuid", f"sandgate:500000000:{4 * ID_COUNT}\n")
    subgid = write(tmp_path / "subgid", "sandgate:600000000:65536\n")
    with pytest.raises(SandboxError, match=f"add 'sandgate:500000000:{4 * ID_COUNT}' to"):
        id_slots.host_id_pool(subuid, subgid)


def test_another_users_range_inside_the_built_in_pool_is_refused(tmp_path):
    inside = ID_BASE + 500 * ID_COUNT  # not in the first slot: the whole pool is checked
    subuid = write(tmp_path / "subuid", f"bob:{inside}:65536\n")
    with pytest.raises(SandboxError, match="overlap bob's subordinate ids"):
        id_slots.host_id_pool(subuid, tmp_path / "none")


def small_pool(slots=3):
    return id_slots.IdPool(ID_BASE, slots, "test")


def test_slots_are_distinct_while_held_and_free_again_when_released(tmp_path):
    pool = small_pool()
    first, second = id_slots.claim(pool, tmp_path), id_slots.claim(pool, tmp_path)
    assert (first.ids.base, second.ids.base) == (ID_BASE, ID_BASE + ID_COUNT)
    assert id_slots.in_use(pool, tmp_path) == [ID_BASE, ID_BASE + ID_COUNT]
    first.release()
    first.release()  # twice: nothing
    assert not first.held and id_slots.in_use(pool, tmp_path) == [ID_BASE + ID_COUNT]
    again = id_slots.claim(pool, tmp_path)
    assert again.ids.base == ID_BASE
    for slot in (second, again):
        slot.release()
    assert id_slots.in_use(pool, tmp_path) == []


def test_a_full_pool_refuses_with_one_line_naming_the_fix(tmp_path):
    pool = small_pool(2)
    held = [id_slots.claim(pool, tmp_path) for _ in range(2)]
    with pytest.raises(SandboxError) as refused:
        id_slots.claim(pool, tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "all 2 sandbox id ranges" in message
    assert "sandgate:BASE:COUNT" in message
    for slot in held:
        slot.release()
    assert id_slots.claim(pool, tmp_path).ids.base == ID_BASE


def test_a_slot_held_by_another_process_is_not_given_and_its_death_frees_it(tmp_path):
    """The kernel drops a killed holder's lock: no slot outlives its runner."""
    pool = small_pool(2)
    code = (
        "import sys, time; from pathlib import Path; from sandgate.enforcer.sandbox import id_slots;"
        f"s = id_slots.claim(id_slots.IdPool({ID_BASE}, 2, 't'), Path({str(tmp_path)!r}));"
        "print(s.ids.base, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert int(holder.stdout.readline()) == ID_BASE
        mine = id_slots.claim(pool, tmp_path)
        assert mine.ids.base == ID_BASE + ID_COUNT
        with pytest.raises(SandboxError):
            id_slots.claim(pool, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert id_slots.claim(pool, tmp_path).ids.base == ID_BASE
    mine.release()


def test_the_lock_is_not_inherited_across_exec(tmp_path):
    """A sandbox init forked from the runner closes it; exec'd helpers never get it."""
    slot = id_slots.claim(small_pool(1), tmp_path)
    assert not os.get_inheritable(slot._fd)
    slot.release()


def test_a_lock_dir_that_cannot_be_made_is_one_clear_error(tmp_path):
    blocker = write(tmp_path / "file", "")
    with pytest.raises(
        SandboxError, match=r"cannot make .* \(the sandbox id slots\): Not a directory"
    ):
        id_slots.claim(small_pool(1), blocker / "ids")
