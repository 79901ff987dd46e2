"""The host id pool and its slots (enforcer/sandbox/id_slots.py): where the pool comes
from, and that a slot is one holder's until it is released or the holder dies."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from sandgate.enforcer.sandbox import cgroup, id_slots
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


# Ids of no process here: a holder killed before it named its task's cgroups leaves a
# slot that the next claim takes only when no process in /proc has its ids, and this
# host's real tasks have the built-in pool's.
BASE = 3_000_000_000


def small_pool(slots=3):
    return id_slots.IdPool(BASE, slots, "test")


def test_slots_are_distinct_while_held_and_free_again_when_released(tmp_path):
    pool = small_pool()
    first, second = id_slots.claim(pool, tmp_path), id_slots.claim(pool, tmp_path)
    assert (first.ids.base, second.ids.base) == (BASE, BASE + ID_COUNT)
    assert id_slots.in_use(pool, tmp_path) == [BASE, BASE + ID_COUNT]
    first.release()
    first.release()  # twice: nothing
    assert not first.held and id_slots.in_use(pool, tmp_path) == [BASE + ID_COUNT]
    again = id_slots.claim(pool, tmp_path)
    assert again.ids.base == BASE
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
    assert id_slots.claim(pool, tmp_path).ids.base == BASE


def test_a_slot_held_by_another_process_is_not_given_and_its_death_frees_it(tmp_path):
    """The kernel drops a killed holder's lock: no slot outlives its runner."""
    pool = small_pool(2)
    code = (
        "import sys, time; from pathlib import Path; from sandgate.enforcer.sandbox import id_slots;"
        f"s = id_slots.claim(id_slots.IdPool({BASE}, 2, 't'), Path({str(tmp_path)!r}));"
        "print(s.ids.base, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert int(holder.stdout.readline()) == BASE
        mine = id_slots.claim(pool, tmp_path)
        assert mine.ids.base == BASE + ID_COUNT
        with pytest.raises(SandboxError):
            id_slots.claim(pool, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert id_slots.claim(pool, tmp_path).ids.base == BASE
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


# --- a holder that died without releasing its slot ---------------------------------

MEMORY_MOUNTINFO = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
TASK_CGROUP = ("memory", "/agents/sandgate-r1")


class ReadOnlyKernel(cgroup.CgroupFS):
    """A tree in tmp_path: a cgroup v1 memory hierarchy, read as the kernel's would be."""

    def __init__(self, root, mountinfo=MEMORY_MOUNTINFO):
        super().__init__(str(root))
        self.reads = 0
        write(makedirs(root / "proc/self") / "mountinfo", mountinfo)
        write(root / "proc/self/cgroup", "4:memory:/\n")
        self.task = makedirs(root / "sys/fs/cgroup/memory/agents/sandgate-r1")
        write(self.task / "cgroup.procs", "")

    def read(self, path):
        self.reads += 1
        return super().read(path)


def makedirs(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def killed_holder(pool, lock_dir, fs, cgroups=(TASK_CGROUP,)):
    """What a runner SIGKILLed with its task running leaves: a free lock, its record."""
    slot = id_slots.claim(pool, lock_dir, fs=fs)
    slot.record(list(cgroups) if cgroups is not None else None)
    slot.release(task_gone=False)  # the kernel closes it; nothing empties the record
    return slot.ids.base


def test_a_released_slot_is_taken_again_without_looking(tmp_path):
    """The normal path: the holder emptied its record, the next claim reads nothing."""
    fs = ReadOnlyKernel(tmp_path / "k")
    pool = small_pool(2)
    first = id_slots.claim(pool, tmp_path, fs=fs)
    first.record([TASK_CGROUP])
    assert (tmp_path / str(BASE)).stat().st_size > 0
    first.release()
    assert (tmp_path / str(BASE)).stat().st_size == 0
    assert id_slots.claim(pool, tmp_path, fs=fs).ids.base == BASE
    assert fs.reads == 0


@pytest.mark.parametrize(
    ("state", "taken"),
    [
        pytest.param("populated", False, id="its-task-lives"),
        pytest.param("empty", True, id="its-cgroup-is-empty"),
        pytest.param("gone", True, id="its-cgroup-is-gone"),
        pytest.param("unreadable", False, id="cgroup-procs-unreadable"),
        pytest.param("unmounted", False, id="no-mount-shows-its-hierarchy"),
    ],
)
def test_a_killed_holders_slot_is_taken_only_once_its_task_is_gone(tmp_path, state, taken):
    fs = ReadOnlyKernel(tmp_path / "k")
    pool = small_pool(2)
    killed = killed_holder(pool, tmp_path / "ids", fs)
    if state == "populated":
        write(fs.task / "cgroup.procs", "4321\n")
    elif state == "gone":
        shutil.rmtree(fs.task)
    elif state == "unreadable":
        (fs.task / "cgroup.procs").unlink()
        (fs.task / "cgroup.procs").mkdir()
    elif state == "unmounted":
        write(tmp_path / "k/proc/self/mountinfo", "")
    slot = id_slots.claim(pool, tmp_path / "ids", fs=fs)
    assert (slot.ids.base == killed) is taken
    assert id_slots.in_use(pool, tmp_path / "ids") == [slot.ids.base]
    with (
        pytest.raises(SandboxError, match="1 of them hold a killed run's task")
        if not taken
        else (contextlib.nullcontext())
    ):
        id_slots.claim(pool, tmp_path / "ids", fs=fs)


def test_a_cgroup_is_found_again_through_another_mount_of_its_hierarchy(tmp_path):
    """`ip netns exec` gives a runner its own /sys: it mounts the hierarchy elsewhere."""
    fs = ReadOnlyKernel(
        tmp_path / "k",
        "35 31 0:32 /agents /run/sandgate-cgroupfs/memory rw - cgroup cgroup rw,memory\n",
    )
    moved = makedirs(tmp_path / "k/run/sandgate-cgroupfs/memory/sandgate-r1")
    write(moved / "cgroup.procs", "4321\n")
    assert cgroup.members(*TASK_CGROUP, fs=fs) == {4321}
    assert cgroup.members("memory", "/agents/sandgate-r2", fs=fs) == set()  # gone
    with pytest.raises(cgroup.CgroupError, match="no cgroup v1 memory mount here shows /other"):
        cgroup.members("memory", "/other/sandgate-r1", fs=fs)
    with pytest.raises(cgroup.CgroupError, match="no cgroup v2 mount"):
        cgroup.members("", "/sandgate-r1", fs=fs)


@pytest.mark.parametrize(
    ("uid_line", "left"),
    [
        pytest.param(f"Uid:\t0\t{BASE + 5}\t0\t{BASE + 5}", True, id="effective-uid-in-range"),
        pytest.param(f"Uid:\t{BASE + ID_COUNT}\t0\t0\t0", False, id="next-slots-uid"),
        pytest.param("Uid:\t0\t0\t0\t0", False, id="root"),
    ],
)
def test_a_task_without_cgroup_is_looked_for_by_its_ids(tmp_path, uid_line, left):
    proc = makedirs(tmp_path / "proc/77")
    write(proc / "status", f"Name:\tsleep\n{uid_line}\nGid:\t0\t0\t0\t0\n")
    record = {"pid": 1, "cgroups": None}
    found = id_slots.left_over(small_pool().slot(0), record, proc=tmp_path / "proc")
    assert (found == "processes [77] have its ids") if left else found is None


def test_a_record_that_cannot_be_parsed_looks_in_proc(tmp_path):
    (tmp_path / str(BASE)).write_text('{"pid": 12, "cgro')  # a holder killed mid-write
    fd = os.open(tmp_path / str(BASE), os.O_RDONLY)
    try:
        assert id_slots._read_record(fd) == {"pid": None, "cgroups": None}
    finally:
        os.close(fd)


def test_gc_frees_a_killed_holders_slot_once_its_cgroup_is_gone(tmp_path):
    fs = ReadOnlyKernel(tmp_path / "k")
    pool = small_pool(2)
    killed = killed_holder(pool, tmp_path / "ids", fs)
    write(fs.task / "cgroup.procs", "4321\n")
    live = id_slots.claim(pool, tmp_path / "ids", fs=fs)  # a live run's: untouched
    assert live.ids.base != killed
    live.record([TASK_CGROUP])
    shutil.rmtree(fs.task)  # as cgroup.remove_path leaves it
    assert id_slots.sweep(pool, tmp_path / "ids", dry_run=True, fs=fs) == [
        f"id slot {killed} (of a runner killed with its task, pid {os.getpid()})"
    ]
    assert (tmp_path / "ids" / str(killed)).stat().st_size > 0  # a dry run touches nothing
    assert len(id_slots.sweep(pool, tmp_path / "ids", fs=fs)) == 1
    assert (tmp_path / "ids" / str(killed)).stat().st_size == 0
    assert (tmp_path / "ids" / str(live.ids.base)).stat().st_size > 0
    assert id_slots.sweep(pool, tmp_path / "ids", fs=fs) == []
    live.release()


def test_a_sweep_for_some_holders_frees_their_slots_alone(tmp_path):
    """The service ends a dead runner's sandbox: it frees that runner's slot (by the
    record's pid), not another killed holder's, which is gc's to judge."""
    fs = ReadOnlyKernel(tmp_path / "k")
    pool = small_pool(2)
    other = id_slots.claim(pool, tmp_path / "ids", fs=fs)  # held meanwhile: mine is another
    mine = killed_holder(pool, tmp_path / "ids", fs, cgroups=None)
    other_base = other.ids.base
    os.pwrite(other._fd, json.dumps({"pid": 1, "cgroups": None}).encode(), 0)
    other.release(task_gone=False)
    swept = id_slots.sweep(pool, tmp_path / "ids", holders={os.getpid()}, fs=fs)
    assert swept == [f"id slot {mine} (of a runner killed with its task, pid {os.getpid()})"]
    assert (tmp_path / "ids" / str(mine)).stat().st_size == 0
    assert (tmp_path / "ids" / str(other_base)).stat().st_size > 0
