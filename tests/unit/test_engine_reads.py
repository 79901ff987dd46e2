"""How much mitmproxy reads from a client at once (proxy/engine.py `next_read_size`,
`_count`): a read whose bytes were dear to handle makes the next one smaller, cheap
ones grow it back to what mitmproxy asks; the bytes are counted either way."""

from __future__ import annotations

import asyncio
import time

import pytest
from sandgate.proxy.engine import READ_FIRST, READ_MIN, READ_SLICE, _count, next_read_size
from sandgate.proxy.turns import Turns


@pytest.mark.parametrize(
    ("size", "got", "spent", "expected"),
    [
        pytest.param(4096, 4096, READ_SLICE / 2, 8192, id="cheap-doubles"),
        pytest.param(65535, 65535, 0.0, 65535, id="never-past-what-is-asked"),
        pytest.param(65535, 65535, 8 * READ_SLICE, 65535 // 8, id="dear-shrinks-to-a-slice"),
        pytest.param(4096, 4096, 1.0, READ_MIN, id="never-below-the-minimum"),
    ],
)
def test_next_read_size(size, got, spent, expected):
    assert next_read_size(size, 65535, got, spent) == expected


class Counts:
    bytes_up = bytes_down = 0
    sandbox = "10.0.0.2"


def test_reads_are_sized_by_what_the_last_one_cost_and_counted():
    async def scenario():
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * 200_000)
        writer = type("W", (), {"write": lambda self, data: None})()
        counts = Counts()
        loop = asyncio.get_running_loop()
        _count(reader, writer, counts, Turns(loop.call_soon, loop.create_future, budget=1.0))
        sizes = [len(await reader.read(65535))]  # the first: READ_FIRST
        for _ in range(4):  # handled at once: doubling, up to what is asked
            sizes.append(len(await reader.read(65535)))
        time.sleep(0.02)  # a dear read: ~20 ms of handling
        sizes.append(len(await reader.read(65535)))
        return sizes, counts.bytes_up

    sizes, counted = asyncio.run(scenario())
    assert sizes[:5] == [READ_FIRST, 2 * READ_FIRST, 4 * READ_FIRST, 8 * READ_FIRST, 65535]
    assert sizes[-1] < 65535 / 10
    assert counted == sum(sizes)
