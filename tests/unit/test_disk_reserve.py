"""The disk reserve's pure parts: parsing, the shortfall and when to look again;
tmpfs sizing and cgroup v1's TCP limit, which bound what a task holds of the host."""

from __future__ import annotations

from pathlib import Path

import pytest
from sandgate.enforcer.sandbox import disk_reserve
from sandgate.enforcer.sandbox.cgroup import TCP_BYTES_V1, Limits, limit_settings
from sandgate.enforcer.sandbox.disk_reserve import DiskWatch, Reserve, Room, parse_reserve
from sandgate.enforcer.sandbox.spec import TMPFS_BYTES_UNLIMITED, tmpfs_bounds

GIB, MIB = 1 << 30, 1 << 20


def room(free: int, total: int, free_inodes: int = 10**6, inodes: int = 2 * 10**6) -> Room:
    return Room(Path("/ws"), free, total, free_inodes, inodes)


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        pytest.param("1G", 100 * GIB, GIB, id="default"),
        pytest.param("1G", 4 * GIB, int(0.4 * GIB), id="default-capped-at-a-tenth"),
        pytest.param("512M", 4 * GIB, 512 * MIB, id="size-not-capped"),
        pytest.param("5%", 200 * GIB, 10 * GIB, id="share"),
        pytest.param("0.5%", 200 * GIB, GIB, id="fractional-share"),
    ],
)
def test_reserve_bytes(text, total, expected):
    assert parse_reserve(text).bytes_of(total) == expected


def test_none_is_no_reserve_and_watches_nothing(tmp_path):
    assert parse_reserve("none") is None and parse_reserve("NONE") is None
    assert DiskWatch([tmp_path], None).paths == []
    assert DiskWatch([tmp_path], None).look() == (None, disk_reserve.POLL_S)


@pytest.mark.parametrize("text", ["", "-1G", "1X", "0%", "100%", "150%", "%", "5 %"])
def test_bad_reserve_is_a_value_error(text):
    with pytest.raises(ValueError, match=r"invalid"):
        parse_reserve(text)


def test_shortfall_names_the_path_the_room_and_the_option():
    reserve = parse_reserve("16M")
    assert reserve.shortfall(room(17 * MIB, GIB)) is None
    why = reserve.shortfall(room(12 * MIB, GIB))
    assert why == (
        "the file system of /ws has 12 MiB free, below the disk reserve of 16 MiB "
        "(--disk-reserve 16M)"
    )


@pytest.mark.parametrize(
    ("free_inodes", "inodes", "short"),
    [
        pytest.param(99, 2000, True, id="below-5%"),
        pytest.param(100, 2000, False, id="at-5%"),
        pytest.param(49_999, 10**7, True, id="capped-at-50000"),
        pytest.param(0, 0, False, id="no-inode-count-btrfs"),
    ],
)
def test_inode_reserve(free_inodes, inodes, short):
    why = parse_reserve("1M").shortfall(room(GIB, 2 * GIB, free_inodes, inodes))
    assert (why is not None) == short, why
    assert why is None or "free inodes, below the disk reserve" in why


def test_next_look_is_sooner_near_the_reserve():
    reserve = Reserve(size=GIB)
    far = reserve.next_look(room(500 * GIB, 1000 * GIB))
    near = reserve.next_look(room(GIB + 400 * MIB, 1000 * GIB))
    at = reserve.next_look(room(GIB, 1000 * GIB))
    assert far == disk_reserve.POLL_S
    assert disk_reserve.MIN_POLL_S < near < far
    assert at == disk_reserve.MIN_POLL_S
    few_inodes = reserve.next_look(room(500 * GIB, 1000 * GIB, free_inodes=50_100))
    assert few_inodes == disk_reserve.MIN_POLL_S


def test_watch_looks_at_each_file_system_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    watch = DiskWatch([tmp_path / "a", tmp_path / "b"], parse_reserve("1M"))
    assert watch.paths == [tmp_path / "a"]  # one device
    assert watch.look()[0] is None
    full = DiskWatch([tmp_path], parse_reserve("99%"))
    why, _ = full.look()
    assert why is not None and str(tmp_path) in why


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        pytest.param(4 * GIB, (4 * GIB, 4 * GIB // 4096), id="the-memory-limit"),
        pytest.param(None, (TMPFS_BYTES_UNLIMITED, TMPFS_BYTES_UNLIMITED // 4096), id="none"),
        pytest.param(MIB, (MIB, 1024), id="at-least-1024-inodes"),
    ],
)
def test_tmpfs_bounds(memory, expected):
    assert tmpfs_bounds(memory) == expected


@pytest.mark.parametrize(
    ("memory", "tcp"),
    [
        pytest.param(4 * GIB, TCP_BYTES_V1, id="capped"),
        pytest.param(64 * MIB, 64 * MIB, id="memory"),
    ],
)
def test_v1_tcp_limit_follows_the_memory_limit(memory, tcp):
    writes = limit_settings(1, {"memory"}, Limits(memory_bytes=memory), False, tcp_file=True)
    assert writes == [
        ("memory.limit_in_bytes", str(memory)),
        ("memory.kmem.tcp.limit_in_bytes", str(tcp)),
    ]
    assert limit_settings(1, {"memory"}, Limits(memory_bytes=memory), False) == writes[:1]
