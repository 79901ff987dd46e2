"""The README's first command: `sandgate demo` (a scripted agent through an embedded
gateway in a fake internet of its own) passes, wherever sandgate is installed."""

from __future__ import annotations

import subprocess

import pytest
from support import sandbox

pytestmark = pytest.mark.e2e


def test_the_demo_passes_and_leaves_nothing_behind():
    before = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )
    result = subprocess.run(
        [sandbox.SANDGATE, "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every allowed step passed, every forbidden step was blocked" in result.stdout
    assert (
        "Forbidden servers received: 0 HTTP requests / DNS queries, 0 UDP datagrams."
        in result.stdout
    )
    after = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )
    assert not {n for n in after - before if n.startswith("sgdemo")}
