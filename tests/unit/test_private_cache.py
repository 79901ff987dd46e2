"""private_cache.write: a write that fails (a full disk) leaves no file behind."""

from __future__ import annotations

import errno
import os

from sandgate.enforcer import private_cache


def test_a_failed_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    target = directory / "entry"

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    private_cache.write(str(target), b"x" * 4096)
    assert sorted(os.listdir(directory)) == []

    monkeypatch.undo()
    private_cache.write(str(target), b"kept")
    assert sorted(os.listdir(directory)) == ["entry"]
    assert private_cache.read(str(target)) == b"kept"
